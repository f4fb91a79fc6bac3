//! The coordinator's side of a cluster-wide swap of one volume's table:
//! hold everywhere, commit in etcd, swap everywhere.
//!
//! 1. Every live node is ordered to `Hold`: it stages the new table,
//!    prepares it, holds and drains the ranges it changes, answers `Held`,
//!    and waits for a decision until `decide_within`.
//! 2. When all have answered, one etcd transaction commits: the decision
//!    key becomes "commit" and the volume's record the new table, only if
//!    the coordinator key is still the one of this epoch, nobody decided
//!    the barrier yet and no node joined since the nodes were listed.
//! 3. Every node is told `Decide`. A node that hears nothing by its wait
//!    settles the barrier in etcd itself (abort unless decided), so a
//!    commit and an abort can never both happen.
//!
//! A node that does not answer is never committed past while it may
//! serve: the holds are aborted, and once etcd has expired its lease and
//! its failsafe window has passed (`failsafe.rs`) the barrier runs again
//! without it, and the node is recorded as fenced. Members without a live
//! lease that may still serve in failsafe are held like live ones.

use super::keys::{self, VolumeRecord};
use super::peer;
use super::store::LiveNode;
use super::{Cluster, ClusterError};
use crate::api::{ApiError, BarrierReport, ErrorKind, Held, HoldOrder, PeerRequest, TableChange};
use std::time::{Duration, Instant};

/// How long each phase may take.
#[derive(Debug, Clone, Copy)]
pub struct BarrierTiming {
    /// A node's drain (`server.pause_timeout`).
    pub pause_timeout: Duration,
    /// Further attempts after a failed one.
    pub retries: u32,
    pub backoff: Duration,
}

impl BarrierTiming {
    /// How long the coordinator waits for a node's `Held`: its drain, and
    /// the stage and prepare before it.
    fn hold_limit(&self) -> Duration {
        self.pause_timeout + Duration::from_secs(2)
    }

    /// How long a holding node waits for the decision before it settles
    /// with etcd: longer than the coordinator waits for the slowest node's
    /// `Held`, so the commit that follows the last `Held` comes in time
    /// (if it does not, etcd says who won).
    fn decide_within(&self) -> Duration {
        self.hold_limit() + Duration::from_secs(1)
    }
}

/// Test hook (crash-consistency tests): the coordinator aborts the process
/// at this point of a barrier (`NBDVIRT_TEST_BARRIER_CRASH` = `held`: all
/// nodes hold, nothing committed; `committed`: committed in etcd, nobody
/// told; `decided`: every node told).
fn crash_point(here: &str) {
    if std::env::var("NBDVIRT_TEST_BARRIER_CRASH").is_ok_and(|at| at == here) {
        eprintln!("NBDVIRT_TEST_BARRIER_CRASH: aborting the coordinator at '{here}'");
        std::process::abort();
    }
}

enum Attempt {
    Done(BarrierReport),
    /// Holds aborted; `silent` nodes gave no answer.
    Retry { reason: String, silent: Vec<LiveNode>, invalid: bool },
}

impl Cluster {
    /// Runs the barrier of `change` at `generation` on every live node.
    pub fn run_barrier(&self, change: &TableChange, generation: u64, timing: BarrierTiming) -> Result<BarrierReport, ClusterError> {
        let _on_barrier_path = super::BarrierPriority::raise_with_calls();
        let fail = |reason: String| ClusterError::Barrier { volume: change.volume.clone(), reason };
        // Shown from the first attempt to the last, waits included.
        let _shown = self.mark_barrier(&format!("{}-g{generation}", change.volume), &change.volume, generation, "coordinating");
        let mut fenced = Vec::new();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (me, epoch, _) = self.coordinator().ok_or_else(|| ClusterError::NotCoordinator("none yet".into()))?;
            if me != self.node() {
                return Err(ClusterError::NotCoordinator(format!("the coordinator is {me}")));
            }
            match self.attempt(change, generation, epoch, attempt, timing)? {
                Attempt::Done(mut report) => {
                    self.forget_dropped_legs(change);
                    report.attempts = attempt;
                    report.fenced = fenced;
                    return Ok(report);
                }
                Attempt::Retry { reason, invalid: true, .. } => return Err(ClusterError::BarrierRefused { volume: change.volume.clone(), reason }),
                Attempt::Retry { reason, silent, .. } if change.strict && !silent.is_empty() => {
                    let nodes: Vec<&str> = silent.iter().map(|n| n.node.as_str()).collect();
                    return Err(fail(format!("{reason}; not committed past {} (a strict barrier: the caller acts on a node's leaving first)", nodes.join(", "))));
                }
                Attempt::Retry { reason, silent, .. } => {
                    tracing::warn!(volume = %change.volume, generation, attempt, %reason, "barrier aborted");
                    for node in silent {
                        if !self.wait_fenced(&node, &format!("{}-{generation}", change.volume))? {
                            return Err(fail(format!("node {} does not answer but its lease is alive", node.node)));
                        }
                        fenced.push(node.node);
                    }
                    if attempt > timing.retries {
                        return Err(fail(format!("{reason} (after {attempt} attempts)")));
                    }
                    std::thread::sleep(timing.backoff * attempt);
                }
            }
        }
    }

    /// Returns once `node`, which did not answer, serves nothing: etcd has
    /// expired its lease (lease 0: it had none already) and its failsafe
    /// window is over. Recorded as fenced during `what`. Only then may the
    /// others go on past it. False if its lease outlives TTL + 2 s.
    pub(crate) fn wait_fenced(&self, node: &LiveNode, what: &str) -> Result<bool, ClusterError> {
        let deadline = Instant::now() + self.shared.cfg.lease_ttl + Duration::from_secs(2);
        while node.lease != 0 && !self.lease_expired(node.lease)? {
            if Instant::now() > deadline {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.wait_out_failsafe(&node.node);
        tracing::warn!(node = %node.node, what, "node fenced: its lease expired while it did not answer");
        self.record_fenced(&node.node, what);
        Ok(true)
    }

    fn attempt(&self, change: &TableChange, generation: u64, epoch: i64, attempt: u32, timing: BarrierTiming) -> Result<Attempt, ClusterError> {
        let (mut nodes, listed) = self.live_nodes()?;
        let live = nodes.len();
        nodes.extend(self.maybe_serving(&nodes)?);
        let barrier = format!("{}-e{epoch}-g{generation}-a{attempt}", change.volume);
        let order = HoldOrder {
            epoch,
            barrier: barrier.clone(),
            volume: change.volume.clone(),
            generation,
            extents: change.extents.clone(),
            decide_within_ms: timing.decide_within().as_millis() as u64,
            catalog: change.catalog.clone(),
        };
        let started = Instant::now();
        let limit = timing.hold_limit();
        let answers: Vec<Result<Held, ApiError>> = peer::on_every(&nodes, |n| peer::call(&n.peer, &PeerRequest::Hold(order.clone()), limit));
        let held: Vec<&LiveNode> = nodes.iter().zip(&answers).filter(|(_, a)| a.is_ok()).map(|(n, _)| n).collect();
        if held.len() == nodes.len() {
            crash_point("held");
            let committing = Instant::now();
            let committed = self.commit(epoch, listed, &barrier, self.commit_writes(change, generation));
            let commit_us = committing.elapsed().as_micros() as u64;
            match committed {
                Ok(true) => {
                    crash_point("committed");
                    let failed = decide(&held, epoch, &barrier, true);
                    crash_point("decided");
                    let hold_us = started.elapsed().as_micros() as u64;
                    let nodes = held.iter().map(|n| n.node.clone()).filter(|n| !failed.iter().any(|(f, _)| f == n)).collect();
                    let unconfirmed = failed.into_iter().map(|(node, message)| format!("{node}: {message}")).collect();
                    let report = BarrierReport { volume: change.volume.clone(), generation, nodes, fenced: Vec::new(), unconfirmed, attempts: attempt, hold_us, commit_us, added: Vec::new(), removed: Vec::new() };
                    return Ok(Attempt::Done(report));
                }
                Ok(false) => {
                    decide(&held, epoch, &barrier, false);
                    return Ok(Attempt::Retry { reason: "the commit was refused (a node settled the barrier, joined, or the coordinator changed)".into(), silent: Vec::new(), invalid: false });
                }
                // The outcome is unknown: the nodes settle it with etcd
                // themselves; telling them anything could contradict it.
                Err(e) => return Err(e),
            }
        }
        decide(&held, epoch, &barrier, false);
        let mut silent = Vec::new();
        let mut reasons = Vec::new();
        let mut invalid = false;
        for (i, (n, a)) in nodes.iter().zip(answers).enumerate() {
            if let Err(e) = a {
                reasons.push(format!("{}: {}", n.node, e.message));
                if i >= live {
                    // No lease, maybe serving in failsafe: whatever it says,
                    // it is committed past only once its window is over.
                    silent.push(n.clone());
                    continue;
                }
                invalid |= matches!(e.kind, ErrorKind::Invalid | ErrorKind::NotFound);
                if e.kind == ErrorKind::Io {
                    silent.push(n.clone());
                }
            }
        }
        Ok(Attempt::Retry { reason: reasons.join("; "), silent, invalid })
    }

    /// What the commit of `change` writes besides its decision: the
    /// volume's record; for a catalog, the file and the records of the
    /// volumes it adds and removes.
    fn commit_writes(&self, change: &TableChange, generation: u64) -> Vec<(String, Vec<u8>)> {
        let record = |r: &VolumeRecord| (keys::volume(self.name(), &r.volume), serde_json::to_vec(r).expect("a volume record serializes"));
        match &change.catalog {
            None => vec![record(&VolumeRecord { volume: change.volume.clone(), generation, extents: change.extents.clone(), removed: false })],
            Some(c) => {
                let applied_at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
                let file = keys::CatalogRecord { file: c.file.clone(), base: c.base.clone(), text: c.text.clone(), node: self.node().to_string(), applied_at };
                let mut writes = vec![(keys::catalog(self.name()), serde_json::to_vec(&file).expect("a catalog record serializes"))];
                writes.extend(c.records.iter().map(record));
                writes
            }
        }
    }
}

/// Tells every node in `nodes` the decision (best effort: a node that does
/// not hear it settles with etcd when its wait ends). The nodes that did
/// not confirm it, with what they or the link said.
fn decide(nodes: &[&LiveNode], epoch: i64, barrier: &str, commit: bool) -> Vec<(String, String)> {
    let request = PeerRequest::Decide { epoch, barrier: barrier.to_string(), commit };
    let owned: Vec<LiveNode> = nodes.iter().map(|n| (*n).clone()).collect();
    let mut failed = Vec::new();
    for (n, r) in owned.iter().zip(peer::on_every(&owned, |n| peer::call::<serde_json::Value>(&n.peer, &request, Duration::from_secs(10)))) {
        if let Err(e) = r {
            tracing::warn!(node = %n.node, barrier, commit, error = %e.message, "decision not confirmed");
            failed.push((n.node.clone(), e.message));
        }
    }
    failed
}
