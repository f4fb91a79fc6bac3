//! The server's replies, judged without I/O: what a structured chunk means
//! for the request it answers, and whether a finished reply is whole. The
//! server is not trusted: anything out of place is an `Err` (the caller
//! then drops the connection), never a panic or a write outside the
//! request's buffer.

use crate::nbd::*;
use std::io;

/// Longest chunk other than OFFSET_DATA and BLOCK_STATUS we accept: an
/// error carries at most a 4096-byte message (proto.md string limit) after
/// 14 bytes.
pub const MAX_SMALL_CHUNK: u32 = 4096 + 14;
/// Longest BLOCK_STATUS chunk we accept: a context id and 8192
/// descriptors (a run per 128 KiB of a 1 GiB request).
pub const MAX_STATUS_CHUNK: u32 = 4 + 8 * 8192;

/// What a request asked for: the chunks answering it must lie inside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub offset: u64,
    pub length: u32,
    /// Only a READ may be answered with data or holes.
    pub read: bool,
    /// A BLOCK_STATUS: the id of the `base:allocation` context it wants.
    pub status: Option<u32>,
}

/// The 16 bytes after a structured reply's magic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub length: u32,
}

pub fn decode_chunk_header(b: &[u8; 16]) -> ChunkHeader {
    ChunkHeader {
        flags: u16::from_be_bytes([b[0], b[1]]),
        kind: u16::from_be_bytes([b[2], b[3]]),
        cookie: u64::from_be_bytes(b[4..12].try_into().expect("len 8")),
        length: u32::from_be_bytes(b[12..16].try_into().expect("len 4")),
    }
}

/// The 12 bytes after a simple reply's magic: (error, cookie).
pub fn decode_simple_reply(b: &[u8; 12]) -> (u32, u64) {
    (u32::from_be_bytes(b[..4].try_into().expect("len 4")), u64::from_be_bytes(b[4..12].try_into().expect("len 8")))
}

/// A chunk, placed in its request: `at` is the position in the request's
/// buffer (offset minus the request's offset).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    None,
    /// `len` bytes of data follow on the wire, for `buf[at..at + len]`.
    Data { at: usize, len: usize },
    Hole { at: usize, len: usize },
    /// `base:allocation` descriptors (8 bytes each, as on the wire).
    Status { descriptors: Vec<u8> },
    /// Another selected context's status (the stamp's): not ours to keep.
    OtherStatus,
    Error { code: u32, message: String },
}

/// How many bytes of the chunk's payload to read before `parse_chunk`:
/// all of it, except for OFFSET_DATA, of which only the offset (the data
/// then go straight into the request's buffer).
pub fn body_len(h: &ChunkHeader) -> Result<usize, String> {
    if h.kind == REPLY_TYPE_OFFSET_DATA {
        return Ok(8);
    }
    let max = if h.kind == REPLY_TYPE_BLOCK_STATUS { MAX_STATUS_CHUNK } else { MAX_SMALL_CHUNK };
    if h.length > max {
        return Err(format!("reply chunk of type {} has {} bytes", h.kind, h.length));
    }
    Ok(h.length as usize)
}

/// Where `[offset, offset + len)` lies in the request's buffer, if wholly
/// inside it.
fn place(span: &Span, offset: u64, len: u64) -> Option<usize> {
    let end = offset.checked_add(len)?;
    (offset >= span.offset && end <= span.offset + span.length as u64).then(|| (offset - span.offset) as usize)
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("len 4"))
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("len 8"))
}

/// Means `body` (`body_len` bytes) of a chunk headed `h` for a request of
/// `span`.
pub fn parse_chunk(h: &ChunkHeader, body: &[u8], span: &Span) -> Result<Chunk, String> {
    let bad = |why: String| Err(format!("reply chunk of type {} ({} bytes): {why}", h.kind, h.length));
    if body.len() != body_len(h)? {
        return bad(format!("{} bytes of body", body.len()));
    }
    match h.kind {
        REPLY_TYPE_NONE if h.length == 0 && h.flags & REPLY_FLAG_DONE != 0 => Ok(Chunk::None),
        REPLY_TYPE_NONE => bad("NONE must be empty and final".into()),
        REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE if !span.read => bad("data for a request that is no READ".into()),
        REPLY_TYPE_OFFSET_DATA => {
            if h.length <= 8 {
                return bad("no data".into());
            }
            let (offset, len) = (be64(body), (h.length - 8) as u64);
            match place(span, offset, len) {
                Some(at) => Ok(Chunk::Data { at, len: len as usize }),
                None => bad(format!("data at {offset}+{len} outside the request {}+{}", span.offset, span.length)),
            }
        }
        REPLY_TYPE_OFFSET_HOLE => {
            if h.length != 12 {
                return bad("a hole is 12 bytes".into());
            }
            let (offset, len) = (be64(body), be32(&body[8..]) as u64);
            match place(span, offset, len) {
                Some(at) if len > 0 => Ok(Chunk::Hole { at, len: len as usize }),
                _ => bad(format!("hole at {offset}+{len} outside the request {}+{}", span.offset, span.length)),
            }
        }
        REPLY_TYPE_BLOCK_STATUS => parse_status(body, span).or_else(bad),
        kind if kind & (1 << 15) != 0 => parse_error(h, body, span).or_else(bad),
        _ => bad("unexpected type".into()),
    }
}

/// BLOCK_STATUS: a context id, then (length, flags) descriptors, none
/// empty, together no longer than the request (proto.md lets the last
/// one run past it; it is cut at the request's end).
fn parse_status(body: &[u8], span: &Span) -> Result<Chunk, String> {
    let Some(want) = span.status else { return Err("status for a request that is no BLOCK_STATUS".into()) };
    if body.len() < 12 || !(body.len() - 4).is_multiple_of(8) {
        return Err("not a context id and whole descriptors".into());
    }
    if be32(body) != want {
        return Ok(Chunk::OtherStatus);
    }
    let mut descriptors = Vec::with_capacity(body.len() - 4);
    let mut covered = 0u64;
    for d in body[4..].chunks_exact(8) {
        let (len, flags) = (be32(d) as u64, be32(&d[4..]));
        if len == 0 || covered >= span.length as u64 {
            return Err(format!("descriptor of {len} bytes at {covered} of a {}-byte request", span.length));
        }
        let len = len.min(span.length as u64 - covered);
        covered += len;
        descriptors.extend_from_slice(&(len as u32).to_be_bytes());
        descriptors.extend_from_slice(&flags.to_be_bytes());
    }
    Ok(Chunk::Status { descriptors })
}

/// The (length, hole) runs of `base:allocation` descriptors as
/// `parse_status` kept them, neighbours of one kind merged.
pub fn allocation_runs(descriptors: &[u8]) -> Vec<(u64, bool)> {
    let mut runs: Vec<(u64, bool)> = Vec::new();
    for d in descriptors.chunks_exact(8) {
        let (len, hole) = (be32(d) as u64, be32(&d[4..]) & STATE_HOLE != 0);
        match runs.last_mut() {
            Some(last) if last.1 == hole => last.0 += len,
            _ => runs.push((len, hole)),
        }
    }
    runs
}

/// ERROR and ERROR_OFFSET (and error types we do not know, which proto.md
/// says to treat as errors): u32 error, u16 message length, message, and
/// for ERROR_OFFSET the u64 offset it concerns.
fn parse_error(h: &ChunkHeader, body: &[u8], span: &Span) -> Result<Chunk, String> {
    if body.len() < 6 {
        return Err("an error is at least 6 bytes".into());
    }
    let code = be32(body);
    let mlen = u16::from_be_bytes([body[4], body[5]]) as usize;
    let tail = match h.kind {
        REPLY_TYPE_ERROR => 0,
        REPLY_TYPE_ERROR_OFFSET => 8,
        _ => body.len().saturating_sub(6 + mlen),
    };
    if code == 0 || body.len() != 6 + mlen + tail {
        return Err(format!("error {code} with a {mlen}-byte message"));
    }
    if h.kind == REPLY_TYPE_ERROR_OFFSET {
        let offset = be64(&body[6 + mlen..]);
        if place(span, offset, 1).is_none() {
            return Err(format!("error at {offset} outside the request {}+{}", span.offset, span.length));
        }
    }
    Ok(Chunk::Error { code, message: String::from_utf8_lossy(&body[6..6 + mlen]).into_owned() })
}

/// What has arrived for one request: data bytes placed, `base:allocation`
/// chunks, the first error.
#[derive(Debug, Default)]
pub struct Progress {
    pub received: u64,
    pub statuses: u32,
    pub error: Option<(u32, String)>,
}

impl Progress {
    pub fn apply(&mut self, chunk: &Chunk) {
        match chunk {
            Chunk::None | Chunk::OtherStatus => {}
            Chunk::Data { len, .. } | Chunk::Hole { len, .. } => self.received += *len as u64,
            Chunk::Status { .. } => self.statuses += 1,
            Chunk::Error { code, message } => {
                self.error.get_or_insert_with(|| (*code, message.clone()));
            }
        }
    }

    /// The request's result at DONE: its NBD error, or `Ok`; `Err` if a
    /// successful READ was not covered exactly (chunks must not overlap,
    /// so a byte count is enough to see a gap).
    pub fn finish(&self, span: &Span) -> Result<Result<(), (u32, String)>, String> {
        if let Some(e) = &self.error {
            return Ok(Err(e.clone()));
        }
        let want = if span.read { span.length as u64 } else { 0 };
        if self.received != want {
            return Err(format!("reply covers {} of {want} bytes", self.received));
        }
        if self.statuses != u32::from(span.status.is_some()) {
            return Err(format!("{} base:allocation chunks for a request that wants {}", self.statuses, u32::from(span.status.is_some())));
        }
        Ok(Ok(()))
    }
}

/// The errno for an NBD error code (unknown codes read as EIO).
pub fn errno(code: u32) -> i32 {
    match code {
        1 => libc::EPERM,
        5 => libc::EIO,
        12 => libc::ENOMEM,
        22 => libc::EINVAL,
        28 => libc::ENOSPC,
        75 => libc::EOVERFLOW,
        95 => libc::EOPNOTSUPP,
        108 => libc::ESHUTDOWN,
        _ => libc::EIO,
    }
}

/// The server's error as the caller sees it: the OS error of the same
/// number, so that a server forwarding it maps it back unchanged.
pub fn nbd_error(code: u32) -> io::Error {
    io::Error::from_raw_os_error(errno(code))
}

#[cfg(test)]
mod tests {
    use super::*;

    const READ: Span = Span { offset: 4096, length: 8192, read: true, status: None };

    fn header(kind: u16, length: u32) -> ChunkHeader {
        ChunkHeader { flags: REPLY_FLAG_DONE, kind, cookie: 1, length }
    }

    fn parse(kind: u16, body: &[u8], length: u32, span: &Span) -> Result<Chunk, String> {
        parse_chunk(&header(kind, length), body, span)
    }

    #[test]
    fn header_decodes() {
        let mut wire = vec![0u8; 20];
        write_chunk_header(&mut wire, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_HOLE, 0x1122, 12);
        assert_eq!(u32::from_be_bytes(wire[..4].try_into().unwrap()), STRUCTURED_REPLY_MAGIC);
        let h = decode_chunk_header(wire[4..].try_into().unwrap());
        assert_eq!(h, ChunkHeader { flags: REPLY_FLAG_DONE, kind: REPLY_TYPE_OFFSET_HOLE, cookie: 0x1122, length: 12 });
        let simple = simple_reply(9, 22);
        assert_eq!(decode_simple_reply(simple[4..].try_into().unwrap()), (22, 9));
    }

    #[test]
    fn data_is_placed_relative_to_the_request() {
        let body = 8192u64.to_be_bytes();
        assert_eq!(parse(REPLY_TYPE_OFFSET_DATA, &body, 8 + 4096, &READ), Ok(Chunk::Data { at: 4096, len: 4096 }));
        // Exactly the end of the request is fine, one byte past is not.
        assert!(parse(REPLY_TYPE_OFFSET_DATA, &body, 8 + 4097, &READ).is_err());
        // Before the request, and an offset that would wrap around.
        assert!(parse(REPLY_TYPE_OFFSET_DATA, &0u64.to_be_bytes(), 8 + 16, &READ).is_err());
        assert!(parse(REPLY_TYPE_OFFSET_DATA, &u64::MAX.to_be_bytes(), 8 + 16, &READ).is_err());
        // Data without bytes, and data for a WRITE.
        assert!(parse(REPLY_TYPE_OFFSET_DATA, &body, 8, &READ).is_err());
        assert!(parse(REPLY_TYPE_OFFSET_DATA, &body, 8 + 16, &Span { read: false, ..READ }).is_err());
    }

    #[test]
    fn holes() {
        let mut body = 4096u64.to_be_bytes().to_vec();
        body.extend_from_slice(&8192u32.to_be_bytes());
        assert_eq!(parse(REPLY_TYPE_OFFSET_HOLE, &body, 12, &READ), Ok(Chunk::Hole { at: 0, len: 8192 }));
        body[8..].copy_from_slice(&8193u32.to_be_bytes());
        assert!(parse(REPLY_TYPE_OFFSET_HOLE, &body, 12, &READ).is_err());
        body[8..].copy_from_slice(&0u32.to_be_bytes());
        assert!(parse(REPLY_TYPE_OFFSET_HOLE, &body, 12, &READ).is_err());
        // A body that is not the 12 bytes the header announces.
        assert!(parse(REPLY_TYPE_OFFSET_HOLE, &body[..11], 12, &READ).is_err());
    }

    #[test]
    fn errors() {
        let wire = chunk_error(1, 28, "full");
        let h = decode_chunk_header(wire[4..20].try_into().unwrap());
        let body = &wire[20..];
        assert_eq!(body_len(&h), Ok(body.len()));
        assert_eq!(parse_chunk(&h, body, &READ), Ok(Chunk::Error { code: 28, message: "full".into() }));
        // ERROR_OFFSET inside the request, then outside it.
        let mut off = body.to_vec();
        off.extend_from_slice(&5000u64.to_be_bytes());
        assert_eq!(parse(REPLY_TYPE_ERROR_OFFSET, &off, off.len() as u32, &READ), Ok(Chunk::Error { code: 28, message: "full".into() }));
        off[10..].copy_from_slice(&(4096u64 + 8192).to_be_bytes());
        assert!(parse(REPLY_TYPE_ERROR_OFFSET, &off, off.len() as u32, &READ).is_err());
        // A message longer than the chunk, and error number 0.
        assert!(parse(REPLY_TYPE_ERROR, &body[..8], 8, &READ).is_err());
        let mut zero = body.to_vec();
        zero[..4].copy_from_slice(&0u32.to_be_bytes());
        assert!(parse(REPLY_TYPE_ERROR, &zero, zero.len() as u32, &READ).is_err());
        // An error type we do not know is still an error.
        assert_eq!(parse((1 << 15) | 9, body, body.len() as u32, &READ), Ok(Chunk::Error { code: 28, message: "full".into() }));
    }

    #[test]
    fn none_block_status_and_oversized_chunks() {
        assert_eq!(parse(REPLY_TYPE_NONE, &[], 0, &READ), Ok(Chunk::None));
        assert!(parse_chunk(&ChunkHeader { flags: 0, ..header(REPLY_TYPE_NONE, 0) }, &[], &READ).is_err());
        assert!(parse(REPLY_TYPE_BLOCK_STATUS, &[0; 12], 12, &READ).is_err());
        assert!(body_len(&header(REPLY_TYPE_ERROR, MAX_SMALL_CHUNK + 1)).is_err());
    }

    #[test]
    fn progress_checks_coverage() {
        let mut p = Progress::default();
        p.apply(&Chunk::Data { at: 0, len: 4096 });
        assert!(p.finish(&READ).is_err(), "half a read is no reply");
        p.apply(&Chunk::Hole { at: 4096, len: 4096 });
        assert_eq!(p.finish(&READ), Ok(Ok(())));
        p.apply(&Chunk::Error { code: 5, message: "disk".into() });
        p.apply(&Chunk::Error { code: 28, message: "later".into() });
        assert_eq!(p.finish(&READ), Ok(Err((5, "disk".into()))));
        assert_eq!(Progress::default().finish(&Span { read: false, ..READ }), Ok(Ok(())));
    }

    #[test]
    fn block_status_keeps_our_context_cut_at_the_request() {
        let bs = Span { offset: 0, length: 8192, read: false, status: Some(3) };
        let chunk = |id: u32, ds: &[(u32, u32)]| [id.to_be_bytes().to_vec(), ds.iter().flat_map(|(l, f)| [l.to_be_bytes(), f.to_be_bytes()].concat()).collect()].concat();
        let body = chunk(3, &[(4096, 3), (65536, 0)]);
        let got = parse(REPLY_TYPE_BLOCK_STATUS, &body, body.len() as u32, &bs).unwrap();
        assert_eq!(got, Chunk::Status { descriptors: chunk(3, &[(4096, 3), (4096, 0)])[4..].to_vec() }, "the last run cut at the request's end");
        assert_eq!(allocation_runs(&chunk(3, &[(4096, 3), (4096, 1), (4096, 0)])[4..]), [(8192, true), (4096, false)], "holes merged, data apart");
        let stamp = chunk(1, &[(8192, 0)]);
        assert_eq!(parse(REPLY_TYPE_BLOCK_STATUS, &stamp, 12, &bs).unwrap(), Chunk::OtherStatus);
        for bad in [chunk(3, &[(0, 0)]), chunk(3, &[(8192, 0), (4096, 0)]), chunk(3, &[]), [chunk(3, &[(4096, 0)]), vec![0]].concat()] {
            assert!(parse(REPLY_TYPE_BLOCK_STATUS, &bad, bad.len() as u32, &bs).is_err(), "{bad:?}");
        }
        assert!(body_len(&header(REPLY_TYPE_BLOCK_STATUS, MAX_STATUS_CHUNK + 8)).is_err());
        // Exactly one chunk of our context makes the reply whole.
        let mut p = Progress::default();
        assert!(p.finish(&bs).is_err());
        p.apply(&Chunk::Status { descriptors: vec![] });
        assert_eq!(p.finish(&bs), Ok(Ok(())));
        p.apply(&Chunk::Status { descriptors: vec![] });
        assert!(p.finish(&bs).is_err());
    }

    #[test]
    fn error_numbers() {
        assert_eq!(nbd_error(28).raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(nbd_error(108).raw_os_error(), Some(libc::ESHUTDOWN));
        assert_eq!(nbd_error(4242).raw_os_error(), Some(libc::EIO));
        assert_eq!(NbdError::from_io(&nbd_error(95)), NbdError::NotSup);
    }
}
