//! TOML → checked `Config`. Every field is read with its span so that an
//! error can name its line.

use super::layout::{check_regions, extent_err, parse_extent, RawExtent, VolumeCtx};
use super::parse_ctx::{valid_name, ParseCtx, Quantity};
use super::server::{check_default_export, parse_server, RawServer};
use super::{BackendConfig, Config, ConfigError, LegFailurePolicy, VolumeConfig};
use crate::backend::BackendSpec;
use crate::map::{validate_alignment, validate_exclusive, validate_layout, MapError, MappingTable};
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
    #[serde(default)]
    pool: Vec<Spanned<super::pool::RawPool>>,
    cluster: Option<Spanned<super::cluster::RawCluster>>,
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
    /// Held in reserve to replace a failed mirror leg.
    #[serde(default)]
    spare: bool,
    /// Cluster nodes that can reach the store (default: all).
    nodes: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawVolume {
    pub(super) name: Spanned<String>,
    #[serde(default)]
    description: String,
    #[serde(default)]
    read_only: bool,
    block_size: Option<Spanned<Quantity>>,
    on_leg_failure: Option<Spanned<String>>,
    #[serde(default)]
    extent: Vec<Spanned<RawExtent>>,
    // Read by `security.rs`.
    #[serde(default)]
    pub(super) tls_only: bool,
    pub(super) allow: Option<Vec<Spanned<String>>>,
    pub(super) read_only_for: Option<Vec<Spanned<String>>>,
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
    let pools = super::pool::parse_pools(&ctx, &raw.pool, &backends)?;
    check_default_export(&ctx, raw.server.as_ref(), &server, &volumes)?;
    let mut cluster = super::cluster::parse_cluster(&ctx, raw.cluster.as_ref(), pools.len())?;
    if let Some(c) = &mut cluster {
        c.serve = server.listen.iter().find(|e| matches!(e, crate::endpoint::Endpoint::Tcp(_))).or(server.listen.first()).cloned();
    }
    super::cluster::check_reach(&ctx, cluster.as_ref(), &backends, &volumes)?;
    let mut backends = backends;
    if cluster.is_some() {
        // The nodes of a cluster serve the same stores.
        for b in &mut backends {
            b.spec.sharing = crate::backend::Sharing::Cluster;
        }
    }
    Ok(Config { source: None, server, backends, volumes, pools, cluster })
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
                sharing: Default::default(),
            },
            shared: b.shared,
            spare: b.spare,
            nodes: parse_nodes(ctx, b.nodes.as_ref())?,
            line: ctx.line(item.span().start),
        });
    }
    Ok(out)
}

/// `nodes = ["n1", …]`: node ids, at least one, each once.
fn parse_nodes(ctx: &ParseCtx<'_>, raw: Option<&Spanned<Vec<Spanned<String>>>>) -> Result<Option<Vec<String>>, ConfigError> {
    let Some(list) = raw else { return Ok(None) };
    if list.get_ref().is_empty() {
        return Err(ctx.err(list, "backend.nodes", "an empty list: no node could reach the store (leave `nodes` out for all nodes)"));
    }
    let mut out: Vec<String> = Vec::new();
    for n in list.get_ref() {
        if !valid_name(n.get_ref()) {
            return Err(ctx.err(n, "backend.nodes", format!("'{}' is not a valid node id", n.get_ref())));
        }
        if out.contains(n.get_ref()) {
            return Err(ctx.err(n, "backend.nodes", format!("node '{}' is listed twice", n.get_ref())));
        }
        out.push(n.get_ref().clone());
    }
    Ok(Some(out))
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
        let on_leg_failure = match &v.on_leg_failure {
            None => LegFailurePolicy::Spare,
            Some(p) => p.get_ref().parse().map_err(|e: super::UnknownPolicy| ctx.err(p, "volume.on_leg_failure", e.to_string()))?,
        };
        let mut extents = Vec::new();
        let mut lines = Vec::new();
        let mut next_start = 0u64;
        let vctx = VolumeCtx { name, read_only: v.read_only, backends };
        for (index, e) in v.extent.iter().enumerate() {
            let (extent, l) = parse_extent(ctx, &vctx, index, e, next_start)?;
            next_start = extent.start.saturating_add(extent.length);
            extents.push(extent);
            lines.push(l);
        }
        let extent_err = |err: MapError| extent_err(ctx, name, &lines, err);
        validate_layout(&extents).map_err(extent_err)?;
        let table = MappingTable::new(0, extents.clone()).map_err(extent_err)?;
        validate_alignment(&table, block_size as u64).map_err(extent_err)?;
        check_regions(ctx, name, &extents, &lines)?;
        out.push(VolumeConfig {
            name: name.clone(),
            description: v.description.clone(),
            read_only: v.read_only,
            block_size,
            on_leg_failure,
            access: super::security::parse_access(ctx, v)?,
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
