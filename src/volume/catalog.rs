use super::Volume;
use crate::backend::Backend;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// Everything a server exports: the open stores and the volumes over them.
/// Immutable once built; a reload builds a new catalog.
#[derive(Debug, Default)]
pub struct Catalog {
    pub stores: HashMap<String, Arc<dyn Backend>>,
    pub volumes: BTreeMap<String, Arc<Volume>>,
    /// The volume served to clients that ask for the empty export name.
    pub default_export: Option<String>,
}

impl Catalog {
    /// Looks up an export; the empty name selects the default export.
    pub fn export(&self, name: &str) -> Option<&Arc<Volume>> {
        if name.is_empty() {
            return self.default_export.as_deref().and_then(|d| self.volumes.get(d));
        }
        self.volumes.get(name)
    }

    /// Flushes every store once.
    pub fn flush_all(&self) -> std::io::Result<()> {
        let mut first_error = None;
        for (name, store) in &self.stores {
            if let Err(e) = store.flush() {
                tracing::error!(backend = %name, error = %e, "flush failed");
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}
