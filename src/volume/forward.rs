//! Write forwarding for a migration in progress: an overlay on a volume's
//! translation that repeats changes to the migrated range on the
//! destination. (Not a layout: a future "mirror" target is one.)
//!
//! The migrated volume range is cut into chunks, each *not copied*,
//! *copying* or *copied*. Reads always come from the source. A write (or
//! trim, or zeroing) that touches the range:
//! - waits while any chunk it touches is being copied;
//! - goes to the source, and for the chunks already copied also to the
//!   destination, before it is answered;
//! - while it runs, marks the not-copied chunks it touches busy, so the
//!   copier cannot start copying them under it.
//!
//! The copier takes a chunk only when no write is busy on it, marks it
//! copying, copies, and marks it copied. Together this keeps every copied
//! chunk identical on source and destination.

use crate::backend::Backend;
use crate::map::Range;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkState {
    NotCopied,
    Copying,
    Copied,
}

#[derive(Debug)]
struct Chunks {
    state: Vec<ChunkState>,
    /// Writes in flight per chunk that did not go to the destination.
    busy: Vec<u32>,
}

#[derive(Debug)]
pub struct WriteForward {
    /// Volume range being migrated.
    range: Range,
    chunk: u64,
    dest: Arc<dyn Backend>,
    /// Destination offset of `range.start`.
    dest_offset: u64,
    chunks: Mutex<Chunks>,
    changed: Condvar,
    /// Set when the job fails or is aborted: stop writing the destination.
    disabled: AtomicBool,
    /// First destination error seen by a forwarded write.
    error: Mutex<Option<String>>,
}

use crate::sync::lock;

impl WriteForward {
    /// `copied` marks chunks already copied (resuming from a checkpoint).
    pub fn new(range: Range, chunk: u64, dest: Arc<dyn Backend>, dest_offset: u64, copied: &[bool]) -> Arc<WriteForward> {
        let n = range.len().div_ceil(chunk) as usize;
        let state = (0..n).map(|i| if copied.get(i).copied().unwrap_or(false) { ChunkState::Copied } else { ChunkState::NotCopied }).collect();
        Arc::new(WriteForward {
            range,
            chunk,
            dest,
            dest_offset,
            chunks: Mutex::new(Chunks { state, busy: vec![0; n] }),
            changed: Condvar::new(),
            disabled: AtomicBool::new(false),
            error: Mutex::new(None),
        })
    }

    pub fn range(&self) -> Range {
        self.range
    }

    pub fn chunk_size(&self) -> u64 {
        self.chunk
    }

    pub fn chunks(&self) -> usize {
        lock(&self.chunks).state.len()
    }

    pub fn dest(&self) -> &Arc<dyn Backend> {
        &self.dest
    }

    /// Volume range of chunk `i`.
    pub fn chunk_range(&self, i: usize) -> Range {
        let start = self.range.start + i as u64 * self.chunk;
        Range { start, end: (start + self.chunk).min(self.range.end) }
    }

    pub fn dest_offset_of(&self, volume_offset: u64) -> u64 {
        self.dest_offset + (volume_offset - self.range.start)
    }

    pub fn states(&self) -> Vec<ChunkState> {
        lock(&self.chunks).state.clone()
    }

    pub fn disable(&self) {
        self.disabled.store(true, Ordering::SeqCst);
        self.changed.notify_all();
    }

    pub fn is_disabled(&self) -> bool {
        self.disabled.load(Ordering::SeqCst)
    }

    pub fn error(&self) -> Option<String> {
        lock(&self.error).clone()
    }

    fn fail(&self, e: &io::Error) {
        let mut err = lock(&self.error);
        if err.is_none() {
            *err = Some(format!("{:?}: destination: {e}", crate::backend::errno_of(e)));
        }
        drop(err);
        self.disable();
    }

    fn chunk_indexes(&self, r: &Range) -> std::ops::Range<usize> {
        let first = ((r.start - self.range.start) / self.chunk) as usize;
        let last = ((r.end - 1 - self.range.start) / self.chunk) as usize;
        first..last + 1
    }

    /// Runs a change of volume range `[offset, offset+length)` (already
    /// translated to the source by `source`), forwarding it to the
    /// destination where chunks are copied; `dest_op(dest, dest_offset,
    /// start_in_request, length)` applies the same change to the destination.
    pub fn change(
        &self,
        offset: u64,
        length: u64,
        source: impl FnOnce() -> io::Result<()>,
        dest_op: impl Fn(&dyn Backend, u64, u64, u64) -> io::Result<()>,
    ) -> io::Result<()> {
        let whole = Range::new(offset, length);
        let inside = Range { start: whole.start.max(self.range.start), end: whole.end.min(self.range.end) };
        if inside.is_empty() || self.is_disabled() {
            return source();
        }
        let idx = self.chunk_indexes(&inside);
        // Wait out copies in progress, then register in one step.
        let copied: Vec<usize> = {
            let mut c = lock(&self.chunks);
            while !self.is_disabled() && idx.clone().any(|i| c.state[i] == ChunkState::Copying) {
                c = crate::sync::wait(&self.changed, c);
            }
            let mut copied = Vec::new();
            for i in idx.clone() {
                if c.state[i] == ChunkState::Copied {
                    copied.push(i);
                } else {
                    c.busy[i] += 1;
                }
            }
            copied
        };
        let result = source().map(|()| {
            for i in &copied {
                if self.is_disabled() {
                    break;
                }
                let r = self.chunk_range(*i);
                let part = Range { start: r.start.max(inside.start), end: r.end.min(inside.end) };
                if let Err(e) = dest_op(self.dest.as_ref(), self.dest_offset_of(part.start), part.start - offset, part.len()) {
                    // The source has the data and stays authoritative: the
                    // client's change succeeded; the migration fails.
                    self.fail(&e);
                    break;
                }
            }
        });
        let mut c = lock(&self.chunks);
        for i in idx {
            if !copied.contains(&i) {
                c.busy[i] -= 1;
            }
        }
        drop(c);
        self.changed.notify_all();
        result
    }

    /// Copier side: waits until no write is busy on chunk `i`, marks it
    /// copying. Returns false if forwarding was disabled meanwhile or the
    /// chunk is already copied.
    pub fn begin_copy(&self, i: usize) -> bool {
        let mut c = lock(&self.chunks);
        while !self.is_disabled() && c.busy[i] > 0 {
            c = crate::sync::wait(&self.changed, c);
        }
        if self.is_disabled() || c.state[i] == ChunkState::Copied {
            return false;
        }
        c.state[i] = ChunkState::Copying;
        true
    }

    /// Copier side: the copy of chunk `i` ended (`ok`: it is now copied).
    pub fn end_copy(&self, i: usize, ok: bool) {
        lock(&self.chunks).state[i] = if ok { ChunkState::Copied } else { ChunkState::NotCopied };
        self.changed.notify_all();
    }

    /// Destination error seen by the copier.
    pub fn copy_failed(&self, e: &io::Error) {
        self.fail(e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{open_backend, BackendSpec};

    fn mem(size: u64) -> Arc<dyn Backend> {
        open_backend(&BackendSpec { name: "m".into(), path: None, size: Some(size), direct: false, read_only: false, delay: None }).unwrap()
    }

    #[test]
    fn writes_forward_only_copied_chunks() {
        let dest = mem(1 << 20);
        let m = WriteForward::new(Range::new(4096, 8192), 4096, dest.clone(), 0, &[true, false]);
        let calls = Mutex::new(Vec::new());
        m.change(0, 16384, || Ok(()), |_, off, start, len| {
            lock(&calls).push((off, start, len));
            Ok(())
        })
        .unwrap();
        // Chunk 0 (volume 4096..8192) is copied: forwarded at dest offset 0.
        assert_eq!(*lock(&calls), vec![(0, 4096, 4096)]);
        assert!(m.begin_copy(1));
        m.end_copy(1, true);
        assert!(!m.begin_copy(1), "already copied");
    }

    #[test]
    fn copy_waits_for_busy_writes() {
        let dest = mem(1 << 20);
        let m = WriteForward::new(Range::new(0, 8192), 4096, dest, 0, &[]);
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let m2 = m.clone();
        let writer = std::thread::spawn(move || {
            m2.change(0, 10, || {
                started_tx.send(()).unwrap();
                release_rx.recv().unwrap();
                Ok(())
            }, |_, _, _, _| panic!("chunk not copied yet"))
        });
        started_rx.recv().unwrap();
        let m3 = m.clone();
        let copier = std::thread::spawn(move || m3.begin_copy(0));
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!copier.is_finished(), "the copier must wait while a write is busy on the chunk");
        release_tx.send(()).unwrap();
        writer.join().unwrap().unwrap();
        assert!(copier.join().unwrap());
        m.end_copy(0, true);
    }

    #[test]
    fn destination_errors_disable_forwarding() {
        let dest = mem(1 << 20);
        let m = WriteForward::new(Range::new(0, 4096), 4096, dest, 0, &[true]);
        let r = m.change(0, 4096, || Ok(()), |_, _, _, _| Err(nix::errno::Errno::ENOSPC.into()));
        assert!(r.is_ok(), "the client's write succeeded on the source");
        assert!(m.is_disabled());
        assert!(m.error().unwrap().starts_with("ENOSPC"));
    }
}
