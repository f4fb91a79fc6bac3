//! Reusable request and reply buffers.
//!
//! A fresh `vec![0; 1 MiB]` per request costs a memset or, worse, a fresh
//! mapping that faults in 256 pages and is unmapped again when the reply is
//! sent (measured: ~70 page faults per 1 MiB WRITE, docs/PERFORMANCE.md).
//! Buffers here are kept in power-of-two size classes and handed out again
//! without zeroing. That is safe because every user overwrites the whole
//! buffer before anything reads it: a WRITE payload is filled by `read_full`
//! and a READ reply by `Store::read_at`, both all-or-error, and a buffer
//! whose fill failed is never sent.

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::backend::AlignedBuf;
use crate::sync::lock;

/// Smallest class: 4 KiB (2^12).
const MIN_SHIFT: u32 = 12;
/// Largest pooled class: 4 MiB. Bigger buffers are rare and their page
/// faults are cheap next to the I/O they carry; they are allocated afresh.
const MAX_SHIFT: u32 = 22;
const CLASSES: usize = (MAX_SHIFT - MIN_SHIFT + 1) as usize;
/// The cap's floor: idle bytes the pool may always keep.
const CAP_FLOOR: usize = 32 << 20;
/// How many `tick`s (the server's housekeeping tick, 200 ms) a peak of
/// use keeps the cap up.
const PEAK_TICKS: usize = 5;

/// The process-wide pool (idle buffers are shared by all connections).
static POOL: BufferPool = BufferPool::new();

/// Idle buffers by class, under a cap that follows use: `CAP_FLOOR`, or
/// what was in use at the peak of the last second if more. A workload with
/// more in flight than the floor (nbdcopy out over four connections:
/// 64 MiB) then reuses its buffers instead of mapping and unmapping one
/// per request (19 % slower, measured), and a finished one's buffers are
/// unmapped within a second or so. What is in use is bounded by the
/// connections' budgets, so the cap is too. (Capping in use and idle
/// together, which would keep the pool within the budgets alone, cost
/// +30-40 % CPU per request on the short nbdcopy rows, measured: after a
/// change of request size, idle buffers of the old size fill that cap and
/// every new buffer is unmapped until the next tick.)
struct BufferPool {
    classes: [Mutex<Vec<AlignedBuf>>; CLASSES],
    idle_bytes: AtomicUsize,
    /// Bytes of pooled buffers taken and not yet dropped.
    in_use: AtomicUsize,
    /// The highest `in_use` since the last tick.
    tick_peak: AtomicUsize,
    /// Most idle bytes (see above).
    cap: AtomicUsize,
    /// The peaks of the last ticks, and where the next one goes.
    peaks: Mutex<([usize; PEAK_TICKS], usize)>,
}

impl BufferPool {
    const fn new() -> BufferPool {
        BufferPool {
            classes: [const { Mutex::new(Vec::new()) }; CLASSES],
            idle_bytes: AtomicUsize::new(0),
            in_use: AtomicUsize::new(0),
            tick_peak: AtomicUsize::new(0),
            cap: AtomicUsize::new(CAP_FLOOR),
            peaks: Mutex::new(([0; PEAK_TICKS], 0)),
        }
    }

    /// Storage of at least `len` bytes: its class's size, reused if idle.
    fn take(&self, len: usize) -> AlignedBuf {
        let Some(class) = class_of(len) else { return AlignedBuf::zeroed(len) };
        let size = class_bytes(class);
        let reused = lock(&self.classes[class]).pop();
        if reused.is_some() {
            self.idle_bytes.fetch_sub(size, Ordering::Relaxed);
        }
        self.taken(size);
        reused.unwrap_or_else(|| AlignedBuf::zeroed(size))
    }

    /// Back from use: kept for reuse while idle ones stay within the cap,
    /// else freed.
    fn give(&self, storage: AlignedBuf) {
        let size = storage.as_slice().len();
        let Some(class) = class_of(size).filter(|&c| class_bytes(c) == size) else {
            return; // unpooled size: freed
        };
        self.in_use.fetch_sub(size, Ordering::Relaxed);
        if self.idle_bytes.fetch_add(size, Ordering::Relaxed) + size > self.cap.load(Ordering::Relaxed) {
            self.idle_bytes.fetch_sub(size, Ordering::Relaxed);
            return;
        }
        lock(&self.classes[class]).push(storage);
    }

    fn taken(&self, bytes: usize) {
        let now = self.in_use.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if now > self.tick_peak.load(Ordering::Relaxed) {
            self.tick_peak.fetch_max(now, Ordering::Relaxed);
        }
        // More in use than the cap: raise it at once, so the buffers of a
        // heavier workload are kept from its first second on.
        if now > self.cap.load(Ordering::Relaxed) {
            self.cap.fetch_max(now, Ordering::Relaxed);
        }
    }

    /// Lowers the cap to the last second's peak use (or the floor) and
    /// frees idle buffers over it, largest first.
    fn tick(&self) {
        let peak = self.tick_peak.swap(self.in_use.load(Ordering::Relaxed), Ordering::Relaxed);
        let cap = {
            let mut peaks = lock(&self.peaks);
            let (ring, next) = &mut *peaks;
            ring[*next] = peak;
            *next = (*next + 1) % PEAK_TICKS;
            ring.iter().copied().max().unwrap_or(0).max(CAP_FLOOR)
        };
        self.cap.store(cap, Ordering::Relaxed);
        for class in (0..CLASSES).rev() {
            while self.idle_bytes.load(Ordering::Relaxed) > cap {
                let Some(b) = lock(&self.classes[class]).pop() else { break };
                self.idle_bytes.fetch_sub(b.as_slice().len(), Ordering::Relaxed);
            }
        }
    }
}

/// The server's housekeeping tick (every 200 ms): the cap follows use.
pub fn tick() {
    POOL.tick();
}

/// The class holding buffers of at least `len` bytes, if `len` is pooled.
fn class_of(len: usize) -> Option<usize> {
    let shift = len.max(1).next_power_of_two().trailing_zeros().max(MIN_SHIFT);
    (shift <= MAX_SHIFT).then(|| (shift - MIN_SHIFT) as usize)
}

/// The size of every buffer of `class`.
fn class_bytes(class: usize) -> usize {
    1 << (class as u32 + MIN_SHIFT)
}

/// The memory `Buffer::take(len)` holds: its class up to 4 MiB, whole
/// pages above. Connections charge this to their budget rather than `len`,
/// so the budget bounds what the buffers take (a READ of 2 MiB + 1 byte
/// holds 4 MiB, a 1-byte one 4 KiB).
pub fn footprint(len: usize) -> usize {
    match class_of(len) {
        Some(class) => class_bytes(class),
        None => len.next_multiple_of(AlignedBuf::ALIGN),
    }
}

/// A page-aligned buffer of `len` bytes whose contents are unspecified
/// (possibly another request's data) until the caller fills it. Returns to
/// the pool on drop. Page alignment keeps the kernel's copies into and out
/// of it aligned (and suits O_DIRECT).
pub struct Buffer {
    storage: Option<AlignedBuf>,
    len: usize,
}

impl Buffer {
    /// A buffer of exactly `len` bytes. Callers must overwrite all of it
    /// before reading or sending it.
    pub fn take(len: usize) -> Buffer {
        Buffer { storage: Some(POOL.take(len)), len }
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        if let Some(storage) = self.storage.take() {
            POOL.give(storage);
        }
    }
}

impl Deref for Buffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // `storage` is only None inside drop.
        &self.storage.as_ref().map_or(&[][..], AlignedBuf::as_slice)[..self.len]
    }
}

impl DerefMut for Buffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        let len = self.len;
        &mut self.storage.as_mut().map_or(&mut [][..], AlignedBuf::as_mut_slice)[..len]
    }
}

impl AsRef<[u8]> for Buffer {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl From<Buffer> for bytes::Bytes {
    fn from(b: Buffer) -> bytes::Bytes {
        bytes::Bytes::from_owner(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        assert_eq!(class_of(0), Some(0));
        assert_eq!(class_of(4096), Some(0));
        assert_eq!(class_of(4097), Some(1));
        assert_eq!(class_of(1 << 20), Some(8));
        assert_eq!(class_of((1 << 20) + 16), Some(9));
        assert_eq!(class_of(4 << 20), Some(10));
        assert_eq!(class_of((4 << 20) + 1), None);
        assert_eq!(footprint(1), 4096);
        assert_eq!(footprint((2 << 20) + 1), 4 << 20);
        assert_eq!(footprint(4 << 20), 4 << 20);
        assert_eq!(footprint((47 << 20) + 1), (47 << 20) + 4096);
    }

    /// The cap follows use: a workload with more in flight than the
    /// floor keeps all its buffers; a second of ticks after it ends, the
    /// pool is back at the floor.
    #[test]
    fn the_cap_follows_use_and_falls_back_within_a_second() {
        const MIB: usize = 1 << 20;
        let pool = BufferPool::new();
        let big: Vec<AlignedBuf> = (0..48).map(|_| pool.take(MIB)).collect();
        assert_eq!(pool.in_use.load(Ordering::Relaxed), 48 * MIB);
        for b in big {
            pool.give(b);
        }
        assert_eq!(pool.idle_bytes.load(Ordering::Relaxed), 48 * MIB, "all 48 MiB kept: they were in use at once");
        // Reused, not reallocated.
        let again: Vec<AlignedBuf> = (0..48).map(|_| pool.take(MIB)).collect();
        assert_eq!(pool.idle_bytes.load(Ordering::Relaxed), 0);
        again.into_iter().for_each(|b| pool.give(b));
        for _ in 0..PEAK_TICKS {
            pool.tick();
            assert_eq!(pool.idle_bytes.load(Ordering::Relaxed), 48 * MIB, "the peak is remembered for a second");
        }
        pool.tick();
        assert_eq!(pool.idle_bytes.load(Ordering::Relaxed), CAP_FLOOR, "idle past the floor freed once the peak is older");
        assert_eq!(pool.cap.load(Ordering::Relaxed), CAP_FLOOR);
        // At the floor, what comes back beyond it is freed at once.
        let few: Vec<AlignedBuf> = (0..4).map(|_| pool.take(4096)).collect();
        few.into_iter().for_each(|b| pool.give(b));
        (0..PEAK_TICKS).for_each(|_| pool.tick());
        assert_eq!(pool.idle_bytes.load(Ordering::Relaxed), CAP_FLOOR, "still at the floor");
        assert_eq!(pool.in_use.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn reused_buffers_have_the_asked_length() {
        let mut a = Buffer::take(5000);
        assert_eq!(a.len(), 5000);
        a.fill(7);
        drop(a);
        let b = Buffer::take(6000);
        assert_eq!(b.len(), 6000);
        assert_eq!(b.as_ptr() as usize % 4096, 0);
        let big = Buffer::take(5 << 20);
        assert_eq!(big.len(), 5 << 20);
        let bytes: bytes::Bytes = Buffer::take(100).into();
        assert_eq!(bytes.len(), 100);
    }
}
