//! What nodes of a cluster say to each other on their `peer` endpoints
//! (one JSON request per TCP connection, answered with a `Response`), and
//! what `cluster apply` reports.

use crate::map::Extent;
use serde::{Deserialize, Serialize};

/// One volume's new table; or, with `catalog`, the cluster's set of
/// volumes and backends (`volume` is then [`CATALOG`], `extents` empty).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableChange {
    pub volume: String,
    pub extents: Vec<Extent>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catalog: Option<CatalogChange>,
    /// A node that does not answer fails the barrier rather than being
    /// committed past once its lease expired (a migration's cutover).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub strict: bool,
}

/// The committed table of a volume, as every node must serve it (etcd's
/// `volumes/<volume>`); `removed`: a tombstone, kept so that a volume of
/// the same name added again continues its generations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub volume: String,
    pub generation: u64,
    pub extents: Vec<Extent>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub removed: bool,
}

/// The name a catalog barrier goes by where a volume's would (no volume
/// name can contain parentheses).
pub const CATALOG: &str = "(catalog)";

/// A `cluster apply` that adds or removes volumes or backends: the file
/// whose `[[backend]]`s and `[[volume]]`s become the cluster's (its other
/// sections are ignored; each node keeps its own), as text, so that every
/// node, and one joining later, reads the same.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CatalogChange {
    /// The file's name (in messages) and the directory its relative paths
    /// are relative to.
    pub file: String,
    pub base: std::path::PathBuf,
    pub text: String,
    /// Disconnect the clients of removed volumes (else refused while any node has one).
    #[serde(default)]
    pub force: bool,
    /// Written with the commit (set by the coordinator): the added
    /// volumes' first tables and the removed ones' tombstones.
    #[serde(default)]
    pub records: Vec<VolumeRecord>,
}

/// The coordinator's order to take part in a barrier: stage the volume's
/// new table, prepare it, hold and drain the ranges it changes, answer
/// `Held`, then wait for `Decide` (or, past `decide_within_ms`, ask etcd).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HoldOrder {
    pub epoch: i64,
    /// Names the barrier, and its decision key in etcd.
    pub barrier: String,
    pub volume: String,
    pub generation: u64,
    pub extents: Vec<Extent>,
    pub decide_within_ms: u64,
    /// A catalog barrier: add and remove volumes and backends (`volume`
    /// is [`CATALOG`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catalog: Option<CatalogChange>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum PeerRequest {
    /// To the coordinator: change these tables on every node.
    Apply { changes: Vec<TableChange> },
    /// To the coordinator, from `cluster apply --etcd` (no node at hand):
    /// a config file's text, named `file`, its relative paths relative to
    /// `base`; its volumes' tables are applied as by `cluster apply`.
    ApplyConfig {
        file: String,
        base: std::path::PathBuf,
        text: String,
        /// Disconnect the clients of volumes the file removes.
        #[serde(default)]
        force: bool,
    },
    Hold(HoldOrder),
    /// Ends a hold: commit (swap and resume) or abort (resume on the old table).
    Decide { epoch: i64, barrier: String, commit: bool },
    /// From a node that cannot reach etcd: are you there? It serves on
    /// only while every peer answers (`crate::cluster::failsafe`).
    Failsafe { node: String },
    /// The migrations whose job runs on the asked node (`migrate status`
    /// through another node), answered with a `MigrationList`.
    Migrations { volume: Option<String> },
    /// Aborts the migration of `volume` whose job runs on the asked node,
    /// answered with its `MigrationStatus`.
    MigrateAbort { volume: String },
    /// `pause` through another node: pause `volume` here too (answered
    /// with the message, once held and drained).
    Pause { volume: String, range: Option<crate::map::Range>, timeout_ms: u64 },
    /// `resume` through another node: end this node's pause of `volume`.
    Resume { volume: String },
    /// Mirror leg `leg` of `volume` failed on `node`: use it no more here
    /// (answered once marked; `cluster/legs.rs`).
    LegFailed { volume: String, leg: String, node: String, reason: String },
    /// The legs of `volume` as the asked node sees them (a node catching
    /// up without its own record of them), answered with a `MirrorStatus`.
    MirrorStatus { volume: String },
}

/// The answer to `Failsafe`: the node that answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailsafeAck {
    pub node: String,
}

/// A node's answer to `Hold`: its ranges are held and drained.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    pub node: String,
    pub drain_us: u64,
}

/// One volume's barrier, as the coordinator saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BarrierReport {
    pub volume: String,
    pub generation: u64,
    /// The nodes that swapped.
    pub nodes: Vec<String>,
    /// Nodes that did not answer and were committed past once their lease
    /// had expired in etcd.
    #[serde(default)]
    pub fenced: Vec<String>,
    /// Nodes that held but did not confirm the committed table: `node:
    /// why` (one that could not take it fenced itself; one the decision
    /// did not reach settles with etcd and takes it then).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unconfirmed: Vec<String>,
    pub attempts: u32,
    /// From the first `Hold` sent to the last `Decide` answered: the
    /// longest any node held (µs).
    pub hold_us: u64,
    /// The commit transaction in etcd (µs).
    pub commit_us: u64,
    /// A catalog barrier (`volume` is [`CATALOG`]): the volumes it added
    /// and removed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub added: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<String>,
}

/// `cluster apply`: one report per changed volume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApplyReport {
    pub coordinator: String,
    pub epoch: i64,
    pub volumes: Vec<BarrierReport>,
}
