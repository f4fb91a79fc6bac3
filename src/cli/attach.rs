//! `attach`, `detach`, `attached`: the kernel NBD client.

use super::discover::untyped;
use super::{invalid, CliResult, ServerAddress};
use clap::Subcommand;
use nbdvirt::api::{ApiError, ErrorKind};
use nbdvirt::attach::{self, AttachError, AttachOptions, HandshakeError};
use nbdvirt::endpoint::Endpoint;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Subcommand)]
pub enum AttachCommand {
    /// Attach a volume as /dev/nbdN through the kernel NBD client.
    Attach {
        volume: String,
        /// Device to use (default: the first free one, printed).
        device: Option<String>,
        /// Server endpoint, unix:PATH or tcp:HOST:PORT (default: the config's
        /// first listen endpoint, preferring a Unix socket).
        #[arg(long)]
        connect: Option<String>,
        /// Connections to open (needs CAN_MULTI_CONN, which nbdvirt offers).
        #[arg(long, default_value_t = 1)]
        connections: u32,
        /// Request timeout in seconds.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
        /// Seconds the kernel holds I/O on a dead connection waiting for a
        /// reconnect (server restart).
        #[arg(long, default_value_t = 60)]
        dead_conn_timeout: u64,
        /// Logical block size given to the kernel (default: the server's preferred, max 4096).
        #[arg(long)]
        block_size: Option<u32>,
        /// Stay in the foreground and reconnect after server restarts.
        #[arg(long)]
        persist: bool,
        /// Use the ioctl interface (one connection; stays in the foreground).
        #[arg(long)]
        ioctl: bool,
        #[command(flatten)]
        server: ServerAddress,
        #[arg(long)]
        json: bool,
    },
    /// Detach /dev/nbdN (or the device attached to VOLUME).
    Detach {
        /// /dev/nbdN or a volume name.
        device: String,
    },
    /// List NBD devices with their connection state and backend.
    Attached {
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: AttachCommand) -> CliResult {
    match cmd {
        AttachCommand::Attach { volume, device, connect, connections, timeout, dead_conn_timeout, block_size, persist, ioctl, server, json } => {
            let endpoint = match connect {
                Some(c) => c.parse().map_err(|e| invalid(format!("--connect: {e}")))?,
                None => default_endpoint(&server)?,
            };
            let index = device.as_deref().map(attach::device_index).transpose().map_err(attach_failed)?;
            let opts = AttachOptions { volume, index, endpoint, connections, timeout, dead_conn_timeout, block_size, force_ioctl: ioctl };
            attach_device(&opts, persist, json)
        }
        AttachCommand::Detach { device } => {
            let index = if device.starts_with("/dev/") { attach::device_index(&device) } else { attach::find_by_volume(&device) };
            index.and_then(|i| attach::detach(i).map(|()| println!("/dev/nbd{i} detached"))).map_err(attach_failed)
        }
        AttachCommand::Attached { json } => {
            let list = attach::list().map_err(attach_failed)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "devices": list })).unwrap_or_default());
            } else {
                super::render::attached(&list);
            }
            Ok(())
        }
    }
}

/// The config's first listen endpoint, preferring a Unix socket.
fn default_endpoint(server: &ServerAddress) -> Result<Endpoint, nbdvirt::api::ApiError> {
    let config = server.load_config()?;
    let listen = &config.server.listen;
    listen.iter().find(|e| matches!(e, Endpoint::Unix(_))).or(listen.first()).cloned().ok_or_else(|| invalid("the config has no listen endpoint"))
}

fn attach_device(opts: &AttachOptions, persist: bool, json: bool) -> CliResult {
    let report = |a: &attach::Attached| {
        if json {
            println!("{}", serde_json::to_string(a).unwrap_or_default());
        } else {
            println!("{}", a.device);
        }
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    };
    if opts.force_ioctl || !attach::netlink_available() {
        if !opts.force_ioctl {
            tracing::warn!("netlink 'nbd' family not available: falling back to the ioctl interface (stays in the foreground)");
        }
        return attach::attach_ioctl_blocking(opts, report).map_err(attach_failed);
    }
    let attached = attach::attach(opts).map_err(attach_failed)?;
    report(&attached);
    if persist {
        let stop = Arc::new(AtomicBool::new(false));
        for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
            signal_hook::flag::register(signal, stop.clone()).map_err(untyped)?;
        }
        attach::watch(opts, attached.index, || stop.load(Ordering::Relaxed)).map_err(attach_failed)?;
    }
    Ok(())
}

/// The error kind (and so the exit code) of a kernel-client failure.
fn attach_failed(e: AttachError) -> ApiError {
    let kind = match &e {
        AttachError::NotNbdDevice(_) | AttachError::IoctlOneConnection | AttachError::NoMultiConn(_) => ErrorKind::Invalid,
        AttachError::NotAttached(_) | AttachError::NoFreeDevice | AttachError::NoFamily(_) | AttachError::NoMulticastGroup => ErrorKind::NotFound,
        AttachError::Handshake { source: HandshakeError::UnknownExport(_), .. } => ErrorKind::NotFound,
        AttachError::Busy(_) | AttachError::ForeignBackend(_) => ErrorKind::Busy,
        AttachError::Connect { .. }
        | AttachError::Socket(_)
        | AttachError::Netlink { .. }
        | AttachError::OpenDevice { .. }
        | AttachError::Ioctl { .. }
        | AttachError::JoinGroup(_) => ErrorKind::Io,
        AttachError::Handshake { .. } | AttachError::NoDeviceIndex | AttachError::NoStatusReply => ErrorKind::Other,
    };
    ApiError::new(kind, e.to_string())
}
