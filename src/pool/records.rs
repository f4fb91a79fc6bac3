//! What the pool metadata store holds, as plain serde records (JSON values
//! in redb tables; the chunk maps and owners are native tuple tables).

use crate::api::{PoolLayout, VolumePriority};
use serde::{Deserialize, Serialize};

/// A chunk's address in its pool: store index (stable: stores are only
/// appended) in the top 24 bits, chunk index within the store below.
pub type ChunkId = u64;

const STORE_SHIFT: u32 = 40;

pub fn chunk_id(store: usize, index: u64) -> ChunkId {
    ((store as u64) << STORE_SHIFT) | index
}

pub fn split_id(id: ChunkId) -> (usize, u64) {
    ((id >> STORE_SHIFT) as usize, id & ((1 << STORE_SHIFT) - 1))
}

/// A pool as recorded: its chunk size and its stores in the order they
/// joined (a store's index is part of its chunks' ids).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolRecord {
    pub name: String,
    pub chunk: u64,
    pub stores: Vec<StoreRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreRecord {
    pub backend: String,
    /// Chunks of the store the pool may use (its size / chunk when it
    /// joined, more after an auto-extend). 0 once the store left the pool.
    pub chunks: u64,
}

/// A volume created from a pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub name: String,
    pub pool: String,
    pub size: u64,
    pub layout: PoolLayout,
    pub thin: bool,
    pub priority: VolumePriority,
    #[serde(default)]
    pub description: String,
    /// Unix seconds.
    pub created: u64,
    /// Table generation (1 at creation, +1 per resize).
    pub generation: u64,
    /// Store indexes of a stripe's members or a mirror's copies, fixed at
    /// creation so chunks line up into long extents.
    #[serde(default)]
    pub members: Vec<usize>,
}

impl VolumeRecord {
    /// Served through a chunk map (thin target) rather than a static table:
    /// thin volumes, and low-priority ones (their chunks may be reclaimed).
    pub fn chunk_mapped(&self) -> bool {
        self.thin || self.priority == VolumePriority::Low
    }

    /// Chunks per copy of one allocation unit.
    pub fn width(&self) -> u64 {
        match self.layout {
            PoolLayout::Stripe { stores } if !self.chunk_mapped() => stores as u64,
            _ => 1,
        }
    }

    /// Copies of each chunk.
    pub fn copies(&self) -> usize {
        match self.layout {
            PoolLayout::Mirror { copies } => copies as usize,
            _ => 1,
        }
    }

    /// The rate its allocation is billed at.
    pub fn rate(&self) -> &'static str {
        match self.priority {
            VolumePriority::Low => "low",
            _ => "standard",
        }
    }
}

/// A volume's meter, cumulative since creation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UsageRecord {
    pub written: u64,
    /// ∫ allocated bytes dt.
    pub byte_seconds: f64,
    /// Unix seconds (fractional) up to which `byte_seconds` is counted.
    pub until: f64,
    /// Allocated bytes at `until`.
    pub allocated: u64,
}
