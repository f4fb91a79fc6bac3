//! Live migration of a volume range onto another store, chunk by chunk,
//! while the volume is in use (like pvmove / drive-mirror):
//!
//! 1. a write [`Mirror`] is attached to the volume (after draining the range);
//! 2. a copier thread copies chunk after chunk, only allocated data (holes
//!    are punched on the destination), rate-limited and at low CPU/IO
//!    priority; writes to copied chunks are mirrored by the volume layer;
//! 3. every second, the destination is fdatasync'ed and *then* the progress
//!    table is persisted, so a restart resumes from a checkpoint whose
//!    chunks really are on the destination;
//! 4. cutover is a pause–drain–swap of the range onto the destination, after
//!    a final fdatasync, persisted as a new generation;
//! 5. abort or a destination error detaches the mirror: the mapping stays
//!    on the source, which always had every write.

mod checkpoint;
mod rate;

pub use checkpoint::{Checkpoint, JobState};

use crate::backend::{AlignedBuf, Backend, ZeroMode};
use crate::map::{remap, MappingTable, Piece, Range};
use crate::persist::{now_secs, StateDir, VolumeRecord};
use crate::volume::{ChunkState, Commit, Mirror, SwapOptions, Translation, Volume};
use rate::RateLimiter;
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

/// Status of one job, for `migrate status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct JobStatus {
    pub volume: String,
    pub state: JobState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub copied_bytes: u64,
    pub total_bytes: u64,
    /// Data bytes actually read and written (holes are skipped).
    pub data_bytes: u64,
    pub dest: String,
    pub dest_offset: u64,
    pub range_start: u64,
    pub range_length: u64,
    pub chunk: u64,
    pub rate: u64,
    pub started_at: u64,
    pub finished_at: Option<u64>,
    /// Copy throughput since this process started the job, bytes/s.
    pub throughput: u64,
    pub generation: Option<u64>,
}

impl JobStatus {
    fn new(
        spec: &MigrationSpec,
        state: JobState,
        reason: Option<String>,
        copied_bytes: u64,
        started_at: u64,
        finished_at: Option<u64>,
        generation: Option<u64>,
    ) -> JobStatus {
        JobStatus {
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
}

pub struct MigrationJob {
    spec: MigrationSpec,
    volume: Arc<Volume>,
    mirror: Arc<Mirror>,
    stores: HashMap<String, Arc<dyn Backend>>,
    state_dir: StateDir,
    swap: SwapOptions,
    abort: AtomicBool,
    /// Stop copying but stay `running` (daemon shutdown): resumed at restart.
    suspend: AtomicBool,
    status: Mutex<JobStatusInner>,
    copied_bytes: AtomicU64,
    data_bytes: AtomicU64,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

struct JobStatusInner {
    state: JobState,
    reason: Option<String>,
    started_at: u64,
    finished_at: Option<u64>,
    began: Instant,
    resumed_bytes: u64,
    generation: Option<u64>,
}

fn checkpoint_path(volume: &str) -> PathBuf {
    Path::new("migrations").join(format!("{volume}.json"))
}

impl MigrationJob {
    /// Prepares a job: the mirror is built (from `copied`, when resuming)
    /// but not attached; `start` attaches it and starts copying.
    pub fn new(
        spec: MigrationSpec,
        volume: Arc<Volume>,
        stores: HashMap<String, Arc<dyn Backend>>,
        state_dir: StateDir,
        swap: SwapOptions,
        copied: &[bool],
        started_at: u64,
    ) -> Result<Arc<MigrationJob>, String> {
        let dest = stores.get(&spec.dest).cloned().ok_or_else(|| format!("no backend named '{}'", spec.dest))?;
        let mirror = Mirror::new(spec.range, spec.chunk, dest, spec.dest_offset, copied);
        let copied_bytes: u64 = (0..mirror.chunks()).filter(|i| copied.get(*i).copied().unwrap_or(false)).map(|i| mirror.chunk_range(i).len()).sum();
        Ok(Arc::new(MigrationJob {
            spec,
            volume,
            mirror,
            stores,
            state_dir,
            swap,
            abort: AtomicBool::new(false),
            suspend: AtomicBool::new(false),
            status: Mutex::new(JobStatusInner {
                state: JobState::Running,
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
        lock(&self.status).state == JobState::Running
    }

    /// Attaches the mirror (`served`: the volume has clients, so drain
    /// first) and starts the copier thread.
    pub fn start(self: &Arc<Self>, served: bool) -> Result<(), String> {
        if served {
            self.volume.set_mirror(Some(self.mirror.clone()), self.swap.pause_timeout).map_err(|e| e.to_string())?;
        } else {
            self.volume.set_mirror_unserved(Some(self.mirror.clone()));
        }
        self.save_checkpoint().map_err(|e| format!("persisting migration progress: {e}"))?;
        let job = self.clone();
        let handle = std::thread::Builder::new()
            .name(format!("nbdvirt-migrate-{}", self.spec.volume))
            .spawn(move || job.run())
            .map_err(|e| e.to_string())?;
        *lock(&self.thread) = Some(handle);
        tracing::info!(volume = %self.spec.volume, dest = %self.spec.dest, dest_offset = self.spec.dest_offset, range = ?self.spec.range, "migration started");
        Ok(())
    }

    pub fn abort(&self) {
        self.abort.store(true, Ordering::SeqCst);
        self.mirror.disable();
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

    pub fn status(&self) -> JobStatus {
        let s = lock(&self.status);
        let copied = self.copied_bytes.load(Ordering::Relaxed);
        let elapsed = s.began.elapsed().as_secs_f64().max(0.001);
        let mut status = JobStatus::new(&self.spec, s.state, s.reason.clone(), copied, s.started_at, s.finished_at, s.generation);
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
            &self.mirror.states().iter().map(|c| *c == ChunkState::Copied).collect::<Vec<_>>(),
            self.copied_bytes.load(Ordering::Relaxed),
            s.started_at,
            s.finished_at,
            s.generation,
        )
    }

    fn save_checkpoint(&self) -> std::io::Result<()> {
        self.state_dir.write_json(&checkpoint_path(&self.spec.volume), &self.checkpoint())
    }

    /// Destination durable first, then the progress that relies on it.
    fn durable_checkpoint(&self) -> Result<(), String> {
        self.mirror.dest().flush().map_err(|e| format!("{}: syncing destination: {e}", crate::nbd::NbdError::from_io(&e).name()))?;
        self.save_checkpoint().map_err(|e| format!("persisting migration progress: {e}"))
    }

    fn finish(&self, state: JobState, reason: Option<String>) {
        {
            let mut s = lock(&self.status);
            s.state = state;
            s.reason = reason.clone();
            s.finished_at = Some(now_secs());
        }
        if state != JobState::Completed {
            self.mirror.disable();
            if let Err(e) = self.volume.set_mirror(None, self.swap.pause_timeout) {
                // A disabled mirror passes writes to the source only, so
                // leaving it attached is safe; detaching is tidiness.
                tracing::warn!(volume = %self.spec.volume, error = %e, "could not detach the disabled mirror");
            }
        }
        if let Err(e) = self.save_checkpoint() {
            tracing::error!(volume = %self.spec.volume, error = %e, "persisting the final migration state failed");
        }
        match state {
            JobState::Completed => tracing::info!(volume = %self.spec.volume, "migration completed"),
            JobState::Aborted => tracing::warn!(volume = %self.spec.volume, "migration aborted; mapping stays on the source"),
            _ => tracing::error!(volume = %self.spec.volume, reason = ?reason, "migration failed; mapping stays on the source"),
        }
    }

    fn run(self: Arc<Self>) {
        lower_priority();
        let mut limiter = RateLimiter::new(self.spec.rate);
        let mut known: Option<DataRun> = None;
        let mut buf = AlignedBuf::zeroed(COPY_IO as usize);
        let mut last_checkpoint = Instant::now();
        for i in 0..self.mirror.chunks() {
            if self.abort.load(Ordering::SeqCst) {
                return self.finish(JobState::Aborted, None);
            }
            if let Some(reason) = self.mirror.error() {
                return self.finish(JobState::Failed, Some(reason));
            }
            if self.suspend.load(Ordering::SeqCst) {
                if let Err(e) = self.durable_checkpoint() {
                    tracing::error!(volume = %self.spec.volume, error = %e, "final checkpoint before shutdown failed");
                }
                return;
            }
            // Sleep off the rate limit before taking the chunk, never while
            // it is marked copying (foreground writes to it wait then).
            limiter.wait_due();
            if !self.mirror.begin_copy(i) {
                continue; // copied already (resumed), or disabled: checked above next round
            }
            match self.copy_chunk(i, &mut limiter, &mut known, buf.as_mut_slice()) {
                Ok(()) => {
                    self.mirror.end_copy(i, true);
                    self.copied_bytes.fetch_add(self.mirror.chunk_range(i).len(), Ordering::Relaxed);
                }
                Err(_) if self.abort.load(Ordering::SeqCst) => {
                    self.mirror.end_copy(i, false);
                    return self.finish(JobState::Aborted, None);
                }
                Err(e) => {
                    self.mirror.end_copy(i, false);
                    self.mirror.copy_failed(&e);
                    let reason = self.mirror.error().unwrap_or_else(|| e.to_string());
                    return self.finish(JobState::Failed, Some(reason));
                }
            }
            if last_checkpoint.elapsed() >= CHECKPOINT_EVERY {
                if let Err(reason) = self.durable_checkpoint() {
                    return self.finish(JobState::Failed, Some(reason));
                }
                last_checkpoint = Instant::now();
            }
        }
        if self.abort.load(Ordering::SeqCst) {
            return self.finish(JobState::Aborted, None);
        }
        if let Some(reason) = self.mirror.error() {
            return self.finish(JobState::Failed, Some(reason));
        }
        if let Err(reason) = self.durable_checkpoint() {
            return self.finish(JobState::Failed, Some(reason));
        }
        match self.cutover() {
            Ok(generation) => {
                lock(&self.status).generation = Some(generation);
                self.finish(JobState::Completed, None);
            }
            Err(_) if self.abort.load(Ordering::SeqCst) => self.finish(JobState::Aborted, None),
            Err(reason) => self.finish(JobState::Failed, Some(reason)),
        }
    }

    /// Copies chunk `i`: data runs are read through the current translation
    /// (the source) and written to the destination; holes are punched there.
    ///
    /// The allocation map is asked once per data run, not per chunk: on
    /// tmpfs SEEK_HOLE scans to the end of the data, so asking per chunk
    /// made a copy quadratic in the volume size. `known` remembers where the
    /// last data run seen ends; only data is remembered (a hole is always
    /// re-checked, since a write may have filled it), and a region trimmed
    /// meanwhile is merely copied as zeros.
    fn copy_chunk(&self, i: usize, limiter: &mut RateLimiter, known: &mut Option<DataRun>, buf: &mut [u8]) -> std::io::Result<()> {
        let r = self.mirror.chunk_range(i);
        let t = self.volume.translation();
        let generation = t.table().generation();
        let dest = self.mirror.dest();
        let pieces: Vec<Piece> = t.table().pieces(r.start, r.len()).collect();
        let mut first_slice = true;
        for piece in pieces {
            let mut done = 0u64;
            while done < piece.length {
                let at = piece.target_offset + done;
                let cached = known.filter(|k| k.extent == piece.extent && k.generation == generation && at < k.until).map(|k| k.until - at);
                let (hole, len) = match cached {
                    Some(avail) => (false, avail.min(piece.length - done)),
                    None => {
                        // One run, asked up to the end of the extent.
                        let extent_end = t.table().extents()[piece.extent].end();
                        let probe = sub_piece(&piece, done, extent_end - (piece.volume_offset + done));
                        let run = t.block_status(&probe, 1)?.first().copied().filter(|r| r.length > 0);
                        let run = run.ok_or_else(|| std::io::Error::other("allocation map returned nothing"))?;
                        if !run.hole {
                            *known = Some(DataRun { extent: piece.extent, generation, until: at + run.length });
                        }
                        (run.hole, run.length.min(piece.length - done))
                    }
                };
                let part = sub_piece(&piece, done, len);
                let dest_off = self.mirror.dest_offset_of(part.volume_offset);
                if hole {
                    dest.write_zeroes(dest_off, part.length, ZeroMode { may_trim: true, fast_only: false }, false)?;
                } else {
                    // Copy in slices of at most COPY_IO: bounded memory, and
                    // abort/shutdown never wait behind one long rate-limit
                    // sleep for a whole big chunk. Only chunks bigger than
                    // COPY_IO (not the default) pace inside the chunk.
                    let mut off = 0u64;
                    while off < part.length {
                        if self.abort.load(Ordering::SeqCst) {
                            return Err(std::io::Error::new(std::io::ErrorKind::Interrupted, "aborted"));
                        }
                        let slice = sub_piece(&part, off, (part.length - off).min(COPY_IO));
                        if !first_slice {
                            limiter.wait_due();
                        }
                        first_slice = false;
                        let buf = &mut buf[..slice.length as usize];
                        t.read(&slice, buf)?;
                        dest.write_at(buf, dest_off + off, false)?;
                        limiter.pay(slice.length);
                        self.data_bytes.fetch_add(slice.length, Ordering::Relaxed);
                        off += slice.length;
                    }
                }
                done += len;
            }
        }
        Ok(())
    }

    /// Pause–drain–swap of the range onto the destination.
    fn cutover(&self) -> Result<u64, String> {
        let old = self.volume.translation();
        // Resumed after a crash between the cutover's commit and the final
        // checkpoint: the range already is on the destination.
        let done = old.table().pieces(self.spec.range.start, self.spec.range.len()).all(|p| {
            matches!(&old.table().extents()[p.extent].target, crate::map::Target::Store { store, .. } if *store == self.spec.dest)
                && p.target_offset == self.mirror.dest_offset_of(p.volume_offset)
        });
        if done {
            self.volume.set_mirror(None, self.swap.pause_timeout).map_err(|e| e.to_string())?;
            return Ok(old.table().generation());
        }
        let extents = remap(old.table().extents(), self.spec.range, &self.spec.dest, self.spec.dest_offset);
        let table = MappingTable::new(old.table().generation() + 1, extents).map_err(|e| e.to_string())?;
        let translation = Translation::new(table, &self.stores).map_err(|e| e.to_string())?;
        let record = self.state_dir.load(&self.spec.volume)?;
        let config_extents = record.map(|r| r.config_extents).unwrap_or_else(|| old.table().extents().to_vec());
        let mut commit = CutoverCommit {
            state: &self.state_dir,
            mirror: self.mirror.clone(),
            dest: self.mirror.dest().clone(),
            record: VolumeRecord {
                volume: self.spec.volume.clone(),
                generation: 0,
                extents: Vec::new(),
                config_extents,
                reason: format!("migration to {}", self.spec.dest),
                committed_at: 0,
            },
        };
        let report = self.volume.swap(translation, &self.swap, &mut commit).map_err(|e| format!("cutover: {e}"))?;
        if self.spec.discard_source {
            // Not through `old`: it carries the mirror, which would zero
            // the destination too.
            let plain = old.with_mirror(None);
            for piece in old.table().pieces(self.spec.range.start, self.spec.range.len()) {
                if let Err(e) = plain.trim(&piece, false) {
                    tracing::warn!(volume = %self.spec.volume, error = %e, "discarding the source range failed");
                }
            }
        }
        Ok(report.generation)
    }
}

/// The end (store offset within `extent` of table `generation`) of the last
/// data run the copier saw.
#[derive(Debug, Clone, Copy)]
struct DataRun {
    extent: usize,
    generation: u64,
    until: u64,
}

fn sub_piece(piece: &Piece, at: u64, length: u64) -> Piece {
    Piece {
        extent: piece.extent,
        request_offset: piece.request_offset + at,
        volume_offset: piece.volume_offset + at,
        length,
        target_offset: piece.target_offset + at,
    }
}

/// The cutover's commit: destination durable, then the new generation.
struct CutoverCommit<'a> {
    state: &'a StateDir,
    mirror: Arc<Mirror>,
    dest: Arc<dyn Backend>,
    record: VolumeRecord,
}

impl Commit for CutoverCommit<'_> {
    fn prepare(&mut self, table: &MappingTable) -> Result<(), String> {
        self.record.generation = table.generation();
        self.record.extents = table.extents().to_vec();
        self.record.committed_at = now_secs();
        self.state.prepare(&self.record).map_err(|e| e.to_string())
    }
    fn commit(&mut self, _table: &MappingTable) -> Result<(), String> {
        // Paused and drained: a mirror disabled by now (abort, destination
        // error) may have let writes reach the source only.
        if self.mirror.is_disabled() {
            return Err(self.mirror.error().unwrap_or_else(|| "aborted".into()));
        }
        // Only writes mirrored since the last checkpoint are left to sync.
        self.dest.flush().map_err(|e| format!("syncing destination: {e}"))?;
        self.state.commit_prepared(&self.record.volume).map_err(|e| e.to_string())
    }
    fn committed(&mut self, _table: &MappingTable) {
        if let Err(e) = self.state.archive(&self.record) {
            tracing::warn!(error = %e, "archiving the cutover generation failed");
        }
    }
}

use crate::sync::lock;

/// Foreground I/O keeps priority: the copier thread runs at nice 10 and
/// in the lowest best-effort I/O priority.
fn lower_priority() {
    // SAFETY: plain syscalls on the calling thread.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 10);
        const IOPRIO_WHO_PROCESS: libc::c_int = 1;
        const IOPRIO_CLASS_BE: libc::c_int = 2;
        libc::syscall(libc::SYS_ioprio_set, IOPRIO_WHO_PROCESS, tid as libc::c_int, (IOPRIO_CLASS_BE << 13) | 7);
    }
}

/// Read persisted jobs (`STATE_DIR/migrations/*.json`).
pub fn load_checkpoints(state: &StateDir) -> Result<Vec<Checkpoint>, String> {
    Ok(state.read_json_dir::<Checkpoint>(Path::new("migrations"))?.into_iter().map(|(_, c)| c).collect())
}
