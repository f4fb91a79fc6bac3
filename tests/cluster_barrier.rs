//! The cluster-wide pause–drain–swap: `nbdvirt cluster apply` re-cuts a
//! volume's table on three nodes at once (hold everywhere, commit in etcd,
//! swap everywhere) while fio writes and verifies through two of them.

mod common;

use common::cli::*;
use common::etcd::{cluster_section, twin_backends, TestEtcd};
use common::{require, TestServer, BIN};
use common::cli::Via;
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;
const APPLIES: u64 = 20;

/// A node of cluster "t" serving `v` over `shared`/d.img (backends `a` and
/// `b` are two names of that file), cut at `cut` with the head through
/// `first`: every cut maps the same bytes, but each changes the table.
fn node_body(etcd: &str, node: &str, shared: &Path, cut: u64, first: &str) -> String {
    format!(
        "{}\n{}\n[[volume]]\nname = \"v\"\n[[volume.extent]]\nlength = {cut}\nbackend = \"{first}\"\nbackend_offset = 0\n[[volume.extent]]\nlength = {}\nbackend = \"a\"\nbackend_offset = {cut}\n",
        cluster_section(etcd, node, 3),
        twin_backends(&shared.join("d.img"), SIZE),
        SIZE - cut
    )
}

/// Replaces the backends and volumes of `node`'s config with those of
/// `body` (its [server] and [cluster] stay).
fn recut(node: &TestServer, body: &str) {
    let old = std::fs::read_to_string(&node.config).unwrap();
    let head = old.split_once("\n[[backend]]").unwrap().0;
    let tail = body.split_once("\n[[backend]]").unwrap().1;
    std::fs::write(&node.config, format!("{head}\n[[backend]]{tail}")).unwrap();
}

fn apply(node: &TestServer) -> Value {
    let out = common::run_timeout(Command::new(BIN).args(["cluster", "apply", "--json", "--config"]).arg(&node.config).env_remove("NBDVIRT_CONFIG"), Duration::from_secs(120));
    assert!(out.status.success(), "cluster apply failed: {}\n--- log ---\n{}", text(&out), node.log());
    json(&String::from_utf8_lossy(&out.stdout))
}

#[test]
fn twenty_cluster_applies_under_fio_verify_through_two_nodes() {
    require("fio", "fio");
    let etcd = TestEtcd::start();
    let shared = tempfile::tempdir().unwrap();
    let nodes: Vec<TestServer> = ["n1", "n2", "n3"].iter().map(|n| start(&node_body(&etcd.url, n, shared.path(), 4 * MIB, "a"))).collect();
    for node in &nodes {
        wait_until(node, "three nodes alive and a coordinator", Duration::from_secs(15), || {
            let s = json(&cli_ok(node, &["cluster", "status", "--json"]));
            s["nodes"].as_array().unwrap().iter().filter(|n| n["alive"] == true).count() == 3 && !s["coordinator"].is_null()
        });
    }
    // fio through n1 on the first half and through n2 on the second,
    // back to back until the applies are done.
    let stop = Arc::new(AtomicBool::new(false));
    let fio = |i: usize, offset: u64| common::fio::verify_until(nodes[i].dir.path(), &nodes[i].uri("v"), 3, offset, SIZE / 2, &stop);
    let writers = [fio(0, 0), fio(1, SIZE / 2)];
    for node in &nodes[..2] {
        wait_until(node, "fio connected", Duration::from_secs(30), || vol(node, "v")["connections"].as_u64() >= Some(1));
    }
    let mut holds = Vec::new();
    for i in 1..=APPLIES {
        let cut = (1 + i % 15) * MIB;
        let first = if i % 2 == 0 { "a" } else { "b" };
        // Applied through a different node each time: n1 forwards to the
        // coordinator when it is not the coordinator itself.
        let via = &nodes[(i % 3) as usize];
        recut(via, &node_body(&etcd.url, "-", shared.path(), cut, first));
        let report = apply(via);
        let v = &report["volumes"][0];
        assert_eq!(v["generation"], i + 1, "apply {i}: {report}");
        assert_eq!(v["nodes"].as_array().unwrap().len(), 3, "apply {i}: every node swapped: {report}");
        holds.push(v["hold_us"].as_u64().unwrap());
    }
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        let verified = w.join().unwrap().unwrap_or_else(|e| panic!("fio through a node failed: {e}"));
        assert!(verified > 0);
    }
    // Every node ends on the same generation and table.
    let tables: Vec<Value> = nodes.iter().map(|n| vol(n, "v")).collect();
    for t in &tables {
        assert_eq!(t["generation"], APPLIES + 1, "{t}");
        assert_eq!(t["extents"], tables[0]["extents"], "the nodes' tables differ");
    }
    holds.sort_unstable();
    eprintln!("cluster apply hold (first Hold sent to last Decide answered): p50 {} µs, max {} µs over {APPLIES}", holds[holds.len() / 2], holds[holds.len() - 1]);
    // The barrier's threads ran at real-time priority (the tests run as
    // root); nothing else did or does: no I/O thread inherited it.
    // (A `Decide`'s thread may still be ending after its answer.)
    // SAFETY: geteuid has no preconditions.
    let expected: &[&str] = if unsafe { libc::geteuid() } == 0 { &["nbdvirt-peer"] } else { &[] };
    for node in &nodes {
        let raised = || thread_policies(node.pid()).into_iter().filter(|(_, policy)| *policy != 0).map(|(name, _)| name).collect::<Vec<_>>();
        wait_until(node, &format!("threads not at normal priority to be {expected:?}"), Duration::from_secs(5), || raised() == expected);
    }
    // A reload of a node whose file lags behind the cluster (n1 applied its
    // file at apply 18; two more came through the others) reverts nothing;
    // a table edited in the file and reloaded goes to every node.
    let report = json(&cli_ok(&nodes[0], &["reload", "--json"]));
    assert_eq!(report["swapped"], serde_json::json!([]), "a stale file reverted the cluster: {report}");
    assert!(nodes.iter().all(|n| generation(n, "v") == APPLIES + 1));
    recut(&nodes[0], &node_body(&etcd.url, "-", shared.path(), 5 * MIB, "b"));
    let report = json(&cli_ok(&nodes[0], &["reload", "--json"]));
    assert_eq!(report["swapped"][0]["generation"], APPLIES + 2, "{report}");
    let tables: Vec<Value> = nodes.iter().map(|n| vol(n, "v")).collect();
    assert!(tables.iter().all(|t| t["generation"] == APPLIES + 2 && t["extents"] == tables[0]["extents"]), "{tables:?}");
}

/// Volume `v` of 16 MiB: the first half over `shared`/d.img (through the
/// name `head`), the second over backend `tail` (`x` = x.img or `y` =
/// y.img, files of their own).
fn split_body(etcd: &str, node: &str, shared: &Path, head: &str, tail: &str) -> String {
    let half = SIZE / 2;
    let file = |name: &str, f: &str| format!("[[backend]]\nname = \"{name}\"\npath = \"{}\"\nsize = {half}\n", shared.join(f).display());
    format!(
        "{}\n{}\n{}\n{}\n[[volume]]\nname = \"v\"\n[[volume.extent]]\nlength = {half}\nbackend = \"{head}\"\nbackend_offset = 0\n[[volume.extent]]\nlength = {half}\nbackend = \"{tail}\"\nbackend_offset = 0\n",
        cluster_section(etcd, node, 3),
        twin_backends(&shared.join("d.img"), half),
        file("x", "x.img"),
        file("y", "y.img"),
    )
}

/// A node frozen (SIGSTOP) during a cluster apply: the barrier completes
/// once etcd has expired its lease, I/O through another node never fails,
/// and the frozen node, once thawed, serves nothing with the old table
/// (its old table maps the volume's second half to a file the new one no
/// longer uses: a stale write would show there) and re-joins current.
#[test]
fn a_frozen_node_is_committed_past_once_its_lease_expires_and_never_serves_the_old_table() {
    require("fio", "fio");
    let etcd = TestEtcd::start();
    let shared = tempfile::tempdir().unwrap();
    let nodes: Vec<TestServer> = ["n1", "n2", "n3"].iter().map(|n| start(&split_body(&etcd.url, n, shared.path(), "a", "x"))).collect();
    for node in &nodes {
        wait_until(node, "three nodes alive and a coordinator", Duration::from_secs(15), || {
            let s = json(&cli_ok(node, &["cluster", "status", "--json"]));
            s["nodes"].as_array().unwrap().iter().filter(|n| n["alive"] == true).count() == 3 && !s["coordinator"].is_null()
        });
    }
    // Freeze a node that is not the coordinator.
    let s = json(&cli_ok(&nodes[0], &["cluster", "status", "--json"]));
    let frozen = (0..3).rev().find(|i| s["coordinator"]["node"] != format!("n{}", i + 1)).unwrap();
    let via = (frozen + 1) % 3;
    let other = 3 - frozen - via;
    // A client of the frozen node, connected before the freeze, writes
    // into the second half once thawed.
    let flag = shared.path().join("go");
    let script = format!(
        "import os, time\nh.pread(4096, 0)\nwhile not os.path.exists('{flag}'):\n    time.sleep(0.05)\ntry:\n    h.pwrite(b'S' * 4096, {off})\n    h.flush()\n    print('answered')\nexcept nbd.Error as e:\n    print('failed')\n",
        flag = flag.display(),
        off = SIZE / 2
    );
    let stale = {
        let uri = nodes[frozen].uri("v");
        std::thread::spawn(move || common::nbdsh(&uri, &script))
    };
    wait_until(&nodes[frozen], "the client connected", Duration::from_secs(20), || vol(&nodes[frozen], "v")["connections"].as_u64() >= Some(1));
    // fio through another node on the first half, all along.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = common::fio::verify_until(nodes[other].dir.path(), &nodes[other].uri("v"), 3, 0, SIZE / 2, &stop);
    wait_until(&nodes[other], "fio connected", Duration::from_secs(30), || vol(&nodes[other], "v")["connections"].as_u64() >= Some(1));
    unsafe { libc::kill(nodes[frozen].pid(), libc::SIGSTOP) };
    recut(&nodes[via], &split_body(&etcd.url, "-", shared.path(), "b", "y"));
    let report = std::thread::scope(|s| {
        let applying = s.spawn(|| apply(&nodes[via]));
        // While it waits for the frozen node's lease, the coordinator shows
        // the barrier in progress.
        let coordinator = [&nodes[via], &nodes[other]].into_iter().find(|n| {
            let st = json(&cli_ok(n, &["cluster", "status", "--json"]));
            st["coordinator"]["node"] == st["node"]
        });
        let coordinator = coordinator.expect("the frozen node is not the coordinator");
        wait_until(coordinator, "the barrier shown in progress", Duration::from_secs(10), || {
            json(&cli_ok(coordinator, &["cluster", "status", "--json"]))["barriers"].as_array().unwrap().iter().any(|b| b["role"] == "coordinating" && b["volume"] == "v")
        });
        applying.join().unwrap()
    });
    let v = &report["volumes"][0];
    let frozen_name = format!("n{}", frozen + 1);
    assert_eq!(v["fenced"], serde_json::json!([frozen_name]), "{report}");
    let fenced_by = |s: &Value| s["nodes"].as_array().unwrap().iter().find(|n| n["node"] == frozen_name).unwrap()["fenced_by"].clone();
    // (The view is refreshed at every renewal.)
    wait_until(&nodes[via], "the frozen node shown fenced", Duration::from_secs(5), || {
        fenced_by(&json(&cli_ok(&nodes[via], &["cluster", "status", "--json"]))).as_str().is_some_and(|b| b.starts_with("v-"))
    });
    assert_eq!(json(&cli_ok(&nodes[via], &["cluster", "status", "--json"]))["barriers"], serde_json::json!([]), "no barrier left in progress");
    assert_eq!(v["nodes"].as_array().unwrap().len(), 2, "{report}");
    assert!(v["attempts"].as_u64().unwrap() >= 2, "{report}");
    let generation = v["generation"].as_u64().unwrap();
    // The node is thawed; its client writes.
    unsafe { libc::kill(nodes[frozen].pid(), libc::SIGCONT) };
    std::fs::write(&flag, b"").unwrap();
    let said = stale.join().unwrap();
    // Nothing reached the old table's file, whatever the client was told.
    let x = std::fs::read(shared.path().join("x.img")).unwrap();
    assert!(x.iter().all(|b| *b == 0), "a write reached the old table's file through the thawed node ({})\n--- its log ---\n{}", said.trim(), nodes[frozen].log());
    // It re-joins on the committed table.
    wait_until(&nodes[frozen], "the thawed node current and serving", Duration::from_secs(30), || {
        let s = json(&cli_ok(&nodes[frozen], &["cluster", "status", "--json"]));
        s["state"] == "serving" && vol(&nodes[frozen], "v")["generation"] == generation
    });
    assert_eq!(vol(&nodes[frozen], "v")["extents"], vol(&nodes[via], "v")["extents"]);
    wait_until(&nodes[via], "the re-joined node no longer shown fenced", Duration::from_secs(10), || fenced_by(&json(&cli_ok(&nodes[via], &["cluster", "status", "--json"]))).is_null());
    stop.store(true, Ordering::SeqCst);
    let verified = writer.join().unwrap().unwrap_or_else(|e| panic!("fio through node {other} failed: {e}"));
    assert!(verified > 0);
}

/// The coordinator killed (abort, like kill -9) at each phase of a
/// barrier: the holding nodes settle it with etcd and converge on one
/// generation (the old one unless the commit reached etcd), a new
/// coordinator takes over and applies again, the killed node rejoins on
/// the committed table, and writes acknowledged before are intact.
#[test]
fn a_coordinator_killed_at_each_barrier_phase_leaves_one_generation() {
    require("fio", "fio");
    for (phase, committed) in [("held", false), ("committed", true), ("decided", true)] {
        let etcd = TestEtcd::start();
        let shared = tempfile::tempdir().unwrap();
        let server_keys = "pause_timeout = \"1s\"";
        let body = |node: &str, cut: u64, first: &str| node_body(&etcd.url, node, shared.path(), cut, first);
        // n1 starts first, so it coordinates; it dies at `phase`.
        let mut n1 = TestServer::prepare_with_server(server_keys, &body("n1", 4 * MIB, "a"));
        n1.runner = vec!["env".into(), format!("NBDVIRT_TEST_BARRIER_CRASH={phase}")];
        n1.spawn();
        wait_control(&n1);
        wait_until(&n1, "n1 coordinating", Duration::from_secs(15), || json(&cli_ok(&n1, &["cluster", "status", "--json"]))["coordinator"]["node"] == "n1");
        let mut rest: Vec<TestServer> = ["n2", "n3"].iter().map(|n| TestServer::start_with_server(server_keys, &body(n, 4 * MIB, "a"))).collect();
        for node in &rest {
            wait_control(node);
            wait_until(node, "three nodes alive", Duration::from_secs(15), || {
                json(&cli_ok(node, &["cluster", "status", "--json"]))["nodes"].as_array().unwrap().iter().filter(|n| n["alive"] == true).count() == 3
            });
        }
        common::nbdsh(&rest[0].uri("v"), &format!("h.pwrite(b'W' * 4096, {}); h.flush()", 12 * MIB));
        // fio through n3 all along.
        let stop = Arc::new(AtomicBool::new(false));
        let writer = common::fio::verify_until(rest[1].dir.path(), &rest[1].uri("v"), 8, 0, SIZE / 2, &stop);
        // Applied through n2, forwarded to n1, which dies.
        recut(&rest[0], &body("-", 6 * MIB, "b"));
        let out = cli_via(Via::Config, &rest[0], &["cluster", "apply"]);
        assert!(!out.status.success(), "{phase}: the apply cannot succeed with its coordinator killed: {}", text(&out));
        let _ = n1.child.as_mut().unwrap().wait();
        assert!(n1.log().contains("NBDVIRT_TEST_BARRIER_CRASH"), "{phase}: n1 did not crash where asked:\n{}", n1.log());
        let want = if committed { 2 } else { 1 };
        for node in &rest {
            wait_until(node, "the survivors settled on one generation", Duration::from_secs(20), || vol(node, "v")["generation"] == want && vol(node, "v")["state"] == "running");
        }
        assert_eq!(vol(&rest[0], "v")["extents"], vol(&rest[1], "v")["extents"], "{phase}: the survivors' tables differ");
        // A new coordinator takes over and applies.
        wait_until(&rest[0], "a new coordinator", Duration::from_secs(20), || {
            let s = json(&cli_ok(&rest[0], &["cluster", "status", "--json"]));
            s["coordinator"]["node"] != "n1" && !s["coordinator"].is_null()
        });
        recut(&rest[0], &body("-", 2 * MIB, "a"));
        let report = apply(&rest[0]);
        assert_eq!(report["volumes"][0]["generation"], want + 1, "{phase}: {report}");
        // The killed node restarts (without the hook) on the committed table.
        n1.runner.clear();
        respawn(&mut n1);
        wait_until(&n1, "n1 current again", Duration::from_secs(20), || vol(&n1, "v")["extents"] == vol(&rest[0], "v")["extents"]);
        stop.store(true, Ordering::SeqCst);
        assert!(writer.join().unwrap().unwrap_or_else(|e| panic!("{phase}: fio through n3 failed: {e}")) > 0);
        let out = common::nbdsh(&rest[1].uri("v"), &format!("print(h.pread(4096, {}) == b'W' * 4096)", 12 * MIB));
        assert_eq!(out.trim(), "True", "{phase}: an acknowledged write is gone");
        for node in rest.iter_mut() {
            node.kill();
        }
    }
}

/// Each thread's name and scheduling policy (0 normal, 2 round-robin),
/// from /proc (field 41 of a task's stat).
fn thread_policies(pid: i32) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else { continue };
        let (name, rest) = (&stat[stat.find('(').unwrap() + 1..stat.rfind(')').unwrap()], &stat[stat.rfind(')').unwrap() + 2..]);
        let policy = rest.split_whitespace().nth(41 - 3).unwrap().parse().unwrap();
        out.push((name.to_string(), policy));
    }
    out
}
