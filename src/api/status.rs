//! `status`: what each volume maps where, its pause state and I/O, and the
//! open backends.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// The link of a forwarded extent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardView {
    /// The node's NBD endpoint the link is connected to now.
    pub to: Option<String>,
    /// The stores the extent needs (extents needing the same stores share
    /// one link).
    #[serde(default)]
    pub stores: Vec<String>,
    pub connections: usize,
    /// Requests sent over it, sent-again ones included.
    pub requests: u64,
    /// Requests sent again after a lost connection.
    pub retries: u64,
    /// Requests that failed (after the forwarding bound).
    pub failed: u64,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtentStatus {
    pub start: u64,
    pub length: u64,
    /// The linear extent's store; `None` for every other layout.
    pub backend: Option<String>,
    pub backend_offset: Option<u64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub zero: bool,
    /// `linear`, `zero`, `mirror` or `stripe`; empty from a daemon that
    /// predates layouts (read `backend`/`zero` then).
    #[serde(default)]
    pub layout: String,
    /// Mirror legs or stripe members, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub legs: Vec<LegView>,
    /// Stripe chunk size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk: Option<u64>,
    /// Mirror region size (the write-intent bitmap's unit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<u64>,
    /// Set when this node cannot reach the extent's stores and forwards
    /// its I/O to a node that can (cluster mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forwarded: Option<ForwardView>,
}

/// One mirror leg or stripe member of an extent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LegView {
    pub backend: String,
    pub backend_offset: u64,
    /// A mirror leg's runtime state (e.g. in sync, resyncing, failed);
    /// `None` where the layout has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeStatus {
    pub start: u64,
    pub length: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeStatus {
    pub name: String,
    pub description: String,
    pub size: u64,
    pub read_only: bool,
    pub generation: u64,
    /// `running`, `pausing` or `paused`.
    pub state: String,
    pub extents: Vec<ExtentStatus>,
    pub held_ranges: Vec<RangeStatus>,
    pub in_flight: usize,
    pub held_requests: usize,
    pub connections: usize,
    pub swaps: u64,
    pub last_hold_us: Option<u64>,
    pub last_drain_us: Option<u64>,
    pub last_error: Option<String>,
    pub manual_pause: bool,
}

/// What a backend is, as reported (mirrors the backend layer's store kind
/// without depending on it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    File,
    BlockDevice,
    Memory,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::File => "file",
            BackendKind::BlockDevice => "block_device",
            BackendKind::Memory => "memory",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendStatus {
    pub name: String,
    pub kind: BackendKind,
    /// `None` for a memory store.
    pub path: Option<PathBuf>,
    pub size: u64,
    pub shared: bool,
    pub rotational: bool,
    /// An injected fault in force (`nbdvirt fault`), e.g. "eio on reads".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The config file served; `None` on the embedded default.
    pub config: Option<PathBuf>,
    pub listen: Vec<String>,
    pub volumes: Vec<VolumeStatus>,
    pub backends: Vec<BackendStatus>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extent_json_of_earlier_daemons_still_reads() {
        let old: ExtentStatus = serde_json::from_str(r#"{"start":0,"length":4096,"backend":"a","backend_offset":0}"#).unwrap();
        assert_eq!((old.layout.as_str(), old.legs.len(), old.chunk), ("", 0, None));
        let stripe = ExtentStatus {
            start: 0,
            length: 8192,
            backend: None,
            backend_offset: None,
            zero: false,
            layout: "stripe".into(),
            legs: vec![LegView { backend: "c".into(), backend_offset: 0, state: None }],
            chunk: Some(4096),
            region: None,
            forwarded: None,
        };
        let json = serde_json::to_string(&stripe).unwrap();
        assert!(!json.contains("region") && !json.contains("state"), "{json}");
        assert_eq!(serde_json::from_str::<ExtentStatus>(&json).unwrap(), stripe);
    }
}
