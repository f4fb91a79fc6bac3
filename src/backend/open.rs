//! Opening a store from its configuration: detect file vs block device,
//! create sparse files, lock against a second server using the same store.

use super::{blockdev, Backend, FdBackend, StoreInfo, StoreKind};
use std::fs::{File, OpenOptions};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg, OFlag};
use nix::sys::stat::{major, minor};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::Arc;

/// What the config says about one store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSpec {
    pub name: String,
    /// `None` for a memory store.
    pub path: Option<PathBuf>,
    pub size: Option<u64>,
    pub direct: bool,
    pub read_only: bool,
    /// Added latency per data operation (testing; see `DelayBackend`).
    pub delay: Option<std::time::Duration>,
    pub sharing: Sharing,
}

/// Who else may write the store while this process has it open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sharing {
    /// Nobody: an exclusive flock keeps a second server (or qemu) out.
    #[default]
    Exclusive,
    /// The other nodes of this cluster: a shared flock (a server outside
    /// the cluster, which locks exclusively, is still kept out), and every
    /// FLUSH syncs, because writes another node answered are in the file
    /// too and this node cannot know of them.
    Cluster,
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("backend '{name}': {path}: {source}")]
    Io { name: String, path: String, source: std::io::Error },
    #[error("backend '{name}': {message}")]
    Invalid { name: String, message: String },
}

fn io_err(spec: &BackendSpec, source: std::io::Error) -> OpenError {
    let path = spec.path.as_ref().map_or("memory".to_string(), |p| p.display().to_string());
    OpenError::Io { name: spec.name.clone(), path, source }
}

fn invalid(spec: &BackendSpec, message: impl Into<String>) -> OpenError {
    OpenError::Invalid { name: spec.name.clone(), message: message.into() }
}

/// Opens (creating a sparse file if needed) the store described by `spec`.
/// The store is locked with `flock(LOCK_EX)` so that a second nbdvirt, or
/// qemu, cannot write it at the same time.
pub fn open_backend(spec: &BackendSpec) -> Result<Arc<dyn Backend>, OpenError> {
    let store = open_store(spec)?;
    Ok(match spec.delay {
        Some(delay) if !delay.is_zero() => super::DelayBackend::wrap(store, delay),
        _ => store,
    })
}

fn open_store(spec: &BackendSpec) -> Result<Arc<dyn Backend>, OpenError> {
    let Some(path) = &spec.path else { return open_memory(spec) };
    let exists = path.exists();
    if !exists {
        let size = spec.size.ok_or_else(|| invalid(spec, format!("{} does not exist; give `size` to create it", path.display())))?;
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| io_err(spec, e))?;
        }
        // Sized under a temporary name, then linked into place (which
        // fails if the name exists): a cluster's nodes may create the same
        // shared file at once, and none may open it half made.
        let tmp = path.with_file_name(format!(".{}.{}.new", path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(), std::process::id()));
        // One a crash left behind (a process of the same pid) is ours.
        let _ = std::fs::remove_file(&tmp);
        let file = OpenOptions::new().write(true).create_new(true).open(&tmp).map_err(|e| io_err(spec, e))?;
        let linked = file.set_len(size).and_then(|()| std::fs::hard_link(&tmp, path));
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => tracing::info!(backend = %spec.name, path = %path.display(), size, "created sparse file"),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            // A filesystem without hard links: created in place, as before
            // (only nodes sharing one such file at once could race).
            Err(_) => {
                let file = OpenOptions::new().write(true).create_new(true).open(path).map_err(|e| io_err(spec, e))?;
                file.set_len(size).map_err(|e| io_err(spec, e))?;
                tracing::info!(backend = %spec.name, path = %path.display(), size, "created sparse file");
            }
        }
    }
    let mut options = OpenOptions::new();
    options.read(true).write(!spec.read_only);
    if spec.direct {
        options.custom_flags(OFlag::O_DIRECT.bits());
    }
    let file = options.open(path).map_err(|e| io_err(spec, e))?;
    let lock = lock(spec, &file)?;
    let meta = file.metadata().map_err(|e| io_err(spec, e))?;
    let (kind, size, rotational, min_io) = if meta.file_type().is_block_device() {
        let dev_size = blockdev::size(&file).map_err(|e| io_err(spec, e))?;
        let size = match spec.size {
            Some(s) if s > dev_size => return Err(invalid(spec, format!("size {s} exceeds the device's {dev_size} bytes"))),
            Some(s) => s,
            None => dev_size,
        };
        let sector = if spec.direct { blockdev::logical_block_size(&file).map_err(|e| io_err(spec, e))? } else { 1 };
        let rdev = meta.rdev();
        (StoreKind::BlockDevice, size, blockdev::is_rotational(major(rdev), minor(rdev)), sector)
    } else if meta.file_type().is_file() {
        let len = meta.len();
        let size = match spec.size {
            None => len,
            Some(s) if s == len => s,
            Some(s) if s > len && !spec.read_only => {
                // Growing is safe (new space reads as zeros); shrinking would
                // hide data, so it is refused below.
                file.set_len(s).map_err(|e| io_err(spec, e))?;
                tracing::info!(backend = %spec.name, from = len, to = s, "grew sparse file to configured size");
                s
            }
            Some(s) => {
                return Err(invalid(
                    spec,
                    format!("{} is {len} bytes but size = {s}; remove `size` to use the file as it is", path.display()),
                ))
            }
        };
        let dev = meta.dev();
        let unit = if spec.direct { 4096 } else { 1 };
        (StoreKind::File, size, blockdev::is_rotational(major(dev), minor(dev)), unit)
    } else {
        return Err(invalid(spec, format!("{} is neither a regular file nor a block device", path.display())));
    };
    if size == 0 {
        return Err(invalid(spec, format!("{} has size 0", path.display())));
    }
    let info = StoreInfo { kind, path: Some(path.clone()), size, rotational, direct: spec.direct, min_io };
    let backend = FdBackend::new(file, info).holding(lock);
    Ok(Arc::new(match spec.sharing {
        Sharing::Exclusive => backend,
        Sharing::Cluster => backend.written_by_others(),
    }))
}

fn open_memory(spec: &BackendSpec) -> Result<Arc<dyn Backend>, OpenError> {
    let size = spec.size.filter(|s| *s > 0).ok_or_else(|| invalid(spec, "a memory backend needs a `size`"))?;
    let name = std::ffi::CString::new(format!("nbdvirt:{}", spec.name)).map_err(|_| invalid(spec, "name contains NUL"))?;
    let fd = nix::sys::memfd::memfd_create(&name, nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
        .map_err(|e| io_err(spec, std::io::Error::from_raw_os_error(e as i32)))?;
    let file = File::from(fd);
    file.set_len(size).map_err(|e| io_err(spec, e))?;
    let info = StoreInfo { kind: StoreKind::Memory, path: None, size, rotational: false, direct: false, min_io: 1 };
    Ok(Arc::new(FdBackend::new(file, info)))
}

/// Takes the store's flock (shared when read-only), so that a second
/// server (or qemu) cannot write the same store. The lock is taken on a
/// duplicate descriptor, which shares the open file description and hence
/// the lock; the backend keeps it for its lifetime.
fn lock(spec: &BackendSpec, file: &File) -> Result<Flock<File>, OpenError> {
    let arg = if spec.read_only || spec.sharing == Sharing::Cluster { FlockArg::LockSharedNonblock } else { FlockArg::LockExclusiveNonblock };
    let dup = file.try_clone().map_err(|e| io_err(spec, e))?;
    Flock::lock(dup, arg).map_err(|(_, errno)| {
        if errno == Errno::EWOULDBLOCK {
            let path = spec.path.as_ref().map_or_else(String::new, |p| p.display().to_string());
            invalid(spec, format!("{path} is locked by another process (another nbdvirt or qemu using it?)"))
        } else {
            io_err(spec, std::io::Error::from(errno))
        }
    })
}

/// Identity of an opened store's file, to notice two backend names for the
/// same file.
pub fn file_identity(path: &std::path::Path) -> Option<(u64, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    let id = if meta.file_type().is_block_device() { (u64::MAX, meta.rdev()) } else { (meta.dev(), meta.ino()) };
    Some(id)
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_is_locked_while_open() {
        let dir = tempfile::tempdir().unwrap();
        let spec = BackendSpec { name: "s".into(), path: Some(dir.path().join("s.img")), size: Some(1 << 20), direct: false, read_only: false, delay: None, sharing: Default::default() };
        let first = open_backend(&spec).unwrap();
        let err = open_backend(&spec).unwrap_err();
        assert!(err.to_string().contains("locked by another process"), "{err}");
        drop(first);
        open_backend(&spec).expect("the lock goes with the backend");
    }

    #[test]
    fn cluster_nodes_share_a_store_that_others_cannot_take() {
        let dir = tempfile::tempdir().unwrap();
        let spec = BackendSpec { name: "s".into(), path: Some(dir.path().join("s.img")), size: Some(1 << 20), direct: false, read_only: false, delay: None, sharing: Sharing::Cluster };
        let a = open_backend(&spec).unwrap();
        let _b = open_backend(&spec).expect("a second node opens it too");
        let single = BackendSpec { sharing: Sharing::Exclusive, ..spec.clone() };
        assert!(open_backend(&single).unwrap_err().to_string().contains("locked by another process"));
        drop(a);
    }

    #[test]
    fn a_store_written_by_others_syncs_at_every_flush() {
        let dir = tempfile::tempdir().unwrap();
        let file = || std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(dir.path().join("f")).unwrap();
        let info = || StoreInfo { kind: StoreKind::File, path: None, size: 4096, rotational: false, direct: false, min_io: 1 };
        let alone = FdBackend::new(file(), info());
        alone.flush().unwrap();
        assert_eq!(alone.syncs(), 0, "nothing written here: nothing to sync");
        let shared = FdBackend::new(file(), info()).written_by_others();
        shared.flush().unwrap();
        shared.flush().unwrap();
        assert_eq!(shared.syncs(), 2, "another node may have written: always sync");
    }
}
