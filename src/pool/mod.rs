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

mod chunks;
mod entries;
mod inner;
mod meta;
mod open;
mod reclaim;
mod records;
mod report;
mod resize;
mod space;
mod thread;
mod volumes;
pub mod placement;

use inner::Inner;
use meta::{Batch, Meta};
use std::sync::Mutex;

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
pub struct Pools {
    inner: Arc<Inner>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Pools {
    /// Opens (creating) `state_dir/pools.redb`, reconciles the configured
    /// pools with the recorded ones (new pools and stores are added; a
    /// store or pool that holds chunks cannot go; a pool's chunk cannot
    /// change while it has volumes), runs the check with leaks returned,
    /// and starts the pool thread (commits every second).
    pub fn open(state_dir: &Path, pools: &[PoolConfig], stores: &[PoolStore]) -> Result<(Arc<Pools>, Vec<PoolCheckReport>), PoolError> {
        let path = state_dir.join("pools.redb");
        let meta_err = |e: meta::MetaError| PoolError::Metadata { path: path.display().to_string(), message: e.0 };
        let meta = Meta::open(&path).map_err(meta_err)?;
        let loaded = meta.load().map_err(meta_err)?;
        let inner = Arc::new(Inner::new(meta, inner::State::default()));
        let mut batch = Batch::default();
        let (state, reports) = open::build(&inner, &loaded, pools, stores, &mut batch)?;
        for (name, v) in &state.volumes {
            let chunk = state.pools[&v.record.pool].chunk();
            let missing = open::missing_chunks(v, chunk);
            if missing > 0 {
                return Err(PoolError::Metadata { path: path.display().to_string(), message: format!("volume '{name}' lacks {missing} chunk(s)") });
            }
        }
        let mut state = state;
        state.pools.values_mut().for_each(|p| p.space.scan_clean());
        *crate::sync::lock(&inner.state) = state;
        crate::sync::lock(&inner.state).pools.values_mut().for_each(inner::PoolState::note_free_space);
        if !batch.is_empty() {
            inner.meta.apply(&batch).map_err(meta_err)?;
        }
        for r in &reports {
            if r.leaked_returned > 0 {
                tracing::warn!(pool = %r.pool, chunks = r.leaked_returned, "start-up check returned leaked chunks to the pool");
            }
            for e in &r.errors {
                tracing::error!(pool = %r.pool, "start-up check: {e}");
            }
        }
        let worker = inner.clone();
        let thread = std::thread::Builder::new().name("pools".into()).spawn(move || thread::run(worker)).map_err(|source| PoolError::Io { what: "starting the pool thread".into(), source })?;
        Ok((Arc::new(Pools { inner, thread: Mutex::new(Some(thread)) }), reports))
    }

    /// A reload's new pool settings and stores (same rules as `open`);
    /// thin writes queued for space are retried.
    pub fn reconfigure(&self, pools: &[PoolConfig], stores: &[PoolStore]) -> Result<(), PoolError> {
        let batch = {
            let mut st = crate::sync::lock(&self.inner.state);
            if let Some(v) = st.volumes.values().find(|v| !pools.iter().any(|p| p.name == v.record.pool)) {
                return Err(PoolError::Conflict(format!("pool '{}' cannot leave the config: it holds volume '{}'", v.record.pool, v.record.name)));
            }
            let mut records = Vec::new();
            for cfg in pools {
                let (old, has_volumes) = (st.pools.get(&cfg.name).map(|p| p.record.clone()), st.volumes.values().any(|v| v.record.pool == cfg.name));
                let owned_on = |i: usize| st.pools.get(&cfg.name).and_then(|p| p.space.stores.get(i)).map_or(0, |s| s.chunks - s.reserved - s.free_count);
                let rec = open::reconcile_record(cfg, old.as_ref(), stores, &owned_on, has_volumes)?;
                records.push((cfg.clone(), rec));
            }
            let mut batch = Batch::default();
            for (cfg, rec) in records {
                match st.pools.get_mut(&cfg.name) {
                    Some(p) => {
                        for (i, s) in rec.stores.iter().enumerate() {
                            let open = stores.iter().find(|o| o.backend == s.backend && s.chunks > 0);
                            match p.space.stores.get_mut(i) {
                                Some(sp) => {
                                    sp.handle = open.map(|o| o.handle.clone());
                                    sp.extend(s.chunks, rec.chunk, open.map_or(&[][..], |o| &o.reserved[..]));
                                }
                                None => p.space.stores.push(space::StoreSpace::new(&s.backend, open.map(|o| o.handle.clone()), open.and_then(|o| o.path.clone()), s.chunks, rec.chunk, open.map_or(&[][..], |o| &o.reserved[..]))),
                            }
                        }
                        p.space.scan_clean();
                        p.config = cfg;
                        if p.record != rec {
                            batch.pools.push(rec.clone());
                        }
                        p.record = rec;
                        p.note_free_space();
                    }
                    None => {
                        let mut space = open::space_of(&rec, stores);
                        space.scan_clean();
                        batch.pools.push(rec.clone());
                        let mut p = inner::PoolState { config: cfg, record: rec, space, waiting: 0, below_low_water: false, reclaimed: 0, short: 0, may_wait: Default::default() };
                        p.note_free_space();
                        st.pools.insert(p.config.name.clone(), p);
                    }
                }
            }
            let handles: std::collections::BTreeMap<String, Vec<Option<Arc<dyn Backend>>>> =
                st.pools.iter().map(|(n, p)| (n.clone(), p.space.stores.iter().map(|s| s.handle.clone()).collect())).collect();
            for v in st.volumes.values() {
                if let Some(m) = &v.map {
                    m.set_stores(handles[&v.record.pool].clone());
                }
            }
            batch
        };
        if !batch.is_empty() {
            self.inner.meta.apply(&batch).map_err(|e| PoolError::Metadata { path: self.inner.meta.path().display().to_string(), message: e.0 })?;
        }
        self.inner.space_freed.notify_all();
        Ok(())
    }

    /// Every pool volume, by name.
    pub fn volumes(&self) -> Vec<PoolVolumeInfo> {
        let st = crate::sync::lock(&self.inner.state);
        st.volumes.values().map(|v| report::info(v, st.pools[&v.record.pool].chunk())).collect()
    }

    pub fn volume(&self, name: &str) -> Option<PoolVolumeInfo> {
        let st = crate::sync::lock(&self.inner.state);
        st.volumes.get(name).map(|v| report::info(v, st.pools[&v.record.pool].chunk()))
    }

    /// The volume's committed table generation (bumped by each resize).
    pub fn generation(&self, name: &str) -> Result<u64, PoolError> {
        crate::sync::lock(&self.inner.state).volumes.get(name).map(|v| v.record.generation).ok_or_else(|| PoolError::UnknownVolume(name.into()))
    }

    /// Allocates and records a new volume, committed before it returns.
    /// A non-thin volume needs free + reclaimable ≥ its size (reclaiming
    /// low-priority chunks if need be). `taken` says whether a name is
    /// used outside the pools (config volumes).
    pub fn create(&self, req: &VolumeCreate, taken: &dyn Fn(&str) -> bool) -> Result<PoolVolumeInfo, PoolError> {
        let _admin = crate::sync::lock(&self.inner.admin);
        let rec = self.inner.create(req, taken)?;
        self.volume(&rec.name).ok_or(PoolError::UnknownVolume(rec.name))
    }

    /// The volume's table at its committed size and generation: thick, its
    /// chunks as linear/mirror/stripe extents (neighbouring chunks merged);
    /// chunk-mapped, one thin extent.
    pub fn table(&self, name: &str) -> Result<MappingTable, PoolError> {
        let size = crate::sync::lock(&self.inner.state).volumes.get(name).map(|v| v.record.size).ok_or_else(|| PoolError::UnknownVolume(name.into()))?;
        self.inner.table_at(name, size)
    }

    /// The chunk map of a chunk-mapped volume, `None` for a thick one.
    pub fn chunk_map(&self, name: &str) -> Option<Arc<dyn ChunkMap>> {
        crate::sync::lock(&self.inner.state).volumes.get(name).and_then(|v| v.map.clone()).map(|m| m as Arc<dyn ChunkMap>)
    }

    /// Grows: allocates and records the new size and generation (committed);
    /// the caller then swaps to `table(name)`, and calls
    /// `shrink(name, old_size)` to undo if the swap fails.
    pub fn grow(&self, name: &str, size: u64) -> Result<PoolVolumeInfo, PoolError> {
        let _admin = crate::sync::lock(&self.inner.admin);
        self.inner.grow(name, size)?;
        self.volume(name).ok_or_else(|| PoolError::UnknownVolume(name.into()))
    }

    /// Whether bytes `[size, current size)` hold data (any mapped chunk
    /// of a chunk-mapped volume; any allocated range of a thick one).
    pub fn tail_holds_data(&self, name: &str, size: u64) -> Result<bool, PoolError> {
        self.inner.tail_holds_data(name, size)
    }

    /// The table the volume will have at `size` (smaller), for the swap
    /// that precedes `shrink`; its generation is the next one.
    pub fn table_at(&self, name: &str, size: u64) -> Result<MappingTable, PoolError> {
        let t = self.inner.table_at(name, size)?;
        MappingTable::new(t.generation() + 1, t.extents().to_vec()).map_err(|e| PoolError::Invalid(e.to_string()))
    }

    /// Shrinks (after the swap to `table_at(name, size)`): frees the tail's
    /// chunks and records the new size and generation, committed.
    pub fn shrink(&self, name: &str, size: u64) -> Result<PoolVolumeInfo, PoolError> {
        let _admin = crate::sync::lock(&self.inner.admin);
        self.inner.shrink(name, size)?;
        self.volume(name).ok_or_else(|| PoolError::UnknownVolume(name.into()))
    }

    /// Deletes a volume no client uses any more: every chunk returns to
    /// the pool (punched, so it reads zeros when reused), committed.
    pub fn delete(&self, name: &str) -> Result<(), PoolError> {
        let _admin = crate::sync::lock(&self.inner.admin);
        self.inner.delete(name)
    }

    pub fn status(&self, pool: Option<&str>) -> Result<Vec<PoolStatus>, PoolError> {
        self.inner.status(pool)
    }

    /// Online consistency check (every chunk owned at most once, owners
    /// equal to the maps, no leak); leaked chunks are returned.
    pub fn check(&self, pool: Option<&str>) -> Result<Vec<PoolCheckReport>, PoolError> {
        let _admin = crate::sync::lock(&self.inner.admin);
        self.inner.check(pool)
    }

    /// What each volume used since `since` (Unix seconds; `None`: since
    /// it was created).
    pub fn usage(&self, since: Option<u64>) -> Result<UsageReport, PoolError> {
        self.inner.usage(since)
    }

    /// Bytes clients wrote to a thick pool volume (the daemon reports them
    /// from the volume's counters; chunk-mapped volumes count their own).
    pub fn add_written(&self, name: &str, bytes: u64) {
        if let Some(v) = crate::sync::lock(&self.inner.state).volumes.get_mut(name) {
            if v.map.is_none() {
                v.written_unmetered += bytes;
            }
        }
    }

    /// Every range of `backend` a pool owns (allocated or free): migrations,
    /// mirrors and config volumes must not place data there.
    pub fn owned_ranges(&self, backend: &str) -> Vec<Range> {
        let st = crate::sync::lock(&self.inner.state);
        let mut out = Vec::new();
        for p in st.pools.values() {
            for s in p.space.stores.iter().filter(|s| s.backend == backend && s.handle.is_some()) {
                out.extend(s.owned_ranges(p.chunk()));
            }
        }
        out
    }

    /// Commits what is pending, persists the meters and stops the pool
    /// thread (clean shutdown).
    pub fn close(&self) -> Result<(), PoolError> {
        self.inner.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.inner.wake_pool_thread();
        if let Some(t) = crate::sync::lock(&self.thread).take() {
            let _ = t.join();
        }
        let batch = self.inner.meter_batch();
        self.inner.commit_with(batch).map_err(|source| PoolError::Io { what: "committing the pools".into(), source })
    }
}
#[cfg(test)]
mod tests;
