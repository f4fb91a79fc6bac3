//! A store wrapper that adds fixed latency to every data operation, like
//! nbdkit's delay filter: for testing drains and timeouts against a slow
//! disk, and for demonstrating that a pause only holds the ranges it must.

use super::{Allocation, Backend, StoreInfo, ZeroMode};
use std::io;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug)]
pub struct DelayBackend {
    inner: Arc<dyn Backend>,
    delay: Duration,
}

impl DelayBackend {
    pub fn wrap(inner: Arc<dyn Backend>, delay: Duration) -> Arc<dyn Backend> {
        Arc::new(DelayBackend { inner, delay })
    }
}

impl Backend for DelayBackend {
    fn info(&self) -> &StoreInfo {
        self.inner.info()
    }
    fn may_block(&self) -> bool {
        true
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        std::thread::sleep(self.delay);
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        std::thread::sleep(self.delay);
        self.inner.write_at(buf, offset, fua)
    }
    fn trim(&self, offset: u64, length: u64, fua: bool) -> io::Result<()> {
        std::thread::sleep(self.delay);
        self.inner.trim(offset, length, fua)
    }
    fn write_zeroes(&self, offset: u64, length: u64, mode: ZeroMode, fua: bool) -> io::Result<()> {
        std::thread::sleep(self.delay);
        self.inner.write_zeroes(offset, length, mode, fua)
    }
    fn fast_zero_certain(&self, mode: ZeroMode) -> bool {
        self.inner.fast_zero_certain(mode)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn block_status(&self, offset: u64, length: u64, max_runs: usize) -> io::Result<Vec<Allocation>> {
        self.inner.block_status(offset, length, max_runs)
    }
    fn cache(&self, offset: u64, length: u64) -> io::Result<()> {
        self.inner.cache(offset, length)
    }
}
