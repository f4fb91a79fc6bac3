//! thin: a chunk-mapped pool volume (dm-thin). Chunk `c` of the extent
//! lives where the volume's [`ChunkMap`] says; an unmapped chunk reads as
//! zeros and is a hole in block status. The first write to a chunk maps one
//! (the rest of it reads zeros); a TRIM or WRITE_ZEROES covering whole
//! chunks unmaps them (WRITE_ZEROES with NO_HOLE maps them instead); FLUSH
//! (and a FUA write to a new chunk) first flushes the stores, then commits
//! the map, so a mapping is never durable before the data it points at.
//!
//! The map itself (allocation, commit, reclaim, metering) belongs to the
//! pool (`crate::pool`), which implements [`ChunkMap`]; the table only says
//! "thin, this chunk size", so this file knows nothing of pools.

mod map;
#[cfg(test)]
mod tests;

pub use map::{ChunkMap, ChunkPlace};

use super::Target;
use crate::backend::{Allocation, Backend, ZeroMode};
use nix::errno::Errno;
use std::io;
use std::sync::Arc;

#[derive(Debug)]
pub struct ThinTarget {
    map: Arc<dyn ChunkMap>,
    length: u64,
}

/// One chunk's part of a call: the chunk, where the part starts in it,
/// where it starts in the call, its length, and whether it covers the
/// whole chunk (to the volume's end for a short last chunk).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Part {
    chunk: u64,
    within: u64,
    skip: u64,
    length: u64,
    whole: bool,
}

/// `usize` bounds of a part inside a call's buffer (which is in memory, so
/// they fit).
fn span(p: &Part) -> std::ops::Range<usize> {
    p.skip as usize..(p.skip + p.length) as usize
}

/// A running I/O on looked-up chunks ([`ChunkMap::enter`]); leaves when
/// dropped, so an error return leaves too.
struct Entered<'a> {
    map: &'a dyn ChunkMap,
    token: u64,
}

impl<'a> Entered<'a> {
    fn new(map: &'a dyn ChunkMap) -> Entered<'a> {
        Entered { map, token: map.enter() }
    }
}

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        self.map.leave(self.token);
    }
}

/// Appends `run`, joined to the last run when both are alike; false (and
/// nothing appended) when that would make more than `max` runs.
fn push_run(out: &mut Vec<Allocation>, run: Allocation, max: usize) -> bool {
    let full = out.len() >= max;
    match out.last_mut() {
        Some(last) if last.hole == run.hole => last.length += run.length,
        _ if full => return false,
        _ => out.push(run),
    }
    true
}

/// How many times a write maps its chunk without holding a token before it
/// maps while holding one (see `with_place`).
const MAP_TRIES: usize = 3;

/// How many times a write is made again because its chunk was unmapped
/// under it (see `ChunkMap::wrote_to`) before it fails.
const REWRITES: usize = 8;

impl ThinTarget {
    pub fn new(map: Arc<dyn ChunkMap>, length: u64) -> ThinTarget {
        ThinTarget { map, length }
    }

    fn chunk(&self) -> u64 {
        self.map.chunk_size().max(1)
    }

    /// A call past the volume's end would map chunks it does not own.
    fn check(&self, offset: u64, length: u64) -> io::Result<()> {
        match offset.checked_add(length) {
            Some(end) if end <= self.length => Ok(()),
            _ => Err(Errno::EINVAL.into()),
        }
    }

    /// The parts of `[offset, offset+length)`, one per chunk touched (the
    /// table cuts requests at chunk boundaries, so normally just one).
    fn parts(&self, offset: u64, length: u64) -> impl Iterator<Item = Part> + '_ {
        let chunk = self.chunk();
        let end = offset.saturating_add(length);
        let mut pos = offset;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let (c, within) = (pos / chunk, pos % chunk);
            let take = (chunk - within).min(end - pos);
            let chunk_end = (pos - within).saturating_add(chunk).min(self.length);
            let part = Part { chunk: c, within, skip: pos - offset, length: take, whole: within == 0 && pos + take >= chunk_end };
            pos += take;
            Some(part)
        })
    }

    /// Runs `io` on chunk `c`'s place, mapping the chunk first if need be;
    /// `io` is told whether this call mapped it. Returns what `io` did and
    /// that too.
    ///
    /// `map` may wait for space, and the space reclaim frees becomes
    /// reusable only once every I/O entered before the free has left: a
    /// token held across that wait could keep the wait from ever ending.
    /// So the chunk is mapped with no token held and looked up again under
    /// one (the place `map` returned may be unmapped by a racing TRIM and
    /// handed out before we enter). Only if TRIMs keep winning that race is
    /// the chunk mapped under a token.
    fn with_place<T>(&self, c: u64, mut io: impl FnMut(&ChunkPlace, bool) -> io::Result<T>) -> io::Result<(T, bool)> {
        let map = &*self.map;
        let mut mapped = false;
        for _ in 0..MAP_TRIES {
            let entered = Entered::new(map);
            if let Some(place) = map.lookup(c) {
                return Ok((io(&place, mapped)?, mapped));
            }
            drop(entered);
            map.map(c)?;
            mapped = true;
        }
        let _entered = Entered::new(map);
        let place = map.map(c)?;
        Ok((io(&place, true)?, true))
    }

    /// Writes part `p` with `io` (given the place and whether the store
    /// should do FUA itself), again while its chunk is unmapped under it.
    /// `changed`: an earlier part changed the map (a commit follows, which
    /// flushes the stores). Returns whether the map changed.
    fn write_part(&self, p: &Part, fua: bool, mut changed: bool, io: impl Fn(&ChunkPlace, bool) -> io::Result<()>) -> io::Result<bool> {
        for _ in 0..REWRITES {
            let (kept, new) = self.with_place(p.chunk, |place, new| {
                io(place, fua && !new && !changed)?;
                Ok(self.map.wrote_to(p.chunk, p.within, p.length, place))
            })?;
            changed |= new || !kept;
            if kept {
                return Ok(changed);
            }
        }
        Err(io::Error::other(format!("chunk {} was unmapped under {REWRITES} writes to it in a row", p.chunk)))
    }

    /// After a call that changed the map (or with changes of others still
    /// pending): with `fua`, commit, which flushes the stores first, so the
    /// data and the mapping that points at it are both durable.
    fn settle(&self, fua: bool, changed: bool) -> io::Result<()> {
        if fua && (changed || self.map.uncommitted()) {
            self.map.commit()
        } else {
            Ok(())
        }
    }

    /// TRIM, or WRITE_ZEROES that may leave holes: whole chunks are
    /// unmapped (their space returns to the pool), parts of mapped chunks
    /// go to `pass` (with the FUA flag still worth sending) and then to
    /// `ChunkMap::zeroed`, and parts of unmapped chunks read zeros already.
    fn discard(&self, offset: u64, length: u64, fua: bool, pass: impl Fn(&ChunkPlace, &Part, bool) -> io::Result<()>) -> io::Result<()> {
        self.check(offset, length)?;
        let mut changed = false;
        {
            let _entered = Entered::new(&*self.map);
            for p in self.parts(offset, length) {
                match self.map.lookup(p.chunk) {
                    None => {}
                    Some(_) if p.whole => {
                        self.map.unmap(p.chunk)?;
                        changed = true;
                    }
                    Some(place) => {
                        pass(&place, &p, fua && !changed)?;
                        self.map.zeroed(p.chunk, p.within, p.length)?;
                    }
                }
            }
        }
        self.settle(fua, changed)
    }

    /// Whether zeroing `[offset, offset+length)` in `mode` is certain to be
    /// fast: unmapping and leaving unmapped chunks alone are; a store call
    /// is if that store says so; mapping a chunk may land on any store.
    fn zeroing_fast(&self, offset: u64, length: u64, mode: ZeroMode) -> bool {
        let _entered = Entered::new(&*self.map);
        self.parts(offset, length).all(|p| match self.map.lookup(p.chunk) {
            Some(_) if mode.may_trim && p.whole => true,
            Some(place) => place.store.fast_zero_certain(mode),
            None if mode.may_trim => true,
            None => self.map.stores().iter().all(|s| s.fast_zero_certain(mode)),
        })
    }
}

impl Target for ThinTarget {
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check(offset, buf.len() as u64)?;
        let _entered = Entered::new(&*self.map);
        for p in self.parts(offset, buf.len() as u64) {
            let part = &mut buf[span(&p)];
            match self.map.lookup(p.chunk) {
                Some(place) => place.store.read_at(part, place.offset + p.within)?,
                None => part.fill(0),
            }
        }
        Ok(())
    }

    /// A chunk mapped by this write is committed before a FUA write
    /// returns; its data then needs no FUA of its own (the commit flushes
    /// the stores first).
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.check(offset, data.len() as u64)?;
        let mut changed = false;
        for p in self.parts(offset, data.len() as u64) {
            let part = &data[span(&p)];
            changed = self.write_part(&p, fua, changed, |place, fua| place.store.write_at(part, place.offset + p.within, fua))?;
        }
        self.settle(fua, changed)
    }

    fn trim(&self, offset: u64, length: u64, fua: bool) -> io::Result<()> {
        self.discard(offset, length, fua, |place, p, fua| place.store.trim(place.offset + p.within, p.length, fua))
    }

    /// Without NO_HOLE, like TRIM but zeroing parts of mapped chunks.
    /// With NO_HOLE the client asks for the range to be allocated (dm-thin
    /// writes zero pages there, which maps them): every chunk is mapped and
    /// its part zeroed on the store, which keeps it allocated.
    fn write_zeroes(&self, offset: u64, length: u64, mode: ZeroMode, fua: bool) -> io::Result<()> {
        self.check(offset, length)?;
        // A fast zero must change nothing when it cannot be fast.
        if mode.fast_only && !self.zeroing_fast(offset, length, mode) {
            return Err(Errno::EOPNOTSUPP.into());
        }
        if mode.may_trim {
            return self.discard(offset, length, fua, |place, p, fua| place.store.write_zeroes(place.offset + p.within, p.length, mode, fua));
        }
        let mut changed = false;
        for p in self.parts(offset, length) {
            let earlier = changed;
            changed |= self.with_place(p.chunk, |place, new| place.store.write_zeroes(place.offset + p.within, p.length, mode, fua && !new && !earlier))?.1;
        }
        self.settle(fua, changed)
    }

    fn block_status(&self, offset: u64, length: u64, max_runs: usize) -> io::Result<Vec<Allocation>> {
        self.check(offset, length)?;
        let max_runs = max_runs.max(1);
        let mut out: Vec<Allocation> = Vec::new();
        let _entered = Entered::new(&*self.map);
        for p in self.parts(offset, length) {
            let Some(place) = self.map.lookup(p.chunk) else {
                if !push_run(&mut out, Allocation { length: p.length, hole: true }, max_runs) {
                    break;
                }
                continue;
            };
            // The first run may join the last one, so ask for one more
            // than the room left.
            let room = max_runs - out.len() + 1;
            let mut covered = 0;
            for run in place.store.block_status(place.offset + p.within, p.length, room)? {
                if run.length == 0 {
                    continue;
                }
                if !push_run(&mut out, run, max_runs) {
                    return Ok(out);
                }
                covered += run.length;
            }
            // The store stopped short (its own run limit): what follows is
            // unknown, and a reply may end early.
            if covered < p.length {
                break;
            }
        }
        Ok(out)
    }

    fn cache(&self, offset: u64, length: u64) -> io::Result<()> {
        self.check(offset, length)?;
        let _entered = Entered::new(&*self.map);
        for p in self.parts(offset, length) {
            if let Some(place) = self.map.lookup(p.chunk) {
                place.store.cache(place.offset + p.within, p.length)?;
            }
        }
        Ok(())
    }

    /// While its map may wait for space (see [`ChunkMap::may_wait`]).
    fn may_wait(&self) -> bool {
        self.map.may_wait()
    }

    fn can_wait(&self) -> bool {
        true
    }

    /// The map flushes the stores, then commits.
    fn flush(&self) -> io::Result<()> {
        self.map.commit()
    }

    /// It flushes its own stores (then commits the map).
    fn redundant(&self) -> bool {
        true
    }

    /// Unmapping whole chunks needs no store, but any other zeroing may
    /// reach any store of the pool.
    fn fast_zero_certain(&self, mode: ZeroMode) -> bool {
        self.map.stores().iter().all(|s| s.fast_zero_certain(mode))
    }

    fn stores(&self) -> &[Arc<dyn Backend>] {
        self.map.stores()
    }
}
