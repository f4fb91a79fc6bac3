//! The persisted record of a migration job: its spec, state and progress.
//! (Which regions are on the destination is the leg's stale map, kept by
//! the volume's mirror state; this record is what `migrate status` shows
//! and whether the job resumes at the next start.)

use super::MigrationSpec;
use crate::api::{MigrationState, MigrationStatus};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub spec: MigrationSpec,
    pub state: MigrationState,
    pub reason: Option<String>,
    /// Bytes of the range on the destination, as of the last durable sync.
    pub copied_bytes: u64,
    pub started_at: u64,
    pub finished_at: Option<u64>,
    /// Generation the cutover committed.
    pub generation: Option<u64>,
}

impl Checkpoint {
    /// Writes this checkpoint (atomically) to its place in the state directory.
    pub fn save(&self, state: &crate::persist::StateDir) -> std::io::Result<()> {
        state.write_json(&super::checkpoint_path(&self.spec.volume), self)
    }

    pub fn new(
        spec: MigrationSpec,
        state: MigrationState,
        reason: Option<String>,
        copied_bytes: u64,
        started_at: u64,
        finished_at: Option<u64>,
        generation: Option<u64>,
    ) -> Checkpoint {
        Checkpoint { spec, state, reason, copied_bytes, started_at, finished_at, generation }
    }

    /// Status of a finished job known only from its checkpoint.
    pub fn status(&self) -> MigrationStatus {
        super::status_of(&self.spec, self.state, self.reason.clone(), self.copied_bytes, self.started_at, self.finished_at, self.generation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::map::Range;

    #[test]
    fn round_trip_and_old_records_still_read() {
        let spec = MigrationSpec { volume: "v".into(), range: Range::new(0, 10), dest: "d".into(), dest_offset: 0, chunk: 1, rate: 0, discard_source: false };
        let cp = Checkpoint::new(spec, MigrationState::Running, None, 6, 0, None, None);
        let json = serde_json::to_string(&cp).unwrap();
        assert_eq!(serde_json::from_str::<Checkpoint>(&json).unwrap(), cp);
        // Records of earlier versions carry `copied_runs`: ignored.
        let old = json.replacen("\"copied_bytes\"", "\"copied_runs\":[[0,2]],\"copied_bytes\"", 1);
        assert_eq!(serde_json::from_str::<Checkpoint>(&old).unwrap(), cp);
    }
}
