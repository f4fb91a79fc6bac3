//! Forwarding (issue test 4): a volume whose second half lives on a store
//! only n1 may reach (`nodes = ["n1"]`), served through n3, which forwards
//! those pieces to n1 over NBD: fio verify passes, also across cluster
//! changes; `status` shows the link; a connection stamped with a table two
//! generations old is refused; n1 killed → n3's requests on that half
//! fail with an error within the forwarding bound, never with wrong data,
//! while the other half keeps working; n1 back → n3 forwards again.

mod common;

use common::cli::*;
use common::etcd::{cluster_section, TestEtcd};
use common::TestServer;
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;

/// `a` (only n1 reaches it) and `b` (every node): two names of one file,
/// so that re-cutting the table never changes the data.
fn backends(file: &Path) -> String {
    let f = file.display();
    format!(
        "[[backend]]\nname = \"a\"\npath = \"{f}\"\nsize = {SIZE}\nshared = true\nnodes = [\"n1\"]\n\n[[backend]]\nname = \"b\"\npath = \"{f}\"\nsize = {SIZE}\nshared = true\n"
    )
}

/// Volume `v`: `[0, cut)` on b, `[cut, SIZE)` on a.
fn body(etcd: &str, node: &str, shared: &Path, cut: u64) -> String {
    format!(
        "{}\n{}\n[[volume]]\nname = \"v\"\n[[volume.extent]]\nlength = {cut}\nbackend = \"b\"\nbackend_offset = 0\n[[volume.extent]]\nlength = {}\nbackend = \"a\"\nbackend_offset = {cut}\n",
        cluster_section(etcd, node, 2),
        backends(&shared.join("d.img")),
        SIZE - cut
    )
}

/// A node that also listens on loopback TCP (where others forward to it).
fn node(etcd: &str, name: &str, shared: &Path) -> TestServer {
    let tcp = format!("tcp:127.0.0.1:{}", common::free_port());
    let server = TestServer::start_with(&body(etcd, name, shared, 8 * MIB), &[&tcp]);
    wait_control(&server);
    server
}

fn forwarded(node: &TestServer) -> Vec<Value> {
    vol(node, "v")["extents"].as_array().unwrap().iter().filter_map(|e| e.get("forwarded").cloned()).collect()
}

/// An nbdsh script's outcome, without panicking on failure.
fn nbdsh_try(uri: &str, script: &str) -> std::process::Output {
    common::require("nbdsh", "python3-libnbd");
    common::run_timeout(Command::new("nbdsh").env("PATH", common::debian_path()).args(["-u", uri, "-c", script]), Duration::from_secs(60))
}

#[test]
fn a_node_forwards_what_it_cannot_reach_and_fails_cleanly_when_the_owner_is_gone() {
    common::require("fio", "fio");
    let etcd = TestEtcd::start();
    let shared = tempfile::tempdir().unwrap();
    std::fs::write(shared.path().join("d.img"), vec![0u8; SIZE as usize]).unwrap();
    let mut nodes: Vec<TestServer> = ["n1", "n2", "n3"].iter().map(|n| node(&etcd.url, n, shared.path())).collect();
    for n in &nodes {
        wait_until(n, "all three serving", Duration::from_secs(20), || {
            let s = json(&cli_ok(n, &["cluster", "status", "--json"]));
            s["state"] == "serving" && s["nodes"].as_array().unwrap().iter().filter(|m| m["alive"] == true && m["serve"].is_string()).count() == 3
        });
    }
    assert!(forwarded(&nodes[0]).is_empty(), "n1 reaches every store: {}", vol(&nodes[0], "v"));
    let n1_tcp = json(&cli_ok(&nodes[0], &["cluster", "status", "--json"]))["nodes"][0]["serve"].as_str().unwrap().to_string();
    assert!(n1_tcp.starts_with("tcp:"), "{n1_tcp}");

    // 1. fio verify through n3 over the whole volume (half local, half
    // forwarded) while the table is re-cut three times: a barrier under
    // forwarded load must not wait on itself.
    let stop = Arc::new(AtomicBool::new(false));
    let fio = common::fio::verify_until(nodes[2].dir.path(), &nodes[2].uri("v"), 3, 0, SIZE, &stop);
    wait_until(&nodes[2], "fio connected", Duration::from_secs(30), || vol(&nodes[2], "v")["connections"].as_u64() >= Some(1));
    for cut in [6 * MIB, 10 * MIB, 7 * MIB, 11 * MIB, 8 * MIB] {
        std::thread::sleep(Duration::from_secs(1));
        let file = nodes[2].dir.path().join("recut.toml");
        std::fs::write(&file, body(&etcd.url, "-", shared.path(), cut)).unwrap();
        let out = cli(&nodes[2], &["cluster", "apply", "--json", "--config", file.to_str().unwrap()]);
        assert!(out.status.success(), "cluster apply under forwarded load: {}", text(&out));
        let report = json(&String::from_utf8_lossy(&out.stdout));
        eprintln!("apply to cut {cut}: {report}");
        // A second attempt means a drain timed out: a forwarded request
        // parked on n1 behind the same barrier it was draining for.
        assert_eq!(report["volumes"][0]["attempts"], 1, "{report}");
    }
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::SeqCst);
    let verified = fio.join().unwrap().unwrap_or_else(|e| panic!("fio through the forwarding node failed: {e}"));
    assert!(verified > 0);
    let gen_now = generation(&nodes[2], "v");
    assert!(nodes.iter().all(|n| generation(n, "v") == gen_now), "every node on generation {gen_now}");

    // 2. status shows the forwarding: the link to n1, used, nothing failed.
    let links = forwarded(&nodes[2]);
    assert_eq!(links.len(), 1, "{}", vol(&nodes[2], "v"));
    assert_eq!(links[0]["to"].as_str(), Some(n1_tcp.as_str()), "{links:?}");
    assert!(links[0]["requests"].as_u64().unwrap() > 0 && links[0]["failed"] == 0, "{links:?}");
    let shown = cli_ok(&nodes[2], &["status"]);
    assert!(shown.contains(&format!("forwarded to {n1_tcp}")), "{shown}");

    // What n3 reads in the forwarded half is what is in the file.
    let file_bytes = common::read_at(&shared.path().join("d.img"), 12 * MIB, 64 * 1024);
    let read = nbdsh_try(&nodes[2].uri("v"), &format!("import sys; sys.stdout.buffer.write(h.pread({}, {}))", 64 * 1024, 12 * MIB));
    assert!(read.status.success(), "{}", text(&read));
    assert!(read.stdout == file_bytes, "n3 read other bytes than the file holds");

    // 3. The stamp: a connection stamped with the current table is served,
    // one two generations behind is refused.
    let script = |g: u64| format!("import nbd\nh2 = nbd.NBD()\nh2.add_meta_context('nbdvirt:generation={g}')\nh2.connect_uri('{}')\nassert h2.can_meta_context('nbdvirt:generation={g}')\nprint(len(h2.pread(4096, 12 * 1048576)))", nodes[0].uri("v"));
    let current = nbdsh_try(&nodes[0].uri("v"), &script(gen_now));
    assert!(current.status.success() && String::from_utf8_lossy(&current.stdout).trim() == "4096", "current stamp: {}", text(&current));
    let stale = nbdsh_try(&nodes[0].uri("v"), &script(gen_now - 2));
    assert!(!stale.status.success(), "a stamp two generations old was served: {}", text(&stale));

    // 4. n1 killed: n3 fails requests on the forwarded half with an error
    // within the bound (10 s; the Linux client waits 30 s), serves the
    // other half, and never answers with data.
    nodes[0].kill();
    let started = Instant::now();
    let lost = nbdsh_try(&nodes[2].uri("v"), &format!("h.pread(4096, {})", 12 * MIB));
    let took = started.elapsed();
    assert!(!lost.status.success(), "a read of the forwarded half with its only node dead answered: {}", text(&lost));
    assert!(took < Duration::from_secs(30), "the failed read took {took:?}, past a Linux client's timeout");
    let local = nbdsh_try(&nodes[2].uri("v"), "print(len(h.pread(4096, 0)))");
    assert!(local.status.success(), "the local half with n1 dead: {}", text(&local));
    let links = forwarded(&nodes[2]);
    assert!(links[0]["failed"].as_u64().unwrap() >= 1, "{links:?}");

    // 5. n1 back: n3 forwards to it again, without a restart of its own.
    respawn(&mut nodes[0]);
    wait_until(&nodes[2], "n1 serving again", Duration::from_secs(30), || {
        nbdsh_try(&nodes[2].uri("v"), &format!("h.pread(4096, {})", 12 * MIB)).status.success()
    });
}

/// `nbdinfo --map` of v through `node`: (offset, length, hole) runs, with
/// neighbours of one kind merged (two servers may cut runs differently).
fn map(node: &TestServer) -> Vec<(u64, u64, bool)> {
    common::require("nbdinfo", "libnbd-bin");
    let out = common::run_ok(Command::new("nbdinfo").env("PATH", common::debian_path()).args(["--map", "--json", &node.uri("v")]));
    let mut runs: Vec<(u64, u64, bool)> = Vec::new();
    for e in json(&out).as_array().unwrap() {
        let (offset, length, hole) = (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap(), e["type"].as_u64().unwrap() & 1 != 0);
        match runs.last_mut() {
            Some(last) if last.2 == hole && last.0 + last.1 == offset => last.1 += length,
            _ => runs.push((offset, length, hole)),
        }
    }
    runs
}

/// BLOCK_STATUS through a link: the map n3 shows of the half it forwards is
/// the owner's, holes and all, so a sparse copy through n3 skips them too.
#[test]
fn the_map_through_a_forwarding_node_shows_the_owners_holes() {
    let etcd = TestEtcd::start();
    let shared = tempfile::tempdir().unwrap();
    let file = shared.path().join("d.img");
    std::fs::File::create(&file).unwrap().set_len(SIZE).unwrap();
    for (at, len) in [(MIB, 64 * 1024), (9 * MIB, 64 * 1024), (13 * MIB, 128 * 1024)] {
        common::write_at(&file, at, &vec![0xab; len]);
    }
    let nodes: Vec<TestServer> = ["n1", "n3"].iter().map(|n| node(&etcd.url, n, shared.path())).collect();
    for n in &nodes {
        wait_until(n, "both serving", Duration::from_secs(20), || {
            let s = json(&cli_ok(n, &["cluster", "status", "--json"]));
            s["state"] == "serving" && s["nodes"].as_array().unwrap().iter().filter(|m| m["alive"] == true && m["serve"].is_string()).count() == 2
        });
    }
    let direct = map(&nodes[0]);
    assert!(direct.iter().any(|r| r.2 && r.0 >= 8 * MIB), "the file has holes in the forwarded half: {direct:?}");
    assert!(direct.iter().any(|r| !r.2 && r.0 <= 9 * MIB && r.0 + r.1 > 9 * MIB), "data at 9 MiB: {direct:?}");
    assert_eq!(map(&nodes[1]), direct, "the map through the forwarding node");
    let links = forwarded(&nodes[1]);
    assert!(links.len() == 1 && links[0]["requests"].as_u64() > Some(0) && links[0]["failed"] == 0, "{links:?}");
}
