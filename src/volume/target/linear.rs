//! The linear target (dm-linear): the extent's bytes, in order, on one
//! store from a fixed offset.

use super::Target;
use crate::backend::{Allocation, Backend, ZeroMode};
use std::io;
use std::sync::Arc;

#[derive(Debug)]
pub struct LinearTarget {
    store: Arc<dyn Backend>,
    /// Store offset of the extent's first byte.
    offset: u64,
}

impl LinearTarget {
    pub fn new(store: Arc<dyn Backend>, offset: u64) -> LinearTarget {
        LinearTarget { store, offset }
    }
}

impl Target for LinearTarget {
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.store.read_at(buf, self.offset + offset)
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.store.write_at(data, self.offset + offset, fua)
    }

    fn trim(&self, offset: u64, length: u64, fua: bool) -> io::Result<()> {
        self.store.trim(self.offset + offset, length, fua)
    }

    fn write_zeroes(&self, offset: u64, length: u64, mode: ZeroMode, fua: bool) -> io::Result<()> {
        self.store.write_zeroes(self.offset + offset, length, mode, fua)
    }

    fn block_status(&self, offset: u64, length: u64, max_runs: usize) -> io::Result<Vec<Allocation>> {
        self.store.block_status(self.offset + offset, length, max_runs)
    }

    fn cache(&self, offset: u64, length: u64) -> io::Result<()> {
        self.store.cache(self.offset + offset, length)
    }

    fn fast_zero_certain(&self, mode: ZeroMode) -> bool {
        self.store.fast_zero_certain(mode)
    }

    fn stores(&self) -> &[Arc<dyn Backend>] {
        std::slice::from_ref(&self.store)
    }
}
