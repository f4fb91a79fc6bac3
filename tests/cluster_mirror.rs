//! Mirrored volumes in cluster mode. Every node writes every leg; a leg
//! that fails on one node must be known failed on every node before a
//! write it missed is answered, or another node would go on reading the
//! leg and return the bytes from before the write. Reads on a cluster
//! node come from the first leg that has the data, so here, without that
//! announcement, n2 would read leg `a` after n1 stopped writing it, and n3,
//! down meanwhile and back without its own record of the legs, would too
//! without the mark in etcd (and without the other nodes saying that `b`
//! is in sync, it would have no leg to read). `mirror remove`,
//! `add` and `readd` through any node change the legs on every node, and
//! a leg that comes back resyncs on every node.

mod common;

use common::cli::*;
use common::etcd::{cluster_section, TestEtcd};
use common::{fio, run_ok, TestServer};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;

/// Node `node` of cluster "t": volume `v` mirrored on backends `a` (first
/// leg) and `b`, files in `shared` that every node opens.
fn node_body(etcd: &str, node: &str, shared: &Path) -> String {
    let backend = |name: &str| format!("[[backend]]\nname = \"{name}\"\npath = \"{}\"\nsize = {SIZE}\nshared = true\n", shared.join(format!("{name}.img")).display());
    format!(
        "{}\n{}\n{}\n[[volume]]\nname = \"v\"\n[[volume.extent]]\nlength = {SIZE}\nmirror = [ {{ backend = \"a\" }}, {{ backend = \"b\" }} ]\n",
        cluster_section(etcd, node, 3),
        backend("a"),
        backend("b")
    )
}

/// Leg `leg` of `v` as `node` sees it.
fn leg(node: &TestServer, leg: &str) -> serde_json::Value {
    let m = json(&cli_ok(node, &["mirror", "status", "v", "--json"]))["mirrors"][0].clone();
    m["legs"].as_array().unwrap().iter().find(|l| l["backend"] == leg).cloned().unwrap_or_else(|| panic!("no leg {leg} in {m}"))
}

fn wait_leg(node: &TestServer, name: &str, state: &str) {
    wait_until(node, &format!("leg {name} {state}"), Duration::from_secs(60), || leg(node, name)["state"] == state);
}

/// A volume image: every 4 KiB block tagged with `tag` and its number.
fn pattern(tag: u8) -> Vec<u8> {
    (0..SIZE as usize).map(|i| if i % 4096 < 4 { ((i / 4096) >> ((i % 4096) * 8)) as u8 } else { tag ^ (i % 251) as u8 }).collect()
}

fn write_through(node: &TestServer, data: &[u8], name: &str) {
    let file = node.path(name);
    std::fs::write(&file, data).unwrap();
    run_ok(Command::new("nbdcopy").arg("--flush").arg(&file).arg(node.uri("v")));
}

fn read_through(node: &TestServer) -> Vec<u8> {
    let file = node.path("readback.img");
    let _ = std::fs::remove_file(&file);
    run_ok(Command::new("nbdcopy").arg(node.uri("v")).arg(&file));
    std::fs::read(&file).unwrap()
}

fn assert_reads(node: &TestServer, want: &[u8], what: &str) {
    let got = read_through(node);
    assert_eq!(got.len(), want.len());
    let bad = (0..got.len() / 4096).filter(|b| got[b * 4096..(b + 1) * 4096] != want[b * 4096..(b + 1) * 4096]).count();
    assert_eq!(bad, 0, "{what}: {bad} blocks read through {} differ from what was written", node.path("").display());
}

#[test]
fn a_leg_failed_on_one_node_is_read_by_none() {
    common::require("nbdcopy", "libnbd-bin");
    common::require("fio", "fio");
    common::require("etcdctl", "etcd-client");
    let etcd = TestEtcd::start();
    let shared = tempfile::tempdir().unwrap();
    let mut nodes: Vec<TestServer> = ["n1", "n2", "n3"].iter().map(|n| start(&node_body(&etcd.url, n, shared.path()))).collect();
    for node in &nodes {
        wait_until(node, "three nodes alive and a coordinator", Duration::from_secs(15), || {
            let s = json(&cli_ok(node, &["cluster", "status", "--json"]));
            s["nodes"].as_array().unwrap().iter().filter(|n| n["alive"] == true).count() == 3 && !s["coordinator"].is_null()
        });
        // Each node brings b up to a itself (its copies are checked).
        wait_leg(node, "b", "in_sync");
    }
    let before = pattern(0x11);
    write_through(&nodes[1], &before, "before.img");
    assert_reads(&nodes[2], &before, "before the fault");
    // n3 is down when the leg fails (n1 waits until its lease expired);
    // it learns of the failure from etcd when it comes back.
    nodes[2].kill();

    // Writes through n1 and n2 at once while leg a starts failing on n1.
    let stop = Arc::new(AtomicBool::new(false));
    let load = [fio::verify_until(&nodes[0].path(""), &nodes[0].uri("v"), 4, 0, SIZE / 2, &stop), fio::verify_until(&nodes[1].path(""), &nodes[1].uri("v"), 4, SIZE / 2, SIZE / 2, &stop)];
    std::thread::sleep(Duration::from_secs(2));
    cli_ok(&nodes[0], &["fault", "a", "--error", "eio", "--writes"]);
    for node in &nodes[..2] {
        wait_leg(node, "a", "failed");
    }
    let reason = leg(&nodes[1], "a")["reason"].as_str().unwrap_or_default().to_string();
    assert!(reason.contains("on node n1") && reason.contains("EIO"), "n2 says why and where: {reason}");
    assert_eq!(failed_leg_marks(&etcd), "/nbdvirt/t/failed-legs/v/a");
    stop.store(true, Ordering::SeqCst);
    for (i, f) in load.into_iter().enumerate() {
        let verified = f.join().unwrap().unwrap_or_else(|e| panic!("fio through n{}: {e}", i + 1));
        assert!(verified > 0);
    }

    // What n1 writes now lands on b only; n2 and n3 read it from b.
    let after = pattern(0x5a);
    write_through(&nodes[0], &after, "after.img");
    assert_reads(&nodes[1], &after, "n2 after n1's leg failed");

    // n3 comes back without its own record of the legs (as a new node
    // would): it would take a, the first leg, as in sync and b as to be
    // copied. Catching up, it learns from etcd that a failed and from the
    // other nodes that b is in sync, and serves from b.
    std::fs::remove_dir_all(nodes[2].path("state").join("mirror")).unwrap();
    respawn(&mut nodes[2]);
    wait_until(&nodes[2], "n3 serving again", Duration::from_secs(30), || json(&cli_ok(&nodes[2], &["cluster", "status", "--json"]))["state"] == "serving");
    assert_eq!(leg(&nodes[2], "a")["state"], "failed", "n3 after it came back");
    assert_eq!(leg(&nodes[2], "b")["state"], "in_sync", "n3 after it came back");
    assert_reads(&nodes[2], &after, "n3 after it came back");

    // The operator drops the failed leg cluster-wide: its mark goes too.
    cli_ok(&nodes[0], &["mirror", "remove", "v", "--leg", "a"]);
    for node in &nodes {
        wait_until(node, "v linear on b", Duration::from_secs(15), || extents_of(&vol(node, "v")).iter().all(|e| e.2 == "b"));
        assert_reads(node, &after, "after the failed leg was dropped");
    }
    assert_eq!(failed_leg_marks(&etcd), "", "the mark is gone with the leg");

    // Healed, it comes back through another node, as the second leg:
    // every node resyncs it, and it holds what was written.
    cli_ok(&nodes[0], &["fault", "a", "--error", "off"]);
    cli_ok(&nodes[1], &["mirror", "add", "v", "--to", "a"]);
    for node in &nodes {
        wait_leg(node, "a", "in_sync");
    }
    assert!(std::fs::read(shared.path().join("a.img")).unwrap() == after, "a.img holds what was written while it was away");

    // It fails again, on n3 this time; `mirror readd` through n1 brings it
    // back on every node, with what n3 wrote meanwhile.
    cli_ok(&nodes[2], &["fault", "a", "--error", "eio", "--writes"]);
    let later = pattern(0x77);
    write_through(&nodes[2], &later, "later.img");
    for node in &nodes {
        wait_leg(node, "a", "failed");
    }
    cli_ok(&nodes[2], &["fault", "a", "--error", "off"]);
    cli_ok(&nodes[0], &["mirror", "readd", "v", "--leg", "a"]);
    for node in &nodes {
        wait_leg(node, "a", "in_sync");
        assert_reads(node, &later, "after the re-add");
    }
    assert!(std::fs::read(shared.path().join("a.img")).unwrap() == later, "a.img after the re-add");
    assert_eq!(failed_leg_marks(&etcd), "");
}

/// The keys of the failed-leg marks in etcd.
fn failed_leg_marks(etcd: &TestEtcd) -> String {
    let out = Command::new("etcdctl").args(["--endpoints", &etcd.url, "get", "--prefix", "/nbdvirt/t/failed-legs/", "--keys-only"]).output().expect("etcdctl");
    assert!(out.status.success(), "etcdctl: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}
