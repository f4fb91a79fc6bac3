//! This node's part in mirror legs across the cluster: it announces its
//! own leg failures before I/O that missed the leg is answered
//! (`cluster/legs.rs`), marks those the other nodes announce, and,
//! catching up, those recorded in etcd; `mirror add|remove|readd` change
//! the table on every node by a barrier.

use super::cluster_node::ClusterNode;
use super::mirror_error::MirrorError;
use super::{Daemon, DaemonError};
use crate::api::{MirrorStatus, PeerRequest, TableChange};
use crate::cluster::peer;
use crate::cluster::FailedLegRecord;
use crate::map::Extent;
use crate::volume::{LegAnnouncer, LegCondition, Volume};
use std::sync::Arc;
use std::time::Duration;

impl LegAnnouncer for ClusterNode {
    fn announce(&self, volume: &str, leg: &str, reason: &str) -> Result<(), String> {
        let daemon = self.0.upgrade().ok_or("the node is stopping")?;
        let cluster = daemon.member().map_err(|e| e.to_string())?;
        cluster.announce_leg_failure(volume, leg, reason).map_err(|e| e.to_string())
    }
}

impl Daemon {
    /// Makes `volume` one the other nodes write too: a resync checks its
    /// copies, and a leg failure is announced before I/O that missed the
    /// leg is answered. No-op before the node has joined (`join_cluster`
    /// does it then for every volume) and outside a cluster.
    pub(super) fn share_with_cluster(&self, volume: &Volume) {
        if let Some(node) = self.cluster_node.get() {
            let red = volume.translation().redundancy().clone();
            red.set_other_writers(true);
            red.set_announcer(node.clone());
        }
    }

    /// `PeerRequest::LegFailed`: node `node` says leg `leg` of `volume`
    /// failed there. A volume this node does not have yet reads the mark
    /// in etcd when it is added (catching up).
    pub(super) fn leg_failed_here(&self, volume: &str, leg: &str, node: &str, reason: &str) -> Result<(), DaemonError> {
        let Ok(v) = self.volume(volume) else {
            return Ok(());
        };
        let red = v.translation().redundancy().clone();
        if red.leg_failed_elsewhere(leg, &format!("on node {node}: {reason}")).map_err(|source| MirrorError::State { volume: volume.into(), source })? {
            // Copying into a leg nobody uses any more is wasted.
            self.mirrors.stop_job(volume, leg);
        }
        Ok(())
    }

    /// Catching up, before the failed-leg marks: a leg resyncing here that
    /// a live node has in sync is in sync here too. Every node writes every
    /// writable leg, so a leg in sync on one node (its checked copy done,
    /// or in sync since) has every write answered anywhere since, unless
    /// it failed somewhere, which its mark then says. So a node that lost
    /// its own record (new, or its `state_dir` gone) need not copy legs
    /// again, and can serve when the first leg has failed. Best effort:
    /// a node that does not answer leaves the leg to its resync.
    pub(super) fn legs_in_sync_elsewhere(&self, peers: &[(String, String)]) {
        for volume in self.catalog().volumes.values() {
            let red = volume.translation().redundancy().clone();
            let resyncing: Vec<_> = red.legs().into_iter().filter(|l| l.condition() == LegCondition::Resyncing).collect();
            if resyncing.is_empty() {
                continue;
            }
            let request = PeerRequest::MirrorStatus { volume: volume.name().into() };
            let views = peer::on_every(peers, |(_, p)| peer::call::<MirrorStatus>(p, &request, Duration::from_secs(2)));
            for leg in resyncing {
                let elsewhere = peers.iter().zip(&views).find(|(_, v)| v.as_ref().is_ok_and(|v| v.legs.iter().any(|l| l.backend == leg.store() && l.state == "in_sync")));
                let Some(((node, _), _)) = elsewhere else { continue };
                match leg.make_in_sync().and_then(|()| red.save_legs()) {
                    Ok(()) => tracing::info!(volume = volume.name(), leg = leg.store(), node = %node, "mirror leg in sync on another node: in sync here too"),
                    Err(e) => tracing::warn!(volume = volume.name(), leg = leg.store(), error = %e, "could not record the leg as in sync; it resyncs"),
                }
            }
        }
    }

    /// Catching up: the legs marked failed in etcd take no I/O here; a leg
    /// that failed here without a mark (this node stopped before it could
    /// announce it) is announced before I/O that misses it is answered.
    pub(super) fn apply_failed_leg_marks(&self, marks: &[FailedLegRecord]) -> Result<(), DaemonError> {
        for volume in self.catalog().volumes.values() {
            let red = volume.translation().redundancy().clone();
            for leg in red.legs() {
                match marks.iter().find(|m| m.volume == volume.name() && m.leg == leg.store()) {
                    Some(m) => {
                        self.leg_failed_here(volume.name(), leg.store(), &m.node, &m.reason)?;
                    }
                    None if leg.condition() == LegCondition::Failed => leg.set_announced(false),
                    None => {}
                }
            }
        }
        Ok(())
    }

    /// A mirror operation's new table, on every node by one barrier. An
    /// `added` leg joins resyncing on every node and each node's
    /// supervisor copies it (checked copies); this node at `rate`.
    pub(super) fn change_legs_cluster_wide(&self, volume: &Arc<Volume>, extents: Vec<Extent>, added: Option<(&str, Option<u64>)>) -> Result<(), DaemonError> {
        let cluster = self.member()?;
        // A migration's job (on any node) changes this volume's legs too.
        if let Some(node) = cluster.migration_claimant(volume.name())? {
            return Err(crate::cluster::ClusterError::Claimed { volume: volume.name().into(), node }.into());
        }
        let change = TableChange { volume: volume.name().into(), extents, catalog: None, strict: false };
        let report = self.apply_anywhere(cluster, vec![change])?;
        for v in &report.volumes {
            for node in &v.unconfirmed {
                // Committed all the same: that node fenced itself or settles.
                tracing::warn!(volume = v.volume, generation = v.generation, node = %node, "a node did not confirm the mirror's table change");
            }
        }
        if let Some((leg, Some(rate))) = added {
            self.start_resync(volume, leg, Some(rate));
        }
        Ok(())
    }

    /// `mirror readd` in a cluster: each node's leg missed what that node
    /// wrote, and no node knows what the others did, so the leg leaves the
    /// table and comes back last in each extent (never first: a first leg
    /// counts as in sync), resyncing on every node as a new leg does.
    pub(super) fn readd_cluster_wide(&self, volume: &Arc<Volume>, leg: &str, rate: Option<u64>) -> Result<(), DaemonError> {
        let with_leg = volume.table().extents().to_vec();
        let without = crate::map::drop_leg(&with_leg, crate::map::Range::new(0, volume.size()), leg).map_err(|source| MirrorError::Table { volume: volume.name().into(), source })?;
        self.change_legs_cluster_wide(volume, without, None)?;
        let mut back = with_leg;
        for e in &mut back {
            if let crate::map::TargetSpec::Mirror { legs, .. } = &mut e.target {
                if let Some(i) = legs.iter().position(|l| l.store == leg) {
                    let l = legs.remove(i);
                    legs.push(l);
                }
            }
        }
        self.change_legs_cluster_wide(volume, back, Some((leg, rate)))?;
        tracing::info!(volume = volume.name(), leg, "failed leg re-added on every node; each resyncs all of it");
        Ok(())
    }
}
