//! The server's TLS context, built from the configured credential files
//! (and built again at every reload, so rotated files take effect for new
//! connections).

use super::peer::{psk_identity_index, TlsPeer};
use super::psk::PskKeys;
use super::TlsError;
use openssl::ssl::{SslAcceptor, SslFiletype, SslMethod, SslOptions, SslStream, SslVerifyMode, SslVersion};
use openssl::x509::store::X509Lookup;
use openssl::x509::verify::X509VerifyFlags;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where the credentials are (`server.tls_certificates`, `tls_psk`,
/// `tls_verify_peer`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsFiles {
    /// nbdkit's layout: `ca-cert.pem`, `server-cert.pem`, `server-key.pem`,
    /// optional `ca-crl.pem`.
    pub certificates: Option<PathBuf>,
    /// Require a client certificate signed by `ca-cert.pem`.
    pub verify_peer: bool,
    /// psktool's `identity:hexkey` file.
    pub psk: Option<PathBuf>,
}

pub struct TlsServer {
    acceptor: SslAcceptor,
}

impl std::fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsServer")
    }
}

/// TLS 1.3 suites, AES-GCM first.
const SUITES: &str = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256";
const SUITES_PSK: &str = "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256";

/// PSK cipher suites for TLS 1.2 clients (TLS 1.3 suites serve PSK as they
/// are), strongest first, then Mozilla's intermediate certificate suites.
const CIPHERS_WITH_PSK: &str = "DHE-PSK-AES128-GCM-SHA256:DHE-PSK-AES256-GCM-SHA384:ECDHE-PSK-CHACHA20-POLY1305:\
    DHE-PSK-CHACHA20-POLY1305:ECDHE-PSK-AES256-CBC-SHA384:PSK-AES256-GCM-SHA384:PSK-AES128-GCM-SHA256:PSK-CHACHA20-POLY1305:\
    ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:\
    ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384";

impl TlsServer {
    /// Reads every credential file; any problem names the file.
    pub fn load(files: &TlsFiles) -> Result<TlsServer, TlsError> {
        let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server())?;
        b.set_min_proto_version(Some(SslVersion::TLS1_2))?;
        // Needed once client certificates are asked for: OpenSSL refuses
        // TLS 1.3 PSKs (ours included) without a session id context.
        b.set_session_id_context(b"nbdvirt")?;
        // Renegotiation would let a client make our writer wait on reads.
        // Our order wins: GnuTLS clients put ChaCha20 before AES-GCM, which
        // is slower wherever the CPU has AES instructions.
        b.set_options(SslOptions::NO_RENEGOTIATION | SslOptions::IGNORE_UNEXPECTED_EOF | SslOptions::CIPHER_SERVER_PREFERENCE);
        b.set_ciphersuites(SUITES)?;
        // One read(2) takes every record that has arrived, not a header and
        // then a body per record (decrypted bytes stay visible to
        // `pending`; raw ones are taken by the next read without waiting).
        b.set_read_ahead(true);
        if let Some(dir) = &files.certificates {
            let cert = need(dir, "server-cert.pem")?;
            let key = need(dir, "server-key.pem")?;
            b.set_certificate_chain_file(&cert).map_err(|e| TlsError::file(&cert, e))?;
            b.set_private_key_file(&key, SslFiletype::PEM).map_err(|e| TlsError::file(&key, e))?;
            b.check_private_key().map_err(|e| TlsError::file(&key, format!("does not match server-cert.pem: {e}")))?;
            let ca = dir.join("ca-cert.pem");
            if ca.exists() {
                b.set_ca_file(&ca).map_err(|e| TlsError::file(&ca, e))?;
                let names = openssl::x509::X509::stack_from_pem(&std::fs::read(&ca).map_err(|e| TlsError::file(&ca, e))?)
                    .map_err(|e| TlsError::file(&ca, e))?;
                let mut list = openssl::stack::Stack::new()?;
                for c in names {
                    list.push(c.subject_name().to_owned()?)?;
                }
                b.set_client_ca_list(list);
                let crl = dir.join("ca-crl.pem");
                if crl.exists() {
                    let lookup = b.cert_store_mut().add_lookup(X509Lookup::file())?;
                    lookup.load_crl_file(&crl, SslFiletype::PEM).map_err(|e| TlsError::file(&crl, e))?;
                    b.cert_store_mut().set_flags(X509VerifyFlags::CRL_CHECK)?;
                }
                // Asked for even without verify_peer, so that `cert:` access
                // rules can see a certificate; one that is sent is checked.
                let mode = if files.verify_peer { SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT } else { SslVerifyMode::PEER };
                b.set_verify(mode);
            } else if files.verify_peer {
                return Err(TlsError::file(&ca, "tls_verify_peer needs the CA that signs client certificates"));
            }
        } else if files.verify_peer {
            return Err(TlsError::Handshake("tls_verify_peer needs tls_certificates".into()));
        }
        if let Some(path) = &files.psk {
            let keys = Arc::new(PskKeys::load(path)?);
            b.set_cipher_list(CIPHERS_WITH_PSK)?;
            // OpenSSL's PSK callback yields a SHA-256 PSK: a TLS 1.3 suite
            // on SHA-384 would skip it and fall back to the certificate,
            // which a PSK client cannot check.
            b.set_ciphersuites(SUITES_PSK)?;
            let index = psk_identity_index()?;
            b.set_psk_server_callback(move |ssl, identity, out| {
                let identity = identity.and_then(|i| std::str::from_utf8(i).ok()).unwrap_or("");
                let Some(key) = keys.get(identity).filter(|k| k.len() <= out.len()) else {
                    tracing::info!(identity, "TLS: unknown PSK identity");
                    return Ok(0); // fails the handshake
                };
                out[..key.len()].copy_from_slice(key);
                ssl.set_ex_data(index, identity.to_string());
                Ok(key.len())
            });
        }
        if files.certificates.is_none() && files.psk.is_none() {
            return Err(TlsError::Handshake("TLS needs tls_certificates or tls_psk".into()));
        }
        Ok(TlsServer { acceptor: b.build() })
    }

    /// Runs the server side of the handshake on `socket` (blocking; the
    /// caller bounds it with socket timeouts).
    pub fn accept<S: Read + Write>(&self, socket: S) -> Result<(SslStream<S>, TlsPeer), TlsError> {
        let stream = self.acceptor.accept(socket).map_err(|e| TlsError::Handshake(handshake_error(&e)))?;
        let peer = TlsPeer::of(stream.ssl());
        Ok((stream, peer))
    }
}

fn need(dir: &Path, name: &str) -> Result<PathBuf, TlsError> {
    let path = dir.join(name);
    if !path.is_file() {
        return Err(TlsError::file(&path, "missing (tls_certificates expects ca-cert.pem, server-cert.pem, server-key.pem)"));
    }
    Ok(path)
}

pub(super) fn handshake_error<S>(e: &openssl::ssl::HandshakeError<S>) -> String {
    match e {
        openssl::ssl::HandshakeError::SetupFailure(s) => s.to_string(),
        openssl::ssl::HandshakeError::Failure(m) | openssl::ssl::HandshakeError::WouldBlock(m) => {
            let verify = m.ssl().verify_result();
            if verify != openssl::x509::X509VerifyResult::OK {
                format!("{} (certificate: {})", m.error(), verify.error_string())
            } else {
                m.error().to_string()
            }
        }
    }
}
