//! `nbdvirt attach` over TLS, without a kernel: the attach client's
//! STARTTLS handshake and its relay against the real server, with this
//! test standing where the kernel's NBD client would (the socket the
//! kernel would be given); and the CLI's messages and exit codes for the
//! ways TLS can fail. The device itself is tested in tests/kernel.rs.

mod common;

use common::nbd_client::{be32, be64, header, read_n, simple_reply};
use common::pki::*;
use common::*;
use nbdvirt::attach::client::{self, Connection, TlsTarget};
use nbdvirt::attach::relay::{Ended, RelayEnd};
use nbdvirt::attach::{AttachError, HandshakeError, Relays};
use nbdvirt::endpoint::Endpoint;
use nbdvirt::nbd::{CMD_DISC, CMD_FLUSH, CMD_READ, CMD_WRITE, SIMPLE_REPLY_MAGIC};
use nbdvirt::tls::{TlsClient, TlsClientFiles};
use std::collections::HashMap;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;

const VOLUME: &str = r#"[[backend]]
name = "a"
path = "{dir}/a.img"
size = "32MiB"

[[volume]]
name = "v"
[[volume.extent]]
length = "32MiB"
backend = "a"
"#;

fn tls_server(pki: &Path, extra_listen: &[&str]) -> TestServer {
    TestServer::start_with(&format!("{}{VOLUME}", tls_require(pki)), extra_listen)
}

fn psk_client(pki: &Path, username: Option<&str>) -> TlsClient {
    TlsClient::load(&TlsClientFiles { certificates: None, psk: Some(pki.join("keys.psk")), username: username.map(str::to_string) }).unwrap()
}

/// Connects through STARTTLS and starts a relay; returns the socket the
/// kernel would get.
fn relayed(endpoint: &Endpoint, tls: &TlsTarget<'_>, relays: &mut Relays) -> UnixStream {
    let (conn, info) = client::connect(endpoint, "v", Duration::from_secs(10), Some(tls)).unwrap();
    assert_eq!(info.size, 32 * MIB as u64);
    let Connection::Tls(session) = conn else { panic!("a TLS attach gave a plain connection") };
    let kernel = UnixStream::from(relays.start("connection 1".into(), *session).unwrap());
    kernel.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    kernel.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    kernel
}

/// The relays that end within 10 s (all of them, or the test fails).
fn wait_ended(relays: &mut Relays) -> Vec<RelayEnd> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut ended = Vec::new();
    while !relays.is_empty() {
        assert!(Instant::now() < deadline, "{} relay(s) still running 10 s after their end", relays.len());
        ended.extend(relays.reap());
        std::thread::sleep(Duration::from_millis(20));
    }
    ended
}

/// The kernel's disconnect: NBD_CMD_DISC, then its socket shut down.
fn disconnect(mut kernel: UnixStream) {
    kernel.write_all(&header(0, CMD_DISC, 99, 0, 0)).unwrap();
    kernel.shutdown(std::net::Shutdown::Both).unwrap();
}

/// Eight 1 MiB writes sent back to back by one thread while this one
/// reads the replies (both directions of the relay busy at once, each
/// more than its buffer), a flush, then eight reads in flight together,
/// whose replies may come in any order.
fn pipelined_round_trip(kernel: &mut UnixStream) {
    let data: Vec<Vec<u8>> = (0..8).map(|i| pattern(i + 1, MIB)).collect();
    let mut sender = kernel.try_clone().unwrap();
    let to_send = data.clone();
    let writer = std::thread::spawn(move || {
        for (i, d) in to_send.iter().enumerate() {
            sender.write_all(&header(0, CMD_WRITE, 100 + i as u64, (i * MIB) as u64, MIB as u32)).unwrap();
            sender.write_all(d).unwrap();
        }
    });
    let mut acked: Vec<u64> = (0..8).map(|_| simple_reply(kernel)).map(|(err, cookie)| if err == 0 { cookie } else { panic!("WRITE {cookie} failed: {err}") }).collect();
    writer.join().unwrap();
    acked.sort();
    assert_eq!(acked, (100..108).collect::<Vec<_>>());
    kernel.write_all(&header(0, CMD_FLUSH, 200, 0, 0)).unwrap();
    assert_eq!(simple_reply(kernel), (0, 200), "FLUSH");
    for i in 0..8u64 {
        kernel.write_all(&header(0, CMD_READ, 300 + i, i * MIB as u64, MIB as u32)).unwrap();
    }
    let mut got = HashMap::new();
    for _ in 0..8 {
        let r = read_n(kernel, 16, "READ reply");
        assert_eq!(be32(&r), SIMPLE_REPLY_MAGIC);
        assert_eq!(be32(&r[4..]), 0, "READ error");
        got.insert(be64(&r[8..]), read_n(kernel, MIB, "READ data"));
    }
    for (i, d) in data.iter().enumerate() {
        assert!(got[&(300 + i as u64)] == *d, "READ {i} differs from what was written");
    }
}

#[test]
fn relay_carries_pipelined_requests_over_psk_on_a_unix_socket() {
    let pki = make_pki();
    let server = tls_server(pki.path(), &[]);
    let endpoint = Endpoint::Unix(server.socket.clone());
    let tls = psk_client(pki.path(), Some("bob"));
    let mut relays = Relays::new();
    let mut kernel = relayed(&endpoint, &TlsTarget { client: &tls, hostname: None }, &mut relays);
    pipelined_round_trip(&mut kernel);
    disconnect(kernel);
    let ended = wait_ended(&mut relays);
    assert!(matches!(ended[..], [RelayEnd { result: Ok(Ended::Detached), .. }]), "{ended:?}");
    assert!(server.log().contains("psk=Some(\"bob\")"), "the server did not see PSK identity bob:\n{}", server.log());
    let written = read_at(&server.path("a.img"), 3 * MIB as u64, MIB);
    assert!(written == pattern(4, MIB), "the backing file does not hold the 4th write");
}

#[test]
fn relay_over_tcp_with_a_client_certificate_checks_the_server_name() {
    let pki = make_pki();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listen = format!("tcp:127.0.0.1:{port}");
    let server = tls_server(pki.path(), &[&listen]);
    let endpoint: Endpoint = listen.parse().unwrap();
    let files = TlsClientFiles { certificates: Some(pki.path().join("alice")), psk: None, username: None };
    let tls = TlsClient::load(&files).unwrap();
    // The certificate names localhost and 127.0.0.1, not this.
    match client::connect(&endpoint, "v", Duration::from_secs(10), Some(&TlsTarget { client: &tls, hostname: Some("nbd.example") })) {
        Err(AttachError::Handshake { source: HandshakeError::Tls { message, credentials }, .. }) => {
            assert!(message.contains("hostname mismatch"), "{message}");
            assert!(credentials.contains("alice/client-cert.pem"), "{credentials}");
        }
        other => panic!("a wrong server name was accepted: {other:?}"),
    }
    let mut relays = Relays::new();
    let mut kernel = relayed(&endpoint, &TlsTarget { client: &tls, hostname: Some("127.0.0.1") }, &mut relays);
    pipelined_round_trip(&mut kernel);
    disconnect(kernel);
    let ended = wait_ended(&mut relays);
    assert!(matches!(ended[..], [RelayEnd { result: Ok(Ended::Detached), .. }]), "{ended:?}");
    assert!(server.log().contains("cn=[\"alice\"]"), "the server did not see alice's certificate:\n{}", server.log());
}

/// A server that dies takes the relay with it, and the kernel's end
/// reads EOF: the kernel sees a dead connection, as without TLS.
#[test]
fn relay_ends_and_closes_the_kernel_end_when_the_server_dies() {
    let pki = make_pki();
    let mut server = tls_server(pki.path(), &[]);
    let endpoint = Endpoint::Unix(server.socket.clone());
    let tls = psk_client(pki.path(), None);
    let mut relays = Relays::new();
    let mut kernel = relayed(&endpoint, &TlsTarget { client: &tls, hostname: None }, &mut relays);
    kernel.write_all(&header(0, CMD_READ, 1, 0, 4096)).unwrap();
    assert_eq!(simple_reply(&mut kernel), (0, 1));
    read_n(&mut kernel, 4096, "READ data");
    server.kill();
    let ended = wait_ended(&mut relays);
    assert!(matches!(ended[..], [ref e] if e.is_failure()), "{ended:?}");
    let mut buf = [0u8; 16];
    assert_eq!(std::io::Read::read(&mut kernel, &mut buf).unwrap(), 0, "the kernel's end is still open");
}

/// `nbdvirt attach` with these arguments must fail with `code` and name
/// every one of `needles` on stderr. It fails before any device is used,
/// so the host's nbd module (or its absence) does not matter.
fn attach_fails(socket: &Path, args: &[&str], code: i32, needles: &[&str]) {
    let out = run_timeout(
        Command::new(BIN).args(["attach", "v", "--connect"]).arg(format!("unix:{}", socket.display())).args(args).env_remove("NBDVIRT_CONFIG"),
        Duration::from_secs(60),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "nbdvirt attach {args:?}: exit code\nstderr:\n{err}");
    for n in needles {
        assert!(err.contains(n), "nbdvirt attach {args:?}: stderr should name {n:?}\nstderr:\n{err}");
    }
    assert!(out.stdout.is_empty(), "nbdvirt attach {args:?} printed a device: {}", String::from_utf8_lossy(&out.stdout));
}

const OTHER: i32 = 1;
const INVALID: i32 = 7;

#[test]
fn cli_names_what_failed_in_tls_and_exits_with_its_kind() {
    let pki = make_pki();
    let p = |name: &str| pki.path().join(name).display().to_string();
    let server = tls_server(pki.path(), &[]);
    let sock = &server.socket;
    // The server knows alice, with another key.
    attach_fails(sock, &["--tls-psk", &p("wrong.psk")], OTHER, &["TLS handshake failed", "PSK identity 'alice'", "wrong.psk", "decrypt error"]);
    // The server's certificate is not signed by this CA.
    attach_fails(sock, &["--tls-certificates", &p("ca2")], OTHER, &["TLS handshake failed", "ca2/ca-cert.pem", "certificate verify failed"]);
    // Our certificate is not signed by the server's CA. With TLS 1.3 the
    // server says so after our side of the handshake is done: with an
    // "unknown ca" alert, or a closed socket if our next write comes first.
    attach_fails(sock, &["--tls-certificates", &p("stranger")], OTHER, &["TLS handshake failed", "stranger/client-cert.pem", "the server ended the session"]);
    attach_fails(sock, &["--tls-psk", &p("keys.psk"), "--tls-username", "carol"], INVALID, &["keys.psk", "no key for identity 'carol'"]);
    attach_fails(sock, &["--tls-psk", &p("nosuch.psk")], INVALID, &["TLS credentials", "nosuch.psk"]);
    attach_fails(sock, &["--tls-certificates", &p("nosuch")], INVALID, &["nosuch/ca-cert.pem", "missing"]);
    attach_fails(sock, &["--tls-psk", &p("keys.psk"), "--tls-hostname", "x"], INVALID, &["--tls-hostname needs --tls-certificates"]);
    attach_fails(sock, &["--tls-certificates", &p("alice"), "--tls-username", "x"], INVALID, &["--tls-username needs --tls-psk"]);
    attach_fails(sock, &[], OTHER, &["server requires TLS", "--tls-psk"]);
    // Either flag makes TLS required: a server without TLS fails it.
    let plain = TestServer::start(VOLUME);
    attach_fails(&plain.socket, &["--tls-psk", &p("keys.psk")], OTHER, &["refused NBD_OPT_STARTTLS", "TLS is off"]);
}
