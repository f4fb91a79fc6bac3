//! The client half of the NBD handshake, shared by the kernel attach
//! (`attach::client`, which adds STARTTLS and hands the socket on) and the
//! node's own forwarding client (`remote`, which needs structured replies
//! and, in a cluster, a forwarding stamp).

use crate::endpoint::Endpoint;
use crate::nbd::*;
use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// Why the client half of the NBD handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("{what}: {source}")]
    Io { what: &'static str, source: io::Error },
    #[error("not an NBD newstyle server")]
    NotNewstyle,
    #[error("server does not speak fixed newstyle")]
    NotFixedNewstyle,
    #[error("option reply of {0} bytes")]
    ReplyTooLong(u32),
    #[error("{0}")]
    Protocol(String),
    #[error("server acknowledged GO without export information")]
    NoExportInfo,
    #[error("server: {0}")]
    UnknownExport(String),
    #[error("server refused: {0}")]
    Refused(String),
    #[error("server refused NBD_OPT_STARTTLS: {0}")]
    StartTlsRefused(String),
    /// `credentials` says which file and identity were used.
    #[error("TLS handshake failed ({credentials}): {message}")]
    Tls { credentials: String, message: String },
    #[error("server requires TLS ({0}): give --tls-psk FILE or --tls-certificates DIR")]
    TlsRequired(String),
    /// Forwarding reads need structured replies (a READ error must not
    /// arrive after data the client already took as good).
    #[error("server refused structured replies: {0}")]
    NoStructuredReplies(String),
    #[error("the server does not accept forwarding stamps (older nbdvirt?)")]
    NoStamp,
    #[error("server refused the forwarding stamp: {0}")]
    StampRefused(String),
}

impl HandshakeError {
    /// An I/O failure while `what` was being done.
    pub fn io(what: &'static str) -> impl FnOnce(io::Error) -> HandshakeError {
        move |source| HandshakeError::Io { what, source }
    }
}

/// What the server told us about the export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    pub flags: u16,
    pub preferred_block: u32,
    /// Largest READ or WRITE the server takes (32 MiB unless it said).
    pub maximum_block: u32,
    /// The id of `base:allocation` if the server selected it (forwarding
    /// asks for it beside the stamp): BLOCK_STATUS answers then.
    pub allocation: Option<u32>,
}

/// A connected socket to the server, of either family.
#[derive(Debug)]
pub enum ServerSocket {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl ServerSocket {
    /// Connects; a TCP connect gives up after `timeout` (a dead host must
    /// not hold a reconnect for the kernel's two minutes of SYN retries).
    pub fn open(endpoint: &Endpoint, timeout: Duration) -> io::Result<ServerSocket> {
        Ok(match endpoint {
            Endpoint::Unix(path) => ServerSocket::Unix(UnixStream::connect(path)?),
            Endpoint::Tcp(addr) => {
                let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{addr}: no address"));
                let mut found = None;
                for a in std::net::ToSocketAddrs::to_socket_addrs(addr.as_str())? {
                    match TcpStream::connect_timeout(&a, timeout) {
                        Ok(s) => {
                            found = Some(s);
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                let s = found.ok_or(last)?;
                s.set_nodelay(true)?;
                ServerSocket::Tcp(s)
            }
        })
    }

    /// Bounds every read and write of the handshake (`None`: unbounded).
    pub fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t).and_then(|()| self.set_write_timeout(t))
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            ServerSocket::Unix(s) => s.set_read_timeout(t),
            ServerSocket::Tcp(s) => s.set_read_timeout(t),
        }
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            ServerSocket::Unix(s) => s.set_write_timeout(t),
            ServerSocket::Tcp(s) => s.set_write_timeout(t),
        }
    }

    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            ServerSocket::Unix(s) => s.set_nonblocking(on),
            ServerSocket::Tcp(s) => s.set_nonblocking(on),
        }
    }

    /// A second handle on the same socket (one reads while one writes).
    pub fn try_clone(&self) -> io::Result<ServerSocket> {
        Ok(match self {
            ServerSocket::Unix(s) => ServerSocket::Unix(s.try_clone()?),
            ServerSocket::Tcp(s) => ServerSocket::Tcp(s.try_clone()?),
        })
    }

    /// Ends both directions: a thread blocked reading it wakes with EOF.
    pub fn shutdown(&self) -> io::Result<()> {
        match self {
            ServerSocket::Unix(s) => s.shutdown(Shutdown::Both),
            ServerSocket::Tcp(s) => s.shutdown(Shutdown::Both),
        }
    }
}

impl Read for ServerSocket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            ServerSocket::Unix(s) => s.read(buf),
            ServerSocket::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for ServerSocket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            ServerSocket::Unix(s) => s.write(buf),
            ServerSocket::Tcp(s) => s.write(buf),
        }
    }
    // A request header and its payload leave in one sendmsg(2).
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            ServerSocket::Unix(s) => s.write_vectored(bufs),
            ServerSocket::Tcp(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsFd for ServerSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            ServerSocket::Unix(s) => s.as_fd(),
            ServerSocket::Tcp(s) => s.as_fd(),
        }
    }
}

impl AsRawFd for ServerSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}

impl From<ServerSocket> for OwnedFd {
    fn from(s: ServerSocket) -> OwnedFd {
        match s {
            ServerSocket::Unix(s) => s.into(),
            ServerSocket::Tcp(s) => s.into(),
        }
    }
}

/// The server's greeting and our flags: fixed newstyle, no zeroes if offered.
pub fn greet(s: &mut (impl Read + Write)) -> Result<(), HandshakeError> {
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
    s.write_all(&client_flags.to_be_bytes()).map_err(HandshakeError::io("sending client flags"))
}

/// One option reply: its type and data.
pub fn read_reply(s: &mut impl Read) -> Result<(u32, Vec<u8>), HandshakeError> {
    let mut header = [0u8; 20];
    s.read_exact(&mut header).map_err(HandshakeError::io("reading option reply"))?;
    let (_, reply, len) = decode_option_reply_header(&header).map_err(|e| HandshakeError::Protocol(e.to_string()))?;
    if len > MAX_OPTION_LEN {
        return Err(HandshakeError::ReplyTooLong(len));
    }
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data).map_err(HandshakeError::io("reading option reply data"))?;
    Ok((reply, data))
}

/// The server's text of an error reply, or its number when it sent none.
pub fn refusal(reply: u32, data: &[u8]) -> String {
    let msg = String::from_utf8_lossy(data).into_owned();
    if msg.is_empty() {
        format!("error {}", reply & !REP_FLAG_ERROR)
    } else {
        msg
    }
}

/// NBD_OPT_GO for `export`; what the server said about it.
pub fn go(s: &mut (impl Read + Write), export: &str) -> Result<ExportInfo, HandshakeError> {
    s.write_all(&encode_option(OPT_GO, &encode_info_request(export, &[INFO_BLOCK_SIZE]))).map_err(HandshakeError::io("sending NBD_OPT_GO"))?;
    let mut info = ExportInfo { size: 0, flags: 0, preferred_block: 4096, maximum_block: MAX_PAYLOAD, allocation: None };
    let mut have_export = false;
    loop {
        let (reply, data) = read_reply(s)?;
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
                    info.maximum_block = u32::from_be_bytes(data[10..14].try_into().expect("len 4"));
                }
            }
            r if r & REP_FLAG_ERROR != 0 => {
                let msg = String::from_utf8_lossy(&data).into_owned();
                return Err(match r {
                    REP_ERR_UNKNOWN => HandshakeError::UnknownExport(msg),
                    REP_ERR_TLS_REQD => HandshakeError::TlsRequired(msg),
                    _ => HandshakeError::Refused(msg),
                });
            }
            _ => {}
        }
    }
}

/// NBD_OPT_STRUCTURED_REPLY, required: a refusal fails the handshake.
pub fn structured_reply(s: &mut (impl Read + Write)) -> Result<(), HandshakeError> {
    s.write_all(&encode_option(OPT_STRUCTURED_REPLY, &[])).map_err(HandshakeError::io("sending NBD_OPT_STRUCTURED_REPLY"))?;
    match read_reply(s)? {
        (REP_ACK, _) => Ok(()),
        (r, data) if r & REP_FLAG_ERROR != 0 => Err(HandshakeError::NoStructuredReplies(refusal(r, &data))),
        (r, _) => Err(HandshakeError::Protocol(format!("unexpected reply {r} to NBD_OPT_STRUCTURED_REPLY"))),
    }
}

/// The metadata-context query that carries a forwarding stamp.
pub fn stamp_query(stamp: u64) -> String {
    format!("nbdvirt:generation={stamp}")
}

/// NBD_OPT_SET_META_CONTEXT with the queries `nbdvirt:generation=N` and
/// `base:allocation`; returns the id of the latter if selected. The server
/// must select the stamp: a server that ignores the query (it does not
/// know stamps) would serve a stale forward unchecked.
pub fn set_stamp(s: &mut (impl Read + Write), export: &str, stamp: u64) -> Result<Option<u32>, HandshakeError> {
    let query = stamp_query(stamp);
    let payload = encode_meta_context_request(export, &[&query, "base:allocation"]);
    s.write_all(&encode_option(OPT_SET_META_CONTEXT, &payload)).map_err(HandshakeError::io("sending NBD_OPT_SET_META_CONTEXT"))?;
    let (mut selected, mut allocation) = (false, None);
    loop {
        match read_reply(s)? {
            (REP_META_CONTEXT, data) => {
                let name = data.get(4..).map(String::from_utf8_lossy).unwrap_or_default();
                match name.as_ref() {
                    _ if data.len() < 4 => return Err(HandshakeError::Protocol("a metadata context reply of fewer than 4 bytes".into())),
                    n if n == query && !selected => selected = true,
                    "base:allocation" if allocation.is_none() => allocation = Some(u32::from_be_bytes(data[..4].try_into().expect("len 4"))),
                    _ => return Err(HandshakeError::Protocol(format!("server selected metadata context '{name}' for queries '{query}', 'base:allocation'"))),
                }
            }
            (REP_ACK, _) if selected => return Ok(allocation),
            (REP_ACK, _) => return Err(HandshakeError::NoStamp),
            // The option itself is unknown to the server.
            (REP_ERR_UNSUP, _) => return Err(HandshakeError::NoStamp),
            (r, data) if r & REP_FLAG_ERROR != 0 => return Err(HandshakeError::StampRefused(refusal(r, &data))),
            (r, _) => return Err(HandshakeError::Protocol(format!("unexpected reply {r} to NBD_OPT_SET_META_CONTEXT"))),
        }
    }
}

/// The forwarding handshake on a connected socket: fixed newstyle, then
/// structured replies, the stamp if any, and GO.
pub fn negotiate_forwarding(s: &mut (impl Read + Write), export: &str, stamp: Option<u64>) -> Result<ExportInfo, HandshakeError> {
    greet(s)?;
    structured_reply(s)?;
    let allocation = match stamp {
        Some(stamp) => set_stamp(s, export, stamp)?,
        None => None,
    };
    Ok(ExportInfo { allocation, ..go(s, export)? })
}

/// Connects to `endpoint` (plain TCP or Unix: forwarding runs between
/// nodes, never TLS) and negotiates `export` for forwarding. `timeout`
/// bounds the connect and each read and write of the handshake; the socket
/// comes back with no timeouts.
pub fn connect_forwarding(endpoint: &Endpoint, export: &str, stamp: Option<u64>, timeout: Duration) -> Result<(ServerSocket, ExportInfo), HandshakeError> {
    let mut s = ServerSocket::open(endpoint, timeout).map_err(HandshakeError::io("connect"))?;
    s.set_timeouts(Some(timeout)).map_err(HandshakeError::io("connect"))?;
    let info = negotiate_forwarding(&mut s, export, stamp)?;
    s.set_timeouts(None).map_err(HandshakeError::io("connect"))?;
    Ok((s, info))
}

#[cfg(test)]
#[path = "handshake_tests.rs"]
mod tests;
