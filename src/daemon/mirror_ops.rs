//! `mirror add | remove | readd | status` and the leg-failure policy.

use super::assemble::store_uses;
use super::mirror_error::MirrorError;
use super::{Daemon, DaemonError};
use crate::api::{LegStatus, MirrorStatus, TrackerStatus};
use crate::map::{add_leg, drop_leg, Range};
use crate::pool::placement;
use crate::sync::lock;
use crate::volume::{LegCondition, LegEvent, Volume};
use std::sync::Arc;

/// `range` (default: the whole volume), checked to lie inside `volume`
/// and be aligned to its block size; and that block size.
pub(super) fn range_of(volume: &Volume, range: Option<Range>) -> Result<(Range, u64), DaemonError> {
    let block = volume.spec().block_size as u64;
    let range = range.unwrap_or(Range::new(0, volume.size()));
    if range.is_empty() || range.end > volume.size() {
        return Err(DaemonError::RangeOutside { volume: volume.name().into(), range, size: volume.size() });
    }
    if !range.start.is_multiple_of(block) || !range.len().is_multiple_of(block) {
        return Err(DaemonError::RangeMisaligned { range, block });
    }
    Ok((range, block))
}

/// What `mirror add` asks for.
#[derive(Debug, Clone)]
pub struct MirrorAddRequest {
    pub volume: String,
    pub to: String,
    pub to_offset: Option<u64>,
    pub range: Option<Range>,
    pub rate: Option<u64>,
}

impl Daemon {
    /// Refuses changes to a volume that is being migrated or is paused.
    fn mirror_checks(&self, name: &str) -> Result<Arc<Volume>, DaemonError> {
        let volume = self.volume(name)?;
        self.not_pool_volume(name)?;
        if self.is_migrating(name) {
            return Err(DaemonError::Migrating(name.into()));
        }
        if self.pauses.contains(name) {
            return Err(DaemonError::Paused(name.into()));
        }
        Ok(volume)
    }

    /// Where `len` bytes go on store `to`: at `to_offset` if free, else the
    /// lowest free range (volume mappings and migration destinations
    /// count as used, under any name of the same store).
    pub(super) fn place_on(&self, to: &str, to_offset: Option<u64>, len: u64, block: u64) -> Result<u64, DaemonError> {
        let catalog = self.catalog();
        let dest = catalog.stores.get(to).ok_or_else(|| DaemonError::NoBackend(to.into()))?;
        let same_store = |n: &str| catalog.stores.get(n).is_some_and(|s| Arc::ptr_eq(s, dest));
        let tables: Vec<_> = catalog.volumes.values().map(|v| (v.name(), v.table())).collect();
        let mut used: Vec<Range> = store_uses(tables.iter().map(|(n, t)| (*n, t)), same_store).into_iter().map(|u| u.range).collect();
        used.extend(self.running_migrations().iter().filter(|s| same_store(&s.dest)).map(|s| Range::new(s.dest_offset, s.range.len())));
        // What a pool owns is not free for anyone else.
        used.extend(catalog.stores.keys().filter(|n| same_store(n)).flat_map(|n| self.pools.owned_ranges(n)));
        let placed = match to_offset {
            Some(off) => placement::check_at(&used, dest.size(), off, len, block),
            None => placement::lowest_free(&used, dest.size(), len, block),
        };
        placed.map_err(|error| DaemonError::Placement { dest: to.into(), error })
    }

    /// Adds a leg on another store to every extent in the range; it
    /// resyncs in the background.
    pub fn mirror_add(&self, req: MirrorAddRequest) -> Result<MirrorStatus, DaemonError> {
        let _admin = lock(&self.admin);
        let volume = self.mirror_checks(&req.volume)?;
        let name = req.volume.clone();
        let (range, block) = range_of(&volume, req.range)?;
        let red = volume.translation().redundancy().clone();
        if let Some(leg) = red.leg(&req.to).filter(|l| l.condition() != LegCondition::Split) {
            let failed = leg.condition() == LegCondition::Failed;
            let hint = if failed { "; use `nbdvirt mirror readd` to bring it back" } else { "" };
            return Err(MirrorError::AlreadyLeg { volume: name, leg: req.to, state: leg.condition().as_str(), hint }.into());
        }
        let dest_offset = self.place_on(&req.to, req.to_offset, range.len(), block)?;
        let to = req.to.clone();
        let extents = add_leg(volume.table().extents(), range, &to, dest_offset, red.region())
            .map_err(|source| MirrorError::Table { volume: name.clone(), source })?;
        if self.cluster.get().is_some() {
            self.change_legs_cluster_wide(&volume, extents, Some((&to, req.rate)))?;
            tracing::info!(volume = name, leg = to, offset = dest_offset, "mirror leg added on every node; each resyncs it");
            return Ok(self.mirror_view(&volume));
        }
        let stale = std::iter::once(red.regions_of(range.start, range.len()));
        self.add_leg_resyncing(&volume, &to, stale, extents, &format!("mirror add {to}"), req.rate)?;
        tracing::info!(volume = name, leg = to, offset = dest_offset, "mirror leg added; resyncing");
        Ok(self.mirror_view(&volume))
    }

    /// Drops a leg from every extent of the volume.
    pub fn mirror_remove(&self, name: &str, leg: &str, force: bool) -> Result<MirrorStatus, DaemonError> {
        let _admin = lock(&self.admin);
        let volume = self.mirror_checks(name)?;
        self.remove_leg_locked(&volume, leg, force, &format!("mirror remove {leg}"))?;
        Ok(self.mirror_view(&volume))
    }

    /// Removes `leg` from the table (a mirror left with one leg becomes
    /// linear) and forgets its state. Caller holds `admin`.
    pub(super) fn remove_leg_locked(&self, volume: &Arc<Volume>, leg: &str, force: bool, reason: &str) -> Result<(), DaemonError> {
        let name = volume.name();
        let red = volume.translation().redundancy().clone();
        let table = volume.table();
        let in_table = table.extents().iter().any(|e| e.target.legs().is_some_and(|l| l.iter().any(|l| l.store == leg)));
        let Some(state) = red.leg(leg).filter(|_| in_table) else {
            return Err(MirrorError::NoLeg { volume: name.into(), leg: leg.into() }.into());
        };
        if !force && state.writable() {
            for (index, e) in table.extents().iter().enumerate() {
                let Some(legs) = e.target.legs().filter(|l| l.iter().any(|l| l.store == leg)) else { continue };
                let other_in_sync = legs.iter().any(|l| l.store != leg && red.leg(&l.store).is_some_and(|s| s.condition() == LegCondition::InSync));
                if !other_in_sync {
                    return Err(MirrorError::LastInSync { volume: name.into(), leg: leg.into(), at: format!(" (extent {index})") }.into());
                }
            }
        }
        self.mirrors.stop_job(name, leg);
        let extents = drop_leg(table.extents(), Range::new(0, table.size()), leg).map_err(|source| MirrorError::Table { volume: name.into(), source })?;
        match self.cluster.get() {
            // Every node forgets the leg as its hold commits.
            Some(_) => self.change_legs_cluster_wide(volume, extents, None)?,
            None => {
                self.swap_extents(volume, extents, reason)?;
            }
        }
        red.remove_leg(leg).map_err(|source| MirrorError::State { volume: name.into(), source })?;
        tracing::info!(volume = name, leg, "mirror leg removed");
        Ok(())
    }

    /// Brings a failed leg back: it resyncs the regions written while it
    /// was away (and those in doubt when it failed).
    pub fn mirror_readd(&self, name: &str, leg: &str, rate: Option<u64>) -> Result<MirrorStatus, DaemonError> {
        let _admin = lock(&self.admin);
        let volume = self.mirror_checks(name)?;
        let red = volume.translation().redundancy().clone();
        let state = red.leg(leg).ok_or_else(|| MirrorError::NoLeg { volume: name.into(), leg: leg.into() })?;
        if state.condition() != LegCondition::Failed {
            return Err(MirrorError::NotFailed { volume: name.into(), leg: leg.into(), state: state.condition().as_str() }.into());
        }
        if self.cluster.get().is_some() {
            self.readd_cluster_wide(&volume, leg, rate)?;
            return Ok(self.mirror_view(&volume));
        }
        red.readd_leg(&state).map_err(|source| MirrorError::State { volume: name.into(), source })?;
        tracing::info!(volume = name, leg, stale_regions = state.stale().count(), "failed leg re-added; resyncing what it missed");
        self.start_resync(&volume, leg, rate);
        Ok(self.mirror_view(&volume))
    }

    /// Mirror state of one volume, or of every volume with legs or trackers.
    pub fn mirror_status(&self, volume: Option<&str>) -> Result<Vec<MirrorStatus>, DaemonError> {
        if let Some(name) = volume {
            return Ok(vec![self.mirror_view(&self.volume(name)?)]);
        }
        let catalog = self.catalog();
        Ok(catalog
            .volumes
            .values()
            .filter(|v| {
                let red = v.translation().redundancy().clone();
                !red.legs().is_empty() || !red.tracker_names().is_empty()
            })
            .map(|v| self.mirror_view(v))
            .collect())
    }

    pub(super) fn mirror_view(&self, volume: &Arc<Volume>) -> MirrorStatus {
        let t = volume.translation();
        let red = t.redundancy();
        let region = red.region();
        let legs: Vec<LegStatus> = red
            .legs()
            .iter()
            .map(|leg| {
                // Regions of the extents this leg is part of.
                let mine: Vec<usize> = t
                    .table()
                    .extents()
                    .iter()
                    .filter(|e| e.target.legs().is_some_and(|l| l.iter().any(|l| l.store == leg.store())))
                    .flat_map(|e| red.regions_of(e.start, e.length))
                    .collect();
                let stale = mine.iter().filter(|r| leg.stale().get(**r)).count();
                let total = mine.len().max(1);
                LegStatus {
                    backend: leg.store().into(),
                    state: leg.condition().as_str().into(),
                    reason: leg.reason(),
                    percent: 100.0 * (total - stale) as f64 / total as f64,
                    bytes_left: stale as u64 * region,
                    rate: leg.rate.load(std::sync::atomic::Ordering::Relaxed),
                    copied_bytes: leg.copied.load(std::sync::atomic::Ordering::Relaxed),
                }
            })
            .collect();
        let trackers: Vec<TrackerStatus> = red
            .tracker_names()
            .into_iter()
            .map(|name| {
                let changed = red.tracker(&name).map_or(0, |t| t.bits().count() as u64 * region);
                TrackerStatus { name, changed_bytes: changed }
            })
            .collect();
        let count = |s: &str| legs.iter().filter(|l| l.state == s).count();
        let pair = if count("resyncing") > 0 {
            "duplex_pending"
        } else if !trackers.is_empty() {
            "split"
        } else if count("in_sync") >= 2 {
            "duplex"
        } else {
            "simplex"
        };
        MirrorStatus {
            volume: volume.name().into(),
            pair: pair.into(),
            region,
            dirty_bytes: red.intent().bits().count() as u64 * region,
            recovered_regions: red.recovered() as u64,
            legs,
            trackers,
        }
    }

    /// The failure policy: with `on_leg_failure = "spare"` (the default), a
    /// spare backend joins beside the failed leg and resyncs.
    pub(super) fn on_leg_failure(&self, event: &LegEvent) {
        if self.is_migrating(&event.volume) {
            // The migration ends (failed) and drops its destination leg; a
            // spare would be a second copy nobody asked for.
            tracing::warn!(volume = event.volume, leg = event.leg, "leg failed during a migration; no spare is added");
            return;
        }
        if self.cluster.get().is_some() {
            // A spare would change this node's table alone; another node's
            // migration onto the leg is refused its cutover here
            // (`cluster_node::refuse_failed_legs`). Announced now, not only
            // at the next write that misses the leg (a read found it).
            tracing::warn!(volume = event.volume, leg = event.leg, "leg failed on this cluster node; I/O goes on to the other legs once every node knows, and no table that uses it is taken here");
            let leg = self.volume(&event.volume).ok().and_then(|v| v.translation().redundancy().leg(&event.leg).map(|l| (v, l)));
            if let Some((volume, leg)) = leg {
                let _ = volume.translation().redundancy().ensure_announced(&leg);
            }
            return;
        }
        if !self.spare_policy(&event.volume) {
            tracing::warn!(volume = event.volume, leg = event.leg, "leg failed; on_leg_failure = \"degrade\": running degraded");
            return;
        }
        let _admin = lock(&self.admin);
        let Ok(volume) = self.volume(&event.volume) else { return };
        // An event heard late (see `Redundancy::notify`): the leg may have
        // been re-added or removed since.
        if volume.translation().redundancy().leg(&event.leg).map(|l| l.condition()) != Some(LegCondition::Failed) {
            return;
        }
        match self.replace_with_spare(&volume, &event.leg) {
            Ok(Some(spare)) => tracing::warn!(volume = event.volume, failed = event.leg, spare, "spare added in place of the failed leg; resyncing"),
            Ok(None) => tracing::error!(volume = event.volume, leg = event.leg, "no spare backend fits; running degraded"),
            Err(e) => tracing::error!(volume = event.volume, leg = event.leg, error = %e, "adding a spare failed; running degraded"),
        }
    }
}
