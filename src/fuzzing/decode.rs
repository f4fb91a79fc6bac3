//! The wire decoders on arbitrary bytes (the `decode` fuzz target). They
//! read untrusted network input: they must return a value or an error,
//! never panic, and whatever they accept must re-encode to the same bytes
//! (re-encoded here by hand, not with the crate's encoders).

use super::Violation;
use crate::nbd::*;

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

/// Feeds `data` to every decoder of the codec.
pub fn run(data: &[u8]) -> Result<(), Violation> {
    // Transmission: a stream of request headers, as the reader sees it.
    let mut rest = data;
    while let Ok(h) = decode_request_header(rest) {
        if h.encode()[..] != rest[..REQUEST_HEADER_LEN] {
            return Err(Violation::new(format!("request header {h:?} does not re-encode")));
        }
        let _ = allowed_flags(h.command);
        rest = &rest[REQUEST_HEADER_LEN..];
        // Skip a (bounded) WRITE payload like the server would.
        let skip = (h.payload_len() as usize).min(rest.len());
        rest = &rest[skip..];
    }

    // Handshake: fixed-size headers.
    if let Some(flags) = data.first_chunk::<4>() {
        let _ = decode_client_flags(flags);
    }
    if let Some(header) = data.first_chunk::<OPTION_HEADER_LEN>() {
        if let Ok(h) = decode_option_header(header) {
            let mut again = encode_option(h.option, &[]);
            again[12..].copy_from_slice(&h.length.to_be_bytes());
            if again[..] != header[..] {
                return Err(Violation::new(format!("option header {h:?} does not match its bytes")));
            }
        }
    }
    if let Some(reply) = data.first_chunk::<20>() {
        let _ = decode_option_reply_header(reply);
    }

    // Option payloads.
    if let Ok(r) = decode_info_request(data) {
        if info_bytes(&r) != data {
            return Err(Violation::new(format!("INFO/GO payload {r:?} does not re-encode")));
        }
    }
    if let Ok(r) = decode_meta_context_request(data) {
        if meta_bytes(&r) != data {
            return Err(Violation::new(format!("META_CONTEXT payload {r:?} does not re-encode")));
        }
        for q in &r.queries {
            let _ = query_selects_base_allocation(q);
        }
    }
    Ok(())
}
