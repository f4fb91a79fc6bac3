//! The remote target: an extent whose stores this node cannot reach (a
//! cluster backend's `nodes` leaves it out). Its pieces go, as ranges of
//! the *volume*, to a node that can, over NBD (`crate::remote`); that node
//! places them with its own table, the same committed table as ours.
//!
//! Forwarding volume ranges rather than store ranges keeps every layout
//! out of this file and lets the serving node's gate and fence apply to
//! forwarded I/O as to its own clients'. The connections are stamped with
//! the generation of the table this target belongs to, so the serving
//! node refuses them once the two nodes' tables are a barrier apart
//! (`server/forwarded.rs`).

use super::Target;
use crate::backend::{Allocation, Backend, ZeroMode};
pub use crate::remote::{within, OnStarted, Started};
use crate::remote::{RemoteExport, RemoteStatus};
use std::fmt::Debug;
use std::io;
use std::sync::Arc;

/// Finds a node for extents whose stores are not open here (provided by
/// the daemon in cluster mode; it knows the members and who reaches what).
pub trait Forwarder: Send + Sync + Debug {
    /// The volume on a node that reaches every store in `stores`, stamped
    /// with `generation`; extents asking for the same stores may share it.
    fn export_for(&self, generation: u64, stores: &[&str]) -> Result<Arc<RemoteExport>, String>;
}

#[derive(Debug)]
pub struct RemoteTarget {
    export: Arc<RemoteExport>,
    /// Volume offset of the extent's first byte.
    start: u64,
    /// The stores the extent needs, for status.
    stores: Vec<String>,
}

impl RemoteTarget {
    pub fn new(export: Arc<RemoteExport>, start: u64, stores: Vec<String>) -> RemoteTarget {
        RemoteTarget { export, start, stores }
    }

    /// Starts a READ or WRITE of `length` bytes at `offset` in the extent
    /// without waiting (see `RemoteExport::start`): the request's thread
    /// goes on while the other node works, and the reply is sent from the
    /// link's reader, with no I/O thread parked on it.
    pub fn start(&self, offset: u64, length: u32, write: Option<(&[u8], bool)>, done: OnStarted) {
        self.export.start(self.start + offset, length, write, done)
    }
}

impl Target for RemoteTarget {
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.export.read(self.start + offset, buf)
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.export.write(self.start + offset, data, fua)
    }

    fn trim(&self, offset: u64, length: u64, fua: bool) -> io::Result<()> {
        self.export.trim(self.start + offset, length, fua)
    }

    fn write_zeroes(&self, offset: u64, length: u64, mode: ZeroMode, fua: bool) -> io::Result<()> {
        self.export.write_zeroes(self.start + offset, length, !mode.may_trim, mode.fast_only, fua)
    }

    /// The other node's `base:allocation` of the range (its table places
    /// it), so a sparse copy through this node skips the holes too.
    fn block_status(&self, offset: u64, length: u64, max_runs: usize) -> io::Result<Vec<Allocation>> {
        let runs = self.export.block_status(self.start + offset, length, max_runs)?;
        Ok(runs.into_iter().map(|(length, hole)| Allocation { length, hole }).collect())
    }

    fn cache(&self, offset: u64, length: u64) -> io::Result<()> {
        self.export.cache(self.start + offset, length)
    }

    /// FLUSH on the other node makes what it answered durable there.
    fn flush(&self) -> io::Result<()> {
        self.export.flush()
    }

    fn flushes_itself(&self) -> bool {
        true
    }

    fn may_block(&self) -> bool {
        true
    }

    fn min_io(&self) -> u32 {
        1
    }

    fn rotational(&self) -> bool {
        false
    }

    /// Not knowable here: a FAST_ZERO spanning this extent and another
    /// gets ENOTSUP, which clients answer by writing zeros.
    fn fast_zero_certain(&self, _mode: ZeroMode) -> bool {
        false
    }

    fn stores(&self) -> &[Arc<dyn Backend>] {
        &[]
    }

    fn as_remote(&self) -> Option<&RemoteTarget> {
        Some(self)
    }

    fn forwarding(&self) -> Option<(Vec<String>, RemoteStatus)> {
        Some((self.stores.clone(), self.export.status()))
    }
}
