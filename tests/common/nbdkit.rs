//! nbdkit as a test server: in the foreground, on a Unix socket or a
//! loopback TCP port, killed on drop. A missing nbdkit fails the test,
//! naming the Debian package.

use super::{free_port, require};
use nbdvirt::endpoint::Endpoint;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// An nbdkit in the foreground, killed on drop.
pub struct Nbdkit {
    child: Option<Child>,
    pub endpoint: Endpoint,
    log: PathBuf,
}

impl Nbdkit {
    /// `nbdkit -f` on a Unix socket `name` in `dir` (or on a loopback TCP
    /// port when `name` is `None`) serving `plugin`; waits (bounded) until
    /// it accepts connections.
    pub fn start(dir: &Path, name: Option<&str>, plugin: &[&str]) -> Nbdkit {
        require("nbdkit", "nbdkit");
        let mut cmd = Command::new("nbdkit");
        cmd.args(["-f", "--exit-with-parent"]);
        let endpoint = match name {
            Some(name) => {
                let sock = dir.join(name);
                cmd.arg("-U").arg(&sock);
                Endpoint::Unix(sock)
            }
            None => {
                let port = free_port();
                cmd.args(["-i", "127.0.0.1", "-p", &port.to_string()]);
                Endpoint::Tcp(format!("127.0.0.1:{port}"))
            }
        };
        let log = dir.join(format!("nbdkit-{}.log", name.unwrap_or("tcp")));
        let child = cmd.args(plugin).stdout(Stdio::null()).stderr(std::fs::File::create(&log).unwrap()).spawn().expect("start nbdkit");
        let mut server = Nbdkit { child: Some(child), endpoint, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !server.accepts() {
            if let Some(status) = server.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("nbdkit exited during start-up ({status}):\n{}", server.log());
            }
            assert!(Instant::now() < deadline, "nbdkit did not listen within 20 s:\n{}", server.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    fn accepts(&self) -> bool {
        match &self.endpoint {
            Endpoint::Unix(p) => std::os::unix::net::UnixStream::connect(p).is_ok(),
            Endpoint::Tcp(a) => std::net::TcpStream::connect(a.as_str()).is_ok(),
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: the server is gone at once, its socket file left behind.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- {} ---\n{}", self.log.display(), self.log());
        }
    }
}
