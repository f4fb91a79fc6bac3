//! A real etcd (Debian's `etcd-server`) for cluster tests: one member on
//! free loopback ports with its data in a temporary directory (on tmpfs
//! when there is one), stopped on drop. Never a system service.

use super::{free_port, require};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `[cluster]` section for node `node` of cluster "t" on `etcd`, on a
/// free peer port; a failsafe window of 2 s (a silent node delays a
/// change by its lease plus this).
pub fn cluster_section(etcd: &str, node: &str, ttl_secs: u32) -> String {
    format!("[cluster]\netcd = [\"{etcd}\"]\nname = \"t\"\nnode = \"{node}\"\npeer = \"tcp:127.0.0.1:{}\"\nlease_ttl = \"{ttl_secs}s\"\nfailsafe = \"2s\"\n", super::free_port())
}

/// Backends `a` and `b`: two names of one file, `size` bytes.
pub fn twin_backends(file: &Path, size: u64) -> String {
    let f = file.display();
    format!("[[backend]]\nname = \"a\"\npath = \"{f}\"\nsize = {size}\nshared = true\n\n[[backend]]\nname = \"b\"\npath = \"{f}\"\nsize = {size}\nshared = true\n")
}

pub struct TestEtcd {
    child: Option<Child>,
    _dir: tempfile::TempDir,
    log: PathBuf,
    port: u16,
    /// `http://127.0.0.1:PORT`
    pub url: String,
}

impl TestEtcd {
    pub fn start() -> TestEtcd {
        require("etcd", "etcd-server");
        let dir = if std::path::Path::new("/dev/shm").is_dir() { tempfile::tempdir_in("/dev/shm") } else { tempfile::tempdir() }.expect("tempdir");
        let (port, peer) = (free_port(), free_port());
        let url = format!("http://127.0.0.1:{port}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = dir.path().join("etcd.log");
        let child = Command::new("etcd")
            .args(["--name", "test", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
            .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("test={peer_url}"), "--log-level", "warn"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start etcd");
        let mut etcd = TestEtcd { child: Some(child), _dir: dir, log, port, url };
        etcd.wait_healthy(Duration::from_secs(30));
        etcd
    }

    fn healthy(&self) -> bool {
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else { return false };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        if s.write_all(b"GET /health HTTP/1.0\r\n\r\n").is_err() {
            return false;
        }
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        answer.contains("\"health\":\"true\"")
    }

    fn wait_healthy(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.healthy() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("etcd exited during start-up ({status}):\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "etcd not healthy within {limit:?}:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, signal: i32) {
        let pid = self.child.as_ref().expect("etcd running").id() as i32;
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0, "kill etcd");
    }

    /// SIGSTOP: etcd stops answering, its connections stay open.
    pub fn freeze(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGCONT, then waits until it answers again.
    pub fn thaw(&mut self) {
        self.signal(libc::SIGCONT);
        self.wait_healthy(Duration::from_secs(30));
    }
}

impl Drop for TestEtcd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
