//! Thin pool volumes under real clients: ENOSPC when a pool is full
//! (`on_full = "error"`), writes that queue until a reload adds a store
//! (`"queue"`), kill -9 in a write storm with flushes (nothing flushed is
//! lost, no chunk leaks or is mapped twice), reclaim of low-priority space,
//! and the meters.

mod common;

use common::cli::*;
use common::nbd_client::MIB;
use common::*;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// `n` file backends of `size` each, in pool `p` (chunk, on_full).
fn pool_config(n: usize, size: &str, chunk: &str, on_full: &str) -> String {
    let mut s = String::new();
    let names: Vec<String> = (0..n).map(|i| format!("s{i}")).collect();
    for b in &names {
        s += &format!("[[backend]]\nname = \"{b}\"\npath = \"{{dir}}/{b}.img\"\nsize = \"{size}\"\n\n");
    }
    let list: Vec<String> = names.iter().map(|b| format!("\"{b}\"")).collect();
    s += &format!("[[pool]]\nname = \"p\"\nbackends = [{}]\nchunk = \"{chunk}\"\non_full = \"{on_full}\"\nqueue_timeout = \"30s\"\n", list.join(", "));
    s
}

fn qemu_io(uri: &str, cmds: &[&str]) -> std::process::Output {
    require("qemu-io", "qemu-utils");
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    cmd.arg(uri);
    run_timeout(&mut cmd, Duration::from_secs(120))
}

fn qemu_io_ok(uri: &str, cmds: &[&str]) -> String {
    let out = qemu_io(uri, cmds);
    let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && !all.contains("failed"), "qemu-io {cmds:?}:\n{all}");
    all
}

fn pool_status(server: &TestServer) -> Value {
    json(&cli_ok(server, &["pool", "status", "p", "--json"]))["pools"][0].clone()
}

fn fio(server: &TestServer, args: &[&str]) -> Value {
    require("fio", "fio");
    let out = run_timeout(
        Command::new("fio")
            .current_dir(server.dir.path())
            .env("PATH", debian_path())
            .args(["--name=thin", "--ioengine=nbd", &format!("--uri={}", server.uri("t")), "--output-format=json"])
            .args(args),
        Duration::from_secs(120),
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "fio {args:?} failed:\n{stdout}\n{}\n--- log ---\n{}", String::from_utf8_lossy(&out.stderr), server.log());
    assert!(stdout.contains("fio: connected to NBD server"), "fio did not connect:\n{stdout}");
    let start = stdout.find("\n{").map(|i| i + 1).or_else(|| stdout.starts_with('{').then_some(0)).expect("fio JSON");
    let v: Value = serde_json::from_str(&stdout[start..]).expect("fio JSON");
    let job = v["jobs"][0].clone();
    assert_eq!(job["error"], 0, "fio job error: {job}");
    job
}

#[test]
fn thin_writes_beyond_the_pool_get_enospc_and_written_data_still_verifies() {
    // 3 × 8 MiB = 24 chunks of 1 MiB under a 64 MiB thin volume.
    let server = start(&pool_config(3, "8MiB", "1MiB", "error"));
    cli_ok(&server, &["volume", "create", "t", "--size", "64MiB", "--pool", "p", "--thin"]);
    let st = pool_status(&server);
    assert_eq!(st["allocated"], 0, "a thin volume takes no space until written: {st}");
    let verify = ["--rw=write", "--bs=64k", "--size=16M", "--verify=crc32c", "--verify_fatal=1"];
    let job = fio(&server, &verify);
    assert_eq!(job["write"]["io_bytes"], 16 * MIB, "{job}");
    assert_eq!(pool_status(&server)["allocated"], 16 * MIB);

    // 8 chunks are left: a 16 MiB write further on fills them, then fails.
    let uri = server.uri("t");
    let out = qemu_io(&uri, &["write -P 0x5a 32M 16M"]);
    let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(all.contains("No space left on device"), "the write past capacity gets ENOSPC:\n{all}");
    let st = pool_status(&server);
    assert_eq!((st["free"].as_u64(), st["allocated"].as_u64()), (Some(0), Some(24 * MIB)), "{st}");
    // What was written before still verifies; other volumes' reads flow.
    let mut again: Vec<&str> = verify.to_vec();
    again.push("--verify_only");
    fio(&server, &again);
    qemu_io_ok(&uri, &["read -P 0 16M 16M"]);
    // The 16 MiB write ran as one piece per chunk, in parallel: any 8 of
    // its 16 chunks got the space. Each reads whole: 0x5a if it was
    // mapped, else zeros.
    let reads: Vec<String> = (0..16).map(|i| format!("read -P 0x5a {}M 1M", 32 + i)).collect();
    let out = qemu_io(&uri, &reads.iter().map(String::as_str).collect::<Vec<_>>());
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let unmapped: Vec<String> = text.lines().filter_map(|l| l.strip_prefix("Pattern verification failed at offset ")).map(|l| l.split(',').next().unwrap_or("").to_string()).collect();
    assert_eq!(unmapped.len(), 8, "8 of the 16 chunks hold the write:\n{text}");
    let zeros: Vec<String> = unmapped.iter().map(|off| format!("read -P 0 {off} 1M")).collect();
    qemu_io_ok(&uri, &zeros.iter().map(String::as_str).collect::<Vec<_>>());
    let check = json(&cli_ok(&server, &["pool", "check", "--json"]));
    assert_eq!(check["pools"][0]["errors"], serde_json::json!([]), "{check}");
}

#[test]
fn queued_thin_writes_complete_when_a_reload_adds_a_store() {
    let base = pool_config(2, "4MiB", "1MiB", "queue");
    let server = start(&base);
    cli_ok(&server, &["volume", "create", "t", "--size", "32MiB", "--pool", "p", "--thin"]);
    let uri = server.uri("t");
    qemu_io_ok(&uri, &["write -P 0x11 0 8M", "flush"]);
    // The pool is full: this write waits for space.
    require("qemu-io", "qemu-utils");
    let writer = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x22 8M 4M", "-c", "flush", &uri])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(&server, "a queued thin write", Duration::from_secs(20), || pool_status(&server)["queued_writes"].as_u64().unwrap() > 0);
    // A reload brings a third store into the pool.
    let grown = base.replace("backends = [\"s0\", \"s1\"]", "backends = [\"s0\", \"s1\", \"s2\"]")
        + "\n[[backend]]\nname = \"s2\"\npath = \"{dir}/s2.img\"\nsize = \"8MiB\"\n";
    rewrite_config(&server, &grown);
    cli_ok(&server, &["reload"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut writer = writer;
    while writer.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the queued write did not complete after the reload:\n{}", server.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = writer.wait_with_output().unwrap();
    let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && !all.contains("failed"), "the queued write completes without error:\n{all}");
    qemu_io_ok(&uri, &["read -P 0x11 0 8M", "read -P 0x22 8M 4M", "read -P 0 12M 20M"]);
    assert_eq!(pool_status(&server)["allocated"], 12 * MIB);
}

/// A storm of 4 KiB writes, each to a block of its own in random order,
/// with a FLUSH every 16 writes; prints the index of the last write each
/// acknowledged FLUSH covers.
const STORM: &str = r#"
import random, struct, sys
rng = random.Random(7)
blocks = list(range(64 * 1024 * 1024 // 4096))
rng.shuffle(blocks)
for i, b in enumerate(blocks):
    h.pwrite(struct.pack('<Q', i) + bytes([(i * 7 + 1) % 256]) * 4088, b * 4096)
    if i % 16 == 15:
        h.flush()
        print(i, flush=True)
"#;

/// Checks every write up to `last` (same order as STORM).
fn verify_script(last: u64) -> String {
    format!(
        r#"
import random, struct
rng = random.Random(7)
blocks = list(range(64 * 1024 * 1024 // 4096))
rng.shuffle(blocks)
bad = 0
for i, b in enumerate(blocks[:{last} + 1]):
    if h.pread(4096, b * 4096) != struct.pack('<Q', i) + bytes([(i * 7 + 1) % 256]) * 4088:
        bad += 1
print('bad', bad)
"#
    )
}

#[test]
fn kill_9_in_a_thin_write_storm_loses_no_flushed_write_and_leaks_no_chunk() {
    let mut server = start(&pool_config(3, "32MiB", "64KiB", "error"));
    cli_ok(&server, &["volume", "create", "t", "--size", "64MiB", "--pool", "p", "--thin"]);
    require("nbdsh", "python3-libnbd");
    for (round, after_ms) in [300u64, 900, 1700].into_iter().enumerate() {
        let mut storm = Command::new("nbdsh").env("PATH", debian_path()).args(["-u", &server.uri("t"), "-c", STORM]).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
        let (tx, rx) = mpsc::channel();
        let stdout = storm.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(i) = line.trim().parse::<u64>() {
                    let _ = tx.send(i);
                }
            }
        });
        // Wait for the first acknowledged flush, then let it run a while.
        let first = rx.recv_timeout(Duration::from_secs(30)).expect("the storm flushes");
        std::thread::sleep(Duration::from_millis(after_ms));
        server.kill();
        let _ = storm.kill();
        let _ = storm.wait();
        let last = rx.try_iter().last().unwrap_or(first).max(first);
        respawn(&mut server);
        let check = json(&cli_ok(&server, &["pool", "check", "--json"]));
        let report = &check["pools"][0];
        assert_eq!(report["errors"], serde_json::json!([]), "round {round}: {check}\n{}", server.log());
        assert_eq!(report["leaked_returned"], 0, "round {round}: the start-up check returned any leak already: {check}");
        let out = nbdsh(&server.uri("t"), &verify_script(last));
        assert!(out.contains("bad 0"), "round {round}: writes up to {last} (acknowledged and flushed) must read back: {out}");
        // Allocation equals the chunks the map holds.
        let st = pool_status(&server);
        let vol = &st["volumes"][0];
        assert_eq!(st["allocated"], vol["allocated"], "round {round}: {st}");
        cli_ok(&server, &["volume", "delete", "t", "--force"]);
        assert_eq!(pool_status(&server)["allocated"], 0, "round {round}: delete returns every chunk");
        cli_ok(&server, &["volume", "create", "t", "--size", "64MiB", "--pool", "p", "--thin"]);
    }
}

#[test]
fn reclaim_takes_the_oldest_low_priority_chunks_and_never_normal_data() {
    // 4 × 8 MiB = 32 chunks of 1 MiB.
    let server = start(&pool_config(4, "8MiB", "1MiB", "error"));
    cli_ok(&server, &["volume", "create", "keep", "--size", "8MiB", "--pool", "p"]);
    cli_ok(&server, &["volume", "create", "scratch", "--size", "24MiB", "--pool", "p", "--priority", "low"]);
    qemu_io_ok(&server.uri("keep"), &["write -P 0x55 0 8M", "flush"]);
    // The scratch volume's first 8 MiB are written a second before the rest.
    qemu_io_ok(&server.uri("scratch"), &["write -P 0xaa 0 8M", "flush"]);
    std::thread::sleep(Duration::from_millis(2100));
    qemu_io_ok(&server.uri("scratch"), &["write -P 0xbb 8M 16M", "flush"]);
    let out = cli(&server, &["volume", "create", "big", "--size", "32MiB", "--pool", "p"]);
    assert_eq!(out.status.code(), Some(8), "more than free + reclaimable: no_space:\n{}", text(&out));
    assert!(text(&out).contains("short by"), "the error names the shortfall:\n{}", text(&out));
    // 8 MiB more fits once the scratch volume's oldest 8 MiB are reclaimed.
    cli_ok(&server, &["volume", "create", "data", "--size", "8MiB", "--pool", "p"]);
    qemu_io_ok(&server.uri("scratch"), &["read -P 0 0 8M", "read -P 0xbb 8M 16M"]);
    qemu_io_ok(&server.uri("keep"), &["read -P 0x55 0 8M"]);
    qemu_io_ok(&server.uri("data"), &["read -P 0 0 8M"]);
    assert!(server.log().contains("reclaimed chunks of a low-priority volume"), "{}", server.log());
    let st = pool_status(&server);
    assert_eq!(st["reclaimed"], 8 * MIB, "{st}");
    assert_eq!(st["free"], 0, "{st}");
}

#[test]
fn meters_add_up_and_byte_seconds_grow_with_time() {
    let server = start(&pool_config(2, "16MiB", "1MiB", "error"));
    cli_ok(&server, &["volume", "create", "t", "--size", "64MiB", "--pool", "p", "--thin"]);
    cli_ok(&server, &["volume", "create", "k", "--size", "4MiB", "--pool", "p", "--priority", "high"]);
    qemu_io_ok(&server.uri("t"), &["write -P 1 0 3M", "write -P 2 10M 4k", "flush"]);
    qemu_io_ok(&server.uri("k"), &["write -P 3 0 1M", "flush"]);
    let usage = |s: &TestServer| json(&cli_ok(s, &["pool", "usage", "--json"]));
    let find = |u: &Value, v: &str| u["volumes"].as_array().unwrap().iter().find(|x| x["volume"] == v).cloned().unwrap();
    let t0 = Instant::now();
    let u1 = usage(&server);
    std::thread::sleep(Duration::from_secs(2));
    let u2 = usage(&server);
    let elapsed = t0.elapsed().as_secs_f64();
    let (a, b) = (find(&u1, "t"), find(&u2, "t"));
    assert_eq!(b["allocated"], 4 * MIB, "three chunks and one more: {b}");
    assert_eq!(b["written_bytes"], 3 * MIB + 4096, "{b}");
    assert_eq!(b["rate"], "standard");
    let k = find(&u2, "k");
    assert_eq!((k["written_bytes"].as_u64(), k["allocated"].as_u64()), (Some(MIB), Some(4 * MIB)), "a thick volume's writes are metered too: {k}");
    let grown = b["allocation_byte_seconds"].as_f64().unwrap() - a["allocation_byte_seconds"].as_f64().unwrap();
    let alloc = (4 * MIB) as f64;
    assert!(grown >= alloc * 1.9 && grown <= alloc * (elapsed + 0.5), "byte-seconds grow by allocation × time: {grown} over {elapsed:.2}s");
    // The pool's allocation is the sum of the volumes' maps.
    let st = pool_status(&server);
    let sum: u64 = st["volumes"].as_array().unwrap().iter().map(|v| v["allocated"].as_u64().unwrap()).sum();
    assert_eq!(st["allocated"].as_u64(), Some(sum), "{st}");
    assert_eq!(sum, 8 * MIB);
    // A period that starts now bills (almost) nothing yet.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs().to_string();
    let recent = json(&cli_ok(&server, &["pool", "usage", "--since", &now, "--json"]));
    let r = find(&recent, "t");
    assert!(r["allocation_byte_seconds"].as_f64().unwrap() <= alloc * 2.0, "{r}");
    assert_eq!(r["written_bytes"], 0, "{r}");
}

/// Reads past the new end (eight at a time), in flight or held while a
/// shrink's swap drains the tail, get error replies and the connection
/// stays framed.
const TAIL_READS: &str = r#"
import time
errs, done, inflight = 0, 0, []
def reap():
    global errs, done, inflight
    still = []
    for c in inflight:
        try:
            if h.aio_command_completed(c):
                done += 1
            else:
                still.append(c)
        except nbd.Error:
            errs += 1
    inflight = still
t0 = time.time()
while time.time() - t0 < 3 and errs <= 200:
    while len(inflight) < 8:
        inflight.append(h.aio_pread(nbd.Buffer(4096), 6 * 1024 * 1024))
    h.poll(-1)
    reap()
while inflight:
    h.poll(-1)
    reap()
assert h.pread(4096, 0) == bytes(4096)
print('alive', errs, done)
"#;

#[test]
fn reads_racing_a_shrink_get_errors_and_the_connection_stays_framed() {
    // Slow stores (20 ms an I/O): the shrink's drain waits for the read in
    // flight, and the reader's next read arrives during the hold.
    let slow = pool_config(2, "16MiB", "1MiB", "error").replace("size = \"16MiB\"\n", "size = \"16MiB\"\ndelay = \"20ms\"\n");
    assert!(slow.contains("delay"), "{slow}");
    let server = start(&slow);
    cli_ok(&server, &["volume", "create", "v", "--size", "8MiB", "--pool", "p"]);
    require("nbdsh", "python3-libnbd");
    for round in 0..3 {
        if round > 0 {
            cli_ok(&server, &["volume", "resize", "v", "--size", "8MiB"]);
        }
        let reader = Command::new("nbdsh").env("PATH", debian_path()).args(["-u", &server.uri("v"), "-c", TAIL_READS]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        cli_ok(&server, &["volume", "resize", "v", "--size", "4MiB", "--force"]);
        let mut reader = reader;
        let deadline = Instant::now() + Duration::from_secs(30);
        while reader.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = reader.kill();
                panic!("round {round}: the reader hung after the shrink (a reply without its data breaks the framing)\n{}", server.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = reader.wait_with_output().unwrap();
        let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && all.contains("alive"), "round {round}: the reader's connection must survive the shrink:\n{all}\n{}", server.log());
    }
}
