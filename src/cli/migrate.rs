//! `migrate start|status|abort`, and following a migration to its end.

use super::discover::{parse_range, parse_size};
use super::{other, render, CliResult, ServerAddress};
use clap::Subcommand;
use nbdvirt::api::{ApiError, ErrorKind, MigrationList, MigrationState, MigrationStatus, Request};
use std::time::{Duration, Instant};

#[derive(Subcommand)]
pub enum MigrateCommand {
    /// Start a migration.
    Start {
        volume: String,
        /// Destination BACKEND or BACKEND:OFFSET (default: lowest free range).
        #[arg(long)]
        to: String,
        /// Only this volume range, START:LEN.
        #[arg(long)]
        range: Option<String>,
        /// Copy bandwidth limit, bytes/s with units (e.g. 200MiB); 0 = unlimited. Default 64MiB.
        #[arg(long)]
        rate: Option<String>,
        /// Copy chunk size (default 1MiB).
        #[arg(long)]
        chunk: Option<String>,
        /// Punch holes in the source ranges after cutover.
        #[arg(long)]
        discard_source: bool,
        /// Wait for the end, showing progress.
        #[arg(long)]
        wait: bool,
        /// Print the started job as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerAddress,
    },
    /// Show migrations (running and finished).
    Status {
        volume: Option<String>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerAddress,
    },
    /// Stop a migration; the volume stays on its source.
    Abort {
        volume: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerAddress,
    },
}

pub fn run(cmd: MigrateCommand) -> CliResult {
    match cmd {
        MigrateCommand::Start { volume, to, range, rate, chunk, discard_source, wait, json, server } => {
            let (to, to_offset) = match to.split_once(':') {
                Some((b, off)) => (b.to_string(), Some(parse_size(off, "--to offset")?)),
                None => (to, None),
            };
            let request = Request::MigrateStart {
                volume: volume.clone(),
                to,
                to_offset,
                range: range.map(|r| parse_range(&r, "--range")).transpose()?,
                rate: rate.map(|s| parse_size(&s, "--rate")).transpose()?,
                chunk: chunk.map(|s| parse_size(&s, "--chunk")).transpose()?,
                discard_source,
            };
            let list: MigrationList = server.call(&request)?;
            if json {
                render::json(&list)
            } else {
                render::migrations(&list.migrations)
            }
            if wait {
                wait_migration(&server, &volume)?;
            }
        }
        MigrateCommand::Status { volume, json, server } => {
            let list: MigrationList = server.call(&Request::MigrateStatus { volume })?;
            if json {
                render::json(&list)
            } else {
                render::migrations(&list.migrations)
            }
        }
        MigrateCommand::Abort { volume, json, server } => {
            let list: MigrationList = server.call(&Request::MigrateAbort { volume })?;
            if json {
                render::json(&list)
            } else {
                render::migrations(&list.migrations)
            }
        }
    }
    Ok(())
}

/// The one job of `volume` a status answer must hold.
fn job_of(list: MigrationList, volume: &str) -> Result<MigrationStatus, ApiError> {
    list.migrations.into_iter().find(|m| m.volume == volume).ok_or_else(|| other(format!("the server's answer lists no migration of volume '{volume}'")))
}

/// Follows a migration to its end: a progress bar on a terminal, progress
/// lines otherwise. Fails if the migration fails or is aborted.
fn wait_migration(server: &ServerAddress, volume: &str) -> CliResult {
    use std::io::IsTerminal;
    let tty = std::io::stderr().is_terminal();
    let bar = indicatif::ProgressBar::new(0);
    if tty {
        bar.set_style(
            indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}")
                .map_err(|e| other(e.to_string()))?
                .progress_chars("=> "),
        );
        bar.set_message(format!("migrating {volume}"));
    } else {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut last_line = Instant::now() - Duration::from_secs(10);
    loop {
        let m = job_of(server.call(&Request::MigrateStatus { volume: Some(volume.to_string()) })?, volume)?;
        bar.set_length(m.total_bytes);
        bar.set_position(m.copied_bytes);
        if !tty && (last_line.elapsed() >= Duration::from_secs(2) || m.state != MigrationState::Running) {
            let pct = m.copied_bytes as f64 * 100.0 / m.total_bytes.max(1) as f64;
            eprintln!("migrate {volume}: {} {}/{} bytes ({pct:.1}%)", m.state.as_str(), m.copied_bytes, m.total_bytes);
            last_line = Instant::now();
        }
        match m.state {
            MigrationState::Running => std::thread::sleep(Duration::from_millis(250)),
            MigrationState::Completed => {
                bar.finish_with_message(format!("migrated {volume}"));
                let generation = m.generation.map_or_else(|| "(none)".to_string(), |g| g.to_string());
                println!("migration of '{volume}' completed: generation {generation}");
                return Ok(());
            }
            state => {
                bar.abandon();
                // A failed copy is an I/O failure (the reason names it); an
                // abort was someone's decision.
                let kind = if state == MigrationState::Failed { ErrorKind::Io } else { ErrorKind::Conflict };
                let reason = m.reason.as_deref().unwrap_or("no reason given");
                return Err(ApiError::new(kind, format!("migration of '{volume}' {}: {reason}", state.as_str())));
            }
        }
    }
}
