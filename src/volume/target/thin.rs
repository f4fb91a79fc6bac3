//! thin: a chunk-mapped pool volume (dm-thin). Chunk `c` of the extent
//! lives where the volume's [`ChunkMap`] says; an unmapped chunk reads as
//! zeros and is a hole in block status. The first write to a chunk maps one
//! (the rest of it reads zeros); a TRIM or WRITE_ZEROES covering whole
//! chunks unmaps them; FLUSH (and a FUA write to a new chunk) first flushes
//! the stores, then commits the map, so a mapping is never durable before
//! the data it points at.
//!
//! The map itself (allocation, commit, reclaim, metering) belongs to the
//! pool (`crate::pool`), which implements [`ChunkMap`]; the table only says
//! "thin, this chunk size", so this file knows nothing of pools.

use super::Target;
use crate::backend::{Allocation, Backend, ZeroMode};
use std::fmt::Debug;
use std::io;
use std::sync::Arc;

/// Where one mapped chunk lives.
#[derive(Debug, Clone)]
pub struct ChunkPlace {
    pub store: Arc<dyn Backend>,
    /// Store offset of the chunk's first byte.
    pub offset: u64,
}

/// A volume's chunk map, kept by its pool. Chunk numbers count from the
/// start of the volume.
pub trait ChunkMap: Send + Sync + Debug {
    fn chunk_size(&self) -> u64;
    /// Where chunk `c` lives, if mapped.
    fn lookup(&self, c: u64) -> Option<ChunkPlace>;
    /// Chunk `c`, mapped now if it was not (a new chunk reads zeros). When
    /// the pool has no free chunk: ENOSPC, at once or after the pool's
    /// queue timeout.
    fn map(&self, c: u64) -> io::Result<ChunkPlace>;
    /// Unmaps chunk `c` (its space returns to the pool once the unmapping
    /// is committed and no I/O that looked it up is still running).
    fn unmap(&self, c: u64) -> io::Result<()>;
    /// Accounts `bytes` written to chunk `c` (metering, recency).
    fn wrote(&self, c: u64, bytes: u64);
    /// Starts an I/O on looked-up chunks: until the matching `leave`, no
    /// chunk unmapped meanwhile is handed to anyone else.
    fn enter(&self) -> u64;
    fn leave(&self, token: u64);
    /// Makes every mapping change so far durable (flushing the stores
    /// first).
    fn commit(&self) -> io::Result<()>;
    /// Whether some mapping change is not yet durable.
    fn uncommitted(&self) -> bool;
    /// Every store the map may place chunks on.
    fn stores(&self) -> &[Arc<dyn Backend>];
}

#[derive(Debug)]
pub struct ThinTarget {
    map: Arc<dyn ChunkMap>,
    length: u64,
}

impl ThinTarget {
    pub fn new(map: Arc<dyn ChunkMap>, length: u64) -> ThinTarget {
        ThinTarget { map, length }
    }
}

impl Target for ThinTarget {
    fn read(&self, _offset: u64, _buf: &mut [u8]) -> io::Result<()> {
        let _ = self.length;
        todo!("thin read")
    }
    fn write(&self, _offset: u64, _data: &[u8], _fua: bool) -> io::Result<()> {
        todo!("thin write")
    }
    fn trim(&self, _offset: u64, _length: u64, _fua: bool) -> io::Result<()> {
        todo!("thin trim")
    }
    fn write_zeroes(&self, _offset: u64, _length: u64, _mode: ZeroMode, _fua: bool) -> io::Result<()> {
        todo!("thin zeroes")
    }
    fn block_status(&self, _offset: u64, _length: u64, _max_runs: usize) -> io::Result<Vec<Allocation>> {
        todo!("thin block status")
    }
    fn cache(&self, _offset: u64, _length: u64) -> io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        self.map.commit()
    }
    /// It flushes its own stores (then commits the map).
    fn redundant(&self) -> bool {
        true
    }
    fn fast_zero_certain(&self, _mode: ZeroMode) -> bool {
        false
    }
    fn stores(&self) -> &[Arc<dyn Backend>] {
        self.map.stores()
    }
}
