//! Keeping a TLS relay runnable when memory is short.
//!
//! Writeback to an NBD device that sits behind a userspace relay needs the
//! relay to run: if the kernel must write dirty pages to the device to free
//! memory, and the relay has to fault a page back in (or allocate one) to
//! forward that write, the system can deadlock. So the process that runs
//! the relays locks itself in memory (as nbd-client does for swap devices)
//! and marks itself an I/O flusher (PR_SET_IO_FLUSHER, Linux 5.6: its own
//! allocations then never wait on I/O and it is exempt from dirty
//! throttling). It also keeps itself from the OOM killer, as nbd-client
//! does for swap devices: killing it would take the device with it. None
//! of this makes swap on such a device safe; the docs say so.

/// PR_SET_IO_FLUSHER from <linux/prctl.h>; the libc crate defines it for
/// Android only.
const PR_SET_IO_FLUSHER: libc::c_int = 57;

/// CAP_IPC_LOCK from <linux/capability.h>.
const CAP_IPC_LOCK: u32 = 14;

/// What [`pin`] achieved; an `Err` is worth a warning, not a failure.
#[derive(Debug)]
pub struct Pinned {
    /// mlockall(MCL_CURRENT | MCL_FUTURE).
    pub locked: Result<(), PinError>,
    /// prctl(PR_SET_IO_FLUSHER, 1).
    pub io_flusher: Result<(), PinError>,
    /// /proc/self/oom_score_adj = -1000.
    pub oom_exempt: Result<(), PinError>,
}

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    /// Locked memory would count against a finite limit: with
    /// MCL_FUTURE, every mapping past it (a thread's stack, the heap
    /// growing) would then fail, which is worse than not locking.
    #[error("not locked: RLIMIT_MEMLOCK is {0} bytes and the process lacks CAP_IPC_LOCK")]
    Limited(u64),
    #[error("{0}")]
    Sys(#[from] nix::errno::Errno),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Locks this process's memory, present and future, and makes it an I/O
/// flusher. Call it before the relay threads start: they inherit the
/// flusher state, and the lock covers their stacks as they are mapped.
pub fn pin() -> Pinned {
    use nix::sys::mman::{mlockall, MlockAllFlags};
    let locked = match memlock_limit() {
        Some(limit) if !has_capability(CAP_IPC_LOCK) => Err(PinError::Limited(limit)),
        _ => mlockall(MlockAllFlags::MCL_CURRENT | MlockAllFlags::MCL_FUTURE).map_err(PinError::from),
    };
    // SAFETY: prctl with integer arguments only; no memory is passed.
    let rc = unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1 as libc::c_ulong, 0 as libc::c_ulong, 0 as libc::c_ulong, 0 as libc::c_ulong) };
    let io_flusher = nix::errno::Errno::result(rc).map(drop).map_err(PinError::from);
    let oom_exempt = std::fs::write("/proc/self/oom_score_adj", "-1000").map_err(PinError::from);
    Pinned { locked, io_flusher, oom_exempt }
}

/// RLIMIT_MEMLOCK's soft limit; `None` if unlimited (or unknown).
fn memlock_limit() -> Option<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct it is given, which lives here.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) };
    (rc == 0 && limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur)
}

/// Whether the effective capability set has `cap` (/proc/self/status).
fn has_capability(cap: u32) -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1u64 << cap) != 0)
}

