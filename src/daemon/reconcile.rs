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

/// What a node starts on: each volume's table, the generations to commit
/// before serving them, and (cluster mode) the volumes whose file was
/// edited while the node was down, with the extents it last committed.
pub struct StartupTables {
    pub tables: Vec<MappingTable>,
    pub pending: Vec<GenerationRecord>,
    pub unapplied: Vec<(String, Vec<crate::map::Extent>)>,
}

/// The tables every volume starts on, and the generations to commit before
/// serving them. Never silently reverts run-time changes: a volume whose
/// config diverged from them keeps its persisted mapping, with a warning.
/// A cluster node keeps its last committed table when its file was edited
/// meanwhile: a table of its own would be numbered apart from the others'
/// (whose forwarded requests it would then refuse); the cluster's tables
/// come at the join, and a reload applies the edit on every node.
pub fn startup_tables(config: &Config, state: &StateDir) -> Result<StartupTables, DaemonError> {
    let file = config.file_name();
    let mut tables = Vec::new();
    let mut pending = Vec::new();
    let mut unapplied = Vec::new();
    for v in &config.volumes {
        let rec = state.load(&v.name)?;
        let decision = decide(&format!("{file}:{}", v.line), v, rec.as_ref());
        let table = match (decision, &rec) {
            (Ok(Decision::Commit(_, "config")), Some(rec)) if config.cluster.is_some() => {
                tracing::warn!(volume = %v.name, generation = rec.generation, "the file's table changed while this node was down: starting on its last committed table (the cluster's comes at the join); `nbdvirt reload` applies the file's on every node");
                unapplied.push((v.name.clone(), rec.config_extents.clone()));
                persisted_table(rec)?
            }
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
        let table = match without_missing_legs(&table, |s| config.backends.iter().any(|b| b.spec.name == s)) {
            Some(kept) => {
                tracing::warn!(volume = %v.name, "mirror legs on backends no longer configured are dropped (the other legs have the data)");
                let base = pending.iter().find(|r| r.volume == v.name).map_or_else(|| rec.as_ref().map(|r| r.config_extents.clone()), |r| Some(r.config_extents.clone()));
                pending.retain(|r| r.volume != v.name);
                pending.push(GenerationRecord::new(&v.name, &kept, &base.unwrap_or_else(|| v.extents.clone()), "legs on removed backends dropped"));
                kept
            }
            None => table,
        };
        tables.push(table);
    }
    config.validate_tables(&tables)?;
    Ok(StartupTables { tables, pending, unapplied })
}

/// `table` with the mirror legs on stores `known` does not know dropped,
/// as the next generation; `None` if it has none. A mirror's last leg is
/// kept (the config check then names the missing backend).
fn without_missing_legs(table: &MappingTable, known: impl Fn(&str) -> bool) -> Option<MappingTable> {
    let mut extents = table.extents().to_vec();
    let missing: Vec<String> =
        extents.iter().filter_map(|e| e.target.legs()).flatten().filter(|l| !known(&l.store)).map(|l| l.store.clone()).collect();
    for store in &missing {
        let whole = crate::map::Range::new(0, table.size());
        if let Ok(kept) = crate::map::drop_leg(&extents, whole, store) {
            extents = kept;
        }
    }
    if missing.is_empty() {
        return None;
    }
    MappingTable::new(table.generation() + 1, extents).ok()
}
