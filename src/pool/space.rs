//! A pool's free space in memory: one bit per chunk per store. Derived at
//! start-up from the owner records (free = not owned and not under a range
//! a config volume maps), so it is never persisted on its own and cannot
//! disagree with the metadata.

use super::records::{chunk_id, split_id, ChunkId};
use crate::backend::Backend;
use crate::map::Range;
use std::sync::Arc;

#[derive(Debug)]
pub struct StoreSpace {
    pub backend: String,
    /// `None` once the store left the configuration (its chunks are then
    /// neither free nor placeable).
    pub handle: Option<Arc<dyn Backend>>,
    /// The file behind it, for auto-extend.
    pub path: Option<std::path::PathBuf>,
    pub chunks: u64,
    /// Bit set = free.
    free: Vec<u64>,
    pub free_count: u64,
    /// Bit set = free and known to read zeros (a hole of a file store no
    /// one was given since it was seen): mapped without zeroing it first.
    clean: Vec<u64>,
    /// Chunks under ranges config volumes map: never free, never owned.
    pub reserved: u64,
    /// Where the next search for a free chunk starts.
    hint: u64,
    /// The ranges config volumes map (what `reserved` counts).
    reserved_ranges: Vec<Range>,
}

impl StoreSpace {
    /// All chunks free except those overlapping `reserved`.
    pub fn new(backend: &str, handle: Option<Arc<dyn Backend>>, path: Option<std::path::PathBuf>, chunks: u64, chunk: u64, reserved: &[Range]) -> StoreSpace {
        let mut s = StoreSpace { backend: backend.into(), handle, path, chunks: 0, free: Vec::new(), free_count: 0, clean: Vec::new(), reserved: 0, hint: 0, reserved_ranges: Vec::new() };
        s.extend(chunks, chunk, reserved);
        s
    }

    /// Grows to `chunks` chunks, the new ones free unless reserved.
    pub fn extend(&mut self, chunks: u64, chunk: u64, reserved: &[Range]) {
        let old = self.chunks;
        self.chunks = chunks.max(old);
        self.reserved_ranges.extend_from_slice(reserved);
        self.free.resize(self.chunks.div_ceil(64) as usize, 0);
        self.clean.resize(self.free.len(), 0);
        for i in old..self.chunks {
            let r = Range::new(i * chunk, chunk);
            if self.handle.is_some() && !reserved.iter().any(|u| u.overlaps(&r)) {
                self.set(i, true);
            } else {
                self.reserved += 1;
            }
        }
    }

    fn set(&mut self, i: u64, free: bool) {
        let (w, b) = ((i / 64) as usize, 1u64 << (i % 64));
        self.clean[w] &= !b;
        let was = self.free[w] & b != 0;
        if free && !was {
            self.free[w] |= b;
            self.free_count += 1;
        } else if !free && was {
            self.free[w] &= !b;
            self.free_count -= 1;
        }
    }

    /// The store's ranges the pool owns (allocated or free): every chunk
    /// but those under a range a config volume maps, from the reserved
    /// ranges rounded out to whole chunks (no walk over every chunk).
    pub fn owned_ranges(&self, chunk: u64) -> Vec<Range> {
        let mut taken: Vec<(u64, u64)> = self.reserved_ranges.iter().map(|r| (r.start / chunk, r.end.div_ceil(chunk).min(self.chunks))).filter(|(a, b)| a < b).collect();
        taken.sort_unstable();
        let mut out = Vec::new();
        let mut next = 0;
        for (a, b) in taken {
            if a > next {
                out.push(Range::new(next * chunk, (a - next) * chunk));
            }
            next = next.max(b);
        }
        if next < self.chunks {
            out.push(Range::new(next * chunk, (self.chunks - next) * chunk));
        }
        out
    }

    /// The free-chunk bitmap (bit `i % 64` of word `i / 64`).
    pub fn free_bits(&self) -> Vec<u64> {
        self.free.clone()
    }

    pub fn is_free(&self, i: u64) -> bool {
        i < self.chunks && self.free[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Marks chunk `i` owned (start-up, from the owner records).
    pub fn take(&mut self, i: u64) -> bool {
        let was = self.is_free(i);
        self.set(i, false);
        was
    }

    pub fn release(&mut self, i: u64) {
        if i < self.chunks {
            self.set(i, true);
        }
    }

    /// Marks the free chunks at and above the highest one in use that
    /// read zeros (holes, by the store's block status) as clean. Free
    /// chunks lower down may hold what a write put there before a crash
    /// lost its mapping: they are zeroed when mapped.
    pub fn scan_clean(&mut self, chunk: u64) {
        let Some(store) = self.handle.clone() else { return };
        let used = (0..self.chunks).rev().find(|i| !self.is_free(*i) && !self.reserved_ranges.iter().any(|r| r.overlaps(&Range::new(i * chunk, chunk))));
        let from = used.map_or(0, |i| i + 1);
        if from >= self.chunks {
            return;
        }
        let Ok(runs) = store.block_status(from * chunk, (self.chunks - from) * chunk, 1024) else { return };
        let mut at = from * chunk;
        for run in runs {
            if run.hole {
                for i in at.div_ceil(chunk)..(at + run.length) / chunk {
                    if self.is_free(i) {
                        self.clean[(i / 64) as usize] |= 1 << (i % 64);
                    }
                }
            }
            at += run.length;
        }
    }

    /// Free chunks known to read zeros.
    #[cfg(test)]
    pub fn clean_chunks(&self) -> u64 {
        self.clean.iter().map(|w| w.count_ones() as u64).sum()
    }

    /// The lowest free chunk at or after the hint (wrapping), taken, and
    /// whether it was clean.
    pub fn alloc(&mut self) -> Option<(u64, bool)> {
        if self.free_count == 0 || self.handle.is_none() {
            return None;
        }
        let words = self.free.len();
        let start = (self.hint / 64) as usize;
        for k in 0..=words {
            let w = (start + k) % words;
            if self.free[w] != 0 {
                let i = w as u64 * 64 + self.free[w].trailing_zeros() as u64;
                let clean = self.clean[w] & (1 << (i % 64)) != 0;
                self.set(i, false);
                self.hint = i + 1;
                return Some((i, clean));
            }
        }
        None
    }
}

/// Every store of one pool.
#[derive(Debug)]
pub struct Space {
    pub chunk: u64,
    pub stores: Vec<StoreSpace>,
    /// Round-robin start for the next allocation.
    cursor: usize,
}

impl Space {
    pub fn new(chunk: u64, stores: Vec<StoreSpace>) -> Space {
        Space { chunk, stores, cursor: 0 }
    }

    pub fn free_chunks(&self) -> u64 {
        self.stores.iter().map(|s| s.free_count).sum()
    }

    /// Chunks the pool can hold data in (owned or free).
    pub fn usable_chunks(&self) -> u64 {
        self.stores.iter().filter(|s| s.handle.is_some()).map(|s| s.chunks - s.reserved).sum()
    }

    /// A free chunk, on `prefer` if it has one, else on the next store in
    /// round-robin order that is not in `avoid`; and whether it is clean
    /// (reads zeros).
    pub fn alloc(&mut self, prefer: Option<usize>, avoid: &[usize]) -> Option<(ChunkId, bool)> {
        if let Some(p) = prefer {
            if let Some((i, clean)) = self.stores.get_mut(p).and_then(StoreSpace::alloc) {
                return Some((chunk_id(p, i), clean));
            }
        }
        let n = self.stores.len();
        for k in 0..n {
            let s = (self.cursor + k) % n;
            if avoid.contains(&s) {
                continue;
            }
            if let Some((i, clean)) = self.stores[s].alloc() {
                self.cursor = (s + 1) % n;
                return Some((chunk_id(s, i), clean));
            }
        }
        None
    }

    /// The `n` open stores with the most free chunks (ties: round-robin
    /// order from the cursor, which advances), for a new volume's members.
    pub fn pick_stores(&mut self, n: usize) -> Option<Vec<usize>> {
        let count = self.stores.len();
        let mut order: Vec<usize> = (0..count).map(|k| (self.cursor + k) % count).filter(|s| self.stores[*s].handle.is_some()).collect();
        order.sort_by_key(|s| std::cmp::Reverse(self.stores[*s].free_count));
        if order.len() < n {
            return None;
        }
        self.cursor = (self.cursor + 1) % count.max(1);
        Some(order[..n].to_vec())
    }

    /// Clean chunks on every store (see `StoreSpace::scan_clean`).
    pub fn scan_clean(&mut self) {
        let chunk = self.chunk;
        self.stores.iter_mut().for_each(|s| s.scan_clean(chunk));
    }

    pub fn take(&mut self, id: ChunkId) -> bool {
        let (s, i) = split_id(id);
        self.stores.get_mut(s).is_some_and(|st| st.take(i))
    }

    pub fn release(&mut self, id: ChunkId) {
        let (s, i) = split_id(id);
        if let Some(st) = self.stores.get_mut(s) {
            st.release(i);
        }
    }

    /// The store and offset of chunk `id`, if its store is open.
    pub fn place(&self, id: ChunkId) -> Option<(Arc<dyn Backend>, u64)> {
        let (s, i) = split_id(id);
        let st = self.stores.get(s)?;
        (i < st.chunks).then_some(())?;
        Some((st.handle.clone()?, i * self.chunk))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_taken_once_and_reserved_ranges_skipped() {
        let s = StoreSpace::new("a", None, None, 4, 1 << 20, &[]);
        assert_eq!(s.free_count, 0, "a store without a handle offers nothing");
        let spec = crate::backend::BackendSpec { name: "a".into(), path: None, size: Some(8 << 20), direct: false, read_only: false, delay: None, sharing: Default::default() };
        let mem = crate::backend::open_backend(&spec).unwrap();
        let mut s = StoreSpace::new("a", Some(mem), None, 8, 1 << 20, &[Range::new(1 << 20, 4096)]);
        assert_eq!((s.free_count, s.reserved), (7, 1));
        assert!(!s.is_free(1));
        assert_eq!(s.owned_ranges(1 << 20), vec![Range::new(0, 1 << 20), Range::new(2 << 20, 6 << 20)]);
        let first = |s: &mut StoreSpace| s.alloc().map(|a| a.0);
        assert_eq!((first(&mut s), first(&mut s), first(&mut s)), (Some(0), Some(2), Some(3)), "the reserved chunk is skipped");
        assert_eq!(first(&mut s), Some(4));
        assert!(!s.take(3), "already taken");
        s.release(3);
        assert!(s.is_free(3));
        assert_eq!(s.free_count, 4);
    }
}
