//! The commit of a new generation of a volume's mapping, for every swap
//! that changes it (reload, migration cutover): prepared before the pause,
//! renamed into place while paused, archived after.

use super::StateDir;
use crate::api::GenerationRecord;
use crate::map::{Extent, MappingTable};
use crate::volume::{Commit, CommitError};

/// A check run while paused, before the generation is committed: the
/// place for "is the data the new table points at durable?" (a cutover's
/// destination). An error refuses the commit; the old table stays.
pub type BeforeCommit<'a> = Box<dyn FnMut() -> Result<(), CommitError> + 'a>;

pub struct GenerationCommit<'a> {
    state: &'a StateDir,
    volume: String,
    config_extents: Vec<Extent>,
    reason: String,
    /// Built by `prepare`, archived by `committed`.
    record: Option<GenerationRecord>,
    before_commit: Option<BeforeCommit<'a>>,
}

impl<'a> GenerationCommit<'a> {
    /// Commits `volume`'s next generation, recording the config's extents
    /// as last applied and why the generation exists.
    pub fn new(state: &'a StateDir, volume: &str, config_extents: Vec<Extent>, reason: &str) -> Self {
        GenerationCommit { state, volume: volume.into(), config_extents, reason: reason.into(), record: None, before_commit: None }
    }

    /// Runs `check` while paused, before the commit.
    pub fn before_commit(mut self, check: impl FnMut() -> Result<(), CommitError> + 'a) -> Self {
        self.before_commit = Some(Box::new(check));
        self
    }
}

impl Commit for GenerationCommit<'_> {
    fn prepare(&mut self, table: &MappingTable) -> Result<(), CommitError> {
        let record = GenerationRecord::new(&self.volume, table, &self.config_extents, &self.reason);
        self.state.prepare(&record).map_err(|source| CommitError::Prepare { generation: table.generation(), source })?;
        self.record = Some(record);
        Ok(())
    }

    fn commit(&mut self, table: &MappingTable) -> Result<(), CommitError> {
        if let Some(check) = &mut self.before_commit {
            check()?;
        }
        self.state.commit_prepared(&self.volume).map_err(|source| CommitError::Persist { generation: table.generation(), source })
    }

    fn committed(&mut self, _table: &MappingTable) {
        let Some(record) = &self.record else { return };
        if let Err(e) = self.state.archive(record) {
            tracing::warn!(volume = %self.volume, error = %e, "archiving a committed generation failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::map::TargetSpec;

    fn table(generation: u64) -> MappingTable {
        MappingTable::new(generation, vec![Extent { start: 0, length: 4096, target: TargetSpec::Zero }]).unwrap()
    }

    #[test]
    fn refused_by_the_hook_keeps_the_old_generation() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let mut first = GenerationCommit::new(&state, "v", Vec::new(), "initial");
        first.prepare(&table(1)).unwrap();
        first.commit(&table(1)).unwrap();
        let mut refused = GenerationCommit::new(&state, "v", Vec::new(), "cutover").before_commit(|| Err(CommitError::Refused("aborted".into())));
        refused.prepare(&table(2)).unwrap();
        assert_eq!(refused.commit(&table(2)).unwrap_err().to_string(), "aborted");
        assert_eq!(state.load("v").unwrap().unwrap().generation, 1);
    }
}
