//! Host preparation: the kernel to boot. Debian's current kernel package
//! is downloaded and extracted once into the cache; its bzImage is turned
//! into an uncompressed vmlinux with a PVH entry note for a fast boot.

use super::*;

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

pub(crate) fn cache_root() -> PathBuf {
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
pub(crate) fn load_kernel_dir(dir: &Path, origin: &str) -> Result<Kernel, String> {
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
pub(crate) fn pvh_image(dir: &Path, vmlinuz: &Path) -> Result<PathBuf, String> {
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
pub(crate) fn extract_vmlinux(vmlinuz: &Path) -> Result<Vec<u8>, String> {
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
pub(crate) fn has_pvh_note(elf: &[u8]) -> bool {
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
pub(crate) fn current_kernel_package() -> Result<(String, String), String> {
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

pub(crate) fn prepare_kernel() -> Result<Kernel, String> {
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
