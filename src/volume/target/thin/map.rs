//! The interface between a thin target and its pool: where chunks live,
//! mapping and unmapping them, and the epochs that keep a chunk unmapped
//! under a running I/O from being handed to anyone else.

use crate::backend::Backend;
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
    /// A write of `[within, within+bytes)` of chunk `c`, made through
    /// `place`, is done: accounts it (as `wrote`) and says whether `c`
    /// still maps `place`. False: the chunk was unmapped meanwhile (the
    /// rest of it was zeroed, or reclaim took it), so the write may be
    /// lost; the target makes it again.
    fn wrote_to(&self, c: u64, within: u64, bytes: u64, place: &ChunkPlace) -> bool {
        let _ = (within, place);
        self.wrote(c, bytes);
        true
    }
    /// A partial TRIM or WRITE_ZEROES (that may leave holes) zeroed
    /// `[within, within+bytes)` of mapped chunk `c` on its store: a map
    /// that keeps track may unmap a chunk that now holds only zeros.
    fn zeroed(&self, c: u64, within: u64, bytes: u64) -> io::Result<()> {
        let _ = (c, within, bytes);
        Ok(())
    }
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
    /// Whether `map` may wait now (for space: `on_full = "queue"` and the
    /// pool short of free chunks). Small reads and writes on stores that
    /// never block run on the connection's reader or the CPU workers; a
    /// write waiting there for space would hold up that connection's
    /// reads, or other volumes, so while this says yes they go to the
    /// blocking pool. Asked per request: one atomic load.
    fn may_wait(&self) -> bool {
        false
    }
}
