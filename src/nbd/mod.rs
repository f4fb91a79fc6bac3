//! The NBD wire protocol as a pure codec: constants, option-haggling messages
//! and transmission-phase headers. Nothing here performs I/O or decides policy;
//! the `server` layer feeds bytes in and writes the bytes this module builds.
//! Every decoder takes untrusted input and returns an error instead of
//! panicking (see the proptest fuzz tests in `tests/codec_fuzz.rs`).

pub mod consts;
pub mod handshake;
pub mod transmission;

pub use consts::*;
pub use handshake::*;
pub use transmission::*;

/// A decoding failure. `Incomplete` is not an error of the peer: more bytes
/// are needed before a message can be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("need {0} more bytes")]
    Incomplete(usize),
    #[error("bad magic {0:#x}")]
    BadMagic(u64),
    #[error("malformed {what}: {why}")]
    Malformed { what: &'static str, why: String },
}

pub(crate) fn malformed(what: &'static str, why: impl Into<String>) -> DecodeError {
    DecodeError::Malformed { what, why: why.into() }
}

/// Big-endian cursor over a byte slice that never panics.
pub(crate) struct Cursor<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(buf: &'a [u8], what: &'static str) -> Self {
        Cursor { buf, what }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(malformed(self.what, format!("truncated: wanted {n} bytes, {} left", self.buf.len())));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().expect("len 2")))
    }
    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("len 4")))
    }
    /// A u32 length followed by that many bytes of UTF-8.
    pub(crate) fn string32(&mut self, max: usize) -> Result<String, DecodeError> {
        let len = self.u32()? as usize;
        if len > max {
            return Err(malformed(self.what, format!("string of {len} bytes exceeds {max}")));
        }
        let raw = self.take(len)?;
        String::from_utf8(raw.to_vec()).map_err(|_| malformed(self.what, "string is not UTF-8"))
    }
    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }
}
