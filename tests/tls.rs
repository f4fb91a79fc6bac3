//! TLS with real clients: nbdinfo (`nbds://` with `tls-certificates` and
//! `tls-psk-file`), libnbd's Python binding, qemu-img/qemu-io with
//! `tls-creds-x509` / `tls-creds-psk`, and a raw client for what those
//! clients never do (downgrades, options out of order). Credentials come
//! from tests/tls/make-pki.sh.
mod common;
use common::nbd_client::*;
use common::pki::Pki;
use common::*;
use nbdvirt::nbd::*;
use std::io::{Read, Write};
use std::process::Command;
use std::time::Duration;

const VOLUMES: &str = r#"
[[backend]]
name = "m"
memory = true
size = "16MiB"

[[volume]]
name = "v"
[[volume.extent]]
length = "8MiB"
backend = "m"

[[volume]]
name = "secure"
tls_only = true
[[volume.extent]]
length = "8MiB"
backend = "m"
backend_offset = "8MiB"
"#;

/// A server on a Unix socket and `tcp:127.0.0.1:PORT`; `keys` go in `[server]`.
fn start(keys: &str, port: u16) -> TestServer {
    TestServer::start_with(&format!("{keys}\n{VOLUMES}"), &[&format!("tcp:127.0.0.1:{port}")])
}

/// nbdinfo on `uri`: Ok(stdout) or Err(stderr).
fn nbdinfo(uri: &str) -> Result<String, String> {
    require("nbdinfo", "libnbd-bin");
    let out = run_timeout(Command::new("nbdinfo").env("PATH", debian_path()).arg(uri), Duration::from_secs(60));
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// A libnbd Python script (`import nbd` done); Ok(stdout) or Err(stderr).
pub fn python(script: &str) -> Result<String, String> {
    require("nbdsh", "python3-libnbd");
    let out = run_timeout(Command::new("/usr/bin/python3").args(["-c", &format!("import nbd, sys\n{script}")]), Duration::from_secs(60));
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn each_mode_with_nbdinfo_and_the_raw_client() {
    let pki = Pki::new();
    let (alice, psk) = (pki.path("alice"), pki.path("keys.psk"));
    for mode in ["off", "on", "require"] {
        let port = free_port();
        let keys = if mode == "off" { String::new() } else { pki.server_keys(mode) };
        let server = start(&keys, port);
        let plain = nbdinfo(&format!("nbd://127.0.0.1:{port}/v"));
        let x509 = nbdinfo(&format!("nbds://127.0.0.1:{port}/v?tls-certificates={alice}"));
        let with_psk = nbdinfo(&format!("nbds://bob@127.0.0.1:{port}/v?tls-psk-file={psk}"));
        match mode {
            "off" => {
                assert!(plain.is_ok(), "{plain:?}");
                assert!(x509.is_err() && with_psk.is_err(), "TLS must fail when off: {x509:?} {with_psk:?}");
                Handshake::start(&server).expect_error(OPT_STARTTLS, &[], REP_ERR_POLICY);
            }
            "on" => {
                assert!(plain.is_ok(), "{plain:?}");
                for r in [&x509, &with_psk] {
                    assert!(r.as_ref().is_ok_and(|o| o.contains("with TLS")), "{r:?}");
                }
                // A TLS-only volume: refused in the clear, and not listed.
                let mut h = Handshake::start(&server);
                h.expect_error(OPT_GO, &info_payload("secure", &[]), REP_ERR_TLS_REQD);
                h.expect_error(OPT_INFO, &info_payload("secure", &[]), REP_ERR_TLS_REQD);
                h.expect_error(OPT_LIST_META_CONTEXT, &meta_payload("secure", &["base:"]), REP_ERR_TLS_REQD);
                let names = list_names(&mut h);
                assert_eq!(names, ["v"], "LIST in the clear omits the TLS-only volume");
                let mut h = Handshake::start(&server);
                h.send_option(OPT_EXPORT_NAME, b"secure");
                assert_eq!(drain_until_closed(&mut h.s, "EXPORT_NAME of a TLS-only volume in the clear"), 0);
                let listed = Command::new("nbdinfo")
                    .env("PATH", debian_path())
                    .args(["--list", &format!("nbds://127.0.0.1:{port}/?tls-certificates={alice}")])
                    .output()
                    .unwrap();
                assert!(String::from_utf8_lossy(&listed.stdout).contains("export=\"secure\""), "listed over TLS: {listed:?}");
            }
            _ => {
                assert!(plain.is_err(), "plain client against require: {plain:?}");
                for r in [&x509, &with_psk] {
                    assert!(r.as_ref().is_ok_and(|o| o.contains("with TLS")), "{r:?}");
                }
                let mut h = Handshake::start(&server);
                for (opt, data) in [
                    (OPT_GO, info_payload("v", &[])),
                    (OPT_INFO, info_payload("v", &[])),
                    (OPT_LIST, vec![]),
                    (OPT_STRUCTURED_REPLY, vec![]),
                    (OPT_LIST_META_CONTEXT, meta_payload("v", &["base:"])),
                    (12345, vec![]),
                ] {
                    h.expect_error(opt, &data, REP_ERR_TLS_REQD);
                }
                assert_eq!(h.exchange(OPT_ABORT, &[])[0].kind, REP_ACK);
                let mut h = Handshake::start(&server);
                h.send_option(OPT_EXPORT_NAME, b"v");
                assert_eq!(drain_until_closed(&mut h.s, "EXPORT_NAME before STARTTLS under require"), 0);
            }
        }
        drop(server);
    }
}

fn list_names(h: &mut Handshake) -> Vec<String> {
    let r = h.exchange(OPT_LIST, &[]);
    assert_eq!(r.last().unwrap().kind, REP_ACK, "{r:?}");
    r.iter().filter(|x| x.kind == REP_SERVER).map(|x| String::from_utf8_lossy(&x.data[4..4 + be32(&x.data) as usize]).into_owned()).collect()
}

#[test]
fn libnbd_and_qemu_clients_over_x509_and_psk() {
    let pki = Pki::new();
    let port = free_port();
    let _server = start(&pki.server_keys("require"), port);
    // libnbd's own TLS switch, both credential kinds, a round trip each.
    for creds in [format!("h.set_tls_certificates('{}')", pki.path("alice")), format!("h.set_tls_psk_file('{}'); h.set_tls_username('alice')", pki.path("keys.psk"))] {
        let out = python(&format!(
            "h = nbd.NBD(); h.set_tls(nbd.TLS_REQUIRE); {creds}\n\
             h.set_export_name('secure'); h.connect_tcp('127.0.0.1', '{port}')\n\
             assert h.get_tls_negotiated()\n\
             h.pwrite(b'\\x5a' * 65536, 4096); h.flush()\n\
             assert h.pread(65536, 4096) == b'\\x5a' * 65536\n\
             print('ok')"
        ));
        assert_eq!(out.as_deref().map(str::trim), Ok("ok"), "{creds}: {out:?}");
    }
    require("qemu-io", "qemu-utils");
    let objects = [
        format!("tls-creds-x509,id=tls0,dir={},endpoint=client", pki.path("bob")),
        format!("tls-creds-psk,id=tls0,dir={},endpoint=client,username=bob", pki.qemu_psk_dir()),
    ];
    for (i, object) in objects.iter().enumerate() {
        let pattern = format!("0x{:x}", 0x30 + i);
        let out = run_ok(Command::new("qemu-io").args([
            "--object",
            object,
            "--image-opts",
            &format!("driver=nbd,host=127.0.0.1,port={port},export=secure,tls-creds=tls0"),
            "-c",
            &format!("write -P {pattern} 1M 1M"),
            "-c",
            &format!("read -P {pattern} 1M 1M"),
        ]));
        assert!(out.contains("read 1048576/1048576"), "{object}: {out}");
        require("qemu-img", "qemu-utils");
        let info = run_ok(Command::new("qemu-img").args([
            "info",
            "--object",
            object,
            "--image-opts",
            &format!("driver=nbd,host=127.0.0.1,port={port},export=secure,tls-creds=tls0"),
        ]));
        assert!(info.contains("virtual size: 8 MiB"), "{info}");
    }
}

#[test]
fn wrong_credentials_fail_the_handshake() {
    let pki = Pki::new();
    let port = free_port();
    let keys = format!("{}tls_verify_peer = true\n", pki.server_keys("require"));
    let server = start(&keys, port);
    let connect = |creds: &str| {
        python(&format!("h = nbd.NBD(); h.set_tls(nbd.TLS_REQUIRE); {creds}\nh.set_export_name('v'); h.connect_tcp('127.0.0.1', '{port}')\nprint('connected')"))
    };
    // Right certificate: connects.
    assert!(connect(&format!("h.set_tls_certificates('{}')", pki.path("alice"))).is_ok());
    // A CA that did not sign the server's certificate.
    let wrong_ca = pki.root.join("wrong-ca");
    std::fs::create_dir_all(&wrong_ca).unwrap();
    std::fs::copy(pki.root.join("ca2/ca-cert.pem"), wrong_ca.join("ca-cert.pem")).unwrap();
    let r = connect(&format!("h.set_tls_certificates('{}')", wrong_ca.display()));
    assert!(r.as_ref().is_err_and(|e| e.contains("handshake")), "wrong CA: {r:?}");
    // tls_verify_peer: no client certificate, or one from another CA.
    let no_cert = pki.root.join("no-cert");
    std::fs::create_dir_all(&no_cert).unwrap();
    std::fs::copy(pki.root.join("ca/ca-cert.pem"), no_cert.join("ca-cert.pem")).unwrap();
    for dir in [no_cert.display().to_string(), pki.path("stranger")] {
        let r = connect(&format!("h.set_tls_certificates('{dir}')"));
        assert!(r.is_err(), "client certificate required, {dir}: {r:?}");
    }
    // PSK: a key the server does not know for that identity; an unknown identity.
    let r = connect(&format!("h.set_tls_psk_file('{}'); h.set_tls_username('alice')", pki.path("wrong.psk")));
    assert!(r.is_err(), "wrong PSK: {r:?}");
    let log = server.log();
    assert!(log.contains("TLS handshake failed"), "failures are logged:\n{log}");
}

/// proto.md: after STARTTLS the server forgets what was negotiated in the
/// clear (a man in the middle could have negotiated it), and a second
/// STARTTLS is invalid.
#[test]
fn starttls_forgets_what_was_negotiated_before_it() {
    let pki = Pki::new();
    let server = start(&pki.server_keys("on"), free_port());
    let mut h = Handshake::start(&server);
    h.structured_reply();
    assert_eq!(h.set_meta("v", &["base:allocation"]).len(), 1);
    assert_eq!(h.exchange(OPT_STARTTLS, &[])[0].kind, REP_ACK);
    let client = nbdvirt::tls::TlsClient::load(&nbdvirt::tls::TlsClientFiles {
        psk: Some(pki.root.join("keys.psk")),
        username: Some("alice".into()),
        ..Default::default()
    })
    .unwrap();
    h.s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut tls = client.connect(None, h.s).expect("TLS handshake");
    let second = exchange_on(&mut tls, OPT_STARTTLS, &[]);
    assert_eq!(second.last().unwrap().1, REP_ERR_INVALID, "a second STARTTLS");
    let go = exchange_on(&mut tls, OPT_GO, &info_payload("v", &[]));
    assert_eq!(go.last().unwrap().1, REP_ACK, "{go:?}");
    let export = go.iter().find(|r| r.1 == REP_INFO && be16(&r.2) == INFO_EXPORT).expect("NBD_INFO_EXPORT");
    let flags = be16(&export.2[10..]);
    assert_eq!(flags & TFLAG_SEND_DF, 0, "structured replies were forgotten, so no DF");
    // A READ gets a simple reply; BLOCK_STATUS fails: no context survived.
    tls.write_all(&header(0, CMD_READ, 7, 0, 4096)).unwrap();
    let mut reply = [0u8; 16];
    tls.read_exact(&mut reply).unwrap();
    assert_eq!((be32(&reply), be32(&reply[4..]), be64(&reply[8..])), (SIMPLE_REPLY_MAGIC, 0, 7), "simple reply to READ");
    let mut data = vec![0u8; 4096];
    tls.read_exact(&mut data).unwrap();
    tls.write_all(&header(0, CMD_BLOCK_STATUS, 8, 0, 4096)).unwrap();
    tls.read_exact(&mut reply).unwrap();
    assert_eq!((be32(&reply), be32(&reply[4..])), (SIMPLE_REPLY_MAGIC, 22), "BLOCK_STATUS without a context: EINVAL");
    tls.write_all(&header(0, CMD_DISC, 9, 0, 0)).unwrap();
}

/// Option exchange over any stream: (option, type, data) up to the final reply.
fn exchange_on(s: &mut (impl Read + Write), opt: u32, data: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
    s.write_all(&option(opt, data)).unwrap();
    let mut out = Vec::new();
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        assert_eq!(be64(&h), OPT_REPLY_MAGIC);
        let mut d = vec![0u8; be32(&h[16..]) as usize];
        s.read_exact(&mut d).unwrap();
        let kind = be32(&h[12..]);
        out.push((be32(&h[8..]), kind, d));
        if kind == REP_ACK || kind & REP_FLAG_ERROR != 0 {
            return out;
        }
    }
}

/// Rotation without restart: new files take effect at reload, for new
/// connections.
#[test]
fn reload_rotates_certificates() {
    let (old, new) = (Pki::new(), Pki::new());
    let port = free_port();
    let current = old.root.join("current");
    let install = |from: &Pki| {
        std::fs::create_dir_all(&current).unwrap();
        for f in ["ca-cert.pem", "server-cert.pem", "server-key.pem"] {
            std::fs::copy(from.root.join("server").join(f), current.join(f)).unwrap();
        }
    };
    install(&old);
    let server = start(&format!("tls = \"require\"\ntls_certificates = \"{}\"\n", current.display()), port);
    let with = |p: &Pki| nbdinfo(&format!("nbds://127.0.0.1:{port}/v?tls-certificates={}", p.path("alice")));
    assert!(with(&old).is_ok());
    assert!(with(&new).is_err(), "the new CA does not know the old server certificate");
    install(&new);
    common::cli::cli_ok(&server, &["reload"]);
    assert!(with(&new).is_ok(), "after reload the new certificate is served");
    assert!(with(&old).is_err(), "and the old one is gone");
    // A broken file fails the reload and keeps what is in force.
    std::fs::write(current.join("server-key.pem"), "not a key").unwrap();
    let out = common::cli::cli(&server, &["reload"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("server-key.pem"), "the error names the file: {err}");
    assert!(with(&new).is_ok(), "a failed reload keeps the credentials in force");
}

/// proto.md: TLS 1.2 at least; GnuTLS clients told to stop at 1.2 (its
/// system priority file) still connect with either credential kind.
#[test]
fn tls_1_2_and_1_3_with_gnutls_clients() {
    let pki = Pki::new();
    let port = free_port();
    let server = start(&pki.server_keys("require"), port);
    let no13 = pki.root.join("gnutls-no-tls13.conf");
    std::fs::write(&no13, "[overrides]\ndisabled-version = tls1.3\n").unwrap();
    let uris = [format!("nbds://alice@127.0.0.1:{port}/v?tls-psk-file={}", pki.path("keys.psk")), format!("nbds://127.0.0.1:{port}/v?tls-certificates={}", pki.path("bob"))];
    for uri in &uris {
        assert!(nbdinfo(uri).is_ok(), "TLS 1.3: {uri}");
        let out = run_timeout(Command::new("nbdinfo").env("PATH", debian_path()).env("GNUTLS_SYSTEM_PRIORITY_FILE", &no13).arg(uri), Duration::from_secs(60));
        assert!(out.status.success(), "TLS 1.2: {uri}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let log = server.log();
    let started: Vec<&str> = log.lines().filter(|l| l.contains("TLS started")).collect();
    assert_eq!(started.iter().filter(|l| l.contains("TLSv1.3")).count(), 2, "{started:#?}");
    assert_eq!(started.iter().filter(|l| l.contains("TLSv1.2")).count(), 2, "{started:#?}");
}

/// Many small pipelined requests and large ones over TLS (nbdcopy, 64 in
/// flight): the reader takes several requests' records per read and their
/// replies leave gathered into shared records; 256 KiB replies span many
/// records. Every byte comes back as written.
#[test]
fn pipelined_bulk_copies_over_tls_come_back_intact() {
    require("nbdcopy", "libnbd-bin");
    let pki = Pki::new();
    let port = free_port();
    let body = format!(
        "{}\n[[backend]]\nname = \"m\"\nmemory = true\nsize = \"32MiB\"\n\n[[volume]]\nname = \"bulk\"\n[[volume.extent]]\nlength = \"32MiB\"\nbackend = \"m\"\n",
        pki.server_keys("require")
    );
    let _server = TestServer::start_with(&body, &[&format!("tcp:127.0.0.1:{port}")]);
    let data: Vec<u8> = (0..32u64 << 20).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let source = pki.root.join("source.img");
    std::fs::write(&source, &data).unwrap();
    let uri = format!("nbds://alice@127.0.0.1:{port}/bulk?tls-psk-file={}", pki.path("keys.psk"));
    let copy = |from: &str, to: &str, request_size: &str| {
        run_ok(Command::new("nbdcopy").env("PATH", debian_path()).args(["--requests=64", "--connections=1", &format!("--request-size={request_size}"), from, to]));
    };
    copy(&source.display().to_string(), &uri, "4096");
    for (i, request_size) in ["4096", "262144"].into_iter().enumerate() {
        let back = pki.root.join(format!("back-{i}.img"));
        copy(&uri, &back.display().to_string(), request_size);
        let got = std::fs::read(&back).unwrap();
        assert!(got == data, "{request_size}-byte reads: the copy differs at byte {:?}", got.iter().zip(&data).position(|(a, b)| a != b));
    }
}
