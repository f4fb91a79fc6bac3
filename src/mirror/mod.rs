//! Background work of mirrors: resyncing a leg region by region
//! (`resync.rs`), and the pacing shared with migration (`pace.rs`).
//!
//! A [`ResyncJob`] copies every region its leg lacks (its stale bitmap)
//! from a leg that has it, under the volume's per-region copy exclusion
//! (`WriteIntent::begin_copy`), rate-limited and at low priority. Every
//! second the leg is flushed and *then* its stale bitmap synced, so after
//! a crash the resync resumes at a checkpoint whose regions really are on
//! the leg. When no region is stale the leg becomes in sync.

pub mod pace;
mod resync;

use crate::sync::lock;
use crate::volume::Volume;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Default resync rate: like migration, 64 MiB/s leaves ordinary disks
/// room for foreground I/O; `--rate 0` removes the limit.
pub const DEFAULT_RATE: u64 = 64 << 20;
/// How often resync progress is made durable.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// Largest single read/write of a resync copy.
const COPY_IO: u64 = 1 << 20;

/// How a resync ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResyncEnd {
    /// Every region copied: the leg is in sync.
    InSync,
    /// Stopped on request (shutdown, leg removed); resumes later.
    Stopped,
    /// The leg failed, or no leg had a region to copy from.
    Failed(String),
}

#[derive(Debug)]
pub struct ResyncJob {
    volume: Arc<Volume>,
    leg: String,
    rate: u64,
    stop: AtomicBool,
    end: Mutex<Option<ResyncEnd>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl ResyncJob {
    /// Starts resyncing leg `leg` of `volume` at `rate` bytes/s (0 =
    /// unlimited).
    pub fn start(volume: Arc<Volume>, leg: &str, rate: u64) -> Arc<ResyncJob> {
        let job = Arc::new(ResyncJob {
            volume,
            leg: leg.into(),
            rate,
            stop: AtomicBool::new(false),
            end: Mutex::new(None),
            thread: Mutex::new(None),
        });
        let runner = job.clone();
        let name = format!("resync-{}", job.leg);
        let handle = std::thread::Builder::new().name(name).spawn(move || runner.run());
        match handle {
            Ok(h) => *lock(&job.thread) = Some(h),
            Err(e) => *lock(&job.end) = Some(ResyncEnd::Failed(format!("cannot start the resync thread: {e}"))),
        }
        job
    }

    pub fn volume(&self) -> &Arc<Volume> {
        &self.volume
    }

    pub fn leg(&self) -> &str {
        &self.leg
    }

    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// `None` while running.
    pub fn end(&self) -> Option<ResyncEnd> {
        lock(&self.end).clone()
    }

    /// Stops at the next region, after a durable checkpoint, and waits.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.join();
    }

    /// Waits until the job ends.
    pub fn join(&self) {
        let handle = lock(&self.thread).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}
