//! Who may use which export: the rules of a volume's `allow` and
//! `read_only_for` lists, and the identity of a connected client they are
//! matched against. Pure logic; the server fills in the identity.

use ipnet::IpNet;
use std::fmt;
use std::net::IpAddr;

/// One rule, as written in the config: `cert:CN=…`, `cert:SAN=…`,
/// `psk:IDENTITY`, `unix:uid=N`, `unix:gid=N` or `tcp:CIDR`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    CertCn(String),
    CertSan(String),
    Psk(String),
    UnixUid(u32),
    UnixGid(u32),
    Tcp(IpNet),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{rule}': {message} (rules: cert:CN=NAME, cert:SAN=NAME, psk:IDENTITY, unix:uid=N, unix:gid=N, tcp:CIDR)")]
pub struct RuleError {
    pub rule: String,
    pub message: String,
}

impl std::str::FromStr for Rule {
    type Err = RuleError;
    fn from_str(text: &str) -> Result<Rule, RuleError> {
        let err = |message: &str| RuleError { rule: text.to_string(), message: message.to_string() };
        let (kind, value) = text.split_once(':').ok_or_else(|| err("no kind before ':'"))?;
        let nonempty = |v: &str| if v.is_empty() { Err(err("empty value")) } else { Ok(v.to_string()) };
        let id = |v: &str| v.parse::<u32>().map_err(|_| err("not a number"));
        match kind {
            "cert" => match value.split_once('=') {
                Some(("CN", v)) => Ok(Rule::CertCn(nonempty(v)?)),
                Some(("SAN", v)) => Ok(Rule::CertSan(nonempty(v)?)),
                _ => Err(err("expected cert:CN=NAME or cert:SAN=NAME")),
            },
            "psk" => Ok(Rule::Psk(nonempty(value)?)),
            "unix" => match value.split_once('=') {
                Some(("uid", v)) => Ok(Rule::UnixUid(id(v)?)),
                Some(("gid", v)) => Ok(Rule::UnixGid(id(v)?)),
                _ => Err(err("expected unix:uid=N or unix:gid=N")),
            },
            "tcp" => {
                let net = match value.parse::<IpNet>() {
                    Ok(n) => n,
                    Err(_) => IpNet::from(value.parse::<IpAddr>().map_err(|_| err("not an address or CIDR"))?),
                };
                Ok(Rule::Tcp(net.trunc()))
            }
            _ => Err(err("unknown kind")),
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::CertCn(v) => write!(f, "cert:CN={v}"),
            Rule::CertSan(v) => write!(f, "cert:SAN={v}"),
            Rule::Psk(v) => write!(f, "psk:{v}"),
            Rule::UnixUid(v) => write!(f, "unix:uid={v}"),
            Rule::UnixGid(v) => write!(f, "unix:gid={v}"),
            Rule::Tcp(v) => write!(f, "tcp:{v}"),
        }
    }
}

/// What a connection has proven about its client.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientIdentity {
    /// Source address of a TCP client.
    pub addr: Option<IpAddr>,
    /// Peer credentials of a Unix-socket client.
    pub unix: Option<UnixPeer>,
    /// TLS is running.
    pub tls: bool,
    pub cert_cn: Vec<String>,
    pub cert_san: Vec<String>,
    pub psk: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnixPeer {
    pub pid: i32,
    pub uid: u32,
    /// Primary group, then supplementary groups.
    pub gids: Vec<u32>,
}

impl Rule {
    pub fn matches(&self, who: &ClientIdentity) -> bool {
        match self {
            Rule::CertCn(v) => who.cert_cn.iter().any(|c| c == v),
            Rule::CertSan(v) => who.cert_san.iter().any(|c| c == v),
            Rule::Psk(v) => who.psk.as_deref() == Some(v),
            Rule::UnixUid(v) => who.unix.as_ref().is_some_and(|u| u.uid == *v),
            Rule::UnixGid(v) => who.unix.as_ref().is_some_and(|u| u.gids.contains(v)),
            Rule::Tcp(net) => who.addr.is_some_and(|a| net.contains(&canonical(a))),
        }
    }
}

/// An IPv4 client on a dual-stack socket arrives as ::ffff:a.b.c.d.
fn canonical(a: IpAddr) -> IpAddr {
    match a {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(a, IpAddr::V4),
        v4 => v4,
    }
}

/// A volume's access settings (`tls_only`, `allow`, `read_only_for`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportAccess {
    pub tls_only: bool,
    /// Empty: everyone.
    pub allow: Vec<Rule>,
    pub read_only_for: Vec<Rule>,
}

impl ExportAccess {
    pub fn allows(&self, who: &ClientIdentity) -> bool {
        self.allow.is_empty() || self.allow.iter().any(|r| r.matches(who))
    }

    pub fn read_only_for(&self, who: &ClientIdentity) -> bool {
        self.read_only_for.iter().any(|r| r.matches(who))
    }
}

impl fmt::Display for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(a) = self.addr {
            parts.push(format!("tcp:{a}"));
        }
        if let Some(u) = &self.unix {
            parts.push(format!("unix:pid={},uid={},gids={:?}", u.pid, u.uid, u.gids));
        }
        parts.extend(self.cert_cn.iter().map(|c| format!("cert:CN={c}")));
        parts.extend(self.psk.iter().map(|p| format!("psk:{p}")));
        if self.tls && self.cert_cn.is_empty() && self.psk.is_none() {
            parts.push("tls".into());
        }
        f.write_str(&parts.join(" "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(s: &str) -> Rule {
        s.parse().unwrap()
    }

    #[test]
    fn rules_parse_print_and_match() {
        for text in ["cert:CN=alice", "cert:SAN=db.example", "psk:bob", "unix:uid=1000", "unix:gid=27", "tcp:127.0.0.2/32", "tcp:10.0.0.0/8"] {
            assert_eq!(rule(text).to_string(), text);
        }
        assert_eq!(rule("tcp:127.0.0.1").to_string(), "tcp:127.0.0.1/32");
        assert_eq!(rule("tcp:10.1.2.3/8").to_string(), "tcp:10.0.0.0/8");
        for bad in ["alice", "cert:O=x", "cert:CN=", "unix:uid=x", "unix:pid=1", "tcp:300.0.0.1", "dns:x", "psk:"] {
            assert!(bad.parse::<Rule>().is_err(), "{bad}");
        }
        let tcp = ClientIdentity { addr: Some("::ffff:127.0.0.2".parse().unwrap()), ..Default::default() };
        assert!(rule("tcp:127.0.0.2/32").matches(&tcp));
        assert!(!rule("tcp:127.0.0.1/32").matches(&tcp));
        let unix = ClientIdentity { unix: Some(UnixPeer { pid: 1, uid: 1000, gids: vec![100, 27] }), ..Default::default() };
        assert!(rule("unix:uid=1000").matches(&unix) && rule("unix:gid=27").matches(&unix));
        assert!(!rule("unix:uid=0").matches(&unix) && !rule("tcp:0.0.0.0/0").matches(&unix));
        let tls = ClientIdentity { tls: true, cert_cn: vec!["alice".into()], psk: Some("bob".into()), ..Default::default() };
        assert!(rule("cert:CN=alice").matches(&tls) && rule("psk:bob").matches(&tls) && !rule("psk:alice").matches(&tls));
        let access = ExportAccess { allow: vec![rule("psk:bob")], read_only_for: vec![rule("cert:CN=alice")], ..Default::default() };
        assert!(access.allows(&tls) && access.read_only_for(&tls));
        assert!(!access.allows(&unix) && ExportAccess::default().allows(&unix));
    }
}
