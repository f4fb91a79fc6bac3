//! Attaching volumes as `/dev/nbdN` through the kernel's NBD client.
//!
//! The handshake is done here (`client`), then the connected sockets are
//! handed to the kernel with the generic-netlink `nbd` family (`netlink`),
//! falling back to the old ioctl interface (`ioctl`) where the family is
//! missing. `watch` keeps a device alive across server restarts: on the
//! kernel's link-dead notification it reconnects and hands the new sockets
//! over with NBD_CMD_RECONFIGURE, within the dead-connection timeout.
//!
//! With TLS the kernel gets one end of a socket pair per connection and a
//! relay thread (`relay`) carries the bytes to and from the TLS session:
//! the device then works only while the process that attached it runs
//! (`memory` keeps that process runnable under memory pressure).

pub mod client;
mod endpoints;
mod error;
mod ioctl;
pub mod memory;
pub mod netlink;
pub mod relay;

pub use endpoints::parse_list as parse_endpoints;
pub use error::{AttachError, HandshakeError};
pub use relay::Relays;

use crate::endpoint::Endpoint;
use crate::tls::TlsClientFiles;
use client::Connection;
use netlink::{NbdAttr, NbdCmd, NbdFamily, Notifications, NbdRequest};
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

/// TLS for every connection of an attach (STARTTLS is then required).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachTls {
    pub files: TlsClientFiles,
    /// The name the server's certificate must carry; default: the host of
    /// a `tcp:` endpoint, none for a Unix socket (the chain is still
    /// checked against `ca-cert.pem`).
    pub hostname: Option<String>,
}

#[derive(Debug, Clone)]
pub struct AttachOptions {
    pub volume: String,
    /// `Some(n)` for /dev/nbdN; `None` lets the kernel pick a free device.
    pub index: Option<u32>,
    /// The server, or the cluster nodes to try in turn (never empty).
    pub endpoints: Vec<Endpoint>,
    pub connections: u32,
    /// Request timeout (s): a request unanswered this long fails.
    pub timeout: u64,
    /// How long (s) the kernel holds I/O while a connection is dead,
    /// waiting for a reconnect.
    pub dead_conn_timeout: u64,
    pub block_size: Option<u32>,
    /// Use the ioctl interface even if netlink is available.
    pub force_ioctl: bool,
    pub tls: Option<AttachTls>,
}

/// The backend identifier stored with the device (`/sys/block/nbdN/backend`).
pub fn backend_identifier(volume: &str, endpoints: &[Endpoint]) -> String {
    format!("nbdvirt:{volume}@{}", endpoints::joined(endpoints))
}

pub fn device_index(dev: &str) -> Result<u32, AttachError> {
    dev.trim_start_matches("/dev/")
        .strip_prefix("nbd")
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| AttachError::NotNbdDevice(dev.to_string()))
}

/// The sockets to hand the kernel: plain connections as they are, a TLS
/// session through a relay started here (it ends by itself if the kernel
/// never takes its socket, once that socket is dropped).
fn kernel_sockets(conns: Vec<Connection>, relays: &mut Relays) -> Result<Vec<OwnedFd>, AttachError> {
    let first = relays.len();
    conns
        .into_iter()
        .enumerate()
        .map(|(i, conn)| match conn {
            Connection::Plain(fd) => Ok(fd),
            Connection::Tls(session) => relays.start(format!("connection {}", first + i + 1), *session).map_err(AttachError::Relay),
        })
        .collect()
}

/// Connects (to the first server of the list from `first` on that
/// answers) and makes the kernel's sockets in one go; says which server.
fn connect_for_kernel(opts: &AttachOptions, first: usize, relays: &mut Relays) -> Result<(Vec<OwnedFd>, client::ExportInfo, usize), AttachError> {
    let (conns, info, used) = endpoints::connect_all(opts, first)?;
    if opts.endpoints.len() > 1 {
        tracing::info!(server = %opts.endpoints[used], "connected");
    }
    Ok((kernel_sockets(conns, relays)?, info, used))
}

/// A netlink socket and the resolved `nbd` family.
fn nbd_family() -> Result<(neli::socket::NlSocketHandle, NbdFamily), AttachError> {
    let mut sock = netlink::open().map_err(AttachError::Socket)?;
    let family = netlink::resolve(&mut sock).map_err(AttachError::NoFamily)?;
    Ok((sock, family))
}

fn netlink_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> AttachError {
    let what = what.into();
    move |source| AttachError::Netlink { what, source }
}

/// The result of an attach.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Attached {
    pub device: String,
    pub index: u32,
    pub size: u64,
    pub connections: u32,
    pub interface: &'static str,
    /// Whether the connections run over TLS (through relays in the
    /// attaching process).
    pub tls: bool,
}

/// Attaches with netlink; `Err` if it cannot. With `force_ioctl` or no
/// netlink family, use [`attach_ioctl_blocking`] instead. With TLS the
/// returned relays carry the device's connections: the device works as
/// long as they run (in this process).
///
/// The server is asked first, so that a wrong volume or credential is
/// reported as such even where the kernel lacks the nbd module.
pub fn attach(opts: &AttachOptions) -> Result<(Attached, Relays), AttachError> {
    let mut relays = Relays::new();
    let (socks, info, _) = connect_for_kernel(opts, 0, &mut relays)?;
    let (mut sock, family) = nbd_family()?;
    let block = opts.block_size.unwrap_or(info.preferred_block).clamp(512, 4096);
    let connect = || {
        let mut req = NbdRequest::new(NbdCmd::Connect);
        if let Some(i) = opts.index {
            req = req.attr(NbdAttr::Index, i)?;
        }
        req.attr(NbdAttr::SizeBytes, info.size)?
            .attr(NbdAttr::BlockSizeBytes, block as u64)?
            .attr(NbdAttr::ServerFlags, info.flags as u64)?
            .attr(NbdAttr::Timeout, opts.timeout)?
            .attr(NbdAttr::DeadConnTimeout, opts.dead_conn_timeout)?
            .attr(NbdAttr::ClientFlags, 0u64)?
            .attr(NbdAttr::BackendIdentifier, backend_identifier(&opts.volume, &opts.endpoints).as_str())?
            .sockets(&socks)
    };
    let reply = connect().and_then(|req| req.send(&mut sock, &family)).map_err(|e| match (e.raw_os_error(), opts.index) {
        (Some(libc::EBUSY), Some(i)) => AttachError::Busy(i),
        _ => AttachError::Netlink { what: "NBD_CMD_CONNECT".into(), source: e },
    })?;
    let index = reply.as_ref().and_then(|r| netlink::u32_attr(r, NbdAttr::Index)).or(opts.index).ok_or(AttachError::NoDeviceIndex)?;
    // The kernel holds its own references to the sockets now.
    drop(socks);
    let attached = Attached { device: format!("/dev/nbd{index}"), index, size: info.size, connections: opts.connections.max(1), interface: "netlink", tls: opts.tls.is_some() };
    Ok((attached, relays))
}

/// Whether the generic-netlink interface is available.
pub fn netlink_available() -> bool {
    nbd_family().is_ok()
}

/// ioctl fallback: one connection, and this call blocks (NBD_DO_IT) until
/// the device is disconnected; run it in the foreground or a service.
/// `ready` is called (from another thread) once the device has its size.
/// A TLS relay runs in this process meanwhile, and is waited for.
pub fn attach_ioctl_blocking(opts: &AttachOptions, ready: impl FnOnce(&Attached) + Send) -> Result<(), AttachError> {
    if opts.connections > 1 {
        return Err(AttachError::IoctlOneConnection);
    }
    let mut relays = Relays::new();
    let (socks, info, _) = connect_for_kernel(opts, 0, &mut relays)?;
    let [sock] = <[OwnedFd; 1]>::try_from(socks).map_err(|_| AttachError::IoctlOneConnection)?;
    let index = match opts.index {
        Some(i) => i,
        None => ioctl::free_device().ok_or(AttachError::NoFreeDevice)?,
    };
    let block = opts.block_size.unwrap_or(info.preferred_block).clamp(512, 4096);
    let attached = Attached { device: format!("/dev/nbd{index}"), index, size: info.size, connections: 1, interface: "ioctl", tls: opts.tls.is_some() };
    let result = ioctl::run(index, &sock, info.size, block, info.flags, opts.timeout, || ready(&attached));
    // The relay sees its socket end once ours is closed too.
    drop(sock);
    while !relays.is_empty() {
        relays.reap();
        std::thread::sleep(Duration::from_millis(50));
    }
    result
}

/// Disconnects `/dev/nbdN` (the kernel sends NBD_CMD_DISC to the server).
pub fn detach(index: u32) -> Result<(), AttachError> {
    let mut sock = netlink::open().map_err(AttachError::Socket)?;
    match netlink::resolve(&mut sock) {
        Ok(family) => {
            let what = format!("NBD_CMD_DISCONNECT /dev/nbd{index}");
            NbdRequest::new(NbdCmd::Disconnect).attr(NbdAttr::Index, index).and_then(|r| r.send(&mut sock, &family)).map_err(netlink_err(what))?;
            Ok(())
        }
        Err(_) => ioctl::disconnect(index),
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct DeviceStatus {
    pub device: String,
    pub index: u32,
    pub connected: bool,
    /// Backend identifier given at attach time, if any.
    pub backend: Option<String>,
    pub size: Option<u64>,
}

fn sysfs(index: u32, file: &str) -> Option<String> {
    std::fs::read_to_string(format!("/sys/block/nbd{index}/{file}")).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

/// Every NBD device the kernel knows (NBD_CMD_STATUS), with its backend.
pub fn list() -> Result<Vec<DeviceStatus>, AttachError> {
    let (mut sock, family) = nbd_family()?;
    let reply = NbdRequest::new(NbdCmd::Status).send(&mut sock, &family).map_err(netlink_err("NBD_CMD_STATUS"))?.ok_or(AttachError::NoStatusReply)?;
    let mut out: Vec<DeviceStatus> = netlink::device_list(&reply)
        .into_iter()
        .map(|d| DeviceStatus {
            device: format!("/dev/nbd{}", d.index),
            index: d.index,
            connected: d.connected,
            backend: sysfs(d.index, "backend"),
            size: sysfs(d.index, "size").and_then(|s| s.parse::<u64>().ok()).map(|sectors| sectors * 512),
        })
        .collect();
    out.sort_by_key(|d| d.index);
    Ok(out)
}

/// Finds the device attached to `volume` (by backend identifier).
pub fn find_by_volume(volume: &str) -> Result<u32, AttachError> {
    let prefix = format!("nbdvirt:{volume}@");
    list()?
        .into_iter()
        .find(|d| d.connected && d.backend.as_deref().is_some_and(|b| b.starts_with(&prefix)))
        .map(|d| d.index)
        .ok_or_else(|| AttachError::NotAttached(volume.to_string()))
}

/// Keeps `/dev/nbdN` connected: on link-dead, reconnects (retrying every
/// second) and hands the kernel new sockets (with TLS: new sessions and
/// relays, added to `relays`). Returns when the device is detached, or
/// when `stop()` says so.
pub fn watch(opts: &AttachOptions, index: u32, relays: &mut Relays, stop: impl Fn() -> bool) -> Result<(), AttachError> {
    // Requests go on their own socket, so that notifications never
    // interleave with a request's reply and ACK.
    let (mut sock, family) = nbd_family()?;
    let group = family.group.ok_or(AttachError::NoMulticastGroup)?;
    let mut notifications = Notifications::join(group).map_err(AttachError::JoinGroup)?;
    let ident = backend_identifier(&opts.volume, &opts.endpoints);
    // The server in use; after a dead link the next one is tried first.
    let mut current = 0;
    let mut dead_since: Option<Instant> = None;
    let mut last_failure: Option<String> = None;
    tracing::info!(device = index, "watching for dead connections");
    loop {
        if stop() {
            return Ok(());
        }
        relays.reap();
        let quiet = match notifications.wait_dead(Duration::from_secs(1)) {
            Ok(Some(dead)) => {
                if dead.contains(&index) {
                    tracing::warn!(device = index, "kernel reports a dead connection; reconnecting");
                    dead_since.get_or_insert_with(Instant::now);
                }
                false
            }
            // A quiet second, or an interrupted wait.
            Ok(None) | Err(_) => true,
        };
        if quiet && dead_since.is_none() {
            // Detached by someone else? Then there is nothing to keep alive.
            if sysfs(index, "pid").is_none() && list().map(|l| l.iter().all(|d| d.index != index || !d.connected)).unwrap_or(false) {
                tracing::info!(device = index, "device was detached; stopping");
                return Ok(());
            }
        }
        if let Some(since) = dead_since {
            if sysfs(index, "backend").is_some_and(|b| b != ident) {
                return Err(AttachError::ForeignBackend(index));
            }
            let first = if opts.endpoints.len() > 1 { (current + 1) % opts.endpoints.len() } else { 0 };
            match connect_for_kernel(opts, first, relays) {
                Ok((socks, info, used)) => {
                    // A device attached with a backend identifier can only be
                    // reconfigured by naming the same one: the kernel answers
                    // EINVAL ("must specify backend") otherwise.
                    let reconfigure = NbdRequest::new(NbdCmd::Reconfigure)
                        .attr(NbdAttr::Index, index)
                        .and_then(|r| r.attr(NbdAttr::BackendIdentifier, ident.as_str()))
                        .and_then(|r| r.sockets(&socks))
                        .and_then(|r| r.send(&mut sock, &family));
                    match reconfigure {
                        Ok(_) => {
                            current = used;
                            tracing::info!(device = index, size = info.size, server = %opts.endpoints[used], after = ?since.elapsed(), "reconnected");
                            dead_since = None;
                            last_failure = None;
                        }
                        Err(e) => {
                            // Back off: each retry opens new server connections.
                            let wait = since.elapsed().as_secs().clamp(1, 5);
                            tracing::warn!(device = index, error = %e, retry_in_s = wait, "NBD_CMD_RECONFIGURE failed; retrying");
                            std::thread::sleep(Duration::from_secs(wait));
                        }
                    }
                }
                // A server still down is expected; anything else (a TLS
                // failure, unreadable credentials) is said once per change.
                Err(AttachError::Connect { source, .. }) => {
                    tracing::debug!(device = index, error = %source, "server not reachable yet");
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => {
                    let message = e.to_string();
                    if last_failure.as_ref() != Some(&message) {
                        tracing::warn!(device = index, error = %message, "reconnect failed; retrying");
                        last_failure = Some(message);
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        }
    }
}
