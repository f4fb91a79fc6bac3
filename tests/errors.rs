//! Error replies on the wire (driven by libnbd through nbdsh, with strict
//! mode off where libnbd would refuse client-side) and configuration errors
//! reported by `nbdvirt check` / `nbdvirt serve`.
mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const MIB: u64 = 1 << 20;

/// Python prelude: `t(name, fn)` prints `name RESULT` where RESULT is `OK`
/// or the errno name, suffixed `(client)` when libnbd refused the request
/// itself instead of the server answering it.
const PRELUDE: &str = r#"
def t(name, f):
    try:
        f()
        print(name, "OK")
    except nbd.Error as e:
        print(name, e.errno if "command failed" in (e.string or "") else "%s(client)" % e.errno)
"#;

/// Runs PRELUDE + `script` under nbdsh; returns the `name RESULT` lines.
fn probe(uri: &str, script: &str) -> Vec<String> {
    nbdsh(uri, &format!("{PRELUDE}\n{script}")).lines().map(str::to_string).collect()
}

/// 64 MiB volume over two files plus a 4 MiB zero extent, and a read-only
/// volume.
const VOLUMES: &str = r#"
[[backend]]
name = "a"
path = "{dir}/a.img"
size = "64MiB"
[[backend]]
name = "b"
path = "{dir}/b.img"
size = "64MiB"

[[volume]]
name = "v"
[[volume.extent]]
length = "32MiB"
backend = "a"
backend_offset = "16MiB"
[[volume.extent]]
length = "28MiB"
backend = "b"
backend_offset = "4MiB"
[[volume.extent]]
length = "4MiB"
zero = true

[[volume]]
name = "ro"
read_only = true
[[volume.extent]]
length = "8MiB"
backend = "b"
backend_offset = "40MiB"
"#;

fn lines(expected: &[&str]) -> Vec<String> {
    expected.iter().map(|s| s.to_string()).collect()
}

#[test]
fn out_of_range_reads_and_trims_get_einval_writes_get_enospc() {
    let server = TestServer::start(VOLUMES);
    let got = probe(
        &server.uri("v"),
        r#"
size = h.get_size()
assert size == 64 << 20, size
h.set_strict_mode(0)
t("read-after-end", lambda: h.pread(4096, size))
t("read-straddling-end", lambda: h.pread(8192, size - 4096))
t("trim-after-end", lambda: h.trim(4096, size))
t("trim-straddling-end", lambda: h.trim(8192, size - 4096))
t("write-after-end", lambda: h.pwrite(b"x" * 4096, size))
t("write-straddling-end", lambda: h.pwrite(b"x" * 8192, size - 4096))
t("read-offset-overflow", lambda: h.pread(4096, (1 << 64) - 1024))
t("read-last-block", lambda: h.pread(4096, size - 4096))
t("write-last-block", lambda: h.pwrite(bytes(4096), size - 4096))
"#,
    );
    assert_eq!(
        got,
        lines(&[
            "read-after-end EINVAL",
            "read-straddling-end EINVAL",
            "trim-after-end EINVAL",
            "trim-straddling-end EINVAL",
            "write-after-end ENOSPC",
            "write-straddling-end ENOSPC",
            "read-offset-overflow EINVAL",
            "read-last-block OK",
            "write-last-block OK",
        ])
    );
}

/// proto.md, NBD_CMD_WRITE_ZEROES: "The server SHOULD return NBD_ENOSPC if
/// it receives a write zeroes request including one or more sectors beyond
/// the size of the device."
#[test]
fn write_zeroes_past_end_gets_enospc() {
    let server = TestServer::start(VOLUMES);
    let got = probe(
        &server.uri("v"),
        r#"
size = h.get_size()
h.set_strict_mode(0)
t("zero-after-end", lambda: h.zero(4096, size))
t("zero-straddling-end", lambda: h.zero(8192, size - 4096))
"#,
    );
    assert_eq!(got, lines(&["zero-after-end ENOSPC", "zero-straddling-end ENOSPC"]));
}

#[test]
fn read_only_export_answers_eperm_to_write_trim_and_zero() {
    let server = TestServer::start(VOLUMES);
    let got = probe(
        &server.uri("ro"),
        r#"
assert h.is_read_only()
t("strict-write", lambda: h.pwrite(b"x" * 4096, 0))
h.set_strict_mode(0)
t("write", lambda: h.pwrite(b"x" * 4096, 0))
t("write-fua", lambda: h.pwrite(b"x" * 4096, 0, nbd.CMD_FLAG_FUA))
t("trim", lambda: h.trim(4096, 0))
t("zero", lambda: h.zero(4096, 0))
t("zero-no-hole", lambda: h.zero(4096, 0, nbd.CMD_FLAG_NO_HOLE))
t("read", lambda: h.pread(4096, 0))
t("flush", lambda: h.flush())
"#,
    );
    assert_eq!(
        got,
        lines(&[
            "strict-write EPERM(client)",
            "write EPERM",
            "write-fua EPERM",
            "trim EPERM",
            "zero EPERM",
            "zero-no-hole EPERM",
            "read OK",
            "flush OK",
        ])
    );
    assert_eq!(read_at(&server.path("b.img"), 40 * MIB, 4096), vec![0; 4096]);
}

#[test]
fn oversized_requests_get_eoverflow_or_einval_and_the_connection_survives() {
    let server = TestServer::start_with_server("max_request = \"48MiB\"", VOLUMES);
    let got = probe(
        &server.uri("v"),
        r#"
assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 << 20
t("read-32MiB", lambda: h.pread(32 << 20, 0))
h.set_strict_mode(0)
# Served up to max_request (48 MiB here: libnbd refuses to send more
# than 64 MiB itself), although 32 MiB is advertised.
t("read-32MiB+4K", lambda: h.pread((32 << 20) + 4096, 0))
t("read-48MiB+4K", lambda: h.pread((48 << 20) + 4096, 0))
t("write-48MiB+4K", lambda: h.pwrite(b"y" * ((48 << 20) + 4096), 0))
# Payload-free commands may exceed the maximum payload.
t("trim-whole-64MiB", lambda: h.trim(64 << 20, 0))
t("zero-whole-64MiB", lambda: h.zero(64 << 20, 0))
t("zero-no-hole-40MiB", lambda: h.zero(40 << 20, 0, nbd.CMD_FLAG_NO_HOLE))
t("read-after", lambda: h.pread(4096, 0))
assert h.pread(4096, 0) == bytes(4096), "the rejected 48MiB+4K write must not have been applied"
"#,
    );
    assert_eq!(
        got,
        lines(&[
            "read-32MiB OK",
            "read-32MiB+4K OK",
            "read-48MiB+4K EOVERFLOW",
            "write-48MiB+4K EINVAL",
            "trim-whole-64MiB OK",
            "zero-whole-64MiB OK",
            "zero-no-hole-40MiB OK",
            "read-after OK",
        ])
    );
}

#[test]
fn unknown_or_misapplied_command_flags_get_einval() {
    let server = TestServer::start(VOLUMES);
    let got = probe(
        &server.uri("v"),
        r#"
h.set_strict_mode(0)
t("read-bit7", lambda: h.pread(4096, 0, 1 << 7))
t("read-bit15", lambda: h.pread(4096, 0, 1 << 15))
t("read-no-hole", lambda: h.pread(4096, 0, nbd.CMD_FLAG_NO_HOLE))
t("read-req-one", lambda: h.pread(4096, 0, nbd.CMD_FLAG_REQ_ONE))
t("write-no-hole", lambda: h.pwrite(b"z" * 4096, 0, nbd.CMD_FLAG_NO_HOLE))
t("write-fast-zero", lambda: h.pwrite(b"z" * 4096, 0, nbd.CMD_FLAG_FAST_ZERO))
t("trim-no-hole", lambda: h.trim(4096, 0, nbd.CMD_FLAG_NO_HOLE))
t("zero-df", lambda: h.zero(4096, 0, nbd.CMD_FLAG_DF))
t("zero-bit9", lambda: h.zero(4096, 0, 1 << 9))
# Flags that do apply are accepted.
t("read-df", lambda: h.pread(4096, 0, nbd.CMD_FLAG_DF))
t("write-fua", lambda: h.pwrite(b"z" * 4096, 8192, nbd.CMD_FLAG_FUA))
t("zero-all-flags", lambda: h.zero(4096, 0, nbd.CMD_FLAG_FUA | nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FAST_ZERO))
assert h.pread(4096, 0) == bytes(4096), "a rejected write was applied"
"#,
    );
    assert_eq!(
        got,
        lines(&[
            "read-bit7 EINVAL",
            "read-bit15 EINVAL",
            "read-no-hole EINVAL",
            "read-req-one EINVAL",
            "write-no-hole EINVAL",
            "write-fast-zero EINVAL",
            "trim-no-hole EINVAL",
            "zero-df EINVAL",
            "zero-bit9 EINVAL",
            "read-df OK",
            "write-fua OK",
            "zero-all-flags OK",
        ])
    );
}

/// proto.md, "Command flags": NBD_CMD_FLAG_FUA "is valid for all commands,
/// provided NBD_FLAG_SEND_FUA has been negotiated, in which case the server
/// MUST accept all commands with this bit set (even by ignoring the bit)".
#[test]
fn fua_is_accepted_on_every_command_when_send_fua_is_advertised() {
    let server = TestServer::start(VOLUMES);
    let got = probe(
        &server.uri("v"),
        r#"
assert h.can_fua()
h.set_strict_mode(0)
t("read-fua", lambda: h.pread(4096, 0, nbd.CMD_FLAG_FUA))
t("flush-fua", lambda: h.flush(nbd.CMD_FLAG_FUA))
t("cache-fua", lambda: h.cache(4096, 0, nbd.CMD_FLAG_FUA))
"#,
    );
    assert_eq!(got, lines(&["read-fua OK", "flush-fua OK", "cache-fua OK"]));
}

#[test]
fn zero_extent_refuses_nonzero_data_with_enospc() {
    let server = TestServer::start(VOLUMES);
    let got = probe(
        &server.uri("v"),
        r#"
Z = 60 << 20          # the zero extent: [60MiB, 64MiB)
t("write-data", lambda: h.pwrite(b"\x01" + bytes(4095), Z + 8192))
t("write-data-fua", lambda: h.pwrite(b"q" * 4096, Z, nbd.CMD_FLAG_FUA))
t("write-zeros", lambda: h.pwrite(bytes(65536), Z))
t("write-zeroes-cmd", lambda: h.zero(1 << 20, Z))
t("write-zeroes-no-hole", lambda: h.zero(1 << 20, Z, nbd.CMD_FLAG_NO_HOLE))
t("trim", lambda: h.trim(1 << 20, Z))
t("straddling-data", lambda: h.pwrite(b"s" * 8192, Z - 4096))
t("read", lambda: h.pread(4 << 20, Z))
assert h.pread(4 << 20, Z) == bytes(4 << 20), "zero extent does not read as zeros"
"#,
    );
    assert_eq!(
        got,
        lines(&[
            "write-data ENOSPC",
            "write-data-fua ENOSPC",
            "write-zeros OK",
            "write-zeroes-cmd OK",
            "write-zeroes-no-hole OK",
            "trim OK",
            "straddling-data ENOSPC",
            "read OK",
        ])
    );
}

#[test]
fn direct_backend_advertises_and_enforces_its_minimum_block_size() {
    let server = TestServer::start(
        r#"
[[backend]]
name = "d"
path = "{dir}/d.img"
size = "16MiB"
direct = true

[[volume]]
name = "dv"
[[volume.extent]]
length = "16MiB"
backend = "d"
"#,
    );
    let got = probe(
        &server.uri("dv"),
        r#"
assert h.get_block_size(nbd.SIZE_MINIMUM) == 4096, h.get_block_size(nbd.SIZE_MINIMUM)
h.set_strict_mode(0)
t("read-unaligned-offset", lambda: h.pread(4096, 512))
t("read-unaligned-length", lambda: h.pread(1000, 0))
t("write-unaligned", lambda: h.pwrite(b"u" * 512, 4096))
t("write-aligned", lambda: h.pwrite(b"u" * 8192, 4096))
t("read-aligned", lambda: h.pread(8192, 4096))
assert h.pread(8192, 4096) == b"u" * 8192
"#,
    );
    assert_eq!(
        got,
        lines(&[
            "read-unaligned-offset EINVAL",
            "read-unaligned-length EINVAL",
            "write-unaligned EINVAL",
            "write-aligned OK",
            "read-aligned OK",
        ])
    );
    assert_eq!(read_at(&server.path("d.img"), 4096, 8192), vec![b'u'; 8192]);
}

// ---------------------------------------------------------------------------
// Configuration errors.

/// A valid configuration; each bad case below changes one thing in it.
fn good_config(dir: &Path) -> String {
    let d = dir.display();
    format!(
        r#"[server]
listen = ["unix:{d}/nbd.sock"]
control = "{d}/control.sock"
state_dir = "{d}/state"

[[backend]]
name = "a"
path = "{d}/a.img"
size = "64MiB"

[[backend]]
name = "small"
path = "{d}/small.img"

[[volume]]
name = "v"
[[volume.extent]]
start = 0
length = "8MiB"
backend = "a"
backend_offset = "4MiB"
[[volume.extent]]
start = "8MiB"
length = "8MiB"
backend = "small"
backend_offset = "4MiB"

[[volume]]
name = "w"
[[volume.extent]]
length = "8MiB"
backend = "a"
backend_offset = "16MiB"
"#
    )
}

struct ConfigCase {
    dir: tempfile::TempDir,
    path: PathBuf,
    text: String,
}

impl ConfigCase {
    /// The good config with `from` replaced by `to` (which must occur once).
    fn new(from: &str, to: &str) -> ConfigCase {
        let dir = tempfile::tempdir().unwrap();
        // `small` is an existing 12 MiB file (no `size`).
        std::fs::File::create(dir.path().join("small.img")).unwrap().set_len(12 * MIB).unwrap();
        let good = good_config(dir.path());
        let text = if from.is_empty() {
            good
        } else {
            assert_eq!(good.matches(from).count(), 1, "test bug: {from:?} must occur once");
            good.replace(from, to)
        };
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, &text).unwrap();
        ConfigCase { dir, path, text }
    }

    /// 1-based line of the first line containing `needle` at or after line `after`.
    fn line_of(&self, needle: &str, after: usize) -> usize {
        self.text
            .lines()
            .enumerate()
            .skip(after.saturating_sub(1))
            .find(|(_, l)| l.contains(needle))
            .map(|(i, _)| i + 1)
            .unwrap_or_else(|| panic!("test bug: {needle:?} not in config"))
    }

    fn run(&self, args: &[&str]) -> (bool, String) {
        let out = run_timeout(Command::new(BIN).args(args).arg("--config").arg(&self.path).env("RUST_LOG", "off"), Duration::from_secs(30));
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    }

    /// `check [--open]` and `serve` both fail, and their stderr names the
    /// file, one of `lines`, and contains every one of `needles`.
    fn assert_rejected(&self, open: bool, lines: &[usize], needles: &[&str]) {
        let mut runs = vec![("check", if open { vec!["check", "--open"] } else { vec!["check"] })];
        runs.push(("serve", vec!["serve"]));
        for (what, args) in runs {
            let (ok, stderr) = self.run(&args);
            assert!(!ok, "`nbdvirt {}` accepted a bad config:\n{}\nstderr:\n{stderr}", args.join(" "), self.text);
            let file = self.path.display().to_string();
            let at: Vec<String> = lines.iter().map(|l| format!("{file}:{l}:")).collect();
            assert!(at.iter().any(|a| stderr.contains(a.as_str())), "{what}: stderr should name {at:?}:\n{stderr}\nconfig:\n{}", numbered(&self.text));
            for n in needles {
                assert!(stderr.contains(n), "{what}: stderr should mention {n:?}:\n{stderr}");
            }
            assert!(!self.dir.path().join("nbd.sock").exists(), "{what}: a socket was created for a bad config");
        }
    }
}

fn numbered(text: &str) -> String {
    text.lines().enumerate().map(|(i, l)| format!("{:3} {l}\n", i + 1)).collect()
}

#[test]
fn config_good_baseline_is_accepted() {
    let case = ConfigCase::new("", "");
    let (ok, stderr) = case.run(&["check"]);
    assert!(ok, "the baseline config must pass `check`: {stderr}");
    let (ok, stderr) = case.run(&["check", "--open"]);
    assert!(ok, "the baseline config must pass `check --open`: {stderr}");
}

#[test]
fn config_toml_syntax_error_names_file_and_line() {
    let case = ConfigCase::new("size = \"64MiB\"", "size = \"64MiB");
    let line = case.line_of("size = \"64MiB", 1);
    case.assert_rejected(false, &[line], &[]);
    let (_, stderr) = case.run(&["check"]);
    let msg = stderr.split(&format!(":{line}:")).nth(1).unwrap_or("");
    assert!(msg.trim().len() > 5, "the syntax error needs a message: {stderr}");
}

#[test]
fn config_unknown_field_is_named() {
    let case = ConfigCase::new("name = \"w\"\n", "name = \"w\"\ncolour = \"blue\"\n");
    let line = case.line_of("colour", 1);
    case.assert_rejected(false, &[line], &["unknown field", "colour"]);
}

#[test]
fn config_extent_gap_is_named() {
    let case = ConfigCase::new("start = \"8MiB\"", "start = \"12MiB\"");
    // The line of the offending key, not the `[[volume.extent]]` header.
    let field = case.line_of("start = \"12MiB\"", 1);
    case.assert_rejected(false, &[field], &["volume 'v' extent 1", "start", "gap"]);
}

#[test]
fn config_misaligned_backend_offset_is_named() {
    let case = ConfigCase::new("backend_offset = \"16MiB\"", "backend_offset = 16777728");
    let field = case.line_of("backend_offset = 16777728", 1);
    case.assert_rejected(false, &[field], &["volume 'w' extent 0", "backend_offset", "16777728", "4096"]);
}

#[test]
fn config_unknown_backend_is_named() {
    let case = ConfigCase::new("backend = \"small\"", "backend = \"nope\"");
    let line = case.line_of("backend = \"nope\"", 1);
    case.assert_rejected(false, &[line], &["volume 'v' extent 1", "backend", "'nope'"]);
}

#[test]
fn config_two_volumes_mapping_one_range_need_shared() {
    let case = ConfigCase::new("backend_offset = \"16MiB\"", "backend_offset = \"8MiB\"");
    let volume_w = case.line_of("name = \"w\"", 1);
    let field = case.line_of("backend_offset = \"8MiB\"", volume_w);
    case.assert_rejected(false, &[field], &["volume 'v' extent 0", "volume 'w' extent 0", "shared = true"]);
    // The same layout is accepted once the backend is declared shared.
    let shared = ConfigCase::new("size = \"64MiB\"", "size = \"64MiB\"\nshared = true");
    std::fs::write(&shared.path, shared.text.replace("backend_offset = \"16MiB\"", "backend_offset = \"8MiB\"")).unwrap();
    let (ok, stderr) = shared.run(&["check"]);
    assert!(ok, "shared = true must allow the overlap: {stderr}");
}

#[test]
fn config_extent_past_end_of_backend_file_is_named_by_check_open() {
    // small.img is 12 MiB; map [8MiB, 16MiB) of it.
    let case = ConfigCase::new("backend = \"small\"\nbackend_offset = \"4MiB\"", "backend = \"small\"\nbackend_offset = \"8MiB\"");
    // Without --open the file is not looked at.
    let (ok, stderr) = case.run(&["check"]);
    assert!(ok, "plain check does not open backends: {stderr}");
    let field = case.line_of("backend_offset = \"8MiB\"", 1);
    case.assert_rejected(true, &[field], &["volume 'v' extent 1: backend_offset", "past the end", "'small'", "12582912"]);
}
