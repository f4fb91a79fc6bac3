//! `[[pool]]` tables: storage pools whose space volumes are created from at
//! run time. Parsed and checked here (names, backends, chunk, percentages);
//! the pool engine (`crate::pool`) owns everything else.

use super::parse_ctx::{valid_name, ParseCtx, Quantity};
use super::{BackendConfig, ConfigError, OnFull, PoolConfig};
use serde::Deserialize;
use std::time::Duration;
use toml::Spanned;

/// Defaults of a `[[pool]]` (the example values).
const DEFAULT_CHUNK: u64 = 1 << 20;
const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_LOW_WATER: u8 = 10;
/// The chunks a thin extent accepts (`map`'s `POOL_CHUNK_MIN`/`MAX`).
const POOL_CHUNK_MIN: u64 = 64 << 10;
const POOL_CHUNK_MAX: u64 = 64 << 20;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPool {
    name: Spanned<String>,
    class: Option<Spanned<String>>,
    backends: Spanned<Vec<Spanned<String>>>,
    chunk: Option<Spanned<Quantity>>,
    priority: Option<Spanned<i64>>,
    on_full: Option<Spanned<String>>,
    queue_timeout: Option<Spanned<Quantity>>,
    low_water: Option<Spanned<Quantity>>,
    grow: Option<Spanned<Quantity>>,
}

pub(super) fn parse_pools(ctx: &ParseCtx<'_>, raw: &[Spanned<RawPool>], backends: &[BackendConfig]) -> Result<Vec<PoolConfig>, ConfigError> {
    let mut out: Vec<PoolConfig> = Vec::new();
    for item in raw {
        let p = item.get_ref();
        let name = p.name.get_ref();
        if !valid_name(name) {
            return Err(ctx.err(&p.name, "pool.name", format!("'{name}' is not a valid name (letters, digits, - _ . : @ +)")));
        }
        if out.iter().any(|o| &o.name == name) {
            return Err(ctx.err(&p.name, "pool.name", format!("pool '{name}' is defined twice")));
        }
        let class = match &p.class {
            Some(c) if !valid_name(c.get_ref()) => return Err(ctx.err(c, "pool.class", format!("'{}' is not a valid name (letters, digits, - _ . : @ +)", c.get_ref()))),
            c => c.as_ref().map(|c| c.get_ref().clone()),
        };
        let mut members: Vec<String> = Vec::new();
        if p.backends.get_ref().is_empty() {
            return Err(ctx.err(&p.backends, "pool.backends", format!("pool '{name}' has no backends")));
        }
        for b in p.backends.get_ref() {
            let backend = b.get_ref();
            let Some(config) = backends.iter().find(|c| &c.spec.name == backend) else {
                return Err(ctx.err(b, "pool.backends", format!("no backend named '{backend}'")));
            };
            if config.spare {
                return Err(ctx.err(b, "pool.backends", format!("backend '{backend}' is a spare (spare = true); a spare cannot belong to a pool")));
            }
            if config.spec.read_only {
                return Err(ctx.err(b, "pool.backends", format!("backend '{backend}' is read-only; a pool needs writable stores")));
            }
            if members.contains(backend) {
                return Err(ctx.err(b, "pool.backends", format!("backend '{backend}' is listed twice")));
            }
            if let Some(other) = out.iter().find(|o| o.backends.contains(backend)) {
                return Err(ctx.err(b, "pool.backends", format!("backend '{backend}' already belongs to pool '{}'", other.name)));
            }
            members.push(backend.clone());
        }
        let chunk = match &p.chunk {
            None => DEFAULT_CHUNK,
            Some(q) => {
                let c = ctx.size(q, "pool.chunk")?;
                if !c.is_power_of_two() || !(POOL_CHUNK_MIN..=POOL_CHUNK_MAX).contains(&c) {
                    return Err(ctx.err(q, "pool.chunk", format!("{c} must be a power of two from 64KiB to 64MiB")));
                }
                c
            }
        };
        let priority = match &p.priority {
            None => 0,
            Some(n) if (0..=i64::from(u32::MAX)).contains(n.get_ref()) => *n.get_ref() as u32,
            Some(n) => return Err(ctx.err(n, "pool.priority", format!("{} is out of range 0..={}", n.get_ref(), u32::MAX))),
        };
        let on_full = match &p.on_full {
            None => OnFull::Queue,
            Some(s) => match s.get_ref().as_str() {
                "queue" => OnFull::Queue,
                "error" => OnFull::Error,
                other => return Err(ctx.err(s, "pool.on_full", format!("'{other}' is not one of queue, error"))),
            },
        };
        let queue_timeout = match &p.queue_timeout {
            None => DEFAULT_QUEUE_TIMEOUT,
            Some(q) => ctx.duration(q, "pool.queue_timeout")?,
        };
        let low_water_percent = match &p.low_water {
            None => DEFAULT_LOW_WATER,
            Some(q) => percent(ctx, q, "pool.low_water", 0)?,
        };
        let grow_percent = p.grow.as_ref().map(|q| percent(ctx, q, "pool.grow", 1)).transpose()?;
        out.push(PoolConfig {
            name: name.clone(),
            class,
            backends: members,
            chunk,
            priority,
            on_full,
            queue_timeout,
            low_water_percent,
            grow_percent,
            line: ctx.line(item.span().start),
        });
    }
    Ok(out)
}

/// `"10%"` (or a bare number of percent), from `min` to 100.
fn percent(ctx: &ParseCtx<'_>, q: &Spanned<Quantity>, field: &str, min: u8) -> Result<u8, ConfigError> {
    let value = match q.get_ref() {
        Quantity::Int(n) => Some(*n),
        Quantity::Text(t) => t.trim().strip_suffix('%').unwrap_or(t.trim()).trim().parse::<i64>().ok(),
    };
    match value {
        Some(n) if (i64::from(min)..=100).contains(&n) => Ok(n as u8),
        _ => {
            let shown = match q.get_ref() {
                Quantity::Int(n) => n.to_string(),
                Quantity::Text(t) => format!("'{t}'"),
            };
            Err(ctx.err(q, field, format!("{shown} is not a percentage from {min}% to 100% (e.g. \"10%\")")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Config, OnFull};
    use std::path::Path;
    use std::time::Duration;

    const BACKENDS: &str = "[[backend]]\nname = \"a\"\npath = \"/a\"\n[[backend]]\nname = \"b\"\npath = \"/b\"\n[[backend]]\nname = \"s\"\npath = \"/s\"\nspare = true\n";

    fn parse(pools: &str) -> Result<Config, super::super::ConfigError> {
        Config::parse(&format!("{BACKENDS}{pools}"), "t.toml", Path::new(""))
    }

    /// Line of the first line of `pools` in the parsed text.
    fn line(n: usize) -> Option<usize> {
        Some(BACKENDS.lines().count() + n)
    }

    #[test]
    fn a_pool_parses_with_its_defaults() {
        let c = parse("[[pool]]\nname = \"p\"\nbackends = [\"a\", \"b\"]\n").unwrap();
        let p = &c.pools[0];
        assert_eq!((p.name.as_str(), p.class.as_deref(), p.backends.clone()), ("p", None, vec!["a".to_string(), "b".to_string()]));
        assert_eq!((p.chunk, p.priority, p.on_full, p.queue_timeout), (1 << 20, 0, OnFull::Queue, Duration::from_secs(30)));
        assert_eq!((p.low_water_percent, p.grow_percent, p.line), (10, None, line(1).unwrap()));
        let c = parse(
            "[[pool]]\nname = \"fast\"\nclass = \"ssd\"\nbackends = [\"a\"]\nchunk = \"64KiB\"\npriority = 10\non_full = \"error\"\nqueue_timeout = \"5s\"\nlow_water = \"20%\"\ngrow = \"10%\"\n",
        )
        .unwrap();
        let p = &c.pools[0];
        assert_eq!((p.class.as_deref(), p.chunk, p.priority, p.on_full), (Some("ssd"), 64 << 10, 10, OnFull::Error));
        assert_eq!((p.queue_timeout, p.low_water_percent, p.grow_percent), (Duration::from_secs(5), 20, Some(10)));
    }

    #[test]
    fn bad_pools_are_refused_naming_file_line_and_field() {
        let cases: [(&str, usize, &str, &str); 10] = [
            ("[[pool]]\nname = \"p\"\nbackends = [\"x\"]\n", 3, "pool.backends", "no backend named 'x'"),
            ("[[pool]]\nname = \"p\"\nbackends = [\"s\"]\n", 3, "pool.backends", "is a spare"),
            ("[[pool]]\nname = \"p\"\nbackends = [\"a\"]\n[[pool]]\nname = \"q\"\nbackends = [\"a\"]\n", 6, "pool.backends", "already belongs to pool 'p'"),
            ("[[pool]]\nname = \"p\"\nbackends = [\"a\"]\n[[pool]]\nname = \"p\"\nbackends = [\"b\"]\n", 5, "pool.name", "defined twice"),
            ("[[pool]]\nname = \"p q\"\nbackends = [\"a\"]\n", 2, "pool.name", "not a valid name"),
            ("[[pool]]\nname = \"p\"\nbackends = [\"a\"]\nchunk = \"96KiB\"\n", 4, "pool.chunk", "power of two from 64KiB to 64MiB"),
            ("[[pool]]\nname = \"p\"\nbackends = [\"a\"]\nchunk = \"128MiB\"\n", 4, "pool.chunk", "power of two"),
            ("[[pool]]\nname = \"p\"\nbackends = [\"a\"]\non_full = \"drop\"\n", 4, "pool.on_full", "not one of queue, error"),
            ("[[pool]]\nname = \"p\"\nbackends = [\"a\"]\nlow_water = \"110%\"\n", 4, "pool.low_water", "percentage"),
            ("[[pool]]\nname = \"p\"\nbackends = []\n", 3, "pool.backends", "has no backends"),
        ];
        for (text, l, field, message) in cases {
            let e = parse(text).unwrap_err();
            assert_eq!((e.line, e.field.as_deref()), (line(l), Some(field)), "{e}");
            assert!(e.message.contains(message), "{e}");
            assert!(e.to_string().starts_with(&format!("t.toml:{}: {field}:", line(l).unwrap())), "{e}");
        }
        let e = parse("[[pool]]\nname = \"p\"\nbackends = [\"a\"]\nsize = 3\n").unwrap_err();
        assert!(e.message.contains("size"), "{e}");
    }
}
