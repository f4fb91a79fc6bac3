//! `serve`, `check`, `default-config`: the server side of the command.

use super::{invalid, CliResult};
use clap::Subcommand;
use nbdvirt::api::{ApiError, ErrorKind};
use nbdvirt::config::Config;
use nbdvirt::control::server::ControlServer;
use nbdvirt::daemon::{assemble::build_catalog, Daemon};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Subcommand)]
pub enum ServeCommand {
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

pub fn run(cmd: ServeCommand) -> CliResult {
    match cmd {
        ServeCommand::Serve { config } => serve(config),
        ServeCommand::Check { config, open } => check(&config, open),
        ServeCommand::DefaultConfig => {
            print!("{}", nbdvirt::config::EMBEDDED_DEFAULT);
            Ok(())
        }
    }
}

fn check(path: &Path, open: bool) -> CliResult {
    let config = Config::load(path).map_err(|e| invalid(e.to_string()))?;
    if open {
        build_catalog(&config).map_err(|e| invalid(e.to_string()))?;
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

fn io(what: &str, e: impl std::fmt::Display) -> ApiError {
    ApiError::new(ErrorKind::Io, format!("{what}: {e}"))
}

fn serve(path: Option<PathBuf>) -> CliResult {
    let config = match &path {
        Some(p) => Config::load(p).map_err(|e| invalid(e.to_string()))?,
        None => {
            tracing::info!("no --config given: serving the embedded default (volume 'default', 1 GiB sparse file in ./nbdvirt-data)");
            Config::embedded_default()
        }
    };
    // Test hook: abort at a given swap phase (crash-consistency tests).
    let crash_at = match std::env::var("NBDVIRT_TEST_CRASH_AT") {
        Ok(p) => Some(p.parse().map_err(|e| invalid(format!("NBDVIRT_TEST_CRASH_AT: {e}")))?),
        Err(_) => None,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let reload = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, stop.clone()).map_err(|e| io("cannot install signal handler", e))?;
    }
    signal_hook::flag::register(signal_hook::consts::SIGHUP, reload.clone()).map_err(|e| io("cannot install signal handler", e))?;
    let daemon = Daemon::start(path, config, crash_at).map_err(ApiError::from)?;
    let control = ControlServer::start(&daemon.control_path(), daemon.clone()).map_err(|e| io("control socket", e))?;
    daemon.start_serving();
    for volume in daemon.catalog().volumes.values() {
        tracing::info!(volume = volume.name(), size = volume.size(), generation = volume.generation(), extents = volume.table().extents().len(), "exporting");
    }
    let endpoints = daemon.endpoints();
    for endpoint in &endpoints {
        tracing::info!(%endpoint, "listening");
    }
    tracing::info!(control = %daemon.control_path().display(), "control socket ready");
    // A line on stdout for scripts and tests waiting for readiness.
    println!("nbdvirt: ready; listening on {}", endpoints.iter().map(|e| e.to_string()).collect::<Vec<_>>().join(", "));
    // systemd Type=notify: ready once listeners and control socket are up.
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    while !stop.load(Ordering::Relaxed) {
        if reload.swap(false, Ordering::Relaxed) {
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Reloading]);
            let result = daemon.reload(false);
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
            match result {
                Ok(report) => tracing::info!(?report, "SIGHUP: reload applied"),
                Err(e) => tracing::error!("SIGHUP: reload failed: {e}"),
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    tracing::info!("stop requested: finishing in-flight requests");
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    drop(control);
    daemon.shutdown().map_err(|e| io("final flush failed", e))
}
