//! Real-kernel test harness: boots Debian's current `linux-image-*-amd64`
//! kernel under `qemu-system-x86_64 -accel tcg` with a generated initramfs
//! (busybox-static, the freshly built `nbdvirt`, nbd-client, e2fsprogs, any
//! extra host binary with its shared libraries, and kernel modules), runs one
//! shell script as the guest's workload and returns the console and the
//! script's exit status. See the top of tests/kernel.rs for the API.
//!
//! The kernel is booted as the uncompressed vmlinux through its PVH entry
//! (extracted from the bzImage once; no BIOS boot, no in-guest
//! decompression), the initramfs is an uncompressed cpio "newc" archive
//! written directly by the harness (the kernel copies ~90 MiB in ~0.1 s;
//! gzip would cost seconds on both sides). /init is tests/kernel/init.sh,
//! the script runs after tests/kernel/prelude.sh, and the result is read
//! from a marker line with a per-boot nonce on the serial console.
//!
//! Everything the harness needs is fetched on first use when running as
//! root (apt-get install of missing packages, `apt-get download` of the
//! kernel); the kernel and its modules are cached under
//! `$NBDVIRT_KERNEL_CACHE`, else `$XDG_CACHE_HOME/nbdvirt-kernel`, else
//! `~/.cache/nbdvirt-kernel`, one directory per kernel package version.
//! What cannot be had makes the test FAIL, naming the package.
//!
//! Environment knobs:
//! - `NBDVIRT_KERNEL_VERBOSE=1`: stream the guest console to stderr live.
//! - `NBDVIRT_KERNEL_KEEP=1`: keep each guest's initramfs and print the
//!   qemu command line (to boot it again by hand).
//! - `NBDVIRT_KERNEL_DIR=DIR`: use an already extracted kernel instead of
//!   Debian's (`DIR/vmlinuz` and `DIR/modules/<release>/`).
//! - `NBDVIRT_KERNEL_CACHE=DIR`: where kernels are cached.
//! - `NBDVIRT_KERNEL_TIMEOUT_SCALE=F`: multiply every guest timeout by F.
//! - `NBDVIRT_KERNEL_CPUS=N`: default vCPU count (2).
//! - `NBDVIRT_KERNEL_PVH=0`: boot the compressed bzImage through SeaBIOS
//!   instead of the extracted vmlinux (PVH entry).
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The binary under test, put at /usr/bin/nbdvirt in every guest.
pub const NBDVIRT: &str = env!("CARGO_BIN_EXE_nbdvirt");

const INIT_TEMPLATE: &str = include_str!("init.sh");
const PRELUDE: &str = include_str!("prelude.sh");

/// Modules every guest loads (their hard dependencies are added, in order).
/// `crc32c_generic` is only a soft dependency of ext4/jbd2 (via the
/// `crypto-crc32c` alias) and nothing in the guest would load it on demand.
const DEFAULT_MODULES: &[&str] = &["nbd", "crc32c_generic", "ext4"];

/// Host tools the harness itself needs: (command, Debian package).
const HOST_TOOLS: &[(&str, &str)] =
    &[("qemu-system-x86_64", "qemu-system-x86"), ("nbd-client", "nbd-client"), ("mke2fs", "e2fsprogs"), ("e2fsck", "e2fsprogs"), ("fio", "fio"), ("jq", "jq"), ("dpkg-deb", "dpkg"), ("ldd", "libc-bin")];

// ---------------------------------------------------------------------------
// Small process helpers

/// `common::try_run_timeout` with stdin closed (no tool may wait on ours).
fn run_capture(cmd: &mut Command, limit: Duration) -> Result<Output, String> {
    crate::common::try_run_timeout(cmd.stdin(Stdio::null()), limit)
}

/// Runs a command; Ok(stdout) on success, Err with its output otherwise.
fn run_text(cmd: &mut Command, limit: Duration) -> Result<String, String> {
    let shown = format!("{cmd:?}");
    let out = run_capture(cmd, limit)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{shown} failed ({}):\n{}{}",
            out.status,
            tail(&String::from_utf8_lossy(&out.stdout), 30),
            tail(&String::from_utf8_lossy(&out.stderr), 30)
        ))
    }
}

fn tail(text: &str, lines: usize) -> String {
    let v: Vec<&str> = text.lines().collect();
    let start = v.len().saturating_sub(lines);
    v[start..].iter().map(|l| format!("{l}\n")).collect()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Finds a command on PATH or in the sbin directories.
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    dirs.extend(["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(PathBuf::from));
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

fn env_flag(name: &str) -> bool {
    std::env::var(name).map(|v| !v.is_empty() && v != "0").unwrap_or(false)
}

// ---------------------------------------------------------------------------
// Host preparation: packages

/// `Some(path)` if busybox exists and is statically linked.
fn static_busybox() -> Option<PathBuf> {
    ["/bin/busybox", "/usr/bin/busybox"].iter().map(PathBuf::from).filter(|p| p.is_file()).find(|p| {
        // ldd says "not a dynamic executable" (and fails) for static binaries.
        let out = Command::new("ldd").arg(p).stdout(Stdio::piped()).stderr(Stdio::piped()).output();
        match out {
            Ok(o) => !o.status.success() || String::from_utf8_lossy(&o.stdout).contains("statically linked"),
            Err(_) => false,
        }
    })
}

fn missing_packages() -> Vec<String> {
    let mut missing: Vec<String> = Vec::new();
    let mut add = |p: &str| {
        if !missing.iter().any(|m| m == p) {
            missing.push(p.to_string());
        }
    };
    for (tool, package) in HOST_TOOLS {
        if find_tool(tool).is_none() {
            add(package);
        }
    }
    if static_busybox().is_none() {
        add("busybox-static");
    }
    missing
}

fn apt_candidate(package: &str) -> Option<String> {
    let out = run_text(Command::new("apt-cache").args(["policy", package]), Duration::from_secs(60)).ok()?;
    let v = out.lines().find_map(|l| l.trim().strip_prefix("Candidate:"))?.trim().to_string();
    (v != "(none)").then_some(v)
}

fn installed_version(package: &str) -> Option<String> {
    let out = run_text(Command::new("dpkg-query").args(["-W", "-f", "${Status} ${Version}", package]), Duration::from_secs(30)).ok()?;
    out.strip_prefix("install ok installed ").map(|v| v.trim().to_string())
}

static APT_UPDATED: OnceLock<Result<(), String>> = OnceLock::new();

fn apt_update() -> Result<(), String> {
    APT_UPDATED
        .get_or_init(|| {
            run_text(Command::new("apt-get").args(["update", "-qq"]).env("DEBIAN_FRONTEND", "noninteractive"), Duration::from_secs(600)).map(|_| ())
        })
        .clone()
}

/// Installs what is missing (as root, with apt-get) or explains what to install.
fn ensure_packages() -> Result<(), String> {
    let missing = missing_packages();
    if missing.is_empty() {
        return Ok(());
    }
    let hint = format!("apt-get install {}", install_args(&missing).join(" "));
    if !is_root() || find_tool("apt-get").is_none() {
        return Err(format!(
            "the kernel tests need the Debian package(s) {}: install them as root with `{hint}` (the tests do this themselves when run as root)",
            missing.join(", ")
        ));
    }
    eprintln!("[kernel] installing missing packages: {}", missing.join(" "));
    apt_update().map_err(|e| format!("apt-get update failed, cannot install {}: {e}", missing.join(", ")))?;
    let args = install_args(&missing);
    let result = run_text(
        Command::new("apt-get").args(["install", "-y", "-q", "--no-install-recommends", "--allow-downgrades"]).args(&args).env("DEBIAN_FRONTEND", "noninteractive"),
        Duration::from_secs(1200),
    );
    let still = missing_packages();
    match (result, still.is_empty()) {
        (_, true) => Ok(()),
        (Err(e), false) => Err(format!("could not install {} (needed by the kernel tests): {e}", still.join(", "))),
        (Ok(_), false) => Err(format!("apt-get install {} succeeded but the tools are still missing: {}", args.join(" "), still.join(", "))),
    }
}

/// apt-get install arguments for `missing`. Debian 12's qemu-system-x86 (7.2)
/// cannot coexist with a newer (backports) qemu-utils: pin qemu-utils to the
/// same version, so that it is downgraded instead of removed (other tests use
/// qemu-io / qemu-img).
fn install_args(missing: &[String]) -> Vec<String> {
    let mut args: Vec<String> = missing.to_vec();
    if missing.iter().any(|p| p == "qemu-system-x86") {
        match apt_candidate("qemu-system-x86") {
            Some(v) if installed_version("qemu-utils").as_deref() != Some(v.as_str()) => args.push(format!("qemu-utils={v}")),
            Some(_) => {}
            None => args.push("qemu-utils".into()),
        }
    }
    args
}

// ---------------------------------------------------------------------------
// Host preparation: the kernel

/// A kernel ready to boot: the image and its (extracted) module tree.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// `uname -r` of the guest, e.g. `6.1.0-56-amd64`.
    pub release: String,
    /// Debian package and version it came from (or the override directory).
    pub origin: String,
    pub vmlinuz: PathBuf,
    /// What qemu boots: the uncompressed `vmlinux` (PVH entry: skips the
    /// BIOS and the in-guest decompression, ~4 s faster under TCG) when it
    /// could be extracted, else `vmlinuz`.
    pub image: PathBuf,
    /// `lib/modules/<release>` of the package.
    pub modules: PathBuf,
}

fn cache_root() -> PathBuf {
    if let Some(d) = std::env::var_os("NBDVIRT_KERNEL_CACHE") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("nbdvirt-kernel");
    }
    if let Some(home) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(home).join(".cache/nbdvirt-kernel");
    }
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("kernel-cache")
}

/// A cache entry: `vmlinuz`, `modules/<release>/`, `release`.
fn load_kernel_dir(dir: &Path, origin: &str) -> Result<Kernel, String> {
    let vmlinuz = dir.join("vmlinuz");
    let release = std::fs::read_to_string(dir.join("release")).map(|s| s.trim().to_string()).or_else(|_| {
        // An override directory without a `release` file: the only entry of modules/.
        let mut names: Vec<String> = std::fs::read_dir(dir.join("modules"))
            .map_err(|e| format!("{}: {e}", dir.join("modules").display()))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names.pop().ok_or_else(|| format!("{}: no module tree", dir.join("modules").display()))
    })?;
    let modules = dir.join("modules").join(&release);
    if !vmlinuz.is_file() || !modules.is_dir() {
        return Err(format!("{} is not a kernel directory (needs vmlinuz and modules/{release}/)", dir.display()));
    }
    let image = match std::env::var("NBDVIRT_KERNEL_PVH").as_deref() {
        Ok("0") => vmlinuz.clone(),
        _ => pvh_image(dir, &vmlinuz).unwrap_or_else(|why| {
            eprintln!("[kernel] booting the compressed {} ({why})", vmlinuz.display());
            vmlinuz.clone()
        }),
    };
    Ok(Kernel { release, origin: origin.to_string(), vmlinuz, image, modules })
}

/// `dir/vmlinux`, extracted from the bzImage once, if it has a PVH entry.
fn pvh_image(dir: &Path, vmlinuz: &Path) -> Result<PathBuf, String> {
    let vmlinux = dir.join("vmlinux");
    if !vmlinux.is_file() {
        let data = extract_vmlinux(vmlinuz)?;
        if !has_pvh_note(&data) {
            return Err("its vmlinux has no PVH entry note".into());
        }
        let tmp = dir.join(format!(".vmlinux.{}", std::process::id()));
        std::fs::write(&tmp, &data).map_err(|e| format!("{}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, &vmlinux).map_err(|e| format!("{}: {e}", vmlinux.display()))?;
    }
    Ok(vmlinux)
}

/// The ELF kernel inside a bzImage (boot protocol >= 2.08: payload_offset
/// and payload_length locate the compressed payload).
fn extract_vmlinux(vmlinuz: &Path) -> Result<Vec<u8>, String> {
    let d = std::fs::read(vmlinuz).map_err(|e| format!("{}: {e}", vmlinuz.display()))?;
    let u32_at = |o: usize| d.get(o..o + 4).map(|b| u32::from_le_bytes(b.try_into().unwrap()) as usize);
    if d.get(0x202..0x206) != Some(b"HdrS") {
        return Err("not a bzImage".into());
    }
    let setup_sects = match d.get(0x1f1) {
        Some(0) | None => 4,
        Some(n) => *n as usize,
    };
    let start = (setup_sects + 1) * 512 + u32_at(0x248).ok_or("short bzImage")?;
    let payload = d.get(start..start + u32_at(0x24c).ok_or("short bzImage")?).ok_or("bad payload_offset/length")?;
    let (tool, args): (&str, &[&str]) = if payload.starts_with(b"\xfd7zXZ\x00") {
        ("xz", &["-dc", "--single-stream"])
    } else if payload.starts_with(b"\x1f\x8b") {
        ("gzip", &["-dc"])
    } else if payload.starts_with(b"\x28\xb5\x2f\xfd") {
        ("zstd", &["-dcq"])
    } else {
        return Err("unknown payload compression".into());
    };
    let tmp = tempfile::NamedTempFile::new().map_err(|e| e.to_string())?;
    std::fs::write(tmp.path(), payload).map_err(|e| e.to_string())?;
    let out = run_capture(Command::new(tool).args(args).arg(tmp.path()), Duration::from_secs(120))?;
    // gzip complains about the 4-byte size trailer but decompresses fine.
    if !out.stdout.starts_with(b"\x7fELF") {
        return Err(format!("{tool} did not produce an ELF kernel: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(out.stdout)
}

/// Whether an ELF64 kernel has the Xen PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY),
/// which qemu needs to boot it directly.
fn has_pvh_note(elf: &[u8]) -> bool {
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes(b.try_into().unwrap()) as usize);
    let u32_at = |o: usize| elf.get(o..o + 4).map(|b| u32::from_le_bytes(b.try_into().unwrap()) as usize);
    let u64_at = |o: usize| elf.get(o..o + 8).map(|b| u64::from_le_bytes(b.try_into().unwrap()) as usize);
    let scan = || -> Option<bool> {
        let (phoff, phentsize, phnum) = (u64_at(0x20)?, u16_at(0x36)?, u16_at(0x38)?);
        for i in 0..phnum {
            let ph = phoff + i * phentsize;
            if u32_at(ph)? != 4 {
                continue; // PT_NOTE only
            }
            let (mut off, end) = (u64_at(ph + 8)?, u64_at(ph + 8)? + u64_at(ph + 0x20)?);
            while off + 12 <= end {
                let (namesz, descsz, kind) = (u32_at(off)?, u32_at(off + 4)?, u32_at(off + 8)?);
                let name = elf.get(off + 12..off + 12 + namesz)?;
                if kind == 18 && name.starts_with(b"Xen") {
                    return Some(true);
                }
                off += 12 + namesz.div_ceil(4) * 4 + descsz.div_ceil(4) * 4;
            }
        }
        Some(false)
    };
    elf.starts_with(b"\x7fELF\x02\x01") && scan().unwrap_or(false)
}

/// The package `linux-image-amd64` currently depends on, and its version.
fn current_kernel_package() -> Result<(String, String), String> {
    let show = |pkg: &str| run_text(Command::new("apt-cache").args(["show", "--no-all-versions", pkg]), Duration::from_secs(60));
    let field = |text: &str, name: &str| text.lines().find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()));
    let meta = show("linux-image-amd64").map_err(|e| format!("apt-cache show linux-image-amd64: {e}"))?;
    let depends = field(&meta, "Depends:").ok_or("linux-image-amd64 has no Depends field")?;
    // "linux-image-6.1.0-56-amd64 (= 6.1.192-2)": the version is usually right
    // there, which saves a second (slow, ~3 s) apt-cache call.
    let (package, pinned) = depends
        .split([',', '|'])
        .map(str::trim)
        .find_map(|alt| {
            let name = alt.split_whitespace().next()?;
            let pinned = alt.split_once("(=").map(|(_, v)| v.trim_end_matches(')').trim().to_string());
            (name.starts_with("linux-image-") && name.ends_with("-amd64")).then(|| (name.to_string(), pinned))
        })
        .ok_or_else(|| format!("cannot find the kernel package in `Depends: {depends}` of linux-image-amd64"))?;
    if let Some(version) = pinned {
        return Ok((package, version));
    }
    let text = show(&package).map_err(|e| format!("apt-cache show {package}: {e}"))?;
    let version = field(&text, "Version:").ok_or_else(|| format!("{package} has no Version"))?;
    Ok((package, version))
}

fn prepare_kernel() -> Result<Kernel, String> {
    if let Some(dir) = std::env::var_os("NBDVIRT_KERNEL_DIR") {
        let dir = PathBuf::from(dir);
        return load_kernel_dir(&dir, &format!("NBDVIRT_KERNEL_DIR={}", dir.display()));
    }
    let root = cache_root();
    let resolved = current_kernel_package().or_else(|first| {
        if is_root() && find_tool("apt-get").is_some() {
            apt_update()?;
            current_kernel_package()
        } else {
            Err(first)
        }
    });
    let (package, version) = match resolved {
        Ok(pv) => pv,
        Err(e) => {
            // No usable apt metadata: fall back to the newest cached kernel.
            let mut cached: Vec<PathBuf> = std::fs::read_dir(&root).into_iter().flatten().filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.join("release").is_file()).collect();
            cached.sort();
            let Some(dir) = cached.pop() else {
                return Err(format!("cannot find Debian's current kernel package (linux-image-amd64 → linux-image-*-amd64) and no kernel is cached in {}: {e}", root.display()));
            };
            eprintln!("[kernel] apt metadata unavailable ({e}); using cached {}", dir.display());
            return load_kernel_dir(&dir, &dir.file_name().unwrap_or_default().to_string_lossy());
        }
    };
    let key = format!("{package}_{version}").replace(|c: char| !(c.is_ascii_alphanumeric() || "._+-".contains(c)), "_");
    let dir = root.join(&key);
    let origin = format!("{package} {version}");
    if dir.join("release").is_file() {
        return load_kernel_dir(&dir, &origin);
    }
    std::fs::create_dir_all(&root).map_err(|e| format!("cannot create the kernel cache {}: {e}", root.display()))?;
    let tmp = tempfile::Builder::new().prefix(".download-").tempdir_in(&root).map_err(|e| format!("temporary directory in {}: {e}", root.display()))?;
    eprintln!("[kernel] downloading {package} {version} into {}", dir.display());
    let download = |tmp: &Path| {
        run_text(Command::new("apt-get").args(["download", "-q", &format!("{package}={version}")]).current_dir(tmp), Duration::from_secs(900))
    };
    if let Err(first) = download(tmp.path()) {
        // Old lists name a version the mirror no longer has: refresh and retry.
        if !(is_root() && apt_update().is_ok() && download(tmp.path()).is_ok()) {
            return Err(format!("cannot download the kernel package {package} {version} with `apt-get download`: {first}"));
        }
    }
    let deb = std::fs::read_dir(tmp.path())
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| format!("apt-get download {package} left no .deb"))?;
    let x = tmp.path().join("x");
    run_text(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&x), Duration::from_secs(600)).map_err(|e| format!("extracting {}: {e}", deb.display()))?;
    let vmlinuz = std::fs::read_dir(x.join("boot"))
        .map_err(|e| format!("{package} has no /boot: {e}"))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-")))
        .ok_or_else(|| format!("{package} has no /boot/vmlinuz-*"))?;
    let release = vmlinuz.file_name().unwrap().to_string_lossy().trim_start_matches("vmlinuz-").to_string();
    let modules = [x.join("lib/modules").join(&release), x.join("usr/lib/modules").join(&release)]
        .into_iter()
        .find(|p| p.is_dir())
        .ok_or_else(|| format!("{package} has no lib/modules/{release}"))?;
    let stage = tmp.path().join("entry");
    std::fs::create_dir_all(stage.join("modules")).map_err(|e| e.to_string())?;
    std::fs::rename(&vmlinuz, stage.join("vmlinuz")).map_err(|e| e.to_string())?;
    std::fs::rename(&modules, stage.join("modules").join(&release)).map_err(|e| e.to_string())?;
    std::fs::write(stage.join("release"), format!("{release}\n")).map_err(|e| e.to_string())?;
    std::fs::write(stage.join("origin"), format!("{origin}\n")).map_err(|e| e.to_string())?;
    // Atomic publication; a concurrent run may have won the race.
    if std::fs::rename(&stage, &dir).is_err() && !dir.join("release").is_file() {
        return Err(format!("cannot move the extracted kernel to {}", dir.display()));
    }
    load_kernel_dir(&dir, &origin)
}

// ---------------------------------------------------------------------------
// Kernel modules

/// Module name (underscores) → file, for a kernel's module tree.
fn module_index(kernel: &Kernel) -> &'static HashMap<String, PathBuf> {
    static INDEX: OnceLock<HashMap<String, PathBuf>> = OnceLock::new();
    INDEX.get_or_init(|| {
        let mut map = HashMap::new();
        let mut stack = vec![kernel.modules.clone()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().filter_map(|e| e.ok()) {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                    continue;
                }
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(stem) = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"].iter().find_map(|s| name.strip_suffix(s)) {
                    map.insert(stem.replace('-', "_"), p);
                }
            }
        }
        map
    })
}

/// A module's bytes, decompressed on the host (busybox insmod may not
/// handle .ko.xz/.ko.zst).
fn module_bytes(path: &Path) -> Result<Vec<u8>, String> {
    let name = path.to_string_lossy();
    let (tool, package) = if name.ends_with(".xz") {
        ("xz", "xz-utils")
    } else if name.ends_with(".zst") {
        ("zstd", "zstd")
    } else if name.ends_with(".gz") {
        ("gzip", "gzip")
    } else {
        return std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()));
    };
    if find_tool(tool).is_none() {
        return Err(format!("{} is compressed: install the Debian package `{package}` to decompress it", path.display()));
    }
    let out = run_capture(Command::new(tool).arg("-dc").arg(path), Duration::from_secs(120))?;
    if !out.status.success() {
        return Err(format!("{tool} -dc {}: {}", path.display(), String::from_utf8_lossy(&out.stderr)));
    }
    Ok(out.stdout)
}

/// The contents of an ELF64 little-endian section.
fn elf_section<'a>(data: &'a [u8], want: &str) -> Option<&'a [u8]> {
    let u16_at = |o: usize| Some(u16::from_le_bytes(data.get(o..o + 2)?.try_into().ok()?) as usize);
    let u32_at = |o: usize| Some(u32::from_le_bytes(data.get(o..o + 4)?.try_into().ok()?) as usize);
    let u64_at = |o: usize| Some(u64::from_le_bytes(data.get(o..o + 8)?.try_into().ok()?) as usize);
    if data.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let (shoff, shentsize, shnum, shstrndx) = (u64_at(0x28)?, u16_at(0x3a)?, u16_at(0x3c)?, u16_at(0x3e)?);
    let section = |i: usize| -> Option<(usize, usize, usize)> {
        let h = shoff + i * shentsize;
        Some((u32_at(h)?, u64_at(h + 0x18)?, u64_at(h + 0x20)?))
    };
    let (_, str_off, str_size) = section(shstrndx)?;
    let names = data.get(str_off..str_off + str_size)?;
    (0..shnum).find_map(|i| {
        let (name, off, size) = section(i)?;
        let rest = names.get(name..)?;
        let end = rest.iter().position(|b| *b == 0)?;
        (&rest[..end] == want.as_bytes()).then(|| data.get(off..off + size)).flatten()
    })
}

/// `depends=` of a module (from its .modinfo section).
fn module_depends(bytes: &[u8], path: &Path) -> Result<Vec<String>, String> {
    let info = elf_section(bytes, ".modinfo").ok_or_else(|| format!("{}: no .modinfo section (not an x86-64 module?)", path.display()))?;
    Ok(info
        .split(|b| *b == 0)
        .filter_map(|kv| kv.strip_prefix(b"depends="))
        .flat_map(|v| String::from_utf8_lossy(v).split(',').map(|s| s.trim().replace('-', "_")).filter(|s| !s.is_empty()).collect::<Vec<_>>())
        .collect())
}

/// Modules to load, dependencies first: (name, file, bytes).
fn resolve_modules(kernel: &Kernel, wanted: &[(String, String)]) -> Result<Vec<(String, String, Vec<u8>)>, String> {
    let index = module_index(kernel);
    let mut order: Vec<(String, String, Vec<u8>)> = Vec::new();
    fn visit(
        name: &str,
        params: &str,
        index: &HashMap<String, PathBuf>,
        kernel: &Kernel,
        order: &mut Vec<(String, String, Vec<u8>)>,
        path: &mut Vec<String>,
    ) -> Result<(), String> {
        let name = name.replace('-', "_");
        if order.iter().any(|(n, _, _)| *n == name) {
            return Ok(());
        }
        if path.contains(&name) {
            return Err(format!("module dependency cycle: {} -> {name}", path.join(" -> ")));
        }
        let Some(file) = index.get(&name) else {
            let builtin = std::fs::read_to_string(kernel.modules.join("modules.builtin")).unwrap_or_default();
            if builtin.lines().any(|l| l.rsplit('/').next().and_then(|f| f.strip_suffix(".ko")).map(|s| s.replace('-', "_")) == Some(name.clone())) {
                return Ok(()); // built into the kernel
            }
            return Err(format!("kernel {} has no module `{name}`", kernel.release));
        };
        let bytes = module_bytes(file)?;
        path.push(name.clone());
        for dep in module_depends(&bytes, file)? {
            visit(&dep, "", index, kernel, order, path)?;
        }
        path.pop();
        order.push((name, params.to_string(), bytes));
        Ok(())
    }
    for (name, params) in wanted {
        visit(name, params, index, kernel, &mut order, &mut Vec::new())?;
    }
    Ok(order)
}

// ---------------------------------------------------------------------------
// The prepared environment (once per test process)

struct Env {
    kernel: Kernel,
    qemu: PathBuf,
    busybox: PathBuf,
    applets: Vec<String>,
    /// nbdvirt without debug info (the debug build is ~60 MiB).
    nbdvirt: PathBuf,
    /// Top-level host symlinks (`bin` → `usr/bin` on merged-/usr systems).
    top_links: Vec<(String, String)>,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Result<Env, String>> = OnceLock::new();
    match ENV.get_or_init(prepare) {
        Ok(env) => env,
        Err(e) => panic!("kernel test environment: {e}"),
    }
}

fn prepare() -> Result<Env, String> {
    let t0 = Instant::now();
    ensure_packages()?;
    let kernel = prepare_kernel()?;
    let qemu = find_tool("qemu-system-x86_64").ok_or("qemu-system-x86_64 is missing: install the Debian package `qemu-system-x86`")?;
    let busybox = static_busybox().ok_or("no static busybox: install the Debian package `busybox-static`")?;
    let list = run_text(Command::new(&busybox).arg("--list"), Duration::from_secs(30))?;
    let applets = list.lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty() && !l.contains('/')).collect();
    // One stripped copy per test process, published atomically under a
    // fixed name (a static is never dropped, so no TempDir here).
    let tmpdir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(tmpdir).map_err(|e| format!("{}: {e}", tmpdir.display()))?;
    let nbdvirt = tmpdir.join("kernel-guest-nbdvirt");
    let staging = tmpdir.join(format!(".kernel-guest-nbdvirt.{}", std::process::id()));
    let stripped = find_tool("objcopy").is_some()
        && run_text(Command::new("objcopy").arg("--strip-debug").arg(NBDVIRT).arg(&staging), Duration::from_secs(120)).is_ok();
    if !stripped {
        std::fs::copy(NBDVIRT, &staging).map_err(|e| format!("copy {NBDVIRT}: {e}"))?;
    }
    std::fs::rename(&staging, &nbdvirt).map_err(|e| format!("{}: {e}", nbdvirt.display()))?;
    let mut top_links = Vec::new();
    for name in ["bin", "sbin", "lib", "lib32", "lib64", "libx32"] {
        if let Ok(target) = std::fs::read_link(Path::new("/").join(name)) {
            top_links.push((name.to_string(), target.to_string_lossy().into_owned()));
        }
    }
    eprintln!("[kernel] environment ready in {:.1?}: kernel {} ({}), {}", t0.elapsed(), kernel.release, kernel.origin, qemu.display());
    Ok(Env { kernel, qemu, busybox, applets, nbdvirt, top_links })
}

/// Kernel release the guests boot (prepares the environment if needed).
pub fn kernel_release() -> String {
    env().kernel.release.clone()
}

// ---------------------------------------------------------------------------
// Initramfs (cpio newc)

#[derive(Clone)]
enum Node {
    Dir,
    File { mode: u32, data: Data },
    Symlink(String),
    CharDev { major: u32, minor: u32 },
}

#[derive(Clone)]
enum Data {
    Host(PathBuf),
    Bytes(Vec<u8>),
}

/// An initramfs under construction: archive path (no leading '/') → node.
/// Host files keep their real (symlink-free) host path, so that their
/// dynamic loader and library paths resolve in the guest as on the host.
#[derive(Default, Clone)]
struct Tree {
    nodes: BTreeMap<String, Node>,
}

impl Tree {
    fn parents(&mut self, key: &str) {
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

    fn insert(&mut self, key: String, node: Node) {
        self.parents(&key);
        self.nodes.insert(key, node);
    }

    /// Maps a guest path through the top-level symlinks (`/bin/x` → `usr/bin/x`).
    fn key(&self, guest: &str) -> String {
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
    fn add_host(&mut self, host: &Path) -> Result<(), String> {
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
    fn add_binary(&mut self, host: &Path) -> Result<(), String> {
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

    fn write_cpio(&self, out: impl Write) -> std::io::Result<u64> {
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
struct Cpio<W: Write> {
    w: BufWriter<W>,
    ino: u32,
    total: u64,
}

impl<W: Write> Cpio<W> {
    fn header(&mut self, name: &str, mode: u32, size: u64, rdev: (u32, u32)) -> std::io::Result<()> {
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

    fn data(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.w.write_all(bytes)?;
        self.total += bytes.len() as u64;
        self.pad(bytes.len() as u64)
    }

    /// Pads to a multiple of 4 after `len` bytes.
    fn pad(&mut self, len: u64) -> std::io::Result<()> {
        self.w.write_all(&[0u8; 3][..((4 - len % 4) % 4) as usize])
    }
}

// ---------------------------------------------------------------------------
// Guest

/// One VM boot: files, modules and a script. Build with the methods, then
/// [`Guest::run`].
pub struct Guest {
    tree: Tree,
    errors: Vec<String>,
    modules: Vec<(String, String)>,
    script: String,
    memory_mib: u32,
    cpus: u32,
    append: Vec<String>,
    name: String,
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
    nonce: String,
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

    fn write_mode(mut self, guest: &str, contents: impl AsRef<[u8]>, mode: u32) -> Self {
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

    fn build(&self, env: &Env, nonce: &str, dir: &Path) -> Result<(PathBuf, u64), String> {
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

/// Runs qemu, collecting the console, until it exits or `timeout` passes.
fn boot(cmd: &mut Command, timeout: Duration, nonce: &str, verbose: bool) -> GuestResult {
    let t0 = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let console = Arc::new(Mutex::new(Vec::<u8>::new()));
    let mut out = child.stdout.take().unwrap();
    let sink = console.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            match out.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if verbose {
                        let _ = std::io::stderr().write_all(&buf[..n]);
                    }
                    sink.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            }
        }
    });
    let mut err = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let exit_marker = format!("@@NBDVIRT-GUEST-EXIT {nonce} ");
    let deadline = t0 + timeout;
    let mut marker_seen: Option<Instant> = None;
    let mut timed_out = false;
    loop {
        if child.try_wait().ok().flatten().is_some() {
            break;
        }
        let now = Instant::now();
        if marker_seen.is_none() && String::from_utf8_lossy(&console.lock().unwrap()).contains(&exit_marker) {
            marker_seen = Some(now);
        }
        // The script is done; poweroff should follow within seconds.
        let stuck_after_exit = marker_seen.is_some_and(|t| now.duration_since(t) > Duration::from_secs(20));
        if now > deadline || stuck_after_exit {
            timed_out = marker_seen.is_none();
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let elapsed = t0.elapsed();
    let _ = reader.join();
    let qemu_stderr = String::from_utf8_lossy(&err_reader.join().unwrap_or_default()).into_owned();
    let console = strip_ansi(&String::from_utf8_lossy(&console.lock().unwrap()).replace("\r\n", "\n").replace('\r', ""));
    let exit_code = console.find(&exit_marker).and_then(|i| {
        let rest = &console[i + exit_marker.len()..];
        rest.split("@@").next().and_then(|n| n.trim().parse().ok())
    });
    GuestResult { console, exit_code, timed_out, elapsed, qemu_stderr, nonce: nonce.to_string() }
}

/// Drops terminal escape sequences (SeaBIOS clears the screen).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\x1b' {
            out.push(c);
            continue;
        }
        if chars.next_if_eq(&'[').is_some() {
            // CSI: parameters, then one final byte in @..~
            for p in chars.by_ref() {
                if ('@'..='~').contains(&p) {
                    break;
                }
            }
        } else {
            chars.next();
        }
    }
    out
}

impl GuestResult {
    /// The console between the script's start and exit markers.
    pub fn output(&self) -> &str {
        let start = format!("@@NBDVIRT-GUEST-START {}@@", self.nonce);
        let end = format!("@@NBDVIRT-GUEST-EXIT {} ", self.nonce);
        let from = self.console.find(&start).map(|i| i + start.len()).unwrap_or(0);
        let to = self.console[from..].find(&end).map(|i| from + i).unwrap_or(self.console.len());
        &self.console[from..to]
    }

    fn describe(&self) -> String {
        let why = match (self.exit_code, self.timed_out) {
            (Some(c), _) => format!("the guest script exited with status {c}"),
            (None, true) => format!("the guest did not finish in time (killed after {:.0?})", self.elapsed),
            (None, false) => "the guest stopped without reporting an exit status (kernel panic? init failure?)".to_string(),
        };
        let stderr = if self.qemu_stderr.trim().is_empty() { String::new() } else { format!("\n--- qemu stderr ---\n{}", self.qemu_stderr) };
        format!("{why}\n--- guest console ---\n{}{stderr}\n--- end of guest console ---", self.console)
    }

    /// Panics, printing the whole console, unless the script exited 0.
    #[track_caller]
    pub fn assert_success(&self) -> &Self {
        if self.exit_code != Some(0) {
            panic!("{}", self.describe());
        }
        self
    }

    /// Panics, printing the console, unless the script's output has `needle`.
    #[track_caller]
    pub fn assert_output_contains(&self, needle: &str) -> &Self {
        if !self.output().contains(needle) {
            panic!("the guest output lacks {needle:?}\n{}", self.describe());
        }
        self
    }
}
