//! The TOML configuration: parsing with source positions, defaults, and
//! every check that can be made before anything is opened. Errors name the
//! file, the line and the field.

mod cluster;
mod layout;
mod limits;
mod parse_ctx;
mod pool;
mod raw;
mod security;
mod server;
mod units;

pub use cluster::etcd_endpoint;
pub use parse_ctx::valid_name;
pub use security::ServerSecurity;
pub use units::{parse_duration, parse_size, UnitError};

use crate::backend::BackendSpec;
use crate::map::{Extent, MappingTable};
use crate::endpoint::Endpoint;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The embedded default configuration (`config/default.toml`).
pub const EMBEDDED_DEFAULT: &str = include_str!("../../config/default.toml");

/// A configuration error with its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: Option<usize>,
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: Vec<Endpoint>,
    pub control: PathBuf,
    pub state_dir: PathBuf,
    pub io_threads: usize,
    pub max_connections: usize,
    pub max_inflight: u64,
    /// Largest READ or WRITE a client may send (at most `max_inflight`);
    /// clients are still told 32 MiB.
    pub max_request: u32,
    pub shutdown_grace: Duration,
    pub default_export: Option<String>,
    /// Longest a swap may wait for in-flight requests before it gives up
    /// and resumes on the old table.
    pub pause_timeout: Duration,
    /// Further attempts after a drain timeout.
    pub pause_retries: u32,
    /// How long an idle connection polls for the next request before it
    /// sleeps (0 = never poll).
    pub busy_poll: Duration,
    /// Where `/metrics` (Prometheus text) is served; `None` = off.
    pub metrics: Option<Endpoint>,
    /// TLS and the handshake's limits.
    pub security: ServerSecurity,
    /// Who besides root and the server's own user may use the control
    /// socket; `None` = nobody else.
    pub control_group: Option<ControlGroup>,
}

/// `[server] control_group`, resolved when the config is loaded so that a
/// typo fails the load (naming the line) instead of locking out the
/// operators when the server starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlGroup {
    /// As written in the config (a name, or a numeric gid without one).
    pub name: String,
    pub gid: u32,
}

impl fmt::Display for ControlGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "'{}' (gid {})", self.name, self.gid)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    pub spec: BackendSpec,
    pub shared: bool,
    /// Held in reserve: a mirror leg that fails is replaced by a spare
    /// (see [`LegFailurePolicy`]).
    pub spare: bool,
    /// The cluster nodes that can reach the store (`None`: every node).
    /// The others forward the pieces on it to one that can.
    pub nodes: Option<Vec<String>>,
    pub line: usize,
}

impl BackendConfig {
    /// Whether node `node` can reach the store.
    pub fn reachable_from(&self, node: &str) -> bool {
        self.nodes.as_ref().is_none_or(|n| n.iter().any(|x| x == node))
    }
}

/// What a mirror does when a leg fails (`on_leg_failure`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LegFailurePolicy {
    /// Rebuild onto a `spare = true` backend; run degraded until one is
    /// found.
    #[default]
    Spare,
    /// Run on the remaining legs until an operator acts.
    Degrade,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not one of spare, degrade")]
pub struct UnknownPolicy(String);

impl std::str::FromStr for LegFailurePolicy {
    type Err = UnknownPolicy;

    fn from_str(s: &str) -> Result<Self, UnknownPolicy> {
        match s {
            "spare" => Ok(LegFailurePolicy::Spare),
            "degrade" => Ok(LegFailurePolicy::Degrade),
            other => Err(UnknownPolicy(other.into())),
        }
    }
}

/// What a thin write gets when its pool has no free chunk (`on_full`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFull {
    /// Hold the write up to `queue_timeout` while reclaim, a reload or
    /// auto-extend finds space; then ENOSPC.
    #[default]
    Queue,
    /// ENOSPC at once.
    Error,
}

/// One `[[pool]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    pub name: String,
    /// Volumes may ask for a class instead of a pool.
    pub class: Option<String>,
    /// Backends whose space the pool owns (minus the ranges config volumes
    /// map).
    pub backends: Vec<String>,
    /// Allocation unit: a power of two from 64 KiB to 64 MiB.
    pub chunk: u64,
    /// Allocation order across pools of one class (lower first).
    pub priority: u32,
    pub on_full: OnFull,
    pub queue_timeout: Duration,
    /// Free fraction (percent of the pool) below which an event is logged
    /// once and the low-water metric is set.
    pub low_water_percent: u8,
    /// Auto-extend: grow a pool store that is a regular file by this
    /// percent of its size when the pool is full (`None` = off).
    pub grow_percent: Option<u8>,
    pub line: usize,
}

#[derive(Debug, Clone)]
pub struct VolumeConfig {
    pub name: String,
    pub description: String,
    pub read_only: bool,
    pub block_size: u32,
    pub on_leg_failure: LegFailurePolicy,
    /// `tls_only`, `allow`, `read_only_for`.
    pub access: crate::access::ExportAccess,
    pub extents: Vec<Extent>,
    pub line: usize,
    /// Line of each `[[volume.extent]]`, for error messages.
    pub extent_lines: Vec<usize>,
    /// Line of each extent's `backend_offset` (its header's if absent; the
    /// `mirror`/`stripe` key's for a layout with legs).
    pub extent_offset_lines: Vec<usize>,
}

impl VolumeConfig {
    pub fn table(&self, generation: u64) -> MappingTable {
        MappingTable::new(generation, self.extents.clone()).expect("extents were validated when the config was loaded")
    }
}

/// A configuration file's text as read, with its name and the directory
/// its relative paths are relative to: what a cluster node sends on, so
/// that every node parses exactly what was checked.
#[derive(Debug, Clone)]
pub struct ConfigText {
    pub path: PathBuf,
    pub file: String,
    pub base: PathBuf,
    pub text: String,
}

impl ConfigText {
    pub fn read(path: &Path) -> Result<ConfigText, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError { file: file.clone(), line: None, field: None, message: format!("cannot read: {e}") })?;
        Ok(ConfigText { path: path.to_path_buf(), file, base: path.parent().map(Path::to_path_buf).unwrap_or_default(), text })
    }

    /// Parses and checks it (`Config::load` of the file).
    pub fn parse(&self) -> Result<Config, ConfigError> {
        let mut config = raw::parse(&self.text, &self.file, &self.base)?;
        config.source = Some(self.path.clone());
        Ok(config)
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    /// File the configuration came from; `None` for the embedded default.
    pub source: Option<PathBuf>,
    pub server: ServerConfig,
    pub backends: Vec<BackendConfig>,
    pub volumes: Vec<VolumeConfig>,
    /// Storage pools (`[[pool]]`): space from which volumes are created at
    /// run time (`nbdvirt volume create`).
    pub pools: Vec<PoolConfig>,
    /// `[cluster]`: this node's place in a cluster on etcd; `None` = a
    /// single node.
    pub cluster: Option<ClusterConfig>,
}

/// `[cluster]` (checked; `crate::cluster` runs it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// etcd client URLs, `http://HOST:PORT`.
    pub etcd: Vec<String>,
    /// The cluster's name: its keys live under `/nbdvirt/<name>/`.
    pub name: String,
    /// This node's id, unique in the cluster.
    pub node: String,
    /// This node's node-to-node endpoint, published for its peers.
    pub peer: Endpoint,
    /// The membership lease's TTL (whole seconds, 2–20 s).
    pub lease_ttl: Duration,
    /// How long past its lease a node may serve while etcd does not answer
    /// and every peer does (0: never; see `crate::cluster::failsafe`).
    pub failsafe: Duration,
    /// Where this node serves NBD, published for nodes that forward to it
    /// (its first TCP listener, else its first listener).
    pub serve: Option<Endpoint>,
    pub line: usize,
}

impl ClusterConfig {
    /// The same settings (where the section stands in the file aside).
    pub fn same_settings(&self, other: &ClusterConfig) -> bool {
        (&self.etcd, &self.name, &self.node, &self.peer, self.lease_ttl, self.failsafe, &self.serve) == (&other.etcd, &other.name, &other.node, &other.peer, other.lease_ttl, other.failsafe, &other.serve)
    }
}

impl Config {
    /// Reads and checks a configuration file. Relative paths inside it are
    /// relative to the file's directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        ConfigText::read(path)?.parse()
    }

    /// The embedded default, with paths relative to the current directory.
    pub fn embedded_default() -> Config {
        raw::parse(EMBEDDED_DEFAULT, "<embedded default>", Path::new("")).expect("the embedded default config is valid")
    }

    /// Parses configuration text; `file` names it in errors, `base` anchors
    /// relative paths.
    pub fn parse(text: &str, file: &str, base: &Path) -> Result<Config, ConfigError> {
        raw::parse(text, file, base)
    }

    pub fn file_name(&self) -> String {
        self.source.as_ref().map_or_else(|| "<embedded default>".to_string(), |p| p.display().to_string())
    }

    /// The exclusivity check over the tables actually in force (which may
    /// differ from the config's after run-time changes), one per volume.
    pub fn validate_tables(&self, tables: &[MappingTable]) -> Result<(), ConfigError> {
        raw::check_exclusive_tables(&self.file_name(), &self.volumes, tables, &self.backends)
    }
}

/// The control socket named by a config file, read leniently (the rest of
/// the file may be invalid): `[server] control`, else `state_dir/control.sock`.
pub fn control_socket_of(path: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(path).ok()?;
    let value: toml::Table = text.parse().ok()?;
    let server = value.get("server")?.as_table()?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let control = match server.get("control").and_then(|c| c.as_str()) {
        Some(c) => PathBuf::from(c),
        None => PathBuf::from(server.get("state_dir").and_then(|d| d.as_str()).unwrap_or(crate::defaults::STATE_DIR)).join(crate::defaults::CONTROL_SOCKET),
    };
    Some(if control.is_absolute() { control } else { base.join(control) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_example_config_is_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
                n += 1;
            }
        }
        assert!(n >= 4, "expected the example configs in {}", dir.display());
        assert_eq!(Config::embedded_default().volumes[0].name, "default");
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let text = "[[backend]]\nname = \"a\"\npath = \"/x\"\nsize = \"4XB\"\n";
        let e = Config::parse(text, "t.toml", Path::new("")).unwrap_err();
        assert_eq!((e.line, e.field.as_deref()), (Some(4), Some("backend.size")), "{e}");
        assert!(e.to_string().starts_with("t.toml:4: backend.size:"), "{e}");
        let text = "[server]\nbogus = 1\n";
        let e = Config::parse(text, "t.toml", Path::new("")).unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        assert!(e.message.contains("bogus"), "{e}");
    }

    #[test]
    fn busy_poll_accepts_microseconds_and_refuses_long_polls() {
        let parse = |v: &str| Config::parse(&format!("[server]\nbusy_poll = {v}\n"), "t.toml", Path::new(""));
        assert_eq!(parse("\"20us\"").unwrap().server.busy_poll, std::time::Duration::from_micros(20));
        assert_eq!(parse("0").unwrap().server.busy_poll, std::time::Duration::ZERO);
        let e = parse("\"5ms\"").unwrap_err();
        assert!(e.to_string().starts_with("t.toml:2: server.busy_poll:"), "{e}");
        let d = Config::parse("", "t.toml", Path::new("")).unwrap();
        assert_eq!(d.server.busy_poll, std::time::Duration::from_micros(50));
    }

    #[test]
    fn on_leg_failure_is_spare_or_degrade() {
        let parse = |v: &str| Config::parse(&format!("[[volume]]\nname = \"v\"\n{v}[[volume.extent]]\nlength = 4096\nzero = true\n"), "t.toml", Path::new(""));
        assert_eq!(parse("").unwrap().volumes[0].on_leg_failure, LegFailurePolicy::Spare);
        assert_eq!(parse("on_leg_failure = \"degrade\"\n").unwrap().volumes[0].on_leg_failure, LegFailurePolicy::Degrade);
        let e = parse("on_leg_failure = \"panic\"\n").unwrap_err();
        assert!(e.to_string().starts_with("t.toml:3: volume.on_leg_failure: 'panic' is not one of spare, degrade"), "{e}");
    }
}
