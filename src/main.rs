//! The `nbdvirt` command.

use clap::{Parser, Subcommand};
use nbdvirt::config::{build_catalog, Config};
use nbdvirt::server::{ConnLimits, Server, ServerOptions};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "nbdvirt", version, about = "Virtual block volumes as NBD exports, translated through live mapping tables")]
struct Cli {
    /// More log output (-v info, -vv debug, -vvv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server in the foreground.
    Serve {
        /// Configuration file; without it the embedded default is served
        /// (a 1 GiB volume 'default' on a sparse file under ./nbdvirt-data).
        #[arg(short, long, env = "NBDVIRT_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Check a configuration file without serving it.
    Check {
        #[arg(short, long)]
        config: PathBuf,
        /// Also open every backend (creates missing files) and check sizes.
        #[arg(long)]
        open: bool,
    },
    /// Print the embedded default configuration.
    DefaultConfig,
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let result = match cli.command {
        Command::Serve { config } => serve(config),
        Command::Check { config, open } => check(&config, open),
        Command::DefaultConfig => {
            print!("{}", nbdvirt::config::EMBEDDED_DEFAULT);
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("nbdvirt: {message}");
            ExitCode::FAILURE
        }
    }
}

fn check(path: &std::path::Path, open: bool) -> Result<(), String> {
    let config = Config::load(path).map_err(|e| e.to_string())?;
    if open {
        build_catalog(&config).map_err(|e| e.to_string())?;
    }
    println!(
        "{}: ok ({} backend(s), {} volume(s): {})",
        path.display(),
        config.backends.len(),
        config.volumes.len(),
        config.volumes.iter().map(|v| v.name.as_str()).collect::<Vec<_>>().join(", ")
    );
    Ok(())
}

fn serve(path: Option<PathBuf>) -> Result<(), String> {
    let config = match &path {
        Some(p) => Config::load(p).map_err(|e| e.to_string())?,
        None => {
            tracing::info!("no --config given: serving the embedded default (volume 'default', 1 GiB sparse file in ./nbdvirt-data)");
            Config::embedded_default()
        }
    };
    std::fs::create_dir_all(&config.server.state_dir)
        .map_err(|e| format!("state_dir {}: {e}", config.server.state_dir.display()))?;
    let catalog = build_catalog(&config).map_err(|e| e.to_string())?;
    let s = &config.server;
    let options = ServerOptions {
        io_threads: s.io_threads,
        max_connections: s.max_connections,
        handshake_timeout: Duration::from_secs(30),
        limits: ConnLimits { max_inflight_bytes: s.max_inflight, max_inflight_requests: 1024, shutdown_grace: s.shutdown_grace },
    };
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, stop.clone()).map_err(|e| format!("cannot install signal handler: {e}"))?;
    }
    let mut server = Server::bind(&s.listen, catalog, options).map_err(|e| e.to_string())?;
    server.start();
    for volume in server.catalog().volumes.values() {
        tracing::info!(volume = volume.name(), size = volume.size(), extents = volume.table().extents().len(), "exporting");
    }
    for endpoint in server.endpoints() {
        tracing::info!(%endpoint, "listening");
    }
    // A line on stdout for scripts and tests waiting for readiness.
    println!("nbdvirt: ready; listening on {}", server.endpoints().iter().map(|e| e.to_string()).collect::<Vec<_>>().join(", "));
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50));
    }
    tracing::info!("stop requested: finishing in-flight requests");
    server.shutdown().map_err(|e| format!("final flush failed: {e}"))
}
