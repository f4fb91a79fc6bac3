//! `[server] max_inflight` and `max_request`: what one connection may hold
//! in flight, and the largest single request it may send. Checked against
//! each other, so they live together.

use super::parse_ctx::{ParseCtx, Quantity};
use super::ConfigError;
use crate::defaults;
use crate::nbd::MAX_PAYLOAD;
use toml::Spanned;

/// The two limits of one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ConnectionLimits {
    pub(super) max_inflight: u64,
    pub(super) max_request: u32,
}

/// `max_request` defaults to 64 MiB, or to `max_inflight` when that is
/// smaller (a config that sets only `max_inflight = "32MiB"`, which was
/// valid before `max_request` existed, stays valid).
pub(super) fn connection_limits(
    ctx: &ParseCtx<'_>,
    max_inflight: Option<&Spanned<Quantity>>,
    max_request: Option<&Spanned<Quantity>>,
) -> Result<ConnectionLimits, ConfigError> {
    let max_inflight = match max_inflight {
        None => defaults::MAX_INFLIGHT_BYTES,
        Some(q) => {
            let v = ctx.size(q, "server.max_inflight")?;
            if v < MAX_PAYLOAD as u64 {
                return Err(ctx.err(q, "server.max_inflight", format!("must be at least 32MiB (the largest request), got {v}")));
            }
            v
        }
    };
    let max_request = match max_request {
        None => defaults::MAX_REQUEST.min(max_inflight),
        Some(q) => {
            let field = "server.max_request";
            let v = ctx.size(q, field)?;
            if v < MAX_PAYLOAD as u64 {
                return Err(ctx.err(q, field, format!("must be at least 32MiB (the maximum block size advertised to clients), got {v}")));
            }
            if v > u32::MAX as u64 {
                return Err(ctx.err(q, field, format!("{v} is above 4GiB - 1 (a request's length is 32 bits)")));
            }
            if v > max_inflight {
                let msg = format!("{v} is above server.max_inflight ({max_inflight}): a request must fit in one connection's budget");
                return Err(ctx.err(q, field, msg));
            }
            v
        }
    };
    Ok(ConnectionLimits { max_inflight, max_request: max_request as u32 })
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, ConfigError};
    use std::path::Path;

    fn parse(server: &str) -> Result<Config, ConfigError> {
        Config::parse(&format!("[server]\n{server}"), "t.toml", Path::new(""))
    }

    #[test]
    fn max_request_defaults_to_64mib_and_must_fit_in_max_inflight() {
        let d = parse("").unwrap().server;
        assert_eq!((d.max_inflight, d.max_request), (64 << 20, 64 << 20));
        // Only max_inflight given, below 64 MiB: the default follows it.
        assert_eq!(parse("max_inflight = \"32MiB\"\n").unwrap().server.max_request, 32 << 20);
        let s = parse("max_inflight = \"256MiB\"\nmax_request = \"128MiB\"\n").unwrap().server;
        assert_eq!((s.max_inflight, s.max_request), (256 << 20, 128 << 20));
        let e = parse("max_inflight = \"64MiB\"\nmax_request = \"65MiB\"\n").unwrap_err();
        assert!(e.to_string().starts_with("t.toml:3: server.max_request:"), "{e}");
        assert!(e.message.contains("server.max_inflight"), "{e}");
        let e = parse("max_request = \"16MiB\"\n").unwrap_err();
        assert!(e.to_string().starts_with("t.toml:2: server.max_request:"), "{e}");
        let e = parse("max_inflight = \"8GiB\"\nmax_request = \"4GiB\"\n").unwrap_err();
        assert!(e.message.contains("32 bits"), "{e}");
    }
}
