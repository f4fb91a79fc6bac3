//! The persisted progress of a migration job.

use super::MigrationSpec;
use crate::api::{MigrationState, MigrationStatus};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub spec: MigrationSpec,
    pub state: MigrationState,
    pub reason: Option<String>,
    /// Copied chunks as runs `[first, count]`, compact for big volumes.
    pub copied_runs: Vec<(u64, u64)>,
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

    #[allow(clippy::too_many_arguments)]
    pub fn new(
        spec: MigrationSpec,
        state: MigrationState,
        reason: Option<String>,
        copied: &[bool],
        copied_bytes: u64,
        started_at: u64,
        finished_at: Option<u64>,
        generation: Option<u64>,
    ) -> Checkpoint {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (i, c) in copied.iter().enumerate() {
            if !c {
                continue;
            }
            match runs.last_mut() {
                Some((first, count)) if *first + *count == i as u64 => *count += 1,
                _ => runs.push((i as u64, 1)),
            }
        }
        Checkpoint { spec, state, reason, copied_runs: runs, copied_bytes, started_at, finished_at, generation }
    }

    /// Status of a finished job known only from its checkpoint.
    pub fn status(&self) -> MigrationStatus {
        super::status_of(&self.spec, self.state, self.reason.clone(), self.copied_bytes, self.started_at, self.finished_at, self.generation)
    }

    /// The copied flags for `chunks` chunks.
    pub fn copied(&self, chunks: usize) -> Vec<bool> {
        let mut out = vec![false; chunks];
        for (first, count) in &self.copied_runs {
            for i in *first..(*first + *count).min(chunks as u64) {
                out[i as usize] = true;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::map::Range;

    #[test]
    fn runs_round_trip() {
        let spec = MigrationSpec {
            volume: "v".into(),
            range: Range::new(0, 10),
            dest: "d".into(),
            dest_offset: 0,
            chunk: 1,
            rate: 0,
            discard_source: false,
        };
        let flags = vec![true, true, false, true, false, false, true, true, true, false];
        let cp = Checkpoint::new(spec, MigrationState::Running, None, &flags, 6, 0, None, None);
        assert_eq!(cp.copied_runs, vec![(0, 2), (3, 1), (6, 3)]);
        assert_eq!(cp.copied(10), flags);
        let json = serde_json::to_string(&cp).unwrap();
        assert_eq!(serde_json::from_str::<Checkpoint>(&json).unwrap(), cp);
    }
}
