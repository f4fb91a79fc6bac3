//! A loop block device as a backend (needs root: these tests FAIL, they are
//! not skipped, when they cannot set up a loop device).
mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const MIB: u64 = 1 << 20;

/// A loop device over a file, detached on drop.
struct Loop {
    dev: String,
    file: PathBuf,
    _dir: tempfile::TempDir,
}

impl Loop {
    /// Creates a sparse `size`-byte file, lets `prepare` write into it, and
    /// attaches it with `losetup --find --show`.
    fn new(size: u64, prepare: impl FnOnce(&std::fs::File)) -> Loop {
        require("losetup", "mount");
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(euid, 0, "the blockdev tests need root to attach a loop device (running as uid {euid}); run them as root");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("loop.img");
        let f = std::fs::File::create(&file).unwrap();
        f.set_len(size).unwrap();
        prepare(&f);
        f.sync_all().unwrap();
        drop(f);
        let out = run_timeout(Command::new("losetup").args(["--find", "--show"]).arg(&file), Duration::from_secs(30));
        assert!(
            out.status.success(),
            "losetup --find --show {} failed ({}): {}",
            file.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        Loop { dev, file, _dir: dir }
    }

    fn path(&self) -> &Path {
        &self.file
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = run_timeout(Command::new("losetup").args(["-d", &self.dev]), Duration::from_secs(30));
    }
}

fn block_config(dev: &str) -> String {
    r#"
[[backend]]
name = "blk"
path = "@DEV@"

[[volume]]
name = "bd"
description = "loop device"
[[volume.extent]]
length = "64MiB"
backend = "blk"
"#
    .replace("@DEV@", dev)
}

const PRELUDE: &str = r#"
def t(name, f):
    try:
        f()
        print(name, "OK")
    except nbd.Error as e:
        print(name, e.errno if "command failed" in (e.string or "") else "%s(client)" % e.errno)
"#;

#[test]
fn loop_device_backend_has_the_device_size_and_writes_land_in_the_file() {
    use std::os::unix::fs::FileExt;
    let lo = Loop::new(64 * MIB, |f| f.write_all_at(&[0x99; 4096], MIB).unwrap());
    let server = TestServer::start(&block_config(&lo.dev));
    let uri = server.uri("bd");
    require("nbdinfo", "libnbd-bin");
    let info: serde_json::Value = serde_json::from_str(&run_ok(Command::new("nbdinfo").arg("--json").arg(&uri))).unwrap();
    assert_eq!(info["exports"][0]["export-size"], 64 * MIB, "{info}");
    assert_eq!(info["exports"][0]["can_zero"], true, "{info}");
    require("qemu-io", "qemu-utils");
    run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "read -P 0x99 1M 4K",
        "-c",
        "write -P 0x5c 8M 1M",
        "-c",
        &format!("write -P 0x5d {} 4K", 64 * MIB - 4096),
        "-c",
        "flush",
        &uri,
    ]));
    assert_eq!(read_at(lo.path(), 8 * MIB, MIB as usize), vec![0x5c; MIB as usize], "write through /dev/loop must land in its file");
    assert_eq!(read_at(lo.path(), 64 * MIB - 4096, 4096), vec![0x5d; 4096]);
    assert_eq!(read_at(lo.path(), 9 * MIB, 4096), vec![0; 4096]);
}

#[test]
fn loop_device_trim_and_write_zeroes_read_back_zeros_and_fast_zero_with_no_hole_is_enotsup() {
    let lo = Loop::new(64 * MIB, |_| {});
    let server = TestServer::start(&block_config(&lo.dev));
    let script = r#"
MB = 1 << 20
fill = b"\x5a" * (8 * MB)
h.pwrite(fill, 0)
h.flush()
t("trim", lambda: h.trim(MB, 1 * MB))
t("zero", lambda: h.zero(MB, 2 * MB))
t("zero-no-hole", lambda: h.zero(MB, 3 * MB, nbd.CMD_FLAG_NO_HOLE))
t("fast-zero", lambda: h.zero(MB, 4 * MB, nbd.CMD_FLAG_FAST_ZERO))
t("fast-zero-no-hole", lambda: h.zero(MB, 5 * MB, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FAST_ZERO))
t("zero-unaligned", lambda: h.zero(5000, 6 * MB + 100, nbd.CMD_FLAG_NO_HOLE))
h.flush()
for name, off in (("trim", 1), ("zero", 2), ("zero-no-hole", 3), ("fast-zero", 4)):
    print(name, "reads", "zeros" if h.pread(MB, off * MB) == bytes(MB) else "DATA")
# A failed fast zero leaves the contents alone.
print("fast-zero-no-hole reads", "fill" if h.pread(MB, 5 * MB) == b"\x5a" * MB else "CHANGED")
print("unaligned", h.pread(5200, 6 * MB) == b"\x5a" * 100 + bytes(5000) + b"\x5a" * 100)
print("untouched", h.pread(MB, 0) == b"\x5a" * MB and h.pread(MB, 7 * MB) == b"\x5a" * MB)
"#;
    let out = nbdsh(&server.uri("bd"), &format!("{PRELUDE}\n{script}"));
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        vec![
            "trim OK",
            "zero OK",
            "zero-no-hole OK",
            "fast-zero OK",
            "fast-zero-no-hole ENOTSUP",
            "zero-unaligned OK",
            "trim reads zeros",
            "zero reads zeros",
            "zero-no-hole reads zeros",
            "fast-zero reads zeros",
            "fast-zero-no-hole reads fill",
            "unaligned True",
            "untouched True",
        ]
    );
    // The loop device's file agrees (the server flushed).
    for (off, byte) in [(0, 0x5a), (MIB, 0), (2 * MIB, 0), (3 * MIB, 0), (4 * MIB, 0), (5 * MIB, 0x5a), (7 * MIB, 0x5a)] {
        assert!(read_at(lo.path(), off, MIB as usize).iter().all(|b| *b == byte), "loop file at {off} should be all {byte:#x}");
    }
}

/// proto.md: with NBD_CMD_FLAG_FAST_ZERO the server "SHOULD NOT alter the
/// contents of the export when returning an NBD_ENOTSUP failure". A request
/// spanning a file extent (which can zero fast) and a block-device extent
/// (which cannot, with NO_HOLE) must fail without zeroing the file part.
#[test]
fn failed_fast_zero_across_file_and_block_device_extents_changes_nothing() {
    let lo = Loop::new(16 * MIB, |_| {});
    let server = TestServer::start(
        &r#"
[[backend]]
name = "f"
path = "{dir}/f.img"
size = "16MiB"
[[backend]]
name = "blk"
path = "@DEV@"

[[volume]]
name = "mixed"
[[volume.extent]]
length = "8MiB"
backend = "f"
backend_offset = "4MiB"
[[volume.extent]]
length = "8MiB"
backend = "blk"
backend_offset = "4MiB"
"#
        .replace("@DEV@", &lo.dev),
    );
    let script = r#"
MB = 1 << 20
h.pwrite(b"\x6b" * (16 * MB), 0)
h.flush()
t("fast-zero-no-hole-across", lambda: h.zero(2 * MB, 7 * MB, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FAST_ZERO))
print("file part", "kept" if h.pread(MB, 7 * MB) == b"\x6b" * MB else "ZEROED")
print("device part", "kept" if h.pread(MB, 8 * MB) == b"\x6b" * MB else "ZEROED")
"#;
    let out = nbdsh(&server.uri("mixed"), &format!("{PRELUDE}\n{script}"));
    assert_eq!(out.lines().collect::<Vec<_>>(), vec!["fast-zero-no-hole-across ENOTSUP", "file part kept", "device part kept"]);
    assert_eq!(read_at(&server.path("f.img"), 4 * MIB + 7 * MIB, 4096), vec![0x6b; 4096]);
}
