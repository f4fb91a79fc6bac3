//! The pause–drain–swap transaction of one volume.
//!
//! 1. Stage (caller): a validated new `Translation`, stores opened.
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

use super::{Translation, Volume};
use crate::defaults;
use crate::map::{diff, MappingTable, Range};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Points at which a test can make the process die (see `crash_at`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwapPhase {
    Stage,
    Paused,
    Persisted,
    Swapped,
}

impl std::str::FromStr for SwapPhase {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stage" => Ok(SwapPhase::Stage),
            "paused" => Ok(SwapPhase::Paused),
            "persisted" => Ok(SwapPhase::Persisted),
            "swapped" => Ok(SwapPhase::Swapped),
            _ => Err(format!("unknown swap phase '{s}'")),
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

impl SwapOptions {
    fn checkpoint(&self, phase: SwapPhase) {
        if self.crash_at == Some(phase) {
            eprintln!("nbdvirt: crash injected at swap phase {phase:?}");
            std::process::abort();
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SwapReport {
    pub volume: String,
    pub from_generation: u64,
    pub generation: u64,
    pub ranges: Vec<Range>,
    pub attempts: u32,
    #[serde(serialize_with = "as_micros")]
    pub hold: Duration,
    #[serde(serialize_with = "as_micros")]
    pub drain: Duration,
}

pub(crate) fn as_micros<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_micros() as u64)
}

/// How the caller makes a new generation durable.
pub trait Commit {
    /// Before the pause: make the generation ready (e.g. write and fsync a
    /// temporary file). A failure aborts the swap before anything is held.
    fn prepare(&mut self, table: &MappingTable) -> Result<(), String>;
    /// While the changed ranges are paused and drained: make it the
    /// committed generation, durably, together with any data it depends on.
    fn commit(&mut self, table: &MappingTable) -> Result<(), String>;
    /// After the swap, outside the pause (e.g. archive a copy).
    fn committed(&mut self, _table: &MappingTable) {}
}

#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    #[error(
        "volume '{volume}': drain timed out on {attempts} attempt(s) of {timeout:?}: {in_flight} request(s) still in flight on the changed ranges; still on generation {generation}"
    )]
    DrainTimeout { volume: String, attempts: u32, timeout: Duration, in_flight: usize, generation: u64 },
    #[error("volume '{volume}': commit failed: {reason}; still on generation {generation}")]
    Commit { volume: String, reason: String, generation: u64 },
    #[error("volume '{volume}': {reason}")]
    Invalid { volume: String, reason: String },
}

impl Volume {
    /// Replaces the translation under live I/O. `new`'s table must carry the
    /// next generation number; `commit` persists it durably and is called
    /// while the changed ranges are paused and drained.
    pub fn swap(
        &self,
        new: Translation,
        options: &SwapOptions,
        commit: &mut dyn Commit,
    ) -> Result<SwapReport, SwapError> {
        let _one_at_a_time = crate::sync::lock(&self.swap_lock);
        let old = self.translation();
        let volume = self.name().to_string();
        let invalid = |reason: String| SwapError::Invalid { volume: volume.clone(), reason };
        if new.table().size() != old.table().size() {
            return Err(invalid(format!(
                "changing the size ({} -> {} bytes) is not supported under live I/O",
                old.table().size(),
                new.table().size()
            )));
        }
        if new.table().generation() <= old.table().generation() {
            return Err(invalid(format!("generation {} is not after {}", new.table().generation(), old.table().generation())));
        }
        let ranges = diff(old.table(), new.table());
        if let Err(reason) = commit.prepare(new.table()) {
            return Err(SwapError::Commit { volume, reason, generation: old.table().generation() });
        }
        options.checkpoint(SwapPhase::Stage);
        let new = Arc::new(new);
        let mut attempts = 0;
        loop {
            attempts += 1;
            let started = Instant::now();
            let hold = self.gate.hold(ranges.clone());
            let in_flight = self.gate.drain(hold, options.pause_timeout);
            let drain = started.elapsed();
            if in_flight > 0 {
                self.gate.release(hold);
                tracing::warn!(volume, attempt = attempts, in_flight, ?drain, "drain timed out; resumed on the old table");
                if attempts > options.retries {
                    let err = SwapError::DrainTimeout {
                        volume: volume.clone(),
                        attempts,
                        timeout: options.pause_timeout,
                        in_flight,
                        generation: old.table().generation(),
                    };
                    self.record(None, Some(drain), Some(err.to_string()));
                    return Err(err);
                }
                std::thread::sleep(options.backoff * attempts);
                continue;
            }
            options.checkpoint(SwapPhase::Paused);
            if let Err(reason) = commit.commit(new.table()) {
                self.gate.release(hold);
                let hold_time = started.elapsed();
                let err = SwapError::Commit { volume: volume.clone(), reason, generation: old.table().generation() };
                self.record(Some(hold_time), Some(drain), Some(err.to_string()));
                return Err(err);
            }
            options.checkpoint(SwapPhase::Persisted);
            // Writes completed through the old table may sit unsynced on a
            // store the new table no longer uses: the next FLUSH syncs them.
            self.retire(old.stores().iter().filter(|s| !new.stores().iter().any(|n| Arc::ptr_eq(n, s))).cloned());
            self.current.store(new.clone());
            options.checkpoint(SwapPhase::Swapped);
            self.gate.release(hold);
            commit.committed(new.table());
            let hold_time = started.elapsed();
            self.record(Some(hold_time), Some(drain), None);
            let report = SwapReport {
                volume,
                from_generation: old.table().generation(),
                generation: new.table().generation(),
                ranges,
                attempts,
                hold: hold_time,
                drain,
            };
            tracing::info!(
                volume = report.volume,
                generation = report.generation,
                ranges = ?report.ranges,
                attempts,
                hold_us = hold_time.as_micros() as u64,
                drain_us = drain.as_micros() as u64,
                "swapped mapping table"
            );
            return Ok(report);
        }
    }

    /// Holds `ranges` (the whole volume if empty) and drains them, for an
    /// operator's manual pause. On drain timeout the hold is released.
    pub fn pause(&self, ranges: Vec<Range>, timeout: std::time::Duration) -> Result<super::HoldId, SwapError> {
        let ranges = if ranges.is_empty() { vec![Range::new(0, self.size())] } else { ranges };
        let started = Instant::now();
        let hold = self.hold_drained(ranges, timeout)?;
        self.record(None, Some(started.elapsed()), None);
        Ok(hold)
    }

    /// Holds `ranges` and waits for them to drain; on timeout releases the
    /// hold again (held requests continue) and says how many were in flight.
    pub(super) fn hold_drained(&self, ranges: Vec<Range>, timeout: Duration) -> Result<super::HoldId, SwapError> {
        let hold = self.gate.hold(ranges);
        let in_flight = self.gate.drain(hold, timeout);
        if in_flight > 0 {
            self.gate.release(hold);
            return Err(SwapError::DrainTimeout { volume: self.name().to_string(), attempts: 1, timeout, in_flight, generation: self.generation() });
        }
        Ok(hold)
    }

    pub fn resume(&self, hold: super::HoldId) {
        self.gate.release(hold);
    }
}
