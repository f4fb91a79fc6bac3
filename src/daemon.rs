//! The running daemon: the server, the config it was started with, the
//! persisted state, and the operations the control plane offers (status,
//! reload, pause, resume). Everything that changes a running volume's
//! mapping goes through `Volume::swap` and is persisted before it is in
//! force.

use crate::config::{self, Config, OpenStore, VolumeConfig};
use crate::map::{MappingTable, Range};
use crate::migrate::{self, Checkpoint, JobStatus, MigrationJob, MigrationSpec};
use crate::persist::{now_secs, GenerationCommit, StateDir, VolumeRecord};
use crate::server::{ConnLimits, Server, ServerOptions};
use crate::volume::{Catalog, HoldId, SwapOptions, SwapPhase, Volume};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::sync::lock;

/// A migration known to the daemon: running in this process, or finished
/// (known from its checkpoint).
enum JobEntry {
    Live(Arc<MigrationJob>),
    Finished(Checkpoint),
}

impl JobEntry {
    fn status(&self) -> JobStatus {
        match self {
            JobEntry::Live(j) => j.status(),
            JobEntry::Finished(c) => c.status(),
        }
    }
    fn running(&self) -> Option<&Arc<MigrationJob>> {
        match self {
            JobEntry::Live(j) if j.is_running() => Some(j),
            _ => None,
        }
    }
}

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

/// A manual pause of one volume, with its automatic end.
struct ManualPause {
    /// The volume object paused (not looked up by name later: the name may
    /// have been removed and re-added meanwhile).
    volume: Arc<Volume>,
    hold: HoldId,
    token: u64,
}

pub struct Daemon {
    config_path: Option<PathBuf>,
    config: Mutex<Config>,
    stores: Mutex<HashMap<String, OpenStore>>,
    server: Mutex<Server>,
    state: StateDir,
    /// Swap settings; `reload` refreshes them from the new config.
    swap: Mutex<SwapOptions>,
    manual: Mutex<HashMap<String, ManualPause>>,
    migrations: Mutex<BTreeMap<String, JobEntry>>,
    next_token: std::sync::atomic::AtomicU64,
    /// Serialises administrative operations (reload, pause, resume).
    admin: Mutex<()>,
}

/// How the table of a volume is chosen from config and persisted state.
enum Decision {
    /// Use this table as is (already persisted).
    Keep(MappingTable),
    /// Commit this table as a new generation.
    Commit(MappingTable, &'static str),
}

fn decide(v: &VolumeConfig, record: Option<&VolumeRecord>) -> Result<Decision, String> {
    let Some(rec) = record else { return Ok(Decision::Commit(v.table(1), "initial")) };
    if rec.config_extents == v.extents {
        // Config unchanged since it was last applied: the persisted mapping,
        // including run-time changes, stays in force.
        let table = MappingTable::new(rec.generation, rec.extents.clone()).map_err(|e| format!("persisted generation {}: {e}", rec.generation))?;
        return Ok(Decision::Keep(table));
    }
    if rec.has_runtime_changes() {
        return Err(format!(
            "the config changed, but the volume's mapping was also changed at run time (generation {}, {}); \
             applying the config would undo that. Make the config's extents match `nbdvirt status` and reload again",
            rec.generation, rec.reason
        ));
    }
    let table = MappingTable::new(rec.generation + 1, v.extents.clone()).map_err(|e| e.to_string())?;
    Ok(Decision::Commit(table, "config"))
}

#[derive(Debug, Clone, Serialize)]
pub struct ExtentStatus {
    pub start: u64,
    pub length: u64,
    pub backend: Option<String>,
    pub backend_offset: Option<u64>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub zero: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct RangeStatus {
    pub start: u64,
    pub length: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct VolumeStatus {
    pub name: String,
    pub description: String,
    pub size: u64,
    pub read_only: bool,
    pub generation: u64,
    pub state: String,
    pub extents: Vec<ExtentStatus>,
    pub held_ranges: Vec<RangeStatus>,
    pub in_flight: usize,
    pub held_requests: usize,
    pub connections: usize,
    pub swaps: u64,
    pub last_hold_us: Option<u64>,
    pub last_drain_us: Option<u64>,
    pub last_error: Option<String>,
    pub manual_pause: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct BackendStatus {
    pub name: String,
    pub kind: crate::backend::StoreKind,
    pub path: Option<PathBuf>,
    pub size: u64,
    pub shared: bool,
    pub rotational: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub config: Option<PathBuf>,
    pub listen: Vec<String>,
    pub volumes: Vec<VolumeStatus>,
    pub backends: Vec<BackendStatus>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ReloadReport {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub swapped: Vec<crate::volume::SwapReport>,
    pub unchanged: Vec<String>,
    pub backends_opened: Vec<String>,
    pub backends_closed: Vec<String>,
    pub disconnected: usize,
    /// Settings that only take effect after a restart.
    pub needs_restart: Vec<String>,
    pub errors: Vec<String>,
}

fn options(config: &Config) -> ServerOptions {
    let s = &config.server;
    ServerOptions {
        io_threads: s.io_threads,
        max_connections: s.max_connections,
        handshake_timeout: crate::defaults::HANDSHAKE_TIMEOUT,
        limits: ConnLimits {
            max_inflight_bytes: s.max_inflight,
            max_inflight_requests: crate::defaults::MAX_INFLIGHT_REQUESTS,
            shutdown_grace: s.shutdown_grace,
            busy_poll: s.busy_poll,
        },
    }
}

fn swap_options(config: &Config, crash_at: Option<SwapPhase>) -> SwapOptions {
    SwapOptions {
        pause_timeout: config.server.pause_timeout,
        retries: config.server.pause_retries,
        backoff: crate::defaults::SWAP_BACKOFF,
        crash_at,
    }
}

impl Daemon {
    /// Opens the stores, resolves each volume's table against the persisted
    /// state, and binds the listeners (not yet accepting).
    pub fn start(config_path: Option<PathBuf>, config: Config, crash_at: Option<SwapPhase>) -> Result<Arc<Daemon>, String> {
        let state = StateDir::open(&config.server.state_dir).map_err(|e| format!("state_dir: {e}"))?;
        let stores = config::open_stores(&config, &HashMap::new()).map_err(|e| e.to_string())?;
        let handles = config::handles(&stores);
        let file = config.file_name();
        let mut tables = Vec::new();
        let mut pending: Vec<(VolumeRecord, bool)> = Vec::new();
        for v in &config.volumes {
            let record = state.load(&v.name).map_err(|e| e.to_string())?;
            let (table, commit) = match decide(v, record.as_ref()) {
                Ok(Decision::Keep(t)) => {
                    // A crash between commit and archive leaves the current
                    // generation out of the history; put it there.
                    if let Some(rec) = &record {
                        if !state.history(&v.name).map_err(|e| e.to_string())?.contains(&rec.generation) {
                            state.archive(rec).map_err(|e| e.to_string())?;
                        }
                    }
                    (t, None)
                }
                Ok(Decision::Commit(t, reason)) => (t, Some(reason)),
                Err(why) => {
                    // Never silently revert run-time changes: serve the
                    // persisted mapping and say so.
                    let rec = record.as_ref().expect("divergence needs a record");
                    tracing::warn!(volume = %v.name, "{why}; serving persisted generation {}", rec.generation);
                    (MappingTable::new(rec.generation, rec.extents.clone()).map_err(|e| e.to_string())?, None)
                }
            };
            if let Some(reason) = commit {
                let rec = VolumeRecord {
                    volume: v.name.clone(),
                    generation: table.generation(),
                    extents: table.extents().to_vec(),
                    config_extents: v.extents.clone(),
                    reason: reason.into(),
                    committed_at: now_secs(),
                };
                pending.push((rec, true));
            }
            tables.push(table);
        }
        config::validate_tables(&config, &tables).map_err(|e| e.to_string())?;
        let mut volumes = BTreeMap::new();
        for (v, table) in config.volumes.iter().zip(tables) {
            let volume = config::build_volume(&file, v, table, &handles).map_err(|e| e.to_string())?;
            volumes.insert(v.name.clone(), Arc::new(volume));
        }
        for (rec, _) in &pending {
            state.commit(rec).map_err(|e| format!("persisting volume '{}': {e}", rec.volume))?;
        }
        let default_export = config.server.default_export.clone().or_else(|| config.volumes.first().map(|v| v.name.clone()));
        let catalog = Catalog { stores: handles, volumes, default_export };
        // Resume interrupted migrations before anyone can connect.
        let swap = swap_options(&config, crash_at);
        let mut migrations = BTreeMap::new();
        for cp in migrate::load_checkpoints(&state).map_err(|e| e.to_string())? {
            let name = cp.spec.volume.clone();
            let entry = match (cp.state, catalog.volumes.get(&name)) {
                (migrate::JobState::Running, Some(volume)) => {
                    let chunks = cp.spec.range.len().div_ceil(cp.spec.chunk) as usize;
                    let resumed = MigrationJob::new(
                        cp.spec.clone(),
                        volume.clone(),
                        catalog.stores.clone(),
                        state.clone(),
                        swap.clone(),
                        &cp.copied(chunks),
                        cp.started_at,
                    )
                    .and_then(|job| job.start().map(|()| job));
                    match resumed {
                        Ok(job) => {
                            tracing::info!(volume = %name, copied_bytes = cp.copied_bytes, "resumed migration from its checkpoint");
                            JobEntry::Live(job)
                        }
                        // One job that cannot go on must not keep every volume down.
                        Err(e) => {
                            tracing::error!(volume = %name, error = %e, "cannot resume the migration; the volume stays on its source");
                            let mut cp = cp.clone();
                            cp.state = migrate::JobState::Failed;
                            cp.reason = Some(format!("cannot resume after restart: {e}"));
                            cp.finished_at = Some(now_secs());
                            if let Err(e) = state.write_json(&std::path::Path::new("migrations").join(format!("{name}.json")), &cp) {
                                tracing::warn!(volume = %name, error = %e, "persisting the failed migration failed");
                            }
                            JobEntry::Finished(cp)
                        }
                    }
                }
                _ => JobEntry::Finished(cp),
            };
            migrations.insert(name, entry);
        }
        let server = Server::bind(&config.server.listen, catalog, options(&config)).map_err(|e| e.to_string())?;
        Ok(Arc::new(Daemon {
            config_path,
            migrations: Mutex::new(migrations),
            swap: Mutex::new(swap),
            config: Mutex::new(config),
            stores: Mutex::new(stores),
            server: Mutex::new(server),
            state,
            manual: Mutex::new(HashMap::new()),
            next_token: std::sync::atomic::AtomicU64::new(1),
            admin: Mutex::new(()),
        }))
    }

    pub fn start_serving(&self) {
        lock(&self.server).start();
    }

    pub fn endpoints(&self) -> Vec<crate::endpoint::Endpoint> {
        lock(&self.server).endpoints()
    }

    pub fn control_path(&self) -> PathBuf {
        lock(&self.config).server.control.clone()
    }

    pub fn catalog(&self) -> Arc<Catalog> {
        lock(&self.server).catalog()
    }

    /// Stops serving: copiers stop at a durable checkpoint (their jobs stay
    /// `running` and resume at the next start), clients drain, stores flush.
    pub fn shutdown(&self) -> std::io::Result<()> {
        // Requests parked behind an operator's pause must finish (or get
        // ESHUTDOWN) now, not when the pause would have timed out.
        for (name, p) in lock(&self.manual).drain() {
            tracing::info!(volume = %name, "shutdown ends the manual pause");
            p.volume.resume(p.hold);
        }
        let live: Vec<_> = lock(&self.migrations).values().filter_map(|e| e.running().cloned()).collect();
        for job in live {
            job.suspend();
        }
        lock(&self.server).shutdown()
    }

    fn volume(&self, name: &str) -> Result<Arc<Volume>, String> {
        self.catalog().volumes.get(name).cloned().ok_or_else(|| format!("no volume named '{name}'"))
    }

    pub fn status(&self) -> Status {
        let catalog = self.catalog();
        let server = lock(&self.server);
        let connections = server.connections();
        let listen = server.endpoints().iter().map(|e| e.to_string()).collect();
        drop(server);
        let manual = lock(&self.manual);
        let volumes = catalog
            .volumes
            .values()
            .map(|v| {
                let table = v.table();
                let gate = v.gate().status();
                let stats = v.stats();
                VolumeStatus {
                    name: v.name().into(),
                    description: v.spec().description.clone(),
                    size: table.size(),
                    read_only: v.spec().read_only,
                    generation: table.generation(),
                    state: gate.state.into(),
                    extents: table
                        .extents()
                        .iter()
                        .map(|e| {
                            let first = e.target.store_ranges(e.length).first().map(|(store, r)| (store.to_string(), r.start));
                            ExtentStatus {
                                start: e.start,
                                length: e.length,
                                backend: first.as_ref().map(|(store, _)| store.clone()),
                                backend_offset: first.as_ref().map(|(_, offset)| *offset),
                                zero: first.is_none(),
                            }
                        })
                        .collect(),
                    held_ranges: gate.held_ranges.iter().map(|r| RangeStatus { start: r.start, length: r.len() }).collect(),
                    in_flight: gate.in_flight,
                    held_requests: gate.held_requests,
                    connections: connections.iter().filter(|c| c.export.as_deref() == Some(v.name())).count(),
                    swaps: stats.swaps,
                    last_hold_us: stats.last_hold_us,
                    last_drain_us: stats.last_drain_us,
                    last_error: stats.last_error,
                    manual_pause: manual.contains_key(v.name()),
                }
            })
            .collect();
        let mut backends: Vec<BackendStatus> = lock(&self.stores)
            .values()
            .map(|s| {
                let info = s.handle.info();
                BackendStatus {
                    name: s.config.spec.name.clone(),
                    kind: info.kind,
                    path: info.path.clone(),
                    size: info.size,
                    shared: s.config.shared,
                    rotational: info.rotational,
                }
            })
            .collect();
        backends.sort_by(|a, b| a.name.cmp(&b.name));
        Status { config: self.config_path.clone(), listen, volumes, backends }
    }

    /// Re-reads the config file and applies it under live I/O.
    pub fn reload(&self, force: bool) -> Result<ReloadReport, String> {
        let _admin = lock(&self.admin);
        let path = self.config_path.clone().ok_or("the server runs on the embedded default; there is no config file to reload")?;
        let new = Config::load(&path).map_err(|e| e.to_string())?;
        let old = lock(&self.config).clone();
        let file = new.file_name();
        let catalog = self.catalog();
        let mut report = ReloadReport::default();
        if new.server.listen != old.server.listen {
            report.needs_restart.push("server.listen".into());
        }
        if new.server.control != old.server.control {
            report.needs_restart.push("server.control".into());
        }
        if new.server.state_dir != old.server.state_dir {
            report.needs_restart.push("server.state_dir".into());
        }
        if new.server.io_threads != old.server.io_threads
            || new.server.max_inflight != old.server.max_inflight
            || new.server.busy_poll != old.server.busy_poll
        {
            report.needs_restart.push("server.io_threads/max_inflight/busy_poll".into());
        }
        // Stage everything before changing anything.
        let existing = lock(&self.stores).clone();
        let stores = config::open_stores(&new, &existing).map_err(|e| e.to_string())?;
        let handles = config::handles(&stores);
        enum Plan {
            Keep(Arc<Volume>),
            Swap(Arc<Volume>, MappingTable),
            Add(Arc<Volume>, MappingTable),
        }
        let mut plans = Vec::new();
        let mut tables = Vec::new();
        for v in &new.volumes {
            let record = self.state.load(&v.name).map_err(|e| e.to_string())?;
            match catalog.volumes.get(&v.name) {
                Some(volume) => {
                    let spec = volume.spec();
                    if spec.read_only != v.read_only || spec.block_size != v.block_size || spec.description != v.description {
                        return Err(format!(
                            "{file}:{}: volume '{}': changing read_only, block_size or description of a live volume is not supported; remove it, reload, add it back (or restart)",
                            v.line, v.name
                        ));
                    }
                    let current = volume.table();
                    let decision = decide(v, record.as_ref()).map_err(|why| format!("{file}:{}: volume '{}': {why}", v.line, v.name))?;
                    match decision {
                        Decision::Keep(t) if t.extents() == current.extents() => {
                            tables.push(current);
                            plans.push(Plan::Keep(volume.clone()));
                        }
                        Decision::Keep(t) | Decision::Commit(t, _) => {
                            if lock(&self.migrations).get(&v.name).and_then(JobEntry::running).is_some() {
                                return Err(format!(
                                    "{file}:{}: volume '{}' is being migrated; its mapping cannot change until the migration ends (`nbdvirt migrate abort {}` or wait)",
                                    v.line, v.name, v.name
                                ));
                            }
                            let t = t.with_generation(current.generation() + 1);
                            tables.push(t.clone());
                            plans.push(Plan::Swap(volume.clone(), t));
                        }
                    }
                }
                None => {
                    let table = match decide(v, record.as_ref()) {
                        Ok(Decision::Keep(t)) => t,
                        Ok(Decision::Commit(t, _)) => t,
                        Err(why) => return Err(format!("{file}:{}: volume '{}': {why}", v.line, v.name)),
                    };
                    let volume = Arc::new(config::build_volume(&file, v, table.clone(), &handles).map_err(|e| e.to_string())?);
                    tables.push(table.clone());
                    plans.push(Plan::Add(volume, table));
                }
            }
        }
        config::validate_tables(&new, &tables).map_err(|e| e.to_string())?;
        // Destinations of running migrations are taken too.
        for entry in lock(&self.migrations).values() {
            let Some(job) = entry.running() else { continue };
            let s = job.spec();
            let dest = Range::new(s.dest_offset, s.range.len());
            for (v, t) in new.volumes.iter().zip(&tables) {
                if v.name == s.volume {
                    continue;
                }
                for e in t.extents() {
                    for (store, r) in e.target.store_ranges(e.length) {
                        if store == s.dest && r.overlaps(&dest) {
                            return Err(format!(
                                "{file}:{}: volume '{}': backend '{store}' range {}+{} is the destination of the running migration of volume '{}' ({}+{})",
                                v.line, v.name, r.start, r.len(), s.volume, s.dest_offset, s.range.len()
                            ));
                        }
                    }
                }
            }
        }
        let removed: Vec<String> = catalog.volumes.keys().filter(|n| !new.volumes.iter().any(|v| &v.name == *n)).cloned().collect();
        let connections = lock(&self.server).connections();
        for name in &removed {
            let n = connections.iter().filter(|c| c.export.as_deref() == Some(name.as_str())).count();
            if n > 0 && !force {
                return Err(format!("volume '{name}' is removed from the config but has {n} client connection(s); disconnect them or reload with --force"));
            }
        }
        // Translations for the swaps, checked against the stores now.
        let mut staged = Vec::new();
        for plan in &plans {
            if let Plan::Swap(volume, table) = plan {
                let v = new.volumes.iter().find(|v| v.name == volume.name()).expect("planned from config");
                staged.push((volume.clone(), v, config::build_translation(&file, v, table.clone(), &handles).map_err(|e| e.to_string())?));
            }
        }
        // The new pause settings apply to this reload's swaps already.
        let swap = {
            let mut opts = lock(&self.swap);
            let crash_at = opts.crash_at;
            *opts = swap_options(&new, crash_at);
            opts.clone()
        };
        // Apply: swaps (each atomic and persisted), then the new catalog.
        for (volume, v, translation) in staged {
            let mut commit = GenerationCommit::new(&self.state, volume.name(), v.extents.clone(), "reload");
            match volume.swap(translation, &swap, &mut commit) {
                Ok(r) => report.swapped.push(r),
                Err(e) => report.errors.push(e.to_string()),
            }
        }
        let mut volumes = BTreeMap::new();
        for plan in plans {
            match plan {
                Plan::Keep(v) => {
                    report.unchanged.push(v.name().into());
                    volumes.insert(v.name().to_string(), v);
                }
                Plan::Swap(v, _) => {
                    volumes.insert(v.name().to_string(), v);
                }
                Plan::Add(v, table) => {
                    let vc = new.volumes.iter().find(|c| c.name == v.name()).expect("planned from config");
                    if let Err(e) = self.state.commit(&VolumeRecord {
                        volume: v.name().into(),
                        generation: table.generation(),
                        extents: table.extents().to_vec(),
                        config_extents: vc.extents.clone(),
                        reason: "added".into(),
                        committed_at: now_secs(),
                    }) {
                        report.errors.push(format!("volume '{}': not added: persisting failed: {e}", v.name()));
                        continue;
                    }
                    report.added.push(v.name().into());
                    volumes.insert(v.name().to_string(), v);
                }
            }
        }
        // A failed swap leaves its volume on the old table: keep the stores
        // that table still uses, even if the new config dropped them.
        let mut stores = stores;
        let mut handles = handles;
        for v in volumes.values() {
            for e in v.table().extents() {
                for (store, _) in e.target.store_ranges(e.length) {
                    if let (false, Some(old)) = (stores.contains_key(store), existing.get(store)) {
                        report.errors.push(format!("backend '{store}' stays open: volume '{}' still uses it", v.name()));
                        handles.insert(store.to_string(), old.handle.clone());
                        stores.insert(store.to_string(), old.clone());
                    }
                }
            }
        }
        report.backends_opened = stores.keys().filter(|n| !existing.contains_key(*n)).cloned().collect();
        report.backends_closed = existing.keys().filter(|n| !stores.contains_key(*n)).cloned().collect();
        let default_export = new.server.default_export.clone().or_else(|| new.volumes.first().map(|v| v.name.clone()));
        let server = lock(&self.server);
        server.set_catalog(Catalog { stores: handles, volumes, default_export });
        for name in &removed {
            report.disconnected += server.disconnect_export(name);
            report.removed.push(name.clone());
            // A manual pause dies with its volume.
            if let Some(p) = lock(&self.manual).remove(name) {
                p.volume.resume(p.hold);
            }
        }
        drop(server);
        *lock(&self.stores) = stores;
        *lock(&self.config) = new;
        tracing::info!(?report, "reload applied");
        if report.errors.is_empty() {
            Ok(report)
        } else {
            Err(format!("reload partly failed: {}", report.errors.join("; ")))
        }
    }

    /// Holds `range` (the whole volume if `None`) of `volume` until `resume`
    /// or until `timeout` passes, whichever is first.
    pub fn pause(self: &Arc<Self>, volume: &str, range: Option<Range>, timeout: Duration) -> Result<String, String> {
        let _admin = lock(&self.admin);
        let v = self.volume(volume)?;
        if lock(&self.manual).contains_key(volume) {
            return Err(format!("volume '{volume}' is already paused"));
        }
        if let Some(r) = range {
            if r.is_empty() || r.end > v.size() {
                return Err(format!("range {}+{} is not inside volume '{volume}' ({} bytes)", r.start, r.len(), v.size()));
            }
        }
        let drain_timeout = lock(&self.config).server.pause_timeout;
        let hold = v.pause(range.into_iter().collect(), drain_timeout).map_err(|e| e.to_string())?;
        let token = self.next_token.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        lock(&self.manual).insert(volume.to_string(), ManualPause { volume: v.clone(), hold, token });
        let me = Arc::downgrade(self);
        let name = volume.to_string();
        std::thread::spawn(move || {
            std::thread::sleep(timeout);
            if let Some(d) = me.upgrade() {
                let mut manual = lock(&d.manual);
                if manual.get(&name).is_some_and(|p| p.token == token) {
                    let p = manual.remove(&name).expect("checked");
                    drop(manual);
                    p.volume.resume(p.hold);
                    tracing::warn!(volume = %name, ?timeout, "manual pause timed out; resumed");
                }
            }
        });
        tracing::info!(volume, ?range, ?timeout, "paused by operator");
        Ok(format!("volume '{volume}' paused (automatic resume after {timeout:?})"))
    }

    pub fn resume(&self, volume: &str) -> Result<String, String> {
        let _admin = lock(&self.admin);
        self.volume(volume)?;
        let p = lock(&self.manual).remove(volume).ok_or_else(|| format!("volume '{volume}' is not paused"))?;
        p.volume.resume(p.hold);
        tracing::info!(volume, "resumed by operator");
        Ok(format!("volume '{volume}' resumed"))
    }

    /// Starts moving (a range of) a volume onto another store.
    pub fn migrate_start(&self, req: MigrateRequest) -> Result<JobStatus, String> {
        let _admin = lock(&self.admin);
        let catalog = self.catalog();
        let volume = self.volume(&req.volume)?;
        let name = req.volume.clone();
        if lock(&self.migrations).get(&name).and_then(JobEntry::running).is_some() {
            return Err(format!("volume '{name}' is already being migrated"));
        }
        if lock(&self.manual).contains_key(&name) {
            return Err(format!("volume '{name}' is paused; resume it first"));
        }
        let dest = catalog.stores.get(&req.to).ok_or_else(|| format!("no backend named '{}'", req.to))?;
        let block = volume.spec().block_size as u64;
        let range = req.range.unwrap_or(Range::new(0, volume.size()));
        if range.is_empty() || range.end > volume.size() {
            return Err(format!("range {}+{} is not inside volume '{name}' ({} bytes)", range.start, range.len(), volume.size()));
        }
        if range.start % block != 0 || range.len() % block != 0 {
            return Err(format!("range {}+{} is not aligned to the volume's block size {block}", range.start, range.len()));
        }
        let chunk = req.chunk.unwrap_or(migrate::DEFAULT_CHUNK);
        if chunk == 0 || chunk % block != 0 {
            return Err(format!("chunk {chunk} must be a positive multiple of the block size {block}"));
        }
        // Every range of the destination store in use: volume mappings and
        // destinations of running migrations.
        let mut used: Vec<Range> = Vec::new();
        for v in catalog.volumes.values() {
            for e in v.table().extents() {
                for (store, r) in e.target.store_ranges(e.length) {
                    if catalog.stores.get(store).is_some_and(|s| Arc::ptr_eq(s, dest)) {
                        used.push(r);
                    }
                }
            }
        }
        for entry in lock(&self.migrations).values() {
            if let Some(job) = entry.running() {
                if catalog.stores.get(&job.spec().dest).is_some_and(|s| Arc::ptr_eq(s, dest)) {
                    used.push(Range::new(job.spec().dest_offset, job.spec().range.len()));
                }
            }
        }
        used.sort_by_key(|r| r.start);
        let size = dest.size();
        let dest_offset = match req.to_offset {
            Some(off) => {
                let want = Range::new(off, range.len());
                if off % block != 0 {
                    return Err(format!("destination offset {off} is not aligned to the block size {block}"));
                }
                if want.end > size {
                    return Err(format!("destination '{}' is too small: {}+{} ends past its {size} bytes", req.to, off, range.len()));
                }
                if let Some(u) = used.iter().find(|u| u.overlaps(&want)) {
                    return Err(format!("destination '{}' range {}+{} is in use ({}+{} is mapped)", req.to, off, range.len(), u.start, u.len()));
                }
                off
            }
            None => {
                let mut candidate = 0u64;
                for u in &used {
                    if u.start >= candidate + range.len() {
                        break;
                    }
                    candidate = candidate.max(u.end.div_ceil(block) * block);
                }
                if candidate + range.len() > size {
                    return Err(format!("destination '{}' has no free range of {} bytes ({size} bytes, in use: {})", req.to, range.len(), used.len()));
                }
                candidate
            }
        };
        let spec = MigrationSpec {
            volume: name.clone(),
            range,
            dest: req.to.clone(),
            dest_offset,
            chunk,
            rate: req.rate.unwrap_or(migrate::DEFAULT_RATE),
            discard_source: req.discard_source,
        };
        let swap = lock(&self.swap).clone();
        let job = MigrationJob::new(spec, volume, catalog.stores.clone(), self.state.clone(), swap, &[], now_secs()).map_err(|e| e.to_string())?;
        job.start().map_err(|e| e.to_string())?;
        let status = job.status();
        lock(&self.migrations).insert(name, JobEntry::Live(job));
        Ok(status)
    }

    pub fn migrate_status(&self, volume: Option<&str>) -> Result<Vec<JobStatus>, String> {
        let jobs = lock(&self.migrations);
        if let Some(v) = volume {
            return jobs.get(v).map(|e| vec![e.status()]).ok_or_else(|| format!("no migration of volume '{v}'"));
        }
        Ok(jobs.values().map(JobEntry::status).collect())
    }

    pub fn migrate_abort(&self, volume: &str) -> Result<JobStatus, String> {
        let job = lock(&self.migrations).get(volume).and_then(JobEntry::running).cloned();
        let job = job.ok_or_else(|| format!("no running migration of volume '{volume}'"))?;
        job.abort();
        job.join();
        Ok(job.status())
    }

    /// Archived generations of a volume, for operators.
    pub fn history(&self, volume: &str) -> Result<Vec<VolumeRecord>, String> {
        let gens = self.state.history(volume).map_err(|e| e.to_string())?;
        gens.into_iter().map(|g| self.state.load_generation(volume, g).map_err(|e| e.to_string())).collect()
    }
}
