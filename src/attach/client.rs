//! The client half of the NBD handshake, to hand the kernel a socket that
//! is already in the transmission phase (simple replies: the kernel client
//! does not speak structured replies). With TLS, NBD_OPT_STARTTLS comes
//! first and the rest of the haggling runs inside the session; the session
//! then goes to a relay (`relay.rs`), since the kernel cannot speak TLS.
//! The generic half of the handshake is `remote::handshake`, shared with
//! the node's forwarding client.

use super::error::AttachError;
use crate::endpoint::Endpoint;
use crate::nbd::*;
use crate::remote::handshake::{go, greet, read_reply, refusal};
pub use crate::remote::handshake::{ExportInfo, HandshakeError, ServerSocket};
use crate::tls::{TlsClient, TlsError};
use openssl::ssl::SslStream;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

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

/// NBD_OPT_STARTTLS; `Ok` once the server has acknowledged it and the TLS
/// handshake may begin.
fn start_tls(s: &mut (impl Read + Write)) -> Result<(), HandshakeError> {
    s.write_all(&encode_option(OPT_STARTTLS, &[])).map_err(HandshakeError::io("sending NBD_OPT_STARTTLS"))?;
    match read_reply(s)? {
        (REP_ACK, _) => Ok(()),
        (r, data) if r & REP_FLAG_ERROR != 0 => Err(HandshakeError::StartTlsRefused(refusal(r, &data))),
        (r, _) => Err(HandshakeError::Protocol(format!("unexpected reply {r} to NBD_OPT_STARTTLS"))),
    }
}
