//! Live migration (`nbdvirt migrate start|status|abort`) driven the way an
//! operator drives it, against the real binary and real clients: fio with
//! crc32c verify, nbdsh, nbdcopy, qemu-less ext4 through nbdfuse + loop.
//!
//! What the tests rely on is ordering and state, never speed: a rate limit
//! only gives a *lower* bound on how long a copy takes, which is what keeps
//! a migration "in progress" while a test acts on it.
mod common;
use common::cli::{cli_err_via, cli_ok_via, cli_via, extents_of, json, respawn, rewrite_config, start, text, vol_of, wait_control, Via};
use common::script::Script;
use common::*;
use serde_json::Value;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------- helpers

/// `nbdvirt ARGS --config CONFIG` (bounded): the CLI finds the server the
/// way an operator runs it.
fn cli(server: &TestServer, args: &[&str]) -> Output {
    cli_via(Via::Config, server, args)
}

fn cli_ok(server: &TestServer, args: &[&str]) -> String {
    cli_ok_via(Via::Config, server, args)
}

/// Runs a command that must fail; returns its stderr.
fn cli_err(server: &TestServer, args: &[&str]) -> String {
    cli_err_via(Via::Config, server, args)
}

/// `nbdvirt status --json`, the entry of volume `name`.
fn volume_status(server: &TestServer, name: &str) -> Value {
    vol_of(&json(&cli_ok(server, &["status", "--json"])), name)
}

/// `(start, length, backend, backend_offset)` of each extent.
fn extents(server: &TestServer, name: &str) -> Vec<(u64, u64, String, u64)> {
    extents_of(&volume_status(server, name))
}

fn ext(start: u64, length: u64, backend: &str, offset: u64) -> (u64, u64, String, u64) {
    (start, length, backend.to_string(), offset)
}

/// `nbdvirt migrate status VOLUME --json`, the one job.
fn job(server: &TestServer, volume: &str) -> Value {
    let v = json(&cli_ok(server, &["migrate", "status", volume, "--json"]));
    let list = v["migrations"].as_array().unwrap_or_else(|| panic!("no migrations list: {v}"));
    assert_eq!(list.len(), 1, "one job per volume: {v}");
    assert_eq!(list[0]["volume"], volume, "{v}");
    list[0].clone()
}

/// `nbdvirt migrate status --json`: every job.
fn all_jobs(server: &TestServer) -> Vec<Value> {
    json(&cli_ok(server, &["migrate", "status", "--json"]))["migrations"].as_array().unwrap().clone()
}

fn state(j: &Value) -> &str {
    j["state"].as_str().unwrap_or("?")
}

fn u(j: &Value, key: &str) -> u64 {
    j[key].as_u64().unwrap_or_else(|| panic!("no {key} in {j}"))
}

/// Polls the job every 50 ms until `f` holds; panics after `limit`.
fn wait_job(server: &TestServer, volume: &str, what: &str, limit: Duration, f: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let j = job(server, volume);
        if f(&j) {
            return j;
        }
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}; job: {j}\n--- log ---\n{}", server.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits for the job to leave `running`; returns its final status.
fn wait_done(server: &TestServer, volume: &str, limit: Duration) -> Value {
    wait_job(server, volume, "the migration to end", limit, |j| state(j) != "running")
}

fn assert_completed(server: &TestServer, j: &Value) {
    assert_eq!(state(j), "completed", "migration did not complete: {j}\n--- log ---\n{}", server.log());
    assert_eq!(u(j, "copied_bytes"), u(j, "total_bytes"), "{j}");
}

/// Fails with the first differing offset instead of megabytes of bytes.
fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: length differs");
    if got != want {
        let at = got.iter().zip(want).position(|(a, b)| a != b).unwrap();
        let bad = got.iter().zip(want).filter(|(a, b)| a != b).count();
        panic!(
            "{what}: content differs first at byte {at} (block {} of 4 KiB; {bad} bytes differ); got {:02x?} want {:02x?}",
            at / 4096,
            &got[at..(at + 16).min(got.len())],
            &want[at..(at + 16).min(want.len())]
        );
    }
}

/// Writes the whole of `data` onto the volume with nbdcopy (flushed).
fn fill(server: &TestServer, volume: &str, data: &[u8], tag: &str) {
    require("nbdcopy", "libnbd-bin");
    let file = server.path(&format!("fill-{tag}.img"));
    std::fs::write(&file, data).unwrap();
    run_ok(Command::new("nbdcopy").arg("--flush").arg(&file).arg(server.uri(volume)));
    std::fs::remove_file(&file).unwrap();
}

/// Reads the whole volume with nbdcopy.
fn read_volume(server: &TestServer, volume: &str) -> Vec<u8> {
    require("nbdcopy", "libnbd-bin");
    let file = server.path(&format!("readback-{volume}.img"));
    let _ = std::fs::remove_file(&file);
    run_ok(Command::new("nbdcopy").arg(server.uri(volume)).arg(&file));
    let data = std::fs::read(&file).unwrap();
    std::fs::remove_file(&file).unwrap();
    data
}

/// Writes `data` at `offset` through NBD (1 MiB requests) and flushes.
fn pwrite(server: &TestServer, volume: &str, offset: u64, data: &[u8]) {
    let file = server.path(&format!("pwrite-{volume}-{offset}.bin"));
    std::fs::write(&file, data).unwrap();
    nbdsh(
        &server.uri(volume),
        &format!(
            "d = open('{}', 'rb').read()\nfor i in range(0, len(d), 1 << 20):\n    h.pwrite(d[i:i + (1 << 20)], {offset} + i)\nh.flush()\n",
            file.display()
        ),
    );
    std::fs::remove_file(&file).unwrap();
}

/// Reads `len` bytes at `offset` through NBD.
fn pread(server: &TestServer, volume: &str, offset: u64, len: usize) -> Vec<u8> {
    let file = server.path(&format!("pread-{volume}-{offset}.bin"));
    nbdsh(&server.uri(volume), &format!("open('{}', 'wb').write(h.pread({len}, {offset}))\n", file.display()));
    let data = std::fs::read(&file).unwrap();
    std::fs::remove_file(&file).unwrap();
    data
}

/// Bytes allocated to a file.
fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).blocks() * 512
}

/// Current checkpoint of a volume's job as the server persisted it.
fn checkpoint(server: &TestServer, volume: &str) -> Option<Value> {
    let text = std::fs::read_to_string(server.path("state").join("migrations").join(format!("{volume}.json"))).ok()?;
    serde_json::from_str(&text).ok()
}

/// Runs fio (nbd engine) in `dir`; Ok(JSON) if it exited 0 with no job error.
fn fio(dir: &Path, uri: &str, args: &[String]) -> Result<Value, String> {
    let mut cmd = Command::new("fio");
    cmd.current_dir(dir)
        .args(["--ioengine=nbd", &format!("--uri={uri}"), "--verify_state_save=0", "--output-format=json"])
        .args(args);
    let out = run_timeout(&mut cmd, Duration::from_secs(180));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let all = format!("fio {args:?}: {}", text(&out));
    if !out.status.success() {
        return Err(format!("fio failed: {all}"));
    }
    let start = stdout.find("\n{").map(|i| i + 1).or_else(|| stdout.starts_with('{').then_some(0)).ok_or_else(|| format!("no JSON in fio output: {all}"))?;
    let v: Value = serde_json::from_str(&stdout[start..]).map_err(|e| format!("fio JSON ({e}): {all}"))?;
    for j in v["jobs"].as_array().ok_or_else(|| format!("no jobs: {all}"))? {
        if j["error"] != 0 || j["total_err"].as_u64().unwrap_or(0) != 0 {
            return Err(format!("fio job error: {j}\n{all}"));
        }
    }
    Ok(v)
}

fn two_files(src_size: &str, dst_size: &str, vol_size: &str) -> String {
    format!(
        r#"[[backend]]
name = "src"
path = "{{dir}}/src.img"
size = "{src_size}"

[[backend]]
name = "dst"
path = "{{dir}}/dst.img"
size = "{dst_size}"

[[volume]]
name = "v"
[[volume.extent]]
length = "{vol_size}"
backend = "src"
backend_offset = 0
"#
    )
}

// ------------------------------- 1. fio write+verify across the cutover

/// fio job on region B, pass `seed`: every 4 KiB block written once, in
/// random order, verified in batches of 64 while writing and at the end.
fn region_b_args(seed: u64, verify_only: bool) -> Vec<String> {
    let mut a: Vec<String> = [
        "--name=regionB",
        "--rw=randwrite",
        "--bs=4k",
        "--offset=64M",
        "--size=64M",
        "--iodepth=16",
        "--verify=crc32c",
        "--verify_fatal=1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.push(format!("--randseed={seed}"));
    if verify_only {
        a.push("--verify_only".into());
    } else {
        a.push("--verify_backlog=64".into());
    }
    a
}

fn region_a_args(verify_only: bool) -> Vec<String> {
    let mut a: Vec<String> = ["--name=regionA", "--rw=randwrite", "--bs=64k", "--offset=0", "--size=64M", "--iodepth=8", "--verify=crc32c", "--verify_fatal=1", "--randseed=1001"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if verify_only {
        a.push("--verify_only".into());
    }
    a
}

/// The whole 128 MiB volume moves to `dst` at 64 MiB while fio keeps
/// writing and verifying; the cutover loses nothing, and afterwards the
/// volume no longer depends on the source at all (garbage there is never
/// read).
#[test]
fn migration_under_fio_verify_load_then_source_is_irrelevant() {
    require("fio", "fio");
    require("nbdcopy", "libnbd-bin");
    let mut server = start(&two_files("128MiB", "256MiB", "128MiB"));
    let uri = server.uri("v");
    let work = tempfile::tempdir().unwrap();

    // Region A (0..64 MiB): written and verified once, before the migration.
    fio(work.path(), &uri, &region_a_args(false)).unwrap_or_else(|e| panic!("{e}\n{}", server.log()));

    // Region B (64..128 MiB): fio passes back to back, each with its own
    // seed (so each pass writes different data), until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let passes_done = Arc::new(AtomicUsize::new(0));
    let loader = {
        let (stop, passes_done, uri, dir) = (stop.clone(), passes_done.clone(), uri.clone(), work.path().to_path_buf());
        // (passes, [(pass, started, finished)])
        type Passes = (u64, Vec<(u64, Instant, Instant)>);
        std::thread::spawn(move || -> Result<Passes, String> {
            let mut passes = Vec::new();
            let mut seed = 2000;
            while !stop.load(Ordering::SeqCst) {
                seed += 1;
                let began = Instant::now();
                fio(&dir, &uri, &region_b_args(seed, false)).map_err(|e| format!("pass with seed {seed}: {e}"))?;
                passes.push((seed, began, Instant::now()));
                passes_done.fetch_add(1, Ordering::SeqCst);
            }
            Ok((seed, passes))
        })
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while passes_done.load(Ordering::SeqCst) < 1 {
        assert!(!loader.is_finished(), "fio load ended early: {:?}", loader.join());
        assert!(Instant::now() < deadline, "first fio pass did not finish");
        std::thread::sleep(Duration::from_millis(20));
    }

    // 128 MiB of allocated data at 24 MiB/s: at least ~5 s of copying.
    let migration_started = Instant::now();
    let out = cli_ok(&server, &["migrate", "start", "v", "--to", "dst:64MiB", "--rate", "24MiB"]);
    assert!(out.contains("running"), "{out}");
    let j = job(&server, "v");
    assert_eq!(state(&j), "running", "{j}");
    assert_eq!((j["dest"].as_str(), u(&j, "dest_offset"), u(&j, "total_bytes")), (Some("dst"), 64 * MIB, 128 * MIB), "{j}");
    let j = wait_done(&server, "v", Duration::from_secs(120));
    let migration_done = Instant::now();
    assert_completed(&server, &j);
    assert!(!loader.is_finished(), "fio load ended during the migration: {:?}", loader.join());

    // Keep the load on until a pass that began after the cutover is done.
    let deadline = Instant::now() + Duration::from_secs(120);
    let after = passes_done.load(Ordering::SeqCst) + 1;
    while passes_done.load(Ordering::SeqCst) < after {
        assert!(!loader.is_finished(), "fio load failed: {:?}", loader.join());
        assert!(Instant::now() < deadline, "no fio pass after the cutover");
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::SeqCst);
    let (last_seed, passes) = match loader.join() {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => panic!("fio write+verify failed under migration: {e}\n--- log ---\n{}", server.log()),
        Err(_) => panic!("fio load thread panicked"),
    };
    let overlapping = passes.iter().filter(|(_, b, e)| *b < migration_done && *e > migration_started).count();
    assert!(overlapping >= 1, "no fio pass overlapped the migration: {passes:?}");
    assert!(passes.iter().any(|(_, b, _)| *b > migration_done), "no fio pass ran entirely after the cutover: {passes:?}");
    eprintln!("fio passes: {} ({} overlapping the migration)", passes.len(), overlapping);

    // The mapping is on the destination, as a new generation.
    assert_eq!(extents(&server, "v"), vec![ext(0, 128 * MIB, "dst", 64 * MIB)]);
    let gen = volume_status(&server, "v")["generation"].as_u64().unwrap();
    assert_eq!(j["generation"].as_u64(), Some(gen), "job generation is the volume's: {j}");
    let history = json(&cli_ok(&server, &["history", "v", "--json"]));
    let last = history.as_array().unwrap().iter().find(|g| g["generation"] == gen).unwrap_or_else(|| panic!("generation {gen} not in history {history}"));
    assert_eq!(last["reason"], "migration to dst", "{last}");

    // Stop; garbage over the whole source; restart.
    assert!(server.stop().success(), "clean stop:\n{}", server.log());
    {
        let mut f = std::fs::OpenOptions::new().write(true).open(server.path("src.img")).unwrap();
        let mut rnd = std::fs::File::open("/dev/urandom").unwrap();
        let copied = std::io::copy(&mut std::io::Read::take(&mut rnd, 128 * MIB), &mut f).unwrap();
        assert_eq!(copied, 128 * MIB);
        f.sync_all().unwrap();
    }
    respawn(&mut server);
    assert_eq!(extents(&server, "v"), vec![ext(0, 128 * MIB, "dst", 64 * MIB)], "mapping after restart");
    assert_eq!(state(&job(&server, "v")), "completed", "finished job still listed after restart");

    // The volume is exactly the destination region...
    let volume = read_volume(&server, "v");
    let dest = read_at(&server.path("dst.img"), 64 * MIB, (128 * MIB) as usize);
    assert_same("volume vs destination region", &volume, &dest);
    let garbage = read_at(&server.path("src.img"), 0, MIB as usize);
    assert_ne!(&volume[..MIB as usize], &garbage[..], "volume reads the garbage source");
    drop((volume, dest, garbage));
    // ...and holds what fio wrote: region A from before the migration,
    // region B from the last pass (after the cutover).
    fio(work.path(), &uri, &region_a_args(true)).unwrap_or_else(|e| panic!("region A after restart: {e}"));
    let v = fio(work.path(), &uri, &region_b_args(last_seed, true)).unwrap_or_else(|e| panic!("region B after restart: {e}"));
    assert_eq!(v["jobs"][0]["read"]["io_bytes"], 64 * MIB, "verify_only read region B: {v}");
}

// ------------------------------------------ 2. kill -9 → resume from checkpoint

/// SIGTERM mid-way suspends the copier at a durable checkpoint; SIGKILL
/// mid-way loses at most the last second. Either way the restarted server
/// resumes from the persisted progress, not from zero, and the data (with
/// writes made during the migration) arrives intact.
#[test]
fn restart_and_kill_9_resume_from_persisted_progress() {
    let mut server = start(&two_files("64MiB", "64MiB", "64MiB"));
    let total = 64 * MIB;
    let mut expected = pattern(22, total as usize);
    fill(&server, "v", &expected, "v");

    // 8 MiB/s over 64 MiB of data: at least 8 s of copying.
    cli_ok(&server, &["migrate", "start", "v", "--to", "dst", "--rate", "8MiB"]);
    // A checkpoint with progress is on disk.
    let deadline = Instant::now() + Duration::from_secs(60);
    while checkpoint(&server, "v").map_or(0, |c| c["copied_bytes"].as_u64().unwrap_or(0)) < 4 * MIB {
        assert!(Instant::now() < deadline, "no checkpoint with progress: {:?}\n{}", checkpoint(&server, "v"), server.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    // Writes during the migration: into a copied chunk (mirrored) and into
    // one not copied yet.
    for (seed, off) in [(23, 0), (24, 62 * MIB + 512 * KIB)] {
        let d = pattern(seed, 256 * KIB as usize);
        pwrite(&server, "v", off, &d);
        expected[off as usize..off as usize + d.len()].copy_from_slice(&d);
    }

    // SIGTERM: the copier stops at a durable checkpoint; the job stays running.
    assert!(server.stop().success(), "clean stop:\n{}", server.log());
    let cp = checkpoint(&server, "v").expect("checkpoint after SIGTERM");
    assert_eq!(cp["state"], "running", "a suspended job stays running: {cp}");
    let p1 = cp["copied_bytes"].as_u64().unwrap();
    assert!(p1 >= 4 * MIB && p1 < total, "{cp}");
    respawn(&mut server);
    let j = job(&server, "v");
    assert!(u(&j, "copied_bytes") >= p1, "progress after SIGTERM restart went back: {j} (checkpoint had {p1})");
    assert!(matches!(state(&j), "running" | "completed"), "{j}");

    // Let it copy more, then SIGKILL.
    let deadline = Instant::now() + Duration::from_secs(60);
    while checkpoint(&server, "v").map_or(0, |c| c["copied_bytes"].as_u64().unwrap_or(0)) < p1 + 8 * MIB {
        assert!(Instant::now() < deadline, "no further checkpoint: {:?}\n{}", checkpoint(&server, "v"), server.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let d = pattern(25, 128 * KIB as usize);
    pwrite(&server, "v", 4 * MIB - 64 * KIB, &d); // straddles a chunk boundary
    expected[(4 * MIB - 64 * KIB) as usize..(4 * MIB + 64 * KIB) as usize].copy_from_slice(&d);
    server.kill();
    let cp = checkpoint(&server, "v").expect("checkpoint after SIGKILL");
    assert_eq!(cp["state"], "running", "{cp}");
    let p2 = cp["copied_bytes"].as_u64().unwrap();
    assert!(p2 > p1, "checkpoint progressed: {p2} after {p1}");

    respawn(&mut server);
    // The write-intent log marks the regions written just before the kill
    // (1 MiB each): in doubt after a crash, they are copied again too.
    let m = json(&cli_ok(&server, &["mirror", "status", "v", "--json"]));
    let in_doubt = m["mirrors"][0]["recovered_regions"].as_u64().unwrap() * MIB;
    assert!(in_doubt <= 2 * MIB, "only the regions of the last write are in doubt: {m}");
    let j = job(&server, "v");
    let resumed = u(&j, "copied_bytes");
    assert!(resumed + in_doubt >= p2, "progress after kill -9 went back to {resumed} (checkpoint had {p2}, {in_doubt} in doubt): {j}");
    assert!(matches!(state(&j), "running" | "completed"), "{j}");
    let j = wait_done(&server, "v", Duration::from_secs(120));
    assert_completed(&server, &j);
    // This process copied only what the checkpoint did not have.
    assert!(u(&j, "data_bytes") <= total - p2 + in_doubt, "resumed job recopied: data_bytes {} > {} - {p2} + {in_doubt}: {j}", u(&j, "data_bytes"), total);

    assert_eq!(extents(&server, "v"), vec![ext(0, total, "dst", 0)]);
    assert_same("volume after resumed migration", &read_volume(&server, "v"), &expected);
    assert_same("destination file", &std::fs::read(server.path("dst.img")).unwrap(), &expected);
}

// ------------------------------------------------------------- 3. abort

#[test]
fn abort_midway_leaves_the_volume_on_the_source() {
    let mut server = start(&two_files("64MiB", "64MiB", "64MiB"));
    let mut expected = pattern(33, (64 * MIB) as usize);
    fill(&server, "v", &expected, "v");

    // 4 MiB/s over 64 MiB: at least 16 s, aborted after a few MiB.
    cli_ok(&server, &["migrate", "start", "v", "--to", "dst", "--rate", "4MiB"]);
    wait_job(&server, "v", "some progress", Duration::from_secs(60), |j| u(j, "copied_bytes") >= 2 * MIB);
    let out = cli_ok(&server, &["migrate", "abort", "v"]);
    assert!(out.contains("aborted"), "abort output: {out}");
    let j = job(&server, "v");
    assert_eq!(state(&j), "aborted", "{j}");
    assert!(u(&j, "copied_bytes") < u(&j, "total_bytes"), "{j}");
    // No running job left to abort.
    let err = cli_err(&server, &["migrate", "abort", "v"]);
    assert!(err.contains("no running migration"), "{err}");

    // The mapping is back on the source alone (generation 2 added the
    // destination as a mirror leg, 3 dropped it); data intact; writes land there.
    assert_eq!(extents(&server, "v"), vec![ext(0, 64 * MIB, "src", 0)]);
    assert_eq!(volume_status(&server, "v")["generation"], 3);
    assert_same("volume after abort", &read_volume(&server, "v"), &expected);
    let d = pattern(34, MIB as usize);
    pwrite(&server, "v", 10 * MIB, &d);
    expected[(10 * MIB) as usize..(11 * MIB) as usize].copy_from_slice(&d);
    assert_same("write after abort, read back", &pread(&server, "v", 10 * MIB, MIB as usize), &d);
    assert_same("write after abort, on the source file", &read_at(&server.path("src.img"), 10 * MIB, MIB as usize), &d);

    // A restart does not resume an aborted job.
    assert!(server.stop().success(), "clean stop:\n{}", server.log());
    respawn(&mut server);
    assert_eq!(state(&job(&server, "v")), "aborted");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(state(&job(&server, "v")), "aborted", "not resumed");
    assert_eq!(extents(&server, "v"), vec![ext(0, 64 * MIB, "src", 0)]);
    assert_same("volume after restart", &read_volume(&server, "v"), &expected);

    // Abort left nothing behind that blocks a new migration.
    let out = cli_ok(&server, &["migrate", "start", "v", "--to", "dst", "--rate", "0", "--wait"]);
    assert!(out.contains("completed"), "{out}");
    assert_completed(&server, &job(&server, "v"));
    assert_eq!(extents(&server, "v"), vec![ext(0, 64 * MIB, "dst", 0)]);
    assert_same("volume after the second migration", &read_volume(&server, "v"), &expected);
}

// --------------------------------------------- 4. destination full / refused

/// A tmpfs mounted for the test, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        assert_eq!(unsafe { libc::geteuid() }, 0, "this test mounts a tmpfs and must run as root (scripts/test.sh runs the suite as root)");
        require("mount", "mount");
        let dir = tempfile::tempdir().unwrap();
        run_ok(Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(dir.path()));
        Tmpfs { dir }
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = run_timeout(Command::new("umount").arg(self.dir.path()), Duration::from_secs(30)).status.success();
        if !ok {
            let _ = run_timeout(Command::new("umount").arg("-l").arg(self.dir.path()), Duration::from_secs(30));
        }
    }
}

#[test]
fn destination_full_fails_with_enospc_and_bad_destinations_are_refused() {
    let tmpfs = Tmpfs::mount("8m"); // declared first: dropped after the server
    let body = format!(
        r#"[[backend]]
name = "src"
path = "{{dir}}/src.img"
size = "64MiB"

[[backend]]
name = "tiny"
path = "{}/dst.img"
size = "64MiB"

[[backend]]
name = "small"
path = "{{dir}}/small.img"
size = "16MiB"

[[backend]]
name = "big"
path = "{{dir}}/big.img"
size = "64MiB"

[[volume]]
name = "v"
[[volume.extent]]
length = "64MiB"
backend = "src"
backend_offset = 0

[[volume]]
name = "w"
[[volume.extent]]
length = "16MiB"
backend = "big"
backend_offset = 0
"#,
        tmpfs.path().display()
    );
    let mut server = start(&body);

    // Refused up front: too small, however placed.
    let err = cli_err(&server, &["migrate", "start", "v", "--to", "small"]);
    assert!(err.contains("small") && (err.contains("no free range") || err.contains("too small")), "{err}");
    let err = cli_err(&server, &["migrate", "start", "v", "--to", "small:0"]);
    assert!(err.contains("too small"), "{err}");
    let err = cli_err(&server, &["migrate", "start", "v", "--range", "0:8MiB", "--to", "small:12MiB"]);
    assert!(err.contains("too small"), "{err}");
    // Refused up front: the destination range is another volume's.
    let err = cli_err(&server, &["migrate", "start", "v", "--range", "0:8MiB", "--to", "big:8MiB"]);
    assert!(err.contains("in use"), "{err}");
    let err = cli_err(&server, &["migrate", "start", "v", "--to", "big:0"]);
    assert!(err.contains("in use"), "{err}");
    // Unknown backend, misaligned offset.
    let err = cli_err(&server, &["migrate", "start", "v", "--to", "nosuch"]);
    assert!(err.contains("nosuch"), "{err}");
    let err = cli_err(&server, &["migrate", "start", "v", "--range", "0:8MiB", "--to", "big:16777217"]);
    assert!(err.contains("aligned"), "{err}");
    // None of these created a job.
    let err = cli_err(&server, &["migrate", "status", "v"]);
    assert!(err.contains("no migration"), "{err}");
    assert_eq!(extents(&server, "v"), vec![ext(0, 64 * MIB, "src", 0)]);
    assert_eq!(extents(&server, "w"), vec![ext(0, 16 * MIB, "big", 0)]);

    // 40 MiB of data onto a destination that can hold 8.
    let mut expected = vec![0u8; (64 * MIB) as usize];
    expected[..(40 * MIB) as usize].copy_from_slice(&pattern(44, (40 * MIB) as usize));
    fill(&server, "v", &expected[..(40 * MIB) as usize], "v");
    let err = cli_err(&server, &["migrate", "start", "v", "--to", "tiny", "--rate", "0", "--wait"]);
    assert!(err.contains("ENOSPC"), "--wait reports the failure: {err}");
    let j = job(&server, "v");
    assert_eq!(state(&j), "failed", "{j}");
    assert!(j["reason"].as_str().unwrap_or("").contains("ENOSPC"), "reason names ENOSPC: {j}");
    assert!(u(&j, "copied_bytes") < u(&j, "total_bytes"), "{j}");

    // Still served from the source, reads and writes (the destination leg
    // was added in generation 2 and dropped in 3).
    server.assert_alive();
    assert_eq!(extents(&server, "v"), vec![ext(0, 64 * MIB, "src", 0)]);
    assert_eq!(volume_status(&server, "v")["generation"], 3);
    assert_same("volume after the failed migration", &read_volume(&server, "v"), &expected);
    let d = pattern(45, MIB as usize);
    pwrite(&server, "v", 5 * MIB, &d);
    expected[(5 * MIB) as usize..(6 * MIB) as usize].copy_from_slice(&d);
    let d2 = pattern(46, MIB as usize);
    pwrite(&server, "v", 50 * MIB, &d2);
    expected[(50 * MIB) as usize..(51 * MIB) as usize].copy_from_slice(&d2);
    assert_same("source file after writes", &read_at(&server.path("src.img"), 5 * MIB, MIB as usize), &d);
    assert_same("volume after writes", &read_volume(&server, "v"), &expected);
    // The failed job is not resumed by a restart.
    assert!(server.stop().success(), "clean stop:\n{}", server.log());
    respawn(&mut server);
    assert_eq!(state(&job(&server, "v")), "failed");
    assert_eq!(extents(&server, "v"), vec![ext(0, 64 * MIB, "src", 0)]);
    assert_same("volume after restart", &read_volume(&server, "v"), &expected);
    server.kill();
}

// ------------------------------------------------------------- 5. sparse

#[test]
fn sparse_source_stays_sparse_on_the_destination() {
    let server = start(&two_files("256MiB", "256MiB", "256MiB"));
    let total = 256 * MIB;
    let mut expected = vec![0u8; total as usize];
    // 12 writes of 320 KiB, each crossing a 1 MiB chunk boundary.
    for i in 0..12u64 {
        let off = i * 21 * MIB + 900 * KIB;
        let d = pattern(50 + i, (320 * KIB) as usize);
        pwrite(&server, "v", off, &d);
        expected[off as usize..off as usize + d.len()].copy_from_slice(&d);
    }
    let written = 12 * 320 * KIB;
    let src_alloc = allocated(&server.path("src.img"));
    assert!(src_alloc >= written && src_alloc < written + 4 * MIB, "source allocation {src_alloc} for {written} bytes written");
    assert!(allocated(&server.path("dst.img")) < MIB, "fresh destination is sparse");

    let out = cli_ok(&server, &["migrate", "start", "v", "--to", "dst", "--rate", "0", "--wait"]);
    assert!(out.contains("completed"), "{out}");
    let j = job(&server, "v");
    assert_completed(&server, &j);
    assert!(u(&j, "data_bytes") <= src_alloc, "only allocated data is copied: {j}");
    assert_eq!(extents(&server, "v"), vec![ext(0, total, "dst", 0)]);

    let dst_alloc = allocated(&server.path("dst.img"));
    eprintln!("allocated: source {src_alloc}, destination {dst_alloc}, written {written}");
    assert!(dst_alloc >= written, "destination holds the data: {dst_alloc} < {written}");
    assert!(dst_alloc <= src_alloc + MIB, "destination allocation {dst_alloc} ≈ source allocation {src_alloc}, not the full {total}");
    assert_same("volume after migration", &read_volume(&server, "v"), &expected);
    assert_same("destination file", &std::fs::read(server.path("dst.img")).unwrap(), &expected);
}

// ------------------------------------------- 6. mounted ext4 while migrating

/// `nbdfuse DIR URI` in the foreground: DIR/nbd is the volume.
struct FuseFile {
    child: Child,
    dir: PathBuf,
    log: PathBuf,
}

impl FuseFile {
    fn start(dir: &Path, uri: &str, size: u64, log: PathBuf) -> FuseFile {
        assert!(Path::new("/dev/fuse").exists(), "/dev/fuse is missing: this test needs FUSE (kernel module fuse, package fuse3)");
        require("nbdfuse", "nbdfuse (part of libnbd-bin before Debian 13)");
        require("fusermount3", "fuse3");
        std::fs::create_dir_all(dir).unwrap();
        let logf = std::fs::File::create(&log).unwrap();
        let child = Command::new("nbdfuse")
            .arg(dir)
            .arg(uri)
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("start nbdfuse (Debian package nbdfuse, or libnbd-bin before Debian 13)");
        let mut f = FuseFile { child, dir: dir.to_path_buf(), log };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::fs::metadata(f.file()).map(|m| m.len()).unwrap_or(0) != size {
            if let Some(status) = f.child.try_wait().unwrap() {
                panic!("nbdfuse exited ({status}): {}", std::fs::read_to_string(&f.log).unwrap_or_default());
            }
            assert!(Instant::now() < deadline, "nbdfuse did not present {} within 20 s", f.file().display());
            std::thread::sleep(Duration::from_millis(20));
        }
        f
    }
    fn file(&self) -> PathBuf {
        self.dir.join("nbd")
    }
}

impl Drop for FuseFile {
    fn drop(&mut self) {
        let _ = run_timeout(Command::new("fusermount3").arg("-u").arg(&self.dir), Duration::from_secs(30));
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = run_timeout(Command::new("fusermount3").args(["-u", "-z"]).arg(&self.dir), Duration::from_secs(30));
    }
}

struct LoopDev {
    dev: String,
}

impl LoopDev {
    fn attach(file: &Path) -> LoopDev {
        require("losetup", "mount");
        let dev = run_ok(Command::new("losetup").args(["--find", "--show"]).arg(file)).trim().to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        LoopDev { dev }
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = run_timeout(Command::new("losetup").args(["-d", &self.dev]), Duration::from_secs(30));
    }
}

struct Mounted {
    dir: PathBuf,
    mounted: bool,
}

impl Mounted {
    fn mount(dev: &str, dir: &Path) -> Mounted {
        std::fs::create_dir_all(dir).unwrap();
        run_ok(Command::new("mount").args(["-t", "ext4", dev]).arg(dir));
        Mounted { dir: dir.to_path_buf(), mounted: true }
    }
    fn umount(&mut self) {
        run_ok(Command::new("umount").arg(&self.dir));
        self.mounted = false;
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.mounted {
            let ok = run_timeout(Command::new("umount").arg(&self.dir), Duration::from_secs(30)).status.success();
            if !ok {
                let _ = run_timeout(Command::new("umount").arg("-l").arg(&self.dir), Duration::from_secs(30));
            }
        }
    }
}

/// Distinct small files the ext4 writer cycles through.
const FILES: u64 = 64;

#[test]
fn mounted_ext4_keeps_its_files_across_a_live_migration() {
    assert_eq!(unsafe { libc::geteuid() }, 0, "this test mounts ext4 on a loop device and must run as root");
    require("mkfs.ext4", "e2fsprogs");
    require("e2fsck", "e2fsprogs");
    require("sha256sum", "coreutils");
    let server = start(&two_files("128MiB", "128MiB", "128MiB"));
    let fuse = FuseFile::start(&server.path("fuse"), &server.uri("v"), 128 * MIB, server.path("nbdfuse.log"));
    let lo = LoopDev::attach(&fuse.file());
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F", &lo.dev]));
    let mp = server.path("mnt");
    let mut mnt = Mounted::mount(&lo.dev, &mp);

    // 40 MiB of data first, so the copy (8 MiB/s) takes at least 5 s.
    let big_len = (40 * MIB) as usize;
    let mut big = pattern(60, big_len);
    {
        let mut f = std::fs::File::create(mp.join("big")).unwrap();
        f.write_all(&big).unwrap();
        f.sync_all().unwrap();
    }
    run_ok(&mut Command::new("sync"));

    let stop = Arc::new(AtomicBool::new(false));
    let files = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (stop, files, mp) = (stop.clone(), files.clone(), mp.clone());
        std::thread::spawn(move || -> std::io::Result<Vec<u8>> {
            use std::os::unix::fs::FileExt;
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                // A new file (names reused after FILES: the file system is
                // 128 MiB)...
                let mut f = std::fs::File::create(mp.join(format!("f{:03}", i % FILES)))?;
                f.write_all(&pattern(1000 + i, (256 * KIB) as usize))?;
                f.sync_all()?;
                // ...and an overwrite inside the big one (likely already copied).
                let off = (i * 7 * MIB + i * 12 * KIB) % (big.len() as u64 - 64 * KIB);
                let d = pattern(5000 + i, (64 * KIB) as usize);
                let bf = std::fs::OpenOptions::new().write(true).open(mp.join("big"))?;
                bf.write_all_at(&d, off)?;
                bf.sync_all()?;
                big[off as usize..off as usize + d.len()].copy_from_slice(&d);
                i += 1;
                files.store(i as usize, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(big)
        })
    };
    let wait_files = |n: usize, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(120);
        while files.load(Ordering::SeqCst) < n {
            if writer.is_finished() {
                return; // its error is reported by join below
            }
            assert!(Instant::now() < deadline, "writer too slow ({what})");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_files(2, "before the migration");

    cli_ok(&server, &["migrate", "start", "v", "--to", "dst", "--rate", "8MiB"]);
    let during_start = files.load(Ordering::SeqCst);
    let j = wait_done(&server, "v", Duration::from_secs(120));
    assert_completed(&server, &j);
    let during = files.load(Ordering::SeqCst) - during_start;
    wait_files(files.load(Ordering::SeqCst) + 3, "after the cutover");
    stop.store(true, Ordering::SeqCst);
    let big = match writer.join() {
        Ok(Ok(big)) => big,
        Ok(Err(e)) => panic!("writing on the mounted ext4 failed: {e}\n--- log ---\n{}", server.log()),
        Err(_) => panic!("writer panicked"),
    };
    let n = files.load(Ordering::SeqCst);
    eprintln!("{n} files written, {during} while migrating");
    assert!(during >= 1, "no file was written while the migration ran (it copies 40 MiB at 8 MiB/s)");
    assert_eq!(extents(&server, "v"), vec![ext(0, 128 * MIB, "dst", 0)], "status shows the new backend");

    // Checksums as written, then a clean unmount and fsck.
    let sums = server.path("sums");
    let out = run_ok(Command::new("sh").current_dir(&mp).args(["-c", "sha256sum big f*"]));
    assert_eq!(out.lines().count(), n.min(FILES as usize) + 1, "{out}");
    std::fs::write(&sums, &out).unwrap();
    run_ok(&mut Command::new("sync"));
    mnt.umount();
    let fsck = run_timeout(Command::new("e2fsck").args(["-fn", &lo.dev]), Duration::from_secs(120));
    assert!(fsck.status.success(), "e2fsck -fn after the migration: {}", text(&fsck));

    // Remount: every checksum matches, and the content is what was written.
    let mnt2 = Mounted::mount(&lo.dev, &mp);
    let check = run_timeout(Command::new("sha256sum").current_dir(&mp).args(["-c", "--quiet"]).arg(&sums), Duration::from_secs(120));
    assert!(check.status.success(), "checksums after remount: {}", text(&check));
    assert_same("big after remount", &std::fs::read(mp.join("big")).unwrap(), &big);
    // File k last holds the content of the last write i with i % FILES == k.
    for i in (n as u64).saturating_sub(FILES)..n as u64 {
        let name = format!("f{:03}", i % FILES);
        let got = std::fs::read(mp.join(&name)).unwrap();
        assert_same(&name, &got, &pattern(1000 + i, (256 * KIB) as usize));
    }
    drop(mnt2);
    drop(mnt);
    drop(lo);
    drop(fuse);
}

// --------------------------------------------- 7. two volumes at once

const TWO_VOLUMES: &str = r#"[[backend]]
name = "srcA"
path = "{dir}/srcA.img"
size = "32MiB"

[[backend]]
name = "srcB"
path = "{dir}/srcB.img"
size = "32MiB"

[[backend]]
name = "dst"
path = "{dir}/dst.img"
size = "64MiB"

[[volume]]
name = "a"
[[volume.extent]]
length = "32MiB"
backend = "srcA"
backend_offset = 0

[[volume]]
name = "b"
[[volume.extent]]
length = "32MiB"
backend = "srcB"
backend_offset = 0
"#;

#[test]
fn two_volumes_migrate_at_once_one_job_per_volume() {
    let mut server = start(TWO_VOLUMES);
    let mut data_a = pattern(71, (32 * MIB) as usize);
    let data_b = pattern(72, (32 * MIB) as usize);
    fill(&server, "a", &data_a, "a");
    fill(&server, "b", &data_b, "b");

    // 8 MiB/s over 32 MiB each: both run for at least 4 s.
    cli_ok(&server, &["migrate", "start", "a", "--to", "dst", "--rate", "8MiB"]);
    // b may not take a's destination range while a's migration runs.
    let err = cli_err(&server, &["migrate", "start", "b", "--to", "dst:0", "--rate", "8MiB"]);
    assert!(err.contains("in use"), "{err}");
    cli_ok(&server, &["migrate", "start", "b", "--to", "dst", "--rate", "8MiB"]);
    // One job per volume.
    let err = cli_err(&server, &["migrate", "start", "a", "--to", "dst"]);
    assert!(err.contains("already being migrated"), "{err}");
    let err = cli_err(&server, &["migrate", "start", "a", "--to", "srcB"]);
    assert!(!err.is_empty());
    let jobs = all_jobs(&server);
    assert_eq!(jobs.len(), 2, "{jobs:?}");
    assert!(jobs.iter().all(|j| state(j) == "running"), "both run at once: {jobs:?}");
    let (ja, jb) = (job(&server, "a"), job(&server, "b"));
    assert_eq!((u(&ja, "dest_offset"), u(&jb, "dest_offset")), (0, 32 * MIB), "distinct destination ranges: {ja} {jb}");

    let ja = wait_done(&server, "a", Duration::from_secs(120));
    let jb = wait_done(&server, "b", Duration::from_secs(120));
    assert_completed(&server, &ja);
    assert_completed(&server, &jb);
    assert_eq!(extents(&server, "a"), vec![ext(0, 32 * MIB, "dst", 0)]);
    assert_eq!(extents(&server, "b"), vec![ext(0, 32 * MIB, "dst", 32 * MIB)]);
    assert_same("a", &read_volume(&server, "a"), &data_a);
    assert_same("b", &read_volume(&server, "b"), &data_b);
    let dst = std::fs::read(server.path("dst.img")).unwrap();
    assert_same("dst.img first half", &dst[..(32 * MIB) as usize], &data_a);
    assert_same("dst.img second half", &dst[(32 * MIB) as usize..], &data_b);

    // Finished jobs stay listed, also after a restart.
    let listed = |server: &TestServer| {
        let mut jobs = all_jobs(server);
        jobs.sort_by_key(|j| j["volume"].as_str().unwrap_or("").to_string());
        jobs.iter().map(|j| (j["volume"].as_str().unwrap().to_string(), state(j).to_string(), j["generation"].as_u64())).collect::<Vec<_>>()
    };
    // Generation 2 mirrors onto the destination, 3 is the cutover.
    let want = vec![("a".to_string(), "completed".to_string(), Some(3)), ("b".to_string(), "completed".to_string(), Some(3))];
    assert_eq!(listed(&server), want);
    assert!(server.stop().success(), "clean stop:\n{}", server.log());
    respawn(&mut server);
    assert_eq!(listed(&server), want, "after restart");

    // A finished job does not block the next one: half of a goes back.
    let d = pattern(73, MIB as usize);
    pwrite(&server, "a", 15 * MIB + 512 * KIB, &d);
    data_a[(15 * MIB + 512 * KIB) as usize..(16 * MIB + 512 * KIB) as usize].copy_from_slice(&d);
    let out = cli_ok(&server, &["migrate", "start", "a", "--range", "0:16MiB", "--to", "srcA:0", "--rate", "0", "--wait"]);
    assert!(out.contains("completed"), "{out}");
    assert_completed(&server, &job(&server, "a"));
    assert_eq!(extents(&server, "a"), vec![ext(0, 16 * MIB, "srcA", 0), ext(16 * MIB, 16 * MIB, "dst", 16 * MIB)]);
    assert_same("a after moving half back", &read_volume(&server, "a"), &data_a);
    assert_same("b untouched", &read_volume(&server, "b"), &data_b);
}

// ---------------------------------------- 8. --discard-source keeps the data

/// `--discard-source` must free the source range and keep the volume's data
/// (now on the destination).
#[test]
fn discard_source_frees_the_source_and_keeps_the_data() {
    let server = start(&two_files("32MiB", "32MiB", "32MiB"));
    let expected = pattern(81, (32 * MIB) as usize);
    fill(&server, "v", &expected, "v");
    assert!(allocated(&server.path("src.img")) >= 32 * MIB);
    let out = cli_ok(&server, &["migrate", "start", "v", "--to", "dst", "--rate", "0", "--discard-source", "--wait"]);
    assert!(out.contains("completed"), "{out}");
    assert_completed(&server, &job(&server, "v"));
    assert_eq!(extents(&server, "v"), vec![ext(0, 32 * MIB, "dst", 0)]);
    assert_same("volume after migrate --discard-source", &read_volume(&server, "v"), &expected);
    assert_same("destination file", &std::fs::read(server.path("dst.img")).unwrap(), &expected);
    assert!(allocated(&server.path("src.img")) < MIB, "source range discarded: {} bytes still allocated", allocated(&server.path("src.img")));
}

// ------------------------------ 9. abort while the cutover drains a write

/// An abort that arrives while the cutover waits for an in-flight write must
/// not lose that write: either the cutover is called off (volume stays on
/// the source, which has the write) or the write is on the destination.
///
/// Ordering is forced with a slow source (3 s per data operation): the
/// copier reads the last chunk for 3 s; meanwhile a client write to an
/// already-copied chunk is admitted (3 s on the source); the cutover then
/// holds the range and drains (volume state "pausing") and only then is the
/// abort sent.
#[test]
fn abort_during_cutover_drain_does_not_lose_an_acknowledged_write() {
    let body = r#"[[backend]]
name = "src"
path = "{dir}/src.img"
size = "4MiB"
delay = "3s"

[[backend]]
name = "dst"
path = "{dir}/dst.img"
size = "4MiB"

[[volume]]
name = "v"
[[volume.extent]]
length = "4MiB"
backend = "src"
backend_offset = 0
"#;
    let server = start(body);
    let last = pattern(91, MIB as usize);
    pwrite(&server, "v", 3 * MIB, &last);

    cli_ok(&server, &["migrate", "start", "v", "--to", "dst", "--rate", "0"]);
    // Chunks 0..3 are holes (copied at once); chunk 3 is being read.
    let j = wait_job(&server, "v", "the three hole chunks", Duration::from_secs(30), |j| u(j, "copied_bytes") >= 3 * MIB);
    assert_eq!(state(&j), "running", "precondition: the last chunk is still being copied: {j}");

    // W: a write into chunk 0 (copied: mirrored), acknowledged after 3 s,
    // issued late in the copier's 3 s read so that it is still in flight
    // when the cutover holds the range. nbdsh connects beforehand and is
    // triggered through stdin, so that W goes out at once.
    let w = pattern(92, (64 * KIB) as usize);
    let wfile = server.path("w.bin");
    std::fs::write(&wfile, &w).unwrap();
    let mut writer = Script::start(
        "W",
        &server.uri("v"),
        &format!("import sys\nd = open('{}', 'rb').read()\nprint('ready', flush=True)\nsys.stdin.readline()\nh.pwrite(d, 0)\nh.flush()\nprint('acked', flush=True)\n", wfile.display()),
    );
    writer.expect("ready", Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(1000));
    writer.send("go");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = volume_status(&server, "v");
        if v["in_flight"].as_u64().unwrap_or(0) >= 1 {
            assert_eq!(v["state"], "running", "precondition: W admitted before the cutover holds the range: {v}");
            break;
        }
        assert!(Instant::now() < deadline, "W never in flight: {v}");
        std::thread::sleep(Duration::from_millis(5));
    }
    // The cutover holds the range and waits for W.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = volume_status(&server, "v");
        if v["state"] == "pausing" {
            break;
        }
        assert!(Instant::now() < deadline, "cutover did not start draining: {v}\n{}", job(&server, "v"));
        std::thread::sleep(Duration::from_millis(5));
    }
    let abort = cli(&server, &["migrate", "abort", "v"]);
    writer.expect("acked", Duration::from_secs(30));
    let j = wait_done(&server, "v", Duration::from_secs(30));
    eprintln!("abort: {}\njob: {j}", text(&abort));
    let on = extents(&server, "v");
    match state(&j) {
        "completed" => assert_eq!(on, vec![ext(0, 4 * MIB, "dst", 0)], "{j}"),
        "aborted" => assert_eq!(on, vec![ext(0, 4 * MIB, "src", 0)], "{j}"),
        other => panic!("unexpected state {other}: {j}"),
    }
    assert_same(&format!("acknowledged write W after the abort (job {}, mapping {on:?})", state(&j)), &pread(&server, "v", 0, w.len()), &w);
    assert_same("last chunk", &pread(&server, "v", 3 * MIB, MIB as usize), &last);
}

// ------------- 10. crash between cutover commit and final checkpoint

/// The process dies right after the cutover's new generation is committed
/// but before the job is marked completed (fault injection
/// NBDVIRT_TEST_CRASH_AT=swapped). The restarted server resumes the job; it
/// must recognise that the range already is on the destination and, with
/// `--discard-source`, must not discard the *destination*.
#[test]
fn crash_after_cutover_commit_then_resume_keeps_the_data() {
    let mut server = start(&two_files("16MiB", "16MiB", "16MiB"));
    let expected = pattern(101, (16 * MIB) as usize);
    fill(&server, "v", &expected, "v");
    server.kill();

    // One run of the server with the fault injection (the harness has no
    // way to pass an environment variable only to its child).
    struct Crashy(Child);
    impl Drop for Crashy {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let log = std::fs::OpenOptions::new().create(true).append(true).open(server.path("crashy.log")).unwrap();
    let mut crashy = Crashy(
        Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&server.config)
            .env("NBDVIRT_TEST_CRASH_AT", "swapped")
            .env("RUST_LOG", "nbdvirt=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    wait_control(&server);
    cli_ok(&server, &["migrate", "start", "v", "--to", "dst", "--rate", "0", "--discard-source"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = crashy.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the injected crash did not happen");
        std::thread::sleep(Duration::from_millis(20));
    };
    let crash_log = std::fs::read_to_string(server.path("crashy.log")).unwrap();
    assert!(!status.success() && crash_log.contains("crash injected at swap phase Swapped"), "{status}\n{crash_log}");
    let cp = checkpoint(&server, "v").expect("checkpoint");
    assert_eq!(cp["state"], "running", "{cp}");
    let _ = std::fs::remove_file(server.path("control.sock"));

    respawn(&mut server);
    let j = wait_done(&server, "v", Duration::from_secs(60));
    assert_completed(&server, &j);
    assert_eq!(extents(&server, "v"), vec![ext(0, 16 * MIB, "dst", 0)]);
    assert_same("volume after crash at cutover and resume", &read_volume(&server, "v"), &expected);
}

// ---------- 11. interrupted migration whose destination left the config

/// Replaces everything after the harness's `[server]` block with `body`.
/// A migration interrupted by a crash is resumed at start-up; if its
/// destination backend is no longer configured, that one job cannot go on
/// but the daemon must still start and serve every volume (the interrupted
/// migration's volume from its source, which always had every write).
#[test]
fn interrupted_migration_to_a_removed_backend_does_not_block_startup() {
    let mut server = start(&two_files("32MiB", "32MiB", "32MiB"));
    let expected = pattern(111, (32 * MIB) as usize);
    fill(&server, "v", &expected, "v");
    cli_ok(&server, &["migrate", "start", "v", "--to", "dst", "--rate", "4MiB"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while checkpoint(&server, "v").map_or(0, |c| c["copied_bytes"].as_u64().unwrap_or(0)) < MIB {
        assert!(Instant::now() < deadline, "no checkpoint with progress");
        std::thread::sleep(Duration::from_millis(50));
    }
    server.kill();
    rewrite_config(
        &server,
        r#"[[backend]]
name = "src"
path = "{dir}/src.img"
size = "32MiB"

[[volume]]
name = "v"
[[volume.extent]]
length = "32MiB"
backend = "src"
backend_offset = 0
"#,
    );
    // TestServer::spawn panics if the daemon exits during start-up.
    respawn(&mut server);
    let j = job(&server, "v");
    assert_ne!(state(&j), "running", "a job without its destination cannot run: {j}");
    assert!(j["reason"].as_str().unwrap_or("").contains("dst"), "the reason names the missing backend: {j}");
    assert_eq!(extents(&server, "v"), vec![ext(0, 32 * MIB, "src", 0)]);
    assert_same("volume", &read_volume(&server, "v"), &expected);
}

// ------ 12. reload must not map a volume onto a migration's destination

/// While `v` migrates into dst 0+32 MiB, a reload that adds volume `x` on
/// dst 0+16 MiB must be refused: x's writes would land in v's destination
/// (corrupting v after the cutover), and afterwards v and x would overlap
/// (a config the daemon refuses at the next start).
#[test]
fn reload_cannot_map_a_volume_onto_a_running_migrations_destination() {
    let server = start(&two_files("32MiB", "64MiB", "32MiB"));
    let expected = pattern(121, (32 * MIB) as usize);
    fill(&server, "v", &expected, "v");
    cli_ok(&server, &["migrate", "start", "v", "--to", "dst:0", "--rate", "4MiB"]);
    wait_job(&server, "v", "some progress", Duration::from_secs(60), |j| u(j, "copied_bytes") >= 2 * MIB);
    rewrite_config(
        &server,
        &(two_files("32MiB", "64MiB", "32MiB")
            + r#"
[[volume]]
name = "x"
[[volume.extent]]
length = "16MiB"
backend = "dst"
backend_offset = 0
"#),
    );
    let out = cli(&server, &["reload"]);
    if out.status.success() {
        // Show the harm: x's write lands in a chunk of v already copied.
        pwrite(&server, "x", 0, &pattern(122, MIB as usize));
        let j = wait_done(&server, "v", Duration::from_secs(60));
        let v_now = read_volume(&server, "v");
        let harm = if v_now == expected { "v's data survived this time".to_string() } else { "v is now CORRUPTED: it reads x's data".to_string() };
        panic!(
            "reload accepted volume x on dst 0+16MiB while v migrates into dst 0+32MiB: {}\njob: {j}\nv: {:?}\nx: {:?}",
            harm,
            extents(&server, "v"),
            extents(&server, "x")
        );
    }
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("migrat"), "refusal names the migration: {err}");
    let j = wait_done(&server, "v", Duration::from_secs(60));
    assert_completed(&server, &j);
    assert_same("v after the refused reload", &read_volume(&server, "v"), &expected);
}
