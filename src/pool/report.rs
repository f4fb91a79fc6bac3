//! The pools' views: status, the online check, and usage (the bill).

use super::inner::{Inner, VolState};
use super::meta::Batch;
use super::records::{split_id, UsageRecord};
use super::volumes::{reclaimable_chunks, unix_now};
use super::PoolError;
use crate::api::{PoolCheckReport, PoolStatus, PoolStoreStatus, PoolVolumeInfo, UsageReport, VolumeUsage};
use crate::sync::lock;
use std::sync::atomic::Ordering::Relaxed;

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

/// The meter brought up to now (not stored).
pub fn metered(v: &VolState, chunk: u64, now: f64) -> UsageRecord {
    let allocated = v.allocated_chunks() * chunk;
    let mut u = v.usage.clone();
    u.byte_seconds += u.allocated as f64 * (now - u.until).max(0.0);
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

    /// Commits what is pending, then holds the durable records against each
    /// other and against the free space in memory. Owner records no map
    /// entry explains are returned to the pool.
    pub fn check(&self, pool: Option<&str>) -> Result<Vec<PoolCheckReport>, PoolError> {
        self.commit_all().map_err(|source| PoolError::Io { what: "committing before the check".into(), source })?;
        let names: Vec<String> = {
            let st = lock(&self.state);
            if let Some(p) = pool {
                st.pools.get(p).ok_or_else(|| PoolError::UnknownPool(p.into()))?;
            }
            st.pools.keys().filter(|n| pool.is_none_or(|p| p == n.as_str())).cloned().collect()
        };
        let meta_err = |e: super::meta::MetaError| PoolError::Metadata { path: self.meta.path().display().to_string(), message: e.0 };
        let mut out = Vec::new();
        for name in names {
            let owners = self.meta.owners(&name).map_err(meta_err)?;
            let mut report = PoolCheckReport { pool: name.clone(), chunks: 0, owned: owners.len() as u64, free: 0, leaked_returned: 0, errors: Vec::new() };
            let mut leaked = Vec::new();
            let mut by_volume: std::collections::BTreeMap<String, Vec<(u64, u8, u64)>> = Default::default();
            for (id, volume, vchunk, copy) in &owners {
                if !by_volume.contains_key(volume) {
                    let entries = self.meta.map_of(volume).map_err(meta_err)?;
                    by_volume.insert(volume.clone(), entries);
                }
                if !by_volume[volume].iter().any(|(c, k, i)| (c, k, i) == (vchunk, copy, id)) {
                    leaked.push(*id);
                }
            }
            let st = lock(&self.state);
            let p = &st.pools[&name];
            report.chunks = p.space.usable_chunks();
            report.free = p.space.free_chunks();
            for (volume, entries) in &by_volume {
                if !st.volumes.contains_key(volume) && !entries.is_empty() {
                    report.errors.push(format!("map entries of unknown volume '{volume}'"));
                }
            }
            for (id, volume, ..) in &owners {
                let (s, i) = split_id(*id);
                if p.space.stores.get(s).is_some_and(|st| st.is_free(i)) {
                    report.errors.push(format!("chunk {id} is owned by '{volume}' but free in memory"));
                }
            }
            let mut entries = 0;
            for v in st.volumes.values().filter(|v| v.record.pool == name) {
                let count = self.meta.map_of(&v.record.name).map_err(meta_err)?;
                entries += count.len() as u64;
                for (c, k, id) in count {
                    if !owners.iter().any(|(oid, ov, oc, ok)| (oid, ov, oc, ok) == (&id, &v.record.name, &c, &k)) {
                        report.errors.push(format!("volume '{}' chunk {c} maps chunk {id} without an owner record", v.record.name));
                    }
                }
            }
            drop(st);
            if entries + leaked.len() as u64 != owners.len() as u64 {
                report.errors.push(format!("{} owner records for {entries} map entries", owners.len()));
            }
            if !leaked.is_empty() {
                let dropped = leaked.iter().map(|id| (name.clone(), *id)).collect();
                self.meta.apply(&Batch { dropped_owners: dropped, ..Batch::default() }).map_err(meta_err)?;
                self.release(&name, &leaked);
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
                    let sample = self.meta.sample_before(&v.record.name, t).map_err(|e| PoolError::Metadata { path: self.meta.path().display().to_string(), message: e.0 })?;
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
