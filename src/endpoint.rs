//! Where a server listens and a client connects: `unix:PATH` or
//! `tcp:HOST:PORT`. Below the server, the config and the kernel client
//! (`attach`), which all name endpoints.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(String),
}

impl FromStr for Endpoint {
    type Err = EndpointError;
    fn from_str(s: &str) -> Result<Self, EndpointError> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(EndpointError::EmptyPath(s.into()));
            }
            Ok(Endpoint::Unix(PathBuf::from(path)))
        } else if let Some(addr) = s.strip_prefix("tcp:") {
            if !addr.contains(':') {
                return Err(EndpointError::NoPort(s.into()));
            }
            Ok(Endpoint::Tcp(addr.to_string()))
        } else {
            Err(EndpointError::Scheme(s.into()))
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// Why a text is not an endpoint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    #[error("'{0}': empty socket path")]
    EmptyPath(String),
    #[error("'{0}': expected tcp:HOST:PORT")]
    NoPort(String),
    #[error("'{0}': expected unix:PATH or tcp:HOST:PORT")]
    Scheme(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_endpoints() {
        assert_eq!("unix:/run/x.sock".parse::<Endpoint>(), Ok(Endpoint::Unix("/run/x.sock".into())));
        assert_eq!("tcp:127.0.0.1:10809".parse::<Endpoint>(), Ok(Endpoint::Tcp("127.0.0.1:10809".into())));
        assert_eq!("tcp:[::1]:10809".parse::<Endpoint>(), Ok(Endpoint::Tcp("[::1]:10809".into())));
        assert!("udp:1.2.3.4:5".parse::<Endpoint>().is_err());
        assert!("tcp:localhost".parse::<Endpoint>().is_err());
        assert!("unix:".parse::<Endpoint>().is_err());
    }
}
