//! Booting qemu and reading the result: the console is streamed, the
//! exit marker with the boot's nonce is found, and the result is judged.

use super::*;

/// Runs qemu, collecting the console, until it exits or `timeout` passes.
pub(crate) fn boot(cmd: &mut Command, timeout: Duration, nonce: &str, verbose: bool) -> GuestResult {
    let t0 = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let console = Arc::new(Mutex::new(Vec::<u8>::new()));
    let mut out = child.stdout.take().unwrap();
    let sink = console.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            match out.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if verbose {
                        let _ = std::io::stderr().write_all(&buf[..n]);
                    }
                    sink.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            }
        }
    });
    let mut err = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let exit_marker = format!("@@NBDVIRT-GUEST-EXIT {nonce} ");
    let deadline = t0 + timeout;
    let mut marker_seen: Option<Instant> = None;
    let mut timed_out = false;
    loop {
        if child.try_wait().ok().flatten().is_some() {
            break;
        }
        let now = Instant::now();
        if marker_seen.is_none() && String::from_utf8_lossy(&console.lock().unwrap()).contains(&exit_marker) {
            marker_seen = Some(now);
        }
        // The script is done; poweroff should follow within seconds.
        let stuck_after_exit = marker_seen.is_some_and(|t| now.duration_since(t) > Duration::from_secs(20));
        if now > deadline || stuck_after_exit {
            timed_out = marker_seen.is_none();
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let elapsed = t0.elapsed();
    let _ = reader.join();
    let qemu_stderr = String::from_utf8_lossy(&err_reader.join().unwrap_or_default()).into_owned();
    let console = strip_ansi(&String::from_utf8_lossy(&console.lock().unwrap()).replace("\r\n", "\n").replace('\r', ""));
    let exit_code = console.find(&exit_marker).and_then(|i| {
        let rest = &console[i + exit_marker.len()..];
        rest.split("@@").next().and_then(|n| n.trim().parse().ok())
    });
    GuestResult { console, exit_code, timed_out, elapsed, qemu_stderr, nonce: nonce.to_string() }
}

/// Drops terminal escape sequences (SeaBIOS clears the screen).
pub(crate) fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\x1b' {
            out.push(c);
            continue;
        }
        if chars.next_if_eq(&'[').is_some() {
            // CSI: parameters, then one final byte in @..~
            for p in chars.by_ref() {
                if ('@'..='~').contains(&p) {
                    break;
                }
            }
        } else {
            chars.next();
        }
    }
    out
}

impl GuestResult {
    /// The console between the script's start and exit markers.
    pub fn output(&self) -> &str {
        let start = format!("@@NBDVIRT-GUEST-START {}@@", self.nonce);
        let end = format!("@@NBDVIRT-GUEST-EXIT {} ", self.nonce);
        let from = self.console.find(&start).map(|i| i + start.len()).unwrap_or(0);
        let to = self.console[from..].find(&end).map(|i| from + i).unwrap_or(self.console.len());
        &self.console[from..to]
    }

    pub(crate) fn describe(&self) -> String {
        let why = match (self.exit_code, self.timed_out) {
            (Some(c), _) => format!("the guest script exited with status {c}"),
            (None, true) => format!("the guest did not finish in time (killed after {:.0?})", self.elapsed),
            (None, false) => "the guest stopped without reporting an exit status (kernel panic? init failure?)".to_string(),
        };
        let stderr = if self.qemu_stderr.trim().is_empty() { String::new() } else { format!("\n--- qemu stderr ---\n{}", self.qemu_stderr) };
        format!("{why}\n--- guest console ---\n{}{stderr}\n--- end of guest console ---", self.console)
    }

    /// Panics, printing the whole console, unless the script exited 0.
    #[track_caller]
    pub fn assert_success(&self) -> &Self {
        if self.exit_code != Some(0) {
            panic!("{}", self.describe());
        }
        self
    }

    /// Panics, printing the console, unless the script's output has `needle`.
    #[track_caller]
    pub fn assert_output_contains(&self, needle: &str) -> &Self {
        if !self.output().contains(needle) {
            panic!("the guest output lacks {needle:?}\n{}", self.describe());
        }
        self
    }
}
