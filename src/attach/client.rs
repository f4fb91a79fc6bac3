//! The client half of the NBD handshake, to hand the kernel a socket that
//! is already in the transmission phase (simple replies: the kernel client
//! does not speak structured replies). With TLS, NBD_OPT_STARTTLS comes
//! first and the rest of the haggling runs inside the session; the session
//! then goes to a relay (`relay.rs`), since the kernel cannot speak TLS.

use super::error::{AttachError, HandshakeError};
use crate::endpoint::Endpoint;
use crate::nbd::*;
use crate::tls::{TlsClient, TlsError};
use openssl::ssl::SslStream;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// What the server told us about the export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    pub flags: u16,
    pub preferred_block: u32,
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
    fn open(endpoint: &Endpoint, timeout: Duration) -> io::Result<ServerSocket> {
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
    fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            ServerSocket::Unix(s) => s.set_read_timeout(t).and_then(|()| s.set_write_timeout(t)),
            ServerSocket::Tcp(s) => s.set_read_timeout(t).and_then(|()| s.set_write_timeout(t)),
        }
    }

    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            ServerSocket::Unix(s) => s.set_nonblocking(on),
            ServerSocket::Tcp(s) => s.set_nonblocking(on),
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

/// A connection in the transmission phase.
pub enum Connection {
    /// The socket itself can go to the kernel.
    Plain(OwnedFd),
    /// The kernel needs a relay in front of this session.
    Tls(Box<SslStream<ServerSocket>>),
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Connection::Plain(fd) => write!(f, "Plain({})", fd.as_raw_fd()),
            Connection::Tls(s) => write!(f, "Tls({}, {})", s.get_ref().as_raw_fd(), s.ssl().version_str()),
        }
    }
}

/// TLS for a connection: the client context, and the name the server's
/// certificate must carry (`None`: the chain is checked, no name).
pub struct TlsTarget<'a> {
    pub client: &'a TlsClient,
    pub hostname: Option<&'a str>,
}

/// Connects to `endpoint` and negotiates `export` with NBD_OPT_GO, after
/// STARTTLS when `tls` is given (then TLS is required: a server that
/// refuses it fails the connection). `timeout` bounds each read and write
/// of the handshake.
pub fn connect(endpoint: &Endpoint, export: &str, timeout: Duration, tls: Option<&TlsTarget<'_>>) -> Result<(Connection, ExportInfo), AttachError> {
    let connect_err = |source| AttachError::Connect { endpoint: endpoint.to_string(), source };
    let handshake_err = |source| AttachError::Handshake { endpoint: endpoint.to_string(), source };
    let mut s = ServerSocket::open(endpoint, timeout).map_err(connect_err)?;
    s.set_timeouts(Some(timeout)).map_err(connect_err)?;
    greet(&mut s).map_err(handshake_err)?;
    match tls {
        None => {
            let info = go(&mut s, export).map_err(handshake_err)?;
            s.set_timeouts(None).map_err(connect_err)?;
            Ok((Connection::Plain(s.into()), info))
        }
        Some(tls) => {
            start_tls(&mut s).map_err(handshake_err)?;
            let mut session = tls
                .client
                .connect(tls.hostname, s)
                .map_err(|e| {
                    let message = match e {
                        TlsError::Handshake(m) => m,
                        other => other.to_string(),
                    };
                    handshake_err(HandshakeError::Tls { credentials: tls.client.credentials().to_string(), message })
                })?;
            let info = go(&mut session, export).map_err(|e| handshake_err(rejected_after_handshake(e, tls.client)))?;
            session.get_ref().set_timeouts(None).map_err(connect_err)?;
            Ok((Connection::Tls(Box::new(session)), info))
        }
    }
}

/// With TLS 1.3 the client's side of the handshake is done before the
/// server has checked the client's certificate: a server that rejects it
/// says so with an alert (or just closes) at the first read or write,
/// which is a TLS failure too.
fn rejected_after_handshake(e: HandshakeError, client: &TlsClient) -> HandshakeError {
    match e {
        HandshakeError::Io { what, source }
            if source.kind() == std::io::ErrorKind::UnexpectedEof || source.get_ref().is_some_and(|inner| inner.is::<openssl::ssl::Error>()) =>
        {
            HandshakeError::Tls { credentials: client.credentials().to_string(), message: format!("the server ended the session ({what}): {source}") }
        }
        e => e,
    }
}

/// The server's greeting and our flags: fixed newstyle, no zeroes if offered.
fn greet(s: &mut (impl Read + Write)) -> Result<(), HandshakeError> {
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
fn read_reply(s: &mut impl Read) -> Result<(u32, Vec<u8>), HandshakeError> {
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

/// NBD_OPT_STARTTLS; `Ok` once the server has acknowledged it and the TLS
/// handshake may begin.
fn start_tls(s: &mut (impl Read + Write)) -> Result<(), HandshakeError> {
    s.write_all(&encode_option(OPT_STARTTLS, &[])).map_err(HandshakeError::io("sending NBD_OPT_STARTTLS"))?;
    match read_reply(s)? {
        (REP_ACK, _) => Ok(()),
        (r, data) if r & REP_FLAG_ERROR != 0 => {
            let msg = String::from_utf8_lossy(&data).into_owned();
            Err(HandshakeError::StartTlsRefused(if msg.is_empty() { format!("error {}", r & !REP_FLAG_ERROR) } else { msg }))
        }
        (r, _) => Err(HandshakeError::Protocol(format!("unexpected reply {r} to NBD_OPT_STARTTLS"))),
    }
}

fn go(s: &mut (impl Read + Write), export: &str) -> Result<ExportInfo, HandshakeError> {
    s.write_all(&encode_option(OPT_GO, &encode_info_request(export, &[INFO_BLOCK_SIZE]))).map_err(HandshakeError::io("sending NBD_OPT_GO"))?;
    let mut info = ExportInfo { size: 0, flags: 0, preferred_block: 4096 };
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
