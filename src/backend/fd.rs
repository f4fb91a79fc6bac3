//! The one Backend implementation: a file descriptor onto a regular file, a
//! block device or a memfd.

use super::aligned::AlignedBuf;
use super::allocation::AllocationMap;
use super::{blockdev, Allocation, Backend, StoreInfo, ZeroMode};
use crate::sync::lock;
use nix::fcntl::{fallocate, posix_fadvise, FallocateFlags, Flock, PosixFadviseAdvice};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    File,
    BlockDevice,
    Memory,
}

#[derive(Debug)]
pub struct FdBackend {
    file: File,
    info: StoreInfo,
    /// Set after any completed change that is not yet known durable; cleared
    /// by `flush` just before it syncs. Lets FLUSH skip stores nobody wrote.
    dirty: AtomicBool,
    /// Serialises flushes so that a flush that finds `dirty` clear cannot
    /// return while an earlier flush's fdatasync is still running.
    flush_lock: Mutex<()>,
    /// The store's flock (see `open::lock`), held for its `Drop`: released
    /// only when the backend goes.
    #[allow(dead_code)]
    store_lock: Option<Flock<File>>,
    /// What BLOCK_STATUS learnt of the file's holes.
    allocation: AllocationMap,
    /// Other processes (the cluster's other nodes) write the store too:
    /// `dirty` knows only this one's writes, so every flush syncs.
    others_write: bool,
    /// fdatasync calls made by `flush`.
    syncs: std::sync::atomic::AtomicU64,
}

/// Chunk size for writing zeros by hand when the kernel cannot do it.
const ZERO_CHUNK: usize = 1 << 20;

fn errno(e: nix::errno::Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

fn unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) | Some(libc::ENOTTY))
}

impl FdBackend {
    pub fn new(file: File, info: StoreInfo) -> FdBackend {
        FdBackend {
            file,
            info,
            dirty: AtomicBool::new(false),
            flush_lock: Mutex::new(()),
            store_lock: None,
            allocation: AllocationMap::default(),
            others_write: false,
            syncs: Default::default(),
        }
    }

    /// Marks the store as written by other processes too (see `Sharing`).
    pub fn written_by_others(mut self) -> FdBackend {
        self.others_write = true;
        self
    }

    /// How many times `flush` synced the store.
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    /// Keeps `lock` (the store's flock) as long as this backend lives.
    pub fn holding(mut self, lock: Flock<File>) -> FdBackend {
        self.store_lock = Some(lock);
        self
    }

    fn mark_dirty(&self) {
        self.dirty.store(true, Ordering::Release);
    }

    /// After a metadata change (punch, zero): durable now if FUA, else later.
    fn settle(&self, fua: bool) -> io::Result<()> {
        if fua {
            nix::unistd::fdatasync(self.file.as_raw_fd()).map_err(errno)
        } else {
            self.mark_dirty();
            Ok(())
        }
    }

    fn is_direct_aligned(&self, offset: u64, len: usize) -> bool {
        let unit = self.info.min_io as u64;
        offset.is_multiple_of(unit) && (len as u64).is_multiple_of(unit)
    }

    fn pwrite_all(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        if !fua {
            return self.file.write_all_at(buf, offset);
        }
        // RWF_DSYNC makes just this write durable, instead of syncing every
        // dirty page of the store as fdatasync would.
        let mut done = 0usize;
        while done < buf.len() {
            let iov = libc::iovec { iov_base: buf[done..].as_ptr() as *mut _, iov_len: buf.len() - done };
            // Raw libc: nix 0.29 wraps pwritev but not pwritev2 (no RWF_*
            // flags), and RWF_DSYNC is the point of this call.
            // SAFETY: iov points into `buf`, which outlives the call; the
            // kernel only reads from it.
            let n = unsafe { libc::pwritev2(self.file.as_raw_fd(), &iov, 1, (offset + done as u64) as i64, libc::RWF_DSYNC) };
            if n < 0 {
                let err = io::Error::last_os_error();
                match err.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => {
                        self.file.write_all_at(&buf[done..], offset + done as u64)?;
                        return nix::unistd::fdatasync(self.file.as_raw_fd()).map_err(errno);
                    }
                    _ => return Err(err),
                }
            }
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::WriteZero, "pwritev2 wrote nothing"));
            }
            done += n as usize;
        }
        Ok(())
    }

    fn write_zero_buffers(&self, offset: u64, length: u64, fua: bool) -> io::Result<()> {
        let mut zeros = AlignedBuf::zeroed(ZERO_CHUNK.min(length as usize));
        let mut pos = 0u64;
        while pos < length {
            let n = (length - pos).min(ZERO_CHUNK as u64) as usize;
            self.file.write_all_at(&zeros.as_mut_slice()[..n], offset + pos)?;
            pos += n as u64;
        }
        self.settle(fua)
    }

    /// Every hole this store makes, it makes here: BLOCK_STATUS forgets
    /// its known data run before and after the punch (a scan racing it
    /// may still keep the data it saw: see `allocation.rs`).
    fn fallocate(&self, flags: FallocateFlags, offset: u64, length: u64) -> io::Result<()> {
        let punch = flags.contains(FallocateFlags::FALLOC_FL_PUNCH_HOLE);
        if punch {
            self.allocation.forget();
        }
        let result = fallocate(self.file.as_raw_fd(), flags, offset as i64, length as i64).map_err(errno);
        if punch {
            self.allocation.forget();
        }
        result
    }
}

impl Drop for FdBackend {
    /// Last handle gone (store removed by a reload, or shutdown): nothing
    /// written through it may be left unsynced.
    fn drop(&mut self) {
        if self.dirty.load(Ordering::Acquire) && self.info.kind != StoreKind::Memory {
            if let Err(e) = nix::unistd::fdatasync(self.file.as_raw_fd()) {
                tracing::error!(path = ?self.info.path, error = %e, "final sync of a closed store failed");
            }
        }
    }
}

fn is_page_aligned(p: *const u8) -> bool {
    (p as usize).is_multiple_of(AlignedBuf::ALIGN)
}

impl Backend for FdBackend {
    fn info(&self) -> &StoreInfo {
        &self.info
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if self.info.direct {
            if !self.is_direct_aligned(offset, buf.len()) {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            // The server's buffers are page-aligned already: no bounce.
            if is_page_aligned(buf.as_ptr()) {
                return self.file.read_exact_at(buf, offset);
            }
            let mut bounce = AlignedBuf::zeroed(buf.len());
            self.file.read_exact_at(bounce.as_mut_slice(), offset)?;
            buf.copy_from_slice(&bounce.as_slice()[..buf.len()]);
            return Ok(());
        }
        match self.file.read_exact_at(buf, offset) {
            // A file shortened behind our back reads as zeros past its end,
            // like a sparse tail; anything else is a real error.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && self.info.kind == StoreKind::File => {
                let len = self.file.metadata()?.len();
                let valid = len.saturating_sub(offset).min(buf.len() as u64) as usize;
                self.file.read_exact_at(&mut buf[..valid], offset)?;
                buf[valid..].fill(0);
                Ok(())
            }
            other => other,
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        if self.info.direct {
            if !self.is_direct_aligned(offset, buf.len()) {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            if is_page_aligned(buf.as_ptr()) {
                self.pwrite_all(buf, offset, fua)?;
            } else {
                let mut bounce = AlignedBuf::zeroed(buf.len());
                bounce.as_mut_slice()[..buf.len()].copy_from_slice(buf);
                self.pwrite_all(&bounce.as_slice()[..buf.len()], offset, fua)?;
            }
        } else {
            self.pwrite_all(buf, offset, fua)?;
        }
        if !fua {
            self.mark_dirty();
        }
        Ok(())
    }

    fn trim(&self, offset: u64, length: u64, fua: bool) -> io::Result<()> {
        if length == 0 {
            return Ok(());
        }
        let result = match self.info.kind {
            StoreKind::BlockDevice => blockdev::discard(&self.file, offset, length),
            _ => self.fallocate(FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE, offset, length),
        };
        match result {
            // Trim is advisory: a store that cannot discard keeps its data.
            Err(e) if unsupported(&e) => Ok(()),
            Err(e) => Err(e),
            Ok(()) => self.settle(fua),
        }
    }

    fn write_zeroes(&self, offset: u64, length: u64, mode: ZeroMode, fua: bool) -> io::Result<()> {
        if length == 0 {
            return Ok(());
        }
        let punch = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        let zero_range = FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        // Fast ways first: punching a hole (files, and block devices that
        // can discard with guaranteed zeroes) or an allocating zero-range.
        if mode.may_trim {
            match self.fallocate(punch, offset, length) {
                Ok(()) => return self.settle(fua),
                Err(e) if !unsupported(&e) => return Err(e),
                Err(_) => {}
            }
        }
        if self.info.kind != StoreKind::BlockDevice {
            match self.fallocate(zero_range, offset, length) {
                Ok(()) => return self.settle(fua),
                Err(e) if !unsupported(&e) => return Err(e),
                Err(_) => {}
            }
            // tmpfs has no ZERO_RANGE, but punching and then allocating
            // gives provisioned zeros just as fast.
            if self.fallocate(punch, offset, length).is_ok() {
                self.fallocate(FallocateFlags::FALLOC_FL_KEEP_SIZE, offset, length)?;
                return self.settle(fua);
            }
        }
        if mode.fast_only {
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        }
        if self.info.kind == StoreKind::BlockDevice {
            match blockdev::zero_out(&self.file, offset, length) {
                Ok(()) => return self.settle(fua),
                Err(e) if !unsupported(&e) => return Err(e),
                Err(_) => {}
            }
        }
        self.write_zero_buffers(offset, length, fua)
    }

    fn fast_zero_certain(&self, _mode: ZeroMode) -> bool {
        // Files and memfds punch holes (then allocate for NO_HOLE) on every
        // Linux filesystem we serve from; a block device may or may not
        // discard with guaranteed zeroes, which is only known by trying.
        self.info.kind != StoreKind::BlockDevice
    }

    fn flush(&self) -> io::Result<()> {
        let _serial = lock(&self.flush_lock);
        if self.dirty.swap(false, Ordering::AcqRel) || self.others_write {
            if let Err(e) = nix::unistd::fdatasync(self.file.as_raw_fd()) {
                self.mark_dirty();
                return Err(errno(e));
            }
            self.syncs.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn block_status(&self, offset: u64, length: u64, max_runs: usize) -> io::Result<Vec<Allocation>> {
        if self.info.kind == StoreKind::BlockDevice {
            return Ok(vec![Allocation { length, hole: false }]);
        }
        self.allocation.scan(self.file.as_raw_fd(), offset, length, max_runs)
    }

    fn cache(&self, offset: u64, length: u64) -> io::Result<()> {
        posix_fadvise(self.file.as_raw_fd(), offset as i64, length as i64, PosixFadviseAdvice::POSIX_FADV_WILLNEED).map_err(errno)
    }
}
