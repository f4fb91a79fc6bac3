//! The client side, for `nbdvirt attach` over TLS (the kernel cannot speak
//! TLS, so the attach daemon relays): the same credential files as libnbd
//! and nbd-client read.

use super::psk::PskKeys;
use super::server::handshake_error;
use super::TlsError;
use openssl::ssl::{SslConnector, SslFiletype, SslMethod, SslStream, SslVerifyMode, SslVersion};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

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
    connector: SslConnector,
}

impl TlsClient {
    pub fn load(files: &TlsClientFiles) -> Result<TlsClient, TlsError> {
        let mut b = SslConnector::builder(SslMethod::tls_client())?;
        b.set_min_proto_version(Some(SslVersion::TLS1_2))?;
        if let Some(dir) = &files.certificates {
            let ca = dir.join("ca-cert.pem");
            b.set_ca_file(&ca).map_err(|e| TlsError::file(&ca, e))?;
            let (cert, key) = (dir.join("client-cert.pem"), dir.join("client-key.pem"));
            if cert.exists() {
                b.set_certificate_chain_file(&cert).map_err(|e| TlsError::file(&cert, e))?;
                b.set_private_key_file(&key, SslFiletype::PEM).map_err(|e| TlsError::file(&key, e))?;
            }
            b.set_verify(SslVerifyMode::PEER);
        } else if let Some(path) = &files.psk {
            let keys = PskKeys::load(path)?;
            let (identity, key) = match &files.username {
                Some(u) => (u.clone(), keys.get(u).ok_or_else(|| TlsError::file(path, format!("no key for identity '{u}'")))?.to_vec()),
                None => keys.first().map(|(i, k)| (i.to_string(), k.to_vec())).expect("a loaded key file has a key"),
            };
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
        Ok(TlsClient { connector: b.build() })
    }

    /// Client handshake; `host` is checked against the server certificate
    /// when given (a TCP endpoint's host), as libnbd does.
    pub fn connect<S: Read + Write>(&self, host: Option<&str>, socket: S) -> Result<SslStream<S>, TlsError> {
        let mut config = self.connector.configure()?;
        if host.is_none() {
            config.set_verify_hostname(false);
        }
        let name = host.unwrap_or("localhost");
        config.connect(name, socket).map_err(|e| TlsError::Handshake(handshake_error(&e)))
    }
}
