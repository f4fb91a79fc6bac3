//! The limits a client meets before it has chosen an export: the overall
//! handshake time (a client that drips bytes is dropped too), connections
//! per source address, option payload and export-name sizes. Each trip is
//! logged and counted in `nbdvirt_limit_trips_total`, which promtool checks.
mod common;
use common::nbd_client::*;
use common::*;
use nbdvirt::nbd::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn scrape(port: u16) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    raw.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).expect("HTTP body")
}

fn trips(text: &str, limit: &str) -> u64 {
    let series = format!("nbdvirt_limit_trips_total{{limit=\"{limit}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&series)).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

/// Waits (bounded) for the server to close `s`; panics if it never does.
fn closed_within(s: &mut (impl Read + Write), drip: bool, limit: Duration) {
    let start = Instant::now();
    let mut buf = [0u8; 64];
    loop {
        assert!(start.elapsed() < limit, "the server kept the client past {limit:?}");
        if drip {
            // One byte of an option header now and then: each resets a
            // per-read timeout, never the overall one.
            if s.write_all(&[0x49]).is_err() {
                return;
            }
        }
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

#[test]
fn limits_trip_log_and_count() {
    require("promtool", "prometheus");
    let (nbd_port, metrics_port) = (free_port(), free_port());
    let body = format!(
        "metrics = \"tcp:127.0.0.1:{metrics_port}\"\nhandshake_timeout = \"1s\"\nmax_connections_per_address = 2\nmax_option_payload = \"8KiB\"\nmax_export_name = 64\n\n\
         [[volume]]\nname = \"v\"\n[[volume.extent]]\nlength = \"1MiB\"\nzero = true\n"
    );
    let server = TestServer::start_with(&body, &[&format!("tcp:127.0.0.1:{nbd_port}")]);

    // A client that drips one byte every 200 ms is still dropped.
    let mut h = Handshake::start(&server);
    h.s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    closed_within(&mut h.s, true, Duration::from_secs(20));
    // One that says nothing at all, too.
    let mut h = Handshake::start(&server);
    h.s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    closed_within(&mut h.s, false, Duration::from_secs(20));

    // Two connections from 127.0.0.1 are allowed; the third is closed at once
    // (no greeting), and a Unix client is not counted against TCP's address.
    let open = || {
        let s = TcpStream::connect(("127.0.0.1", nbd_port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    };
    let mut greeting = [0u8; 18];
    let (mut a, mut b) = (open(), open());
    a.read_exact(&mut greeting).unwrap();
    b.read_exact(&mut greeting).unwrap();
    let mut c = open();
    assert_eq!(c.read(&mut greeting).unwrap_or(0), 0, "a third connection from one address is refused");
    let mut u = Handshake::start(&server);
    assert_eq!(u.exchange(OPT_LIST, &[]).last().unwrap().kind, REP_ACK);
    drop((a, b));

    // Option payload and export name sizes.
    u.expect_error(OPT_INFO, &vec![0u8; 9000], REP_ERR_TOO_BIG);
    let long = "x".repeat(65);
    u.expect_error(OPT_GO, &info_payload(&long, &[]), REP_ERR_TOO_BIG);
    u.expect_error(OPT_LIST_META_CONTEXT, &meta_payload(&long, &["base:"]), REP_ERR_TOO_BIG);
    assert_eq!(u.exchange(OPT_GO, &info_payload("v", &[])).last().unwrap().kind, REP_ACK, "the connection is still usable");

    let text = scrape(metrics_port);
    assert!(trips(&text, "handshake_timeout") >= 2, "{text}");
    assert!(trips(&text, "max_connections_per_address") >= 1);
    assert_eq!(trips(&text, "max_option_payload"), 1);
    assert_eq!(trips(&text, "max_export_name"), 2);
    assert_eq!(trips(&text, "max_connections"), 0);
    let mut check = Command::new("promtool").args(["check", "metrics"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    check.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(out.status.success(), "promtool: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let log = server.log();
    for needle in ["handshake not finished within handshake_timeout", "connection refused: max_connections_per_address", "option payload above max_option_payload", "export name above max_export_name"] {
        assert!(log.contains(needle), "log lacks {needle:?}:\n{log}");
    }
}

#[test]
fn bad_limit_values_fail_the_config() {
    for (line, needle) in [
        ("handshake_timeout = \"10ms\"", "server.handshake_timeout"),
        ("max_option_payload = \"1MiB\"", "server.max_option_payload"),
        ("max_export_name = 5000", "server.max_export_name"),
        ("max_connections_per_address = 0", "server.max_connections_per_address"),
        ("tls = \"maybe\"", "server.tls"),
        ("tls = \"on\"", "needs tls_certificates or tls_psk"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("c.toml");
        std::fs::write(&config, format!("[server]\n{line}\n\n[[volume]]\nname = \"v\"\n[[volume.extent]]\nlength = \"1MiB\"\nzero = true\n")).unwrap();
        let out = Command::new(BIN).args(["check", "--config"]).arg(&config).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("c.toml:2") && err.contains(needle), "{line}: {err}");
    }
}
