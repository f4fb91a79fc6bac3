//! The resync copy loop (see the module doc of `mirror`).

use super::pace::{lower_priority, RateLimiter};
use super::{ResyncEnd, ResyncJob, CHECKPOINT_EVERY, COPY_IO};
use crate::backend::{errno_of, AlignedBuf, Backend, ZeroMode};
use crate::sync::lock;
use crate::volume::{LegCondition, LegState, Redundancy};
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// Why copying one region failed.
enum CopyError {
    /// Writing the leg being resynced failed: the leg fails.
    Dest(io::Error),
    /// Reading the source leg failed: that leg fails, another may serve.
    Source(Arc<LegState>, io::Error),
    /// No leg has the region.
    NoSource(usize),
    /// The source changed under the copy (another node wrote it): the
    /// region is copied again, outside the copy exclusion.
    Changed,
}

/// How often a region is copied again because the source changed under
/// the copy before the resync gives up (the migration fails, its source
/// stays the mapping): a region written without pause by other nodes.
const CHANGED_TRIES: u32 = 50;

/// Where the last data run seen on a source store ends, so the allocation
/// map is asked once per data run rather than per region (SEEK_HOLE on
/// tmpfs scans to the end of the data: per region it is quadratic).
struct KnownData {
    store: Arc<dyn Backend>,
    until: u64,
}

impl ResyncJob {
    pub(super) fn run(self: Arc<Self>) {
        lower_priority();
        let end = self.copy_all();
        match &end {
            ResyncEnd::InSync => tracing::info!(volume = self.volume.name(), leg = self.leg, "mirror leg resynced: in sync"),
            ResyncEnd::Stopped => tracing::info!(volume = self.volume.name(), leg = self.leg, "resync stopped at a checkpoint"),
            ResyncEnd::Failed(reason) => tracing::error!(volume = self.volume.name(), leg = self.leg, %reason, "resync failed"),
        }
        *lock(&self.end) = Some(end);
    }

    fn copy_all(&self) -> ResyncEnd {
        let red = self.volume.translation().redundancy().clone();
        let Some(leg) = red.leg(&self.leg) else {
            return ResyncEnd::Failed(format!("volume '{}' has no leg '{}'", self.volume.name(), self.leg));
        };
        let mut limiter = RateLimiter::new(self.rate);
        let mut buf = AlignedBuf::zeroed(COPY_IO as usize);
        // Where the copier re-reads what it copied (other writers only).
        let mut check = red.other_writers().then(|| AlignedBuf::zeroed(COPY_IO as usize));
        let mut known: Option<KnownData> = None;
        let (mut last_checkpoint, mut window_bytes) = (Instant::now(), 0u64);
        // Passes over snapshots of the stale map until it is empty. One pass
        // is not always enough: a write that found the leg failed just
        // before `mirror readd` made it resyncing marks its regions stale
        // a moment later, possibly after this job took its snapshot.
        loop {
            let stale: Vec<usize> = leg.stale().iter_set().collect();
            if stale.is_empty() {
                break;
            }
            for r in stale {
                if self.stopping() {
                    return self.checkpoint(&red, &leg).map_or_else(ResyncEnd::Failed, |()| ResyncEnd::Stopped);
                }
                if !leg.writable() {
                    return ResyncEnd::Failed(leg.reason().unwrap_or_else(|| "the leg left the mirror".into()));
                }
                limiter.wait_due();
                let mut changed = 0;
                let copied = loop {
                    red.intent().begin_copy(r);
                    let result = self.copy_region(&red, &leg, r, buf.as_mut_slice(), check.as_mut().map(|c| c.as_mut_slice()), &mut known);
                    if result.is_ok() {
                        // Still inside the copy's exclusion: a write admitted
                        // after it must see the region as the leg's (writes
                        // skip a leg's stale regions, see the mirror target).
                        leg.stale().clear(r);
                    }
                    red.intent().end_copy(r);
                    match result {
                        Ok(bytes) => break bytes,
                        Err(CopyError::Source(src, e)) => {
                            red.leg_failed(&src, format!("{:?}: resync read: {e}", errno_of(&e)));
                            known = None;
                        }
                        Err(CopyError::Dest(e)) => {
                            let reason = format!("{:?}: resync write: {e}", errno_of(&e));
                            red.leg_failed(&leg, reason.clone());
                            return ResyncEnd::Failed(reason);
                        }
                        Err(CopyError::NoSource(r)) => return ResyncEnd::Failed(format!("no in-sync leg has region {r}")),
                        Err(CopyError::Changed) if changed < CHANGED_TRIES => {
                            changed += 1;
                            known = None;
                            std::thread::sleep(std::time::Duration::from_millis(changed.into()));
                        }
                        Err(CopyError::Changed) => {
                            return ResyncEnd::Failed(format!("region {r} changed on the source during each of {CHANGED_TRIES} copies (written by other nodes without pause)"))
                        }
                    }
                };
                leg.copied.fetch_add(copied, Ordering::Relaxed);
                limiter.pay(copied);
                window_bytes += copied;
                if last_checkpoint.elapsed() >= CHECKPOINT_EVERY {
                    if let Err(reason) = self.checkpoint(&red, &leg) {
                        return ResyncEnd::Failed(reason);
                    }
                    let secs = last_checkpoint.elapsed().as_secs_f64();
                    leg.rate.store((window_bytes as f64 / secs) as u64, Ordering::Relaxed);
                    (last_checkpoint, window_bytes) = (Instant::now(), 0);
                }
            }
        }
        if let Err(reason) = self.checkpoint(&red, &leg) {
            return ResyncEnd::Failed(reason);
        }
        leg.rate.store(0, Ordering::Relaxed);
        if leg.stale().count() == 0 && leg.condition() == LegCondition::Resyncing {
            leg.set_condition(LegCondition::InSync, None);
            if let Err(e) = red.save_legs() {
                return ResyncEnd::Failed(format!("persisting the leg state: {e}"));
            }
        }
        ResyncEnd::InSync
    }

    /// Flushes the leg, *then* makes its stale map durable: a region is
    /// recorded as copied only once its data is on the leg's disk.
    fn checkpoint(&self, red: &Redundancy, leg: &LegState) -> Result<(), String> {
        if let Some(b) = leg.backend() {
            if let Err(e) = b.flush() {
                let reason = format!("{:?}: resync flush: {e}", errno_of(&e));
                red.leg_failed(leg, reason.clone());
                return Err(reason);
            }
        }
        leg.stale().sync().map_err(|e| format!("saving resync progress: {e}"))
    }

    /// Copies region `r` onto the leg from a leg that has it, extent by
    /// extent (only mirror extents with this leg have anything to copy):
    /// data is copied, holes are punched. Returns the bytes covered.
    ///
    /// With `check` (other nodes write the legs, unexcluded by this copy),
    /// each piece copied is read from the source again and must be what
    /// was copied, else `Changed`. Why that suffices, per block: the
    /// other nodes write the source before the destination. A write whose
    /// destination half landed before this copy's write landed its source
    /// half before too, so before the re-read, which then differs (or the
    /// copy already carried its bytes); a write whose destination half
    /// lands after this copy's write overwrites it with its own bytes.
    fn copy_region(&self, red: &Redundancy, leg: &LegState, r: usize, buf: &mut [u8], mut check: Option<&mut [u8]>, known: &mut Option<KnownData>) -> Result<u64, CopyError> {
        let t = self.volume.translation();
        let (start, end) = red.region_range(r);
        let end = end.min(t.table().size());
        let mut covered = 0;
        for piece in t.table().pieces(start, end.saturating_sub(start)) {
            let extent = &t.table().extents()[piece.extent];
            let Some(legs) = extent.target.legs() else { continue };
            let Some(dst) = legs.iter().find(|l| l.store == self.leg) else { continue };
            let source = legs
                .iter()
                .filter(|l| l.store != self.leg)
                .filter_map(|l| red.leg(&l.store).filter(|s| s.readable(r..r + 1)).and_then(|s| s.backend().map(|b| (l.offset, s, b))))
                .next();
            let Some((src_offset, src_state, src)) = source else { return Err(CopyError::NoSource(r)) };
            let Some(dest) = leg.backend() else { return Err(CopyError::NoSource(r)) };
            let (from, to) = (src_offset + piece.extent_offset, dst.offset + piece.extent_offset);
            let src_err = |e| CopyError::Source(src_state.clone(), e);
            let mut done = 0;
            while done < piece.length {
                let at = from + done;
                let cached = known.as_ref().filter(|k| Arc::ptr_eq(&k.store, &src) && at < k.until).map(|k| k.until - at);
                let (hole, len) = match cached {
                    Some(avail) => (false, avail.min(piece.length - done)),
                    None => {
                        let extent_left = extent.length - (piece.extent_offset + done);
                        let run = src.block_status(at, extent_left, 1).map_err(src_err)?.first().copied();
                        let run = run.filter(|r| r.length > 0).ok_or_else(|| src_err(io::Error::other("allocation map returned nothing")))?;
                        if !run.hole {
                            *known = Some(KnownData { store: src.clone(), until: at + run.length });
                        }
                        (run.hole, run.length.min(piece.length - done))
                    }
                };
                if hole {
                    dest.write_zeroes(to + done, len, ZeroMode { may_trim: true, fast_only: false }, false).map_err(CopyError::Dest)?;
                    if let Some(check) = check.as_deref_mut() {
                        let mut off = 0;
                        while off < len {
                            let n = (len - off).min(COPY_IO) as usize;
                            src.read_at(&mut check[..n], at + off).map_err(src_err)?;
                            if check[..n].iter().any(|&b| b != 0) {
                                return Err(CopyError::Changed);
                            }
                            off += n as u64;
                        }
                    }
                } else {
                    let mut off = 0;
                    while off < len {
                        let n = (len - off).min(COPY_IO) as usize;
                        src.read_at(&mut buf[..n], at + off).map_err(src_err)?;
                        dest.write_at(&buf[..n], to + done + off, false).map_err(CopyError::Dest)?;
                        if let Some(check) = check.as_deref_mut() {
                            src.read_at(&mut check[..n], at + off).map_err(src_err)?;
                            if check[..n] != buf[..n] {
                                return Err(CopyError::Changed);
                            }
                        }
                        leg.data.fetch_add(n as u64, Ordering::Relaxed);
                        off += n as u64;
                    }
                }
                done += len;
            }
            covered += piece.length;
        }
        Ok(covered)
    }
}

#[cfg(test)]
#[path = "resync_tests.rs"]
mod tests;
