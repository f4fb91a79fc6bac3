//! The copier thread of a migration: chunk after chunk, only allocated
//! data, rate-limited, at low priority, with durable checkpoints.

use crate::mirror::pace::{lower_priority, RateLimiter};
use crate::api::MigrationState;
use super::{MigrationJob, CHECKPOINT_EVERY, COPY_IO};
use crate::backend::{AlignedBuf, ZeroMode};
use crate::map::Piece;
use std::sync::atomic::Ordering;
use crate::sync::lock;
use std::sync::Arc;
use std::time::Instant;

impl MigrationJob {
    pub(super) fn run(self: Arc<Self>) {
        lower_priority();
        let mut limiter = RateLimiter::new(self.spec.rate);
        let mut known: Option<DataRun> = None;
        let mut buf = AlignedBuf::zeroed(COPY_IO as usize);
        let mut last_checkpoint = Instant::now();
        for i in 0..self.forward.chunks() {
            if self.abort.load(Ordering::SeqCst) {
                return self.finish(MigrationState::Aborted, None);
            }
            if let Some(reason) = self.forward.error() {
                return self.finish(MigrationState::Failed, Some(reason));
            }
            if self.suspend.load(Ordering::SeqCst) {
                if let Err(e) = self.durable_checkpoint() {
                    tracing::error!(volume = %self.spec.volume, error = %e, "final checkpoint before shutdown failed");
                }
                return;
            }
            // Sleep off the rate limit before taking the chunk, never while
            // it is marked copying (foreground writes to it wait then).
            limiter.wait_due();
            if !self.forward.begin_copy(i) {
                continue; // copied already (resumed), or disabled: checked above next round
            }
            match self.copy_chunk(i, &mut limiter, &mut known, buf.as_mut_slice()) {
                Ok(()) => {
                    self.forward.end_copy(i, true);
                    self.copied_bytes.fetch_add(self.forward.chunk_range(i).len(), Ordering::Relaxed);
                }
                Err(_) if self.abort.load(Ordering::SeqCst) => {
                    self.forward.end_copy(i, false);
                    return self.finish(MigrationState::Aborted, None);
                }
                Err(e) => {
                    self.forward.end_copy(i, false);
                    self.forward.copy_failed(&e);
                    let reason = self.forward.error().unwrap_or_else(|| e.to_string());
                    return self.finish(MigrationState::Failed, Some(reason));
                }
            }
            if last_checkpoint.elapsed() >= CHECKPOINT_EVERY {
                if let Err(e) = self.durable_checkpoint() {
                    return self.finish(MigrationState::Failed, Some(e.to_string()));
                }
                last_checkpoint = Instant::now();
            }
        }
        if self.abort.load(Ordering::SeqCst) {
            return self.finish(MigrationState::Aborted, None);
        }
        if let Some(reason) = self.forward.error() {
            return self.finish(MigrationState::Failed, Some(reason));
        }
        if let Err(e) = self.durable_checkpoint() {
            return self.finish(MigrationState::Failed, Some(e.to_string()));
        }
        match self.cutover() {
            Ok(generation) => {
                lock(&self.status).generation = Some(generation);
                self.finish(MigrationState::Completed, None);
            }
            Err(_) if self.abort.load(Ordering::SeqCst) => self.finish(MigrationState::Aborted, None),
            Err(e) => self.finish(MigrationState::Failed, Some(e.to_string())),
        }
    }

    /// Copies chunk `i`: data runs are read through the current translation
    /// (the source) and written to the destination; holes are punched there.
    ///
    /// The allocation map is asked once per data run, not per chunk: on
    /// tmpfs SEEK_HOLE scans to the end of the data, so asking per chunk
    /// made a copy quadratic in the volume size. `known` remembers where the
    /// last data run seen ends; only data is remembered (a hole is always
    /// re-checked, since a write may have filled it), and a region trimmed
    /// meanwhile is merely copied as zeros.
    fn copy_chunk(&self, i: usize, limiter: &mut RateLimiter, known: &mut Option<DataRun>, buf: &mut [u8]) -> std::io::Result<()> {
        let r = self.forward.chunk_range(i);
        let t = self.volume.translation();
        let generation = t.table().generation();
        let dest = self.forward.dest();
        let pieces: Vec<Piece> = t.table().pieces(r.start, r.len()).collect();
        let mut first_slice = true;
        for piece in pieces {
            let mut done = 0u64;
            while done < piece.length {
                let at = piece.extent_offset + done;
                let cached = known.filter(|k| k.extent == piece.extent && k.generation == generation && at < k.until).map(|k| k.until - at);
                let (hole, len) = match cached {
                    Some(avail) => (false, avail.min(piece.length - done)),
                    None => {
                        // One run, asked up to the end of the extent.
                        let extent_end = t.table().extents()[piece.extent].end();
                        let probe = sub_piece(&piece, done, extent_end - (piece.volume_offset + done));
                        let run = t.block_status(&probe, 1)?.first().copied().filter(|r| r.length > 0);
                        let run = run.ok_or_else(|| std::io::Error::other("allocation map returned nothing"))?;
                        if !run.hole {
                            *known = Some(DataRun { extent: piece.extent, generation, until: at + run.length });
                        }
                        (run.hole, run.length.min(piece.length - done))
                    }
                };
                let part = sub_piece(&piece, done, len);
                let dest_off = self.forward.dest_offset_of(part.volume_offset);
                if hole {
                    dest.write_zeroes(dest_off, part.length, ZeroMode { may_trim: true, fast_only: false }, false)?;
                } else {
                    // Copy in slices of at most COPY_IO: bounded memory, and
                    // abort/shutdown never wait behind one long rate-limit
                    // sleep for a whole big chunk. Only chunks bigger than
                    // COPY_IO (not the default) pace inside the chunk.
                    let mut off = 0u64;
                    while off < part.length {
                        if self.abort.load(Ordering::SeqCst) {
                            return Err(std::io::Error::new(std::io::ErrorKind::Interrupted, "aborted"));
                        }
                        let slice = sub_piece(&part, off, (part.length - off).min(COPY_IO));
                        if !first_slice {
                            limiter.wait_due();
                        }
                        first_slice = false;
                        let buf = &mut buf[..slice.length as usize];
                        t.read(&slice, buf)?;
                        dest.write_at(buf, dest_off + off, false)?;
                        limiter.pay(slice.length);
                        self.data_bytes.fetch_add(slice.length, Ordering::Relaxed);
                        off += slice.length;
                    }
                }
                done += len;
            }
        }
        Ok(())
    }

}

/// The end (store offset within `extent` of table `generation`) of the last
/// data run the copier saw.
#[derive(Debug, Clone, Copy)]
struct DataRun {
    extent: usize,
    generation: u64,
    until: u64,
}

fn sub_piece(piece: &Piece, at: u64, length: u64) -> Piece {
    Piece {
        extent: piece.extent,
        request_offset: piece.request_offset + at,
        volume_offset: piece.volume_offset + at,
        length,
        extent_offset: piece.extent_offset + at,
    }
}
