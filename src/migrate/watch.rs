//! The job's thread: starts the destination leg's resync, follows it, and
//! ends the job — cutover when the leg is in sync, the source kept on
//! abort or when the leg fails, suspended (still running) on shutdown.

use super::{MigrateError, MigrateErrorKind, MigrationJob, CHECKPOINT_EVERY, POLL};
use crate::api::MigrationState;
use crate::mirror::{ResyncEnd, ResyncJob};
use crate::sync::lock;
use crate::volume::{LegCondition, LegState};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a cluster cutover refused for now is tried again.
const CUTOVER_PATIENCE: Duration = Duration::from_secs(60);
const CUTOVER_RETRY: Duration = Duration::from_secs(1);

impl MigrationJob {
    pub(super) fn run(self: Arc<Self>) {
        if self.cut_over() {
            return self.completed();
        }
        let Some(leg) = self.leg() else {
            return self.finish(MigrationState::Failed, Some(format!("volume '{}' has no leg on '{}'", self.spec.volume, self.spec.dest)));
        };
        loop {
            // In a cluster, who may write before the copy starts: one that
            // leaves before the cutover may have left a write half done
            // behind the copy (source written, destination not), so the
            // copy runs again (see ARCHITECTURE, "Migration in a cluster").
            let writers = self.cluster.get().and_then(|c| c.writers().ok());
            if !self.copy(&leg) {
                return;
            }
            self.track(&leg);
            match self.cutover_patiently(writers.as_deref()) {
                Ok(Some(generation)) => {
                    lock(&self.status).generation = Some(generation);
                    return self.completed();
                }
                Ok(None) => {
                    if let Err(e) = self.copy_again(&leg) {
                        return self.finish(MigrationState::Failed, Some(format!("marking the range to copy again: {e}")));
                    }
                }
                Err(_) if self.abort.load(Ordering::SeqCst) => return self.finish(MigrationState::Aborted, None),
                // Shutdown while the cutover waited: still running, resumed
                // at the next start (its copy is checkpointed).
                Err(_) if self.suspend.load(Ordering::SeqCst) => return self.final_checkpoint(),
                Err(e) => return self.finish(MigrationState::Failed, Some(e.to_string())),
            }
        }
    }

    /// Copies until the destination leg is in sync: true then; false if
    /// the job ended (aborted, failed, suspended).
    fn copy(&self, leg: &Arc<LegState>) -> bool {
        let job = ResyncJob::start(self.volume.clone(), &self.spec.dest, self.spec.rate);
        *lock(&self.resync) = Some(job.clone());
        let mut last_checkpoint = Instant::now();
        loop {
            self.track(leg);
            if self.abort.load(Ordering::SeqCst) {
                self.finish(MigrationState::Aborted, None);
                return false;
            }
            if self.suspend.load(Ordering::SeqCst) {
                job.stop();
                self.track(leg);
                self.final_checkpoint();
                return false;
            }
            if leg.condition() == LegCondition::Failed {
                let reason = leg.reason().unwrap_or_else(|| "the destination failed".into());
                self.finish(MigrationState::Failed, Some(reason));
                return false;
            }
            match job.end() {
                Some(ResyncEnd::InSync) => return true,
                Some(ResyncEnd::Failed(reason)) => {
                    self.finish(MigrationState::Failed, Some(leg.reason().unwrap_or(reason)));
                    return false;
                }
                Some(ResyncEnd::Stopped) | None => {}
            }
            if last_checkpoint.elapsed() >= CHECKPOINT_EVERY {
                if let Err(e) = self.save_checkpoint() {
                    tracing::warn!(volume = %self.spec.volume, error = %e, "saving migration progress failed");
                }
                last_checkpoint = Instant::now();
            }
            std::thread::sleep(POLL);
        }
    }

    /// The record saved as the job stops for a shutdown (it stays
    /// running and resumes at the next start).
    fn final_checkpoint(&self) {
        if let Err(e) = self.save_checkpoint() {
            tracing::error!(volume = %self.spec.volume, error = %e, "final checkpoint before shutdown failed");
        }
    }

    /// The whole range stale again on the destination leg (durably), for
    /// the next copy pass.
    fn copy_again(&self, leg: &LegState) -> std::io::Result<()> {
        let red = self.volume.translation().redundancy().clone();
        leg.stale().set_durable(red.regions_of(self.spec.range.start, self.spec.range.len()))?;
        leg.set_condition(LegCondition::Resyncing, None);
        red.save_legs()?;
        self.recopies.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// The cutover; in a cluster, one refused for now (etcd does not
    /// answer, no coordinator yet, a barrier that timed out or a node that
    /// did not answer) is tried again for `CUTOVER_PATIENCE`, since the
    /// copy is done and every node keeps writing both legs meanwhile.
    /// Abort and shutdown still end it. `Ok(None)`: a node of `writers`
    /// (those that could write when the copy began; `None`: unknown) has
    /// left since: the copy must run again first. The cutover barrier
    /// itself never commits past a node for the same reason (`strict`).
    fn cutover_patiently(&self, writers: Option<&[(String, i64)]>) -> Result<Option<u64>, MigrateError> {
        let started = Instant::now();
        loop {
            let attempt = match self.cluster.get().map(|c| c.writers()) {
                Some(Ok(now)) => match writers.map(|before| before.iter().filter(|w| !now.contains(w)).map(|(n, _)| n.as_str()).collect::<Vec<_>>()) {
                    Some(left) if left.is_empty() => self.cutover(),
                    left => {
                        let left = left.map_or_else(|| "unknown (etcd did not answer when it began)".into(), |l| l.join(", "));
                        tracing::warn!(volume = %self.spec.volume, left = %left, "nodes left the cluster during the copy: copying the range again before the cutover");
                        return Ok(None);
                    }
                },
                Some(Err(e)) => Err(e),
                None => self.cutover(),
            };
            match attempt {
                Err(e) if e.kind() == MigrateErrorKind::Busy && self.cluster.get().is_some() && started.elapsed() < CUTOVER_PATIENCE => {
                    if self.abort.load(Ordering::SeqCst) || self.suspend.load(Ordering::SeqCst) {
                        return Err(e);
                    }
                    tracing::warn!(volume = %self.spec.volume, error = %e, "cutover refused for now; trying again");
                    std::thread::sleep(CUTOVER_RETRY);
                }
                other => return other.map(Some),
            }
        }
    }

    fn completed(&self) {
        self.copied_bytes.store(self.spec.range.len(), Ordering::Relaxed);
        self.finish(MigrationState::Completed, None);
    }

    fn leg(&self) -> Option<Arc<LegState>> {
        self.volume.translation().redundancy().leg(&self.spec.dest)
    }

    /// Bytes of the range the leg lacks per `stale_count` stale regions.
    fn missing(&self, stale_count: usize) -> u64 {
        (stale_count as u64 * self.volume.translation().redundancy().region()).min(self.spec.range.len())
    }

    /// Progress now (for status).
    fn track(&self, leg: &LegState) {
        let copied = self.spec.range.len() - self.missing(leg.stale().count());
        self.copied_bytes.store(copied, Ordering::Relaxed);
        self.data_bytes.store(leg.data.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    /// Progress as of the leg's last durable checkpoint.
    pub(super) fn durable_copied_bytes(&self) -> Option<u64> {
        let leg = self.leg()?;
        Some(self.spec.range.len() - self.missing(leg.stale().synced_count()))
    }
}
