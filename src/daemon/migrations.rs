//! The migration registry: jobs running in this process and finished ones
//! (known from their checkpoints), and the `migrate_*` operations.

use super::{Daemon, DaemonError};
use crate::map::Range;
use crate::api::{MigrationState, MigrationStatus};
use crate::migrate::{self, Checkpoint, ClusterTables, MigrationJob, MigrationSpec};
use crate::persist::{now_secs, StateDir};
use crate::sync::lock;
use crate::volume::{Catalog, SwapOptions};
use std::collections::BTreeMap;
use std::sync::Arc;

/// A migration known to the daemon.
pub enum JobEntry {
    Live(Arc<MigrationJob>),
    Finished(Checkpoint),
}

impl JobEntry {
    pub fn status(&self) -> MigrationStatus {
        match self {
            JobEntry::Live(j) => j.status(),
            JobEntry::Finished(c) => c.status(),
        }
    }
    pub fn running(&self) -> Option<&Arc<MigrationJob>> {
        match self {
            JobEntry::Live(j) if j.is_running() => Some(j),
            _ => None,
        }
    }
}

/// Jobs by volume name.
pub type Registry = BTreeMap<String, JobEntry>;

/// Options of `migrate start`.
#[derive(Debug, Clone, Default)]
pub struct MigrateRequest {
    pub volume: String,
    pub to: String,
    pub to_offset: Option<u64>,
    pub range: Option<Range>,
    pub rate: Option<u64>,
    pub chunk: Option<u64>,
    pub discard_source: bool,
}

/// Resumes the migrations interrupted by a stop, before anyone connects
/// (in a cluster, with `cluster`, whose barriers change their tables).
/// One job that cannot go on must not keep every volume down: it is marked
/// failed and its volume stays on its source.
pub fn resume_all(state: &StateDir, catalog: &Catalog, swap: &SwapOptions, cluster: Option<Arc<dyn ClusterTables>>) -> Result<Registry, DaemonError> {
    let mut registry = Registry::new();
    for cp in migrate::load_checkpoints(state)? {
        let name = cp.spec.volume.clone();
        let entry = match (cp.state, catalog.volumes.get(&name)) {
            (MigrationState::Running, Some(volume)) => {
                let resumed = MigrationJob::new(cp.spec.clone(), volume.clone(), catalog.stores.clone(), state.clone(), swap.clone(), cp.copied_bytes, cp.started_at)
                    .and_then(|job| {
                        if let Some(c) = &cluster {
                            job.in_cluster(c.clone());
                        }
                        job.start().map(|()| job)
                    });
                match resumed {
                    Ok(job) => {
                        tracing::info!(volume = %name, copied_bytes = cp.copied_bytes, "resumed migration from its checkpoint");
                        JobEntry::Live(job)
                    }
                    Err(e) => {
                        tracing::error!(volume = %name, error = %e, "cannot resume the migration; the volume stays on its source");
                        let mut cp = cp.clone();
                        cp.state = MigrationState::Failed;
                        cp.reason = Some(format!("cannot resume after restart: {e}"));
                        cp.finished_at = Some(now_secs());
                        if let Err(e) = cp.save(state) {
                            tracing::warn!(volume = %name, error = %e, "persisting the failed migration failed");
                        }
                        JobEntry::Finished(cp)
                    }
                }
            }
            _ => JobEntry::Finished(cp),
        };
        registry.insert(name, entry);
    }
    Ok(registry)
}

impl Daemon {
    pub(super) fn is_migrating(&self, volume: &str) -> bool {
        lock(&self.migrations).get(volume).and_then(JobEntry::running).is_some()
    }

    /// Specs of the running migrations.
    pub(super) fn running_migrations(&self) -> Vec<MigrationSpec> {
        lock(&self.migrations).values().filter_map(|e| e.running().map(|j| j.spec().clone())).collect()
    }

    /// Starts moving (a range of) a volume onto another store.
    /// In a cluster every node writes the destination (the leg is in the
    /// committed table) and this node copies.
    pub fn migrate_start(&self, req: MigrateRequest) -> Result<MigrationStatus, DaemonError> {
        let _admin = lock(&self.admin);
        let catalog = self.catalog();
        let volume = self.volume(&req.volume)?;
        let name = req.volume.clone();
        self.not_pool_volume(&name)?;
        if self.is_migrating(&name) {
            return Err(DaemonError::Migrating(name));
        }
        if self.pauses.contains(&name) {
            return Err(DaemonError::Paused(name));
        }
        if !catalog.stores.contains_key(&req.to) {
            return Err(DaemonError::NoBackend(req.to.clone()));
        }
        if let Some(spec) = self.takeover_spec(&volume, &req)? {
            return self.run_migration(spec, volume);
        }
        let (range, block) = super::mirror_ops::range_of(&volume, req.range)?;
        let chunk = req.chunk.unwrap_or(migrate::DEFAULT_CHUNK);
        if chunk == 0 || !chunk.is_multiple_of(block) {
            return Err(DaemonError::BadChunk { chunk, block });
        }
        let dest_offset = self.place_on(&req.to, req.to_offset, range.len(), block)?;
        let spec = MigrationSpec {
            volume: name.clone(),
            range,
            dest: req.to.clone(),
            dest_offset,
            chunk,
            rate: req.rate.unwrap_or(migrate::DEFAULT_RATE),
            discard_source: req.discard_source,
        };
        self.run_migration(spec, volume)
    }

    /// Starts the job of `spec` (its leg added, unless the table has it).
    fn run_migration(&self, spec: MigrationSpec, volume: Arc<crate::volume::Volume>) -> Result<MigrationStatus, DaemonError> {
        let name = spec.volume.clone();
        self.reaches_migration(&volume, &spec)?;
        // A resync this node runs of that leg (started after a restart) is
        // the job's to do now.
        self.mirrors.stop_job(&name, &spec.dest);
        let catalog = self.catalog();
        let swap = lock(&self.swap).clone();
        let job = MigrationJob::new(spec, volume, catalog.stores.clone(), self.state.clone(), swap, 0, now_secs())?;
        if let Some(node) = self.cluster_node.get() {
            job.in_cluster(node.clone());
        }
        job.start()?;
        let mut status = job.status();
        status.node = self.node_id();
        lock(&self.migrations).insert(name, JobEntry::Live(job));
        Ok(status)
    }

    /// The jobs of this node (in a cluster, stamped with its id).
    pub(super) fn migrations_here(&self, volume: Option<&str>) -> Vec<MigrationStatus> {
        let jobs = lock(&self.migrations);
        let list = jobs.iter().filter(|(v, _)| volume.is_none_or(|want| want == v.as_str())).map(|(_, e)| e.status()).collect();
        super::cluster_migrations::stamped(list, self.node_id())
    }

    /// This node's jobs and, in a cluster, the other nodes': per volume
    /// the running one, else the one started last.
    pub fn migrate_status(&self, volume: Option<&str>) -> Result<Vec<MigrationStatus>, DaemonError> {
        let mut by_volume: BTreeMap<String, MigrationStatus> = BTreeMap::new();
        for m in self.migrations_here(volume).into_iter().chain(self.migrations_elsewhere(volume)) {
            let rank = |m: &MigrationStatus| (m.state == MigrationState::Running, m.started_at);
            if by_volume.get(&m.volume).is_none_or(|kept| rank(&m) > rank(kept)) {
                by_volume.insert(m.volume.clone(), m);
            }
        }
        let list: Vec<MigrationStatus> = by_volume.into_values().collect();
        match volume {
            Some(v) if list.is_empty() => Err(DaemonError::NoMigration(v.into())),
            _ => Ok(list),
        }
    }

    /// Aborts the job here, or (cluster) on the node that copies.
    pub fn migrate_abort(&self, volume: &str) -> Result<MigrationStatus, DaemonError> {
        let job = lock(&self.migrations).get(volume).and_then(JobEntry::running).cloned();
        let Some(job) = job else { return self.abort_elsewhere(volume) };
        job.abort();
        job.join();
        let mut status = job.status();
        status.node = self.node_id();
        Ok(status)
    }

    /// `migrate abort` sent by another node: this node's job only.
    pub(super) fn migrate_abort_here(&self, volume: &str) -> Result<MigrationStatus, DaemonError> {
        if lock(&self.migrations).get(volume).and_then(JobEntry::running).is_none() {
            return Err(DaemonError::NoRunningMigration(volume.into()));
        }
        self.migrate_abort(volume)
    }
}
