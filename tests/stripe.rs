//! Stripe extents through the real binary: where the bytes land on the
//! member files (offsets worked out by hand below), what reads back, the
//! allocation map, `status`, and the config errors an operator can make.

mod common;

use common::cli::*;
use common::*;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// Volume `v` = lin.img[1M..2M) ++ a stripe of 2MiB over c (from 1MiB) and
/// d (from 0), chunk 64KiB. Stripe chunk k (extent offset k×64K) is on c
/// when k is even, d when odd, at member chunk k/2.
const BODY: &str = r#"
[[backend]]
name = "lin"
path = "{dir}/lin.img"
size = "4MiB"

[[backend]]
name = "c"
path = "{dir}/c.img"
size = "4MiB"

[[backend]]
name = "d"
path = "{dir}/d.img"
size = "4MiB"

[[volume]]
name = "v"
[[volume.extent]]
length = "1MiB"
backend = "lin"
backend_offset = "1MiB"
[[volume.extent]]
length = "2MiB"
stripe = [ { backend = "c", backend_offset = "1MiB" }, { backend = "d", backend_offset = 0 } ]
chunk = "64KiB"
"#;

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

/// `nbdinfo --map --json`, adjacent runs of one type merged, as (offset,
/// length, description).
fn map(uri: &str) -> Vec<(u64, u64, String)> {
    require("nbdinfo", "libnbd-bin");
    let out = run_ok(Command::new("nbdinfo").args(["--json", "--map"]).arg(uri));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("nbdinfo output is not JSON ({e}):\n{out}"));
    let mut runs: Vec<(u64, u64, String)> = Vec::new();
    for e in v.as_array().unwrap_or_else(|| panic!("map is not an array: {v}")) {
        let (off, len, desc) = (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap(), e["description"].as_str().unwrap().to_string());
        match runs.last_mut() {
            Some(last) if last.2 == desc && last.0 + last.1 == off => last.1 += len,
            _ => runs.push((off, len, desc)),
        }
    }
    runs
}

#[test]
fn stripe_chunks_land_on_alternate_members_and_read_back() {
    let server = start(BODY);
    let uri = server.uri("v");
    let pat = pattern(11, 200 * KIB as usize);
    std::fs::write(server.path("pat.bin"), &pat).unwrap();
    qemu_io(
        &uri,
        &[
            // Crosses the linear/stripe boundary (volume 1MiB).
            &format!("write -P 0x11 {} 8192", MIB - 4096),
            // Stripe offsets 60K..260K: the end of chunk 0, chunks 1-3, the
            // start of chunk 4.
            &format!("write -s {} {} {}", server.path("pat.bin").display(), MIB + 60 * KIB, 200 * KIB),
            // The last 4K of the volume: chunk 31.
            &format!("write -P 0x33 {} 4096", 3 * MIB - 4096),
            "flush",
        ],
    );
    let (lin, c, d) = (server.path("lin.img"), server.path("c.img"), server.path("d.img"));
    // Volume 1M-4K..1M is lin.img 2M-4K..2M; stripe 0..4K is chunk 0 on c
    // at c's start, 1MiB.
    assert_eq!(read_at(&lin, 2 * MIB - 4096, 4096), vec![0x11; 4096], "lin.img at 2MiB-4KiB");
    assert_eq!(read_at(&c, MIB, 4096), vec![0x11; 4096], "c.img at 1MiB (stripe chunk 0)");
    // The pattern, chunk by chunk: (pattern offset, file, file offset, length).
    let placed: [(u64, &Path, u64, u64); 5] = [
        (0, &c, MIB + 60 * KIB, 4 * KIB),               // chunk 0, its last 4K
        (4 * KIB, &d, 0, 64 * KIB),                     // chunk 1: d member chunk 0
        (68 * KIB, &c, MIB + 64 * KIB, 64 * KIB),       // chunk 2: c member chunk 1
        (132 * KIB, &d, 64 * KIB, 64 * KIB),            // chunk 3: d member chunk 1
        (196 * KIB, &c, MIB + 128 * KIB, 4 * KIB),      // chunk 4: c member chunk 2
    ];
    for (from, file, at, len) in placed {
        let want = &pat[from as usize..(from + len) as usize];
        assert!(read_at(file, at, len as usize) == want, "pattern bytes {from}+{len} must be at {}:{at}", file.display());
    }
    // Chunk 31 = d member chunk 15: d.img 960K + 60K = 1MiB-4K.
    assert_eq!(read_at(&d, MIB - 4096, 4096), vec![0x33; 4096], "d.img at 1MiB-4KiB (stripe chunk 31)");
    // Nothing outside the members' ranges, nor between the writes, touched.
    for (file, off) in [(&c, 0), (&c, MIB - 4096), (&c, 2 * MIB), (&d, MIB), (&lin, MIB - 4096), (&lin, 2 * MIB), (&c, MIB + 4096), (&d, 128 * KIB)] {
        assert_eq!(read_at(file, off, 4096), vec![0; 4096], "{} at {off} must be untouched", file.display());
    }

    // Read back through NBD, across both boundaries.
    let mut expect = vec![0u8; (MIB + 264 * KIB) as usize];
    expect[(MIB - 4096) as usize..(MIB + 4096) as usize].fill(0x11);
    expect[(MIB + 60 * KIB) as usize..(MIB + 260 * KIB) as usize].copy_from_slice(&pat);
    let out = server.path("readback.bin");
    nbdsh(&uri, &format!("open({:?}, 'wb').write(h.pread({}, 0))", out.display().to_string(), expect.len()));
    assert!(std::fs::read(&out).unwrap() == expect, "read back of volume 0..1MiB+264KiB differs");
    qemu_io(&uri, &[&format!("read -P 0x33 {} 4096", 3 * MIB - 4096), &format!("read -P 0 {} 4096", 3 * MIB - 8192)]);

    // Allocation: data exactly where written, holes elsewhere.
    let (hz, data) = ("hole,zero".to_string(), "data".to_string());
    let expect_map = vec![
        (0, MIB - 4096, hz.clone()),
        (MIB - 4096, 8192, data.clone()),
        (MIB + 4096, 56 * KIB, hz.clone()),
        (MIB + 60 * KIB, 200 * KIB, data.clone()),
        (MIB + 260 * KIB, 2 * MIB - 260 * KIB - 4096, hz.clone()),
        (3 * MIB - 4096, 4096, data.clone()),
    ];
    assert_eq!(map(&uri), expect_map, "nbdinfo --map of the partly written stripe");

    // Status shows the layout and its members.
    let v = vol(&server, "v");
    let e = &v["extents"][1];
    assert_eq!((e["layout"].as_str(), e["chunk"].as_u64()), (Some("stripe"), Some(64 * KIB)), "{v}");
    let legs: Vec<(String, u64)> = e["legs"].as_array().unwrap().iter().map(|l| (l["backend"].as_str().unwrap().into(), l["backend_offset"].as_u64().unwrap())).collect();
    assert_eq!(legs, vec![("c".to_string(), MIB), ("d".to_string(), 0)]);
    assert_eq!(v["extents"][0]["layout"], "linear");
    let table = cli_ok(&server, &["status"]);
    assert!(table.contains("stripe c@1MiB,d@0 chunk 64KiB"), "{table}");
}

/// `nbdvirt check` on BODY with `from` replaced by `to` fails naming the
/// line holding `at` (searched from the first `[[volume.extent]]` on), the
/// field and `message`; `serve` refuses it too.
fn rejected(from: &str, to: &str, at: &str, field: &str, message: &str) {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(BODY.matches(from).count(), 1, "test bug: {from:?} must occur once");
    let text = BODY.replace(from, to).replace("{dir}", &dir.path().display().to_string());
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, &text).unwrap();
    let first_extent = text.find("[[volume.extent]]").unwrap();
    let pos = first_extent + text[first_extent..].find(at).unwrap_or_else(|| panic!("test bug: {at:?} not in config"));
    let line = text[..pos].lines().count() + usize::from(text[..pos].ends_with('\n'));
    let want = format!("{}:{line}: volume 'v' extent 1: {field}: ", path.display());
    for args in [&["check"][..], &["serve"][..]] {
        let out = run_timeout(Command::new(BIN).args(args).arg("--config").arg(&path).env("RUST_LOG", "off"), Duration::from_secs(30));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "nbdvirt {args:?} accepted:\n{text}");
        assert!(err.contains(&want), "nbdvirt {args:?}: stderr should name {want:?}:\n{err}");
        assert!(err.contains(message), "nbdvirt {args:?}: stderr should say {message:?}:\n{err}");
    }
}

#[test]
fn stripe_length_not_a_multiple_of_chunk_times_members() {
    rejected("length = \"2MiB\"", "length = \"2112KiB\"", "length = \"2112KiB\"", "length", "not a multiple of chunk × N");
}

#[test]
fn stripe_chunk_not_a_power_of_two() {
    rejected("chunk = \"64KiB\"", "chunk = \"48KiB\"", "chunk", "chunk", "must be a power of two");
}

#[test]
fn stripe_member_naming_an_unknown_backend() {
    rejected("backend = \"d\", backend_offset = 0", "backend = \"e\", backend_offset = 0", "stripe", "stripe[1].backend", "no backend named 'e'");
}

#[test]
fn chunk_on_a_mirror_extent() {
    rejected("stripe = [", "mirror = [", "chunk", "chunk", "only for stripe extents");
}

#[test]
fn mirror_with_one_leg() {
    let one = "stripe = [ { backend = \"c\", backend_offset = \"1MiB\" }, { backend = \"d\", backend_offset = 0 } ]\nchunk = \"64KiB\"";
    rejected(one, "mirror = [ { backend = \"c\", backend_offset = \"1MiB\" } ]", "mirror", "mirror", "a mirror needs at least two legs");
}
