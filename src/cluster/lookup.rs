//! What a process that is not a node asks etcd (`nbdvirt cluster apply
//! --etcd`): the coordinator and the endpoint of its peer link. A runtime
//! of its own for the one question, bounded like every etcd call.

use super::etcd::Etcd;
use super::keys::{self, MemberRecord};
use super::ClusterError;
use std::time::Duration;

/// The coordinator of cluster `name` on `endpoints`: (node, epoch, peer).
pub fn coordinator_of(endpoints: &[String], name: &str, limit: Duration) -> Result<(String, i64, String), ClusterError> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| ClusterError::Thread(e.to_string()))?;
    runtime.block_on(async {
        let etcd = Etcd::connect(endpoints, limit).await?;
        let entry = etcd.get(&keys::coordinator(name)).await?.ok_or_else(|| ClusterError::NotCoordinator(format!("cluster '{name}' has no coordinator in etcd (no node running?)")))?;
        let node = String::from_utf8_lossy(&entry.value).into_owned();
        let member = etcd.get(&keys::member(name, &node)).await?.ok_or_else(|| ClusterError::BadRecord(format!("coordinator {node} has no member record")))?;
        let record: MemberRecord = serde_json::from_slice(&member.value).map_err(|e| ClusterError::BadRecord(e.to_string()))?;
        Ok((node, entry.create_revision, record.peer))
    })
}
