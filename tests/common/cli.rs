//! Driving a running server the way an operator does: `nbdvirt` subcommands,
//! the control socket, and edits to the config file. Opt in with
//! `use common::cli::*;` (not re-exported by `common`, so that test crates
//! with their own `start`, `json`, ... keep them unambiguous).

use super::{run_timeout, TestServer, BIN};
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// How an `nbdvirt` subcommand finds the server, and how long it may take.
#[derive(Clone, Copy, Debug)]
pub enum Via {
    /// `--control DIR/control.sock`, 90 s.
    Control,
    /// `--config CONFIG` (the CLI finds the control socket in the config), 120 s.
    Config,
}

/// `nbdvirt ARGS --control DIR/control.sock` or `--config CONFIG` (bounded).
pub fn cli_via(via: Via, server: &TestServer, args: &[&str]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    let limit = match via {
        Via::Control => {
            cmd.arg("--control").arg(server.path("control.sock"));
            Duration::from_secs(90)
        }
        Via::Config => {
            cmd.arg("--config").arg(&server.config);
            Duration::from_secs(120)
        }
    };
    cmd.env_remove("NBDVIRT_CONFIG");
    run_timeout(&mut cmd, limit)
}

/// Runs a command that must succeed; returns its stdout.
pub fn cli_ok_via(via: Via, server: &TestServer, args: &[&str]) -> String {
    let out = cli_via(via, server, args);
    assert!(out.status.success(), "nbdvirt {args:?} failed: {}\n--- server log ---\n{}", text(&out), server.log());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command that must fail; returns its stderr.
pub fn cli_err_via(via: Via, server: &TestServer, args: &[&str]) -> String {
    let out = cli_via(via, server, args);
    assert!(!out.status.success(), "nbdvirt {args:?} unexpectedly succeeded: {}", text(&out));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `nbdvirt ARGS --control DIR/control.sock` (bounded).
pub fn cli(server: &TestServer, args: &[&str]) -> Output {
    cli_via(Via::Control, server, args)
}

pub fn cli_ok(server: &TestServer, args: &[&str]) -> String {
    cli_ok_via(Via::Control, server, args)
}

/// Runs a command that must fail; returns its stderr.
pub fn cli_err(server: &TestServer, args: &[&str]) -> String {
    cli_err_via(Via::Control, server, args)
}

pub fn text(out: &Output) -> String {
    format!("status {}\nstdout:\n{}\nstderr:\n{}", out.status, String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

pub fn json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("bad JSON ({e}):\n{s}"))
}

/// `TestServer::start`/`spawn` return once the NBD socket accepts, but the
/// server creates its control socket just after that: wait for it too.
pub fn wait_control(server: &TestServer) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(server.path("control.sock")).is_err() {
        assert!(Instant::now() < deadline, "control socket did not appear within 20 s:\n{}", server.log());
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn start(body: &str) -> TestServer {
    let server = TestServer::start(body);
    wait_control(&server);
    server
}

pub fn respawn(server: &mut TestServer) {
    server.spawn();
    wait_control(server);
}

/// Status straight from the control socket (cheap enough to poll).
pub fn poll_status(server: &TestServer) -> Value {
    let mut s = UnixStream::connect(server.path("control.sock")).expect("control socket");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(b"{\"command\":\"status\"}\n").unwrap();
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    let v = json(&line);
    assert_eq!(v["ok"], true, "status failed: {v}");
    v["result"].clone()
}

pub fn vol_of(status: &Value, name: &str) -> Value {
    status["volumes"].as_array().unwrap().iter().find(|v| v["name"] == name).unwrap_or_else(|| panic!("no volume {name} in {status}")).clone()
}

pub fn vol(server: &TestServer, name: &str) -> Value {
    vol_of(&poll_status(server), name)
}

pub fn generation(server: &TestServer, name: &str) -> u64 {
    vol(server, name)["generation"].as_u64().unwrap()
}

/// `(start, length, backend, backend_offset)` of each extent in a status.
pub fn extents_of(vol: &Value) -> Vec<(u64, u64, String, u64)> {
    vol["extents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap(), e["backend"].as_str().unwrap_or("").to_string(), e["backend_offset"].as_u64().unwrap_or(0)))
        .collect()
}

pub fn history(server: &TestServer, name: &str) -> Vec<Value> {
    json(&cli_ok(server, &["history", name, "--json"])).as_array().unwrap().clone()
}

pub fn history_generations(server: &TestServer, name: &str) -> Vec<u64> {
    history(server, name).iter().map(|g| g["generation"].as_u64().unwrap()).collect()
}

/// Polls `f` every 10 ms until it holds; panics after `limit`.
pub fn wait_until(server: &TestServer, what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}\n--- status ---\n{}\n--- log ---\n{}", poll_status(server), server.log());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Replaces everything after the harness's `[server]` block with `body`
/// (`{dir}` expanded), atomically.
pub fn rewrite_config(server: &TestServer, body: &str) {
    let old = std::fs::read_to_string(&server.config).unwrap();
    let header = old.split_once("\n\n").expect("harness header").0;
    let new = format!("{header}\n\n{}", body.replace("{dir}", &server.dir.path().display().to_string()));
    let tmp = server.config.with_extension("toml.tmp");
    std::fs::write(&tmp, new).unwrap();
    std::fs::rename(&tmp, &server.config).unwrap();
}

/// Writes `data` to DIR/NAME and returns the path (scripts read it).
pub fn data_file(server: &TestServer, name: &str, data: &[u8]) -> String {
    let p = server.path(name);
    std::fs::write(&p, data).unwrap();
    p.display().to_string()
}

/// One 8 MiB file under two backend names (`a`, `b`, both `shared`), and a
/// volume `v` cut 4+4 MiB through `a`: re-cutting it (`recut`) changes the
/// table while every byte stays where it is.
pub const SHARED: &str = r#"[[backend]]
name = "a"
path = "{dir}/data.img"
size = "8MiB"
shared = true

[[backend]]
name = "b"
path = "{dir}/data.img"
size = "8MiB"
shared = true

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

/// `SHARED` re-cut at `cut` with the first part through `first`.
pub fn recut(cut: u64, first: &str) -> String {
    let head = SHARED.split("[[volume.extent]]").next().unwrap();
    format!(
        "{head}[[volume.extent]]\nlength = {cut}\nbackend = \"{first}\"\nbackend_offset = 0\n[[volume.extent]]\nlength = {}\nbackend = \"a\"\nbackend_offset = {cut}\n",
        (8 << 20) - cut
    )
}
