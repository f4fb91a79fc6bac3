//! Opening a volume's redundancy state from its directory, and crash
//! recovery: regions whose intent bit is set may differ between legs, so
//! every leg but the first in-sync one gets them marked stale and resyncs
//! them — those regions only, never the whole volume.

use super::{files, LegCondition, LegState, Redundancy, RegionBitmap};
use std::io;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

impl Redundancy {
    /// Opens (creating if needed) the state of `volume`, `size` bytes, in
    /// `dir`. The region size persisted first wins over `region`: the
    /// bitmaps on disk are counted in it.
    pub fn open(dir: &Path, volume: &str, size: u64, region: u64) -> io::Result<Arc<Redundancy>> {
        std::fs::create_dir_all(dir)?;
        let saved = files::load_legs(dir)?;
        let region = match &saved {
            Some(s) if s.region != region && s.region > 0 => {
                tracing::warn!(volume, persisted = s.region, configured = region, "keeping the persisted mirror region size");
                s.region
            }
            _ => region,
        };
        let regions = size.div_ceil(region) as usize;
        let intent = RegionBitmap::open(&files::intent_path(dir), regions)?;
        let mut legs = Vec::new();
        for rec in saved.iter().flat_map(|s| &s.legs) {
            let stale = RegionBitmap::open(&files::stale_path(dir, &rec.store), regions)?;
            legs.push(Arc::new(LegState::new(&rec.store, rec.condition, rec.reason.clone(), stale)));
        }
        let r = Redundancy::with(volume, region, Some(dir.to_path_buf()), intent, legs, Vec::new());
        let trackers = files::tracker_names(dir)?.iter().map(|n| r.open_tracker(n)).collect::<io::Result<Vec<_>>>()?;
        r.trackers.store(Arc::new(trackers));
        r.recover()?;
        Ok(Arc::new(r))
    }

    fn recover(&self) -> io::Result<()> {
        let dirty: Vec<usize> = self.intent.bits().iter_set().collect();
        let legs = self.legs();
        if dirty.is_empty() || legs.len() < 2 {
            return Ok(());
        }
        let primary = legs.iter().position(|l| l.condition() == LegCondition::InSync);
        for (i, leg) in legs.iter().enumerate() {
            if Some(i) == primary || leg.condition() == LegCondition::Split {
                continue;
            }
            for r in &dirty {
                leg.stale().set_volatile(*r..*r + 1);
            }
            leg.stale().sync()?;
            if leg.condition() == LegCondition::InSync {
                leg.set_condition(LegCondition::Resyncing, None);
            }
        }
        self.save_legs()?;
        self.recovered.store(dirty.len(), Ordering::Relaxed);
        tracing::warn!(volume = self.volume(), regions = dirty.len(), "unclean shutdown: resyncing the regions the write-intent log marks dirty");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crash_resyncs_only_dirty_regions() {
        let dir = tempfile::tempdir().unwrap();
        {
            let r = Redundancy::open(dir.path(), "v", 16 << 20, 1 << 20).unwrap();
            r.leg_for_target("a", true, 0..16).unwrap();
            let b = r.leg_for_target("b", false, 0..16).unwrap();
            b.stale().clear_all();
            b.stale().sync().unwrap();
            b.set_condition(LegCondition::InSync, None);
            r.save_legs().unwrap();
            // Writes in flight at the "crash".
            std::mem::forget(r.intent().begin_write(3..5).unwrap());
        }
        let r = Redundancy::open(dir.path(), "v", 16 << 20, 1 << 20).unwrap();
        assert_eq!(r.recovered(), 2);
        let a = r.leg("a").unwrap();
        let b = r.leg("b").unwrap();
        assert_eq!(a.condition(), LegCondition::InSync);
        assert_eq!(b.condition(), LegCondition::Resyncing);
        assert_eq!(b.stale().iter_set().collect::<Vec<_>>(), vec![3, 4]);
        assert_eq!(Redundancy::open(dir.path(), "v", 16 << 20, 4 << 20).unwrap().region(), 1 << 20, "the persisted region wins");
    }
}
