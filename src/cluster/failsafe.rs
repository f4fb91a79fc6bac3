//! Failsafe: a node serves on past its lease while etcd does not answer,
//! as long as every peer does, for at most `[cluster] failsafe` past the
//! deadline of its last renewal; and the coordinator's side of it, which
//! commits past a silent node only once that window is surely over.
//!
//! Why this is safe (the full argument is in docs/ARCHITECTURE.md, "When
//! a node may serve"): a table changes only by a barrier committed in
//! etcd, so while nobody reaches etcd every node's table stays the
//! committed one. The danger is a commit made by a coordinator that does
//! reach etcd while a node that does not serves on: such a commit either
//! holds the node (it stops or swaps with everyone) or goes past it, and
//! going past a node waits until this node has seen it without a live
//! lease for `failsafe`. The node's failsafe ends at its last granted
//! deadline (its lease's end in etcd minus the margin) plus `failsafe`, so
//! before that wait is over. The peer rounds are not needed for that
//! bound; they make a node cut off from everyone stop at its lease's end,
//! so its clients move to nodes that still work.

use super::lease;
use super::member::Member;
use super::peer;
use super::store::LiveNode;
use super::{lock_view, Cluster, ClusterError, View};
use crate::api::{FailsafeAck, PeerRequest};
use std::time::{Duration, Instant};

impl Member {
    /// The fence is open on the peers' word (etcd said nothing lately).
    pub(super) fn riding_out(&self) -> bool {
        lock_view(&self.shared).failsafe && self.shared.fence.is_open()
    }

    /// Records whether the fence's deadline is the peers' (true) or etcd's.
    pub(super) fn set_failsafe(&mut self, on: bool) {
        let was = std::mem::replace(&mut lock_view(&self.shared).failsafe, on);
        if was && !on {
            tracing::info!("etcd renewed the lease again: failsafe over");
            self.failsafe_missing = None;
        }
    }

    /// etcd did not answer: asks every peer that was alive at the last
    /// look; if all answer, serves one more window, never past the bound.
    pub(super) async fn ride_out(&mut self) {
        let cfg = self.shared.cfg.clone();
        let Some(leased_until) = self.leased_until else { return };
        if cfg.failsafe.is_zero() || self.shared.barred() || Instant::now() >= leased_until + cfg.failsafe {
            return;
        }
        let peers: Vec<(String, String)> = lock_view(&self.shared).nodes.iter().filter(|n| n.alive && n.node != cfg.node).map(|n| (n.node.clone(), n.peer.clone())).collect();
        let limit = super::call_limit(&cfg);
        let sent = Instant::now();
        let me = cfg.node.clone();
        // Blocking calls, off the runtime that drives other threads' etcd calls.
        let missing = match tokio::task::spawn_blocking(move || unanswered(&peers, &me, limit)).await {
            Ok(m) => m,
            Err(_) => return,
        };
        if missing.is_empty() {
            let until = lease::failsafe_until(sent, cfg.lease_ttl, leased_until, cfg.failsafe);
            self.shared.open_fence(until);
            if !lock_view(&self.shared).failsafe {
                tracing::warn!(bound_s = (leased_until + cfg.failsafe).saturating_duration_since(Instant::now()).as_secs_f64(), "etcd does not answer but every peer does: serving on in failsafe (no cluster change until etcd is back)");
            }
            self.set_failsafe(true);
        } else if self.failsafe_missing.as_ref() != Some(&missing) {
            tracing::warn!(peers = missing.join(", "), "etcd does not answer, nor do these peers: serving ends at the lease's end");
            self.failsafe_missing = Some(missing);
        }
    }
}

/// The peers (node, endpoint) that did not answer a failsafe round.
fn unanswered(peers: &[(String, String)], me: &str, limit: Duration) -> Vec<String> {
    let request = PeerRequest::Failsafe { node: me.to_string() };
    std::thread::scope(|s| {
        let calls: Vec<_> = peers.iter().map(|(node, addr)| (node, s.spawn(|| peer::call::<FailsafeAck>(addr, &request, limit)))).collect();
        calls.into_iter().filter_map(|(node, call)| (!matches!(call.join(), Ok(Ok(ack)) if &ack.node == node)).then(|| node.clone())).collect()
    })
}

/// How long `node` has been seen without a live lease (from now on if it
/// was not seen so yet).
fn dead_for(view: &mut View, node: &str, now: Instant) -> Duration {
    now - *view.dead_since.entry(node.to_string()).or_insert(now)
}

impl Cluster {
    /// The members a barrier must hold besides the live ones: those that
    /// may still serve in failsafe (no live lease, but seen so for less
    /// than `failsafe`). Their `lease` is 0.
    pub(super) fn maybe_serving(&self, live: &[LiveNode]) -> Result<Vec<LiveNode>, ClusterError> {
        let failsafe = self.shared.cfg.failsafe;
        if failsafe.is_zero() {
            return Ok(Vec::new());
        }
        let members = self.members()?;
        let now = Instant::now();
        let mut view = lock_view(&self.shared);
        Ok(members
            .into_iter()
            .filter(|m| m.node != self.node() && !live.iter().any(|l| l.node == m.node))
            .filter(|m| dead_for(&mut view, &m.node, now) < failsafe)
            .map(|m| LiveNode { node: m.node, peer: m.peer, lease: 0 })
            .collect())
    }

    /// Waits until `node`, silent, has been seen without a live lease for
    /// `failsafe`: from then on it serves nothing, not even in failsafe.
    pub(super) fn wait_out_failsafe(&self, node: &str) {
        let failsafe = self.shared.cfg.failsafe;
        let left = failsafe.saturating_sub(dead_for(&mut lock_view(&self.shared), node, Instant::now()));
        if !left.is_zero() {
            tracing::info!(node, wait_s = left.as_secs_f64(), "waiting out the silent node's failsafe window before committing past it");
            std::thread::sleep(left);
        }
    }

    /// `cluster forget NODE`: drops the records of a member gone for good
    /// (else a new coordinator's first change waits `failsafe` for it).
    /// Refused while it is alive, and while it may still serve in failsafe.
    pub fn forget(&self, node: &str) -> Result<(), ClusterError> {
        let (live, _) = self.live_nodes()?;
        if live.iter().any(|l| l.node == node) || node == self.node() {
            return Err(ClusterError::MemberAlive(node.into()));
        }
        if !self.members()?.iter().any(|m| m.node == node) {
            return Err(ClusterError::NoMember(node.into()));
        }
        let left = self.shared.cfg.failsafe.saturating_sub(dead_for(&mut lock_view(&self.shared), node, Instant::now()));
        if !left.is_zero() {
            return Err(ClusterError::MemberMayServe { node: node.into(), left_ms: left.as_millis() as u64 });
        }
        self.drop_member(node)?;
        lock_view(&self.shared).dead_since.remove(node);
        tracing::info!(node, "member forgotten");
        Ok(())
    }
}
