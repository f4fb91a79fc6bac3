//! A volume's redundancy state, which outlives any one translation: the
//! mirror legs' conditions and stale regions, the write-intent log, and the
//! change trackers of split pairs. Translations built for the volume share
//! one `Arc<Redundancy>`; mirror targets consult it on every request.
//!
//! Everything here is counted in *regions* of the volume (volume offset /
//! region size), so remapping extents never invalidates a bitmap.

use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug)]
pub struct Redundancy {
    volume: String,
    /// Bytes per region (bitmap granularity).
    region: u64,
    /// Where the bitmaps and leg states persist; `None` keeps them in memory.
    dir: Option<PathBuf>,
}

impl Redundancy {
    /// State kept in memory only (tests, volumes without mirrors).
    pub fn in_memory(volume: &str, region: u64) -> Arc<Redundancy> {
        Arc::new(Redundancy { volume: volume.into(), region, dir: None })
    }

    pub fn volume(&self) -> &str {
        &self.volume
    }

    pub fn region(&self) -> u64 {
        self.region
    }

    pub fn dir(&self) -> Option<&PathBuf> {
        self.dir.as_ref()
    }
}

/// One run of a change tracker over a queried range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirtyRun {
    pub length: u64,
    /// Written since the tracker started.
    pub dirty: bool,
}

impl Redundancy {
    /// Names of the change trackers (`split-NEWVOL`), served over NBD as
    /// `qemu:dirty-bitmap:NAME`.
    pub fn tracker_names(&self) -> Vec<String> {
        Vec::new()
    }

    /// Runs of tracker `name` over `[offset, offset+length)`, at most
    /// `max_runs` (the last may stop short); `None` if there is no such
    /// tracker.
    pub fn dirty_runs(&self, name: &str, offset: u64, length: u64, max_runs: usize) -> Option<Vec<DirtyRun>> {
        let _ = (name, offset, length, max_runs);
        None
    }
}
