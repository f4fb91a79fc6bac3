//! Pause–drain–swap of a volume's mapping table under live I/O, driven the
//! way an operator drives it: edit the config, `nbdvirt reload`; or
//! `nbdvirt pause` / `resume`. Real binary, real clients (fio, nbdsh).
//!
//! Ordering, not wall-clock time, is what the assertions rely on: "this
//! I/O completed while status still said pausing", "this write had not
//! completed until resume".
mod common;
use common::cli::*;
use common::script::*;
use common::*;
use serde_json::Value;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------- helpers

/// Connects, prints `ready`, waits for a line on stdin, writes the bytes of
/// `data` at `offset` (a blocking pwrite), prints `done`.
fn triggered_write(what: &str, uri: &str, data: &str, offset: u64) -> Script {
    let mut s = Script::start(
        what,
        uri,
        &format!(
            "import sys\nd = open('{data}', 'rb').read()\nprint('ready', flush=True)\nsys.stdin.readline()\nh.pwrite(d, {offset})\nprint('done', flush=True)\n"
        ),
    );
    s.expect("ready", Duration::from_secs(30));
    s
}

/// Connects, prints `ready`; for each stdin line writes `data` at `offset`,
/// reads it back, checks it, and prints `ok N`.
fn io_loop(what: &str, uri: &str, data: &str, offset: u64) -> Script {
    let mut s = Script::start(
        what,
        uri,
        &format!(
            "import sys\nd = open('{data}', 'rb').read()\nprint('ready', flush=True)\nn = 0\nwhile sys.stdin.readline():\n    h.pwrite(d, {offset})\n    assert h.pread(len(d), {offset}) == d, 'read back differs'\n    n += 1\n    print('ok', n, flush=True)\n"
        ),
    );
    s.expect("ready", Duration::from_secs(30));
    s
}

// ------------------------------------------------- 1. many swaps under fio

const FIO_SIZE: u64 = 16 * MIB;
const FIO_SWAPS: usize = 100;

/// A cut of the 16 MiB volume into extents, each mapped onto the same
/// bytes of `data.img` through backend name `a` or `b`.
fn cut_body(cut: &[(u64, u64, &str)]) -> String {
    let mut s = String::new();
    for name in ["a", "b"] {
        s += &format!("[[backend]]\nname = \"{name}\"\npath = \"{{dir}}/data.img\"\nsize = \"16MiB\"\nshared = true\n\n");
    }
    s += "[[volume]]\nname = \"v\"\n";
    for (start, length, backend) in cut {
        s += &format!("[[volume.extent]]\nstart = {start}\nlength = {length}\nbackend = \"{backend}\"\nbackend_offset = {start}\n");
    }
    s
}

/// Iteration `i`'s cut: 4 to 8 extents at 64 KiB boundaries, names mixed.
fn random_cut(seed: u64) -> Vec<(u64, u64, &'static str)> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let units = FIO_SIZE / (64 * KIB);
    let k = 4 + (next() % 5) as usize;
    let mut cuts = std::collections::BTreeSet::new();
    while cuts.len() < k - 1 {
        cuts.insert(1 + next() % (units - 1));
    }
    let mut bounds: Vec<u64> = vec![0];
    bounds.extend(cuts.iter().map(|c| c * 64 * KIB));
    bounds.push(FIO_SIZE);
    bounds.windows(2).map(|w| (w[0], w[1] - w[0], if next() % 2 == 0 { "a" } else { "b" })).collect()
}

fn fio_run(dir: &Path, uri: &str, secs: u32) -> Result<(u64, u64), String> {
    common::fio::verify_run(dir, uri, secs, 0, FIO_SIZE)
}

#[test]
fn hundred_swaps_under_fio_write_verify_load() {
    require("fio", "fio");
    require("nbdsh", "python3-libnbd");
    let first = random_cut(0);
    let server = start(&cut_body(&first));
    let uri = server.uri("v");
    let cfg = server.config.display().to_string();
    let nbdvirt = |args: &[&str]| -> Output {
        let mut cmd = Command::new(BIN);
        cmd.args(args).args(["--config", &cfg]).env_remove("NBDVIRT_CONFIG");
        run_timeout(&mut cmd, Duration::from_secs(90))
    };
    let status = || -> Value {
        let out = nbdvirt(&["status", "--json"]);
        assert!(out.status.success(), "status: {}", text(&out));
        vol_of(&json(&String::from_utf8_lossy(&out.stdout)), "v")
    };
    assert_eq!(status()["generation"], 1);

    // fio runs back to back until enough swaps are done; swaps continue
    // until the last fio run has ended, so every run is under swaps.
    let stop = Arc::new(AtomicBool::new(false));
    let fio = {
        let (dir, uri, stop) = (server.dir.path().to_path_buf(), uri.clone(), stop.clone());
        std::thread::spawn(move || -> Result<Vec<(u64, u64)>, String> {
            let mut runs = Vec::new();
            loop {
                runs.push(fio_run(&dir, &uri, 4)?);
                if stop.load(Ordering::SeqCst) {
                    return Ok(runs);
                }
            }
        })
    };
    wait_until(&server, "fio to connect", Duration::from_secs(30), || fio.is_finished() || vol(&server, "v")["connections"].as_u64() >= Some(1));

    let mut previous = first;
    let mut generation = 1u64;
    let mut swaps = 0usize;
    let mut parked_seen = false;
    for i in 1u64.. {
        if fio.is_finished() {
            break;
        }
        if swaps >= FIO_SWAPS {
            stop.store(true, Ordering::SeqCst);
        }
        assert!(i < 5000, "fio never finished");
        let mut cut = random_cut(i);
        if cut == previous {
            cut[0].2 = if cut[0].2 == "a" { "b" } else { "a" };
        }
        rewrite_config(&server, &cut_body(&cut));
        let out = nbdvirt(&["reload", "--json"]);
        assert!(out.status.success(), "reload {i} failed: {}\n--- log ---\n{}", text(&out), server.log());
        let report = json(&String::from_utf8_lossy(&out.stdout));
        let swapped = report["swapped"].as_array().unwrap();
        assert_eq!(swapped.len(), 1, "reload {i}: one swap expected: {report}");
        assert_eq!(swapped[0]["from_generation"], generation, "{report}");
        assert_eq!(swapped[0]["generation"], generation + 1, "reload {i}: generation advances by one: {report}");
        assert!(report["errors"].as_array().unwrap().is_empty(), "{report}");
        generation += 1;
        swaps += 1;
        let v = status();
        assert_eq!(v["generation"], generation, "status after reload {i}: {v}");
        let want: Vec<_> = cut.iter().map(|(s, l, b)| (*s, *l, b.to_string(), *s)).collect();
        assert_eq!(extents_of(&v), want, "status extents after reload {i}");
        parked_seen |= v["held_requests"].as_u64() > Some(0);
        previous = cut;
    }
    let runs = fio.join().expect("fio thread").unwrap_or_else(|e| panic!("{e}\n--- server log ---\n{}", server.log()));
    assert!(swaps >= FIO_SWAPS, "only {swaps} swaps happened before fio ended");
    eprintln!("{swaps} swaps under {} fio run(s) {runs:?}; parked request seen in status: {parked_seen}", runs.len());
    assert_eq!(generation, swaps as u64 + 1);
    let hist = history_generations(&server, "v");
    assert_eq!(hist, (1..=generation).collect::<Vec<_>>(), "every generation is in the history");

    // The volume is the identity over data.img: a fresh read of the whole
    // volume equals the file.
    let dump = server.path("volume.dump");
    nbdsh_run(&uri, &format!("open('{}', 'wb').write(h.pread({FIO_SIZE}, 0))\n", dump.display()));
    let volume = std::fs::read(&dump).unwrap();
    let file = read_at(&server.path("data.img"), 0, FIO_SIZE as usize);
    assert!(volume == file, "volume content differs from data.img");
    let zero_blocks = file.chunks(4096).filter(|c| c.iter().all(|b| *b == 0)).count();
    assert!(zero_blocks < (FIO_SIZE / 4096 / 2) as usize, "fio should have written most blocks ({zero_blocks} all-zero 4k blocks)");
}

// ------------------------------------------- 2. only changed ranges held

/// Extent 0 on a slow store reachable under two names, extent 1 on a fast
/// store. `server_extra` goes into `[server]`, `slow` is `s1` or `s2`.
fn slow_fast_body(server_extra: &str, delay: &str, slow: &str) -> String {
    format!(
        r#"{server_extra}
[[backend]]
name = "s1"
path = "{{dir}}/slow.img"
size = "4MiB"
shared = true
delay = "{delay}"

[[backend]]
name = "s2"
path = "{{dir}}/slow.img"
size = "4MiB"
shared = true
delay = "{delay}"

[[backend]]
name = "f"
path = "{{dir}}/fast.img"
size = "4MiB"

[[volume]]
name = "v"
[[volume.extent]]
length = "4MiB"
backend = "{slow}"
backend_offset = 0
[[volume.extent]]
length = "4MiB"
backend = "f"
backend_offset = 0
"#
    )
}

#[test]
fn swap_holds_only_the_changed_range_while_draining() {
    let server = start(&slow_fast_body("", "2s", "s1"));
    let uri = server.uri("v");
    let a = pattern(1, 64 * KIB as usize);
    let b = pattern(2, 64 * KIB as usize);
    let c = pattern(3, 4 * KIB as usize);
    let (ap, bp, cp) = (data_file(&server, "a.bin", &a), data_file(&server, "b.bin", &b), data_file(&server, "c.bin", &c));
    let mut slow = triggered_write("slow write, extent 0", &uri, &ap, 0);
    let mut held = triggered_write("write into the held range", &uri, &cp, MIB);
    let mut fast = io_loop("I/O on extent 1", &uri, &bp, 4 * MIB + 128 * KIB);

    slow.send("go");
    wait_until(&server, "the slow write in flight", Duration::from_secs(10), || vol(&server, "v")["in_flight"].as_u64() >= Some(1));
    rewrite_config(&server, &slow_fast_body("", "2s", "s2"));
    let mut reload = Command::new(BIN);
    reload.args(["reload", "--json", "--control"]).arg(server.path("control.sock"));
    let reload = std::thread::spawn(move || run_timeout(&mut reload, Duration::from_secs(60)));
    wait_until(&server, "state pausing", Duration::from_secs(10), || vol(&server, "v")["state"] == "pausing");
    let v = vol(&server, "v");
    assert_eq!(v["held_ranges"], serde_json::json!([{"start": 0, "length": 4 * MIB}]), "only extent 0 is held: {v}");

    // A new request in the held range parks...
    held.send("go");
    wait_until(&server, "the request in the held range to park", Duration::from_secs(10), || vol(&server, "v")["held_requests"].as_u64() >= Some(1));
    // ...while I/O on extent 1 flows: three write+read round trips finish
    // while the swap is still draining.
    for n in 1..=3 {
        fast.send("go");
        fast.expect(&format!("ok {n}"), Duration::from_secs(10));
    }
    let v = vol(&server, "v");
    assert_eq!(v["state"], "pausing", "extent-1 I/O completed while extent 0 was still draining: {v}");
    assert_eq!(v["generation"], 1, "{v}");
    assert!(!reload.is_finished(), "reload was still waiting for the drain");
    slow.quiet("the slow write cannot have finished before the drain");
    held.quiet("a held request cannot complete before the swap");

    let out = reload.join().unwrap();
    assert!(out.status.success(), "reload failed: {}\n{}", text(&out), server.log());
    let report = json(&String::from_utf8_lossy(&out.stdout));
    let s = &report["swapped"][0];
    assert_eq!(s["generation"], 2, "{report}");
    assert_eq!(s["ranges"], serde_json::json!([{"start": 0, "end": 4 * MIB}]), "{report}");
    assert_eq!(s["attempts"], 1, "{report}");
    slow.expect("done", Duration::from_secs(10));
    held.expect("done", Duration::from_secs(10));
    slow.finish(Duration::from_secs(10));
    held.finish(Duration::from_secs(10));
    fast.finish(Duration::from_secs(10));
    let v = vol(&server, "v");
    assert_eq!((v["generation"].as_u64(), v["state"].as_str()), (Some(2), Some("running")), "{v}");
    assert_eq!(extents_of(&v)[0].2, "s2");
    assert_eq!(read_at(&server.path("slow.img"), 0, a.len()), a);
    assert_eq!(read_at(&server.path("slow.img"), MIB, c.len()), c);
    assert_eq!(read_at(&server.path("fast.img"), 128 * KIB, b.len()), b);
}

// ------------------------------------------------- 3. drain timeouts

#[test]
fn drain_timeout_resumes_on_old_table_then_retry_succeeds() {
    let extra = "pause_timeout = \"500ms\"\npause_retries = 5\n";
    let server = start(&slow_fast_body(extra, "1500ms", "s1"));
    let uri = server.uri("v");
    let a = pattern(4, 64 * KIB as usize);
    let ap = data_file(&server, "a.bin", &a);
    let mut slow = triggered_write("slow write", &uri, &ap, 0);
    slow.send("go");
    wait_until(&server, "the slow write in flight", Duration::from_secs(10), || vol(&server, "v")["in_flight"].as_u64() >= Some(1));
    rewrite_config(&server, &slow_fast_body(extra, "1500ms", "s2"));
    let report = json(&cli_ok(&server, &["reload", "--json"]));
    let s = &report["swapped"][0];
    assert_eq!(s["generation"], 2, "{report}");
    assert!(s["attempts"].as_u64().unwrap() >= 2, "the first drain (500ms) cannot outlast a 1.5s write: {report}");
    assert!(server.log().contains("drain timed out"), "the server logs the drain timeout:\n{}", server.log());
    slow.expect("done", Duration::from_secs(10));
    slow.finish(Duration::from_secs(10));
    let v = vol(&server, "v");
    assert_eq!((v["generation"].as_u64(), v["state"].as_str()), (Some(2), Some("running")), "{v}");
    assert_eq!(read_at(&server.path("slow.img"), 0, a.len()), a);
}

#[test]
fn drain_timeout_with_retries_exhausted_fails_and_keeps_the_old_table() {
    let extra = "pause_timeout = \"500ms\"\npause_retries = 0\n";
    let server = start(&slow_fast_body(extra, "1s", "s1"));
    let uri = server.uri("v");
    let a = pattern(5, 64 * KIB as usize);
    let b = pattern(6, 64 * KIB as usize);
    let (ap, bp) = (data_file(&server, "a.bin", &a), data_file(&server, "b.bin", &b));
    let mut slow = triggered_write("slow write", &uri, &ap, 0);
    slow.send("go");
    wait_until(&server, "the slow write in flight", Duration::from_secs(10), || vol(&server, "v")["in_flight"].as_u64() >= Some(1));
    rewrite_config(&server, &slow_fast_body(extra, "1s", "s2"));
    let err = cli_err(&server, &["reload"]);
    assert!(err.contains("drain timed out"), "reload names the drain timeout: {err}");
    assert!(err.contains("'v'"), "reload names the volume: {err}");
    let v = vol(&server, "v");
    assert_eq!(v["generation"], 1, "generation unchanged: {v}");
    assert_eq!(extents_of(&v)[0].2, "s1", "old table in force: {v}");
    assert!(v["held_ranges"].as_array().unwrap().is_empty(), "nothing held after the failure: {v}");
    assert!(v["last_error"].as_str().unwrap_or("").contains("drain timed out"), "{v}");
    // The in-flight write and new I/O on both extents work.
    slow.expect("done", Duration::from_secs(10));
    slow.finish(Duration::from_secs(10));
    let mut io = io_loop("I/O after the failed reload", &uri, &bp, 4 * MIB);
    io.send("go");
    io.expect("ok 1", Duration::from_secs(10));
    io.finish(Duration::from_secs(10));
    nbdsh_run(&uri, &format!("d = open('{bp}', 'rb').read()\nh.pwrite(d, 2*1024*1024)\nassert h.pread(len(d), 2*1024*1024) == d\n"));
    assert_volume_reads(&uri, &ap, 0);
    assert_eq!(generation(&server, "v"), 1);
    // Nothing in flight now: the same reload goes through.
    let report = json(&cli_ok(&server, &["reload", "--json"]));
    assert_eq!(report["swapped"][0]["generation"], 2, "{report}");
    assert_eq!(report["swapped"][0]["attempts"], 1, "{report}");
    assert_eq!(history_generations(&server, "v"), vec![1, 2]);
}

// --------------------------- 4. parked requests complete on the new table

fn two_files_body(first: &str) -> String {
    format!(
        r#"[[backend]]
name = "p"
path = "{{dir}}/p.img"
size = "8MiB"

[[backend]]
name = "q"
path = "{{dir}}/q.img"
size = "8MiB"

[[volume]]
name = "v"
[[volume.extent]]
length = "4MiB"
backend = "{first}"
backend_offset = 0
[[volume.extent]]
length = "4MiB"
backend = "p"
backend_offset = "4MiB"
"#
    )
}

#[test]
fn write_parked_by_manual_pause_lands_through_the_new_table_after_resume() {
    let server = start(&two_files_body("p"));
    let uri = server.uri("v");
    let x = pattern(7, 64 * KIB as usize);
    let y = pattern(8, 64 * KIB as usize);
    let (xp, yp) = (data_file(&server, "x.bin", &x), data_file(&server, "y.bin", &y));
    nbdsh_run(&uri, &format!("h.pwrite(open('{xp}', 'rb').read(), 0)\nh.flush()\n"));
    assert_eq!(read_at(&server.path("p.img"), 0, x.len()), x);

    // The write is issued and a FLUSH after it on the same connection; the
    // script reports when each completes.
    let mut w = Script::start(
        "write during pause",
        &uri,
        &format!(
            r#"import sys
d = open('{yp}', 'rb').read()
print('ready', flush=True)
sys.stdin.readline()
c = h.aio_pwrite(d, 0)
f = h.aio_flush()
while not h.aio_command_completed(f):
    h.poll(-1)
print('flushed', flush=True)
print('write-done' if h.aio_command_completed(c) else 'write-pending', flush=True)
while not h.aio_command_completed(c):
    h.poll(-1)
print('written', flush=True)
"#
        ),
    );
    w.expect("ready", Duration::from_secs(30));

    let msg = cli_ok(&server, &["pause", "v", "--timeout", "20s"]);
    assert!(msg.contains("paused"), "{msg}");
    let v = vol(&server, "v");
    assert_eq!((v["state"].as_str(), v["manual_pause"].as_bool()), (Some("paused"), Some(true)), "{v}");
    w.send("go");
    // FLUSH is never held: it completes while the write is parked.
    w.expect("flushed", Duration::from_secs(10));
    w.expect("write-pending", Duration::from_secs(10));
    wait_until(&server, "the write to park", Duration::from_secs(10), || vol(&server, "v")["held_requests"].as_u64() >= Some(1));

    // Re-map [0, 4MiB) from p.img to q.img while the write is parked. The
    // swap drains only admitted requests (none), swaps, releases its own
    // hold; the write re-parks behind the operator's pause.
    rewrite_config(&server, &two_files_body("q"));
    let report = json(&cli_ok(&server, &["reload", "--json"]));
    let s = &report["swapped"][0];
    assert_eq!(s["generation"], 2, "{report}");
    assert_eq!(s["ranges"], serde_json::json!([{"start": 0, "end": 4 * MIB}]), "{report}");
    let v = vol(&server, "v");
    assert_eq!(v["generation"], 2, "{v}");
    assert_eq!(v["state"], "paused", "the operator's pause outlives the swap: {v}");
    assert!(v["held_requests"].as_u64() >= Some(1), "the write is still parked: {v}");
    std::thread::sleep(Duration::from_millis(100));
    w.quiet("the write must stay parked until resume");

    let msg = cli_ok(&server, &["resume", "v"]);
    assert!(msg.contains("resumed"), "{msg}");
    w.expect("written", Duration::from_secs(10));
    w.finish(Duration::from_secs(10));
    assert_eq!(read_at(&server.path("q.img"), 0, y.len()), y, "the parked write went through the new table (q.img)");
    assert_eq!(read_at(&server.path("p.img"), 0, x.len()), x, "the old table's file was not written");
    assert_volume_reads(&uri, &yp, 0);
    let v = vol(&server, "v");
    assert_eq!((v["state"].as_str(), v["held_requests"].as_u64(), v["manual_pause"].as_bool()), (Some("running"), Some(0), Some(false)), "{v}");
}

// ------------------------------------------------ 5. kill -9 at each phase

/// Before: `SHARED`, [0,8MiB) through `a` in two extents. After: the same
/// bytes cut differently, [0,2MiB) through `b`.
fn crash_new() -> String {
    recut(2 * MIB, "b")
}

/// Starts the server like `TestServer::spawn`, with the crash hook armed.
fn spawn_crashing(server: &mut TestServer, phase: &str) {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(server.path("server.log")).unwrap();
    let child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&server.config)
        .env("RUST_LOG", "nbdvirt=debug")
        .env("NBDVIRT_TEST_CRASH_AT", phase)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start nbdvirt");
    server.child = Some(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(&server.socket).is_err() || UnixStream::connect(server.path("control.sock")).is_err() {
        if let Some(status) = server.child.as_mut().unwrap().try_wait().unwrap() {
            panic!("nbdvirt exited during start-up ({status}):\n{}", server.log());
        }
        assert!(Instant::now() < deadline, "nbdvirt did not start within 20 s:\n{}", server.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn persisted_generation(server: &TestServer) -> u64 {
    let p = server.path("state/volumes/v/current.json");
    json(&std::fs::read_to_string(&p).unwrap())["generation"].as_u64().unwrap()
}

fn crash_during_swap(phase: &str) {
    use std::os::unix::process::ExitStatusExt;
    let mut server = start(SHARED);
    assert_eq!(generation(&server, "v"), 1);
    server.kill();
    spawn_crashing(&mut server, phase);
    let uri = server.uri("v");
    let d = pattern(9, (MIB + 512 * KIB) as usize);
    let dp = data_file(&server, "d.bin", &d);
    // Spans the old extent boundary at 4MiB and the new one at 2MiB.
    let offset = MIB + 512 * KIB;
    nbdsh_run(&uri, &format!("h.pwrite(open('{dp}', 'rb').read(), {offset})\nh.flush()\n"));

    rewrite_config(&server, &crash_new());
    let err = cli_err(&server, &["reload"]);
    let mut child = server.child.take().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "server did not die at phase {phase}; reload said: {err}\n{}", server.log());
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.signal(), Some(libc::SIGABRT), "the server aborted at {phase}: {status}\n{}", server.log());
    assert!(server.log().contains("crash injected at swap phase"), "{}", server.log());

    let after_commit = matches!(phase, "persisted" | "swapped");
    assert_eq!(persisted_generation(&server), if after_commit { 2 } else { 1 }, "current.json after a crash at {phase}");
    let old_extents = vec![(0, 4 * MIB, "a".to_string(), 0), (4 * MIB, 4 * MIB, "a".to_string(), 4 * MIB)];
    let new_extents = vec![(0, 2 * MIB, "b".to_string(), 0), (2 * MIB, 6 * MIB, "a".to_string(), 2 * MIB)];

    if after_commit {
        // The new generation was durable: a restart on the (new) config
        // serves it without committing another.
        respawn(&mut server);
        let v = vol(&server, "v");
        assert_eq!(v["generation"], 2, "restart after a crash at {phase}: {v}");
        assert_eq!(extents_of(&v), new_extents);
        let hist = history(&server, "v");
        assert_eq!(hist.iter().map(|g| g["generation"].as_u64().unwrap()).collect::<Vec<_>>(), vec![1, 2], "{hist:?}");
        assert_eq!(hist[1]["reason"], "reload", "generation 2 is the reload's, not a new commit at start: {hist:?}");
        let report = json(&cli_ok(&server, &["reload", "--json"]));
        assert_eq!(report["unchanged"], serde_json::json!(["v"]), "{report}");
        assert_eq!(generation(&server, "v"), 2);
    } else {
        // Nothing was committed: with the config put back, the restart
        // serves generation 1 and the crashed swap left no trace...
        rewrite_config(&server, SHARED);
        respawn(&mut server);
        let v = vol(&server, "v");
        assert_eq!(v["generation"], 1, "restart after a crash at {phase}: {v}");
        assert_eq!(extents_of(&v), old_extents);
        assert_eq!(history_generations(&server, "v"), vec![1]);
        rewrite_config(&server, &crash_new());
        if phase == "stage" {
            // ...the reload can be redone (over the leftover prepared file)...
            let report = json(&cli_ok(&server, &["reload", "--json"]));
            assert_eq!(report["swapped"][0]["generation"], 2, "{report}");
        } else {
            // ...or a restart on the new config commits it at start-up.
            assert!(server.stop().success(), "clean stop:\n{}", server.log());
            respawn(&mut server);
        }
        let v = vol(&server, "v");
        assert_eq!(v["generation"], 2, "{v}");
        assert_eq!(extents_of(&v), new_extents);
        let hist = history(&server, "v");
        assert_eq!(hist.iter().map(|g| g["generation"].as_u64().unwrap()).collect::<Vec<_>>(), vec![1, 2], "{hist:?}");
        assert_eq!(hist[1]["reason"], if phase == "stage" { "reload" } else { "config" }, "{hist:?}");
    }
    assert_volume_reads(&uri, &dp, offset);
    assert_eq!(read_at(&server.path("data.img"), offset, d.len()), d);
}

#[test]
fn crash_at_stage_keeps_old_generation() {
    crash_during_swap("stage");
}

#[test]
fn crash_at_paused_keeps_old_generation() {
    crash_during_swap("paused");
}

#[test]
fn crash_at_persisted_keeps_new_generation() {
    crash_during_swap("persisted");
}

#[test]
fn crash_at_swapped_keeps_new_generation() {
    crash_during_swap("swapped");
}

// ----------------------------------------------- 6. manual pause / resume

#[test]
fn manual_range_pause_holds_only_its_range_and_auto_resumes() {
    use std::os::unix::fs::PermissionsExt;
    let server = start(
        r#"[[backend]]
name = "a"
path = "{dir}/a.img"
size = "8MiB"

[[volume]]
name = "v"
[[volume.extent]]
length = "8MiB"
backend = "a"
backend_offset = 0
"#,
    );
    let mode = std::fs::metadata(server.path("control.sock")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "control socket mode is {mode:o}");

    let uri = server.uri("v");
    let (p1, p2, p3) = (pattern(10, 64 * KIB as usize), pattern(11, 64 * KIB as usize), pattern(12, 64 * KIB as usize));
    let (p1p, p2p, p3p) = (data_file(&server, "1.bin", &p1), data_file(&server, "2.bin", &p2), data_file(&server, "3.bin", &p3));
    let mut inside = triggered_write("write inside the paused range", &uri, &p1p, 256 * KIB);
    let mut outside = io_loop("I/O outside the paused range", &uri, &p2p, 2 * MIB);
    let mut later = triggered_write("write during the short pause", &uri, &p3p, 512 * KIB);

    let msg = cli_ok(&server, &["pause", "v", "--range", "0:1MiB", "--timeout", "20s"]);
    assert!(msg.contains("paused"), "{msg}");
    let v = vol(&server, "v");
    assert_eq!(v["state"], "paused", "{v}");
    assert_eq!(v["manual_pause"], true, "{v}");
    assert_eq!(v["held_ranges"], serde_json::json!([{"start": 0, "length": MIB}]), "{v}");
    let again = cli_err(&server, &["pause", "v", "--timeout", "5s"]);
    assert!(again.contains("already paused"), "{again}");

    inside.send("go");
    wait_until(&server, "the write in the range to park", Duration::from_secs(10), || vol(&server, "v")["held_requests"].as_u64() >= Some(1));
    for n in 1..=3 {
        outside.send("go");
        outside.expect(&format!("ok {n}"), Duration::from_secs(10));
    }
    let v = vol(&server, "v");
    assert!(v["held_requests"].as_u64() >= Some(1) && v["manual_pause"] == true, "I/O outside completed while the write inside was held: {v}");
    inside.quiet("the write inside the paused range must wait for resume");

    let msg = cli_ok(&server, &["resume", "v"]);
    assert!(msg.contains("resumed"), "{msg}");
    inside.expect("done", Duration::from_secs(10));
    let v = vol(&server, "v");
    assert_eq!((v["state"].as_str(), v["manual_pause"].as_bool()), (Some("running"), Some(false)), "{v}");
    let err = cli_err(&server, &["resume", "v"]);
    assert!(err.contains("volume 'v' is not paused"), "resume of a running volume: {err}");
    let err = cli_err(&server, &["resume", "nosuch"]);
    assert!(err.contains("no volume named 'nosuch'"), "{err}");

    // A short pause ends by itself; the write it held completes without error.
    cli_ok(&server, &["pause", "v", "--range", "0:1MiB", "--timeout", "1s"]);
    later.send("go");
    later.expect("done", Duration::from_secs(15));
    wait_until(&server, "automatic resume", Duration::from_secs(10), || {
        let v = vol(&server, "v");
        v["manual_pause"] == false && v["state"] == "running"
    });
    assert!(server.log().contains("manual pause timed out"), "{}", server.log());
    let err = cli_err(&server, &["resume", "v"]);
    assert!(err.contains("is not paused"), "{err}");

    // The timer of an ended pause must not end a later one.
    cli_ok(&server, &["pause", "v", "--range", "0:1MiB", "--timeout", "1s"]);
    cli_ok(&server, &["resume", "v"]);
    cli_ok(&server, &["pause", "v", "--range", "0:1MiB", "--timeout", "30s"]);
    std::thread::sleep(Duration::from_millis(1500));
    let v = vol(&server, "v");
    assert_eq!((v["manual_pause"].as_bool(), v["state"].as_str()), (Some(true), Some("paused")), "the first pause's 1s timer ended the second pause: {v}");
    cli_ok(&server, &["resume", "v"]);
    let err = cli_err(&server, &["pause", "v", "--range", "7MiB:2MiB"]);
    assert!(err.contains("not inside volume 'v'"), "{err}");
    assert_eq!(vol(&server, "v")["state"], "running");

    inside.finish(Duration::from_secs(10));
    outside.finish(Duration::from_secs(10));
    later.finish(Duration::from_secs(10));
    assert_eq!(read_at(&server.path("a.img"), 256 * KIB, p1.len()), p1);
    assert_eq!(read_at(&server.path("a.img"), 2 * MIB, p2.len()), p2);
    assert_eq!(read_at(&server.path("a.img"), 512 * KIB, p3.len()), p3);
}
