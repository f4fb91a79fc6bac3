//! `cluster_status`: the cluster as this node sees it in etcd — its
//! members, whether each holds a live lease, the coordinator and its epoch.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Whether this node may serve I/O (see ARCHITECTURE: Cluster).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Not yet registered in etcd: serves nothing.
    Joining,
    /// Its lease is certainly valid: serves.
    Serving,
    /// etcd does not answer but every peer does: serves on, for at most
    /// `[cluster] failsafe` past its lease.
    Failsafe,
    /// Its lease lapsed (or may have): serves nothing until it re-joins.
    Fenced,
}

impl std::fmt::Display for NodeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NodeState::Joining => "joining",
            NodeState::Serving => "serving",
            NodeState::Failsafe => "failsafe",
            NodeState::Fenced => "fenced",
        })
    }
}

/// Where the cluster's volumes and backends come from: the last `cluster
/// apply` that added or removed any.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogView {
    /// The file it applied (as named where it was read).
    pub file: String,
    /// The coordinator that committed it, and when (Unix seconds).
    pub node: String,
    pub applied_at: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoordinatorView {
    pub node: String,
    /// The creation revision of the coordinator key in etcd: higher for
    /// every new coordinator, sent with every command it gives.
    pub epoch: i64,
}

/// One member of the cluster (every node that ever joined it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    pub node: String,
    /// Its node-to-node endpoint.
    pub peer: String,
    /// Holds a live membership lease in etcd.
    pub alive: bool,
    /// What is left of that lease, as etcd last said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_left_ms: Option<u64>,
    pub coordinator: bool,
    /// The generation of each volume it serves, as it last published.
    #[serde(default)]
    pub generations: BTreeMap<String, u64>,
    /// The barrier that was committed past it (it did not answer), until
    /// it joins again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fenced_by: Option<String>,
    /// Where it serves NBD (nodes forward to it there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serve: Option<String>,
}

/// A barrier this node takes part in now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BarrierView {
    pub barrier: String,
    pub volume: String,
    /// The generation it would commit.
    pub generation: u64,
    /// `coordinating` (this node runs it) or `holding` (its ranges are
    /// held here, waiting for the decision).
    pub role: String,
    pub running_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// The cluster's name (its keys live under `/nbdvirt/<name>/`).
    pub name: String,
    /// The node that answered.
    pub node: String,
    pub etcd: Vec<String>,
    pub lease_ttl_ms: u64,
    pub state: NodeState,
    /// How much longer this node may serve without another renewal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving_left_ms: Option<u64>,
    /// The last etcd error, while the last call failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd_error: Option<String>,
    /// How old the view below is (it is refreshed at every renewal).
    pub observed_ms_ago: u64,
    pub coordinator: Option<CoordinatorView>,
    /// The highest coordinator epoch this node has seen (persisted; older
    /// epochs are refused).
    pub highest_epoch: i64,
    pub nodes: Vec<NodeView>,
    /// Barriers in progress on this node.
    #[serde(default)]
    pub barriers: Vec<BarrierView>,
    /// `None`: every node serves its own config's volumes and backends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catalog: Option<CatalogView>,
}
