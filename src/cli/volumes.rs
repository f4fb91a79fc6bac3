//! `status`, `reload`, `pause`, `resume`, `history`: volumes on a running
//! server.

use super::discover::{parse_duration, parse_range};
use super::{render, CliResult, ServerAddress};
use clap::Subcommand;
use nbdvirt::api::{GenerationRecord, ReloadReport, Request, Status};

#[derive(Subcommand)]
pub enum VolumeCommand {
    /// Show volumes (generation, state, extents, holds, I/O) and backends.
    Status {
        #[command(flatten)]
        server: ServerAddress,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Re-read the server's config file and apply it under live I/O.
    Reload {
        #[command(flatten)]
        server: ServerAddress,
        /// Remove volumes even if clients are connected (they are disconnected).
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
    },
    /// Hold a volume's I/O (e.g. around a snapshot); bounded by --timeout.
    Pause {
        volume: String,
        #[command(flatten)]
        server: ServerAddress,
        /// Only this range, START:LEN (sizes accept units, e.g. 0:1GiB).
        #[arg(long)]
        range: Option<String>,
        /// Resume automatically after this long (e.g. 30s).
        #[arg(long, default_value = "30s")]
        timeout: String,
    },
    /// End a manual pause.
    Resume {
        volume: String,
        #[command(flatten)]
        server: ServerAddress,
    },
    /// List a volume's committed generations.
    History {
        volume: String,
        #[command(flatten)]
        server: ServerAddress,
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: VolumeCommand) -> CliResult {
    match cmd {
        VolumeCommand::Status { server, json } => {
            let status: Status = server.call(&Request::Status)?;
            if json {
                render::json(&status)
            } else {
                render::status(&status);
                // Injected faults must not go unnoticed in a drill.
                for b in status.backends.iter().filter(|b| b.fault.is_some()) {
                    println!("backend {}: injected fault: {}", b.name, b.fault.as_deref().unwrap_or_default());
                }
            }
        }
        VolumeCommand::Reload { server, force, json } => {
            let report: ReloadReport = server.call(&Request::Reload { force })?;
            if json {
                render::json(&report)
            } else {
                render::reload(&report)
            }
        }
        VolumeCommand::Pause { volume, server, range, timeout } => {
            let timeout = parse_duration(&timeout, "--timeout")?;
            let range = range.map(|r| parse_range(&r, "--range")).transpose()?;
            let message: String = server.call(&Request::Pause { volume, range, timeout_ms: Some(timeout.as_millis() as u64) })?;
            println!("{message}");
        }
        VolumeCommand::Resume { volume, server } => {
            let message: String = server.call(&Request::Resume { volume })?;
            println!("{message}");
        }
        VolumeCommand::History { volume, server, json } => {
            let history: Vec<GenerationRecord> = server.call(&Request::History { volume })?;
            if json {
                render::json(&history)
            } else {
                render::history(&history)
            }
        }
    }
    Ok(())
}
