//! Volumes: a name, a mapping table and the open stores it points at.
//! Every request is translated here; the server only schedules the pieces.
//!
//! A [`Translation`] pairs one immutable [`MappingTable`] generation with the
//! open [`Target`] of each extent (`target/`: one file per kind). The
//! volume holds the current translation in an `ArcSwap`: a request loads it
//! once (one atomic load, no lock) after passing the volume's [`Gate`], and
//! keeps that `Arc` until it completes, so a swap never changes the
//! translation under an in-flight request. Swaps run in phases
//! (`phases.rs`), composed locally by `Volume::swap` (`swap.rs`).

mod catalog;
mod commit;
mod gate;
mod phases;
pub mod redundancy;
mod stats;
mod swap;
pub mod target;
mod translation;

pub use catalog::Catalog;
pub use commit::{Commit, CommitError, Unpersisted};
pub use gate::{Gate, GateStatus, HoldId, Ticket};
pub use phases::{DrainTimedOut, Paused, Staged};
pub use swap::{SwapError, SwapOptions, SwapPhase, SwapReport, UnknownSwapPhase};
pub use stats::{HistogramSnapshot, Op, Stamp, StatsSnapshot, SwapResult, VolumeStats, BUCKETS};
pub use redundancy::{DirtyRun, LegAnnouncer, LegCondition, LegEvent, LegState, Redundancy, RegionBitmap};
pub use target::{open_target, Forwarder, Target, TargetCtx, TargetError};
pub use translation::{Route, TranslateError, Translation};

use crate::backend::Backend;
use crate::map::MappingTable;
use arc_swap::ArcSwap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub(crate) use crate::sync::lock;

/// Static facts about a volume, fixed for its lifetime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSpec {
    pub name: String,
    pub description: String,
    pub read_only: bool,
    /// Alignment of the mapping and preferred I/O size advertised to clients.
    pub block_size: u32,
}

/// Timings and outcome of the last transaction, for status.
#[derive(Debug, Clone, Default)]
pub struct SwapStats {
    pub swaps: u64,
    pub last_hold_us: Option<u64>,
    pub last_drain_us: Option<u64>,
    pub last_error: Option<String>,
}

#[derive(Debug)]
pub struct Volume {
    spec: VolumeSpec,
    current: ArcSwap<Translation>,
    gate: Arc<Gate>,
    /// One swap at a time per volume.
    swap_lock: Mutex<()>,
    stats: Mutex<SwapStats>,
    /// I/O and swap counters for the metrics exporter (atomics only).
    counters: Arc<VolumeStats>,
    /// Stores earlier tables wrote to that the current one does not use;
    /// FLUSH syncs them too until a flush after their retirement succeeds.
    retired: Mutex<Vec<Arc<dyn Backend>>>,
}

impl Volume {
    pub fn new(spec: VolumeSpec, translation: Translation) -> Volume {
        Volume {
            spec,
            current: ArcSwap::from_pointee(translation),
            gate: Gate::new(),
            swap_lock: Mutex::new(()),
            stats: Mutex::new(SwapStats::default()),
            counters: Arc::new(VolumeStats::new()),
            retired: Mutex::new(Vec::new()),
        }
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    pub fn spec(&self) -> &VolumeSpec {
        &self.spec
    }

    pub fn size(&self) -> u64 {
        self.current.load().table().size()
    }

    pub fn generation(&self) -> u64 {
        self.current.load().table().generation()
    }

    /// The translation in force now. Callers keep the returned `Arc` for the
    /// whole life of a request.
    pub fn translation(&self) -> Arc<Translation> {
        self.current.load_full()
    }

    /// Whether some extent of the current table goes to another node
    /// (cheap: no route is built).
    pub fn forwards_any(&self) -> bool {
        self.current.load().forwards_any()
    }

    pub fn table(&self) -> MappingTable {
        self.current.load().table().clone()
    }

    /// Change trackers served as `qemu:dirty-bitmap:NAME` (see
    /// [`Redundancy::tracker_names`]).
    pub fn dirty_bitmaps(&self) -> Vec<String> {
        self.translation().redundancy().tracker_names()
    }

    /// See [`Redundancy::dirty_runs`].
    pub fn dirty_runs(&self, name: &str, offset: u64, length: u64, max_runs: usize) -> Option<Vec<DirtyRun>> {
        self.translation().redundancy().dirty_runs(name, offset, length, max_runs)
    }

    pub fn gate(&self) -> &Arc<Gate> {
        &self.gate
    }

    pub fn stats(&self) -> SwapStats {
        lock(&self.stats).clone()
    }

    /// The volume's I/O and swap counters (see [`VolumeStats`]); distinct
    /// from [`stats`](Self::stats), the last swap's details for status.
    pub fn counters(&self) -> &Arc<VolumeStats> {
        &self.counters
    }

    fn record(&self, hold: Option<Duration>, drain: Option<Duration>, error: Option<String>) {
        // A hold means the swap reached its commit; an error without one is
        // a final drain timeout; neither is a manual pause (not a swap).
        let result = match (hold.is_some(), error.is_some()) {
            (true, false) => Some(SwapResult::Ok),
            (true, true) => Some(SwapResult::CommitFailed),
            (false, true) => Some(SwapResult::DrainTimeout),
            (false, false) => None,
        };
        if let Some(result) = result {
            self.counters.swap_finished(result, hold, drain);
        }
        let mut s = lock(&self.stats);
        if error.is_none() && hold.is_some() {
            s.swaps += 1;
        }
        if let Some(h) = hold {
            s.last_hold_us = Some(h.as_micros() as u64);
        }
        if let Some(d) = drain {
            s.last_drain_us = Some(d.as_micros() as u64);
        }
        s.last_error = error;
    }

    /// Translates `[offset, offset+length)`; the range must already be
    /// checked against `size()`. Call only while holding a gate ticket for
    /// the range, so that a swap cannot happen between this and the I/O.
    pub fn route(&self, offset: u64, length: u64) -> Route {
        Route::new(self.translation(), offset, length)
    }

    /// Makes every completed write to any store of this volume durable.
    /// Stores are shared by all connections, so this covers writes made
    /// through other connections too (multi-conn consistency).
    ///
    /// FLUSH is never held by a pause. Its promise covers writes completed
    /// before it: before a swap those live on the current table's stores;
    /// after it, on the new table's stores or on stores of the old table
    /// that the swap put on the retired list, which this syncs too.
    pub fn flush(&self) -> std::io::Result<()> {
        let retired: Vec<_> = lock(&self.retired).clone();
        self.translation().flush()?;
        for store in &retired {
            store.flush()?;
        }
        if !retired.is_empty() {
            lock(&self.retired).retain(|s| !retired.iter().any(|r| Arc::ptr_eq(r, s)));
        }
        Ok(())
    }

    fn retire(&self, stores: impl Iterator<Item = Arc<dyn Backend>>) {
        let redundancy = self.translation().redundancy().clone();
        let mut retired = lock(&self.retired);
        // A failed mirror leg's store is not flushed: its errors are known
        // and its regions are marked stale.
        for s in stores.filter(|s| !redundancy.is_failed_store(s)) {
            if !retired.iter().any(|r| Arc::ptr_eq(r, &s)) {
                retired.push(s);
            }
        }
    }
}
