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
}

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
                let copied = loop {
                    red.intent().begin_copy(r);
                    let result = self.copy_region(&red, &leg, r, buf.as_mut_slice(), &mut known);
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
    fn copy_region(&self, red: &Redundancy, leg: &LegState, r: usize, buf: &mut [u8], known: &mut Option<KnownData>) -> Result<u64, CopyError> {
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
                } else {
                    let mut off = 0;
                    while off < len {
                        let n = (len - off).min(COPY_IO) as usize;
                        src.read_at(&mut buf[..n], at + off).map_err(src_err)?;
                        dest.write_at(&buf[..n], to + done + off, false).map_err(CopyError::Dest)?;
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
mod tests {
    use super::*;
    use crate::backend::{open_backend, BackendSpec};
    use crate::map::{Extent, Leg, MappingTable, TargetSpec, DEFAULT_REGION};
    use crate::volume::{Translation, Volume, VolumeSpec};
    use std::collections::HashMap;
    use std::time::Duration;

    #[test]
    fn regions_marked_stale_during_the_pass_are_copied_too() {
        let mem = |name: &str| open_backend(&BackendSpec { name: name.into(), path: None, size: Some(4 << 20), direct: false, read_only: false, delay: None, sharing: Default::default() }).unwrap();
        let stores = HashMap::from([("a".to_string(), mem("a")), ("b".to_string(), mem("b"))]);
        let legs = vec![Leg { store: "a".into(), offset: 0 }, Leg { store: "b".into(), offset: 0 }];
        let table = MappingTable::new(1, vec![Extent { start: 0, length: 4 << 20, target: TargetSpec::Mirror { legs, region: DEFAULT_REGION } }]).unwrap();
        let spec = VolumeSpec { name: "v".into(), description: String::new(), read_only: false, block_size: 4096 };
        let volume = Arc::new(Volume::new(spec, Translation::new(table, &stores).unwrap()));
        stores["a"].write_at(&[7; 4096], 3 << 20, false).unwrap();
        let red = volume.translation().redundancy().clone();
        let b = red.leg("b").unwrap();
        assert_eq!(b.condition(), LegCondition::Resyncing);
        // b lacks regions 0 and 2 when the job starts.
        b.stale().clear(1);
        b.stale().clear(3);
        // 2 MiB/s: half a second between the 1 MiB regions.
        let job = ResyncJob::start(volume.clone(), "b", 2 << 20);
        let t0 = Instant::now();
        while b.copied.load(Ordering::Relaxed) == 0 {
            assert!(t0.elapsed() < Duration::from_secs(10), "region 0 not copied");
            std::thread::sleep(Duration::from_millis(1));
        }
        // Region 3 becomes stale after the job's snapshot (a write that saw
        // the leg failed, marking it late).
        b.stale().set_volatile(3..4);
        job.join();
        assert_eq!(job.end(), Some(ResyncEnd::InSync));
        assert_eq!(b.stale().count(), 0, "region 3 was copied too");
        assert_eq!(b.condition(), LegCondition::InSync);
        let mut buf = [0u8; 4096];
        stores["b"].read_at(&mut buf, 3 << 20).unwrap();
        assert_eq!(buf, [7; 4096]);
    }
}
