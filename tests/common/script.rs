//! nbdsh scripts as clients of a running server: one-shot (`nbdsh_run`,
//! `nbdsh_try`) or long-running and driven line by line (`Script`). Opt in
//! with `use common::script::*;`.

use super::cli::text;
use super::{debian_path, require, run_timeout};
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// A running nbdsh script, with its stdout as lines and its stdin open, so
/// a test can trigger I/O at an exact point and see when it completes.
pub struct Script {
    what: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Script {
    pub fn start(what: &str, uri: &str, script: &str) -> Script {
        require("nbdsh", "python3-libnbd");
        let mut child = Command::new("nbdsh")
            .env("PATH", debian_path())
            .args(["-u", uri, "-c", script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start nbdsh");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut err = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        Script { what: what.into(), stdin: child.stdin.take(), child, lines, stderr: Some(stderr) }
    }

    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").and_then(|_| stdin.flush()).unwrap_or_else(|e| panic!("nbdsh ({}): stdin: {e}", self.what));
    }

    /// The next line within `limit`, `None` if there is none yet.
    pub fn line(&mut self, limit: Duration) -> Option<String> {
        match self.lines.recv_timeout(limit) {
            Ok(l) => Some(l),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => self.fail("ended before printing the expected line"),
        }
    }

    pub fn expect(&mut self, want: &str, limit: Duration) {
        match self.line(limit) {
            Some(l) if l == want => {}
            Some(l) => self.fail(&format!("printed {l:?}, expected {want:?}")),
            None => self.fail(&format!("did not print {want:?} within {limit:?}")),
        }
    }

    /// Asserts nothing was printed (yet).
    pub fn quiet(&mut self, why: &str) {
        if let Ok(l) = self.lines.try_recv() {
            self.fail(&format!("printed {l:?}, but {why}"));
        }
    }

    /// Waits for a clean exit.
    pub fn finish(mut self, limit: Duration) {
        self.stdin.take();
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                if !status.success() {
                    self.fail(&format!("exited with {status}"));
                }
                return;
            }
            if Instant::now() > deadline {
                self.fail(&format!("did not exit within {limit:?}"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn fail(&mut self, msg: &str) -> ! {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let stderr = self.stderr.take().and_then(|t| t.join().ok()).unwrap_or_default();
        panic!("nbdsh ({}): {msg}\nstderr:\n{stderr}", self.what)
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs an nbdsh script; returns whether it succeeded (and its output).
pub fn nbdsh_try(uri: &str, script: &str) -> Output {
    require("nbdsh", "python3-libnbd");
    let mut cmd = Command::new("nbdsh");
    cmd.env("PATH", debian_path()).args(["-u", uri, "-c", script]);
    run_timeout(&mut cmd, Duration::from_secs(60))
}

/// Runs a one-shot nbdsh script that must succeed.
pub fn nbdsh_run(uri: &str, script: &str) {
    let out = nbdsh_try(uri, script);
    assert!(out.status.success(), "nbdsh script failed: {}\nscript:\n{script}", text(&out));
}

/// Asserts the volume reads `data` at `offset`.
pub fn assert_volume_reads(uri: &str, data: &str, offset: u64) {
    nbdsh_run(uri, &format!("d = open('{data}', 'rb').read()\nassert h.pread(len(d), {offset}) == d, 'volume content differs'\n"));
}
