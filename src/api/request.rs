//! Control requests. One JSON object per line each way:
//!
//! ```text
//! -> {"command":"status"}
//! <- {"ok":true,"result":{...}}
//! -> {"command":"pause","volume":"v","range":{"start":0,"length":4096},"timeout_ms":10000}
//! <- {"ok":false,"error":"no volume named 'v'","kind":"not_found"}
//! ```

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeArg {
    pub start: u64,
    pub length: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
/// Unknown fields are ignored, so newer clients can talk to older servers.
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// This node's view of its cluster (`[cluster]` nodes only).
    ClusterStatus,
    /// Makes `config`'s volumes and backends (a config file the server
    /// reads) the cluster's: adds and removes them on every node (one
    /// barrier), then changes each table that differs (one barrier per
    /// volume). `force` disconnects the clients of removed volumes.
    ClusterApply {
        config: std::path::PathBuf,
        #[serde(default)]
        force: bool,
    },
    /// Removes a member that is gone for good from the cluster's records.
    ClusterForget { node: String },
    Reload {
        #[serde(default)]
        force: bool,
    },
    Pause {
        volume: String,
        #[serde(default)]
        range: Option<RangeArg>,
        /// Automatic resume after this long (default 30 s).
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
    Resume {
        volume: String,
    },
    History {
        volume: String,
    },
    MigrateStart {
        volume: String,
        to: String,
        #[serde(default)]
        to_offset: Option<u64>,
        #[serde(default)]
        range: Option<RangeArg>,
        /// Bytes per second; 0 = unlimited; absent = default (64 MiB/s).
        #[serde(default)]
        rate: Option<u64>,
        #[serde(default)]
        chunk: Option<u64>,
        #[serde(default)]
        discard_source: bool,
    },
    MigrateStatus {
        #[serde(default)]
        volume: Option<String>,
    },
    MigrateAbort {
        volume: String,
    },
    /// Adds a leg on `to` (from `to_offset`, else the lowest free range)
    /// to every extent in `range` (default: the whole volume).
    MirrorAdd {
        volume: String,
        to: String,
        #[serde(default)]
        to_offset: Option<u64>,
        #[serde(default)]
        range: Option<RangeArg>,
        /// Resync bytes per second; 0 = unlimited; absent = 64 MiB/s.
        #[serde(default)]
        rate: Option<u64>,
    },
    MirrorRemove {
        volume: String,
        leg: String,
        #[serde(default)]
        force: bool,
    },
    /// Resyncs a failed leg again (only the regions written meanwhile).
    MirrorReadd {
        volume: String,
        leg: String,
        #[serde(default)]
        rate: Option<u64>,
    },
    MirrorStatus {
        #[serde(default)]
        volume: Option<String>,
    },
    Split {
        volume: String,
        leg: String,
        #[serde(rename = "as")]
        as_volume: String,
        #[serde(default)]
        read_only: bool,
    },
    Merge {
        /// The split copy.
        volume: String,
        into: String,
        #[serde(default = "default_keep")]
        keep: crate::api::MergeKeep,
        #[serde(default)]
        force: bool,
        /// Resync bytes per second; 0 = unlimited; absent = 64 MiB/s.
        #[serde(default)]
        rate: Option<u64>,
    },
    /// Make a backend fail on purpose (drills, tests); `error: off` ends it.
    Fault {
        backend: String,
        error: super::FaultErrorArg,
        #[serde(default)]
        scope: super::FaultScopeArg,
    },
    /// A volume from a pool, exported at once and persisted.
    VolumeCreate(super::VolumeCreate),
    /// Grows online (pause–drain–swap); shrinking drops the tail, refused
    /// when it holds data unless `force`.
    VolumeResize {
        volume: String,
        size: u64,
        #[serde(default)]
        force: bool,
    },
    /// Refused while clients are connected unless `force`.
    VolumeDelete {
        volume: String,
        #[serde(default)]
        force: bool,
    },
    PoolStatus {
        #[serde(default)]
        pool: Option<String>,
    },
    PoolCheck {
        #[serde(default)]
        pool: Option<String>,
    },
    /// Usage since `since` (Unix seconds; absent: since each volume was
    /// created).
    PoolUsage {
        #[serde(default)]
        since: Option<u64>,
    },
}

impl Request {
    /// Whether the request changes the server's state (and is therefore
    /// logged with who sent it). No wildcard: a new command must choose.
    pub fn mutates(&self) -> bool {
        match self {
            Request::Status
            | Request::ClusterStatus
            | Request::History { .. }
            | Request::MigrateStatus { .. }
            | Request::MirrorStatus { .. }
            | Request::PoolStatus { .. }
            | Request::PoolUsage { .. } => false,
            // `pool_check` returns leaked chunks to the free list.
            Request::PoolCheck { .. }
            | Request::ClusterApply { .. }
            | Request::ClusterForget { .. }
            | Request::Reload { .. }
            | Request::Pause { .. }
            | Request::Resume { .. }
            | Request::MigrateStart { .. }
            | Request::MigrateAbort { .. }
            | Request::MirrorAdd { .. }
            | Request::MirrorRemove { .. }
            | Request::MirrorReadd { .. }
            | Request::Split { .. }
            | Request::Merge { .. }
            | Request::Fault { .. }
            | Request::VolumeCreate(_)
            | Request::VolumeResize { .. }
            | Request::VolumeDelete { .. } => true,
        }
    }
}

fn default_keep() -> crate::api::MergeKeep {
    crate::api::MergeKeep::Primary
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse() {
        let r: Request = serde_json::from_str(r#"{"command":"reload","force":true}"#).unwrap();
        assert_eq!(r, Request::Reload { force: true });
        let r: Request = serde_json::from_str(r#"{"command":"pause","volume":"v","range":{"start":0,"length":8}}"#).unwrap();
        assert!(matches!(r, Request::Pause { range: Some(RangeArg { start: 0, length: 8 }), .. }));
        assert!(serde_json::from_str::<Request>(r#"{"command":"explode"}"#).is_err());
        let r: Request = serde_json::from_str(r#"{"command":"fault","backend":"b","error":"eio"}"#).unwrap();
        assert_eq!(r, Request::Fault { backend: "b".into(), error: super::super::FaultErrorArg::Eio, scope: super::super::FaultScopeArg::Both });
        assert!(serde_json::from_str::<Request>(r#"{"command":"fault","backend":"b","error":"ebusy"}"#).is_err());
    }

    #[test]
    fn only_queries_are_read_only() {
        let mutates = |line: &str| serde_json::from_str::<Request>(line).unwrap().mutates();
        for query in ["status", "cluster_status", "history\",\"volume\":\"v", "migrate_status", "mirror_status", "pool_status", "pool_usage"] {
            assert!(!mutates(&format!(r#"{{"command":"{query}"}}"#)), "{query}");
        }
        for command in [r#"{"command":"reload"}"#, r#"{"command":"resume","volume":"v"}"#, r#"{"command":"pool_check"}"#, r#"{"command":"volume_delete","volume":"v"}"#] {
            assert!(mutates(command), "{command}");
        }
    }
}
