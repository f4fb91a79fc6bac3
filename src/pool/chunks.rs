//! The chunk map of a chunk-mapped pool volume (thin or low priority): the
//! [`ChunkMap`] a thin target serves I/O through.
//!
//! Lookups are lock-free (`entries.rs`: per chunk its id + 1, 0 =
//! unmapped; the 64ths zeroed since its last write; that write's second,
//! for reclaim). Mapping and unmapping take the volume's allocation lock
//! and queue a change; the pool's committer makes changes durable (stores
//! flushed first), and releases unmapped chunks only after that commit and
//! after every I/O that might still use them (epoch counters) has left.

use super::entries::{Entries, Entry};
use super::records::{split_id, ChunkId, VolumeRecord};
use crate::api::{PoolLayout, VolumePriority};
use super::inner::Inner;
use crate::backend::{Backend, ZeroMode};
use crate::volume::target::{ChunkMap, ChunkPlace};
use arc_swap::ArcSwap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering::*};
use std::sync::{Arc, Mutex, Weak};

/// Set in an entry while `zeroed` decides whether to unmap it: reads still
/// go to the chunk, a write through it is made again.
const FROZEN: u64 = 1 << 63;

/// A change not yet committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Map { vchunk: u64, id: ChunkId },
    Unmap { vchunk: u64, id: ChunkId },
}

#[derive(Debug)]
pub struct ThinMap {
    pub volume: String,
    pub pool: String,
    chunk: u64,
    entries: Entries,
    /// Store index → open store (the pool's, as of the last reconfigure).
    stores: ArcSwap<Vec<Option<Arc<dyn Backend>>>>,
    /// Every store at creation, for `ChunkMap::stores`.
    all_stores: Vec<Arc<dyn Backend>>,
    /// Preferred store per chunk (stripe:N members: chunk c on c % N).
    members: Vec<usize>,
    alloc: Mutex<()>,
    pending: Mutex<Vec<Change>>,
    changed: AtomicU64,
    committed: AtomicU64,
    epoch: AtomicU64,
    active: [AtomicU64; 2],
    pub written: AtomicU64,
    pub mapped: AtomicU64,
    /// The pool's "an allocation may wait" flag.
    may_wait: Arc<std::sync::atomic::AtomicBool>,
    inner: Weak<Inner>,
}


impl ThinMap {
    /// The (empty) map of `record`'s volume: `chunk`-sized chunks on the
    /// pool's `stores`; `may_wait` is the pool's flag.
    pub fn new(record: &VolumeRecord, chunk: u64, stores: Vec<Option<Arc<dyn Backend>>>, may_wait: Arc<std::sync::atomic::AtomicBool>, inner: Weak<Inner>) -> ThinMap {
        let members = if matches!(record.layout, PoolLayout::Stripe { .. }) { record.members.clone() } else { Vec::new() };
        // Reclaim takes a low-priority volume's least recently written
        // chunks: only those maps keep write times.
        let stamps = record.priority == VolumePriority::Low;
        let (volume, pool, chunks) = (record.name.as_str(), record.pool.as_str(), record.size / chunk);
        let all_stores = stores.iter().flatten().cloned().collect();
        ThinMap {
            volume: volume.into(),
            pool: pool.into(),
            chunk,
            entries: Entries::new(chunks, stamps),
            stores: ArcSwap::from_pointee(stores),
            all_stores,
            members,
            alloc: Mutex::new(()),
            pending: Mutex::new(Vec::new()),
            changed: AtomicU64::new(0),
            committed: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
            active: [AtomicU64::new(0), AtomicU64::new(0)],
            written: AtomicU64::new(0),
            mapped: AtomicU64::new(0),
            may_wait,
            inner,
        }
    }

    fn with_entry<R>(&self, c: u64, init: bool, f: impl FnOnce(Entry<'_>) -> R) -> Option<R> {
        self.entries.with(c, init, f)
    }

    fn entry(&self, c: u64) -> u64 {
        self.entries.id(c)
    }

    /// Sets chunk `c`'s entry (allocating its page), returning the old one.
    fn set_entry(&self, c: u64, value: u64) -> u64 {
        self.with_entry(c, true, |e| {
            if value != 0 {
                e.stamp();
            }
            if let Some(z) = e.zeroed() {
                z.store(0, SeqCst);
            }
            e.id.swap(value, SeqCst)
        })
        .unwrap_or(0)
    }

    /// Start-up: chunk `c` is `id` (committed). Returns the id it had.
    pub fn load(&self, c: u64, id: ChunkId) -> Option<ChunkId> {
        match self.set_entry(c, id + 1) {
            0 => {
                self.mapped.fetch_add(1, Relaxed);
                None
            }
            old => Some((old & !FROZEN) - 1),
        }
    }

    /// Grows (or shrinks) the map to hold `chunks` chunks; concurrent I/O
    /// loses nothing.
    pub fn resize(&self, chunks: u64) {
        self.entries.resize(chunks);
    }

    pub fn set_stores(&self, stores: Vec<Option<Arc<dyn Backend>>>) {
        self.stores.store(Arc::new(stores));
    }

    fn place_of(&self, id: ChunkId) -> Option<ChunkPlace> {
        let (s, i) = split_id(id);
        let store = self.stores.load().get(s).cloned().flatten()?;
        Some(ChunkPlace { store, offset: i * self.chunk })
    }

    /// Every mapped chunk: (chunk, id, last write second).
    pub fn mapped_chunks(&self) -> Vec<(u64, ChunkId, u32)> {
        let mut out = Vec::new();
        self.entries.for_each(|c, v, stamp| {
            if v != 0 {
                out.push((c, v - 1, stamp));
            }
        });
        out
    }

    /// The mapping as committed: (chunk, id) of every mapped chunk with the
    /// changes not yet committed undone, taken at one instant (under the
    /// allocation lock, which every map change holds).
    pub fn durable_entries(&self) -> std::collections::BTreeMap<u64, ChunkId> {
        let _g = crate::sync::lock(&self.alloc);
        let mut out: std::collections::BTreeMap<u64, ChunkId> = self.mapped_chunks().into_iter().map(|(c, id, _)| (c, id)).collect();
        for change in crate::sync::lock(&self.pending).iter().rev() {
            match *change {
                Change::Map { vchunk, .. } => out.remove(&vchunk),
                Change::Unmap { vchunk, id } => out.insert(vchunk, id),
            };
        }
        out
    }

    fn push(&self, change: Change) {
        crate::sync::lock(&self.pending).push(change);
        self.changed.fetch_add(1, AcqRel);
    }

    /// The changes so far, and the change count they bring the map to.
    pub fn take_pending(&self) -> (Vec<Change>, u64) {
        let mut p = crate::sync::lock(&self.pending);
        let upto = self.changed.load(Acquire);
        (std::mem::take(&mut *p), upto)
    }

    /// A failed commit: its changes go back in front of newer ones.
    pub fn restore_pending(&self, mut changes: Vec<Change>) {
        let mut p = crate::sync::lock(&self.pending);
        changes.append(&mut p);
        *p = changes;
    }

    pub fn mark_committed(&self, upto: u64) {
        self.committed.fetch_max(upto, AcqRel);
    }

    /// Waits until every I/O that entered before now has left (at most
    /// `limit`); false if one is still running then.
    pub fn quiesce(&self, limit: std::time::Duration) -> bool {
        let old = self.epoch.fetch_add(1, SeqCst);
        let deadline = std::time::Instant::now() + limit;
        while self.active[(old & 1) as usize].load(SeqCst) != 0 {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        true
    }

    /// The 64ths of a chunk that `[within, within+len)` covers whole
    /// (`whole`) or touches at all.
    fn granules(&self, within: u64, len: u64, whole: bool) -> u64 {
        let g = (self.chunk / 64).max(1);
        let (first, end) = if whole { (within.div_ceil(g), (within + len) / g) } else { (within / g, (within + len).div_ceil(g)) };
        (first.min(64)..end.min(64)).fold(0, |m, k| m | (1 << k))
    }

    /// Whether chunk `c` maps `place` now (not frozen, not changed).
    fn maps(&self, c: u64, place: &ChunkPlace) -> bool {
        match self.entry(c) {
            0 => false,
            v if v & FROZEN != 0 => false,
            v => self.place_of(v - 1).is_some_and(|p| p.offset == place.offset && Arc::ptr_eq(&p.store, &place.store)),
        }
    }

    /// A partial TRIM/WRITE_ZEROES zeroed `[within, within+len)` of mapped
    /// chunk `c`. When every 64th of the chunk has been zeroed since its
    /// last write, the chunk holds only zeros: it is unmapped at once.
    fn zeroed_part(&self, c: u64, within: u64, len: u64) -> io::Result<()> {
        let bits = self.granules(within, len, true);
        if bits == 0 || self.with_entry(c, false, |e| e.zeroed_or_init().fetch_or(bits, SeqCst) | bits != u64::MAX).unwrap_or(true) {
            return Ok(());
        }
        let _g = crate::sync::lock(&self.alloc);
        // Freeze first, then look at the mask again: a write that cleared
        // its 64ths after this look finds the entry changed and writes
        // again; reads meanwhile still see the chunk's data.
        let unmapped = self.with_entry(c, false, |e| {
            let cur = e.id.load(SeqCst);
            if cur == 0 {
                return None;
            }
            e.id.store(cur | FROZEN, SeqCst);
            if e.zeroed_or_init().load(SeqCst) != u64::MAX {
                e.id.store(cur, SeqCst);
                return None;
            }
            e.id.store(0, SeqCst);
            Some(cur)
        });
        let Some(cur) = unmapped.flatten() else { return Ok(()) };
        self.mapped.fetch_sub(1, Relaxed);
        if let Some(place) = self.place_of(cur - 1) {
            place.store.trim(place.offset, self.chunk, false)?;
        }
        self.push(Change::Unmap { vchunk: c, id: cur - 1 });
        Ok(())
    }

    /// Unmaps chunk `c` if it maps `expect` (reclaim), or whatever it maps
    /// (`None`). Returns the chunk it mapped.
    pub fn unmap_if(&self, c: u64, expect: Option<ChunkId>) -> io::Result<Option<ChunkId>> {
        let _g = crate::sync::lock(&self.alloc);
        let cur = self.entry(c);
        if cur == 0 || expect.is_some_and(|e| e + 1 != cur) {
            return Ok(None);
        }
        let id = cur - 1;
        self.set_entry(c, 0);
        self.mapped.fetch_sub(1, Relaxed);
        // Punched now, so the chunk reads zeros even if a crash loses the
        // unmapping (and the space returns to a sparse store).
        if let Some(p) = self.place_of(id) {
            p.store.trim(p.offset, self.chunk, false)?;
        }
        self.push(Change::Unmap { vchunk: c, id });
        Ok(Some(id))
    }
}

impl ThinMap {
    fn wrote_to_granules(&self, c: u64, within: u64, len: u64, bytes: u64) {
        self.written.fetch_add(bytes, Relaxed);
        // No masks in the page: nothing was zeroed there; a mask created
        // after this look only takes 64ths a TRIM overlapping this write
        // zeroed (which may then win: they were concurrent).
        self.with_entry(c, false, |e| {
            e.stamp();
            if let Some(z) = e.zeroed().filter(|_| len > 0) {
                z.fetch_and(!self.granules(within, len, false), SeqCst);
            }
        });
    }
}

impl ChunkMap for ThinMap {
    fn chunk_size(&self) -> u64 {
        self.chunk
    }

    fn lookup(&self, c: u64) -> Option<ChunkPlace> {
        match self.entry(c) & !FROZEN {
            0 => None,
            v => self.place_of(v - 1),
        }
    }

    fn map(&self, c: u64) -> io::Result<ChunkPlace> {
        if let Some(p) = self.lookup(c) {
            return Ok(p);
        }
        let inner = self.inner.upgrade().ok_or_else(|| io::Error::other("the pool is closed"))?;
        let prefer = (!self.members.is_empty()).then(|| self.members[(c % self.members.len() as u64) as usize]);
        // Allocation may wait for space: not under the allocation lock, so
        // unmaps (TRIM, reclaim) of this volume go on meanwhile.
        let (id, clean) = inner.allocate(&self.pool, prefer)?;
        let _g = crate::sync::lock(&self.alloc);
        if let Some(p) = self.lookup(c) {
            inner.give_back(&self.pool, id);
            return Ok(p);
        }
        let Some(place) = self.place_of(id) else {
            inner.give_back(&self.pool, id);
            return Err(io::Error::other(format!("pool '{}': chunk {id} has no open store", self.pool)));
        };
        // A reused chunk holds someone's old data: zero it before anyone
        // can read it through this map (a clean one reads zeros already).
        let zeroed = if clean { Ok(()) } else { place.store.write_zeroes(place.offset, self.chunk, ZeroMode { may_trim: true, fast_only: false }, false) };
        if let Err(e) = zeroed {
            inner.give_back(&self.pool, id);
            return Err(e);
        }
        self.set_entry(c, id + 1);
        self.mapped.fetch_add(1, Relaxed);
        self.push(Change::Map { vchunk: c, id });
        Ok(place)
    }

    fn unmap(&self, c: u64) -> io::Result<()> {
        self.unmap_if(c, None).map(drop)
    }

    fn wrote(&self, c: u64, bytes: u64) {
        self.wrote_to_granules(c, 0, 0, bytes);
    }

    /// Forgets the zeroed 64ths the write touched, then checks the entry:
    /// a write racing an unmapping (see `zeroed`) either cleared its 64ths
    /// before the unmapping looked, or sees the entry changed here.
    fn wrote_to(&self, c: u64, within: u64, bytes: u64, place: &ChunkPlace) -> bool {
        self.wrote_to_granules(c, within, bytes, bytes);
        self.maps(c, place)
    }

    fn zeroed(&self, c: u64, within: u64, bytes: u64) -> io::Result<()> {
        self.zeroed_part(c, within, bytes)
    }

    fn may_wait(&self) -> bool {
        self.may_wait.load(Relaxed)
    }

    fn enter(&self) -> u64 {
        let e = self.epoch.load(SeqCst);
        self.active[(e & 1) as usize].fetch_add(1, SeqCst);
        e
    }

    fn leave(&self, token: u64) {
        self.active[(token & 1) as usize].fetch_sub(1, SeqCst);
    }

    fn commit(&self) -> io::Result<()> {
        if !self.uncommitted() {
            return self.stores.load().iter().flatten().try_for_each(|s| s.flush());
        }
        let inner = self.inner.upgrade().ok_or_else(|| io::Error::other("the pool is closed"))?;
        inner.commit_all()
    }

    fn uncommitted(&self) -> bool {
        self.changed.load(Acquire) > self.committed.load(Acquire)
    }

    fn stores(&self) -> &[Arc<dyn Backend>] {
        &self.all_stores
    }
}
