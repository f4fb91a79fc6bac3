//! Structure-aware inputs: sessions a client could send, and the odd ones
//! it should not: valid options mixed with unknown ones, INFO/GO with odd
//! info requests, META_CONTEXT with odd queries, STARTTLS anywhere,
//! oversized lengths, truncated payloads, bad magic, random bytes, then
//! transmission requests after GO. Names and contexts come from the
//! fixture, so lookups hit as often as they miss.

use crate::mutate::Rng;
use nbdvirt::fuzzing::fixture::{tracker_name, TRACKERS, VOLUMES};
use nbdvirt::nbd::*;

fn string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s);
}

fn option(out: &mut Vec<u8>, option: u32, payload: &[u8]) {
    out.extend_from_slice(&encode_option(option, payload));
}

/// An export name: the fixture's, the default, unknown, too long, odd.
fn name(r: &mut Rng) -> Vec<u8> {
    match r.below(12) {
        0..=5 => r.pick(&VOLUMES).0.as_bytes().to_vec(),
        6 | 7 => Vec::new(),
        8 => b"missing".to_vec(),
        9 => vec![b'a'; r.pick(&[5, 4096, 4097])],
        10 => vec![0xff, 0xfe, b'o'],
        _ => r.noise(0, 8),
    }
}

/// An INFO/GO payload, sometimes with many duplicate or unknown requests,
/// sometimes with a count that does not match.
fn info(r: &mut Rng) -> Vec<u8> {
    let mut d = Vec::new();
    string(&mut d, &name(r));
    let requests: Vec<u16> = match r.below(10) {
        0 => vec![r.pick(&[INFO_NAME, INFO_DESCRIPTION]); r.pick(&[2, 100, 20_000, 32_000])],
        1 => (0..r.below(6)).map(|_| r.u16()).collect(),
        _ => (0..r.below(5)).map(|_| r.pick(&[INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE, 4])).collect(),
    };
    let count = if r.one_in(12) { r.u16() } else { requests.len() as u16 };
    d.extend_from_slice(&count.to_be_bytes());
    for i in requests {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

fn query(r: &mut Rng) -> Vec<u8> {
    match r.below(12) {
        0..=2 => META_BASE_ALLOCATION.into(),
        3 => b"base:".to_vec(),
        4 => META_QEMU_NAMESPACE.into(),
        5 => META_DIRTY_BITMAP_PREFIX.into(),
        6..=8 => format!("{META_DIRTY_BITMAP_PREFIX}{}", tracker_name(r.below(TRACKERS + 3))).into_bytes(),
        9 => r.pick(&[&b""[..], b"x-foo:bar", b"base:allocation\0", b"qemu:allocation-depth"]).to_vec(),
        10 => vec![b'q'; r.pick(&[4096, 4097])],
        _ => r.noise(0, 10),
    }
}

/// A META_CONTEXT payload: a few queries, every bitmap at once (more than
/// SET may select), a count that lies, trailing bytes.
fn meta(r: &mut Rng) -> Vec<u8> {
    let mut d = Vec::new();
    string(&mut d, &name(r));
    let queries: Vec<Vec<u8>> = if r.one_in(8) {
        (0..TRACKERS).map(|i| format!("{META_DIRTY_BITMAP_PREFIX}{}", tracker_name(i)).into_bytes()).collect()
    } else {
        (0..r.below(5)).map(|_| query(r)).collect()
    };
    let count = if r.one_in(12) { r.u32() } else { queries.len() as u32 };
    d.extend_from_slice(&count.to_be_bytes());
    for q in queries {
        string(&mut d, &q);
    }
    if r.one_in(16) {
        d.push(0);
    }
    d
}

/// A payload for options that take none: mostly none.
fn empty_or_junk(r: &mut Rng) -> Vec<u8> {
    if r.one_in(8) {
        r.noise(1, 8)
    } else {
        Vec::new()
    }
}

/// Appends one option (or something in its place); false ends the session
/// (a truncated message cannot be followed).
fn one_option(r: &mut Rng, out: &mut Vec<u8>) -> bool {
    match r.below(22) {
        0 | 1 => option(out, OPT_STRUCTURED_REPLY, &empty_or_junk(r)),
        2 => option(out, OPT_LIST, &empty_or_junk(r)),
        3 | 4 => option(out, OPT_STARTTLS, &empty_or_junk(r)),
        5 | 6 => option(out, OPT_INFO, &info(r)),
        7..=9 => option(out, OPT_GO, &info(r)),
        10 | 11 => option(out, OPT_LIST_META_CONTEXT, &meta(r)),
        12 | 13 => option(out, OPT_SET_META_CONTEXT, &meta(r)),
        14 => option(out, OPT_EXPORT_NAME, &name(r)),
        15 => option(out, OPT_ABORT, &empty_or_junk(r)),
        16 => {
            let any = r.u32();
            let id = r.pick(&[0, 4, OPT_EXTENDED_HEADERS, 12, 0x8000_0001, any]);
            let junk = r.noise(0, 24);
            option(out, id, &junk);
        }
        17 => {
            // A length over the limits, followed by that much or less.
            let len = r.pick(&[513, MAX_OPTION_LEN + 1, 1 << 24, u32::MAX]);
            let any = r.u32();
            let id = r.pick(&[OPT_GO, OPT_EXPORT_NAME, OPT_LIST, any]);
            out.extend_from_slice(&encode_option(id, &[])[..12]);
            out.extend_from_slice(&len.to_be_bytes());
            let sent = (len as usize).min(r.pick(&[0, 100, 70_000]));
            out.resize(out.len() + sent, 0x5a);
            return sent == len as usize;
        }
        18 => {
            let mut whole = Vec::new();
            option(&mut whole, r.pick(&[OPT_GO, OPT_SET_META_CONTEXT, OPT_STARTTLS]), &info(r));
            let cut = 1 + r.below(whole.len());
            out.extend_from_slice(&whole[..whole.len() - cut]);
            return false;
        }
        19 => {
            let magic = r.u64().to_be_bytes();
            out.extend_from_slice(&magic);
            out.extend_from_slice(&[0, 0, 0, 7, 0, 0, 0, 0]);
        }
        _ => {
            let junk = r.noise(1, 40);
            out.extend_from_slice(&junk);
        }
    }
    true
}

/// Transmission requests, as a client sends them after GO.
fn requests(r: &mut Rng, out: &mut Vec<u8>) {
    for _ in 0..1 + r.below(8) {
        let command = if r.one_in(10) { r.u16() } else { r.below(8) as u16 };
        let flags = match r.below(4) {
            0 | 1 => 0,
            2 => 1 << r.below(5),
            _ => r.u16(),
        };
        let (any_offset, any_length) = (r.u64(), r.u32());
        let offset = r.pick(&[0, 4096, (1 << 20) - 4096, 1 << 20, (2 << 20) - 512, u64::MAX - 511, any_offset]);
        let length = r.pick(&[0, 1, 512, 4096, 65536, 1 << 20, MAX_PAYLOAD, MAX_PAYLOAD + 1, u32::MAX, any_length]);
        let header = RequestHeader { flags, command, cookie: r.u64(), offset, length };
        out.extend_from_slice(&header.encode());
        if command == CMD_WRITE {
            out.resize(out.len() + (length as usize).min(8192), 0xa5);
        }
        if r.one_in(20) {
            out.extend_from_slice(&r.noise(0, 28));
        }
    }
}

/// A whole handshake case: setup bytes (nbdvirt::fuzzing::setup), client
/// flags, options, maybe requests.
pub fn handshake(r: &mut Rng) -> Vec<u8> {
    // Stopping (bits 3-4) one time in 16; a client that stops reading
    // (bit 7) one time in 8.
    let server = r.u8() & 0x07 | if r.one_in(16) { 0x18 } else { 0 };
    let transport = r.u8() & 0x7f | if r.one_in(8) { 0x80 } else { 0 };
    let mut out = vec![server, transport];
    let flags = match r.below(16) {
        0 => r.u32(),
        1 => 0,
        2 => FLAG_C_FIXED_NEWSTYLE,
        _ => FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES,
    };
    out.extend_from_slice(&flags.to_be_bytes());
    for _ in 0..1 + r.below(8) {
        if !one_option(r, &mut out) {
            return out;
        }
    }
    if r.one_in(2) {
        requests(r, &mut out);
    }
    out
}

/// A decoder case: an option payload, a run of request headers, a header,
/// or noise.
pub fn decode(r: &mut Rng) -> Vec<u8> {
    match r.below(5) {
        0 => info(r),
        1 => meta(r),
        2 => {
            let mut out = Vec::new();
            requests(r, &mut out);
            out
        }
        3 => {
            let mut out = Vec::new();
            one_option(r, &mut out);
            out
        }
        _ => r.noise(0, 64),
    }
}
