//! fio's nbd engine writing random 4k blocks with crc32c verify.

use super::cli::text;
use super::run_timeout;
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Runs fio (nbd engine, random 4k writes with crc32c verify) for `secs`
/// seconds in `dir` on `size` bytes from `offset`; returns (write bytes,
/// verified bytes) or why it failed.
pub fn verify_run(dir: &Path, uri: &str, secs: u32, offset: u64, size: u64) -> Result<(u64, u64), String> {
    let mut cmd = Command::new("fio");
    cmd.current_dir(dir).args([
        "--name=verifyload",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randwrite",
        "--bs=4k",
        &format!("--offset={offset}"),
        &format!("--size={size}"),
        "--iodepth=16",
        "--verify=crc32c",
        "--verify_backlog=64",
        "--verify_fatal=1",
        "--do_verify=1",
        "--verify_state_save=0",
        "--time_based",
        &format!("--runtime={secs}"),
        "--output-format=json",
    ]);
    let out = run_timeout(&mut cmd, Duration::from_secs(secs as u64 + 60));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let all = text(&out);
    if !out.status.success() {
        return Err(format!("fio failed: {all}"));
    }
    let at = stdout.find("fio: connected to NBD server").ok_or_else(|| format!("fio did not connect: {all}"))?;
    let rest = &stdout[at..];
    let start = rest.find('{').ok_or_else(|| format!("no JSON in fio output: {all}"))?;
    let v: Value = serde_json::from_str(&rest[start..]).map_err(|e| format!("fio JSON ({e}): {all}"))?;
    let job = &v["jobs"][0];
    if job["error"] != 0 {
        return Err(format!("fio job error {}: {all}", job["error"]));
    }
    if job.get("total_err").and_then(Value::as_u64).unwrap_or(0) != 0 {
        return Err(format!("fio reported errors: {all}"));
    }
    let written = job["write"]["io_bytes"].as_u64().unwrap_or(0);
    let verified = job["read"]["io_bytes"].as_u64().unwrap_or(0);
    if written == 0 || verified * 2 < written {
        return Err(format!("fio wrote {written} bytes but verified only {verified}: {all}"));
    }
    Ok((written, verified))
}

/// `verify_run` of `secs` seconds back to back on a thread until `stop`
/// is set; the thread returns the bytes verified, or the first failure.
pub fn verify_until(dir: &Path, uri: &str, secs: u32, offset: u64, size: u64, stop: &std::sync::Arc<std::sync::atomic::AtomicBool>) -> std::thread::JoinHandle<Result<u64, String>> {
    let (dir, uri, stop) = (dir.to_path_buf(), uri.to_string(), stop.clone());
    std::thread::spawn(move || {
        let mut verified = 0;
        loop {
            verified += verify_run(&dir, &uri, secs, offset, size)?.1;
            if stop.load(std::sync::atomic::Ordering::SeqCst) {
                return Ok(verified);
            }
        }
    })
}
