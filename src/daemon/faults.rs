//! Fault injection (`nbdvirt fault`): makes an open store fail on purpose,
//! for operators' drills and for tests. The switch lives with the store's
//! handle (`OpenStore::fault`), so it survives reloads that keep the store.

use super::{Daemon, DaemonError};
use crate::api::{FaultErrorArg, FaultReport, FaultScopeArg};
use crate::backend::{Fault, FaultError, FaultScope};
use crate::sync::lock;
use std::sync::Arc;

fn fault_of(error: FaultErrorArg, scope: FaultScopeArg) -> Option<Fault> {
    let error = match error {
        FaultErrorArg::Eio => FaultError::Eio,
        FaultErrorArg::Enospc => FaultError::Enospc,
        FaultErrorArg::Off => return None,
    };
    let scope = match scope {
        FaultScopeArg::Reads => FaultScope::Reads,
        FaultScopeArg::Writes => FaultScope::Writes,
        FaultScopeArg::Both => FaultScope::Both,
    };
    Some(Fault { error, scope })
}

impl Daemon {
    /// Sets (or with `off` clears) the injected fault of `backend`.
    pub fn fault(&self, backend: &str, error: FaultErrorArg, scope: FaultScopeArg) -> Result<FaultReport, DaemonError> {
        // Holding the store table keeps a concurrent reload from closing
        // the store between the lookup and the change.
        let stores = lock(&self.stores);
        let store = stores.get(backend).ok_or_else(|| DaemonError::NoBackend(backend.into()))?;
        let fault = fault_of(error, scope);
        store.fault.set(fault);
        let mut shared_with: Vec<String> =
            stores.iter().filter(|(n, s)| n.as_str() != backend && Arc::ptr_eq(&s.fault, &store.fault)).map(|(n, _)| n.clone()).collect();
        shared_with.sort();
        // Warn level: an operator reading the log after an incident must
        // see that the errors were injected.
        let state = fault.map_or_else(|| "off".to_string(), |f| f.to_string());
        if shared_with.is_empty() {
            tracing::warn!("fault injection on backend {backend}: {state}");
        } else {
            tracing::warn!("fault injection on backend {backend}: {state} (same store as {})", shared_with.join(", "));
        }
        Ok(FaultReport { backend: backend.into(), fault: store.fault.describe(), shared_with })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_clears_whatever_the_scope() {
        assert_eq!(fault_of(FaultErrorArg::Off, FaultScopeArg::Reads), None);
        assert_eq!(fault_of(FaultErrorArg::Enospc, FaultScopeArg::Writes), Some(Fault { error: FaultError::Enospc, scope: FaultScope::Writes }));
    }
}
