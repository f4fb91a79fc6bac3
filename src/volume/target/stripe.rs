//! The stripe target (dm-stripe): chunk `c` of the extent on member
//! `c % N`, at member chunk `c / N`.
//!
//! The mapping table cuts requests at chunk boundaries, so a call normally
//! lies inside one chunk and touches one member; the pieces of a larger
//! request are run in parallel by the server. Calls that do span chunks
//! (a caller that does not cut) are still served, chunk by chunk.

use super::Target;
use crate::backend::{Allocation, Backend, ZeroMode};
use crate::map::{stripe_place, Leg};
use std::io;
use std::sync::Arc;

#[derive(Debug)]
pub struct StripeTarget {
    /// Open stores, in member order.
    stores: Vec<Arc<dyn Backend>>,
    /// The members as in the spec (store offsets of their first chunk).
    legs: Vec<Leg>,
    chunk: u64,
}

/// One chunk's part of a call: member, its store offset, and where the
/// part starts in the call and how long it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Segment {
    member: usize,
    at: u64,
    skip: u64,
    length: u64,
}

impl StripeTarget {
    /// `stores[i]` is the open store of `legs[i]`; the spec was validated
    /// (at least two members, chunk a power of two), so `chunk` is not 0.
    pub fn new(stores: Vec<Arc<dyn Backend>>, legs: Vec<Leg>, chunk: u64) -> StripeTarget {
        debug_assert_eq!(stores.len(), legs.len());
        StripeTarget { stores, legs, chunk: chunk.max(1) }
    }

    /// The parts of `[offset, offset+length)`, one per chunk touched.
    fn segments(&self, offset: u64, length: u64) -> impl Iterator<Item = Segment> + '_ {
        let end = offset.saturating_add(length);
        let mut pos = offset;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let (member, at) = stripe_place(&self.legs, self.chunk, pos);
            let take = (self.chunk - pos % self.chunk).min(end - pos);
            let seg = Segment { member, at, skip: pos - offset, length: take };
            pos += take;
            Some(seg)
        })
    }

    fn store(&self, s: &Segment) -> &dyn Backend {
        self.stores[s.member].as_ref()
    }
}

/// `usize` slice bounds of a segment inside a call's buffer; the buffer is
/// in memory, so its length fits in usize and so do these.
fn span(s: &Segment) -> std::ops::Range<usize> {
    s.skip as usize..(s.skip + s.length) as usize
}

impl Target for StripeTarget {
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.segments(offset, buf.len() as u64).try_for_each(|s| self.store(&s).read_at(&mut buf[span(&s)], s.at))
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.segments(offset, data.len() as u64).try_for_each(|s| self.store(&s).write_at(&data[span(&s)], s.at, fua))
    }

    fn trim(&self, offset: u64, length: u64, fua: bool) -> io::Result<()> {
        self.segments(offset, length).try_for_each(|s| self.store(&s).trim(s.at, s.length, fua))
    }

    fn write_zeroes(&self, offset: u64, length: u64, mode: ZeroMode, fua: bool) -> io::Result<()> {
        // A fast zero must change nothing when it cannot be fast: with
        // several members, know that every one is fast before any starts.
        if mode.fast_only && self.segments(offset, length).any(|s| !self.store(&s).fast_zero_certain(mode)) {
            return Err(nix::errno::Errno::EOPNOTSUPP.into());
        }
        self.segments(offset, length).try_for_each(|s| self.store(&s).write_zeroes(s.at, s.length, mode, fua))
    }

    fn block_status(&self, offset: u64, length: u64, max_runs: usize) -> io::Result<Vec<Allocation>> {
        let max_runs = max_runs.max(1);
        let mut out: Vec<Allocation> = Vec::new();
        for s in self.segments(offset, length) {
            // The first run may merge with the last one, so ask for one
            // more than the room left.
            let room = max_runs - out.len() + 1;
            let runs = self.store(&s).block_status(s.at, s.length, room)?;
            let mut covered = 0;
            for run in runs {
                let full = out.len() == max_runs;
                match out.last_mut() {
                    Some(last) if last.hole == run.hole => last.length += run.length,
                    _ if full => return Ok(out),
                    _ => out.push(run),
                }
                covered += run.length;
            }
            // The member stopped short (its own run limit): what follows
            // is unknown, and a reply may end early.
            if covered < s.length {
                break;
            }
        }
        Ok(out)
    }

    fn cache(&self, offset: u64, length: u64) -> io::Result<()> {
        self.segments(offset, length).try_for_each(|s| self.store(&s).cache(s.at, s.length))
    }

    fn fast_zero_certain(&self, mode: ZeroMode) -> bool {
        self.stores.iter().all(|s| s.fast_zero_certain(mode))
    }

    fn stores(&self) -> &[Arc<dyn Backend>] {
        &self.stores
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{open_backend, BackendSpec};

    const CHUNK: u64 = 4096;

    fn mem(name: &str) -> Arc<dyn Backend> {
        open_backend(&BackendSpec { name: name.into(), path: None, size: Some(1 << 20), direct: false, read_only: false, delay: None, sharing: Default::default() }).unwrap()
    }

    /// Members c (from 0) and d (from 64KiB), chunk 4KiB.
    fn stripe() -> (StripeTarget, Arc<dyn Backend>, Arc<dyn Backend>) {
        let (c, d) = (mem("c"), mem("d"));
        let legs = vec![Leg { store: "c".into(), offset: 0 }, Leg { store: "d".into(), offset: 65536 }];
        (StripeTarget::new(vec![c.clone(), d.clone()], legs, CHUNK), c, d)
    }

    fn at(store: &Arc<dyn Backend>, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        store.read_at(&mut buf, offset).unwrap();
        buf
    }

    #[test]
    fn one_chunk_calls_land_on_one_member() {
        let (t, c, d) = stripe();
        t.write(CHUNK + 100, &[1; 10], false).unwrap();
        assert_eq!(at(&d, 65536 + 100, 10), vec![1; 10]);
        t.write(2 * CHUNK, &[2; 4096], false).unwrap();
        assert_eq!(at(&c, CHUNK, 4096), vec![2; 4096]);
        let mut buf = [0; 10];
        t.read(CHUNK + 100, &mut buf).unwrap();
        assert_eq!(buf, [1; 10]);
    }

    #[test]
    fn calls_spanning_chunks_are_split() {
        let (t, c, d) = stripe();
        // Last 96 bytes of chunk 0, all of chunk 1, first 100 of chunk 2.
        let data: Vec<u8> = (0..96 + 4096 + 100).map(|i| (i % 251) as u8).collect();
        t.write(CHUNK - 96, &data, true).unwrap();
        assert_eq!(at(&c, CHUNK - 96, 96), data[..96]);
        assert_eq!(at(&d, 65536, 4096), data[96..4192]);
        assert_eq!(at(&c, CHUNK, 100), data[4192..]);
        let mut back = vec![0; data.len()];
        t.read(CHUNK - 96, &mut back).unwrap();
        assert_eq!(back, data);
        let zero = ZeroMode { may_trim: true, fast_only: false };
        t.write_zeroes(CHUNK - 16, 32, zero, false).unwrap();
        assert_eq!(at(&c, CHUNK - 16, 16), vec![0; 16]);
        assert_eq!(at(&d, 65536, 16), vec![0; 16]);
        assert_eq!(at(&d, 65536 + 16, 1), data[112..113]);
        t.trim(0, 4 * CHUNK, false).unwrap();
        t.cache(0, 4 * CHUNK).unwrap();
        t.flush().unwrap();
    }

    #[test]
    fn block_status_joins_members_and_keeps_the_run_limit() {
        let (t, _c, _d) = stripe();
        // Data in chunks 0 and 1 (c and d), holes in chunks 2 and 3.
        t.write(0, &[9; 8192], false).unwrap();
        let runs = t.block_status(0, 4 * CHUNK, 16).unwrap();
        assert_eq!(runs, vec![Allocation { length: 8192, hole: false }, Allocation { length: 8192, hole: true }]);
        assert_eq!(t.block_status(0, 4 * CHUNK, 1).unwrap(), vec![Allocation { length: 8192, hole: false }]);
        // Data again in chunk 3: data, hole, data.
        t.write(3 * CHUNK, &[9; 4096], false).unwrap();
        let runs = t.block_status(0, 4 * CHUNK, 2).unwrap();
        assert_eq!(runs, vec![Allocation { length: 8192, hole: false }, Allocation { length: 4096, hole: true }]);
        assert_eq!(t.block_status(0, 4 * CHUNK, 8).unwrap().len(), 3);
    }

    #[test]
    fn hints_combine_members() {
        let (t, _c, _d) = stripe();
        assert_eq!(t.min_io(), 1);
        assert!(!t.may_block());
        assert!(!t.rotational());
        assert_eq!(t.stores().len(), 2);
        assert!(t.fast_zero_certain(ZeroMode { may_trim: true, fast_only: true }));
    }
}
