//! Spares: backends declared `spare = true` stand by; when a mirror leg
//! fails (and the volume's `on_leg_failure` is `"spare"`, the default),
//! the daemon picks a spare of the failed store's size, else the smallest
//! larger one, adds it beside the failed leg at the same offsets and
//! resyncs it. The failed leg stays listed (failed) until it is re-added
//! or removed.

use super::assemble::store_uses;
use super::mirror_error::MirrorError;
use super::{Daemon, DaemonError};
use crate::map::{rewrite, Leg, Range, TargetSpec};
use crate::volume::Volume;
use std::sync::Arc;

impl Daemon {
    /// Whether volume `name` replaces failed legs with spares. A pool
    /// volume's legs are its pool's chunks: it runs degraded.
    pub(super) fn spare_policy(&self, name: &str) -> bool {
        !self.is_pool_volume(name) && spare_policy_of(&crate::sync::lock(&self.config), name)
    }

    /// Adds a spare beside failed leg `failed`; the spare's name, or `None`
    /// if no spare fits.
    pub(super) fn replace_with_spare(&self, volume: &Arc<Volume>, failed: &str) -> Result<Option<String>, DaemonError> {
        let table = volume.table();
        if !table.extents().iter().any(|e| e.target.legs().is_some_and(|l| l.iter().any(|l| l.store == failed))) {
            return Ok(None); // dropped meanwhile (mirror remove, a migration's end)
        }
        // Store ranges the spare must hold: the failed leg's, same offsets.
        let needed = table
            .extents()
            .iter()
            .filter_map(|e| e.target.legs()?.iter().find(|l| l.store == failed).map(|l| l.offset + e.length))
            .max()
            .unwrap_or(0);
        let catalog = self.catalog();
        let failed_size = catalog.stores.get(failed).map_or(0, |s| s.size());
        let tables: Vec<_> = catalog.volumes.values().map(|v| (v.name(), v.table())).collect();
        let candidates: Vec<(String, u64)> = spare_backends(&crate::sync::lock(&self.config))
            .into_iter()
            .filter_map(|n| catalog.stores.get(&n).map(|s| (n, s.size())))
            .filter(|(n, size)| *size >= needed && store_uses(tables.iter().map(|(v, t)| (*v, t)), |s| s == n).is_empty())
            .collect();
        let same = candidates.iter().find(|(_, s)| *s == failed_size);
        let larger = candidates.iter().filter(|(_, s)| *s > failed_size).min_by_key(|(_, s)| *s);
        let Some((spare, _)) = same.or(larger).or(candidates.iter().min_by_key(|(_, s)| *s)).cloned() else { return Ok(None) };
        let red = volume.translation().redundancy().clone();
        let name = volume.name();
        let mut regions = Vec::new();
        let extents = rewrite(table.extents(), Range::new(0, table.size()), |part| {
            Ok(match &part.target {
                TargetSpec::Mirror { legs, region } if legs.iter().any(|l| l.store == failed) => {
                    let at = legs.iter().find(|l| l.store == failed).map_or(0, |l| l.offset);
                    regions.push(red.regions_of(part.start, part.length));
                    TargetSpec::Mirror { legs: legs.iter().cloned().chain([Leg { store: spare.clone(), offset: at }]).collect(), region: *region }
                }
                other => other.clone(),
            })
        })
        .map_err(|source| MirrorError::Table { volume: name.into(), source })?;
        self.add_leg_resyncing(volume, &spare, regions.into_iter(), extents, &format!("spare {spare} for failed {failed}"), None)?;
        Ok(Some(spare))
    }
}

/// `on_leg_failure` of volume `volume` (split copies and unknown volumes
/// take the default, spare).
fn spare_policy_of(config: &crate::config::Config, volume: &str) -> bool {
    config.volumes.iter().find(|v| v.name == volume).is_none_or(|v| v.on_leg_failure == crate::config::LegFailurePolicy::Spare)
}

/// The backends declared `spare = true`.
fn spare_backends(config: &crate::config::Config) -> Vec<String> {
    config.backends.iter().filter(|b| b.spare).map(|b| b.spec.name.clone()).collect()
}
