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
//!
//! The harness is cut by job, one file each beside this one:
//! - `host.rs`: running host tools with a time limit, env switches;
//! - `packages.rs`: the Debian packages it needs, installed when missing;
//! - `kernel_image.rs`: the kernel package, fetched, cached, made bootable;
//! - `modules.rs`: the module tree and dependency order;
//! - `initramfs.rs`: the file tree and its cpio archive;
//! - `guest.rs`: one VM boot as a test describes it;
//! - `boot.rs`: qemu itself, the console and the result.
//!
//! This file holds what they share and the environment prepared once per
//! test process.
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
    &[("qemu-system-x86_64", "qemu-system-x86"), ("nbd-client", "nbd-client"), ("mke2fs", "e2fsprogs"), ("e2fsck", "e2fsprogs"), ("fio", "fio"), ("jq", "jq"), ("dpkg-deb", "dpkg"), ("ldd", "libc-bin"), ("openssl", "openssl"), ("psktool", "gnutls-bin")];

mod boot;
mod guest;
mod host;
mod initramfs;
mod kernel_image;
mod modules;
mod packages;

// Each file reaches its siblings' items through `use super::*`.
use boot::*;
pub use guest::{Guest, GuestResult};
use host::*;
use initramfs::*;
use kernel_image::*;
use modules::*;
use packages::*;

// ---------------------------------------------------------------------------
// The prepared environment (once per test process)

pub(crate) struct Env {
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
