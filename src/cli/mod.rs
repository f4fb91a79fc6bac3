//! The command line: clap definitions here, one module per command family,
//! one renderer, one way to find the config. Every failure carries an
//! `ErrorKind`, and the exit code is the kind's (README: Exit codes).

mod attach;
mod attach_daemon;
mod cluster;
mod discover;
mod fault;
mod migrate;
mod mirror;
mod pool;
mod render;
mod serve;
mod volumes;

use clap::{Parser, Subcommand};
use nbdvirt::api::{ApiError, ErrorKind};
use std::process::ExitCode;

pub use discover::ServerAddress;

/// What every command returns.
pub type CliResult = Result<(), ApiError>;

/// A failure of the CLI's own making (a bad argument, a config that does
/// not load): `invalid`.
pub fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorKind::Invalid, message)
}

/// Any other failure without a kind of its own.
pub fn other(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorKind::Other, message)
}

#[derive(Parser)]
#[command(name = "nbdvirt", version, about = "Virtual block volumes as NBD exports, translated through live mapping tables")]
struct Cli {
    /// More log output (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    #[command(flatten)]
    Serve(serve::ServeCommand),
    #[command(flatten)]
    Volumes(volumes::VolumeCommand),
    /// Move a volume (or a range of it) onto another backend, live.
    #[command(subcommand)]
    Migrate(migrate::MigrateCommand),
    #[command(flatten)]
    Attach(attach::AttachCommand),
    /// Mirror legs: add, remove, re-add, status.
    #[command(subcommand)]
    Mirror(mirror::MirrorCommand),
    #[command(flatten)]
    Pair(mirror::PairCommand),
    /// Make a backend fail on purpose (EIO/ENOSPC), for drills and tests; `--error off` ends it.
    Fault(fault::FaultArgs),
    /// Volumes from a storage pool: create, resize, delete.
    #[command(subcommand)]
    Volume(pool::VolumeCommand),
    /// Storage pools: status, check, usage.
    #[command(subcommand)]
    Pool(pool::PoolCommand),
    /// Cluster mode on etcd: status.
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "nbdvirt=info",
        1 => "nbdvirt=debug",
        _ => "nbdvirt=trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

pub fn run() -> ExitCode {
    let cli = Cli::parse();
    let long_running = matches!(cli.command, Command::Serve(serve::ServeCommand::Serve { .. }) | Command::Attach(attach::AttachCommand::Attach { .. }));
    if !long_running {
        // `nbdvirt status --json | head` should end quietly, not panic on EPIPE.
        // SAFETY: restoring the default disposition of SIGPIPE at start-up,
        // before any other thread exists.
        let _ = unsafe { nix::sys::signal::signal(nix::sys::signal::Signal::SIGPIPE, nix::sys::signal::SigHandler::SigDfl) };
    }
    init_logging(cli.verbose);
    let result = match cli.command {
        Command::Serve(c) => serve::run(c),
        Command::Volumes(c) => volumes::run(c),
        Command::Migrate(c) => migrate::run(c),
        Command::Attach(c) => attach::run(c),
        Command::Mirror(c) => mirror::run(c),
        Command::Pair(c) => mirror::run_pair(c),
        Command::Fault(c) => fault::run(c),
        Command::Volume(c) => pool::run_volume(c),
        Command::Pool(c) => pool::run_pool(c),
        Command::Cluster(c) => cluster::run(c),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nbdvirt: {}", e.message);
            ExitCode::from(e.kind.exit_code() as u8)
        }
    }
}
