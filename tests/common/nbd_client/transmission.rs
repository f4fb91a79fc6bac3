//! The transmission phase of the raw test client: requests in flight,
//! simple and structured replies validated against their request (no reply
//! to a cookie not in flight, chunks inside the request, content covering
//! it exactly), READ data reassembled from chunks.

use super::{be16, be32, be64, header, read_n, MIB};
use crate::common::pattern;
use nbdvirt::nbd::{
    CMD_BLOCK_STATUS, CMD_DISC, CMD_READ, CMD_WRITE, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, REPLY_TYPE_NONE, REPLY_TYPE_OFFSET_DATA,
    REPLY_TYPE_OFFSET_HOLE, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC, TFLAG_READ_ONLY,
};
use std::collections::HashMap;
use std::io::Write;
use std::os::unix::net::UnixStream;

/// The maximum block size the server advertises (NBD_INFO_BLOCK_SIZE).
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Largest READ the server serves by default (`server.max_request`); a
/// chunk may exceed it only by its own header fields.
pub const MAX_REQUEST: u32 = 64 * 1024 * 1024;

/// A request awaiting its reply.
#[derive(Debug, Clone, Copy)]
pub struct Pending {
    pub cmd: u16,
    pub offset: u64,
    pub length: u32,
}

#[derive(Debug, Clone)]
pub struct Chunk {
    pub flags: u16,
    pub kind: u16,
    pub payload: Vec<u8>,
}

/// A complete reply to one request.
#[derive(Debug, Default)]
pub struct Outcome {
    /// 0 on success; the first error otherwise.
    pub error: u32,
    /// READ data (reassembled from structured chunks).
    pub data: Vec<u8>,
    /// Structured chunks, in arrival order (empty for a simple reply).
    pub chunks: Vec<Chunk>,
    pub simple: bool,
}

#[derive(Default)]
pub struct Partial {
    pub error: u32,
    pub data: Vec<u8>,
    /// (offset in request, length) of each content chunk.
    pub covered: Vec<(u64, u64)>,
    pub chunks: Vec<Chunk>,
}

/// The client side of the transmission phase. It knows the requests in
/// flight, so it can frame simple READ replies, validates every reply
/// against its request, and fails on any reply to a cookie that is not
/// in flight (an unknown cookie, or a second reply to one).
pub struct Conn {
    pub s: UnixStream,
    pub structured: bool,
    pub size: u64,
    pub flags: u16,
    pub pending: HashMap<u64, Pending>,
    pub partial: HashMap<u64, Partial>,
    pub next_cookie: u64,
}

impl Conn {
    pub fn new(s: UnixStream, structured: bool, size: u64, flags: u16) -> Conn {
        Conn { s, structured, size, flags, pending: HashMap::new(), partial: HashMap::new(), next_cookie: 0x1000_0000_0000_0001 }
    }

    pub fn cookie(&mut self) -> u64 {
        self.next_cookie = self.next_cookie.wrapping_add(0x0101_0101);
        self.next_cookie
    }

    /// Sends one request; `payload` is written after the header as is.
    pub fn send(&mut self, flags: u16, cmd: u16, cookie: u64, offset: u64, length: u32, payload: &[u8]) {
        if cmd != CMD_DISC {
            let old = self.pending.insert(cookie, Pending { cmd, offset, length });
            assert!(old.is_none(), "test bug: cookie {cookie:#x} reused while in flight");
        }
        let mut m = Vec::with_capacity(28 + payload.len());
        m.extend_from_slice(&header(flags, cmd, cookie, offset, length));
        m.extend_from_slice(payload);
        self.s.write_all(&m).expect("send request");
    }

    /// Reads replies until one request is complete; returns its cookie and outcome.
    pub fn next(&mut self) -> (u64, Outcome) {
        loop {
            let magic = be32(&read_n(&mut self.s, 4, "reply magic"));
            match magic {
                SIMPLE_REPLY_MAGIC => {
                    let h = read_n(&mut self.s, 12, "simple reply");
                    let (error, cookie) = (be32(&h), be64(&h[4..]));
                    let p = self.pending.remove(&cookie).unwrap_or_else(|| panic!("simple reply for cookie {cookie:#x}, not in flight"));
                    assert!(!self.partial.contains_key(&cookie), "simple reply after structured chunks for {cookie:#x}");
                    assert!(
                        !(self.structured && p.cmd == CMD_READ),
                        "simple reply to READ after structured replies were negotiated (proto.md forbids it)"
                    );
                    let data = if p.cmd == CMD_READ && error == 0 { read_n(&mut self.s, p.length as usize, "READ data") } else { Vec::new() };
                    return (cookie, Outcome { error, data, chunks: Vec::new(), simple: true });
                }
                STRUCTURED_REPLY_MAGIC => {
                    assert!(self.structured, "structured reply chunk although structured replies were not negotiated");
                    let h = read_n(&mut self.s, 16, "chunk header");
                    let (flags, kind, cookie, len) = (be16(&h), be16(&h[2..]), be64(&h[4..]), be32(&h[12..]));
                    assert!(len <= MAX_REQUEST + 64, "chunk of {len} bytes");
                    let payload = read_n(&mut self.s, len as usize, "chunk payload");
                    let p = *self.pending.get(&cookie).unwrap_or_else(|| panic!("chunk for cookie {cookie:#x}, not in flight"));
                    let part = self.partial.entry(cookie).or_default();
                    absorb(part, &p, flags, kind, &payload);
                    part.chunks.push(Chunk { flags, kind, payload });
                    if flags & REPLY_FLAG_DONE != 0 {
                        self.pending.remove(&cookie);
                        let part = self.partial.remove(&cookie).unwrap();
                        return (cookie, finish(part, &p));
                    }
                }
                other => panic!("bad reply magic {other:#010x}"),
            }
        }
    }

    /// Sends one request and waits for its reply (nothing else in flight).
    pub fn request(&mut self, flags: u16, cmd: u16, offset: u64, length: u32, payload: &[u8]) -> Outcome {
        assert!(self.pending.is_empty());
        let cookie = self.cookie();
        self.send(flags, cmd, cookie, offset, length, payload);
        let (got, outcome) = self.next();
        assert_eq!(got, cookie, "reply to the wrong cookie");
        outcome
    }

    pub fn read(&mut self, offset: u64, length: u32) -> Vec<u8> {
        let o = self.request(0, CMD_READ, offset, length, &[]);
        assert_eq!(o.error, 0, "READ {offset}+{length} failed: {o:?}");
        assert_eq!(o.data.len(), length as usize);
        o.data
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let o = self.request(0, CMD_WRITE, offset, data.len() as u32, data);
        assert_eq!(o.error, 0, "WRITE {offset}+{} failed: {o:?}", data.len());
    }

    /// Asserts the connection still works: write and read back a block.
    pub fn check_alive(&mut self, seed: u64) {
        if self.flags & TFLAG_READ_ONLY != 0 {
            assert_eq!(self.read(0, 512).len(), 512);
            return;
        }
        let data = pattern(seed, 4096);
        self.write(3 * MIB, &data);
        assert_eq!(self.read(3 * MIB, 4096), data, "data read back differs");
    }

    #[allow(clippy::too_many_arguments)]
    pub fn expect_error(&mut self, flags: u16, cmd: u16, offset: u64, length: u32, payload: &[u8], err: u32, what: &str) {
        let o = self.request(flags, cmd, offset, length, payload);
        assert_eq!(o.error, err, "{what}: expected error {err}, got {o:?}");
        if self.structured && !o.simple {
            let e = o.chunks.iter().find(|c| c.kind & 0x8000 != 0).expect("error chunk");
            assert!(e.flags & REPLY_FLAG_DONE != 0 || o.chunks.last().unwrap().flags & REPLY_FLAG_DONE != 0);
        }
        self.check_alive(err as u64 * 7 + length as u64);
    }

    pub fn disc(&mut self) {
        let cookie = self.cookie();
        self.send(0, CMD_DISC, cookie, 0, 0, &[]);
    }
}

/// Applies one structured chunk to a partial reply, checking it against the request.
pub fn absorb(part: &mut Partial, p: &Pending, flags: u16, kind: u16, payload: &[u8]) {
    assert_eq!(flags & !REPLY_FLAG_DONE, 0, "unknown chunk flags {flags:#x}");
    let in_range = |off: u64, len: u64| off >= p.offset && off.checked_add(len).is_some_and(|e| e <= p.offset + p.length as u64);
    match kind {
        REPLY_TYPE_NONE => {
            assert!(payload.is_empty(), "NONE chunk with payload");
            assert!(flags & REPLY_FLAG_DONE != 0, "NONE chunk without DONE");
        }
        REPLY_TYPE_OFFSET_DATA => {
            assert_eq!(p.cmd, CMD_READ, "OFFSET_DATA for a non-READ");
            assert!(payload.len() > 8, "OFFSET_DATA without data ({} bytes)", payload.len());
            let off = be64(payload);
            let len = (payload.len() - 8) as u64;
            assert!(in_range(off, len), "OFFSET_DATA {off}+{len} outside request {p:?}");
            if part.data.is_empty() {
                part.data = vec![0xEE; p.length as usize];
            }
            let start = (off - p.offset) as usize;
            part.data[start..start + len as usize].copy_from_slice(&payload[8..]);
            part.covered.push((off - p.offset, len));
        }
        REPLY_TYPE_OFFSET_HOLE => {
            assert_eq!(p.cmd, CMD_READ, "OFFSET_HOLE for a non-READ");
            assert_eq!(payload.len(), 12, "OFFSET_HOLE length");
            let (off, len) = (be64(payload), be32(&payload[8..]) as u64);
            assert!(len > 0 && in_range(off, len), "OFFSET_HOLE {off}+{len} outside request {p:?}");
            if part.data.is_empty() {
                part.data = vec![0xEE; p.length as usize];
            }
            let start = (off - p.offset) as usize;
            part.data[start..start + len as usize].fill(0);
            part.covered.push((off - p.offset, len));
        }
        REPLY_TYPE_BLOCK_STATUS => {
            assert_eq!(p.cmd, CMD_BLOCK_STATUS, "BLOCK_STATUS chunk for another command");
            assert!(payload.len() >= 12 && (payload.len() - 4).is_multiple_of(8), "BLOCK_STATUS chunk of {} bytes", payload.len());
        }
        k if k & 0x8000 != 0 => {
            assert!(payload.len() >= 6, "error chunk of {} bytes", payload.len());
            let (err, msg_len) = (be32(payload), be16(&payload[4..]) as usize);
            assert_ne!(err, 0, "error chunk with error 0");
            let extra = if k == (1 << 15) | 2 { 8 } else { 0 };
            assert_eq!(payload.len(), 6 + msg_len + extra, "error chunk message length");
            if part.error == 0 {
                part.error = err;
            }
        }
        other => panic!("unknown reply chunk type {other}"),
    }
}

pub fn finish(mut part: Partial, p: &Pending) -> Outcome {
    if p.cmd == CMD_READ {
        // Content chunks must not overlap, and on success must cover the request.
        part.covered.sort();
        let mut end = 0;
        for &(off, len) in &part.covered {
            assert!(off >= end, "overlapping content chunks {:?}", part.covered);
            if part.error == 0 {
                assert_eq!(off, end, "content chunks leave a gap at {end}: {:?}", part.covered);
            }
            end = off + len;
        }
        if part.error == 0 {
            assert_eq!(end, p.length as u64, "content chunks do not cover the request");
            if p.length == 0 {
                part.data = Vec::new();
            }
        }
    }
    if p.cmd == CMD_BLOCK_STATUS && part.error == 0 {
        assert!(part.chunks.iter().any(|c| c.kind == REPLY_TYPE_BLOCK_STATUS), "successful BLOCK_STATUS without a status chunk");
    }
    Outcome { error: part.error, data: part.data, chunks: part.chunks, simple: false }
}

/// (context id, descriptors) of a BLOCK_STATUS chunk.
pub fn descriptors(c: &Chunk) -> (u32, Vec<(u32, u32)>) {
    assert_eq!(c.kind, REPLY_TYPE_BLOCK_STATUS);
    let id = be32(&c.payload);
    let d = c.payload[4..].chunks(8).map(|x| (be32(x), be32(&x[4..]))).collect();
    (id, d)
}
