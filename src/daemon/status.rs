//! The daemon's state as API views (`status`, `history`, jobs, reports).

use super::{Daemon, DaemonError};
use crate::api::{self, BackendKind, ExtentStatus, ForwardView, LegView, RangeStatus, VolumeStatus};
use crate::backend::StoreKind;
use crate::map::{Extent, Leg, TargetSpec};
use crate::sync::lock;
use crate::volume::SwapReport;

/// An extent's view; `leg_state` gives a mirror leg's state by store.
fn extent_status(e: &Extent, leg_state: &dyn Fn(&str) -> Option<String>) -> ExtentStatus {
    let view = |legs: &[Leg], mirror: bool| {
        legs.iter().map(|l| LegView { backend: l.store.clone(), backend_offset: l.offset, state: if mirror { leg_state(&l.store) } else { None } }).collect()
    };
    let base = ExtentStatus {
        start: e.start,
        length: e.length,
        backend: None,
        backend_offset: None,
        zero: false,
        layout: String::new(),
        legs: Vec::new(),
        chunk: None,
        region: None,
        forwarded: None,
    };
    // The view spells out each layout's settings, so it names the variants.
    match &e.target {
        TargetSpec::Linear { store, offset } => ExtentStatus { layout: "linear".into(), backend: Some(store.clone()), backend_offset: Some(*offset), ..base },
        TargetSpec::Zero => ExtentStatus { layout: "zero".into(), zero: true, ..base },
        TargetSpec::Mirror { legs, region } => ExtentStatus { layout: "mirror".into(), legs: view(legs, true), region: Some(*region), ..base },
        TargetSpec::Stripe { members, chunk } => ExtentStatus { layout: "stripe".into(), legs: view(members, false), chunk: Some(*chunk), ..base },
        TargetSpec::Thin { pool, chunk } => ExtentStatus { layout: format!("thin (pool {pool})"), chunk: Some(*chunk), ..base },
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
                    extents: {
                        let red = v.translation().redundancy().clone();
                        let state = |store: &str| red.leg(store).map(|l| l.condition().as_str().to_string());
                        let mut extents: Vec<ExtentStatus> = table.extents().iter().map(|e| extent_status(e, &state)).collect();
                        for (i, stores, link) in v.translation().forwarding() {
                            extents[i].forwarded = Some(ForwardView { to: link.endpoint, stores, connections: link.connections, requests: link.sent, retries: link.retries, failed: link.failed, last_error: link.last_error });
                        }
                        extents
                    },
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
