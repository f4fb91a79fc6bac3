//! How the caller of a swap makes a new generation durable.

use crate::map::MappingTable;
use std::io;

#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// Writing the generation ready (before the pause) failed.
    #[error("persisting generation {generation}: {source}")]
    Prepare { generation: u64, source: io::Error },
    /// Making the prepared generation the committed one failed.
    #[error("committing generation {generation}: {source}")]
    Persist { generation: u64, source: io::Error },
    /// Syncing data the generation depends on failed.
    #[error("syncing {what}: {source}")]
    Sync { what: &'static str, source: io::Error },
    /// A pre-commit check refused: what the generation depends on is not
    /// safe (e.g. the migration was aborted while held); the reason says why.
    #[error("{0}")]
    Refused(String),
}

/// Steps of a commit, called by the swap phases.
pub trait Commit {
    /// Before the pause: make the generation ready (e.g. write and fsync a
    /// temporary file). A failure aborts the swap before anything is held.
    fn prepare(&mut self, table: &MappingTable) -> Result<(), CommitError>;
    /// While the changed ranges are paused and drained: make it the
    /// committed generation, durably, together with any data it depends on.
    fn commit(&mut self, table: &MappingTable) -> Result<(), CommitError>;
    /// After the swap, outside the pause (e.g. archive a copy).
    fn committed(&mut self, _table: &MappingTable) {}
}

/// For tables nobody needs to find again (tests, tools): nothing to
/// persist.
#[derive(Debug, Default)]
pub struct Unpersisted;

impl Commit for Unpersisted {
    fn prepare(&mut self, _table: &MappingTable) -> Result<(), CommitError> {
        Ok(())
    }
    fn commit(&mut self, _table: &MappingTable) -> Result<(), CommitError> {
        Ok(())
    }
}
