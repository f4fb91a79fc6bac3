//! The guest's initramfs: a file tree (host files, generated files,
//! symlinks, directories) written as an uncompressed cpio "newc" archive.

use super::*;

#[derive(Clone)]
pub(crate) enum Node {
    Dir,
    File { mode: u32, data: Data },
    Symlink(String),
    CharDev { major: u32, minor: u32 },
}

#[derive(Clone)]
pub(crate) enum Data {
    Host(PathBuf),
    Bytes(Vec<u8>),
}

/// An initramfs under construction: archive path (no leading '/') → node.
/// Host files keep their real (symlink-free) host path, so that their
/// dynamic loader and library paths resolve in the guest as on the host.
#[derive(Default, Clone)]
pub(crate) struct Tree {
    pub(crate) nodes: BTreeMap<String, Node>,
}

impl Tree {
    pub(crate) fn parents(&mut self, key: &str) {
        let mut acc = String::new();
        let parts: Vec<&str> = key.split('/').collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(part);
            self.nodes.entry(acc.clone()).or_insert(Node::Dir);
        }
    }

    pub(crate) fn insert(&mut self, key: String, node: Node) {
        self.parents(&key);
        self.nodes.insert(key, node);
    }

    /// Maps a guest path through the top-level symlinks (`/bin/x` → `usr/bin/x`).
    pub(crate) fn key(&self, guest: &str) -> String {
        let trimmed = guest.trim_start_matches('/');
        let (first, rest) = trimmed.split_once('/').unwrap_or((trimmed, ""));
        if let Some(Node::Symlink(target)) = self.nodes.get(first) {
            if !rest.is_empty() && !target.starts_with('/') {
                return format!("{}/{rest}", target.trim_end_matches('/'));
            }
        }
        trimmed.to_string()
    }

    /// Adds a host file at its own path (following and recreating symlinks).
    pub(crate) fn add_host(&mut self, host: &Path) -> Result<(), String> {
        let name = host.file_name().ok_or_else(|| format!("{}: not a file path", host.display()))?;
        let parent = host.parent().unwrap_or(Path::new("/"));
        let real_parent = std::fs::canonicalize(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        let real = real_parent.join(name);
        let key = real.to_string_lossy().trim_start_matches('/').to_string();
        if self.nodes.contains_key(&key) {
            return Ok(());
        }
        let meta = std::fs::symlink_metadata(&real).map_err(|e| format!("{}: {e}", real.display()))?;
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&real).map_err(|e| e.to_string())?;
            self.insert(key, Node::Symlink(target.to_string_lossy().into_owned()));
            self.add_host(&real_parent.join(target))
        } else if meta.is_file() {
            use std::os::unix::fs::PermissionsExt;
            self.insert(key, Node::File { mode: meta.permissions().mode() & 0o7777, data: Data::Host(real) });
            Ok(())
        } else {
            Err(format!("{}: not a regular file", real.display()))
        }
    }

    /// Adds a dynamically linked host binary and every library `ldd` lists.
    pub(crate) fn add_binary(&mut self, host: &Path) -> Result<(), String> {
        self.add_host(host)?;
        let out = run_capture(Command::new("ldd").arg(host), Duration::from_secs(60))?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            return Ok(()); // static: "not a dynamic executable"
        }
        for line in text.lines() {
            let line = line.trim();
            if line.contains("not found") {
                return Err(format!("ldd {}: {line}", host.display()));
            }
            let lib = match line.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next(),
                None => line.split_whitespace().next(),
            };
            if let Some(lib) = lib.filter(|l| l.starts_with('/')) {
                self.add_host(Path::new(lib))?;
            }
        }
        Ok(())
    }

    pub(crate) fn write_cpio(&self, out: impl Write) -> std::io::Result<u64> {
        let mut w = Cpio { w: BufWriter::with_capacity(1 << 20, out), ino: 1, total: 0 };
        for (name, node) in &self.nodes {
            match node {
                Node::Dir => w.header(name, 0o040755, 0, (0, 0))?,
                Node::CharDev { major, minor } => w.header(name, 0o020600, 0, (*major, *minor))?,
                Node::Symlink(target) => {
                    w.header(name, 0o120777, target.len() as u64, (0, 0))?;
                    w.data(target.as_bytes())?;
                }
                Node::File { mode, data: Data::Bytes(bytes) } => {
                    w.header(name, 0o100000 | mode, bytes.len() as u64, (0, 0))?;
                    w.data(bytes)?;
                }
                Node::File { mode, data: Data::Host(path) } => {
                    let f = std::fs::File::open(path)?;
                    let size = f.metadata()?.len();
                    w.header(name, 0o100000 | mode, size, (0, 0))?;
                    let copied = std::io::copy(&mut f.take(size), &mut w.w)?;
                    if copied != size {
                        return Err(std::io::Error::other(format!("{}: shrank while being archived", path.display())));
                    }
                    w.total += size;
                    w.pad(size)?;
                }
            }
        }
        w.header("TRAILER!!!", 0, 0, (0, 0))?;
        w.w.flush()?;
        Ok(w.total)
    }
}

/// cpio "newc" (070701) writer, the format the kernel unpacks.
pub(crate) struct Cpio<W: Write> {
    pub(crate) w: BufWriter<W>,
    pub(crate) ino: u32,
    pub(crate) total: u64,
}

impl<W: Write> Cpio<W> {
    pub(crate) fn header(&mut self, name: &str, mode: u32, size: u64, rdev: (u32, u32)) -> std::io::Result<()> {
        let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        let size = u32::try_from(size).map_err(|_| std::io::Error::other(format!("{name}: too large for cpio newc")))?;
        let fields = [self.ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, name.len() as u32 + 1, 0];
        let mut header = String::from("070701");
        for f in fields {
            header.push_str(&format!("{f:08X}"));
        }
        self.ino += 1;
        self.w.write_all(header.as_bytes())?;
        self.w.write_all(name.as_bytes())?;
        self.w.write_all(&[0])?;
        self.total += header.len() as u64 + name.len() as u64 + 1;
        self.pad(header.len() as u64 + name.len() as u64 + 1)
    }

    pub(crate) fn data(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.w.write_all(bytes)?;
        self.total += bytes.len() as u64;
        self.pad(bytes.len() as u64)
    }

    /// Pads to a multiple of 4 after `len` bytes.
    pub(crate) fn pad(&mut self, len: u64) -> std::io::Result<()> {
        self.w.write_all(&[0u8; 3][..((4 - len % 4) % 4) as usize])
    }
}
