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

/// Smallest class: 4 KiB (2^12).
const MIN_SHIFT: u32 = 12;
/// Largest pooled class: 4 MiB. Bigger buffers are rare and their page
/// faults are cheap next to the I/O they carry; they are allocated afresh.
const MAX_SHIFT: u32 = 22;
const CLASSES: usize = (MAX_SHIFT - MIN_SHIFT + 1) as usize;
/// Most bytes kept idle over all classes: bounds what the pool adds to RSS.
const MAX_IDLE_BYTES: usize = 32 << 20;

/// The process-wide pool (idle buffers are shared by all connections).
static POOL: BufferPool = BufferPool::new();

struct BufferPool {
    classes: [Mutex<Vec<AlignedBuf>>; CLASSES],
    idle_bytes: AtomicUsize,
}

impl BufferPool {
    const fn new() -> BufferPool {
        BufferPool { classes: [const { Mutex::new(Vec::new()) }; CLASSES], idle_bytes: AtomicUsize::new(0) }
    }
}

/// The class holding buffers of at least `len` bytes, if `len` is pooled.
fn class_of(len: usize) -> Option<usize> {
    let shift = len.max(1).next_power_of_two().trailing_zeros().max(MIN_SHIFT);
    (shift <= MAX_SHIFT).then(|| (shift - MIN_SHIFT) as usize)
}

use crate::sync::lock;

/// The memory `Buffer::take(len)` holds: its class up to 4 MiB, whole
/// pages above. Connections charge this to their budget rather than `len`,
/// so the budget bounds what the buffers take (a READ of 2 MiB + 1 byte
/// holds 4 MiB, a 1-byte one 4 KiB).
pub fn footprint(len: usize) -> usize {
    match class_of(len) {
        Some(class) => 1 << (class as u32 + MIN_SHIFT),
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
        let storage = match class_of(len) {
            Some(class) => {
                let reused = lock(&POOL.classes[class]).pop();
                match reused {
                    Some(b) => {
                        POOL.idle_bytes.fetch_sub(b.as_slice().len(), Ordering::Relaxed);
                        b
                    }
                    None => AlignedBuf::zeroed(1 << (class as u32 + MIN_SHIFT)),
                }
            }
            None => AlignedBuf::zeroed(len),
        };
        Buffer { storage: Some(storage), len }
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        let Some(storage) = self.storage.take() else { return };
        let cap = storage.as_slice().len();
        let Some(class) = class_of(cap).filter(|c| 1usize << (*c as u32 + MIN_SHIFT) == cap) else {
            return; // unpooled size: freed
        };
        if POOL.idle_bytes.fetch_add(cap, Ordering::Relaxed) + cap > MAX_IDLE_BYTES {
            POOL.idle_bytes.fetch_sub(cap, Ordering::Relaxed);
            return;
        }
        lock(&POOL.classes[class]).push(storage);
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
