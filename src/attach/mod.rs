//! Attaching volumes as `/dev/nbdN` through the kernel's NBD client.
//!
//! The handshake is done here (`client`), then the connected sockets are
//! handed to the kernel with the generic-netlink `nbd` family (`netlink`),
//! falling back to the old ioctl interface (`ioctl`) where the family is
//! missing. `watch` keeps a device alive across server restarts: on the
//! kernel's link-dead notification it reconnects and hands the new sockets
//! over with NBD_CMD_RECONFIGURE, within the dead-connection timeout.

pub mod client;
mod ioctl;
pub mod netlink;

use crate::nbd::TFLAG_CAN_MULTI_CONN;
use crate::endpoint::Endpoint;
use netlink::*;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct AttachOptions {
    pub volume: String,
    /// `Some(n)` for /dev/nbdN; `None` lets the kernel pick a free device.
    pub index: Option<u32>,
    pub endpoint: Endpoint,
    pub connections: u32,
    /// Request timeout (s): a request unanswered this long fails.
    pub timeout: u64,
    /// How long (s) the kernel holds I/O while a connection is dead,
    /// waiting for a reconnect.
    pub dead_conn_timeout: u64,
    pub block_size: Option<u32>,
    /// Use the ioctl interface even if netlink is available.
    pub force_ioctl: bool,
}

/// The backend identifier stored with the device (`/sys/block/nbdN/backend`).
pub fn backend_identifier(volume: &str, endpoint: &Endpoint) -> String {
    format!("nbdvirt:{volume}@{endpoint}")
}

pub fn device_index(dev: &str) -> Result<u32, String> {
    dev.trim_start_matches("/dev/")
        .strip_prefix("nbd")
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("'{dev}' is not an NBD device (expected /dev/nbdN)"))
}

/// Connects `n` sockets and checks the export allows it.
pub fn connect_all(opts: &AttachOptions) -> Result<(Vec<OwnedFd>, client::ExportInfo), String> {
    let mut socks = Vec::new();
    let mut info = None;
    for _ in 0..opts.connections.max(1) {
        let (fd, i) = client::connect(&opts.endpoint, &opts.volume, Duration::from_secs(10))?;
        socks.push(fd);
        info = Some(i);
    }
    let info = info.expect("at least one connection");
    if opts.connections > 1 && info.flags & TFLAG_CAN_MULTI_CONN == 0 {
        return Err(format!("export '{}' does not allow several connections (no CAN_MULTI_CONN)", opts.volume));
    }
    Ok((socks, info))
}

fn nbd_family(sock: &mut Socket) -> Result<(u16, Option<u32>), String> {
    let (id, groups) = resolve_family(sock, "nbd").map_err(|e| format!("netlink family 'nbd': {e} (is the nbd module loaded? modprobe nbd)"))?;
    Ok((id, groups.into_iter().find(|(n, _)| n == "nbd_mc_group").map(|(_, g)| g)))
}

fn add_sockets(msg: &mut Message, socks: &[OwnedFd]) {
    msg.begin_nest(NBD_ATTR_SOCKETS);
    for s in socks {
        msg.begin_nest(NBD_SOCK_ITEM).u32(NBD_SOCK_FD, s.as_raw_fd() as u32).end_nest();
    }
    msg.end_nest();
}

/// The result of an attach.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Attached {
    pub device: String,
    pub index: u32,
    pub size: u64,
    pub connections: u32,
    pub interface: &'static str,
}

/// Attaches with netlink; `Err` if it cannot. With `force_ioctl` or no
/// netlink family, use [`attach_ioctl_blocking`] instead.
pub fn attach(opts: &AttachOptions) -> Result<Attached, String> {
    let mut sock = Socket::open().map_err(|e| format!("netlink socket: {e}"))?;
    let (family, _) = nbd_family(&mut sock)?;
    let (socks, info) = connect_all(opts)?;
    let block = opts.block_size.unwrap_or(info.preferred_block).clamp(512, 4096);
    let mut msg = Message::new(family, NBD_CMD_CONNECT, ack_flags());
    if let Some(i) = opts.index {
        msg.u32(NBD_ATTR_INDEX, i);
    }
    msg.u64(NBD_ATTR_SIZE_BYTES, info.size)
        .u64(NBD_ATTR_BLOCK_SIZE_BYTES, block as u64)
        .u64(NBD_ATTR_SERVER_FLAGS, info.flags as u64)
        .u64(NBD_ATTR_TIMEOUT, opts.timeout)
        .u64(NBD_ATTR_DEAD_CONN_TIMEOUT, opts.dead_conn_timeout)
        .u64(NBD_ATTR_CLIENT_FLAGS, 0)
        .string(NBD_ATTR_BACKEND_IDENTIFIER, &backend_identifier(&opts.volume, &opts.endpoint));
    add_sockets(&mut msg, &socks);
    let reply = sock.request(&mut msg).map_err(|e| match (e.raw_os_error(), opts.index) {
        (Some(libc::EBUSY), Some(i)) => format!("/dev/nbd{i} is busy (already attached?)"),
        _ => format!("NBD_CMD_CONNECT: {e}"),
    })?;
    let index = reply
        .as_ref()
        .and_then(|r| attrs(&r.payload).iter().find(|a| a.kind == NBD_ATTR_INDEX).and_then(Attr::u32))
        .or(opts.index)
        .ok_or("the kernel did not say which device it used")?;
    // The kernel holds its own references to the sockets now.
    drop(socks);
    Ok(Attached { device: format!("/dev/nbd{index}"), index, size: info.size, connections: opts.connections.max(1), interface: "netlink" })
}

/// Whether the generic-netlink interface is available.
pub fn netlink_available() -> bool {
    Socket::open().ok().is_some_and(|mut s| nbd_family(&mut s).is_ok())
}

/// ioctl fallback: one connection, and this call blocks (NBD_DO_IT) until
/// the device is disconnected; run it in the foreground or a service.
/// `ready` is called (from another thread) once the device has its size.
pub fn attach_ioctl_blocking(opts: &AttachOptions, ready: impl FnOnce(&Attached) + Send) -> Result<(), String> {
    let index = match opts.index {
        Some(i) => i,
        None => ioctl::free_device().ok_or("no free /dev/nbdN (modprobe nbd)")?,
    };
    if opts.connections > 1 {
        return Err("the ioctl interface supports one connection only".into());
    }
    let (mut socks, info) = connect_all(opts)?;
    let block = opts.block_size.unwrap_or(info.preferred_block).clamp(512, 4096);
    let sock = socks.pop().expect("one connection");
    let attached = Attached { device: format!("/dev/nbd{index}"), index, size: info.size, connections: 1, interface: "ioctl" };
    ioctl::run(index, &sock, info.size, block, info.flags, opts.timeout, || ready(&attached))
}

/// Disconnects `/dev/nbdN` (the kernel sends NBD_CMD_DISC to the server).
pub fn detach(index: u32) -> Result<(), String> {
    let mut sock = Socket::open().map_err(|e| format!("netlink socket: {e}"))?;
    match nbd_family(&mut sock) {
        Ok((family, _)) => {
            let mut msg = Message::new(family, NBD_CMD_DISCONNECT, ack_flags());
            msg.u32(NBD_ATTR_INDEX, index);
            sock.request(&mut msg).map_err(|e| format!("NBD_CMD_DISCONNECT /dev/nbd{index}: {e}"))?;
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
pub fn list() -> Result<Vec<DeviceStatus>, String> {
    let mut sock = Socket::open().map_err(|e| format!("netlink socket: {e}"))?;
    let (family, _) = nbd_family(&mut sock)?;
    let mut msg = Message::new(family, NBD_CMD_STATUS, ack_flags());
    let reply = sock.request(&mut msg).map_err(|e| format!("NBD_CMD_STATUS: {e}"))?.ok_or("no status reply")?;
    let mut out = Vec::new();
    for a in attrs(&reply.payload).iter().filter(|a| a.kind == NBD_ATTR_DEVICE_LIST) {
        for item in attrs(a.data) {
            let fields = attrs(item.data);
            let Some(index) = fields.iter().find(|f| f.kind == NBD_DEVICE_INDEX).and_then(Attr::u32) else { continue };
            let connected = fields.iter().find(|f| f.kind == NBD_DEVICE_CONNECTED).and_then(Attr::u8).unwrap_or(0) != 0;
            out.push(DeviceStatus {
                device: format!("/dev/nbd{index}"),
                index,
                connected,
                backend: sysfs(index, "backend"),
                size: sysfs(index, "size").and_then(|s| s.parse::<u64>().ok()).map(|sectors| sectors * 512),
            });
        }
    }
    out.sort_by_key(|d| d.index);
    Ok(out)
}

/// Finds the device attached to `volume` (by backend identifier).
pub fn find_by_volume(volume: &str) -> Result<u32, String> {
    let prefix = format!("nbdvirt:{volume}@");
    list()?
        .into_iter()
        .find(|d| d.connected && d.backend.as_deref().is_some_and(|b| b.starts_with(&prefix)))
        .map(|d| d.index)
        .ok_or_else(|| format!("no device is attached to volume '{volume}'"))
}

/// Keeps `/dev/nbdN` connected: on link-dead, reconnects (retrying every
/// second) and hands the kernel new sockets. Returns when the device is
/// detached, or when `stop()` says so.
pub fn watch(opts: &AttachOptions, index: u32, stop: impl Fn() -> bool) -> Result<(), String> {
    let mut sock = Socket::open().map_err(|e| format!("netlink socket: {e}"))?;
    let (family, group) = nbd_family(&mut sock)?;
    let group = group.ok_or("the nbd netlink family has no multicast group (kernel too old for reconnects)")?;
    sock.join_group(group).map_err(|e| format!("joining nbd_mc_group: {e}"))?;
    let ident = backend_identifier(&opts.volume, &opts.endpoint);
    let mut dead_since: Option<Instant> = None;
    tracing::info!(device = index, "watching for dead connections");
    loop {
        if stop() {
            return Ok(());
        }
        let mut pfd = libc::pollfd { fd: sock.raw(), events: libc::POLLIN, revents: 0 };
        // SAFETY: poll on one valid fd.
        let ready = unsafe { libc::poll(&mut pfd, 1, 1000) } > 0;
        if ready {
            if let Ok(Some(m)) = sock.recv(0) {
                if m.cmd == NBD_CMD_LINK_DEAD && attrs(&m.payload).iter().any(|a| a.kind == NBD_ATTR_INDEX && a.u32() == Some(index)) {
                    tracing::warn!(device = index, "kernel reports a dead connection; reconnecting");
                    dead_since.get_or_insert_with(Instant::now);
                }
            }
        } else if dead_since.is_none() {
            // Detached by someone else? Then there is nothing to keep alive.
            if sysfs(index, "pid").is_none() && list().map(|l| l.iter().all(|d| d.index != index || !d.connected)).unwrap_or(false) {
                tracing::info!(device = index, "device was detached; stopping");
                return Ok(());
            }
        }
        if let Some(since) = dead_since {
            if sysfs(index, "backend").is_some_and(|b| b != ident) {
                return Err(format!("/dev/nbd{index} now belongs to another backend; not reconnecting"));
            }
            match connect_all(opts) {
                Ok((socks, info)) => {
                    let mut msg = Message::new(family, NBD_CMD_RECONFIGURE, ack_flags());
                    // A device attached with a backend identifier can only be
                    // reconfigured by naming the same one: the kernel answers
                    // EINVAL ("must specify backend") otherwise.
                    msg.u32(NBD_ATTR_INDEX, index).string(NBD_ATTR_BACKEND_IDENTIFIER, &ident);
                    add_sockets(&mut msg, &socks);
                    match sock.request(&mut msg) {
                        Ok(_) => {
                            tracing::info!(device = index, size = info.size, after = ?since.elapsed(), "reconnected");
                            dead_since = None;
                        }
                        Err(e) => {
                            // Back off: each retry opens new server connections.
                            let wait = since.elapsed().as_secs().clamp(1, 5);
                            tracing::warn!(device = index, error = %e, retry_in_s = wait, "NBD_CMD_RECONFIGURE failed; retrying");
                            std::thread::sleep(Duration::from_secs(wait));
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(device = index, error = %e, "server not reachable yet");
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        }
    }
}
