//! `attach`, `detach`, `attached`: the kernel NBD client.

use super::attach_daemon;
use super::discover::untyped;
use super::{invalid, CliResult, ServerAddress};
use clap::Subcommand;
use nbdvirt::api::{ApiError, ErrorKind};
use nbdvirt::attach::relay::RelayEnd;
use nbdvirt::attach::{self, AttachError, AttachOptions, AttachTls, HandshakeError, Relays};
use nbdvirt::endpoint::Endpoint;
use nbdvirt::tls::TlsClientFiles;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// TLS for the kernel's connections, with libnbd's option names. Either
/// credential flag makes TLS required: a server that refuses STARTTLS
/// fails the attach. The kernel cannot speak TLS: a relay in the attach
/// process carries each connection (README: TLS and the kernel client).
#[derive(clap::Args)]
pub struct TlsArgs {
    /// Require TLS, with X.509: DIR holds ca-cert.pem (the CA that signed
    /// the server's certificate) and, for servers that ask for one,
    /// client-cert.pem + client-key.pem.
    #[arg(long, value_name = "DIR", conflicts_with = "tls_psk")]
    tls_certificates: Option<PathBuf>,
    /// Require TLS, with a pre-shared key: FILE holds psktool's
    /// identity:hexkey lines.
    #[arg(long, value_name = "FILE")]
    tls_psk: Option<PathBuf>,
    /// The identity to use from --tls-psk (default: the file's first, sorted).
    #[arg(long, value_name = "IDENTITY", requires = "tls_psk")]
    tls_username: Option<String>,
    /// The name the server's certificate must carry (default: HOST of
    /// --connect tcp:HOST:PORT; none is checked over a Unix socket).
    #[arg(long, value_name = "NAME", requires = "tls_certificates")]
    tls_hostname: Option<String>,
}

impl TlsArgs {
    /// `None` without TLS. Paths are made absolute: the relay process
    /// leaves the working directory, and a reconnect reads them again.
    fn options(self) -> Result<Option<AttachTls>, ApiError> {
        let absolute = |p: PathBuf, flag: &str| std::path::absolute(&p).map_err(|e| invalid(format!("{flag} {}: {e}", p.display())));
        let files = TlsClientFiles {
            certificates: self.tls_certificates.map(|p| absolute(p, "--tls-certificates")).transpose()?,
            psk: self.tls_psk.map(|p| absolute(p, "--tls-psk")).transpose()?,
            username: self.tls_username,
        };
        if files.certificates.is_none() && files.psk.is_none() {
            return Ok(None);
        }
        // clap does not enforce `requires` when the flag required conflicts
        // with one given.
        if self.tls_hostname.is_some() && files.certificates.is_none() {
            return Err(invalid("--tls-hostname needs --tls-certificates (a PSK session has no certificate to check)"));
        }
        if files.username.is_some() && files.psk.is_none() {
            return Err(invalid("--tls-username needs --tls-psk (a certificate names its own holder)"));
        }
        Ok(Some(AttachTls { files, hostname: self.tls_hostname }))
    }
}

#[derive(Subcommand)]
pub enum AttachCommand {
    /// Attach a volume as /dev/nbdN through the kernel NBD client.
    Attach {
        volume: String,
        /// Device to use (default: the first free one, printed).
        device: Option<String>,
        /// Server endpoint, unix:PATH or tcp:HOST:PORT (default: the config's
        /// first listen endpoint, preferring a Unix socket). Several, comma
        /// separated (cluster nodes): the first that answers is used, and a
        /// reconnect (--persist) moves on to the next.
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
        tls: Box<TlsArgs>,
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
        AttachCommand::Attach { volume, device, connect, connections, timeout, dead_conn_timeout, block_size, persist, ioctl, tls, server, json } => {
            let endpoints = match connect {
                Some(c) => attach::parse_endpoints(&c).map_err(|e| invalid(format!("--connect: {e}")))?,
                None => vec![default_endpoint(&server)?],
            };
            let index = device.as_deref().map(attach::device_index).transpose().map_err(attach_failed)?;
            let tls = (*tls).options()?;
            let opts = AttachOptions { volume, index, endpoints, connections, timeout, dead_conn_timeout, block_size, force_ioctl: ioctl, tls };
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

/// What `attach` prints once the device is there.
fn rendered(a: &attach::Attached, json: bool) -> String {
    if json {
        serde_json::to_string(a).unwrap_or_default()
    } else {
        a.device.clone()
    }
}

fn attach_device(opts: &AttachOptions, persist: bool, json: bool) -> CliResult {
    let report = |a: &attach::Attached| {
        println!("{}", rendered(a, json));
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    };
    let ioctl = opts.force_ioctl || !attach::netlink_available();
    if opts.tls.is_some() && !persist && !ioctl {
        // The device needs the relays, so a process must stay behind: as
        // with nbd-client, the command returns once the device is there.
        return attach_daemon::run(|ready| {
            pin_memory();
            let stop = stop_on_signals()?;
            let (attached, mut relays) = attach::attach(opts).map_err(attach_failed)?;
            ready(&format!("{}\n", rendered(&attached, json)));
            hold(attached.index, &mut relays, &stop, |end| {
                if end.is_failure() {
                    attach_daemon::kernel_log(&format!("{}: {end}", attached.device));
                }
            })
        });
    }
    if opts.tls.is_some() {
        pin_memory();
    }
    if ioctl {
        if !opts.force_ioctl {
            tracing::warn!("netlink 'nbd' family not available: falling back to the ioctl interface (stays in the foreground)");
        }
        return attach::attach_ioctl_blocking(opts, report).map_err(attach_failed);
    }
    let (attached, mut relays) = attach::attach(opts).map_err(attach_failed)?;
    report(&attached);
    // Relays here only with --persist (without, they went to the
    // background above); either way this process must outlive them.
    if persist || !relays.is_empty() {
        let stop = stop_on_signals()?;
        if persist {
            attach::watch(opts, attached.index, &mut relays, || stop.load(Ordering::Relaxed)).map_err(attach_failed)?;
        }
        hold(attached.index, &mut relays, &stop, |_| {})?;
    }
    Ok(())
}

/// A flag that SIGTERM and SIGINT set.
fn stop_on_signals() -> Result<Arc<AtomicBool>, ApiError> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, stop.clone()).map_err(untyped)?;
    }
    Ok(stop)
}

/// Keeps the TLS relays of /dev/nbd`index` running until they have all
/// ended (the device was detached, or lost its server). On SIGTERM or
/// SIGINT the device is detached first: it cannot work without them.
fn hold(index: u32, relays: &mut Relays, stop: &AtomicBool, on_end: impl Fn(&RelayEnd)) -> CliResult {
    let mut detached = false;
    while !relays.is_empty() {
        if stop.load(Ordering::Relaxed) && !detached {
            tracing::info!(device = index, "signalled: detaching (the TLS relays end with this process)");
            attach::detach(index).map_err(attach_failed)?;
            detached = true;
        }
        relays.reap().iter().for_each(&on_end);
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Locks the relay process in memory (see `attach::memory`); what cannot
/// be done is a warning.
fn pin_memory() {
    let pinned = attach::memory::pin();
    if let Err(e) = pinned.locked {
        tracing::warn!("mlockall: {e}: the TLS relay may be paged out under memory pressure; do not put swap on this device");
    }
    if let Err(e) = pinned.io_flusher {
        tracing::warn!("prctl(PR_SET_IO_FLUSHER): {e}: the TLS relay's allocations may wait on writeback to this device");
    }
    if let Err(e) = pinned.oom_exempt {
        tracing::warn!("oom_score_adj: {e}: the OOM killer may pick the TLS relay, and the device would go with it");
    }
}

/// The error kind (and so the exit code) of a kernel-client failure.
fn attach_failed(e: AttachError) -> ApiError {
    let kind = match &e {
        AttachError::NotNbdDevice(_) | AttachError::IoctlOneConnection | AttachError::NoMultiConn(_) | AttachError::TlsCredentials(_) => ErrorKind::Invalid,
        AttachError::NotAttached(_) | AttachError::NoFreeDevice | AttachError::NoFamily(_) | AttachError::NoMulticastGroup => ErrorKind::NotFound,
        AttachError::Handshake { source: HandshakeError::UnknownExport(_), .. } => ErrorKind::NotFound,
        AttachError::Busy(_) | AttachError::ForeignBackend(_) => ErrorKind::Busy,
        AttachError::Connect { .. }
        | AttachError::NoServer(_)
        | AttachError::Socket(_)
        | AttachError::Netlink { .. }
        | AttachError::OpenDevice { .. }
        | AttachError::Ioctl { .. }
        | AttachError::JoinGroup(_)
        | AttachError::Relay(_) => ErrorKind::Io,
        AttachError::Handshake { .. } | AttachError::NoDeviceIndex | AttachError::NoStatusReply => ErrorKind::Other,
    };
    ApiError::new(kind, e.to_string())
}
