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
