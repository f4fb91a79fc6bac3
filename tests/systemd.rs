//! The systemd units verify, and the server speaks the notify protocol
//! (READY=1 once listening, RELOADING=1/READY=1 around SIGHUP reloads,
//! STOPPING=1 on SIGTERM).
mod common;
use common::*;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn units_pass_systemd_analyze_verify() {
    require("systemd-analyze", "systemd");
    let dir = tempfile::tempdir().unwrap();
    let root = env!("CARGO_MANIFEST_DIR");
    for (src, dst) in [("nbdvirt.service", "nbdvirt.service"), ("nbdvirt-attach@.service", "nbdvirt-attach@vol0.service")] {
        let text = std::fs::read_to_string(format!("{root}/systemd/{src}")).unwrap();
        // verify checks that ExecStart binaries exist: point at the built one.
        std::fs::write(dir.path().join(dst), text.replace("/usr/local/bin/nbdvirt", BIN)).unwrap();
    }
    let out = run_timeout(
        Command::new("systemd-analyze").args(["verify", "--man=no", "nbdvirt.service", "nbdvirt-attach@vol0.service"]).current_dir(dir.path()),
        Duration::from_secs(60),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "systemd-analyze verify failed ({}):\n{stderr}", out.status);
    let tmpfiles = std::fs::read_to_string(format!("{root}/systemd/nbdvirt.tmpfiles")).unwrap();
    assert!(tmpfiles.contains("d /run/nbdvirt"));
}

#[test]
fn notifies_ready_reloading_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let notify = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&notify).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let d = dir.path().display();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = [\"unix:{d}/nbd.sock\"]\ncontrol = \"{d}/control.sock\"\nstate_dir = \"{d}/state\"\n\
             [[backend]]\nname = \"m\"\nmemory = true\nsize = \"4MiB\"\n[[volume]]\nname = \"v\"\n[[volume.extent]]\nlength = \"4MiB\"\nbackend = \"m\"\n"
        ),
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &notify)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let recv = || {
        let mut buf = [0u8; 256];
        let n = sock.recv(&mut buf).expect("a notification within 20 s");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let ready = recv();
    assert!(ready.contains("READY=1"), "first notification: {ready}");
    assert!(std::os::unix::net::UnixStream::connect(dir.path().join("nbd.sock")).is_ok(), "READY means listening");
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    assert!(recv().contains("RELOADING=1"));
    assert!(recv().contains("READY=1"));
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(recv().contains("STOPPING=1"));
    let status = child.wait().unwrap();
    assert!(status.success(), "clean exit after SIGTERM: {status}");
}
