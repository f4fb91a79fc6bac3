//! Server-wide counters of the handshake and its guards, for metrics.
//! Each trip is logged where it happens; these only count.

use std::sync::atomic::{AtomicU64, Ordering};

/// A limit against abuse that refused or dropped a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    HandshakeTimeout,
    MaxConnections,
    MaxConnectionsPerAddress,
    OptionPayload,
    ExportName,
}

impl Limit {
    pub const ALL: [Limit; 5] =
        [Limit::HandshakeTimeout, Limit::MaxConnections, Limit::MaxConnectionsPerAddress, Limit::OptionPayload, Limit::ExportName];

    /// The `limit` label of `nbdvirt_limit_trips_total`, and the config key.
    pub fn name(self) -> &'static str {
        match self {
            Limit::HandshakeTimeout => "handshake_timeout",
            Limit::MaxConnections => "max_connections",
            Limit::MaxConnectionsPerAddress => "max_connections_per_address",
            Limit::OptionPayload => "max_option_payload",
            Limit::ExportName => "max_export_name",
        }
    }
}

#[derive(Debug, Default)]
pub struct ServerCounters {
    limits: [AtomicU64; 5],
    tls_ok: AtomicU64,
    tls_failed: AtomicU64,
    denied: AtomicU64,
}

/// A copy for one scrape.
#[derive(Debug, Clone, Default)]
pub struct ServerCountersView {
    pub limits: Vec<(&'static str, u64)>,
    pub tls_ok: u64,
    pub tls_failed: u64,
    pub access_denied: u64,
}

impl ServerCounters {
    pub fn trip(&self, limit: Limit) {
        self.limits[limit as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn tls_handshake(&self, ok: bool) {
        if ok { &self.tls_ok } else { &self.tls_failed }.fetch_add(1, Ordering::Relaxed);
    }

    pub fn access_denied(&self) {
        self.denied.fetch_add(1, Ordering::Relaxed);
    }

    pub fn view(&self) -> ServerCountersView {
        ServerCountersView {
            limits: Limit::ALL.iter().map(|l| (l.name(), self.limits[*l as usize].load(Ordering::Relaxed))).collect(),
            tls_ok: self.tls_ok.load(Ordering::Relaxed),
            tls_failed: self.tls_failed.load(Ordering::Relaxed),
            access_denied: self.denied.load(Ordering::Relaxed),
        }
    }
}
