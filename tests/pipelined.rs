//! A client that pipelines many requests and reads replies only when it
//! cannot write (the pattern of nbd's own nbd-tester-client): it sends
//! requests until the socket would block, reads whatever replies are there,
//! then waits until it can write again (at most a second, as that client
//! does). A server that stops reading requests while it waits for this
//! client to read replies stalls it for that second; the test asserts no
//! gap between two replies is longer than a whole lockstep run of the same
//! requests.
mod common;
use common::nbd_client::*;
use common::*;
use nbdvirt::nbd::{CMD_READ, SIMPLE_REPLY_MAGIC};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

const SIZE: u64 = 64 * MIB;

fn config(delay: &str) -> String {
    format!(
        r#"
[[backend]]
name = "m"
memory = true
size = "64MiB"
{delay}

[[volume]]
name = "v"
[[volume.extent]]
length = "64MiB"
backend = "m"
"#
    )
}

/// A connection in transmission on "v" with simple replies.
fn go(server: &TestServer) -> UnixStream {
    let h = Handshake::start(server);
    h.go("v").s
}

/// The requests of a run: READs of `len` bytes spread over the export.
fn requests(count: u64, len: u32) -> Vec<(u64, u32)> {
    (0..count).map(|i| ((i * 7919 * len as u64) % (SIZE - len as u64), len)).collect()
}

/// Sends each request and waits for its reply; returns the run's duration.
fn lockstep(s: &mut UnixStream, reqs: &[(u64, u32)], image: &[u8]) -> Duration {
    let start = Instant::now();
    for (i, &(off, len)) in reqs.iter().enumerate() {
        let data = read_ok(s, i as u64, off, len);
        assert!(data == image[off as usize..off as usize + len as usize], "lockstep READ {i} returned wrong data");
    }
    start.elapsed()
}

/// Waits until `fd` is ready for `events` or `ms` pass.
fn wait(fd: i32, events: i16, ms: i32) {
    let mut p = libc::pollfd { fd, events, revents: 0 };
    // SAFETY: one valid pollfd.
    let r = unsafe { libc::poll(&mut p, 1, ms) };
    assert!(r >= 0, "poll: {}", std::io::Error::last_os_error());
}

/// What a pipelined run saw.
struct Run {
    /// Longest time without a reply (from the first request on).
    max_gap: Duration,
    total: Duration,
}

/// The nbd-tester-client pattern on a non-blocking socket: one request per
/// write until the write would block, then every reply available, then a
/// wait of at most 1 s until the socket is writable again. Checks every
/// reply (magic, no error, cookie in flight once, data).
fn pipelined(s: &mut UnixStream, reqs: &[(u64, u32)], image: &[u8]) -> Run {
    s.set_nonblocking(true).unwrap();
    let fd = s.as_raw_fd();
    let mut next = 0; // next request to send
    let mut sent_part = 0; // bytes of it already sent
    let mut answered = vec![false; reqs.len()];
    let mut done = 0;
    let mut inbuf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 256 * 1024];
    let start = Instant::now();
    let mut last = start;
    let mut max_gap = Duration::ZERO;
    while done < reqs.len() {
        // Send until the socket would block.
        while next < reqs.len() {
            let (off, len) = reqs[next];
            let h = header(0, CMD_READ, next as u64, off, len);
            match s.write(&h[sent_part..]) {
                Ok(n) => {
                    sent_part += n;
                    if sent_part == h.len() {
                        next += 1;
                        sent_part = 0;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => panic!("sending request {next}: {e}"),
            }
        }
        // Read every reply that is there.
        loop {
            match s.read(&mut chunk) {
                Ok(0) => panic!("server closed the connection after {done} replies"),
                Ok(n) => inbuf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => panic!("reading replies: {e}"),
            }
            let mut at = 0;
            while inbuf.len() - at >= 16 {
                let h = &inbuf[at..at + 16];
                assert_eq!(be32(h), SIMPLE_REPLY_MAGIC, "reply magic after {done} replies");
                assert_eq!(be32(&h[4..]), 0, "READ failed");
                let cookie = be64(&h[8..]) as usize;
                assert!(cookie < next, "reply to cookie {cookie}, which was not sent");
                let (off, len) = reqs[cookie];
                if inbuf.len() - at < 16 + len as usize {
                    break;
                }
                assert!(!std::mem::replace(&mut answered[cookie], true), "cookie {cookie} answered twice");
                let data = &inbuf[at + 16..at + 16 + len as usize];
                assert!(data == &image[off as usize..off as usize + len as usize], "READ {cookie} returned wrong data");
                at += 16 + len as usize;
                done += 1;
                let now = Instant::now();
                max_gap = max_gap.max(now - last);
                last = now;
            }
            inbuf.drain(..at);
        }
        if next < reqs.len() {
            // "Now wait until we can write again or until a second has
            // passed, whichever comes first" (nbd-tester-client.c).
            wait(fd, libc::POLLOUT, 1000);
        } else if done < reqs.len() {
            wait(fd, libc::POLLIN, 10_000);
        }
    }
    s.set_nonblocking(false).unwrap();
    Run { max_gap, total: start.elapsed() }
}

/// Three rounds of: the requests in lockstep, then pipelined; the longest
/// wait for a reply must stay below the lockstep run's duration (a stall
/// is a whole second: the client's wait).
fn stall_check(delay: &str, count: u64, len: u32) {
    let server = TestServer::start(&config(delay));
    let mut s = go(&server);
    let image = pattern(5, SIZE as usize);
    for (i, part) in image.chunks(4 * MIB as usize).enumerate() {
        write_ok(&mut s, i as u64, i as u64 * 4 * MIB, part);
    }
    let reqs = requests(count, len);
    for round in 0..3 {
        let normal = lockstep(&mut s, &reqs, &image);
        let run = pipelined(&mut s, &reqs, &image);
        eprintln!(
            "round {round}: {count} READs of {len}: lockstep {normal:?}, pipelined {:?} with longest gap {:?}",
            run.total, run.max_gap
        );
        assert!(
            run.max_gap < normal,
            "round {round}: the pipelined client waited {:?} for a reply, longer than a whole lockstep run ({normal:?})",
            run.max_gap
        );
    }
}

/// 4 KiB READs from a memory store run on the reader thread, which writes
/// their replies itself.
#[test]
fn inline_reads_do_not_stall_a_client_that_reads_only_when_blocked() {
    stall_check("", 4000, 4096);
}

/// With an added delay the store may block: READs run on the blocking
/// pool, whose threads write the replies.
#[test]
fn pool_reads_do_not_stall_a_client_that_reads_only_when_blocked() {
    stall_check("delay = \"1us\"", 2000, 4096);
}
