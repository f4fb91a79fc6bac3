//! Finding the config, and through it the server, for client commands.

use super::{invalid, other};
use clap::Args;
use nbdvirt::api::{ApiError, Request};
use nbdvirt::config::Config;
use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the CLI looks for a config when none is given.
const SYSTEM_CONFIG: &str = "/etc/nbdvirt/nbdvirt.toml";

/// Reload and pause may wait for drains with retries; allow for that.
const CALL_TIMEOUT: Duration = Duration::from_secs(300);

/// How a client command finds the server.
#[derive(Args, Clone)]
pub struct ServerAddress {
    /// Control socket of the server (default: `control` from the config).
    #[arg(long, global = true)]
    control: Option<PathBuf>,
    /// Config file whose `control` socket to use (default: $NBDVIRT_CONFIG,
    /// then /etc/nbdvirt/nbdvirt.toml, then the embedded default).
    #[arg(short, long, env = "NBDVIRT_CONFIG", global = true)]
    config: Option<PathBuf>,
}

/// The config file a client command uses: the given one, else the system
/// one if it exists; `None` means the embedded default.
fn config_file(given: Option<&Path>) -> Option<PathBuf> {
    given.map(Path::to_path_buf).or_else(|| Path::new(SYSTEM_CONFIG).exists().then(|| PathBuf::from(SYSTEM_CONFIG)))
}

impl ServerAddress {
    /// The config the server runs on, loaded.
    pub fn load_config(&self) -> Result<Config, ApiError> {
        match config_file(self.config.as_deref()) {
            Some(p) => Config::load(&p).map_err(|e| invalid(e.to_string())),
            None => Ok(Config::embedded_default()),
        }
    }

    /// The `--config` given (or $NBDVIRT_CONFIG), if any.
    pub fn config_path(&self) -> Option<PathBuf> {
        self.config.clone()
    }

    pub fn control_path(&self) -> Result<PathBuf, ApiError> {
        if let Some(p) = &self.control {
            return Ok(p.clone());
        }
        let Some(path) = config_file(self.config.as_deref()) else { return Ok(Config::embedded_default().server.control) };
        match Config::load(&path) {
            Ok(config) => Ok(config.server.control),
            // A config being edited may be invalid; the server (running on
            // the previous one) must still be reachable, e.g. to see why a
            // reload failed. Only `[server] control` / `state_dir` are needed.
            Err(e) => nbdvirt::config::control_socket_of(&path).ok_or_else(|| invalid(format!("{e} (use --control to reach the server anyway)"))),
        }
    }

    /// One request to the server; its answer as a `T`.
    pub fn call<T: DeserializeOwned>(&self, request: &Request) -> Result<T, ApiError> {
        nbdvirt::control::client::call(&self.control_path()?, request, CALL_TIMEOUT).map_err(ApiError::from)
    }
}

/// `START:LEN` with size units.
pub fn parse_range(r: &str, what: &str) -> Result<nbdvirt::api::RangeArg, ApiError> {
    let (start, len) = r.split_once(':').ok_or_else(|| invalid(format!("{what} {r}: expected START:LEN")))?;
    let start = parse_size(start, &format!("{what} start"))?;
    let length = parse_size(len, &format!("{what} length"))?;
    Ok(nbdvirt::api::RangeArg { start, length })
}

pub fn parse_size(s: &str, what: &str) -> Result<u64, ApiError> {
    nbdvirt::config::parse_size(s).map_err(|e| invalid(format!("{what}: {e}")))
}

pub fn parse_duration(s: &str, what: &str) -> Result<Duration, ApiError> {
    nbdvirt::config::parse_duration(s).map_err(|e| invalid(format!("{what}: {e}")))
}

/// A failure reported as text by a lower layer without a kind.
pub fn untyped(e: impl std::fmt::Display) -> ApiError {
    other(e.to_string())
}
