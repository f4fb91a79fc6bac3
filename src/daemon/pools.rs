//! Pool volumes in the running daemon: the stores handed to the pool
//! engine, building the volumes it records (at start and on `volume
//! create`), resizing them through pause–drain–swap, deleting them, and
//! the pool views (`pool status|check|usage`).
//!
//! A pool volume is not in the config: the pool metadata is its only
//! record (no generation files in `state_dir/volumes`), so its swaps
//! persist nothing of their own. Reload keeps pool volumes, like split
//! copies.

use super::assemble::{redundancy_dir, region_of, store_uses, OpenStore};
use super::{Daemon, DaemonError};
use crate::api::{PoolCheckList, PoolCheckReport, PoolLayout, PoolList, PoolVolumeInfo, ResizeReport, UsageReport, VolumeCreate};
use crate::backend::{Backend, StoreKind};
use crate::config::Config;
use crate::map::MappingTable;
use crate::pool::{PoolError, PoolStore, Pools};
use crate::sync::lock;
use crate::volume::{Redundancy, Translation, Unpersisted, Volume, VolumeSpec};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

/// Block size pool volumes advertise (their chunks are far larger).
const BLOCK_SIZE: u32 = 4096;

/// A mirror pool volume's write-intent and stale bitmaps are sized once,
/// for this much (bytes), so it can grow online: twice its size rounded
/// up to a power of two, at least this. Kept in `CAPACITY_FILE` beside
/// them, so a restart after a resize opens them at the same size.
const MIRROR_MIN_CAPACITY: u64 = 16 << 30;
const CAPACITY_FILE: &str = "pool-capacity";

/// Every store of the config's pools, with the ranges the non-pool
/// volumes `tables` map on it (under any name of the same store).
pub(super) fn pool_stores(config: &Config, stores: &HashMap<String, OpenStore>, tables: &[(String, MappingTable)]) -> Vec<PoolStore> {
    let mut out = Vec::new();
    for backend in config.pools.iter().flat_map(|p| &p.backends) {
        let Some(open) = stores.get(backend) else { continue };
        let same_store = |n: &str| stores.get(n).is_some_and(|s| Arc::ptr_eq(&s.handle, &open.handle));
        let reserved = store_uses(tables.iter().map(|(n, t)| (n.as_str(), t)), same_store).into_iter().map(|u| u.range).collect();
        let path = open.config.spec.path.clone().filter(|_| open.handle.info().kind == StoreKind::File);
        out.push(PoolStore { backend: backend.clone(), handle: open.handle.clone(), path, reserved });
    }
    out
}

/// Logs what a pool check found (at start-up).
fn log_check(report: &PoolCheckReport) {
    let r = report;
    if !r.errors.is_empty() {
        tracing::error!(pool = r.pool, errors = ?r.errors, "pool check found problems it cannot repair; run `nbdvirt pool check`");
    } else if r.leaked_returned > 0 {
        tracing::warn!(pool = r.pool, leaked_returned = r.leaked_returned, "pool check: leaked chunks returned to the pool");
    } else {
        tracing::info!(pool = r.pool, chunks = r.chunks, owned = r.owned, free = r.free, "pool check clean");
    }
}

/// Opens the pools over `stores`; `volumes` (config volumes and split
/// copies) keep what they map.
pub(super) fn open_pools(
    state_dir: &Path,
    config: &Config,
    stores: &HashMap<String, OpenStore>,
    volumes: &BTreeMap<String, Arc<Volume>>,
) -> Result<Arc<Pools>, DaemonError> {
    let tables: Vec<(String, MappingTable)> = volumes.values().map(|v| (v.name().to_string(), v.table())).collect();
    let (pools, reports) = Pools::open(state_dir, &config.pools, &pool_stores(config, stores, &tables))?;
    reports.iter().for_each(log_check);
    Ok(pools)
}

fn mirror_capacity(size: u64) -> u64 {
    size.checked_next_power_of_two().map_or(u64::MAX, |p| p.saturating_mul(2)).max(MIRROR_MIN_CAPACITY)
}

/// The redundancy state of pool volume `info`: on disk for a thick mirror
/// (bitmaps with room to grow), else in memory (nothing of it outlives
/// the process).
fn pool_redundancy(state_dir: &Path, info: &PoolVolumeInfo, table: &MappingTable, chunk_mapped: bool) -> Result<Arc<Redundancy>, DaemonError> {
    let name = info.name.as_str();
    if chunk_mapped || !matches!(info.layout, PoolLayout::Mirror { .. }) {
        return Ok(Redundancy::in_memory(name, table.size(), crate::map::DEFAULT_REGION));
    }
    let dir = redundancy_dir(state_dir, name);
    let io = |e| DaemonError::io(format!("pool volume '{name}': mirror state in {}", dir.display()), e);
    std::fs::create_dir_all(&dir).map_err(io)?;
    let recorded = std::fs::read_to_string(dir.join(CAPACITY_FILE)).ok().and_then(|s| s.trim().parse::<u64>().ok());
    let capacity = match recorded {
        Some(c) if c >= table.size() => c,
        _ => {
            let c = mirror_capacity(table.size());
            std::fs::write(dir.join(CAPACITY_FILE), format!("{c}\n")).map_err(io)?;
            c
        }
    };
    Redundancy::open(&dir, name, capacity, region_of(table)).map_err(io)
}

/// Builds pool volume `name` as its pool records it. A chunk-mapped one
/// gets its chunk map before its thin target is opened. A `fresh` mirror's
/// legs start in sync: its chunks were just allocated, none written, so
/// there is nothing to copy (as `lvcreate --nosync`).
pub(super) fn build_pool_volume(
    pools: &Pools,
    state_dir: &Path,
    name: &str,
    stores: &HashMap<String, Arc<dyn Backend>>,
    fresh: bool,
) -> Result<Arc<Volume>, DaemonError> {
    let info = pools.volume(name).ok_or_else(|| PoolError::UnknownVolume(name.into()))?;
    let table = pools.table(name)?;
    let map = pools.chunk_map(name);
    let red = pool_redundancy(state_dir, &info, &table, map.is_some())?;
    if fresh && red.dir().is_some() {
        for leg in table.extents().iter().filter_map(|e| e.target.legs()).flatten() {
            red.leg_for_target(&leg.store, true, 0..0).map_err(|e| DaemonError::io(format!("pool volume '{name}': mirror state"), e))?;
        }
    }
    if let Some(map) = map {
        red.set_chunk_map(map);
    }
    let translation = Translation::open(table, stores, &red).map_err(|e| DaemonError::io(format!("pool volume '{name}'"), std::io::Error::other(e.to_string())))?;
    let spec = VolumeSpec { name: name.into(), description: info.description.clone(), read_only: false, block_size: BLOCK_SIZE };
    Ok(Arc::new(Volume::new(spec, translation)))
}

/// Adds every pool volume to `volumes` at start. A name also used by the
/// config (or a split copy) stops the start: neither may shadow the other.
pub(super) fn add_pool_volumes(
    pools: &Pools,
    state_dir: &Path,
    file: &str,
    volumes: &mut BTreeMap<String, Arc<Volume>>,
    stores: &HashMap<String, Arc<dyn Backend>>,
) -> Result<(), DaemonError> {
    for info in pools.volumes() {
        if volumes.contains_key(&info.name) {
            return Err(DaemonError::PoolConflict(format!(
                "volume '{}' is defined in {file} and is also a volume of pool '{}' (made by `nbdvirt volume create`); rename the config's volume, or remove it from the config and delete or keep the pool volume",
                info.name, info.pool
            )));
        }
        volumes.insert(info.name.clone(), build_pool_volume(pools, state_dir, &info.name, stores, false)?);
    }
    Ok(())
}

impl Daemon {
    /// Whether `name` is a pool volume (kept across reloads).
    pub(super) fn is_pool_volume(&self, name: &str) -> bool {
        self.pools.volume(name).is_some()
    }

    /// Creates a volume from a pool and exports it at once.
    pub fn volume_create(&self, req: &VolumeCreate) -> Result<PoolVolumeInfo, DaemonError> {
        let _admin = lock(&self.admin);
        let catalog = self.catalog();
        let config_names: Vec<String> = lock(&self.config).volumes.iter().map(|v| v.name.clone()).collect();
        let taken = |n: &str| catalog.volumes.contains_key(n) || config_names.iter().any(|c| c == n) || self.is_split_volume(n);
        let info = self.pools.create(req, &taken)?;
        // Mirror state left by an earlier volume of that name is not ours.
        let _ = std::fs::remove_dir_all(redundancy_dir(self.state.root(), &req.name));
        let volume = match build_pool_volume(&self.pools, self.state.root(), &req.name, &catalog.stores, true) {
            Ok(v) => v,
            Err(e) => {
                if let Err(undo) = self.pools.delete(&req.name) {
                    tracing::error!(volume = req.name, error = %undo, "volume could not be built and its space not returned");
                }
                return Err(e);
            }
        };
        self.publish(Some(volume), None);
        tracing::info!(volume = req.name, pool = info.pool, size = info.size, layout = %info.layout, thin = info.thin, "pool volume created");
        Ok(self.pools.volume(&req.name).unwrap_or(info))
    }

    /// Grows (online: new connections see the new size) or shrinks a pool
    /// volume; a shrink that would cut off data needs `force`.
    pub fn volume_resize(&self, name: &str, size: u64, force: bool) -> Result<ResizeReport, DaemonError> {
        let _admin = lock(&self.admin);
        let info = self.pools.volume(name).ok_or_else(|| PoolError::UnknownVolume(name.into()))?;
        let volume = self.volume(name)?;
        if self.pauses.contains(name) {
            return Err(DaemonError::Paused(name.into()));
        }
        let old_size = info.size;
        let red = volume.translation().redundancy().clone();
        if size > old_size {
            let capacity = red.regions() as u64 * red.region();
            if red.dir().is_some() && size > capacity {
                return Err(PoolError::Invalid(format!(
                    "mirror volume '{name}' can grow online up to {capacity} bytes (the size its write-intent bitmaps were made for); create a new volume and copy the data"
                ))
                .into());
            }
            self.pools.grow(name, size)?;
            let swapped = self.pools.table(name).map_err(DaemonError::from).and_then(|t| self.swap_pool_table(&volume, t));
            if let Err(e) = swapped {
                if let Err(undo) = self.pools.shrink(name, old_size) {
                    tracing::error!(volume = name, error = %undo, "grow not undone after its swap failed");
                }
                return Err(e);
            }
        } else if size < old_size {
            if !force && self.pools.tail_holds_data(name, size)? {
                return Err(PoolError::Conflict(format!(
                    "volume '{name}': bytes {size}..{old_size} hold data; shrinking would drop them (use --force to drop them anyway)"
                ))
                .into());
            }
            self.swap_pool_table(&volume, self.pools.table_at(name, size)?)?;
            self.pools.shrink(name, size)?;
        }
        let connections = lock(&self.server).connections().into_iter().filter(|c| c.export.as_deref() == Some(name)).count();
        let note = (size != old_size && connections > 0).then(|| {
            format!(
                "{connections} connection(s) opened before the resize still assume {old_size} bytes; devices attached with `nbdvirt attach` keep the old size until re-attached (the kernel's NBD netlink interface cannot resize a bound device)"
            )
        });
        let volume_info = self.pools.volume(name).ok_or_else(|| PoolError::UnknownVolume(name.into()))?;
        tracing::info!(volume = name, old_size, size, "pool volume resized");
        Ok(ResizeReport { volume: volume_info, old_size, generation: self.pools.generation(name)?, note })
    }

    /// Swaps `volume` onto `table` (a new size allowed); the pool records
    /// are already (or are then) the durable truth, so the swap persists
    /// nothing itself.
    fn swap_pool_table(&self, volume: &Arc<Volume>, table: MappingTable) -> Result<(), DaemonError> {
        let old = volume.translation();
        let stores = self.catalog().stores.clone();
        let translation = Translation::open(table, &stores, old.redundancy())
            .map_err(|e| DaemonError::io(format!("pool volume '{}'", volume.name()), std::io::Error::other(e.to_string())))?;
        let swap = lock(&self.swap).clone();
        volume.swap_sized(translation, &swap, &mut Unpersisted, true)?;
        Ok(())
    }

    /// Deletes a pool volume: refused while clients use it unless `force`
    /// (they are then disconnected); its chunks return to the pool.
    pub fn volume_delete(&self, name: &str, force: bool) -> Result<PoolVolumeInfo, DaemonError> {
        let _admin = lock(&self.admin);
        let info = self.pools.volume(name).ok_or_else(|| PoolError::UnknownVolume(name.into()))?;
        let peers: Vec<String> = lock(&self.server).connections().into_iter().filter(|c| c.export.as_deref() == Some(name)).map(|c| c.peer).collect();
        if !peers.is_empty() && !force {
            return Err(DaemonError::VolumeInUse { volume: name.into(), connections: peers.len(), peers: peers.join(", ") });
        }
        let volume = self.volume(name)?;
        // No new clients, the old ones cut off, their requests drained.
        self.publish(None, Some(name));
        lock(&self.server).disconnect_export(name);
        let drain = lock(&self.swap).pause_timeout;
        let hold = match volume.pause(Vec::new(), drain) {
            Ok(hold) => hold,
            Err(e) => {
                self.publish(Some(volume), None);
                return Err(e.into());
            }
        };
        if let Err(e) = self.pools.delete(name) {
            volume.resume(hold);
            self.publish(Some(volume), None);
            return Err(e.into());
        }
        // The hold is never released: the volume is gone for good.
        for leg in volume.translation().redundancy().legs() {
            self.mirrors.stop_job(name, leg.store());
        }
        self.pauses.end(name, None);
        let _ = std::fs::remove_dir_all(redundancy_dir(self.state.root(), name));
        tracing::info!(volume = name, pool = info.pool, disconnected = peers.len(), "pool volume deleted");
        Ok(info)
    }

    /// Hands what clients wrote to thick pool volumes since the last call
    /// to the pool meters (chunk-mapped volumes count their own writes).
    /// Called every supervisor tick and before the pool views.
    pub(super) fn meter_pool_writes(&self) {
        let catalog = self.catalog();
        let mut seen = lock(&self.pool_written);
        seen.retain(|name, _| catalog.volumes.contains_key(name));
        for info in self.pools.volumes() {
            let Some(volume) = catalog.volumes.get(&info.name) else { continue };
            if self.pools.chunk_map(&info.name).is_some() {
                continue;
            }
            // A rebuilt volume object (restart, reload) counts from zero.
            let id = Arc::as_ptr(volume) as usize;
            let now = volume.counters().snapshot().written_bytes;
            let last = match seen.get(&info.name) {
                Some((same, last)) if *same == id => *last,
                _ => 0,
            };
            if now > last {
                self.pools.add_written(&info.name, now - last);
            }
            seen.insert(info.name.clone(), (id, now));
        }
    }

    pub fn pool_status(&self, pool: Option<&str>) -> Result<PoolList, DaemonError> {
        self.meter_pool_writes();
        Ok(PoolList { pools: self.pools.status(pool)? })
    }

    pub fn pool_check(&self, pool: Option<&str>) -> Result<PoolCheckList, DaemonError> {
        Ok(PoolCheckList { pools: self.pools.check(pool)? })
    }

    pub fn pool_usage(&self, since: Option<u64>) -> Result<UsageReport, DaemonError> {
        self.meter_pool_writes();
        Ok(self.pools.usage(since)?)
    }

    /// Refuses table changes (mirror, migration, split) of a pool volume.
    pub(super) fn not_pool_volume(&self, name: &str) -> Result<(), DaemonError> {
        if self.is_pool_volume(name) {
            return Err(DaemonError::PoolVolume(name.into()));
        }
        Ok(())
    }

    /// The pools' new settings and stores at a reload; `tables` are what
    /// the non-pool volumes will map.
    pub(super) fn reconfigure_pools(&self, new: &Config, stores: &HashMap<String, OpenStore>, tables: &[(String, MappingTable)]) -> Result<(), DaemonError> {
        let mut tables = tables.to_vec();
        // A running migration's destination is taken too.
        for m in self.running_migrations() {
            let dest = crate::map::Extent {
                start: 0,
                length: m.range.len(),
                target: crate::map::TargetSpec::Linear { store: m.dest.clone(), offset: m.dest_offset },
            };
            if let Ok(t) = MappingTable::new(0, vec![dest]) {
                tables.push((format!("migration of {}", m.volume), t));
            }
        }
        self.pools.reconfigure(&new.pools, &pool_stores(new, stores, &tables))?;
        Ok(())
    }

    /// A config volume must not map what a pool owns.
    pub(super) fn check_pool_ranges(&self, new: &Config, tables: &[MappingTable]) -> Result<(), DaemonError> {
        for (v, table) in new.volumes.iter().zip(tables) {
            for (store, range) in table.extents().iter().flat_map(|e| e.target.store_ranges(e.length)) {
                if let Some(owned) = self.pools.owned_ranges(store).into_iter().find(|o| o.overlaps(&range)) {
                    return Err(DaemonError::PoolConflict(format!(
                        "{}:{}: volume '{}': backend '{store}' range {}+{} is owned by a pool ({}+{}); give the pool's space back first (remove the backend from the pool) or map another range",
                        new.file_name(),
                        v.line,
                        v.name,
                        range.start,
                        range.len(),
                        owned.start,
                        owned.len()
                    )));
                }
            }
        }
        Ok(())
    }
}
