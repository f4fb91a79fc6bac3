//! `fault`: make a backend fail on purpose, for drills and tests.

use super::{render, CliResult, ServerAddress};
use clap::{Args, ValueEnum};
use nbdvirt::api::{FaultErrorArg, FaultReport, FaultScopeArg, Request};

#[derive(Clone, Copy, ValueEnum)]
pub enum ErrorChoice {
    /// I/O error (like a failing disk).
    Eio,
    /// No space left (like a full thin pool).
    Enospc,
    /// End the fault.
    Off,
}

#[derive(Args)]
pub struct FaultArgs {
    /// The backend (store) name from the config.
    backend: String,
    /// The error to return, or `off`.
    #[arg(long, value_enum)]
    error: ErrorChoice,
    /// Fail only reads.
    #[arg(long, conflicts_with = "writes")]
    reads: bool,
    /// Fail only writes (write, trim, write-zeroes; flush too with eio).
    #[arg(long)]
    writes: bool,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    server: ServerAddress,
}

pub fn run(args: FaultArgs) -> CliResult {
    let error = match args.error {
        ErrorChoice::Eio => FaultErrorArg::Eio,
        ErrorChoice::Enospc => FaultErrorArg::Enospc,
        ErrorChoice::Off => FaultErrorArg::Off,
    };
    let scope = match (args.reads, args.writes) {
        (true, _) => FaultScopeArg::Reads,
        (_, true) => FaultScopeArg::Writes,
        _ => FaultScopeArg::Both,
    };
    let report: FaultReport = args.server.call(&Request::Fault { backend: args.backend, error, scope })?;
    if args.json {
        render::json(&report);
        return Ok(());
    }
    match &report.fault {
        Some(f) => println!("backend {}: injected fault: {f}", report.backend),
        None => println!("backend {}: no injected fault", report.backend),
    }
    if !report.shared_with.is_empty() {
        println!("(same store as {}: they fail too)", report.shared_with.join(", "));
    }
    Ok(())
}
