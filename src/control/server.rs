//! Serves control requests on a Unix socket that only root, the server's
//! own user and `control_group` can reach (`bind`), checks who connected
//! (`access`), and logs every mutating command with who sent it.

use super::access::{peer_of, AccessPolicy, Denied, Peer};
use super::bind::{bind_socket, blocking_dirs};
use crate::api::{ApiError, ErrorKind, MigrationList, MirrorList, Request, Response};
use crate::daemon::{Daemon, DaemonError, MigrateRequest, MirrorAddRequest};
use crate::map::Range;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Longest request line accepted.
const MAX_LINE: u64 = 64 * 1024;

/// How long a refused peer may take to send the request it is refused.
const REFUSED_READ_TIMEOUT: Duration = Duration::from_secs(5);

impl ControlServer {
    /// Binds the socket for the daemon's `control_group` as it is now; a
    /// reload that changes the group reports that a restart is needed
    /// (the socket's group and mode, and who is let in, stay as bound).
    pub fn start(path: &Path, daemon: Arc<Daemon>) -> std::io::Result<ControlServer> {
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!("control socket {} is in use by a running server", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        let policy = Arc::new(AccessPolicy::new(daemon.control_group()));
        let listener = bind_socket(path, policy.group())?;
        if let Some(group) = policy.group() {
            for dir in blocking_dirs(path, group) {
                tracing::warn!(
                    "control: members of control_group {group} cannot search {dir}, so they cannot reach {} unless an ACL lets them: give the group search permission there (chgrp + chmod g+x, or chmod o+x) or put `control` under a directory they can reach",
                    path.display()
                );
            }
        }
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new().name("nbdvirt-control".into()).spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (daemon, policy) = (daemon.clone(), policy.clone());
                        let _ = std::thread::Builder::new().name("nbdvirt-control-client".into()).spawn(move || serve_client(stream, &daemon, &policy));
                    }
                    // Wait for a client (or the stop tick) in poll(2), not
                    // in a sleep: a command is answered at once instead of
                    // up to 50 ms later.
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => wait_readable(&listener, 200),
                    Err(e) => {
                        tracing::warn!(error = %e, "control accept failed");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        })?;
        Ok(ControlServer { path: path.to_path_buf(), stop, thread: Some(thread) })
    }
}

/// Waits until `listener` has a connection to accept, at most `ms`.
fn wait_readable(listener: &std::os::unix::net::UnixListener, ms: u16) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
    let _ = poll(&mut fds, PollTimeout::from(ms));
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve_client(stream: UnixStream, daemon: &Arc<Daemon>, policy: &AccessPolicy) {
    let _ = stream.set_nonblocking(false);
    let peer = match peer_of(&stream) {
        Ok(peer) => peer,
        Err(e) => {
            // Cannot happen on a connected Unix socket; nobody unknown is served.
            tracing::warn!("control: cannot read a connection's credentials ({e}); closing it");
            return;
        }
    };
    if let Err(denied) = policy.check(&peer) {
        return refuse(stream, &peer, policy, &denied);
    }
    let Ok(mut writer) = stream.try_clone() else { return };
    let mut reader = BufReader::new(Read::take(stream, u64::MAX));
    loop {
        let Some(line) = read_line(&mut reader) else { return };
        if line.trim().is_empty() {
            continue;
        }
        let response = match serde_json::from_str::<Request>(&line) {
            Ok(request) => audited(daemon, &peer, request),
            Err(e) => Response::err(ApiError::new(ErrorKind::Invalid, format!("bad request: {e}"))),
        };
        if !send(&mut writer, &response) {
            return;
        }
    }
}

/// The next request line (at most `MAX_LINE` bytes); `None` at the end.
fn read_line(reader: &mut BufReader<std::io::Take<UnixStream>>) -> Option<String> {
    let mut line = String::new();
    reader.get_mut().set_limit(MAX_LINE);
    match reader.read_line(&mut line) {
        Ok(0) | Err(_) => None,
        Ok(_) => Some(line),
    }
}

/// Writes one answer line; false if the client is gone.
fn send(writer: &mut UnixStream, response: &Response) -> bool {
    let mut out = serde_json::to_vec(response).unwrap_or_else(|_| b"{\"ok\":false,\"error\":\"encoding\",\"kind\":\"internal\"}".to_vec());
    out.push(b'\n');
    writer.write_all(&out).is_ok()
}

/// Reads the refused peer's first request (so that its client is not cut
/// off while writing it, and gets an answer), answers `permission_denied`,
/// logs the refusal and closes.
fn refuse(stream: UnixStream, peer: &Peer, policy: &AccessPolicy, denied: &Denied) {
    let _ = stream.set_read_timeout(Some(REFUSED_READ_TIMEOUT));
    let Ok(mut writer) = stream.try_clone() else { return };
    let line = read_line(&mut BufReader::new(Read::take(stream, MAX_LINE)));
    // Only a known command is named: the log gets no text the peer chose.
    let command = match line.as_deref().map(serde_json::from_str::<Request>) {
        Some(Ok(request)) => describe(&request).0,
        Some(Err(_)) => "a request".into(),
        None => "a connection".into(),
    };
    tracing::warn!("control: refused {command} from {peer}: {}", denied.reason);
    if line.is_some() {
        send(&mut writer, &Response::err(ApiError::new(ErrorKind::PermissionDenied, policy.refusal(peer))));
    }
}

/// Runs a request. A mutating one is logged before it runs, with who sent
/// it (and again if it fails), so that the log says who changed what.
fn audited(daemon: &Arc<Daemon>, peer: &Peer, request: Request) -> Response {
    if !request.mutates() {
        return handle(daemon, request);
    }
    let (command, json) = describe(&request);
    tracing::info!(request = %json, "control: {command} by {peer}");
    let response = handle(daemon, request);
    if let (false, Some(kind)) = (response.ok, response.kind) {
        tracing::info!(error = ?response.error.as_deref().unwrap_or(""), "control: {command} by {peer} failed ({kind})");
    }
    response
}

/// A request's wire name (`volume_create`) and its JSON, for the log: both
/// re-encoded from the parsed request, so quotes and newlines in names
/// arrive escaped.
fn describe(request: &Request) -> (String, String) {
    match serde_json::to_value(request) {
        Ok(v) => (v["command"].as_str().unwrap_or("?").to_string(), v.to_string()),
        Err(_) => ("?".into(), String::new()),
    }
}

/// The response to a daemon operation's outcome.
fn answer<T: serde::Serialize>(result: Result<T, DaemonError>) -> Response {
    match result {
        Ok(v) => Response::ok(v),
        Err(e) => Response::err(e.into()),
    }
}

pub fn handle(daemon: &Arc<Daemon>, request: Request) -> Response {
    let jobs = |migrations| MigrationList { migrations };
    match request {
        Request::Status => Response::ok(daemon.status()),
        Request::ClusterStatus => answer(daemon.cluster_status()),
        Request::ClusterApply { config, force } => answer(daemon.cluster_apply(&config, force)),
        Request::ClusterForget { node } => answer(daemon.cluster_forget(&node)),
        Request::Reload { force } => answer(daemon.reload(force)),
        Request::Pause { volume, range, timeout_ms } => {
            let range = range.map(|r| Range::new(r.start, r.length));
            let timeout = timeout_ms.map_or(crate::defaults::MANUAL_PAUSE, Duration::from_millis);
            answer(daemon.pause(&volume, range, timeout))
        }
        Request::Resume { volume } => answer(daemon.resume(&volume)),
        Request::History { volume } => answer(daemon.history(&volume)),
        Request::MigrateStart { volume, to, to_offset, range, rate, chunk, discard_source } => {
            let req = MigrateRequest { volume, to, to_offset, range: range.map(|r| Range::new(r.start, r.length)), rate, chunk, discard_source };
            answer(daemon.migrate_start(req).map(|s| jobs(vec![s])))
        }
        Request::MigrateStatus { volume } => answer(daemon.migrate_status(volume.as_deref()).map(jobs)),
        Request::MigrateAbort { volume } => answer(daemon.migrate_abort(&volume).map(|s| jobs(vec![s]))),
        Request::MirrorAdd { volume, to, to_offset, range, rate } => {
            let req = MirrorAddRequest { volume, to, to_offset, range: range.map(|r| Range::new(r.start, r.length)), rate };
            answer(daemon.mirror_add(req).map(|m| MirrorList { mirrors: vec![m] }))
        }
        Request::MirrorRemove { volume, leg, force } => answer(daemon.mirror_remove(&volume, &leg, force).map(|m| MirrorList { mirrors: vec![m] })),
        Request::MirrorReadd { volume, leg, rate } => answer(daemon.mirror_readd(&volume, &leg, rate).map(|m| MirrorList { mirrors: vec![m] })),
        Request::MirrorStatus { volume } => answer(daemon.mirror_status(volume.as_deref()).map(|mirrors| MirrorList { mirrors })),
        Request::Split { volume, leg, as_volume, read_only } => answer(daemon.split(&volume, &leg, &as_volume, read_only)),
        Request::Merge { volume, into, keep, force, rate } => answer(daemon.merge(&volume, &into, keep, force, rate)),
        Request::Fault { backend, error, scope } => answer(daemon.fault(&backend, error, scope)),
        Request::VolumeCreate(req) => answer(daemon.volume_create(&req)),
        Request::VolumeResize { volume, size, force } => answer(daemon.volume_resize(&volume, size, force)),
        Request::VolumeDelete { volume, force } => answer(daemon.volume_delete(&volume, force)),
        Request::PoolStatus { pool } => answer(daemon.pool_status(pool.as_deref())),
        Request::PoolCheck { pool } => answer(daemon.pool_check(pool.as_deref())),
        Request::PoolUsage { since } => answer(daemon.pool_usage(since)),
    }
}
