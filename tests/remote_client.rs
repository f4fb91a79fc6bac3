//! `nbdvirt::remote::RemoteExport`, the node's forwarding client, against
//! real nbdkit servers (Debian package `nbdkit`): data round trips, many
//! threads at once, the NBD commands, errors, failover to a second server
//! over the same file, and the bound when no server is left.

mod common;

use common::nbdkit::Nbdkit;
use common::{free_port, pattern};
use nbdvirt::endpoint::Endpoint;
use nbdvirt::remote::{RemoteExport, RemoteOptions, Started};
use std::io::ErrorKind;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// Tests run in parallel threads of one process; the one counting reader
/// threads runs alone (write lock), the others together (read lock).
static THREADS: RwLock<()> = RwLock::new(());

fn shared() -> std::sync::RwLockReadGuard<'static, ()> {
    THREADS.read().unwrap_or_else(|p| p.into_inner())
}

fn options(bound: Duration) -> RemoteOptions {
    RemoteOptions { export: "v".into(), stamp: None, connections: 4, bound, connect_timeout: Duration::from_secs(2) }
}

fn client(opts: RemoteOptions, candidates: Vec<Endpoint>) -> RemoteExport {
    RemoteExport::new(opts, Arc::new(move || candidates.clone()))
}

/// xorshift: offsets and sizes that differ per seed.
fn rng(seed: u64) -> impl FnMut(u64) -> u64 {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    move |n| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    }
}

#[test]
fn round_trip_sizes_and_status() {
    let _g = shared();
    let dir = tempfile::tempdir().unwrap();
    let server = Nbdkit::start(dir.path(), Some("m.sock"), &["memory", "64M"]);
    let remote = client(options(Duration::from_secs(20)), vec![server.endpoint.clone()]);
    assert_eq!(remote.size(), None, "nothing connects before the first request");
    assert_eq!(remote.status().connections, 0);
    let cases = [(0u64, 4096usize), (4096 * 3, 65536), (MIB + 512, 12288), (8 * MIB, 4 * MIB as usize), (60 * MIB - 4096, 4 * MIB as usize)];
    for (i, &(offset, len)) in cases.iter().enumerate() {
        let data = pattern(i as u64 + 1, len);
        remote.write(offset, &data, i % 2 == 0).unwrap();
        let mut back = vec![0u8; len];
        remote.read(offset, &mut back).unwrap();
        assert!(back == data, "read back differs at {offset}+{len}");
    }
    // Written regions still hold their data after the others were written.
    let mut back = vec![0u8; 4096];
    remote.read(0, &mut back).unwrap();
    assert!(back == pattern(1, 4096));
    remote.flush().unwrap();
    remote.cache(0, MIB).unwrap();
    assert_eq!(remote.size(), Some(64 * MIB));
    let status = remote.status();
    assert_eq!(status.endpoint.as_deref(), Some(server.endpoint.to_string().as_str()), "{status:?}");
    assert_eq!(status.connections, 4, "{status:?}");
    assert!(status.sent >= 2 * cases.len() as u64 + 2, "{status:?}");
    assert_eq!((status.retries, status.failed, status.last_error.as_deref()), (0, 0, None), "{status:?}");
    let json = serde_json::to_value(&status).unwrap();
    assert_eq!(json["connections"], 4);
}

#[test]
fn many_threads_each_verify_their_region() {
    let _g = shared();
    let dir = tempfile::tempdir().unwrap();
    let server = Nbdkit::start(dir.path(), None, &["memory", "64M"]);
    let remote = Arc::new(client(options(Duration::from_secs(30)), vec![server.endpoint.clone()]));
    const REGION: u64 = 4 * MIB;
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let remote = Arc::clone(&remote);
            std::thread::spawn(move || {
                let base = t * REGION;
                let mut shadow = vec![0u8; REGION as usize];
                let mut rand = rng(t + 100);
                // 200 requests: 100 writes, each read back at once.
                for i in 0..100u64 {
                    let len = 4096 * (1 + rand(16));
                    let at = 4096 * rand((REGION - len) / 4096);
                    let data = pattern(t * 1000 + i, len as usize);
                    remote.write(base + at, &data, false).unwrap();
                    shadow[at as usize..(at + len) as usize].copy_from_slice(&data);
                    let mut back = vec![0u8; len as usize];
                    remote.read(base + at, &mut back).unwrap();
                    assert!(back == data, "thread {t}: request {i} read back differs");
                }
                let mut all = vec![0u8; REGION as usize];
                remote.read(base, &mut all).unwrap();
                assert!(all == shadow, "thread {t}: region differs from what it wrote");
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let status = remote.status();
    assert_eq!((status.failed, status.retries), (0, 0), "{status:?}");
    assert!(status.sent >= 8 * 201, "{status:?}");
}

#[test]
fn trim_and_write_zeroes_read_back_zeros() {
    let _g = shared();
    let dir = tempfile::tempdir().unwrap();
    let server = Nbdkit::start(dir.path(), Some("z.sock"), &["memory", "64M"]);
    let remote = client(options(Duration::from_secs(20)), vec![server.endpoint.clone()]);
    let zeros = vec![0u8; MIB as usize];
    let mut back = vec![0u8; MIB as usize];
    // (no_hole, fast_zero, fua)
    for (i, flags) in [(false, false, false), (true, false, true), (false, true, false)].into_iter().enumerate() {
        let at = i as u64 * 2 * MIB;
        remote.write(at, &pattern(i as u64 + 7, 2 * MIB as usize), false).unwrap();
        remote.write_zeroes(at + MIB / 2, MIB, flags.0, flags.1, flags.2).unwrap();
        remote.read(at + MIB / 2, &mut back).unwrap();
        assert!(back == zeros, "write_zeroes {flags:?} left data");
        // The data around the zeroed range is untouched.
        let mut edge = vec![0u8; 4096];
        remote.read(at + MIB / 2 + MIB, &mut edge).unwrap();
        assert!(edge == pattern(i as u64 + 7, 2 * MIB as usize)[(MIB / 2 + MIB) as usize..][..4096]);
    }
    remote.write(10 * MIB, &pattern(9, MIB as usize), false).unwrap();
    remote.trim(10 * MIB, MIB, true).unwrap();
    remote.read(10 * MIB, &mut back).unwrap();
    assert!(back == zeros, "nbdkit memory reads a trimmed range as zeros");
    remote.flush().unwrap();
    assert_eq!(remote.status().failed, 0);
}

#[test]
fn errors_come_back_without_killing_the_connection() {
    let _g = shared();
    let dir = tempfile::tempdir().unwrap();
    let server = Nbdkit::start(dir.path(), Some("e.sock"), &["memory", "1M"]);
    let remote = client(options(Duration::from_secs(20)), vec![server.endpoint.clone()]);
    let mut buf = vec![0u8; 8192];
    let started = Instant::now();
    let e = remote.read(MIB - 4096, &mut buf).unwrap_err();
    assert_ne!(e.kind(), ErrorKind::TimedOut, "an NBD error is an answer, not a reason to retry: {e}");
    assert!(e.raw_os_error().is_some(), "the server's errno comes back: {e:?}");
    assert!(started.elapsed() < Duration::from_secs(10), "not retried until the bound");
    assert!(remote.write(2 * MIB, &buf, false).is_err());
    assert!(remote.read(u64::MAX - 10, &mut buf).is_err(), "an offset that wraps is refused");
    let status = remote.status();
    assert_eq!((status.failed, status.retries), (3, 0), "{status:?}");
    // The connections are still good.
    remote.write(0, &pattern(3, 8192), false).unwrap();
    remote.read(0, &mut buf).unwrap();
    assert!(buf == pattern(3, 8192));
    assert!(remote.status().connections >= 1);
}

#[test]
fn failover_to_the_second_server_over_the_same_file() {
    let _g = shared();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.img");
    std::fs::File::create(&file).unwrap().set_len(32 * MIB).unwrap();
    let file_arg = format!("file={}", file.display());
    let mut first = Nbdkit::start(dir.path(), Some("a.sock"), &["file", &file_arg]);
    let second = Nbdkit::start(dir.path(), Some("b.sock"), &["file", &file_arg]);
    let (a, b) = (first.endpoint.clone(), second.endpoint.clone());
    let remote = Arc::new(client(options(Duration::from_secs(15)), vec![a.clone(), b.clone()]));
    let before = pattern(42, 2 * MIB as usize);
    remote.write(0, &before, false).unwrap();
    remote.flush().unwrap();
    assert_eq!(remote.status().endpoint, Some(a.to_string()));
    // Four threads keep writing and checking their regions while the
    // first server is killed under them.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..4u64)
        .map(|t| {
            let (remote, stop) = (Arc::clone(&remote), Arc::clone(&stop));
            std::thread::spawn(move || {
                let base = 4 * MIB + t * 4 * MIB;
                let mut rand = rng(t + 7);
                let mut done = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) || done < 20 {
                    let at = base + 4096 * rand(900);
                    let data = pattern(t * 100_000 + done, 64 * 1024);
                    remote.write(at, &data, false).unwrap_or_else(|e| panic!("thread {t}: write {done}: {e}"));
                    let mut back = vec![0u8; data.len()];
                    remote.read(at, &mut back).unwrap_or_else(|e| panic!("thread {t}: read {done}: {e}"));
                    assert!(back == data, "thread {t}: request {done} read back differs");
                    done += 1;
                    assert!(done < 100_000, "runaway loop");
                }
                done
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    first.kill();
    std::thread::sleep(Duration::from_millis(700));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in workers {
        assert!(w.join().unwrap() >= 20);
    }
    let mut back = vec![0u8; before.len()];
    remote.read(0, &mut back).unwrap();
    assert!(back == before, "data written before the failover is intact");
    let status = remote.status();
    assert_eq!(status.endpoint, Some(b.to_string()), "{status:?}");
    assert_eq!(status.failed, 0, "{status:?}");
    let last = status.last_error.clone().unwrap_or_default();
    assert!(last.contains(&a.to_string()), "the lost server is named: {status:?}");
}

#[test]
fn no_candidate_alive_fails_after_the_bound() {
    let _g = shared();
    let dir = tempfile::tempdir().unwrap();
    let bound = Duration::from_secs(2);
    let dead = vec![Endpoint::Unix(dir.path().join("gone.sock")), Endpoint::Tcp(format!("127.0.0.1:{}", free_port()))];
    let remote = client(options(bound), dead.clone());
    let started = Instant::now();
    let e = remote.read(0, &mut [0u8; 4096]).unwrap_err();
    let took = started.elapsed();
    assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
    assert!(took >= bound, "gave up after {took:?}, before the bound");
    assert!(took < bound + Duration::from_secs(10), "gave up only after {took:?}");
    let text = e.to_string();
    assert!(text.contains("'v'") && text.contains("forwarding to "), "{text}");
    let status = remote.status();
    assert_eq!((status.endpoint, status.connections, status.sent, status.failed), (None, 0, 0, 1));
    assert!(status.last_error.unwrap().starts_with("forwarding to "));
    // An empty candidate list is the same, with its own reason.
    let none = client(options(Duration::from_millis(300)), Vec::new());
    let e = none.flush().unwrap_err();
    assert!(e.to_string().contains("no candidate endpoint"), "{e}");
}

#[test]
fn a_stamp_needs_a_server_that_knows_stamps() {
    let _g = shared();
    let dir = tempfile::tempdir().unwrap();
    let server = Nbdkit::start(dir.path(), Some("s.sock"), &["memory", "1M"]);
    let opts = RemoteOptions { stamp: Some(3), ..options(Duration::from_millis(500)) };
    let remote = client(opts, vec![server.endpoint.clone()]);
    let e = remote.read(0, &mut [0u8; 512]).unwrap_err();
    assert!(e.to_string().contains("does not accept forwarding stamps"), "{e}");
}

/// Reader threads of the forwarding client now in this process.
fn reader_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim() == "nbdvirt-fwd")
        .count()
}

#[test]
fn drop_ends_every_reader_thread() {
    let _alone = THREADS.write().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let server = Nbdkit::start(dir.path(), Some("d.sock"), &["memory", "1M"]);
    let remote = client(options(Duration::from_secs(20)), vec![server.endpoint.clone()]);
    let mut buf = [0u8; 4096];
    for _ in 0..8 {
        remote.read(0, &mut buf).unwrap();
    }
    assert_eq!(remote.status().connections, 4);
    assert_eq!(reader_threads(), 4);
    drop(remote);
    // Joined in drop; the kernel may list an ended thread a moment longer.
    let deadline = Instant::now() + Duration::from_secs(5);
    while reader_threads() > 0 {
        assert!(Instant::now() < deadline, "{} reader threads left after drop", reader_threads());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Requests started without waiting (the forwarding node's fast path):
/// many at once over the open links, each answered once with its own data,
/// FUA writes included; before any link is open they come back `Resend`.
#[test]
fn started_reads_and_writes_are_answered_by_the_reader() {
    let _g = shared();
    let dir = tempfile::tempdir().unwrap();
    let server = Nbdkit::start(dir.path(), Some("s.sock"), &["memory", "16M"]);
    let remote = Arc::new(client(options(Duration::from_secs(20)), vec![server.endpoint.clone()]));
    let (tx, rx) = std::sync::mpsc::channel::<(u64, Started)>();
    let send = |tag: u64| {
        let tx = tx.clone();
        Box::new(move |s: Started| tx.send((tag, s)).unwrap())
    };
    remote.start(0, 4096, None, send(0));
    assert!(matches!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), (0, Started::Resend { .. })), "no link open yet");
    // Open the links (the blocking way dials), then start 64 writes.
    remote.write(0, &pattern(99, 4096), false).unwrap();
    for _ in 0..8 {
        remote.flush().unwrap();
    }
    let n = 64u64;
    for i in 0..n {
        let data = pattern(i + 1, 8192);
        remote.start(i * 8192, 8192, Some((&data, i % 3 == 0)), send(i));
    }
    let mut resent = 0;
    for _ in 0..n {
        match rx.recv_timeout(Duration::from_secs(10)).expect("every started write is answered") {
            (_, Started::Done(r)) => assert_eq!(r.unwrap().len(), 0),
            (i, Started::Resend { .. }) => {
                // A slot without an open link: the blocking way.
                resent += 1;
                remote.write(i * 8192, &pattern(i + 1, 8192), i % 3 == 0).unwrap();
            }
        }
    }
    for i in 0..n {
        remote.start(i * 8192, 8192, None, send(i));
    }
    let mut answered = vec![false; n as usize];
    for _ in 0..n {
        let (i, started) = rx.recv_timeout(Duration::from_secs(10)).expect("every started read is answered");
        let data = match started {
            Started::Done(r) => r.unwrap(),
            Started::Resend { .. } => {
                let mut back = vec![0u8; 8192];
                remote.read(i * 8192, &mut back).unwrap();
                back
            }
        };
        assert!(data == pattern(i + 1, 8192), "read {i} differs");
        assert!(!std::mem::replace(&mut answered[i as usize], true), "read {i} answered twice");
    }
    assert!(rx.recv_timeout(Duration::from_millis(200)).is_err(), "no answer beyond one per request");
    let status = remote.status();
    assert_eq!(status.failed, 0, "{status:?}");
    assert!(status.sent >= 2 * n - resent, "{status:?}");
}
