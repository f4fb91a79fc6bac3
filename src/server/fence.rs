//! The serving fence: a deadline after which the server executes no
//! request and accepts no connection. A single node never closes it; in a
//! cluster it is the end of the node's membership lease minus a margin,
//! pushed forward by every renewal (`crate::cluster`). A request found
//! past the deadline closes its connection without running, so the client
//! resends it to another node: an error reply would reach the filesystem.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Open for ever (a single node).
const ALWAYS: u64 = u64::MAX;

/// The process's time origin for deadlines kept as nanoseconds in an atomic.
fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

#[derive(Debug)]
pub struct ServeFence {
    /// Nanoseconds after `origin()` up to which requests may run.
    until: AtomicU64,
}

impl ServeFence {
    /// A fence that never closes.
    pub fn always() -> ServeFence {
        ServeFence { until: AtomicU64::new(ALWAYS) }
    }

    /// A closed fence (a cluster node before it has joined).
    pub fn closed() -> ServeFence {
        origin();
        ServeFence { until: AtomicU64::new(0) }
    }

    /// Serve up to `deadline`.
    pub fn open_until(&self, deadline: Instant) {
        let nanos = deadline.saturating_duration_since(origin()).as_nanos().min(ALWAYS as u128 - 1) as u64;
        self.until.store(nanos, Ordering::Release);
    }

    pub fn close(&self) {
        self.until.store(0, Ordering::Release);
    }

    /// Whether a request may run now. A single node pays one relaxed load.
    pub fn is_open(&self) -> bool {
        match self.until.load(Ordering::Acquire) {
            ALWAYS => true,
            0 => false,
            until => origin().elapsed() < Duration::from_nanos(until),
        }
    }

    /// What is left before the deadline (`None`: closed; `Duration::MAX`:
    /// never closes).
    pub fn left(&self) -> Option<Duration> {
        match self.until.load(Ordering::Acquire) {
            ALWAYS => Some(Duration::MAX),
            0 => None,
            until => Duration::from_nanos(until).checked_sub(origin().elapsed()).filter(|d| !d.is_zero()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fence_opens_until_its_deadline_and_closes() {
        assert!(ServeFence::always().is_open());
        let f = ServeFence::closed();
        assert!(!f.is_open() && f.left().is_none());
        f.open_until(Instant::now() + Duration::from_secs(60));
        assert!(f.is_open() && f.left().unwrap() > Duration::from_secs(59));
        f.open_until(Instant::now() - Duration::from_millis(1));
        assert!(!f.is_open() && f.left().is_none());
        f.open_until(Instant::now() + Duration::from_secs(60));
        f.close();
        assert!(!f.is_open());
    }
}
