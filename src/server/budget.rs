//! Per-connection bound on work in flight: payload buffer bytes (write data
//! held, read data being built or waiting to be sent, each counted at the
//! size of the buffer it takes, `buffers::footprint`) and request count.
//! The reader takes a [`Permit`] before dispatching a request and blocks
//! while the bound is reached, so a client that floods requests or never
//! reads replies stops being read (TCP backpressure) instead of making the
//! server grow. A permit comes back when its reply's last byte is written
//! (the sink drops replies one by one), so the bound, `max_inflight`, is
//! what a connection's requests can hold (docs/ARCHITECTURE.md, "Memory
//! bound").

use crate::sync::lock;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

#[derive(Debug, Default)]
struct Usage {
    bytes: u64,
    requests: u64,
    /// Threads blocked in `acquire` or `wait_idle`: permits returned while
    /// nobody waits need no wake-up (a futex call per request otherwise).
    waiters: u32,
}

#[derive(Debug)]
pub struct Budget {
    usage: Mutex<Usage>,
    changed: Condvar,
    max_bytes: u64,
    max_requests: u64,
}

/// Fixed cost charged per request besides its payload: its reply's header
/// and bookkeeping, a pool job, a gate ticket (a few hundred bytes).
const REQUEST_OVERHEAD: u64 = 256;

impl Budget {
    pub fn new(max_bytes: u64, max_requests: u64) -> Arc<Budget> {
        Arc::new(Budget { usage: Mutex::new(Usage::default()), changed: Condvar::new(), max_bytes, max_requests })
    }

    /// Blocks until `payload` more bytes fit. A request larger than the
    /// whole bound still proceeds once nothing else is in flight.
    pub fn acquire(self: &Arc<Self>, payload: u64) -> Permit {
        let cost = payload + REQUEST_OVERHEAD;
        let mut usage = lock(&self.usage);
        while usage.requests > 0 && (usage.bytes + cost > self.max_bytes || usage.requests >= self.max_requests) {
            usage.waiters += 1;
            usage = crate::sync::wait(&self.changed, usage);
            usage.waiters -= 1;
        }
        usage.bytes += cost;
        usage.requests += 1;
        Permit { budget: self.clone(), cost }
    }

    /// `acquire` without blocking: None when it would have to wait.
    pub fn try_acquire(self: &Arc<Self>, payload: u64) -> Option<Permit> {
        let cost = payload + REQUEST_OVERHEAD;
        let mut usage = lock(&self.usage);
        if usage.requests > 0 && (usage.bytes + cost > self.max_bytes || usage.requests >= self.max_requests) {
            return None;
        }
        usage.bytes += cost;
        usage.requests += 1;
        Some(Permit { budget: self.clone(), cost })
    }

    pub fn in_flight(&self) -> u64 {
        lock(&self.usage).requests
    }

    /// Waits until no request is in flight, or `timeout` passes. Returns
    /// whether the connection is idle.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let mut usage = lock(&self.usage);
        usage.waiters += 1;
        let (mut usage, _) = self.changed.wait_timeout_while(usage, timeout, |u| u.requests > 0).unwrap_or_else(|p| p.into_inner());
        usage.waiters -= 1;
        usage.requests == 0
    }
}

/// One request's share of the budget, returned when dropped (after its
/// reply was written, or thrown away because the client is gone).
#[derive(Debug)]
pub struct Permit {
    budget: Arc<Budget>,
    cost: u64,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut usage = lock(&self.budget.usage);
        usage.bytes -= self.cost;
        usage.requests -= 1;
        let wake = usage.waiters > 0;
        drop(usage);
        if wake {
            self.budget.changed.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_until_released() {
        let budget = Budget::new(1000, 10);
        let a = budget.acquire(600);
        let b2 = budget.clone();
        let t = std::thread::spawn(move || {
            let _p = b2.acquire(600);
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(!t.is_finished(), "second permit must wait for the first");
        drop(a);
        t.join().unwrap();
        assert!(budget.wait_idle(Duration::from_secs(1)));
        // Oversized requests pass when alone.
        let _big = budget.acquire(1 << 30);
        assert_eq!(budget.in_flight(), 1);
    }

    #[test]
    fn try_acquire_refuses_instead_of_waiting() {
        let budget = Budget::new(1000, 2);
        let a = budget.try_acquire(400).expect("fits");
        assert!(budget.try_acquire(400).is_none(), "bytes exhausted");
        let b = budget.try_acquire(0).expect("fits");
        assert!(budget.try_acquire(0).is_none(), "request count exhausted");
        drop((a, b));
        assert!(budget.try_acquire(1 << 30).is_some(), "oversized passes when alone");
    }
}
