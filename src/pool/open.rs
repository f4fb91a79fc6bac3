//! Start-up and reload: the configured pools against the recorded ones,
//! the free space derived from the owner records, and the check that runs
//! before anything is served (leaked chunks are returned).

use super::inner::{Inner, PoolState, State, VolState};
use super::meta::{Batch, Loaded};
use super::records::{split_id, ChunkId, PoolRecord, StoreRecord};
use super::space::{Space, StoreSpace};
use super::{PoolError, PoolStore};
use crate::api::PoolCheckReport;
use crate::config::PoolConfig;
use std::collections::BTreeMap;
use std::sync::Arc;

/// The record of pool `cfg`: the recorded one with new stores appended, or
/// a new one. Refuses a chunk change under volumes and a store leaving
/// while it holds chunks.
pub fn reconcile_record(cfg: &PoolConfig, old: Option<&PoolRecord>, stores: &[PoolStore], owned_on: &dyn Fn(usize) -> u64, has_volumes: bool) -> Result<PoolRecord, PoolError> {
    let mut rec = old.cloned().unwrap_or(PoolRecord { name: cfg.name.clone(), chunk: cfg.chunk, stores: Vec::new() });
    if rec.chunk != cfg.chunk {
        if has_volumes {
            return Err(PoolError::Conflict(format!("pool '{}': chunk cannot change from {} to {} while the pool has volumes", cfg.name, rec.chunk, cfg.chunk)));
        }
        rec.chunk = cfg.chunk;
        rec.stores.clear();
    }
    for (i, s) in rec.stores.iter_mut().enumerate() {
        if !cfg.backends.contains(&s.backend) {
            let owned = owned_on(i);
            if owned > 0 {
                return Err(PoolError::Conflict(format!("pool '{}': backend '{}' cannot leave the pool: it holds {owned} chunk(s) of its volumes", cfg.name, s.backend)));
            }
            s.chunks = 0;
        }
    }
    for b in &cfg.backends {
        let size = stores.iter().find(|s| &s.backend == b).map_or(0, |s| s.handle.size());
        match rec.stores.iter_mut().find(|s| &s.backend == b) {
            Some(s) => s.chunks = s.chunks.max(size / rec.chunk),
            None => rec.stores.push(StoreRecord { backend: b.clone(), chunks: size / rec.chunk }),
        }
    }
    Ok(rec)
}

/// The free space of `rec`: every chunk of an open store that no range in
/// `reserved` overlaps.
pub fn space_of(rec: &PoolRecord, stores: &[PoolStore]) -> Space {
    let list = rec
        .stores
        .iter()
        .map(|s| {
            let open = stores.iter().find(|o| o.backend == s.backend && s.chunks > 0);
            StoreSpace::new(&s.backend, open.map(|o| o.handle.clone()), open.and_then(|o| o.path.clone()), s.chunks, rec.chunk, open.map_or(&[][..], |o| &o.reserved[..]))
        })
        .collect();
    Space::new(rec.chunk, list)
}

/// Builds the state from what was loaded, checking it: returns the state,
/// the repairs to commit and a report per pool.
pub fn build(inner: &Arc<Inner>, loaded: &Loaded, pools: &[PoolConfig], stores: &[PoolStore], batch: &mut Batch) -> Result<(State, Vec<PoolCheckReport>), PoolError> {
    let (mut st, mut reports) = (State::default(), Vec::<PoolCheckReport>::new());
    {
        let recorded: BTreeMap<&str, &PoolRecord> = loaded.pools.iter().map(|p| (p.name.as_str(), p)).collect();
        for v in &loaded.volumes {
            if !pools.iter().any(|p| p.name == v.pool) {
                return Err(PoolError::Conflict(format!("pool '{}' is gone from the config but holds volume '{}'", v.pool, v.name)));
            }
        }
        for cfg in pools {
            let old = recorded.get(cfg.name.as_str()).copied();
            let owned_on = |i: usize| loaded.owners.iter().filter(|o| o.pool == cfg.name && split_id(o.id).0 == i).count() as u64;
            let has_volumes = loaded.volumes.iter().any(|v| v.pool == cfg.name);
            let rec = reconcile_record(cfg, old, stores, &owned_on, has_volumes)?;
            if old != Some(&rec) {
                batch.pools.push(rec.clone());
            }
            let space = space_of(&rec, stores);
            st.pools.insert(cfg.name.clone(), PoolState { config: cfg.clone(), record: rec, space, waiting: 0, below_low_water: false, reclaimed: 0, short: 0, may_wait: Default::default() });
            reports.push(PoolCheckReport { pool: cfg.name.clone(), chunks: 0, owned: 0, free: 0, leaked_returned: 0, errors: Vec::new() });
        }
        for v in &loaded.volumes {
            let p = &st.pools[&v.pool];
            let mut state = inner.new_volume_state(v, p, p.chunk());
            state.usage = loaded.usage.get(&v.name).cloned().unwrap_or(state.usage);
            st.volumes.insert(v.name.clone(), state);
        }
        // Each owner record maps one chunk of a volume and marks the chunk
        // taken. A record of no volume (or of one in another pool) is a
        // leak: returned. A second record for one chunk of a volume, or a
        // claim on a reserved chunk, is an error (kept, never reused).
        let report_of = |reports: &mut Vec<PoolCheckReport>, pool: &str| reports.iter().position(|r| r.pool == pool);
        for o in &loaded.owners {
            let Some(k) = report_of(&mut reports, &o.pool) else { continue };
            let Some(v) = st.volumes.get_mut(&o.volume).filter(|v| v.record.pool == o.pool) else {
                batch.dropped_owners.push((o.pool.clone(), o.id));
                reports[k].leaked_returned += 1;
                continue;
            };
            let p = st.pools.get_mut(&o.pool).expect("report exists");
            if !p.space.take(o.id) {
                reports[k].errors.push(format!("chunk {} of volume '{}' is not placeable at start-up (under a config volume's range)", o.id, o.volume));
            }
            let mut load = |id: ChunkId| match &v.map {
                Some(map) => map.load(o.vchunk, id),
                None => v.thick.insert((o.vchunk, o.copy), id),
            };
            if let Some(first) = load(o.id) {
                load(first);
                reports[k].errors.push(format!("volume '{}' chunk {} (copy {}) is owned by chunks {first} and {}: kept {first}", o.volume, o.vchunk, o.copy, o.id));
            }
        }
        for r in reports.iter_mut() {
            let p = &st.pools[&r.pool];
            r.chunks = p.space.usable_chunks();
            r.free = p.space.free_chunks() + r.leaked_returned;
            r.owned = r.chunks.saturating_sub(r.free);
        }
    }
    Ok((st, reports))
}

/// Whether a volume state is complete: every allocation unit of a thick
/// volume has its chunks.
pub fn missing_chunks(v: &VolState, chunk: u64) -> u64 {
    if v.map.is_some() {
        return 0;
    }
    let want = v.record.size / chunk * v.record.copies() as u64;
    want.saturating_sub(v.thick.len() as u64)
}
