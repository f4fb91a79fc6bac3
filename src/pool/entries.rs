//! The entries of a chunk map: one per chunk of the volume, in lazily
//! allocated pages reached through a directory that a resize replaces
//! (pages are shared between the old and new directory, so I/O running
//! through the old one loses nothing). Reads and updates are lock-free.
//!
//! A page holds the chunks' ids (8 bytes each, all a write must touch).
//! The zeroed-64ths masks of a page exist only once a partial TRIM or
//! WRITE_ZEROES reached one of its chunks, and last-write seconds only in
//! maps that reclaim reads them (low priority): a thin volume written at
//! random all over touches a third of the memory it otherwise would.

use arc_swap::ArcSwap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::*};
use std::sync::{Arc, OnceLock};

/// Entries per page (a page is allocated at the first mapping in it).
const PAGE: u64 = 4096;

#[derive(Debug)]
struct Page {
    /// Chunk id + 1 (0: unmapped), with the map's FROZEN bit.
    ids: Box<[AtomicU64]>,
    /// Which 64ths of each chunk partial TRIMs/WRITE_ZEROES zeroed since
    /// the last write there.
    zeroed: OnceLock<Box<[AtomicU64]>>,
    /// Unix second of each chunk's last write, if kept.
    stamps: Option<Box<[AtomicU32]>>,
}

fn atomics<T: Default>() -> Box<[T]> {
    (0..PAGE).map(|_| T::default()).collect()
}

/// One chunk's entry.
pub struct Entry<'a> {
    pub id: &'a AtomicU64,
    page: &'a Page,
    i: usize,
}

impl Entry<'_> {
    /// The chunk's zeroed-64ths mask, if its page has masks yet (none:
    /// nothing was zeroed in the page, the mask is 0).
    pub fn zeroed(&self) -> Option<&AtomicU64> {
        self.page.zeroed.get().map(|z| &z[self.i])
    }

    /// The mask, creating the page's masks.
    pub fn zeroed_or_init(&self) -> &AtomicU64 {
        &self.page.zeroed.get_or_init(atomics)[self.i]
    }

    /// Notes a write now (if the map keeps stamps).
    pub fn stamp(&self) {
        if let Some(s) = &self.page.stamps {
            s[self.i].store(now_secs(), Relaxed);
        }
    }

    fn stamp_value(&self) -> u32 {
        self.page.stamps.as_ref().map_or(0, |s| s[self.i].load(Relaxed))
    }
}

fn now_secs() -> u32 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as u32)
}

type Slot = Arc<OnceLock<Page>>;

fn slots(pages: usize) -> impl Iterator<Item = Slot> {
    (0..pages).map(|_| Arc::new(OnceLock::new()))
}

#[derive(Debug)]
pub struct Entries {
    dir: ArcSwap<Vec<Slot>>,
    stamps: bool,
}

impl Entries {
    /// `stamps`: keep each chunk's last-write second.
    pub fn new(chunks: u64, stamps: bool) -> Entries {
        Entries { dir: ArcSwap::from_pointee(slots(chunks.div_ceil(PAGE) as usize).collect()), stamps }
    }

    /// `f` of chunk `c`'s entry, if its page exists (`init`: creating the
    /// page); `None` past the end. The directory is borrowed, not cloned:
    /// no reference count changes on the I/O path.
    pub fn with<R>(&self, c: u64, init: bool, f: impl FnOnce(Entry<'_>) -> R) -> Option<R> {
        let dir = self.dir.load();
        let slot = dir.get((c / PAGE) as usize)?;
        let page = if init { slot.get_or_init(|| Page { ids: atomics(), zeroed: OnceLock::new(), stamps: self.stamps.then(atomics) }) } else { slot.get()? };
        let i = (c % PAGE) as usize;
        Some(f(Entry { id: &page.ids[i], page, i }))
    }

    /// Chunk `c`'s id + 1 (0: unmapped).
    pub fn id(&self, c: u64) -> u64 {
        self.with(c, false, |e| e.id.load(Acquire)).unwrap_or(0)
    }

    /// Holds `chunks` chunks from now on; pages already there are kept.
    pub fn resize(&self, chunks: u64) {
        let old = self.dir.load();
        let want = chunks.div_ceil(PAGE) as usize;
        let mut dir: Vec<Slot> = old.iter().take(want).cloned().collect();
        dir.extend(slots(want.saturating_sub(dir.len())));
        self.dir.store(Arc::new(dir));
    }

    /// `f(chunk, id + 1, last write second)` for every chunk of every
    /// allocated page.
    pub fn for_each(&self, mut f: impl FnMut(u64, u64, u32)) {
        let dir = self.dir.load();
        for (p, slot) in dir.iter().enumerate() {
            if let Some(page) = slot.get() {
                for i in 0..PAGE as usize {
                    let e = Entry { id: &page.ids[i], page, i };
                    f(p as u64 * PAGE + i as u64, e.id.load(Acquire), e.stamp_value());
                }
            }
        }
    }
}
