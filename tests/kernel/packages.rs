//! Host preparation: the Debian packages the harness needs (static busybox,
//! qemu, nbd-client, e2fsprogs...), installed with apt-get when missing.

use super::*;

/// `Some(path)` if busybox exists and is statically linked.
pub(crate) fn static_busybox() -> Option<PathBuf> {
    ["/bin/busybox", "/usr/bin/busybox"].iter().map(PathBuf::from).filter(|p| p.is_file()).find(|p| {
        // ldd says "not a dynamic executable" (and fails) for static binaries.
        let out = Command::new("ldd").arg(p).stdout(Stdio::piped()).stderr(Stdio::piped()).output();
        match out {
            Ok(o) => !o.status.success() || String::from_utf8_lossy(&o.stdout).contains("statically linked"),
            Err(_) => false,
        }
    })
}

pub(crate) fn missing_packages() -> Vec<String> {
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

pub(crate) fn apt_candidate(package: &str) -> Option<String> {
    let out = run_text(Command::new("apt-cache").args(["policy", package]), Duration::from_secs(60)).ok()?;
    let v = out.lines().find_map(|l| l.trim().strip_prefix("Candidate:"))?.trim().to_string();
    (v != "(none)").then_some(v)
}

pub(crate) fn installed_version(package: &str) -> Option<String> {
    let out = run_text(Command::new("dpkg-query").args(["-W", "-f", "${Status} ${Version}", package]), Duration::from_secs(30)).ok()?;
    out.strip_prefix("install ok installed ").map(|v| v.trim().to_string())
}

pub(crate) static APT_UPDATED: OnceLock<Result<(), String>> = OnceLock::new();

pub(crate) fn apt_update() -> Result<(), String> {
    APT_UPDATED
        .get_or_init(|| {
            run_text(Command::new("apt-get").args(["update", "-qq"]).env("DEBIAN_FRONTEND", "noninteractive"), Duration::from_secs(600)).map(|_| ())
        })
        .clone()
}

/// Installs what is missing (as root, with apt-get) or explains what to install.
pub(crate) fn ensure_packages() -> Result<(), String> {
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
pub(crate) fn install_args(missing: &[String]) -> Vec<String> {
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
