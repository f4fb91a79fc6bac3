//! The threads on a barrier's path run at real-time round-robin priority
//! (the lowest, 1) while they are on it, where the process may (root,
//! CAP_SYS_NICE or RLIMIT_RTPRIO; systemd's `RestrictRealtime=yes` turns
//! it off): the peer link's accept thread, a `Hold` or `Decide` request's
//! thread, a node's hold thread and the coordinator's barrier. A held
//! range's I/O waits for the slowest of them on every node, and on a
//! loaded machine a woken thread at normal priority waits behind the
//! runnable I/O threads: node hold p99 10.9–11.9 → 3.4–3.5 ms under fio
//! on every node (docs/PERFORMANCE.md §16d). Corosync runs its membership
//! protocol at real-time priority for the same reason.
//!
//! These threads mostly sleep (on sockets, channels, the gate's drain);
//! the little CPU they use in a row is bounded by the barrier's deadlines,
//! and the kernel's real-time throttling bounds it in any case. Threads
//! the hold thread starts do not inherit it (`SCHED_RESET_ON_FORK`); the
//! coordinator's calls to the nodes do, and so do the accept thread's,
//! which drop it at once unless they serve a `Hold` or `Decide`: a thread
//! started at normal priority waits to be scheduled as long as any other
//! (raising it only once it runs left the node hold's p99 where it was).

use std::sync::atomic::{AtomicBool, Ordering};

/// Set once raising failed: said once, not tried again.
static REFUSED: AtomicBool = AtomicBool::new(false);

/// Real-time priority for the calling thread until dropped (then back to
/// normal scheduling). Without the right to it, the thread stays as it
/// is; the first refusal is logged.
#[must_use = "the priority lasts as long as the guard"]
pub struct BarrierPriority {
    raised: bool,
}

impl BarrierPriority {
    /// Not for the threads the caller starts (`SCHED_RESET_ON_FORK`).
    pub fn raise() -> BarrierPriority {
        BarrierPriority::raise_with(libc::SCHED_RR | libc::SCHED_RESET_ON_FORK)
    }

    /// Also for the threads the caller starts meanwhile: the coordinator's
    /// calls to every node, each on a thread of its own, wait for `Held`
    /// and `Decide` answers and must wake as soon as they arrive.
    pub fn raise_with_calls() -> BarrierPriority {
        BarrierPriority::raise_with(libc::SCHED_RR)
    }

    /// For good, and for the threads the caller starts (the peer link's
    /// accept thread: a request's thread must not wait at normal priority
    /// to be scheduled before it can read a `Hold` and raise itself, and
    /// a `Hold`'s thread starts the hold thread). Such a thread that turns
    /// out not to be on a barrier's path calls [`normal`](Self::normal).
    pub fn raise_inherited() {
        std::mem::forget(BarrierPriority::raise_with_calls());
    }

    /// Back to normal scheduling for good (a peer request that is not a
    /// barrier's).
    pub fn normal() {
        if !REFUSED.load(Ordering::Relaxed) {
            let _ = set(libc::SCHED_OTHER, 0);
        }
    }

    fn raise_with(policy: libc::c_int) -> BarrierPriority {
        if REFUSED.load(Ordering::Relaxed) {
            return BarrierPriority { raised: false };
        }
        let raised = set(policy, 1).map_err(|e| {
            if !REFUSED.swap(true, Ordering::Relaxed) {
                tracing::info!(error = %e, "barrier threads run at normal priority (real-time priority refused); holds may last longer on a loaded machine");
            }
        });
        BarrierPriority { raised: raised.is_ok() }
    }
}

impl Drop for BarrierPriority {
    fn drop(&mut self) {
        if self.raised {
            let _ = set(libc::SCHED_OTHER, 0);
        }
    }
}

/// sched_setscheduler(2) on the calling thread.
fn set(policy: libc::c_int, priority: libc::c_int) -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: priority };
    // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param
    // that outlives the call.
    match unsafe { libc::sched_setscheduler(0, policy, &param) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> libc::c_int {
        // SAFETY: pid 0 is the calling thread.
        unsafe { libc::sched_getscheduler(0) }
    }

    #[test]
    fn the_priority_lasts_as_long_as_the_guard_and_is_not_inherited() {
        std::thread::spawn(|| {
            let guard = BarrierPriority::raise();
            if guard.raised {
                assert_eq!(policy() & !libc::SCHED_RESET_ON_FORK, libc::SCHED_RR);
                let child = std::thread::spawn(policy).join().unwrap();
                assert_eq!(child, libc::SCHED_OTHER, "a thread started meanwhile runs at normal priority");
            } else {
                // Not root and no RLIMIT_RTPRIO: nothing changed.
                assert!(REFUSED.load(Ordering::Relaxed));
                assert_eq!(policy(), libc::SCHED_OTHER);
            }
            drop(guard);
            assert_eq!(policy(), libc::SCHED_OTHER, "back to normal");
            BarrierPriority::raise_inherited();
            if !REFUSED.load(Ordering::Relaxed) {
                assert_eq!(std::thread::spawn(policy).join().unwrap(), libc::SCHED_RR, "inherited");
            }
            BarrierPriority::normal();
            assert_eq!(policy(), libc::SCHED_OTHER);
        })
        .join()
        .unwrap();
    }
}
