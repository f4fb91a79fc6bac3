//! Opening what a checked configuration describes: the runtime assembly of
//! stores, translations, volumes and catalogs. (The config layer only parses
//! and validates; this is where its values meet the objects that serve.)

use crate::backend::{file_identity, open_backend, Backend, FaultSwitch, FaultyBackend};
use crate::config::{BackendConfig, Config, ConfigError, VolumeConfig};
use crate::map::{validate_stores, MapError, MappingTable, Range};
use crate::volume::{Catalog, Forwarder, Redundancy, Translation, Volume, VolumeSpec};
use std::path::Path;
use std::collections::HashMap;
use std::sync::Arc;

/// An open store and the configuration it was opened with.
#[derive(Debug, Clone)]
pub struct OpenStore {
    pub config: BackendConfig,
    /// The store wrapped in a `FaultyBackend` driven by `fault`.
    pub handle: Arc<dyn Backend>,
    /// Fault injection for drills (`nbdvirt fault`). Belongs to the handle:
    /// a reload that reuses the handle keeps it, and backend names sharing
    /// one file share it, because they are one store.
    pub fault: Arc<FaultSwitch>,
}

/// Opens every backend of `config`, reusing handles in `existing` (from a
/// running server) whose configuration is unchanged. Two backend names for
/// the same file share one handle, which both must allow with `shared = true`.
pub fn open_stores(config: &Config, existing: &HashMap<String, OpenStore>) -> Result<HashMap<String, OpenStore>, ConfigError> {
    let file = config.file_name();
    let mut out: HashMap<String, OpenStore> = HashMap::new();
    let mut by_identity: HashMap<(u64, u64), String> = HashMap::new();
    for store in existing.values() {
        if let Some(id) = store.config.spec.path.as_deref().and_then(file_identity) {
            by_identity.insert(id, store.config.spec.name.clone());
        }
    }
    for b in &config.backends {
        // A cluster node opens only the stores it reaches (`nodes`); it
        // forwards the extents on the others (`forwarding.rs`).
        if config.cluster.as_ref().is_some_and(|c| !b.reachable_from(&c.node)) {
            continue;
        }
        let at = |message: String| ConfigError {
            file: file.clone(),
            line: Some(b.line),
            field: Some(format!("backend '{}': path", b.spec.name)),
            message,
        };
        if let Some(old) = existing.get(&b.spec.name) {
            if old.config.spec != b.spec || old.config.shared != b.shared {
                return Err(at(format!(
                    "backend '{}' is open with different settings; give the new settings a new backend name, or restart",
                    b.spec.name
                )));
            }
            out.insert(b.spec.name.clone(), old.clone());
            continue;
        }
        let identity = b.spec.path.as_deref().and_then(file_identity);
        if let Some(first) = identity.and_then(|id| by_identity.get(&id)) {
            let first_store = out.get(first).or_else(|| existing.get(first));
            let Some(first_store) = first_store else {
                return Err(at(format!("same file as backend '{first}', which is being removed")));
            };
            if !(b.shared && first_store.config.shared) {
                return Err(at(format!("same file as backend '{first}'; declare both `shared = true` to map one file under two names")));
            }
            let (handle, fault) = (first_store.handle.clone(), first_store.fault.clone());
            out.insert(b.spec.name.clone(), OpenStore { config: b.clone(), handle, fault });
            continue;
        }
        // Every store is wrapped so a drill can be started without a
        // restart; while off the wrapper costs one relaxed atomic load.
        let fault = FaultSwitch::new();
        let handle = FaultyBackend::wrap(open_backend(&b.spec).map_err(|e| at(e.to_string()))?, fault.clone());
        if let Some(id) = b.spec.path.as_deref().and_then(file_identity) {
            by_identity.insert(id, b.spec.name.clone());
        }
        out.insert(b.spec.name.clone(), OpenStore { config: b.clone(), handle, fault });
    }
    Ok(out)
}

pub fn handles(stores: &HashMap<String, OpenStore>) -> HashMap<String, Arc<dyn Backend>> {
    stores.iter().map(|(n, s)| (n.clone(), s.handle.clone())).collect()
}

/// Builds the translation of `table` for volume `v`, checking that every
/// target lies inside its (open) store.
pub fn build_translation(
    file: &str,
    v: &VolumeConfig,
    table: MappingTable,
    stores: &HashMap<String, Arc<dyn Backend>>,
    redundancy: &Arc<Redundancy>,
    forward: Option<&dyn Forwarder>,
) -> Result<Translation, ConfigError> {
    let mut sizes: HashMap<String, u64> = stores.iter().map(|(n, s)| (n.clone(), s.size())).collect();
    if forward.is_some() {
        // Stores reached only elsewhere: the node serving them checks.
        for e in table.extents() {
            for (s, _) in e.target.store_ranges(e.length) {
                sizes.entry(s.to_string()).or_insert(u64::MAX);
            }
        }
    }
    validate_stores(&table, &sizes).map_err(|err| {
        let (index, lines, key) = match &err {
            MapError::OutsideStore { index, .. } => (*index, &v.extent_offset_lines, "backend_offset"),
            MapError::UnknownStore { index, .. } => (*index, &v.extent_lines, "backend"),
            _ => (0, &v.extent_lines, "backend"),
        };
        ConfigError {
            file: file.into(),
            line: lines.get(index).copied().or(Some(v.line)),
            field: Some(format!("volume '{}' extent {index}: {key}", v.name)),
            message: format!("generation {}: {err}", table.generation()),
        }
    })?;
    let translation = Translation::open_forwarding(table, stores, redundancy, forward).map_err(|e| ConfigError {
        file: file.into(),
        line: Some(v.line),
        field: Some(format!("volume '{}'", v.name)),
        message: e.to_string(),
    })?;
    if let Some(store) = translation.stores().iter().find(|s| v.block_size < s.info().min_io) {
        return Err(ConfigError {
            file: file.into(),
            line: Some(v.line),
            field: Some(format!("volume '{}': block_size", v.name)),
            message: format!("block_size {} is below the {}-byte I/O unit of a direct backend", v.block_size, store.info().min_io),
        });
    }
    Ok(translation)
}

/// The region of a volume's bitmaps: its mirror extents' (the config
/// checks they agree), else the default.
pub fn region_of(table: &MappingTable) -> u64 {
    table
        .extents()
        .iter()
        .find_map(|e| match &e.target {
            crate::map::TargetSpec::Mirror { region, .. } => Some(*region),
            _ => None,
        })
        .unwrap_or(crate::map::DEFAULT_REGION)
}

/// Opens the redundancy state (mirror legs, bitmaps) of volume `name`
/// under `state_dir`, or in memory without one.
pub fn open_redundancy(file: &str, name: &str, table: &MappingTable, state_dir: Option<&Path>) -> Result<Arc<Redundancy>, ConfigError> {
    match state_dir {
        Some(dir) => Redundancy::open(&redundancy_dir(dir, name), name, table.size(), region_of(table)).map_err(|e| ConfigError {
            file: file.into(),
            line: None,
            field: Some(format!("volume '{name}'")),
            message: format!("mirror state in {}: {e}", redundancy_dir(dir, name).display()),
        }),
        None => Ok(Redundancy::in_memory(name, table.size(), region_of(table))),
    }
}

/// Where volume `name` keeps its mirror state.
pub fn redundancy_dir(state_dir: &Path, name: &str) -> std::path::PathBuf {
    state_dir.join("mirror").join(name)
}

/// A new volume over `table`, its mirror state kept under `state_dir`.
pub fn build_volume(
    file: &str,
    v: &VolumeConfig,
    table: MappingTable,
    stores: &HashMap<String, Arc<dyn Backend>>,
    state_dir: Option<&Path>,
    forward: Option<&dyn Forwarder>,
) -> Result<Volume, ConfigError> {
    let redundancy = open_redundancy(file, &v.name, &table, state_dir)?;
    let translation = build_translation(file, v, table, stores, &redundancy, forward)?;
    let spec = VolumeSpec { name: v.name.clone(), description: v.description.clone(), read_only: v.read_only, block_size: v.block_size };
    Ok(Volume::new(spec, translation))
}

/// Opens every backend and builds every volume at generation 1 from the
/// config alone (used by `nbdvirt check --open`).
pub fn build_catalog(config: &Config) -> Result<Catalog, ConfigError> {
    let file = config.file_name();
    let stores = handles(&open_stores(config, &HashMap::new())?);
    // A cluster node's extents on stores it does not reach get a link that
    // connects only when used (here: never).
    let forward = config.cluster.as_ref().map(|_| super::forwarding::ForwardRoutes::new(&config.backends));
    let mut volumes = std::collections::BTreeMap::new();
    for v in &config.volumes {
        let forwarder = forward.as_ref().map(|f| f.for_volume(&v.name));
        volumes.insert(v.name.clone(), Arc::new(build_volume(&file, v, v.table(1), &stores, None, forwarder.as_deref())?));
    }
    Ok(Catalog { stores, volumes, default_export: default_export(config) })
}

/// The export served for the empty name: the configured one, or the first
/// volume.
pub fn default_export(config: &Config) -> Option<String> {
    config.server.default_export.clone().or_else(|| config.volumes.first().map(|v| v.name.clone()))
}

/// A store range some volume's table maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreUse<'a> {
    pub volume: &'a str,
    pub store: &'a str,
    pub range: Range,
}

/// Every range of the stores `on` accepts that `tables` map, in table order.
pub fn store_uses<'a>(tables: impl IntoIterator<Item = (&'a str, &'a MappingTable)>, on: impl Fn(&str) -> bool) -> Vec<StoreUse<'a>> {
    let mut out = Vec::new();
    for (volume, table) in tables {
        for (store, range) in table.extents().iter().flat_map(|e| e.target.store_ranges(e.length)) {
            if on(store) {
                out.push(StoreUse { volume, store, range });
            }
        }
    }
    out
}
