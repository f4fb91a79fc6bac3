//! Results of `reload`, `history` and the `migrate_*` requests.

use crate::map::{Extent, Range};
use serde::{Deserialize, Serialize};

/// One swap a reload made (the volume layer's swap report as sent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwapOutcome {
    pub volume: String,
    pub from_generation: u64,
    pub generation: u64,
    /// The volume ranges whose translation changed (paused for the swap).
    pub ranges: Vec<Range>,
    pub attempts: u32,
    /// Microseconds the changed ranges were held.
    pub hold: u64,
    /// Microseconds spent draining them.
    pub drain: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadReport {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub swapped: Vec<SwapOutcome>,
    pub unchanged: Vec<String>,
    pub backends_opened: Vec<String>,
    pub backends_closed: Vec<String>,
    pub disconnected: usize,
    /// Settings that only take effect after a restart.
    pub needs_restart: Vec<String>,
    pub errors: Vec<String>,
}

/// One committed generation of a volume: what `history` answers, and the
/// record the state directory keeps (`persist`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerationRecord {
    pub volume: String,
    pub generation: u64,
    pub extents: Vec<Extent>,
    /// The config file's extents when the config was last applied to this
    /// volume. When `extents` differs, the mapping was changed at run time
    /// (migration, operator) and a reload must not silently undo that.
    pub config_extents: Vec<Extent>,
    /// Why it exists: "initial", "config", "reload", "migration to X", ...
    pub reason: String,
    /// Seconds since the epoch.
    pub committed_at: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationState {
    Running,
    Completed,
    Aborted,
    Failed,
}

impl MigrationState {
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationState::Running => "running",
            MigrationState::Completed => "completed",
            MigrationState::Aborted => "aborted",
            MigrationState::Failed => "failed",
        }
    }
}

/// One migration job (`JOB` in docs/CONTROL.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationStatus {
    pub volume: String,
    pub state: MigrationState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub copied_bytes: u64,
    pub total_bytes: u64,
    /// Data bytes actually read and written (holes are skipped).
    pub data_bytes: u64,
    pub dest: String,
    pub dest_offset: u64,
    pub range_start: u64,
    pub range_length: u64,
    pub chunk: u64,
    pub rate: u64,
    pub started_at: u64,
    pub finished_at: Option<u64>,
    /// Copy throughput since this process started the job, bytes/s.
    pub throughput: u64,
    pub generation: Option<u64>,
    /// The cluster node whose job copies (cluster mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// How often the copy started over because a node left the cluster
    /// while it ran (it may have half-written behind the copy).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub recopies: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// The result of every `migrate_*` request: `{"migrations":[JOB...]}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationList {
    pub migrations: Vec<MigrationStatus>,
}
