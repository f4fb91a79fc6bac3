//! Binding the control socket so that nobody but the allowed users can
//! ever connect: the socket gets its final mode and group inside a fresh
//! mode-0700 directory beside its path, then is renamed into place. (A
//! process-wide umask around bind would race other threads creating files.)

use crate::config::ControlGroup;
use nix::unistd::{chown, Gid};
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

/// Binds `path` mode 0600, or 0660 owned by `group`.
pub fn bind_socket(path: &Path, group: Option<&ControlGroup>) -> io::Result<UnixListener> {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    create_dirs(parent, group)?;
    let name = path.file_name().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "control socket path has no file name"))?;
    let private = parent.join(format!(".{}.{}.bind", name.to_string_lossy(), std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    nix::unistd::mkdir(&private, nix::sys::stat::Mode::S_IRWXU)?;
    let bound = (|| {
        let inside = private.join(name);
        let listener = UnixListener::bind(&inside)?;
        let mode = match group {
            Some(g) => {
                give_to_group(&inside, path, g)?;
                0o660
            }
            None => 0o600,
        };
        std::fs::set_permissions(&inside, std::fs::Permissions::from_mode(mode))?;
        std::fs::rename(&inside, path)?;
        Ok(listener)
    })();
    let _ = std::fs::remove_dir_all(&private);
    bound
}

/// Gives `path` to the group; errors name `shown` (the socket's final
/// path, not the private one it is bound at).
fn give_to_group(path: &Path, shown: &Path, group: &ControlGroup) -> io::Result<()> {
    chown(path, None, Some(Gid::from_raw(group.gid))).map_err(|e| {
        let uid = nix::unistd::geteuid();
        io::Error::new(io::ErrorKind::PermissionDenied, format!("cannot give {} to control_group {group}: {e} (the server runs as uid {uid}: it must be root or a member of that group)", shown.display()))
    })
}

/// Creates the missing directories above the socket. With a control group
/// each one it creates is made 0750 and given to the group, so that the
/// members can reach the socket; a directory that already exists is never
/// changed (the operator owns it: see [`blocking_dirs`]).
fn create_dirs(dir: &Path, group: Option<&ControlGroup>) -> io::Result<()> {
    let Some(group) = group else { return std::fs::create_dir_all(dir) };
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    if let Some(up) = dir.parent() {
        create_dirs(up, Some(group))?;
    }
    match nix::unistd::mkdir(dir, nix::sys::stat::Mode::S_IRWXU) {
        Ok(()) => {}
        // Created by someone else meanwhile: not ours to loosen.
        Err(nix::errno::Errno::EEXIST) => return Ok(()),
        Err(e) => return Err(e.into()),
    }
    give_to_group(dir, dir, group)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750))
}

/// A directory above the socket that members of the control group cannot
/// search, by its mode bits.
#[derive(Debug)]
pub struct Blocking {
    pub dir: PathBuf,
    mode: u32,
    uid: u32,
    gid: u32,
}

impl std::fmt::Display for Blocking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (mode {:04o}, owner {}:{})", self.dir.display(), self.mode, self.uid, self.gid)
    }
}

/// The directories above `socket` whose mode does not let members of
/// `group` through (search permission for others, or for the group when it
/// owns the directory), innermost first. An ACL may still let them
/// through, so this is for a warning, not an error.
pub fn blocking_dirs(socket: &Path, group: &ControlGroup) -> Vec<Blocking> {
    let parent = socket.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let Ok(parent) = std::fs::canonicalize(parent) else { return Vec::new() };
    parent
        .ancestors()
        .filter_map(|dir| {
            let meta = std::fs::metadata(dir).ok()?;
            let mode = meta.mode() & 0o7777;
            let passes = mode & 0o001 != 0 || (meta.gid() == group.gid && mode & 0o010 != 0);
            (!passes).then(|| Blocking { dir: dir.to_path_buf(), mode, uid: meta.uid(), gid: meta.gid() })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt;
    use std::os::unix::net::UnixStream;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn the_socket_is_owner_only_and_no_bind_directory_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/control.sock");
        let _listener = bind_socket(&path, None).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(mode(&path), 0o600);
        let left: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, vec![std::ffi::OsString::from("control.sock")]);
        UnixStream::connect(&path).expect("connectable after the rename");
    }

    #[test]
    fn with_a_group_the_socket_and_the_directories_created_for_it_are_the_groups() {
        // Root may give a file to any group; anyone else only to their own.
        let gid = if nix::unistd::geteuid().is_root() { 4242 } else { nix::unistd::getegid().as_raw() };
        let group = ControlGroup { name: "g".into(), gid };
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("mine")).unwrap();
        std::fs::set_permissions(dir.path().join("mine"), std::fs::Permissions::from_mode(0o700)).unwrap();
        let path = dir.path().join("mine/run/ctl/control.sock");
        let _listener = bind_socket(&path, Some(&group)).unwrap();
        assert_eq!((mode(&path), std::fs::metadata(&path).unwrap().gid()), (0o660, gid));
        for created in ["mine/run", "mine/run/ctl"] {
            let meta = std::fs::metadata(dir.path().join(created)).unwrap();
            assert_eq!((meta.permissions().mode() & 0o777, meta.gid()), (0o750, gid), "{created}");
        }
        // The directory that was there already is left as it was, and is
        // the one the warning names.
        assert_eq!(mode(&dir.path().join("mine")), 0o700);
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let blocking = || blocking_dirs(&path, &group).into_iter().map(|b| b.dir).filter(|d| d.starts_with(&root)).collect::<Vec<_>>();
        assert_eq!(blocking(), vec![root.join("mine")]);
        std::fs::set_permissions(dir.path().join("mine"), std::fs::Permissions::from_mode(0o701)).unwrap();
        assert_eq!(blocking(), Vec::<PathBuf>::new());
    }
}
