//! The pools' shared state and the two things every chunk-mapped write may
//! need from it: a free chunk (`allocate`, which may queue for space) and a
//! durable commit (`commit_all`, one transaction for every volume's
//! pending changes, after flushing every pool store).

use super::chunks::{Change, ThinMap};
use super::meta::{Batch, MapEntry, Meta};
use super::records::{ChunkId, PoolRecord, UsageRecord, VolumeRecord};
use super::space::Space;
use crate::config::{OnFull, PoolConfig};
use crate::sync::lock;
use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long a commit waits for I/O still using unmapped chunks before it
/// leaves them for the next commit.
const QUIESCE: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub struct PoolState {
    pub config: PoolConfig,
    pub record: PoolRecord,
    pub space: Space,
    /// Thin writes waiting for a free chunk.
    pub waiting: u64,
    /// Free space is below `low_water` (logged once per crossing).
    pub below_low_water: bool,
    /// Chunks taken back by reclaim since start.
    pub reclaimed: u64,
    /// Allocations that found no free chunk since the pool thread's last
    /// pass (it then reclaims or extends).
    pub short: u64,
    /// Set while a queue-mode pool is close to full (its thin volumes' I/O
    /// then leaves the reader threads: an allocation may wait). Shared
    /// with the volumes' chunk maps.
    pub may_wait: Arc<std::sync::atomic::AtomicBool>,
}

impl PoolState {
    pub fn chunk(&self) -> u64 {
        self.record.chunk
    }

    /// Logs once when free space falls below `low_water`; re-arms above.
    pub fn note_free_space(&mut self) {
        let usable = self.space.usable_chunks().max(1);
        let below = self.space.free_chunks() * 100 < usable * self.config.low_water_percent as u64;
        if below && !self.below_low_water {
            tracing::warn!(pool = %self.config.name, free = self.space.free_chunks() * self.chunk(), "pool free space is below low_water ({}%)", self.config.low_water_percent);
        }
        self.below_low_water = below;
        // Near full: some writes may wait soon. A margin, so that a burst
        // of first writes is on the blocking pool before it runs dry.
        let margin = (usable / 100).max(64);
        let near = self.config.on_full == OnFull::Queue && (self.space.free_chunks() < margin || self.waiting > 0);
        self.may_wait.store(near, std::sync::atomic::Ordering::Relaxed);
    }
}

#[derive(Debug)]
pub struct VolState {
    pub record: VolumeRecord,
    /// Thick volumes: (chunk of the volume, copy) → chunk id.
    pub thick: BTreeMap<(u64, u8), ChunkId>,
    /// Chunk-mapped volumes.
    pub map: Option<Arc<ThinMap>>,
    pub usage: UsageRecord,
    /// Written bytes reported by the daemon for thick volumes (delta since
    /// the last meter update).
    pub written_unmetered: u64,
    /// The meter after each of the last updates (one a second), for usage
    /// periods that start between the persisted minute samples.
    pub recent: std::collections::VecDeque<UsageRecord>,
}

impl VolState {
    pub fn allocated_chunks(&self) -> u64 {
        match &self.map {
            Some(m) => m.mapped.load(std::sync::atomic::Ordering::Relaxed),
            None => self.thick.len() as u64,
        }
    }
}

#[derive(Debug, Default)]
pub struct State {
    pub pools: BTreeMap<String, PoolState>,
    pub volumes: BTreeMap<String, VolState>,
}

#[derive(Debug)]
pub struct Inner {
    pub meta: Meta,
    pub state: Mutex<State>,
    /// Signalled whenever chunks return to a pool (and on reconfigure).
    pub space_freed: Condvar,
    /// One commit at a time.
    pub commit_lock: Mutex<()>,
    /// One volume create, resize, delete or check at a time (taken before
    /// `commit_lock`): the check must not see a volume's records before
    /// the volume is in memory.
    pub admin: Mutex<()>,
    /// Unmapped chunks whose last user had not left at commit time.
    deferred: Mutex<Vec<(Arc<ThinMap>, Vec<ChunkId>)>>,
    pub stop: AtomicBool,
    /// Wakes the pool thread early (a pool is short: reclaim, extend).
    pub kick: (Mutex<bool>, Condvar),
}

fn enospc(pool: &str) -> io::Error {
    let _ = pool;
    io::Error::from_raw_os_error(libc::ENOSPC)
}

impl Inner {
    pub fn new(meta: Meta, state: State) -> Inner {
        Inner {
            meta,
            state: Mutex::new(state),
            space_freed: Condvar::new(),
            commit_lock: Mutex::new(()),
            admin: Mutex::new(()),
            deferred: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            kick: (Mutex::new(false), Condvar::new()),
        }
    }

    pub fn wake_pool_thread(&self) {
        *lock(&self.kick.0) = true;
        self.kick.1.notify_all();
    }

    /// A free chunk of `pool` (on store `prefer` if it has one), and
    /// whether it is clean (reads zeros already). When none is free:
    /// ENOSPC at once (`on_full = "error"`), or after waiting up to
    /// `queue_timeout` for reclaim, auto-extend or a reload.
    pub fn allocate(&self, pool: &str, prefer: Option<usize>) -> io::Result<(ChunkId, bool)> {
        let mut st = lock(&self.state);
        let mut deadline: Option<Instant> = None;
        loop {
            let p = st.pools.get_mut(pool).ok_or_else(|| io::Error::other(format!("pool '{pool}' is gone")))?;
            if let Some(got) = p.space.alloc(prefer, &[]) {
                p.note_free_space();
                return Ok(got);
            }
            p.note_free_space();
            p.short += 1;
            let timeout = p.config.queue_timeout;
            if p.config.on_full == OnFull::Error {
                drop(st);
                self.wake_pool_thread();
                return Err(enospc(pool));
            }
            let until = *deadline.get_or_insert_with(|| {
                tracing::warn!(pool, "pool is full: thin writes wait up to {timeout:?} for space");
                Instant::now() + timeout
            });
            let now = Instant::now();
            if now >= until {
                return Err(enospc(pool));
            }
            p.waiting += 1;
            self.wake_pool_thread();
            let (guard, _) = self.space_freed.wait_timeout(st, (until - now).min(Duration::from_millis(500))).unwrap_or_else(|p| p.into_inner());
            st = guard;
            if let Some(p) = st.pools.get_mut(pool) {
                p.waiting -= 1;
            }
        }
    }

    /// A chunk allocated but never published goes straight back.
    pub fn give_back(&self, pool: &str, id: ChunkId) {
        if let Some(p) = lock(&self.state).pools.get_mut(pool) {
            p.space.release(id);
        }
        self.space_freed.notify_all();
    }

    /// Returns chunks to `pool` (committed frees) and wakes waiters.
    pub fn release(&self, pool: &str, ids: &[ChunkId]) {
        if ids.is_empty() {
            return;
        }
        if let Some(p) = lock(&self.state).pools.get_mut(pool) {
            ids.iter().for_each(|id| p.space.release(*id));
            p.note_free_space();
        }
        self.space_freed.notify_all();
    }

    /// Flushes every pool store, then commits every volume's pending map
    /// changes (and `extra`) in one transaction; chunks unmapped before it
    /// are free once it is durable and their last user has left.
    pub fn commit_with(&self, extra: Batch) -> io::Result<()> {
        let _serial = lock(&self.commit_lock);
        let (maps, stores) = {
            let st = lock(&self.state);
            let maps: Vec<Arc<ThinMap>> = st.volumes.values().filter_map(|v| v.map.clone()).collect();
            let stores: Vec<_> = st.pools.values().flat_map(|p| p.space.stores.iter().filter_map(|s| s.handle.clone())).collect();
            (maps, stores)
        };
        let mut batch = extra;
        let mut taken = Vec::new();
        for m in &maps {
            let (changes, upto) = m.take_pending();
            for ch in &changes {
                let (vchunk, id, mapped) = match *ch {
                    Change::Map { vchunk, id } => (vchunk, id, true),
                    Change::Unmap { vchunk, id } => (vchunk, id, false),
                };
                let e = MapEntry { volume: m.volume.clone(), pool: m.pool.clone(), vchunk, copy: 0, id };
                // The store applies unmaps before maps, so a chunk mapped
                // and unmapped again within one commit leaves no map entry.
                if mapped {
                    batch.mapped.push(e);
                } else {
                    batch.mapped.retain(|x| x != &e);
                    batch.unmapped.push(e);
                }
            }
            taken.push((m.clone(), changes, upto));
        }
        // A mapping is never durable before the data (and the zeroing) of
        // the chunk it points at.
        let flushed = stores.iter().try_for_each(|s| s.flush());
        let applied = flushed.and_then(|()| self.meta.apply(&batch).map_err(|e| io::Error::other(format!("pool metadata: {e}"))));
        if let Err(e) = applied {
            for (m, changes, _) in taken {
                m.restore_pending(changes);
            }
            return Err(e);
        }
        for (m, changes, upto) in taken {
            m.mark_committed(upto);
            let freed: Vec<ChunkId> = changes.iter().filter_map(|c| if let Change::Unmap { id, .. } = c { Some(*id) } else { None }).collect();
            if !freed.is_empty() {
                lock(&self.deferred).push((m, freed));
            }
        }
        self.release_quiesced();
        Ok(())
    }

    pub fn commit_all(&self) -> io::Result<()> {
        self.commit_with(Batch::default())
    }

    /// Frees the committed unmaps whose volumes have no older I/O left.
    fn release_quiesced(&self) {
        let waiting = std::mem::take(&mut *lock(&self.deferred));
        let mut still = Vec::new();
        for (m, ids) in waiting {
            if m.quiesce(QUIESCE) {
                self.release(&m.pool, &ids);
            } else {
                still.push((m, ids));
            }
        }
        lock(&self.deferred).extend(still);
    }
}
