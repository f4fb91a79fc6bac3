//! Kernel modules: index a kernel's module tree, read (decompressed)
//! module files, and resolve hard dependencies from each module's
//! `.modinfo` ELF section so they load in order.

use super::*;

/// Module name (underscores) → file, for a kernel's module tree.
pub(crate) fn module_index(kernel: &Kernel) -> &'static HashMap<String, PathBuf> {
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
pub(crate) fn module_bytes(path: &Path) -> Result<Vec<u8>, String> {
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
pub(crate) fn elf_section<'a>(data: &'a [u8], want: &str) -> Option<&'a [u8]> {
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
pub(crate) fn module_depends(bytes: &[u8], path: &Path) -> Result<Vec<String>, String> {
    let info = elf_section(bytes, ".modinfo").ok_or_else(|| format!("{}: no .modinfo section (not an x86-64 module?)", path.display()))?;
    Ok(info
        .split(|b| *b == 0)
        .filter_map(|kv| kv.strip_prefix(b"depends="))
        .flat_map(|v| String::from_utf8_lossy(v).split(',').map(|s| s.trim().replace('-', "_")).filter(|s| !s.is_empty()).collect::<Vec<_>>())
        .collect())
}

/// Modules to load, dependencies first: (name, file, bytes).
pub(crate) fn resolve_modules(kernel: &Kernel, wanted: &[(String, String)]) -> Result<Vec<(String, String, Vec<u8>)>, String> {
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
