//! Who may use which export: every rule kind allows the client it names
//! and refuses another one of the same kind, with real clients (nbdinfo,
//! libnbd from Python for a chosen source address, qemu-io), two Unix users
//! (setpriv), two certificates and two PSK identities. A refused client
//! sees the export as unknown, finds it absent from LIST, and is logged.
mod common;
use common::pki::Pki;
use common::*;
use std::process::Command;
use std::time::Duration;

/// Two throwaway system users (created when missing): (uid, gid) each.
fn users() -> [(u32, u32); 2] {
    require("setpriv", "util-linux");
    ["nbdvirt-acl1", "nbdvirt-acl2"].map(|name| {
        if Command::new("id").arg(name).output().map(|o| !o.status.success()).unwrap_or(true) {
            let out = Command::new("useradd").args(["--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name]).output().expect("useradd");
            assert!(out.status.success() || String::from_utf8_lossy(&out.stderr).contains("already exists"), "useradd {name}: {out:?}");
        }
        let id = |flag: &str| -> u32 {
            String::from_utf8_lossy(&Command::new("id").args([flag, name]).output().unwrap().stdout).trim().parse().expect("numeric id")
        };
        (id("-u"), id("-g"))
    })
}

/// Runs `args` (nbdinfo …) as uid:gid; Ok(stdout) or Err(stderr).
fn as_user((uid, gid): (u32, u32), args: &[&str]) -> Result<String, String> {
    let mut cmd = Command::new("setpriv");
    cmd.args([&format!("--reuid={uid}"), &format!("--regid={gid}"), "--clear-groups", "--"]).args(args).env("PATH", debian_path()).env("HOME", "/tmp");
    result(run_timeout(&mut cmd, Duration::from_secs(60)))
}

fn result(out: std::process::Output) -> Result<String, String> {
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn nbdinfo(args: &[&str]) -> Result<String, String> {
    require("nbdinfo", "libnbd-bin");
    result(run_timeout(Command::new("nbdinfo").env("PATH", debian_path()).args(args), Duration::from_secs(60)))
}

/// libnbd connected from `source` (a chosen loopback address) to the
/// server's TCP port: (opt_go outcome, the LIST it saw).
fn from_address(source: &str, port: u16, export: &str) -> (Result<(), String>, String) {
    require("nbdsh", "python3-libnbd");
    let script = format!(
        "import nbd, socket\n\
         def conn():\n    s = socket.socket(); s.bind(('{source}', 0)); s.connect(('127.0.0.1', {port}))\n    h = nbd.NBD(); h.set_opt_mode(True); h.connect_socket(s.detach()); return h\n\
         h = conn(); names = []\n\
         h.opt_list(lambda n, d: names.append(n))\n\
         print(','.join(sorted(names)))\n\
         h = conn(); h.set_export_name('{export}')\n\
         try:\n    h.opt_go(); print('go ok')\nexcept nbd.Error as e:\n    print('go failed:', e)\n"
    );
    let out = run_ok(Command::new("/usr/bin/python3").args(["-c", &script]));
    let mut lines = out.lines();
    let listed = lines.next().unwrap_or_default().to_string();
    let go = lines.next().unwrap_or_default();
    (if go == "go ok" { Ok(()) } else { Err(go.to_string()) }, listed)
}

#[test]
fn every_rule_kind_allows_and_refuses_as_written() {
    let pki = Pki::new();
    let [u1, u2] = users();
    let port = free_port();
    let volume = |name: &str, rules: &str, offset: u32| {
        format!("[[volume]]\nname = \"{name}\"\n{rules}\n[[volume.extent]]\nlength = \"1MiB\"\nbackend = \"m\"\nbackend_offset = \"{offset}MiB\"\n")
    };
    let body = format!(
        "{}\n[[backend]]\nname = \"m\"\nmemory = true\nsize = \"8MiB\"\n\n{}{}{}{}{}{}{}",
        pki.server_keys("on"),
        volume("open", "", 0),
        volume("cert", "allow = [\"cert:CN=alice\"]", 1),
        volume("san", "allow = [\"cert:SAN=bob.example\"]", 2),
        volume("psk", "allow = [\"psk:bob\"]", 3),
        volume("uid", &format!("allow = [\"unix:uid={}\"]", u1.0), 4),
        volume("gid", &format!("allow = [\"unix:gid={}\"]", u2.1), 5),
        volume("tcp", "allow = [\"tcp:127.0.0.2/32\"]\nread_only_for = [\"psk:alice\"]", 6),
    );
    let server = TestServer::start_with(&body, &[&format!("tcp:127.0.0.1:{port}")]);
    // Let the two users reach the Unix socket (the test's directory is 0700).
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(server.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&server.socket, std::fs::Permissions::from_mode(0o777)).unwrap();
    let sock = server.socket.display().to_string();
    let unix_uri = |export: &str| format!("nbd+unix:///{export}?socket={sock}");
    let cert_uri = |who: &str, export: &str| format!("nbds://127.0.0.1:{port}/{export}?tls-certificates={}", pki.path(who));
    let psk_uri = |who: &str, export: &str| format!("nbds://{who}@127.0.0.1:{port}/{export}?tls-psk-file={}", pki.path("keys.psk"));
    let listed = |uri: &str| nbdinfo(&["--list", uri]).unwrap_or_else(|e| panic!("nbdinfo --list {uri}: {e}"));

    // Certificates: CN and SAN.
    assert!(nbdinfo(&[&cert_uri("alice", "cert")]).is_ok());
    let refused = nbdinfo(&[&cert_uri("bob", "cert")]);
    assert!(refused.as_ref().is_err_and(|e| e.contains("No such file")), "unknown, not forbidden: {refused:?}");
    assert!(nbdinfo(&[&cert_uri("bob", "san")]).is_ok());
    assert!(nbdinfo(&[&cert_uri("alice", "san")]).is_err());
    let alice_sees = listed(&cert_uri("alice", ""));
    assert!(alice_sees.contains("export=\"cert\"") && !alice_sees.contains("export=\"san\""), "{alice_sees}");
    // PSK identities.
    assert!(nbdinfo(&[&psk_uri("bob", "psk")]).is_ok());
    assert!(nbdinfo(&[&psk_uri("alice", "psk")]).is_err());
    assert!(!listed(&psk_uri("alice", "")).contains("export=\"psk\""));
    // Unix peer credentials: uid, then gid.
    assert!(as_user(u1, &["nbdinfo", &unix_uri("uid")]).is_ok());
    assert!(as_user(u2, &["nbdinfo", &unix_uri("uid")]).is_err());
    assert!(as_user(u2, &["nbdinfo", &unix_uri("gid")]).is_ok());
    assert!(as_user(u1, &["nbdinfo", &unix_uri("gid")]).is_err());
    let u1_sees = as_user(u1, &["nbdinfo", "--list", &unix_uri("")]).unwrap();
    assert!(u1_sees.contains("export=\"uid\"") && !u1_sees.contains("export=\"gid\"") && u1_sees.contains("export=\"open\""), "{u1_sees}");
    // TCP source addresses.
    let (go, list) = from_address("127.0.0.2", port, "tcp");
    assert!(go.is_ok() && list.split(',').any(|n| n == "tcp"), "{go:?} {list}");
    let (go, list) = from_address("127.0.0.1", port, "tcp");
    assert!(go.as_ref().is_err_and(|e| e.contains("unknown") || e.contains("No such")), "{go:?}");
    assert!(!list.split(',').any(|n| n == "tcp"), "{list}");
    // Everybody reaches the open volume; nobody else's.
    assert!(nbdinfo(&[&unix_uri("open")]).is_ok() && nbdinfo(&[&unix_uri("cert")]).is_err());
    let log = server.log();
    assert!(log.matches("client not allowed on this export").count() >= 8, "refusals are logged:\n{log}");
}

#[test]
fn read_only_for_makes_the_export_read_only_for_those_clients() {
    let pki = Pki::new();
    let port = free_port();
    let body = format!(
        "{}\n[[backend]]\nname = \"m\"\nmemory = true\nsize = \"4MiB\"\n\n[[volume]]\nname = \"v\"\nread_only_for = [\"cert:CN=bob\", \"psk:bob\"]\n[[volume.extent]]\nlength = \"4MiB\"\nbackend = \"m\"\n",
        pki.server_keys("on")
    );
    let _server = TestServer::start_with(&body, &[&format!("tcp:127.0.0.1:{port}")]);
    require("qemu-io", "qemu-utils");
    let qemu_io = |dir: &str, cmd: &str| {
        let read_only = if cmd.starts_with("read") { "-r" } else { "-n" };
        let out = run_timeout(
            Command::new("qemu-io").args([
                read_only,
                "--object",
                &format!("tls-creds-x509,id=tls0,dir={dir},endpoint=client"),
                "--image-opts",
                &format!("driver=nbd,host=127.0.0.1,port={port},export=v,tls-creds=tls0"),
                "-c",
                cmd,
            ]),
            Duration::from_secs(60),
        );
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    };
    let wrote = qemu_io(&pki.path("alice"), "write -P 0x61 0 64k");
    assert!(wrote.contains("wrote 65536/65536"), "alice writes: {wrote}");
    let refused = qemu_io(&pki.path("bob"), "write -P 0x62 0 64k");
    assert!(!refused.contains("wrote 65536/65536"), "bob may not write: {refused}");
    let read = qemu_io(&pki.path("bob"), "read -P 0x61 0 64k");
    assert!(read.contains("read 65536/65536"), "bob reads alice's data: {read}");
    let info = nbdinfo(&["--json", &format!("nbds://bob@127.0.0.1:{port}/v?tls-psk-file={}", pki.path("keys.psk"))]).unwrap();
    assert!(info.contains("\"is_read_only\": true"), "{info}");
    let info = nbdinfo(&["--json", &format!("nbds://alice@127.0.0.1:{port}/v?tls-psk-file={}", pki.path("keys.psk"))]).unwrap();
    assert!(info.contains("\"is_read_only\": false"), "{info}");
}

#[test]
fn bad_rules_fail_the_config_naming_field_and_line() {
    for (rule, needle) in [("\"cert:O=x\"", "cert:CN=NAME"), ("\"tcp:300.1.1.1\"", "not an address"), ("\"unix:uid=me\"", "not a number"), ("\"ldap:x\"", "unknown kind")] {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("c.toml");
        std::fs::write(&config, format!("[[volume]]\nname = \"v\"\nallow = [{rule}]\n[[volume.extent]]\nlength = \"1MiB\"\nzero = true\n")).unwrap();
        let out = Command::new(BIN).args(["check", "--config"]).arg(&config).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("c.toml:3") && err.contains("volume.allow") && err.contains(needle), "{rule}: {err}");
    }
}
