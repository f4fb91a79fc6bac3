//! Who the other end of a TLS session proved to be.

use openssl::ex_data::Index;
use openssl::ssl::{Ssl, SslRef};
use openssl::x509::X509VerifyResult;
use std::sync::OnceLock;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsPeer {
    /// Common names of a client certificate that verified.
    pub cert_cn: Vec<String>,
    /// Subject alternative names (DNS, e-mail, URI, IP) of that certificate.
    pub cert_san: Vec<String>,
    /// The PSK identity the client used.
    pub psk_identity: Option<String>,
    /// e.g. "TLSv1.3 TLS_AES_256_GCM_SHA384".
    pub protocol: String,
}

/// Where the PSK callback leaves the identity it accepted: OpenSSL keeps it
/// for TLS 1.2 only.
pub(super) fn psk_identity_index() -> Result<Index<Ssl, String>, openssl::error::ErrorStack> {
    static INDEX: OnceLock<Index<Ssl, String>> = OnceLock::new();
    if let Some(i) = INDEX.get() {
        return Ok(*i);
    }
    let index = Ssl::new_ex_index()?;
    Ok(*INDEX.get_or_init(|| index))
}

impl TlsPeer {
    pub(super) fn of(ssl: &SslRef) -> TlsPeer {
        let mut peer = TlsPeer {
            protocol: format!("{} {}", ssl.version_str(), ssl.current_cipher().map_or("?", |c| c.name())),
            ..TlsPeer::default()
        };
        peer.psk_identity = psk_identity_index().ok().and_then(|i| ssl.ex_data(i).cloned());
        // A certificate counts only if it verified against our CA.
        if let Some(cert) = ssl.peer_certificate().filter(|_| ssl.verify_result() == X509VerifyResult::OK) {
            for entry in cert.subject_name().entries_by_nid(openssl::nid::Nid::COMMONNAME) {
                if let Ok(s) = String::from_utf8(entry.data().as_slice().to_vec()) {
                    peer.cert_cn.push(s);
                }
            }
            for name in cert.subject_alt_names().into_iter().flatten() {
                let text = name
                    .dnsname()
                    .or(name.email())
                    .or(name.uri())
                    .map(str::to_string)
                    .or_else(|| name.ipaddress().and_then(ip_text));
                peer.cert_san.extend(text);
            }
        }
        peer
    }
}

fn ip_text(raw: &[u8]) -> Option<String> {
    match raw.len() {
        4 => Some(std::net::Ipv4Addr::from(<[u8; 4]>::try_from(raw).ok()?).to_string()),
        16 => Some(std::net::Ipv6Addr::from(<[u8; 16]>::try_from(raw).ok()?).to_string()),
        _ => None,
    }
}
