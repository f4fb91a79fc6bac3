//! `nbdvirt reload` (and SIGHUP, and restarts) against the real binary:
//! volumes come and go, bad configs are refused with file:line and field
//! while the old config keeps serving, committed generations survive
//! restarts, and an unchanged config commits nothing.
mod common;
use common::cli::*;
use common::script::*;
use common::*;
use serde_json::Value;
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------- helpers

/// Writes a fresh pattern at `offset` of `uri` and reads it back.
fn write_read(server: &TestServer, uri: &str, seed: u64, offset: u64) -> Vec<u8> {
    let d = pattern(seed, 64 * KIB as usize);
    let p = data_file(server, &format!("wr{seed}.bin"), &d);
    nbdsh_run(uri, &format!("d = open('{p}', 'rb').read()\nh.pwrite(d, {offset})\nh.flush()\nassert h.pread(len(d), {offset}) == d, 'read back differs'\n"));
    d
}

/// Export names from `nbdinfo --list --json`.
fn exports(server: &TestServer) -> Vec<(String, u64)> {
    require("nbdinfo", "libnbd-bin");
    let uri = format!("nbd+unix:///?socket={}", server.socket.display());
    let out = run_ok(Command::new("nbdinfo").args(["--list", "--json", &uri]));
    let v = json(&out);
    let mut names: Vec<(String, u64)> = v["exports"]
        .as_array()
        .unwrap_or_else(|| panic!("no exports in {v}"))
        .iter()
        .map(|e| (e["export-name"].as_str().unwrap().to_string(), e["export-size"].as_u64().unwrap()))
        .collect();
    names.sort();
    names
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().unwrap_or_else(|| panic!("not an array: {v}")).iter().map(|s| s.as_str().unwrap().to_string()).collect()
}

// ------------------------------------------------------ 1. added volume

const ONE_VOLUME: &str = r#"[[backend]]
name = "a"
path = "{dir}/a.img"
size = "8MiB"

[[volume]]
name = "v1"
[[volume.extent]]
length = "8MiB"
backend = "a"
backend_offset = 0
"#;

const SECOND_VOLUME: &str = r#"
[[backend]]
name = "n"
path = "{dir}/n.img"
size = "4MiB"

[[volume]]
name = "v2"
[[volume.extent]]
length = "4MiB"
backend = "n"
backend_offset = 0
"#;

#[test]
fn reload_adds_a_volume_on_a_newly_opened_backend() {
    let server = start(ONE_VOLUME);
    assert_eq!(exports(&server), vec![("v1".to_string(), 8 * MIB)]);
    assert!(!server.path("n.img").exists());

    rewrite_config(&server, &format!("{ONE_VOLUME}{SECOND_VOLUME}"));
    let report = json(&cli_ok(&server, &["reload", "--json"]));
    assert_eq!(strings(&report["added"]), ["v2"], "{report}");
    assert_eq!(strings(&report["backends_opened"]), ["n"], "{report}");
    assert_eq!(strings(&report["unchanged"]), ["v1"], "{report}");
    assert!(report["swapped"].as_array().unwrap().is_empty(), "{report}");
    assert!(server.path("n.img").exists(), "the new backend's file was created");

    assert_eq!(exports(&server), vec![("v1".to_string(), 8 * MIB), ("v2".to_string(), 4 * MIB)]);
    let d = write_read(&server, &server.uri("v2"), 1, MIB);
    assert_eq!(read_at(&server.path("n.img"), MIB, d.len()), d, "v2's data lands in n.img");
    let d1 = write_read(&server, &server.uri("v1"), 2, MIB);
    assert_eq!(read_at(&server.path("a.img"), MIB, d1.len()), d1);

    let st = poll_status(&server);
    assert_eq!(vol_of(&st, "v2")["generation"], 1, "{st}");
    assert!(st["backends"].as_array().unwrap().iter().any(|b| b["name"] == "n"), "{st}");
    let hist = history(&server, "v2");
    assert_eq!(hist.len(), 1, "{hist:?}");
    assert_eq!(hist[0]["reason"], "added", "{hist:?}");
}

// ------------------------------------------- 2. removing a volume in use

const TWO_VOLUMES: &str = r#"[[backend]]
name = "a"
path = "{dir}/a.img"
size = "8MiB"

[[backend]]
name = "b"
path = "{dir}/b.img"
size = "4MiB"

[[volume]]
name = "v1"
[[volume.extent]]
length = "8MiB"
backend = "a"
backend_offset = 0

[[volume]]
name = "v2"
[[volume.extent]]
length = "4MiB"
backend = "b"
backend_offset = 0
"#;

#[test]
fn removing_a_volume_with_a_client_needs_force_and_disconnects_it() {
    let server = start(TWO_VOLUMES);
    // A client connected to v2 that reads on demand and reports errors.
    let mut client = Script::start(
        "client of v2",
        &server.uri("v2"),
        "import sys\nprint('ready', flush=True)\nwhile sys.stdin.readline():\n    try:\n        h.pread(4096, 0)\n        print('ok', flush=True)\n    except Exception as e:\n        print('error', flush=True)\n",
    );
    client.expect("ready", Duration::from_secs(30));
    client.send("read");
    client.expect("ok", Duration::from_secs(10));
    wait_until(&server, "v2's connection in status", Duration::from_secs(10), || vol(&server, "v2")["connections"] == 1);

    rewrite_config(&server, ONE_VOLUME);
    let err = cli_err(&server, &["reload"]);
    assert!(err.contains("'v2'") && err.contains("--force"), "refusal names the volume and --force: {err}");
    // Nothing changed: v2 is still exported and its client still served.
    assert_eq!(exports(&server).len(), 2);
    client.send("read");
    client.expect("ok", Duration::from_secs(10));
    assert_eq!(generation(&server, "v2"), 1);

    let report = json(&cli_ok(&server, &["reload", "--force", "--json"]));
    assert_eq!(strings(&report["removed"]), ["v2"], "{report}");
    assert_eq!(report["disconnected"], 1, "{report}");
    assert_eq!(strings(&report["backends_closed"]), ["b"], "{report}");
    client.send("read");
    client.expect("error", Duration::from_secs(10));
    assert_eq!(exports(&server), vec![("v1".to_string(), 8 * MIB)]);
    let out = nbdsh_try(&server.uri("v2"), "pass");
    assert!(!out.status.success(), "connecting to the removed export must fail: {}", text(&out));
    let st = poll_status(&server);
    assert!(st["volumes"].as_array().unwrap().iter().all(|v| v["name"] != "v2"), "{st}");
    write_read(&server, &server.uri("v1"), 3, 0);
}

/// A volume removed while manually paused and added back is a new volume:
/// it must not inherit the old one's pause (its hold id belongs to the old
/// volume's gate).
#[test]
fn a_removed_and_re_added_volume_is_not_left_manually_paused() {
    let server = start(TWO_VOLUMES);
    cli_ok(&server, &["pause", "v2", "--timeout", "60s"]);
    assert_eq!(vol(&server, "v2")["manual_pause"], true);
    rewrite_config(&server, ONE_VOLUME);
    let report = json(&cli_ok(&server, &["reload", "--json"]));
    assert_eq!(strings(&report["removed"]), ["v2"], "{report}");
    rewrite_config(&server, TWO_VOLUMES);
    let report = json(&cli_ok(&server, &["reload", "--json"]));
    assert_eq!(strings(&report["added"]), ["v2"], "{report}");
    let v = vol(&server, "v2");
    assert_eq!((v["state"].as_str(), v["manual_pause"].as_bool()), (Some("running"), Some(false)), "the re-added volume is not paused: {v}");
    let out = cli(&server, &["pause", "v2", "--timeout", "20s"]);
    assert!(out.status.success(), "pausing the re-added volume: {}", text(&out));
    cli_ok(&server, &["resume", "v2"]);
    write_read(&server, &server.uri("v2"), 8, 0);
}

// ------------------------------------------------------ 3. bad configs

const BASE: &str = r#"[[backend]]
name = "a"
path = "{dir}/a.img"
size = "8MiB"

[[volume]]
name = "v"
[[volume.extent]]
length = "4MiB"
backend = "a"
backend_offset = 0
[[volume.extent]]
length = "4MiB"
backend = "a"
backend_offset = "4MiB"
"#;

#[test]
fn bad_configs_are_refused_with_file_line_and_field_and_the_old_one_keeps_serving() {
    let server = start(BASE);
    let uri = server.uri("v");
    let kept = write_read(&server, &uri, 4, 3 * MIB);
    let cfg = server.config.display().to_string();
    // (what, body with the offending line marked `# HERE`, text the error names)
    let cases: [(&str, String, &[&str]); 4] = [
        (
            "syntax error",
            BASE.replace("length = \"4MiB\"\nbackend = \"a\"\nbackend_offset = \"4MiB\"", "length = # HERE\nbackend = \"a\"\nbackend_offset = \"4MiB\""),
            &["invalid"],
        ),
        ("unknown backend", BASE.replace("backend = \"a\"\nbackend_offset = \"4MiB\"", "backend = \"nope\" # HERE\nbackend_offset = \"4MiB\""), &["volume 'v' extent 1: backend", "no backend named 'nope'"]),
        (
            "overlapping extents",
            BASE.replace("[[volume.extent]]\nlength = \"4MiB\"\nbackend = \"a\"\nbackend_offset = \"4MiB\"", "[[volume.extent]]\nstart = \"2MiB\" # HERE\nlength = \"6MiB\"\nbackend = \"a\"\nbackend_offset = \"2MiB\""),
            &["volume 'v' extent 1: start", "overlap"],
        ),
        (
            "two volumes on one unshared range",
            format!("{BASE}\n[[volume]]\nname = \"w\"\n[[volume.extent]]\nlength = \"1MiB\"\nbackend = \"a\"\nbackend_offset = \"1MiB\" # HERE\n"),
            &["volume 'w' extent 0: backend_offset", "shared = true"],
        ),
    ];
    for (what, body, names) in cases {
        assert_ne!(body, BASE, "{what}: the case must change the config");
        rewrite_config(&server, &body);
        let written = std::fs::read_to_string(&server.config).unwrap();
        let line = written.lines().position(|l| l.contains("# HERE")).expect("marker") + 1;
        let err = cli_err(&server, &["reload"]);
        assert!(err.contains(&format!("{cfg}:{line}:")), "{what}: the error names {cfg}:{line}: {err}");
        for n in names {
            assert!(err.contains(n), "{what}: the error names {n:?}: {err}");
        }
        let v = vol(&server, "v");
        assert_eq!(v["generation"], 1, "{what}: generation unchanged: {v}");
        assert_eq!(extents_of(&v), vec![(0, 4 * MIB, "a".into(), 0), (4 * MIB, 4 * MIB, "a".into(), 4 * MIB)], "{what}");
        let st = poll_status(&server);
        assert_eq!(st["volumes"].as_array().unwrap().len(), 1, "{what}: {st}");
        // The old config keeps serving reads and writes.
        write_read(&server, &uri, 5, 6 * MIB);
        let p = data_file(&server, "kept.bin", &kept);
        assert_volume_reads(&uri, &p, 3 * MIB);
    }
    assert_eq!(history_generations(&server, "v"), vec![1]);
    // A good config afterwards applies normally.
    rewrite_config(&server, &BASE.replace("backend_offset = \"4MiB\"", "backend_offset = \"4MiB\"\n[[backend]]\nname = \"spare\"\npath = \"{dir}/spare.img\"\nsize = \"1MiB\""));
    let report = json(&cli_ok(&server, &["reload", "--json"]));
    assert_eq!(strings(&report["backends_opened"]), ["spare"], "{report}");
    assert_eq!(strings(&report["unchanged"]), ["v"], "{report}");
}

// -------------------------------------------------------------- 4. SIGHUP

#[test]
fn sighup_reloads_the_config() {
    let server = start(SHARED);
    let d = write_read(&server, &server.uri("v"), 6, 3 * MIB);
    rewrite_config(&server, &recut(2 * MIB, "b"));
    unsafe { libc::kill(server.pid(), libc::SIGHUP) };
    wait_until(&server, "generation 2 after SIGHUP", Duration::from_secs(10), || generation(&server, "v") == 2);
    assert_eq!(extents_of(&vol(&server, "v")), vec![(0, 2 * MIB, "b".into(), 0), (2 * MIB, 6 * MIB, "a".into(), 2 * MIB)]);
    wait_until(&server, "the SIGHUP reload in the log", Duration::from_secs(10), || server.log().contains("SIGHUP: reload applied"));

    // A bad config on SIGHUP is logged; the server keeps serving.
    rewrite_config(&server, &recut(2 * MIB, "nope"));
    unsafe { libc::kill(server.pid(), libc::SIGHUP) };
    wait_until(&server, "the failed SIGHUP reload in the log", Duration::from_secs(10), || server.log().contains("SIGHUP: reload failed"));
    let mut server = server;
    server.assert_alive();
    assert_eq!(generation(&server, "v"), 2);
    let p = data_file(&server, "d.bin", &d);
    assert_volume_reads(&server.uri("v"), &p, 3 * MIB);
}

// ------------------------------------------------------------ 5. restart

#[test]
fn restart_keeps_the_last_committed_generation_and_unchanged_config_commits_nothing() {
    let mut server = start(SHARED);
    let d = write_read(&server, &server.uri("v"), 7, 5 * MIB);
    for (i, (cut, first)) in [(2 * MIB, "b"), (6 * MIB, "b")].into_iter().enumerate() {
        rewrite_config(&server, &recut(cut, first));
        let report = json(&cli_ok(&server, &["reload", "--json"]));
        assert_eq!(report["swapped"][0]["generation"], i as u64 + 2, "{report}");
    }
    let before = vol(&server, "v");
    assert_eq!(before["generation"], 3, "{before}");

    // Unchanged config: no new generation.
    let report = json(&cli_ok(&server, &["reload", "--json"]));
    assert!(report["swapped"].as_array().unwrap().is_empty(), "{report}");
    assert_eq!(strings(&report["unchanged"]), ["v"], "{report}");
    assert_eq!(generation(&server, "v"), 3);

    // Clean restart, then a crash-restart: same generation, same mapping,
    // nothing committed at start.
    assert!(server.stop().success(), "clean stop:\n{}", server.log());
    respawn(&mut server);
    let after = vol(&server, "v");
    assert_eq!(after["generation"], 3, "{after}");
    assert_eq!(extents_of(&after), extents_of(&before));
    server.kill();
    respawn(&mut server);
    let after = vol(&server, "v");
    assert_eq!(after["generation"], 3, "{after}");
    assert_eq!(extents_of(&after), extents_of(&before));
    assert_eq!(history_generations(&server, "v"), vec![1, 2, 3]);
    let report = json(&cli_ok(&server, &["reload", "--json"]));
    assert_eq!(strings(&report["unchanged"]), ["v"], "{report}");
    assert_eq!(history_generations(&server, "v"), vec![1, 2, 3]);
    let p = data_file(&server, "d.bin", &d);
    assert_volume_reads(&server.uri("v"), &p, 5 * MIB);
}

// ------------------------------------------- pause settings and reload

fn pause_settings_body(retries: u32, slow: &str) -> String {
    let mut s = format!("pause_timeout = \"500ms\"\npause_retries = {retries}\n\n");
    for name in ["s1", "s2"] {
        s += &format!("[[backend]]\nname = \"{name}\"\npath = \"{{dir}}/slow.img\"\nsize = \"4MiB\"\nshared = true\ndelay = \"1500ms\"\n\n");
    }
    s + &format!("[[volume]]\nname = \"v\"\n[[volume.extent]]\nlength = \"4MiB\"\nbackend = \"{slow}\"\nbackend_offset = 0\n")
}

/// A reload must not silently ignore a changed setting: either it applies
/// (the next swap retries) or the report lists it under `needs_restart`.
#[test]
fn changed_pause_settings_take_effect_or_are_reported_as_needing_restart() {
    let server = start(&pause_settings_body(0, "s1"));
    rewrite_config(&server, &pause_settings_body(5, "s1"));
    let report = json(&cli_ok(&server, &["reload", "--json"]));
    let needs_restart = strings(&report["needs_restart"]);
    if needs_restart.iter().any(|s| s.contains("pause")) {
        return;
    }
    let mut w = Script::start("slow write", &server.uri("v"), "import sys\nprint('ready', flush=True)\nsys.stdin.readline()\nh.pwrite(b'x' * 4096, 0)\nprint('done', flush=True)\n");
    w.expect("ready", Duration::from_secs(30));
    w.send("go");
    wait_until(&server, "the slow write in flight", Duration::from_secs(10), || vol(&server, "v")["in_flight"].as_u64() >= Some(1));
    rewrite_config(&server, &pause_settings_body(5, "s2"));
    let out = cli(&server, &["reload", "--json"]);
    assert!(
        out.status.success(),
        "pause_retries went from 0 to 5 by reload (needs_restart: {needs_restart:?}), but the next swap still gave up after one drain timeout: {}",
        text(&out)
    );
    let report = json(&String::from_utf8_lossy(&out.stdout));
    assert!(report["swapped"][0]["attempts"].as_u64() >= Some(2), "{report}");
    w.expect("done", Duration::from_secs(10));
}

// ---------------------------------------------------- 6. embedded default

/// Who holds TCP port `port`, as `ss -tanp` shows it (process names only
/// for the same user, or as root).
fn port_holders(port: u16) -> String {
    let filter = format!("sport = :{port}");
    match Command::new("ss").args(["-Htanp", &filter]).output() {
        Ok(out) if out.status.success() && !out.stdout.is_empty() => String::from_utf8_lossy(&out.stdout).trim_end().to_string(),
        Ok(out) if out.status.success() => "(`ss` shows no TCP socket on it now)".to_string(),
        _ => format!("(unknown: `ss -tanp '{filter}'` did not run)"),
    }
}

#[test]
fn reload_of_the_embedded_default_is_refused() {
    // The embedded default listens on 127.0.0.1:10809, so this case needs
    // that port free; if something else holds it, the test fails saying who
    // (it must not skip).
    if let Err(e) = std::net::TcpListener::bind("127.0.0.1:10809") {
        panic!(
            "127.0.0.1:10809 is busy ({e}): this test starts nbdvirt on its embedded default config, which listens there; free the port and run again. Held by:\n{}",
            port_holders(10809)
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
    let mut child = Command::new(BIN)
        .arg("serve")
        .current_dir(dir.path())
        .env_remove("NBDVIRT_CONFIG")
        .env("RUST_LOG", "nbdvirt=debug")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start nbdvirt");
    struct Kill(Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let server_log = || std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default();
    let control = dir.path().join("nbdvirt-data/control.sock");
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(&control).is_err() {
        if let Some(status) = child.try_wait().unwrap() {
            let log = server_log();
            if log.contains("10809") && (log.contains("in use") || log.contains("AddrInUse")) {
                panic!(
                    "127.0.0.1:10809 was free when the test began but was taken before nbdvirt (embedded default) could listen there ({status}); free the port and run again. Held by:\n{}\n--- server log ---\n{log}",
                    port_holders(10809)
                );
            }
            panic!("nbdvirt (embedded default) exited during start-up ({status}):\n{log}");
        }
        assert!(Instant::now() < deadline, "no control socket within 20 s:\n{}", server_log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let _guard = Kill(child);
    let run = |args: &[&str]| {
        let mut cmd = Command::new(BIN);
        cmd.args(args).arg("--control").arg(&control).current_dir(dir.path()).env_remove("NBDVIRT_CONFIG");
        run_timeout(&mut cmd, Duration::from_secs(30))
    };
    let out = run(&["reload"]);
    assert!(!out.status.success(), "reload of the embedded default must fail: {}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("embedded default") && err.contains("no config file"), "clear refusal: {err}");
    let out = run(&["status", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let st = json(&String::from_utf8_lossy(&out.stdout));
    assert!(st["config"].is_null(), "{st}");
    assert_eq!(vol_of(&st, "default")["generation"], 1, "{st}");
}
