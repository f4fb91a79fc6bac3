//! The forwarding handshake against scripted server output (what real
//! servers answer is covered by tests/remote_client.rs with nbdkit).

use super::*;
use std::io::Cursor;

/// A server that has already "sent" `input`; what the client writes is kept.
struct Scripted {
    input: Cursor<Vec<u8>>,
    output: Vec<u8>,
}

impl Read for Scripted {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Scripted {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn server(replies: &[Vec<u8>]) -> Scripted {
    let mut input = server_greeting().to_vec();
    for r in replies {
        input.extend_from_slice(r);
    }
    Scripted { input: Cursor::new(input), output: Vec::new() }
}

fn go_replies() -> Vec<Vec<u8>> {
    vec![rep_info_export(OPT_GO, 1 << 20, TFLAG_HAS_FLAGS | TFLAG_CAN_MULTI_CONN), rep_info_block_size(OPT_GO, 1, 4096, 1 << 20), option_reply(OPT_GO, REP_ACK, &[])]
}

fn with(mut first: Vec<Vec<u8>>, rest: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    first.extend(rest);
    first
}

#[test]
fn structured_replies_stamp_and_go() {
    let replies = with(
        vec![
            option_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]),
            rep_meta_context(OPT_SET_META_CONTEXT, 1, "nbdvirt:generation=42"),
            rep_meta_context(OPT_SET_META_CONTEXT, 9, "base:allocation"),
            option_reply(OPT_SET_META_CONTEXT, REP_ACK, &[]),
        ],
        go_replies(),
    );
    let mut s = server(&replies);
    let info = negotiate_forwarding(&mut s, "vol", Some(42)).unwrap();
    assert_eq!(info, ExportInfo { size: 1 << 20, flags: TFLAG_HAS_FLAGS | TFLAG_CAN_MULTI_CONN, preferred_block: 4096, maximum_block: 1 << 20, allocation: Some(9) });
    // Client flags, then STRUCTURED_REPLY, SET_META_CONTEXT and GO in order.
    let out = &s.output;
    assert_eq!(&out[..4], &(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
    let meta = encode_option(OPT_SET_META_CONTEXT, &encode_meta_context_request("vol", &["nbdvirt:generation=42", "base:allocation"]));
    let expected: Vec<u8> = [encode_option(OPT_STRUCTURED_REPLY, &[]), meta, encode_option(OPT_GO, &encode_info_request("vol", &[INFO_BLOCK_SIZE]))].concat();
    assert_eq!(&out[4..], &expected[..]);
}

#[test]
fn no_stamp_asked_sends_no_meta_context() {
    let replies = with(vec![option_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[])], go_replies());
    let mut s = server(&replies);
    negotiate_forwarding(&mut s, "vol", None).unwrap();
    let expected: Vec<u8> = [encode_option(OPT_STRUCTURED_REPLY, &[]), encode_option(OPT_GO, &encode_info_request("vol", &[INFO_BLOCK_SIZE]))].concat();
    assert_eq!(&s.output[4..], &expected[..]);
}

#[test]
fn refused_structured_replies_fail() {
    let mut s = server(&[option_error(OPT_STRUCTURED_REPLY, REP_ERR_UNSUP, "")]);
    let e = negotiate_forwarding(&mut s, "vol", None).unwrap_err();
    assert_eq!(e.to_string(), "server refused structured replies: error 1");
}

#[test]
fn a_server_that_ignores_the_stamp_is_refused() {
    let ack = option_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]);
    // Acknowledged without selecting the context (a server that does not
    // know the namespace), or the option unknown altogether.
    for reply in [option_reply(OPT_SET_META_CONTEXT, REP_ACK, &[]), option_error(OPT_SET_META_CONTEXT, REP_ERR_UNSUP, "unknown option")] {
        let mut s = server(&[ack.clone(), reply]);
        let e = negotiate_forwarding(&mut s, "vol", Some(7)).unwrap_err();
        assert!(matches!(e, HandshakeError::NoStamp), "{e:?}");
        assert_eq!(e.to_string(), "the server does not accept forwarding stamps (older nbdvirt?)");
    }
    // Another context than the one asked for.
    let mut s = server(&[ack.clone(), rep_meta_context(OPT_SET_META_CONTEXT, 1, "nbdvirt:generation=8"), option_reply(OPT_SET_META_CONTEXT, REP_ACK, &[])]);
    let e = negotiate_forwarding(&mut s, "vol", Some(7)).unwrap_err();
    assert!(e.to_string().contains("nbdvirt:generation=8"), "{e}");
    // base:allocation without the stamp is not enough.
    let mut s = server(&[ack.clone(), rep_meta_context(OPT_SET_META_CONTEXT, 2, "base:allocation"), option_reply(OPT_SET_META_CONTEXT, REP_ACK, &[])]);
    assert!(matches!(negotiate_forwarding(&mut s, "vol", Some(7)).unwrap_err(), HandshakeError::NoStamp));
    // A refusal keeps the server's text.
    let mut s = server(&[ack, option_error(OPT_SET_META_CONTEXT, REP_ERR_POLICY, "stamp 7 is stale (volume at 9)")]);
    let e = negotiate_forwarding(&mut s, "vol", Some(7)).unwrap_err();
    assert_eq!(e.to_string(), "server refused the forwarding stamp: stamp 7 is stale (volume at 9)");
}

#[test]
fn truncated_server_output_is_an_error() {
    let mut s = server(&[option_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[])]);
    let e = negotiate_forwarding(&mut s, "vol", None).unwrap_err();
    assert!(matches!(e, HandshakeError::Io { what: "reading option reply", .. }), "{e:?}");
}
