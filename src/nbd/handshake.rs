//! Fixed-newstyle negotiation messages: the server greeting, option requests
//! and option replies (proto.md, "Option haggling").

use super::*;

/// The 18 bytes the server sends first.
pub fn server_greeting() -> [u8; 18] {
    let mut out = [0u8; 18];
    out[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    out
}

/// Client flags (4 bytes after the greeting). Unknown bits are a reason to
/// drop the connection (proto.md: the server MUST close it).
pub fn decode_client_flags(buf: &[u8; 4]) -> Result<u32, DecodeError> {
    let flags = u32::from_be_bytes(*buf);
    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(malformed("client flags", format!("unknown bits {flags:#x}")));
    }
    Ok(flags)
}

/// Header of an option request; `length` bytes of data follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub length: u32,
}

pub fn decode_option_header(buf: &[u8; OPTION_HEADER_LEN]) -> Result<OptionHeader, DecodeError> {
    let magic = u64::from_be_bytes(buf[..8].try_into().expect("len 8"));
    if magic != IHAVEOPT {
        return Err(DecodeError::BadMagic(magic));
    }
    Ok(OptionHeader {
        option: u32::from_be_bytes(buf[8..12].try_into().expect("len 4")),
        length: u32::from_be_bytes(buf[12..16].try_into().expect("len 4")),
    })
}

/// Longest export name or metadata query we accept (proto.md: strings are
/// at most 4096 bytes).
pub const MAX_STRING: usize = 4096;

/// Payload of NBD_OPT_INFO and NBD_OPT_GO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub export: String,
    pub requests: Vec<u16>,
}

pub fn decode_info_request(data: &[u8]) -> Result<InfoRequest, DecodeError> {
    let mut c = Cursor::new(data, "NBD_OPT_INFO/GO");
    let export = c.string32(MAX_STRING)?;
    let count = c.u16()? as usize;
    if c.remaining() != count * 2 {
        return Err(malformed("NBD_OPT_INFO/GO", format!("{count} info requests but {} bytes", c.remaining())));
    }
    let requests = (0..count).map(|_| c.u16()).collect::<Result<_, _>>()?;
    Ok(InfoRequest { export, requests })
}

/// Payload of NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub export: String,
    pub queries: Vec<String>,
}

pub fn decode_meta_context_request(data: &[u8]) -> Result<MetaContextRequest, DecodeError> {
    let mut c = Cursor::new(data, "NBD_OPT_*_META_CONTEXT");
    let export = c.string32(MAX_STRING)?;
    let count = c.u32()? as usize;
    // Each query needs at least its 4-byte length: reject counts the payload
    // cannot hold before allocating anything.
    if count > c.remaining() / 4 {
        return Err(malformed("NBD_OPT_*_META_CONTEXT", format!("{count} queries do not fit")));
    }
    let mut queries = Vec::with_capacity(count);
    for _ in 0..count {
        queries.push(c.string32(MAX_STRING)?);
    }
    if !c.is_empty() {
        return Err(malformed("NBD_OPT_*_META_CONTEXT", "trailing bytes"));
    }
    Ok(MetaContextRequest { export, queries })
}

/// Does a metadata-context query select `base:allocation`? A query is either
/// a full context name or a namespace prefix ("base:") selecting all of it.
pub fn query_selects_base_allocation(query: &str) -> bool {
    query == META_BASE_ALLOCATION || query == "base:"
}

/// One option reply: magic, option, reply type, length, data.
pub fn option_reply(option: u32, reply_type: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// An error reply carrying a human-readable message.
pub fn option_error(option: u32, reply_type: u32, message: &str) -> Vec<u8> {
    option_reply(option, reply_type, message.as_bytes())
}

/// NBD_REP_SERVER for NBD_OPT_LIST: name, then the description as details.
pub fn rep_server(name: &str, description: &str) -> Vec<u8> {
    let mut data = Vec::with_capacity(4 + name.len() + description.len());
    data.extend_from_slice(&(name.len() as u32).to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(description.as_bytes());
    option_reply(OPT_LIST, REP_SERVER, &data)
}

pub fn rep_info_export(option: u32, size: u64, flags: u16) -> Vec<u8> {
    let mut data = Vec::with_capacity(12);
    data.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    data.extend_from_slice(&size.to_be_bytes());
    data.extend_from_slice(&flags.to_be_bytes());
    option_reply(option, REP_INFO, &data)
}

pub fn rep_info_string(option: u32, info: u16, value: &str) -> Vec<u8> {
    let mut data = Vec::with_capacity(2 + value.len());
    data.extend_from_slice(&info.to_be_bytes());
    data.extend_from_slice(value.as_bytes());
    option_reply(option, REP_INFO, &data)
}

pub fn rep_info_block_size(option: u32, minimum: u32, preferred: u32, maximum: u32) -> Vec<u8> {
    let mut data = Vec::with_capacity(14);
    data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    data.extend_from_slice(&minimum.to_be_bytes());
    data.extend_from_slice(&preferred.to_be_bytes());
    data.extend_from_slice(&maximum.to_be_bytes());
    option_reply(option, REP_INFO, &data)
}

pub fn rep_meta_context(option: u32, id: u32, name: &str) -> Vec<u8> {
    let mut data = Vec::with_capacity(4 + name.len());
    data.extend_from_slice(&id.to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    option_reply(option, REP_META_CONTEXT, &data)
}

/// Reply to the old-style NBD_OPT_EXPORT_NAME: size, flags, and 124 zero
/// bytes unless the client negotiated NO_ZEROES.
pub fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(134);
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
    out
}

// ---- Client side (used by `remote` and `attach`) ----

/// An option request as a client sends it.
pub fn encode_option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + data.len());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// Payload of NBD_OPT_GO/INFO for `export` asking for `infos`.
pub fn encode_info_request(export: &str, infos: &[u16]) -> Vec<u8> {
    let mut out = Vec::with_capacity(6 + export.len() + 2 * infos.len());
    out.extend_from_slice(&(export.len() as u32).to_be_bytes());
    out.extend_from_slice(export.as_bytes());
    out.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        out.extend_from_slice(&i.to_be_bytes());
    }
    out
}

/// Payload of NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT for
/// `export` with `queries` (the inverse of `decode_meta_context_request`).
pub fn encode_meta_context_request(export: &str, queries: &[&str]) -> Vec<u8> {
    let strings: usize = queries.iter().map(|q| 4 + q.len()).sum();
    let mut out = Vec::with_capacity(8 + export.len() + strings);
    out.extend_from_slice(&(export.len() as u32).to_be_bytes());
    out.extend_from_slice(export.as_bytes());
    out.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        out.extend_from_slice(&(q.len() as u32).to_be_bytes());
        out.extend_from_slice(q.as_bytes());
    }
    out
}

/// Header of an option reply: (option, reply type, payload length).
pub fn decode_option_reply_header(buf: &[u8; 20]) -> Result<(u32, u32, u32), DecodeError> {
    let magic = u64::from_be_bytes(buf[..8].try_into().expect("len 8"));
    if magic != OPT_REPLY_MAGIC {
        return Err(DecodeError::BadMagic(magic));
    }
    Ok((
        u32::from_be_bytes(buf[8..12].try_into().expect("len 4")),
        u32::from_be_bytes(buf[12..16].try_into().expect("len 4")),
        u32::from_be_bytes(buf[16..20].try_into().expect("len 4")),
    ))
}

pub fn option_name(option: u32) -> &'static str {
    match option {
        OPT_EXPORT_NAME => "EXPORT_NAME",
        OPT_ABORT => "ABORT",
        OPT_LIST => "LIST",
        OPT_STARTTLS => "STARTTLS",
        OPT_INFO => "INFO",
        OPT_GO => "GO",
        OPT_STRUCTURED_REPLY => "STRUCTURED_REPLY",
        OPT_LIST_META_CONTEXT => "LIST_META_CONTEXT",
        OPT_SET_META_CONTEXT => "SET_META_CONTEXT",
        OPT_EXTENDED_HEADERS => "EXTENDED_HEADERS",
        _ => "UNKNOWN",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_request_round_trip() {
        let mut data = Vec::new();
        data.extend_from_slice(&3u32.to_be_bytes());
        data.extend_from_slice(b"vol");
        data.extend_from_slice(&2u16.to_be_bytes());
        data.extend_from_slice(&INFO_NAME.to_be_bytes());
        data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        let req = decode_info_request(&data).unwrap();
        assert_eq!(req.export, "vol");
        assert_eq!(req.requests, vec![INFO_NAME, INFO_BLOCK_SIZE]);
        assert!(decode_info_request(&data[..data.len() - 1]).is_err());
    }

    #[test]
    fn meta_context_rejects_absurd_counts() {
        let mut data = Vec::new();
        data.extend_from_slice(&0u32.to_be_bytes());
        data.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode_meta_context_request(&data).is_err());
    }

    #[test]
    fn meta_context_request_round_trip() {
        let data = encode_meta_context_request("vol", &["nbdvirt:generation=7", "base:allocation"]);
        let req = decode_meta_context_request(&data).unwrap();
        assert_eq!(req.export, "vol");
        assert_eq!(req.queries, vec!["nbdvirt:generation=7".to_string(), "base:allocation".to_string()]);
        // Export length, "vol", count, then each query with its length.
        assert_eq!(&data[..7], &[0, 0, 0, 3, b'v', b'o', b'l']);
        assert_eq!(&data[7..15], &[0, 0, 0, 2, 0, 0, 0, 20]);
        assert_eq!(decode_meta_context_request(&encode_meta_context_request("", &[])).unwrap().queries, Vec::<String>::new());
    }

    #[test]
    fn client_flags_reject_unknown_bits() {
        assert!(decode_client_flags(&[0, 0, 0, 3]).is_ok());
        assert!(decode_client_flags(&[0, 0, 0, 4]).is_err());
    }
}
