//! Live migration of a volume range onto another store while the volume
//! is in use (like pvmove / drive-mirror), expressed on the mirror
//! machinery:
//!
//! 1. `start`: a pause–drain–swap adds a mirror leg on the destination to
//!    every extent of the range (`map::add_leg`), resyncing; every write
//!    from then on goes to source and destination before it is answered;
//! 2. a resync job (`crate::mirror`) copies the regions the leg lacks,
//!    only allocated data (holes are punched), rate-limited and at low
//!    priority, flushing the destination before each durable checkpoint of
//!    its stale map, so a restart resumes where it was;
//! 3. the job (`watch.rs`) follows the leg: once in sync, the cutover
//!    (`cutover.rs`) is a pause–drain–swap of the range onto the
//!    destination alone, after a final flush, persisted as a generation;
//! 4. abort or a destination error drops the leg again by a swap: the
//!    source, which had every write, is the mapping.
//!
//! The job's own record (`migrations/VOLUME.json`) keeps what `migrate
//! status` shows and whether the job still runs.

mod checkpoint;
mod cutover;
mod error;
mod tables;
mod watch;

pub use checkpoint::Checkpoint;
pub use error::{MigrateError, MigrateErrorKind};
pub use tables::ClusterTables;

use crate::api::{MigrationState, MigrationStatus};
use crate::backend::Backend;
use crate::map::Range;
use crate::mirror::ResyncJob;
use crate::persist::{now_secs, PersistError, StateDir};
use crate::volume::{SwapOptions, Volume};
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
/// How often the job's record is saved.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// How often the job looks at its leg.
const POLL: Duration = Duration::from_millis(50);

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
            node: None,
            recopies: 0,
        }
    }

pub struct MigrationJob {
    spec: MigrationSpec,
    volume: Arc<Volume>,
    /// The destination leg's resync, once started.
    resync: Mutex<Option<Arc<ResyncJob>>>,
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
    /// Set in cluster mode: the table changes go to every node.
    cluster: std::sync::OnceLock<Arc<dyn ClusterTables>>,
    /// Copies started over because a node left meanwhile (`watch.rs`).
    recopies: std::sync::atomic::AtomicU32,
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
    /// Prepares a job; `start` adds the destination leg (unless a resumed
    /// job's table has it already) and starts following it.
    pub fn new(
        spec: MigrationSpec,
        volume: Arc<Volume>,
        stores: HashMap<String, Arc<dyn Backend>>,
        state_dir: StateDir,
        swap: SwapOptions,
        copied_bytes: u64,
        started_at: u64,
    ) -> Result<Arc<MigrationJob>, MigrateError> {
        if !stores.contains_key(&spec.dest) {
            return Err(MigrateError::UnknownStore(spec.dest.clone()));
        }
        Ok(Arc::new(MigrationJob {
            spec,
            volume,
            resync: Mutex::new(None),
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
            cluster: std::sync::OnceLock::new(),
            recopies: Default::default(),
        }))
    }

    /// Makes the job change its volume's table on every node of a cluster
    /// (before `start`).
    pub fn in_cluster(&self, tables: Arc<dyn ClusterTables>) {
        let _ = self.cluster.set(tables);
    }

    pub fn spec(&self) -> &MigrationSpec {
        &self.spec
    }

    pub fn is_running(&self) -> bool {
        lock(&self.status).state == MigrationState::Running
    }

    /// Adds the destination leg (a pause–drain–swap of the range) and
    /// starts the thread that follows it. On failure nothing stays.
    pub fn start(self: &Arc<Self>) -> Result<(), MigrateError> {
        if let Some(cluster) = self.cluster.get() {
            cluster.claim(&self.spec.volume)?;
        }
        if let Err(e) = self.add_leg() {
            self.release();
            return Err(e);
        }
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
                self.drop_leg("the migration could not start");
                self.release();
                return Err(e);
            }
        };
        *lock(&self.thread) = Some(handle);
        tracing::info!(volume = %self.spec.volume, dest = %self.spec.dest, dest_offset = self.spec.dest_offset, range = ?self.spec.range, "migration started");
        Ok(())
    }

    pub fn abort(&self) {
        self.abort.store(true, Ordering::SeqCst);
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
        status.recopies = self.recopies.load(Ordering::Relaxed);
        status.throughput = (copied.saturating_sub(s.resumed_bytes) as f64 / elapsed) as u64;
        status
    }

    /// The job's record. Its progress is what the destination leg's
    /// stale map had at its last durable sync, so a restart never shows
    /// less than a saved record.
    fn checkpoint(&self) -> Checkpoint {
        let s = lock(&self.status);
        Checkpoint::new(
            self.spec.clone(),
            s.state,
            s.reason.clone(),
            self.durable_copied_bytes().unwrap_or_else(|| self.copied_bytes.load(Ordering::Relaxed)),
            s.started_at,
            s.finished_at,
            s.generation,
        )
    }

    /// Ends this node's claim on the migration (cluster mode).
    fn release(&self) {
        if let Some(cluster) = self.cluster.get() {
            cluster.release(&self.spec.volume);
        }
    }

    fn save_checkpoint(&self) -> std::io::Result<()> {
        self.checkpoint().save(&self.state_dir)
    }

    fn finish(&self, state: MigrationState, reason: Option<String>) {
        // The leg goes first: once status says failed or aborted, every
        // node serves the source alone.
        if state != MigrationState::Completed {
            self.drop_leg(&format!("migration {}", state.as_str()));
        }
        {
            let mut s = lock(&self.status);
            s.state = state;
            s.reason = reason.clone();
            s.finished_at = Some(now_secs());
        }
        if let Err(e) = self.save_checkpoint() {
            tracing::error!(volume = %self.spec.volume, error = %e, "persisting the final migration state failed");
        }
        self.release();
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
