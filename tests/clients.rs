//! Real NBD clients (qemu-io, qemu-img, nbdcopy, nbdinfo, nbdsh, fio)
//! against the real `nbdvirt` binary: data lands where the mapping says,
//! whole-volume copies round-trip, export metadata is reported correctly.
mod common;
use common::*;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const MIB: u64 = 1 << 20;

/// `nbdsh --base-allocation -u URI -c SCRIPT` (the implicit handle `h` has
/// the base:allocation context negotiated); returns stdout.
fn nbdsh_ba(uri: &str, script: &str) -> String {
    require("nbdsh", "python3-libnbd");
    run_ok(Command::new("nbdsh").env("PATH", debian_path()).args(["--base-allocation", "-u", uri, "-c", script]))
}

fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    require("qemu-io", "qemu-utils");
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    cmd.arg(uri);
    run_ok(&mut cmd)
}

fn nbdinfo_json(args: &[&str], uri: &str) -> serde_json::Value {
    require("nbdinfo", "libnbd-bin");
    let out = run_ok(Command::new("nbdinfo").arg("--json").args(args).arg(uri));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("nbdinfo --json output is not JSON ({e}):\n{out}"))
}

/// The one export of `nbdinfo --json URI`.
fn export_info(uri: &str) -> serde_json::Value {
    let v = nbdinfo_json(&[], uri);
    let exports = v["exports"].as_array().unwrap_or_else(|| panic!("no exports array: {v}"));
    assert_eq!(exports.len(), 1, "{v}");
    exports[0].clone()
}

/// `nbdinfo --map --json`, adjacent runs of the same type merged, as
/// (offset, length, description).
fn map(uri: &str) -> Vec<(u64, u64, String)> {
    let v = nbdinfo_json(&["--map"], uri);
    let mut out: Vec<(u64, u64, String)> = Vec::new();
    for e in v.as_array().unwrap_or_else(|| panic!("map is not an array: {v}")) {
        let (off, len, desc) = (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap(), e["description"].as_str().unwrap().to_string());
        match out.last_mut() {
            Some(last) if last.2 == desc && last.0 + last.1 == off => last.1 += len,
            _ => {
                if let Some(last) = out.last() {
                    assert_eq!(last.0 + last.1, off, "map has a gap or overlap: {v}");
                }
                out.push((off, len, desc))
            }
        }
    }
    out
}

fn write_file(path: &Path, data: &[u8]) {
    std::fs::write(path, data).unwrap();
}

/// Two 64 MiB backend files and volume `cat` = a[16M..48M) ++ b[8M..40M).
const CONCAT: &str = r#"
[[backend]]
name = "a"
path = "{dir}/a.img"
size = "64MiB"

[[backend]]
name = "b"
path = "{dir}/b.img"
size = "64MiB"

[[volume]]
name = "cat"
description = "a[16M..48M) then b[8M..40M)"
[[volume.extent]]
start = 0
length = "32MiB"
backend = "a"
backend_offset = "16MiB"
[[volume.extent]]
length = "32MiB"
backend = "b"
backend_offset = "8MiB"
"#;

/// Where volume offset `v` of `cat` lives: (file, offset in file).
fn cat_location(v: u64) -> (&'static str, u64) {
    if v < 32 * MIB {
        ("a.img", 16 * MIB + v)
    } else {
        ("b.img", 8 * MIB + (v - 32 * MIB))
    }
}

#[test]
fn qemu_io_writes_across_the_extent_boundary_land_at_mapped_backend_offsets() {
    let server = TestServer::start(CONCAT);
    let uri = server.uri("cat");
    let boundary = 32 * MIB;
    let pat = pattern(7, 3000);
    write_file(&server.path("pat.bin"), &pat);
    let first = format!("write -P 0xab {} 16384", boundary - 8192);
    let second = format!("write -s {} {} 3000", server.path("pat.bin").display(), boundary - 1000);
    let head = "write -P 0x11 0 4096".to_string();
    let tail = format!("write -P 0x22 {} 4096", 64 * MIB - 4096);
    qemu_io(&uri, &[&first, &second, &head, &tail, "flush"]);

    // What the volume now holds around the boundary.
    let mut expect = vec![0xabu8; 16384];
    expect[8192 - 1000..8192 + 2000].copy_from_slice(&pat);
    let (a, b) = (server.path("a.img"), server.path("b.img"));
    // Backend a, 48M-8K..48M: the part before the boundary.
    assert_eq!(read_at(&a, 48 * MIB - 8192, 8192), expect[..8192], "a.img at 48MiB-8KiB");
    // Backend b, 8M..8M+8K: the part after the boundary.
    assert_eq!(read_at(&b, 8 * MIB, 8192), expect[8192..], "b.img at 8MiB");
    // First and last block of the volume.
    assert_eq!(read_at(&a, 16 * MIB, 4096), vec![0x11; 4096], "volume offset 0 must be a.img offset 16MiB");
    assert_eq!(read_at(&b, 40 * MIB - 4096, 4096), vec![0x22; 4096], "volume end must be b.img offset 40MiB");
    // Nothing outside the mapped ranges was touched.
    for (file, off) in [(&a, 16 * MIB - 4096), (&a, 48 * MIB), (&b, 8 * MIB - 4096), (&b, 40 * MIB), (&a, 0), (&b, 0)] {
        assert_eq!(read_at(file, off, 4096), vec![0; 4096], "{} at {off} must be untouched", file.display());
    }
    // And the volume reads back what was written, across the boundary.
    let out = server.path("readback.bin");
    nbdsh(&uri, &format!("open({:?}, 'wb').write(h.pread(16384, {}))", out.display().to_string(), boundary - 8192));
    assert_eq!(std::fs::read(&out).unwrap(), expect);
    qemu_io(&uri, &["read -P 0x11 0 4096", &format!("read -P 0x22 {} 4096", 64 * MIB - 4096)]);
}

/// 64 MiB: 1 MiB chunks alternating pseudo-random data, an unwritten hole,
/// and written zeros.
fn sparse_source(path: &Path) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(64 * MIB).unwrap();
    let mut all = vec![0u8; (64 * MIB) as usize];
    for i in 0..64u64 {
        let range = (i * MIB) as usize..((i + 1) * MIB) as usize;
        match i % 3 {
            0 => {
                let data = pattern(100 + i, MIB as usize);
                f.write_all_at(&data, i * MIB).unwrap();
                all[range].copy_from_slice(&data);
            }
            1 => {} // hole
            _ => f.write_all_at(&vec![0u8; MIB as usize], i * MIB).unwrap(),
        }
    }
    all
}

#[test]
fn nbdcopy_round_trips_the_whole_volume() {
    require("nbdcopy", "libnbd-bin");
    let server = TestServer::start(CONCAT);
    let uri = server.uri("cat");
    // Fill the volume with garbage first, so holes of the source must be
    // actively zeroed on the volume.
    qemu_io(&uri, &["write -P 0xff 0 32M", "write -P 0xee 32M 32M"]);
    let src = server.path("src.img");
    let data = sparse_source(&src);
    run_ok(Command::new("nbdcopy").arg(&src).arg(&uri));
    let out = server.path("out.img");
    std::fs::File::create(&out).unwrap();
    run_ok(Command::new("nbdcopy").arg(&uri).arg(&out));
    let copied = std::fs::read(&out).unwrap();
    assert_eq!(copied.len(), data.len(), "copied size");
    if let Some(i) = copied.iter().zip(&data).position(|(x, y)| x != y) {
        panic!("file -> volume -> file differs first at offset {i}");
    }
    // The backend files hold the two halves at their mapped offsets.
    assert!(read_at(&server.path("a.img"), 16 * MIB, (32 * MIB) as usize) == data[..(32 * MIB) as usize], "a.img[16M..48M) != source[0..32M)");
    assert!(read_at(&server.path("b.img"), 8 * MIB, (32 * MIB) as usize) == data[(32 * MIB) as usize..], "b.img[8M..40M) != source[32M..64M)");
}

#[test]
fn qemu_img_convert_and_compare() {
    require("qemu-img", "qemu-utils");
    let server = TestServer::start(CONCAT);
    let uri = server.uri("cat");
    let src = server.path("src.img");
    sparse_source(&src);
    run_ok(Command::new("qemu-img").args(["convert", "-n", "-f", "raw", "-O", "raw"]).arg(&src).arg(&uri));
    run_ok(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&src).arg(&uri));
    // Back out to a new file.
    let out = server.path("out.img");
    run_ok(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "raw"]).arg(&uri).arg(&out));
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&src).unwrap(), "qemu-img convert volume -> file differs from source");
    // compare must notice a one-byte change made through the server, in the
    // second extent.
    let off = 32 * MIB + 123_457;
    qemu_io(&uri, &[&format!("write -P 0x01 {off} 1")]);
    let res = run_timeout(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&src).arg(&uri), Duration::from_secs(120));
    let stdout = String::from_utf8_lossy(&res.stdout);
    assert_eq!(res.status.code(), Some(1), "qemu-img compare should report a mismatch: {stdout}{}", String::from_utf8_lossy(&res.stderr));
    // qemu-img reports the 512-byte sector holding the first difference.
    let sector = off / 512 * 512;
    assert!(stdout.contains(&format!("offset {sector}!")), "mismatch should be in the sector at {sector}: {stdout}");
}

#[test]
fn nbdinfo_json_reports_size_flags_block_sizes_and_description() {
    let server = TestServer::start(
        r#"
[[backend]]
name = "a"
path = "{dir}/a.img"
size = "64MiB"
[[backend]]
name = "b"
path = "{dir}/b.img"
size = "64MiB"

[[volume]]
name = "info"
description = "Info volume: 24 MiB of a, 16 MiB of b"
block_size = 8192
[[volume.extent]]
length = "24MiB"
backend = "a"
backend_offset = "8MiB"
[[volume.extent]]
length = "16MiB"
backend = "b"
backend_offset = "40MiB"
"#,
    );
    let e = export_info(&server.uri("info"));
    assert_eq!(e["export-name"], "info", "{e}");
    assert_eq!(e["export-size"], 40 * MIB, "{e}");
    assert_eq!(e["description"], "Info volume: 24 MiB of a, 16 MiB of b", "{e}");
    for flag in ["can_multi_conn", "can_trim", "can_zero", "can_fast_zero", "can_df", "can_flush", "can_fua", "can_cache"] {
        assert_eq!(e[flag], true, "{flag}: {e}");
    }
    assert_eq!(e["is_read_only"], false, "{e}");
    assert_eq!(e["block_size_minimum"], 1, "{e}");
    assert_eq!(e["block_size_preferred"], 8192, "{e}");
    assert_eq!(e["block_size_maximum"], 32 * MIB, "{e}");
    let contexts: Vec<&str> = e["contexts"].as_array().map(|a| a.iter().filter_map(|c| c.as_str()).collect()).unwrap_or_default();
    assert!(contexts.contains(&"base:allocation"), "{e}");
}

#[test]
fn nbdinfo_list_shows_every_export_with_its_description() {
    let server = TestServer::start(
        r#"
[[backend]]
name = "m"
memory = true
size = "16MiB"

[[volume]]
name = "first"
description = "The first volume"
[[volume.extent]]
length = "4MiB"
backend = "m"
[[volume]]
name = "second.vol-2"
description = "Second, with punctuation: it's fine"
[[volume.extent]]
length = "8MiB"
backend = "m"
backend_offset = "4MiB"
[[volume]]
name = "bare"
[[volume.extent]]
length = "2MiB"
backend = "m"
backend_offset = "12MiB"
"#,
    );
    let v = nbdinfo_json(&["--list"], &server.uri(""));
    let exports = v["exports"].as_array().unwrap_or_else(|| panic!("{v}"));
    let mut seen: Vec<(String, String, u64)> = exports
        .iter()
        .map(|e| {
            (
                e["export-name"].as_str().unwrap().to_string(),
                e["description"].as_str().unwrap_or("").to_string(),
                e["export-size"].as_u64().unwrap(),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        vec![
            ("bare".to_string(), String::new(), 2 * MIB),
            ("first".to_string(), "The first volume".to_string(), 4 * MIB),
            ("second.vol-2".to_string(), "Second, with punctuation: it's fine".to_string(), 8 * MIB),
        ],
        "{v}"
    );
    // The human-readable listing shows the descriptions too.
    let text = run_ok(Command::new("nbdinfo").arg("--list").arg(server.uri("")));
    for needle in ["export=\"first\"", "description: The first volume", "export=\"second.vol-2\"", "export=\"bare\""] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
}

#[test]
fn nbdinfo_map_shows_data_holes_and_zero_extents() {
    let server = TestServer::start(
        r#"
[[backend]]
name = "a"
path = "{dir}/a.img"
size = "64MiB"
[[backend]]
name = "b"
path = "{dir}/b.img"
size = "64MiB"

[[volume]]
name = "m"
[[volume.extent]]
length = "16MiB"
backend = "a"
backend_offset = "16MiB"
[[volume.extent]]
length = "16MiB"
backend = "b"
backend_offset = "8MiB"
[[volume.extent]]
length = "4MiB"
zero = true
[[volume.extent]]
length = "8MiB"
backend = "a"
backend_offset = "40MiB"
"#,
    );
    let uri = server.uri("m");
    let hz = "hole,zero".to_string();
    let data = "data".to_string();
    // Fresh sparse files: everything is a hole.
    assert_eq!(map(&uri), vec![(0, 44 * MIB, hz.clone())]);
    // Data outside the mapped ranges of the files must not show up.
    std::fs::OpenOptions::new().write(true).open(server.path("a.img")).map(|f| {
        use std::os::unix::fs::FileExt;
        f.write_all_at(&[1u8; 4096], 0).unwrap();
        f.write_all_at(&[1u8; 4096], 32 * MIB).unwrap();
    })
    .unwrap();
    qemu_io(
        &uri,
        &[
            "write -P 0x01 1M 1M",
            "write -P 0x02 6M 2M",
            "discard 6M 1M",
            "write -P 0x03 20M 4K",
            // Crossing from b into the zero extent with zeros is fine.
            "write -z -u 31M 2M",
            "write -P 0x04 43M 1M",
            "discard 43M 512K",
            "flush",
        ],
    );
    let got = map(&uri);
    // 31M..32M was zeroed by WRITE_ZEROES (punched: still a hole).
    let expect = vec![
        (0, MIB, hz.clone()),
        (MIB, MIB, data.clone()),
        (2 * MIB, 5 * MIB, hz.clone()),
        (7 * MIB, MIB, data.clone()),
        (8 * MIB, 12 * MIB, hz.clone()),
        (20 * MIB, 4096, data.clone()),
        (20 * MIB + 4096, 23 * MIB - 4096 + MIB / 2, hz.clone()),
        (43 * MIB + MIB / 2, MIB / 2, data.clone()),
    ];
    assert_eq!(got, expect, "nbdinfo --map after writes and trims");
    // Cross-check the data through a read: trimmed ranges read as zeros.
    qemu_io(&uri, &["read -P 0 6M 1M", "read -P 0x02 7M 1M", "read -P 0 32M 4M", &format!("read -P 0 {} 512K", 43 * MIB), &format!("read -P 0x04 {} 512K", 43 * MIB + MIB / 2)]);
}

#[test]
fn nbdsh_trim_and_write_zeroes_read_back_zeros_and_show_holes() {
    let server = TestServer::start(
        r#"
[[backend]]
name = "a"
path = "{dir}/a.img"
size = "64MiB"
[[backend]]
name = "b"
path = "{dir}/b.img"
size = "64MiB"

[[volume]]
name = "z"
[[volume.extent]]
length = "16MiB"
backend = "a"
backend_offset = "4MiB"
[[volume.extent]]
length = "16MiB"
backend = "b"
backend_offset = "0"
"#,
    );
    let a = server.path("a.img").display().to_string();
    let b = server.path("b.img").display().to_string();
    let script = r#"
import os
MB = 1 << 20
A, B = "@A@", "@B@"
def blocks(p):
    return os.stat(p).st_blocks * 512
# Allocation counts include filesystem metadata (ext4 may add or drop an
# extent-tree block when a range is punched or converted), hence the slack.
SLACK = 64 * 1024

def status(off, length):
    # Full base:allocation map of [off, off+length), as (length, flags).
    out, pos, end = [], off, off + length
    while pos < end:
        got = []
        def cb(meta, o, entries, err):
            if meta == "base:allocation":
                got.extend(zip(entries[0::2], entries[1::2]))
            return 0
        h.block_status(end - pos, pos, cb)
        assert got, "no base:allocation extents at %d" % pos
        for l, f in got:
            l = min(l, end - pos)
            out.append((l, f))
            pos += l
            if pos >= end:
                break
    return out

def is_hole(off, length):
    return all(f & nbd.STATE_HOLE and f & nbd.STATE_ZERO for l, f in status(off, length))

def is_data(off, length):
    return all(f == 0 for l, f in status(off, length))

def zeros(off, length):
    return h.pread(length, off) == bytes(length)

fill = b"\x5a" * (4 * MB)
for off in range(0, 32 * MB, 4 * MB):
    h.pwrite(fill, off)
h.flush()
assert is_data(0, 32 * MB), status(0, 32 * MB)

# TRIM: zeros, a hole, space given back.
before = blocks(A)
h.trim(MB, 2 * MB)
assert zeros(2 * MB, MB)
assert is_hole(2 * MB, MB), status(2 * MB, MB)
assert blocks(A) <= before - MB + SLACK, ("trim did not free space", before, blocks(A))

# WRITE_ZEROES that may punch: zeros and a hole.
before = blocks(A)
h.zero(MB, 6 * MB)
assert zeros(6 * MB, MB)
assert is_hole(6 * MB, MB), status(6 * MB, MB)
assert blocks(A) <= before - MB + SLACK, ("write zeroes without NO_HOLE did not punch", before, blocks(A))

# WRITE_ZEROES with NO_HOLE: zeros, space stays provisioned.
before = blocks(A)
h.zero(MB, 10 * MB, nbd.CMD_FLAG_NO_HOLE)
assert zeros(10 * MB, MB)
assert blocks(A) >= before - SLACK, ("NO_HOLE write zeroes deallocated", before, blocks(A))

# FAST_ZERO on a file store succeeds (fallocate is fast).
h.zero(MB, 12 * MB, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FAST_ZERO)
assert zeros(12 * MB, MB)

# Across the extent boundary, with FUA.
h.trim(MB, 16 * MB - MB // 2, nbd.CMD_FLAG_FUA)
assert zeros(16 * MB - MB // 2, MB)
assert is_hole(16 * MB - MB // 2, MB), status(16 * MB - MB // 2, MB)
h.zero(2 * MB, 24 * MB - MB, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
assert zeros(24 * MB - MB, 2 * MB)

# Unaligned zeroing keeps the neighbouring bytes.
h.zero(5000, 20 * MB + 100)
got = h.pread(5200, 20 * MB)
assert got == b"\x5a" * 100 + bytes(5000) + b"\x5a" * 100, "unaligned zero clobbered neighbours"

# Untouched regions still hold the fill.
for off in (0, 3 * MB, 5 * MB, 7 * MB, 9 * MB, 11 * MB, 13 * MB, 17 * MB, 22 * MB, 26 * MB, 32 * MB - 4096):
    assert h.pread(4096, off) == b"\x5a" * 4096, "data at %d lost" % off
    assert is_data(off, 4096), (off, status(off, 4096))
h.flush()
print("ok")
"#
    .replace("@A@", &a)
    .replace("@B@", &b);
    let out = nbdsh_ba(&server.uri("z"), &script);
    assert_eq!(out.trim(), "ok");
    // The backend files agree, at the mapped offsets.
    let (a, b) = (server.path("a.img"), server.path("b.img"));
    for (file, off, len, byte) in [
        (&a, 4 * MIB + 2 * MIB, MIB, 0u8),
        (&a, 4 * MIB + 6 * MIB, MIB, 0),
        (&a, 4 * MIB + 10 * MIB, MIB, 0),
        (&a, 4 * MIB + 16 * MIB - MIB / 2, MIB / 2, 0),
        (&b, 0, MIB / 2, 0),
        (&b, 8 * MIB - MIB, 2 * MIB, 0),
        (&a, 4 * MIB + 3 * MIB, MIB, 0x5a),
        (&b, MIB, MIB, 0x5a),
        (&a, 0, 4 * MIB, 0),
    ] {
        assert!(read_at(file, off, len as usize).iter().all(|x| *x == byte), "{} at {off}+{len} should be all {byte:#x}", file.display());
    }
}

/// Three extents over two files; fio job offsets cross both boundaries.
const FIO_VOLUME: &str = r#"
[[backend]]
name = "a"
path = "{dir}/a.img"
size = "64MiB"
[[backend]]
name = "b"
path = "{dir}/b.img"
size = "64MiB"

[[volume]]
name = "f"
[[volume.extent]]
length = "16MiB"
backend = "a"
backend_offset = "4MiB"
[[volume.extent]]
length = "12MiB"
backend = "b"
backend_offset = "0"
[[volume.extent]]
length = "8MiB"
backend = "a"
backend_offset = "24MiB"
"#;

/// Runs the fio job in `dir` (fio leaves `*-verify.state` files in its
/// working directory; keep them out of the repository).
fn fio(dir: &Path, uri: &str, extra: &[&str]) -> serde_json::Value {
    require("fio", "fio");
    let mut cmd = Command::new("fio");
    cmd.current_dir(dir).args([
        "--name=nbdvirt",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randwrite",
        "--bs=12k",
        "--size=18M",
        "--numjobs=2",
        "--offset_increment=18M",
        "--iodepth=8",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--output-format=json",
    ])
    .args(extra);
    let out = run_timeout(&mut cmd, Duration::from_secs(120));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "fio failed ({}):\n{stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("fio: connected to NBD server"), "fio did not connect:\n{stdout}");
    let start = stdout.find("\n{").map(|i| i + 1).or_else(|| stdout.starts_with('{').then_some(0)).unwrap_or_else(|| panic!("no JSON in fio output:\n{stdout}"));
    serde_json::from_str(&stdout[start..]).unwrap_or_else(|e| panic!("fio JSON ({e}):\n{stdout}"))
}

#[test]
fn fio_randwrite_with_crc32c_verify_across_two_backends() {
    let mut server = TestServer::start(FIO_VOLUME);
    let uri = server.uri("f");
    let v = fio(server.dir.path(), &uri, &[]);
    let jobs = v["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 2, "{v}");
    for job in jobs {
        assert_eq!(job["error"], 0, "fio job error: {job}");
        assert_eq!(job["write"]["io_bytes"], 18 * MIB, "each job writes its 18 MiB: {job}");
        // The verify phase read everything back.
        assert_eq!(job["read"]["io_bytes"], 18 * MIB, "each job verifies its 18 MiB: {job}");
        assert_eq!(job["total_err"].as_u64().unwrap_or(0), 0, "{job}");
    }
    // The data is in the backend files: a restarted server still verifies.
    assert!(server.stop().success(), "clean stop:\n{}", server.log());
    server.spawn();
    let v = fio(server.dir.path(), &uri, &["--verify_only"]);
    for job in v["jobs"].as_array().unwrap() {
        assert_eq!(job["error"], 0, "fio verify_only error: {job}");
        assert_eq!(job["read"]["io_bytes"], 18 * MIB, "{job}");
    }
    // Every part of every extent was written (random data, not zeros).
    for (file, off, len) in [("a.img", 4 * MIB, 16 * MIB), ("b.img", 0, 12 * MIB), ("a.img", 24 * MIB, 8 * MIB)] {
        let data = read_at(&server.path(file), off, len as usize);
        let zero_blocks = data.chunks(12288).filter(|c| c.iter().all(|b| *b == 0)).count();
        assert_eq!(zero_blocks, 0, "{file} at {off}+{len} has unwritten blocks");
    }
}

#[test]
fn multi_conn_flush_makes_writes_visible_on_another_connection() {
    let server = TestServer::start(CONCAT);
    let uri = server.uri("cat");
    let script = r#"
import os
MB = 1 << 20
assert h.can_multi_conn()
h2 = nbd.NBD()
h2.connect_uri(URI)
assert h2.can_multi_conn()
# Read on h2 first so any cache would be stale.
assert h2.pread(MB, 32 * MB - MB // 2) == bytes(MB)
d1 = os.urandom(MB)
h.pwrite(d1, 32 * MB - MB // 2)
h.flush()
assert h2.pread(MB, 32 * MB - MB // 2) == d1, "h2 does not see h's flushed write"
# FUA instead of flush, the other way round.
d2 = os.urandom(64 * 1024)
h2.pwrite(d2, 5 * MB + 4096, nbd.CMD_FLAG_FUA)
assert h.pread(64 * 1024, 5 * MB + 4096) == d2, "h does not see h2's FUA write"
# Zeroing and trimming are visible too.
h.zero(MB, 32 * MB - MB // 2)
h.flush()
assert h2.pread(MB, 32 * MB - MB // 2) == bytes(MB)
# Many writes in flight on both handles, then flush both and cross-read.
cookies = []
for i in range(64):
    cookies.append((h if i % 2 else h2).aio_pwrite(bytes([i + 1]) * 65536, 40 * MB + i * 65536))
for c in cookies[0::2]:
    while not h2.aio_command_completed(c):
        h2.poll(-1)
for c in cookies[1::2]:
    while not h.aio_command_completed(c):
        h.poll(-1)
h.flush()
h2.flush()
for i in range(64):
    other = h2 if i % 2 else h
    assert other.pread(65536, 40 * MB + i * 65536) == bytes([i + 1]) * 65536, i
h2.shutdown()
print("ok")
"#
    .replace("URI", &format!("{uri:?}"));
    assert_eq!(nbdsh(&uri, &script).trim(), "ok");
    // And the backends agree.
    let (file, off) = cat_location(40 * MIB + 63 * 65536);
    assert_eq!(read_at(&server.path(file), off, 65536), vec![64u8; 65536]);
}

#[test]
fn read_only_volume_is_reported_and_refuses_writes() {
    let server = TestServer::start(
        r#"
[[backend]]
name = "ro"
path = "{dir}/ro.img"
size = "16MiB"
read_only = false

[[volume]]
name = "rov"
read_only = true
description = "read-only view"
[[volume.extent]]
length = "8MiB"
backend = "ro"
backend_offset = "8MiB"
"#,
    );
    let uri = server.uri("rov");
    let e = export_info(&uri);
    assert_eq!(e["is_read_only"], true, "{e}");
    for flag in ["can_trim", "can_zero", "can_fast_zero", "can_fua"] {
        assert_eq!(e[flag], false, "{flag} on a read-only export: {e}");
    }
    assert_eq!(e["description"], "read-only view", "{e}");
    // qemu-io cannot open it for writing.
    require("qemu-io", "qemu-utils");
    let res = run_timeout(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 1 0 4096", &uri]), Duration::from_secs(60));
    assert!(!res.status.success(), "qemu-io write to a read-only export succeeded");
    // Reads work; writes sent anyway are refused by the server with EPERM.
    let out = nbdsh(
        &uri,
        r#"
assert h.is_read_only()
assert h.pread(4096, 0) == bytes(4096)
h.set_strict_mode(0)
for name, f in (("write", lambda: h.pwrite(b"x" * 4096, 0)), ("trim", lambda: h.trim(4096, 0)), ("zero", lambda: h.zero(4096, 0))):
    try:
        f()
        print(name, "OK")
    except nbd.Error as e:
        print(name, e.errno, "server" if "command failed" in e.string else "client")
"#,
    );
    assert_eq!(out.trim(), "write EPERM server\ntrim EPERM server\nzero EPERM server");
    assert_eq!(read_at(&server.path("ro.img"), 8 * MIB, 4096), vec![0; 4096], "backend changed through a read-only export");
}

#[test]
fn memory_backend_volume_works() {
    let server = TestServer::start(
        r#"
[[backend]]
name = "mem"
memory = true
size = "32MiB"

[[volume]]
name = "ram"
# The second half of the memory store first.
[[volume.extent]]
length = "16MiB"
backend = "mem"
backend_offset = "16MiB"
[[volume.extent]]
length = "16MiB"
backend = "mem"
backend_offset = 0
"#,
    );
    let uri = server.uri("ram");
    assert_eq!(export_info(&uri)["export-size"], 32 * MIB);
    let pat = pattern(42, (2 * MIB) as usize);
    write_file(&server.path("pat.bin"), &pat);
    qemu_io(&uri, &[&format!("write -s {} 15M 2M", server.path("pat.bin").display()), "write -P 0x77 0 1M", "write -P 0x88 31M 1M"]);
    // A second connection sees the data: the store lives in the server.
    let out = server.path("back.bin");
    nbdsh(&uri, &format!("open({:?}, 'wb').write(h.pread(2 * 1024 * 1024, 15 * 1024 * 1024))", out.display().to_string()));
    assert!(std::fs::read(&out).unwrap() == pat, "memory volume did not read back what was written across its extents");
    qemu_io(&uri, &["read -P 0x77 0 1M", "read -P 0x88 31M 1M", "read -P 0 1M 14M", "read -P 0 17M 14M"]);
    // Memory is sparse: unwritten ranges are holes.
    let m = map(&uri);
    assert!(m.iter().any(|(o, l, d)| *o <= 4 * MIB && o + l >= 12 * MIB && d == "hole,zero"), "{m:?}");
    assert!(m.iter().any(|(o, l, d)| *o == 0 && *l >= MIB && d == "data"), "{m:?}");
}

#[test]
fn empty_export_name_reaches_the_first_volume() {
    let server = TestServer::start(
        r#"
[[backend]]
name = "m"
memory = true
size = "32MiB"

# Not alphabetically first: the default is the first in the file.
[[volume]]
name = "zeta"
description = "default one"
[[volume.extent]]
length = "12MiB"
backend = "m"
[[volume]]
name = "alpha"
[[volume.extent]]
length = "8MiB"
backend = "m"
backend_offset = "16MiB"
"#,
    );
    let default_uri = format!("nbd+unix:///?socket={}", server.socket.display());
    let e = export_info(&default_uri);
    assert_eq!(e["export-size"], 12 * MIB, "{e}");
    assert_eq!(e["description"], "default one", "{e}");
    qemu_io(&default_uri, &["write -P 0x3c 1M 64K"]);
    qemu_io(&server.uri("zeta"), &["read -P 0x3c 1M 64K"]);
    qemu_io(&server.uri("alpha"), &["read -P 0 0 8M"]);
    let out = nbdsh(&default_uri, "print(h.get_size(), h.pread(4, 1 << 20) == b'\\x3c' * 4)");
    assert_eq!(out.trim(), format!("{} True", 12 * MIB));
}
