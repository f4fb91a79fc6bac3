//! Shared harness for integration tests: start the real `nbdvirt` binary on
//! a config in a temporary directory, run real NBD clients against it, and
//! fail loudly (naming the Debian package) when a client is missing.
#![allow(dead_code)]

/// CLI, control socket and config edits (opt in: `use common::cli::*;`).
pub mod cli;
/// nbdsh clients (opt in: `use common::script::*;`).
pub mod script;
/// The raw NBD client of the protocol and hostile tests (opt in:
/// `use common::nbd_client::*;`).
pub mod nbd_client;
/// Test TLS credentials (opt in: `use common::pki::*;`).
pub mod pki;
/// A real etcd for cluster tests (opt in: `use common::etcd::*;`).
pub mod etcd;
/// fio write+verify runs (`common::fio::verify_run`).
pub mod fio;
/// A TCP relay that can be cut (one node's way to etcd).
pub mod proxy;
/// nbdkit servers (opt in: `use common::nbdkit::Nbdkit;`).
pub mod nbdkit;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_nbdvirt");

/// A loopback TCP port nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Fails the test unless `tool` is on PATH, naming the package to install.
pub fn require(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(found, "required tool `{tool}` is missing: install the Debian package `{package}` (scripts/test.sh does this when run as root)");
}

/// PATH with /usr/bin first, so that `nbdsh` (python3 -m nbd) finds Debian's python3.
pub fn debian_path() -> String {
    format!("/usr/bin:/bin:{}", std::env::var("PATH").unwrap_or_default())
}

/// Runs a command with a time limit; panics (with its output) on timeout.
pub fn run_timeout(cmd: &mut Command, limit: Duration) -> Output {
    try_run_timeout(cmd, limit).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs a command with a time limit, its output captured; Err (with what
/// it printed) if it cannot start or times out.
pub fn try_run_timeout(cmd: &mut Command, limit: Duration) -> Result<Output, String> {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    // Drain pipes on threads so a chatty child cannot block.
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let to = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let te = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| format!("waiting for {cmd:?}: {e}"))? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stdout = to.join().unwrap_or_default();
            let stderr = te.join().unwrap_or_default();
            return Err(format!(
                "{cmd:?} timed out after {limit:?}\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&stdout),
                String::from_utf8_lossy(&stderr)
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Ok(Output { status, stdout: to.join().unwrap_or_default(), stderr: te.join().unwrap_or_default() })
}

/// Runs a command and asserts success, returning stdout as text.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = run_timeout(cmd, Duration::from_secs(120));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({})\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A running server. Stopped with SIGKILL on drop unless stopped before.
pub struct TestServer {
    pub child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub socket: PathBuf,
    /// A command the server is started through (e.g. `setpriv --reuid=U`);
    /// empty: started directly.
    pub runner: Vec<String>,
    log: PathBuf,
}

impl TestServer {
    /// Starts `nbdvirt serve` on a config made of a `[server]` section
    /// listening on `DIR/nbd.sock` (plus `extra_listen`) followed by `body`.
    /// In `body`, `{dir}` is replaced by the temporary directory.
    pub fn start(body: &str) -> TestServer {
        Self::start_with(body, &[])
    }

    pub fn start_with(body: &str, extra_listen: &[&str]) -> TestServer {
        Self::start_full("", body, extra_listen)
    }

    /// `start` with `server_keys` (lines such as `max_inflight = "32MiB"`)
    /// added to the `[server]` section.
    pub fn start_with_server(server_keys: &str, body: &str) -> TestServer {
        Self::start_full(server_keys, body, &[])
    }

    fn start_full(server_keys: &str, body: &str, extra_listen: &[&str]) -> TestServer {
        let mut server = Self::prepare_full(server_keys, body, extra_listen);
        server.spawn();
        server
    }

    /// Like `start`, without starting the server: the test may change the
    /// directory or `runner` first, then call `spawn`.
    pub fn prepare(body: &str) -> TestServer {
        Self::prepare_full("", body, &[])
    }

    /// `prepare` with `server_keys` added to the `[server]` section.
    pub fn prepare_with_server(server_keys: &str, body: &str) -> TestServer {
        Self::prepare_full(server_keys, body, &[])
    }

    fn prepare_full(server_keys: &str, body: &str, extra_listen: &[&str]) -> TestServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().display().to_string();
        let mut listen = vec![format!("\"unix:{d}/nbd.sock\"")];
        listen.extend(extra_listen.iter().map(|l| format!("\"{l}\"")));
        let config_text = format!(
            "[server]\nlisten = [{}]\ncontrol = \"{d}/control.sock\"\nstate_dir = \"{d}/state\"\nshutdown_grace = \"1s\"\n{server_keys}\n\n{}",
            listen.join(", "),
            body.replace("{dir}", &d)
        );
        let config = dir.path().join("nbdvirt.toml");
        std::fs::write(&config, config_text).unwrap();
        TestServer { child: None, socket: dir.path().join("nbd.sock"), config, runner: Vec::new(), log: dir.path().join("server.log"), dir }
    }

    /// (Re)starts the server process on the same config and directory.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let mut cmd = match self.runner.split_first() {
            Some((runner, args)) => {
                let mut cmd = Command::new(runner);
                cmd.args(args).arg(BIN);
                cmd
            }
            None => Command::new(BIN),
        };
        let child = cmd
            .args(["serve", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "nbdvirt=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start nbdvirt");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        // Ready = NBD socket and control socket both accept.
        let control = self.dir.path().join("control.sock");
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() || std::os::unix::net::UnixStream::connect(&control).is_err() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("nbdvirt exited during start-up ({status}):\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "nbdvirt did not start listening within 20 s:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("server running").id() as i32
    }

    /// `nbd+unix:///EXPORT?socket=...`
    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits (bounded) for a clean exit; returns the status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("server running");
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("nbdvirt did not exit within 30 s of SIGTERM:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, no cleanup.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Asserts the server process is still running.
    pub fn assert_alive(&mut self) {
        if let Some(status) = self.child.as_mut().expect("server running").try_wait().unwrap() {
            panic!("nbdvirt died ({status}):\n{}", self.log());
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- nbdvirt log ({}) ---\n{}", self.log.display(), self.log());
        }
    }
}

/// Runs an nbdsh script (`h` is connected to `uri`); returns stdout.
pub fn nbdsh(uri: &str, script: &str) -> String {
    require("nbdsh", "python3-libnbd");
    run_ok(Command::new("nbdsh").env("PATH", debian_path()).args(["-u", uri, "-c", script]))
}

/// Reads a file region.
pub fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset).unwrap();
    buf
}

/// Writes a file region.
pub fn write_at(path: &Path, offset: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new().write(true).open(path).unwrap().write_all_at(data, offset).unwrap();
}

/// Deterministic pseudo-random bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
