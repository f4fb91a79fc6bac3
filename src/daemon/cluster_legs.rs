//! This node's part in mirror leg failures across the cluster
//! (`cluster/legs.rs`): it announces its own before I/O that missed the
//! leg is answered, marks those the other nodes announce, and, catching
//! up, those recorded in etcd.

use super::cluster_node::ClusterNode;
use super::mirror_error::MirrorError;
use super::{Daemon, DaemonError};
use crate::cluster::FailedLegRecord;
use crate::volume::{LegAnnouncer, LegCondition, Volume};

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
}
