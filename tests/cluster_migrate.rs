//! Live migration in cluster mode: the destination leg is part of the
//! committed table, so every node writes it while one node copies; the
//! copy re-reads what it copied, so a write arriving through another node
//! during the copy is never lost; the cutover is a barrier on every node.

mod common;

use common::cli::*;
use common::etcd::{cluster_section, TestEtcd};
use common::{require, run_ok, TestServer};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;

/// Node `node` of cluster "t": volume `v` on backend `src`, and an empty
/// backend `dst`, both files in `shared` that every node opens.
fn node_body(etcd: &str, node: &str, shared: &Path) -> String {
    let backend = |name: &str| format!("[[backend]]\nname = \"{name}\"\npath = \"{}\"\nsize = {SIZE}\nshared = true\n", shared.join(format!("{name}.img")).display());
    format!(
        "{}\n{}\n{}\n[[volume]]\nname = \"v\"\n[[volume.extent]]\nlength = {SIZE}\nbackend = \"src\"\nbackend_offset = 0\n",
        cluster_section(etcd, node, 3),
        backend("src"),
        backend("dst")
    )
}

/// What the volume holds before the writers start: byte i of block b is
/// (b * 7 + i) % 251.
fn prefill() -> Vec<u8> {
    (0..SIZE as usize).map(|i| ((i / 4096 * 7 + i % 4096) % 251) as u8).collect()
}

/// An nbdsh client writing 4 KiB blocks of its half [`offset`, +SIZE/2)
/// round after round (each block tagged with the writer and the round),
/// flushed every round, until `stop` exists; then it saves what its half
/// must hold to `image`. Runs on a thread; returns the rounds written.
fn writer(uri: String, offset: u64, tag: u8, stop: std::path::PathBuf, image: std::path::PathBuf, initial: Vec<u8>) -> std::thread::JoinHandle<u64> {
    std::fs::write(&image, &initial).unwrap();
    let script = format!(
        "import os\nimg = bytearray(open('{img}', 'rb').read())\nblocks = len(img) // 4096\nrounds = 0\n\
         while not os.path.exists('{stop}'):\n    rounds += 1\n    for i in range(0, blocks, 3):\n        b = (i * 37 + rounds * 11) % blocks\n\
         \x20       data = bytes([{tag}, rounds % 256]) * 2048\n        h.pwrite(data, {offset} + b * 4096)\n        img[b * 4096:(b + 1) * 4096] = data\n    h.flush()\n\
         open('{img}', 'wb').write(img)\nprint(rounds)\n",
        img = image.display(),
        stop = stop.display(),
    );
    std::thread::spawn(move || common::nbdsh(&uri, &script).trim().parse().expect("the writer's rounds"))
}

/// Two writers: through n1 on the first half, through n3 on the second,
/// from `prefill()` on.
struct Writers {
    stop: std::path::PathBuf,
    images: [std::path::PathBuf; 2],
    threads: Vec<std::thread::JoinHandle<u64>>,
}

impl Writers {
    /// Starts them and waits until both are connected.
    fn start(nodes: &[TestServer]) -> Writers {
        let (initial, half) = (prefill(), (SIZE / 2) as usize);
        let stop = nodes[0].path("stop");
        let images = [nodes[0].path("first-half.img"), nodes[2].path("second-half.img")];
        let threads = vec![
            writer(nodes[0].uri("v"), 0, 0xa1, stop.clone(), images[0].clone(), initial[..half].to_vec()),
            writer(nodes[2].uri("v"), SIZE / 2, 0xc3, stop.clone(), images[1].clone(), initial[half..].to_vec()),
        ];
        for i in [0, 2] {
            wait_until(&nodes[i], "the writer connected", Duration::from_secs(30), || vol(&nodes[i], "v")["connections"].as_u64() >= Some(1));
        }
        Writers { stop, images, threads }
    }

    /// Stops them; returns what the volume must hold.
    fn stop(self) -> Vec<u8> {
        std::fs::write(&self.stop, "").unwrap();
        for w in self.threads {
            assert!(w.join().unwrap() >= 2, "a writer did not get through two rounds");
        }
        let mut want = std::fs::read(&self.images[0]).unwrap();
        want.extend(std::fs::read(&self.images[1]).unwrap());
        want
    }
}

/// Reads the whole volume through `node` with nbdcopy.
fn read_volume(node: &TestServer) -> Vec<u8> {
    let file = node.path("readback.img");
    let _ = std::fs::remove_file(&file);
    run_ok(Command::new("nbdcopy").arg(node.uri("v")).arg(&file));
    std::fs::read(&file).unwrap()
}

fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: length differs");
    if let Some(at) = got.iter().zip(want).position(|(a, b)| a != b) {
        let bad = (0..got.len() / 4096).filter(|b| got[b * 4096..(b + 1) * 4096] != want[b * 4096..(b + 1) * 4096]).count();
        panic!("{what}: block {} differs first ({bad} blocks differ): got {:02x?} want {:02x?}", at / 4096, &got[at..at + 8], &want[at..at + 8]);
    }
}

/// Three nodes of cluster "t" on `etcd`, alive, with a coordinator, and
/// the volume filled with `prefill()` (through n2).
fn three_nodes(etcd: &TestEtcd, shared: &Path) -> Vec<TestServer> {
    let nodes: Vec<TestServer> = ["n1", "n2", "n3"].iter().map(|n| start(&node_body(&etcd.url, n, shared))).collect();
    for node in &nodes {
        wait_until(node, "three nodes alive and a coordinator", Duration::from_secs(15), || {
            let s = json(&cli_ok(node, &["cluster", "status", "--json"]));
            s["nodes"].as_array().unwrap().iter().filter(|n| n["alive"] == true).count() == 3 && !s["coordinator"].is_null()
        });
    }
    let fill = nodes[1].path("fill.img");
    std::fs::write(&fill, prefill()).unwrap();
    run_ok(Command::new("nbdcopy").arg("--flush").arg(&fill).arg(nodes[1].uri("v")));
    nodes
}

/// `migrate status v` through `node`: the one job of v in the cluster.
fn job_via(node: &TestServer) -> serde_json::Value {
    let list = json(&cli_ok(node, &["migrate", "status", "v", "--json"]))["migrations"].clone();
    assert_eq!(list.as_array().map(Vec::len), Some(1), "one job of v: {list}");
    list[0].clone()
}

/// The node named in v's job as seen through `node`, once it sees one
/// (the copier's record reaches the others at their next look at etcd).
fn copier_seen(node: &TestServer) -> Option<String> {
    let out = cli(node, &["migrate", "status", "v", "--json"]);
    out.status.success().then(|| json(&String::from_utf8_lossy(&out.stdout))["migrations"][0]["node"].as_str().map(String::from)).flatten()
}

/// Waits (2 min at most) until v's job, seen through `node`, is no longer
/// running (a node learns of a job elsewhere at its next look at etcd).
fn wait_ended(node: &TestServer) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let out = cli(node, &["migrate", "status", "v", "--json"]);
        if out.status.success() {
            let j = json(&String::from_utf8_lossy(&out.stdout))["migrations"][0].clone();
            if j["state"] != "running" {
                return j;
            }
        }
        assert!(std::time::Instant::now() < deadline, "the migration did not end: {}\n{}", text(&out), node.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every node on one generation, with v on `backend` alone.
fn all_on(nodes: &[TestServer], backend: &str) {
    let generation = generation(&nodes[0], "v");
    for node in nodes {
        let v = vol(node, "v");
        assert_eq!(v["generation"], generation, "the nodes ended on different generations: {v}");
        assert_eq!(extents_of(&v), [(0, SIZE, backend.to_string(), 0)], "v is not on {backend} alone: {v}");
    }
}

/// Writes go through n1 and n3 while n2 copies the volume onto `dst`
/// (started on n2, which is not necessarily the coordinator: its table
/// changes go to the coordinator's barrier). Every node mirrors the
/// writes from the first barrier on; after the cutover every node maps
/// the volume to `dst` alone, and what every node reads is exactly what
/// the writers wrote last, block for block.
#[test]
fn a_migration_under_writes_through_two_other_nodes_loses_nothing() {
    require("nbdcopy", "libnbd-bin");
    require("nbdsh", "python3-libnbd");
    let etcd = TestEtcd::start();
    let shared = tempfile::tempdir().unwrap();
    let nodes = three_nodes(&etcd, shared.path());
    let writers = Writers::start(&nodes);
    std::thread::sleep(Duration::from_millis(300));

    // 4 MiB/s: the copy takes about 4 s, under writes all along.
    cli_ok(&nodes[1], &["migrate", "start", "v", "--to", "dst", "--rate", "4MiB"]);
    // The destination leg is in every node's table from the first barrier on.
    for node in &nodes {
        let extents = vol(node, "v")["extents"].to_string();
        assert!(extents.contains("\"dst\""), "{}: no destination leg while copying: {extents}", node.path("").display());
    }
    // One migration per volume, cluster-wide.
    let out = cli(&nodes[0], &["migrate", "start", "v", "--to", "dst"]);
    assert_eq!(out.status.code(), Some(4), "a second migration through another node: {}", text(&out));
    // Seen through any node, copied by n2.
    wait_until(&nodes[2], "n2's job seen through n3", Duration::from_secs(10), || copier_seen(&nodes[2]).as_deref() == Some("n2"));
    let job = wait_ended(&nodes[0]);
    assert_eq!(job["state"], "completed", "{job}\n--- copier's log ---\n{}", nodes[1].log());
    // Writes go on onto the destination alone for a while.
    std::thread::sleep(Duration::from_millis(500));
    let want = writers.stop();
    all_on(&nodes, "dst");
    for i in [1, 0] {
        assert_same(&format!("the volume read through node {}", i + 1), &read_volume(&nodes[i]), &want);
    }
    assert_same("dst.img", &std::fs::read(shared.path().join("dst.img")).unwrap(), &want);
}

/// The copier killed (-9) in the middle of the copy: writes through the
/// other nodes go on (every node mirrors them); once its lease is gone,
/// `migrate start` through another node takes the migration over from the
/// committed table and finishes it; the killed node, restarted, resumes
/// its own record onto the cut-over table. Nothing written is lost.
#[test]
fn a_dead_copier_is_taken_over_and_nothing_is_lost() {
    require("nbdcopy", "libnbd-bin");
    require("nbdsh", "python3-libnbd");
    let etcd = TestEtcd::start();
    let shared = tempfile::tempdir().unwrap();
    let mut nodes = three_nodes(&etcd, shared.path());
    let writers = Writers::start(&nodes);
    // 2 MiB/s: far from done when the copier dies.
    cli_ok(&nodes[1], &["migrate", "start", "v", "--to", "dst", "--rate", "2MiB"]);
    wait_until(&nodes[1], "some of the copy done", Duration::from_secs(30), || job_via(&nodes[1])["copied_bytes"].as_u64() >= Some(2 * MIB));
    nodes[1].kill();
    // While its lease lives it may still copy: a takeover is refused.
    let out = cli(&nodes[0], &["migrate", "start", "v", "--to", "dst"]);
    assert_eq!(out.status.code(), Some(4), "took over from a node whose lease may live: {}", text(&out));
    assert!(text(&out).contains("being migrated by node n2"), "{}", text(&out));
    wait_until(&nodes[0], "n2's lease expired", Duration::from_secs(30), || {
        let s = json(&cli_ok(&nodes[0], &["cluster", "status", "--json"]));
        s["nodes"].as_array().unwrap().iter().any(|n| n["node"] == "n2" && n["alive"] == false)
    });
    // A takeover must go where the table says.
    let out = cli(&nodes[0], &["migrate", "start", "v", "--to", "src"]);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));
    assert!(text(&out).contains("its destination is 'dst'"), "{}", text(&out));
    // etcd deletes the claim with the lease (a moment after its TTL ran out).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let started = loop {
        let out = cli(&nodes[0], &["migrate", "start", "v", "--to", "dst", "--rate", "16MiB", "--json"]);
        if out.status.success() {
            break json(&String::from_utf8_lossy(&out.stdout));
        }
        assert!(out.status.code() == Some(4) && std::time::Instant::now() < deadline, "no takeover: {}", text(&out));
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(started["migrations"][0]["node"], "n1", "{started}");
    let job = wait_ended(&nodes[2]);
    assert_eq!(job["state"], "completed", "{job}\n--- n1's log ---\n{}", nodes[0].log());
    let want = writers.stop();
    let live = [&nodes[0], &nodes[2]];
    let generation = generation(live[0], "v");
    for node in live {
        assert_eq!(extents_of(&vol(node, "v")), [(0, SIZE, "dst".to_string(), 0)]);
        assert_eq!(generation_of(node), generation);
    }
    assert_same("the volume read through n3", &read_volume(&nodes[2]), &want);
    // The killed node comes back: on the committed table, and it ends its
    // own record of the job (the table is cut over already).
    respawn(&mut nodes[1]);
    // (Its generation number may run ahead: a node catching up numbers the
    // committed table above its own last one; the next barrier evens out.)
    wait_until(&nodes[1], "n2 caught up and its job ended", Duration::from_secs(30), || {
        extents_of(&vol(&nodes[1], "v")) == [(0, SIZE, "dst".to_string(), 0)] && nodes[1].log().contains("migration completed")
    });
    assert_eq!(job_via(&nodes[1])["node"], "n1", "the job shown is the last one started");
    assert_same("the volume read through the restarted n2", &read_volume(&nodes[1]), &want);
}

fn generation_of(node: &TestServer) -> u64 {
    generation(node, "v")
}

/// `migrate abort` through a node that does not copy reaches the copier:
/// every node is back on the source alone, with what was written.
#[test]
fn an_abort_through_another_node_leaves_every_node_on_the_source() {
    require("nbdcopy", "libnbd-bin");
    let etcd = TestEtcd::start();
    let shared = tempfile::tempdir().unwrap();
    let nodes = three_nodes(&etcd, shared.path());
    cli_ok(&nodes[1], &["migrate", "start", "v", "--to", "dst", "--rate", "1MiB"]);
    wait_until(&nodes[2], "n2's job seen through n3", Duration::from_secs(10), || copier_seen(&nodes[2]).as_deref() == Some("n2"));
    let aborted = json(&cli_ok(&nodes[2], &["migrate", "abort", "v", "--json"]));
    assert_eq!((&aborted["migrations"][0]["state"], &aborted["migrations"][0]["node"]), (&"aborted".into(), &"n2".into()), "{aborted}");
    all_on(&nodes, "src");
    assert_same("the volume after the abort", &read_volume(&nodes[0]), &prefill());
    // Nothing runs any more: a second abort says so.
    let out = cli(&nodes[0], &["migrate", "abort", "v"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
}

/// Moving a volume off a store only n1 reaches (`nodes = ["n1"]`) onto a
/// store every node reaches: started through n2, which does not reach the
/// source, it is refused (the copier reads the source itself); through n1
/// it runs while n2 forwards its clients' writes to n1 (the mirror extent
/// needs both stores), and after the cutover n2 serves the volume itself.
#[test]
fn a_volume_moves_off_a_store_one_node_reaches() {
    require("nbdcopy", "libnbd-bin");
    let etcd = TestEtcd::start();
    let shared = tempfile::tempdir().unwrap();
    let body = |node: &str| {
        node_body(&etcd.url, node, shared.path()).replacen("size = 16777216\nshared = true\n", "size = 16777216\nshared = true\nnodes = [\"n1\"]\n", 1)
    };
    assert!(body("n1").contains("nodes = [\"n1\"]"), "{}", body("n1"));
    let nodes: Vec<TestServer> = ["n1", "n2"]
        .iter()
        .map(|n| {
            let s = TestServer::start_with(&body(n), &[&format!("tcp:127.0.0.1:{}", common::free_port())]);
            wait_control(&s);
            s
        })
        .collect();
    for n in &nodes {
        wait_until(n, "both serving", Duration::from_secs(20), || {
            let s = json(&cli_ok(n, &["cluster", "status", "--json"]));
            s["state"] == "serving" && s["nodes"].as_array().unwrap().iter().filter(|m| m["alive"] == true && m["serve"].is_string()).count() == 2
        });
    }
    let fill = nodes[1].path("fill.img");
    std::fs::write(&fill, prefill()).unwrap();
    run_ok(Command::new("nbdcopy").arg("--flush").arg(&fill).arg(nodes[1].uri("v")));
    let out = cli(&nodes[1], &["migrate", "start", "v", "--to", "dst"]);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));
    assert!(text(&out).contains("does not reach store 'src'"), "{}", text(&out));
    cli_ok(&nodes[0], &["migrate", "start", "v", "--to", "dst", "--rate", "8MiB"]);
    // Written through n2 while n1 copies: forwarded to n1, which mirrors.
    let mut want = prefill();
    for (i, at) in [(0u8, 0usize), (1, 5 << 20), (2, 11 << 20), (3, 15 << 20)] {
        let block = vec![0xd0 + i; 4096];
        common::nbdsh(&nodes[1].uri("v"), &format!("h.pwrite(bytes([{}]) * 4096, {at})\nh.flush()\n", 0xd0 + i));
        want[at..at + 4096].copy_from_slice(&block);
        std::thread::sleep(Duration::from_millis(300));
    }
    let job = wait_ended(&nodes[1]);
    assert_eq!(job["state"], "completed", "{job}\n--- n1's log ---\n{}", nodes[0].log());
    all_on(&nodes, "dst");
    assert!(vol(&nodes[1], "v")["extents"].as_array().unwrap().iter().all(|e| e.get("forwarded").is_none()), "n2 still forwards after the cutover");
    assert_same("the volume read through n2", &read_volume(&nodes[1]), &want);
    assert_same("dst.img", &std::fs::read(shared.path().join("dst.img")).unwrap(), &want);
}

/// The destination fails on a node that does not copy (an injected EIO on
/// n3): n3's writes still succeed (on the source) but miss the
/// destination; n3 tells every node the leg failed before it answers
/// them, so the copier's job fails (and n3 would refuse the cutover
/// anyway); every node stays on the source, and nothing written is lost.
#[test]
fn a_destination_failing_on_another_node_stops_the_cutover() {
    require("nbdcopy", "libnbd-bin");
    let etcd = TestEtcd::start();
    let shared = tempfile::tempdir().unwrap();
    let nodes = three_nodes(&etcd, shared.path());
    cli_ok(&nodes[1], &["migrate", "start", "v", "--to", "dst", "--rate", "8MiB"]);
    cli_ok(&nodes[2], &["fault", "dst", "--error", "eio", "--writes"]);
    let mut want = prefill();
    common::nbdsh(&nodes[2].uri("v"), "h.pwrite(b'F' * 4096, 65536)\nh.flush()\n");
    want[65536..65536 + 4096].copy_from_slice(&[b'F'; 4096]);
    let job = wait_ended(&nodes[0]);
    assert_eq!(job["state"], "failed", "{job}");
    let reason = job["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("node n3") && reason.contains("EIO"), "{job}");
    assert!(!nodes[1].log().contains("cutover refused for now"), "a refusal is final, not tried again");
    all_on(&nodes, "src");
    cli_ok(&nodes[2], &["fault", "dst", "--error", "off"]);
    assert_same("the volume after the failed migration", &read_volume(&nodes[0]), &want);
    // With the fault gone, the next migration succeeds (n3 forgot the leg).
    cli_ok(&nodes[1], &["migrate", "start", "v", "--to", "dst", "--rate", "0"]);
    assert_eq!(wait_ended(&nodes[0])["state"], "completed");
    all_on(&nodes, "dst");
    assert_same("the volume after the second migration", &read_volume(&nodes[2]), &want);
}

/// etcd stops answering just as the copy ends: the cutover is refused for
/// now (no change can commit), the job tries again instead of failing,
/// and completes once etcd is back.
#[test]
fn a_cutover_waits_out_a_short_etcd_outage() {
    require("nbdcopy", "libnbd-bin");
    let mut etcd = TestEtcd::start();
    let shared = tempfile::tempdir().unwrap();
    let nodes = three_nodes(&etcd, shared.path());
    cli_ok(&nodes[1], &["migrate", "start", "v", "--to", "dst", "--rate", "2MiB"]);
    wait_until(&nodes[1], "the copy nearly done", Duration::from_secs(30), || job_via(&nodes[1])["copied_bytes"].as_u64() >= Some(15 * MIB));
    etcd.freeze();
    let refused = std::time::Instant::now() + Duration::from_secs(20);
    while !nodes[1].log().contains("cutover refused for now") {
        assert!(std::time::Instant::now() < refused, "no refused cutover while etcd was frozen:\n{}", nodes[1].log());
        std::thread::sleep(Duration::from_millis(50));
    }
    etcd.thaw();
    let job = wait_ended(&nodes[0]);
    assert_eq!(job["state"], "completed", "{job}\n--- copier's log ---\n{}", nodes[1].log());
    all_on(&nodes, "dst");
    assert_same("the volume after the migration", &read_volume(&nodes[2]), &prefill());
}

/// A node killed during the copy may have left a write half done behind
/// it (source written, destination not): before the cutover the copier
/// sees it gone and copies the range again, and the cutover barrier never
/// commits past a node that does not answer. Writes through n1 go on all
/// along; every byte is checked after the cutover.
#[test]
fn a_node_lost_during_the_copy_makes_the_copier_copy_again() {
    require("nbdcopy", "libnbd-bin");
    require("nbdsh", "python3-libnbd");
    let etcd = TestEtcd::start();
    let shared = tempfile::tempdir().unwrap();
    let mut nodes = three_nodes(&etcd, shared.path());
    let half = (SIZE / 2) as usize;
    let (stop, image) = (nodes[0].path("stop"), nodes[0].path("first-half.img"));
    let writer = writer(nodes[0].uri("v"), 0, 0xa1, stop.clone(), image.clone(), prefill()[..half].to_vec());
    wait_until(&nodes[0], "the writer connected", Duration::from_secs(30), || vol(&nodes[0], "v")["connections"].as_u64() >= Some(1));
    // 4 MiB/s: each pass takes about 4 s; n3 dies during the first.
    cli_ok(&nodes[1], &["migrate", "start", "v", "--to", "dst", "--rate", "4MiB"]);
    std::thread::sleep(Duration::from_secs(1));
    nodes[2].kill();
    let job = wait_ended(&nodes[0]);
    assert_eq!(job["state"], "completed", "{job}\n--- copier's log ---\n{}", nodes[1].log());
    assert!(job["recopies"].as_u64() >= Some(1), "the copy did not run again after n3 left: {job}\n--- copier's log ---\n{}", nodes[1].log());
    std::fs::write(&stop, "").unwrap();
    writer.join().expect("the writer");
    let mut want = std::fs::read(&image).unwrap();
    want.extend_from_slice(&prefill()[half..]);
    let live = &nodes[..2];
    all_on(live, "dst");
    assert_same("the volume read through n1", &read_volume(&nodes[0]), &want);
    assert_same("dst.img", &std::fs::read(shared.path().join("dst.img")).unwrap(), &want);
}
