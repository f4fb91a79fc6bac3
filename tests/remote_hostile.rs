//! The forwarding client (`nbdvirt::remote`) against a server that
//! misbehaves after a correct handshake: each malformed reply must close
//! the connection (the request resent on a new one, never a panic or a
//! wrong answer) until the bound; ESHUTDOWN must move the client to the
//! next candidate (a real nbdkit, Debian package `nbdkit`). Requests
//! started without waiting (`RemoteExport::start`) time out within their
//! bound on a server that stops answering, and come back `Resend` when
//! their link breaks.

mod common;

use common::nbdkit::Nbdkit;
use common::pattern;
use nbdvirt::endpoint::Endpoint;
use nbdvirt::nbd::*;
use nbdvirt::remote::{RemoteExport, RemoteOptions, Started};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The bytes a fake server answers a request (its 28-byte header) with.
type Answer = fn(&RequestHeader) -> Vec<u8>;

/// A server that negotiates like a good one, then answers with `Answer`.
struct Fake {
    endpoint: Endpoint,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Fake {
    fn start(dir: &std::path::Path, answer: Answer) -> Fake {
        let path = dir.join("fake.sock");
        let listener = UnixListener::bind(&path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let (accepted, stop) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
        let (count, stopped) = (Arc::clone(&accepted), Arc::clone(&stop));
        // Polls accept until stopped; each connection's thread ends when
        // the client closes it or after 5 s of silence.
        let thread = std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => {
                        count.fetch_add(1, Ordering::Relaxed);
                        std::thread::spawn(move || serve(s, answer));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Fake { endpoint: Endpoint::Unix(path), accepted, stop, thread: Some(thread) }
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(mut s: UnixStream, answer: Answer) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(&server_greeting())?;
    s.read_exact(&mut [0u8; 4])?;
    loop {
        let mut h = [0u8; 16];
        s.read_exact(&mut h)?;
        let option = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let mut data = vec![0u8; u32::from_be_bytes(h[12..16].try_into().unwrap()) as usize];
        s.read_exact(&mut data)?;
        match option {
            OPT_STRUCTURED_REPLY => s.write_all(&option_reply(option, REP_ACK, &[]))?,
            OPT_GO => {
                s.write_all(&rep_info_export(option, 1 << 20, TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_CAN_MULTI_CONN))?;
                s.write_all(&option_reply(option, REP_ACK, &[]))?;
                break;
            }
            _ => s.write_all(&option_error(option, REP_ERR_UNSUP, ""))?,
        }
    }
    loop {
        let mut h = [0u8; REQUEST_HEADER_LEN];
        s.read_exact(&mut h)?;
        let header = decode_request_header(&h).map_err(std::io::Error::other)?;
        std::io::copy(&mut (&mut s).take(header.payload_len() as u64), &mut std::io::sink())?;
        s.write_all(&answer(&header))?;
    }
}

fn offset_data(h: &RequestHeader, offset: u64, len: u32, flags: u16) -> Vec<u8> {
    let mut out = vec![0u8; OFFSET_DATA_PREFIX];
    write_offset_data_prefix(&mut out, flags, h.cookie, offset, len);
    out.extend(std::iter::repeat_n(0xAA, len as usize));
    out
}

fn client(bound: Duration, candidates: Vec<Endpoint>) -> RemoteExport {
    let options = RemoteOptions { export: "v".into(), stamp: None, connections: 2, bound, connect_timeout: Duration::from_secs(1) };
    RemoteExport::new(options, Arc::new(move || candidates.clone()))
}

#[test]
fn malformed_replies_close_the_connection_until_the_bound() {
    let cases: [(&str, Answer, &str); 6] = [
        ("bad magic", |_| vec![0xde; 20], "bad reply magic"),
        ("unknown cookie", |h| simple_reply(h.cookie + 1000, 0).to_vec(), "unknown cookie"),
        ("data past the request", |h| offset_data(h, h.offset + h.length as u64, 16, REPLY_FLAG_DONE), "outside the request"),
        ("half a read", |h| [offset_data(h, h.offset, h.length / 2, 0), chunk_none(h.cookie)].concat(), "covers 2048 of 4096"),
        ("data for a flush", |h| offset_data(h, 0, 16, REPLY_FLAG_DONE), "no READ"),
        ("huge error chunk", |h| {
            let mut out = vec![0u8; CHUNK_HEADER_LEN];
            write_chunk_header(&mut out, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, h.cookie, 1 << 30);
            out
        }, "1073741824 bytes"),
    ];
    let bound = Duration::from_millis(600);
    for (what, answer, expected) in cases {
        let dir = tempfile::tempdir().unwrap();
        let fake = Fake::start(dir.path(), answer);
        let remote = client(bound, vec![fake.endpoint.clone()]);
        let started = Instant::now();
        let result = if what == "data for a flush" { remote.flush() } else { remote.read(0, &mut [0u8; 4096]) };
        let e = result.expect_err(what);
        assert_eq!(e.kind(), ErrorKind::TimedOut, "{what}: {e}");
        assert!(started.elapsed() < bound + Duration::from_secs(10), "{what}: took {:?}", started.elapsed());
        let status = remote.status();
        let last = status.last_error.clone().unwrap_or_default();
        assert!(last.contains(expected), "{what}: last error {last:?}");
        assert!(status.retries >= 1 && fake.accepted.load(Ordering::Relaxed) >= 2, "{what}: resent on a new connection: {status:?}");
        assert_eq!(status.failed, 1, "{what}");
    }
}

#[test]
fn eshutdown_moves_to_the_next_candidate() {
    let dir = tempfile::tempdir().unwrap();
    let fenced = Fake::start(dir.path(), |h| chunk_error(h.cookie, NbdError::Shutdown.code(), "fenced"));
    let good = Nbdkit::start(dir.path(), Some("good.sock"), &["memory", "1M"]);
    let remote = client(Duration::from_secs(10), vec![fenced.endpoint.clone(), good.endpoint.clone()]);
    remote.write(4096, &pattern(5, 8192), false).unwrap();
    let mut back = vec![0u8; 8192];
    remote.read(4096, &mut back).unwrap();
    assert!(back == pattern(5, 8192));
    let status = remote.status();
    assert_eq!(status.endpoint, Some(good.endpoint.to_string()), "{status:?}");
    assert!(status.retries >= 1 && status.failed == 0, "{status:?}");
    assert!(fenced.accepted.load(Ordering::Relaxed) >= 1);
}

/// Answers FLUSH (so that a link opens) and nothing else.
fn flush_only(h: &RequestHeader) -> Vec<u8> {
    if h.command == CMD_FLUSH {
        simple_reply(h.cookie, 0).to_vec()
    } else {
        Vec::new()
    }
}

/// Starts a 4 KiB READ at 0 and waits (at most 10 s) for its outcome.
fn start_read(remote: &Arc<RemoteExport>) -> (Started, Duration) {
    let (tx, rx) = std::sync::mpsc::channel();
    let t0 = Instant::now();
    remote.start(0, 4096, None, Box::new(move |s| tx.send(s).unwrap()));
    let started = rx.recv_timeout(Duration::from_secs(10)).expect("a started request is always answered");
    (started, t0.elapsed())
}

#[test]
fn started_request_times_out_within_its_bound_on_a_silent_server() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::start(dir.path(), flush_only);
    let bound = Duration::from_millis(700);
    let remote = Arc::new(client(bound, vec![fake.endpoint.clone()]));
    // No link is open yet: nothing is sent, the caller goes the blocking way.
    let (started, _) = start_read(&remote);
    assert!(matches!(started, Started::Resend { .. }), "{started:?}");
    assert_eq!(remote.status().sent, 0);
    remote.flush().unwrap();
    let (started, took) = start_read(&remote);
    match started {
        Started::Done(Err(e)) => assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}"),
        other => panic!("expected a timeout, got {other:?}"),
    }
    // Found by the reader's tick (200 ms) after the bound.
    assert!(took >= bound && took < bound + Duration::from_secs(2), "took {took:?}");
    let status = remote.status();
    assert_eq!(status.failed, 1, "{status:?}");
    assert!(status.last_error.unwrap_or_default().contains("no reply within"));
}

/// A started request that comes back `Resend` keeps its deadline: sent
/// again the blocking way (`within`) on a server that has stopped
/// answering, it fails by that deadline, not a whole bound later.
#[test]
fn a_resend_keeps_the_deadline_it_was_started_with() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::start(dir.path(), flush_only);
    let bound = Duration::from_secs(20);
    let remote = Arc::new(client(bound, vec![fake.endpoint.clone()]));
    let t0 = Instant::now();
    // No link is open yet: `Resend`, with the deadline of a request
    // started now.
    let (started, _) = start_read(&remote);
    let Started::Resend { deadline: Some(deadline) } = started else { panic!("expected a resend with its deadline, got {started:?}") };
    assert!(deadline >= t0 + bound && deadline <= Instant::now() + bound, "the bound from when it was started");
    // The resend with a deadline 700 ms away on the silent server.
    let soon = Instant::now() + Duration::from_millis(700);
    let mut buf = vec![0u8; 4096];
    let err = nbdvirt::remote::within(Some(soon), || remote.read(0, &mut buf)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TimedOut, "{err}");
    let late = Instant::now().saturating_duration_since(soon);
    assert!(late < Duration::from_secs(5), "failed {late:?} after its deadline; the bound is {bound:?}");
    // Past its deadline nothing is sent at all.
    let sent = remote.status().sent;
    let err = nbdvirt::remote::within(Some(Instant::now()), || remote.read(0, &mut buf)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TimedOut, "{err}");
    assert_eq!(remote.status().sent, sent);
    // Outside `within`, requests have their own bound again.
    let flushed = remote.flush();
    assert!(flushed.is_ok(), "{flushed:?}");
}

#[test]
fn started_request_on_a_link_that_breaks_comes_back_to_resend() {
    let dir = tempfile::tempdir().unwrap();
    // READ answered with garbage: the link is closed under the request.
    let fake = Fake::start(dir.path(), |h| if h.command == CMD_FLUSH { simple_reply(h.cookie, 0).to_vec() } else { vec![0xde; 20] });
    let remote = Arc::new(client(Duration::from_secs(5), vec![fake.endpoint.clone()]));
    remote.flush().unwrap();
    let (started, took) = start_read(&remote);
    assert!(matches!(started, Started::Resend { .. }), "{started:?}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    let status = remote.status();
    assert_eq!((status.retries, status.failed), (1, 0), "{status:?}");
    assert!(status.last_error.unwrap_or_default().contains("bad reply magic"));
}
