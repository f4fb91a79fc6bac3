//! Transmission-phase messages: request headers, simple replies and
//! structured reply chunks (proto.md, "Transmission phase").

use super::*;

/// A decoded request header. For NBD_CMD_WRITE, `length` payload bytes follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl RequestHeader {
    /// Bytes of payload that follow this header on the wire.
    pub fn payload_len(&self) -> u32 {
        if self.command == CMD_WRITE {
            self.length
        } else {
            0
        }
    }

    pub fn encode(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut out = [0u8; REQUEST_HEADER_LEN];
        out[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.command.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..28].copy_from_slice(&self.length.to_be_bytes());
        out
    }
}

/// Decodes one request header from the front of `buf`. A wrong magic means
/// the stream has lost framing: the caller must disconnect.
pub fn decode_request_header(buf: &[u8]) -> Result<RequestHeader, DecodeError> {
    if buf.len() < REQUEST_HEADER_LEN {
        return Err(DecodeError::Incomplete(REQUEST_HEADER_LEN - buf.len()));
    }
    let magic = u32::from_be_bytes(buf[..4].try_into().expect("len 4"));
    if magic != REQUEST_MAGIC {
        return Err(DecodeError::BadMagic(magic as u64));
    }
    Ok(RequestHeader {
        flags: u16::from_be_bytes(buf[4..6].try_into().expect("len 2")),
        command: u16::from_be_bytes(buf[6..8].try_into().expect("len 2")),
        cookie: u64::from_be_bytes(buf[8..16].try_into().expect("len 8")),
        offset: u64::from_be_bytes(buf[16..24].try_into().expect("len 8")),
        length: u32::from_be_bytes(buf[24..28].try_into().expect("len 4")),
    })
}

/// The command flags valid for each command (anything else is EINVAL).
pub fn allowed_flags(command: u16) -> u16 {
    match command {
        CMD_READ => CMD_FLAG_DF,
        CMD_WRITE | CMD_TRIM => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
        _ => 0,
    }
}

pub fn simple_reply(cookie: u64, error: u32) -> [u8; SIMPLE_REPLY_LEN] {
    let mut out = [0u8; SIMPLE_REPLY_LEN];
    write_simple_reply(&mut out, cookie, error);
    out
}

/// Writes a simple reply header into the first 16 bytes of `out` (used to
/// build a READ reply in place in front of its data).
pub fn write_simple_reply(out: &mut [u8], cookie: u64, error: u32) {
    out[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
}

/// Writes a structured chunk header into the first 20 bytes of `out`.
pub fn write_chunk_header(out: &mut [u8], flags: u16, kind: u16, cookie: u64, length: u32) {
    out[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&kind.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out[16..20].copy_from_slice(&length.to_be_bytes());
}

/// Length of the prefix of an OFFSET_DATA chunk: header plus the 8-byte offset.
pub const OFFSET_DATA_PREFIX: usize = CHUNK_HEADER_LEN + 8;

/// Writes the header and offset of an OFFSET_DATA chunk carrying `data_len`
/// bytes into the first 28 bytes of `out`.
pub fn write_offset_data_prefix(out: &mut [u8], flags: u16, cookie: u64, offset: u64, data_len: u32) {
    write_chunk_header(out, flags, REPLY_TYPE_OFFSET_DATA, cookie, data_len + 8);
    out[CHUNK_HEADER_LEN..OFFSET_DATA_PREFIX].copy_from_slice(&offset.to_be_bytes());
}

/// A complete chunk with no payload (NBD_REPLY_TYPE_NONE, DONE).
pub fn chunk_none(cookie: u64) -> Vec<u8> {
    let mut out = vec![0u8; CHUNK_HEADER_LEN];
    write_chunk_header(&mut out, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0);
    out
}

/// A complete NBD_REPLY_TYPE_ERROR chunk (DONE) with a human message.
pub fn chunk_error(cookie: u64, error: u32, message: &str) -> Vec<u8> {
    // Messages are capped well below the 4096-byte string limit.
    let msg = &message.as_bytes()[..message.len().min(1024)];
    let mut out = vec![0u8; CHUNK_HEADER_LEN];
    write_chunk_header(&mut out, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie, 6 + msg.len() as u32);
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
    out
}

/// One base:allocation descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    pub length: u32,
    pub flags: u32,
}

/// A complete NBD_REPLY_TYPE_BLOCK_STATUS chunk (DONE).
pub fn chunk_block_status(cookie: u64, context_id: u32, descriptors: &[Descriptor]) -> Vec<u8> {
    let mut out = Vec::new();
    append_block_status(&mut out, cookie, context_id, descriptors, true);
    out
}

/// One block-status chunk per selected context, in order, as one reply:
/// proto.md wants exactly one chunk per negotiated context, and only the
/// last chunk of a reply carries DONE.
pub fn block_status_reply(cookie: u64, chunks: &[(u32, Vec<Descriptor>)]) -> Vec<u8> {
    let size: usize = chunks.iter().map(|(_, d)| CHUNK_HEADER_LEN + 4 + 8 * d.len()).sum();
    let mut out = Vec::with_capacity(size);
    for (i, (id, descriptors)) in chunks.iter().enumerate() {
        append_block_status(&mut out, cookie, *id, descriptors, i + 1 == chunks.len());
    }
    out
}

/// Appends one NBD_REPLY_TYPE_BLOCK_STATUS chunk to `out`.
fn append_block_status(out: &mut Vec<u8>, cookie: u64, context_id: u32, descriptors: &[Descriptor], done: bool) {
    let len = 4 + 8 * descriptors.len();
    let start = out.len();
    out.resize(start + CHUNK_HEADER_LEN, 0);
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    write_chunk_header(&mut out[start..], flags, REPLY_TYPE_BLOCK_STATUS, cookie, len as u32);
    out.reserve(len);
    out.extend_from_slice(&context_id.to_be_bytes());
    for d in descriptors {
        out.extend_from_slice(&d.length.to_be_bytes());
        out.extend_from_slice(&d.flags.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_header_round_trip() {
        let h = RequestHeader { flags: CMD_FLAG_FUA, command: CMD_WRITE, cookie: 7, offset: 4096, length: 512 };
        assert_eq!(decode_request_header(&h.encode()).unwrap(), h);
        assert_eq!(h.payload_len(), 512);
    }

    #[test]
    fn short_and_bad_headers() {
        assert_eq!(decode_request_header(&[0u8; 5]), Err(DecodeError::Incomplete(23)));
        assert!(matches!(decode_request_header(&[0u8; 28]), Err(DecodeError::BadMagic(0))));
    }

    #[test]
    fn block_status_reply_has_one_chunk_per_context_and_done_on_the_last() {
        let a = vec![Descriptor { length: 4096, flags: STATE_HOLE | STATE_ZERO }, Descriptor { length: 512, flags: 0 }];
        let b = vec![Descriptor { length: 4608, flags: STATE_DIRTY }];
        let out = block_status_reply(7, &[(1, a.clone()), (2, b.clone())]);
        let first = CHUNK_HEADER_LEN + 4 + 16;
        assert_eq!(out.len(), first + CHUNK_HEADER_LEN + 4 + 8);
        // First chunk: not DONE, type BLOCK_STATUS, cookie, length, id 1.
        assert_eq!(&out[..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&out[4..6], &0u16.to_be_bytes());
        assert_eq!(&out[6..8], &REPLY_TYPE_BLOCK_STATUS.to_be_bytes());
        assert_eq!(&out[8..16], &7u64.to_be_bytes());
        assert_eq!(&out[16..20], &20u32.to_be_bytes());
        assert_eq!(&out[20..24], &1u32.to_be_bytes());
        assert_eq!(&out[24..28], &4096u32.to_be_bytes());
        assert_eq!(&out[28..32], &3u32.to_be_bytes());
        // Second chunk: DONE, id 2, one dirty descriptor.
        let c = &out[first..];
        assert_eq!(&c[4..6], &REPLY_FLAG_DONE.to_be_bytes());
        assert_eq!(&c[16..20], &12u32.to_be_bytes());
        assert_eq!(&c[20..24], &2u32.to_be_bytes());
        assert_eq!(&c[24..28], &4608u32.to_be_bytes());
        assert_eq!(&c[28..32], &STATE_DIRTY.to_be_bytes());
        // A single context is the old single DONE chunk.
        assert_eq!(block_status_reply(7, &[(1, a.clone())]), chunk_block_status(7, 1, &a));
    }

    #[test]
    fn error_chunk_layout() {
        let c = chunk_error(9, 22, "bad");
        assert_eq!(c.len(), 20 + 6 + 3);
        assert_eq!(&c[16..20], &9u32.to_be_bytes());
    }
}
