//! A pacing rate limiter for the copier.

use std::time::{Duration, Instant};

pub struct RateLimiter {
    bytes_per_sec: u64,
    /// When the bytes granted so far are paid for.
    next: Instant,
}

impl RateLimiter {
    /// `0` means unlimited.
    pub fn new(bytes_per_sec: u64) -> RateLimiter {
        RateLimiter { bytes_per_sec, next: Instant::now() }
    }

    /// Sleeps as needed so that, on average, no more than the rate passes.
    pub fn wait(&mut self, bytes: u64) {
        if self.bytes_per_sec == 0 {
            return;
        }
        let now = Instant::now();
        // No credit for idle time beyond 100 ms: bursts stay small.
        if self.next + Duration::from_millis(100) < now {
            self.next = now - Duration::from_millis(100);
        }
        if self.next > now {
            std::thread::sleep(self.next - now);
        }
        self.next += Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec as f64);
    }
}
