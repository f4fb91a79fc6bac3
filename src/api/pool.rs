//! Storage pools and the volumes created from them: requests' arguments
//! and answers (`volume create|resize|delete`, `pool status|check|usage`).

use serde::{Deserialize, Serialize};

/// How a pool volume lays its chunks out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PoolLayout {
    Linear,
    /// Across `stores` stores of the pool.
    Stripe { stores: u32 },
    /// `copies` copies, one per store.
    Mirror { copies: u32 },
}

impl std::fmt::Display for PoolLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PoolLayout::Linear => f.write_str("linear"),
            PoolLayout::Stripe { stores } => write!(f, "stripe:{stores}"),
            PoolLayout::Mirror { copies } => write!(f, "mirror:{copies}"),
        }
    }
}

impl std::str::FromStr for PoolLayout {
    type Err = String;

    /// `linear`, `stripe:N` (N ≥ 2) or `mirror:N` (N ≥ 2).
    fn from_str(s: &str) -> Result<PoolLayout, String> {
        let count = |n: &str| n.parse::<u32>().ok().filter(|n| *n >= 2).ok_or_else(|| format!("'{s}': the count must be a number of at least 2"));
        match s.split_once(':') {
            None if s == "linear" => Ok(PoolLayout::Linear),
            Some(("stripe", n)) => Ok(PoolLayout::Stripe { stores: count(n)? }),
            Some(("mirror", n)) => Ok(PoolLayout::Mirror { copies: count(n)? }),
            _ => Err(format!("'{s}' is not one of linear, stripe:N, mirror:N")),
        }
    }
}

/// Whose space goes first when a pool is short (`--priority`). Chunks of
/// `low` volumes may be reclaimed (they then read zeros); `normal` and
/// `high` data is never reclaimed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VolumePriority {
    Low,
    #[default]
    Normal,
    High,
}

impl std::fmt::Display for VolumePriority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VolumePriority::Low => "low",
            VolumePriority::Normal => "normal",
            VolumePriority::High => "high",
        })
    }
}

/// Which pool a new volume comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolChoice {
    Pool(String),
    /// The first pool of the class (by `priority`) with room.
    Class(String),
}

/// `volume create`'s arguments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeCreate {
    pub name: String,
    pub size: u64,
    pub from: PoolChoice,
    #[serde(default = "linear")]
    pub layout: PoolLayout,
    #[serde(default)]
    pub thin: bool,
    #[serde(default)]
    pub priority: VolumePriority,
    #[serde(default)]
    pub description: String,
}

fn linear() -> PoolLayout {
    PoolLayout::Linear
}

/// A pool volume as created (answer of create/resize, part of status).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolVolumeInfo {
    pub name: String,
    pub pool: String,
    pub size: u64,
    pub layout: PoolLayout,
    pub thin: bool,
    pub priority: VolumePriority,
    pub description: String,
    /// Bytes of chunks the volume holds (all copies).
    pub allocated: u64,
    /// Bytes clients have written to it since it was created.
    pub written: u64,
    /// Unix seconds.
    pub created: u64,
}

/// Answer of `volume resize`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResizeReport {
    pub volume: PoolVolumeInfo,
    pub old_size: u64,
    pub generation: u64,
    /// What happened to devices attached with `nbdvirt attach`, if anything
    /// needs saying.
    #[serde(default)]
    pub note: Option<String>,
}

/// One pool (`pool status`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolStatus {
    pub name: String,
    pub class: Option<String>,
    pub chunk: u64,
    pub priority: u32,
    pub on_full: String,
    pub stores: Vec<PoolStoreStatus>,
    pub size: u64,
    pub allocated: u64,
    pub free: u64,
    /// Allocated bytes reclaim could take back (zero-only chunks of thin
    /// volumes, chunks of low-priority volumes).
    pub reclaimable: u64,
    /// Provisioned volume sizes (all copies) / pool size.
    pub overcommit: f64,
    /// Free space is below `low_water`.
    pub low_water: bool,
    /// Thin writes waiting for a free chunk now.
    pub queued_writes: u64,
    /// Bytes taken back by reclaim since the daemon started.
    #[serde(default)]
    pub reclaimed: u64,
    pub volumes: Vec<PoolVolumeInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolStoreStatus {
    pub backend: String,
    pub chunks: u64,
    pub free_chunks: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolList {
    pub pools: Vec<PoolStatus>,
}

/// Answer of `pool check` (also logged at start-up).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolCheckReport {
    pub pool: String,
    pub chunks: u64,
    pub owned: u64,
    pub free: u64,
    /// Owner records of no volume (leaks), dropped: their chunks are free.
    pub leaked_returned: u64,
    /// Problems that could not be repaired (two chunks for one chunk of a
    /// volume, a record the map in memory disagrees with, ...). Empty =
    /// clean.
    pub errors: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolCheckList {
    pub pools: Vec<PoolCheckReport>,
}

/// What one volume used over a period (`pool usage`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeUsage {
    pub volume: String,
    pub pool: String,
    /// The rate class the byte-seconds were billed at.
    pub rate: String,
    pub allocated: u64,
    pub written_bytes: u64,
    /// ∫ allocated bytes dt over the period.
    pub allocation_byte_seconds: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageReport {
    /// Unix seconds.
    pub since: u64,
    pub until: u64,
    pub volumes: Vec<VolumeUsage>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_parse_and_print() {
        for s in ["linear", "stripe:3", "mirror:2"] {
            assert_eq!(s.parse::<PoolLayout>().unwrap().to_string(), s);
        }
        assert!("stripe:1".parse::<PoolLayout>().is_err());
        assert!("raid5".parse::<PoolLayout>().unwrap_err().contains("linear, stripe:N, mirror:N"));
    }
}
