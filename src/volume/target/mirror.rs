//! The mirror target (dm-raid1): the same bytes on every leg.
//!
//! - Writes, trims and zeroings: the regions' intent bits are made durable,
//!   then the change goes to every writable leg before the reply (except a
//!   resyncing leg that lacks all its regions: the resync brings them). A leg
//!   that fails is marked failed (the volume's `Redundancy` persists and
//!   reports it) and I/O goes on; the client sees an error only if no leg
//!   that has every region of the request took it. Legs that are failed
//!   get the regions marked stale, so a re-add copies only those.
//! - Reads: from the leg with the fewest reads in flight among those that
//!   have the regions (never from a region a leg has not resynced yet); with
//!   other writers (a cluster), from the first such leg. An error marks the
//!   leg failed and the read is retried on another.
//! - With other writers, a change a failed leg missed is answered only once
//!   they all know it failed (`Redundancy::ensure_announced`).
//! - Trims become zeroings that may punch holes, so every leg reads the
//!   same afterwards (a trimmed block device range is unspecified).

use super::Target;
use crate::backend::{errno_of, Allocation, Backend, ZeroMode};
use crate::volume::redundancy::{LegCondition, LegState, Redundancy};
use nix::errno::Errno;
use std::io;
use std::ops::Range;
use std::sync::Arc;

#[derive(Debug)]
struct MirrorLeg {
    state: Arc<LegState>,
    store: Arc<dyn Backend>,
    /// Store offset of the extent's first byte.
    offset: u64,
}

#[derive(Debug)]
pub struct MirrorTarget {
    legs: Vec<MirrorLeg>,
    stores: Vec<Arc<dyn Backend>>,
    /// Volume offset of the extent's first byte.
    extent_start: u64,
    redundancy: Arc<Redundancy>,
}

impl MirrorTarget {
    /// `legs`: (state, store, store offset) per leg, in table order.
    pub fn new(legs: Vec<(Arc<LegState>, Arc<dyn Backend>, u64)>, extent_start: u64, redundancy: Arc<Redundancy>) -> MirrorTarget {
        let stores = legs.iter().map(|(_, s, _)| s.clone()).collect();
        for (state, store, _) in &legs {
            state.attach(store);
        }
        let legs = legs.into_iter().map(|(state, store, offset)| MirrorLeg { state, store, offset }).collect();
        MirrorTarget { legs, stores, extent_start, redundancy }
    }

    fn regions(&self, offset: u64, length: u64) -> Range<usize> {
        self.redundancy.regions_of(self.extent_start + offset, length)
    }

    fn fail(&self, leg: &MirrorLeg, what: &str, e: &io::Error) {
        self.redundancy.leg_failed(&leg.state, format!("{:?}: {what}: {e}", errno_of(e)));
    }

    /// Runs a read-like operation on the least busy leg that has `rs`,
    /// failing over to the next on error.
    fn on_one_leg<T>(&self, rs: Range<usize>, what: &str, mut op: impl FnMut(&MirrorLeg) -> io::Result<T>) -> io::Result<T> {
        // Legs tried so far, as bits (no allocation per read; a mirror has
        // far fewer than 64 legs).
        let mut tried = 0u64;
        let mut last: Option<io::Error> = None;
        // With other writers (cluster nodes), always the first leg that has
        // the data: legs may differ where a node died mid-write (source
        // written first), and a block must read the same every time.
        let first = self.redundancy.other_writers();
        loop {
            let mut candidates = (0..self.legs.len().min(64)).filter(|i| tried & (1 << i) == 0 && self.legs[*i].state.readable(rs.clone()));
            let pick = if first { candidates.next() } else { candidates.min_by_key(|i| self.legs[*i].state.reads()) };
            let Some(i) = pick else {
                return Err(last.unwrap_or_else(|| io::Error::other(format!("{what}: no mirror leg has this range in sync"))));
            };
            tried |= 1 << i;
            let leg = &self.legs[i];
            leg.state.read_started();
            let result = op(leg);
            leg.state.read_ended();
            match result {
                Ok(v) => return Ok(v),
                Err(e) => {
                    self.fail(leg, what, &e);
                    last = Some(e);
                }
            }
        }
    }

    /// Applies a change to every writable leg, after the intent bits of
    /// its regions are durable.
    fn on_every_leg(&self, offset: u64, length: u64, what: &str, op: impl Fn(&MirrorLeg) -> io::Result<()>) -> io::Result<()> {
        let rs = self.regions(offset, length);
        let _intent = self.redundancy.intent().begin_write(rs.clone())?;
        let mut complete = false;
        let mut first_error: Option<io::Error> = None;
        // Legs this change missed because they failed (as bits).
        let mut missed = 0u64;
        for (i, leg) in self.legs.iter().enumerate() {
            if !leg.state.writable() {
                leg.state.stale().set_volatile(rs.clone());
                missed |= leg_bit(i);
                continue;
            }
            // A resyncing leg that lacks every region here gets them by the
            // resync copy, which cannot run while this write holds them
            // (`begin_write`) and reads them from a leg that has this write.
            // Not when other nodes write these legs: their copies are not
            // excluded by this write (`Redundancy::set_other_writers`).
            if leg.state.condition() == LegCondition::Resyncing && !self.redundancy.other_writers() && leg.state.stale().all(rs.clone()) {
                continue;
            }
            // Whether the leg had every region before this change.
            let had_all = leg.state.readable(rs.clone());
            match op(leg) {
                Ok(()) => complete |= had_all,
                Err(e) => {
                    self.fail(leg, what, &e);
                    leg.state.stale().set_volatile(rs.clone());
                    missed |= leg_bit(i);
                    first_error.get_or_insert(e);
                }
            }
        }
        if !complete {
            return Err(first_error.unwrap_or_else(|| Errno::EIO.into()));
        }
        self.announce_missed(missed)
    }

    /// Before a change that failed legs missed is answered: every other
    /// writer must know they failed, or it would read the old bytes there
    /// (`Redundancy::ensure_announced`; at once when announced already).
    fn announce_missed(&self, missed: u64) -> io::Result<()> {
        for (i, leg) in self.legs.iter().enumerate() {
            if missed & leg_bit(i) != 0 && leg.state.condition() == LegCondition::Failed {
                self.redundancy.ensure_announced(&leg.state)?;
            }
        }
        Ok(())
    }
}

/// Leg `i`'s bit in a set of legs (legs past the 64th share the last bit:
/// they are all checked).
fn leg_bit(i: usize) -> u64 {
    1 << i.min(63)
}

impl Target for MirrorTarget {
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let rs = self.regions(offset, buf.len() as u64);
        self.on_one_leg(rs, "read", |leg| leg.store.read_at(buf, leg.offset + offset))
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.on_every_leg(offset, data.len() as u64, "write", |leg| leg.store.write_at(data, leg.offset + offset, fua))
    }

    fn trim(&self, offset: u64, length: u64, fua: bool) -> io::Result<()> {
        let mode = ZeroMode { may_trim: true, fast_only: false };
        self.on_every_leg(offset, length, "trim", |leg| leg.store.write_zeroes(leg.offset + offset, length, mode, fua))
    }

    fn write_zeroes(&self, offset: u64, length: u64, mode: ZeroMode, fua: bool) -> io::Result<()> {
        if mode.fast_only && !self.fast_zero_certain(mode) {
            return Err(Errno::EOPNOTSUPP.into());
        }
        self.on_every_leg(offset, length, "write_zeroes", |leg| leg.store.write_zeroes(leg.offset + offset, length, mode, fua))
    }

    fn block_status(&self, offset: u64, length: u64, max_runs: usize) -> io::Result<Vec<Allocation>> {
        let rs = self.regions(offset, length);
        self.on_one_leg(rs, "block_status", |leg| leg.store.block_status(leg.offset + offset, length, max_runs))
    }

    fn cache(&self, offset: u64, length: u64) -> io::Result<()> {
        let rs = self.regions(offset, length);
        self.on_one_leg(rs, "cache", |leg| leg.store.cache(leg.offset + offset, length))
    }

    /// Flushes every writable leg; a leg that cannot flush is failed. The
    /// flush succeeds if a leg that had every region flushed.
    fn flush(&self) -> io::Result<()> {
        let mut complete = false;
        let mut first_error = None;
        let mut missed = 0u64;
        for (i, leg) in self.legs.iter().enumerate() {
            if !leg.state.writable() {
                missed |= leg_bit(i);
                continue;
            }
            let in_sync = leg.state.condition() == LegCondition::InSync;
            match leg.store.flush() {
                Ok(()) => complete |= in_sync,
                Err(e) => {
                    self.fail(leg, "flush", &e);
                    missed |= leg_bit(i);
                    first_error.get_or_insert(e);
                }
            }
        }
        match (complete, first_error) {
            // Writes answered earlier may not be durable on the failed
            // legs: the others must stop reading them first.
            (true, _) => self.announce_missed(missed),
            (false, Some(e)) => Err(e),
            (false, None) => Err(Errno::EIO.into()),
        }
    }

    fn redundant(&self) -> bool {
        true
    }

    fn fast_zero_certain(&self, mode: ZeroMode) -> bool {
        self.legs.iter().filter(|l| l.state.writable()).all(|l| l.store.fast_zero_certain(mode))
    }

    fn stores(&self) -> &[Arc<dyn Backend>] {
        &self.stores
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{open_backend, BackendSpec, StoreInfo};
    use crate::volume::LegCondition;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn mem() -> Arc<dyn Backend> {
        open_backend(&BackendSpec { name: "m".into(), path: None, size: Some(4 << 20), direct: false, read_only: false, delay: None, sharing: Default::default() }).unwrap()
    }

    /// A store that fails every call while `broken` is set.
    #[derive(Debug)]
    struct Breakable {
        inner: Arc<dyn Backend>,
        broken: AtomicBool,
    }

    impl Breakable {
        fn check(&self) -> io::Result<()> {
            if self.broken.load(Ordering::SeqCst) {
                Err(Errno::EIO.into())
            } else {
                Ok(())
            }
        }
    }

    impl Backend for Breakable {
        fn info(&self) -> &StoreInfo {
            self.inner.info()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.check()?;
            self.inner.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
            self.check()?;
            self.inner.write_at(buf, offset, fua)
        }
        fn trim(&self, offset: u64, length: u64, fua: bool) -> io::Result<()> {
            self.check()?;
            self.inner.trim(offset, length, fua)
        }
        fn write_zeroes(&self, offset: u64, length: u64, mode: ZeroMode, fua: bool) -> io::Result<()> {
            self.check()?;
            self.inner.write_zeroes(offset, length, mode, fua)
        }
        fn fast_zero_certain(&self, mode: ZeroMode) -> bool {
            self.inner.fast_zero_certain(mode)
        }
        fn flush(&self) -> io::Result<()> {
            self.check()
        }
        fn block_status(&self, offset: u64, length: u64, max_runs: usize) -> io::Result<Vec<Allocation>> {
            self.check()?;
            self.inner.block_status(offset, length, max_runs)
        }
        fn cache(&self, _offset: u64, _length: u64) -> io::Result<()> {
            self.check()
        }
    }

    #[test]
    fn a_failing_leg_is_dropped_without_a_client_error() {
        let red = Redundancy::in_memory("v", 4 << 20, 1 << 20);
        let a = mem();
        let b = Arc::new(Breakable { inner: mem(), broken: AtomicBool::new(false) });
        let leg_a = red.leg_for_target("a", true, 0..4).unwrap();
        let leg_b = red.leg_for_target("b", true, 0..4).unwrap();
        let events = red.subscribe();
        let m = MirrorTarget::new(vec![(leg_a, a.clone(), 0), (leg_b.clone(), b.clone(), 4096)], 0, red.clone());
        m.write(0, &[7; 4096], false).unwrap();
        let mut check = [0u8; 4096];
        b.inner.read_at(&mut check, 4096).unwrap();
        assert_eq!(check, [7; 4096], "every leg has the write, at its own offset");
        b.broken.store(true, Ordering::SeqCst);
        m.write(1 << 20, &[9; 4096], false).unwrap();
        assert_eq!(leg_b.condition(), LegCondition::Failed);
        assert!(leg_b.stale().get(1), "the region written while the leg failed is stale on it");
        assert_eq!(events.try_recv().unwrap().leg, "b");
        let mut buf = [0u8; 4096];
        m.read(1 << 20, &mut buf).unwrap();
        assert_eq!(buf, [9; 4096]);
        m.flush().unwrap();
        assert!(red.is_failed_store(&(b.clone() as Arc<dyn Backend>)));
    }

    #[test]
    fn reads_fail_over_and_skip_stale_regions() {
        let red = Redundancy::in_memory("v", 4 << 20, 1 << 20);
        let a = Arc::new(Breakable { inner: mem(), broken: AtomicBool::new(false) });
        let b = mem();
        let leg_a = red.leg_for_target("a", true, 0..4).unwrap();
        let leg_b = red.leg_for_target("b", false, 0..4).unwrap();
        assert_eq!(leg_b.condition(), LegCondition::Resyncing);
        let m = MirrorTarget::new(vec![(leg_a.clone(), a.clone(), 0), (leg_b, b, 0)], 0, red);
        m.write(0, &[5; 512], false).unwrap();
        a.broken.store(true, Ordering::SeqCst);
        let mut buf = [0u8; 512];
        let err = m.read(0, &mut buf).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(Errno::EIO as i32), "the resyncing leg lacks the region: no leg can serve it");
        assert_eq!(leg_a.condition(), LegCondition::Failed);
        assert!(m.write(0, &[1; 512], false).is_err(), "no leg with every region took the write");
    }

    #[test]
    fn with_other_writers_reads_take_the_first_leg_that_has_the_data() {
        let red = Redundancy::in_memory("v", 4 << 20, 1 << 20);
        let (a, b) = (mem(), mem());
        let leg_a = red.leg_for_target("a", true, 0..4).unwrap();
        let leg_b = red.leg_for_target("b", true, 0..4).unwrap();
        // The legs differ (a node died between its two halves of a write).
        a.write_at(&[1; 512], 0, false).unwrap();
        b.write_at(&[2; 512], 0, false).unwrap();
        let m = MirrorTarget::new(vec![(leg_a.clone(), a, 0), (leg_b, b, 0)], 0, red.clone());
        red.set_other_writers(true);
        // a looks busiest; alone, reads would go to b.
        leg_a.read_started();
        for _ in 0..3 {
            let mut buf = [0u8; 512];
            m.read(0, &mut buf).unwrap();
            assert_eq!(buf, [1; 512], "every read from a, the first leg");
        }
        red.set_other_writers(false);
        let mut buf = [0u8; 512];
        m.read(0, &mut buf).unwrap();
        assert_eq!(buf, [2; 512], "alone: the least busy leg");
    }

    #[test]
    fn a_write_a_failed_leg_missed_is_answered_only_once_announced() {
        #[derive(Debug)]
        struct Refuse;
        impl crate::volume::LegAnnouncer for Refuse {
            fn announce(&self, _: &str, _: &str, _: &str) -> Result<(), String> {
                Err("etcd is down".into())
            }
        }
        let red = Redundancy::in_memory("v", 4 << 20, 1 << 20);
        let a = mem();
        let b = Arc::new(Breakable { inner: mem(), broken: AtomicBool::new(true) });
        let leg_a = red.leg_for_target("a", true, 0..4).unwrap();
        let leg_b = red.leg_for_target("b", true, 0..4).unwrap();
        red.set_announcer(Arc::new(Refuse));
        let m = MirrorTarget::new(vec![(leg_a, a, 0), (leg_b.clone(), b, 0)], 0, red.clone());
        let err = m.write(0, &[3; 512], false).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(Errno::EIO as i32));
        assert_eq!(leg_b.condition(), LegCondition::Failed);
        assert!(m.write(4096, &[3; 512], false).is_err(), "a later write that skips the leg fails too");
        assert!(m.flush().is_err(), "and so does a flush");
        leg_b.set_announced(true);
        m.write(4096, &[3; 512], false).unwrap();
        m.flush().unwrap();
    }
}
