//! Creating, growing, shrinking and deleting pool volumes, and the table a
//! volume is served by.

use super::chunks::ThinMap;
use super::inner::{Inner, PoolState, State, VolState};
use super::meta::{Batch, MapEntry};
use super::records::{split_id, ChunkId, UsageRecord, VolumeRecord};
use super::PoolError;
use crate::api::{PoolChoice, PoolLayout, VolumeCreate};
use crate::backend::ZeroMode;
use crate::map::{Extent, Leg, MappingTable, TargetSpec, DEFAULT_REGION};
use crate::sync::lock;
use std::collections::BTreeMap;
use std::sync::{Arc, Weak};

/// Stripe unit of thick striped pool volumes (a pool chunk is at least
/// this, so a chunk holds whole stripe units).
pub const STRIPE_UNIT: u64 = 64 << 10;

pub fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

fn io_err(what: &str) -> impl FnOnce(std::io::Error) -> PoolError + '_ {
    move |source| PoolError::Io { what: what.into(), source }
}

fn meta_err(inner: &Inner) -> impl FnOnce(super::meta::MetaError) -> PoolError + '_ {
    move |e| PoolError::Metadata { path: inner.meta.path().display().to_string(), message: e.0 }
}

/// The pool `choice` names: the pool, or the first pool of the class (by
/// priority) with room for `need` chunks (the first of the class if none).
fn choose(st: &State, choice: &PoolChoice, bytes: u64, thin: bool) -> Result<String, PoolError> {
    match choice {
        PoolChoice::Pool(p) => st.pools.contains_key(p).then(|| p.clone()).ok_or_else(|| PoolError::UnknownPool(p.clone())),
        PoolChoice::Class(c) => {
            let mut of_class: Vec<&PoolState> = st.pools.values().filter(|p| p.config.class.as_deref() == Some(c)).collect();
            of_class.sort_by_key(|p| p.config.priority);
            let first = of_class.first().ok_or_else(|| PoolError::UnknownClass(c.clone()))?;
            let fits = |p: &&PoolState| thin || (p.space.free_chunks() + reclaimable_chunks(st, &p.config.name)) * p.chunk() >= bytes;
            Ok(of_class.iter().find(|p| fits(p)).unwrap_or(first).config.name.clone())
        }
    }
}

/// Chunks reclaim could take back in `pool`: those of low-priority volumes.
pub fn reclaimable_chunks(st: &State, pool: &str) -> u64 {
    st.volumes.values().filter(|v| v.record.pool == pool && v.record.priority == crate::api::VolumePriority::Low).map(VolState::allocated_chunks).sum()
}

fn check_size(record: &VolumeRecord, chunk: u64) -> Result<(), PoolError> {
    let unit = chunk * record.width();
    if record.size == 0 || !record.size.is_multiple_of(unit) {
        let what = if record.width() > 1 { format!("the chunk {chunk} × {} stores = {unit}", record.width()) } else { format!("the pool's chunk {chunk}") };
        return Err(PoolError::Invalid(format!("size {} is not a multiple of {what}", record.size)));
    }
    Ok(())
}

impl Inner {
    pub fn create(self: &Arc<Self>, req: &VolumeCreate, taken: &dyn Fn(&str) -> bool) -> Result<VolumeRecord, PoolError> {
        if !crate::config::valid_name(&req.name) {
            return Err(PoolError::Invalid(format!("'{}' is not a valid volume name (letters, digits and -_.:@+)", req.name)));
        }
        let copies = match req.layout {
            PoolLayout::Mirror { copies } => copies as u64,
            _ => 1,
        };
        let mut st = lock(&self.state);
        if taken(&req.name) || st.volumes.contains_key(&req.name) {
            return Err(PoolError::Exists(req.name.clone()));
        }
        let pool = choose(&st, &req.from, req.size * copies, req.thin)?;
        let p = &st.pools[&pool];
        let mut record = VolumeRecord {
            name: req.name.clone(),
            pool: pool.clone(),
            size: req.size,
            layout: req.layout,
            thin: req.thin,
            priority: req.priority,
            description: req.description.clone(),
            created: unix_now() as u64,
            generation: 1,
            members: Vec::new(),
        };
        check_size(&record, p.chunk())?;
        if record.chunk_mapped() && copies > 1 {
            return Err(PoolError::Invalid("thin and low-priority volumes are linear or striped; a mirror:N volume is thick".into()));
        }
        let open = p.space.stores.iter().filter(|s| s.handle.is_some()).count();
        let spread = match req.layout {
            PoolLayout::Stripe { stores } => stores as usize,
            PoolLayout::Mirror { copies } => copies as usize,
            PoolLayout::Linear => 0,
        };
        if spread > open {
            return Err(PoolError::Invalid(format!("layout {} needs {spread} stores; pool '{pool}' has {open}", req.layout)));
        }
        let chunk = p.chunk();
        let p = st.pools.get_mut(&pool).expect("chosen above");
        if spread > 0 {
            record.members = p.space.pick_stores(spread).unwrap_or_default();
        }
        let state = self.new_volume_state(&record, p, chunk);
        let mut batch = Batch { volumes: vec![record.clone()], usage: vec![(record.name.clone(), state.usage.clone())], ..Batch::default() };
        let thick = !record.chunk_mapped() || !record.thin;
        drop(st);
        let mut state = state;
        if thick {
            let chunks = record.size / chunk * copies;
            self.make_room(&pool, chunks)?;
            self.allocate_range(&record, &mut state, 0, record.size / chunk / record.width(), &mut batch)?;
        }
        if let Err(e) = self.meta.apply(&batch).map_err(meta_err(self)) {
            self.release_state(&state);
            return Err(e);
        }
        lock(&self.state).volumes.insert(record.name.clone(), state);
        tracing::info!(volume = %record.name, pool = %pool, size = record.size, layout = %record.layout, thin = record.thin, "pool volume created");
        Ok(record)
    }

    pub fn new_volume_state(self: &Arc<Self>, record: &VolumeRecord, p: &PoolState, chunk: u64) -> VolState {
        let map = record.chunk_mapped().then(|| {
            let stores = p.space.stores.iter().map(|s| s.handle.clone()).collect();
            Arc::new(ThinMap::new(record, chunk, stores, p.may_wait.clone(), Arc::downgrade(self) as Weak<Inner>))
        });
        let usage = UsageRecord { until: unix_now(), ..UsageRecord::default() };
        VolState { record: record.clone(), thick: BTreeMap::new(), map, usage, written_unmetered: 0, recent: Default::default() }
    }

    /// Ensures `chunks` free chunks in `pool`, reclaiming low-priority space
    /// if need be; else names the shortfall.
    pub fn make_room(self: &Arc<Self>, pool: &str, chunks: u64) -> Result<(), PoolError> {
        let (free, reclaimable, chunk) = {
            let st = lock(&self.state);
            let p = &st.pools[pool];
            (p.space.free_chunks(), reclaimable_chunks(&st, pool), p.chunk())
        };
        if free >= chunks {
            return Ok(());
        }
        if free + reclaimable < chunks {
            return Err(PoolError::NoSpace { pool: pool.into(), needed: chunks * chunk, available: (free + reclaimable) * chunk });
        }
        self.reclaim(pool, chunks - free).map_err(io_err("reclaiming space"))?;
        let free = lock(&self.state).pools[pool].space.free_chunks();
        if free < chunks {
            return Err(PoolError::NoSpace { pool: pool.into(), needed: chunks * chunk, available: free * chunk });
        }
        Ok(())
    }

    /// Allocates allocation units `[from, to)` of a volume (every copy or
    /// member), zeroes them and adds their entries to `batch`. Chunk-mapped
    /// volumes (preallocated low priority) get them in their map.
    pub fn allocate_range(&self, record: &VolumeRecord, state: &mut VolState, from: u64, to: u64, batch: &mut Batch) -> Result<(), PoolError> {
        let mut got: Vec<(u64, u8, ChunkId)> = Vec::new();
        // Chunks that may hold old data (not clean): zeroed.
        let mut dirty: Vec<ChunkId> = Vec::new();
        let result = (|| {
            let mut st = lock(&self.state);
            let p = st.pools.get_mut(&record.pool).ok_or_else(|| PoolError::UnknownPool(record.pool.clone()))?;
            let chunk = p.chunk();
            let slots = (record.copies() as u64).max(record.width());
            for unit in from..to {
                let mut used: Vec<usize> = Vec::new();
                for k in 0..slots {
                    let prefer = record.members.get(k as usize).copied();
                    let strict = record.width() > 1;
                    let id = if strict { prefer.and_then(|m| p.space.alloc(Some(m), &(0..p.space.stores.len()).filter(|s| *s != m).collect::<Vec<_>>())) } else { p.space.alloc(prefer, &used) };
                    let (id, clean) = id.ok_or_else(|| PoolError::NoSpace { pool: record.pool.clone(), needed: (to - unit) * slots * chunk, available: p.space.free_chunks() * chunk })?;
                    if !clean {
                        dirty.push(id);
                    }
                    used.push(split_id(id).0);
                    // A stripe's unit k is chunk `unit*width + k` of the volume.
                    let (vchunk, copy) = if record.width() > 1 { (unit * record.width() + k, 0) } else { (unit, k as u8) };
                    got.push((vchunk, copy, id));
                }
            }
            p.note_free_space();
            let places: Vec<_> = dirty.iter().filter_map(|id| p.space.place(*id)).collect();
            drop(st);
            for (store, offset) in places {
                store.write_zeroes(offset, chunk, ZeroMode { may_trim: true, fast_only: false }, false).map_err(io_err("zeroing new chunks"))?;
            }
            Ok(())
        })();
        if let Err(e) = result {
            let ids: Vec<ChunkId> = got.iter().map(|g| g.2).collect();
            self.release(&record.pool, &ids);
            return Err(e);
        }
        for (vchunk, copy, id) in got {
            batch.mapped.push(MapEntry { volume: record.name.clone(), pool: record.pool.clone(), vchunk, copy, id });
            match &state.map {
                Some(m) => {
                    m.load(vchunk, id);
                }
                None => {
                    state.thick.insert((vchunk, copy), id);
                }
            }
        }
        Ok(())
    }

    /// Gives every chunk of a volume state that never became durable back.
    fn release_state(&self, state: &VolState) {
        let ids: Vec<ChunkId> = match &state.map {
            Some(m) => m.mapped_chunks().into_iter().map(|c| c.1).collect(),
            None => state.thick.values().copied().collect(),
        };
        self.release(&state.record.pool, &ids);
    }

    /// The table of `name` at `size` bytes.
    pub fn table_at(&self, name: &str, size: u64) -> Result<MappingTable, PoolError> {
        let st = lock(&self.state);
        let v = st.volumes.get(name).ok_or_else(|| PoolError::UnknownVolume(name.into()))?;
        let p = &st.pools[&v.record.pool];
        let chunk = p.chunk();
        let store_name = |id: ChunkId| -> Leg {
            let (s, i) = split_id(id);
            Leg { store: p.space.stores[s].backend.clone(), offset: i * chunk }
        };
        let mut extents: Vec<Extent> = Vec::new();
        if v.map.is_some() {
            extents.push(Extent { start: 0, length: size, target: TargetSpec::Thin { pool: v.record.pool.clone(), chunk } });
        } else {
            let width = v.record.width();
            let unit = chunk * width;
            for u in 0..size / unit {
                let target = match v.record.layout {
                    PoolLayout::Linear => {
                        let l = store_name(v.thick[&(u, 0)]);
                        TargetSpec::Linear { store: l.store, offset: l.offset }
                    }
                    PoolLayout::Mirror { copies } => TargetSpec::Mirror { legs: (0..copies as u8).map(|k| store_name(v.thick[&(u, k)])).collect(), region: DEFAULT_REGION },
                    PoolLayout::Stripe { .. } => TargetSpec::Stripe { members: (0..width).map(|k| store_name(v.thick[&(u * width + k, 0)])).collect(), chunk: STRIPE_UNIT },
                };
                match extents.last_mut() {
                    Some(last) if last.target.continued_by(last.length, &target) => last.length += unit,
                    _ => extents.push(Extent { start: u * unit, length: unit, target }),
                }
            }
        }
        MappingTable::new(v.record.generation, extents).map_err(|e| PoolError::Invalid(format!("volume '{name}': {e}")))
    }
}
