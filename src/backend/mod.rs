//! Backing stores: where a volume's bytes finally live. One trait, one
//! implementation over a file descriptor that covers regular files, block
//! devices and memory (a memfd), because they differ only in how size,
//! discard, zeroing and allocation are asked of the kernel.
//!
//! Every call is a blocking syscall; the `server` runs them on its I/O
//! worker threads, never on an event loop.

mod aligned;
mod allocation;
pub use aligned::AlignedBuf;
mod blockdev;
mod delay;
mod fault;
mod fd;
mod open;

pub use delay::DelayBackend;
pub use fault::{Fault, FaultError, FaultScope, FaultSwitch, FaultyBackend};
pub use fd::{FdBackend, StoreKind};
pub use open::{file_identity, open_backend, BackendSpec, OpenError, Sharing};

use std::io;
use std::path::PathBuf;

/// How WRITE_ZEROES may be carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZeroMode {
    /// The range may become a hole (no NBD_CMD_FLAG_NO_HOLE).
    pub may_trim: bool,
    /// Fail with EOPNOTSUPP unless it can be done faster than writing zeros
    /// (NBD_CMD_FLAG_FAST_ZERO).
    pub fast_only: bool,
}

/// A run of the store with one allocation state (base:allocation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocation {
    pub length: u64,
    /// Reads as zeros and occupies no space.
    pub hole: bool,
}

/// Facts about a store, for status output and export flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreInfo {
    pub kind: StoreKind,
    pub path: Option<PathBuf>,
    pub size: u64,
    pub rotational: bool,
    pub direct: bool,
    /// Smallest I/O unit the store accepts (1 unless O_DIRECT).
    pub min_io: u32,
}

pub trait Backend: Send + Sync + std::fmt::Debug {
    fn info(&self) -> &StoreInfo;
    fn size(&self) -> u64 {
        self.info().size
    }
    /// Whether a single small I/O may take long (disks, O_DIRECT, added
    /// latency). Requests to stores that cannot are run inline by the
    /// connection's reader instead of being handed to the I/O pool.
    fn may_block(&self) -> bool {
        let info = self.info();
        info.rotational || info.direct || info.kind == StoreKind::BlockDevice
    }
    /// Fills all of `buf` or fails: callers hand in reused buffers holding
    /// other data, so a partial fill reported as success would leak it.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// With `fua`, the data is durable when this returns.
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()>;
    /// Discard: the range's contents become unspecified (zeros for files).
    fn trim(&self, offset: u64, length: u64, fua: bool) -> io::Result<()>;
    fn write_zeroes(&self, offset: u64, length: u64, mode: ZeroMode, fua: bool) -> io::Result<()>;
    /// Whether a fast zeroing in `mode` is certain to succeed without
    /// falling back, known before trying. Needed when one FAST_ZERO request
    /// spans several stores: the protocol wants ENOTSUP with nothing
    /// changed, so every part must be known fast before any part runs.
    fn fast_zero_certain(&self, mode: ZeroMode) -> bool;
    /// Makes every write completed before this call durable. Cheap when
    /// nothing was written since the last flush.
    fn flush(&self) -> io::Result<()>;
    /// Allocation map of `[offset, offset+length)`, at most `max_runs` runs
    /// (the last run may stop short of the end).
    fn block_status(&self, offset: u64, length: u64, max_runs: usize) -> io::Result<Vec<Allocation>>;
    /// Prefetch into the page cache (NBD_CMD_CACHE); advisory.
    fn cache(&self, offset: u64, length: u64) -> io::Result<()>;
}

/// The errno of a store error, for messages ("ENOSPC: ..."); EIO when the
/// error carries none.
pub fn errno_of(e: &io::Error) -> nix::errno::Errno {
    nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(nix::errno::Errno::EIO as i32))
}
