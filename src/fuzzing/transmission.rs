//! Transmission after GO: the script's remaining bytes go through what the
//! connection's reader does with them before any I/O (request header
//! decoding, WRITE payload framing, and `check_request`, the very checks
//! the reader runs), against what the handshake agreed. Executing the
//! requests needs the I/O pools and a socket for the reply sink; that part
//! is left to the integration tests (tests/protocol.rs, tests/hostile.rs).

use super::Violation;
use crate::nbd::*;
use crate::server::check_request;
use crate::server::handshake::Negotiated;

/// The server's default `max_request`, which the fuzzed connection has.
const MAX_REQUEST: u32 = crate::defaults::MAX_REQUEST as u32;

/// Runs the requests in `rest` through the decoder and the checks; the
/// verdict of every request must agree with the agreement `n`.
pub fn requests(mut rest: &[u8], n: &Negotiated, features: &mut Vec<u64>) -> Result<(), Violation> {
    loop {
        let header = match decode_request_header(rest) {
            Ok(h) => h,
            // The reader closes the connection on both.
            Err(DecodeError::Incomplete(_) | DecodeError::BadMagic(_)) => return Ok(()),
            Err(e) => return Err(Violation::new(format!("request header decoder: unexpected {e}"))),
        };
        if header.encode()[..] != rest[..REQUEST_HEADER_LEN] {
            return Err(Violation::new(format!("request header {header:?} does not re-encode to its bytes")));
        }
        rest = &rest[REQUEST_HEADER_LEN..];
        if header.command == CMD_DISC {
            return Ok(());
        }
        // The payload is read (or discarded) before any check: framing
        // survives whatever the answer.
        let payload = header.payload_len() as usize;
        let Some(after) = rest.get(payload..) else { return Ok(()) };
        rest = after;
        let verdict = check_request(&n.volume, n.structured, n.read_only, &n.meta, MAX_REQUEST, &header);
        judge(&header, &verdict, n)?;
        let code = verdict.as_ref().map_or_else(|(e, _)| e.code(), |()| 0);
        features.push(0x7e00_0000 | (header.command.min(16) as u64) << 8 | code as u64);
    }
}

/// The properties every verdict must have: an accepted request is one the
/// agreement allows, a refused one carries an error the protocol allows.
fn judge(h: &RequestHeader, verdict: &Result<(), (NbdError, String)>, n: &Negotiated) -> Result<(), Violation> {
    let fail = |why: &str| Err(Violation::new(format!("{h:?} {verdict:?}: {why} (read-only {}, structured {}, {} contexts)", n.read_only, n.structured, n.meta.selected.len())));
    let (err, msg) = match verdict {
        Ok(()) => return accepted(h, n).map_or(Ok(()), fail),
        Err(e) => e,
    };
    if !matches!(err, NbdError::Inval | NbdError::Perm | NbdError::NoSpc | NbdError::Overflow) {
        return fail("a check error outside EINVAL, EPERM, ENOSPC, EOVERFLOW");
    }
    if *err == NbdError::Overflow && !n.structured {
        return fail("EOVERFLOW without structured replies");
    }
    if msg.len() > 1024 {
        return fail("an error message longer than a chunk carries");
    }
    Ok(())
}

/// Why an accepted request should have been refused, if it should.
fn accepted(h: &RequestHeader, n: &Negotiated) -> Option<&'static str> {
    let writes = matches!(h.command, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    let fua = if n.read_only { 0 } else { CMD_FLAG_FUA };
    let end = h.offset.checked_add(h.length as u64);
    if !matches!(h.command, CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_CACHE | CMD_WRITE_ZEROES | CMD_BLOCK_STATUS) {
        Some("an unknown command")
    } else if h.flags & !(allowed_flags(h.command) | fua) != 0 {
        Some("a flag the command does not take")
    } else if h.flags & CMD_FLAG_DF != 0 && !n.structured {
        Some("DF without structured replies")
    } else if writes && n.read_only {
        Some("a write to a read-only export")
    } else if h.command == CMD_BLOCK_STATUS && (n.meta.is_empty() || !n.structured || h.length == 0) {
        Some("BLOCK_STATUS without contexts, structured replies or length")
    } else if h.command == CMD_FLUSH {
        (h.offset != 0 || h.length != 0).then_some("FLUSH with a range")
    } else if end.is_none_or(|e| e > n.volume.size()) {
        Some("a range past the end of the export")
    } else if matches!(h.command, CMD_READ | CMD_WRITE) && h.length > MAX_REQUEST {
        Some("a payload above max_request")
    } else if h.length == 0 && h.command != CMD_FLUSH {
        Some("a request of length 0")
    } else {
        None
    }
}
