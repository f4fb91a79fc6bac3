//! The daemon's `/metrics` endpoint (`[server] metrics`): started with the
//! daemon, stopped at shutdown; each scrape reads the daemon's views and
//! every volume's counters (`crate::metrics` renders them). The collector
//! holds the daemon weakly: the serving thread never keeps it alive.

use super::{Daemon, DaemonError};
use crate::api;
use crate::metrics::{render, MetricsError, MetricsServer, Views, VolumeCounters};
use crate::sync::lock;
use std::net::SocketAddr;
use std::sync::Arc;

impl Daemon {
    /// Binds and serves the metrics endpoint when the config asks for one;
    /// a port that cannot be bound fails the start.
    pub(super) fn start_metrics(self: &Arc<Self>) -> Result<(), DaemonError> {
        let Some(endpoint) = lock(&self.config).server.metrics.clone() else {
            return Ok(());
        };
        let daemon = Arc::downgrade(self);
        let collect = Box::new(move || daemon.upgrade().map(|d| render(&d.metrics_views())).unwrap_or_default());
        let server = MetricsServer::start(&endpoint, collect).map_err(|e| match e {
            MetricsError::Bind { source, .. } => DaemonError::io(format!("server.metrics {endpoint}"), source),
            other => DaemonError::io("server.metrics", std::io::Error::new(std::io::ErrorKind::InvalidInput, other.to_string())),
        })?;
        *lock(&self.metrics) = Some(server);
        Ok(())
    }

    /// Where `/metrics` is served, if it is.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        lock(&self.metrics).as_ref().map(MetricsServer::local_addr)
    }

    pub(super) fn stop_metrics(&self) {
        if let Some(server) = lock(&self.metrics).take() {
            server.stop();
        }
    }

    /// What one scrape shows, read now.
    fn metrics_views(&self) -> Views {
        let counters = self.catalog().volumes.values().map(|v| VolumeCounters { volume: v.name().into(), stats: v.counters().snapshot() }).collect();
        let (pools, usage) = pool_views(self);
        Views {
            status: self.status(),
            counters,
            mirrors: self.mirror_status(None).unwrap_or_default(),
            migrations: self.migrate_status(None).unwrap_or_default(),
            pools,
            usage,
            server: lock(&self.server).counters(),
            cluster: self.cluster_status().ok(),
        }
    }
}

/// The pool views the metrics render (`nbdvirt_pool_*`,
/// `nbdvirt_volume_{allocated,written}_bytes`,
/// `nbdvirt_volume_allocation_byte_seconds_total`): every pool, and usage
/// since each volume was created.
fn pool_views(daemon: &Daemon) -> (Vec<api::PoolStatus>, Option<api::UsageReport>) {
    // Metered once for both views (`pool_status` and `pool_usage` would
    // each meter again).
    daemon.meter_pool_writes();
    (daemon.pools.status(None).unwrap_or_default(), daemon.pools.usage(None).ok())
}
