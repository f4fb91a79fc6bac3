//! The client's side of the wire, written independently of `crate::nbd`'s
//! decoders so a decoder bug cannot hide itself: option replies as the
//! server wrote them, and the INFO/GO and META_CONTEXT payloads as the
//! client sent them.

use super::Violation;
use crate::nbd::{MAX_STRING, OPT_REPLY_MAGIC, REP_ACK, REP_ERR_TLS_REQD, REP_FLAG_ERROR};

/// One option reply.
#[derive(Debug, Clone, Copy)]
pub struct Reply<'a> {
    pub kind: u32,
    pub data: &'a [u8],
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Splits a run of output into replies to `option`: each well-formed (magic,
/// the option echoed, its length within the output), nothing left over,
/// exactly one final reply (ACK or an error) and it comes last.
pub fn replies_to(option: u32, tls: bool, mut out: &[u8]) -> Result<Vec<Reply<'_>>, Violation> {
    let mut replies = Vec::new();
    while !out.is_empty() {
        if out.len() < 20 {
            return Err(Violation::new(format!("{} bytes of output that are no option reply", out.len())));
        }
        let magic = u64::from_be_bytes(out[..8].try_into().map_err(|_| Violation::new("short magic"))?);
        if magic != OPT_REPLY_MAGIC {
            return Err(Violation::new(format!("option reply magic {magic:#x}")));
        }
        let (echoed, kind, len) = (be32(&out[8..]), be32(&out[12..]), be32(&out[16..]) as usize);
        if echoed != option {
            return Err(Violation::new(format!("reply to option {echoed} while answering option {option}")));
        }
        if len > out.len() - 20 {
            return Err(Violation::new(format!("reply length {len} but {} bytes follow", out.len() - 20)));
        }
        if kind == REP_ERR_TLS_REQD && tls {
            return Err(Violation::new("NBD_REP_ERR_TLS_REQD after TLS started"));
        }
        replies.push(Reply { kind, data: &out[20..20 + len] });
        out = &out[20 + len..];
    }
    let finals = replies.iter().filter(|r| r.kind == REP_ACK || r.kind & REP_FLAG_ERROR != 0).count();
    match replies.last() {
        None => Err(Violation::new(format!("option {option} got no reply"))),
        Some(last) if finals != 1 || !(last.kind == REP_ACK || last.kind & REP_FLAG_ERROR != 0) => {
            Err(Violation::new(format!("option {option}: {finals} final replies, the last of type {:#x}", last.kind)))
        }
        Some(_) => Ok(replies),
    }
}

/// Reads big-endian fields off a payload, `None` when it runs short.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(be32)
    }
    /// proto.md strings: a u32 length, then UTF-8, at most 4096 bytes.
    fn string(&mut self) -> Option<String> {
        let len = self.u32()? as usize;
        if len > MAX_STRING {
            return None;
        }
        std::str::from_utf8(self.take(len)?).ok().map(str::to_string)
    }
}

/// An INFO/GO payload: export name and info requests; `None` if malformed.
pub fn info_request(data: &[u8]) -> Option<(String, Vec<u16>)> {
    let mut f = Fields(data);
    let name = f.string()?;
    let count = f.u16()? as usize;
    if f.0.len() != 2 * count {
        return None;
    }
    let requests = (0..count).map(|_| f.u16()).collect::<Option<Vec<_>>>()?;
    Some((name, requests))
}

/// A LIST/SET_META_CONTEXT payload: export name and queries; `None` if
/// malformed.
pub fn meta_request(data: &[u8]) -> Option<(String, Vec<String>)> {
    let mut f = Fields(data);
    let name = f.string()?;
    let count = f.u32()? as usize;
    let mut queries = Vec::new();
    for _ in 0..count {
        queries.push(f.string()?);
    }
    f.0.is_empty().then_some((name, queries))
}

/// The name (and the rest, the description) of an NBD_REP_SERVER.
pub fn server_entry(data: &[u8]) -> Option<(&[u8], &[u8])> {
    let mut f = Fields(data);
    let len = f.u32()? as usize;
    let name = f.take(len)?;
    Some((name, f.0))
}

/// The info type of an NBD_REP_INFO and its data.
pub fn info_entry(data: &[u8]) -> Option<(u16, &[u8])> {
    let mut f = Fields(data);
    let kind = f.u16()?;
    Some((kind, f.0))
}

/// The id and name of an NBD_REP_META_CONTEXT.
pub fn meta_entry(data: &[u8]) -> Option<(u32, &[u8])> {
    let mut f = Fields(data);
    let id = f.u32()?;
    Some((id, f.0))
}

/// Big-endian fields at an offset of a reply's data; `None` past its end.
pub fn u32_at(data: &[u8], at: usize) -> Option<u32> {
    data.get(at..at + 4).map(be32)
}

pub fn u16_at(data: &[u8], at: usize) -> Option<u16> {
    data.get(at..at + 2).map(|b| u16::from_be_bytes([b[0], b[1]]))
}

pub fn u64_at(data: &[u8], at: usize) -> Option<u64> {
    data.get(at..at + 8).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes)
}
