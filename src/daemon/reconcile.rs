//! Choosing each volume's table from its config and its persisted state:
//! at start-up and for every volume a reload touches.

use super::DaemonError;
use crate::config::{Config, VolumeConfig};
use crate::map::MappingTable;
use crate::api::GenerationRecord;
use crate::persist::StateDir;

/// How the table of a volume is chosen from config and persisted state.
pub enum Decision {
    /// Use this table as is (already persisted).
    Keep(MappingTable),
    /// Commit this table as a new generation, for this reason.
    Commit(MappingTable, &'static str),
}

impl Decision {
    pub fn table(self) -> MappingTable {
        match self {
            Decision::Keep(t) | Decision::Commit(t, _) => t,
        }
    }
}

/// The persisted mapping of a record.
pub fn persisted_table(rec: &GenerationRecord) -> Result<MappingTable, DaemonError> {
    MappingTable::new(rec.generation, rec.extents.clone()).map_err(|source| DaemonError::CorruptTable { volume: rec.volume.clone(), generation: rec.generation, source: Box::new(source) })
}

/// `at` is the config position named in errors (`FILE:LINE`).
pub fn decide(at: &str, v: &VolumeConfig, record: Option<&GenerationRecord>) -> Result<Decision, DaemonError> {
    let Some(rec) = record else { return Ok(Decision::Commit(v.table(1), "initial")) };
    if rec.config_extents == v.extents {
        // Config unchanged since it was last applied: the persisted mapping,
        // including run-time changes, stays in force.
        return Ok(Decision::Keep(persisted_table(rec)?));
    }
    if rec.has_runtime_changes() {
        return Err(DaemonError::RuntimeChanges { at: at.into(), volume: v.name.clone(), generation: rec.generation, reason: rec.reason.clone() });
    }
    let table = MappingTable::new(rec.generation + 1, v.extents.clone())
        .map_err(|e| DaemonError::Config(crate::config::ConfigError { file: at.into(), line: None, field: Some(format!("volume '{}'", v.name)), message: e.to_string() }))?;
    Ok(Decision::Commit(table, "config"))
}

/// The tables every volume starts on, and the generations to commit before
/// serving them. Never silently reverts run-time changes: a volume whose
/// config diverged from them keeps its persisted mapping, with a warning.
pub fn startup_tables(config: &Config, state: &StateDir) -> Result<(Vec<MappingTable>, Vec<GenerationRecord>), DaemonError> {
    let file = config.file_name();
    let mut tables = Vec::new();
    let mut pending = Vec::new();
    for v in &config.volumes {
        let rec = state.load(&v.name)?;
        let decision = decide(&format!("{file}:{}", v.line), v, rec.as_ref());
        let table = match (decision, &rec) {
            (Ok(Decision::Commit(t, reason)), _) => {
                pending.push(GenerationRecord::new(&v.name, &t, &v.extents, reason));
                t
            }
            (Ok(Decision::Keep(t)), rec) => {
                // A crash between commit and archive leaves the current
                // generation out of the history; put it there.
                if let Some(rec) = rec {
                    let archived = state.history(&v.name).map_err(|e| DaemonError::io(format!("volume '{}': history", v.name), e))?;
                    if !archived.contains(&rec.generation) {
                        state.archive(rec).map_err(|e| DaemonError::io(format!("volume '{}': archiving", v.name), e))?;
                    }
                }
                t
            }
            (Err(why @ DaemonError::RuntimeChanges { .. }), Some(rec)) => {
                tracing::warn!(volume = %v.name, "{why}; serving persisted generation {}", rec.generation);
                persisted_table(rec)?
            }
            (Err(e), _) => return Err(e),
        };
        tables.push(table);
    }
    config.validate_tables(&tables)?;
    Ok((tables, pending))
}
