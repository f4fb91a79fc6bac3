//! Failsafe: with etcd frozen (SIGSTOP) the nodes serve on while they all
//! reach each other, refuse cluster changes with a clear error, and take
//! changes again once etcd is back; a node that reaches neither etcd nor
//! all its peers stops at its lease's end, and nobody serves past the
//! failsafe window.

mod common;

use common::cli::*;
use common::etcd::{cluster_section, twin_backends, TestEtcd};
use common::TestServer;
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;
/// Lease 2 s (served 1 s past a renewal), failsafe 8 s.
const FAILSAFE_SECS: u64 = 8;

/// Volume `v` over `shared`/d.img, cut at `cut` (the head through `first`).
fn body(etcd: &str, node: &str, shared: &Path, cut: u64, first: &str) -> String {
    let cluster = cluster_section(etcd, node, 2).replace("failsafe = \"2s\"", &format!("failsafe = \"{FAILSAFE_SECS}s\""));
    format!(
        "{cluster}\n{}\n[[volume]]\nname = \"v\"\n[[volume.extent]]\nlength = {cut}\nbackend = \"{first}\"\nbackend_offset = 0\n[[volume.extent]]\nlength = {}\nbackend = \"a\"\nbackend_offset = {cut}\n",
        twin_backends(&shared.join("d.img"), SIZE),
        SIZE - cut
    )
}

fn status(node: &TestServer) -> Value {
    json(&cli_ok(node, &["cluster", "status", "--json"]))
}

/// Whether an NBD client gets an answer from `node` now.
fn answers(node: &TestServer) -> bool {
    let out = common::run_timeout(Command::new("nbdinfo").args(["--size", &node.uri("v")]), Duration::from_secs(20));
    out.status.success()
}

/// Writes a config re-cut at `cut` next to `node`'s and applies it there.
fn apply(node: &TestServer, etcd: &str, shared: &Path, cut: u64) -> std::process::Output {
    let file = node.dir.path().join("recut.toml");
    std::fs::write(&file, body(etcd, "-", shared, cut, "b")).unwrap();
    cli(node, &["cluster", "apply", "--json", "--config", file.to_str().unwrap()])
}

fn wait_all_serving(nodes: &[TestServer], limit: Duration) {
    for node in nodes {
        wait_until(node, "serving on etcd's word", limit, || {
            let s = status(node);
            s["state"] == "serving" && s["nodes"].as_array().unwrap().iter().filter(|n| n["alive"] == true).count() == nodes.len()
        });
    }
}

#[test]
fn nodes_serve_on_while_etcd_is_frozen_and_refuse_changes_until_it_is_back() {
    common::require("fio", "fio");
    common::require("nbdinfo", "libnbd-bin");
    let mut etcd = TestEtcd::start();
    let shared = tempfile::tempdir().unwrap();
    let nodes: Vec<TestServer> = ["n1", "n2", "n3"].iter().map(|n| start(&body(&etcd.url, n, shared.path(), 4 * MIB, "a"))).collect();
    wait_all_serving(&nodes, Duration::from_secs(15));

    // 1. etcd frozen for 5 s (the leases lapse after 2 s) under fio through
    // n1 and n2: no error, the nodes say failsafe, changes are refused.
    let stop = Arc::new(AtomicBool::new(false));
    let fio = |i: usize, offset: u64| common::fio::verify_until(nodes[i].dir.path(), &nodes[i].uri("v"), 2, offset, SIZE / 2, &stop);
    let writers = [fio(0, 0), fio(1, SIZE / 2)];
    for node in &nodes[..2] {
        wait_until(node, "fio connected", Duration::from_secs(30), || vol(node, "v")["connections"].as_u64() >= Some(1));
    }
    let frozen_at = Instant::now();
    etcd.freeze();
    std::thread::sleep(Duration::from_secs(3));
    for node in &nodes {
        let s = status(node);
        assert_eq!(s["state"], "failsafe", "{} with etcd frozen: {s}\n--- log ---\n{}", node.config.display(), node.log());
    }
    let refused = apply(&nodes[2], &etcd.url, shared.path(), 6 * MIB);
    assert_eq!(refused.status.code(), Some(4), "a change with etcd frozen: {}", text(&refused));
    assert!(text(&refused).contains("etcd does not answer"), "{}", text(&refused));
    assert!(answers(&nodes[2]), "n3 serves in failsafe");
    std::thread::sleep(Duration::from_secs(5).saturating_sub(frozen_at.elapsed()));
    etcd.thaw();
    wait_all_serving(&nodes, Duration::from_secs(20));
    let out = apply(&nodes[2], &etcd.url, shared.path(), 6 * MIB);
    assert!(out.status.success(), "a change once etcd is back: {}", text(&out));
    let report = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(report["volumes"][0]["nodes"].as_array().unwrap().len(), 3, "{report}");
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        let verified = w.join().unwrap().unwrap_or_else(|e| panic!("fio through a node failed while etcd was frozen: {e}"));
        assert!(verified > 0);
    }
    let tables: Vec<Value> = nodes.iter().map(|n| vol(n, "v")).collect();
    assert!(tables.iter().all(|t| t["extents"] == tables[0]["extents"] && t["generation"] == tables[0]["generation"]), "{tables:?}");

    // 2. etcd and n3 frozen: n1 and n2 miss a peer, so they stop at their
    // lease's end (1 s after the last renewal), well before the window.
    unsafe { libc::kill(nodes[2].pid(), libc::SIGSTOP) };
    etcd.freeze();
    std::thread::sleep(Duration::from_secs(3));
    for node in &nodes[..2] {
        let s = status(node);
        assert_eq!(s["state"], "fenced", "etcd and a peer gone: {s}");
        assert!(!answers(node), "{} serves without etcd and without all its peers", node.config.display());
    }
    etcd.thaw();
    unsafe { libc::kill(nodes[2].pid(), libc::SIGCONT) };
    wait_all_serving(&nodes, Duration::from_secs(30));
    assert!(answers(&nodes[0]));

    // 3. etcd frozen past the window: every node stops by lease + failsafe
    // (1 + 8 s after its last renewal), then serves again once etcd is back.
    let frozen_at = Instant::now();
    etcd.freeze();
    std::thread::sleep(Duration::from_secs(4));
    assert!(answers(&nodes[0]), "within the failsafe window");
    std::thread::sleep(Duration::from_secs(1 + FAILSAFE_SECS + 1).saturating_sub(frozen_at.elapsed()));
    for node in &nodes {
        let s = status(node);
        assert_eq!(s["state"], "fenced", "past the failsafe window: {s}");
        assert!(!answers(node), "{} serves past its failsafe window", node.config.display());
    }
    etcd.thaw();
    wait_all_serving(&nodes, Duration::from_secs(30));
    assert!(answers(&nodes[1]));
}

/// One node cut from etcd (through a relay) while the others keep it: it
/// serves on in failsafe, and a change made meanwhile holds it like a
/// live node (it may serve, so it is not committed past before its window
/// is over): it swaps with the others, and joins anew once etcd is back.
#[test]
fn a_node_cut_from_etcd_alone_takes_part_in_changes_while_in_failsafe() {
    common::require("nbdinfo", "libnbd-bin");
    let etcd = TestEtcd::start();
    let relay = common::proxy::Relay::start(&etcd.url);
    let shared = tempfile::tempdir().unwrap();
    let nodes: Vec<TestServer> = [("n1", &etcd.url), ("n2", &etcd.url), ("n3", &relay.url)].iter().map(|(n, url)| start(&body(url, n, shared.path(), 4 * MIB, "a"))).collect();
    wait_all_serving(&nodes, Duration::from_secs(15));
    let cut_node = &nodes[2];
    relay.cut();
    // Gone from etcd: its key (with its published generations) deleted
    // with its lease, not merely past its TTL.
    wait_until(&nodes[0], "n3's lease revoked in etcd", Duration::from_secs(10), || {
        status(&nodes[0])["nodes"].as_array().unwrap().iter().any(|n| n["node"] == "n3" && n["alive"] == false && n["generations"] == serde_json::json!({}))
    });
    assert_eq!(status(cut_node)["state"], "failsafe", "n3 cut from etcd");
    let out = apply(&nodes[0], &etcd.url, shared.path(), 6 * MIB);
    assert!(out.status.success(), "{}", text(&out));
    let report = json(&String::from_utf8_lossy(&out.stdout));
    let v = &report["volumes"][0];
    let mut swapped: Vec<&str> = v["nodes"].as_array().unwrap().iter().map(|n| n.as_str().unwrap()).collect();
    swapped.sort_unstable();
    assert_eq!(swapped, ["n1", "n2", "n3"], "the node in failsafe swapped with the others: {report}");
    assert_eq!(v["fenced"], serde_json::json!([]), "{report}");
    let (mine, theirs) = (vol(cut_node, "v"), vol(&nodes[0], "v"));
    assert_eq!((&mine["generation"], &mine["extents"]), (&theirs["generation"], &theirs["extents"]), "n3 is current while in failsafe");
    assert!(answers(cut_node), "n3 serves on in failsafe");
    relay.mend();
    wait_all_serving(&nodes, Duration::from_secs(20));
    assert_eq!(vol(cut_node, "v")["extents"], theirs["extents"]);
}
