//! Storage pools (SPEC §6): stores contribute their space, cut into chunks,
//! to named pools; volumes are created from a pool at run time, thick
//! (every chunk allocated at creation, served by linear/mirror/stripe
//! extents) or chunk-mapped (thin, or low priority: served by a thin
//! target whose chunk map lives here), resized, deleted and metered.
//!
//! One crash-safe store per daemon holds all of it: `state_dir/pools.redb`
//! (redb: copy-on-write B-trees, one fsync per commit). The pool layout,
//! the volumes, every chunk's owner and every volume's map are committed
//! together, so there is no second source of truth to disagree with.
//!
//! `placement.rs` (placing a range on a store among used ranges) is shared
//! with migrations and mirrors.

pub mod placement;

use crate::api::{PoolCheckReport, PoolStatus, PoolVolumeInfo, UsageReport, VolumeCreate};
use crate::backend::Backend;
use crate::config::PoolConfig;
use crate::map::{MappingTable, Range};
use crate::volume::target::ChunkMap;
use std::path::Path;
use std::sync::Arc;

/// Why a pool operation failed; `kind()` is the API's error class.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("no pool named '{0}'")]
    UnknownPool(String),
    #[error("no pool of class '{0}'")]
    UnknownClass(String),
    #[error("no pool volume named '{0}'")]
    UnknownVolume(String),
    #[error("a volume named '{0}' exists already")]
    Exists(String),
    #[error("{0}")]
    Invalid(String),
    /// Not enough space: names the shortfall.
    #[error("pool '{pool}' is too small: {needed} bytes needed, {available} free or reclaimable (short by {})", needed - available)]
    NoSpace { pool: String, needed: u64, available: u64 },
    #[error("{0}")]
    Conflict(String),
    #[error("pool metadata ({path}): {message}")]
    Metadata { path: String, message: String },
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
}

impl PoolError {
    pub fn kind(&self) -> crate::api::ErrorKind {
        use crate::api::ErrorKind;
        match self {
            PoolError::UnknownPool(_) | PoolError::UnknownClass(_) | PoolError::UnknownVolume(_) => ErrorKind::NotFound,
            PoolError::Exists(_) | PoolError::Conflict(_) => ErrorKind::Conflict,
            PoolError::Invalid(_) => ErrorKind::Invalid,
            PoolError::NoSpace { .. } => ErrorKind::NoSpace,
            PoolError::Metadata { .. } | PoolError::Io { .. } => ErrorKind::Io,
        }
    }
}

/// A store offered to the pools: its open handle, the path to grow it by
/// (a regular file), and the ranges config volumes map on it (never
/// allocated).
#[derive(Debug, Clone)]
pub struct PoolStore {
    pub backend: String,
    pub handle: Arc<dyn Backend>,
    /// `Some` for a regular file: auto-extend may grow it.
    pub path: Option<std::path::PathBuf>,
    pub reserved: Vec<Range>,
}

/// Every pool of the daemon, over one metadata store.
#[derive(Debug)]
pub struct Pools {}

impl Pools {
    /// Opens (creating) `state_dir/pools.redb`, reconciles the configured
    /// pools with the recorded ones (new pools and stores are added; a
    /// store or pool that holds chunks cannot go; a pool's chunk cannot
    /// change while it has volumes), runs the check with leaks returned,
    /// and starts the committer (commits every second).
    pub fn open(state_dir: &Path, pools: &[PoolConfig], stores: &[PoolStore]) -> Result<(Arc<Pools>, Vec<PoolCheckReport>), PoolError> {
        let _ = (state_dir, pools, stores);
        todo!()
    }

    /// A reload's new pool settings and stores (same rules as `open`);
    /// thin writes queued for space are retried.
    pub fn reconfigure(&self, pools: &[PoolConfig], stores: &[PoolStore]) -> Result<(), PoolError> {
        let _ = (pools, stores);
        todo!()
    }

    /// Every pool volume, by name.
    pub fn volumes(&self) -> Vec<PoolVolumeInfo> {
        todo!()
    }

    pub fn volume(&self, name: &str) -> Option<PoolVolumeInfo> {
        let _ = name;
        todo!()
    }

    /// The volume's committed table generation (bumped by each resize).
    pub fn generation(&self, name: &str) -> Result<u64, PoolError> {
        let _ = name;
        todo!()
    }

    /// Allocates and records a new volume, committed before it returns.
    /// A non-thin volume needs free + reclaimable ≥ its size (reclaiming
    /// low-priority chunks if need be). `taken` says whether a name is
    /// used outside the pools (config volumes).
    pub fn create(&self, req: &VolumeCreate, taken: &dyn Fn(&str) -> bool) -> Result<PoolVolumeInfo, PoolError> {
        let _ = (req, taken);
        todo!()
    }

    /// The volume's table at its committed size and generation: thick, its
    /// chunks as linear/mirror/stripe extents (neighbouring chunks merged);
    /// chunk-mapped, one thin extent.
    pub fn table(&self, name: &str) -> Result<MappingTable, PoolError> {
        let _ = name;
        todo!()
    }

    /// The chunk map of a chunk-mapped volume, `None` for a thick one.
    pub fn chunk_map(&self, name: &str) -> Option<Arc<dyn ChunkMap>> {
        let _ = name;
        todo!()
    }

    /// Grows: allocates and records the new size and generation (committed);
    /// the caller then swaps to `table(name)`, and calls
    /// `shrink(name, old_size)` to undo if the swap fails.
    pub fn grow(&self, name: &str, size: u64) -> Result<PoolVolumeInfo, PoolError> {
        let _ = (name, size);
        todo!()
    }

    /// Whether bytes `[size, current size)` hold data (any mapped chunk
    /// of a chunk-mapped volume; any allocated range of a thick one).
    pub fn tail_holds_data(&self, name: &str, size: u64) -> Result<bool, PoolError> {
        let _ = (name, size);
        todo!()
    }

    /// The table the volume will have at `size` (smaller), for the swap
    /// that precedes `shrink`.
    pub fn table_at(&self, name: &str, size: u64) -> Result<MappingTable, PoolError> {
        let _ = (name, size);
        todo!()
    }

    /// Shrinks (after the swap to `table_at(name, size)`): frees the tail's
    /// chunks and records the new size and generation, committed.
    pub fn shrink(&self, name: &str, size: u64) -> Result<PoolVolumeInfo, PoolError> {
        let _ = (name, size);
        todo!()
    }

    /// Deletes a volume no client uses any more: every chunk returns to
    /// the pool (punched, so it reads zeros when reused), committed.
    pub fn delete(&self, name: &str) -> Result<(), PoolError> {
        let _ = name;
        todo!()
    }

    pub fn status(&self, pool: Option<&str>) -> Result<Vec<PoolStatus>, PoolError> {
        let _ = pool;
        todo!()
    }

    /// Online consistency check (every chunk owned at most once, owners
    /// equal to the maps, no leak); leaked chunks are returned.
    pub fn check(&self, pool: Option<&str>) -> Result<Vec<PoolCheckReport>, PoolError> {
        let _ = pool;
        todo!()
    }

    /// What each volume used since `since` (Unix seconds; `None`: since
    /// it was created).
    pub fn usage(&self, since: Option<u64>) -> Result<UsageReport, PoolError> {
        let _ = since;
        todo!()
    }

    /// Every range of `backend` a pool owns (allocated or free): migrations,
    /// mirrors and config volumes must not place data there.
    pub fn owned_ranges(&self, backend: &str) -> Vec<Range> {
        let _ = backend;
        todo!()
    }

    /// Commits what is pending and stops the committer (clean shutdown).
    pub fn close(&self) -> Result<(), PoolError> {
        todo!()
    }
}
