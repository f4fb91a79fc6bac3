//! Pacing of background copies (migration, resync): a rate limiter, and
//! the low CPU/IO priority of copier threads.
//!
//! The rate limiter:
//! Paying and waiting are separate so the copier can sleep *between*
//! chunks: a sleep while a chunk is marked copying would hold up every
//! foreground write to that chunk (and with it the connection that sent it)
//! for the length of the sleep.

use std::time::{Duration, Instant};

pub struct RateLimiter {
    bytes_per_sec: u64,
    /// When the bytes paid for so far are due.
    next: Instant,
}

/// Credit kept for idle time: bursts after a pause stay small.
const MAX_CREDIT: Duration = Duration::from_millis(100);

impl RateLimiter {
    /// `0` means unlimited.
    pub fn new(bytes_per_sec: u64) -> RateLimiter {
        RateLimiter { bytes_per_sec, next: Instant::now() }
    }

    /// Records `bytes` as transferred.
    pub fn pay(&mut self, bytes: u64) {
        if self.bytes_per_sec == 0 {
            return;
        }
        let now = Instant::now();
        if self.next + MAX_CREDIT < now {
            self.next = now - MAX_CREDIT;
        }
        self.next += Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec as f64);
    }

    /// Sleeps until what was paid is due, so that on average no more than
    /// the rate passes.
    pub fn wait_due(&self) {
        let now = Instant::now();
        if self.bytes_per_sec != 0 && self.next > now {
            std::thread::sleep(self.next - now);
        }
    }
}

/// Foreground I/O keeps priority: a copier thread runs at nice 10 and
/// in the lowest best-effort I/O priority. Best effort: failures (e.g. no
/// permission) leave the thread at normal priority.
pub fn lower_priority() {
    let tid = nix::unistd::gettid().as_raw();
    // nix (0.29) wraps neither setpriority nor ioprio_set.
    // SAFETY: setpriority takes plain integers and only affects the thread
    // `tid`, which is the calling thread.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 10) };
    const IOPRIO_WHO_PROCESS: libc::c_int = 1;
    const IOPRIO_CLASS_BE: libc::c_int = 2;
    // SAFETY: ioprio_set takes three integers and only affects the calling
    // thread; no memory is passed.
    unsafe { libc::syscall(libc::SYS_ioprio_set, IOPRIO_WHO_PROCESS, tid, (IOPRIO_CLASS_BE << 13) | 7) };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Time to pass `n` MiB through a limiter of `rate` MiB/s, 1 MiB at a time.
    fn pace(rate: u64, n: u32) -> Duration {
        let mut l = RateLimiter::new(rate << 20);
        let start = Instant::now();
        for _ in 0..n {
            l.wait_due();
            l.pay(1 << 20);
        }
        l.wait_due();
        start.elapsed()
    }

    #[test]
    fn paces_to_the_rate() {
        // 3 MiB at 10 MiB/s = 300 ms, less up to 100 ms of idle credit.
        let took = pace(10, 3);
        assert!(took >= Duration::from_millis(190) && took < Duration::from_secs(5), "{took:?}");
        // 10 MiB at 100 MiB/s = 100 ms, which the credit may cover entirely.
        assert!(pace(100, 10) < Duration::from_secs(2));
    }

    #[test]
    fn unlimited_never_sleeps() {
        let mut l = RateLimiter::new(0);
        let start = Instant::now();
        for _ in 0..1000 {
            l.pay(1 << 30);
            l.wait_due();
        }
        assert!(start.elapsed() < Duration::from_secs(1));
    }
}
