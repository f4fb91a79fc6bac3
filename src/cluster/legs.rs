//! Mirror leg failures across the cluster. A node whose leg failed writes
//! only the other legs from then on; every other node must stop reading
//! that leg before such a write is answered, or it would read the bytes
//! from before it. So the failure is recorded in etcd (a node that joins
//! later reads it while catching up) and told to every node that may
//! serve; one that does not answer is waited out like a barrier's silent
//! node (its lease expired, its failsafe window over) and recorded as
//! fenced: it serves nothing until it has joined again and caught up.

use super::keys::{self, FailedLegRecord};
use super::peer;
use super::{Cluster, ClusterError};
use crate::api::{PeerRequest, TableChange};
use crate::map::Extent;
use std::time::Duration;

/// How long a node may take to mark a leg failed (a file write).
const TELL_LIMIT: Duration = Duration::from_secs(2);

impl Cluster {
    /// Announces that `leg` of `volume` failed on this node (see above);
    /// returns once no node may read it any more.
    pub fn announce_leg_failure(&self, volume: &str, leg: &str, reason: &str) -> Result<(), ClusterError> {
        let record = FailedLegRecord { volume: volume.into(), leg: leg.into(), node: self.node().into(), reason: reason.into() };
        let key = keys::failed_leg(self.name(), volume, leg);
        let value = serde_json::to_vec(&record).expect("a failed-leg record serializes");
        // Before the nodes are listed: one joining after the list reads it.
        self.run(|e| async move { e.put(&key, value, 0).await })?.map_err(|e| ClusterError::EtcdDown(e.to_string()))?;
        let (mut nodes, _) = self.live_nodes()?;
        nodes.extend(self.maybe_serving(&nodes)?);
        nodes.retain(|n| n.node != self.node());
        let request = PeerRequest::LegFailed { volume: volume.into(), leg: leg.into(), node: self.node().into(), reason: reason.into() };
        let answers = peer::on_every(&nodes, |n| peer::call::<serde_json::Value>(&n.peer, &request, TELL_LIMIT));
        for (node, answer) in nodes.iter().zip(answers) {
            if let Err(e) = answer {
                tracing::warn!(node = %node.node, volume, leg, error = %e.message, "a node did not hear of the failed leg: waiting until it serves nothing");
                if !self.wait_fenced(node, &format!("leg {leg} of {volume} failed"))? {
                    return Err(ClusterError::Barrier { volume: volume.into(), reason: format!("node {} does not hear of failed leg '{leg}' but its lease is alive", node.node) });
                }
            }
        }
        Ok(())
    }

    /// Every failed-leg mark in etcd.
    fn failed_legs(&self) -> Result<Vec<FailedLegRecord>, ClusterError> {
        let prefix = keys::failed_legs(self.name());
        let entries = self.run(|e| async move { e.list(&prefix).await })??;
        entries.iter().map(|e| serde_json::from_slice(&e.value).map_err(|e| ClusterError::BadRecord(e.to_string()))).collect()
    }

    /// After `change` committed: deletes the marks of legs its tables
    /// dropped (a volume it removed keeps none), so that a leg added there
    /// again starts afresh. One listing for the whole change. Best effort:
    /// a mark left over, or written for such a leg after the listing, only
    /// keeps that store's leg unused.
    pub(super) fn forget_dropped_legs(&self, change: &TableChange) {
        let stores = |extents: &[Extent]| -> Vec<String> { extents.iter().filter_map(|e| e.target.legs()).flatten().map(|l| l.store.clone()).collect() };
        let tables: Vec<(&str, Vec<String>)> = match &change.catalog {
            None => vec![(change.volume.as_str(), stores(&change.extents))],
            Some(c) => c.records.iter().map(|r| (r.volume.as_str(), if r.removed { Vec::new() } else { stores(&r.extents) })).collect(),
        };
        let dropped = |m: &FailedLegRecord| tables.iter().any(|(volume, kept)| m.volume == *volume && !kept.contains(&m.leg));
        let forgotten = self.failed_legs().and_then(|marks| {
            for mark in marks.iter().filter(|m| dropped(m)) {
                let key = keys::failed_leg(self.name(), &mark.volume, &mark.leg);
                self.run(|e| async move { e.delete(&key).await })??;
                tracing::info!(volume = mark.volume, leg = mark.leg, "failed-leg mark dropped: the leg left the table");
            }
            Ok(())
        });
        if let Err(e) = forgotten {
            tracing::warn!(volume = change.volume, error = %e, "could not drop the failed-leg marks of legs the table dropped");
        }
    }
}
