//! Cluster mode on etcd: this node's membership lease (which bounds how
//! long it may serve: the server's `ServeFence`), the coordinator election
//! (a key created only if absent; its creation revision is the epoch), the
//! barrier that changes a table on every node at once, and the view
//! `nbdvirt cluster status` shows.
//!
//! The etcd client is async: it runs on one thread of its own with a
//! current-thread tokio runtime, and other threads reach it through the
//! runtime's handle (`store`); the data path never waits on it. Rooms:
//! `etcd` (bounded calls), `store` (those calls for other threads), `keys`
//! (the key layout and records), `lease` (the serving deadline), `member`
//! (join, catch up, renew, publish, elect, observe), `peer` (the
//! node-to-node link), `barrier` (the coordinator's side of a barrier),
//! `failsafe` (serving on while etcd does not answer, and what a barrier
//! waits for because of it), `progress` (barriers in progress, for
//! status), `lookup` (the coordinator, for a process that is no node),
//! `claims` (keys bound to this node's lease: a migration's copier),
//! `legs` (a mirror leg failed on one node: every node stops using it).

mod barrier;
mod claims;
mod etcd;
mod failsafe;
mod keys;
mod lease;
mod legs;
mod lookup;
mod member;
pub mod peer;
mod priority;
mod progress;
mod store;

pub use barrier::BarrierTiming;
pub use etcd::EtcdError;
pub use keys::{CatalogRecord, FailedLegRecord, VolumeRecord};
pub use lookup::coordinator_of;
pub use priority::BarrierPriority;
pub use progress::BarrierMark;

use crate::api::{ClusterStatus, CoordinatorView, NodeState, NodeView};
use crate::config::ClusterConfig;
use crate::persist::StateDir;
use crate::server::ServeFence;
use crate::sync::lock;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Etcd(EtcdError),
    #[error("node id '{node}' is already in use by a live node (peer {peer}) in cluster '{cluster}': every node needs its own [cluster] node")]
    DuplicateNode { cluster: String, node: String, peer: String },
    #[error("the membership lease expired in etcd")]
    LeaseExpired,
    #[error("etcd shows coordinator epoch {epoch}, older than epoch {highest} this node has seen: refused (was etcd replaced? remove STATE_DIR/cluster/epoch.json only if so)")]
    StaleEpoch { epoch: i64, highest: i64 },
    #[error("cluster state in state_dir: {0}")]
    State(String),
    #[error("cannot start the cluster thread: {0}")]
    Thread(String),
    #[error("not connected to etcd yet")]
    NoEtcd,
    #[error("this node is not the coordinator ({0})")]
    NotCoordinator(String),
    #[error("volume '{volume}': the barrier failed: {reason}")]
    Barrier { volume: String, reason: String },
    /// A node refused the table itself (invalid there, or unknown volume):
    /// trying again cannot help.
    #[error("volume '{volume}': the barrier was refused: {reason}")]
    BarrierRefused { volume: String, reason: String },
    #[error("a committed table in etcd is unreadable: {0}")]
    BadRecord(String),
    #[error("catching up with the committed tables: {0}")]
    CatchUp(String),
    #[error("etcd does not answer ({0}): cluster changes are refused until it does; the nodes serve on with the tables they have (failsafe)")]
    EtcdDown(String),
    #[error("node '{0}' is not a member of this cluster")]
    NoMember(String),
    #[error("node '{0}' is alive: stop it first (only a node gone for good is forgotten)")]
    MemberAlive(String),
    #[error("node '{node}' may still serve in failsafe for {left_ms} ms more: forget it after that")]
    MemberMayServe { node: String, left_ms: u64 },
    #[error("volume '{volume}' is being migrated by node {node} (it holds the migration's claim in etcd)")]
    Claimed { volume: String, node: String },
}

/// What the cluster needs of the node's volumes (the daemon provides it).
pub trait LocalTables: Send + Sync {
    /// The generation of each volume this node serves (published at every tick).
    fn generations(&self) -> BTreeMap<String, u64>;
    /// Brings the node's volumes to the cluster's (a node joining or
    /// re-joining, before it serves): the catalog's volumes and backends,
    /// if a `cluster apply` set one, on the committed tables.
    fn catch_up(&self, catalog: Option<&keys::CatalogRecord>, committed: &[VolumeRecord]) -> Result<(), String>;
    /// After `catch_up`: a leg resyncing here that a live node (`peers`:
    /// node, peer endpoint) has in sync is in sync; the mirror legs that
    /// failed on some node (their marks in etcd) take no I/O here; a leg
    /// failed here without a mark must be announced before I/O that
    /// missed it is answered.
    fn mirror_legs(&self, marks: &[keys::FailedLegRecord], peers: &[(String, String)]) -> Result<(), String>;
}

/// What the cluster thread shares with `status` and the barrier.
struct Shared {
    cfg: ClusterConfig,
    fence: Arc<ServeFence>,
    view: Mutex<View>,
    state: StateDir,
    /// The connection, once made (the barrier's calls use it from other
    /// threads, through the runtime's handle).
    etcd: Mutex<Option<etcd::Etcd>>,
    /// A local commit of a barrier failed: the node must not serve again
    /// (its table is not the cluster's) until restarted.
    fenced_for_good: std::sync::atomic::AtomicBool,
    /// A hold ended without knowing its barrier's decision: the node must
    /// leave and join again (catching up) before it serves.
    rejoin: std::sync::atomic::AtomicBool,
    /// Barriers in progress here (`cluster status`).
    in_progress: progress::InProgress,
    /// The membership lease while joined, else 0 (claims bind to it).
    lease: std::sync::atomic::AtomicI64,
}

impl Shared {
    /// Whether the fence must stay closed whatever etcd or the peers say.
    fn barred(&self) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        self.fenced_for_good.load(SeqCst) || self.rejoin.load(SeqCst)
    }

    /// Opens the fence up to `deadline`, unless barred.
    fn open_fence(&self, deadline: Instant) {
        if !self.barred() {
            self.fence.open_until(deadline);
            // Checked again after opening: whoever raises either flag
            // raises it before closing the fence, so a close wins.
            if self.barred() {
                self.fence.close();
            }
        }
    }

    /// Records a coordinator epoch: refused if older than the highest seen,
    /// persisted if newer.
    fn note_epoch(&self, epoch: i64) -> Result<(), ClusterError> {
        let mut view = lock_view(self);
        if epoch < view.highest_epoch {
            return Err(ClusterError::StaleEpoch { epoch, highest: view.highest_epoch });
        }
        if epoch > view.highest_epoch {
            self.state
                .write_json(std::path::Path::new(keys::EPOCH_FILE), &keys::EpochRecord { highest: epoch })
                .map_err(|e| ClusterError::State(e.to_string()))?;
            view.highest_epoch = epoch;
        }
        Ok(())
    }
}

struct View {
    joined: bool,
    was_joined: bool,
    etcd_error: Option<String>,
    observed: Instant,
    coordinator: Option<CoordinatorView>,
    highest_epoch: i64,
    nodes: Vec<NodeView>,
    /// The fence is open on the peers' word, not etcd's.
    failsafe: bool,
    /// Since when this node has seen each member without a live lease (a
    /// coordinator commits past one only `failsafe` after: `failsafe.rs`).
    dead_since: BTreeMap<String, Instant>,
    catalog: Option<crate::api::CatalogView>,
}

fn lock_view(shared: &Shared) -> MutexGuard<'_, View> {
    lock(&shared.view)
}

/// How long one etcd call may take: a renewal that takes longer than the
/// renewal period is as good as lost (and one lost renewal is survived).
fn call_limit(cfg: &ClusterConfig) -> Duration {
    lease::renew_every(cfg.lease_ttl).min(Duration::from_secs(2))
}

/// This node's membership, run on the `nbdvirt-cluster` thread.
pub struct Cluster {
    shared: Arc<Shared>,
    stop: tokio::sync::watch::Sender<bool>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Runs etcd calls of other threads (the barrier's) on the cluster
    /// thread's runtime, which drives their I/O.
    handle: tokio::runtime::Handle,
}

impl Cluster {
    /// Joins the cluster and returns once this node may serve. Fails if
    /// etcd cannot be reached, or the node id is held by a live node,
    /// for longer than a lease (a previous run of this node killed a
    /// moment ago still holds its id until its lease expires).
    pub fn start(cfg: ClusterConfig, state: StateDir, fence: Arc<ServeFence>, local: Arc<dyn LocalTables>) -> Result<Cluster, ClusterError> {
        let highest = state.read_json::<keys::EpochRecord>(std::path::Path::new(keys::EPOCH_FILE)).map_err(|e| ClusterError::State(e.to_string()))?.unwrap_or_default();
        let view = View { joined: false, was_joined: false, etcd_error: None, observed: Instant::now(), coordinator: None, highest_epoch: highest.highest, nodes: Vec::new(), failsafe: false, dead_since: BTreeMap::new(), catalog: None };
        let shared = Arc::new(Shared { cfg, fence, view: Mutex::new(view), state, etcd: Mutex::new(None), fenced_for_good: Default::default(), rejoin: Default::default(), in_progress: Default::default(), lease: Default::default() });
        let mut member = member::Member::new(shared.clone(), local);
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let (first_tx, first_rx) = std::sync::mpsc::channel();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| ClusterError::Thread(e.to_string()))?;
        let handle = runtime.handle().clone();
        let thread = std::thread::Builder::new()
            .name("nbdvirt-cluster".into())
            .spawn(move || runtime.block_on(run(&mut member, stopped, first_tx)))
            .map_err(|e| ClusterError::Thread(e.to_string()))?;
        let cluster = Cluster { shared, stop, thread: Mutex::new(Some(thread)), handle };
        match first_rx.recv() {
            Ok(Ok(())) => Ok(cluster),
            Ok(Err(e)) => {
                cluster.stop();
                Err(e)
            }
            Err(_) => Err(ClusterError::Thread("the cluster thread ended before joining".into())),
        }
    }

    pub fn status(&self) -> ClusterStatus {
        let cfg = &self.shared.cfg;
        let view = lock_view(&self.shared);
        let open = self.shared.fence.is_open();
        let state = match (view.joined, view.was_joined) {
            _ if open && view.failsafe => NodeState::Failsafe,
            (true, _) if open => NodeState::Serving,
            (_, true) => NodeState::Fenced,
            _ => NodeState::Joining,
        };
        ClusterStatus {
            name: cfg.name.clone(),
            node: cfg.node.clone(),
            etcd: cfg.etcd.clone(),
            lease_ttl_ms: cfg.lease_ttl.as_millis() as u64,
            state,
            serving_left_ms: self.shared.fence.left().filter(|_| open).map(|d| d.as_millis() as u64),
            etcd_error: view.etcd_error.clone(),
            observed_ms_ago: view.observed.elapsed().as_millis() as u64,
            coordinator: view.coordinator.clone(),
            highest_epoch: view.highest_epoch,
            nodes: view.nodes.clone(),
            barriers: self.shared.in_progress.list(),
            catalog: view.catalog.clone(),
        }
    }

    /// The members as this node last saw them, for threads that ask often
    /// (forwarding picks a serving node at each connect).
    pub fn member_handle(&self) -> Members {
        Members(self.shared.clone())
    }

    /// A hold gave up without learning its barrier's decision (etcd could
    /// not be asked before the fence closed): the table this node went back
    /// to may not be the committed one. Its membership ends at the next
    /// tick, and it serves again only after joining anew, which catches up
    /// with the committed tables first; a renewal of the old lease (etcd
    /// back before it expired) must not reopen the fence on a stale table.
    pub fn rejoin(&self) {
        // Flag first, then close: a renewal that opens the fence in between
        // sees the flag afterwards and closes it again (`Member::renew`).
        self.shared.rejoin.store(true, std::sync::atomic::Ordering::SeqCst);
        self.shared.fence.close();
    }

    /// Closes the fence for as long as the process lives.
    pub fn fence_for_good(&self) {
        self.shared.fenced_for_good.store(true, std::sync::atomic::Ordering::SeqCst);
        self.shared.fence.close();
    }

    /// Leaves the cluster (revokes the lease) and ends the thread. Called
    /// once the server has drained: until then the lease must stay valid.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A handle on the members this node last saw (see `Cluster::members`).
#[derive(Clone)]
pub struct Members(Arc<Shared>);

impl Members {
    /// Every other node holding a live lease that says where it serves
    /// NBD: (node, endpoint), in node order.
    pub fn serving(&self) -> Vec<(String, String)> {
        let me = &self.0.cfg.node;
        lock_view(&self.0).nodes.iter().filter(|n| n.alive && &n.node != me).filter_map(|n| Some((n.node.clone(), n.serve.clone()?))).collect()
    }
}

impl std::fmt::Debug for Members {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Members({})", self.0.cfg.name)
    }
}

/// The thread's loop: a tick per renewal period until stopped. Until the
/// first join succeeds, failures are retried for a lease and a bit (a
/// previous run's key must expire first), then reported to `start`.
async fn run(member: &mut member::Member, mut stopped: tokio::sync::watch::Receiver<bool>, first: std::sync::mpsc::Sender<Result<(), ClusterError>>) {
    let cfg = member.shared.cfg.clone();
    let every = lease::renew_every(cfg.lease_ttl);
    let give_up = Instant::now() + cfg.lease_ttl + Duration::from_secs(2) + call_limit(&cfg);
    let mut first = Some(first);
    loop {
        let started = Instant::now();
        let result = member.tick().await;
        let joined = member.joined();
        {
            let mut view = lock_view(&member.shared);
            (view.joined, view.was_joined) = joined;
            let message = result.as_ref().err().map(ToString::to_string);
            if message != view.etcd_error {
                match &message {
                    Some(m) if first.is_none() => tracing::warn!(error = %m, "cluster: etcd call failed; serving only while the lease is certainly valid"),
                    Some(m) => tracing::info!(error = %m, "cluster: not joined yet; retrying"),
                    None if first.is_none() => tracing::info!("cluster: etcd answers again"),
                    None => {}
                }
                view.etcd_error = message;
            }
        }
        match (result, first.take()) {
            (Ok(()), Some(tx)) => {
                let _ = tx.send(Ok(()));
            }
            (Err(e), Some(tx)) if Instant::now() >= give_up => {
                let _ = tx.send(Err(e));
                return;
            }
            (_, f) => first = f,
        }
        let wait = every.saturating_sub(started.elapsed());
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stopped.changed() => break,
        }
    }
    member.leave().await;
}
