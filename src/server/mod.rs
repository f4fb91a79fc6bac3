//! Listeners, handshake and the per-connection request pipeline.
//!
//! Threads, not an async runtime, carry the data path: every backend call is
//! a blocking syscall, and handing each 4 KiB read to a blocking pool from
//! an event loop costs more than the read itself. One accept thread per
//! listener, one reader thread per connection, two shared I/O pools (see `Pools`).

mod budget;
mod buffers;
mod connection;
pub mod counters;
mod execute;
mod exports;
mod fence;
mod forwarded;
pub mod handshake;
mod idle_poll;
mod listener;
pub mod meta;
mod outgoing;
mod pool;
mod reaper;
mod remote_io;
mod recv;
mod request_check;
pub mod security;
mod sink;
mod stream;

pub use connection::ConnLimits;
use crate::endpoint::Endpoint;
pub use listener::Listener;
pub use pool::{WorkerPool, Pools};
pub use stream::Stream;
pub use counters::{Limit, ServerCountersView};
pub use fence::ServeFence;
pub use security::Security;
pub(crate) use request_check::check_request;
use counters::ServerCounters;

use crate::defaults;
use crate::sync::lock;
use crate::volume::Catalog;
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub io_threads: usize,
    pub max_connections: usize,
    pub limits: ConnLimits,
    /// Until when requests may run (a cluster node's lease; see `fence.rs`).
    pub fence: Arc<ServeFence>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            io_threads: defaults::IO_THREADS,
            max_connections: defaults::MAX_CONNECTIONS,
            limits: ConnLimits {
                max_inflight_bytes: defaults::MAX_INFLIGHT_BYTES,
                max_request: defaults::MAX_REQUEST as u32,
                max_inflight_requests: defaults::MAX_INFLIGHT_REQUESTS,
                shutdown_grace: defaults::SHUTDOWN_GRACE,
                busy_poll: defaults::BUSY_POLL,
            },
            fence: Arc::new(ServeFence::always()),
        }
    }
}

/// A live connection, as seen by status and shutdown.
struct ConnEntry {
    peer: String,
    /// TCP source address, for the per-address limit.
    addr: Option<std::net::IpAddr>,
    /// `None` while the handshake runs.
    export: Option<String>,
    socket: Stream,
    accepted: Instant,
    /// Dropped by the reaper (counted once).
    reaped: bool,
}

struct ServerState {
    catalog: ArcSwap<Catalog>,
    security: ArcSwap<Security>,
    counters: ServerCounters,
    pools: Arc<Pools>,
    stopping: AtomicBool,
    options: ServerOptions,
    connections: Mutex<HashMap<u64, ConnEntry>>,
    next_id: AtomicU64,
}

/// Summary of a connection for status output.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    pub id: u64,
    pub peer: String,
    pub export: Option<String>,
}

pub struct Server {
    shared: Arc<ServerState>,
    listeners: Vec<Arc<Listener>>,
    accept_threads: Vec<JoinHandle<()>>,
}

impl Server {
    /// Binds every endpoint (so address errors surface before anything runs).
    pub fn bind(endpoints: &[Endpoint], catalog: Catalog, options: ServerOptions) -> std::io::Result<Server> {
        let mut listeners = Vec::new();
        for endpoint in endpoints {
            let l = Listener::bind(endpoint).map_err(|e| std::io::Error::new(e.kind(), format!("listen {endpoint}: {e}")))?;
            listeners.push(Arc::new(l));
        }
        let shared = Arc::new(ServerState {
            catalog: ArcSwap::from_pointee(catalog),
            security: ArcSwap::from_pointee(Security::default()),
            counters: ServerCounters::default(),
            pools: Arc::new(Pools::new(options.io_threads, pool::cpu_threads())),
            stopping: AtomicBool::new(false),
            options,
            connections: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        });
        Ok(Server { shared, listeners, accept_threads: Vec::new() })
    }

    /// The addresses actually bound.
    pub fn endpoints(&self) -> Vec<Endpoint> {
        self.listeners.iter().map(|l| l.local()).collect()
    }

    pub fn catalog(&self) -> Arc<Catalog> {
        self.shared.catalog.load_full()
    }

    pub fn connections(&self) -> Vec<ConnectionInfo> {
        let conns = lock(&self.shared.connections);
        let mut list: Vec<_> =
            conns.iter().map(|(id, c)| ConnectionInfo { id: *id, peer: c.peer.clone(), export: c.export.clone() }).collect();
        list.sort_by_key(|c| c.id);
        list
    }

    /// Publishes a new catalog: new connections see it; live connections keep
    /// the volume they negotiated (volumes are shared between catalogs).
    pub fn set_catalog(&self, catalog: Catalog) {
        self.shared.catalog.store(Arc::new(catalog));
    }

    /// Publishes new TLS settings, credentials and access rules: new
    /// connections use them; live ones keep what they negotiated.
    pub fn set_security(&self, security: Security) {
        self.shared.security.store(Arc::new(security));
    }

    pub fn counters(&self) -> ServerCountersView {
        self.shared.counters.view()
    }

    /// Closes every connection to `export`; returns how many.
    pub fn disconnect_export(&self, export: &str) -> usize {
        let conns = lock(&self.shared.connections);
        let mut n = 0;
        for c in conns.values().filter(|c| c.export.as_deref() == Some(export)) {
            c.socket.shutdown();
            n += 1;
        }
        n
    }

    /// Starts accepting connections.
    pub fn start(&mut self) {
        for listener in &self.listeners {
            let listener = listener.clone();
            let shared = self.shared.clone();
            let handle = std::thread::Builder::new()
                .name("nbdvirt-accept".into())
                .spawn(move || accept_loop(&listener, &shared))
                .expect("spawn accept thread");
            self.accept_threads.push(handle);
        }
        let shared = self.shared.clone();
        let reaper = std::thread::Builder::new()
            .name("nbdvirt-reaper".into())
            .spawn(move || reaper::run(&shared))
            .expect("spawn reaper thread");
        self.accept_threads.push(reaper);
    }

    /// Graceful stop: no new connections; open ones finish their in-flight
    /// requests and answer ESHUTDOWN to new ones for the grace period; then
    /// every store is flushed.
    pub fn shutdown(&mut self) -> std::io::Result<()> {
        self.shared.stopping.store(true, Ordering::SeqCst);
        for t in self.accept_threads.drain(..) {
            let _ = t.join();
        }
        self.listeners.clear();
        let grace = self.shared.options.limits.shutdown_grace;
        let deadline = Instant::now() + grace + Duration::from_secs(30);
        while !lock(&self.shared.connections).is_empty() {
            if Instant::now() >= deadline {
                tracing::warn!("connections still open after the grace period; closing them");
                for c in lock(&self.shared.connections).values() {
                    c.socket.shutdown();
                }
                std::thread::sleep(Duration::from_millis(200));
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let result = self.shared.catalog.load().flush_all();
        tracing::info!("all stores flushed; stopped");
        result
    }
}

fn accept_loop(listener: &Listener, shared: &Arc<ServerState>) {
    while !shared.stopping.load(Ordering::Relaxed) {
        match listener.accept_timeout(Duration::from_millis(200)) {
            Ok(Some(stream)) => {
                let addr = match &stream {
                    Stream::Tcp(s) => s.peer_addr().ok().map(|a| a.ip()),
                    _ => None,
                };
                let Ok(socket) = stream.try_clone() else { continue };
                let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
                {
                    let mut conns = lock(&shared.connections);
                    if let Some(limit) = over_limit(&conns, addr, shared.options.max_connections, &shared.security.load()) {
                        shared.counters.trip(limit);
                        tracing::warn!(peer = %stream.peer(), limit = limit.name(), "connection refused: {} reached", limit.name());
                        continue;
                    }
                    conns.insert(id, ConnEntry { peer: stream.peer(), addr, export: None, socket, accepted: Instant::now(), reaped: false });
                }
                let shared = shared.clone();
                let spawned = std::thread::Builder::new().name(format!("nbdvirt-conn-{id}")).spawn({
                    let shared = shared.clone();
                    move || {
                        run_connection(id, stream, &shared);
                        lock(&shared.connections).remove(&id);
                    }
                });
                if let Err(e) = spawned {
                    tracing::error!(error = %e, "cannot start connection thread");
                    lock(&shared.connections).remove(&id);
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// The limit a new connection from `addr` would exceed, if any.
fn over_limit(conns: &HashMap<u64, ConnEntry>, addr: Option<std::net::IpAddr>, max: usize, security: &Security) -> Option<Limit> {
    if conns.len() >= max {
        return Some(Limit::MaxConnections);
    }
    let from = |a| conns.values().filter(|c| c.addr == Some(a)).count();
    addr.filter(|a| from(*a) >= security.max_connections_per_address).map(|_| Limit::MaxConnectionsPerAddress)
}

fn run_connection(id: u64, mut stream: Stream, shared: &ServerState) {
    let peer = stream.peer();
    let _span = tracing::info_span!("conn", id, peer = %peer).entered();
    if !shared.options.fence.is_open() {
        // Closed at once, so the client tries its next server.
        tracing::info!("connection refused: this cluster node is fenced (its membership lease is not certainly valid)");
        return;
    }
    let catalog = shared.catalog.load_full();
    let security = shared.security.load_full();
    let _ = stream.set_read_timeout(Some(security.handshake_timeout));
    let _ = stream.set_write_timeout(Some(security.handshake_timeout));
    let mut who = security::identify(&stream);
    let ctx = handshake::HandshakeCtx {
        catalog: &catalog,
        security: &security,
        stopping: &shared.stopping,
        counters: &shared.counters,
        timeout: security.handshake_timeout,
    };
    let negotiated = match handshake::negotiate(&mut stream, &ctx, &mut who) {
        Ok(Some(n)) => n,
        Ok(None) => return,
        Err(e) => {
            if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) {
                reaper::timed_out(shared, id);
            }
            tracing::debug!(error = %e, "handshake failed");
            return;
        }
    };
    drop(catalog);
    drop(security);
    let export = negotiated.volume.name().to_string();
    if let Some(c) = lock(&shared.connections).get_mut(&id) {
        c.export = Some(export.clone());
    }
    tracing::info!(export = %export, client = %who, structured = negotiated.structured, read_only = negotiated.read_only, "client connected");
    match connection::serve(id, stream, negotiated, shared.pools.clone(), &shared.options, &shared.stopping) {
        Ok(()) => tracing::info!(export = %export, "client disconnected"),
        Err(e) => tracing::info!(export = %export, error = %e, "connection ended"),
    }
}
