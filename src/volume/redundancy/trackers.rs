//! Change trackers: durable bitmaps of the regions written since a point
//! in time (a split), served to backup tools as `qemu:dirty-bitmap:NAME`
//! and used by merge to copy only what changed. A write is answered only
//! after its regions' bits are on disk, so a crash never loses a change
//! (QEMU's persistent bitmaps are marked inconsistent after a crash
//! instead, forcing a full copy).

use super::{files, Redundancy, RegionBitmap};
use std::io;
use std::sync::Arc;

#[derive(Debug)]
pub struct Tracker {
    name: String,
    bits: RegionBitmap,
}

/// One run of a change tracker over a queried range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirtyRun {
    pub length: u64,
    /// Written since the tracker started.
    pub dirty: bool,
}

impl Tracker {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn bits(&self) -> &RegionBitmap {
        &self.bits
    }
}

impl Redundancy {
    pub(super) fn open_tracker(&self, name: &str) -> io::Result<Arc<Tracker>> {
        let bits = match self.dir() {
            Some(dir) => RegionBitmap::open(&files::tracker_path(dir, name), self.regions())?,
            None => RegionBitmap::in_memory(self.regions()),
        };
        Ok(Arc::new(Tracker { name: name.into(), bits }))
    }

    /// Starts tracker `name` (all clear), durable before it returns; an
    /// existing tracker of that name is kept.
    pub fn add_tracker(&self, name: &str) -> io::Result<Arc<Tracker>> {
        if let Some(t) = self.tracker(name) {
            return Ok(t);
        }
        let t = self.open_tracker(name)?;
        t.bits.sync()?;
        let mut list = self.trackers.load().as_ref().clone();
        list.push(t.clone());
        self.trackers.store(Arc::new(list));
        Ok(t)
    }

    /// Stops tracker `name` and deletes its file.
    pub fn remove_tracker(&self, name: &str) -> io::Result<()> {
        let list: Vec<_> = self.trackers.load().iter().filter(|t| t.name != name).cloned().collect();
        let gone = self.tracker(name);
        self.trackers.store(Arc::new(list));
        match gone {
            Some(t) => t.bits.remove_file(),
            None => Ok(()),
        }
    }

    pub fn tracker(&self, name: &str) -> Option<Arc<Tracker>> {
        self.trackers.load().iter().find(|t| t.name == name).cloned()
    }

    /// Names of the change trackers (`split-NEWVOL`), served over NBD as
    /// `qemu:dirty-bitmap:NAME`.
    pub fn tracker_names(&self) -> Vec<String> {
        self.trackers.load().iter().map(|t| t.name.clone()).collect()
    }

    /// Records a change of `[offset, offset+length)` in every tracker,
    /// durably, before the change is made.
    pub fn track(&self, offset: u64, length: u64) -> io::Result<()> {
        let trackers = self.trackers.load();
        if trackers.is_empty() {
            return Ok(());
        }
        let rs = self.regions_of(offset, length);
        trackers.iter().try_for_each(|t| t.bits.set_durable(rs.clone()))
    }

    /// Runs of tracker `name` over `[offset, offset+length)`, at most
    /// `max_runs` (the last may stop short); `None` if there is no such
    /// tracker.
    pub fn dirty_runs(&self, name: &str, offset: u64, length: u64, max_runs: usize) -> Option<Vec<DirtyRun>> {
        let t = self.tracker(name)?;
        let mut runs: Vec<DirtyRun> = Vec::new();
        let (mut pos, end) = (offset, offset.saturating_add(length));
        while pos < end {
            let r = (pos / self.region()) as usize;
            let stop = ((r as u64 + 1) * self.region()).min(end);
            let dirty = t.bits.get(r);
            let full = runs.len() == max_runs;
            match runs.last_mut() {
                Some(last) if last.dirty == dirty => last.length += stop - pos,
                _ if full => break,
                _ => runs.push(DirtyRun { length: stop - pos, dirty }),
            }
            pos = stop;
        }
        Some(runs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_follow_the_written_regions() {
        let r = Redundancy::in_memory("v", 8 << 20, 1 << 20);
        assert!(r.dirty_runs("split-x", 0, 10, 4).is_none());
        r.add_tracker("split-x").unwrap();
        r.track((2 << 20) + 5, 10).unwrap();
        r.track(5 << 20, (1 << 20) + 1).unwrap();
        let runs = r.dirty_runs("split-x", 1 << 20, 6 << 20, 16).unwrap();
        let want = [(1 << 20, false), (1 << 20, true), (2 << 20, false), (2 << 20, true)];
        assert_eq!(runs, want.iter().map(|(length, dirty)| DirtyRun { length: *length, dirty: *dirty }).collect::<Vec<_>>());
        assert_eq!(r.dirty_runs("split-x", 0, 8 << 20, 1).unwrap().len(), 1);
        assert_eq!(r.tracker_names(), vec!["split-x".to_string()]);
        r.remove_tracker("split-x").unwrap();
        assert!(r.tracker_names().is_empty());
    }
}
