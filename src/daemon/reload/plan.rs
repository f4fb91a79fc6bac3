//! Reload, step 1: decide what happens to each volume, and refuse what
//! must not happen, before anything is opened or changed.

use super::super::assemble::store_uses;
use super::super::reconcile::{decide, Decision};
use super::super::error::DestinationTaken;
use super::super::{Daemon, DaemonError};
use crate::config::Config;
use crate::sync::lock;
use crate::map::{MappingTable, Range};
use crate::volume::Volume;
use std::sync::Arc;

/// What a reload does to one volume of the new config.
pub enum Plan {
    Keep(Arc<Volume>),
    Swap(Arc<Volume>, MappingTable),
    /// A new volume (built when staged).
    Add(MappingTable),
}

pub struct ReloadPlan {
    /// One per volume of the new config, in its order.
    pub plans: Vec<Plan>,
    /// Volumes of the running catalog the new config drops.
    pub removed: Vec<String>,
}

impl Daemon {
    pub(super) fn plan_reload(&self, new: &Config, force: bool) -> Result<ReloadPlan, DaemonError> {
        let file = new.file_name();
        let same = match (&new.cluster, &lock(&self.config).cluster) {
            (Some(a), Some(b)) => a.same_settings(b),
            (a, b) => a.is_none() && b.is_none(),
        };
        if !same {
            let line = new.cluster.as_ref().map_or(1, |c| c.line);
            return Err(DaemonError::ClusterChange { at: format!("{file}:{line}") });
        }
        let catalog = self.catalog();
        let mut plans = Vec::new();
        let mut tables = Vec::new();
        for v in &new.volumes {
            let at = format!("{file}:{}", v.line);
            if self.is_split_volume(&v.name) {
                return Err(super::super::MirrorError::VolumeExists(format!("{} (a split copy; merge it first) at {at}", v.name)).into());
            }
            if self.is_pool_volume(&v.name) {
                return Err(DaemonError::PoolConflict(format!("{at}: volume '{}' is a pool volume (made by `nbdvirt volume create`); give the config's volume another name", v.name)));
            }
            let record = self.state.load(&v.name)?;
            let decision = decide(&at, v, record.as_ref())?;
            let plan = match catalog.volumes.get(&v.name) {
                None => Plan::Add(decision.table()),
                Some(volume) => {
                    let spec = volume.spec();
                    if spec.read_only != v.read_only || spec.block_size != v.block_size || spec.description != v.description {
                        return Err(DaemonError::LiveSpecChange { at, volume: v.name.clone() });
                    }
                    let current = volume.table();
                    match decision {
                        Decision::Keep(t) if t.extents() == current.extents() => Plan::Keep(volume.clone()),
                        other => {
                            if self.is_migrating(&v.name) {
                                return Err(DaemonError::MappingLocked { at, volume: v.name.clone() });
                            }
                            Plan::Swap(volume.clone(), other.table().with_generation(current.generation() + 1))
                        }
                    }
                }
            };
            tables.push(match &plan {
                Plan::Keep(v) => v.table(),
                Plan::Swap(_, t) | Plan::Add(t) => t.clone(),
            });
            plans.push(plan);
        }
        // First: naming the migration says more than the overlap it causes.
        self.check_migration_destinations(new, &tables)?;
        new.validate_tables(&tables)?;
        self.check_pool_ranges(new, &tables)?;
        // Split copies and pool volumes are not in the config; reload
        // leaves them alone.
        let removed: Vec<String> = catalog
            .volumes
            .keys()
            .filter(|n| !new.volumes.iter().any(|v| &v.name == *n) && !self.is_split_volume(n) && !self.is_pool_volume(n))
            .cloned()
            .collect();
        let connections = connection_exports(self);
        for name in &removed {
            let n = connections.iter().filter(|c| c.as_deref() == Some(name.as_str())).count();
            if n > 0 && !force {
                return Err(DaemonError::ClientsConnected { volume: name.clone(), connections: n });
            }
        }
        Ok(ReloadPlan { plans, removed })
    }

    /// The destinations of running migrations are taken: no other volume of
    /// the new config may map them.
    fn check_migration_destinations(&self, new: &Config, tables: &[MappingTable]) -> Result<(), DaemonError> {
        for s in self.running_migrations() {
            let dest = Range::new(s.dest_offset, s.range.len());
            let others = new.volumes.iter().zip(tables).filter(|(v, _)| v.name != s.volume).map(|(v, t)| (v.name.as_str(), t));
            if let Some(u) = store_uses(others, |store| store == s.dest).into_iter().find(|u| u.range.overlaps(&dest)) {
                let v = new.volumes.iter().find(|v| v.name == u.volume).expect("from the config");
                return Err(DaemonError::MigrationDestination(Box::new(DestinationTaken {
                    at: format!("{}:{}", new.file_name(), v.line),
                    volume: u.volume.into(),
                    store: u.store.into(),
                    range: u.range,
                    migrating: s.volume.clone(),
                    dest,
                })));
            }
        }
        Ok(())
    }
}

/// The export each client connection uses.
fn connection_exports(d: &Daemon) -> Vec<Option<String>> {
    crate::sync::lock(&d.server).connections().into_iter().map(|c| c.export).collect()
}
