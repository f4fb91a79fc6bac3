//! The running daemon: the server, the config it was started with, the
//! persisted state, and the operations the control plane offers. Everything
//! that changes a running volume's mapping goes through `Volume::swap` and
//! is persisted before it is in force.
//!
//! Rooms: `assemble` (stores, translations, volumes from a config),
//! `reconcile` (config vs persisted generation), `reload` (plan → stage →
//! apply; generations made durable by `persist::GenerationCommit`),
//! `pauses` (manual pauses; in a cluster on every node: `cluster_pauses`),
//! `migrations` (the job registry; in a cluster: `cluster_migrations`), `faults`
//! (injected store errors for drills), `status` (API views), `error`.

pub mod assemble;
mod cluster_apply;
mod cluster_catalog;
mod cluster_legs;
mod cluster_migrations;
mod cluster_node;
mod cluster_pauses;
mod forwarding;
mod error;
mod faults;
mod metrics;
mod migrations;
mod mirror_error;
mod mirror_ops;
mod mirrors;
mod pairs;
mod pauses;
mod pools;
mod reconcile;
mod reload;
mod spares;
mod status;

pub use error::DaemonError;
pub use migrations::MigrateRequest;
pub use mirror_error::MirrorError;
pub use mirror_ops::MirrorAddRequest;

use crate::config::Config;
use crate::persist::StateDir;
use crate::server::{ConnLimits, Server, ServerOptions};
use crate::sync::lock;
use crate::volume::{Catalog, SwapOptions, SwapPhase, Volume};
use assemble::{build_volume, default_export, handles, open_stores, OpenStore};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

pub struct Daemon {
    config_path: Option<PathBuf>,
    /// The running config: in a cluster, its volumes and backends are the
    /// cluster's (`cluster_catalog.rs`), which may differ from the file's.
    config: Mutex<Config>,
    /// The config file as last read (start, reload, `cluster apply` of
    /// it): a reload in a cluster applies only what the file changed since.
    file_read: Mutex<Config>,
    stores: Mutex<HashMap<String, OpenStore>>,
    server: Mutex<Server>,
    state: StateDir,
    /// Swap settings; `reload` refreshes them from the new config.
    swap: Mutex<SwapOptions>,
    pauses: pauses::PauseRegistry,
    migrations: Mutex<migrations::Registry>,
    mirrors: mirrors::MirrorRegistry,
    /// Storage pools and the volumes created from them.
    pools: Arc<crate::pool::Pools>,
    /// Per thick pool volume, its written-bytes counter as last handed to
    /// the pool meters (the volume object's counters start at zero).
    pool_written: Mutex<HashMap<String, (usize, u64)>>,
    /// Serialises administrative operations (reload, pause, resume, migrate).
    admin: Mutex<()>,
    /// The `/metrics` endpoint, when `[server] metrics` is set.
    metrics: Mutex<Option<crate::metrics::MetricsServer>>,
    /// This node's membership, when `[cluster]` is set.
    cluster: std::sync::OnceLock<crate::cluster::Cluster>,
    /// This node as the cluster and migration jobs see it (cluster mode).
    cluster_node: std::sync::OnceLock<Arc<cluster_node::ClusterNode>>,
    /// The node-to-node link (cluster mode).
    peer: Mutex<Option<crate::cluster::peer::PeerServer>>,
    /// Barriers this node holds, waiting for their decision.
    holds: Mutex<HashMap<String, std::sync::mpsc::Sender<cluster_node::Decision>>>,
    /// One `cluster apply` at a time (on the coordinator).
    cluster_applying: Mutex<()>,
    /// Who serves the extents on stores this node does not reach (cluster
    /// mode).
    forward: Option<Arc<forwarding::ForwardRoutes>>,
}

fn options(config: &Config, fence: Arc<crate::server::ServeFence>) -> ServerOptions {
    let s = &config.server;
    ServerOptions {
        fence,
        io_threads: s.io_threads,
        max_connections: s.max_connections,
        limits: ConnLimits {
            max_inflight_bytes: s.max_inflight,
            max_request: s.max_request,
            max_inflight_requests: crate::defaults::MAX_INFLIGHT_REQUESTS,
            shutdown_grace: s.shutdown_grace,
            busy_poll: s.busy_poll,
        },
    }
}

/// The server's TLS context, access rules and handshake limits, with the
/// credential files read now (at start and at every reload).
fn security(config: &Config) -> Result<crate::server::Security, DaemonError> {
    let s = &config.server.security;
    let tls_server = match s.tls {
        crate::tls::TlsMode::Off => None,
        _ => Some(Arc::new(crate::tls::TlsServer::load(&s.tls_files)?)),
    };
    let exports = config.volumes.iter().filter(|v| v.access != Default::default()).map(|v| (v.name.clone(), v.access.clone())).collect();
    Ok(crate::server::Security {
        tls: s.tls,
        tls_server,
        exports,
        max_option_payload: s.max_option_payload,
        max_export_name: s.max_export_name,
        handshake_timeout: s.handshake_timeout,
        max_connections_per_address: s.max_connections_per_address,
    })
}

/// The file as last read, where a cluster node started on its committed
/// tables rather than the file's: as if it still said those, so that the
/// next reload applies the edit (on every node).
fn read_as_committed(config: &Config, unapplied: &[(String, Vec<crate::map::Extent>)]) -> Config {
    let mut read = config.clone();
    for v in &mut read.volumes {
        if let Some((_, extents)) = unapplied.iter().find(|(n, _)| *n == v.name) {
            v.extents = extents.clone();
        }
    }
    read
}

fn swap_options(config: &Config, crash_at: Option<SwapPhase>) -> SwapOptions {
    SwapOptions { pause_timeout: config.server.pause_timeout, retries: config.server.pause_retries, backoff: crate::defaults::SWAP_BACKOFF, crash_at }
}

impl Daemon {
    /// Opens the stores, resolves each volume's table against the persisted
    /// state, resumes interrupted migrations and binds the listeners (not
    /// yet accepting).
    pub fn start(config_path: Option<PathBuf>, config: Config, crash_at: Option<SwapPhase>) -> Result<Arc<Daemon>, DaemonError> {
        let state = StateDir::open(&config.server.state_dir).map_err(|e| DaemonError::io("state_dir", e))?;
        let stores = open_stores(&config, &HashMap::new())?;
        let handles = handles(&stores);
        let reconcile::StartupTables { tables, pending, unapplied } = reconcile::startup_tables(&config, &state)?;
        let file = config.file_name();
        let forward = config.cluster.as_ref().map(|_| forwarding::ForwardRoutes::new(&config.backends));
        let mut volumes = BTreeMap::new();
        for (v, table) in config.volumes.iter().zip(tables) {
            let forwarder = forward.as_ref().map(|f| f.for_volume(&v.name));
            let volume = build_volume(&file, v, table, &handles, Some(state.root()), forwarder.as_deref())?;
            // The other nodes write the same legs (a migration's destination).
            volume.translation().redundancy().set_other_writers(config.cluster.is_some());
            volumes.insert(v.name.clone(), Arc::new(volume));
        }
        pairs::add_split_volumes(&state, &mut volumes, &handles)?;
        let pools = pools::open_pools(state.root(), &config, &stores, &volumes)?;
        pools::add_pool_volumes(&pools, state.root(), &file, &mut volumes, &handles)?;
        for rec in &pending {
            state.commit(rec).map_err(|e| DaemonError::io(format!("persisting volume '{}'", rec.volume), e))?;
        }
        let catalog = Catalog { stores: handles, volumes, default_export: default_export(&config) };
        // Resume interrupted migrations before anyone can connect; a
        // cluster node's once it has joined (their table changes are
        // barriers, and its tables may have to catch up first).
        let swap = swap_options(&config, crash_at);
        let migrations = match config.cluster {
            None => migrations::resume_all(&state, &catalog, &swap, None)?,
            Some(_) => migrations::Registry::new(),
        };
        let security = security(&config)?;
        // A cluster node serves nothing before it has joined (`cluster`).
        let fence = Arc::new(match config.cluster {
            Some(_) => crate::server::ServeFence::closed(),
            None => crate::server::ServeFence::always(),
        });
        let cluster = config.cluster.clone();
        let server = Server::bind(&config.server.listen, catalog, options(&config, fence.clone())).map_err(|e| DaemonError::io("listen", e))?;
        server.set_security(security);
        let daemon = Arc::new(Daemon {
            config_path,
            migrations: Mutex::new(migrations),
            mirrors: mirrors::MirrorRegistry::new(),
            pools,
            pool_written: Mutex::new(HashMap::new()),
            swap: Mutex::new(swap),
            file_read: Mutex::new(read_as_committed(&config, &unapplied)),
            config: Mutex::new(config),
            stores: Mutex::new(stores),
            server: Mutex::new(server),
            state,
            pauses: pauses::PauseRegistry::default(),
            admin: Mutex::new(()),
            metrics: Mutex::new(None),
            cluster: std::sync::OnceLock::new(),
            cluster_node: std::sync::OnceLock::new(),
            peer: Mutex::new(None),
            holds: Mutex::new(HashMap::new()),
            cluster_applying: Mutex::new(()),
            forward,
        });
        if let Some(cfg) = cluster {
            daemon.join_cluster(cfg, fence)?;
            let tables = daemon.cluster_node.get().map(|n| n.clone() as Arc<dyn crate::migrate::ClusterTables>);
            let resumed = migrations::resume_all(&daemon.state, &daemon.catalog(), &lock(&daemon.swap).clone(), tables)?;
            *lock(&daemon.migrations) = resumed;
        }
        daemon.start_metrics()?;
        daemon.start_mirrors();
        Ok(daemon)
    }

    pub fn start_serving(&self) {
        lock(&self.server).start();
    }

    pub fn endpoints(&self) -> Vec<crate::endpoint::Endpoint> {
        lock(&self.server).endpoints()
    }

    pub fn control_path(&self) -> PathBuf {
        lock(&self.config).server.control.clone()
    }

    pub fn control_group(&self) -> Option<crate::config::ControlGroup> {
        lock(&self.config).server.control_group.clone()
    }

    pub fn catalog(&self) -> Arc<Catalog> {
        lock(&self.server).catalog()
    }

    /// Stops serving: copiers stop at a durable checkpoint (their jobs stay
    /// `running` and resume at the next start), clients drain, stores flush.
    pub fn shutdown(&self) -> std::io::Result<()> {
        self.pauses.end_all();
        self.mirrors.stop_all();
        let live: Vec<_> = lock(&self.migrations).values().filter_map(|e| e.running().cloned()).collect();
        for job in live {
            job.suspend();
        }
        lock(&self.server).shutdown()?;
        // After the drain: the lease covered every request served.
        if let Some(cluster) = self.cluster.get() {
            cluster.stop();
        }
        lock(&self.peer).take();
        // Nothing is in flight any more: a clean stop leaves no region in
        // doubt, so the next start resyncs nothing.
        for volume in self.catalog().volumes.values() {
            if let Err(e) = volume.translation().redundancy().close_clean() {
                tracing::warn!(volume = volume.name(), error = %e, "write-intent log not cleared: the next start resyncs the regions it marks");
            }
        }
        // After the drain: no thin write can map a chunk any more.
        if let Err(e) = self.pools.close() {
            tracing::error!(error = %e, "closing the pool metadata failed: the next start's check returns what was not committed");
        }
        self.stop_metrics();
        Ok(())
    }

    /// Joins the cluster of `[cluster]`; returns once this node may serve.
    /// The peer link listens first: a barrier may order this node to hold
    /// as soon as its key exists.
    fn join_cluster(self: &Arc<Self>, cfg: crate::config::ClusterConfig, fence: Arc<crate::server::ServeFence>) -> Result<(), DaemonError> {
        let node = Arc::new(cluster_node::ClusterNode(Arc::downgrade(self)));
        let _ = self.cluster_node.set(node.clone());
        let crate::endpoint::Endpoint::Tcp(addr) = &cfg.peer else { unreachable!("the config allows tcp: peers only") };
        let peer = crate::cluster::peer::PeerServer::start(addr, node.clone()).map_err(|e| DaemonError::io("cluster peer link", e))?;
        *lock(&self.peer) = Some(peer);
        let state = StateDir::open(self.state.root()).map_err(|e| DaemonError::io("state_dir", e))?;
        // Before joining: catching up may mark legs failed, and a failure
        // here must be announced from the first request on.
        for volume in self.catalog().volumes.values() {
            self.share_with_cluster(volume);
        }
        let cluster = crate::cluster::Cluster::start(cfg, state, fence, node)?;
        if let Some(f) = &self.forward {
            f.joined(cluster.member_handle());
        }
        let _ = self.cluster.set(cluster);
        Ok(())
    }

    /// The forwarder of volume `name` (cluster mode).
    fn forwarder(&self, name: &str) -> Option<Box<dyn crate::volume::Forwarder>> {
        self.forward.as_ref().map(|f| f.for_volume(name))
    }

    /// Refuses an operation that changes a volume's table on this node
    /// alone, in cluster mode.
    fn local_table_change(&self, what: &str) -> Result<(), DaemonError> {
        match self.cluster.get() {
            Some(_) => Err(DaemonError::ClusterWide { what: what.into() }),
            None => Ok(()),
        }
    }

    /// `cluster forget NODE`.
    pub fn cluster_forget(&self, node: &str) -> Result<(), DaemonError> {
        Ok(self.cluster.get().ok_or(DaemonError::NotClustered)?.forget(node)?)
    }

    /// `cluster status`: this node's view of the cluster.
    pub fn cluster_status(&self) -> Result<crate::api::ClusterStatus, DaemonError> {
        self.cluster.get().map(|c| c.status()).ok_or(DaemonError::NotClustered)
    }

    fn volume(&self, name: &str) -> Result<Arc<Volume>, DaemonError> {
        self.catalog().volumes.get(name).cloned().ok_or_else(|| DaemonError::NoVolume(name.into()))
    }
}
