//! Mirrors and volume pairs against the real binary with real clients:
//! adding a leg live, resync and its crash resumption, crash recovery of
//! dirty regions only, split and merge in both directions, and the errors
//! operators get.

mod common;

use common::cli::*;
use common::nbd_client::MIB;
use common::*;
use serde_json::Value;
use std::process::Command;
use std::time::Duration;

/// Volume `v` (64 MiB) on `a`; `b` and `c` free, same size.
const TWO_FILES: &str = r#"[[backend]]
name = "a"
path = "{dir}/a.img"
size = "64MiB"
[[backend]]
name = "b"
path = "{dir}/b.img"
size = "64MiB"
[[backend]]
name = "c"
path = "{dir}/c.img"
size = "64MiB"
[[backend]]
name = "tiny"
path = "{dir}/tiny.img"
size = "1MiB"

[[volume]]
name = "v"
[[volume.extent]]
length = "64MiB"
backend = "a"
"#;

fn mirror(server: &TestServer, volume: &str) -> Value {
    let list = json(&cli_ok(server, &["mirror", "status", volume, "--json"]));
    list["mirrors"][0].clone()
}

fn leg(server: &TestServer, volume: &str, leg: &str) -> Value {
    let m = mirror(server, volume);
    m["legs"].as_array().unwrap().iter().find(|l| l["backend"] == leg).unwrap_or_else(|| panic!("no leg {leg} in {m}")).clone()
}

fn qemu_io(uri: &str, cmds: &[String]) {
    require("qemu-io", "qemu-utils");
    let mut cmd = Command::new("qemu-io");
    cmd.env("PATH", debian_path()).args(["-f", "raw"]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    cmd.arg(uri);
    let out = run_ok(&mut cmd);
    assert!(!out.contains("failed"), "qemu-io reported a failure:\n{out}");
}

/// Fills `v` with a distinct pattern per MiB (so misplaced copies show).
fn fill(server: &TestServer, volume: &str, mib: u64) {
    let cmds: Vec<String> = (0..mib).map(|i| format!("write -P {} {} 1M", (i % 250) + 1, i * MIB)).collect();
    qemu_io(&server.uri(volume), &cmds);
}

fn same(server: &TestServer, x: &str, y: &str, len: u64) {
    let (a, b) = (read_at(&server.path(x), 0, len as usize), read_at(&server.path(y), 0, len as usize));
    if let Some(i) = a.iter().zip(&b).position(|(p, q)| p != q) {
        panic!("{x} and {y} differ at byte {i} ({} vs {})\n{}", a[i], b[i], server.log());
    }
}

fn wait_in_sync(server: &TestServer, volume: &str, name: &str) {
    wait_until(server, &format!("leg {name} in sync"), Duration::from_secs(60), || leg(server, volume, name)["state"] == "in_sync");
}

#[test]
fn a_leg_added_live_resyncs_and_takes_every_later_write() {
    let server = start(TWO_FILES);
    fill(&server, "v", 64);
    let out = cli_ok(&server, &["mirror", "add", "v", "--to", "b", "--wait"]);
    assert!(out.contains("in sync"), "{out}");
    same(&server, "a.img", "b.img", 64 * MIB);
    let m = mirror(&server, "v");
    assert_eq!(m["pair"], "duplex", "{m}");
    // Writes, zeroes and trims after the resync go to both legs.
    qemu_io(&server.uri("v"), &["write -P 0xee 3M 8k".into(), "write -z 10M 1M".into(), "discard 20M 1M".into()]);
    same(&server, "a.img", "b.img", 64 * MIB);
    let st = vol(&server, "v");
    assert_eq!(st["extents"][0]["layout"], "mirror", "{st}");
    // The table change was a generation of its own, and survives a restart.
    let mut server = server;
    assert!(server.stop().success());
    respawn(&mut server);
    let m = mirror(&server, "v");
    assert_eq!(m["pair"], "duplex", "{m}");
    assert_eq!(m["recovered_regions"], 0, "a clean stop leaves nothing to resync: {m}");
    // Dropping a leg returns to a linear volume on the other.
    cli_ok(&server, &["mirror", "remove", "v", "--leg", "a"]);
    let st = vol(&server, "v");
    assert_eq!(extents_of(&st)[0].2, "b", "{st}");
    qemu_io(&server.uri("v"), &["read -P 0xee 3M 8k".into()]);
}

#[test]
fn kill_9_during_resync_resumes_from_the_checkpoint() {
    let mut server = start(TWO_FILES);
    fill(&server, "v", 64);
    cli_ok(&server, &["mirror", "add", "v", "--to", "b", "--rate", "8MiB"]);
    wait_until(&server, "resync at 40%", Duration::from_secs(60), || leg(&server, "v", "b")["percent"].as_f64().unwrap() >= 40.0);
    server.kill();
    respawn(&mut server);
    let l = leg(&server, "v", "b");
    let percent = l["percent"].as_f64().unwrap();
    // Checkpoints are a second apart: at 8 MiB/s at most 1/8 is redone.
    assert!(percent >= 25.0, "resumed from a checkpoint, not from 0: {l}");
    assert_eq!(l["state"], "resyncing", "{l}");
    wait_in_sync(&server, "v", "b");
    let copied = leg(&server, "v", "b")["copied_bytes"].as_u64().unwrap();
    assert!(copied < 64 * MIB * 80 / 100, "after the restart only the rest was copied ({copied} bytes)");
    same(&server, "a.img", "b.img", 64 * MIB);
}

#[test]
fn kill_9_during_a_write_storm_resyncs_only_dirty_regions() {
    require("fio", "fio");
    let mut server = start(TWO_FILES);
    cli_ok(&server, &["mirror", "add", "v", "--to", "b", "--rate", "0", "--wait"]);
    // Random 4k writes to the first 8 MiB only, running when the server dies.
    let mut fio = Command::new("fio")
        .current_dir(server.dir.path())
        .args(["--name=storm", "--ioengine=nbd", &format!("--uri={}", server.uri("v")), "--rw=randwrite", "--bs=4k", "--size=8M"])
        .args(["--iodepth=16", "--time_based", "--runtime=30"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("fio");
    wait_until(&server, "dirty regions", Duration::from_secs(20), || mirror(&server, "v")["dirty_bytes"].as_u64().unwrap() > 0);
    std::thread::sleep(Duration::from_millis(500));
    server.kill();
    let _ = fio.kill();
    let _ = fio.wait();
    respawn(&mut server);
    let m = mirror(&server, "v");
    let recovered = m["recovered_regions"].as_u64().unwrap();
    assert!((1..=8).contains(&recovered), "only regions of the 8 MiB written can be dirty (1 MiB regions): {m}");
    eprintln!("crash recovery resynced {recovered} of 64 regions");
    // The first in-sync leg is the source; it may be either (both were in
    // sync): wait for both, not for one that may be the source already.
    wait_in_sync(&server, "v", "a");
    wait_in_sync(&server, "v", "b");
    same(&server, "a.img", "b.img", 64 * MIB);
}

#[test]
fn split_and_merge_copy_only_what_changed_in_both_directions() {
    let server = start(TWO_FILES);
    fill(&server, "v", 64);
    cli_ok(&server, &["mirror", "add", "v", "--to", "b", "--rate", "0", "--wait"]);
    for (round, keep) in ["primary", "secondary"].into_iter().enumerate() {
        let (mine, theirs) = (0xa1 + round as u8, 0xb2 + round as u8);
        let out = cli_ok(&server, &["split", "v", "--leg", "b", "--as", "vb", "--json"]);
        assert_eq!(json(&out)["split_volume"], "vb", "{out}");
        assert_eq!(mirror(&server, "v")["pair"], "split");
        // Different data on both sides; the split copy is writable.
        qemu_io(&server.uri("v"), &[format!("write -P {mine} 4M 64k")]);
        qemu_io(&server.uri("vb"), &[format!("write -P {theirs} 40M 4k")]);
        assert_eq!(read_at(&server.path("b.img"), 40 * MIB, 4096), vec![theirs; 4096]);
        assert_ne!(read_at(&server.path("a.img"), 40 * MIB, 4096), vec![theirs; 4096]);
        // Backup tools see exactly the changed regions (1 MiB) on each side.
        let map = |name: &str| {
            require("nbdinfo", "libnbd-bin");
            let out = run_ok(Command::new("nbdinfo").env("PATH", debian_path()).args(["--map=qemu:dirty-bitmap:split-vb", &server.uri(name)]));
            out.lines().map(|l| l.split_whitespace().take(3).map(|w| w.parse::<u64>().unwrap()).collect::<Vec<_>>()).collect::<Vec<_>>()
        };
        assert_eq!(map("v"), vec![vec![0, 4 * MIB, 0], vec![4 * MIB, MIB, 1], vec![5 * MIB, 59 * MIB, 0]]);
        assert_eq!(map("vb"), vec![vec![0, 40 * MIB, 0], vec![40 * MIB, MIB, 1], vec![41 * MIB, 23 * MIB, 0]]);
        let list = run_ok(Command::new("nbdinfo").env("PATH", debian_path()).args(["--list", &server.uri("")]));
        assert_eq!(list.matches("qemu:dirty-bitmap:split-vb").count(), 2, "listed on both volumes:\n{list}");
        let changed = |name: &str| mirror(&server, name)["trackers"][0]["changed_bytes"].as_u64().unwrap();
        assert_eq!((changed("v"), changed("vb")), (MIB, MIB), "one 1 MiB region changed on each side");
        // In-use guard: a client of the split copy blocks the merge.
        let mut holder = Command::new("nbdsh")
            .env("PATH", debian_path())
            .args(["-u", &server.uri("vb"), "-c", "import time; time.sleep(30)"])
            .spawn()
            .expect("nbdsh");
        wait_until(&server, "a client on vb", Duration::from_secs(20), || vol(&server, "vb")["connections"].as_u64() == Some(1));
        let err = cli(&server, &["merge", "vb", "--into", "v", "--keep", keep]);
        assert_eq!(err.status.code(), Some(4), "busy: {}", text(&err));
        assert!(String::from_utf8_lossy(&err.stderr).contains("1 connected client"), "{}", text(&err));
        let out = json(&cli_ok(&server, &["merge", "vb", "--into", "v", "--keep", keep, "--force", "--json"]));
        let _ = holder.kill();
        let _ = holder.wait();
        assert_eq!(out["disconnected"], 1, "{out}");
        assert_eq!(out["resync_bytes"], 2 * MIB, "the union of both sides' changes: {out}");
        let other = if keep == "primary" { "b" } else { "a" };
        wait_in_sync(&server, "v", other);
        same(&server, "a.img", "b.img", 64 * MIB);
        let at4m = read_at(&server.path("a.img"), 4 * MIB, 1)[0];
        let at40m = read_at(&server.path("a.img"), 40 * MIB, 1)[0];
        if keep == "primary" {
            assert_eq!(at4m, mine, "the volume's change is kept");
            assert_ne!(at40m, theirs, "the split copy's change is undone");
        } else {
            assert_eq!(at40m, theirs, "the split copy's change is restored onto the volume");
            assert_ne!(at4m, mine, "the volume's change is undone");
        }
        assert!(poll_status(&server)["volumes"].as_array().unwrap().iter().all(|v| v["name"] != "vb"), "the split copy is gone");
    }
}

#[test]
fn a_mirror_from_the_config_syncs_its_second_leg_first() {
    let body = TWO_FILES.replace("length = \"64MiB\"\nbackend = \"a\"", "length = \"64MiB\"\nmirror = [ { backend = \"a\", backend_offset = 0 }, { backend = \"b\", backend_offset = 0 } ]");
    let server = start(&body);
    fill(&server, "v", 16);
    wait_in_sync(&server, "v", "b");
    same(&server, "a.img", "b.img", 64 * MIB);
    let st = vol(&server, "v");
    assert_eq!(st["extents"][0]["legs"][1]["state"], "in_sync", "{st}");
    let human = cli_ok(&server, &["status"]);
    assert!(human.contains("mirror a@0 (in_sync),b@0 (in_sync) region 1MiB"), "{human}");
}

#[test]
fn a_leg_a_reload_adds_resyncs_without_a_restart() {
    let server = start(TWO_FILES);
    fill(&server, "v", 16);
    let mirrored = TWO_FILES.replace("length = \"64MiB\"\nbackend = \"a\"", "length = \"64MiB\"\nmirror = [ { backend = \"a\", backend_offset = 0 }, { backend = \"b\", backend_offset = 0 } ]");
    rewrite_config(&server, &mirrored);
    cli_ok(&server, &["reload"]);
    wait_in_sync(&server, "v", "b");
    same(&server, "a.img", "b.img", 64 * MIB);
    assert!(server.log().contains("resyncing a leg no job copies"), "{}", server.log());
}

#[test]
fn bad_requests_get_clear_errors_and_exit_codes() {
    let server = start(TWO_FILES);
    let code = |args: &[&str]| {
        let out = cli(&server, args);
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (c, e) = code(&["mirror", "add", "v", "--to", "nope"]);
    assert_eq!(c, Some(3), "{e}");
    assert!(e.contains("no backend named 'nope'"), "{e}");
    let (c, e) = code(&["mirror", "remove", "v", "--leg", "b"]);
    assert_eq!(c, Some(3), "{e}");
    assert!(e.contains("no mirror leg on backend 'b'"), "{e}");
    let (c, e) = code(&["mirror", "add", "v", "--to", "b", "--range", "0:1000"]);
    assert_eq!(c, Some(7), "{e}");
    let (c, e) = code(&["mirror", "add", "v", "--to", "tiny"]);
    assert_eq!(c, Some(4), "a leg must hold the range: {e}");
    assert!(e.contains("'tiny'") && e.contains("67108864"), "{e}");
    let (c, e) = code(&["mirror", "add", "v", "--to", "b:63MiB"]);
    assert_eq!(c, Some(7), "past the end of b: {e}");
    cli_ok(&server, &["mirror", "add", "v", "--to", "b", "--rate", "1MiB"]);
    let (c, e) = code(&["split", "v", "--leg", "b", "--as", "vb"]);
    assert_eq!(c, Some(4), "{e}");
    assert!(e.contains("still resyncing") && e.contains("duplex-pending"), "{e}");
    let (c, e) = code(&["mirror", "add", "v", "--to", "b"]);
    assert_eq!(c, Some(4), "{e}");
    assert!(e.contains("already is a leg"), "{e}");
    let (c, e) = code(&["mirror", "readd", "v", "--leg", "a"]);
    assert_eq!(c, Some(4), "{e}");
    assert!(e.contains("not failed"), "{e}");
    let (c, e) = code(&["mirror", "remove", "v", "--leg", "a"]);
    assert_eq!(c, Some(4), "the only in-sync leg: {e}");
    assert!(e.contains("last in-sync copy") && e.contains("--force"), "{e}");
    let (c, e) = code(&["merge", "v", "--into", "v"]);
    assert_eq!(c, Some(7), "{e}");
    assert!(e.contains("was not split from"), "{e}");
    let (c, e) = code(&["split", "v", "--leg", "a", "--as", "v"]);
    assert_eq!(c, Some(4), "{e}");
    assert!(e.contains("already exists"), "{e}");
}
