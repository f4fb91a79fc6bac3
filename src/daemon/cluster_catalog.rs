//! Volumes and backends added and removed on every node at once.
//!
//! A `cluster apply` whose file has other volumes or backends than the
//! running ones runs one **catalog barrier** before its table barriers:
//! every node stages the file's backends and volumes (opens the stores it
//! reaches, builds the added volumes, refuses to drop a volume that has
//! clients unless forced) and answers `Held`; the commit writes the file
//! (etcd's `catalog`), the added volumes' first tables and the removed
//! ones' tombstones in one transaction; each node then serves the new
//! catalog (reload's apply step). A node that joins later takes the
//! catalog before it serves (`catch_up_catalog`), so etcd wins over its
//! own file. Nothing is held: an added volume has no clients yet, and a
//! removed one's last writes are answered before its clients are cut.

use super::reload::{Plan, ReloadPlan, StagedReload};
use super::{Daemon, DaemonError};
use crate::api::{CatalogChange, Held, HoldOrder, ReloadReport, TableChange, VolumeRecord, CATALOG};
use crate::cluster::{CatalogRecord, Cluster};
use crate::config::Config;
use crate::map::MappingTable;
use crate::sync::lock;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{mpsc, Arc};

/// The largest file a catalog may come from: its text goes into one etcd
/// transaction with the volume records, and etcd refuses requests over
/// 1.5 MiB by default.
const MAX_CATALOG_TEXT: usize = 1 << 20;

/// A staged catalog: the config this node runs with it, and what reload
/// applies.
type StagedCatalog = (Config, StagedReload, crate::server::Security);

impl Daemon {
    /// The catalog barrier `file` (parsed as `new`) needs: `None` if it has
    /// this node's volumes and backends.
    pub(super) fn catalog_change(&self, new: &Config, source: CatalogRecord, force: bool) -> Result<Option<TableChange>, DaemonError> {
        // The volumes served (one this node failed to add is not), the
        // backends configured.
        let running = (self.catalog().volumes.keys().cloned().collect(), catalog_names(&lock(&self.config)).1);
        if running == catalog_names(new) {
            return Ok(None);
        }
        if new.cluster.is_none() {
            // Its volumes must pass the checks a cluster node's config does
            // (no mirrors, every extent reachable from some node).
            let reason = format!("{}: adds or removes volumes or backends but has no [cluster] section; the cluster's volumes are checked as a cluster node's", new.file_name());
            return Err(DaemonError::ClusterTable { volume: String::new(), reason });
        }
        if source.text.len() > MAX_CATALOG_TEXT {
            // Refused here, not by etcd at the commit after every node staged it.
            let reason = format!("{}: {} bytes; the cluster's volumes and backends are kept in etcd as the file's text, at most {MAX_CATALOG_TEXT} bytes (etcd's requests are limited)", new.file_name(), source.text.len());
            return Err(DaemonError::ClusterTable { volume: String::new(), reason });
        }
        let CatalogRecord { file, base, text, .. } = source;
        Ok(Some(TableChange { volume: CATALOG.into(), extents: Vec::new(), catalog: Some(CatalogChange { file, base, text, force, records: Vec::new() }), strict: false }))
    }

    /// On the coordinator, before the barrier: the records its commit
    /// writes (added volumes on their file's extents, removed ones as
    /// tombstones), all at one generation above any the names had.
    pub(super) fn prepare_catalog(&self, cluster: &Cluster, change: &mut CatalogChange) -> Result<u64, DaemonError> {
        let new = Config::parse(&change.text, &change.file, &change.base)?;
        let catalog = self.catalog();
        let added: Vec<_> = new.volumes.iter().filter(|v| !catalog.volumes.contains_key(&v.name)).collect();
        let removed: Vec<String> = catalog.volumes.keys().filter(|n| !new.volumes.iter().any(|v| &v.name == *n)).cloned().collect();
        let names: Vec<String> = added.iter().map(|v| v.name.clone()).chain(removed.iter().cloned()).collect();
        let generation = self.generation_above(cluster, &names)?;
        change.records = added.iter().map(|v| VolumeRecord { volume: v.name.clone(), generation, extents: v.extents.clone(), removed: false }).collect();
        change.records.extend(removed.into_iter().map(|volume| VolumeRecord { volume, generation, extents: Vec::new(), removed: true }));
        Ok(generation)
    }

    /// A catalog barrier's hold on this node: answers once the catalog is
    /// staged; a thread waits for the decision and applies it.
    pub(super) fn catalog_hold(self: &Arc<Self>, order: HoldOrder) -> Result<Held, DaemonError> {
        let cluster = self.member()?;
        cluster.accept_epoch(order.epoch)?;
        let barrier = order.barrier.clone();
        self.spawn_hold(&barrier, move |daemon, held, decided| daemon.hold_catalog(order, held, decided))
    }

    fn hold_catalog(&self, order: HoldOrder, held: mpsc::Sender<Result<Held, DaemonError>>, decided: mpsc::Receiver<super::cluster_node::Decision>) {
        let cluster = self.member().expect("holds exist only in cluster mode");
        let _shown = cluster.mark_barrier(&order.barrier, CATALOG, order.generation, "holding");
        let change = order.catalog.as_ref().expect("a catalog order");
        // No reload or other catalog change may interleave; one running
        // now is refused (the coordinator tries again) rather than waited
        // for: it may itself wait for this apply's coordinator.
        let admin = self.admin.try_lock().map_err(|_| DaemonError::ClusterBusy(format!("node {}: another administrative operation (a reload?) is running", cluster.node())));
        let tables: BTreeMap<String, (u64, Vec<crate::map::Extent>)> = change.records.iter().filter(|r| !r.removed).map(|r| (r.volume.clone(), (r.generation, r.extents.clone()))).collect();
        let staged = admin.and_then(|admin| Ok((admin, self.stage_catalog(change, &tables, change.force)?)));
        let (_admin, (new, staged, security)) = match staged {
            Ok(s) => s,
            Err(e) => {
                lock(&self.holds).remove(&order.barrier);
                let _ = held.send(Err(e));
                return;
            }
        };
        let _ = held.send(Ok(Held { node: cluster.node().to_string(), drain_us: 0 }));
        let (commit_it, done) = self.await_decision(cluster, &order, decided);
        if !commit_it {
            return;
        }
        let mut report = ReloadReport::default();
        self.apply_reload(new, staged, &mut report);
        lock(&self.server).set_security(security);
        tracing::info!(barrier = %order.barrier, added = ?report.added, removed = ?report.removed, disconnected = report.disconnected, "cluster catalog applied");
        if !report.errors.is_empty() {
            // An added volume this node could not persist is not served
            // here (its clients go to another node): said, not fenced.
            tracing::error!(errors = ?report.errors, "cluster catalog applied in part");
            if let Some(done) = done {
                let _ = done.send(Err(report.errors.join("; ")));
            }
        }
    }

    /// Stages the catalog of `change` on this node: the added volumes on
    /// `tables` (else their file's extents at generation 1).
    fn stage_catalog(&self, change: &CatalogChange, tables: &BTreeMap<String, (u64, Vec<crate::map::Extent>)>, force: bool) -> Result<StagedCatalog, DaemonError> {
        let file = Config::parse(&change.text, &change.file, &change.base)?;
        let mut new = lock(&self.config).clone();
        // While staged, messages name the catalog's file (its lines); the
        // running config stays this node's file's.
        let own = new.source.replace(change.file.clone().into());
        let running = std::mem::take(&mut new.volumes);
        new.backends = file.backends;
        // A running volume keeps its own entry (its lines, for messages);
        // the file may not change its settings (checked in the plan).
        new.volumes = file.volumes.into_iter().map(|v| running.iter().find(|r| r.name == v.name && same_spec(r, &v)).cloned().unwrap_or(v)).collect();
        for v in &mut new.volumes {
            if let Some((_, extents)) = tables.get(&v.name) {
                v.extents = extents.clone();
            }
        }
        let plan = self.plan_catalog(&new, tables, force)?;
        let security = super::security(&new)?;
        if let Some(f) = &self.forward {
            f.learn_backends(&new.backends);
        }
        let staged = self.stage_reload(&new, plan)?;
        new.source = own;
        Ok((new, staged, security))
    }

    /// What the catalog `new` does to each volume here; refuses a change
    /// of a running volume's settings, a removal with clients (unless
    /// `force`) or during a migration, and a dropped backend still in use.
    fn plan_catalog(&self, new: &Config, tables: &BTreeMap<String, (u64, Vec<crate::map::Extent>)>, force: bool) -> Result<ReloadPlan, DaemonError> {
        let catalog = self.catalog();
        // From the config: a node catching up at start is not a member yet.
        let node = lock(&self.config).cluster.as_ref().map(|c| c.node.clone()).ok_or(DaemonError::NotClustered)?;
        let refuse = |reason: String| DaemonError::ClusterTable { volume: String::new(), reason: format!("node {node}: {reason}") };
        let mut plans = Vec::new();
        let mut in_force = Vec::new();
        for v in &new.volumes {
            let at = format!("{}:{}", new.file_name(), v.line);
            let plan = match catalog.volumes.get(&v.name) {
                Some(volume) => {
                    let spec = volume.spec();
                    if spec.read_only != v.read_only || spec.block_size != v.block_size || spec.description != v.description {
                        return Err(DaemonError::LiveSpecChange { at, volume: v.name.clone() });
                    }
                    Plan::Keep(volume.clone())
                }
                None => {
                    let generation = tables.get(&v.name).map_or(1, |(g, _)| *g);
                    let table = MappingTable::new(generation, v.extents.clone()).map_err(|e| refuse(format!("{at}: volume '{}': {e}", v.name)))?;
                    Plan::Add(table)
                }
            };
            in_force.push(match &plan {
                Plan::Keep(volume) => volume.table(),
                Plan::Swap(_, t) | Plan::Add(t) => t.clone(),
            });
            plans.push(plan);
        }
        new.validate_tables(&in_force)?;
        for (v, table) in new.volumes.iter().zip(&in_force) {
            if let Some((store, _)) = table.extents().iter().flat_map(|e| e.target.store_ranges(e.length)).find(|(s, _)| !new.backends.iter().any(|b| b.spec.name == *s)) {
                return Err(refuse(format!("volume '{}' still uses backend '{store}', which the file drops: change its table first, then drop the backend", v.name)));
            }
        }
        let removed: Vec<String> = catalog.volumes.keys().filter(|n| !new.volumes.iter().any(|v| &v.name == *n)).cloned().collect();
        let connections = lock(&self.server).connections();
        for name in &removed {
            if self.is_migrating(name) {
                return Err(refuse(format!("volume '{name}' is being migrated: abort or finish the migration first")));
            }
            let n = connections.iter().filter(|c| c.export.as_deref() == Some(name.as_str())).count();
            if n > 0 && !force {
                return Err(refuse(format!("volume '{name}' has {n} client connection(s) here (--force disconnects them)")));
            }
        }
        Ok(ReloadPlan { plans, removed })
    }

    /// A joining node takes the cluster's catalog before it serves: its
    /// volumes (the added ones on their committed tables) and backends.
    pub(super) fn catch_up_catalog(&self, catalog: &CatalogRecord, committed: &[VolumeRecord]) -> Result<(), DaemonError> {
        let _admin = lock(&self.admin);
        let change = CatalogChange { file: catalog.file.clone(), base: catalog.base.clone(), text: catalog.text.clone(), force: true, records: Vec::new() };
        let tables = committed.iter().filter(|r| !r.removed).map(|r| (r.volume.clone(), (r.generation, r.extents.clone()))).collect();
        let (new, staged, security) = self.stage_catalog(&change, &tables, true)?;
        let mut report = ReloadReport::default();
        self.apply_reload(new, staged, &mut report);
        lock(&self.server).set_security(security);
        if !report.added.is_empty() || !report.removed.is_empty() {
            tracing::info!(added = ?report.added, removed = ?report.removed, "took the cluster's catalog");
        }
        match report.errors.is_empty() {
            true => Ok(()),
            false => Err(DaemonError::ClusterTable { volume: String::new(), reason: format!("taking the cluster's catalog: {}", report.errors.join("; ")) }),
        }
    }
}

/// The names of `config`'s volumes and of its backends: what a catalog
/// change changes.
pub(super) fn catalog_names(config: &Config) -> (BTreeSet<String>, BTreeSet<String>) {
    (config.volumes.iter().map(|v| v.name.clone()).collect(), config.backends.iter().map(|b| b.spec.name.clone()).collect())
}

/// Whether a running volume's entry can stand for the file's: the same
/// settings (the extents are the cluster's anyway).
fn same_spec(a: &crate::config::VolumeConfig, b: &crate::config::VolumeConfig) -> bool {
    a.read_only == b.read_only && a.block_size == b.block_size && a.description == b.description && a.access == b.access && a.on_leg_failure == b.on_leg_failure
}
