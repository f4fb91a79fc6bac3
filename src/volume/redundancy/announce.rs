//! Leg failures told to the other writers of the legs before they count.
//!
//! Alone, a write that a failed leg missed may be answered at once: this
//! process never reads that leg again. When other processes serve the
//! same volume (the nodes of a cluster) they would go on reading the leg
//! and return the bytes from before the write. So with an announcer set,
//! a write, trim or flush that a failed leg did not take is answered only
//! once every other writer knows the leg failed (`ensure_announced`); if
//! that cannot be made sure it fails with EIO.

use super::legs::LegState;
use super::Redundancy;
use crate::sync::lock;
use std::io;
use std::sync::Arc;

/// Tells every other writer of `volume`'s legs that `leg` failed (and
/// records it where one starting later will find it); returns once they
/// know, or says why that cannot be made sure. It may block for seconds
/// (a writer that does not answer is waited out).
pub trait LegAnnouncer: Send + Sync + std::fmt::Debug {
    fn announce(&self, volume: &str, leg: &str, reason: &str) -> Result<(), String>;
}

impl Redundancy {
    /// Sets who hears of this volume's leg failures (once; later calls are
    /// ignored). Without one a failure is known as soon as it is marked.
    pub fn set_announcer(&self, announcer: Arc<dyn LegAnnouncer>) {
        let _ = self.announcer.set(announcer);
    }

    /// Returns once every other writer knows that failed leg `leg`
    /// failed: at once if it is announced already; else this thread
    /// announces it, or waits for the thread that does. An error (EIO)
    /// if it could not be announced: the caller must not answer success.
    pub fn ensure_announced(&self, leg: &LegState) -> io::Result<()> {
        if leg.announced() {
            return Ok(());
        }
        let Some(announcer) = self.announcer.get() else {
            leg.set_announced(true);
            return Ok(());
        };
        let _one = lock(&leg.announcing);
        if leg.announced() {
            return Ok(());
        }
        let reason = leg.reason().unwrap_or_default();
        match announcer.announce(&self.volume, leg.store(), &reason) {
            Ok(()) => {
                leg.set_announced(true);
                tracing::warn!(volume = self.volume, leg = leg.store(), "the leg's failure is known to every other writer");
                Ok(())
            }
            Err(why) => {
                tracing::error!(volume = self.volume, leg = leg.store(), %why, "cannot tell the other writers that the leg failed: I/O that missed it fails with EIO");
                Err(nix::errno::Errno::EIO.into())
            }
        }
    }

    /// Another writer says leg `store` failed there: it takes no I/O here
    /// from now on. True if it was in sync or resyncing here until now.
    pub fn leg_failed_elsewhere(&self, store: &str, reason: &str) -> io::Result<bool> {
        let Some(leg) = self.leg(store) else {
            return Ok(false);
        };
        let changed = leg.fail_as(reason.to_string(), true);
        if changed {
            leg.stale().union_from(self.intent.bits());
            tracing::error!(volume = self.volume, leg = store, %reason, "mirror leg failed on another node; I/O here continues on the other legs");
            self.save_legs()?;
        }
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    #[derive(Debug, Default)]
    struct Recorder {
        calls: AtomicUsize,
        refuse: Mutex<bool>,
    }

    impl LegAnnouncer for Recorder {
        fn announce(&self, _volume: &str, _leg: &str, _reason: &str) -> Result<(), String> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if *lock(&self.refuse) {
                return Err("no".into());
            }
            Ok(())
        }
    }

    #[test]
    fn a_failure_is_announced_once_and_a_refusal_is_an_error_until_it_works() {
        let red = Redundancy::in_memory("v", 4 << 20, 1 << 20);
        let b = red.leg_for_target("b", true, 0..4).unwrap();
        let recorder = Arc::new(Recorder::default());
        red.set_announcer(recorder.clone());
        red.ensure_announced(&b).unwrap();
        assert_eq!(recorder.calls.load(Ordering::SeqCst), 0, "a leg that never failed needs no announcement");
        *lock(&recorder.refuse) = true;
        red.leg_failed(&b, "EIO".into());
        assert!(!b.announced());
        assert_eq!(red.ensure_announced(&b).unwrap_err().raw_os_error(), Some(libc::EIO));
        *lock(&recorder.refuse) = false;
        red.ensure_announced(&b).unwrap();
        red.ensure_announced(&b).unwrap();
        assert_eq!(recorder.calls.load(Ordering::SeqCst), 2, "tried again after the refusal, then never");
    }

    #[test]
    fn a_failure_heard_from_another_writer_needs_no_announcement() {
        let red = Redundancy::in_memory("v", 4 << 20, 1 << 20);
        let b = red.leg_for_target("b", true, 0..4).unwrap();
        let recorder = Arc::new(Recorder::default());
        red.set_announcer(recorder.clone());
        assert!(red.leg_failed_elsewhere("b", "EIO on n2").unwrap());
        assert_eq!(b.condition(), super::super::LegCondition::Failed);
        red.ensure_announced(&b).unwrap();
        assert_eq!(recorder.calls.load(Ordering::SeqCst), 0);
        assert!(!red.leg_failed_elsewhere("b", "again").unwrap());
        assert!(!red.leg_failed_elsewhere("nope", "EIO").unwrap(), "a leg this node does not have");
    }
}
