//! TOML → checked `Config`. Every field is read with its span so that an
//! error can name its line.

use super::parse_ctx::{valid_name, ParseCtx, Quantity};
use super::{BackendConfig, Config, ConfigError, ServerConfig, VolumeConfig};
use crate::backend::BackendSpec;
use crate::map::{validate_alignment, validate_exclusive, validate_layout, Extent, MapError, MappingTable, TargetSpec};
use crate::defaults;
use crate::endpoint::Endpoint;
use serde::Deserialize;
use std::collections::HashMap;
use std::path::Path;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    server: Option<Spanned<RawServer>>,
    #[serde(default)]
    backend: Vec<Spanned<RawBackend>>,
    #[serde(default)]
    volume: Vec<Spanned<RawVolume>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
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
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    name: Spanned<String>,
    path: Option<Spanned<String>>,
    size: Option<Spanned<Quantity>>,
    #[serde(default)]
    shared: bool,
    #[serde(default)]
    direct: bool,
    #[serde(default)]
    memory: bool,
    #[serde(default)]
    read_only: bool,
    delay: Option<Spanned<Quantity>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVolume {
    name: Spanned<String>,
    #[serde(default)]
    description: String,
    #[serde(default)]
    read_only: bool,
    block_size: Option<Spanned<Quantity>>,
    #[serde(default)]
    extent: Vec<Spanned<RawExtent>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExtent {
    start: Option<Spanned<Quantity>>,
    length: Spanned<Quantity>,
    backend: Option<Spanned<String>>,
    backend_offset: Option<Spanned<Quantity>>,
    #[serde(default)]
    zero: bool,
}

/// Config lines of one extent's keys (the header's where a key is absent).
struct ExtentLines {
    start: usize,
    length: usize,
    backend: usize,
    backend_offset: usize,
    header: usize,
}

pub fn parse(text: &str, file: &str, base: &Path) -> Result<Config, ConfigError> {
    let ctx = ParseCtx { text, file, base };
    let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError {
        file: file.into(),
        line: e.span().map(|s| ctx.line(s.start)),
        field: None,
        message: e.message().trim().to_string(),
    })?;
    let server = parse_server(&ctx, raw.server.as_ref())?;
    let backends = parse_backends(&ctx, &raw.backend)?;
    let volumes = parse_volumes(&ctx, &raw.volume, &backends)?;
    if let Some(default) = &server.default_export {
        if !volumes.iter().any(|v| &v.name == default) {
            let line = raw.server.as_ref().and_then(|s| s.get_ref().default_export.as_ref()).map(|d| ctx.line(d.span().start));
            return Err(ConfigError {
                file: file.into(),
                line,
                field: Some("server.default_export".into()),
                message: format!("no volume named '{default}'"),
            });
        }
    }
    Ok(Config { source: None, server, backends, volumes })
}

fn parse_server(ctx: &ParseCtx<'_>, raw: Option<&Spanned<RawServer>>) -> Result<ServerConfig, ConfigError> {
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
    })
}

fn parse_backends(ctx: &ParseCtx<'_>, raw: &[Spanned<RawBackend>]) -> Result<Vec<BackendConfig>, ConfigError> {
    let mut out: Vec<BackendConfig> = Vec::new();
    for item in raw {
        let b = item.get_ref();
        let name = b.name.get_ref();
        if !valid_name(name) {
            return Err(ctx.err(&b.name, "backend.name", format!("'{name}' is not a valid name (letters, digits, - _ . : @ +)")));
        }
        if out.iter().any(|o| &o.spec.name == name) {
            return Err(ctx.err(&b.name, "backend.name", format!("backend '{name}' is defined twice")));
        }
        let size = b.size.as_ref().map(|s| ctx.size(s, "backend.size")).transpose()?;
        if size == Some(0) {
            return Err(ctx.err(b.size.as_ref().expect("checked"), "backend.size", "size must be greater than 0"));
        }
        let path = match (&b.path, b.memory) {
            (Some(p), false) => Some(ctx.path(p.get_ref())),
            (None, true) => {
                if size.is_none() {
                    return Err(ctx.err(&b.name, "backend.size", format!("memory backend '{name}' needs a size")));
                }
                None
            }
            (Some(p), true) => return Err(ctx.err(p, "backend.path", "a memory backend has no path")),
            (None, false) => return Err(ctx.err(&b.name, "backend.path", format!("backend '{name}' needs a path (or memory = true)"))),
        };
        out.push(BackendConfig {
            spec: BackendSpec {
                name: name.clone(),
                path,
                size,
                direct: b.direct,
                read_only: b.read_only,
                delay: b.delay.as_ref().map(|d| ctx.duration(d, "backend.delay")).transpose()?,
            },
            shared: b.shared,
            line: ctx.line(item.span().start),
        });
    }
    Ok(out)
}

fn parse_volumes(ctx: &ParseCtx<'_>, raw: &[Spanned<RawVolume>], backends: &[BackendConfig]) -> Result<Vec<VolumeConfig>, ConfigError> {
    let mut out: Vec<VolumeConfig> = Vec::new();
    for item in raw {
        let v = item.get_ref();
        let name = v.name.get_ref();
        if !valid_name(name) {
            return Err(ctx.err(&v.name, "volume.name", format!("'{name}' is not a valid export name (letters, digits, - _ . : @ +)")));
        }
        if out.iter().any(|o| &o.name == name) {
            return Err(ctx.err(&v.name, "volume.name", format!("volume '{name}' is defined twice")));
        }
        let block_size = match &v.block_size {
            None => 4096,
            Some(q) => {
                let bs = ctx.size(q, "volume.block_size")?;
                if !bs.is_power_of_two() || !(512..=1 << 20).contains(&bs) {
                    return Err(ctx.err(q, "volume.block_size", format!("{bs} must be a power of two from 512 to 1MiB")));
                }
                bs as u32
            }
        };
        if v.extent.is_empty() {
            return Err(ctx.err(&v.name, "volume.extent", format!("volume '{name}' has no [[volume.extent]]")));
        }
        let mut extents = Vec::new();
        let mut lines = Vec::new();
        let mut next_start = 0u64;
        for (index, e) in v.extent.iter().enumerate() {
            let r = e.get_ref();
            let field = |f: &str| format!("volume '{name}' extent {index}: {f}");
            let start = r.start.as_ref().map(|s| ctx.size(s, &field("start"))).transpose()?.unwrap_or(next_start);
            let length = ctx.size(&r.length, &field("length"))?;
            let target = match (&r.backend, r.zero) {
                (Some(b), false) => {
                    let store = b.get_ref();
                    let backend = backends.iter().find(|x| &x.spec.name == store);
                    let backend = backend.ok_or_else(|| ctx.err(b, &field("backend"), format!("no backend named '{store}'")))?;
                    if backend.spec.read_only && !v.read_only {
                        return Err(ctx.err(b, &field("backend"), format!("backend '{store}' is read-only but volume '{name}' is not")));
                    }
                    let offset = r.backend_offset.as_ref().map(|o| ctx.size(o, &field("backend_offset"))).transpose()?.unwrap_or(0);
                    TargetSpec::Linear { store: store.clone(), offset }
                }
                (None, true) => TargetSpec::Zero,
                (Some(b), true) => return Err(ctx.err(b, &field("backend"), "an extent is either `zero = true` or has a backend")),
                (None, false) => return Err(ctx.err(e, &field("backend"), "missing: give `backend = \"NAME\"` or `zero = true`")),
            };
            next_start = start.saturating_add(length);
            // Where each key of this extent is, so a layout error points at
            // the offending line rather than the `[[volume.extent]]` header.
            let at = |s: Option<std::ops::Range<usize>>| ctx.line(s.unwrap_or(e.span()).start);
            lines.push(ExtentLines {
                start: at(r.start.as_ref().map(|s| s.span())),
                length: at(Some(r.length.span())),
                backend: at(r.backend.as_ref().map(|s| s.span())),
                backend_offset: at(r.backend_offset.as_ref().map(|s| s.span())),
                header: at(None),
            });
            extents.push(Extent { start, length, target });
        }
        let extent_err = |err: MapError| {
            let (index, field) = match &err {
                MapError::ZeroLength { index } => (*index, "length"),
                MapError::NotContiguous { index, .. } => (*index, "start"),
                MapError::Misaligned { index, field, .. } => (*index, *field),
                MapError::Overflow { index } => (*index, "length"),
                MapError::UnknownStore { index, .. } | MapError::OutsideStore { index, .. } => (*index, "backend"),
                _ => (0, "extent"),
            };
            let l = &lines[index];
            let line = match field {
                "start" => l.start,
                "length" => l.length,
                "backend" => l.backend,
                "backend_offset" => l.backend_offset,
                _ => l.header,
            };
            ctx.err_at(line, Some(format!("volume '{name}' extent {index}: {field}")), err.to_string())
        };
        validate_layout(&extents).map_err(extent_err)?;
        let table = MappingTable::new(0, extents.clone()).map_err(extent_err)?;
        validate_alignment(&table, block_size as u64).map_err(extent_err)?;
        out.push(VolumeConfig {
            name: name.clone(),
            description: v.description.clone(),
            read_only: v.read_only,
            block_size,
            extents,
            line: ctx.line(item.span().start),
            extent_lines: lines.iter().map(|l| l.header).collect(),
            extent_offset_lines: lines.iter().map(|l| l.backend_offset).collect(),
        });
    }
    check_exclusive(ctx, &out, backends)?;
    Ok(out)
}

/// Two extents may map the same store range only if the store is shared.
pub(super) fn check_exclusive_tables(
    file: &str,
    volumes: &[VolumeConfig],
    tables: &[MappingTable],
    backends: &[BackendConfig],
) -> Result<(), ConfigError> {
    let shared: HashMap<&str, bool> = backends.iter().map(|b| (b.spec.name.as_str(), b.shared)).collect();
    let pairs = volumes.iter().map(|v| v.name.as_str()).zip(tables.iter());
    validate_exclusive(pairs, |s| shared.get(s).copied().unwrap_or(false)).map_err(|err| {
        let (line, field) = match &err {
            MapError::Overlap { second, .. } => volumes
                .iter()
                .find(|v| v.name == second.0)
                .map(|v| (Some(v.extent_offset_lines[second.1]), Some(format!("volume '{}' extent {}: backend_offset", second.0, second.1))))
                .unwrap_or((None, None)),
            _ => (None, None),
        };
        ConfigError { file: file.into(), line, field, message: err.to_string() }
    })
}

fn check_exclusive(ctx: &ParseCtx<'_>, volumes: &[VolumeConfig], backends: &[BackendConfig]) -> Result<(), ConfigError> {
    let tables: Vec<MappingTable> = volumes.iter().map(|v| v.table(0)).collect();
    check_exclusive_tables(ctx.file, volumes, &tables, backends)
}
