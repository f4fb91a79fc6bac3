//! The client side, for `nbdvirt attach` over TLS (the kernel cannot speak
//! TLS, so the attach daemon relays): the same credential files as libnbd
//! and nbd-client read.
//!
//! Built on a bare `SslContext`, not `SslConnector`, for two of the
//! latter's defaults: it trusts the system's CAs besides `ca-cert.pem`
//! (libnbd trusts only the given CA, and over a Unix socket no name is
//! checked, so any publicly signed certificate would do), and it sets
//! RELEASE_BUFFERS, which frees a session's record buffers when idle and
//! allocates them again for the next record: the relay must not allocate
//! per record, since it may be what memory reclaim is waiting for.

use super::psk::PskKeys;
use super::server::handshake_error;
use super::TlsError;
use openssl::ssl::{Ssl, SslContext, SslContextBuilder, SslFiletype, SslMethod, SslMode, SslOptions, SslStream, SslVerifyMode, SslVersion};
use openssl::x509::verify::X509CheckFlags;
use std::io::{Read, Write};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

/// TLS 1.2 suites with certificates: SslConnector's list (Python's).
const CIPHERS: &str = "DEFAULT:!aNULL:!eNULL:!MD5:!3DES:!DES:!RC4:!IDEA:!SEED:!aDSS:!SRP:!PSK";

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsClientFiles {
    /// libnbd's layout: `ca-cert.pem` (to check the server), optional
    /// `client-cert.pem` + `client-key.pem` (to prove who we are).
    pub certificates: Option<PathBuf>,
    /// psktool's file.
    pub psk: Option<PathBuf>,
    /// PSK identity to use; the file's first (sorted) identity if absent.
    pub username: Option<String>,
}

pub struct TlsClient {
    context: SslContext,
    /// Which files (and PSK identity) this context was built from, for
    /// error messages.
    credentials: String,
}

impl TlsClient {
    pub fn load(files: &TlsClientFiles) -> Result<TlsClient, TlsError> {
        let mut b = SslContextBuilder::new(SslMethod::tls_client())?;
        b.set_min_proto_version(Some(SslVersion::TLS1_2))?;
        b.set_options(SslOptions::NO_COMPRESSION | SslOptions::NO_RENEGOTIATION);
        // The relay takes partial writes and may move a buffer before it
        // retries a write; see the module comment for RELEASE_BUFFERS.
        b.set_mode(SslMode::AUTO_RETRY | SslMode::ACCEPT_MOVING_WRITE_BUFFER | SslMode::ENABLE_PARTIAL_WRITE);
        // Also with a PSK: a server that does not take the key may go on
        // with a certificate, which must then fail (nothing is trusted).
        b.set_verify(SslVerifyMode::PEER);
        b.set_cipher_list(CIPHERS)?;
        let credentials;
        if let Some(dir) = &files.certificates {
            let ca = dir.join("ca-cert.pem");
            if !ca.is_file() {
                return Err(TlsError::file(&ca, "missing (the certificates directory needs ca-cert.pem, the CA that signed the server's certificate)"));
            }
            b.set_ca_file(&ca).map_err(|e| TlsError::file(&ca, e))?;
            let (cert, key) = (dir.join("client-cert.pem"), dir.join("client-key.pem"));
            if cert.exists() {
                b.set_certificate_chain_file(&cert).map_err(|e| TlsError::file(&cert, e))?;
                b.set_private_key_file(&key, SslFiletype::PEM).map_err(|e| TlsError::file(&key, e))?;
                b.check_private_key().map_err(|e| TlsError::file(&key, format!("does not match client-cert.pem: {e}")))?;
                credentials = format!("CA {}, client certificate {}", ca.display(), cert.display());
            } else {
                credentials = format!("CA {}, no client certificate", ca.display());
            }
        } else if let Some(path) = &files.psk {
            let keys = PskKeys::load(path)?;
            let (identity, key) = match &files.username {
                Some(u) => (u.clone(), keys.get(u).ok_or_else(|| TlsError::file(path, format!("no key for identity '{u}'")))?.to_vec()),
                None => keys.first().map(|(i, k)| (i.to_string(), k.to_vec())).ok_or_else(|| TlsError::file(path, "no keys in the file"))?,
            };
            credentials = format!("PSK identity '{identity}' from {}", path.display());
            let both = Arc::new((identity, key));
            b.set_cipher_list("ECDHE-PSK-CHACHA20-POLY1305:DHE-PSK-AES256-GCM-SHA384:PSK-AES256-GCM-SHA384:PSK-AES128-GCM-SHA256")?;
            b.set_psk_client_callback(move |_ssl, _hint, id_out, key_out| {
                let (identity, key) = (&both.0, &both.1);
                if identity.len() >= id_out.len() || key.len() > key_out.len() {
                    return Ok(0);
                }
                id_out[..identity.len()].copy_from_slice(identity.as_bytes());
                id_out[identity.len()] = 0;
                key_out[..key.len()].copy_from_slice(key);
                Ok(key.len())
            });
        } else {
            return Err(TlsError::Handshake("TLS needs --tls-certificates or --tls-psk".into()));
        }
        Ok(TlsClient { context: b.build(), credentials })
    }

    /// Which files and identity the context uses, e.g. "PSK identity
    /// 'alice' from /etc/nbdvirt/keys.psk".
    pub fn credentials(&self) -> &str {
        &self.credentials
    }

    /// Client handshake; `host` is checked against the server certificate
    /// when given (a TCP endpoint's host), as libnbd does, and sent as SNI
    /// if it is a name.
    pub fn connect<S: Read + Write>(&self, host: Option<&str>, socket: S) -> Result<SslStream<S>, TlsError> {
        let mut ssl = Ssl::new(&self.context)?;
        if let Some(host) = host {
            let param = ssl.param_mut();
            param.set_hostflags(X509CheckFlags::NO_PARTIAL_WILDCARDS);
            match host.parse::<IpAddr>() {
                Ok(ip) => param.set_ip(ip)?,
                Err(_) => {
                    param.set_host(host)?;
                    ssl.set_hostname(host)?;
                }
            }
        }
        ssl.connect(socket).map_err(|e| TlsError::Handshake(handshake_error(&e)))
    }
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TlsClient({})", self.credentials)
    }
}
