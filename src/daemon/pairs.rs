//! Volume pairs: `split` turns an in-sync mirror leg into a volume of its
//! own, exported at once (writable unless `--read-only`); from that
//! instant both sides record their changes in a durable tracker
//! `split-NEWVOL`. `merge` rejoins them by copying only the union of both
//! trackers' regions, from the volume onto the split copy (`--keep
//! primary`) or back (`--keep secondary`).
//!
//! A split volume is not in the config: its record lives in
//! `state_dir/splits/NEWVOL.json` and it is rebuilt at start; reload
//! leaves it alone.

use super::assemble::{open_redundancy, redundancy_dir};
use super::mirror_error::MirrorError;
use super::{Daemon, DaemonError};
use crate::api::{GenerationRecord, MergeKeep, PairReport};
use crate::map::{drop_leg, rewrite, Extent, Leg, MappingTable, Range, TargetSpec};
use crate::backend::Backend;
use crate::persist::StateDir;
use crate::sync::lock;
use crate::volume::redundancy::Tracker;
use crate::volume::{Catalog, LegCondition, RegionBitmap, Translation, Volume, VolumeSpec};
use std::collections::HashMap;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Arc;

/// A split-off volume, as persisted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitRecord {
    pub name: String,
    /// The volume it was split from.
    pub origin: String,
    /// The leg's store.
    pub leg: String,
    pub read_only: bool,
    pub block_size: u32,
}

pub(super) fn split_path(name: &str) -> PathBuf {
    PathBuf::from("splits").join(format!("{name}.json"))
}

pub(super) fn tracker_name(split: &str) -> String {
    format!("split-{split}")
}

impl Daemon {
    pub(super) fn splits(&self) -> Result<Vec<SplitRecord>, DaemonError> {
        load_splits(&self.state)
    }

    /// Whether `name` is a split-off volume (kept across reloads).
    pub(super) fn is_split_volume(&self, name: &str) -> bool {
        self.state.root().join(split_path(name)).exists()
    }


    /// Publishes the catalog with `volume` added (or `name` removed).
    pub(super) fn publish(&self, add: Option<Arc<Volume>>, remove: Option<&str>) {
        let server = lock(&self.server);
        let old = server.catalog();
        let mut volumes = old.volumes.clone();
        if let Some(name) = remove {
            volumes.remove(name);
        }
        if let Some(v) = add {
            volumes.insert(v.name().to_string(), v);
        }
        server.set_catalog(Catalog { stores: old.stores.clone(), volumes, default_export: old.default_export.clone() });
    }

    pub fn split(&self, name: &str, leg: &str, as_name: &str, read_only: bool) -> Result<PairReport, DaemonError> {
        self.local_table_change("split")?;
        let _admin = lock(&self.admin);
        let volume = self.volume(name)?;
        self.not_pool_volume(name)?;
        if self.is_migrating(name) {
            return Err(DaemonError::Migrating(name.into()));
        }
        if self.is_pool_volume(as_name) || self.catalog().volumes.contains_key(as_name) || lock(&self.config).volumes.iter().any(|v| v.name == as_name) {
            return Err(MirrorError::VolumeExists(as_name.into()).into());
        }
        if !crate::config::valid_name(as_name) {
            return Err(MirrorError::NotMirrorable { volume: name.into(), index: 0, what: format!("not splittable as '{as_name}': not a valid export name") }.into());
        }
        let red = volume.translation().redundancy().clone();
        let table = volume.table();
        let state = red.leg(leg).ok_or_else(|| MirrorError::NoLeg { volume: name.into(), leg: leg.into() })?;
        match state.condition() {
            LegCondition::InSync => {}
            LegCondition::Resyncing => {
                let percent = self.mirror_view(&volume).legs.iter().find(|l| l.backend == leg).map_or(0.0, |l| l.percent);
                return Err(MirrorError::StillResyncing { volume: name.into(), leg: leg.into(), percent }.into());
            }
            other => return Err(MirrorError::NotSplittable { volume: name.into(), leg: leg.into(), state: other.as_str() }.into()),
        }
        // The split copy is the whole volume: every extent has this leg and
        // keeps another in-sync one.
        let mut copy = Vec::new();
        for (index, e) in table.extents().iter().enumerate() {
            let legs = e.target.legs().filter(|l| l.iter().any(|l| l.store == leg));
            let Some(legs) = legs else {
                return Err(MirrorError::NotMirrorable { volume: name.into(), index, what: format!("not mirrored onto '{leg}': only a leg of every extent can be split off") }.into());
            };
            if !legs.iter().any(|l| l.store != leg && red.leg(&l.store).is_some_and(|s| s.condition() == LegCondition::InSync)) {
                return Err(MirrorError::LastInSync { volume: name.into(), leg: leg.into(), at: format!(" (extent {index})") }.into());
            }
            let at = legs.iter().find(|l| l.store == leg).map_or(0, |l| l.offset);
            copy.push(Extent { start: e.start, length: e.length, target: TargetSpec::Linear { store: leg.into(), offset: at } });
        }
        let tracker = tracker_name(as_name);
        let state_err = |source| MirrorError::State { volume: name.into(), source };
        // Trackers first: every write from here on is recorded on both
        // sides (a write before the swap lands on both legs anyway).
        red.add_tracker(&tracker).map_err(state_err)?;
        let new_table = MappingTable::new(1, copy).map_err(|source| MirrorError::Table { volume: as_name.into(), source })?;
        let _ = std::fs::remove_dir_all(redundancy_dir(self.state.root(), as_name));
        let rec = SplitRecord { name: as_name.into(), origin: name.into(), leg: leg.into(), read_only, block_size: volume.spec().block_size };
        let new_volume = build_split_volume(&self.state, &rec, new_table.clone(), &self.catalog().stores)?;
        new_volume.translation().redundancy().add_tracker(&tracker).map_err(state_err)?;
        self.state.commit(&GenerationRecord::new(as_name, &new_table, &[], &format!("split from {name}"))).map_err(|e| DaemonError::io("persisting the split volume", e))?;
        self.state.write_json(&split_path(as_name), &rec).map_err(|e| DaemonError::io("persisting the split record", e))?;
        let without = drop_leg(table.extents(), Range::new(0, table.size()), leg).map_err(|source| MirrorError::Table { volume: name.into(), source })?;
        self.mirrors.stop_job(name, leg);
        // Marked split while the volume is held (nothing in flight), so the
        // leg's state stays listed (as split) after the swap drops it.
        let why = format!("split off as volume '{as_name}'");
        let swapped = self.swap_extents_then(&volume, without, &format!("split {leg} as {as_name}"), || {
            state.set_condition(LegCondition::Split, Some(why.clone()));
            red.save_legs()
        });
        let report = match swapped {
            Ok(r) => r,
            Err(e) => {
                state.set_condition(LegCondition::InSync, None);
                let _ = red.save_legs();
                let _ = std::fs::remove_file(self.state.root().join(split_path(as_name)));
                let _ = red.remove_tracker(&tracker);
                return Err(e);
            }
        };
        self.publish(Some(new_volume), None);
        tracing::info!(volume = name, leg, split = as_name, "mirror leg split off as a volume of its own");
        Ok(PairReport { volume: name.into(), split_volume: as_name.into(), leg: leg.into(), generation: report.generation, resync_bytes: 0, disconnected: 0 })
    }

    pub fn merge(&self, split: &str, into: &str, keep: MergeKeep, force: bool, rate: Option<u64>) -> Result<PairReport, DaemonError> {
        self.local_table_change("merge")?;
        let _admin = lock(&self.admin);
        let volume = self.volume(into)?;
        let copy = self.volume(split)?;
        let tracker = tracker_name(split);
        let rec = self.splits()?.into_iter().find(|r| r.name == split && r.origin == into);
        let red = volume.translation().redundancy().clone();
        let copy_red = copy.translation().redundancy().clone();
        let (Some(rec), Some(mine), Some(theirs)) = (rec, red.tracker(&tracker), copy_red.tracker(&tracker)) else {
            return Err(MirrorError::NotAPair { volume: split.into(), into: into.into() }.into());
        };
        if self.is_migrating(into) {
            return Err(DaemonError::Migrating(into.into()));
        }
        let peers: Vec<String> = lock(&self.server).connections().into_iter().filter(|c| c.export.as_deref() == Some(split)).map(|c| c.peer).collect();
        if !peers.is_empty() && !force {
            return Err(MirrorError::InUse { volume: split.into(), count: peers.len(), peers: peers.join(", ") }.into());
        }
        // No new clients, the old ones cut off, their requests drained.
        self.publish(None, Some(split));
        let disconnected = lock(&self.server).disconnect_export(split);
        let drain = lock(&self.swap).pause_timeout;
        let hold = match copy.pause(Vec::new(), drain) {
            Ok(hold) => hold,
            Err(e) => {
                self.publish(Some(copy.clone()), None);
                return Err(e.into());
            }
        };
        // On success the hold is never released: the split volume is
        // retired for good. On failure the split copy comes back as it was.
        let merged = self.rejoin(&volume, &copy, &rec, keep, rate, &mine, &theirs, disconnected);
        if merged.is_err() {
            copy.resume(hold);
            if let Some(leg) = red.leg(&rec.leg) {
                leg.set_condition(LegCondition::Split, Some(format!("split off as volume '{split}'")));
                let _ = red.save_legs();
            }
            self.publish(Some(copy.clone()), None);
        }
        merged
    }

    /// The part of a merge after the split copy is drained: the leg goes
    /// back into `volume`, the losing side resyncs the changed regions.
    #[allow(clippy::too_many_arguments)]
    fn rejoin(
        &self,
        volume: &Arc<Volume>,
        copy: &Arc<Volume>,
        rec: &SplitRecord,
        keep: MergeKeep,
        rate: Option<u64>,
        mine: &Tracker,
        theirs: &Tracker,
        disconnected: usize,
    ) -> Result<PairReport, DaemonError> {
        let (split, into) = (rec.name.as_str(), volume.name());
        let tracker = tracker_name(split);
        let red = volume.translation().redundancy().clone();
        let copy_red = copy.translation().redundancy().clone();
        copy.flush().map_err(|e| DaemonError::io(format!("flushing split volume '{split}'"), e))?;
        let union = RegionBitmap::in_memory(red.regions());
        union.union_from(mine.bits());
        union.union_from(theirs.bits());
        let changed = runs(&union);
        // The leg goes back at the offsets the split copy maps.
        let copy_table = copy.table();
        let extents = rewrite(volume.table().extents(), Range::new(0, volume.size()), |part| {
            let p = copy_table.pieces(part.start, 1).next().map(|p| &copy_table.extents()[p.extent]);
            let at = match p.map(|e| &e.target) {
                Some(TargetSpec::Linear { offset, .. }) => offset + (part.start - p.map_or(0, |e| e.start)),
                _ => return Err(crate::map::MapError::Layout { index: 0, reason: format!("split volume '{split}' no longer maps one store") }),
            };
            let back = Leg { store: rec.leg.clone(), offset: at };
            Ok(match &part.target {
                TargetSpec::Mirror { legs, region } => TargetSpec::Mirror { legs: legs.iter().cloned().chain([back]).collect(), region: *region },
                TargetSpec::Linear { store, offset } => TargetSpec::Mirror { legs: vec![Leg { store: store.clone(), offset: *offset }, back], region: red.region() },
                other => other.clone(),
            })
        })
        .map_err(|source| MirrorError::Table { volume: into.into(), source })?;
        let state_err = |source| MirrorError::State { volume: into.into(), source };
        let leg = red.add_resyncing_leg(&rec.leg, changed.iter().cloned()).map_err(state_err)?;
        if keep == MergeKeep::Secondary {
            // The split copy wins: it is whole; the others lack the changes.
            leg.make_in_sync().map_err(state_err)?;
        }
        let reason = format!("merge {split} ({keep:?})").to_lowercase();
        let swapped = if keep == MergeKeep::Secondary {
            // Marked while the volume is held, so no read meanwhile finds
            // every copy of a changed region stale.
            self.swap_extents_then(volume, extents, &reason, || {
                // The other legs as the new table opened them (a volume left
                // linear by the split has its leg state made anew).
                let others: Vec<_> = red.legs().into_iter().filter(|l| l.store() != rec.leg && l.writable()).collect();
                for other in &others {
                    for rs in &changed {
                        other.stale().set_volatile(rs.clone());
                    }
                    other.stale().sync()?;
                    other.set_condition(LegCondition::Resyncing, None);
                }
                red.save_legs()
            })
        } else {
            self.swap_extents(volume, extents, &reason)
        };
        let report = match swapped {
            Ok(r) => r,
            Err(e) => {
                let _ = red.remove_leg(&rec.leg);
                return Err(e);
            }
        };
        let _ = red.remove_tracker(&tracker);
        let _ = std::fs::remove_file(self.state.root().join(split_path(split)));
        let _ = copy_red.remove_tracker(&tracker);
        let _ = std::fs::remove_dir_all(redundancy_dir(self.state.root(), split));
        for l in red.legs() {
            if l.condition() == LegCondition::Resyncing {
                self.start_resync(volume, l.store(), rate);
            }
        }
        let resync_bytes = union.count() as u64 * red.region();
        tracing::info!(volume = into, split, ?keep, resync_bytes, "split copy merged back");
        Ok(PairReport { volume: into.into(), split_volume: split.into(), leg: rec.leg.clone(), generation: report.generation, resync_bytes, disconnected })
    }
}

/// Builds the volume of a split record over `table`.
pub(super) fn build_split_volume(state: &StateDir, rec: &SplitRecord, table: MappingTable, stores: &HashMap<String, Arc<dyn Backend>>) -> Result<Arc<Volume>, DaemonError> {
    let file = format!("{}", state.root().join(split_path(&rec.name)).display());
    let red = open_redundancy(&file, &rec.name, &table, Some(state.root()))?;
    let translation =
        Translation::open(table, stores, &red).map_err(|e| MirrorError::State { volume: rec.name.clone(), source: std::io::Error::other(e.to_string()) })?;
    let spec = VolumeSpec { name: rec.name.clone(), description: format!("split from {}", rec.origin), read_only: rec.read_only, block_size: rec.block_size };
    Ok(Arc::new(Volume::new(spec, translation)))
}

/// Split records of `state`.
pub(super) fn load_splits(state: &StateDir) -> Result<Vec<SplitRecord>, DaemonError> {
    Ok(state.read_json_dir::<SplitRecord>(std::path::Path::new("splits"))?.into_iter().map(|(_, r)| r).collect())
}

/// Adds the split volumes of `state` to `volumes` at start. A split that
/// was interrupted before its leg left the origin's table is undone (the
/// leg still belongs to the origin, which kept writing to it).
pub(super) fn add_split_volumes(
    state: &StateDir,
    volumes: &mut std::collections::BTreeMap<String, Arc<Volume>>,
    stores: &HashMap<String, Arc<dyn Backend>>,
) -> Result<(), DaemonError> {
    for rec in load_splits(state)? {
        if volumes.contains_key(&rec.name) {
            tracing::error!(volume = rec.name, "the config defines a volume named like a split copy; the split copy is not served");
            continue;
        }
        let origin = volumes.get(&rec.origin).cloned();
        let maps_leg = origin.as_ref().is_some_and(|v| v.table().extents().iter().any(|e| e.target.legs().is_some_and(|l| l.iter().any(|l| l.store == rec.leg))));
        let generation = state.load(&rec.name)?;
        let Some(generation) = generation.filter(|_| !maps_leg) else {
            tracing::warn!(volume = rec.name, origin = rec.origin, "split interrupted before the leg left its volume; the split is undone");
            if let Some(o) = &origin {
                let _ = o.translation().redundancy().remove_tracker(&tracker_name(&rec.name));
            }
            let _ = std::fs::remove_file(state.root().join(split_path(&rec.name)));
            continue;
        };
        let table = super::reconcile::persisted_table(&generation)?;
        volumes.insert(rec.name.clone(), build_split_volume(state, &rec, table, stores)?);
    }
    Ok(())
}

/// The set regions of `bits`, as runs of region numbers.
fn runs(bits: &RegionBitmap) -> Vec<std::ops::Range<usize>> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for r in bits.iter_set() {
        match out.last_mut() {
            Some((_, end)) if *end == r => *end = r + 1,
            _ => out.push((r, r + 1)),
        }
    }
    out.into_iter().map(|(a, b)| a..b).collect()
}
