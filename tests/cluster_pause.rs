//! `pause` and `resume` in a cluster act on every live node: a write
//! through another node than the one asked is held too, and runs once
//! `resume` (through yet another node) ends the pauses.

mod common;

use common::cli::*;
use common::etcd::{cluster_section, twin_backends, TestEtcd};
use common::TestServer;
use std::time::{Duration, Instant};

const SIZE: u64 = 16 << 20;

fn node_body(etcd: &str, node: &str, shared: &std::path::Path) -> String {
    format!(
        "{}\n{}\n[[volume]]\nname = \"v\"\n[[volume.extent]]\nlength = {SIZE}\nbackend = \"a\"\nbackend_offset = 0\n",
        cluster_section(etcd, node, 3),
        twin_backends(&shared.join("d.img"), SIZE)
    )
}

#[test]
fn a_pause_holds_the_volume_on_every_node_until_resume() {
    let etcd = TestEtcd::start();
    let shared = tempfile::tempdir().unwrap();
    let nodes: Vec<TestServer> = ["n1", "n2", "n3"].iter().map(|n| start(&node_body(&etcd.url, n, shared.path()))).collect();
    for node in &nodes {
        wait_until(node, "three nodes alive", Duration::from_secs(15), || {
            json(&cli_ok(node, &["cluster", "status", "--json"]))["nodes"].as_array().unwrap().iter().filter(|n| n["alive"] == true).count() == 3
        });
    }
    let said = cli_ok(&nodes[0], &["pause", "v", "--timeout", "60s"]);
    assert!(said.contains("paused on n1, n2, n3"), "{said}");
    for node in &nodes {
        assert_eq!(vol(node, "v")["manual_pause"], true, "{}", node.log());
    }
    // A write through n2 waits for the pause (n1 was asked).
    let uri = nodes[1].uri("v");
    let writer = std::thread::spawn(move || {
        let t = Instant::now();
        common::nbdsh(&uri, "h.pwrite(b'P' * 4096, 0)\nh.flush()\n");
        t.elapsed()
    });
    wait_until(&nodes[1], "the write held on n2", Duration::from_secs(10), || vol(&nodes[1], "v")["held_requests"].as_u64() >= Some(1));
    std::thread::sleep(Duration::from_millis(500));
    assert!(!writer.is_finished(), "the write through n2 ran during the pause");
    let said = cli_ok(&nodes[2], &["resume", "v"]);
    assert!(said.contains("resumed on n1, n2, n3"), "{said}");
    let took = writer.join().unwrap();
    assert!(took >= Duration::from_millis(500), "the write was held: {took:?}");
    assert_eq!(common::read_at(&shared.path().join("d.img"), 0, 4096), vec![b'P'; 4096]);
    for node in &nodes {
        assert_eq!(vol(node, "v")["manual_pause"], false);
    }
    // Nothing paused any more: resume says so.
    let out = cli(&nodes[0], &["resume", "v"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    // A second pause while one holds is refused, and leaves nothing behind
    // once the first is resumed.
    cli_ok(&nodes[2], &["pause", "v", "--timeout", "60s"]);
    let out = cli(&nodes[1], &["pause", "v"]);
    assert!(!out.status.success(), "{}", text(&out));
    cli_ok(&nodes[2], &["resume", "v"]);
    for node in &nodes {
        assert_eq!(vol(node, "v")["manual_pause"], false, "a failed pause left a hold: {}", node.log());
    }
}
