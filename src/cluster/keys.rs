//! Where the cluster keeps what in etcd, and the records it writes there.
//!
//! ```text
//! /nbdvirt/<name>/nodes/<node>    NodeRecord, bound to the node's lease:
//!                                 present exactly while the lease lives
//! /nbdvirt/<name>/members/<node>  MemberRecord, no lease: every node that
//!                                 ever joined, so status shows dead ones
//! /nbdvirt/<name>/coordinator     the coordinator's node id, bound to its
//!                                 lease; its create revision is the epoch
//! /nbdvirt/<name>/failed-legs/<volume>/<leg>
//!                                 FailedLegRecord: a mirror leg no node uses
//! ```

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub fn prefix(cluster: &str) -> String {
    format!("/nbdvirt/{cluster}/")
}

pub fn nodes(cluster: &str) -> String {
    format!("{}nodes/", prefix(cluster))
}

pub fn node(cluster: &str, node: &str) -> String {
    format!("{}{node}", nodes(cluster))
}

pub fn members(cluster: &str) -> String {
    format!("{}members/", prefix(cluster))
}

pub fn member(cluster: &str, node: &str) -> String {
    format!("{}{node}", members(cluster))
}

pub fn coordinator(cluster: &str) -> String {
    format!("{}coordinator", prefix(cluster))
}

/// A barrier's decision ("commit" or "abort"), written once.
pub fn decision(cluster: &str, barrier: &str) -> String {
    format!("{}barriers/{barrier}", prefix(cluster))
}

/// A volume's committed generation.
pub fn volume(cluster: &str, volume: &str) -> String {
    format!("{}{volume}", volumes(cluster))
}

pub fn volumes(cluster: &str) -> String {
    format!("{}volumes/", prefix(cluster))
}

/// The node whose job migrates `volume` (its copier), bound to that
/// node's lease: created only if absent, so one copier at a time.
pub fn migration(cluster: &str, volume: &str) -> String {
    format!("{}migrations/{volume}", prefix(cluster))
}

/// A node committed past (its lease expired while it held a barrier up),
/// until it joins again; the value is the barrier's name.
pub fn fenced(cluster: &str, node: &str) -> String {
    format!("{}{node}", fenced_all(cluster))
}

pub fn fenced_all(cluster: &str) -> String {
    format!("{}fenced/", prefix(cluster))
}

pub use crate::api::VolumeRecord;

/// A mirror leg that failed on some node (`FailedLegRecord`): no node
/// uses it, one joining later included, until it leaves the table.
pub fn failed_leg(cluster: &str, volume: &str, leg: &str) -> String {
    format!("{}{volume}/{leg}", failed_legs(cluster))
}

pub fn failed_legs(cluster: &str) -> String {
    format!("{}failed-legs/", prefix(cluster))
}

/// Where and why a mirror leg failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedLegRecord {
    pub volume: String,
    pub leg: String,
    pub node: String,
    pub reason: String,
}

/// The cluster's volumes and backends: the last `cluster apply` that
/// added or removed any (absent: each node's own config's).
pub fn catalog(cluster: &str) -> String {
    format!("{}catalog", prefix(cluster))
}

/// The file a catalog came from (see `api::CatalogChange`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogRecord {
    pub file: String,
    pub base: std::path::PathBuf,
    pub text: String,
    /// The coordinator that committed it, and when (Unix seconds).
    #[serde(default)]
    pub node: String,
    #[serde(default)]
    pub applied_at: u64,
}

/// A live node, as it publishes itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub node: String,
    pub peer: String,
    pub pid: u32,
    pub version: String,
    /// The generation of each volume it serves.
    #[serde(default)]
    pub generations: BTreeMap<String, u64>,
    /// Where it serves NBD: nodes that cannot reach a store forward to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serve: Option<String>,
}

/// A node that joined once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    pub node: String,
    pub peer: String,
}

/// The highest coordinator epoch a node has seen (`STATE_DIR/cluster/epoch.json`).
/// Older epochs are refused: etcd's revisions only grow, so an older one
/// means a replaced etcd cluster or a stale coordinator.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochRecord {
    pub highest: i64,
}

pub const EPOCH_FILE: &str = "cluster/epoch.json";

#[cfg(test)]
mod tests {
    #[test]
    fn keys_live_under_the_cluster_prefix() {
        assert_eq!(super::node("prod", "n1"), "/nbdvirt/prod/nodes/n1");
        assert_eq!(super::member("prod", "n1"), "/nbdvirt/prod/members/n1");
        assert_eq!(super::coordinator("prod"), "/nbdvirt/prod/coordinator");
        // A cluster named "a" must not see the keys of one named "ab".
        assert!(!super::node("ab", "n1").starts_with(&super::prefix("a")));
    }
}
