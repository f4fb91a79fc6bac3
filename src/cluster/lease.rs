//! When this node may serve: until its membership lease could have expired
//! in etcd, minus a margin. Pure time arithmetic, so it is tested alone.
//!
//! etcd restarts a lease's TTL when it *receives* a renewal, which is after
//! we sent it; counting from the moment we sent it is therefore never later
//! than etcd's own expiry. The margin covers what a clock cannot: requests
//! admitted just before the deadline still running after it, and etcd's
//! clock running a little fast against ours.

use std::time::{Duration, Instant};

/// The margin before the lease's end at which a node stops serving: a
/// quarter of the TTL, at least one second.
pub fn margin(ttl: Duration) -> Duration {
    (ttl / 4).max(Duration::from_secs(1))
}

/// How often the lease is renewed: three times per serving window (TTL
/// minus margin), so that one lost or slow renewal never closes the fence.
pub fn renew_every(ttl: Duration) -> Duration {
    ttl.saturating_sub(margin(ttl)) / 3
}

/// The serving deadline after a renewal sent at `sent` that etcd answered
/// with `granted_secs` (0: the lease had expired, nothing may be served).
pub fn serve_until(sent: Instant, granted_secs: i64, ttl: Duration) -> Option<Instant> {
    if granted_secs <= 0 {
        return None;
    }
    let granted = Duration::from_secs(granted_secs as u64).min(ttl);
    granted.checked_sub(margin(ttl)).map(|left| sent + left)
}

/// The serving deadline after a failsafe round sent at `sent` that every
/// peer answered: a serving window like a renewal's, but never past the
/// deadline of the last renewal etcd granted plus `failsafe` (the longest
/// a coordinator waits past a silent node's lease before committing past
/// it: see `super::failsafe`).
pub fn failsafe_until(sent: Instant, ttl: Duration, leased_until: Instant, failsafe: Duration) -> Instant {
    let window = ttl.saturating_sub(margin(ttl));
    (sent + window).min(leased_until + failsafe)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deadline_counts_from_the_send_and_keeps_the_margin() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(5);
        assert_eq!(margin(ttl), Duration::from_millis(1250));
        assert_eq!(serve_until(t0, 5, ttl), Some(t0 + Duration::from_millis(3750)));
        // etcd may answer a larger TTL than asked: never trusted beyond ours.
        assert_eq!(serve_until(t0, 60, ttl), Some(t0 + Duration::from_millis(3750)));
        // An expired lease, or a TTL shorter than the margin: no serving.
        assert_eq!(serve_until(t0, 0, ttl), None);
        assert_eq!(serve_until(t0, 1, Duration::from_secs(2)), Some(t0));
        assert_eq!(serve_until(t0, 1, ttl), None);
    }

    #[test]
    fn failsafe_rounds_serve_a_window_at_a_time_up_to_the_bound() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(2);
        let leased = t0 + Duration::from_secs(1);
        let f = Duration::from_secs(10);
        // A round early in the window: one serving window (TTL - margin).
        assert_eq!(failsafe_until(t0 + Duration::from_secs(2), ttl, leased, f), t0 + Duration::from_secs(3));
        // Near the bound: the bound, never later.
        assert_eq!(failsafe_until(t0 + Duration::from_millis(10_500), ttl, leased, f), t0 + Duration::from_secs(11));
        assert_eq!(failsafe_until(t0 + Duration::from_secs(20), ttl, leased, f), t0 + Duration::from_secs(11));
        // Failsafe off: never past the lease.
        assert_eq!(failsafe_until(t0, ttl, leased, Duration::ZERO), leased);
    }

    #[test]
    fn renewals_leave_room_for_a_lost_one() {
        for secs in 2..=20 {
            let ttl = Duration::from_secs(secs);
            // A renewal lost between two that succeed: the fence stays open.
            assert!(2 * renew_every(ttl) < ttl - margin(ttl), "ttl {ttl:?}");
            assert!(renew_every(ttl) >= Duration::from_millis(333), "ttl {ttl:?}");
        }
    }
}
