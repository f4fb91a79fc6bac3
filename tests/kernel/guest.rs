//! One VM boot, as the tests describe it: files, modules, a script, its
//! limits; `run` assembles the initramfs and boots it.

use super::*;

/// One VM boot: files, modules and a script. Build with the methods, then
/// [`Guest::run`].
pub struct Guest {
    pub(crate) tree: Tree,
    pub(crate) errors: Vec<String>,
    pub(crate) modules: Vec<(String, String)>,
    pub(crate) script: String,
    pub(crate) memory_mib: u32,
    pub(crate) cpus: u32,
    pub(crate) append: Vec<String>,
    pub(crate) name: String,
}

/// What a guest run produced.
#[derive(Debug, Clone)]
pub struct GuestResult {
    /// Everything the guest printed on its serial console (kernel messages
    /// at error level and above, init's and the script's output).
    pub console: String,
    /// The script's exit status; None if the guest never reported one
    /// (timeout, kernel panic, init failure).
    pub exit_code: Option<i32>,
    pub timed_out: bool,
    /// Wall time from starting qemu to its exit.
    pub elapsed: Duration,
    /// qemu's own stderr.
    pub qemu_stderr: String,
    pub(crate) nonce: String,
}

impl Default for Guest {
    fn default() -> Self {
        Self::new()
    }
}

impl Guest {
    /// A guest with busybox, `/usr/bin/nbdvirt` (the binary under test),
    /// nbd-client, mkfs.ext4/e2fsck and the nbd + ext4 modules loaded.
    pub fn new() -> Guest {
        let mut g = Guest::bare();
        let nbdvirt = env().nbdvirt.clone();
        g = g.binary_at("/usr/bin/nbdvirt", &nbdvirt);
        for tool in ["nbd-client", "mke2fs", "mkfs.ext4", "e2fsck", "fsck.ext4", "dumpe2fs"] {
            g = g.tool(tool);
        }
        if Path::new("/etc/mke2fs.conf").is_file() {
            g = g.file("/etc/mke2fs.conf", "/etc/mke2fs.conf");
        }
        for m in DEFAULT_MODULES {
            g = g.module(m);
        }
        g
    }

    /// Only busybox and /init: no nbdvirt, no tools, no modules.
    pub fn bare() -> Guest {
        let env = env();
        let mut tree = Tree::default();
        for (name, target) in &env.top_links {
            tree.nodes.insert(name.clone(), Node::Symlink(target.clone()));
        }
        let mut errors = Vec::new();
        if let Err(e) = tree.add_host(&env.busybox) {
            errors.push(e);
        }
        let busybox = format!("/{}", tree.key(&env.busybox.to_string_lossy()));
        for applet in env.applets.iter().filter(|a| *a != "busybox") {
            tree.insert(tree.key(&format!("/usr/bin/{applet}")), Node::Symlink(busybox.clone()));
        }
        // Without a merged /usr, /bin/sh must exist for the #! lines.
        if tree.key("/bin/sh") == "bin/sh" {
            tree.insert("bin/sh".into(), Node::Symlink(busybox.clone()));
        }
        tree.insert("dev/console".into(), Node::CharDev { major: 5, minor: 1 });
        for d in ["proc", "sys", "tmp", "run", "mnt", "root", "etc"] {
            tree.nodes.entry(d.into()).or_insert(Node::Dir);
        }
        tree.insert("etc/passwd".into(), Node::File { mode: 0o644, data: Data::Bytes(b"root:x:0:0:root:/root:/bin/sh\n".to_vec()) });
        tree.insert("etc/group".into(), Node::File { mode: 0o644, data: Data::Bytes(b"root:x:0:\n".to_vec()) });
        tree.insert("etc/mtab".into(), Node::Symlink("/proc/self/mounts".into()));
        let cpus = std::env::var("NBDVIRT_KERNEL_CPUS").ok().and_then(|s| s.parse().ok()).filter(|n| *n > 0).unwrap_or(2);
        Guest { tree, errors, modules: Vec::new(), script: String::new(), memory_mib: 1024, cpus, append: Vec::new(), name: "guest".into() }
    }

    /// A name for log lines and the kept directory.
    pub fn name(mut self, name: &str) -> Self {
        self.name = name.to_string();
        self
    }

    /// Copies host file `host` to `guest` (mode preserved).
    pub fn file(mut self, guest: &str, host: impl AsRef<Path>) -> Self {
        use std::os::unix::fs::PermissionsExt;
        let host = host.as_ref();
        match std::fs::metadata(host) {
            Ok(m) if m.is_file() => {
                let key = self.tree.key(guest);
                self.tree.insert(key, Node::File { mode: m.permissions().mode() & 0o7777, data: Data::Host(host.to_path_buf()) });
            }
            Ok(_) => self.errors.push(format!("{}: not a regular file", host.display())),
            Err(e) => self.errors.push(format!("{}: {e}", host.display())),
        }
        self
    }

    /// Writes `contents` to `guest` (mode 0644).
    pub fn write(self, guest: &str, contents: impl AsRef<[u8]>) -> Self {
        self.write_mode(guest, contents, 0o644)
    }

    /// Writes an executable file (mode 0755), e.g. a helper script.
    pub fn executable(self, guest: &str, contents: impl AsRef<[u8]>) -> Self {
        self.write_mode(guest, contents, 0o755)
    }

    pub(crate) fn write_mode(mut self, guest: &str, contents: impl AsRef<[u8]>, mode: u32) -> Self {
        let key = self.tree.key(guest);
        self.tree.insert(key, Node::File { mode, data: Data::Bytes(contents.as_ref().to_vec()) });
        self
    }

    /// Adds a host binary at its own path, with its shared libraries.
    pub fn binary(mut self, host: impl AsRef<Path>) -> Self {
        if let Err(e) = self.tree.add_binary(host.as_ref()) {
            self.errors.push(e);
        }
        self
    }

    /// Adds a host binary at another guest path, with its shared libraries.
    pub fn binary_at(mut self, guest: &str, host: impl AsRef<Path>) -> Self {
        let host = host.as_ref();
        self = self.file(guest, host);
        // The libraries only: add the binary to a scratch tree.
        let mut scratch = Tree::default();
        match scratch.add_binary(host) {
            Ok(()) => {
                let own = std::fs::canonicalize(host).map(|p| p.to_string_lossy().trim_start_matches('/').to_string()).unwrap_or_default();
                for (k, v) in scratch.nodes {
                    if k != own && !matches!(v, Node::Dir) {
                        self.tree.insert(k, v);
                    }
                }
            }
            Err(e) => self.errors.push(e),
        }
        self
    }

    /// Adds a host command found on PATH (or in sbin) with its libraries,
    /// e.g. `.tool("fio")`. A missing tool fails the run, naming it.
    pub fn tool(mut self, name: &str) -> Self {
        match find_tool(name) {
            Some(p) => self.binary(p),
            None => {
                self.errors.push(format!("host command `{name}` not found (install the Debian package that provides it)"));
                self
            }
        }
    }

    /// Loads a kernel module (and its dependencies) before the script runs.
    pub fn module(self, name: &str) -> Self {
        self.module_with(name, "")
    }

    /// Loads a kernel module with parameters, e.g. `("nbd", "nbds_max=4")`.
    pub fn module_with(mut self, name: &str, params: &str) -> Self {
        let name = name.replace('-', "_");
        match self.modules.iter_mut().find(|(n, _)| *n == name) {
            Some(entry) => entry.1 = params.to_string(),
            None => self.modules.push((name, params.to_string())),
        }
        self
    }

    /// Appends shell (busybox ash) to the guest script. It runs in /tmp
    /// after tests/kernel/prelude.sh (`set -eu` and helpers).
    pub fn script(mut self, text: &str) -> Self {
        self.script.push_str(text);
        if !self.script.ends_with('\n') {
            self.script.push('\n');
        }
        self
    }

    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    pub fn cpus(mut self, n: u32) -> Self {
        self.cpus = n;
        self
    }

    /// Extra kernel command-line words.
    pub fn kernel_arg(mut self, arg: &str) -> Self {
        self.append.push(arg.to_string());
        self
    }

    /// Builds the initramfs, boots the VM and waits (at most `timeout`, then
    /// qemu is killed) for it to power off. Boots are serialized within the
    /// test process: with TCG two guests would only slow each other down.
    pub fn run(self, timeout: Duration) -> GuestResult {
        static BOOT: Mutex<()> = Mutex::new(());
        let env = env();
        if !self.errors.is_empty() {
            panic!("guest `{}` cannot be built:\n{}", self.name, self.errors.join("\n"));
        }
        let _turn = BOOT.lock().unwrap_or_else(|e| e.into_inner());
        let scale: f64 = std::env::var("NBDVIRT_KERNEL_TIMEOUT_SCALE").ok().and_then(|s| s.parse().ok()).filter(|f: &f64| *f > 0.0).unwrap_or(1.0);
        let timeout = timeout.mul_f64(scale);
        let t0 = Instant::now();
        let nonce = format!("{:x}{:x}", std::process::id(), std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos() & 0xffff_ffff);
        let dir = tempfile::Builder::new().prefix(&format!("guest-{}-", self.name)).tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("guest directory");
        let (initrd, size) = self.build(env, &nonce, dir.path()).unwrap_or_else(|e| panic!("guest `{}`: building the initramfs: {e}", self.name));
        let built = t0.elapsed();

        let mut append = vec!["console=ttyS0".to_string(), "panic=-1".into(), "quiet".into(), "mitigations=off".into()];
        append.extend(self.append.iter().cloned());
        let mut cmd = Command::new(&env.qemu);
        cmd.args(["-accel", "tcg", "-m", &self.memory_mib.to_string(), "-smp", &self.cpus.to_string()])
            .args(["-nographic", "-no-reboot", "-nic", "none"])
            .arg("-kernel")
            .arg(&env.kernel.image)
            .arg("-initrd")
            .arg(&initrd)
            .args(["-append", &append.join(" ")]);
        let keep = env_flag("NBDVIRT_KERNEL_KEEP");
        if keep {
            let path = dir.keep();
            eprintln!("[kernel] kept {} ; boot it again with:\n{:?}", path.display(), cmd);
        }
        let result = boot(&mut cmd, timeout, &nonce, env_flag("NBDVIRT_KERNEL_VERBOSE"));
        eprintln!(
            "[kernel] guest `{}`: initramfs {:.1} MiB built in {:.1?}, VM ran {:.1?}, exit {}",
            self.name,
            size as f64 / (1 << 20) as f64,
            built,
            result.elapsed,
            match (result.exit_code, result.timed_out) {
                (Some(c), _) => c.to_string(),
                (None, true) => format!("none (killed after {timeout:?})"),
                (None, false) => "none".to_string(),
            }
        );
        result
    }

    pub(crate) fn build(&self, env: &Env, nonce: &str, dir: &Path) -> Result<(PathBuf, u64), String> {
        let mut tree = self.tree.clone();
        let modules = resolve_modules(&env.kernel, &self.modules)?;
        let mut insmod = String::new();
        for (name, params, bytes) in modules {
            let guest = format!("/lib/modules/{}/{name}.ko", env.kernel.release);
            let key = tree.key(&guest);
            insmod.push_str(&format!("load /{key} {params}\n"));
            tree.insert(key, Node::File { mode: 0o644, data: Data::Bytes(bytes) });
        }
        let init = INIT_TEMPLATE.replace("@NONCE@", nonce).replace("@INSMOD@", &insmod);
        tree.insert("init".into(), Node::File { mode: 0o755, data: Data::Bytes(init.into_bytes()) });
        let script = format!("{PRELUDE}\n{}", self.script);
        tree.insert("test.sh".into(), Node::File { mode: 0o755, data: Data::Bytes(script.into_bytes()) });
        let path = dir.join("initrd.cpio");
        let file = std::fs::File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let size = tree.write_cpio(file).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok((path, size))
    }
}
