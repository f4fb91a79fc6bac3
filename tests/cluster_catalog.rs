//! Volumes and backends added and removed cluster-wide (`cluster apply`
//! of a file with other volumes or backends): one catalog barrier on every
//! node. A node down during the add takes the new volume when it rejoins
//! with its old file; a node that cannot reach the new store forwards it;
//! a reload of a node's unchanged file keeps the cluster's volumes; a
//! removal is refused while a client uses the volume anywhere, and
//! `--force` cuts it; a node restarted with the removed volume still in
//! its file does not serve it.

mod common;

use common::cli::*;
use common::etcd::{cluster_section, twin_backends, TestEtcd};
use common::TestServer;
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;

fn node_body(etcd: &str, node: &str, shared: &Path) -> String {
    format!(
        "{}\n{}\n[[volume]]\nname = \"v\"\n[[volume.extent]]\nlength = {SIZE}\nbackend = \"a\"\nbackend_offset = 0\n",
        cluster_section(etcd, node, 3),
        twin_backends(&shared.join("d.img"), SIZE)
    )
}

/// Backend `c` (a file only n1 and n2 reach) and volume `w` on it.
fn added(shared: &Path) -> String {
    format!(
        "\n[[backend]]\nname = \"c\"\npath = \"{}\"\nsize = {}\nnodes = [\"n1\", \"n2\"]\n\n[[volume]]\nname = \"w\"\n[[volume.extent]]\nlength = {}\nbackend = \"c\"\nbackend_offset = 0\n",
        shared.join("e.img").display(),
        8 * MIB,
        8 * MIB
    )
}

/// A node that also listens on loopback TCP (where others forward to it).
fn node(etcd: &str, name: &str, shared: &Path) -> TestServer {
    let tcp = format!("tcp:127.0.0.1:{}", common::free_port());
    let server = TestServer::start_with(&node_body(etcd, name, shared), &[&tcp]);
    wait_control(&server);
    server
}

fn apply(node: &TestServer, extra: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(common::BIN);
    cmd.args(["cluster", "apply", "--json", "--config"]).arg(&node.config).args(extra).env_remove("NBDVIRT_CONFIG");
    common::run_timeout(&mut cmd, Duration::from_secs(120))
}

fn volumes(node: &TestServer) -> Vec<String> {
    poll_status(node)["volumes"].as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap().to_string()).collect()
}

fn backends(node: &TestServer) -> Vec<String> {
    poll_status(node)["backends"].as_array().unwrap().iter().map(|b| b["name"].as_str().unwrap().to_string()).collect()
}

fn all_alive(nodes: &[&TestServer], n: usize) {
    for node in nodes {
        wait_until(node, "the nodes alive and a coordinator", Duration::from_secs(20), || {
            let s = json(&cli_ok(node, &["cluster", "status", "--json"]));
            s["nodes"].as_array().unwrap().iter().filter(|n| n["alive"] == true).count() == n && !s["coordinator"].is_null()
        });
    }
}

#[test]
fn volumes_and_backends_are_added_and_removed_on_every_node() {
    let etcd = TestEtcd::start();
    let shared = tempfile::tempdir().unwrap();
    let (mut n1, mut n2, mut n3) = (node(&etcd.url, "n1", shared.path()), node(&etcd.url, "n2", shared.path()), node(&etcd.url, "n3", shared.path()));
    all_alive(&[&n1, &n2, &n3], 3);
    let original_n1 = std::fs::read_to_string(&n1.config).unwrap();

    // n3 is down while w is added: the barrier commits past it once its
    // lease has expired.
    n3.kill();
    std::fs::write(&n1.config, format!("{original_n1}{}", added(shared.path()))).unwrap();
    let out = apply(&n1, &[]);
    assert!(out.status.success(), "cluster apply failed: {}\n--- log ---\n{}", text(&out), n1.log());
    let report: Value = json(&String::from_utf8_lossy(&out.stdout));
    let catalog = &report["volumes"][0];
    assert_eq!(catalog["volume"], "(catalog)", "{report}");
    assert_eq!(catalog["added"], serde_json::json!(["w"]), "{report}");
    assert_eq!(catalog["nodes"], serde_json::json!(["n1", "n2"]), "{report}");
    // Seen at n2's next look at etcd.
    wait_until(&n2, "the catalog in cluster status", Duration::from_secs(10), || !json(&cli_ok(&n2, &["cluster", "status", "--json"]))["catalog"].is_null());
    let status = json(&cli_ok(&n2, &["cluster", "status", "--json"]));
    assert_eq!(status["catalog"]["file"], n1.config.display().to_string(), "{status}");
    assert_eq!(status["catalog"]["node"], report["coordinator"], "{status}");
    for n in [&n1, &n2] {
        assert_eq!(volumes(n), ["v", "w"], "{}", n.log());
        assert!(backends(n).contains(&"c".to_string()), "{}", poll_status(n));
    }

    // n3 comes back on its old file (no w, no c): it takes the catalog
    // and serves w by forwarding it to a node that reaches c.
    respawn(&mut n3);
    all_alive(&[&n1, &n2, &n3], 3);
    assert_eq!(volumes(&n3), ["v", "w"], "{}", n3.log());
    let data = common::pattern(7, 4096);
    let hex: String = data.iter().map(|b| format!("{b:02x}")).collect();
    common::nbdsh(&n3.uri("w"), &format!("h.pwrite(bytes.fromhex('{hex}'), {MIB})\nh.flush()\n"));
    let read = common::nbdsh(&n1.uri("w"), &format!("print(h.pread({}, {MIB}).hex())\n", data.len()));
    assert_eq!(read.trim(), hex, "written through n3, read through n1");
    assert_eq!(common::read_at(&shared.path().join("e.img"), MIB, data.len()), data);
    assert!(vol(&n3, "w")["extents"][0].get("forwarded").is_some(), "n3 cannot reach c: it forwards\n{}", poll_status(&n3));

    // A reload of a file unchanged since it was read keeps the cluster's
    // volumes (n2's file never had w).
    cli_ok(&n2, &["reload"]);
    assert_eq!(volumes(&n2), ["v", "w"]);
    // A reload whose file adds a volume while it lags behind the cluster's
    // (no w) is refused: it would drop w; that is cluster apply's.
    let n2_file = std::fs::read_to_string(&n2.config).unwrap();
    std::fs::write(&n2.config, format!("{n2_file}{}", added(shared.path()).replace("\"w\"", "\"x\"").replace("name = \"c\"", "name = \"c2\"").replace("backend = \"c\"", "backend = \"c2\""))).unwrap();
    let out = cli(&n2, &["reload"]);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));
    assert!(text(&out).contains("cluster apply"), "{}", text(&out));
    std::fs::write(&n2.config, &n2_file).unwrap();

    // Removing w while a client of n2 uses it: refused, naming the node.
    let mut client = Command::new("nbdsh")
        .env("PATH", common::debian_path())
        .args(["-u", &n2.uri("w"), "-c", "import time\ntime.sleep(60)"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nbdsh");
    wait_until(&n2, "the client connected", Duration::from_secs(10), || vol(&n2, "w")["connections"].as_u64() >= Some(1));
    let first_life = generation(&n1, "w");
    std::fs::write(&n1.config, &original_n1).unwrap();
    let out = apply(&n1, &[]);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));
    assert!(text(&out).contains("n2") && text(&out).contains("client"), "{}", text(&out));
    for n in [&n1, &n2, &n3] {
        assert_eq!(volumes(n), ["v", "w"], "a refused removal changed nothing");
    }
    let out = apply(&n1, &["--force"]);
    assert!(out.status.success(), "{}\n{}", text(&out), n1.log());
    let report: Value = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(report["volumes"][0]["removed"], serde_json::json!(["w"]), "{report}");
    for n in [&n1, &n2, &n3] {
        assert_eq!(volumes(n), ["v"], "{}", n.log());
        assert!(!backends(n).contains(&"c".to_string()), "{}", poll_status(n));
    }
    let _ = client.kill();
    let _ = client.wait();

    // n1 restarted on a file that still has w and c: the cluster's catalog
    // wins before it serves.
    n1.stop();
    std::fs::write(&n1.config, format!("{original_n1}{}", added(shared.path()))).unwrap();
    respawn(&mut n1);
    all_alive(&[&n1, &n2, &n3], 3);
    assert_eq!(volumes(&n1), ["v"], "{}", n1.log());

    // Added again (n1's file has it now): its generations continue above
    // the tombstone's, on every node.
    let out = apply(&n1, &[]);
    assert!(out.status.success(), "{}\n{}", text(&out), n1.log());
    for n in [&n1, &n2, &n3] {
        assert!(generation(n, "w") > first_life + 1, "{} vs {first_life}", generation(n, "w"));
    }
    let _ = n2.stop();
}

/// A node restarted on a file edited while it was down starts on its last
/// committed table (numbered like the other nodes', which forward by that
/// number), not on a table of its own; `reload` then applies the edit on
/// every node, and so it does volumes the file adds or removes.
#[test]
fn a_file_edited_while_the_node_was_down_is_applied_by_reload_on_every_node() {
    let etcd = TestEtcd::start();
    let shared = tempfile::tempdir().unwrap();
    let (n1, mut n2) = (node(&etcd.url, "n1", shared.path()), node(&etcd.url, "n2", shared.path()));
    all_alive(&[&n1, &n2], 2);
    n2.stop();
    let file = std::fs::read_to_string(&n2.config).unwrap();
    let edited = file.replace("length = 16777216\nbackend = \"a\"", "length = 16777216\nbackend = \"b\"");
    assert_ne!(edited, file);
    std::fs::write(&n2.config, &edited).unwrap();
    respawn(&mut n2);
    all_alive(&[&n1, &n2], 2);
    assert_eq!(vol(&n2, "v")["extents"], vol(&n1, "v")["extents"], "n2 serves a table of its own\n{}", n2.log());
    assert_eq!(generation(&n2, "v"), generation(&n1, "v"));
    assert!(n2.log().contains("`nbdvirt reload` applies the file's on every node"), "{}", n2.log());
    cli_ok(&n2, &["reload"]);
    for n in [&n1, &n2] {
        assert_eq!(extents_of(&vol(n, "v")), [(0, SIZE, "b".to_string(), 0)], "{}", n.log());
    }
    assert_eq!(generation(&n2, "v"), generation(&n1, "v"));

    // n2's file has the cluster's volumes: a reload of it adding volume w
    // (on a new backend) adds it on every node, and one removing it again
    // removes it everywhere.
    std::fs::write(&n2.config, format!("{edited}{}", added(shared.path()))).unwrap();
    let report = json(&cli_ok(&n2, &["reload", "--json"]));
    assert_eq!(report["added"], serde_json::json!(["w"]), "{report}");
    for n in [&n1, &n2] {
        assert_eq!(volumes(n), ["v", "w"], "{}", n.log());
    }
    std::fs::write(&n2.config, &edited).unwrap();
    let report = json(&cli_ok(&n2, &["reload", "--json"]));
    assert_eq!(report["removed"], serde_json::json!(["w"]), "{report}");
    for n in [&n1, &n2] {
        assert_eq!(volumes(n), ["v"], "{}", n.log());
    }
    // A file too large for etcd to keep as the catalog is refused up front.
    let comment = format!("# {}\n", "x".repeat(1 << 20));
    std::fs::write(&n2.config, format!("{edited}{comment}{}", added(shared.path()))).unwrap();
    let out = apply(&n2, &[]);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));
    assert!(text(&out).contains("at most 1048576 bytes"), "{}", text(&out));
    assert_eq!(volumes(&n1), ["v"]);
}
