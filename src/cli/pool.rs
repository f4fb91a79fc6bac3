//! `volume create|resize|delete` (volumes from a pool) and `pool
//! status|check|usage`.

use super::discover::parse_size;
use super::{invalid, render, CliResult, ServerAddress};
use clap::{Subcommand, ValueEnum};
use comfy_table::Cell;
use nbdvirt::api::{
    ApiError, ErrorKind, PoolCheckList, PoolChoice, PoolLayout, PoolList, PoolVolumeInfo, Request, ResizeReport, UsageReport, VolumeCreate,
    VolumePriority,
};
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Subcommand)]
pub enum VolumeCommand {
    /// Create a volume from a pool (or the first pool of a class with room); exported at once.
    #[command(group(clap::ArgGroup::new("from").required(true).args(["pool", "class"])))]
    Create {
        name: String,
        /// Size with units (e.g. 10GiB); a multiple of the pool's chunk.
        #[arg(long)]
        size: String,
        #[arg(long)]
        pool: Option<String>,
        #[arg(long)]
        class: Option<String>,
        /// linear, stripe:N (over N stores) or mirror:N (N copies).
        #[arg(long, default_value = "linear")]
        layout: String,
        /// Take space only when written.
        #[arg(long)]
        thin: bool,
        /// low: its chunks may be reclaimed (then read zeros) when the pool is short.
        #[arg(long, value_enum, default_value = "normal")]
        priority: Priority,
        #[arg(long, default_value = "")]
        description: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerAddress,
    },
    /// Grow a pool volume online, or shrink it (refused if the tail holds data, unless --force).
    Resize {
        name: String,
        #[arg(long)]
        size: String,
        /// Shrink even if the cut-off tail holds data (it is dropped).
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerAddress,
    },
    /// Delete a pool volume; its space returns to the pool.
    Delete {
        name: String,
        /// Disconnect its clients first.
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerAddress,
    },
}

#[derive(Subcommand)]
pub enum PoolCommand {
    /// Size, allocated, free, reclaimable, overcommit and the volumes of each pool.
    Status {
        pool: Option<String>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerAddress,
    },
    /// Online consistency check (leaked chunks are returned); exits 5 if it finds errors.
    Check {
        pool: Option<String>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerAddress,
    },
    /// What each volume used over a period, like a bill.
    Usage {
        /// Start of the period: Unix seconds, a duration ago (30m, 12h, 7d) or RFC 3339 (2026-01-31T00:00:00Z).
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerAddress,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Priority {
    Low,
    Normal,
    High,
}

impl From<Priority> for VolumePriority {
    fn from(p: Priority) -> VolumePriority {
        match p {
            Priority::Low => VolumePriority::Low,
            Priority::Normal => VolumePriority::Normal,
            Priority::High => VolumePriority::High,
        }
    }
}

pub fn run_volume(cmd: VolumeCommand) -> CliResult {
    match cmd {
        VolumeCommand::Create { name, size, pool, class, layout, thin, priority, description, json, server } => {
            let size = parse_size(&size, "--size")?;
            let layout: PoolLayout = layout.parse().map_err(|e: String| invalid(format!("--layout {e}")))?;
            let from = match (pool, class) {
                (Some(p), _) => PoolChoice::Pool(p),
                (None, Some(c)) => PoolChoice::Class(c),
                (None, None) => return Err(invalid("--pool or --class is needed")),
            };
            let req = VolumeCreate { name, size, from, layout, thin, priority: priority.into(), description };
            let info: PoolVolumeInfo = server.call(&Request::VolumeCreate(req))?;
            if json {
                render::json(&info);
                return Ok(());
            }
            println!("created volume '{}' in pool '{}'", info.name, info.pool);
            volumes_table(&[info]);
        }
        VolumeCommand::Resize { name, size, force, json, server } => {
            let size = parse_size(&size, "--size")?;
            let report: ResizeReport = server.call(&Request::VolumeResize { volume: name, size, force })?;
            if json {
                render::json(&report);
                return Ok(());
            }
            let v = &report.volume;
            println!("volume '{}': {} -> {} (generation {})", v.name, render::human(report.old_size), render::human(v.size), report.generation);
            if let Some(note) = &report.note {
                println!("note: {note}");
            }
        }
        VolumeCommand::Delete { name, force, json, server } => {
            let info: PoolVolumeInfo = server.call(&Request::VolumeDelete { volume: name, force })?;
            if json {
                render::json(&info);
                return Ok(());
            }
            println!("deleted volume '{}'; {} returned to pool '{}'", info.name, render::human(info.allocated), info.pool);
        }
    }
    Ok(())
}

pub fn run_pool(cmd: PoolCommand) -> CliResult {
    match cmd {
        PoolCommand::Status { pool, json, server } => {
            let list: PoolList = server.call(&Request::PoolStatus { pool })?;
            if json {
                render::json(&list);
                return Ok(());
            }
            pools_table(&list);
        }
        PoolCommand::Check { pool, json, server } => {
            let list: PoolCheckList = server.call(&Request::PoolCheck { pool })?;
            if json {
                render::json(&list);
            } else {
                check_table(&list);
            }
            let errors: usize = list.pools.iter().map(|p| p.errors.len()).sum();
            if errors > 0 {
                let pools: Vec<&str> = list.pools.iter().filter(|p| !p.errors.is_empty()).map(|p| p.pool.as_str()).collect();
                return Err(ApiError::new(ErrorKind::Io, format!("pool check found {errors} error(s) in {}", pools.join(", "))));
            }
        }
        PoolCommand::Usage { since, json, server } => {
            let since = since.map(|s| parse_since(&s, now())).transpose()?;
            let report: UsageReport = server.call(&Request::PoolUsage { since })?;
            if json {
                render::json(&report);
                return Ok(());
            }
            usage_table(&report);
        }
    }
    Ok(())
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// `--since`: Unix seconds, a duration before `now` ("90s", "30m", "12h",
/// "7d", "2w"), or an RFC 3339 time ("2026-01-31T00:00:00Z", "...+02:00").
fn parse_since(s: &str, now: u64) -> Result<u64, ApiError> {
    let t = s.trim();
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        return t.parse().map_err(|_| invalid(format!("--since {s}: number too large")));
    }
    if let Some(split) = t.find(|c: char| !c.is_ascii_digit()).filter(|&i| i > 0) {
        let unit = match &t[split..] {
            "s" => Some(1),
            "m" | "min" => Some(60),
            "h" => Some(3600),
            "d" => Some(86400),
            "w" => Some(7 * 86400),
            _ => None,
        };
        if let (Some(unit), Ok(n)) = (unit, t[..split].parse::<u64>()) {
            return Ok(now.saturating_sub(n.saturating_mul(unit)));
        }
    }
    rfc3339(t).ok_or_else(|| invalid(format!("--since {s}: expected Unix seconds, a duration ago (30m, 12h, 7d) or an RFC 3339 time (2026-01-31T00:00:00Z)")))
}

/// Seconds since the epoch of `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`.
fn rfc3339(t: &str) -> Option<u64> {
    let num = |a: usize, b: usize| t.get(a..b).filter(|s| s.bytes().all(|c| c.is_ascii_digit())).and_then(|s| s.parse::<i64>().ok());
    let b = t.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (y, mo, d, h, mi, sec) = (num(0, 4)?, num(5, 7)?, num(8, 10)?, num(11, 13)?, num(14, 16)?, num(17, 19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut rest = &t[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        rest = frac.trim_start_matches(|c: char| c.is_ascii_digit());
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6 && rest.as_bytes()[3] == b':' => {
            let (oh, om) = (rest[1..3].parse::<i64>().ok()?, rest[4..6].parse::<i64>().ok()?);
            let o = oh * 3600 + om * 60;
            match rest.as_bytes()[0] {
                b'+' => o,
                b'-' => -o,
                _ => return None,
            }
        }
        _ => return None,
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let yy = if mo <= 2 { y - 1 } else { y };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let doy = (153 * (if mo > 2 { mo - 3 } else { mo + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    u64::try_from(days * 86400 + h * 3600 + mi * 60 + sec - offset).ok()
}

fn volumes_table(volumes: &[PoolVolumeInfo]) {
    let mut t = render::table(&["VOLUME", "POOL", "SIZE", "LAYOUT", "THIN", "PRIORITY", "ALLOCATED", "WRITTEN", "DESCRIPTION"]);
    for v in volumes {
        t.add_row(vec![
            Cell::new(&v.name),
            Cell::new(&v.pool),
            Cell::new(render::human(v.size)),
            Cell::new(v.layout.to_string()),
            Cell::new(if v.thin { "thin" } else { "thick" }),
            Cell::new(v.priority.to_string()),
            Cell::new(render::human(v.allocated)),
            Cell::new(render::human(v.written)),
            Cell::new(&v.description),
        ]);
    }
    render::right(&mut t, &[2, 6, 7]);
    println!("{t}");
}

fn pools_table(list: &PoolList) {
    let mut t = render::table(&["POOL", "CLASS", "CHUNK", "SIZE", "ALLOCATED", "FREE", "RECLAIMABLE", "OVERCOMMIT", "STORES", "STATE"]);
    for p in &list.pools {
        let stores: Vec<String> = p.stores.iter().map(|s| format!("{} ({}/{} free)", s.backend, s.free_chunks, s.chunks)).collect();
        let mut state = Vec::new();
        if p.low_water {
            state.push("low free space".to_string());
        }
        if p.queued_writes > 0 {
            state.push(format!("{} write(s) waiting for space", p.queued_writes));
        }
        t.add_row(vec![
            Cell::new(&p.name),
            Cell::new(p.class.as_deref().unwrap_or("-")),
            Cell::new(render::human(p.chunk)),
            Cell::new(render::human(p.size)),
            Cell::new(render::human(p.allocated)),
            Cell::new(render::human(p.free)),
            Cell::new(render::human(p.reclaimable)),
            Cell::new(format!("{:.2}", p.overcommit)),
            Cell::new(stores.join(", ")),
            Cell::new(if state.is_empty() { "ok".into() } else { state.join("; ") }),
        ]);
    }
    render::right(&mut t, &[2, 3, 4, 5, 6, 7]);
    println!("{t}");
    let volumes: Vec<PoolVolumeInfo> = list.pools.iter().flat_map(|p| p.volumes.iter().cloned()).collect();
    if !volumes.is_empty() {
        println!();
        volumes_table(&volumes);
    }
}

fn check_table(list: &PoolCheckList) {
    let mut t = render::table(&["POOL", "CHUNKS", "OWNED", "FREE", "LEAKED (RETURNED)", "ERRORS"]);
    for p in &list.pools {
        t.add_row(vec![
            Cell::new(&p.pool),
            Cell::new(p.chunks),
            Cell::new(p.owned),
            Cell::new(p.free),
            Cell::new(p.leaked_returned),
            Cell::new(if p.errors.is_empty() { "clean".to_string() } else { p.errors.len().to_string() }),
        ]);
    }
    render::right(&mut t, &[1, 2, 3, 4]);
    println!("{t}");
    for p in &list.pools {
        for e in &p.errors {
            println!("pool {}: {e}", p.pool);
        }
    }
}

fn usage_table(r: &UsageReport) {
    println!("usage from {} to {} (Unix seconds, {} s)", r.since, r.until, r.until.saturating_sub(r.since));
    let mut t = render::table(&["VOLUME", "POOL", "RATE", "ALLOCATED", "WRITTEN", "BYTE-SECONDS", "GIB-HOURS"]);
    for v in &r.volumes {
        t.add_row(vec![
            Cell::new(&v.volume),
            Cell::new(&v.pool),
            Cell::new(&v.rate),
            Cell::new(render::human(v.allocated)),
            Cell::new(render::human(v.written_bytes)),
            Cell::new(format!("{:.0}", v.allocation_byte_seconds)),
            Cell::new(format!("{:.3}", v.allocation_byte_seconds / (3600.0 * (1u64 << 30) as f64))),
        ]);
    }
    render::right(&mut t, &[3, 4, 5, 6]);
    println!("{t}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_seconds_durations_and_rfc3339() {
        let now = 1_700_000_000;
        assert_eq!(parse_since("1690000000", now).unwrap(), 1_690_000_000);
        assert_eq!(parse_since("1h", now).unwrap(), now - 3600);
        assert_eq!(parse_since("7d", now).unwrap(), now - 7 * 86400);
        assert_eq!(parse_since("1970-01-01T00:00:00Z", now).unwrap(), 0);
        assert_eq!(parse_since("2023-11-14T22:13:20Z", now).unwrap(), 1_700_000_000);
        assert_eq!(parse_since("2023-11-15T00:13:20.5+02:00", now).unwrap(), 1_700_000_000);
        for bad in ["", "yesterday", "5y", "2023-13-01T00:00:00Z", "2023-11-14T22:13:20"] {
            assert_eq!(parse_since(bad, now).unwrap_err().kind, ErrorKind::Invalid, "{bad}");
        }
    }
}
