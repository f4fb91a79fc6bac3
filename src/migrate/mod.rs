//! Live migration of a volume range onto another store, chunk by chunk,
//! while the volume is in use (like pvmove / drive-mirror):
//!
//! 1. [`WriteForward`] is attached to the volume through the swap phases
//!    (stage, pause: drain the range, commit nothing to persist);
//! 2. a copier thread (`copier.rs`) copies chunk after chunk, only allocated
//!    data (holes are punched on the destination), rate-limited and at low
//!    CPU/IO priority; writes to copied chunks are forwarded by the volume
//!    layer;
//! 3. every second, the destination is fdatasync'ed and *then* the progress
//!    table is persisted, so a restart resumes from a checkpoint whose
//!    chunks really are on the destination;
//! 4. cutover (`cutover.rs`) is a pause–drain–swap of the range onto the
//!    destination, after a final fdatasync, persisted as a new generation;
//! 5. abort or a destination error detaches the forwarding: the mapping
//!    stays on the source, which always had every write.

mod checkpoint;
mod copier;
mod cutover;
mod error;

pub use checkpoint::Checkpoint;
pub use error::{MigrateError, MigrateErrorKind};

use crate::api::{MigrationState, MigrationStatus};
use crate::backend::Backend;
use crate::map::Range;
use crate::persist::{now_secs, PersistError, StateDir};
use crate::volume::{ChunkState, SwapOptions, Volume, WriteForward};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What to migrate, and how.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MigrationSpec {
    pub volume: String,
    /// Volume range to move.
    pub range: Range,
    /// Destination store and the offset of `range.start` on it.
    pub dest: String,
    pub dest_offset: u64,
    pub chunk: u64,
    /// Copy bandwidth limit in bytes per second; 0 = unlimited.
    pub rate: u64,
    pub discard_source: bool,
}

/// Default copy chunk.
pub const DEFAULT_CHUNK: u64 = 1 << 20;
/// Default copy rate: 64 MiB/s keeps a migration from crowding out
/// foreground I/O on ordinary disks; `--rate 0` removes the limit.
pub const DEFAULT_RATE: u64 = 64 << 20;
/// Largest single read/write of the copier.
const COPY_IO: u64 = 1 << 20;
/// How often progress is made durable.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// The status of a job of `spec`, as `migrate status` shows it.
fn status_of(
        spec: &MigrationSpec,
        state: MigrationState,
        reason: Option<String>,
        copied_bytes: u64,
        started_at: u64,
        finished_at: Option<u64>,
        generation: Option<u64>,
    ) -> MigrationStatus {
        MigrationStatus {
            volume: spec.volume.clone(),
            state,
            reason,
            copied_bytes,
            total_bytes: spec.range.len(),
            data_bytes: 0,
            dest: spec.dest.clone(),
            dest_offset: spec.dest_offset,
            range_start: spec.range.start,
            range_length: spec.range.len(),
            chunk: spec.chunk,
            rate: spec.rate,
            started_at,
            finished_at,
            throughput: 0,
            generation,
        }
    }

pub struct MigrationJob {
    spec: MigrationSpec,
    volume: Arc<Volume>,
    forward: Arc<WriteForward>,
    stores: HashMap<String, Arc<dyn Backend>>,
    state_dir: StateDir,
    swap: SwapOptions,
    abort: AtomicBool,
    /// Stop copying but stay `running` (daemon shutdown): resumed at restart.
    suspend: AtomicBool,
    status: Mutex<JobProgress>,
    copied_bytes: AtomicU64,
    data_bytes: AtomicU64,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

struct JobProgress {
    state: MigrationState,
    reason: Option<String>,
    started_at: u64,
    finished_at: Option<u64>,
    began: Instant,
    resumed_bytes: u64,
    generation: Option<u64>,
}

/// Where the checkpoint of `volume`'s migration lives in the state directory.
fn checkpoint_path(volume: &str) -> PathBuf {
    Path::new("migrations").join(format!("{volume}.json"))
}

impl MigrationJob {
    /// Prepares a job: the write forwarding is built (from `copied`, when
    /// resuming) but not attached; `start` attaches it and starts copying.
    pub fn new(
        spec: MigrationSpec,
        volume: Arc<Volume>,
        stores: HashMap<String, Arc<dyn Backend>>,
        state_dir: StateDir,
        swap: SwapOptions,
        copied: &[bool],
        started_at: u64,
    ) -> Result<Arc<MigrationJob>, MigrateError> {
        let dest = stores.get(&spec.dest).cloned().ok_or_else(|| MigrateError::UnknownStore(spec.dest.clone()))?;
        let forward = WriteForward::new(spec.range, spec.chunk, dest, spec.dest_offset, copied);
        let copied_bytes: u64 = (0..forward.chunks()).filter(|i| copied.get(*i).copied().unwrap_or(false)).map(|i| forward.chunk_range(i).len()).sum();
        Ok(Arc::new(MigrationJob {
            spec,
            volume,
            forward,
            stores,
            state_dir,
            swap,
            abort: AtomicBool::new(false),
            suspend: AtomicBool::new(false),
            status: Mutex::new(JobProgress {
                state: MigrationState::Running,
                reason: None,
                started_at,
                finished_at: None,
                began: Instant::now(),
                resumed_bytes: copied_bytes,
                generation: None,
            }),
            copied_bytes: AtomicU64::new(copied_bytes),
            data_bytes: AtomicU64::new(0),
            thread: Mutex::new(None),
        }))
    }

    pub fn spec(&self) -> &MigrationSpec {
        &self.spec
    }

    pub fn is_running(&self) -> bool {
        lock(&self.status).state == MigrationState::Running
    }

    /// Attaches the write forwarding (draining the range first; a volume
    /// nobody uses yet drains at once) and starts the copier thread. On
    /// failure nothing stays attached.
    pub fn start(self: &Arc<Self>) -> Result<(), MigrateError> {
        self.set_forwarding(Some(self.forward.clone())).map_err(MigrateError::Forwarding)?;
        let job = self.clone();
        let started = self.save_checkpoint().map_err(MigrateError::Progress).and_then(|()| {
            std::thread::Builder::new()
                .name(format!("nbdvirt-migrate-{}", self.spec.volume))
                .spawn(move || job.run())
                .map_err(MigrateError::Spawn)
        });
        let handle = match started {
            Ok(handle) => handle,
            Err(e) => {
                self.forward.disable();
                self.detach_forwarding();
                return Err(e);
            }
        };
        *lock(&self.thread) = Some(handle);
        tracing::info!(volume = %self.spec.volume, dest = %self.spec.dest, dest_offset = self.spec.dest_offset, range = ?self.spec.range, "migration started");
        Ok(())
    }

    pub fn abort(&self) {
        self.abort.store(true, Ordering::SeqCst);
        self.forward.disable();
    }

    /// Stops copying, keeps the job `running` with a durable checkpoint;
    /// the next start of the daemon resumes it.
    pub fn suspend(&self) {
        self.suspend.store(true, Ordering::SeqCst);
        self.join();
    }

    /// Waits for the copier thread to end.
    pub fn join(&self) {
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
    }

    pub fn status(&self) -> MigrationStatus {
        let s = lock(&self.status);
        let copied = self.copied_bytes.load(Ordering::Relaxed);
        let elapsed = s.began.elapsed().as_secs_f64().max(0.001);
        let mut status = status_of(&self.spec, s.state, s.reason.clone(), copied, s.started_at, s.finished_at, s.generation);
        status.data_bytes = self.data_bytes.load(Ordering::Relaxed);
        status.throughput = (copied.saturating_sub(s.resumed_bytes) as f64 / elapsed) as u64;
        status
    }

    fn checkpoint(&self) -> Checkpoint {
        let s = lock(&self.status);
        Checkpoint::new(
            self.spec.clone(),
            s.state,
            s.reason.clone(),
            &self.forward.states().iter().map(|c| *c == ChunkState::Copied).collect::<Vec<_>>(),
            self.copied_bytes.load(Ordering::Relaxed),
            s.started_at,
            s.finished_at,
            s.generation,
        )
    }

    fn save_checkpoint(&self) -> std::io::Result<()> {
        self.checkpoint().save(&self.state_dir)
    }

    /// Destination durable first, then the progress that relies on it.
    fn durable_checkpoint(&self) -> Result<(), MigrateError> {
        self.forward.dest().flush().map_err(MigrateError::destination_sync)?;
        self.save_checkpoint().map_err(MigrateError::Progress)
    }

    fn finish(&self, state: MigrationState, reason: Option<String>) {
        {
            let mut s = lock(&self.status);
            s.state = state;
            s.reason = reason.clone();
            s.finished_at = Some(now_secs());
        }
        if state != MigrationState::Completed {
            self.forward.disable();
            self.detach_forwarding();
        }
        if let Err(e) = self.save_checkpoint() {
            tracing::error!(volume = %self.spec.volume, error = %e, "persisting the final migration state failed");
        }
        match state {
            MigrationState::Completed => tracing::info!(volume = %self.spec.volume, "migration completed"),
            MigrationState::Aborted => tracing::warn!(volume = %self.spec.volume, "migration aborted; mapping stays on the source"),
            _ => tracing::error!(volume = %self.spec.volume, reason = ?reason, "migration failed; mapping stays on the source"),
        }
    }
}

use crate::sync::lock;

/// Read persisted jobs (`STATE_DIR/migrations/*.json`).
pub fn load_checkpoints(state: &StateDir) -> Result<Vec<Checkpoint>, PersistError> {
    Ok(state.read_json_dir::<Checkpoint>(Path::new("migrations"))?.into_iter().map(|(_, c)| c).collect())
}
