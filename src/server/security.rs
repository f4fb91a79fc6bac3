//! What the handshake enforces beyond the protocol: the TLS mode and
//! credentials, each export's access rules, and the limits on what a
//! client may send before it has chosen an export. Replaced whole at
//! reload (new connections see the new one).

use super::stream::Stream;
use crate::access::{ClientIdentity, ExportAccess};
use crate::tls::{TlsError, TlsMode, TlsPeer, TlsServer, TlsSession};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Security {
    pub tls: TlsMode,
    /// Present whenever `tls` is not `Off`.
    pub tls_server: Option<Arc<TlsServer>>,
    /// By volume name; a volume not listed is open to every client.
    pub exports: HashMap<String, ExportAccess>,
    /// Largest option payload read (larger: NBD_REP_ERR_TOO_BIG).
    pub max_option_payload: u32,
    /// Longest export name accepted.
    pub max_export_name: usize,
    /// Longest option haggling, TLS handshake included.
    pub handshake_timeout: Duration,
    /// Connections from one TCP source address.
    pub max_connections_per_address: usize,
}

impl Default for Security {
    fn default() -> Security {
        Security {
            tls: TlsMode::Off,
            tls_server: None,
            exports: HashMap::new(),
            max_option_payload: crate::defaults::MAX_OPTION_PAYLOAD,
            max_export_name: crate::defaults::MAX_EXPORT_NAME,
            handshake_timeout: crate::defaults::HANDSHAKE_TIMEOUT,
            max_connections_per_address: crate::defaults::MAX_CONNECTIONS_PER_ADDRESS,
        }
    }
}

impl Security {
    pub fn access(&self, volume: &str) -> Option<&ExportAccess> {
        self.exports.get(volume)
    }
}

/// A byte stream the handshake runs on: a client socket, or the fuzzer's
/// in-memory script. STARTTLS replaces it with its TLS session.
pub trait Transport: Read + Write {
    fn start_tls(&mut self, tls: &TlsServer, timeout: Duration) -> Result<TlsPeer, TlsError>;
}

impl Transport for Stream {
    fn start_tls(&mut self, tls: &TlsServer, timeout: Duration) -> Result<TlsPeer, TlsError> {
        if self.is_tls() {
            return Err(TlsError::Handshake("TLS is already running".into()));
        }
        // The handshake itself blocks, bounded by the socket timeouts.
        self.set_read_timeout(Some(timeout))?;
        self.set_write_timeout(Some(timeout))?;
        let plain = self.try_clone()?;
        let (stream, peer) = tls.accept(plain)?;
        let session = TlsSession::new(stream, peer.clone())?;
        session.set_read_timeout(Some(timeout));
        session.set_write_timeout(Some(timeout));
        *self = Stream::Tls(session);
        Ok(peer)
    }
}

/// Adds what TLS proved to a client's identity.
pub fn add_tls_peer(who: &mut ClientIdentity, peer: TlsPeer) {
    who.tls = true;
    who.cert_cn = peer.cert_cn;
    who.cert_san = peer.cert_san;
    who.psk = peer.psk_identity;
}

/// Identity of a freshly accepted client: its source address, or its
/// Unix peer credentials (SO_PEERCRED, plus supplementary groups).
pub fn identify(stream: &Stream) -> ClientIdentity {
    let mut who = ClientIdentity::default();
    match stream {
        Stream::Tcp(s) => who.addr = s.peer_addr().ok().map(|a| a.ip()),
        Stream::Unix(s) => {
            use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
            if let Ok(c) = getsockopt(s, PeerCredentials) {
                let mut gids = vec![c.gid()];
                gids.extend(supplementary_groups(c.pid()).into_iter().filter(|g| *g != c.gid()));
                who.unix = Some(crate::access::UnixPeer { pid: c.pid(), uid: c.uid(), gids });
            }
        }
        Stream::Tls(_) => {}
    }
    who
}

/// The `Groups:` line of /proc/PID/status (empty if the process is gone).
fn supplementary_groups(pid: i32) -> Vec<u32> {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return Vec::new() };
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| g.split_whitespace().filter_map(|n| n.parse().ok()).collect())
        .unwrap_or_default()
}

