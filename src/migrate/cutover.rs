//! Installing write forwarding and the final cutover, both through the
//! volume's swap phases.

use super::{MigrateError, MigrationJob};
use crate::map::{remap, MappingTable, Range, TargetSpec};
use crate::persist::GenerationCommit;
use crate::volume::{CommitError, SwapError, Translation, Unpersisted, WriteForward};
use std::sync::Arc;

impl MigrationJob {
    /// Attaches (`Some`) or detaches (`None`) write forwarding: a staged
    /// change of the same generation, paused and drained like any swap,
    /// with nothing to persist.
    pub(super) fn set_forwarding(&self, forward: Option<Arc<WriteForward>>) -> Result<(), SwapError> {
        let staged = self.volume.stage_forwarding(forward);
        let paused = staged.pause(self.swap.pause_timeout).map_err(|timed_out| timed_out.error)?;
        paused.commit(&mut Unpersisted).map(drop)
    }

    /// Detaches disabled forwarding. A disabled forwarding passes writes to
    /// the source only, so leaving it attached is safe; this is tidiness.
    pub(super) fn detach_forwarding(&self) {
        if let Err(e) = self.set_forwarding(None) {
            tracing::warn!(volume = %self.spec.volume, error = %e, "could not detach the disabled write forwarding");
        }
    }

    /// Pause–drain–swap of the range onto the destination; returns the
    /// generation in force afterwards.
    pub(super) fn cutover(&self) -> Result<u64, MigrateError> {
        let old = self.volume.translation();
        let (dest, range) = (&self.spec.dest, self.spec.range);
        // Resumed after a crash between the cutover's commit and the final
        // checkpoint: the range already is on the destination.
        let done = old.table().pieces(range.start, range.len()).all(|p| {
            let at = Range::new(self.forward.dest_offset_of(p.volume_offset), p.length);
            old.table().extents()[p.extent].target.locate(p.extent_offset, p.length) == [(dest.as_str(), at)]
        });
        if done {
            self.set_forwarding(None).map_err(MigrateError::Forwarding)?;
            return Ok(old.table().generation());
        }
        let onto = TargetSpec::Linear { store: dest.clone(), offset: self.spec.dest_offset };
        let table = MappingTable::new(old.table().generation() + 1, remap(old.table().extents(), range, &onto)?)?;
        let translation = Translation::open(table, &self.stores, old.redundancy())?;
        let record = self.state_dir.load(&self.spec.volume)?;
        let config_extents = record.map(|r| r.config_extents).unwrap_or_else(|| old.table().extents().to_vec());
        let forward = self.forward.clone();
        let mut commit = GenerationCommit::new(&self.state_dir, &self.spec.volume, config_extents, &format!("migration to {dest}"))
            .before_commit(move || {
                // Paused and drained: forwarding disabled by now (abort,
                // destination error) may have let writes reach the source only.
                if forward.is_disabled() {
                    return Err(CommitError::Refused(forward.error().unwrap_or_else(|| "aborted".into())));
                }
                // Only writes forwarded since the last checkpoint are left to sync.
                forward.dest().flush().map_err(|source| CommitError::Sync { what: "destination", source })
            });
        let report = self.volume.swap(translation, &self.swap, &mut commit).map_err(MigrateError::Cutover)?;
        if self.spec.discard_source {
            // Not through `old`: it forwards, which would zero the
            // destination too. The old table's own targets trim the source.
            match Translation::new(old.table().clone(), &self.stores) {
                Ok(source) => {
                    for piece in old.table().pieces(range.start, range.len()) {
                        if let Err(e) = source.trim(&piece, false) {
                            tracing::warn!(volume = %self.spec.volume, error = %e, "discarding the source range failed");
                        }
                    }
                }
                Err(e) => tracing::warn!(volume = %self.spec.volume, error = %e, "discarding the source range failed"),
            }
        }
        Ok(report.generation)
    }
}
