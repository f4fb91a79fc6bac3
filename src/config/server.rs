//! `[server]`: where the server listens, where it keeps its state, and
//! the limits of its connections.

use super::parse_ctx::{ParseCtx, Quantity};
use super::{ConfigError, ServerConfig, VolumeConfig};
use crate::defaults;
use crate::endpoint::Endpoint;
use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    listen: Option<Vec<Spanned<String>>>,
    control: Option<Spanned<String>>,
    state_dir: Option<Spanned<String>>,
    io_threads: Option<Spanned<i64>>,
    max_connections: Option<Spanned<i64>>,
    max_inflight: Option<Spanned<Quantity>>,
    shutdown_grace: Option<Spanned<Quantity>>,
    default_export: Option<Spanned<String>>,
    pause_timeout: Option<Spanned<Quantity>>,
    pause_retries: Option<Spanned<i64>>,
    busy_poll: Option<Spanned<Quantity>>,
    metrics: Option<Spanned<String>>,
}

pub(super) fn parse_server(ctx: &ParseCtx<'_>, raw: Option<&Spanned<RawServer>>) -> Result<ServerConfig, ConfigError> {
    let empty = RawServer {
        listen: None,
        control: None,
        state_dir: None,
        io_threads: None,
        max_connections: None,
        max_inflight: None,
        shutdown_grace: None,
        default_export: None,
        pause_timeout: None,
        pause_retries: None,
        busy_poll: None,
        metrics: None,
    };
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
    let max_inflight = match &s.max_inflight {
        None => defaults::MAX_INFLIGHT_BYTES,
        Some(q) => {
            let v = ctx.size(q, "server.max_inflight")?;
            if v < crate::nbd::MAX_PAYLOAD as u64 {
                return Err(ctx.err(q, "server.max_inflight", format!("must be at least 32MiB (the largest request), got {v}")));
            }
            v
        }
    };
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
        max_inflight,
        shutdown_grace,
        default_export: s.default_export.as_ref().map(|d| d.get_ref().clone()),
        metrics: s.metrics.as_ref().map(|m| metrics_endpoint(ctx, m)).transpose()?,
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

/// `default_export` must name a volume of the config.
pub(super) fn check_default_export(ctx: &ParseCtx<'_>, raw: Option<&Spanned<RawServer>>, server: &ServerConfig, volumes: &[VolumeConfig]) -> Result<(), ConfigError> {
    let Some(default) = &server.default_export else { return Ok(()) };
    if volumes.iter().any(|v| &v.name == default) {
        return Ok(());
    }
    let line = raw.and_then(|s| s.get_ref().default_export.as_ref()).map(|d| ctx.line(d.span().start));
    Err(ConfigError { file: ctx.file.into(), line, field: Some("server.default_export".into()), message: format!("no volume named '{default}'") })
}
