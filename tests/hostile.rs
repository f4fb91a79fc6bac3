//! Hostile clients: malformed handshakes, broken framing, hangups at every
//! point, floods, and clients that never read. After each case the server
//! process must still be running and a fresh client must still read and
//! write correctly. Every socket has timeouts, so a hung server fails the
//! test instead of hanging it.
mod common;
use common::nbd_client::*;
use common::*;
use nbdvirt::nbd::{
    CMD_DISC, CMD_FLAG_FUA, CMD_FLUSH, CMD_READ, CMD_WRITE, FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, IHAVEOPT, OPT_EXPORT_NAME, OPT_GO,
    OPT_INFO, OPT_LIST, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT, OPT_STRUCTURED_REPLY, REPLY_FLAG_DONE, REP_ACK, REP_ERR_INVALID,
    REP_ERR_TOO_BIG, REP_ERR_UNKNOWN, REP_ERR_UNSUP, REP_FLAG_ERROR, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC,
};
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SIZE: u64 = 16 * MIB;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

const CONFIG: &str = r#"
[[backend]]
name = "m"
memory = true
size = "16MiB"

[[volume]]
name = "v"
description = "test volume"
[[volume.extent]]
length = "8MiB"
backend = "m"
[[volume.extent]]
length = "8MiB"
backend = "m"
backend_offset = "8MiB"
"#;

fn start() -> TestServer {
    TestServer::start(CONFIG)
}

/// Reads the greeting and sends the client flags.
fn greet(server: &TestServer) -> UnixStream {
    Handshake::start(server).s
}

/// Asserts the server closes without sending anything more.
fn expect_closed_silently(s: &mut UnixStream, what: &str) {
    let n = drain_until_closed(s, what);
    assert_eq!(n, 0, "{what}: server sent {n} bytes before closing");
}

/// NBD_OPT_GO on "v", returning the socket in transmission (simple replies).
fn go_on(mut s: UnixStream) -> UnixStream {
    let r = exchange(&mut s, OPT_GO, &info_payload("v", &[]));
    let last = r.last().expect("a final reply").kind;
    assert_eq!(last & REP_FLAG_ERROR, 0, "GO failed: {last:#x}");
    assert_eq!(info_export(&r).map(|(size, _)| size), Some(SIZE));
    s
}

fn go(server: &TestServer) -> UnixStream {
    go_on(greet(server))
}

/// The server is alive and a fresh client can write and read back data
/// (across the extent boundary), then disconnect cleanly.
fn probe(server: &mut TestServer, seed: u64) {
    server.assert_alive();
    let mut s = go(server);
    let off = 8 * MIB - 2048;
    let data = pattern(seed, 4096);
    write_ok(&mut s, 1, off, &data);
    assert_eq!(read_ok(&mut s, 2, off, 4096), data, "probe read back wrong data");
    s.write_all(&header(0, CMD_DISC, 3, 0, 0)).unwrap();
    drain_until_closed(&mut s, "after DISC");
    server.assert_alive();
}

/// A field of /proc/PID/status, in kB (or a plain count).
fn proc_status(pid: i32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    let line = text.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("{field} not in /proc/{pid}/status"));
    line[field.len()..].trim_start_matches(':').split_whitespace().next().unwrap().parse().unwrap()
}

/// Small deterministic RNG (xorshift64*).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
    /// Up to `max - 1` random bytes.
    fn junk(&mut self, max: u64) -> Vec<u8> {
        let n = self.below(max) as usize;
        self.bytes(n)
    }
}

// ---------------------------------------------------------------------------
// Handshake abuse
// ---------------------------------------------------------------------------

#[test]
fn garbage_instead_of_client_flags() {
    let mut server = start();
    for garbage in [&b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..], &[0xff; 4][..], &[0u8, 0, 0][..], &[0xde, 0xad, 0xbe, 0xef, 1, 2, 3][..]] {
        let mut s = connect(&server);
        read_n(&mut s, 18, "greeting");
        s.write_all(garbage).unwrap();
        if garbage.len() < 4 {
            s.shutdown(Shutdown::Write).unwrap();
        }
        expect_closed_silently(&mut s, "garbage client flags");
    }
    probe(&mut server, 1);
}

#[test]
fn unknown_client_flag_bits_close_the_connection() {
    let mut server = start();
    for flags in [FLAG_C_FIXED_NEWSTYLE | 4, 0x8000_0000 | FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES, 0xffff_ffff] {
        let mut s = connect(&server);
        read_n(&mut s, 18, "greeting");
        s.write_all(&flags.to_be_bytes()).unwrap();
        // Even a valid option after them gets no answer (proto.md: the
        // server MUST close the connection on unknown client flags).
        let _ = s.write_all(&option(OPT_LIST, &[]));
        expect_closed_silently(&mut s, "unknown client flags");
    }
    probe(&mut server, 2);
}

#[test]
fn bad_option_magic_closes_the_connection() {
    let mut server = start();
    let mut s = greet(&server);
    // One good option first, then a bad magic.
    assert_eq!(opt_final(&mut s, OPT_LIST, &[]), REP_ACK);
    let mut bad = option(OPT_LIST, &[]);
    bad[7] ^= 0x20; // "IHAVEOPt"
    s.write_all(&bad).unwrap();
    expect_closed_silently(&mut s, "bad option magic");
    // Bad magic as the very first option.
    let mut s = greet(&server);
    s.write_all(&[0u8; 16]).unwrap();
    expect_closed_silently(&mut s, "zero option magic");
    probe(&mut server, 3);
}

#[test]
fn huge_option_lengths() {
    let mut server = start();
    for opt in [99, OPT_INFO, OPT_GO, OPT_LIST, OPT_SET_META_CONTEXT, OPT_EXPORT_NAME] {
        // Length 0xFFFFFFFF, a little data, then hang up.
        let mut s = greet(&server);
        let mut m = option(opt, &[]);
        m[12..16].copy_from_slice(&u32::MAX.to_be_bytes());
        m.extend_from_slice(&[0x41; 1000]);
        s.write_all(&m).unwrap();
        drop(s);
        // Same, but half-close and make sure the server gives up.
        let mut s = greet(&server);
        s.write_all(&m).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        drain_until_closed(&mut s, "option of length 0xFFFFFFFF then EOF");
    }
    // An option over the server's limit but fully sent is refused with
    // ERR_TOO_BIG and the connection goes on.
    let mut s = greet(&server);
    assert_eq!(opt_final(&mut s, 99, &vec![7u8; 200 * 1024]), REP_ERR_TOO_BIG);
    assert_eq!(opt_final(&mut s, OPT_INFO, &vec![0u8; 100 * 1024]), REP_ERR_TOO_BIG);
    let mut s = go_on(s);
    write_ok(&mut s, 9, 0, &[1u8; 512]);
    probe(&mut server, 4);
}

#[test]
fn truncated_option_payloads_then_hangup() {
    let mut server = start();
    let opts = [OPT_EXPORT_NAME, OPT_LIST, OPT_INFO, OPT_GO, OPT_STRUCTURED_REPLY, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT, 99];
    for opt in opts {
        for sent in [0usize, 1, 5, 50, 99] {
            let mut s = greet(&server);
            let mut m = option(opt, &[0x5a; 100]);
            m.truncate(16 + sent);
            s.write_all(&m).unwrap();
            if sent % 2 == 0 {
                drop(s);
            } else {
                s.shutdown(Shutdown::Write).unwrap();
                drain_until_closed(&mut s, "truncated option");
            }
        }
        // Truncated header too.
        let mut s = greet(&server);
        s.write_all(&option(opt, &[])[..9]).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        drain_until_closed(&mut s, "truncated option header");
    }
    probe(&mut server, 5);
}

#[test]
fn malformed_option_payloads_are_refused_and_haggling_goes_on() {
    let mut server = start();
    let mut s = greet(&server);
    assert_eq!(opt_final(&mut s, OPT_STRUCTURED_REPLY, &[]), REP_ACK);
    let be = |v: u32| v.to_be_bytes().to_vec();
    let cases: Vec<(u32, Vec<u8>, Option<u32>)> = vec![
        // INFO/GO: name longer than the data.
        (OPT_INFO, [be(100), b"v".to_vec(), vec![0, 0]].concat(), Some(REP_ERR_INVALID)),
        (OPT_GO, [be(u32::MAX), b"v".to_vec(), vec![0, 0]].concat(), Some(REP_ERR_INVALID)),
        // INFO: request count disagrees with the data.
        (OPT_INFO, [be(1), b"v".to_vec(), vec![0, 5, 0, 1]].concat(), Some(REP_ERR_INVALID)),
        (OPT_INFO, [be(1), b"v".to_vec(), vec![0, 0, 9]].concat(), Some(REP_ERR_INVALID)),
        (OPT_GO, vec![0, 0], Some(REP_ERR_INVALID)),
        (OPT_GO, vec![], Some(REP_ERR_INVALID)),
        // Name not UTF-8.
        (OPT_GO, [be(2), vec![0xff, 0xfe], vec![0, 0]].concat(), None),
        // Name over the 4096-byte string limit.
        (OPT_INFO, [be(5000), vec![b'v'; 5000], vec![0, 0]].concat(), None),
        // Meta context: absurd query count, query past the data, trailing bytes.
        (OPT_SET_META_CONTEXT, [be(1), b"v".to_vec(), be(u32::MAX)].concat(), Some(REP_ERR_INVALID)),
        (OPT_LIST_META_CONTEXT, [be(1), b"v".to_vec(), be(1), be(1000), b"base:".to_vec()].concat(), Some(REP_ERR_INVALID)),
        (OPT_SET_META_CONTEXT, [be(1), b"v".to_vec(), be(0), vec![1, 2, 3]].concat(), Some(REP_ERR_INVALID)),
        (OPT_LIST_META_CONTEXT, vec![0, 0, 0], Some(REP_ERR_INVALID)),
        // Unknown export in a meta-context request.
        (OPT_SET_META_CONTEXT, [be(4), b"nope".to_vec(), be(0)].concat(), Some(REP_ERR_UNKNOWN)),
        // STRUCTURED_REPLY with data.
        (OPT_STRUCTURED_REPLY, vec![1], Some(REP_ERR_INVALID)),
        // Options with huge numbers.
        (0xffff_ffff, vec![1, 2, 3], Some(REP_ERR_UNSUP)),
        (0x8000_0001, vec![], Some(REP_ERR_UNSUP)),
    ];
    for (opt, data, want) in cases {
        let got = opt_final(&mut s, opt, &data);
        assert_ne!(got & REP_FLAG_ERROR, 0, "option {opt} with malformed data {:02x?} was accepted", &data[..data.len().min(32)]);
        if let Some(want) = want {
            assert_eq!(got, want, "option {opt} with data {:02x?}", &data[..data.len().min(32)]);
        }
    }
    // Still haggling: GO works (structured was negotiated, so read the
    // reply to a WRITE as either kind).
    let mut s = go_on(s);
    let mut m = header(0, CMD_WRITE, 5, 0, 512).to_vec();
    m.extend_from_slice(&[3u8; 512]);
    s.write_all(&m).unwrap();
    let r = read_n(&mut s, 4, "reply magic");
    match be32(&r) {
        SIMPLE_REPLY_MAGIC => assert_eq!(simple_reply_rest(&mut s), (0, 5)),
        STRUCTURED_REPLY_MAGIC => {
            let h = read_n(&mut s, 16, "chunk");
            assert_eq!(be64(&h[4..]), 5);
            assert_ne!(u16::from_be_bytes([h[0], h[1]]) & REPLY_FLAG_DONE, 0);
            assert_eq!(u16::from_be_bytes([h[2], h[3]]), 0, "successful WRITE answered with a non-NONE chunk");
        }
        m => panic!("bad magic {m:#x}"),
    }
    probe(&mut server, 6);
}

fn simple_reply_rest(s: &mut UnixStream) -> (u32, u64) {
    let r = read_n(s, 12, "simple reply");
    (be32(&r), be64(&r[4..]))
}

// ---------------------------------------------------------------------------
// Transmission abuse
// ---------------------------------------------------------------------------

#[test]
fn bad_request_magic_closes_only_that_connection() {
    let mut server = start();
    let mut a = go(&server);
    write_ok(&mut a, 1, 0, &pattern(7, 4096));
    let mut b = go(&server);
    write_ok(&mut b, 1, 8192, &[9u8; 512]);
    let mut bad = header(0, CMD_READ, 2, 0, 512);
    bad[0] = 0x26;
    b.write_all(&bad).unwrap();
    expect_closed_silently(&mut b, "bad request magic");
    // The other connection is untouched.
    assert_eq!(read_ok(&mut a, 3, 0, 4096), pattern(7, 4096));
    // Garbage (e.g. a second greeting) instead of a request.
    let mut c = go(&server);
    c.write_all(b"NBDMAGICIHAVEOPT\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0").unwrap();
    expect_closed_silently(&mut c, "garbage request");
    assert_eq!(read_ok(&mut a, 4, 8192, 512), vec![9u8; 512]);
    probe(&mut server, 7);
}

#[test]
fn write_header_claiming_4_gib_then_hangup() {
    let mut server = start();
    for tail in [0usize, 1, 4096, 1 << 20] {
        let mut s = go(&server);
        let mut m = header(0, CMD_WRITE, 1, 0, u32::MAX).to_vec();
        m.extend(std::iter::repeat_n(0xAB, tail));
        s.write_all(&m).unwrap();
        if tail % 2 == 0 {
            drop(s);
        } else {
            s.shutdown(Shutdown::Write).unwrap();
            drain_until_closed(&mut s, "4 GiB WRITE then EOF");
        }
    }
    // 0xFFFFFFFF-byte READ is just refused, the connection goes on.
    let mut s = go(&server);
    s.write_all(&header(0, CMD_READ, 77, 0, u32::MAX)).unwrap();
    assert_eq!(simple_reply(&mut s), (EINVAL, 77));
    write_ok(&mut s, 78, 0, &[1u8; 4096]);
    probe(&mut server, 8);
}

/// The byte stream of a complete session; hangs up after every prefix.
#[test]
fn hangups_at_every_point() {
    let mut server = start();
    let mut script = Vec::new();
    let mut cuts = Vec::new();
    script.extend_from_slice(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
    script.extend_from_slice(&option(OPT_LIST, &[]));
    script.extend_from_slice(&option(OPT_STRUCTURED_REPLY, &[]));
    let mut meta = Vec::new();
    meta.extend_from_slice(&1u32.to_be_bytes());
    meta.extend_from_slice(b"v");
    meta.extend_from_slice(&1u32.to_be_bytes());
    meta.extend_from_slice(&15u32.to_be_bytes());
    meta.extend_from_slice(b"base:allocation");
    script.extend_from_slice(&option(OPT_SET_META_CONTEXT, &meta));
    script.extend_from_slice(&option(OPT_GO, &info_payload("v", &[])));
    cuts.extend(0..=script.len());
    script.extend_from_slice(&header(CMD_FLAG_FUA, CMD_WRITE, 1, 8 * MIB - 2048, 4096));
    let payload_start = script.len();
    cuts.extend(script.len() - 28..payload_start);
    script.extend_from_slice(&pattern(9, 4096));
    cuts.extend((payload_start..script.len()).step_by(331));
    let h = header(0, CMD_READ, 2, 0, 1 << 20);
    cuts.extend(script.len()..script.len() + 28);
    script.extend_from_slice(&h);
    script.extend_from_slice(&header(0, CMD_FLUSH, 3, 0, 0));
    script.extend_from_slice(&header(0, CMD_DISC, 4, 0, 0));
    cuts.push(script.len());
    let started = Instant::now();
    for (i, &cut) in cuts.iter().enumerate() {
        let mut s = connect(&server);
        read_n(&mut s, 18, "greeting");
        s.write_all(&script[..cut]).unwrap();
        if i % 3 == 0 {
            drop(s); // hard close, with replies possibly unread
        } else {
            // Half-close: the server must notice EOF and close its side.
            s.shutdown(Shutdown::Write).unwrap();
            drain_until_closed(&mut s, &format!("EOF after {cut} bytes"));
        }
    }
    eprintln!("{} hangups in {:?}", cuts.len(), started.elapsed());
    probe(&mut server, 9);
}

#[test]
fn rapid_connections_do_not_leak() {
    let mut server = start();
    probe(&mut server, 10);
    std::thread::sleep(Duration::from_millis(300));
    let pid = server.pid();
    let baseline = proc_status(pid, "Threads");
    // 200 connections opened and dropped as fast as possible, some after
    // reading the greeting, some mid-option, some in transmission.
    for i in 0..200u64 {
        let mut s = UnixStream::connect(&server.socket).expect("connect");
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        match i % 4 {
            0 => {}
            1 => {
                let _ = s.read_exact(&mut [0u8; 18]);
            }
            2 => {
                let _ = s.write_all(&(FLAG_C_FIXED_NEWSTYLE).to_be_bytes());
                let _ = s.write_all(&option(OPT_GO, &info_payload("v", &[]))[..20]);
            }
            _ => {
                let mut s = go(&server);
                let _ = s.write_all(&header(0, CMD_READ, 1, 0, 1 << 20));
            }
        }
    }
    // 200 held open at once, then all dropped.
    let held: Vec<_> = (0..200).map(|_| UnixStream::connect(&server.socket).expect("connect")).collect();
    drop(held);
    probe(&mut server, 11);
    // Connection threads end: the thread count returns to its baseline.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let threads = proc_status(pid, "Threads");
        if threads <= baseline + 1 {
            break;
        }
        assert!(Instant::now() < deadline, "server has {threads} threads, {baseline} before the connection storm");
        std::thread::sleep(Duration::from_millis(100));
    }
    probe(&mut server, 12);
}

#[test]
fn idle_clients_do_not_block_others() {
    let mut server = start();
    // Connected, never speaking.
    let _silent = UnixStream::connect(&server.socket).unwrap();
    // Stuck mid-option header.
    let mut mid_option = greet(&server);
    mid_option.write_all(&option(OPT_GO, &info_payload("v", &[]))[..10]).unwrap();
    // Idle in transmission.
    let _idle = go(&server);
    // Stuck mid-WRITE payload.
    let mut mid_write = go(&server);
    mid_write.write_all(&header(0, CMD_WRITE, 1, 0, 65536)).unwrap();
    mid_write.write_all(&[1u8; 1000]).unwrap();
    // A well-behaved client is served promptly, repeatedly.
    let t = Instant::now();
    for i in 0..5 {
        probe(&mut server, 20 + i);
    }
    assert!(t.elapsed() < Duration::from_secs(5), "probes took {:?} next to idle clients", t.elapsed());
    // The stuck WRITE completes when its payload arrives.
    mid_write.write_all(&[1u8; 65536 - 1000]).unwrap();
    assert_eq!(simple_reply(&mut mid_write), (0, 1));
    assert_eq!(read_ok(&mut mid_write, 2, 0, 65536), vec![1u8; 65536]);
}

/// Random valid and invalid traffic from many threads at once.
#[test]
fn concurrent_random_traffic() {
    let mut server = start();
    let threads = 8u64;
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let socket = server.socket.clone();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let stop = stop.clone();
            let ops = ops.clone();
            let socket = socket.clone();
            std::thread::spawn(move || {
                // Each thread owns 1 MiB (its own data is checked exactly);
                // all of them also read anywhere.
                let region = t * 2 * MIB + if t % 2 == 1 { MIB / 2 } else { 0 };
                let mut shadow = vec![0u8; MIB as usize];
                let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ ((t + 1) * 0x1234_5678_9abc));
                let open = |rng: &mut Rng| -> UnixStream {
                    let mut s = UnixStream::connect(&socket).expect("connect");
                    s.set_read_timeout(Some(TIMEOUT)).unwrap();
                    s.set_write_timeout(Some(TIMEOUT)).unwrap();
                    read_n(&mut s, 18, "greeting");
                    s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes()).unwrap();
                    if rng.below(3) == 0 {
                        assert_eq!(opt_final(&mut s, OPT_LIST, &[]), REP_ACK);
                    }
                    if rng.below(3) == 0 {
                        assert_eq!(opt_final(&mut s, 1000 + rng.below(1000) as u32, &rng.junk(64)), REP_ERR_UNSUP);
                    }
                    go_on(s)
                };
                while !stop.load(Ordering::Relaxed) {
                    match rng.below(10) {
                        0 => {
                            // Garbage during the handshake.
                            let mut s = UnixStream::connect(&socket).expect("connect");
                            s.set_read_timeout(Some(TIMEOUT)).unwrap();
                            let _ = s.read_exact(&mut [0u8; 18]);
                            let junk = if rng.below(2) == 0 {
                                let mut m = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes().to_vec();
                                m.extend_from_slice(&IHAVEOPT.to_be_bytes());
                                m.extend(rng.junk(100));
                                m
                            } else {
                                rng.junk(200)
                            };
                            let _ = s.write_all(&junk);
                            ops.fetch_add(1, Ordering::Relaxed);
                        }
                        1 => {
                            // Garbage during transmission.
                            let mut s = open(&mut rng);
                            let _ = s.write_all(&[vec![0x55], rng.junk(300)].concat());
                            ops.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {
                            let mut s = open(&mut rng);
                            let n = 5 + rng.below(40);
                            let mut cookie = rng.next();
                            for _ in 0..n {
                                cookie = cookie.wrapping_add(1);
                                match rng.below(8) {
                                    0 | 1 => {
                                        let len = 1 + rng.below(64 * 1024);
                                        let off = rng.below(MIB - len);
                                        let data = rng.bytes(len as usize);
                                        write_ok(&mut s, cookie, region + off, &data);
                                        shadow[off as usize..(off + len) as usize].copy_from_slice(&data);
                                    }
                                    2 | 3 => {
                                        let len = 1 + rng.below(64 * 1024);
                                        let off = rng.below(MIB - len);
                                        let got = read_ok(&mut s, cookie, region + off, len as u32);
                                        assert!(got == shadow[off as usize..(off + len) as usize], "thread {t}: data mismatch");
                                    }
                                    4 => {
                                        let _ = read_ok(&mut s, cookie, rng.below(SIZE - 4096), 4096);
                                    }
                                    5 => {
                                        // Invalid: past the end, unknown command, unknown flag.
                                        let (h, err) = match rng.below(3) {
                                            0 => (header(0, CMD_READ, cookie, SIZE - 100, 4096), EINVAL),
                                            1 => (header(0, 50 + rng.below(1000) as u16, cookie, rng.next(), rng.next() as u32), EINVAL),
                                            _ => (header(1 << 14, CMD_READ, cookie, 0, 512), EINVAL),
                                        };
                                        s.write_all(&h).unwrap();
                                        assert_eq!(simple_reply(&mut s), (err, cookie));
                                    }
                                    6 => {
                                        // WRITE past the end: payload consumed, ENOSPC.
                                        let len = 1 + rng.below(8192);
                                        let mut m = header(0, CMD_WRITE, cookie, SIZE - len / 2, len as u32).to_vec();
                                        m.extend(rng.bytes(len as usize));
                                        s.write_all(&m).unwrap();
                                        assert_eq!(simple_reply(&mut s), (ENOSPC, cookie));
                                    }
                                    _ => {
                                        s.write_all(&header(0, CMD_FLUSH, cookie, 0, 0)).unwrap();
                                        assert_eq!(simple_reply(&mut s), (0, cookie));
                                    }
                                }
                                ops.fetch_add(1, Ordering::Relaxed);
                            }
                            match rng.below(3) {
                                0 => drop(s),
                                1 => {
                                    // Hang up with requests in flight.
                                    let _ = s.write_all(&header(0, CMD_READ, 1, 0, 1 << 20));
                                }
                                _ => {
                                    s.write_all(&header(0, CMD_DISC, 0, 0, 0)).unwrap();
                                    drain_until_closed(&mut s, "DISC");
                                }
                            }
                        }
                    }
                }
                (region, shadow)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let results: Vec<_> = handles.into_iter().map(|h| h.join().expect("traffic thread failed")).collect();
    eprintln!("{} operations", ops.load(Ordering::Relaxed));
    server.assert_alive();
    // Every thread's data is intact.
    let mut s = go(&server);
    for (i, (region, shadow)) in results.iter().enumerate() {
        let got = read_ok(&mut s, 100 + i as u64, *region, MIB as u32);
        assert!(&got == shadow, "region of thread {i} corrupted");
    }
    probe(&mut server, 13);
}

// ---------------------------------------------------------------------------
// Memory bounds
// ---------------------------------------------------------------------------

const RSS_LIMIT_KB: u64 = 300 * 1024;

/// Samples VmRSS of `pid` until `done`; returns the maximum in kB.
fn sample_rss(pid: i32, done: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut max = 0;
        while !done.load(Ordering::Relaxed) {
            max = max.max(proc_status(pid, "VmRSS"));
            std::thread::sleep(Duration::from_millis(20));
        }
        max.max(proc_status(pid, "VmRSS"))
    })
}

/// One client pipelines up to 1 GiB of 1 MiB WRITEs without reading a
/// single reply. The server bounds what it holds per connection (64 MiB
/// of payload in flight), so its memory stays small whatever the client
/// does; once the client reads its replies, everything completes.
#[test]
fn unread_write_flood_stays_bounded() {
    let mut server = start();
    let pid = server.pid();
    let s = go(&server);
    let done = Arc::new(AtomicBool::new(false));
    let sampler = sample_rss(pid, done.clone());
    let mut w = s.try_clone().unwrap();
    w.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    const COUNT: u64 = 1024;
    let message = |i: u64| {
        let mut m = header(0, CMD_WRITE, i, (i % 16) * MIB, MIB as u32).to_vec();
        m.extend_from_slice(&pattern(i % 16, MIB as usize));
        m
    };
    let msg_len = 28 + MIB;
    // Phase 1: write until 1 GiB is sent or the socket blocks for 2 s,
    // counting every byte that went out.
    let writer = std::thread::spawn(move || {
        let mut written = 0u64;
        let start = Instant::now();
        while written < COUNT * msg_len && start.elapsed() < Duration::from_secs(60) {
            let i = written / msg_len;
            let m = message(i);
            let mut at = (written % msg_len) as usize;
            while at < m.len() {
                match w.write(&m[at..]) {
                    Ok(0) => panic!("write flood: socket closed"),
                    Ok(n) => {
                        at += n;
                        written += n as u64;
                    }
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return (written, w),
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => panic!("write flood: {e}"),
                }
            }
        }
        (written, w)
    });
    let (written, mut w) = writer.join().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    done.store(true, Ordering::Relaxed);
    let max_rss = sampler.join().unwrap();
    let hwm = proc_status(pid, "VmHWM");
    let requests = written.div_ceil(msg_len);
    eprintln!(
        "wrote {} MiB ({requests} requests begun) before blocking; server VmRSS max {} MiB, VmHWM {} MiB",
        written / MIB,
        max_rss / 1024,
        hwm / 1024
    );
    assert!(written >= 64 * MIB, "only {} MiB went through", written / MIB);
    assert!(max_rss < RSS_LIMIT_KB, "server RSS reached {} MiB", max_rss / 1024);
    assert!(hwm < RSS_LIMIT_KB, "server peak RSS reached {} MiB", hwm / 1024);
    server.assert_alive();
    // Phase 2: read the replies while finishing the request cut short;
    // every request begun is answered exactly once, successfully.
    let mut r = s.try_clone().unwrap();
    let reader = std::thread::spawn(move || {
        let mut seen = vec![false; requests as usize];
        for _ in 0..requests {
            let (err, cookie) = simple_reply(&mut r);
            assert_eq!(err, 0, "WRITE {cookie} failed");
            assert!(!std::mem::replace(&mut seen[cookie as usize], true), "cookie {cookie} answered twice");
        }
    });
    w.set_write_timeout(Some(TIMEOUT)).unwrap();
    if written % msg_len != 0 {
        let m = message(written / msg_len);
        w.write_all(&m[(written % msg_len) as usize..]).unwrap();
    }
    reader.join().expect("replies after the flood");
    let mut s = s;
    for i in 0..16 {
        assert!(read_ok(&mut s, 1 << 40 | i, i * MIB, MIB as u32) == pattern(i, MIB as usize), "MiB {i} holds wrong data");
    }
    drop(s);
    probe(&mut server, 14);
}

/// One client asks for 1 GiB of 1 MiB READs and does not read the replies
/// for a while: the server must stop taking requests instead of buffering
/// the replies. Once the client reads, every request is answered.
#[test]
fn unread_read_replies_stay_bounded() {
    let mut server = start();
    let pid = server.pid();
    let mut s = go(&server);
    write_ok(&mut s, 0, 0, &pattern(98, MIB as usize));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = sample_rss(pid, done.clone());
    let mut w = s.try_clone().unwrap();
    w.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    const COUNT: u64 = 1024;
    let stream: Vec<u8> = (0..COUNT).flat_map(|i| header(0, CMD_READ, i, 0, MIB as u32)).collect();
    let total = stream.len();
    // Phase 1: send the headers until all are out or the socket blocks for 2 s.
    let writer = std::thread::spawn(move || {
        let mut at = 0;
        while at < stream.len() {
            match w.write(&stream[at..]) {
                Ok(0) => panic!("read flood: socket closed"),
                Ok(n) => at += n,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => panic!("read flood: {e}"),
            }
        }
        (at, stream, w)
    });
    let (at, stream, mut w) = writer.join().unwrap();
    // Leave the server time to fill whatever it would buffer.
    std::thread::sleep(Duration::from_secs(2));
    done.store(true, Ordering::Relaxed);
    let max_rss = sampler.join().unwrap();
    let requests = at.div_ceil(28) as u64;
    eprintln!("sent {requests} READ headers before blocking; server VmRSS max {} MiB", max_rss / 1024);
    assert!(max_rss < RSS_LIMIT_KB, "server RSS reached {} MiB while replies were unread", max_rss / 1024);
    server.assert_alive();
    // Phase 2: finish the header cut short, read every reply.
    w.set_write_timeout(Some(TIMEOUT)).unwrap();
    w.write_all(&stream[at..(requests as usize * 28).min(total)]).unwrap();
    let want = pattern(98, MIB as usize);
    let mut seen = vec![false; requests as usize];
    for _ in 0..requests {
        let (err, cookie) = simple_reply(&mut s);
        assert_eq!(err, 0);
        assert!(!std::mem::replace(&mut seen[cookie as usize], true), "cookie {cookie} answered twice");
        assert!(read_n(&mut s, MIB as usize, "READ data") == want, "READ {cookie} returned wrong data");
    }
    write_ok(&mut s, 1 << 40, 0, &[1u8; 512]);
    drop(s);
    assert!(proc_status(pid, "VmHWM") < RSS_LIMIT_KB, "server peak RSS over the limit");
    probe(&mut server, 15);
}

/// How many bytes of unanswerable requests a client may push before the
/// server must have stopped reading.
const FLOOD_LIMIT: u64 = 16 * MIB;

/// Error replies cost memory too: a client that keeps sending invalid
/// requests while a large reply is stuck in its unread socket must not
/// make the server queue replies without bound.
#[test]
fn unread_error_replies_stay_bounded() {
    let mut server = start();
    let pid = server.pid();
    let s = go(&server);
    let done = Arc::new(AtomicBool::new(false));
    let sampler = sample_rss(pid, done.clone());
    let mut w = s.try_clone().unwrap();
    w.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    let writer = std::thread::spawn(move || {
        // Two big READs (within the 64 MiB budget) fill the socket so the
        // reply writer blocks ...
        for i in 0..2 {
            w.write_all(&header(0, CMD_READ, i, 0, 16 << 20)).unwrap();
        }
        // (the connection's flusher thread, not the request reader, is
        // now the one waiting to write replies)
        std::thread::sleep(Duration::from_millis(500));
        // ... then a stream of invalid requests, 64 KiB of headers at a time.
        let bad: Vec<u8> = (0..2340u64).flat_map(|i| header(0, CMD_READ, 1000 + i, SIZE, 4096)).collect();
        let mut sent = 0u64;
        let start = Instant::now();
        // Until the server stops reading (a write blocks for 2 s), or it
        // has taken far more than it may hold, or its memory passes the
        // limit, or 20 s.
        while sent <= FLOOD_LIMIT && start.elapsed() < Duration::from_secs(20) && proc_status(pid, "VmRSS") < RSS_LIMIT_KB {
            match w.write_all(&bad) {
                Ok(()) => sent += bad.len() as u64,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
                Err(e) => panic!("error flood: {e}"),
            }
        }
        sent
    });
    let sent = writer.join().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    done.store(true, Ordering::Relaxed);
    let max_rss = sampler.join().unwrap();
    eprintln!("sent {} MiB of invalid requests; server VmRSS max {} MiB", sent / MIB, max_rss / 1024);
    // The server logged one line per refused request: drop those hundreds
    // of megabytes rather than have a failure print them all.
    std::fs::write(server.path("server.log"), "(log of the invalid-request flood truncated by the test)\n").unwrap();
    assert!(max_rss < RSS_LIMIT_KB, "server RSS reached {} MiB queueing error replies", max_rss / 1024);
    // With at most 1024 requests in flight per connection, the server stops
    // reading long before 16 MiB (600,000 requests): everything past the
    // socket buffers would be replies queued without bound.
    assert!(
        sent <= FLOOD_LIMIT,
        "server kept reading {} MiB of requests whose replies it could not send (RSS {} MiB)",
        sent / MIB,
        max_rss / 1024
    );
    drop(s);
    probe(&mut server, 16);
}
