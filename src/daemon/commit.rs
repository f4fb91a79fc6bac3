//! Making a new generation durable in the state directory.

use crate::map::{Extent, MappingTable};
use crate::persist::{now_secs, StateDir, VolumeRecord};

/// The record of `table` as a committed generation of `volume`, now. The
/// one place a record is built from a table.
pub fn record(volume: &str, table: &MappingTable, config_extents: &[Extent], reason: &str) -> VolumeRecord {
    VolumeRecord {
        volume: volume.into(),
        generation: table.generation(),
        extents: table.extents().to_vec(),
        config_extents: config_extents.to_vec(),
        reason: reason.into(),
        committed_at: now_secs(),
    }
}

/// Persists a swap's new generation in the state directory: prepared
/// before the pause, renamed into place while paused, archived after.
pub struct PersistCommit<'a> {
    state: &'a StateDir,
    volume: String,
    config_extents: Vec<Extent>,
    reason: String,
    prepared: Option<VolumeRecord>,
}

impl<'a> PersistCommit<'a> {
    pub fn new(state: &'a StateDir, volume: &str, config_extents: Vec<Extent>, reason: &str) -> Self {
        PersistCommit { state, volume: volume.into(), config_extents, reason: reason.into(), prepared: None }
    }
}

impl crate::volume::Commit for PersistCommit<'_> {
    fn prepare(&mut self, table: &MappingTable) -> Result<(), String> {
        let rec = record(&self.volume, table, &self.config_extents, &self.reason);
        self.state.prepare(&rec).map_err(|e| format!("persisting generation {}: {e}", table.generation()))?;
        self.prepared = Some(rec);
        Ok(())
    }
    fn commit(&mut self, table: &MappingTable) -> Result<(), String> {
        self.state.commit_prepared(&self.volume).map_err(|e| format!("committing generation {}: {e}", table.generation()))
    }
    fn committed(&mut self, _table: &MappingTable) {
        let Some(rec) = &self.prepared else { return };
        if let Err(e) = self.state.archive(rec) {
            tracing::warn!(volume = %self.volume, error = %e, "archiving a committed generation failed");
        }
    }
}
