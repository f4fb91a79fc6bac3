//! Every error kind reaches the operator twice: as the control socket's
//! `kind` and as the `nbdvirt` exit code (README: Exit codes). Real binary,
//! real server; one fake server for the answer the CLI cannot parse.

mod common;

use common::cli::*;
use common::*;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const NOT_FOUND: i32 = 3;
const BUSY_OR_CONFLICT: i32 = 4;
const IO: i32 = 5;
const SWAP_FAILED: i32 = 6;
const INVALID: i32 = 7;

/// Two volumes on two files, and a spare backend to migrate onto.
const BODY: &str = r#"[[backend]]
name = "a"
path = "{dir}/a.img"
size = "8MiB"

[[backend]]
name = "spare"
path = "{dir}/spare.img"
size = "8MiB"

[[volume]]
name = "v"
[[volume.extent]]
length = "4MiB"
backend = "a"
backend_offset = 0

[[volume]]
name = "w"
[[volume.extent]]
length = "4MiB"
backend = "a"
backend_offset = "4MiB"
"#;

/// Runs `nbdvirt ARGS` against `server`; asserts the exit code and that
/// stderr contains `needle`; returns stderr.
fn fails_with(server: &TestServer, args: &[&str], code: i32, needle: &str) -> String {
    let out = cli(server, args);
    expect_failure(&out, args, code, needle)
}

fn expect_failure(out: &Output, args: &[&str], code: i32, needle: &str) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "nbdvirt {args:?}: exit code\n{}", text(out));
    assert!(err.contains(needle), "nbdvirt {args:?}: stderr should name {needle:?}\n{}", text(out));
    err
}

fn write_file_at(path: &std::path::Path, offset: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(data, offset).unwrap();
    f.sync_all().unwrap();
}

/// One raw request on the control socket; the whole answer.
fn raw(server: &TestServer, request: &str) -> serde_json::Value {
    let mut s = UnixStream::connect(server.path("control.sock")).expect("control socket");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(format!("{request}\n").as_bytes()).unwrap();
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    json(&line)
}

#[test]
fn not_found_exits_3_and_the_socket_says_not_found() {
    let server = start(BODY);
    fails_with(&server, &["resume", "nosuch"], NOT_FOUND, "no volume named 'nosuch'");
    fails_with(&server, &["pause", "nosuch"], NOT_FOUND, "no volume named 'nosuch'");
    fails_with(&server, &["migrate", "status", "v"], NOT_FOUND, "no migration of volume 'v'");
    fails_with(&server, &["migrate", "abort", "v"], NOT_FOUND, "no running migration");
    fails_with(&server, &["migrate", "start", "v", "--to", "nosuch"], NOT_FOUND, "no backend named 'nosuch'");
    let v = raw(&server, r#"{"command":"resume","volume":"nosuch"}"#);
    assert_eq!(v, serde_json::json!({"ok": false, "error": "no volume named 'nosuch'", "kind": "not_found"}));
    // Successful answers are unchanged: no kind.
    let ok = raw(&server, r#"{"command":"status"}"#);
    assert_eq!((ok["ok"].as_bool(), ok.get("kind")), (Some(true), None), "{ok}");
}

#[test]
fn busy_and_conflict_exit_4() {
    let server = start(BODY);
    // Busy: a migration already running (1 MiB/s over 4 MiB of data, not
    // holes, which are skipped: seconds).
    write_file_at(&server.path("a.img"), 0, &pattern(1, 4 << 20));
    cli_ok(&server, &["migrate", "start", "v", "--to", "spare", "--rate", "1MiB"]);
    fails_with(&server, &["migrate", "start", "v", "--to", "spare"], BUSY_OR_CONFLICT, "already being migrated");
    let v = raw(&server, r#"{"command":"migrate_start","volume":"v","to":"spare"}"#);
    assert_eq!(v["kind"], "busy", "{v}");
    // Conflict: the destination range is the running migration's.
    let err = fails_with(&server, &["migrate", "start", "w", "--to", "spare:0"], BUSY_OR_CONFLICT, "in use");
    assert!(err.contains("spare"), "{err}");
    cli_ok(&server, &["migrate", "abort", "v"]);
    // Busy: paused twice; conflict: resumed when not paused.
    cli_ok(&server, &["pause", "w", "--timeout", "20s"]);
    fails_with(&server, &["pause", "w"], BUSY_OR_CONFLICT, "already paused");
    cli_ok(&server, &["resume", "w"]);
    fails_with(&server, &["resume", "w"], BUSY_OR_CONFLICT, "volume 'w' is not paused");
    assert_eq!(raw(&server, r#"{"command":"resume","volume":"w"}"#)["kind"], "conflict");
}

#[test]
fn invalid_requests_arguments_and_configs_exit_7() {
    let server = start(BODY);
    // Refused by the server.
    fails_with(&server, &["pause", "v", "--range", "0:64MiB"], INVALID, "not inside volume 'v'");
    fails_with(&server, &["migrate", "start", "v", "--range", "0:4097", "--to", "spare"], INVALID, "not aligned");
    fails_with(&server, &["migrate", "start", "v", "--to", "spare:8MiB"], INVALID, "too small");
    assert_eq!(raw(&server, r#"{"command":"pause","volume":"v","range":{"start":0,"length":0}}"#)["kind"], "invalid");
    assert_eq!(raw(&server, r#"{"command":"explode"}"#)["kind"], "invalid");
    // Refused by the CLI before asking.
    fails_with(&server, &["pause", "v", "--range", "nonsense"], INVALID, "expected START:LEN");
    fails_with(&server, &["pause", "v", "--timeout", "soon"], INVALID, "--timeout");
    // A config that does not load: check, serve and a reload.
    let bad = server.path("bad.toml");
    std::fs::write(&bad, "[server]\nio_threads = \"many\"\n").unwrap();
    let bad_s = bad.display().to_string();
    let out = run_timeout(Command::new(BIN).args(["check", "--config", &bad_s]), Duration::from_secs(30));
    expect_failure(&out, &["check"], INVALID, "bad.toml:2");
    let out = run_timeout(Command::new(BIN).args(["serve", "--config", &bad_s]).env("RUST_LOG", "off"), Duration::from_secs(30));
    expect_failure(&out, &["serve"], INVALID, "bad.toml:2");
    rewrite_config(&server, &BODY.replace("backend_offset = \"4MiB\"", "backend_offset = \"6MiB\""));
    let err = fails_with(&server, &["reload"], INVALID, "past");
    assert!(err.contains("volume 'w'"), "{err}");
    // Clap's own usage errors stay 2.
    let out = run_timeout(Command::new(BIN).args(["status", "--no-such-flag"]), Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

#[test]
fn an_unreadable_state_directory_exits_5() {
    let server = start(BODY);
    // The volume's history directory replaced by a file: reading it fails
    // with ENOTDIR (root reads through permission bits, so not chmod).
    let history = server.path("state/volumes/v/history");
    assert!(history.is_dir(), "layout of the state directory changed: {}", history.display());
    std::fs::remove_dir_all(&history).unwrap();
    std::fs::write(&history, b"not a directory").unwrap();
    let err = fails_with(&server, &["history", "v"], IO, "history");
    assert!(err.contains("Not a directory") || err.contains("os error 20"), "names the I/O error: {err}");
    assert_eq!(raw(&server, r#"{"command":"history","volume":"v"}"#)["kind"], "io");
}

#[test]
fn a_swap_that_cannot_drain_exits_6() {
    require("nbdsh", "libnbd-bin");
    // One slow file under two names, so that re-pointing the extent from
    // `s1` to `s2` changes the table but not the bytes.
    let body = |name: &str| {
        format!(
            "pause_timeout = \"300ms\"\npause_retries = 0\n\n[[backend]]\nname = \"s1\"\npath = \"{{dir}}/slow.img\"\nsize = \"4MiB\"\nshared = true\ndelay = \"3s\"\n\n[[backend]]\nname = \"s2\"\npath = \"{{dir}}/slow.img\"\nsize = \"4MiB\"\nshared = true\ndelay = \"3s\"\n\n[[volume]]\nname = \"v\"\n[[volume.extent]]\nlength = \"4MiB\"\nbackend = \"{name}\"\nbackend_offset = 0\n"
        )
    };
    // The leading settings land in the harness's [server] table.
    let server = start(&body("s1"));
    let mut writer = Command::new("nbdsh")
        .args(["-u", &server.uri("v"), "-c", "h.pwrite(b'x' * 4096, 0)"])
        .env("PATH", debian_path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nbdsh");
    wait_until(&server, "the slow write in flight", Duration::from_secs(10), || vol(&server, "v")["in_flight"].as_u64() >= Some(1));
    rewrite_config(&server, &body("s2"));
    fails_with(&server, &["reload"], SWAP_FAILED, "drain timed out");
    assert_eq!(vol(&server, "v")["generation"], 1);
    let _ = writer.wait();
}

/// A fake server answering every request with `answer`.
fn fake_server(dir: &std::path::Path, answer: &'static str) -> std::path::PathBuf {
    let path = dir.join("fake.sock");
    let listener = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut line = String::new();
            let _ = BufReader::new(&stream).read_line(&mut line);
            let _ = (&stream).write_all(format!("{answer}\n").as_bytes());
        }
    });
    path
}

#[test]
fn an_answer_the_cli_cannot_parse_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    // Well-formed JSON, wrong shape: a renamed field, a string for a list.
    let sock = fake_server(dir.path(), r#"{"ok":true,"result":{"config":null,"listen":[],"volumez":[],"backends":[]}}"#);
    let sock = sock.display().to_string();
    for json_flag in [false, true] {
        let mut args = vec!["status", "--control", &sock];
        if json_flag {
            args.push("--json");
        }
        let out = run_timeout(Command::new(BIN).args(&args).env_remove("NBDVIRT_CONFIG"), Duration::from_secs(30));
        let err = expect_failure(&out, &args, 1, "cannot parse the server's answer as Status");
        assert!(err.contains("volumes"), "names the missing field: {err}");
        assert!(out.stdout.is_empty(), "prints nothing half-parsed: {}", text(&out));
    }
    // A job whose state this client does not know is not printed as "?".
    let dir = tempfile::tempdir().unwrap();
    let sock = fake_server(dir.path(), r#"{"ok":true,"result":{"migrations":[{"volume":"v","state":"paused"}]}}"#).display().to_string();
    let args = ["migrate", "status", "--control", &sock];
    let out = run_timeout(Command::new(BIN).args(args).env_remove("NBDVIRT_CONFIG"), Duration::from_secs(30));
    let err = expect_failure(&out, &args, 1, "cannot parse the server's answer as MigrationList");
    assert!(err.contains("paused"), "names the value it could not parse: {err}");
}
