//! The three table changes of a migration, each a pause–drain–swap
//! persisted as a generation: adding the destination leg, dropping it
//! again (abort, failure), and the cutover onto the destination alone.

use super::{MigrateError, MigrationJob};
use crate::map::{add_leg, drop_leg, remap, Extent, MappingTable, Range, TargetSpec};
use crate::persist::GenerationCommit;
use crate::volume::{CommitError, SwapOptions, Translation};
use std::sync::atomic::Ordering;

impl MigrationJob {
    /// Whether every extent of the range has the destination as a leg.
    fn has_leg(&self) -> bool {
        let t = self.volume.translation();
        let r = self.spec.range;
        t.table().pieces(r.start, r.len()).all(|p| t.table().extents()[p.extent].target.legs().is_some_and(|l| l.iter().any(|l| l.store == self.spec.dest)))
    }

    /// Whether the range already is on the destination alone (a crash
    /// after the cutover's commit, before the job's record said so).
    pub(super) fn cut_over(&self) -> bool {
        let t = self.volume.translation();
        let r = self.spec.range;
        t.table().pieces(r.start, r.len()).all(|p| {
            let at = Range::new(self.spec.dest_offset + (p.volume_offset - r.start), p.length);
            t.table().extents()[p.extent].target.locate(p.extent_offset, p.length) == [(self.spec.dest.as_str(), at)]
        })
    }

    /// Swaps the volume onto `extents`, persisted with `reason`; `check`
    /// runs while held, before the commit; returns the new generation.
    /// Only the cutover carries the crash injection of `self.swap`.
    /// In a cluster the change is a barrier on every node, and `check`
    /// runs before it (its writes reach the destination through every
    /// node; what this node must make durable is its own copy).
    fn swap_to(&self, extents: Vec<Extent>, reason: &str, cutover: bool, mut check: impl FnMut() -> Result<(), CommitError>) -> Result<u64, MigrateError> {
        let old = self.volume.translation();
        if let Some(cluster) = self.cluster.get() {
            check().map_err(|reason| MigrateError::Cutover(crate::volume::SwapError::Commit { volume: self.spec.volume.clone(), reason, generation: old.table().generation() }))?;
            // Every node's hold forgets the legs the table dropped.
            return cluster.apply(&self.spec.volume, extents, cutover);
        }
        let table = MappingTable::new(old.table().generation() + 1, extents)?;
        let translation = Translation::open(table, &self.stores, old.redundancy())?;
        let record = self.state_dir.load(&self.spec.volume)?;
        let config_extents = record.map(|r| r.config_extents).unwrap_or_else(|| old.table().extents().to_vec());
        let mut commit = GenerationCommit::new(&self.state_dir, &self.spec.volume, config_extents, reason).before_commit(check);
        let options = SwapOptions { crash_at: if cutover { self.swap.crash_at } else { None }, ..self.swap.clone() };
        let report = self.volume.swap(translation, &options, &mut commit).map_err(MigrateError::Cutover)?;
        if let Err(e) = old.redundancy().retain_legs(&self.volume.table()) {
            tracing::warn!(volume = %self.spec.volume, error = %e, "forgetting dropped legs' state failed");
        }
        Ok(report.generation)
    }

    /// Adds the destination as a resyncing leg of every extent in the
    /// range, unless a resumed job's table has it (or is cut over) already.
    pub(super) fn add_leg(&self) -> Result<(), MigrateError> {
        if self.has_leg() || self.cut_over() {
            return Ok(());
        }
        let red = self.volume.translation().redundancy().clone();
        let (dest, r) = (&self.spec.dest, self.spec.range);
        let extents = add_leg(self.volume.table().extents(), r, dest, self.spec.dest_offset, red.region())?;
        red.add_resyncing_leg(dest, std::iter::once(red.regions_of(r.start, r.len()))).map_err(MigrateError::Progress)?;
        if let Err(e) = self.swap_to(extents, &format!("migration to {dest}: copying"), false, || Ok(())) {
            let _ = red.remove_leg(dest);
            return Err(e);
        }
        Ok(())
    }

    /// Drops the destination leg again: the source, which took every
    /// write, is the mapping. Best effort (logged): a failed drop leaves
    /// a mirror that still answers correctly.
    pub(super) fn drop_leg(&self, why: &str) {
        if let Some(job) = crate::sync::lock(&self.resync).take() {
            job.stop();
        }
        if !self.has_leg() {
            return;
        }
        let r = self.volume.table();
        let dropped = drop_leg(r.extents(), self.spec.range, &self.spec.dest)
            .map_err(MigrateError::from)
            .and_then(|extents| self.swap_to(extents, why, false, || Ok(())));
        if let Err(e) = dropped {
            tracing::error!(volume = %self.spec.volume, error = %e, "could not drop the destination leg; it stays a mirror leg");
        }
    }

    /// Pause–drain–swap of the range onto the destination alone, after a
    /// final flush of it; returns the generation in force afterwards.
    pub(super) fn cutover(&self) -> Result<u64, MigrateError> {
        if self.cut_over() {
            return Ok(self.volume.generation());
        }
        let old = self.volume.translation();
        let (dest, range) = (&self.spec.dest, self.spec.range);
        let onto = TargetSpec::Linear { store: dest.clone(), offset: self.spec.dest_offset };
        let extents = remap(old.table().extents(), range, &onto)?;
        let store = self.stores.get(dest).cloned().ok_or_else(|| MigrateError::UnknownStore(dest.clone()))?;
        let abort = &self.abort;
        let generation = self.swap_to(extents, &format!("migration to {dest}"), true, || {
            // Held and drained: an abort now keeps the source.
            if abort.load(Ordering::SeqCst) {
                return Err(CommitError::Refused("aborted".into()));
            }
            store.flush().map_err(|source| CommitError::Sync { what: "destination", source })
        })?;
        if self.spec.discard_source {
            // The source alone, as before the migration: trimming through it
            // leaves the destination alone.
            match drop_leg(old.table().extents(), range, dest).map_err(MigrateError::from).and_then(|e| Ok(MappingTable::new(0, e)?)) {
                Ok(table) => match Translation::new(table, &self.stores) {
                    Ok(source) => {
                        for piece in source.table().pieces(range.start, range.len()) {
                            if let Err(e) = source.trim(&piece, false) {
                                tracing::warn!(volume = %self.spec.volume, error = %e, "discarding the source range failed");
                            }
                        }
                    }
                    Err(e) => tracing::warn!(volume = %self.spec.volume, error = %e, "discarding the source range failed"),
                },
                Err(e) => tracing::warn!(volume = %self.spec.volume, error = %e, "discarding the source range failed"),
            }
        }
        Ok(generation)
    }
}
