//! `[server] metrics`: the daemon serves `/metrics` in the Prometheus text
//! format; `promtool check metrics` accepts it, and the request and byte
//! counters equal what real clients (fio, qemu-io) say they did.
mod common;
use common::cli::*;
use common::*;
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// One plain HTTP/1.0 request; (status code, body).
fn http(port: u16, method: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap_or_else(|e| panic!("connect to the metrics port {port}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no HTTP header end in {raw:?}"));
    let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("bad status line in {head:?}"));
    if code == 200 {
        assert!(head.to_ascii_lowercase().contains("content-type: text/plain; version=0.0.4"), "classic text format announced: {head}");
    }
    (code, body.to_string())
}

fn scrape(port: u16) -> String {
    let (code, body) = http(port, "GET", "/metrics");
    assert_eq!(code, 200, "GET /metrics: {body}");
    body
}

/// The value of one series (`name{labels}` exactly as exposed).
fn value(text: &str, series: &str) -> f64 {
    let prefix = format!("{series} ");
    let line = text.lines().find(|l| l.starts_with(&prefix)).unwrap_or_else(|| panic!("no series {series} in:\n{text}"));
    line[prefix.len()..].parse().unwrap_or_else(|e| panic!("{line}: {e}"))
}

fn count(text: &str, volume: &str, op: &str, result: &str) -> f64 {
    value(text, &format!("nbdvirt_requests_total{{volume=\"{volume}\",op=\"{op}\",result=\"{result}\"}}"))
}

fn bytes(text: &str, what: &str, volume: &str) -> f64 {
    value(text, &format!("nbdvirt_{what}_bytes_total{{volume=\"{volume}\"}}"))
}

/// `promtool check metrics` on `text`; panics with its complaints.
fn promtool_check(text: &str) {
    require("promtool", "prometheus");
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed ({}):\n{}{}\n--- exposition ---\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// fio (nbd engine) doing exactly `ios` 4 KiB requests of `rw` at QD16;
/// returns (requests, bytes) as fio counted them.
fn fio(dir: &Path, uri: &str, rw: &str, ios: u64) -> (u64, u64) {
    require("fio", "fio");
    let mut cmd = Command::new("fio");
    cmd.current_dir(dir).args([
        "--name=metrics",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        &format!("--rw={rw}"),
        "--bs=4k",
        "--size=8M",
        "--iodepth=16",
        &format!("--number_ios={ios}"),
        "--output-format=json",
    ]);
    let out = run_timeout(&mut cmd, Duration::from_secs(120));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "fio failed: {}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_str(&stdout[stdout.find("\n{").map_or(0, |i| i + 1)..]).unwrap_or_else(|e| panic!("fio JSON ({e}):\n{stdout}"));
    let side = &v["jobs"][0][if rw.contains("read") { "read" } else { "write" }];
    let (n, b) = (side["total_ios"].as_u64().unwrap(), side["io_bytes"].as_u64().unwrap());
    assert_eq!(n, ios, "fio did the number of requests asked: {side}");
    (n, b)
}

fn qemu_io(uri: &str, cmds: &[&str]) {
    require("qemu-io", "qemu-utils");
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    run_ok(cmd.arg(uri));
}

fn body(port: u16, config: &str) -> String {
    // Right after the harness's [server] block, still inside it.
    format!("metrics = \"tcp:127.0.0.1:{port}\"\n\n{config}\n[[volume]]\nname = \"idle\"\n[[volume.extent]]\nlength = \"1MiB\"\nzero = true\n")
}

#[test]
fn counters_equal_what_the_clients_did_and_promtool_accepts_the_page() {
    require("promtool", "prometheus");
    let port = free_port();
    let server = start(&body(port, SHARED));
    let uri = server.uri("v");
    let before = scrape(port);
    promtool_check(&before);
    assert_eq!(count(&before, "v", "write", "ok"), 0.0);

    let (writes, written) = fio(server.dir.path(), &uri, "randwrite", 1000);
    let (reads, read) = fio(server.dir.path(), &uri, "randread", 600);
    let page = scrape(port);
    promtool_check(&page);
    assert_eq!(count(&page, "v", "write", "ok"), writes as f64, "write requests equal fio's count");
    assert_eq!(count(&page, "v", "read", "ok"), reads as f64, "read requests equal fio's count");
    assert_eq!((bytes(&page, "written", "v"), bytes(&page, "read", "v")), (written as f64, read as f64), "byte counters equal fio's");
    assert_eq!((count(&page, "v", "write", "error"), count(&page, "v", "read", "error")), (0.0, 0.0));
    let latency = |op: &str| value(&page, &format!("nbdvirt_request_duration_seconds_count{{volume=\"v\",op=\"{op}\"}}"));
    assert_eq!((latency("write"), latency("read")), (writes as f64, reads as f64), "every request is in its duration histogram");
    let inf = value(&page, "nbdvirt_request_duration_seconds_bucket{volume=\"v\",op=\"write\",le=\"+Inf\"}");
    assert_eq!(inf, writes as f64);
    assert_eq!(value(&page, "nbdvirt_requests_in_flight{volume=\"v\"}"), 0.0, "nothing in flight once fio is done");
    assert_eq!(count(&page, "idle", "read", "ok"), 0.0, "counters are per volume");

    // qemu-io: one 64 KiB write, one write-zeroes and one trim of 128 KiB.
    qemu_io(&uri, &["write -P 7 0 64k", "write -z 1M 128k", "discard 2M 128k"]);
    let after = scrape(port);
    assert_eq!(count(&after, "v", "write", "ok") - writes as f64, 1.0, "qemu-io's one write");
    assert_eq!(bytes(&after, "written", "v") - written as f64, 65536.0);
    assert_eq!((count(&after, "v", "write_zeroes", "ok"), bytes(&after, "zeroed", "v")), (1.0, 131072.0));
    assert_eq!((count(&after, "v", "trim", "ok"), bytes(&after, "trimmed", "v")), (1.0, 131072.0));

    // A read past the end (libnbd's own bounds check off) is answered with
    // an error, and counted so.
    nbdsh(&uri, "h.set_strict_mode(0)\ntry:\n    h.pread(4096, 8 << 20)\nexcept nbd.Error:\n    pass");
    let page = scrape(port);
    assert_eq!(count(&page, "v", "read", "error"), 1.0, "the failed read is counted as an error");

    // Other paths and methods: 404.
    assert_eq!(http(port, "GET", "/").0, 404);
    assert_eq!(http(port, "POST", "/metrics").0, 404);
    assert!(scrape(port).contains("# TYPE nbdvirt_requests_total counter\n"));
}

#[test]
fn connections_gauge_follows_an_open_client_and_swaps_are_counted() {
    require("promtool", "prometheus");
    require("nbdsh", "python3-libnbd");
    let port = free_port();
    let server = start(&body(port, SHARED));
    let connections = || value(&scrape(port), "nbdvirt_connections{volume=\"v\"}");
    assert_eq!(connections(), 0.0);
    let mut client = Command::new("nbdsh")
        .env("PATH", debian_path())
        .args(["-u", &server.uri("v"), "-c", "import sys\nprint('connected', flush=True)\nsys.stdin.read()"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run nbdsh");
    let mut line = String::new();
    BufReader::new(client.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "connected");
    // The server counts the connection right after the handshake it has
    // just answered: wait (bounded) for it to get there.
    wait_until(&server, "the connection to be counted", Duration::from_secs(10), || connections() == 1.0);
    assert_eq!(value(&scrape(port), "nbdvirt_connections{volume=\"idle\"}"), 0.0);
    drop(client.stdin.take()); // EOF: the script ends and disconnects
    assert!(client.wait().unwrap().success());
    wait_until(&server, "the connection to be uncounted", Duration::from_secs(10), || connections() == 0.0);

    // One swap by reload: counted with its hold and drain, generation 2.
    rewrite_config(&server, &body(port, &recut(2 << 20, "b")));
    let report = json(&cli_ok(&server, &["reload", "--json"]));
    assert_eq!(report["swapped"].as_array().map(Vec::len), Some(1), "{report}");
    let page = scrape(port);
    promtool_check(&page);
    assert_eq!(value(&page, "nbdvirt_swaps_total{volume=\"v\",result=\"ok\"}"), 1.0);
    assert_eq!(value(&page, "nbdvirt_swap_hold_seconds_count{volume=\"v\"}"), 1.0);
    assert_eq!(value(&page, "nbdvirt_swap_drain_seconds_count{volume=\"v\"}"), 1.0);
    assert_eq!(value(&page, "nbdvirt_generation{volume=\"v\"}"), 2.0);
    assert_eq!(value(&page, "nbdvirt_swaps_total{volume=\"idle\",result=\"ok\"}"), 0.0);
}

#[test]
fn bad_metrics_endpoints_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    for (value, says) in [
        ("unix:/tmp/metrics.sock", "tcp:HOST:PORT only"),
        ("tcp:127.0.0.1:http", "port number"),
        ("tcp:127.0.0.1:99999", "port number"),
        ("127.0.0.1:9810", "expected unix:PATH or tcp:HOST:PORT"),
    ] {
        std::fs::write(&config, format!("[server]\nlisten = [\"unix:{}/nbd.sock\"]\nmetrics = \"{value}\"\n", dir.path().display())).unwrap();
        let out = run_timeout(Command::new(BIN).args(["check", "--config"]).arg(&config), Duration::from_secs(30));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{value} accepted");
        assert!(err.contains("bad.toml:3: server.metrics:") && err.contains(says), "{value}: the error names file, line, field and the problem: {err}");
    }

    // A port already taken fails the start, naming the setting.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let d = dir.path().display();
    let text = format!(
        "[server]\nlisten = [\"unix:{d}/nbd.sock\"]\ncontrol = \"{d}/control.sock\"\nstate_dir = \"{d}/state\"\nmetrics = \"tcp:127.0.0.1:{port}\"\n\n[[volume]]\nname = \"z\"\n[[volume.extent]]\nlength = \"1MiB\"\nzero = true\n"
    );
    std::fs::write(&config, text).unwrap();
    let out = run_timeout(Command::new(BIN).args(["serve", "--config"]).arg(&config), Duration::from_secs(30));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "serve started on a taken metrics port");
    assert!(err.contains(&format!("server.metrics tcp:127.0.0.1:{port}")) && err.to_lowercase().contains("in use"), "{err}");
}

const MIRROR: &str = r#"[[backend]]
name = "a"
path = "{dir}/a.img"
size = "8MiB"
[[backend]]
name = "b"
path = "{dir}/b.img"
size = "8MiB"

[[volume]]
name = "m"
[[volume.extent]]
length = "8MiB"
mirror = [ { backend = "a", backend_offset = 0 }, { backend = "b", backend_offset = 0 } ]
"#;

#[test]
fn mirror_legs_are_reported_and_promtool_accepts_them() {
    require("promtool", "prometheus");
    let port = free_port();
    let server = start(&body(port, MIRROR));
    let state = |leg: &str, s: &str| value(&scrape(port), &format!("nbdvirt_mirror_leg_state{{volume=\"m\",leg=\"{leg}\",state=\"{s}\"}}"));
    wait_until(&server, "leg b in sync", Duration::from_secs(60), || state("b", "in_sync") == 1.0);
    let page = scrape(port);
    promtool_check(&page);
    for s in ["resyncing", "failed", "split"] {
        assert_eq!((state("a", s), state("b", s)), (0.0, 0.0), "one state per leg: {s}");
    }
    assert_eq!(value(&page, "nbdvirt_resync_remaining_bytes{volume=\"m\",leg=\"b\"}"), 0.0);
    assert_eq!(value(&page, "nbdvirt_mirror_leg_state{volume=\"m\",leg=\"a\",state=\"in_sync\"}"), 1.0);
}

/// The pool families, rendered from pool views as the daemon will hand
/// them over (the pool engine lands separately), pass promtool too.
#[test]
fn pool_and_usage_families_pass_promtool() {
    use nbdvirt::api::{PoolStatus, PoolVolumeInfo, UsageReport, VolumeUsage, PoolLayout, VolumePriority, Status};
    use nbdvirt::metrics::{render, Views};
    let volume = PoolVolumeInfo {
        name: "t".into(),
        pool: "fast".into(),
        size: 1 << 30,
        layout: PoolLayout::Linear,
        thin: true,
        priority: VolumePriority::Low,
        description: String::new(),
        allocated: 3 << 20,
        written: 5 << 20,
        created: 0,
    };
    let pool = PoolStatus {
        name: "fast".into(),
        class: Some("ssd".into()),
        chunk: 1 << 20,
        priority: 10,
        on_full: "queue".into(),
        stores: Vec::new(),
        size: 64 << 20,
        allocated: 3 << 20,
        free: 61 << 20,
        reclaimable: 3 << 20,
        overcommit: 16.0,
        low_water: true,
        queued_writes: 0,
        reclaimed: 2 << 20,
        volumes: vec![volume],
    };
    let usage = UsageReport {
        since: 0,
        until: 10,
        volumes: vec![VolumeUsage { volume: "t".into(), pool: "fast".into(), rate: "low".into(), allocated: 3 << 20, written_bytes: 5 << 20, allocation_byte_seconds: 31457280.0 }],
    };
    let status = Status { config: None, listen: Vec::new(), volumes: Vec::new(), backends: Vec::new() };
    let text = render(&Views { status, counters: Vec::new(), mirrors: Vec::new(), migrations: Vec::new(), pools: vec![pool], server: Default::default(), usage: Some(usage), cluster: None });
    promtool_check(&text);
    assert_eq!(value(&text, "nbdvirt_pool_size_bytes{pool=\"fast\"}"), (64u64 << 20) as f64);
    assert_eq!(value(&text, "nbdvirt_pool_free_bytes{pool=\"fast\"}"), (61u64 << 20) as f64);
    assert_eq!(value(&text, "nbdvirt_pool_low_water{pool=\"fast\"}"), 1.0);
    assert_eq!(value(&text, "nbdvirt_pool_reclaimed_bytes_total{pool=\"fast\"}"), (2u64 << 20) as f64);
    assert_eq!(value(&text, "nbdvirt_volume_allocated_bytes{volume=\"t\"}"), (3u64 << 20) as f64);
    assert_eq!(value(&text, "nbdvirt_volume_written_bytes{volume=\"t\"}"), (5u64 << 20) as f64);
    assert_eq!(value(&text, "nbdvirt_volume_allocation_byte_seconds_total{volume=\"t\",rate=\"low\"}"), 31457280.0);
}

/// Volume `v` on one slow file under the name `slow` (`s1` or `s2`): a
/// write takes 1 s, longer than a swap may wait for it.
fn slow_body(port: u16, slow: &str) -> String {
    format!(
        "metrics = \"tcp:127.0.0.1:{port}\"\npause_timeout = \"200ms\"\npause_retries = 0\n\n\
         [[backend]]\nname = \"s1\"\npath = \"{{dir}}/slow.img\"\nsize = \"4MiB\"\nshared = true\ndelay = \"1s\"\n\n\
         [[backend]]\nname = \"s2\"\npath = \"{{dir}}/slow.img\"\nsize = \"4MiB\"\nshared = true\ndelay = \"1s\"\n\n\
         [[volume]]\nname = \"v\"\n[[volume.extent]]\nlength = \"4MiB\"\nbackend = \"{slow}\"\nbackend_offset = 0\n"
    )
}

#[test]
fn in_flight_gauge_and_a_drain_timeout_are_reported() {
    require("promtool", "prometheus");
    require("qemu-io", "qemu-utils");
    let port = free_port();
    let server = start(&slow_body(port, "s1"));
    let mut write = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 3 0 4k", &server.uri("v")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run qemu-io");
    let in_flight = || value(&scrape(port), "nbdvirt_requests_in_flight{volume=\"v\"}");
    wait_until(&server, "the slow write in flight", Duration::from_secs(10), || in_flight() == 1.0);
    rewrite_config(&server, &slow_body(port, "s2"));
    let err = cli_err(&server, &["reload"]);
    assert!(err.contains("drain timed out"), "{err}");
    assert!(write.wait().unwrap().success(), "the slow write completes");
    let page = scrape(port);
    promtool_check(&page);
    assert_eq!(value(&page, "nbdvirt_swaps_total{volume=\"v\",result=\"drain_timeout\"}"), 1.0);
    assert_eq!(value(&page, "nbdvirt_swaps_total{volume=\"v\",result=\"ok\"}"), 0.0);
    assert_eq!(value(&page, "nbdvirt_swap_drain_seconds_count{volume=\"v\"}"), 1.0, "the timed-out drain is timed");
    assert_eq!(value(&page, "nbdvirt_swap_hold_seconds_count{volume=\"v\"}"), 0.0, "nothing was committed");
    assert_eq!(value(&page, "nbdvirt_generation{volume=\"v\"}"), 1.0);
    assert_eq!(value(&page, "nbdvirt_requests_in_flight{volume=\"v\"}"), 0.0);
    assert_eq!(count(&page, "v", "write", "ok"), 1.0);
    // The write took the store's 1 s delay: it is past the 0.5 s bucket.
    assert_eq!(value(&page, "nbdvirt_request_duration_seconds_bucket{volume=\"v\",op=\"write\",le=\"0.5\"}"), 0.0);
}

/// Cluster mode: n1 reaches store `a`, n2 forwards to it. Each node's page
/// shows its state, one coordinator between them, both members alive, and
/// on n2 the forwarding link's counters (what the client did, nothing
/// failed); n1 killed → n2 shows it gone once its lease ends in etcd, and
/// the reads that then fail are counted. promtool accepts every page.
#[test]
fn cluster_membership_and_forwarding_are_reported_and_promtool_accepts_them() {
    require("promtool", "prometheus");
    let etcd = common::etcd::TestEtcd::start();
    let shared = tempfile::tempdir().unwrap();
    let file = shared.path().join("d.img");
    std::fs::write(&file, vec![7u8; 1 << 20]).unwrap();
    let node = |name: &str, port: u16| {
        let config = format!(
            "{}\n[[backend]]\nname = \"a\"\npath = \"{}\"\nsize = \"1MiB\"\nnodes = [\"n1\"]\n\n[[volume]]\nname = \"v\"\n[[volume.extent]]\nlength = \"1MiB\"\nbackend = \"a\"\nbackend_offset = 0\n",
            common::etcd::cluster_section(&etcd.url, name, 2),
            file.display()
        );
        let server = TestServer::start_with(&body(port, &config), &[&format!("tcp:127.0.0.1:{}", free_port())]);
        wait_control(&server);
        server
    };
    let ports = [free_port(), free_port()];
    let mut nodes = [node("n1", ports[0]), node("n2", ports[1])];
    for (n, port) in nodes.iter().zip(ports) {
        wait_until(n, "both members alive", Duration::from_secs(20), || {
            let page = scrape(port);
            page.contains("nbdvirt_cluster_member_alive{node=\"n1\"} 1") && page.contains("nbdvirt_cluster_member_alive{node=\"n2\"} 1")
        });
    }
    nbdsh(&nodes[1].uri("v"), "for i in range(10): assert h.pread(4096, i * 4096) == b'\\x07' * 4096");
    let pages = ports.map(scrape);
    for page in &pages {
        promtool_check(page);
        assert_eq!(value(page, "nbdvirt_cluster_node_state{state=\"serving\"}"), 1.0);
        assert_eq!(value(page, "nbdvirt_cluster_node_state{state=\"fenced\"}"), 0.0);
        let left = value(page, "nbdvirt_cluster_serving_left_seconds");
        assert!(left > 0.0 && left <= 2.0, "a 2 s lease leaves 0–2 s to serve: {left}");
        assert!(value(page, "nbdvirt_cluster_epoch") > 0.0);
        assert_eq!(value(page, "nbdvirt_cluster_member_fenced{node=\"n1\"}"), 0.0);
        assert_eq!(value(page, "nbdvirt_cluster_barriers{role=\"holding\"}"), 0.0);
    }
    let coordinators: f64 = pages.iter().map(|p| value(p, "nbdvirt_cluster_coordinator")).sum();
    assert_eq!(coordinators, 1.0, "one coordinator between the two nodes");
    assert!(!pages[0].contains("nbdvirt_forwarded_"), "n1 reaches its store and forwards nothing:\n{}", pages[0]);
    let link = |page: &str, what: &str| value(page, &format!("nbdvirt_forwarded_{what}{{volume=\"v\",stores=\"a\"}}"));
    // The ten reads, and what the client's handshake may have read.
    assert!(link(&pages[1], "requests_total") >= 10.0, "{}", pages[1]);
    assert_eq!(link(&pages[1], "failures_total"), 0.0);
    assert!(link(&pages[1], "connections") >= 1.0);

    nodes[0].kill();
    wait_until(&nodes[1], "n1 gone from n2's page", Duration::from_secs(20), || scrape(ports[1]).contains("nbdvirt_cluster_member_alive{node=\"n1\"} 0"));
    let out = Command::new("nbdsh").env("PATH", debian_path()).args(["-u", &nodes[1].uri("v"), "-c", "h.pread(4096, 0)"]).output().expect("run nbdsh");
    assert!(!out.status.success(), "a read with the only node reaching the store dead answered");
    let page = scrape(ports[1]);
    promtool_check(&page);
    assert!(link(&page, "failures_total") >= 1.0, "{page}");
    assert_eq!(value(&page, "nbdvirt_cluster_coordinator"), 1.0, "n2 took over coordinating");
}
