//! Growing, shrinking and deleting pool volumes.

use super::inner::Inner;
use super::meta::{Batch, MapEntry};
use super::records::{ChunkId, VolumeRecord};
use super::PoolError;
use crate::sync::lock;
use std::sync::Arc;

fn meta_err(inner: &Inner) -> impl FnOnce(super::meta::MetaError) -> PoolError + '_ {
    move |e| PoolError::Metadata { path: inner.meta.path().display().to_string(), message: e.0 }
}

impl Inner {
    fn record_and_chunk(&self, name: &str) -> Result<(VolumeRecord, u64), PoolError> {
        let st = lock(&self.state);
        let v = st.volumes.get(name).ok_or_else(|| PoolError::UnknownVolume(name.into()))?;
        Ok((v.record.clone(), st.pools[&v.record.pool].chunk()))
    }

    fn check_new_size(record: &VolumeRecord, chunk: u64, size: u64) -> Result<(), PoolError> {
        let unit = chunk * record.width();
        if size == 0 || !size.is_multiple_of(unit) {
            return Err(PoolError::Invalid(format!("size {size} is not a multiple of {unit} (the pool's chunk{})", if record.width() > 1 { " × stripe stores" } else { "" })));
        }
        Ok(())
    }

    /// Allocates up to `size` and records it (committed).
    pub fn grow(self: &Arc<Self>, name: &str, size: u64) -> Result<VolumeRecord, PoolError> {
        let (mut record, chunk) = self.record_and_chunk(name)?;
        Self::check_new_size(&record, chunk, size)?;
        if size <= record.size {
            return Err(PoolError::Invalid(format!("volume '{name}' is {} bytes; {size} does not grow it", record.size)));
        }
        let unit = chunk * record.width();
        let (from, to) = (record.size / unit, size / unit);
        record.size = size;
        record.generation += 1;
        let mut batch = Batch { volumes: vec![record.clone()], ..Batch::default() };
        let mut state = lock(&self.state).volumes.remove(name).ok_or_else(|| PoolError::UnknownVolume(name.into()))?;
        if let Some(m) = &state.map {
            m.resize(size / chunk);
        }
        let result = (|| {
            if !record.thin {
                self.make_room(&record.pool, (to - from) * unit / chunk * record.copies() as u64)?;
                self.allocate_range(&record, &mut state, from, to, &mut batch)?;
            }
            self.meta.apply(&batch).map_err(meta_err(self))
        })();
        if result.is_ok() {
            state.record = record.clone();
        } else {
            // Back out what allocate_range added.
            let new: Vec<ChunkId> = batch.mapped.iter().map(|e| e.id).collect();
            for e in &batch.mapped {
                match &state.map {
                    Some(m) => drop(m.unmap_if(e.vchunk, Some(e.id))),
                    None => {
                        state.thick.remove(&(e.vchunk, e.copy));
                    }
                }
            }
            self.release(&record.pool, &new);
            if let Some(m) = &state.map {
                m.resize(from * unit / chunk);
            }
        }
        lock(&self.state).volumes.insert(name.into(), state);
        result.map(|()| record)
    }

    /// Whether bytes from `size` on hold data.
    pub fn tail_holds_data(&self, name: &str, size: u64) -> Result<bool, PoolError> {
        let st = lock(&self.state);
        let v = st.volumes.get(name).ok_or_else(|| PoolError::UnknownVolume(name.into()))?;
        let p = &st.pools[&v.record.pool];
        let chunk = p.chunk();
        let first = size / chunk;
        let tail: Vec<ChunkId> = match &v.map {
            Some(m) => return Ok(m.mapped_chunks().iter().any(|(c, ..)| *c >= first)),
            None => v.thick.iter().filter(|((c, _), _)| *c >= first).map(|(_, id)| *id).collect(),
        };
        for id in tail {
            if let Some((store, offset)) = p.space.place(id) {
                let runs = store.block_status(offset, chunk, 2).map_err(|source| PoolError::Io { what: "reading the tail's allocation".into(), source })?;
                if runs.iter().any(|r| !r.hole) {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// Frees everything from `size` on and records the size (committed).
    /// The caller has swapped the volume to its smaller table already.
    pub fn shrink(self: &Arc<Self>, name: &str, size: u64) -> Result<VolumeRecord, PoolError> {
        let (mut record, chunk) = self.record_and_chunk(name)?;
        Self::check_new_size(&record, chunk, size)?;
        if size >= record.size {
            return Err(PoolError::Invalid(format!("volume '{name}' is {} bytes; {size} does not shrink it", record.size)));
        }
        record.size = size;
        record.generation += 1;
        let first = size / chunk;
        let map = lock(&self.state).volumes.get(name).and_then(|v| v.map.clone());
        if let Some(m) = &map {
            for (c, id, _) in m.mapped_chunks().into_iter().filter(|(c, ..)| *c >= first) {
                m.unmap_if(c, Some(id)).map_err(|source| PoolError::Io { what: "freeing the tail".into(), source })?;
            }
            self.commit_with(Batch { volumes: vec![record.clone()], ..Batch::default() }).map_err(|source| PoolError::Io { what: "committing the shrink".into(), source })?;
            m.resize(first);
        } else {
            let tail: Vec<(u64, u8, ChunkId)> = {
                let st = lock(&self.state);
                st.volumes[name].thick.iter().filter(|((c, _), _)| *c >= first).map(|((c, k), id)| (*c, *k, *id)).collect()
            };
            let unmapped = tail.iter().map(|(c, k, id)| MapEntry { volume: name.into(), pool: record.pool.clone(), vchunk: *c, copy: *k, id: *id }).collect();
            self.meta.apply(&Batch { volumes: vec![record.clone()], unmapped, ..Batch::default() }).map_err(meta_err(self))?;
            let mut st = lock(&self.state);
            let v = st.volumes.get_mut(name).expect("checked above");
            for (c, k, _) in &tail {
                v.thick.remove(&(*c, *k));
            }
            drop(st);
            self.punch_and_release(&record.pool, tail.iter().map(|t| t.2).collect());
        }
        if let Some(v) = lock(&self.state).volumes.get_mut(name) {
            v.record = record.clone();
        }
        Ok(record)
    }

    /// Deletes a volume nobody uses any more: its chunks return, punched.
    pub fn delete(self: &Arc<Self>, name: &str) -> Result<(), PoolError> {
        let _serial = lock(&self.commit_lock);
        let (record, ids, entries) = {
            let st = lock(&self.state);
            let v = st.volumes.get(name).ok_or_else(|| PoolError::UnknownVolume(name.into()))?;
            let entries: Vec<(u64, u8, ChunkId)> = match &v.map {
                Some(m) => {
                    drop(m.take_pending());
                    let owners = self.meta.owners(&v.record.pool, Some(name)).map_err(meta_err(self))?;
                    owners.into_iter().map(|o| (o.vchunk, o.copy, o.id)).collect()
                }
                None => v.thick.iter().map(|((c, k), id)| (*c, *k, *id)).collect(),
            };
            let ids: Vec<ChunkId> = match &v.map {
                Some(m) => m.mapped_chunks().into_iter().map(|c| c.1).chain(entries.iter().map(|e| e.2)).collect(),
                None => entries.iter().map(|e| e.2).collect(),
            };
            (v.record.clone(), ids, entries)
        };
        let unmapped = entries.iter().map(|(c, k, id)| MapEntry { volume: name.into(), pool: record.pool.clone(), vchunk: *c, copy: *k, id: *id }).collect();
        self.meta.apply(&Batch { deleted_volumes: vec![name.into()], unmapped, ..Batch::default() }).map_err(meta_err(self))?;
        lock(&self.state).volumes.remove(name);
        let mut ids = ids;
        ids.sort_unstable();
        ids.dedup();
        self.punch_and_release(&record.pool, ids);
        tracing::info!(volume = name, pool = %record.pool, "pool volume deleted");
        Ok(())
    }

    /// Punches chunks (space back to sparse stores) and frees them.
    fn punch_and_release(&self, pool: &str, ids: Vec<ChunkId>) {
        let places: Vec<_> = {
            let st = lock(&self.state);
            ids.iter().filter_map(|id| st.pools.get(pool).and_then(|p| p.space.place(*id).map(|pl| (pl, p.chunk())))).collect()
        };
        for ((store, offset), chunk) in places {
            if let Err(e) = store.trim(offset, chunk, false) {
                tracing::warn!(pool, "punching a freed chunk: {e}");
            }
        }
        self.release(pool, &ids);
    }
}
