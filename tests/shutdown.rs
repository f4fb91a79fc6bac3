//! SIGTERM: in-flight requests drain, new ones get ESHUTDOWN during the
//! grace period (the harness sets shutdown_grace = "1s"), the server exits 0
//! and removes its socket.
mod common;
use common::*;
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// Waits (bounded) for the server to exit on its own; returns the status.
fn wait_exit(server: &mut TestServer, limit: Duration) -> ExitStatus {
    let mut child = server.child.take().expect("server running");
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("nbdvirt did not exit within {limit:?}:\n{}", server.log());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A 64 MiB volume over two files.
const VOLUME: &str = r#"
[[backend]]
name = "a"
path = "{dir}/a.img"
size = "64MiB"
[[backend]]
name = "b"
path = "{dir}/b.img"
size = "64MiB"

[[volume]]
name = "v"
[[volume.extent]]
length = "32MiB"
backend = "a"
backend_offset = "16MiB"
[[volume.extent]]
length = "32MiB"
backend = "b"
backend_offset = "8MiB"
"#;

/// 48 KiB slots: some cross the 32 MiB extent boundary.
const SLOT: u64 = 48 * 1024;
const MAGIC: u64 = 0x6e62_6476_6972_7421;

/// The bytes write `i` puts in its slot.
fn slot_data(i: u64) -> Vec<u8> {
    let mut unit = Vec::with_capacity(16);
    unit.extend_from_slice(&i.to_le_bytes());
    unit.extend_from_slice(&MAGIC.to_le_bytes());
    unit.repeat((SLOT / 16) as usize)
}

/// Reads volume range [off, off+len) from the backend files.
fn volume_bytes(server: &TestServer, off: u64, len: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len as usize);
    let (mut pos, end) = (off, off + len);
    while pos < end {
        let (file, foff, room) = if pos < 32 * MIB { ("a.img", 16 * MIB + pos, 32 * MIB - pos) } else { ("b.img", 8 * MIB + pos - 32 * MIB, 64 * MIB - pos) };
        let n = room.min(end - pos);
        out.extend(read_at(&server.path(file), foff, n as usize));
        pos += n;
    }
    out
}

#[test]
fn sigterm_under_load_drains_acknowledged_writes_and_exits_zero() {
    let mut server = TestServer::start(VOLUME);
    let slots = 64 * MIB / SLOT;
    let script = r#"
import os, signal, struct, time, json
PID, SLOT, SLOTS, MAGIC = @PID@, @SLOT@, @SLOTS@, @MAGIC@
inflight = {}      # cookie -> slot
acked, failed = [], {}
i, signalled_at, stop_issuing = 0, None, False

def reap():
    for c, idx in list(inflight.items()):
        try:
            done = h.aio_command_completed(c)
        except nbd.Error as e:
            del inflight[c]
            failed[idx] = e.errno or e.string
            continue
        if done:
            del inflight[c]
            acked.append(idx)

while True:
    if "ESHUTDOWN" in failed.values():
        stop_issuing = True
    if not stop_issuing and i < SLOTS and len(inflight) < 32:
        if signalled_at is not None:
            time.sleep(0.002)   # keep the load going through the grace period
        buf = struct.pack("<QQ", i, MAGIC) * (SLOT // 16)
        inflight[h.aio_pwrite(buf, i * SLOT)] = i
        i += 1
        if i == 200:
            os.kill(PID, signal.SIGTERM)
            signalled_at = i
        continue
    if not inflight:
        break
    h.poll(1000)
    reap()

h.shutdown()
print(json.dumps({"issued": i, "signalled_at": signalled_at, "acked": sorted(acked), "failed": failed}))
"#
    .replace("@PID@", &server.pid().to_string())
    .replace("@SLOT@", &SLOT.to_string())
    .replace("@SLOTS@", &slots.to_string())
    .replace("@MAGIC@", &MAGIC.to_string());
    let out = nbdsh(&server.uri("v"), &script);
    let status = wait_exit(&mut server, Duration::from_secs(30));
    assert!(status.success(), "nbdvirt should exit 0 after SIGTERM, got {status}:\n{}", server.log());
    assert!(!server.socket.exists(), "the unix socket must be removed on stop");

    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("script output ({e}): {out}"));
    let acked: Vec<u64> = v["acked"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
    let failed = v["failed"].as_object().unwrap();
    let issued = v["issued"].as_u64().unwrap();
    eprintln!("issued {issued}, acknowledged {}, refused {}", acked.len(), failed.len());
    assert!(acked.len() >= 200 - 32, "writes issued before SIGTERM should mostly be acknowledged: {v}");
    assert!(
        failed.values().any(|e| e == "ESHUTDOWN"),
        "requests sent during the grace period should fail with ESHUTDOWN: {v}"
    );
    assert!(failed.values().all(|e| e == "ESHUTDOWN"), "only ESHUTDOWN failures are expected: {v}");
    assert_eq!(acked.len() + failed.len(), issued as usize, "every write got an answer: {v}");
    // Every acknowledged write is in the backend files.
    for &i in &acked {
        let got = volume_bytes(&server, i * SLOT, SLOT);
        assert!(got == slot_data(i), "acknowledged write {i} (volume offset {}) is not in the backend files", i * SLOT);
    }
    // Writes refused with ESHUTDOWN were not applied.
    for i in failed.keys().map(|k| k.parse::<u64>().unwrap()) {
        assert!(volume_bytes(&server, i * SLOT, SLOT).iter().all(|b| *b == 0), "write {i} was refused with ESHUTDOWN but applied");
    }
    // Slots never written are still zero.
    assert!(volume_bytes(&server, issued * SLOT, SLOT.min(64 * MIB - issued * SLOT)).iter().all(|b| *b == 0));
}

#[test]
fn sigterm_with_idle_client_gives_eshutdown_then_closes_and_removes_socket() {
    let mut server = TestServer::start(VOLUME);
    let sock = server.socket.display().to_string();
    let script = r#"
import os, signal, time, select, errno
PID, SOCK = @PID@, @SOCK@
h.pwrite(b"\x42" * 4096, 0)
assert h.pread(4096, 0) == b"\x42" * 4096
os.kill(PID, signal.SIGTERM)
time.sleep(0.3)
def t(name, f):
    try:
        f()
        print(name, "OK")
    except nbd.Error as e:
        print(name, e.errno)
t("read", lambda: h.pread(4096, 0))
t("write", lambda: h.pwrite(b"\x43" * 4096, 8192))
t("flush", lambda: h.flush())
# The listener goes away while this connection is still open.
deadline = time.time() + 10
while os.path.exists(SOCK) and time.time() < deadline:
    time.sleep(0.05)
print("socket", "gone" if not os.path.exists(SOCK) else "STILL THERE")
h2 = nbd.NBD()
try:
    h2.connect_uri("nbd+unix:///v?socket=" + SOCK)
    print("new connection accepted")
except nbd.Error:
    print("new connection refused")
# Idle now: the server must close this connection after the grace period.
r, _, _ = select.select([h.aio_get_fd()], [], [], 20)
print("idle connection", "closed by server" if r else "STILL OPEN")
"#
    .replace("@PID@", &server.pid().to_string())
    .replace("@SOCK@", &format!("{sock:?}"));
    let handle = {
        let uri = server.uri("v");
        std::thread::spawn(move || nbdsh(&uri, &script))
    };
    let status = wait_exit(&mut server, Duration::from_secs(30));
    let out = handle.join().unwrap_or_else(|_| panic!("nbdsh script failed; server log:\n{}", server.log()));
    assert!(status.success(), "nbdvirt should exit 0, got {status}:\n{}", server.log());
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        vec![
            "read ESHUTDOWN",
            "write ESHUTDOWN",
            "flush ESHUTDOWN",
            "socket gone",
            "new connection refused",
            "idle connection closed by server",
        ],
        "server log:\n{}",
        server.log()
    );
    assert!(!server.socket.exists(), "the unix socket must be removed on stop");
    // The write made before SIGTERM was flushed to the file; the refused one was not applied.
    assert_eq!(read_at(&server.path("a.img"), 16 * MIB, 4096), vec![0x42; 4096]);
    assert_eq!(read_at(&server.path("a.img"), 16 * MIB + 8192, 4096), vec![0; 4096]);
}

#[test]
fn stop_without_clients_exits_zero_and_removes_socket_and_restarts() {
    let mut server = TestServer::start(VOLUME);
    require("qemu-io", "qemu-utils");
    run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x7e 32M 4K", &server.uri("v")]));
    assert!(server.socket.exists());
    let status = server.stop();
    assert!(status.success(), "exit status {status}:\n{}", server.log());
    assert!(!server.socket.exists(), "the unix socket must be removed on stop");
    // Restart on the same config and socket path: the data is still there.
    server.spawn();
    run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 0x7e 32M 4K", &server.uri("v")]));
    assert!(server.stop().success());
    assert!(!server.socket.exists());
}
