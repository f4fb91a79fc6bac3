//! The old ioctl interface to the kernel NBD client: one socket, and a
//! thread blocked in NBD_DO_IT for the device's lifetime.

use super::error::AttachError;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

nix::ioctl_write_int_bad!(nbd_set_sock, nix::request_code_none!(0xab, 0));
nix::ioctl_write_int_bad!(nbd_set_blksize, nix::request_code_none!(0xab, 1));
nix::ioctl_none_bad!(nbd_do_it, nix::request_code_none!(0xab, 3));
nix::ioctl_none_bad!(nbd_clear_sock, nix::request_code_none!(0xab, 4));
nix::ioctl_write_int_bad!(nbd_set_size_blocks, nix::request_code_none!(0xab, 7));
nix::ioctl_none_bad!(nbd_disconnect, nix::request_code_none!(0xab, 8));
nix::ioctl_write_int_bad!(nbd_set_timeout, nix::request_code_none!(0xab, 9));
nix::ioctl_write_int_bad!(nbd_set_flags, nix::request_code_none!(0xab, 10));

fn dev(index: u32) -> String {
    format!("/dev/nbd{index}")
}

fn open(index: u32) -> Result<File, AttachError> {
    OpenOptions::new().read(true).write(true).open(dev(index)).map_err(|source| AttachError::OpenDevice { device: dev(index), source })
}

/// The first /dev/nbdN with no client attached.
pub fn free_device() -> Option<u32> {
    (0..256u32).find(|i| std::path::Path::new(&dev(*i)).exists() && !std::path::Path::new(&format!("/sys/block/nbd{i}/pid")).exists())
}

/// Whether /dev/nbdN has a non-zero size.
fn has_size(index: u32) -> bool {
    std::fs::read_to_string(format!("/sys/block/nbd{index}/size")).ok().and_then(|s| s.trim().parse::<u64>().ok()).is_some_and(|n| n > 0)
}

pub fn run(index: u32, sock: &OwnedFd, size: u64, block: u32, flags: u16, timeout: u64, ready: impl FnOnce() + Send) -> Result<(), AttachError> {
    let f = open(index)?;
    let fd = f.as_raw_fd();
    let e = |what: &'static str, source: nix::errno::Errno| AttachError::Ioctl { device: dev(index), what, source };
    // SAFETY: NBD ioctls on an open NBD device with integer arguments.
    unsafe {
        nbd_set_blksize(fd, block as i32).map_err(|x| e("NBD_SET_BLKSIZE", x))?;
        nbd_set_size_blocks(fd, (size / block as u64) as i32).map_err(|x| e("NBD_SET_SIZE_BLOCKS", x))?;
        nbd_set_timeout(fd, timeout as i32).map_err(|x| e("NBD_SET_TIMEOUT", x))?;
        nbd_set_flags(fd, flags as i32).map_err(|x| e("NBD_SET_FLAGS", x))?;
        nbd_set_sock(fd, sock.as_raw_fd()).map_err(|x| e("NBD_SET_SOCK", x))?;
    }
    // The kernel gives the disk its size only when NBD_DO_IT starts the
    // device (until then /sys/block/nbdN/size is 0), and NBD_DO_IT blocks
    // for the device's lifetime: report readiness from a helper thread once
    // the size shows, not before (a mount right after would fail).
    let done = AtomicBool::new(false);
    let result = std::thread::scope(|scope| {
        scope.spawn(|| {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !done.load(Ordering::SeqCst) && !has_size(index) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if !done.load(Ordering::SeqCst) {
                ready();
            }
        });
        // SAFETY: as above; returns when the device is disconnected.
        let result = unsafe { nbd_do_it(fd) };
        done.store(true, Ordering::SeqCst);
        result
    });
    // SAFETY: as above; a failure leaves nothing to undo.
    unsafe {
        let _ = nbd_clear_sock(fd);
    }
    result.map(|_| ()).map_err(|x| e("NBD_DO_IT", x))
}

pub fn disconnect(index: u32) -> Result<(), AttachError> {
    let f = open(index)?;
    // SAFETY: NBD_DISCONNECT on an open NBD device.
    unsafe { nbd_disconnect(f.as_raw_fd()) }.map_err(|source| AttachError::Ioctl { device: dev(index), what: "NBD_DISCONNECT", source })?;
    Ok(())
}
