//! Block-device ioctls and sysfs lookups.

use std::io;
use std::os::fd::AsRawFd;

nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
nix::ioctl_write_ptr_bad!(blkdiscard, nix::request_code_none!(0x12, 119), [u64; 2]);
nix::ioctl_write_ptr_bad!(blkzeroout, nix::request_code_none!(0x12, 127), [u64; 2]);
nix::ioctl_read_bad!(blksszget, nix::request_code_none!(0x12, 104), libc::c_int);

pub fn size(fd: &impl AsRawFd) -> io::Result<u64> {
    let mut size = 0u64;
    // SAFETY: BLKGETSIZE64 writes one u64.
    unsafe { blkgetsize64(fd.as_raw_fd(), &mut size) }.map_err(io::Error::from)?;
    Ok(size)
}

pub fn logical_block_size(fd: &impl AsRawFd) -> io::Result<u32> {
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int.
    unsafe { blksszget(fd.as_raw_fd(), &mut size) }.map_err(io::Error::from)?;
    Ok(size.max(1) as u32)
}

pub fn discard(fd: &impl AsRawFd, offset: u64, length: u64) -> io::Result<()> {
    // SAFETY: the kernel reads a [u64; 2] range.
    unsafe { blkdiscard(fd.as_raw_fd(), &[offset, length]) }.map_err(io::Error::from)?;
    Ok(())
}

pub fn zero_out(fd: &impl AsRawFd, offset: u64, length: u64) -> io::Result<()> {
    // SAFETY: the kernel reads a [u64; 2] range.
    unsafe { blkzeroout(fd.as_raw_fd(), &[offset, length]) }.map_err(io::Error::from)?;
    Ok(())
}

/// Whether the device `major:minor` (or, for a file, the device holding it)
/// is rotational, from sysfs. Partitions look at their parent's queue.
pub fn is_rotational(major: u64, minor: u64) -> bool {
    let dev = format!("/sys/dev/block/{major}:{minor}");
    let Ok(real) = std::fs::canonicalize(&dev) else { return false };
    for candidate in [real.join("queue/rotational"), real.join("../queue/rotational")] {
        if let Ok(text) = std::fs::read_to_string(candidate) {
            return text.trim() == "1";
        }
    }
    false
}
