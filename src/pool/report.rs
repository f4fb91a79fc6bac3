//! The pools' views: status, the online check, and usage (the bill).

use super::inner::{Inner, VolState};
use super::meta::Batch;
use super::records::{split_id, ChunkId, UsageRecord};
use std::collections::BTreeMap;
use super::volumes::{reclaimable_chunks, unix_now};
use super::PoolError;
use crate::api::{PoolCheckReport, PoolStatus, PoolStoreStatus, PoolVolumeInfo, UsageReport, VolumeUsage};
use crate::sync::lock;
use std::sync::atomic::Ordering::Relaxed;

/// What the check holds a pool's owner records against.
#[derive(Default)]
struct PoolView {
    chunks: u64,
    free: u64,
    /// Per store, its free-chunk bitmap.
    free_bits: Vec<Vec<u64>>,
    /// Volume name → its number in `expect`.
    volumes: BTreeMap<String, u32>,
    /// (volume number, chunk, copy) → chunk id, as committed.
    expect: BTreeMap<(u32, u64, u8), ChunkId>,
}

pub fn info(v: &VolState, chunk: u64) -> PoolVolumeInfo {
    let r = &v.record;
    PoolVolumeInfo {
        name: r.name.clone(),
        pool: r.pool.clone(),
        size: r.size,
        layout: r.layout,
        thin: r.thin,
        priority: r.priority,
        description: r.description.clone(),
        allocated: v.allocated_chunks() * chunk,
        written: written(v),
        created: r.created,
    }
}

/// Bytes written since creation: the meter plus what is not yet in it.
pub fn written(v: &VolState) -> u64 {
    v.usage.written + v.written_unmetered + v.map.as_ref().map_or(0, |m| m.written.load(Relaxed))
}

/// The meter brought up to now (not stored). The pool thread brings every
/// meter up to date each second, so the allocation is taken as the
/// current one since then.
pub fn metered(v: &VolState, chunk: u64, now: f64) -> UsageRecord {
    let allocated = v.allocated_chunks() * chunk;
    let mut u = v.usage.clone();
    u.byte_seconds += allocated as f64 * (now - u.until).max(0.0);
    u.until = now;
    u.allocated = allocated;
    u.written = written(v);
    u
}

impl Inner {
    pub fn status(&self, pool: Option<&str>) -> Result<Vec<PoolStatus>, PoolError> {
        let st = lock(&self.state);
        if let Some(p) = pool {
            st.pools.get(p).ok_or_else(|| PoolError::UnknownPool(p.into()))?;
        }
        let mut out = Vec::new();
        for p in st.pools.values().filter(|p| pool.is_none_or(|n| n == p.config.name)) {
            let chunk = p.chunk();
            let volumes: Vec<PoolVolumeInfo> = st.volumes.values().filter(|v| v.record.pool == p.config.name).map(|v| info(v, chunk)).collect();
            let size = p.space.usable_chunks() * chunk;
            let free = p.space.free_chunks() * chunk;
            let provisioned: u64 = st.volumes.values().filter(|v| v.record.pool == p.config.name).map(|v| v.record.size * v.record.copies() as u64).sum();
            out.push(PoolStatus {
                name: p.config.name.clone(),
                class: p.config.class.clone(),
                chunk,
                priority: p.config.priority,
                on_full: serde_json::to_value(p.config.on_full).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default(),
                stores: p
                    .space
                    .stores
                    .iter()
                    .filter(|s| s.handle.is_some())
                    .map(|s| PoolStoreStatus { backend: s.backend.clone(), chunks: s.chunks - s.reserved, free_chunks: s.free_count })
                    .collect(),
                size,
                allocated: size - free,
                free,
                reclaimable: reclaimable_chunks(&st, &p.config.name) * chunk,
                overcommit: if size == 0 { 0.0 } else { provisioned as f64 / size as f64 },
                low_water: p.below_low_water,
                queued_writes: p.waiting,
                reclaimed: p.reclaimed * chunk,
                volumes,
            });
        }
        Ok(out)
    }

    /// Commits what is pending, then holds the durable owner records
    /// against the maps and the free space in memory. Records of no volume
    /// are leaks: returned to the pool. The caller holds `admin` (no volume
    /// is created, resized or deleted meanwhile).
    pub fn check(&self, pool: Option<&str>) -> Result<Vec<PoolCheckReport>, PoolError> {
        self.commit_all().map_err(|source| PoolError::Io { what: "committing before the check".into(), source })?;
        let meta_err = |e: super::meta::MetaError| PoolError::Metadata { path: self.meta.path().display().to_string(), message: e.0 };
        // One instant with no commit in between: the store as of its last
        // commit, the maps in memory with what is not committed yet undone,
        // and the free space. Compared at leisure afterwards (commits, and
        // so FLUSHes, wait only for this part).
        let (snapshot, views) = {
            let _serial = lock(&self.commit_lock);
            let snapshot = self.meta.snapshot().map_err(meta_err)?;
            let (mut views, maps) = {
                let st = lock(&self.state);
                if let Some(p) = pool {
                    st.pools.get(p).ok_or_else(|| PoolError::UnknownPool(p.into()))?;
                }
                let mut views = BTreeMap::new();
                let mut maps = Vec::new();
                for (name, p) in st.pools.iter().filter(|(n, _)| pool.is_none_or(|want| want == n.as_str())) {
                    let mut view = PoolView { chunks: p.space.usable_chunks(), free: p.space.free_chunks(), ..PoolView::default() };
                    view.free_bits = p.space.stores.iter().map(|s| s.free_bits()).collect();
                    for v in st.volumes.values().filter(|v| &v.record.pool == name) {
                        let k = view.volumes.len() as u32;
                        view.volumes.insert(v.record.name.clone(), k);
                        match &v.map {
                            Some(m) => maps.push((name.clone(), k, m.clone())),
                            None => view.expect.extend(v.thick.iter().map(|((c, copy), id)| ((k, *c, *copy), *id))),
                        }
                    }
                    views.insert(name.clone(), view);
                }
                (views, maps)
            };
            // Outside the state lock: a map's allocation lock comes first.
            for (pool, k, m) in maps {
                let view = views.get_mut(&pool).expect("collected above");
                view.expect.extend(m.durable_entries().into_iter().map(|(c, id)| ((k, c, 0), id)));
            }
            (snapshot, views)
        };
        let mut out = Vec::new();
        for (name, view) in views {
            let owners = snapshot.owners(&name, None).map_err(meta_err)?;
            let mut report = PoolCheckReport { pool: name.clone(), chunks: view.chunks, owned: owners.len() as u64, free: view.free, leaked_returned: 0, errors: Vec::new() };
            let mut leaked = Vec::new();
            let mut matched = 0u64;
            for o in &owners {
                let Some(k) = view.volumes.get(&o.volume) else {
                    leaked.push(o.id);
                    continue;
                };
                let (s, i) = split_id(o.id);
                if view.free_bits.get(s).is_some_and(|bits| bits.get((i / 64) as usize).is_some_and(|w| w & (1 << (i % 64)) != 0)) {
                    report.errors.push(format!("chunk {} is owned by '{}' but free in memory", o.id, o.volume));
                }
                match view.expect.get(&(*k, o.vchunk, o.copy)) {
                    Some(id) if *id == o.id => matched += 1,
                    Some(id) => report.errors.push(format!("volume '{}' chunk {} is chunk {} in memory but chunk {} on disk", o.volume, o.vchunk, id, o.id)),
                    None => report.errors.push(format!("volume '{}' chunk {} owns chunk {} on disk but maps nothing in memory", o.volume, o.vchunk, o.id)),
                }
            }
            if matched != view.expect.len() as u64 {
                report.errors.push(format!("{} chunks mapped in memory, {matched} of them with an owner record", view.expect.len()));
            }
            // A record of no volume: its chunk is free in memory already
            // (start-up derives free space from the records and skipped
            // it) or, if something holds it, free at the next start-up.
            if !leaked.is_empty() {
                let dropped = leaked.iter().map(|id| (name.clone(), *id)).collect();
                self.meta.apply(&Batch { dropped_owners: dropped, ..Batch::default() }).map_err(meta_err)?;
                report.leaked_returned = leaked.len() as u64;
                tracing::warn!(pool = %name, chunks = leaked.len(), "pool check returned leaked chunks");
            }
            out.push(report);
        }
        Ok(out)
    }

    pub fn usage(&self, since: Option<u64>) -> Result<UsageReport, PoolError> {
        let now = unix_now();
        let st = lock(&self.state);
        let mut volumes = Vec::new();
        let mut start = now as u64;
        for v in st.volumes.values() {
            let chunk = st.pools[&v.record.pool].chunk();
            let cur = metered(v, chunk, now);
            let base = match since {
                Some(t) if t > v.record.created => {
                    // The latest snapshot at or before `t`: in memory for
                    // the last two minutes, else the persisted samples.
                    let recent = v.recent.iter().rev().find(|u| u.until <= t as f64).filter(|_| v.recent.front().is_some_and(|f| f.until <= t as f64));
                    let sample = match recent {
                        Some(u) => Some((u.until as u64, u.clone())),
                        None => self.meta.sample_before(&v.record.name, t).map_err(|e| PoolError::Metadata { path: self.meta.path().display().to_string(), message: e.0 })?,
                    };
                    // Between samples the allocation is taken as constant.
                    sample.map(|(_, u)| {
                        let mut u = u;
                        u.byte_seconds += u.allocated as f64 * (t as f64 - u.until).max(0.0);
                        u
                    })
                }
                _ => None,
            };
            start = start.min(since.unwrap_or(v.record.created).max(v.record.created));
            let (bs, written) = match base {
                Some(b) => (cur.byte_seconds - b.byte_seconds, cur.written.saturating_sub(b.written)),
                None => (cur.byte_seconds, cur.written),
            };
            volumes.push(VolumeUsage {
                volume: v.record.name.clone(),
                pool: v.record.pool.clone(),
                rate: v.record.rate().into(),
                allocated: cur.allocated,
                written_bytes: written,
                allocation_byte_seconds: bs.max(0.0),
            });
        }
        Ok(UsageReport { since: since.unwrap_or(start), until: now as u64, volumes })
    }
}
