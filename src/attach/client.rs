//! The client half of the NBD handshake, to hand the kernel a socket that
//! is already in the transmission phase (simple replies: the kernel client
//! does not speak structured replies).

use super::error::{AttachError, HandshakeError};
use crate::endpoint::Endpoint;
use crate::nbd::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// What the server told us about the export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    pub flags: u16,
    pub preferred_block: u32,
}

/// Connects to `endpoint` and negotiates `export` with NBD_OPT_GO.
pub fn connect(endpoint: &Endpoint, export: &str, timeout: Duration) -> Result<(OwnedFd, ExportInfo), AttachError> {
    let connect_err = |source| AttachError::Connect { endpoint: endpoint.to_string(), source };
    let handshake_err = |source| AttachError::Handshake { endpoint: endpoint.to_string(), source };
    match endpoint {
        Endpoint::Unix(path) => {
            let mut s = UnixStream::connect(path).map_err(connect_err)?;
            s.set_read_timeout(Some(timeout)).map_err(connect_err)?;
            let info = negotiate(&mut s, export).map_err(handshake_err)?;
            s.set_read_timeout(None).map_err(connect_err)?;
            Ok((OwnedFd::from(s), info))
        }
        Endpoint::Tcp(addr) => {
            let mut s = TcpStream::connect(addr).map_err(connect_err)?;
            s.set_nodelay(true).map_err(connect_err)?;
            s.set_read_timeout(Some(timeout)).map_err(connect_err)?;
            let info = negotiate(&mut s, export).map_err(handshake_err)?;
            s.set_read_timeout(None).map_err(connect_err)?;
            Ok((OwnedFd::from(s), info))
        }
    }
}

fn negotiate(s: &mut (impl Read + Write), export: &str) -> Result<ExportInfo, HandshakeError> {
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).map_err(HandshakeError::io("reading greeting"))?;
    if greeting[..8] != NBDMAGIC.to_be_bytes() || greeting[8..16] != IHAVEOPT.to_be_bytes() {
        return Err(HandshakeError::NotNewstyle);
    }
    let server_flags = u16::from_be_bytes([greeting[16], greeting[17]]);
    if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(HandshakeError::NotFixedNewstyle);
    }
    let mut client_flags = FLAG_C_FIXED_NEWSTYLE;
    if server_flags & FLAG_NO_ZEROES != 0 {
        client_flags |= FLAG_C_NO_ZEROES;
    }
    s.write_all(&client_flags.to_be_bytes()).map_err(HandshakeError::io("sending client flags"))?;
    s.write_all(&encode_option(OPT_GO, &encode_info_request(export, &[INFO_BLOCK_SIZE]))).map_err(HandshakeError::io("sending NBD_OPT_GO"))?;
    let mut info = ExportInfo { size: 0, flags: 0, preferred_block: 4096 };
    let mut have_export = false;
    loop {
        let mut header = [0u8; 20];
        s.read_exact(&mut header).map_err(HandshakeError::io("reading option reply"))?;
        let (_, reply, len) = decode_option_reply_header(&header).map_err(|e| HandshakeError::Protocol(e.to_string()))?;
        if len > MAX_OPTION_LEN {
            return Err(HandshakeError::ReplyTooLong(len));
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).map_err(HandshakeError::io("reading option reply data"))?;
        match reply {
            REP_ACK if have_export => return Ok(info),
            REP_ACK => return Err(HandshakeError::NoExportInfo),
            REP_INFO if data.len() >= 2 => {
                let kind = u16::from_be_bytes([data[0], data[1]]);
                if kind == INFO_EXPORT && data.len() >= 12 {
                    info.size = u64::from_be_bytes(data[2..10].try_into().expect("len 8"));
                    info.flags = u16::from_be_bytes([data[10], data[11]]);
                    have_export = true;
                } else if kind == INFO_BLOCK_SIZE && data.len() >= 14 {
                    info.preferred_block = u32::from_be_bytes(data[6..10].try_into().expect("len 4"));
                }
            }
            r if r & REP_FLAG_ERROR != 0 => {
                let msg = String::from_utf8_lossy(&data).into_owned();
                return Err(if r == REP_ERR_UNKNOWN { HandshakeError::UnknownExport(msg) } else { HandshakeError::Refused(msg) });
            }
            _ => {}
        }
    }
}
