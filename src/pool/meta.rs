//! The pool metadata store: one redb database per daemon
//! (`state_dir/pools.redb`). Every change is a [`Batch`] applied in one
//! write transaction (one fsync).
//!
//! A chunk's mapping is one row, keyed by the chunk: (pool, chunk id) →
//! (volume, chunk of the volume, copy). The volumes' maps are that table
//! read the other way round at start-up. One row per chunk means a chunk
//! cannot be owned twice, nothing can disagree with a second table, and a
//! commit of N first writes inserts N rows whose keys (ids handed out in
//! order) sit next to each other in the B-tree.

use super::records::{ChunkId, PoolRecord, UsageRecord, VolumeRecord};
use redb::{Database, ReadableTable, TableDefinition};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const POOLS: TableDefinition<&str, &[u8]> = TableDefinition::new("pools");
const VOLUMES: TableDefinition<&str, &[u8]> = TableDefinition::new("volumes");
/// Databases written before the owners table became the only map also
/// kept the map keyed by volume: the owners table always held the same
/// rows (both changed in one transaction), so that table is dropped.
const LEGACY_MAP: TableDefinition<(&str, u64, u8), u64> = TableDefinition::new("map");
/// (pool, chunk id) → (volume, chunk of the volume, copy).
const OWNERS: TableDefinition<(&str, u64), (&str, u64, u8)> = TableDefinition::new("owners");
const USAGE: TableDefinition<&str, &[u8]> = TableDefinition::new("usage");
/// (volume, Unix second) → the volume's meter then (for `pool usage --since`).
const USAGE_LOG: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("usage_log");

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct MetaError(pub String);

fn err(e: impl std::fmt::Display) -> MetaError {
    MetaError(e.to_string())
}

/// One map entry: chunk `vchunk` (copy `copy`) of `volume` is chunk `id`
/// of `pool`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapEntry {
    pub volume: String,
    pub pool: String,
    pub vchunk: u64,
    pub copy: u8,
    pub id: ChunkId,
}

/// Changes committed together.
#[derive(Debug, Default)]
pub struct Batch {
    pub pools: Vec<PoolRecord>,
    pub volumes: Vec<VolumeRecord>,
    pub deleted_volumes: Vec<String>,
    pub mapped: Vec<MapEntry>,
    pub unmapped: Vec<MapEntry>,
    /// Owner records of no volume (leaks the checks return).
    pub dropped_owners: Vec<(String, ChunkId)>,
    pub usage: Vec<(String, UsageRecord)>,
    pub samples: Vec<(String, u64, UsageRecord)>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.pools.is_empty()
            && self.volumes.is_empty()
            && self.deleted_volumes.is_empty()
            && self.mapped.is_empty()
            && self.unmapped.is_empty()
            && self.dropped_owners.is_empty()
            && self.usage.is_empty()
            && self.samples.is_empty()
    }
}

/// Everything the store holds, read at start-up.
#[derive(Debug, Default)]
pub struct Loaded {
    pub pools: Vec<PoolRecord>,
    pub volumes: Vec<VolumeRecord>,
    /// Every owner record, in (pool, id) order.
    pub owners: Vec<MapEntry>,
    pub usage: BTreeMap<String, UsageRecord>,
}

/// A read transaction: what the store held at one commit.
pub struct Snapshot(redb::ReadTransaction);

impl Snapshot {
    /// The owner records of `pool`, or of its volume `volume` only.
    pub fn owners(&self, pool: &str, volume: Option<&str>) -> Result<Vec<MapEntry>, MetaError> {
        let table = self.0.open_table(OWNERS).map_err(err)?;
        let mut out = Vec::new();
        for row in table.range((pool, 0)..=(pool, u64::MAX)).map_err(err)? {
            let (k, v) = row.map_err(err)?;
            let (owner, vchunk, copy) = v.value();
            if volume.is_none_or(|want| want == owner) {
                out.push(MapEntry { volume: owner.into(), pool: pool.into(), vchunk, copy, id: k.value().1 });
            }
        }
        Ok(out)
    }
}

#[derive(Debug)]
pub struct Meta {
    db: Database,
    path: PathBuf,
}

impl Meta {
    pub fn open(path: &Path) -> Result<Meta, MetaError> {
        let db = Database::create(path).map_err(err)?;
        let meta = Meta { db, path: path.to_path_buf() };
        // Create every table, so readers never meet a missing one.
        meta.apply(&Batch::default())?;
        let tx = meta.db.begin_write().map_err(err)?;
        tx.delete_table(LEGACY_MAP).map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(meta)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn load(&self) -> Result<Loaded, MetaError> {
        let tx = self.db.begin_read().map_err(err)?;
        let mut out = Loaded::default();
        for row in tx.open_table(POOLS).map_err(err)?.iter().map_err(err)? {
            let (_, v) = row.map_err(err)?;
            out.pools.push(serde_json::from_slice(v.value()).map_err(err)?);
        }
        for row in tx.open_table(VOLUMES).map_err(err)?.iter().map_err(err)? {
            let (_, v) = row.map_err(err)?;
            out.volumes.push(serde_json::from_slice(v.value()).map_err(err)?);
        }
        for row in tx.open_table(OWNERS).map_err(err)?.iter().map_err(err)? {
            let (k, v) = row.map_err(err)?;
            let (pool, id) = k.value();
            let (volume, vchunk, copy) = v.value();
            out.owners.push(MapEntry { volume: volume.into(), pool: pool.into(), vchunk, copy, id });
        }
        for row in tx.open_table(USAGE).map_err(err)?.iter().map_err(err)? {
            let (k, v) = row.map_err(err)?;
            out.usage.insert(k.value().into(), serde_json::from_slice(v.value()).map_err(err)?);
        }
        Ok(out)
    }

    /// The owner records of `pool`, or of its volume `volume` only.
    pub fn owners(&self, pool: &str, volume: Option<&str>) -> Result<Vec<MapEntry>, MetaError> {
        self.snapshot()?.owners(pool, volume)
    }

    /// The store as of the last commit, for reading at leisure.
    pub fn snapshot(&self) -> Result<Snapshot, MetaError> {
        Ok(Snapshot(self.db.begin_read().map_err(err)?))
    }

    /// The meter of `volume` at the last sample at or before `at`.
    pub fn sample_before(&self, volume: &str, at: u64) -> Result<Option<(u64, UsageRecord)>, MetaError> {
        let tx = self.db.begin_read().map_err(err)?;
        let table = tx.open_table(USAGE_LOG).map_err(err)?;
        let last = table.range((volume, 0)..=(volume, at)).map_err(err)?.next_back();
        match last {
            Some(row) => {
                let (k, v) = row.map_err(err)?;
                Ok(Some((k.value().1, serde_json::from_slice(v.value()).map_err(err)?)))
            }
            None => Ok(None),
        }
    }

    /// Applies `batch` in one durable transaction.
    pub fn apply(&self, batch: &Batch) -> Result<(), MetaError> {
        let tx = self.db.begin_write().map_err(err)?;
        {
            let mut pools = tx.open_table(POOLS).map_err(err)?;
            for p in &batch.pools {
                pools.insert(p.name.as_str(), serde_json::to_vec(p).map_err(err)?.as_slice()).map_err(err)?;
            }
            let mut volumes = tx.open_table(VOLUMES).map_err(err)?;
            for v in &batch.volumes {
                volumes.insert(v.name.as_str(), serde_json::to_vec(v).map_err(err)?.as_slice()).map_err(err)?;
            }
            let mut owners = tx.open_table(OWNERS).map_err(err)?;
            // Unmaps first: a chunk freed and mapped again in one batch
            // (impossible today: freed chunks wait for the commit) would
            // otherwise lose its new owner.
            for e in &batch.unmapped {
                owners.remove((e.pool.as_str(), e.id)).map_err(err)?;
            }
            // In key order: neighbouring inserts share B-tree pages.
            let mut mapped: Vec<&MapEntry> = batch.mapped.iter().collect();
            mapped.sort_unstable_by(|a, b| (a.pool.as_str(), a.id).cmp(&(b.pool.as_str(), b.id)));
            for e in mapped {
                owners.insert((e.pool.as_str(), e.id), (e.volume.as_str(), e.vchunk, e.copy)).map_err(err)?;
            }
            for (pool, id) in &batch.dropped_owners {
                owners.remove((pool.as_str(), *id)).map_err(err)?;
            }
            let mut usage = tx.open_table(USAGE).map_err(err)?;
            for (v, u) in &batch.usage {
                usage.insert(v.as_str(), serde_json::to_vec(u).map_err(err)?.as_slice()).map_err(err)?;
            }
            let mut log = tx.open_table(USAGE_LOG).map_err(err)?;
            for (v, at, u) in &batch.samples {
                log.insert((v.as_str(), *at), serde_json::to_vec(u).map_err(err)?.as_slice()).map_err(err)?;
            }
            // A deleted volume's chunks come in `unmapped`.
            for name in &batch.deleted_volumes {
                volumes.remove(name.as_str()).map_err(err)?;
                usage.remove(name.as_str()).map_err(err)?;
                let samples: Vec<u64> =
                    log.range((name.as_str(), 0)..=(name.as_str(), u64::MAX)).map_err(err)?.map(|r| r.map(|(k, _)| k.value().1)).collect::<Result<_, _>>().map_err(err)?;
                for at in samples {
                    log.remove((name.as_str(), at)).map_err(err)?;
                }
            }
        }
        tx.commit().map_err(err)
    }
}
