//! Cluster mode on a real etcd (Debian's etcd-server, started by the test
//! on loopback): membership leases, the coordinator and its epoch, the
//! serving fence when etcd is lost, and the errors of a bad start.

mod common;

use common::cli::*;
use common::etcd::{cluster_section, TestEtcd};
use common::{free_port, run_timeout, TestServer, BIN};
use serde_json::Value;
use std::process::Command;
use std::time::Duration;

fn node_body(etcd: &str, node: &str, ttl: u32) -> String {
    format!(
        r#"{cluster}
[[backend]]
name = "b"
path = "{{dir}}/b.img"
size = "16MiB"

[[volume]]
name = "v"
[[volume.extent]]
length = "16MiB"
backend = "b"
backend_offset = 0
"#,
        cluster = cluster_section(etcd, node, ttl)
    )
}

fn cluster_status(node: &TestServer) -> Value {
    json(&cli_ok(node, &["cluster", "status", "--json"]))
}

fn node_of<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["nodes"].as_array().unwrap().iter().find(|n| n["node"] == name).unwrap_or_else(|| panic!("no node {name} in {status}"))
}

fn coordinator(status: &Value) -> (String, i64) {
    let c = &status["coordinator"];
    (c["node"].as_str().unwrap_or_else(|| panic!("no coordinator in {status}")).to_string(), c["epoch"].as_i64().unwrap())
}

#[test]
fn three_nodes_join_one_coordinates_and_all_see_the_same() {
    let etcd = TestEtcd::start();
    let nodes: Vec<TestServer> = ["n1", "n2", "n3"].iter().map(|n| start(&node_body(&etcd.url, n, 2))).collect();
    // Every node publishes itself at its next tick (a third of its serving window).
    for node in &nodes {
        wait_until(node, "all three nodes alive with one coordinator", Duration::from_secs(10), || {
            let s = cluster_status(node);
            s["nodes"].as_array().unwrap().iter().filter(|n| n["alive"] == true).count() == 3 && !s["coordinator"].is_null()
        });
    }
    let views: Vec<Value> = nodes.iter().map(cluster_status).collect();
    let (leader, epoch) = coordinator(&views[0]);
    assert!(epoch > 0, "{}", views[0]);
    for (i, s) in views.iter().enumerate() {
        assert_eq!(s["state"], "serving", "{s}");
        assert_eq!(s["node"], format!("n{}", i + 1));
        assert_eq!(coordinator(s), (leader.clone(), epoch), "all nodes agree on the coordinator: {s}");
        assert_eq!(s["nodes"].as_array().unwrap().iter().filter(|n| n["coordinator"] == true).count(), 1, "{s}");
        assert!(s["highest_epoch"].as_i64().unwrap() >= epoch, "{s}");
        for n in ["n1", "n2", "n3"] {
            let v = node_of(s, n);
            assert_eq!(v["generations"]["v"], 1, "{s}");
            assert!(v["lease_left_ms"].as_u64().unwrap() <= 2000, "{s}");
        }
    }
    // The epoch is persisted in the state directory.
    let persisted: Value = json(&std::fs::read_to_string(nodes[0].path("state/cluster/epoch.json")).unwrap());
    assert!(persisted["highest"].as_i64().unwrap() >= epoch);
    // Serving: a real client reads and writes through every node.
    for node in &nodes {
        let out = common::nbdsh(&node.uri("v"), "h.pwrite(b'x' * 4096, 0); assert h.pread(4096, 0) == b'x' * 4096; print('ok')");
        assert_eq!(out.trim(), "ok");
    }
    // The human view names the coordinator.
    let text = cli_ok(&nodes[1], &["cluster", "status"]);
    assert!(text.contains(&format!("coordinator {leader} (epoch {epoch})")), "{text}");
    // [cluster] cannot change by a reload.
    let config = std::fs::read_to_string(&nodes[1].config).unwrap();
    std::fs::write(&nodes[1].config, config.replace("lease_ttl = \"2s\"", "lease_ttl = \"3s\"")).unwrap();
    let out = cli(&nodes[1], &["reload"]);
    assert_eq!(out.status.code(), Some(7), "{}", text_of(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("[cluster] cannot change by a reload"), "{}", text_of(&out));
}

fn text_of(out: &std::process::Output) -> String {
    text(out)
}

#[test]
fn a_killed_coordinator_is_replaced_with_a_higher_epoch_and_rejoins_as_a_member() {
    let etcd = TestEtcd::start();
    let mut nodes: Vec<TestServer> = ["n1", "n2", "n3"].iter().map(|n| start(&node_body(&etcd.url, n, 2))).collect();
    wait_until(&nodes[2], "a coordinator", Duration::from_secs(10), || !cluster_status(&nodes[2])["coordinator"].is_null());
    let (old, old_epoch) = coordinator(&cluster_status(&nodes[2]));
    let dead = old[1..].parse::<usize>().unwrap() - 1;
    nodes[dead].kill();
    let survivor = (dead + 1) % 3;
    // The old key lives until its lease expires in etcd (2 s), then the
    // next tick of a survivor takes over.
    wait_until(&nodes[survivor], "a new coordinator", Duration::from_secs(10), || {
        let s = cluster_status(&nodes[survivor]);
        s["coordinator"]["node"] != old.as_str() && !s["coordinator"].is_null() && node_of(&s, &old)["alive"] == false
    });
    let (new, new_epoch) = coordinator(&cluster_status(&nodes[survivor]));
    assert!(new_epoch > old_epoch, "epoch {new_epoch} after {old_epoch}");
    let other = 3 - dead - survivor;
    wait_until(&nodes[other], "the other survivor agrees", Duration::from_secs(10), || coordinator(&cluster_status(&nodes[other])) == (new.clone(), new_epoch));
    // The killed node restarts with the same id and joins as a member.
    respawn(&mut nodes[dead]);
    wait_until(&nodes[dead], "the restarted node alive again", Duration::from_secs(10), || {
        let s = cluster_status(&nodes[dead]);
        s["state"] == "serving" && node_of(&s, &old)["alive"] == true && coordinator(&s) == (new.clone(), new_epoch)
    });
}

#[test]
fn a_node_id_held_by_a_live_node_is_refused() {
    let etcd = TestEtcd::start();
    let _n1 = start(&node_body(&etcd.url, "n1", 2));
    let twin = TestServer::prepare(&node_body(&etcd.url, "n1", 2));
    // The twin waits one lease (a killed predecessor's key must expire
    // first), then gives up: the key is renewed by a live node.
    let out = run_timeout(Command::new(BIN).args(["serve", "--config"]).arg(&twin.config), Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(4), "conflict: {}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("node id 'n1' is already in use by a live node"), "{stderr}");
}

#[test]
fn an_unreachable_etcd_fails_the_start_naming_it() {
    let url = format!("http://127.0.0.1:{}", free_port());
    let node = TestServer::prepare(&node_body(&url, "n1", 2));
    let out = run_timeout(Command::new(BIN).args(["serve", "--config"]).arg(&node.config), Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(5), "I/O: {}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("cannot reach etcd at {url}")), "{stderr}");
    // A node without [cluster] says so.
    let single = start("");
    let err = cli_err(&single, &["cluster", "status"]);
    assert!(err.contains("not in a cluster"), "{err}");
}

/// Without etcd (and failsafe off) a node cannot renew its lease: it
/// stops serving before the lease could expire (a live connection is
/// closed, not answered with an error; new ones are refused), and serves
/// again once it has renewed. (With failsafe: tests/cluster_failsafe.rs.)
#[test]
fn a_node_that_loses_etcd_stops_serving_before_its_lease_ends_and_comes_back() {
    let mut etcd = TestEtcd::start();
    let body = node_body(&etcd.url, "n1", 2).replace("failsafe = \"2s\"", "failsafe = \"0s\"");
    assert!(body.contains("failsafe = \"0s\""), "{body}");
    let node = start(&body);
    let uri = node.uri("v");
    common::nbdsh(&uri, "h.pwrite(b'a' * 4096, 0); h.flush()");
    // A client connected before etcd stops; it reads once before and once after.
    let script = format!(
        r#"
import time
h.pread(4096, 0)
open("{dir}/connected", "w").close()
while not __import__("os").path.exists("{dir}/go"):
    time.sleep(0.05)
try:
    h.pread(4096, 0)
    print("answered")
except nbd.Error as e:
    print("dead" if h.aio_is_dead() or h.aio_is_closed() else "error reply: " + str(e))
"#,
        dir = node.dir.path().display()
    );
    let client = {
        let uri = uri.clone();
        std::thread::spawn(move || common::nbdsh(&uri, &script))
    };
    wait_until(&node, "the client connected", Duration::from_secs(20), || node.path("connected").exists());
    etcd.freeze();
    // 2 s TTL: the node stops serving 1.5 s after its last renewal at most.
    wait_until(&node, "the node fenced", Duration::from_secs(10), || cluster_status(&node)["state"] == "fenced");
    let s = cluster_status(&node);
    assert!(s["etcd_error"].as_str().is_some_and(|e| e.contains("etcd")), "{s}");
    std::fs::write(node.path("go"), b"").unwrap();
    let answer = client.join().unwrap();
    assert_eq!(answer.trim(), "dead", "the fenced node must close the connection, not answer");
    let refused = Command::new("nbdinfo").env("PATH", common::debian_path()).arg(&uri).output().expect("nbdinfo (libnbd-bin)");
    assert!(!refused.status.success(), "a fenced node accepted a connection: {}", text(&refused));
    etcd.thaw();
    // The lease expired in etcd meanwhile (or survived the freeze): either
    // way the node serves again once it holds a renewed lease.
    wait_until(&node, "the node serving again", Duration::from_secs(20), || cluster_status(&node)["state"] == "serving");
    let out = common::nbdsh(&uri, "assert h.pread(4096, 0) == b'a' * 4096; print('ok')");
    assert_eq!(out.trim(), "ok");
    assert!(node.log().contains("fenced"), "{}", node.log());
}

/// `attach --connect A,B`: a server that does not answer is skipped (the
/// attach gets as far as the kernel, which this host may lack), every
/// server failing names each one, and a bad item is named.
#[test]
fn attach_tries_each_server_of_a_connect_list() {
    let live = start("[[backend]]\nname = \"b\"\npath = \"{dir}/b.img\"\nsize = \"1MiB\"\n[[volume]]\nname = \"v\"\n[[volume.extent]]\nlength = \"1MiB\"\nbackend = \"b\"\n");
    let dead = live.path("dead.sock");
    let attach = |list: String| {
        run_timeout(Command::new(BIN).args(["attach", "v", "--connect", &list]).env_remove("NBDVIRT_CONFIG"), Duration::from_secs(60))
    };
    let out = attach(format!("unix:{},unix:{}", dead.display(), live.socket.display()));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    if out.status.success() {
        // A host with the nbd module: the device is attached; let it go.
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        run_timeout(Command::new(BIN).args(["detach", &dev]), Duration::from_secs(30));
    } else {
        assert!(!err.contains("dead.sock"), "the dead server was not skipped:\n{err}");
        assert!(err.contains("nbd"), "{err}");
    }
    let out = attach(format!("unix:{},unix:{}", dead.display(), live.path("gone.sock").display()));
    assert_eq!(out.status.code(), Some(5), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no server of the list could be used") && err.contains("dead.sock") && err.contains("gone.sock"), "{err}");
    let out = attach(format!("unix:{},bogus", live.socket.display()));
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--connect: 'bogus'"), "{}", text(&out));
}

/// Nothing may change one node's table alone (its clients and another
/// node's would see different mappings): a reload's new tables go to
/// every node (as `cluster apply` of the file), and so do the volumes it
/// adds or removes; split and merge are refused.
#[test]
fn a_table_change_on_one_node_alone_is_refused() {
    let etcd = TestEtcd::start();
    let node = start(&node_body(&etcd.url, "n1", 2));
    let config = std::fs::read_to_string(&node.config).unwrap();
    let recut = config.replace("length = \"16MiB\"\nbackend = \"b\"\nbackend_offset = 0\n", "length = \"8MiB\"\nbackend = \"b\"\nbackend_offset = \"8MiB\"\n[[volume.extent]]\nlength = \"8MiB\"\nbackend = \"b\"\nbackend_offset = 0\n");
    assert_ne!(recut, config);
    std::fs::write(&node.config, &recut).unwrap();
    let report = json(&cli_ok(&node, &["reload", "--json"]));
    assert_eq!((&report["swapped"][0]["volume"], &report["swapped"][0]["generation"]), (&Value::from("v"), &Value::from(2)), "{report}");
    assert_eq!(generation(&node, "v"), 2);
    // cluster apply of a file: every node (here one) swaps.
    std::fs::write(&node.config, &config).unwrap();
    let report = json(&cli_ok_via(Via::Config, &node, &["cluster", "apply", "--json"]));
    assert_eq!(report["volumes"][0]["generation"], 3, "{report}");
    assert_eq!(generation(&node, "v"), 3);
    // Adding a volume by a reload: a catalog change on every node (here
    // one; tests/cluster_catalog.rs has three), and removing it again.
    std::fs::write(&node.config, format!("{config}\n[[backend]]\nname = \"c\"\npath = \"{}/c.img\"\nsize = \"1MiB\"\n\n[[volume]]\nname = \"w\"\n[[volume.extent]]\nlength = \"1MiB\"\nbackend = \"c\"\nbackend_offset = 0\n", node.dir.path().display())).unwrap();
    let report = json(&cli_ok(&node, &["reload", "--json"]));
    assert_eq!(report["added"], serde_json::json!(["w"]), "{report}");
    std::fs::write(&node.config, &config).unwrap();
    let report = json(&cli_ok(&node, &["reload", "--json"]));
    assert_eq!(report["removed"], serde_json::json!(["w"]), "{report}");
    // The file's own backends may not change under cluster apply.
    let moved = std::fs::read_to_string(&node.config).unwrap().replace("{dir}/b.img", "{dir}/c.img").replace(&format!("{}/b.img", node.dir.path().display()), &format!("{}/c.img", node.dir.path().display()));
    std::fs::write(&node.config, &moved).unwrap();
    let out = cli_via(Via::Config, &node, &["cluster", "apply"]);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("backend 'b' has another path"), "{}", text(&out));
    // A reload that changes no table (e.g. new TLS files) still works, also
    // when [cluster] moved down in the file.
    let back = std::fs::read_to_string(&node.config).unwrap().replace("c.img", "b.img").replace("[cluster]", "# moved\n[cluster]");
    std::fs::write(&node.config, back).unwrap();
    cli_ok(&node, &["reload"]);
    // (A migration is a cluster-wide change: tests/cluster_migrate.rs.)
    // (So are mirror add, remove and readd: tests/cluster_mirror.rs.)
    let out = cli(&node, &["split", "v", "--leg", "b", "--as", "vb"]);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("split: not available in a cluster"), "{}", text(&out));
}

/// A node frozen (SIGSTOP) for longer than its lease serves nothing when
/// it thaws: its open connection is closed, not answered, even though the
/// membership lease it renewed before the freeze is the last thing it
/// heard from etcd; then it joins again with a new lease.
#[test]
fn a_node_frozen_past_its_lease_serves_nothing_when_it_thaws() {
    let etcd = TestEtcd::start();
    let node = start(&node_body(&etcd.url, "n1", 3));
    let flag = node.path("go");
    let script = format!(
        "import os, time\nh.pread(4096, 0)\nwhile not os.path.exists('{}'):\n    time.sleep(0.05)\ntry:\n    h.pwrite(b'S' * 4096, 0)\n    print('answered')\nexcept nbd.Error as e:\n    print('dead' if h.aio_is_dead() or h.aio_is_closed() else 'error reply: ' + str(e))\n",
        flag.display()
    );
    let client = {
        let uri = node.uri("v");
        std::thread::spawn(move || common::nbdsh(&uri, &script))
    };
    wait_until(&node, "the client connected", Duration::from_secs(20), || vol(&node, "v")["connections"].as_u64() >= Some(1));
    unsafe { libc::kill(node.pid(), libc::SIGSTOP) };
    // etcd expires the 3 s lease meanwhile.
    std::thread::sleep(Duration::from_secs(6));
    unsafe { libc::kill(node.pid(), libc::SIGCONT) };
    std::fs::write(&flag, b"").unwrap();
    assert_eq!(client.join().unwrap().trim(), "dead", "a thawed node past its lease answered a write");
    assert!(common::read_at(&node.path("b.img"), 0, 4096).iter().all(|b| *b == 0), "the write reached the store");
    wait_until(&node, "the node serving again", Duration::from_secs(20), || cluster_status(&node)["state"] == "serving");
    assert!(node.log().contains("membership lease expired in etcd"), "{}", node.log());
}

/// `cluster apply --etcd URL --cluster NAME`: from a machine with no node
/// (a file naming no control socket), straight to the coordinator that
/// etcd names; a cluster without a coordinator and a bad URL are clear
/// errors.
#[test]
fn cluster_apply_from_anywhere_finds_the_coordinator_in_etcd() {
    let etcd = TestEtcd::start();
    let node = start(&node_body(&etcd.url, "n1", 2));
    wait_until(&node, "a coordinator", Duration::from_secs(15), || !cluster_status(&node)["coordinator"].is_null());
    let elsewhere = tempfile::tempdir().unwrap();
    let file = elsewhere.path().join("tables.toml");
    let b = node.dir.path().join("b.img");
    std::fs::write(&file, format!("[[backend]]\nname = \"b\"\npath = \"{}\"\nsize = \"16MiB\"\n\n[[volume]]\nname = \"v\"\n[[volume.extent]]\nlength = \"8MiB\"\nbackend = \"b\"\nbackend_offset = \"8MiB\"\n[[volume.extent]]\nlength = \"8MiB\"\nbackend = \"b\"\nbackend_offset = 0\n", b.display())).unwrap();
    let apply = |extra: &[&str]| {
        let mut cmd = Command::new(BIN);
        cmd.args(["cluster", "apply", "--json", "--config"]).arg(&file).args(extra).env_remove("NBDVIRT_CONFIG");
        run_timeout(&mut cmd, Duration::from_secs(60))
    };
    let out = apply(&["--etcd", &etcd.url, "--cluster", "t"]);
    assert!(out.status.success(), "{}\n--- log ---\n{}", text(&out), node.log());
    let report = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!((&report["coordinator"], &report["volumes"][0]["generation"]), (&Value::from("n1"), &Value::from(2)), "{report}");
    assert_eq!(generation(&node, "v"), 2);
    let out = apply(&["--etcd", &etcd.url, "--cluster", "nope"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(text(&out).contains("cluster 'nope' has no coordinator"), "{}", text(&out));
    let out = apply(&["--etcd", "127.0.0.1:1", "--cluster", "t"]);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));
    assert!(text(&out).contains("--etcd"), "{}", text(&out));
    let out = apply(&["--etcd", &etcd.url]);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));
    assert!(text(&out).contains("--cluster NAME"), "{}", text(&out));
}

/// `cluster forget NODE`: a node gone for good leaves the records, but not
/// while it is alive or may still serve in failsafe (2 s here).
#[test]
fn a_member_gone_for_good_is_forgotten_once_its_failsafe_window_is_over() {
    let etcd = TestEtcd::start();
    let n1 = start(&node_body(&etcd.url, "n1", 2));
    let mut n2 = start(&node_body(&etcd.url, "n2", 2));
    let alive = |name: &str| cluster_status(&n1)["nodes"].as_array().unwrap().iter().any(|n| n["node"] == name && n["alive"] == true);
    wait_until(&n1, "n2 alive", Duration::from_secs(15), || alive("n2"));
    let out = cli(&n1, &["cluster", "forget", "n2"]);
    assert_eq!(out.status.code(), Some(4), "a live node: {}", text(&out));
    assert!(text(&out).contains("is alive"), "{}", text(&out));
    let out = cli(&n1, &["cluster", "forget", "n9"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    n2.stop();
    wait_until(&n1, "n2 gone", Duration::from_secs(15), || !alive("n2"));
    let out = cli(&n1, &["cluster", "forget", "n2"]);
    assert_eq!(out.status.code(), Some(4), "just gone: {}", text(&out));
    assert!(text(&out).contains("may still serve in failsafe"), "{}", text(&out));
    wait_until(&n1, "n2 forgotten", Duration::from_secs(10), || cli(&n1, &["cluster", "forget", "n2"]).status.success());
    wait_until(&n1, "n2 no longer listed", Duration::from_secs(5), || !cluster_status(&n1)["nodes"].as_array().unwrap().iter().any(|n| n["node"] == "n2"));
}

/// A node that held but cannot record the committed table (its state
/// directory fails the rename) fences itself, and `cluster apply` says so
/// with exit code 5 (io) instead of reporting every node on the new
/// table; the other node serves it.
#[test]
fn a_node_that_cannot_record_the_committed_table_fences_itself_and_apply_says_so() {
    let etcd = TestEtcd::start();
    let n1 = start(&node_body(&etcd.url, "n1", 2));
    wait_until(&n1, "n1 coordinating", Duration::from_secs(15), || cluster_status(&n1)["coordinator"]["node"] == "n1");
    let n2 = start(&node_body(&etcd.url, "n2", 2));
    wait_until(&n2, "n2 serving", Duration::from_secs(15), || cluster_status(&n2)["state"] == "serving");
    // `current.json` as a non-empty directory: renaming the prepared
    // record over it fails (EISDIR), after the hold.
    let current = n2.dir.path().join("state/volumes/v/current.json");
    assert!(current.is_file(), "{} is where the generation lives", current.display());
    std::fs::remove_file(&current).unwrap();
    std::fs::create_dir(&current).unwrap();
    std::fs::write(current.join("keep"), b"x").unwrap();
    let file = n1.dir.path().join("recut.toml");
    let b = n1.dir.path().join("b.img");
    std::fs::write(&file, format!("[[backend]]\nname = \"b\"\npath = \"{}\"\nsize = \"16MiB\"\n\n[[volume]]\nname = \"v\"\n[[volume.extent]]\nlength = \"8MiB\"\nbackend = \"b\"\nbackend_offset = \"8MiB\"\n[[volume.extent]]\nlength = \"8MiB\"\nbackend = \"b\"\nbackend_offset = 0\n", b.display())).unwrap();
    let out = cli(&n1, &["cluster", "apply", "--json", "--config", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(5), "{}\n--- n2 log ---\n{}", text(&out), n2.log());
    let said = text(&out);
    assert!(said.contains("not confirmed") && said.contains("n2:") && said.contains("fenced itself"), "{said}");
    let report = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(report["volumes"][0]["nodes"], serde_json::json!(["n1"]), "{report}");
    assert_eq!(generation(&n1, "v"), 2);
    assert_eq!(cluster_status(&n2)["state"], "fenced");
    let refused = Command::new("nbdsh").env("PATH", common::debian_path()).args(["-u", &n2.uri("v"), "-c", "h.pread(512, 0)"]).output().expect("run nbdsh");
    assert!(!refused.status.success(), "a fenced node served a read");
    common::nbdsh(&n1.uri("v"), "assert len(h.pread(512, 0)) == 512");
}
