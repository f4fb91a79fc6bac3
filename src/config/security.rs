//! `[server]` TLS keys and handshake limits, and each volume's access
//! rules (`tls_only`, `allow`, `read_only_for`). Only parsed and checked
//! here: the credential files are read when the daemon starts or reloads.

use super::parse_ctx::ParseCtx;
use super::raw::RawVolume;
use super::server::RawServer;
use super::ConfigError;
use crate::access::{ExportAccess, Rule};
use crate::defaults;
use crate::tls::{TlsFiles, TlsMode};
use std::time::Duration;
use toml::Spanned;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSecurity {
    pub tls: TlsMode,
    pub tls_files: TlsFiles,
    pub handshake_timeout: Duration,
    pub max_connections_per_address: usize,
    pub max_option_payload: u32,
    pub max_export_name: usize,
}

impl Default for ServerSecurity {
    fn default() -> ServerSecurity {
        ServerSecurity {
            tls: TlsMode::Off,
            tls_files: TlsFiles::default(),
            handshake_timeout: defaults::HANDSHAKE_TIMEOUT,
            max_connections_per_address: defaults::MAX_CONNECTIONS_PER_ADDRESS,
            max_option_payload: defaults::MAX_OPTION_PAYLOAD,
            max_export_name: defaults::MAX_EXPORT_NAME,
        }
    }
}

pub(super) fn parse_server_security(ctx: &ParseCtx<'_>, s: &RawServer) -> Result<ServerSecurity, ConfigError> {
    let tls = match &s.tls {
        None => TlsMode::Off,
        Some(m) => m.get_ref().parse().map_err(|e: String| ctx.err(m, "server.tls", e))?,
    };
    let tls_files = TlsFiles {
        certificates: s.tls_certificates.as_ref().map(|p| ctx.path(p.get_ref())),
        verify_peer: s.tls_verify_peer,
        psk: s.tls_psk.as_ref().map(|p| ctx.path(p.get_ref())),
    };
    let at = |field: &Option<Spanned<String>>| field.as_ref().map(|f| ctx.line(f.span().start)).unwrap_or(1);
    if tls != TlsMode::Off && tls_files.certificates.is_none() && tls_files.psk.is_none() {
        return Err(ctx.err_at(at(&s.tls), Some("server.tls".into()), format!("tls = \"{tls}\" needs tls_certificates or tls_psk")));
    }
    if s.tls_verify_peer && tls_files.certificates.is_none() {
        return Err(ctx.err_at(at(&s.tls), Some("server.tls_verify_peer".into()), "needs tls_certificates (its ca-cert.pem checks clients)"));
    }
    let handshake_timeout = match &s.handshake_timeout {
        None => defaults::HANDSHAKE_TIMEOUT,
        Some(q) => {
            let d = ctx.duration(q, "server.handshake_timeout")?;
            if d < Duration::from_millis(100) || d > Duration::from_secs(3600) {
                return Err(ctx.err(q, "server.handshake_timeout", format!("{d:?} is outside 100ms..1h")));
            }
            d
        }
    };
    let max_option_payload = match &s.max_option_payload {
        None => defaults::MAX_OPTION_PAYLOAD,
        Some(q) => {
            let v = ctx.size(q, "server.max_option_payload")?;
            if !(4096 + 8..=crate::nbd::MAX_OPTION_LEN as u64).contains(&v) {
                return Err(ctx.err(q, "server.max_option_payload", format!("{v} is outside 4104..65536 (an export name of 4096 bytes must fit)")));
            }
            v as u32
        }
    };
    Ok(ServerSecurity {
        tls,
        tls_files,
        handshake_timeout,
        max_connections_per_address: ctx.count(
            &s.max_connections_per_address,
            "server.max_connections_per_address",
            defaults::MAX_CONNECTIONS_PER_ADDRESS,
            65536,
        )?,
        max_option_payload,
        max_export_name: ctx.count(&s.max_export_name, "server.max_export_name", defaults::MAX_EXPORT_NAME, defaults::MAX_EXPORT_NAME as i64)?,
    })
}

pub(super) fn parse_access(ctx: &ParseCtx<'_>, v: &RawVolume) -> Result<ExportAccess, ConfigError> {
    let rules = |list: &Option<Vec<Spanned<String>>>, field: &str| -> Result<Vec<Rule>, ConfigError> {
        list.iter().flatten().map(|r| r.get_ref().parse::<Rule>().map_err(|e| ctx.err(r, field, e.to_string()))).collect()
    };
    let allow = rules(&v.allow, "volume.allow")?;
    if v.allow.as_ref().is_some_and(|a| a.is_empty()) {
        // An empty list reads as "nobody" but would mean "everyone".
        return Err(ctx.err(&v.name, "volume.allow", "an empty allow list would let everyone in; remove it, or list who may connect"));
    }
    Ok(ExportAccess { tls_only: v.tls_only, allow, read_only_for: rules(&v.read_only_for, "volume.read_only_for")? })
}
