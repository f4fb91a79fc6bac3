//! The raw NBD test client shared by tests/protocol.rs and tests/hostile.rs:
//! std `UnixStream`, messages built by hand from the protocol document
//! (doc/proto.md of NetworkBlockDevice/nbd) rather than with the crate's
//! encoders, so that the server is checked against the spec, not against
//! itself. Every socket has read and write timeouts, so a server that hangs
//! fails the test instead of hanging it.
//!
//! This file holds the wire helpers and the handshake; `transmission` holds
//! the transmission phase (requests in flight, structured reply assembly).

pub mod transmission;

pub use transmission::*;

use super::TestServer;
use nbdvirt::nbd::{
    CMD_READ, CMD_WRITE, FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, IHAVEOPT, INFO_EXPORT, NBDMAGIC, OPT_GO, OPT_REPLY_MAGIC,
    OPT_SET_META_CONTEXT, OPT_STRUCTURED_REPLY, REP_ACK, REP_FLAG_ERROR, REP_INFO, REP_META_CONTEXT, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC,
};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// Every socket's read/write timeout, and how long a close may take.
pub const TIMEOUT: Duration = Duration::from_secs(10);
pub const MIB: u64 = 1 << 20;

pub fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().unwrap())
}
pub fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
pub fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

pub fn connect(server: &TestServer) -> UnixStream {
    let s = UnixStream::connect(&server.socket).expect("connect to nbdvirt");
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.set_write_timeout(Some(TIMEOUT)).unwrap();
    s
}

pub fn read_n(s: &mut UnixStream, n: usize, what: &str) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    if let Err(e) = s.read_exact(&mut buf) {
        panic!("reading {what} ({n} bytes): {e}");
    }
    buf
}

/// Asserts the server closes the connection (EOF or reset) within the
/// timeout, sending nothing more.
pub fn expect_closed(s: &mut UnixStream, what: &str) {
    let deadline = Instant::now() + TIMEOUT;
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => panic!("{what}: expected the server to close, got {n} more bytes: {:02x?}", &buf[..n.min(64)]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset || e.kind() == ErrorKind::BrokenPipe => return,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("{what}: expected the server to close the connection, got {e}"),
        }
        assert!(Instant::now() < deadline, "{what}: server did not close the connection");
    }
}

/// Reads and discards whatever the server sends until it closes; fails if
/// it keeps the connection open past the timeout. Returns the byte count.
pub fn drain_until_closed(s: &mut UnixStream, what: &str) -> usize {
    let deadline = Instant::now() + TIMEOUT;
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        match s.read(&mut buf) {
            Ok(0) => return total,
            Ok(n) => total += n,
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => return total,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("{what}: server did not close the connection ({e})"),
        }
        assert!(Instant::now() < deadline, "{what}: server did not close the connection");
    }
}

/// Hand-built request header (proto.md, "Request message").
pub fn header(flags: u16, cmd: u16, cookie: u64, offset: u64, length: u32) -> [u8; 28] {
    let mut h = [0u8; 28];
    h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&flags.to_be_bytes());
    h[6..8].copy_from_slice(&cmd.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h[16..24].copy_from_slice(&offset.to_be_bytes());
    h[24..28].copy_from_slice(&length.to_be_bytes());
    h
}

/// One option request: IHAVEOPT, option, length, data.
pub fn option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(16 + data.len());
    m.extend_from_slice(&IHAVEOPT.to_be_bytes());
    m.extend_from_slice(&option.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    m
}

/// NBD_OPT_INFO / NBD_OPT_GO payload.
pub fn info_payload(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

/// NBD_OPT_{LIST,SET}_META_CONTEXT payload.
pub fn meta_payload(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

/// One option reply.
#[derive(Debug, Clone)]
pub struct OptReply {
    pub option: u32,
    pub kind: u32,
    pub data: Vec<u8>,
}

impl OptReply {
    pub fn is_final(&self) -> bool {
        self.kind == REP_ACK || self.kind & REP_FLAG_ERROR != 0
    }
}

/// Reads one option reply, checking its magic and a sane length.
pub fn read_opt_reply(s: &mut UnixStream) -> OptReply {
    let h = read_n(s, 20, "option reply header");
    assert_eq!(be64(&h), OPT_REPLY_MAGIC, "option reply magic");
    let len = be32(&h[16..]);
    assert!(len < 1 << 20, "absurd option reply length {len}");
    let data = read_n(s, len as usize, "option reply data");
    OptReply { option: be32(&h[8..]), kind: be32(&h[12..]), data }
}

/// (option, reply type, data) of one option reply.
pub fn opt_reply(s: &mut UnixStream) -> (u32, u32, Vec<u8>) {
    let r = read_opt_reply(s);
    (r.option, r.kind, r.data)
}

/// Sends `opt` and collects its replies up to the final one (ACK or
/// error), checking each echoes the option.
pub fn exchange(s: &mut UnixStream, opt: u32, data: &[u8]) -> Vec<OptReply> {
    s.write_all(&option(opt, data)).unwrap();
    let mut out = Vec::new();
    loop {
        let r = read_opt_reply(s);
        assert_eq!(r.option, opt, "reply {r:?} does not echo option {opt}");
        let last = r.is_final();
        out.push(r);
        if last {
            return out;
        }
        assert!(out.len() < 1000, "endless option replies");
    }
}

/// Sends an option and returns the type of its final reply.
pub fn opt_final(s: &mut UnixStream, opt: u32, data: &[u8]) -> u32 {
    exchange(s, opt, data).last().expect("a final reply").kind
}

/// The (id, name) pairs of the META_CONTEXT replies in `r`.
pub fn contexts(r: &[OptReply]) -> Vec<(u32, String)> {
    r.iter()
        .filter(|x| x.kind == REP_META_CONTEXT)
        .map(|x| {
            assert!(x.data.len() >= 4, "short META_CONTEXT reply {x:?}");
            (be32(&x.data), String::from_utf8(x.data[4..].to_vec()).expect("context name is UTF-8"))
        })
        .collect()
}

/// (size, flags) of the NBD_INFO_EXPORT reply in `r`, checking its length.
pub fn info_export(r: &[OptReply]) -> Option<(u64, u16)> {
    let infos: Vec<_> = r.iter().filter(|x| x.kind == REP_INFO && be16(&x.data) == INFO_EXPORT).collect();
    assert!(infos.len() <= 1, "NBD_INFO_EXPORT sent {} times", infos.len());
    infos.first().map(|x| {
        assert_eq!(x.data.len(), 12, "NBD_INFO_EXPORT length");
        (be64(&x.data[2..]), be16(&x.data[10..]))
    })
}

/// The client side of option haggling.
pub struct Handshake {
    pub s: UnixStream,
    pub structured: bool,
}

impl Handshake {
    /// Connects, checks the greeting and sends `client_flags`.
    pub fn start_with(server: &TestServer, client_flags: u32) -> Handshake {
        let mut s = connect(server);
        let g = read_n(&mut s, 18, "greeting");
        assert_eq!(be64(&g[0..]), NBDMAGIC, "greeting magic");
        assert_eq!(be64(&g[8..]), IHAVEOPT, "greeting IHAVEOPT");
        s.write_all(&client_flags.to_be_bytes()).unwrap();
        Handshake { s, structured: false }
    }

    pub fn start(server: &TestServer) -> Handshake {
        Self::start_with(server, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
    }

    pub fn send_option(&mut self, opt: u32, data: &[u8]) {
        self.s.write_all(&option(opt, data)).unwrap();
    }

    pub fn reply(&mut self) -> OptReply {
        read_opt_reply(&mut self.s)
    }

    /// Sends `option` and collects its replies up to the final one.
    pub fn exchange(&mut self, option: u32, data: &[u8]) -> Vec<OptReply> {
        exchange(&mut self.s, option, data)
    }

    /// Sends `option` and expects one error reply of type `err` (no other replies).
    pub fn expect_error(&mut self, option: u32, data: &[u8], err: u32) {
        let r = self.exchange(option, data);
        assert_eq!(r.len(), 1, "expected a lone error reply to option {option}, got {r:?}");
        assert_eq!(r[0].kind, err, "option {option}: expected reply type {err:#x}, got {:?}", r[0]);
    }

    pub fn structured_reply(&mut self) {
        let r = self.exchange(OPT_STRUCTURED_REPLY, &[]);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].kind, REP_ACK, "STRUCTURED_REPLY refused: {r:?}");
        self.structured = true;
    }

    /// SET_META_CONTEXT; returns the (id, name) pairs selected.
    pub fn set_meta(&mut self, export: &str, queries: &[&str]) -> Vec<(u32, String)> {
        let r = self.exchange(OPT_SET_META_CONTEXT, &meta_payload(export, queries));
        assert_eq!(r.last().unwrap().kind, REP_ACK, "SET_META_CONTEXT failed: {r:?}");
        contexts(&r)
    }

    /// NBD_OPT_GO; asserts success and returns the transmission connection.
    pub fn go(mut self, export: &str) -> Conn {
        let r = self.exchange(OPT_GO, &info_payload(export, &[]));
        assert_eq!(r.last().unwrap().kind, REP_ACK, "GO {export} failed: {r:?}");
        let (size, flags) = info_export(&r).expect("GO reply without NBD_INFO_EXPORT");
        Conn::new(self.s, self.structured, size, flags)
    }
}

/// Connects and enters transmission on `export` with NBD_OPT_GO.
pub fn open(server: &TestServer, export: &str, structured: bool) -> Conn {
    let mut h = Handshake::start(server);
    if structured {
        h.structured_reply();
    }
    h.go(export)
}

// Simple-reply helpers for clients that bypass `Conn` (hostile tests).

/// Reads one simple reply; returns (error, cookie).
pub fn simple_reply(s: &mut UnixStream) -> (u32, u64) {
    let r = read_n(s, 16, "simple reply");
    assert_eq!(be32(&r), SIMPLE_REPLY_MAGIC, "reply magic");
    (be32(&r[4..]), be64(&r[8..]))
}

pub fn write_ok(s: &mut UnixStream, cookie: u64, offset: u64, data: &[u8]) {
    let mut m = header(0, CMD_WRITE, cookie, offset, data.len() as u32).to_vec();
    m.extend_from_slice(data);
    s.write_all(&m).unwrap();
    assert_eq!(simple_reply(s), (0, cookie), "WRITE {offset}+{}", data.len());
}

pub fn read_ok(s: &mut UnixStream, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    s.write_all(&header(0, CMD_READ, cookie, offset, len)).unwrap();
    assert_eq!(simple_reply(s), (0, cookie), "READ {offset}+{len}");
    read_n(s, len as usize, "READ data")
}
