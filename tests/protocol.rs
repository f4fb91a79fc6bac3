//! NBD protocol conformance, checked byte by byte with the raw test client
//! of tests/common/nbd_client.rs (std `UnixStream`, headers built by hand
//! rather than with the crate's encoders) against the real `nbdvirt` binary. The authority is
//! the NBD protocol document (doc/proto.md of NetworkBlockDevice/nbd).
//!
//! Every socket has a read and write timeout, so a server that hangs makes
//! the test fail instead of hanging it.
mod common;
use common::nbd_client::*;
use common::*;
use nbdvirt::nbd::{
    CMD_BLOCK_STATUS, CMD_CACHE, CMD_FLAG_DF, CMD_FLAG_FUA, CMD_FLAG_REQ_ONE, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE,
    CMD_WRITE_ZEROES, FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, INFO_BLOCK_SIZE, INFO_DESCRIPTION,
    INFO_NAME, OPT_ABORT, OPT_EXPORT_NAME, OPT_GO, OPT_INFO, OPT_LIST, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT,
    OPT_STRUCTURED_REPLY, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE, REP_ACK,
    REP_ERR_INVALID, REP_ERR_UNKNOWN, REP_ERR_UNSUP, REP_INFO, REP_SERVER, STATE_HOLE, STATE_ZERO, TFLAG_CAN_MULTI_CONN,
    TFLAG_HAS_FLAGS, TFLAG_READ_ONLY, TFLAG_SEND_CACHE, TFLAG_SEND_DF, TFLAG_SEND_FAST_ZERO, TFLAG_SEND_FLUSH, TFLAG_SEND_FUA,
    TFLAG_SEND_TRIM, TFLAG_SEND_WRITE_ZEROES,
};
use std::collections::HashMap;
use std::io::{ErrorKind, Read};
use std::time::Duration;

/// Size of export "v": two 8 MiB extents over distinct halves of backend "m".
const SIZE: u64 = 16 * MIB;
const BOUNDARY: u64 = 8 * MIB;
const RO_SIZE: u64 = MIB;

// NBD error numbers (proto.md, "Error values").
const EPERM: u32 = 1;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const EOVERFLOW: u32 = 75;

const CONFIG: &str = r#"
[[backend]]
name = "m"
memory = true
size = "16MiB"

[[backend]]
name = "r"
memory = true
size = "1MiB"

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

[[volume]]
name = "ro"
description = "read-only volume"
read_only = true
[[volume.extent]]
length = "1MiB"
backend = "r"
"#;

fn start() -> TestServer {
    TestServer::start(CONFIG)
}

// ---------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------

#[test]
fn greeting_is_fixed_newstyle_with_no_zeroes() {
    let server = start();
    let mut s = connect(&server);
    let g = read_n(&mut s, 18, "greeting");
    let mut want = Vec::new();
    want.extend_from_slice(b"NBDMAGIC");
    want.extend_from_slice(b"IHAVEOPT");
    want.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    assert_eq!(g, want);
    assert_eq!(&g[16..], &[0, 3]);
    // Nothing more is sent until the client speaks.
    s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let mut extra = [0u8; 1];
    match s.read(&mut extra) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("server sent more than the greeting: {other:?}"),
    }
}

#[test]
fn opt_list_returns_every_export_with_description() {
    let server = start();
    let mut h = Handshake::start(&server);
    let r = h.exchange(OPT_LIST, &[]);
    assert_eq!(r.last().unwrap().kind, REP_ACK);
    assert!(r.last().unwrap().data.is_empty(), "ACK with data");
    let mut exports: Vec<(String, String)> = r[..r.len() - 1]
        .iter()
        .map(|x| {
            assert_eq!(x.kind, REP_SERVER, "unexpected reply in LIST: {x:?}");
            let n = be32(&x.data) as usize;
            assert!(4 + n <= x.data.len(), "name length beyond reply");
            (String::from_utf8(x.data[4..4 + n].to_vec()).unwrap(), String::from_utf8(x.data[4 + n..].to_vec()).unwrap())
        })
        .collect();
    exports.sort();
    assert_eq!(
        exports,
        vec![("ro".to_string(), "read-only volume".to_string()), ("v".to_string(), "test volume".to_string())]
    );
    // LIST with data is refused, and haggling goes on.
    h.expect_error(OPT_LIST, b"junk", REP_ERR_INVALID);
    h.go("v").check_alive(1);
}

#[test]
fn unknown_option_is_unsupported_and_next_option_works() {
    let server = start();
    let mut h = Handshake::start(&server);
    h.expect_error(99, b"some payload bytes", REP_ERR_UNSUP);
    h.expect_error(0x7fff_0000, &[], REP_ERR_UNSUP);
    let r = h.exchange(OPT_LIST, &[]);
    assert_eq!(r.last().unwrap().kind, REP_ACK);
    h.go("v").check_alive(2);
}

#[test]
fn info_and_go_of_unknown_export_are_err_unknown() {
    let server = start();
    let mut h = Handshake::start(&server);
    h.expect_error(OPT_INFO, &info_payload("nope", &[INFO_NAME]), REP_ERR_UNKNOWN);
    h.expect_error(OPT_GO, &info_payload("nope", &[]), REP_ERR_UNKNOWN);
    // The empty name selects the default export (the first volume, "v").
    let r = h.exchange(OPT_INFO, &info_payload("", &[INFO_NAME]));
    check_info(&r, OPT_INFO, false, false);
    assert_eq!(info_string(&r, INFO_NAME).as_deref(), Some("v"), "canonical name of the default export");
    // A malformed INFO payload (name longer than the data) is ERR_INVALID.
    let mut bad = info_payload("v", &[]);
    bad[3] = 200;
    h.expect_error(OPT_INFO, &bad, REP_ERR_INVALID);
    // After a failed GO the client may go on haggling.
    h.go("v").check_alive(3);
}

fn check_info(r: &[OptReply], option: u32, structured: bool, read_only: bool) {
    assert_eq!(r.last().unwrap().kind, REP_ACK, "{r:?}");
    assert!(r.last().unwrap().data.is_empty());
    for x in &r[..r.len() - 1] {
        assert_eq!(x.kind, REP_INFO, "unexpected reply {x:?}");
        assert_eq!(x.option, option);
        assert!(x.data.len() >= 2);
    }
    let (size, flags) = info_export(r).expect("NBD_INFO_EXPORT missing");
    assert_eq!(size, if read_only { RO_SIZE } else { SIZE });
    let mut must = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_CACHE | TFLAG_CAN_MULTI_CONN;
    if read_only {
        must |= TFLAG_READ_ONLY;
    } else {
        must |= TFLAG_SEND_FUA | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO;
        assert_eq!(flags & TFLAG_READ_ONLY, 0, "writable export flagged read-only");
    }
    assert_eq!(flags & must, must, "flags {flags:#x} lack {:#x}", must & !flags);
    assert_eq!(flags & TFLAG_SEND_DF != 0, structured, "SEND_DF must be set exactly when structured replies were negotiated");
    // FAST_ZERO requires WRITE_ZEROES (proto.md).
    assert!(flags & TFLAG_SEND_FAST_ZERO == 0 || flags & TFLAG_SEND_WRITE_ZEROES != 0);
}

fn info_string(r: &[OptReply], info: u16) -> Option<String> {
    let v: Vec<_> = r.iter().filter(|x| x.kind == REP_INFO && be16(&x.data) == info).collect();
    assert!(v.len() <= 1, "info {info} sent twice");
    v.first().map(|x| String::from_utf8(x.data[2..].to_vec()).unwrap())
}

#[test]
fn info_reports_export_name_description_and_block_size() {
    let server = start();
    let mut h = Handshake::start(&server);
    let r = h.exchange(OPT_INFO, &info_payload("v", &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]));
    check_info(&r, OPT_INFO, false, false);
    assert_eq!(info_string(&r, INFO_NAME).as_deref(), Some("v"));
    assert_eq!(info_string(&r, INFO_DESCRIPTION).as_deref(), Some("test volume"));
    let bs: Vec<_> = r.iter().filter(|x| x.kind == REP_INFO && be16(&x.data) == INFO_BLOCK_SIZE).collect();
    assert_eq!(bs.len(), 1, "NBD_INFO_BLOCK_SIZE missing or repeated");
    assert_eq!(bs[0].data.len(), 14);
    assert_eq!((be32(&bs[0].data[2..]), be32(&bs[0].data[6..]), be32(&bs[0].data[10..])), (1, 4096, MAX_PAYLOAD));

    // Unknown info requests are ignored (proto.md: MUST ignore).
    let r = h.exchange(OPT_INFO, &info_payload("v", &[0x7777, INFO_NAME]));
    check_info(&r, OPT_INFO, false, false);

    // The read-only export says so.
    let r = h.exchange(OPT_INFO, &info_payload("ro", &[INFO_DESCRIPTION]));
    check_info(&r, OPT_INFO, false, true);
    assert_eq!(info_string(&r, INFO_DESCRIPTION).as_deref(), Some("read-only volume"));

    // After STRUCTURED_REPLY, SEND_DF appears.
    h.structured_reply();
    let r = h.exchange(OPT_INFO, &info_payload("v", &[]));
    check_info(&r, OPT_INFO, true, false);

    // GO repeats the same information and enters transmission.
    let r = h.exchange(OPT_GO, &info_payload("v", &[INFO_NAME, INFO_BLOCK_SIZE]));
    check_info(&r, OPT_GO, true, false);
    assert_eq!(info_string(&r, INFO_NAME).as_deref(), Some("v"));
    let (size, flags) = info_export(&r).unwrap();
    let mut c = Conn::new(h.s, true, size, flags);
    c.check_alive(4);
}

#[test]
fn go_enters_transmission() {
    let server = start();
    let mut h = Handshake::start(&server);
    let r = h.exchange(OPT_GO, &info_payload("v", &[]));
    check_info(&r, OPT_GO, false, false);
    let (size, flags) = info_export(&r).unwrap();
    let mut c = Conn::new(h.s, false, size, flags);
    // No padding after the ACK: the next bytes are the reply to our request.
    let o = c.request(0, CMD_READ, 0, 4096, &[]);
    assert!(o.simple);
    assert_eq!(o.error, 0);
    assert_eq!(o.data, vec![0u8; 4096]);
    c.check_alive(5);
}

#[test]
fn export_name_with_no_zeroes() {
    let server = start();
    let mut h = Handshake::start_with(&server, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    h.send_option(OPT_EXPORT_NAME, b"v");
    let r = read_n(&mut h.s, 10, "EXPORT_NAME reply");
    assert_eq!(be64(&r), SIZE);
    let flags = be16(&r[8..]);
    assert_ne!(flags & TFLAG_HAS_FLAGS, 0);
    assert_eq!(flags & TFLAG_SEND_DF, 0);
    // The 124 zero bytes are omitted: the next bytes are a reply.
    let mut c = Conn::new(h.s, false, SIZE, flags);
    c.check_alive(6);
}

#[test]
fn export_name_without_no_zeroes_sends_124_zero_bytes() {
    let server = start();
    let mut h = Handshake::start_with(&server, FLAG_C_FIXED_NEWSTYLE);
    h.send_option(OPT_EXPORT_NAME, b"ro");
    let r = read_n(&mut h.s, 10 + 124, "EXPORT_NAME reply");
    assert_eq!(be64(&r), RO_SIZE);
    assert_ne!(be16(&r[8..]) & TFLAG_READ_ONLY, 0);
    assert_eq!(&r[10..], &[0u8; 124][..]);
    let mut c = Conn::new(h.s, false, RO_SIZE, be16(&r[8..]));
    c.check_alive(7);
}

#[test]
fn export_name_with_structured_reply() {
    let server = start();
    let mut h = Handshake::start(&server);
    h.structured_reply();
    h.send_option(OPT_EXPORT_NAME, b"v");
    let r = read_n(&mut h.s, 10, "EXPORT_NAME reply");
    let flags = be16(&r[8..]);
    assert_ne!(flags & TFLAG_SEND_DF, 0, "SEND_DF after structured replies");
    let mut c = Conn::new(h.s, true, SIZE, flags);
    let o = c.request(0, CMD_READ, 0, 512, &[]);
    assert!(!o.simple && o.error == 0);
}

#[test]
fn export_name_of_unknown_export_closes() {
    let server = start();
    let mut h = Handshake::start(&server);
    h.send_option(OPT_EXPORT_NAME, b"no-such-export");
    expect_closed(&mut h.s, "EXPORT_NAME of an unknown export");
    let mut server = server;
    server.assert_alive();
    open(&server, "v", false).check_alive(8);
}

#[test]
fn abort_is_acked_then_closed() {
    let server = start();
    let mut h = Handshake::start(&server);
    let r = h.exchange(OPT_ABORT, &[]);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].kind, REP_ACK);
    assert!(r[0].data.is_empty());
    expect_closed(&mut h.s, "after NBD_OPT_ABORT");
}

#[test]
fn structured_reply_with_payload_is_invalid() {
    let server = start();
    let mut h = Handshake::start(&server);
    h.expect_error(OPT_STRUCTURED_REPLY, b"x", REP_ERR_INVALID);
    // Refused, so not negotiated: INFO does not offer DF.
    let r = h.exchange(OPT_INFO, &info_payload("v", &[]));
    check_info(&r, OPT_INFO, false, false);
    h.structured_reply();
    let mut c = h.go("v");
    let o = c.request(0, CMD_READ, 0, 512, &[]);
    assert!(!o.simple, "structured replies were negotiated");
}

#[test]
fn set_meta_context_before_structured_reply_is_invalid() {
    let server = start();
    let mut h = Handshake::start(&server);
    h.expect_error(OPT_SET_META_CONTEXT, &meta_payload("v", &["base:allocation"]), REP_ERR_INVALID);
    h.structured_reply();
    assert_eq!(h.set_meta("v", &["base:allocation"]).len(), 1);
}

#[test]
fn list_meta_context_queries() {
    let server = start();
    let mut h = Handshake::start(&server);
    h.structured_reply();
    // Zero queries: everything available.
    let r = h.exchange(OPT_LIST_META_CONTEXT, &meta_payload("v", &[]));
    assert_eq!(r.last().unwrap().kind, REP_ACK);
    let names: Vec<_> = contexts(&r).into_iter().map(|(_, n)| n).collect();
    assert_eq!(names, vec!["base:allocation"]);
    // A namespace query selects the namespace.
    let r = h.exchange(OPT_LIST_META_CONTEXT, &meta_payload("v", &["base:"]));
    assert_eq!(r.last().unwrap().kind, REP_ACK);
    let names: Vec<_> = contexts(&r).into_iter().map(|(_, n)| n).collect();
    assert_eq!(names, vec!["base:allocation"]);
    // Unknown contexts and namespaces are not returned (MUST be ignored).
    let r = h.exchange(OPT_LIST_META_CONTEXT, &meta_payload("v", &["qemu:dirty-bitmap:x", "nope:thing", "base:nothing"]));
    assert_eq!(r.len(), 1, "unknown contexts returned: {r:?}");
    assert_eq!(r[0].kind, REP_ACK);
    // Unknown export.
    h.expect_error(OPT_LIST_META_CONTEXT, &meta_payload("nope", &[]), REP_ERR_UNKNOWN);
    // A query whose length runs past the option data is ERR_INVALID (MUST).
    let mut bad = meta_payload("v", &["base:allocation"]);
    let n = bad.len();
    bad[n - 16] = 1; // query length 0x0100000f
    h.expect_error(OPT_LIST_META_CONTEXT, &bad, REP_ERR_INVALID);
    h.go("v").check_alive(9);
}

#[test]
fn set_meta_context_then_block_status() {
    let server = start();
    let mut h = Handshake::start(&server);
    h.structured_reply();
    let ctx = h.set_meta("v", &["nope:thing", "base:allocation"]);
    assert_eq!(ctx.len(), 1, "{ctx:?}");
    assert_eq!(ctx[0].1, "base:allocation");
    let id = ctx[0].0;
    let mut c = h.go("v");

    // Data written at 0..4096; the rest of the first 64 KiB was never written.
    c.write(0, &pattern(10, 4096));
    let len = 64 * 1024;
    let o = c.request(0, CMD_BLOCK_STATUS, 0, len, &[]);
    assert_eq!(o.error, 0, "{o:?}");
    let status: Vec<_> = o.chunks.iter().filter(|x| x.kind == REPLY_TYPE_BLOCK_STATUS).collect();
    assert_eq!(status.len(), 1, "exactly one status chunk per context");
    assert!(o.chunks.last().unwrap().flags & REPLY_FLAG_DONE != 0);
    let (got_id, d) = descriptors(status[0]);
    assert_eq!(got_id, id, "BLOCK_STATUS uses the context id agreed in SET_META_CONTEXT");
    check_descriptors(&d, len, false);
    // The written block is data: not reported as reading as zeros.
    assert_eq!(d[0].1 & (STATE_HOLE | STATE_ZERO), 0, "written data reported as hole/zero: {d:?}");
    let mut pos = 0u64;
    for &(l, f) in &d {
        if pos < 4096 {
            assert_eq!(f & STATE_ZERO, 0, "written range reported zero: {d:?}");
        }
        pos += l as u64;
    }

    // REQ_ONE: exactly one descriptor, not longer than the request.
    let o = c.request(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 0, len, &[]);
    assert_eq!(o.error, 0);
    let (got_id, d) = descriptors(o.chunks.iter().find(|x| x.kind == REPLY_TYPE_BLOCK_STATUS).unwrap());
    assert_eq!(got_id, id);
    assert_eq!(d.len(), 1, "REQ_ONE must return exactly one descriptor: {d:?}");
    check_descriptors(&d, len, true);

    // Across the extent boundary, with and without REQ_ONE.
    for flags in [0, CMD_FLAG_REQ_ONE] {
        let o = c.request(flags, CMD_BLOCK_STATUS, BOUNDARY - 8192, 16384, &[]);
        assert_eq!(o.error, 0);
        let (_, d) = descriptors(o.chunks.iter().find(|x| x.kind == REPLY_TYPE_BLOCK_STATUS).unwrap());
        check_descriptors(&d, 16384, flags != 0);
    }
    // Length 0: behaviour unspecified, but the server SHOULD NOT disconnect.
    let _ = c.request(0, CMD_BLOCK_STATUS, 0, 0, &[]);
    c.check_alive(12);
    // Past the end is EINVAL.
    c.expect_error(0, CMD_BLOCK_STATUS, SIZE - 4096, 8192, &[], EINVAL, "BLOCK_STATUS past the end");
}

/// BLOCK_STATUS remembers the data run it last found (backend/allocation.rs):
/// a TRIM or WRITE_ZEROES that punches a hole inside that run must still
/// show as a hole at once, and a write into a hole as data.
#[test]
fn block_status_follows_punched_holes_and_new_writes() {
    let server = start();
    let mut h = Handshake::start(&server);
    h.structured_reply();
    h.set_meta("v", &["base:allocation"]);
    let mut c = h.go("v");
    let status = |c: &mut Conn, len: u32| -> Vec<(u32, u32)> {
        let o = c.request(0, CMD_BLOCK_STATUS, 0, len, &[]);
        assert_eq!(o.error, 0, "{o:?}");
        descriptors(o.chunks.iter().find(|x| x.kind == REPLY_TYPE_BLOCK_STATUS).unwrap()).1
    };
    let hole = STATE_HOLE | STATE_ZERO;
    c.write(0, &pattern(11, 64 * 1024));
    assert_eq!(status(&mut c, 64 * 1024), [(64 * 1024, 0)], "written range is data");
    assert_eq!(status(&mut c, 64 * 1024), [(64 * 1024, 0)], "asked again (from the remembered run)");
    let o = c.request(0, CMD_TRIM, 16 * 1024, 16 * 1024, &[]);
    assert_eq!(o.error, 0, "{o:?}");
    assert_eq!(status(&mut c, 64 * 1024), [(16 * 1024, 0), (16 * 1024, hole), (32 * 1024, 0)], "TRIM punched a hole");
    let o = c.request(0, CMD_WRITE_ZEROES, 48 * 1024, 16 * 1024, &[]);
    assert_eq!(o.error, 0, "{o:?}");
    assert_eq!(status(&mut c, 64 * 1024), [(16 * 1024, 0), (16 * 1024, hole), (16 * 1024, 0), (16 * 1024, hole)], "WRITE_ZEROES punched one");
    c.write(16 * 1024, &pattern(12, 16 * 1024));
    assert_eq!(status(&mut c, 64 * 1024), [(48 * 1024, 0), (16 * 1024, hole)], "a write fills the hole");
}

fn check_descriptors(d: &[(u32, u32)], req_len: u32, req_one: bool) {
    assert!(!d.is_empty(), "no descriptors");
    assert!(d.iter().all(|x| x.0 > 0), "zero-length descriptor: {d:?}");
    assert!(d.iter().all(|x| x.1 & !(STATE_HOLE | STATE_ZERO) == 0), "unknown status bits: {d:?}");
    let head: u64 = d[..d.len() - 1].iter().map(|x| x.0 as u64).sum();
    assert!(head < req_len as u64, "descriptors before the last exceed the request: {d:?}");
    if req_one {
        assert_eq!(d.len(), 1);
        assert!(d[0].0 <= req_len, "REQ_ONE descriptor longer than the request: {d:?}");
    }
}

#[test]
fn block_status_without_a_context_is_einval() {
    let server = start();
    // Structured, but no SET_META_CONTEXT.
    let mut c = open(&server, "v", true);
    c.expect_error(0, CMD_BLOCK_STATUS, 0, 4096, &[], EINVAL, "BLOCK_STATUS without a context");
    // Not even structured.
    let mut c = open(&server, "v", false);
    c.expect_error(0, CMD_BLOCK_STATUS, 0, 4096, &[], EINVAL, "BLOCK_STATUS without structured replies");
    // Context set for another export than the one entered.
    let mut h = Handshake::start(&server);
    h.structured_reply();
    assert_eq!(h.set_meta("ro", &["base:allocation"]).len(), 1);
    let mut c = h.go("v");
    c.expect_error(0, CMD_BLOCK_STATUS, 0, 4096, &[], EINVAL, "BLOCK_STATUS with a context of another export");
}

/// proto.md: SET_META_CONTEXT "replaces all previously-set metadata
/// contexts (including when this command fails)". After a failed SET,
/// no context is active, so BLOCK_STATUS has none to report.
#[test]
fn failed_set_meta_context_clears_previous_contexts() {
    let server = start();
    let mut h = Handshake::start(&server);
    h.structured_reply();
    assert_eq!(h.set_meta("v", &["base:allocation"]).len(), 1);
    // Selecting nothing replaces the selection with nothing.
    let r = h.exchange(OPT_SET_META_CONTEXT, &meta_payload("v", &["nope:x"]));
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].kind, REP_ACK);
    let mut c = h.go("v");
    c.expect_error(0, CMD_BLOCK_STATUS, 0, 4096, &[], EINVAL, "BLOCK_STATUS after selecting no context");

    let mut h = Handshake::start(&server);
    h.structured_reply();
    assert_eq!(h.set_meta("v", &["base:allocation"]).len(), 1);
    // A failing SET (unknown export) also clears the selection.
    h.expect_error(OPT_SET_META_CONTEXT, &meta_payload("nope", &["base:allocation"]), REP_ERR_UNKNOWN);
    let mut c = h.go("v");
    c.expect_error(0, CMD_BLOCK_STATUS, 0, 4096, &[], EINVAL, "BLOCK_STATUS after a failed SET_META_CONTEXT");
}

// ---------------------------------------------------------------------------
// Transmission
// ---------------------------------------------------------------------------

#[test]
fn structured_read_covers_the_range_and_ends_with_done() {
    let server = start();
    let mut c = open(&server, "v", true);
    let off = BOUNDARY - 96 * 1024;
    let data = pattern(11, 256 * 1024);
    c.write(off, &data);
    for (o, l) in [(off, 256 * 1024u32), (BOUNDARY - 1, 2), (0, 1), (SIZE - 4096, 4096), (off + 1000, 100_000)] {
        let out = c.request(0, CMD_READ, o, l, &[]);
        assert_eq!(out.error, 0);
        assert!(!out.simple);
        assert!(!out.chunks.is_empty());
        let last = out.chunks.last().unwrap();
        assert!(last.flags & REPLY_FLAG_DONE != 0, "last chunk lacks DONE");
        assert!(out.chunks[..out.chunks.len() - 1].iter().all(|x| x.flags & REPLY_FLAG_DONE == 0), "DONE before the last chunk");
        assert!(out.chunks.iter().any(|x| x.kind == REPLY_TYPE_OFFSET_DATA || x.kind == REPLY_TYPE_OFFSET_HOLE));
        // Compare with what was written (zeros elsewhere).
        let want: Vec<u8> = (o..o + l as u64)
            .map(|p| if p >= off && p < off + data.len() as u64 { data[(p - off) as usize] } else { 0 })
            .collect();
        assert!(out.data == want, "structured READ {o}+{l} returned wrong data");
    }
    // DF: at most one content chunk.
    let out = c.request(CMD_FLAG_DF, CMD_READ, off, 256 * 1024, &[]);
    assert_eq!(out.error, 0);
    let content = out.chunks.iter().filter(|x| x.kind == REPLY_TYPE_OFFSET_DATA || x.kind == REPLY_TYPE_OFFSET_HOLE).count();
    assert_eq!(content, 1, "DF read must use one content chunk");
    assert_eq!(out.data, data);
}

#[test]
fn simple_replies_when_structured_not_negotiated() {
    let server = start();
    let mut c = open(&server, "v", false);
    c.write(4096, &pattern(12, 8192));
    let o = c.request(0, CMD_READ, 4096, 8192, &[]);
    assert!(o.simple && o.error == 0);
    assert_eq!(o.data, pattern(12, 8192));
    for (cmd, off, len) in [(CMD_FLUSH, 0, 0), (CMD_TRIM, 0, 4096), (CMD_WRITE_ZEROES, 8192, 4096), (CMD_CACHE, 0, 4096)] {
        let o = c.request(0, cmd, off, len, &[]);
        assert!(o.simple, "command {cmd}: not a simple reply");
        assert_eq!(o.error, 0, "command {cmd} failed");
    }
    // A zero-length read is refused (EINVAL, as nbdkit) with a simple reply.
    let o = c.request(0, CMD_READ, 0, 0, &[]);
    assert!(o.simple && o.error == 22 && o.data.is_empty(), "{o:?}");
    // WRITE_ZEROES did zero.
    assert_eq!(c.read(8192, 4096), vec![0u8; 4096]);
}

#[test]
fn read_crossing_the_extent_boundary() {
    let server = start();
    for structured in [false, true] {
        let mut c = open(&server, "v", structured);
        let off = BOUNDARY - 5000;
        let data = pattern(13 + structured as u64, 12_345);
        c.write(off, &data);
        assert_eq!(c.read(off, data.len() as u32), data);
        // Piecewise reads agree with the whole.
        let a = c.read(off, 5000);
        let b = c.read(BOUNDARY, 12_345 - 5000);
        assert_eq!([a, b].concat(), data);
        // The extents map to distinct store ranges: the start of each is independent.
        c.write(0, &pattern(20, 512));
        c.write(BOUNDARY + 64 * 1024, &pattern(21, 512));
        assert_eq!(c.read(0, 512), pattern(20, 512));
        assert_eq!(c.read(BOUNDARY + 64 * 1024, 512), pattern(21, 512));
        // Whole-export read: 16 MiB in one request, under the 32 MiB limit.
        assert_eq!(c.size, SIZE);
        let all = c.read(0, c.size as u32);
        assert_eq!(&all[off as usize..off as usize + data.len()], &data[..]);
    }
}

fn pipeline(structured: bool) {
    let server = start();
    let mut c = open(&server, "v", structured);
    // Region A (read during the pipeline) is written first; region B is
    // written by the pipeline. Requests in flight have no ordering, so
    // reads never touch what is being written.
    let a_off = BOUNDARY - 32 * 1024; // crosses the boundary
    let a = pattern(30, 64 * 1024);
    c.write(a_off, &a);
    let b_off = 2 * MIB;
    let mut expect = HashMap::new();
    let mut writes = HashMap::new();
    for i in 0..64u64 {
        let cookie = 0xDEAD_0000_0000_0000 | (i * 0x0001_0003_0000_0007);
        if i % 2 == 0 {
            let block = pattern(100 + i, 4096 + (i as usize % 3) * 512);
            let off = b_off + i * 8192;
            c.send(if i % 4 == 0 { CMD_FLAG_FUA } else { 0 }, CMD_WRITE, cookie, off, block.len() as u32, &block);
            writes.insert(off, block);
            expect.insert(cookie, None);
        } else {
            let off = a_off + (i * 1000) % 32768;
            let len = 1 + (i * 997) % 32768;
            c.send(0, CMD_READ, cookie, off, len as u32, &[]);
            let s = (off - a_off) as usize;
            expect.insert(cookie, Some(a[s..s + len as usize].to_vec()));
        }
    }
    let mut seen = std::collections::HashSet::new();
    for _ in 0..64 {
        let (cookie, o) = c.next();
        assert!(seen.insert(cookie), "cookie {cookie:#x} answered twice");
        assert_eq!(o.error, 0, "request {cookie:#x} failed: {o:?}");
        match expect.get(&cookie).unwrap_or_else(|| panic!("reply for unknown cookie {cookie:#x}")) {
            Some(want) => assert!(&o.data == want, "READ {cookie:#x} returned wrong data"),
            None => assert!(o.data.is_empty()),
        }
    }
    assert_eq!(seen.len(), 64);
    assert!(c.pending.is_empty());
    for (off, block) in writes {
        assert_eq!(c.read(off, block.len() as u32), block, "pipelined WRITE at {off} not stored");
    }
    // Nothing extra is pending on the wire.
    c.s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut b = [0u8; 1];
    match c.s.read(&mut b) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("unexpected extra reply bytes: {other:?}"),
    }
}

#[test]
fn pipelined_requests_each_answered_once_simple() {
    pipeline(false);
}

#[test]
fn pipelined_requests_each_answered_once_structured() {
    pipeline(true);
}

fn error_codes(structured: bool) {
    let server = start();
    let mut c = open(&server, "v", structured);
    let w = pattern(40, 4096);
    c.expect_error(0, 42, 0, 0, &[], EINVAL, "unknown command");
    c.expect_error(0, 0xffff, 0, 4096, &[], EINVAL, "unknown command 0xffff");
    c.expect_error(1 << 12, CMD_READ, 0, 4096, &[], EINVAL, "unknown flag bit on READ");
    c.expect_error(1 << 9, CMD_FLUSH, 0, 0, &[], EINVAL, "unknown flag bit on FLUSH");
    c.expect_error(1 << 13, CMD_WRITE, 0, 4096, &w, EINVAL, "unknown flag bit on WRITE (payload consumed)");
    if !structured {
        c.expect_error(CMD_FLAG_DF, CMD_READ, 0, 4096, &[], EINVAL, "DF without structured replies");
    }
    c.expect_error(0, CMD_WRITE, SIZE - 2048, 4096, &w, ENOSPC, "WRITE past the end (payload consumed)");
    c.expect_error(0, CMD_WRITE, SIZE, 4096, &w, ENOSPC, "WRITE at the end");
    c.expect_error(0, CMD_READ, SIZE - 2048, 4096, &[], EINVAL, "READ past the end");
    c.expect_error(0, CMD_READ, u64::MAX - 100, 4096, &[], EINVAL, "READ whose end overflows u64");
    c.expect_error(0, CMD_TRIM, u64::MAX - 100, 4096, &[], EINVAL, "TRIM whose end overflows u64");
    c.expect_error(0, CMD_FLUSH, 0, 4096, &[], EINVAL, "FLUSH with a length");
    // Nothing was written by the refused writes.
    assert_eq!(c.read(SIZE - 2048, 2048), vec![0u8; 2048]);
    assert_eq!(c.read(0, 4096), vec![0u8; 4096], "refused WRITE at 0 stored data");
    // A valid request still works after all of that.
    c.check_alive(41);
}

#[test]
fn error_codes_simple() {
    error_codes(false);
}

#[test]
fn error_codes_structured() {
    error_codes(true);
}

/// proto.md, NBD_CMD_WRITE_ZEROES: "The server SHOULD return NBD_ENOSPC if
/// it receives a write zeroes request including one or more sectors beyond
/// the size of the device" (like WRITE; TRIM and READ get EINVAL).
#[test]
fn write_zeroes_past_the_end_is_enospc() {
    let server = start();
    for structured in [false, true] {
        let mut c = open(&server, "v", structured);
        c.expect_error(0, CMD_WRITE_ZEROES, SIZE - 2048, 4096, &[], ENOSPC, "WRITE_ZEROES past the end");
        c.expect_error(0, CMD_TRIM, SIZE - 2048, 4096, &[], EINVAL, "TRIM past the end");
    }
}

#[test]
fn writes_to_read_only_export_are_eperm() {
    let server = start();
    for structured in [false, true] {
        let mut c = open(&server, "ro", structured);
        assert_ne!(c.flags & TFLAG_READ_ONLY, 0);
        c.expect_error(0, CMD_WRITE, 0, 4096, &pattern(50, 4096), EPERM, "WRITE to a read-only export (payload consumed)");
        c.expect_error(0, CMD_TRIM, 0, 4096, &[], EPERM, "TRIM on a read-only export");
        c.expect_error(0, CMD_WRITE_ZEROES, 0, 4096, &[], EPERM, "WRITE_ZEROES on a read-only export");
        assert_eq!(c.read(0, 4096), vec![0u8; 4096]);
        assert_eq!(c.request(0, CMD_FLUSH, 0, 0, &[]).error, 0);
    }
}

#[test]
fn oversized_write_is_einval_and_connection_survives() {
    let server = start();
    for structured in [false, true] {
        let mut c = open(&server, "v", structured);
        // Above max_request (64 MiB by default, although 32 MiB is
        // advertised): refused whatever the export's size.
        let len = MAX_REQUEST + MIB as u32;
        let big = vec![0xA5u8; len as usize];
        c.expect_error(0, CMD_WRITE, 0, len, &big, EINVAL, "65 MiB WRITE");
        // Nothing of it was written.
        assert_eq!(c.read(0, 4096), vec![0u8; 4096]);
        // Exactly max_request is allowed by size but not by the 16 MiB export.
        let max = vec![0x5Au8; MAX_REQUEST as usize];
        c.expect_error(0, CMD_WRITE, 0, MAX_REQUEST, &max, ENOSPC, "64 MiB WRITE beyond a 16 MiB export");
    }
}

#[test]
fn oversized_read() {
    let server = start();
    let mut c = open(&server, "v", true);
    let len = MAX_REQUEST + MIB as u32;
    c.expect_error(0, CMD_READ, 0, len, &[], EOVERFLOW, "structured 65 MiB READ");
    c.expect_error(CMD_FLAG_DF, CMD_READ, 0, len, &[], EOVERFLOW, "structured 65 MiB DF READ");
    let mut c = open(&server, "v", false);
    c.expect_error(0, CMD_READ, 0, len, &[], EINVAL, "simple 65 MiB READ");
}

/// proto.md, "Command flags": FUA "is valid for all commands, provided
/// NBD_FLAG_SEND_FUA has been negotiated, in which case the server MUST
/// accept all commands with this bit set (even by ignoring the bit)".
#[test]
fn fua_is_accepted_on_every_command() {
    let server = start();
    let mut h = Handshake::start(&server);
    h.structured_reply();
    h.set_meta("v", &["base:allocation"]);
    let mut c = h.go("v");
    assert_ne!(c.flags & TFLAG_SEND_FUA, 0);
    for (cmd, off, len) in
        [(CMD_WRITE_ZEROES, 0, 4096), (CMD_TRIM, 0, 4096), (CMD_READ, 0, 4096), (CMD_FLUSH, 0, 0), (CMD_CACHE, 0, 4096), (CMD_BLOCK_STATUS, 0, 4096)]
    {
        let o = c.request(CMD_FLAG_FUA, cmd, off, len, &[]);
        assert_eq!(o.error, 0, "command {cmd} with FUA refused: {o:?}");
    }
    c.check_alive(60);
}

#[test]
fn disc_closes_after_in_flight_replies() {
    let server = start();
    for structured in [false, true] {
        let mut c = open(&server, "v", structured);
        let mut cookies = Vec::new();
        for i in 0..16u64 {
            let ck = 0xD15C_0000 + i;
            let data = pattern(70 + i, 256 * 1024);
            c.send(0, CMD_WRITE, ck, 4 * MIB + i * 256 * 1024, data.len() as u32, &data);
            cookies.push(ck);
            let ck = 0xD15C_1000 + i;
            c.send(0, CMD_READ, ck, BOUNDARY - 512 * 1024 + i * 64 * 1024, 1024 * 1024, &[]);
            cookies.push(ck);
        }
        c.send(0, CMD_FLUSH, 0xD15C_2000, 0, 0, &[]);
        cookies.push(0xD15C_2000);
        c.disc();
        let mut seen = Vec::new();
        for _ in 0..cookies.len() {
            let (ck, o) = c.next();
            assert_eq!(o.error, 0, "{ck:#x}: {o:?}");
            seen.push(ck);
        }
        seen.sort();
        cookies.sort();
        assert_eq!(seen, cookies);
        expect_closed(&mut c.s, "after NBD_CMD_DISC");
        // The writes that were in flight were done.
        let mut c = open(&server, "v", false);
        assert_eq!(c.read(4 * MIB + 15 * 256 * 1024, 256 * 1024), pattern(85, 256 * 1024));
    }
}
