//! The write-intent log of a volume with mirrors (md's write-intent
//! bitmap, dm-raid1's region log), and the per-region exclusion between
//! foreground writes and resync copies.
//!
//! - Before a write to a mirror is sent to its legs, the bits of the
//!   regions it touches are durable ([`RegionBitmap::set_durable`]). After a
//!   crash, only those regions can differ between legs.
//! - Bits are cleared lazily by [`WriteIntent::clear_idle`]: for regions
//!   with no write in flight, after every leg was flushed, and only if no
//!   write began since the candidates were picked.
//! - A resync copy of region `r` ([`WriteIntent::begin_copy`]) waits until
//!   no write is in flight there and holds new writes off until it ends, so
//!   a copy never interleaves with a write and overwrites newer data.
//!
//! Writers and the clearer meet on two SeqCst atomics per region (the
//! writer bumps `inflight` then reads the bit; the clearer clears the bit
//! then reads `inflight`): at least one of them sees the other, so a write
//! never runs with its bit cleared behind it.

use super::bitmap::RegionBitmap;
use crate::sync::{lock, wait_timeout};
use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::SeqCst};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// Longest single wait before re-checking (bounds a missed wake-up).
const RECHECK: Duration = Duration::from_millis(5);

#[derive(Debug)]
pub struct WriteIntent {
    bits: RegionBitmap,
    /// Writes in flight per region.
    inflight: Vec<AtomicU32>,
    /// Writes begun per region (wrapping), for the clearer.
    begun: Vec<AtomicU32>,
    /// `begun` as the previous clearing pass saw it: a region is cleared
    /// only after a whole pass without writes, so a busy region keeps its
    /// bit instead of paying a durable set again right after each pass.
    seen: Vec<AtomicU32>,
    copying: Vec<AtomicBool>,
    waiters: Mutex<()>,
    changed: Condvar,
    /// Benchmark-only switch: no bits (`NBDVIRT_BENCH_NO_INTENT=1`).
    logging: bool,
}

/// A write admitted to its regions; dropping it ends the write.
#[must_use]
pub struct WriteGuard<'a> {
    log: &'a WriteIntent,
    regions: Range<usize>,
}

impl WriteIntent {
    pub fn new(bits: RegionBitmap) -> WriteIntent {
        let n = bits.regions();
        WriteIntent {
            inflight: (0..n).map(|_| AtomicU32::new(0)).collect(),
            begun: (0..n).map(|_| AtomicU32::new(0)).collect(),
            seen: (0..n).map(|_| AtomicU32::new(u32::MAX)).collect(),
            copying: (0..n).map(|_| AtomicBool::new(false)).collect(),
            bits,
            waiters: Mutex::new(()),
            changed: Condvar::new(),
            logging: std::env::var_os("NBDVIRT_BENCH_NO_INTENT").is_none_or(|v| v != "1"),
        }
    }

    pub fn bits(&self) -> &RegionBitmap {
        &self.bits
    }

    fn clamp(&self, rs: Range<usize>) -> Range<usize> {
        rs.start.min(self.inflight.len())..rs.end.min(self.inflight.len())
    }

    fn wake(&self) {
        let _g = lock(&self.waiters);
        self.changed.notify_all();
    }

    /// Admits a write to regions `rs`: waits out resync copies there, then
    /// makes the regions' intent bits durable.
    pub fn begin_write(&self, rs: Range<usize>) -> io::Result<WriteGuard<'_>> {
        let rs = self.clamp(rs);
        loop {
            for r in rs.clone() {
                self.inflight[r].fetch_add(1, SeqCst);
            }
            if !rs.clone().any(|r| self.copying[r].load(SeqCst)) {
                break;
            }
            self.release(rs.clone());
            let mut g = lock(&self.waiters);
            while rs.clone().any(|r| self.copying[r].load(SeqCst)) {
                g = wait_timeout(&self.changed, g, RECHECK).0;
            }
        }
        for r in rs.clone() {
            self.begun[r].fetch_add(1, SeqCst);
        }
        let guard = WriteGuard { log: self, regions: rs.clone() };
        if self.logging {
            self.bits.set_durable(rs)?;
        }
        Ok(guard)
    }

    fn release(&self, rs: Range<usize>) {
        let mut copy_waits = false;
        for r in rs {
            if self.inflight[r].fetch_sub(1, SeqCst) == 1 && self.copying[r].load(SeqCst) {
                copy_waits = true;
            }
        }
        if copy_waits {
            self.wake();
        }
    }

    /// Holds new writes to region `r` off and waits until the ones in
    /// flight there are done. Pair with [`end_copy`](Self::end_copy).
    pub fn begin_copy(&self, r: usize) {
        self.copying[r].store(true, SeqCst);
        let mut g = lock(&self.waiters);
        while self.inflight[r].load(SeqCst) != 0 {
            g = wait_timeout(&self.changed, g, RECHECK).0;
        }
    }

    pub fn end_copy(&self, r: usize) {
        self.copying[r].store(false, SeqCst);
        self.wake();
    }

    /// Clears the bits of regions idle since the previous pass once
    /// `flush_legs` has made every completed write durable on every leg.
    /// Returns how many were cleared.
    pub fn clear_idle(&self, flush_legs: impl FnOnce() -> io::Result<()>) -> io::Result<usize> {
        let candidates: Vec<(usize, u32)> = self
            .bits
            .iter_set()
            .filter_map(|r| {
                let begun = self.begun[r].load(SeqCst);
                let idle = self.seen[r].swap(begun, SeqCst) == begun && self.inflight[r].load(SeqCst) == 0;
                idle.then_some((r, begun))
            })
            .collect();
        if candidates.is_empty() {
            return Ok(0);
        }
        flush_legs()?;
        let _w = self.bits.writer();
        let mut cleared = 0;
        for (r, begun) in candidates {
            self.bits.clear(r);
            if self.inflight[r].load(SeqCst) != 0 || self.begun[r].load(SeqCst) != begun {
                // A write began after the flush: its data may not be on
                // every leg's disk yet. The file still has the bit.
                self.bits.set_volatile(r..r + 1);
            } else {
                cleared += 1;
            }
        }
        self.bits.write_back()?;
        Ok(cleared)
    }
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        self.log.release(self.regions.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn bits_are_set_before_the_write_and_cleared_when_idle() {
        let log = WriteIntent::new(RegionBitmap::in_memory(8));
        let g = log.begin_write(2..4).unwrap();
        assert!(log.bits().get(2) && log.bits().get(3));
        assert_eq!(log.clear_idle(|| Ok(())).unwrap(), 0, "a write is in flight");
        drop(g);
        assert_eq!(log.clear_idle(|| Ok(())).unwrap(), 2, "idle since the last pass");
        drop(log.begin_write(2..3).unwrap());
        assert_eq!(log.clear_idle(|| Ok(())).unwrap(), 0, "written since the last pass");
        assert_eq!(log.clear_idle(|| Ok(())).unwrap(), 1);
        assert_eq!(log.bits().count(), 0);
        let _g = log.begin_write(5..6).unwrap();
        let flush_failed = log.clear_idle(|| Err(io::Error::other("x")));
        assert!(flush_failed.is_ok(), "nothing idle to clear");
    }

    #[test]
    fn a_write_begun_during_the_flush_keeps_its_bit() {
        let log = WriteIntent::new(RegionBitmap::in_memory(4));
        drop(log.begin_write(1..2).unwrap());
        assert_eq!(log.clear_idle(|| Ok(())).unwrap(), 0, "first pass: not yet idle for a pass");
        let cleared = log
            .clear_idle(|| {
                drop(log.begin_write(1..2).unwrap());
                Ok(())
            })
            .unwrap();
        assert_eq!(cleared, 0);
        assert!(log.bits().get(1));
    }

    #[test]
    fn copies_and_writes_exclude_each_other() {
        let log = Arc::new(WriteIntent::new(RegionBitmap::in_memory(4)));
        let g = log.begin_write(0..1).unwrap();
        let l2 = log.clone();
        let copier = std::thread::spawn(move || {
            l2.begin_copy(0);
            l2.end_copy(0);
        });
        std::thread::sleep(Duration::from_millis(30));
        assert!(!copier.is_finished(), "the copy waits for the write in flight");
        drop(g);
        copier.join().unwrap();
        log.begin_copy(2);
        let l3 = log.clone();
        let writer = std::thread::spawn(move || drop(l3.begin_write(1..3).unwrap()));
        std::thread::sleep(Duration::from_millis(30));
        assert!(!writer.is_finished(), "the write waits for the copy");
        log.end_copy(2);
        writer.join().unwrap();
    }
}
