//! A store wrapper that fails on purpose, like device-mapper's `error`
//! target or nbdkit's error filter: for operators' drills ("what does the
//! guest do when its disk returns EIO?") and for tests. `nbdvirt fault`
//! turns it on and off at run time through the store's `FaultSwitch`.
//!
//! Every store the daemon opens is wrapped, so the switch must cost next to
//! nothing while off: each operation reads one relaxed atomic byte. Relaxed
//! is enough because a fault is not ordered against any other memory: an
//! operation racing the switch may see either state, exactly as if it had
//! run a moment earlier or later.

use super::{Allocation, Backend, StoreInfo, ZeroMode};
use std::io;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

/// The errno an injected fault returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultError {
    Eio,
    Enospc,
}

impl FaultError {
    pub fn errno(self) -> i32 {
        match self {
            FaultError::Eio => libc::EIO,
            FaultError::Enospc => libc::ENOSPC,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FaultError::Eio => "eio",
            FaultError::Enospc => "enospc",
        }
    }
}

/// Which operations an injected fault hits. "Writes" are everything that
/// changes the store: write, trim, write_zeroes (and flush for EIO).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultScope {
    Reads,
    Writes,
    Both,
}

impl FaultScope {
    pub fn as_str(self) -> &'static str {
        match self {
            FaultScope::Reads => "reads",
            FaultScope::Writes => "writes",
            FaultScope::Both => "reads and writes",
        }
    }
}

/// An active fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub error: FaultError,
    pub scope: FaultScope,
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} on {}", self.error.as_str(), self.scope.as_str())
    }
}

// The state packed into one byte, so that a reader sees the error kind and
// the scope together (two atomics could be read half-updated).
const OFF: u8 = 0;
const READS: u8 = 1;
const WRITES: u8 = 2;
const ERROR_SHIFT: u32 = 2;
const EIO: u8 = 1 << ERROR_SHIFT;
const ENOSPC: u8 = 2 << ERROR_SHIFT;
const ERROR_MASK: u8 = 3 << ERROR_SHIFT;

/// The run-time switch of one store's injected fault, shared between the
/// wrapper (which reads it) and the daemon (which sets it).
#[derive(Debug, Default)]
pub struct FaultSwitch {
    state: AtomicU8,
}

impl FaultSwitch {
    pub fn new() -> Arc<FaultSwitch> {
        Arc::new(FaultSwitch::default())
    }

    /// Turns the fault on (`Some`) or off (`None`).
    pub fn set(&self, fault: Option<Fault>) {
        let state = match fault {
            None => OFF,
            Some(Fault { error, scope }) => {
                let e = match error {
                    FaultError::Eio => EIO,
                    FaultError::Enospc => ENOSPC,
                };
                let s = match scope {
                    FaultScope::Reads => READS,
                    FaultScope::Writes => WRITES,
                    FaultScope::Both => READS | WRITES,
                };
                e | s
            }
        };
        self.state.store(state, Ordering::Relaxed);
    }

    /// The active fault, if any.
    pub fn get(&self) -> Option<Fault> {
        let state = self.state.load(Ordering::Relaxed);
        let error = error_of(state)?;
        let scope = match state & (READS | WRITES) {
            READS => FaultScope::Reads,
            WRITES => FaultScope::Writes,
            s if s == READS | WRITES => FaultScope::Both,
            _ => return None,
        };
        Some(Fault { error, scope })
    }

    /// For status output: "eio on reads", or `None` when off.
    pub fn describe(&self) -> Option<String> {
        self.get().map(|f| f.to_string())
    }

    /// The error for an operation of scope bit `bit`: the hot path, one
    /// relaxed load and a branch when off.
    #[inline]
    fn check(&self, bit: u8) -> io::Result<()> {
        let state = self.state.load(Ordering::Relaxed);
        if state & bit == 0 {
            return Ok(());
        }
        match error_of(state) {
            Some(e) => Err(io::Error::from_raw_os_error(e.errno())),
            None => Ok(()),
        }
    }

    /// FLUSH fails only while writes fail with EIO: a disk that has lost
    /// writes cannot make them durable, while ENOSPC refuses new data but
    /// what was written can still be synced.
    #[inline]
    fn check_flush(&self) -> io::Result<()> {
        let state = self.state.load(Ordering::Relaxed);
        if state & WRITES != 0 && state & ERROR_MASK == EIO {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }
}

fn error_of(state: u8) -> Option<FaultError> {
    match state & ERROR_MASK {
        EIO => Some(FaultError::Eio),
        ENOSPC => Some(FaultError::Enospc),
        _ => None,
    }
}

/// `inner`, failing as its switch says.
#[derive(Debug)]
pub struct FaultyBackend {
    inner: Arc<dyn Backend>,
    switch: Arc<FaultSwitch>,
}

impl FaultyBackend {
    pub fn wrap(inner: Arc<dyn Backend>, switch: Arc<FaultSwitch>) -> Arc<dyn Backend> {
        Arc::new(FaultyBackend { inner, switch })
    }
}

impl Backend for FaultyBackend {
    fn info(&self) -> &StoreInfo {
        self.inner.info()
    }
    fn may_block(&self) -> bool {
        self.inner.may_block()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.switch.check(READS)?;
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.switch.check(WRITES)?;
        self.inner.write_at(buf, offset, fua)
    }
    fn trim(&self, offset: u64, length: u64, fua: bool) -> io::Result<()> {
        self.switch.check(WRITES)?;
        self.inner.trim(offset, length, fua)
    }
    fn write_zeroes(&self, offset: u64, length: u64, mode: ZeroMode, fua: bool) -> io::Result<()> {
        self.switch.check(WRITES)?;
        self.inner.write_zeroes(offset, length, mode, fua)
    }
    fn fast_zero_certain(&self, mode: ZeroMode) -> bool {
        self.inner.fast_zero_certain(mode)
    }
    fn flush(&self) -> io::Result<()> {
        self.switch.check_flush()?;
        self.inner.flush()
    }
    // Allocation queries and prefetch are metadata/advice, not the data a
    // drill is about; leaving them working matches dm-error's reads/writes
    // split and keeps copiers' planning (not their I/O) unaffected.
    fn block_status(&self, offset: u64, length: u64, max_runs: usize) -> io::Result<Vec<Allocation>> {
        self.inner.block_status(offset, length, max_runs)
    }
    fn cache(&self, offset: u64, length: u64) -> io::Result<()> {
        self.inner.cache(offset, length)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{open_backend, BackendSpec};

    fn store() -> (Arc<dyn Backend>, Arc<FaultSwitch>) {
        let spec = BackendSpec { name: "m".into(), path: None, size: Some(1 << 20), direct: false, read_only: false, delay: None, sharing: Default::default() };
        let switch = FaultSwitch::new();
        (FaultyBackend::wrap(open_backend(&spec).unwrap(), switch.clone()), switch)
    }

    fn errno(r: io::Result<()>) -> Option<i32> {
        r.err().and_then(|e| e.raw_os_error())
    }

    const ZERO: ZeroMode = ZeroMode { may_trim: true, fast_only: false };

    #[test]
    fn off_passes_everything_through() {
        let (s, switch) = store();
        assert_eq!(switch.get(), None);
        s.write_at(&[7; 512], 0, false).unwrap();
        let mut buf = [0; 512];
        s.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [7; 512]);
        s.flush().unwrap();
    }

    #[test]
    fn eio_on_reads_fails_reads_only() {
        let (s, switch) = store();
        switch.set(Some(Fault { error: FaultError::Eio, scope: FaultScope::Reads }));
        assert_eq!(errno(s.read_at(&mut [0; 512], 0)), Some(libc::EIO));
        s.write_at(&[1; 512], 0, false).unwrap();
        s.trim(0, 512, false).unwrap();
        s.flush().unwrap();
        assert_eq!(switch.describe().as_deref(), Some("eio on reads"));
    }

    #[test]
    fn enospc_on_writes_fails_every_change_but_not_flush() {
        let (s, switch) = store();
        switch.set(Some(Fault { error: FaultError::Enospc, scope: FaultScope::Writes }));
        assert_eq!(errno(s.write_at(&[1; 512], 0, false)), Some(libc::ENOSPC));
        assert_eq!(errno(s.trim(0, 512, false)), Some(libc::ENOSPC));
        assert_eq!(errno(s.write_zeroes(0, 512, ZERO, false)), Some(libc::ENOSPC));
        s.flush().unwrap();
        s.read_at(&mut [0; 512], 0).unwrap();
    }

    #[test]
    fn eio_on_both_fails_flush_too_and_off_restores_data() {
        let (s, switch) = store();
        s.write_at(&[9; 512], 0, false).unwrap();
        switch.set(Some(Fault { error: FaultError::Eio, scope: FaultScope::Both }));
        assert_eq!(switch.get(), Some(Fault { error: FaultError::Eio, scope: FaultScope::Both }));
        assert_eq!(errno(s.read_at(&mut [0; 512], 0)), Some(libc::EIO));
        assert_eq!(errno(s.write_at(&[1; 512], 0, false)), Some(libc::EIO));
        assert_eq!(errno(s.flush()), Some(libc::EIO));
        // Allocation queries keep working during a drill.
        assert!(s.block_status(0, 4096, 8).is_ok());
        switch.set(None);
        assert_eq!(switch.describe(), None);
        let mut buf = [0; 512];
        s.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [9; 512]);
    }
}
