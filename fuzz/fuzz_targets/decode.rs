//! Feeds arbitrary bytes to every decoder of the NBD codec. The decoders
//! read untrusted network input: they must return a value or an error,
//! never panic, and whatever they accept must re-encode to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbdvirt::nbd::*;

fn info_bytes(r: &InfoRequest) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(r.export.len() as u32).to_be_bytes());
    d.extend_from_slice(r.export.as_bytes());
    d.extend_from_slice(&(r.requests.len() as u16).to_be_bytes());
    for i in &r.requests {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

fn meta_bytes(r: &MetaContextRequest) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(r.export.len() as u32).to_be_bytes());
    d.extend_from_slice(r.export.as_bytes());
    d.extend_from_slice(&(r.queries.len() as u32).to_be_bytes());
    for q in &r.queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

fuzz_target!(|data: &[u8]| {
    // Transmission: a stream of request headers, as the reader sees it.
    let mut rest = data;
    while let Ok(h) = decode_request_header(rest) {
        assert_eq!(&h.encode()[..], &rest[..REQUEST_HEADER_LEN]);
        let _ = allowed_flags(h.command);
        rest = &rest[REQUEST_HEADER_LEN..];
        // Skip a (bounded) WRITE payload like the server would.
        let skip = (h.payload_len() as usize).min(rest.len());
        rest = &rest[skip..];
    }

    // Handshake: fixed-size headers.
    if let Some(flags) = data.get(..4) {
        let _ = decode_client_flags(flags.try_into().unwrap());
    }
    if let Some(opt) = data.get(..OPTION_HEADER_LEN) {
        let _ = decode_option_header(opt.try_into().unwrap());
    }

    // Option payloads.
    if let Ok(r) = decode_info_request(data) {
        assert_eq!(info_bytes(&r), data);
    }
    if let Ok(r) = decode_meta_context_request(data) {
        assert_eq!(meta_bytes(&r), data);
        for q in &r.queries {
            let _ = query_selects_base_allocation(q);
        }
    }
});
