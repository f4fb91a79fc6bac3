//! The pause–drain–swap transaction of one volume, composed locally from
//! the phases in `phases.rs`:
//!
//! 1. Stage: a validated new `Translation`, stores opened (by the caller);
//!    the commit is prepared.
//! 2. Pause: hold exactly the ranges whose translation changes.
//! 3. Drain: wait, at most `pause_timeout`, until requests admitted before
//!    the hold that touch those ranges have completed. On timeout: release
//!    (held requests continue on the old table), back off, retry.
//! 4. Commit: the caller's `Commit::commit` makes the new generation durable
//!    (it was prepared before the pause, so this is short), then the swap.
//!    Stores only the old table used join the volume's retired list, which
//!    the next FLUSH syncs, so no fdatasync of client data happens while held.
//! 5. Resume: release the hold; held requests are translated against the
//!    new table in arrival order.
//!
//! Nothing is half-applied: until `commit` succeeds the old table stays in
//! force, and after it the new one is in force and on disk.

use super::commit::{Commit, CommitError};
use super::phases::DrainTimedOut;
use super::{HoldId, Translation, Volume};
use crate::defaults;
use crate::map::Range;
use std::time::{Duration, Instant};

/// Points at which a test can make the process die (see `crash_at`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwapPhase {
    Stage,
    Paused,
    Persisted,
    Swapped,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown swap phase '{0}'")]
pub struct UnknownSwapPhase(pub String);

impl std::str::FromStr for SwapPhase {
    type Err = UnknownSwapPhase;
    fn from_str(s: &str) -> Result<Self, UnknownSwapPhase> {
        match s {
            "stage" => Ok(SwapPhase::Stage),
            "paused" => Ok(SwapPhase::Paused),
            "persisted" => Ok(SwapPhase::Persisted),
            "swapped" => Ok(SwapPhase::Swapped),
            _ => Err(UnknownSwapPhase(s.to_string())),
        }
    }
}

#[derive(Debug, Clone)]
pub struct SwapOptions {
    pub pause_timeout: Duration,
    /// Further attempts after a drain timeout.
    pub retries: u32,
    /// Back-off before retry n is `backoff * n`.
    pub backoff: Duration,
    /// Fault injection for crash-consistency tests: abort the process when
    /// this phase is reached.
    pub crash_at: Option<SwapPhase>,
}

impl Default for SwapOptions {
    fn default() -> Self {
        SwapOptions {
            pause_timeout: defaults::PAUSE_TIMEOUT,
            retries: defaults::PAUSE_RETRIES,
            backoff: defaults::SWAP_BACKOFF,
            crash_at: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwapReport {
    pub volume: String,
    pub from_generation: u64,
    pub generation: u64,
    pub ranges: Vec<Range>,
    pub attempts: u32,
    pub hold: Duration,
    pub drain: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    #[error(
        "volume '{volume}': drain timed out on {attempts} attempt(s) of {timeout:?}: {in_flight} request(s) still in flight on the changed ranges; still on generation {generation}"
    )]
    DrainTimeout { volume: String, attempts: u32, timeout: Duration, in_flight: usize, generation: u64 },
    #[error("volume '{volume}': commit failed: {reason}; still on generation {generation}")]
    Commit {
        volume: String,
        #[source]
        reason: CommitError,
        generation: u64,
    },
    #[error("volume '{volume}': {reason}")]
    Invalid { volume: String, reason: String },
}

impl Volume {
    /// Replaces the translation under live I/O: stage, prepare, pause
    /// (retrying with back-off after a drain timeout), commit. `new`'s
    /// table must carry the next generation number; `commit` persists it
    /// durably and is called while the changed ranges are paused and
    /// drained.
    pub fn swap(&self, new: Translation, options: &SwapOptions, commit: &mut dyn Commit) -> Result<SwapReport, SwapError> {
        self.swap_sized(new, options, commit, false)
    }

    /// [`swap`](Self::swap) that may change the size when `resize` (see
    /// [`Volume::stage_sized`]).
    pub fn swap_sized(&self, new: Translation, options: &SwapOptions, commit: &mut dyn Commit, resize: bool) -> Result<SwapReport, SwapError> {
        let mut staged = self.stage_sized(new, resize)?.crash_at(options.crash_at);
        staged.prepare(commit)?;
        loop {
            match staged.pause(options.pause_timeout) {
                Ok(paused) => return paused.commit(commit),
                Err(timed_out) => {
                    let DrainTimedOut { staged: back, error, drain } = *timed_out;
                    if back.attempts() > options.retries {
                        self.record(None, Some(drain), Some(error.to_string()));
                        return Err(error);
                    }
                    std::thread::sleep(options.backoff * back.attempts());
                    staged = back;
                }
            }
        }
    }

    /// Holds `ranges` (the whole volume if empty) and drains them, for an
    /// operator's manual pause. On drain timeout the hold is released.
    pub fn pause(&self, ranges: Vec<Range>, timeout: Duration) -> Result<HoldId, SwapError> {
        let ranges = if ranges.is_empty() { vec![Range::new(0, self.size())] } else { ranges };
        let started = Instant::now();
        let hold = self.hold_drained(ranges, timeout, 1)?;
        self.record(None, Some(started.elapsed()), None);
        Ok(hold)
    }

    /// Holds `ranges` and waits for them to drain; on timeout releases the
    /// hold again (held requests continue) and says how many were in
    /// flight, counting `attempts` pauses so far.
    pub(super) fn hold_drained(&self, ranges: Vec<Range>, timeout: Duration, attempts: u32) -> Result<HoldId, SwapError> {
        let hold = self.gate.hold(ranges);
        let in_flight = self.gate.drain(hold, timeout);
        if in_flight > 0 {
            self.gate.release(hold);
            return Err(SwapError::DrainTimeout { volume: self.name().to_string(), attempts, timeout, in_flight, generation: self.generation() });
        }
        Ok(hold)
    }

    pub fn resume(&self, hold: HoldId) {
        self.gate.release(hold);
    }
}
