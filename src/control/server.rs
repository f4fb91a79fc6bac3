//! Serves control requests on a Unix socket created with mode 0600.

use crate::api::{ApiError, ErrorKind, MigrationList, MirrorList, Request, Response};
use crate::daemon::{Daemon, DaemonError, MigrateRequest, MirrorAddRequest};
use crate::map::Range;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
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

impl ControlServer {
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
        let listener = bind_private(path)?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new().name("nbdvirt-control".into()).spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let daemon = daemon.clone();
                        let _ = std::thread::Builder::new().name("nbdvirt-control-client".into()).spawn(move || serve_client(stream, &daemon));
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

/// Binds `path` so that nobody but the owner can ever connect: the socket
/// is created inside a fresh mode-0700 directory beside `path`, made 0600,
/// then renamed into place. (A process-wide umask around bind would race
/// other threads creating files.)
fn bind_private(path: &Path) -> std::io::Result<UnixListener> {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    let name = path.file_name().ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "control socket path has no file name"))?;
    let private = parent.join(format!(".{}.{}.bind", name.to_string_lossy(), std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    nix::unistd::mkdir(&private, nix::sys::stat::Mode::S_IRWXU)?;
    let bound = (|| {
        let inside = private.join(name);
        let listener = UnixListener::bind(&inside)?;
        std::fs::set_permissions(&inside, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&inside, path)?;
        Ok(listener)
    })();
    let _ = std::fs::remove_dir_all(&private);
    bound
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

fn serve_client(stream: UnixStream, daemon: &Arc<Daemon>) {
    let _ = stream.set_nonblocking(false);
    let Ok(mut writer) = stream.try_clone() else { return };
    let mut reader = BufReader::new(std::io::Read::take(stream, u64::MAX));
    loop {
        let mut line = String::new();
        reader.get_mut().set_limit(MAX_LINE);
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line.trim().is_empty() {
            continue;
        }
        let response = match serde_json::from_str::<Request>(&line) {
            Ok(request) => handle(daemon, request),
            Err(e) => Response::err(ApiError::new(ErrorKind::Invalid, format!("bad request: {e}"))),
        };
        let mut out = serde_json::to_vec(&response).unwrap_or_else(|_| b"{\"ok\":false,\"error\":\"encoding\",\"kind\":\"internal\"}".to_vec());
        out.push(b'\n');
        if writer.write_all(&out).is_err() {
            return;
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt;

    #[test]
    fn the_socket_is_owner_only_and_no_bind_directory_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/control.sock");
        let _listener = bind_private(&path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let left: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, vec![std::ffi::OsString::from("control.sock")]);
        UnixStream::connect(&path).expect("connectable after the rename");
    }
}
