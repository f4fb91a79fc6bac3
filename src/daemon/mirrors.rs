//! The daemon's side of mirrors: the resync jobs, the supervisor thread
//! (failure policy, lazy clearing of write-intent bits), and the table
//! swap every mirror operation ends in.

use super::mirror_error::MirrorError;
use super::{Daemon, DaemonError};
use crate::map::{validate_stores, Extent, MappingTable};
use crate::mirror::ResyncJob;
use crate::persist::GenerationCommit;
use crate::sync::lock;
use crate::volume::{CommitError, LegCondition, LegEvent, LegState, Redundancy, SwapReport, Translation, Volume};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, Weak};
use std::time::Duration;

/// How often idle write-intent bits are cleared and new volumes'
/// failure events subscribed.
const TICK: Duration = Duration::from_secs(1);

pub(super) struct MirrorRegistry {
    /// Resync jobs by (volume, leg); ended jobs stay for status.
    jobs: Mutex<HashMap<(String, String), Arc<ResyncJob>>>,
    events: Mutex<Option<mpsc::Sender<LegEvent>>>,
    /// Redundancy states already reporting to the supervisor.
    subscribed: Mutex<Vec<Weak<Redundancy>>>,
    /// Resyncing legs whose resync the supervisor started (once per leg).
    adopted: Mutex<Vec<Weak<LegState>>>,
    stop: AtomicBool,
}

impl MirrorRegistry {
    pub(super) fn new() -> MirrorRegistry {
        MirrorRegistry { jobs: Mutex::new(HashMap::new()), events: Mutex::new(None), subscribed: Mutex::new(Vec::new()), adopted: Mutex::new(Vec::new()), stop: AtomicBool::new(false) }
    }

    /// Stops the resync of `leg` (at a checkpoint), if one runs.
    pub(super) fn stop_job(&self, volume: &str, leg: &str) {
        let job = lock(&self.jobs).remove(&(volume.to_string(), leg.to_string()));
        if let Some(job) = job {
            job.stop();
        }
    }

    /// Stops everything (shutdown): resyncs stop at a durable checkpoint
    /// and resume at the next start.
    pub(super) fn stop_all(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let jobs: Vec<_> = lock(&self.jobs).drain().map(|(_, j)| j).collect();
        for job in jobs {
            job.stop();
        }
    }
}

impl Daemon {
    /// Starts resyncing `leg` of `volume` (replacing an earlier job).
    pub(super) fn start_resync(&self, volume: &Arc<Volume>, leg: &str, rate: Option<u64>) {
        self.mirrors.stop_job(volume.name(), leg);
        let job = ResyncJob::start(volume.clone(), leg, rate.unwrap_or(crate::mirror::DEFAULT_RATE));
        lock(&self.mirrors.jobs).insert((volume.name().to_string(), leg.to_string()), job);
    }

    /// Resumes every resync left unfinished (restart, crash recovery) and
    /// starts the supervisor thread.
    pub(super) fn start_mirrors(self: &Arc<Self>) {
        self.adopt_resyncing_legs();
        let (tx, rx) = mpsc::channel();
        *lock(&self.mirrors.events) = Some(tx);
        let weak = Arc::downgrade(self);
        let spawned = std::thread::Builder::new().name("mirror-supervisor".into()).spawn(move || supervise(weak, rx));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the mirror supervisor: failed legs are not replaced and intent bits not cleared");
        }
    }

    /// Starts a resync of every resyncing leg that no job copies: left
    /// unfinished by the last run, or added by a reload or a cluster
    /// table change; once per leg (a resync that fails is not retried
    /// here). A migration's destination leg is its job's: here, or in a
    /// cluster wherever a node holds the migration's claim (a node that
    /// has not joined yet leaves them all until it has).
    fn adopt_resyncing_legs(&self) {
        let clustered = lock(&self.config).cluster.is_some();
        if clustered && self.cluster.get().is_none() {
            return;
        }
        // Not while an operation adds a leg it copies itself (migrate
        // start, mirror add): the next round sees its job.
        let Ok(_admin) = self.admin.try_lock() else { return };
        let migrating = self.running_migrations();
        for volume in self.catalog().volumes.values() {
            let jobless: Vec<Arc<LegState>> = {
                let jobs = lock(&self.mirrors.jobs);
                let adopted = lock(&self.mirrors.adopted);
                let copied = |leg: &str| jobs.get(&(volume.name().to_string(), leg.to_string())).is_some_and(|j| j.end().is_none());
                let owned = |leg: &str| migrating.iter().any(|m| m.volume == volume.name() && m.dest == leg);
                let seen = |leg: &Arc<LegState>| adopted.iter().any(|w| w.as_ptr() == Arc::as_ptr(leg));
                volume.translation().redundancy().legs().into_iter().filter(|l| l.condition() == LegCondition::Resyncing && !copied(l.store()) && !owned(l.store()) && !seen(l)).collect()
            };
            if jobless.is_empty() {
                continue;
            }
            if let Some(cluster) = self.cluster.get() {
                if !matches!(cluster.migration_claimant(volume.name()), Ok(None)) {
                    continue;
                }
            }
            for leg in jobless {
                lock(&self.mirrors.adopted).push(Arc::downgrade(&leg));
                tracing::info!(volume = volume.name(), leg = leg.store(), "resyncing a leg no job copies");
                self.start_resync(volume, leg.store(), None);
            }
        }
        lock(&self.mirrors.adopted).retain(|w| w.strong_count() > 0);
    }

    /// One supervisor round: new volumes report their failures, idle
    /// intent bits are cleared, resyncing legs without a job get one.
    fn mirror_tick(&self) {
        let Some(tx) = lock(&self.mirrors.events).clone() else { return };
        let mut subscribed = lock(&self.mirrors.subscribed);
        subscribed.retain(|w| w.strong_count() > 0);
        for volume in self.catalog().volumes.values() {
            let red = volume.translation().redundancy().clone();
            if !subscribed.iter().any(|w| w.as_ptr() == Arc::as_ptr(&red)) {
                red.notify(tx.clone());
                subscribed.push(Arc::downgrade(&red));
            }
            if red.legs().len() > 1 {
                if let Err(e) = red.clear_idle() {
                    tracing::warn!(volume = volume.name(), error = %e, "clearing write-intent bits failed (they stay set: only more resync after a crash)");
                }
            }
        }
        drop(subscribed);
        self.adopt_resyncing_legs();
    }

    /// Registers `leg` as resyncing with `stale` regions, swaps `volume`
    /// onto `extents` (which have the leg) and starts its resync; if the
    /// swap fails the leg's state is forgotten again.
    pub(super) fn add_leg_resyncing(
        &self,
        volume: &Arc<Volume>,
        leg: &str,
        stale: impl Iterator<Item = std::ops::Range<usize>>,
        extents: Vec<Extent>,
        reason: &str,
        rate: Option<u64>,
    ) -> Result<SwapReport, DaemonError> {
        let red = volume.translation().redundancy().clone();
        red.add_resyncing_leg(leg, stale).map_err(|source| MirrorError::State { volume: volume.name().into(), source })?;
        let report = self.swap_extents(volume, extents, reason).inspect_err(|_| {
            let _ = red.remove_leg(leg);
        })?;
        self.start_resync(volume, leg, rate);
        Ok(report)
    }

    /// Swaps `volume` onto `extents` as its next generation through
    /// pause–drain–swap, persisted with `reason`.
    pub(super) fn swap_extents(&self, volume: &Arc<Volume>, extents: Vec<Extent>, reason: &str) -> Result<SwapReport, DaemonError> {
        self.swap_extents_then(volume, extents, reason, || Ok(()))
    }

    /// [`swap_extents`](Self::swap_extents), running `while_held` while
    /// the changed ranges are held and drained, before the commit; its
    /// error refuses the swap.
    pub(super) fn swap_extents_then(
        &self,
        volume: &Arc<Volume>,
        extents: Vec<Extent>,
        reason: &str,
        mut while_held: impl FnMut() -> std::io::Result<()>,
    ) -> Result<SwapReport, DaemonError> {
        let name = volume.name();
        let old = volume.translation();
        let table_err = |source| MirrorError::Table { volume: name.into(), source };
        let table = MappingTable::new(old.table().generation() + 1, extents).map_err(table_err)?;
        let catalog = self.catalog();
        let sizes: HashMap<String, u64> = catalog.stores.iter().map(|(n, s)| (n.clone(), s.size())).collect();
        validate_stores(&table, &sizes).map_err(table_err)?;
        let translation = Translation::open(table, &catalog.stores, old.redundancy())
            .map_err(|e| MirrorError::State { volume: name.into(), source: std::io::Error::other(e.to_string()) })?;
        let config_extents = self.state.load(name)?.map(|r| r.config_extents).unwrap_or_else(|| old.table().extents().to_vec());
        let mut commit = GenerationCommit::new(&self.state, name, config_extents, reason)
            .before_commit(|| while_held().map_err(|source| CommitError::Sync { what: "mirror state", source }));
        let swap = lock(&self.swap).clone();
        let report = volume.swap(translation, &swap, &mut commit)?;
        if let Err(e) = old.redundancy().retain_legs(&volume.table()) {
            tracing::warn!(volume = name, error = %e, "forgetting dropped legs' state failed");
        }
        Ok(report)
    }
}

fn supervise(daemon: Weak<Daemon>, events: mpsc::Receiver<LegEvent>) {
    loop {
        let event = events.recv_timeout(TICK);
        let Some(d) = daemon.upgrade() else { return };
        if d.mirrors.stop.load(Ordering::SeqCst) {
            return;
        }
        match event {
            Ok(e) => d.on_leg_failure(&e),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                d.mirror_tick();
                d.meter_pool_writes();
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
    }
}
