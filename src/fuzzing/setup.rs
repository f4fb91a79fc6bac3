//! A handshake case's input: two setup bytes, then the client's bytes.
//! Putting the server's settings and the transport's behaviour in the
//! input itself lets a coverage-guided fuzzer explore them like any other
//! byte, and makes every corpus file a complete, replayable case.
//!
//! Byte 0 (server): bits 0-1 the TLS mode (0 off, 1 on, 2 require, 3 on);
//! bit 2 small limits (max_option_payload 512, max_export_name 4);
//! bits 3-4 both set: the server is stopping.
//! Byte 1 (transport): bits 0-1 the most bytes one read returns (1, 3, 16,
//! unlimited); bit 2 STARTTLS fails; bits 3-4 what TLS proves (psk:alice,
//! psk:bob, a certificate with CN=alice, nothing); bits 5-6 where the
//! client connects from (tcp 10.1.2.3, tcp 192.0.2.7, unix uid 0, unix uid
//! 1000); bit 7 the client stops reading after 256 bytes of output.

use super::fixture::{Fixture, Origin, Peer};
use crate::access::{ClientIdentity, UnixPeer};
use crate::server::Security;
use crate::tls::{TlsMode, TlsPeer};

#[derive(Debug, Clone)]
pub struct Setup {
    pub mode: TlsMode,
    pub max_option_payload: u32,
    pub max_export_name: usize,
    pub stopping: bool,
    pub chunk: usize,
    pub tls_fails: bool,
    pub peer: Peer,
    pub origin: Origin,
    pub out_limit: usize,
}

/// Bytes of setup before the client's script.
pub const SETUP_LEN: usize = 2;

impl Setup {
    /// The setup and the client's script (missing setup bytes read as 0).
    pub fn parse(input: &[u8]) -> (Setup, &[u8]) {
        let b0 = input.first().copied().unwrap_or(0);
        let b1 = input.get(1).copied().unwrap_or(0);
        let small = b0 & 4 != 0;
        let setup = Setup {
            mode: [TlsMode::Off, TlsMode::On, TlsMode::Require, TlsMode::On][(b0 & 3) as usize],
            max_option_payload: if small { 512 } else { crate::defaults::MAX_OPTION_PAYLOAD },
            max_export_name: if small { 4 } else { crate::defaults::MAX_EXPORT_NAME },
            stopping: b0 & 0x18 == 0x18,
            chunk: [1, 3, 16, usize::MAX][(b1 & 3) as usize],
            tls_fails: b1 & 4 != 0,
            peer: [Peer::PskAlice, Peer::PskBob, Peer::CertAlice, Peer::Anonymous][((b1 >> 3) & 3) as usize],
            origin: [Origin::TcpLan, Origin::TcpOther, Origin::UnixRoot, Origin::UnixUser][((b1 >> 5) & 3) as usize],
            out_limit: if b1 & 0x80 != 0 { 256 } else { usize::MAX },
        };
        (setup, input.get(SETUP_LEN..).unwrap_or_default())
    }

    /// The server's settings for this case.
    pub fn security(&self, fixture: &Fixture) -> Security {
        Security {
            tls: self.mode,
            tls_server: (self.mode != TlsMode::Off).then(|| fixture.tls_server.clone()),
            exports: fixture.access.clone(),
            max_option_payload: self.max_option_payload,
            max_export_name: self.max_export_name,
            ..Security::default()
        }
    }

    /// The client as the server identifies it on accept.
    pub fn identity(&self) -> ClientIdentity {
        let unix = |uid| Some(UnixPeer { pid: 4242, uid, gids: vec![uid] });
        match self.origin {
            Origin::TcpLan => ClientIdentity { addr: Some([10, 1, 2, 3].into()), ..ClientIdentity::default() },
            Origin::TcpOther => ClientIdentity { addr: Some([192, 0, 2, 7].into()), ..ClientIdentity::default() },
            Origin::UnixRoot => ClientIdentity { unix: unix(0), ..ClientIdentity::default() },
            Origin::UnixUser => ClientIdentity { unix: unix(1000), ..ClientIdentity::default() },
        }
    }

    /// What a successful STARTTLS proves.
    pub fn tls_peer(&self) -> TlsPeer {
        let protocol = "fuzz (no TLS)".to_string();
        match self.peer {
            Peer::PskAlice => TlsPeer { psk_identity: Some("alice".into()), protocol, ..TlsPeer::default() },
            Peer::PskBob => TlsPeer { psk_identity: Some("bob".into()), protocol, ..TlsPeer::default() },
            Peer::CertAlice => TlsPeer { cert_cn: vec!["alice".into()], cert_san: vec!["alice.example".into()], protocol, ..TlsPeer::default() },
            Peer::Anonymous => TlsPeer { protocol, ..TlsPeer::default() },
        }
    }

    /// A small number naming the server side of the setup (for features).
    pub fn server_class(&self) -> u64 {
        let mode = match self.mode {
            TlsMode::Off => 0,
            TlsMode::On => 1,
            TlsMode::Require => 2,
        };
        mode | ((self.max_export_name < 16) as u64 * 4) | ((self.stopping as u64) * 8)
    }
}
