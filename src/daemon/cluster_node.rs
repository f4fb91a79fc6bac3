//! This node's part in the cluster: what the cluster thread asks of its
//! volumes (generations, catching up with committed tables), the peer
//! link's requests (hold and decide a barrier; apply, on the coordinator),
//! and `cluster apply`.

use super::assemble::build_translation;
use super::{Daemon, DaemonError};
use crate::api::{ApiError, ErrorKind, FailsafeAck, Held, HoldOrder, PeerRequest, Response, TableChange};
use crate::cluster::{peer, CatalogRecord, Cluster, LocalTables, VolumeRecord};
use crate::config::{Config, VolumeConfig};
use crate::map::MappingTable;
use crate::migrate::MigrateError;
use crate::persist::GenerationCommit;
use crate::sync::lock;
use crate::volume::{Translation, Volume};
use std::collections::BTreeMap;
use std::sync::mpsc;
use std::sync::{Arc, Weak};
use std::time::Duration;

/// A barrier's decision for a holding node, and where it says that it
/// has swapped (or resumed on the old table): dropped when done, an `Err`
/// when this node could not take the committed table.
pub(super) type Decision = (bool, mpsc::Sender<Result<(), String>>);

/// How long `Decide` waits for the node to swap and resume (the
/// coordinator waits 10 s for the answer).
const SWAP_LIMIT: Duration = Duration::from_secs(8);

/// The daemon as the cluster thread and the peer link see it.
#[derive(Debug)]
pub(super) struct ClusterNode(pub(super) Weak<Daemon>);

impl LocalTables for ClusterNode {
    fn generations(&self) -> BTreeMap<String, u64> {
        self.0.upgrade().map(|d| d.catalog().volumes.iter().map(|(name, v)| (name.clone(), v.generation())).collect()).unwrap_or_default()
    }

    fn catch_up(&self, catalog: Option<&CatalogRecord>, committed: &[VolumeRecord]) -> Result<(), String> {
        let daemon = self.0.upgrade().ok_or("the daemon is stopping")?;
        if let Some(catalog) = catalog {
            daemon.catch_up_catalog(catalog, committed).map_err(|e| e.to_string())?;
        }
        // A tombstone's volume is gone with the catalog; one the catalog
        // has (or, without one, this node's file) takes its committed table.
        let present = daemon.catalog();
        committed.iter().filter(|r| !r.removed && present.volumes.contains_key(&r.volume)).try_for_each(|r| daemon.catch_up(r).map_err(|e| e.to_string()))
    }

    fn mirror_legs(&self, marks: &[crate::cluster::FailedLegRecord], peers: &[(String, String)]) -> Result<(), String> {
        let daemon = self.0.upgrade().ok_or("the daemon is stopping")?;
        daemon.legs_in_sync_elsewhere(peers);
        daemon.apply_failed_leg_marks(marks).map_err(|e| e.to_string())
    }
}

/// A migration's table changes (destination leg added, cutover, leg
/// dropped): one barrier each, run by the coordinator.
impl crate::migrate::ClusterTables for ClusterNode {
    fn apply(&self, volume: &str, extents: Vec<crate::map::Extent>, strict: bool) -> Result<u64, MigrateError> {
        use crate::migrate::MigrateErrorKind as Kind;
        let failed = |e: DaemonError| {
            let e = ApiError::from(e);
            let kind = match e.kind {
                ErrorKind::NotFound => Kind::NotFound,
                ErrorKind::Busy | ErrorKind::Conflict | ErrorKind::SwapFailed => Kind::Busy,
                ErrorKind::Invalid => Kind::Invalid,
                _ => Kind::Io,
            };
            MigrateError::Cluster { kind, message: e.message }
        };
        let daemon = self.0.upgrade().ok_or_else(|| failed(DaemonError::NotClustered))?;
        let change = TableChange { volume: volume.into(), extents, catalog: None, strict };
        let report = daemon.apply_anywhere(daemon.member().map_err(failed)?, vec![change]).map_err(failed)?;
        let applied = report.volumes.into_iter().find(|v| v.volume == volume);
        let applied = applied.ok_or_else(|| MigrateError::Cluster { kind: Kind::Io, message: format!("the coordinator's report lacks volume '{volume}'") })?;
        for u in &applied.unconfirmed {
            // Committed all the same: that node fenced itself or settles.
            tracing::warn!(volume, generation = applied.generation, node = %u, "a node did not confirm the migration's table change");
        }
        Ok(applied.generation)
    }

    fn writers(&self) -> Result<Vec<(String, i64)>, MigrateError> {
        use crate::migrate::MigrateErrorKind as Kind;
        let gone = |message: String| MigrateError::Cluster { kind: Kind::Busy, message };
        let daemon = self.0.upgrade().ok_or_else(|| gone("the node is stopping".into()))?;
        let (nodes, _) = daemon.member().map_err(|e| gone(e.to_string()))?.live_nodes().map_err(|e| gone(e.to_string()))?;
        Ok(nodes.into_iter().map(|n| (n.node, n.lease)).collect())
    }

    fn claim(&self, volume: &str) -> Result<(), MigrateError> {
        use crate::migrate::MigrateErrorKind as Kind;
        let daemon = self.0.upgrade().ok_or_else(|| MigrateError::Cluster { kind: Kind::Io, message: "the node is stopping".into() })?;
        let cluster = daemon.member().map_err(|e| MigrateError::Cluster { kind: Kind::Io, message: e.to_string() })?;
        cluster.claim_migration(volume).map_err(|e| {
            let kind = if matches!(e, crate::cluster::ClusterError::Claimed { .. }) { Kind::Taken } else { Kind::Io };
            MigrateError::Cluster { kind, message: e.to_string() }
        })
    }

    fn release(&self, volume: &str) {
        if let Some(cluster) = self.0.upgrade().as_ref().and_then(|d| d.cluster.get()) {
            cluster.release_migration(volume);
        }
    }
}

impl peer::PeerHandler for ClusterNode {
    fn handle(&self, request: PeerRequest) -> Response {
        let Some(daemon) = self.0.upgrade() else { return Response::err(ApiError::new(ErrorKind::Io, "the node is stopping")) };
        let answer = match request {
            PeerRequest::Apply { changes } => daemon.apply_changes(changes).map(Response::ok),
            PeerRequest::ApplyConfig { file, base, text, force } => {
                let config = Config::parse(&text, &file, &base).map(|c| Config { source: Some(file.clone().into()), ..c }).map_err(DaemonError::from);
                let source = CatalogRecord { file, base, text, ..Default::default() };
                config.and_then(|c| daemon.file_changes(&c, source, force)).and_then(|changes| daemon.apply_changes(changes)).map(Response::ok)
            }
            PeerRequest::Hold(order) => daemon.cluster_hold(order).map(Response::ok),
            PeerRequest::Decide { epoch, barrier, commit } => daemon.cluster_decide(epoch, &barrier, commit).map(|()| Response::ok(())),
            // Answering is the whole answer: the asker learns it is reachable.
            PeerRequest::Failsafe { .. } => daemon.member().map(|c| Response::ok(FailsafeAck { node: c.node().to_string() })),
            // This node's own jobs only: never asks on (no loops).
            PeerRequest::Migrations { volume } => Ok(Response::ok(crate::api::MigrationList { migrations: daemon.migrations_here(volume.as_deref()) })),
            PeerRequest::MigrateAbort { volume } => daemon.migrate_abort_here(&volume).map(Response::ok),
            PeerRequest::Pause { volume, range, timeout_ms } => daemon.pause_here(&volume, range, Duration::from_millis(timeout_ms)).map(Response::ok),
            PeerRequest::Resume { volume } => daemon.resume_here(&volume).map(Response::ok),
            PeerRequest::LegFailed { volume, leg, node, reason } => daemon.leg_failed_here(&volume, &leg, &node, &reason).map(|()| Response::ok(())),
            PeerRequest::MirrorStatus { volume } => daemon.volume(&volume).map(|v| Response::ok(daemon.mirror_view(&v))),
        };
        answer.unwrap_or_else(|e| Response::err(e.into()))
    }
}

impl Daemon {
    pub(super) fn member(&self) -> Result<&Cluster, DaemonError> {
        self.cluster.get().ok_or(DaemonError::NotClustered)
    }

    /// The config entry of `name` (for the messages of a table it builds).
    fn volume_config(&self, name: &str) -> Result<(String, VolumeConfig), DaemonError> {
        let config = lock(&self.config);
        let v = config.volumes.iter().find(|v| v.name == name).cloned().ok_or_else(|| DaemonError::NoVolume(name.into()))?;
        Ok((config.file_name(), v))
    }

    fn translation_for(&self, volume: &Volume, generation: u64, extents: Vec<crate::map::Extent>) -> Result<(VolumeConfig, Translation), DaemonError> {
        let (file, v) = self.volume_config(volume.name())?;
        let table = MappingTable::new(generation, extents).map_err(|e| DaemonError::ClusterTable { volume: volume.name().into(), reason: e.to_string() })?;
        let forwarder = self.forwarder(volume.name());
        let translation = build_translation(&file, &v, table, &self.catalog().stores, volume.translation().redundancy(), forwarder.as_deref())?;
        Ok((v, translation))
    }

    /// Swaps `record`'s volume to the committed table if this node is
    /// behind (a node joining, or re-joining after it was fenced).
    fn catch_up(&self, record: &VolumeRecord) -> Result<(), DaemonError> {
        let volume = self.volume(&record.volume)?;
        let current = volume.table();
        if current.extents() == record.extents.as_slice() {
            return Ok(());
        }
        let generation = record.generation.max(current.generation() + 1);
        let (_, translation) = self.translation_for(&volume, generation, record.extents.clone())?;
        let swap = lock(&self.swap).clone();
        // The cluster's table is this node's config from now on (see `hold`).
        let mut commit = GenerationCommit::new(&self.state, volume.name(), record.extents.clone(), "cluster catch-up");
        volume.swap(translation, &swap, &mut commit)?;
        tracing::info!(volume = volume.name(), generation, "caught up with the cluster's committed table");
        Ok(())
    }

    /// A barrier's hold on this node: answers once the ranges are held and
    /// drained; a thread keeps the hold until the decision.
    fn cluster_hold(self: &Arc<Self>, order: HoldOrder) -> Result<Held, DaemonError> {
        if order.catalog.is_some() {
            return self.catalog_hold(order);
        }
        let cluster = self.member()?;
        cluster.accept_epoch(order.epoch)?;
        let volume = self.volume(&order.volume)?;
        refuse_failed_legs(&volume, &order.extents, cluster.node())?;
        let (_, translation) = self.translation_for(&volume, order.generation, order.extents.clone())?;
        let barrier = order.barrier.clone();
        self.spawn_hold(&barrier, move |daemon, held, decided| daemon.hold(volume, translation, order, held, decided))
    }

    /// Registers the hold of `barrier` and starts its thread: `run` stages,
    /// answers on the sender, then waits for the decision on the receiver.
    /// Returns that answer.
    pub(super) fn spawn_hold(self: &Arc<Self>, barrier: &str, run: impl FnOnce(Arc<Self>, mpsc::Sender<Result<Held, DaemonError>>, mpsc::Receiver<Decision>) + Send + 'static) -> Result<Held, DaemonError> {
        let (held_tx, held_rx) = mpsc::channel();
        let (decide_tx, decide_rx) = mpsc::channel();
        lock(&self.holds).insert(barrier.to_string(), decide_tx);
        let daemon = self.clone();
        if let Err(e) = std::thread::Builder::new().name("nbdvirt-hold".into()).spawn(move || {
            let _on_barrier_path = crate::cluster::BarrierPriority::raise();
            run(daemon, held_tx, decide_rx)
        }) {
            lock(&self.holds).remove(barrier);
            return Err(DaemonError::io("starting a hold thread", e));
        }
        held_rx.recv().unwrap_or_else(|_| Err(DaemonError::ClusterTable { volume: String::new(), reason: "the hold thread ended".into() }))
    }

    fn hold(&self, volume: Arc<Volume>, translation: Translation, order: HoldOrder, held: mpsc::Sender<Result<Held, DaemonError>>, decided: mpsc::Receiver<Decision>) {
        let cluster = self.member().expect("holds exist only in cluster mode");
        let _shown = cluster.mark_barrier(&order.barrier, volume.name(), order.generation, "holding");
        let pause_timeout = lock(&self.swap).pause_timeout;
        // Recorded as the config's extents: the cluster's table is what this
        // node's config says from now on (a node's file that still has the
        // old extents is overruled at its next start: see `catch_up`).
        let mut commit = GenerationCommit::new(&self.state, volume.name(), order.extents.clone(), "cluster");
        let paused = volume.stage(translation).map_err(DaemonError::from).and_then(|mut staged| {
            staged.prepare(&mut commit)?;
            staged.pause(pause_timeout).map_err(|t| DaemonError::from(t.error))
        });
        let paused = match paused {
            Ok(p) => p,
            Err(e) => {
                lock(&self.holds).remove(&order.barrier);
                let _ = held.send(Err(e));
                return;
            }
        };
        let _ = held.send(Ok(Held { node: cluster.node().to_string(), drain_us: paused.drain().as_micros() as u64 }));
        let (commit_it, done) = self.await_decision(cluster, &order, decided);
        if !commit_it {
            paused.abort();
            return;
        }
        let committed = paused.commit(&mut commit);
        if committed.is_ok() {
            // Legs the table dropped (a migration's, after its cutover or
            // abort) are forgotten, failed ones too: a later migration to
            // that store starts afresh.
            if let Err(e) = volume.translation().redundancy().retain_legs(&volume.table()) {
                tracing::warn!(volume = volume.name(), error = %e, "forgetting dropped legs' state failed");
            }
        }
        if let Err(e) = committed {
            // The others swapped: this node must not serve the old table.
            tracing::error!(volume = volume.name(), error = %e, "committing a cluster barrier failed here: fencing this node");
            cluster.fence_for_good();
            // The coordinator's `Decide` says so: `cluster apply` must not
            // report this node as on the new table.
            if let Some(done) = &done {
                let _ = done.send(Err(format!("{e}; node {} fenced itself and serves nothing until it is restarted", cluster.node())));
            }
        }
    }

    /// Waits for the decision of the barrier `order` holds for (past its
    /// wait, etcd's). `done` is dropped once the node swapped or resumed:
    /// the coordinator's `Decide` returns then.
    pub(super) fn await_decision(&self, cluster: &Cluster, order: &HoldOrder, decided: mpsc::Receiver<Decision>) -> (bool, Option<mpsc::Sender<Result<(), String>>>) {
        let decision = match decided.recv_timeout(Duration::from_millis(order.decide_within_ms)) {
            Ok((c, done)) => (c, Some(done)),
            Err(_) => (self.settle(cluster, &order.barrier), None),
        };
        lock(&self.holds).remove(&order.barrier);
        decision
    }

    /// No decision came in time: etcd decides (abort unless committed).
    /// While etcd cannot say, the hold stays, until this node's fence
    /// closes: then it aborts, and serves again only after re-joining on
    /// the committed tables (`Cluster::rejoin`).
    fn settle(&self, cluster: &Cluster, barrier: &str) -> bool {
        loop {
            match cluster.settle(barrier) {
                Ok(commit) => return commit,
                Err(e) if cluster.serving() => {
                    tracing::warn!(barrier, error = %e, "cannot settle a barrier with etcd yet; holding");
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => {
                    tracing::warn!(barrier, error = %e, "fenced before the barrier's outcome was known: releasing the hold, re-joining before serving again");
                    cluster.rejoin();
                    return false;
                }
            }
        }
    }

    fn cluster_decide(&self, epoch: i64, barrier: &str, commit: bool) -> Result<(), DaemonError> {
        self.member()?.accept_epoch(epoch)?;
        let ended = || DaemonError::ClusterTable { volume: String::new(), reason: format!("barrier {barrier}: the hold ended") };
        let hold = lock(&self.holds).remove(barrier);
        match hold {
            Some(tx) => {
                let (done_tx, done_rx) = mpsc::channel();
                tx.send((commit, done_tx)).map_err(|_| ended())?;
                // Answered once this node serves the decided table (the
                // hold thread drops `done_tx` then), so that `cluster
                // apply` returns with every node swapped.
                match done_rx.recv_timeout(SWAP_LIMIT) {
                    Err(mpsc::RecvTimeoutError::Timeout) => Err(DaemonError::ClusterTable { volume: String::new(), reason: format!("barrier {barrier}: the swap took longer than {SWAP_LIMIT:?}") }),
                    Ok(Err(failed)) => Err(DaemonError::ClusterTable { volume: String::new(), reason: format!("barrier {barrier}: committed, but not taken here: {failed}") }),
                    Ok(Ok(())) | Err(mpsc::RecvTimeoutError::Disconnected) => Ok(()),
                }
            }
            None => Err(DaemonError::ClusterTable { volume: String::new(), reason: format!("no hold of barrier {barrier} (settled with etcd already?)") }),
        }
    }
}

/// A mirror leg that failed on this node missed writes its clients made
/// here (they went to the other legs only): a table that still uses its
/// store (a migration's cutover onto it) would serve those blocks without
/// them, so this node refuses to hold for it. The migration then fails and
/// drops the leg, and the source, which took every write, stays.
fn refuse_failed_legs(volume: &Volume, extents: &[crate::map::Extent], node: &str) -> Result<(), DaemonError> {
    for leg in volume.translation().redundancy().legs().into_iter().filter(|l| l.condition() == crate::volume::LegCondition::Failed) {
        if extents.iter().any(|e| e.target.store_ranges(e.length).iter().any(|(s, _)| *s == leg.store())) {
            let why = leg.reason().unwrap_or_default();
            return Err(DaemonError::ClusterTable {
                volume: volume.name().into(),
                reason: format!("node {node}: its mirror leg on '{}' failed ({why}) and missed writes made here: refusing a table that still uses that store", leg.store()),
            });
        }
    }
    Ok(())
}
