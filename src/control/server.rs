//! Serves control requests on a Unix socket created with mode 0600.

use super::protocol::{Request, Response};
use crate::daemon::{Daemon, MigrateRequest};
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
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        // Owner-only from the first moment: bind under a tight umask.
        // SAFETY: umask only changes this process's file-creation mask.
        let old = unsafe { libc::umask(0o177) };
        let bound = UnixListener::bind(path);
        unsafe { libc::umask(old) };
        let listener = bound?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
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
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(50)),
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
            Err(e) => Response::err(format!("bad request: {e}")),
        };
        let mut out = serde_json::to_vec(&response).unwrap_or_else(|_| b"{\"ok\":false,\"error\":\"encoding\"}".to_vec());
        out.push(b'\n');
        if writer.write_all(&out).is_err() {
            return;
        }
    }
}

pub fn handle(daemon: &Arc<Daemon>, request: Request) -> Response {
    match request {
        Request::Status => Response::ok(daemon.status()),
        Request::Reload { force } => match daemon.reload(force) {
            Ok(report) => Response::ok(report),
            Err(e) => Response::err(e),
        },
        Request::Pause { volume, range, timeout_ms } => {
            let range = range.map(|r| Range::new(r.start, r.length));
            let timeout = timeout_ms.map_or(crate::defaults::MANUAL_PAUSE, Duration::from_millis);
            match daemon.pause(&volume, range, timeout) {
                Ok(msg) => Response::ok(msg),
                Err(e) => Response::err(e),
            }
        }
        Request::Resume { volume } => match daemon.resume(&volume) {
            Ok(msg) => Response::ok(msg),
            Err(e) => Response::err(e),
        },
        Request::History { volume } => match daemon.history(&volume) {
            Ok(h) => Response::ok(h),
            Err(e) => Response::err(e),
        },
        Request::MigrateStart { volume, to, to_offset, range, rate, chunk, discard_source } => {
            let req = MigrateRequest { volume, to, to_offset, range: range.map(|r| Range::new(r.start, r.length)), rate, chunk, discard_source };
            match daemon.migrate_start(req) {
                Ok(s) => Response::ok(serde_json::json!({ "migrations": [s] })),
                Err(e) => Response::err(e),
            }
        }
        Request::MigrateStatus { volume } => match daemon.migrate_status(volume.as_deref()) {
            Ok(list) => Response::ok(serde_json::json!({ "migrations": list })),
            Err(e) => Response::err(e),
        },
        Request::MigrateAbort { volume } => match daemon.migrate_abort(&volume) {
            Ok(s) => Response::ok(serde_json::json!({ "migrations": [s] })),
            Err(e) => Response::err(e),
        },
    }
}
