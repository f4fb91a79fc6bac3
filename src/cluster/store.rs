//! The cluster's etcd calls made from other threads than its own (the
//! barrier's driver on the coordinator, a node's hold settling itself):
//! each runs on the cluster thread's runtime and is bounded like all.

use super::etcd::{CommitKeys, Etcd};
use super::keys::{self, VolumeRecord};
use super::{Cluster, ClusterError};
use crate::sync::lock;
use std::future::Future;

/// A node a barrier holds: its id, peer endpoint and lease (0: a member
/// without a live lease that may serve in failsafe).
#[derive(Debug, Clone)]
pub struct LiveNode {
    pub node: String,
    pub peer: String,
    pub lease: i64,
}

impl Cluster {
    pub(super) fn run<T>(&self, call: impl FnOnce(Etcd) -> T) -> Result<T::Output, ClusterError>
    where
        T: Future,
    {
        let etcd = lock(&self.shared.etcd).clone().ok_or(ClusterError::NoEtcd)?;
        Ok(self.handle.block_on(call(etcd)))
    }

    pub(crate) fn name(&self) -> &str {
        &self.shared.cfg.name
    }

    pub fn node(&self) -> &str {
        &self.shared.cfg.node
    }

    /// The coordinator as last seen: (node, epoch, its peer endpoint).
    pub fn coordinator(&self) -> Option<(String, i64, Option<String>)> {
        let view = super::lock_view(&self.shared);
        let c = view.coordinator.clone()?;
        let peer = view.nodes.iter().find(|n| n.node == c.node && n.alive).map(|n| n.peer.clone());
        Some((c.node, c.epoch, peer))
    }

    /// Every node holding a live lease now, and the revision of the read.
    pub(crate) fn live_nodes(&self) -> Result<(Vec<LiveNode>, i64), ClusterError> {
        let prefix = keys::nodes(self.name());
        let (entries, revision) = self.run(|e| async move { e.list_at(&prefix).await })??;
        let nodes = entries
            .into_iter()
            .filter_map(|e| {
                let r: keys::NodeRecord = serde_json::from_slice(&e.value).ok()?;
                Some(LiveNode { node: r.node, peer: r.peer, lease: e.lease })
            })
            .collect();
        Ok((nodes, revision))
    }

    /// Every node that ever joined the cluster.
    pub(super) fn members(&self) -> Result<Vec<keys::MemberRecord>, ClusterError> {
        let prefix = keys::members(self.name());
        let entries = self.run(|e| async move { e.list(&prefix).await })??;
        Ok(entries.into_iter().filter_map(|e| serde_json::from_slice(&e.value).ok()).collect())
    }

    /// Deletes `node`'s member record and fenced mark.
    pub(super) fn drop_member(&self, node: &str) -> Result<(), ClusterError> {
        for key in [keys::member(self.name(), node), keys::fenced(self.name(), node)] {
            self.run(|e| async move { e.delete(&key).await })??;
        }
        Ok(())
    }

    /// Whether `lease` has expired in etcd (so its node serves nothing).
    pub(crate) fn lease_expired(&self, lease: i64) -> Result<bool, ClusterError> {
        Ok(self.run(|e| async move { e.ttl_left(lease).await })??.is_none())
    }

    /// The coordinator's commit of barrier `barrier` (see `Etcd::commit`).
    pub(crate) fn commit(&self, epoch: i64, listed: i64, barrier: &str, writes: Vec<(String, Vec<u8>)>) -> Result<bool, ClusterError> {
        let cluster = self.name();
        let (coordinator, nodes, decision) = (keys::coordinator(cluster), keys::nodes(cluster), keys::decision(cluster, barrier));
        self.run(|e| async move {
            let keys = CommitKeys { coordinator: &coordinator, epoch, nodes: &nodes, listed, decision: &decision };
            e.commit(&keys, writes).await
        })?
        .map_err(Into::into)
    }

    /// A hold past its wait: the barrier's decision, made "abort" if none.
    pub fn settle(&self, barrier: &str) -> Result<bool, ClusterError> {
        let decision = keys::decision(self.name(), barrier);
        self.run(|e| async move { e.settle(&decision).await })?.map_err(Into::into)
    }

    /// The committed table of `volume`, if a barrier ever committed one;
    /// `EtcdDown` if etcd does not answer (a change is refused then).
    pub fn committed(&self, volume: &str) -> Result<Option<VolumeRecord>, ClusterError> {
        let key = keys::volume(self.name(), volume);
        let found = self.run(|e| async move { e.get(&key).await })?.map_err(|e| ClusterError::EtcdDown(e.to_string()))?;
        match found {
            Some(entry) => serde_json::from_slice(&entry.value).map(Some).map_err(|e| ClusterError::BadRecord(e.to_string())),
            None => Ok(None),
        }
    }

    /// Notes that `node` was committed past during `barrier`.
    pub(crate) fn record_fenced(&self, node: &str, barrier: &str) {
        let key = keys::fenced(self.name(), node);
        let value = barrier.as_bytes().to_vec();
        if let Err(e) = self.run(|e| async move { e.put(&key, value, 0).await }).and_then(|r| r.map_err(Into::into)) {
            tracing::warn!(node, error = %e, "could not record the node as fenced");
        }
    }

    /// Accepts a command of coordinator epoch `epoch`: refused if older
    /// than the highest this node has seen, persisted if newer.
    pub fn accept_epoch(&self, epoch: i64) -> Result<(), ClusterError> {
        self.shared.note_epoch(epoch)
    }

    /// Whether this node may serve now (its fence is open).
    pub fn serving(&self) -> bool {
        self.shared.fence.is_open()
    }
}
