//! A volume's redundancy state, which outlives any one translation: the
//! mirror legs' conditions and stale regions (`legs.rs`), the write-intent
//! log (`intent.rs`), and the change trackers of split pairs. Translations
//! built for the volume share one `Arc<Redundancy>`; mirror targets consult
//! it on every request.
//!
//! Everything is counted in *regions* of the volume (volume offset /
//! region size), so remapping extents never invalidates a bitmap.
//!
//! On disk (`state_dir/mirror/VOLUME/`): `legs.json` (region size, each
//! leg's condition and failure reason), `intent.bits`, `leg-STORE.stale`,
//! `TRACKER.track` (see `bitmap.rs` for the format and durability rules).

mod announce;
mod bitmap;
mod files;
mod intent;
mod legs;
mod recover;
mod trackers;

pub use announce::LegAnnouncer;
pub use bitmap::RegionBitmap;
pub use intent::{WriteGuard, WriteIntent};
pub use legs::{LegCondition, LegRecord, LegState};
pub use trackers::{DirtyRun, Tracker};

use crate::backend::Backend;
use crate::sync::lock;
use arc_swap::ArcSwap;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};

/// A leg failed: what the daemon's failure policy acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegEvent {
    pub volume: String,
    pub leg: String,
    pub reason: String,
}

/// Where leg failures go: the subscribers, and the failures raised while
/// there were none (a leg can fail before the daemon's supervisor first
/// subscribes a new volume); the next subscriber gets those first.
#[derive(Debug, Default)]
struct Events {
    subscribers: Vec<mpsc::Sender<LegEvent>>,
    unheard: Vec<LegEvent>,
}

#[derive(Debug)]
pub struct Redundancy {
    volume: String,
    /// Bytes per region (bitmap granularity).
    region: u64,
    regions: usize,
    /// Where the bitmaps and leg states persist; `None` keeps them in memory.
    dir: Option<PathBuf>,
    intent: WriteIntent,
    legs: Mutex<Vec<Arc<LegState>>>,
    trackers: ArcSwap<Vec<Arc<Tracker>>>,
    events: Mutex<Events>,
    /// Regions found dirty in the intent log at start (crash recovery).
    recovered: AtomicUsize,
    /// The chunk map of a chunk-mapped pool volume (thin targets), set once
    /// by the pool when the volume is built. It lives here because it is
    /// per-volume state every translation of the volume shares.
    chunk_map: std::sync::OnceLock<Arc<dyn crate::volume::target::ChunkMap>>,
    /// Other processes (the other nodes of a cluster) write these legs
    /// too, so no write may skip a resyncing leg and a resync copy checks
    /// its work (see `set_other_writers`).
    other_writers: std::sync::atomic::AtomicBool,
    /// Who must hear of a leg failure before I/O that missed it is answered.
    announcer: std::sync::OnceLock<Arc<dyn LegAnnouncer>>,
}

impl Redundancy {
    /// State kept in memory only (tools, tests).
    pub fn in_memory(volume: &str, size: u64, region: u64) -> Arc<Redundancy> {
        let regions = size.div_ceil(region) as usize;
        Arc::new(Redundancy::with(volume, region, None, RegionBitmap::in_memory(regions), Vec::new(), Vec::new()))
    }

    fn with(volume: &str, region: u64, dir: Option<PathBuf>, intent: RegionBitmap, legs: Vec<Arc<LegState>>, trackers: Vec<Arc<Tracker>>) -> Redundancy {
        Redundancy {
            volume: volume.into(),
            region,
            regions: intent.regions(),
            dir,
            intent: WriteIntent::new(intent),
            legs: Mutex::new(legs),
            trackers: ArcSwap::from_pointee(trackers),
            events: Mutex::new(Events::default()),
            recovered: AtomicUsize::new(0),
            chunk_map: std::sync::OnceLock::new(),
            other_writers: std::sync::atomic::AtomicBool::new(false),
            announcer: std::sync::OnceLock::new(),
        }
    }

    /// Says that other processes write this volume's legs too (cluster
    /// mode). A resync copy excludes only this process's writes of a
    /// region (`begin_copy`), so then: every write goes to a resyncing leg
    /// as well, after the legs before it (the source first), even to
    /// regions the leg still lacks (another node may have copied them
    /// already); and the copier re-reads what it copied from the source
    /// and copies again if it changed (`mirror::resync`).
    pub fn set_other_writers(&self, yes: bool) {
        self.other_writers.store(yes, Ordering::Relaxed);
    }

    pub fn other_writers(&self) -> bool {
        self.other_writers.load(Ordering::Relaxed)
    }

    /// Gives a chunk-mapped volume its map (once; later calls are ignored).
    pub fn set_chunk_map(&self, map: Arc<dyn crate::volume::target::ChunkMap>) {
        let _ = self.chunk_map.set(map);
    }

    pub fn chunk_map(&self) -> Option<Arc<dyn crate::volume::target::ChunkMap>> {
        self.chunk_map.get().cloned()
    }

    pub fn volume(&self) -> &str {
        &self.volume
    }

    pub fn region(&self) -> u64 {
        self.region
    }

    pub fn regions(&self) -> usize {
        self.regions
    }

    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    pub fn intent(&self) -> &WriteIntent {
        &self.intent
    }

    /// Regions found dirty at start, resynced since.
    pub fn recovered(&self) -> usize {
        self.recovered.load(Ordering::Relaxed)
    }

    /// The regions bytes `[offset, offset+length)` of the volume touch.
    pub fn regions_of(&self, offset: u64, length: u64) -> Range<usize> {
        if length == 0 {
            return 0..0;
        }
        (offset / self.region) as usize..(offset + length).div_ceil(self.region) as usize
    }

    /// Volume byte range of region `r`.
    pub fn region_range(&self, r: usize) -> (u64, u64) {
        let start = r as u64 * self.region;
        (start, start + self.region)
    }

    pub fn legs(&self) -> Vec<Arc<LegState>> {
        lock(&self.legs).clone()
    }

    pub fn leg(&self, store: &str) -> Option<Arc<LegState>> {
        lock(&self.legs).iter().find(|l| l.store() == store).cloned()
    }

    fn stale_bitmap(&self, store: &str) -> io::Result<RegionBitmap> {
        match &self.dir {
            Some(dir) => RegionBitmap::open(&files::stale_path(dir, store), self.regions),
            None => Ok(RegionBitmap::in_memory(self.regions)),
        }
    }

    /// The state of leg `store` of a mirror extent covering regions `rs`.
    /// A leg not seen before joins in sync if it is the extent's first leg
    /// (the mirror's data is there), else resyncing with `rs` stale.
    pub fn leg_for_target(&self, store: &str, first: bool, rs: Range<usize>) -> io::Result<Arc<LegState>> {
        if let Some(leg) = self.leg(store) {
            return Ok(leg);
        }
        let stale = self.stale_bitmap(store)?;
        let condition = if first { LegCondition::InSync } else { LegCondition::Resyncing };
        if !first {
            stale.set_volatile(rs);
            stale.sync()?;
        }
        let leg = Arc::new(LegState::new(store, condition, None, stale));
        lock(&self.legs).push(leg.clone());
        self.save_legs()?;
        Ok(leg)
    }

    /// Adds (or resets) leg `store` as resyncing with `stale` regions, made
    /// durable before it is used.
    pub fn add_resyncing_leg(&self, store: &str, stale: impl Iterator<Item = Range<usize>>) -> io::Result<Arc<LegState>> {
        let bitmap = self.stale_bitmap(store)?;
        for rs in stale {
            bitmap.set_volatile(rs);
        }
        bitmap.sync()?;
        let leg = Arc::new(LegState::new(store, LegCondition::Resyncing, None, bitmap));
        {
            let mut legs = lock(&self.legs);
            legs.retain(|l| l.store() != store);
            legs.push(leg.clone());
        }
        self.save_legs()?;
        Ok(leg)
    }

    /// Forgets leg `store` and its files.
    pub fn remove_leg(&self, store: &str) -> io::Result<()> {
        let removed: Vec<_> = {
            let mut legs = lock(&self.legs);
            let (gone, kept): (Vec<_>, Vec<_>) = legs.drain(..).partition(|l| l.store() == store);
            *legs = kept;
            gone
        };
        for leg in removed {
            leg.stale().remove_file()?;
        }
        self.save_legs()
    }

    /// Forgets the legs `table` no longer has (split legs stay listed
    /// until merged): after a swap that dropped them.
    pub fn retain_legs(&self, table: &crate::map::MappingTable) -> io::Result<()> {
        let in_table = |store: &str| table.extents().iter().any(|e| e.target.legs().is_some_and(|l| l.iter().any(|l| l.store == store)));
        let gone: Vec<String> =
            self.legs().iter().filter(|l| l.condition() != LegCondition::Split && !in_table(l.store())).map(|l| l.store().to_string()).collect();
        for store in gone {
            self.remove_leg(&store)?;
        }
        Ok(())
    }

    /// Persists every leg's condition (atomically).
    pub fn save_legs(&self) -> io::Result<()> {
        let Some(dir) = &self.dir else { return Ok(()) };
        let records: Vec<LegRecord> =
            self.legs().iter().map(|l| LegRecord { store: l.store().into(), condition: l.condition(), reason: l.reason() }).collect();
        files::save_legs(dir, self.region, &records)
    }

    /// Records that `leg` failed with `reason`: persisted, logged, and
    /// handed to the failure policy. Only the first failure counts.
    pub fn leg_failed(&self, leg: &LegState, reason: String) {
        if !leg.fail(reason.clone()) {
            return;
        }
        // Regions with writes not yet known to be on every leg's disk may
        // be missing on this one: a re-add copies them too.
        leg.stale().union_from(self.intent.bits());
        tracing::error!(volume = self.volume, leg = leg.store(), %reason, "mirror leg failed; I/O continues on the other legs");
        if let Err(e) = self.save_legs() {
            tracing::error!(volume = self.volume, error = %e, "cannot persist the failed leg's state");
        }
        let event = LegEvent { volume: self.volume.clone(), leg: leg.store().into(), reason };
        let mut events = lock(&self.events);
        events.subscribers.retain(|tx| tx.send(event.clone()).is_ok());
        if events.subscribers.is_empty() {
            events.unheard.push(event);
        }
    }

    /// Brings failed leg `leg` back as resyncing (`mirror readd`). A write
    /// that found the leg failed just before marks its regions stale only
    /// after its other legs took it, maybe after a resync took its snapshot
    /// (or ended): every such write still holds its intent bits, so those
    /// regions are marked stale here, after the switch.
    pub fn readd_leg(&self, leg: &LegState) -> io::Result<()> {
        leg.set_condition(LegCondition::Resyncing, None);
        leg.stale().union_from(self.intent.bits());
        self.save_legs()
    }

    /// Failure events of this volume's legs.
    pub fn subscribe(&self) -> mpsc::Receiver<LegEvent> {
        let (tx, rx) = mpsc::channel();
        self.notify(tx);
        rx
    }

    /// Sends this volume's leg failures to `tx` too, starting with those
    /// no subscriber has heard of yet.
    pub fn notify(&self, tx: mpsc::Sender<LegEvent>) {
        let mut events = lock(&self.events);
        let unheard = std::mem::take(&mut events.unheard);
        for (i, event) in unheard.iter().enumerate() {
            if tx.send(event.clone()).is_err() {
                events.unheard = unheard[i..].to_vec();
                return;
            }
        }
        events.subscribers.push(tx);
    }

    /// Whether `store` is the store of a leg that failed (its flush errors
    /// are expected and must not fail a client's FLUSH).
    pub fn is_failed_store(&self, store: &Arc<dyn Backend>) -> bool {
        self.legs().iter().any(|l| !l.writable() && l.backend().is_some_and(|b| Arc::ptr_eq(&b, store)))
    }

    /// Clears the whole intent log after flushing every writable leg and
    /// syncing every stale map. Only when no write can be in flight (the
    /// server has stopped).
    pub fn close_clean(&self) -> io::Result<()> {
        if self.intent.bits().count() == 0 {
            return Ok(());
        }
        self.flush_legs(false)?;
        let bits = self.intent.bits();
        {
            let _w = bits.writer();
            bits.clear_all();
        }
        bits.sync()
    }

    /// Clears the intent bits of idle regions, after flushing every
    /// writable leg and syncing every leg's stale map (see
    /// `WriteIntent::clear_idle`).
    pub fn clear_idle(&self) -> io::Result<usize> {
        self.intent.clear_idle(|| self.flush_legs(true))
    }

    /// Flushes every writable leg, then syncs every leg's stale map, so
    /// every completed write is on each writable leg's disk and every stale
    /// mark on disk. A leg whose flush fails is failed (its regions in
    /// doubt become stale) with `fail_legs`; without, the error is returned.
    fn flush_legs(&self, fail_legs: bool) -> io::Result<()> {
        for leg in self.legs() {
            if let Some(b) = leg.backend().filter(|_| leg.writable()) {
                match b.flush() {
                    Err(e) if fail_legs => self.leg_failed(&leg, format!("{:?}: flush: {e}", crate::backend::errno_of(&e))),
                    other => other?,
                }
            }
            leg.stale().sync()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_before_any_subscriber_reaches_the_first_one() {
        let red = Redundancy::in_memory("v", 4 << 20, 1 << 20);
        let a = red.leg_for_target("a", true, 0..4).unwrap();
        let b = red.leg_for_target("b", true, 0..4).unwrap();
        red.leg_failed(&b, "EIO: early".into());
        let first = red.subscribe();
        assert_eq!(first.try_recv().unwrap(), LegEvent { volume: "v".into(), leg: "b".into(), reason: "EIO: early".into() });
        // Heard once: a later subscriber gets only later failures.
        let second = red.subscribe();
        assert!(second.try_recv().is_err());
        red.leg_failed(&a, "EIO: later".into());
        assert_eq!(first.try_recv().unwrap().leg, "a");
        assert_eq!(second.try_recv().unwrap().leg, "a");
        assert!(first.try_recv().is_err());
    }

    #[test]
    fn a_readded_leg_resyncs_the_regions_of_writes_in_flight() {
        let red = Redundancy::in_memory("v", 4 << 20, 1 << 20);
        let _a = red.leg_for_target("a", true, 0..4).unwrap();
        let b = red.leg_for_target("b", true, 0..4).unwrap();
        red.leg_failed(&b, "EIO".into());
        b.stale().set_volatile(0..1);
        // A write to region 2 in flight (it may have seen b failed, and not
        // marked region 2 stale on it yet).
        let write = red.intent().begin_write(2..3).unwrap();
        red.readd_leg(&b).unwrap();
        drop(write);
        assert_eq!(b.condition(), LegCondition::Resyncing);
        assert_eq!(b.stale().iter_set().collect::<Vec<_>>(), [0, 2], "what it missed, and the write in flight");
    }

    #[test]
    fn a_dropped_subscriber_leaves_the_failure_unheard() {
        let red = Redundancy::in_memory("v", 4 << 20, 1 << 20);
        let b = red.leg_for_target("b", true, 0..4).unwrap();
        drop(red.subscribe());
        red.leg_failed(&b, "EIO".into());
        assert_eq!(red.subscribe().try_recv().unwrap().leg, "b");
    }
}
