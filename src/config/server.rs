//! `[server]`: where the server listens, where it keeps its state, who
//! may control it, and the limits of its connections.

use super::parse_ctx::{ParseCtx, Quantity};
use super::{ConfigError, ControlGroup, ServerConfig, VolumeConfig};
use crate::defaults;
use crate::endpoint::Endpoint;
use nix::unistd::{Gid, Group};
use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    listen: Option<Vec<Spanned<String>>>,
    control: Option<Spanned<String>>,
    state_dir: Option<Spanned<String>>,
    io_threads: Option<Spanned<i64>>,
    max_connections: Option<Spanned<i64>>,
    max_inflight: Option<Spanned<Quantity>>,
    max_request: Option<Spanned<Quantity>>,
    shutdown_grace: Option<Spanned<Quantity>>,
    default_export: Option<Spanned<String>>,
    pause_timeout: Option<Spanned<Quantity>>,
    pause_retries: Option<Spanned<i64>>,
    busy_poll: Option<Spanned<Quantity>>,
    metrics: Option<Spanned<String>>,
    control_group: Option<Spanned<GroupRef>>,
    // Read by `security.rs`.
    pub(super) tls: Option<Spanned<String>>,
    pub(super) tls_certificates: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) tls_verify_peer: bool,
    pub(super) tls_psk: Option<Spanned<String>>,
    pub(super) handshake_timeout: Option<Spanned<Quantity>>,
    pub(super) max_connections_per_address: Option<Spanned<i64>>,
    pub(super) max_option_payload: Option<Spanned<Quantity>>,
    pub(super) max_export_name: Option<Spanned<i64>>,
}

/// `control_group = "ops"` or `control_group = 1234`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum GroupRef {
    Gid(i64),
    Name(String),
}

pub(super) fn parse_server(ctx: &ParseCtx<'_>, raw: Option<&Spanned<RawServer>>) -> Result<ServerConfig, ConfigError> {
    let empty = RawServer::default();
    let s = raw.map_or(&empty, |s| s.get_ref());
    let mut listen = Vec::new();
    for item in s.listen.iter().flatten() {
        let endpoint: Endpoint = item.get_ref().parse().map_err(|m: crate::endpoint::EndpointError| ctx.err(item, "server.listen", m.to_string()))?;
        listen.push(match endpoint {
            Endpoint::Unix(p) => Endpoint::Unix(ctx.path(&p.to_string_lossy())),
            other => other,
        });
    }
    if s.listen.is_none() {
        listen.push(defaults::LISTEN.parse().expect("the default endpoint parses"));
    }
    if listen.is_empty() {
        let line = raw.map(|r| ctx.line(r.span().start)).unwrap_or(1);
        return Err(ctx.err_at(line, Some("server.listen".into()), "at least one endpoint is needed"));
    }
    let state_dir = ctx.path(s.state_dir.as_ref().map_or(defaults::STATE_DIR, |d| d.get_ref()));
    let control = s.control.as_ref().map_or_else(|| state_dir.join(defaults::CONTROL_SOCKET), |c| ctx.path(c.get_ref()));
    let limits = super::limits::connection_limits(ctx, s.max_inflight.as_ref(), s.max_request.as_ref())?;
    let shutdown_grace = match &s.shutdown_grace {
        None => defaults::SHUTDOWN_GRACE,
        Some(q) => ctx.duration(q, "server.shutdown_grace")?,
    };
    let pause_timeout = match &s.pause_timeout {
        None => defaults::PAUSE_TIMEOUT,
        Some(q) => {
            let d = ctx.duration(q, "server.pause_timeout")?;
            // The Linux NBD client fails a request after 30 s; a pause must
            // end well before that.
            if d.is_zero() || d > defaults::PAUSE_TIMEOUT_MAX {
                return Err(ctx.err(q, "server.pause_timeout", format!("{d:?} must be above 0 and at most 20s (Linux NBD requests time out at 30s)")));
            }
            d
        }
    };
    let pause_retries = match &s.pause_retries {
        None => defaults::PAUSE_RETRIES,
        Some(n) if (0..=100).contains(n.get_ref()) => *n.get_ref() as u32,
        Some(n) => return Err(ctx.err(n, "server.pause_retries", format!("{} is out of range 0..=100", n.get_ref()))),
    };
    let busy_poll = match &s.busy_poll {
        None => defaults::BUSY_POLL,
        Some(q) => {
            let d = ctx.duration(q, "server.busy_poll")?;
            if d > std::time::Duration::from_millis(1) {
                return Err(ctx.err(q, "server.busy_poll", format!("{d:?} is above the maximum of 1ms")));
            }
            d
        }
    };
    Ok(ServerConfig {
        busy_poll,
        pause_timeout,
        pause_retries,
        listen,
        control,
        state_dir,
        io_threads: ctx.count(&s.io_threads, "server.io_threads", defaults::IO_THREADS, 1024)?,
        max_connections: ctx.count(&s.max_connections, "server.max_connections", defaults::MAX_CONNECTIONS, 65536)?,
        max_inflight: limits.max_inflight,
        max_request: limits.max_request,
        shutdown_grace,
        default_export: s.default_export.as_ref().map(|d| d.get_ref().clone()),
        metrics: s.metrics.as_ref().map(|m| metrics_endpoint(ctx, m)).transpose()?,
        control_group: s.control_group.as_ref().map(|g| control_group(ctx, g)).transpose()?,
        security: super::security::parse_server_security(ctx, s)?,
    })
}

/// `server.metrics`: `tcp:HOST:PORT` with a numeric port (HTTP over TCP
/// only; the host is resolved when the daemon binds it).
fn metrics_endpoint(ctx: &ParseCtx<'_>, m: &Spanned<String>) -> Result<Endpoint, ConfigError> {
    let text = m.get_ref();
    let endpoint: Endpoint = text.parse().map_err(|e: crate::endpoint::EndpointError| ctx.err(m, "server.metrics", e.to_string()))?;
    let Endpoint::Tcp(addr) = &endpoint else {
        return Err(ctx.err(m, "server.metrics", format!("'{text}': metrics are served over HTTP on tcp:HOST:PORT only")));
    };
    match addr.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(endpoint),
        _ => Err(ctx.err(m, "server.metrics", format!("'{text}': expected tcp:HOST:PORT with a port number 0-65535"))),
    }
}

/// `server.control_group`: a group name, looked up as chown(1) does (a
/// name first, then a number), or a numeric gid, which needs no entry in
/// the group database.
fn control_group(ctx: &ParseCtx<'_>, g: &Spanned<GroupRef>) -> Result<ControlGroup, ConfigError> {
    const FIELD: &str = "server.control_group";
    // (gid_t)-1 means "unchanged" to chown(2): never a group.
    let gid = |n: i64| u32::try_from(n).ok().filter(|gid| *gid != u32::MAX);
    match g.get_ref() {
        GroupRef::Gid(n) => {
            let gid = gid(*n).ok_or_else(|| ctx.err(g, FIELD, format!("{n} is not a gid (0 to 4294967294)")))?;
            let name = Group::from_gid(Gid::from_raw(gid)).ok().flatten().map_or_else(|| gid.to_string(), |group| group.name);
            Ok(ControlGroup { name, gid })
        }
        GroupRef::Name(name) => match Group::from_name(name) {
            Ok(Some(group)) => Ok(ControlGroup { name: name.clone(), gid: group.gid.as_raw() }),
            Ok(None) => match name.parse::<i64>().ok().and_then(gid) {
                Some(gid) => Ok(ControlGroup { name: name.clone(), gid }),
                None => Err(ctx.err(g, FIELD, format!("no group named '{name}' on this system (create it with groupadd, or give a numeric gid)"))),
            },
            Err(e) => Err(ctx.err(g, FIELD, format!("cannot look up group '{name}': {e}"))),
        },
    }
}

/// `default_export` must name a volume of the config.
pub(super) fn check_default_export(ctx: &ParseCtx<'_>, raw: Option<&Spanned<RawServer>>, server: &ServerConfig, volumes: &[VolumeConfig]) -> Result<(), ConfigError> {
    let Some(default) = &server.default_export else { return Ok(()) };
    if volumes.iter().any(|v| &v.name == default) {
        return Ok(());
    }
    let line = raw.and_then(|s| s.get_ref().default_export.as_ref()).map(|d| ctx.line(d.span().start));
    Err(ConfigError { file: ctx.file.into(), line, field: Some("server.default_export".into()), message: format!("no volume named '{default}'") })
}

#[cfg(test)]
mod tests {
    use super::super::Config;
    use std::path::Path;

    fn parse(value: &str) -> Result<Config, super::ConfigError> {
        Config::parse(&format!("[server]\nio_threads = 4\ncontrol_group = {value}\n"), "t.toml", Path::new(""))
    }

    #[test]
    fn control_group_is_resolved_to_a_gid_when_the_config_is_loaded() {
        // Group 0 exists on every Linux system; its name varies little but
        // is read from the database, not assumed.
        let root = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(0)).unwrap().expect("group 0 exists").name;
        let by_name = parse(&format!("\"{root}\"")).unwrap().server.control_group.unwrap();
        assert_eq!((by_name.name.as_str(), by_name.gid), (root.as_str(), 0));
        let by_number = parse("0").unwrap().server.control_group.unwrap();
        assert_eq!((by_number.name.as_str(), by_number.gid), (root.as_str(), 0));
        // A numeric gid needs no entry in the group database.
        let unnamed = parse("\"4000000000\"").unwrap().server.control_group.unwrap();
        assert_eq!((unnamed.name.as_str(), unnamed.gid), ("4000000000", 4_000_000_000));
        assert_eq!(Config::parse("", "t.toml", Path::new("")).unwrap().server.control_group, None);
    }

    #[test]
    fn an_unknown_control_group_names_the_field_and_the_line() {
        let e = parse("\"no-such-group-nbdvirt\"").unwrap_err();
        assert!(e.to_string().starts_with("t.toml:3: server.control_group: no group named 'no-such-group-nbdvirt'"), "{e}");
        for bad in ["-1", "4294967295", "\"\""] {
            let e = parse(bad).unwrap_err();
            assert_eq!((e.line, e.field.as_deref()), (Some(3), Some("server.control_group")), "{bad}: {e}");
        }
    }
}
