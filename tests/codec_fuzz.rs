//! Property tests of the pure NBD codec (`nbdvirt::nbd`): every decoder
//! takes untrusted bytes and must return a value or an error, never panic;
//! valid encodings (built by hand here, independently of the crate's
//! encoders) decode to the values encoded.
use nbdvirt::nbd::{
    allowed_flags, decode_client_flags, decode_info_request, decode_meta_context_request, decode_option_header, decode_request_header,
    query_selects_base_allocation, DecodeError, RequestHeader, CMD_WRITE, FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, IHAVEOPT, MAX_STRING,
    REQUEST_HEADER_LEN, REQUEST_MAGIC,
};
use proptest::collection::vec;
use proptest::prelude::*;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

/// Hand-built INFO/GO payload.
fn info_bytes(name: &[u8], requests: &[u16]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name);
    d.extend_from_slice(&(requests.len() as u16).to_be_bytes());
    for r in requests {
        d.extend_from_slice(&r.to_be_bytes());
    }
    d
}

/// Hand-built {LIST,SET}_META_CONTEXT payload.
fn meta_bytes(name: &[u8], queries: &[Vec<u8>]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name);
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q);
    }
    d
}

/// Strings of 0..=n chars, including multi-byte UTF-8.
fn text(n: usize) -> impl Strategy<Value = String> {
    vec(any::<char>(), 0..=n).prop_map(|c| c.into_iter().collect())
}

/// One small corruption of a valid payload, chosen by `how`: overwrite a
/// 32-bit field-sized window with `word`, set one byte, truncate, or append.
fn perturb(mut d: Vec<u8>, word: u32, at: usize, byte: u8, how: usize) -> Vec<u8> {
    match how {
        0 => {
            let at = at % d.len().saturating_sub(3).max(1);
            if d.len() >= at + 4 {
                d[at..at + 4].copy_from_slice(&word.to_be_bytes());
            }
        }
        1 => {
            let at = at % d.len();
            d[at] = byte;
        }
        2 => d.truncate(at % (d.len() + 1)),
        _ => d.push(byte),
    }
    d
}

/// Bytes that are mostly close to a valid meta-context payload: a real
/// structure with lengths and counts perturbed, to get past the first check.
fn near_meta() -> impl Strategy<Value = Vec<u8>> {
    (text(20), vec(text(20), 0..6), any::<u32>(), 0usize..64, any::<u8>(), 0usize..4).prop_map(|(name, queries, word, at, byte, how)| {
        let q: Vec<Vec<u8>> = queries.into_iter().map(String::into_bytes).collect();
        let d = meta_bytes(name.as_bytes(), &q);
        perturb(d, word, at, byte, how)
    })
}

/// Same for INFO/GO payloads.
fn near_info() -> impl Strategy<Value = Vec<u8>> {
    (text(20), vec(any::<u16>(), 0..8), any::<u32>(), 0usize..64, any::<u8>(), 0usize..4).prop_map(|(name, reqs, word, at, byte, how)| {
        let d = info_bytes(name.as_bytes(), &reqs);
        perturb(d, word, at, byte, how)
    })
}

proptest! {
    #![proptest_config(config(4000))]

    #[test]
    fn request_header_decoder_never_panics(buf in vec(any::<u8>(), 0..64)) {
        match decode_request_header(&buf) {
            Ok(h) => {
                prop_assert!(buf.len() >= REQUEST_HEADER_LEN);
                prop_assert_eq!(&buf[..4], &REQUEST_MAGIC.to_be_bytes()[..]);
                prop_assert_eq!(h.flags, u16::from_be_bytes([buf[4], buf[5]]));
                prop_assert_eq!(h.command, u16::from_be_bytes([buf[6], buf[7]]));
                prop_assert_eq!(h.cookie, u64::from_be_bytes(buf[8..16].try_into().unwrap()));
                prop_assert_eq!(h.offset, u64::from_be_bytes(buf[16..24].try_into().unwrap()));
                prop_assert_eq!(h.length, u32::from_be_bytes(buf[24..28].try_into().unwrap()));
                prop_assert_eq!(h.payload_len(), if h.command == CMD_WRITE { h.length } else { 0 });
            }
            Err(DecodeError::Incomplete(n)) => prop_assert_eq!(n + buf.len(), REQUEST_HEADER_LEN),
            Err(DecodeError::BadMagic(m)) => {
                prop_assert!(buf.len() >= REQUEST_HEADER_LEN);
                prop_assert_ne!(m, REQUEST_MAGIC as u64);
                prop_assert_eq!(m, u32::from_be_bytes(buf[..4].try_into().unwrap()) as u64);
            }
            Err(e) => prop_assert!(false, "unexpected error {e:?}"),
        }
    }

    #[test]
    fn request_header_with_valid_magic_decodes(flags: u16, command: u16, cookie: u64, offset: u64, length: u32, tail in vec(any::<u8>(), 0..8)) {
        let mut buf = Vec::new();
        buf.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        buf.extend_from_slice(&flags.to_be_bytes());
        buf.extend_from_slice(&command.to_be_bytes());
        buf.extend_from_slice(&cookie.to_be_bytes());
        buf.extend_from_slice(&offset.to_be_bytes());
        buf.extend_from_slice(&length.to_be_bytes());
        buf.extend_from_slice(&tail); // bytes after the header are not consumed
        let h = decode_request_header(&buf).unwrap();
        prop_assert_eq!(h, RequestHeader { flags, command, cookie, offset, length });
        // Every proper prefix is incomplete, never an error of the peer.
        for cut in 0..REQUEST_HEADER_LEN {
            prop_assert_eq!(decode_request_header(&buf[..cut]), Err(DecodeError::Incomplete(REQUEST_HEADER_LEN - cut)));
        }
    }

    #[test]
    fn request_header_round_trip(flags: u16, command: u16, cookie: u64, offset: u64, length: u32) {
        let h = RequestHeader { flags, command, cookie, offset, length };
        let bytes = h.encode();
        prop_assert_eq!(&bytes[..4], &[0x25, 0x60, 0x95, 0x13][..]);
        prop_assert_eq!(decode_request_header(&bytes).unwrap(), h);
    }

    #[test]
    fn option_header_decoder_never_panics(buf: [u8; 16]) {
        let magic = u64::from_be_bytes(buf[..8].try_into().unwrap());
        match decode_option_header(&buf) {
            Ok(h) => {
                prop_assert_eq!(magic, IHAVEOPT);
                prop_assert_eq!(h.option, u32::from_be_bytes(buf[8..12].try_into().unwrap()));
                prop_assert_eq!(h.length, u32::from_be_bytes(buf[12..16].try_into().unwrap()));
            }
            Err(DecodeError::BadMagic(m)) => {
                prop_assert_ne!(magic, IHAVEOPT);
                prop_assert_eq!(m, magic);
            }
            Err(e) => prop_assert!(false, "unexpected error {e:?}"),
        }
    }

    #[test]
    fn option_header_with_valid_magic_decodes(option: u32, length: u32) {
        let mut buf = [0u8; 16];
        buf[..8].copy_from_slice(b"IHAVEOPT");
        buf[8..12].copy_from_slice(&option.to_be_bytes());
        buf[12..].copy_from_slice(&length.to_be_bytes());
        let h = decode_option_header(&buf).unwrap();
        prop_assert_eq!((h.option, h.length), (option, length));
    }

    #[test]
    fn client_flags_accept_exactly_the_known_bits(buf: [u8; 4]) {
        let flags = u32::from_be_bytes(buf);
        let known = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;
        match decode_client_flags(&buf) {
            Ok(f) => {
                prop_assert_eq!(f, flags);
                prop_assert_eq!(flags & !known, 0);
            }
            Err(_) => prop_assert_ne!(flags & !known, 0),
        }
    }

    #[test]
    fn info_request_decoder_never_panics(buf in vec(any::<u8>(), 0..128)) {
        let _ = decode_info_request(&buf);
    }

    #[test]
    fn info_request_decoder_survives_near_valid_input(buf in near_info()) {
        if let Ok(r) = decode_info_request(&buf) {
            // Whatever is accepted is exactly its own encoding.
            prop_assert_eq!(info_bytes(r.export.as_bytes(), &r.requests), buf);
        }
    }

    #[test]
    fn meta_context_decoder_never_panics(buf in vec(any::<u8>(), 0..128)) {
        let _ = decode_meta_context_request(&buf);
    }

    #[test]
    fn meta_context_decoder_survives_near_valid_input(buf in near_meta()) {
        if let Ok(r) = decode_meta_context_request(&buf) {
            let q: Vec<Vec<u8>> = r.queries.iter().map(|q| q.as_bytes().to_vec()).collect();
            prop_assert_eq!(meta_bytes(r.export.as_bytes(), &q), buf);
        }
    }

    #[test]
    fn allowed_flags_are_known_flags(cmd: u16) {
        // Only the five defined command flag bits may ever be allowed.
        prop_assert_eq!(allowed_flags(cmd) & !0x1f, 0);
    }
}

proptest! {
    #![proptest_config(config(1000))]

    #[test]
    fn info_request_round_trip(name in text(64), requests in vec(any::<u16>(), 0..40)) {
        let buf = info_bytes(name.as_bytes(), &requests);
        let r = decode_info_request(&buf).unwrap();
        prop_assert_eq!(&r.export, &name);
        prop_assert_eq!(&r.requests, &requests);
        // Any truncation or extension is refused.
        for cut in 0..buf.len() {
            prop_assert!(decode_info_request(&buf[..cut]).is_err(), "prefix of {} bytes accepted", cut);
        }
        let mut longer = buf.clone();
        longer.push(0);
        prop_assert!(decode_info_request(&longer).is_err());
    }

    #[test]
    fn meta_context_round_trip(name in text(64), queries in vec(text(40), 0..12)) {
        let q: Vec<Vec<u8>> = queries.iter().map(|q| q.as_bytes().to_vec()).collect();
        let buf = meta_bytes(name.as_bytes(), &q);
        let r = decode_meta_context_request(&buf).unwrap();
        prop_assert_eq!(&r.export, &name);
        prop_assert_eq!(&r.queries, &queries);
        for cut in 0..buf.len() {
            prop_assert!(decode_meta_context_request(&buf[..cut]).is_err(), "prefix of {} bytes accepted", cut);
        }
        let mut longer = buf.clone();
        longer.push(0);
        prop_assert!(decode_meta_context_request(&longer).is_err());
    }

    #[test]
    fn non_utf8_names_are_refused(prefix in text(8), bad in 0x80u8..=0xff, requests in vec(any::<u16>(), 0..4)) {
        // A lone byte >= 0x80 after ASCII/complete chars is never valid UTF-8
        // when it ends the string.
        let mut name = prefix.into_bytes();
        name.push(bad);
        prop_assert!(decode_info_request(&info_bytes(&name, &requests)).is_err());
        prop_assert!(decode_meta_context_request(&meta_bytes(&name, &[])).is_err());
        prop_assert!(decode_meta_context_request(&meta_bytes(b"v", &[name.clone()])).is_err());
    }

    #[test]
    fn absurd_counts_are_refused_cheaply(name in text(8), count in 1u32.., filler in vec(any::<u8>(), 0..64)) {
        // A count the payload cannot hold must not allocate or loop per item.
        let mut buf = Vec::new();
        buf.extend_from_slice(&(name.len() as u32).to_be_bytes());
        buf.extend_from_slice(name.as_bytes());
        buf.extend_from_slice(&count.to_be_bytes());
        buf.extend_from_slice(&filler);
        if (count as usize) > filler.len() / 4 {
            prop_assert!(decode_meta_context_request(&buf).is_err());
        }
    }
}

#[test]
fn strings_longer_than_4096_bytes_are_refused() {
    let long = vec![b'a'; MAX_STRING + 1];
    let ok = vec![b'a'; MAX_STRING];
    assert!(decode_info_request(&info_bytes(&long, &[])).is_err());
    assert_eq!(decode_info_request(&info_bytes(&ok, &[])).unwrap().export.len(), MAX_STRING);
    assert!(decode_meta_context_request(&meta_bytes(&long, &[])).is_err());
    assert!(decode_meta_context_request(&meta_bytes(b"v", std::slice::from_ref(&long))).is_err());
    assert_eq!(decode_meta_context_request(&meta_bytes(b"v", std::slice::from_ref(&ok))).unwrap().queries[0].len(), MAX_STRING);
    // A length field of u32::MAX with no data behind it.
    let mut huge = u32::MAX.to_be_bytes().to_vec();
    huge.extend_from_slice(&[0, 0]);
    assert!(decode_info_request(&huge).is_err());
    assert!(decode_meta_context_request(&huge).is_err());
}

#[test]
fn base_allocation_queries() {
    assert!(query_selects_base_allocation("base:allocation"));
    assert!(query_selects_base_allocation("base:"));
    for q in ["base", "base:allocation:x", "base:alloc", "BASE:allocation", "qemu:dirty-bitmap:x", "", ":"] {
        assert!(!query_selects_base_allocation(q), "{q:?}");
    }
}
