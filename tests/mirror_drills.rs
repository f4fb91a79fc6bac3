//! Fault drills on a mirror under a verifying writer: fio (crc32c verify
//! through the nbd engine) runs while a leg is added and resyncs, a leg
//! fails (`nbdvirt fault`), a spare takes over and resyncs, and the failed
//! leg is re-added. The client must see no error, and afterwards every
//! in-sync leg holds the same bytes.

mod common;

use common::cli::*;
use common::nbd_client::MIB;
use common::*;
use serde_json::Value;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Volume `v` (32 MiB) mirrored on `a` and `b`; `c` (larger) free for a
/// live add at an offset; `s` a spare of the same size as `b`.
fn config(policy: &str) -> String {
    format!(
        r#"[[backend]]
name = "a"
path = "{{dir}}/a.img"
size = "32MiB"
[[backend]]
name = "b"
path = "{{dir}}/b.img"
size = "32MiB"
[[backend]]
name = "c"
path = "{{dir}}/c.img"
size = "40MiB"
[[backend]]
name = "s"
path = "{{dir}}/s.img"
size = "32MiB"
spare = true

[[volume]]
name = "v"
on_leg_failure = "{policy}"
[[volume.extent]]
length = "32MiB"
mirror = [ {{ backend = "a", backend_offset = 0 }}, {{ backend = "b", backend_offset = 0 }} ]
"#
    )
}

fn mirror(server: &TestServer) -> Value {
    json(&cli_ok(server, &["mirror", "status", "v", "--json"]))["mirrors"][0].clone()
}

/// The leg's state, or `None` if it is not a leg of `v`.
fn leg_state(server: &TestServer, leg: &str) -> Option<String> {
    mirror(server)["legs"].as_array().unwrap().iter().find(|l| l["backend"] == leg).map(|l| l["state"].as_str().unwrap().to_string())
}

fn wait_state(server: &TestServer, leg: &str, state: &str, limit: Duration) {
    wait_until(server, &format!("leg {leg} {state}"), limit, || leg_state(server, leg).as_deref() == Some(state));
}

/// fio writing every 4k block of `v` once (random order, rate-limited so
/// the write phase outlasts the drill), then reading all of it back
/// against its crc32c checksums.
fn start_fio(server: &TestServer, size_mib: u64, rate: &str) -> Child {
    require("fio", "fio");
    Command::new("fio")
        .current_dir(server.dir.path())
        .env("PATH", debian_path())
        .args(["--name=drill", "--ioengine=nbd", &format!("--uri={}", server.uri("v")), "--rw=randwrite", "--bs=4k", "--iodepth=16"])
        .args([&format!("--size={size_mib}M"), &format!("--rate={rate}"), "--verify=crc32c", "--verify_fatal=1", "--output-format=json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start fio")
}

/// Waits (bounded) for fio and returns its one job's JSON.
fn finish_fio(server: &TestServer, mut fio: Child, limit: Duration) -> Value {
    let deadline = Instant::now() + limit;
    while fio.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = fio.kill();
            let _ = fio.wait();
            panic!("fio did not finish within {limit:?}\n--- log ---\n{}", server.log());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = fio.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "fio failed ({}):\n{stdout}\n{stderr}\n--- log ---\n{}", out.status, server.log());
    assert!(stdout.contains("fio: connected to NBD server"), "fio did not connect:\n{stdout}");
    let start = stdout.find("\n{").map(|i| i + 1).or_else(|| stdout.starts_with('{').then_some(0)).unwrap_or_else(|| panic!("no JSON in fio output:\n{stdout}"));
    let v: Value = serde_json::from_str(&stdout[start..]).unwrap_or_else(|e| panic!("fio JSON ({e}):\n{stdout}"));
    let jobs = v["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 1, "{v}");
    jobs[0].clone()
}

fn assert_fio_clean(job: &Value, size: u64) {
    assert_eq!(job["error"], 0, "fio job error: {job}");
    assert_eq!(job["total_err"].as_u64().unwrap_or(0), 0, "{job}");
    assert_eq!(job["write"]["io_bytes"], size, "every block written: {job}");
    assert_eq!(job["read"]["io_bytes"], size, "the verify phase read everything back: {job}");
}

/// `(backend, store offset)` of every leg of `v`'s one extent, from status.
fn legs_of(server: &TestServer) -> Vec<(String, u64)> {
    let st = vol(server, "v");
    let extents = st["extents"].as_array().unwrap();
    assert_eq!(extents.len(), 1, "{st}");
    extents[0]["legs"].as_array().unwrap().iter().map(|l| (l["backend"].as_str().unwrap().to_string(), l["backend_offset"].as_u64().unwrap())).collect()
}

/// Every listed leg holds the same `len` bytes at its offset.
fn assert_legs_identical(server: &TestServer, legs: &[(String, u64)], len: u64) {
    let (first, off) = &legs[0];
    let reference = read_at(&server.path(&format!("{first}.img")), *off, len as usize);
    assert!(reference.chunks(4096).all(|c| c.iter().any(|b| *b != 0)), "fio wrote every block of {first}");
    for (name, off) in &legs[1..] {
        let data = read_at(&server.path(&format!("{name}.img")), *off, len as usize);
        if let Some(i) = reference.iter().zip(&data).position(|(x, y)| x != y) {
            panic!("legs {first}@{} and {name}@{off} differ at volume byte {i}\n{}", legs[0].1, server.log());
        }
    }
}

#[test]
fn fio_verifies_through_add_fault_spare_and_readd() {
    const SIZE: u64 = 32 * MIB;
    let mut server = start(&config("spare"));
    wait_state(&server, "b", "in_sync", Duration::from_secs(30));
    // 32 MiB at 1.5 MiB/s: a write phase of about 21 s.
    let fio = start_fio(&server, 32, "1536k");
    wait_until(&server, "fio writing", Duration::from_secs(20), || mirror(&server)["dirty_bytes"].as_u64().unwrap() > 0);

    // A leg is added at an offset and resyncs (slowly, so the fault
    // below lands during its resync).
    cli_ok(&server, &["mirror", "add", "v", "--to", "c:4MiB", "--rate", "4MiB"]);
    wait_until(&server, "c resyncing past 25%", Duration::from_secs(30), || {
        let m = mirror(&server);
        let c = m["legs"].as_array().unwrap().iter().find(|l| l["backend"] == "c").cloned().unwrap();
        c["state"] == "in_sync" || c["percent"].as_f64().unwrap() >= 25.0
    });

    // b fails: it is dropped, the spare joins and resyncs.
    cli_ok(&server, &["fault", "b", "--error", "eio"]);
    wait_state(&server, "b", "failed", Duration::from_secs(20));
    wait_until(&server, "spare s added", Duration::from_secs(20), || leg_state(&server, "s").is_some());
    wait_state(&server, "s", "in_sync", Duration::from_secs(40));
    wait_state(&server, "c", "in_sync", Duration::from_secs(40));
    let m = mirror(&server);
    let b = m["legs"].as_array().unwrap().iter().find(|l| l["backend"] == "b").cloned().unwrap();
    assert!(b["reason"].as_str().unwrap_or("").contains("EIO"), "b failed with EIO: {m}");
    assert!(server.log().contains("spare added in place of the failed leg"), "{}", server.log());

    // b heals and is re-added: only what it missed is copied.
    cli_ok(&server, &["fault", "b", "--error", "off"]);
    let out = cli_ok(&server, &["mirror", "readd", "v", "--leg", "b", "--wait"]);
    assert!(out.contains("in sync"), "{out}");
    let mut fio = fio;
    let fio_running = fio.try_wait().unwrap().is_none();

    let job = finish_fio(&server, fio, Duration::from_secs(120));
    assert_fio_clean(&job, SIZE);
    assert!(fio_running, "fio ended before the drill did: the drill did not run under I/O");
    server.assert_alive();

    let legs = legs_of(&server);
    let names: Vec<&str> = legs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["a", "b", "c", "s"], "{legs:?}");
    assert_eq!(legs[2].1, 4 * MIB, "c holds the extent at the offset asked for");
    for (name, _) in &legs {
        assert_eq!(leg_state(&server, name).as_deref(), Some("in_sync"), "{}", mirror(&server));
    }
    assert_legs_identical(&server, &legs, SIZE);
}

#[test]
fn degrade_policy_keeps_the_spare_free_and_io_going() {
    const SIZE: u64 = 16 * MIB;
    let server = start(&config("degrade"));
    wait_state(&server, "b", "in_sync", Duration::from_secs(30));
    cli_ok(&server, &["fault", "b", "--error", "eio"]);
    // 16 MiB at 4 MiB/s, b failing from the first write.
    let fio = start_fio(&server, 16, "4m");
    wait_state(&server, "b", "failed", Duration::from_secs(20));
    let job = finish_fio(&server, fio, Duration::from_secs(60));
    assert_fio_clean(&job, SIZE);
    assert!(server.log().contains("running degraded"), "{}", server.log());
    // No spare joined: the legs are still a (in sync) and b (failed), and
    // the spare is untouched.
    let m = mirror(&server);
    let legs: Vec<(String, String)> = m["legs"].as_array().unwrap().iter().map(|l| (l["backend"].as_str().unwrap().into(), l["state"].as_str().unwrap().into())).collect();
    assert_eq!(legs, [("a".to_string(), "in_sync".to_string()), ("b".into(), "failed".into())], "{m}");
    assert_eq!(m["pair"], "simplex", "{m}");
    assert_eq!(legs_of(&server).len(), 2);
    assert!(read_at(&server.path("s.img"), 0, SIZE as usize).iter().all(|b| *b == 0), "the spare was not written");
    // What fio wrote is on a, not on the failed b.
    assert!(read_at(&server.path("a.img"), 0, SIZE as usize).chunks(4096).all(|c| c.iter().any(|b| *b != 0)));
    assert_ne!(read_at(&server.path("a.img"), 0, SIZE as usize), read_at(&server.path("b.img"), 0, SIZE as usize));
}

/// A leg failing within the first second of the server (before the
/// supervisor's first round) still gets its spare.
#[test]
fn a_leg_failing_right_after_start_still_gets_a_spare() {
    let server = start(&config("spare"));
    cli_ok(&server, &["fault", "b", "--error", "eio"]);
    nbdsh(&server.uri("v"), "h.pwrite(b'x' * 4096, 0)\nh.flush()");
    wait_state(&server, "b", "failed", Duration::from_secs(20));
    wait_state(&server, "s", "in_sync", Duration::from_secs(30));
    assert_eq!(read_at(&server.path("s.img"), 0, 4096), vec![b'x'; 4096]);
}
