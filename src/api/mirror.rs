//! Mirrors and volume pairs: `mirror_*`, `split`, `merge`.

use serde::{Deserialize, Serialize};

/// One leg of a volume's mirrors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LegStatus {
    pub backend: String,
    /// `in_sync`, `resyncing`, `failed` or `split`.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Share of the leg's regions it has, 0–100.
    pub percent: f64,
    /// Bytes still to copy to it.
    pub bytes_left: u64,
    /// Resync copy rate now, bytes per second (0 when idle).
    pub rate: u64,
    /// Bytes resync copied to it since the daemon started.
    pub copied_bytes: u64,
}

/// A volume's mirror state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MirrorStatus {
    pub volume: String,
    /// Pair state: `simplex` (one copy), `duplex_pending` (a leg is
    /// copying), `duplex` (in sync), `split` (a split copy is tracked).
    pub pair: String,
    pub region: u64,
    /// Bytes of regions marked in the write-intent log (writes not yet
    /// known to be on every leg's disk).
    pub dirty_bytes: u64,
    /// Regions found dirty at start (after a crash) and resynced.
    pub recovered_regions: u64,
    pub legs: Vec<LegStatus>,
    /// Change trackers (`split-NEWVOL`), also NBD meta contexts
    /// `qemu:dirty-bitmap:NAME`, with their changed bytes.
    pub trackers: Vec<TrackerStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackerStatus {
    pub name: String,
    pub changed_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MirrorList {
    pub mirrors: Vec<MirrorStatus>,
}

/// Which side of a pair a merge keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MergeKeep {
    /// The volume merged into: its data is copied onto the split copy.
    Primary,
    /// The split copy: its data is copied back onto the volume.
    Secondary,
}

/// What `split` and `merge` did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairReport {
    pub volume: String,
    pub split_volume: String,
    pub leg: String,
    /// Generation of `volume` in force afterwards.
    pub generation: u64,
    /// Bytes the merge resyncs (the union of both sides' changes).
    #[serde(default)]
    pub resync_bytes: u64,
    /// Clients disconnected (merge --force).
    #[serde(default)]
    pub disconnected: usize,
}
