//! Reload, steps 2 and 3: stage everything that can fail without changing
//! anything, then apply.

use super::super::assemble::{build_translation, build_volume, default_export, handles, open_stores, OpenStore};
use crate::api::GenerationRecord;
use crate::persist::GenerationCommit;
use super::super::status::swap_outcome;
use super::super::{swap_options, Daemon, DaemonError};
use super::plan::{Plan, ReloadPlan};
use crate::api::ReloadReport;
use crate::backend::Backend;
use crate::config::Config;
use crate::map::MappingTable;
use crate::sync::lock;
use crate::volume::{Catalog, Translation, Volume};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// What a volume becomes, ready to apply.
pub(in crate::daemon) enum VolumeStep {
    Keep(Arc<Volume>),
    Swap(Arc<Volume>, Translation),
    Add(Arc<Volume>, MappingTable),
}

pub(in crate::daemon) struct StagedReload {
    steps: Vec<VolumeStep>,
    removed: Vec<String>,
    stores: HashMap<String, OpenStore>,
    handles: HashMap<String, Arc<dyn Backend>>,
    existing: HashMap<String, OpenStore>,
}

impl Daemon {
    pub(in crate::daemon) fn stage_reload(&self, new: &Config, plan: ReloadPlan) -> Result<StagedReload, DaemonError> {
        let file = new.file_name();
        let existing = lock(&self.stores).clone();
        let stores = open_stores(new, &existing)?;
        let handles = handles(&stores);
        let mut steps = Vec::new();
        for (v, p) in new.volumes.iter().zip(plan.plans) {
            steps.push(match p {
                Plan::Keep(volume) => VolumeStep::Keep(volume),
                Plan::Swap(volume, table) => {
                    let redundancy = volume.translation().redundancy().clone();
                    let forwarder = self.forwarder(&v.name);
                    VolumeStep::Swap(volume, build_translation(&file, v, table, &handles, &redundancy, forwarder.as_deref())?)
                }
                Plan::Add(table) => {
                    let forwarder = self.forwarder(&v.name);
                    let volume = build_volume(&file, v, table.clone(), &handles, Some(self.state.root()), forwarder.as_deref())?;
                    self.share_with_cluster(&volume);
                    VolumeStep::Add(Arc::new(volume), table)
                }
            });
        }
        // What the non-pool volumes will map stays theirs; the pools take
        // their new settings and stores (refused as a whole if they cannot).
        let mut tables: Vec<(String, MappingTable)> = steps
            .iter()
            .map(|s| match s {
                VolumeStep::Keep(v) => (v.name().to_string(), v.table()),
                VolumeStep::Swap(v, t) => (v.name().to_string(), t.table().clone()),
                VolumeStep::Add(v, t) => (v.name().to_string(), t.clone()),
            })
            .collect();
        // The running non-pool volumes' tables too: a volume this reload
        // removes keeps its clients until the new catalog is in force, so
        // its space joins a pool only at the next reload or start.
        for (name, v) in self.catalog().volumes.iter().filter(|(n, _)| !self.is_pool_volume(n)) {
            tables.push((name.clone(), v.table()));
        }
        self.reconfigure_pools(new, &stores, &tables)?;
        Ok(StagedReload { steps, removed: plan.removed, stores, handles, existing })
    }

    /// Applies a staged reload; failures go to `report.errors`. True if a
    /// swap failed.
    pub(in crate::daemon) fn apply_reload(&self, new: Config, staged: StagedReload, report: &mut ReloadReport) -> bool {
        let StagedReload { steps, removed, mut stores, mut handles, existing } = staged;
        // The new pause settings apply to this reload's swaps already.
        let swap = {
            let mut opts = lock(&self.swap);
            *opts = swap_options(&new, opts.crash_at);
            opts.clone()
        };
        let mut swap_failed = false;
        let mut volumes = BTreeMap::new();
        for (step, v) in steps.into_iter().zip(&new.volumes) {
            let volume = match step {
                VolumeStep::Keep(volume) => {
                    report.unchanged.push(volume.name().into());
                    volume
                }
                VolumeStep::Swap(volume, translation) => {
                    let mut commit = GenerationCommit::new(&self.state, volume.name(), v.extents.clone(), "reload");
                    match volume.swap(translation, &swap, &mut commit) {
                        Ok(r) => report.swapped.push(swap_outcome(r)),
                        Err(e) => {
                            swap_failed = true;
                            report.errors.push(e.to_string());
                        }
                    }
                    volume
                }
                VolumeStep::Add(volume, table) => {
                    if let Err(e) = self.state.commit(&GenerationRecord::new(volume.name(), &table, &v.extents, "added")) {
                        report.errors.push(format!("volume '{}': not added: persisting failed: {e}", volume.name()));
                        continue;
                    }
                    report.added.push(volume.name().into());
                    volume
                }
            };
            volumes.insert(volume.name().to_string(), volume);
        }
        for (name, v) in self.catalog().volumes.iter() {
            if self.is_split_volume(name) || self.is_pool_volume(name) {
                volumes.insert(name.clone(), v.clone());
            }
        }
        // A failed swap leaves its volume on the old table: keep the stores
        // that table still uses, even if the new config dropped them.
        for v in volumes.values() {
            for (store, _) in v.table().extents().iter().flat_map(|e| e.target.store_ranges(e.length)) {
                if let (false, Some(old)) = (stores.contains_key(store), existing.get(store)) {
                    report.errors.push(format!("backend '{store}' stays open: volume '{}' still uses it", v.name()));
                    handles.insert(store.to_string(), old.handle.clone());
                    stores.insert(store.to_string(), old.clone());
                }
            }
        }
        report.backends_opened = stores.keys().filter(|n| !existing.contains_key(*n)).cloned().collect();
        report.backends_closed = existing.keys().filter(|n| !stores.contains_key(*n)).cloned().collect();
        let server = lock(&self.server);
        server.set_catalog(Catalog { stores: handles, volumes, default_export: default_export(&new) });
        for name in removed {
            report.disconnected += server.disconnect_export(&name);
            // A manual pause dies with its volume.
            self.pauses.end(&name, None);
            report.removed.push(name);
        }
        drop(server);
        *lock(&self.stores) = stores;
        if let Some(f) = &self.forward {
            f.set_backends(&new.backends);
        }
        *lock(&self.config) = new;
        swap_failed
    }
}
