//! The phases of a swap, each a public step so that a coordinator outside
//! this process can drive them (stage everywhere, pause everywhere, then
//! commit or abort everywhere):
//!
//! - [`Volume::stage`]: validate the change and compute the ranges it
//!   affects. Takes the volume's
//!   one-transaction-at-a-time lock, kept until the transaction ends.
//! - [`Staged::prepare`]: the commit's work that may be slow (fsync of a
//!   temporary file), before anything is held.
//! - [`Staged::pause`]: hold the ranges and drain them, with a deadline. On
//!   timeout the hold is released and the staged change handed back.
//! - [`Paused::commit`] or [`Paused::abort`]: make the change durable and
//!   publish it, or release. Dropping a `Paused` aborts.

use super::commit::{Commit, CommitError};
use super::swap::{SwapError, SwapPhase, SwapReport};
use super::{HoldId, Translation, Volume};
use crate::map::{diff, MappingTable, Range};
use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant};

/// A validated change of a volume's translation, not yet in force.
#[must_use = "a staged change does nothing until paused and committed"]
pub struct Staged<'v> {
    volume: &'v Volume,
    _one_at_a_time: MutexGuard<'v, ()>,
    old: Arc<Translation>,
    new: Arc<Translation>,
    ranges: Vec<Range>,
    attempts: u32,
    crash_at: Option<SwapPhase>,
}

/// A pause that did not drain in time: the hold is released already, and
/// the staged change can be paused again.
pub struct DrainTimedOut<'v> {
    pub staged: Staged<'v>,
    pub error: SwapError,
    pub drain: Duration,
}

/// A staged change whose ranges are held and drained. Dropping it without
/// [`Paused::commit`] releases the hold: the old translation stays.
#[must_use = "dropping a paused change aborts it"]
pub struct Paused<'v> {
    staged: Staged<'v>,
    hold: Option<HoldId>,
    started: Instant,
    drain: Duration,
}

impl Volume {
    /// Stages a new generation: same size, a later generation number.
    pub fn stage(&self, new: Translation) -> Result<Staged<'_>, SwapError> {
        self.stage_sized(new, false)
    }

    /// [`stage`](Self::stage), also accepting a new size when `resize`
    /// (pool volumes: their redundancy state is made for it). The tail
    /// gained or lost differs, so it is held like any changed range.
    pub fn stage_sized(&self, new: Translation, resize: bool) -> Result<Staged<'_>, SwapError> {
        let guard = crate::sync::lock(&self.swap_lock);
        let old = self.translation();
        let invalid = |reason: String| SwapError::Invalid { volume: self.name().to_string(), reason };
        let (from, to) = (old.table(), new.table());
        if to.size() != from.size() && !resize {
            return Err(invalid(format!("changing the size ({} -> {} bytes) is not supported under live I/O", from.size(), to.size())));
        }
        if to.generation() <= from.generation() {
            return Err(invalid(format!("generation {} is not after {}", to.generation(), from.generation())));
        }
        let ranges = diff(from, to);
        Ok(Staged::new(self, guard, old, Arc::new(new), ranges))
    }
}

impl<'v> Staged<'v> {
    fn new(volume: &'v Volume, guard: MutexGuard<'v, ()>, old: Arc<Translation>, new: Arc<Translation>, ranges: Vec<Range>) -> Self {
        Staged { volume, _one_at_a_time: guard, old, new, ranges, attempts: 0, crash_at: None }
    }

    /// Fault injection for crash-consistency tests: abort the process when
    /// `phase` is reached.
    pub fn crash_at(mut self, phase: Option<SwapPhase>) -> Self {
        self.crash_at = phase;
        self
    }

    fn checkpoint(&self, phase: SwapPhase) {
        if self.crash_at == Some(phase) {
            eprintln!("nbdvirt: crash injected at swap phase {phase:?}");
            std::process::abort();
        }
    }

    /// The ranges whose translation changes: what a pause holds.
    pub fn ranges(&self) -> &[Range] {
        &self.ranges
    }

    /// The table the change puts in force.
    pub fn table(&self) -> &MappingTable {
        self.new.table()
    }

    /// Pauses tried so far.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    fn commit_failed(&self, reason: CommitError) -> SwapError {
        SwapError::Commit { volume: self.volume.name().to_string(), reason, generation: self.old.table().generation() }
    }

    /// Runs `commit.prepare` (before anything is held).
    pub fn prepare(&mut self, commit: &mut dyn Commit) -> Result<(), SwapError> {
        commit.prepare(self.new.table()).map_err(|reason| self.commit_failed(reason))?;
        self.checkpoint(SwapPhase::Stage);
        Ok(())
    }

    /// Holds the ranges and waits, at most `timeout`, until requests
    /// admitted before the hold that touch them have completed.
    pub fn pause(mut self, timeout: Duration) -> Result<Paused<'v>, Box<DrainTimedOut<'v>>> {
        self.attempts += 1;
        let started = Instant::now();
        match self.volume.hold_drained(self.ranges.clone(), timeout, self.attempts) {
            Ok(hold) => {
                let drain = started.elapsed();
                self.checkpoint(SwapPhase::Paused);
                Ok(Paused { staged: self, hold: Some(hold), started, drain })
            }
            Err(error) => {
                let drain = started.elapsed();
                tracing::warn!(volume = self.volume.name(), attempt = self.attempts, ?drain, %error, "drain timed out; resumed on the old table");
                Err(Box::new(DrainTimedOut { staged: self, error, drain }))
            }
        }
    }

    /// Gives the change up (also what dropping it does).
    pub fn abort(self) {}
}

impl Paused<'_> {
    fn release(&mut self) {
        if let Some(hold) = self.hold.take() {
            self.staged.volume.gate.release(hold);
        }
    }

    /// Makes the change durable (`commit.commit`), puts it in force and
    /// releases the hold; held requests then see the new translation.
    pub fn commit(mut self, commit: &mut dyn Commit) -> Result<SwapReport, SwapError> {
        let (volume, old, new) = (self.staged.volume, self.staged.old.clone(), self.staged.new.clone());
        if let Err(reason) = commit.commit(new.table()) {
            let err = self.staged.commit_failed(reason);
            self.release();
            volume.record(Some(self.started.elapsed()), Some(self.drain), Some(err.to_string()));
            return Err(err);
        }
        self.staged.checkpoint(SwapPhase::Persisted);
        // Writes completed through the old table may sit unsynced on a
        // store the new table no longer uses: the next FLUSH syncs them.
        volume.retire(old.stores().iter().filter(|o| !new.stores().iter().any(|n| Arc::ptr_eq(n, o))).cloned());
        volume.current.store(new.clone());
        self.staged.checkpoint(SwapPhase::Swapped);
        self.release();
        commit.committed(new.table());
        let hold = self.started.elapsed();
        let report = SwapReport {
            volume: volume.name().to_string(),
            from_generation: old.table().generation(),
            generation: new.table().generation(),
            ranges: self.staged.ranges.clone(),
            attempts: self.staged.attempts,
            hold,
            drain: self.drain,
        };
        if report.generation != report.from_generation {
            volume.record(Some(hold), Some(self.drain), None);
            tracing::info!(
                volume = report.volume,
                generation = report.generation,
                ranges = ?report.ranges,
                attempts = report.attempts,
                hold_us = hold.as_micros() as u64,
                drain_us = self.drain.as_micros() as u64,
                "swapped mapping table"
            );
        }
        Ok(report)
    }

    /// Releases the hold; the old translation stays in force.
    /// How long the drain took.
    pub fn drain(&self) -> Duration {
        self.drain
    }

    pub fn abort(mut self) {
        self.release();
    }
}

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{open_backend, Backend, BackendSpec};
    use crate::map::{Extent, TargetSpec};
    use crate::volume::{Unpersisted, VolumeSpec};
    use std::collections::HashMap;

    fn stores() -> HashMap<String, Arc<dyn Backend>> {
        let mem = |name: &str| open_backend(&BackendSpec { name: name.into(), path: None, size: Some(1 << 20), direct: false, read_only: false, delay: None, sharing: Default::default() }).unwrap();
        HashMap::from([("a".to_string(), mem("a")), ("b".to_string(), mem("b"))])
    }

    fn translation(generation: u64, store: &str, stores: &HashMap<String, Arc<dyn Backend>>) -> Translation {
        let extents = vec![Extent { start: 0, length: 8192, target: TargetSpec::Linear { store: store.into(), offset: 0 } }];
        Translation::new(MappingTable::new(generation, extents).unwrap(), stores).unwrap()
    }

    fn volume(stores: &HashMap<String, Arc<dyn Backend>>) -> Volume {
        let spec = VolumeSpec { name: "v".into(), description: String::new(), read_only: false, block_size: 4096 };
        Volume::new(spec, translation(1, "a", stores))
    }

    #[test]
    fn phases_commit_and_abort() {
        let stores = stores();
        let v = volume(&stores);
        let staged = v.stage(translation(2, "b", &stores)).unwrap();
        assert_eq!(staged.ranges(), &[Range::new(0, 8192)]);
        let paused = staged.pause(Duration::from_millis(10)).ok().unwrap();
        assert_eq!(v.gate().status().state, "paused");
        drop(paused);
        assert_eq!(v.gate().status().state, "running", "dropping a paused change releases the hold");
        assert_eq!(v.generation(), 1);
        let report = v.stage(translation(2, "b", &stores)).unwrap().pause(Duration::from_millis(10)).ok().unwrap().commit(&mut Unpersisted).unwrap();
        assert_eq!((report.from_generation, report.generation, report.attempts), (1, 2, 1));
        assert_eq!(v.generation(), 2);
        assert_eq!(v.stats().swaps, 1);
        assert!(matches!(v.stage(translation(2, "a", &stores)), Err(SwapError::Invalid { .. })));
    }

    #[test]
    fn drain_timeout_hands_the_change_back() {
        let stores = stores();
        let v = volume(&stores);
        let ticket = v.gate().try_enter(Range::new(0, 10), 0).unwrap();
        let staged = v.stage(translation(2, "b", &stores)).unwrap();
        let timed_out = staged.pause(Duration::from_millis(10)).err().unwrap();
        assert!(matches!(timed_out.error, SwapError::DrainTimeout { in_flight: 1, attempts: 1, .. }));
        assert_eq!(v.gate().status().state, "running", "the hold is released on timeout");
        drop(ticket);
        let paused = timed_out.staged.pause(Duration::from_millis(10)).ok().unwrap();
        assert_eq!(paused.commit(&mut Unpersisted).unwrap().attempts, 2);
    }
}
