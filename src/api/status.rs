//! `status`: what each volume maps where, its pause state and I/O, and the
//! open backends.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtentStatus {
    pub start: u64,
    pub length: u64,
    /// `None` for a zero extent.
    pub backend: Option<String>,
    pub backend_offset: Option<u64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub zero: bool,
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
