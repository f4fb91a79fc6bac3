//! `--connect A,B,…`: the servers (cluster nodes) one device may use, tried
//! in turn. All of a device's connections go to one server at a time; a
//! reconnect starts with the server after the one that died.

use super::client::{self, Connection, ExportInfo, TlsTarget};
use super::error::AttachError;
use super::AttachOptions;
use crate::endpoint::Endpoint;
use crate::nbd::TFLAG_CAN_MULTI_CONN;
use crate::tls::TlsClient;
use std::time::Duration;

/// How long one server may take to connect and haggle before the next is
/// tried.
const PER_SERVER: Duration = Duration::from_secs(10);

/// Parses `unix:PATH` / `tcp:HOST:PORT`, several separated by commas.
pub fn parse_list(text: &str) -> Result<Vec<Endpoint>, String> {
    let list: Vec<Endpoint> = text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|e: crate::endpoint::EndpointError| format!("'{s}': {e}")))
        .collect::<Result<_, _>>()?;
    if list.is_empty() {
        return Err("no endpoint given".into());
    }
    Ok(list)
}

/// The name the device's backend identifier gives its servers.
pub fn joined(list: &[Endpoint]) -> String {
    list.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
}

/// The hostname to check in `endpoint`'s certificate.
fn tls_hostname(opts: &AttachOptions, endpoint: &Endpoint) -> Option<String> {
    let tls = opts.tls.as_ref()?;
    if let Some(h) = &tls.hostname {
        return Some(h.clone());
    }
    match endpoint {
        Endpoint::Tcp(addr) => addr.rsplit_once(':').map(|(host, _)| host.trim_start_matches('[').trim_end_matches(']').to_string()),
        Endpoint::Unix(_) => None,
    }
}

/// Connects every connection of the device to one server: the first of
/// `opts.endpoints` from `first` on that accepts them all. Returns the
/// connections, what the server said of the export, and which server it was.
pub fn connect_all(opts: &AttachOptions, first: usize) -> Result<(Vec<Connection>, ExportInfo, usize), AttachError> {
    let tls_client = opts.tls.as_ref().map(|t| TlsClient::load(&t.files)).transpose().map_err(AttachError::TlsCredentials)?;
    let n = opts.endpoints.len();
    let mut failures = Vec::new();
    for i in (0..n).map(|k| (first + k) % n) {
        let endpoint = &opts.endpoints[i];
        let hostname = tls_hostname(opts, endpoint);
        let target = tls_client.as_ref().map(|client| TlsTarget { client, hostname: hostname.as_deref() });
        let connect = || client::connect(endpoint, &opts.volume, PER_SERVER, target.as_ref());
        let attempt = connect().and_then(|(conn, info)| {
            let mut conns = vec![conn];
            for _ in 1..opts.connections {
                conns.push(connect()?.0);
            }
            Ok((conns, info))
        });
        match attempt {
            Ok((_, info)) if opts.connections > 1 && info.flags & TFLAG_CAN_MULTI_CONN == 0 => return Err(AttachError::NoMultiConn(opts.volume.clone())),
            Ok((conns, info)) => return Ok((conns, info, i)),
            // One server: its own error, as before there were lists.
            Err(e) if n == 1 => return Err(e),
            Err(e) => failures.push(e.to_string()),
        }
    }
    Err(AttachError::NoServer(failures.join("; ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse_and_name_the_bad_item() {
        let list = parse_list("tcp:127.0.0.1:1, unix:/run/b.sock").unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(joined(&list), "tcp:127.0.0.1:1,unix:/run/b.sock");
        assert!(parse_list("tcp:127.0.0.1:1,bogus").unwrap_err().starts_with("'bogus': "));
        assert!(parse_list(" , ").is_err());
    }
}
