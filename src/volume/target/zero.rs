//! The zero target (dm-zero): reads as zeros, has no stores.

use super::Target;
use crate::backend::{Allocation, Backend, ZeroMode};
use std::io;
use std::sync::Arc;

#[derive(Debug)]
pub struct ZeroTarget;

impl Target for ZeroTarget {
    fn read(&self, _offset: u64, buf: &mut [u8]) -> io::Result<()> {
        buf.fill(0);
        Ok(())
    }

    /// Zeros are already there; anything else has nowhere to go.
    fn write(&self, _offset: u64, data: &[u8], _fua: bool) -> io::Result<()> {
        if data.iter().all(|b| *b == 0) {
            Ok(())
        } else {
            Err(nix::errno::Errno::ENOSPC.into())
        }
    }

    fn trim(&self, _offset: u64, _length: u64, _fua: bool) -> io::Result<()> {
        Ok(())
    }

    fn write_zeroes(&self, _offset: u64, _length: u64, _mode: ZeroMode, _fua: bool) -> io::Result<()> {
        Ok(())
    }

    fn block_status(&self, _offset: u64, length: u64, _max_runs: usize) -> io::Result<Vec<Allocation>> {
        Ok(vec![Allocation { length, hole: true }])
    }

    fn cache(&self, _offset: u64, _length: u64) -> io::Result<()> {
        Ok(())
    }

    /// Trivially fast: nothing to do.
    fn fast_zero_certain(&self, _mode: ZeroMode) -> bool {
        true
    }

    fn stores(&self) -> &[Arc<dyn Backend>] {
        &[]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeros_in_zeros_out_data_refused() {
        let z = ZeroTarget;
        let mut buf = [7u8; 16];
        z.read(0, &mut buf).unwrap();
        assert_eq!(buf, [0; 16]);
        z.write(0, &[0; 16], false).unwrap();
        assert_eq!(z.write(0, &[1], false).unwrap_err().raw_os_error(), Some(nix::errno::Errno::ENOSPC as i32));
        assert_eq!(z.block_status(0, 10, 4).unwrap(), vec![Allocation { length: 10, hole: true }]);
    }
}
