//! TLS for NBD's STARTTLS: credentials (X.509 in nbdkit's directory layout,
//! or psktool's PSK file), the server and client contexts built from them,
//! and a session that a reader thread and a reply writer can share.
//!
//! OpenSSL, not rustls: libnbd and qemu speak GnuTLS, and their PSK is
//! TLS external PSK, which rustls does not offer.

mod client;
mod peer;
mod psk;
mod server;
mod session;

pub use client::{TlsClient, TlsClientFiles};
pub use peer::TlsPeer;
pub use psk::PskKeys;
pub use server::{TlsFiles, TlsServer};
pub use session::TlsSession;

use std::path::PathBuf;

/// `server.tls`: what the server does with NBD_OPT_STARTTLS (proto.md's
/// NOTLS, SELECTIVETLS and FORCEDTLS modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsMode {
    /// STARTTLS is refused (`NBD_REP_ERR_POLICY`).
    #[default]
    Off,
    /// Clients may upgrade; volumes with `tls_only` require it.
    On,
    /// Every option but STARTTLS and ABORT needs TLS first.
    Require,
}

impl std::str::FromStr for TlsMode {
    type Err = String;
    fn from_str(s: &str) -> Result<TlsMode, String> {
        match s {
            "off" => Ok(TlsMode::Off),
            "on" => Ok(TlsMode::On),
            "require" => Ok(TlsMode::Require),
            other => Err(format!("'{other}' is not a TLS mode (off, on, require)")),
        }
    }
}

impl std::fmt::Display for TlsMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TlsMode::Off => "off",
            TlsMode::On => "on",
            TlsMode::Require => "require",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{path}:{line}: {message}")]
    PskLine { path: PathBuf, line: usize, message: String },
    #[error("TLS setup: {0}")]
    Setup(#[from] openssl::error::ErrorStack),
    #[error("TLS handshake: {0}")]
    Handshake(String),
    #[error("TLS: {0}")]
    Io(#[from] std::io::Error),
}

impl TlsError {
    fn file(path: &std::path::Path, message: impl std::fmt::Display) -> TlsError {
        TlsError::File { path: path.to_path_buf(), message: message.to_string() }
    }
}
