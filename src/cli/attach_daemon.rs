//! The relay process of `nbdvirt attach --tls-…` without `--persist`.
//!
//! A TLS-attached device works only while its relays run, so a process
//! must stay behind; like nbd-client, the command itself returns once the
//! device is attached, so that `dev=$(nbdvirt attach …)` works as without
//! TLS. The fork comes first, before any connection or thread exists: the
//! child attaches, and tells the parent over a pipe what to print (or the
//! error, which the parent reports with its exit code), then lets go of
//! the terminal and relays until the device is detached. Its later
//! failures go to the kernel log (dmesg), beside the nbd driver's own
//! messages about the same device.

use super::{other, CliResult};
use nbdvirt::api::{ApiError, ErrorKind};
use nix::unistd::{fork, ForkResult};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};

/// The child's one message to the parent.
#[derive(serde::Serialize, serde::Deserialize)]
enum Word {
    /// Attached: what the command prints.
    Ready(String),
    Failed(ApiError),
}

/// Runs `work` in a child process and returns once it has called
/// `ready(text)` (`text` is printed here) or has failed (its error is
/// returned here). The child never returns from this call.
pub fn run(work: impl FnOnce(&mut dyn FnMut(&str)) -> CliResult) -> CliResult {
    // fork(2) copies only the calling thread: one that held a lock (the
    // allocator's, say) in another thread would leave it held forever.
    match thread_count() {
        Some(1) => {}
        n => return Err(other(format!("cannot start the relay process: fork needs a single-threaded process ({n:?} threads)"))),
    }
    let (read, write) = nix::unistd::pipe().map_err(|e| ApiError::new(ErrorKind::Io, format!("pipe: {e}")))?;
    // SAFETY: the process has one thread (checked above), so the child
    // inherits no lock held by another thread.
    match unsafe { fork() } {
        Err(e) => Err(ApiError::new(ErrorKind::Io, format!("fork: {e}"))),
        Ok(ForkResult::Parent { child }) => {
            drop(write);
            parent(read, child)
        }
        Ok(ForkResult::Child) => {
            drop(read);
            child(write, work)
        }
    }
}

fn thread_count() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|l| l.strip_prefix("Threads:")).and_then(|n| n.trim().parse().ok())
}

fn parent(read: OwnedFd, child: nix::unistd::Pid) -> CliResult {
    let mut text = String::new();
    // Ends when the child closes its end: after its word, or by exiting.
    let _ = File::from(read).read_to_string(&mut text);
    match serde_json::from_str::<Word>(text.trim()) {
        Ok(Word::Ready(out)) => {
            print!("{out}");
            let _ = std::io::stdout().flush();
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
            Ok(())
        }
        Ok(Word::Failed(e)) => {
            let _ = nix::sys::wait::waitpid(child, None);
            Err(e)
        }
        Err(_) => {
            let status = nix::sys::wait::waitpid(child, None);
            Err(other(format!("the relay process ended without attaching ({status:?})")))
        }
    }
}

fn child(write: OwnedFd, work: impl FnOnce(&mut dyn FnMut(&str)) -> CliResult) -> ! {
    // Its own session: the terminal's Ctrl-C and hang-up are not for it.
    let _ = nix::unistd::setsid();
    let mut pipe = Some(File::from(write));
    let mut ready = |out: &str| {
        if let Some(mut p) = pipe.take() {
            let _ = p.write_all(serde_json::to_string(&Word::Ready(out.to_string())).unwrap_or_default().as_bytes());
        }
        let_go_of_stdio();
    };
    let result = work(&mut ready);
    let code = result.as_ref().err().map_or(0, |e| e.kind.exit_code() as i32);
    match (pipe, result) {
        (Some(mut p), result) => {
            let e = result.err().unwrap_or_else(|| other("the relay process ended before the device was attached"));
            let _ = p.write_all(serde_json::to_string(&Word::Failed(e)).unwrap_or_default().as_bytes());
        }
        (None, Err(e)) => kernel_log(&e.message),
        (None, Ok(())) => {}
    }
    std::process::exit(code)
}

/// stdin and stdout to /dev/null (so that `$(nbdvirt attach …)` ends),
/// stderr too (its reader may be a pipe that waits for the end), and the
/// working directory to `/` (not to keep a file system busy).
fn let_go_of_stdio() {
    if let Ok(null) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null") {
        for fd in 0..=2 {
            let _ = nix::unistd::dup2(null.as_raw_fd(), fd);
        }
    }
    let _ = std::env::set_current_dir("/");
}

/// One warning line in the kernel log, as `nbdvirt-attach[PID]: MESSAGE`;
/// nowhere if /dev/kmsg cannot be written.
pub fn kernel_log(message: &str) {
    if let Ok(mut kmsg) = std::fs::OpenOptions::new().write(true).open("/dev/kmsg") {
        // One write, one record; <4> is KERN_WARNING. A record is at most
        // 1 KiB.
        let mut line = format!("<4>nbdvirt-attach[{}]: {message}", std::process::id());
        let mut cut = line.len().min(1000);
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        line.truncate(cut);
        line.push('\n');
        let _ = kmsg.write_all(line.as_bytes());
    }
}
