//! `nbdvirt fault`: a store failing on purpose, seen by real clients
//! (qemu-io, and nbdsh for the exact errno), then healed with `off`.
mod common;
use common::cli::*;
use common::*;
use std::process::Command;

const LINEAR: &str = r#"
[[backend]]
name = "b"
path = "{dir}/b.img"
size = "16MiB"

[[volume]]
name = "v"
[[volume.extent]]
start = 0
length = "16MiB"
backend = "b"
backend_offset = 0
"#;

/// Runs one qemu-io command; returns everything it printed (qemu-io
/// reports a failed request on its output, its exit status varies).
fn qemu_io(server: &TestServer, command: &str) -> String {
    require("qemu-io", "qemu-utils");
    let out = run_timeout(Command::new("qemu-io").args(["-f", "raw", "-c", command, &server.uri("v")]), std::time::Duration::from_secs(60));
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// nbdsh: prints `name OK` or `name ERRNO` per request.
fn probe(server: &TestServer, script: &str) -> String {
    let prelude = r#"
import errno
def t(name, f):
    try:
        f()
        print(name, "OK")
    except nbd.Error as e:
        print(name, errno.errorcode.get(e.errno, e.errno))
"#;
    nbdsh(&server.uri("v"), &format!("{prelude}\n{script}"))
}

fn backend_fault(server: &TestServer) -> Option<String> {
    let status = json(&cli_ok(server, &["status", "--json"]));
    let b = status["backends"].as_array().unwrap().iter().find(|b| b["name"] == "b").expect("backend b in status").clone();
    b["fault"].as_str().map(str::to_string)
}

#[test]
fn faults_fail_what_they_say_and_off_heals() {
    let mut server = start(LINEAR);
    let wrote = qemu_io(&server, "write -P 0x5a 0 64k");
    assert!(wrote.contains("wrote 65536/65536"), "{wrote}");

    // EIO on reads: reads fail with an I/O error, writes still land.
    let out = cli_ok(&server, &["fault", "b", "--error", "eio", "--reads", "--json"]);
    assert_eq!(json(&out), serde_json::json!({"backend": "b", "fault": "eio on reads"}));
    assert!(server.log().contains("fault injection on backend b: eio on reads"), "{}", server.log());
    assert_eq!(backend_fault(&server).as_deref(), Some("eio on reads"));
    let read = qemu_io(&server, "read -P 0x5a 0 64k");
    assert!(read.contains("Input/output error"), "read during an EIO fault: {read}");
    let wrote = qemu_io(&server, "write -P 0x33 1M 64k");
    assert!(wrote.contains("wrote 65536/65536"), "write during a read fault: {wrote}");
    let seen = probe(&server, "t('read', lambda: h.pread(4096, 0))\nt('write', lambda: h.pwrite(b'x' * 4096, 2 << 20))\nt('flush', lambda: h.flush())");
    assert_eq!(seen.lines().collect::<Vec<_>>(), ["read EIO", "write OK", "flush OK"], "{seen}");

    // ENOSPC on writes: writes, trims and zeroes fail with ENOSPC, reads work.
    let out = cli_ok(&server, &["fault", "b", "--error", "enospc", "--writes"]);
    assert!(out.contains("enospc on writes"), "{out}");
    let seen = probe(
        &server,
        "t('write', lambda: h.pwrite(b'y' * 4096, 0))\nt('zero', lambda: h.zero(4096, 0))\nt('read', lambda: h.pread(4096, 0))\nt('flush', lambda: h.flush())",
    );
    assert_eq!(seen.lines().collect::<Vec<_>>(), ["write ENOSPC", "zero ENOSPC", "read OK", "flush OK"], "{seen}");
    let wrote = qemu_io(&server, "write -P 0x77 0 4k");
    assert!(wrote.contains("No space left on device"), "write during an ENOSPC fault: {wrote}");
    let read = qemu_io(&server, "read -P 0x5a 0 64k");
    assert!(read.contains("read 65536/65536"), "read during a write fault: {read}");

    // Off: everything works and nothing the faults refused was written.
    let out = cli_ok(&server, &["fault", "b", "--error", "off", "--json"]);
    assert_eq!(json(&out), serde_json::json!({"backend": "b", "fault": null}));
    assert_eq!(backend_fault(&server), None);
    let read = qemu_io(&server, "read -P 0x5a 0 64k");
    assert!(read.contains("read 65536/65536"), "{read}");
    let read = qemu_io(&server, "read -P 0x33 1M 64k");
    assert!(read.contains("read 65536/65536"), "{read}");
    let wrote = qemu_io(&server, "write -P 0x11 4M 64k");
    assert!(wrote.contains("wrote 65536/65536"), "{wrote}");
    assert_eq!(read_at(&server.path("b.img"), 4 << 20, 65536), vec![0x11; 65536]);
    assert_eq!(read_at(&server.path("b.img"), 0, 65536), vec![0x5a; 65536]);
    server.assert_alive();
}

#[test]
fn an_unknown_backend_is_not_found() {
    let server = start(LINEAR);
    let out = cli(&server, &["fault", "nosuch", "--error", "eio"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("'nosuch'"), "{}", text(&out));
    // --reads and --writes together is a usage error.
    let out = cli(&server, &["fault", "b", "--error", "eio", "--reads", "--writes"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

#[test]
fn a_reload_that_keeps_the_backend_keeps_its_fault() {
    let server = start(LINEAR);
    cli_ok(&server, &["fault", "b", "--error", "eio", "--writes"]);
    cli_ok(&server, &["reload"]);
    assert_eq!(backend_fault(&server).as_deref(), Some("eio on writes"));
    let human = cli_ok(&server, &["status"]);
    assert!(human.contains("backend b: injected fault: eio on writes"), "{human}");
    let seen = probe(&server, "t('write', lambda: h.pwrite(b'z' * 4096, 0))\nt('flush', lambda: h.flush())\nt('read', lambda: h.pread(4096, 0))");
    assert_eq!(seen.lines().collect::<Vec<_>>(), ["write EIO", "flush EIO", "read OK"], "{seen}");
}
