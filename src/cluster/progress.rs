//! The barriers this node takes part in now, for `cluster status`: each
//! registered by a mark that unregisters it when dropped, so a barrier
//! ended by any path (decided, settled, failed, panicked) leaves no trace.

use super::{Cluster, Shared};
use crate::api::BarrierView;
use crate::sync::lock;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

#[derive(Default)]
pub(super) struct InProgress(Mutex<BTreeMap<String, (BarrierView, Instant)>>);

impl InProgress {
    pub(super) fn list(&self) -> Vec<BarrierView> {
        lock(&self.0)
            .values()
            .map(|(view, since)| BarrierView { running_ms: since.elapsed().as_millis() as u64, ..view.clone() })
            .collect()
    }
}

/// Registered while it lives.
pub struct BarrierMark {
    shared: Arc<Shared>,
    key: String,
}

impl Drop for BarrierMark {
    fn drop(&mut self) {
        lock(&self.shared.in_progress.0).remove(&self.key);
    }
}

impl Cluster {
    /// Shows `barrier` (on `volume`, to `generation`) in `cluster status`
    /// as `role` (`coordinating` or `holding`) until the mark is dropped.
    pub fn mark_barrier(&self, barrier: &str, volume: &str, generation: u64, role: &str) -> BarrierMark {
        let key = format!("{role}:{barrier}");
        let view = BarrierView { barrier: barrier.into(), volume: volume.into(), generation, role: role.into(), running_ms: 0 };
        lock(&self.shared.in_progress.0).insert(key.clone(), (view, Instant::now()));
        BarrierMark { shared: self.shared.clone(), key }
    }
}
