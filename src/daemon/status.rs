//! The daemon's state as API views (`status`, `history`, jobs, reports).

use super::{Daemon, DaemonError};
use crate::api::{self, BackendKind, ExtentStatus, RangeStatus, VolumeStatus};
use crate::backend::StoreKind;
use crate::map::Extent;
use crate::sync::lock;
use crate::volume::SwapReport;

fn extent_status(e: &Extent) -> ExtentStatus {
    // Today's targets map at most one store range; the view shows it.
    match e.target.store_ranges(e.length).first() {
        Some((store, r)) => ExtentStatus { start: e.start, length: e.length, backend: Some(store.to_string()), backend_offset: Some(r.start), zero: false },
        None => ExtentStatus { start: e.start, length: e.length, backend: None, backend_offset: None, zero: true },
    }
}

fn backend_kind(k: StoreKind) -> BackendKind {
    match k {
        StoreKind::File => BackendKind::File,
        StoreKind::BlockDevice => BackendKind::BlockDevice,
        StoreKind::Memory => BackendKind::Memory,
    }
}

pub fn swap_outcome(r: SwapReport) -> api::SwapOutcome {
    api::SwapOutcome {
        volume: r.volume,
        from_generation: r.from_generation,
        generation: r.generation,
        ranges: r.ranges,
        attempts: r.attempts,
        hold: r.hold.as_micros() as u64,
        drain: r.drain.as_micros() as u64,
    }
}

impl Daemon {
    pub fn status(&self) -> api::Status {
        let catalog = self.catalog();
        let server = lock(&self.server);
        let connections = server.connections();
        let listen = server.endpoints().iter().map(|e| e.to_string()).collect();
        drop(server);
        let volumes = catalog
            .volumes
            .values()
            .map(|v| {
                let table = v.table();
                let gate = v.gate().status();
                let stats = v.stats();
                VolumeStatus {
                    name: v.name().into(),
                    description: v.spec().description.clone(),
                    size: table.size(),
                    read_only: v.spec().read_only,
                    generation: table.generation(),
                    state: gate.state.into(),
                    extents: table.extents().iter().map(extent_status).collect(),
                    held_ranges: gate.held_ranges.iter().map(|r| RangeStatus { start: r.start, length: r.len() }).collect(),
                    in_flight: gate.in_flight,
                    held_requests: gate.held_requests,
                    connections: connections.iter().filter(|c| c.export.as_deref() == Some(v.name())).count(),
                    swaps: stats.swaps,
                    last_hold_us: stats.last_hold_us,
                    last_drain_us: stats.last_drain_us,
                    last_error: stats.last_error,
                    manual_pause: self.pauses.contains(v.name()),
                }
            })
            .collect();
        let mut backends: Vec<api::BackendStatus> = lock(&self.stores)
            .values()
            .map(|s| {
                let info = s.handle.info();
                api::BackendStatus {
                    name: s.config.spec.name.clone(),
                    kind: backend_kind(info.kind),
                    path: info.path.clone(),
                    size: info.size,
                    shared: s.config.shared,
                    rotational: info.rotational,
                    fault: s.fault.describe(),
                }
            })
            .collect();
        backends.sort_by(|a, b| a.name.cmp(&b.name));
        api::Status { config: self.config_path.clone(), listen, volumes, backends }
    }

    /// Archived generations of a volume, for operators.
    pub fn history(&self, volume: &str) -> Result<Vec<api::GenerationRecord>, DaemonError> {
        let gens = self.state.history(volume).map_err(|e| DaemonError::io(format!("volume '{volume}': history"), e))?;
        gens.into_iter().map(|g| self.state.load_generation(volume, g).map_err(DaemonError::from)).collect()
    }
}
