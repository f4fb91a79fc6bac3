//! `cluster apply` and a reload in a cluster: what a config file changes
//! (its catalog of volumes and backends, and the tables of the volumes it
//! shares with the running ones), applied on every node by the
//! coordinator, one barrier at a time.

use super::{Daemon, DaemonError};
use crate::api::{ApplyReport, PeerRequest, ReloadReport, SwapOutcome, TableChange};
use crate::cluster::{peer, BarrierTiming, CatalogRecord, Cluster};
use crate::config::{Config, ConfigText};
use crate::sync::lock;
use super::cluster_catalog::catalog_names;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

/// What a catalog change sends on: the file as read here.
pub(super) fn catalog_source(read: ConfigText) -> CatalogRecord {
    CatalogRecord { file: read.file, base: read.base, text: read.text, ..Default::default() }
}

impl Daemon {
    /// `cluster apply --config FILE`: FILE's volumes and backends, and its
    /// volumes' tables, on every node; run by the coordinator (forwarded
    /// to it from elsewhere). `force` disconnects removed volumes' clients.
    pub fn cluster_apply(&self, path: &Path, force: bool) -> Result<ApplyReport, DaemonError> {
        let cluster = self.member()?;
        let read = ConfigText::read(path)?;
        let new = read.parse()?;
        let changes = self.file_changes(&new, catalog_source(read), force)?;
        let report = self.apply_anywhere(cluster, changes)?;
        // This node's own file applied: it counts as read (a reload
        // applies only what the file changed since: `reload_cluster_wide`).
        let own = self.config_path.as_ref().and_then(|p| std::fs::canonicalize(p).ok());
        if own.is_some() && own == std::fs::canonicalize(path).ok() {
            *lock(&self.file_read) = new;
        }
        Ok(report)
    }

    /// `changes` on every node: run here on the coordinator, else
    /// forwarded to it.
    pub(super) fn apply_anywhere(&self, cluster: &Cluster, changes: Vec<TableChange>) -> Result<ApplyReport, DaemonError> {
        match cluster.coordinator() {
            Some((node, _, _)) if node == cluster.node() => self.apply_changes(changes),
            Some((node, _, Some(peer))) => {
                tracing::info!(coordinator = %node, "cluster apply: forwarded to the coordinator");
                peer::call(&peer, &PeerRequest::Apply { changes }, Duration::from_secs(600)).map_err(DaemonError::Peer)
            }
            _ => Err(crate::cluster::ClusterError::NotCoordinator("no coordinator is known yet".into()).into()),
        }
    }

    /// A reload's changes in a cluster, on every node at once: the tables
    /// that `new` edited since the file was last read (reported as the
    /// reload's swaps), and the volumes and backends it added or removed
    /// since (the file becomes the cluster's catalog: allowed only while
    /// the file as last read had the cluster's volumes and backends, so
    /// that it drops nothing added through another node).
    pub(super) fn reload_cluster_wide(&self, source: CatalogRecord, new: &Config, force: bool, report: &mut ReloadReport) -> Result<(), DaemonError> {
        let before: BTreeMap<String, u64> = self.catalog().volumes.iter().map(|(name, v)| (name.clone(), v.generation())).collect();
        let read = lock(&self.file_read).clone();
        let running = catalog_names(&lock(&self.config));
        let catalog_edited = catalog_names(new) != catalog_names(&read);
        if catalog_edited && catalog_names(&read) != running {
            let reason = format!(
                "{}: adds or removes volumes or backends, but the cluster's differ from this file's as last read (changed through `cluster apply` since): a reload would drop them; `nbdvirt cluster apply --config FILE` makes FILE's volumes and backends the cluster's",
                new.file_name()
            );
            return Err(DaemonError::ClusterTable { volume: String::new(), reason });
        }
        let edited: Vec<String> = new.volumes.iter().filter(|v| read.volumes.iter().find(|o| o.name == v.name).is_none_or(|o| o.extents != v.extents)).map(|v| v.name.clone()).collect();
        let wanted = |c: &TableChange| if c.catalog.is_some() { catalog_edited } else { edited.contains(&c.volume) };
        let changes: Vec<TableChange> = self.file_changes(new, source, force)?.into_iter().filter(wanted).collect();
        if changes.is_empty() {
            return Ok(());
        }
        for v in self.apply_anywhere(self.member()?, changes)?.volumes {
            // Committed, but a node did not take it: the reload is partial.
            report.errors.extend(v.unconfirmed.iter().map(|u| format!("volume '{}' generation {}: not confirmed by {u}", v.volume, v.generation)));
            if v.volume == crate::api::CATALOG {
                report.added.extend(v.added);
                report.removed.extend(v.removed);
                continue;
            }
            report.swapped.push(SwapOutcome { from_generation: before.get(&v.volume).copied().unwrap_or(0), generation: v.generation, ranges: Vec::new(), attempts: v.attempts, hold: v.hold_us, drain: 0, volume: v.volume });
        }
        Ok(())
    }

    /// What `new` changes here: its catalog first (if its volumes or
    /// backends differ), then each shared volume's table that differs.
    pub(super) fn file_changes(&self, new: &Config, source: CatalogRecord, force: bool) -> Result<Vec<TableChange>, DaemonError> {
        let what = |m: String| DaemonError::ClusterTable { volume: String::new(), reason: m };
        {
            let config = lock(&self.config);
            for b in &new.backends {
                match config.backends.iter().find(|c| c.spec.name == b.spec.name) {
                    Some(c) if c.spec.path != b.spec.path || c.nodes != b.nodes => {
                        return Err(what(format!("{}:{}: backend '{}' has another path or nodes than the open one; give the new settings a new backend name", new.file_name(), b.line, b.spec.name)))
                    }
                    _ => {}
                }
            }
        }
        let mut changes: Vec<TableChange> = self.catalog_change(new, source, force)?.into_iter().collect();
        let catalog = self.catalog();
        for v in &new.volumes {
            if catalog.volumes.get(&v.name).is_some_and(|current| v.extents != current.table().extents()) {
                changes.push(TableChange { volume: v.name.clone(), extents: v.extents.clone(), catalog: None, strict: false });
            }
        }
        Ok(changes)
    }

    /// On the coordinator: one barrier per change, one apply at a time.
    pub(super) fn apply_changes(&self, changes: Vec<TableChange>) -> Result<ApplyReport, DaemonError> {
        let cluster = self.member()?;
        let _one = lock(&self.cluster_applying);
        let (node, epoch, _) = cluster.coordinator().ok_or_else(|| crate::cluster::ClusterError::NotCoordinator("none yet".into()))?;
        let swap = lock(&self.swap).clone();
        let timing = BarrierTiming { pause_timeout: swap.pause_timeout, retries: swap.retries, backoff: swap.backoff };
        let mut volumes = Vec::new();
        for mut change in changes {
            if let Some(catalog) = change.catalog.as_mut() {
                let generation = self.prepare_catalog(cluster, catalog)?;
                let mut report = cluster.run_barrier(&change, generation, timing)?;
                for r in change.catalog.iter().flat_map(|c| &c.records) {
                    if r.removed { &mut report.removed } else { &mut report.added }.push(r.volume.clone());
                }
                volumes.push(report);
                continue;
            }
            self.volume(&change.volume)?;
            let generation = self.generation_above(cluster, std::slice::from_ref(&change.volume))?;
            volumes.push(cluster.run_barrier(&change, generation, timing)?);
        }
        Ok(ApplyReport { coordinator: node, epoch, volumes })
    }

    /// One above every generation `names` had: here, committed in etcd
    /// (tombstones too) or published by any node. Read before any node
    /// holds: without etcd nothing could commit, so `EtcdDown` refuses the
    /// change here.
    pub(super) fn generation_above(&self, cluster: &Cluster, names: &[String]) -> Result<u64, DaemonError> {
        let (catalog, published) = (self.catalog(), cluster.status().nodes);
        let mut highest = 0;
        for name in names {
            let committed = cluster.committed(name)?.map_or(0, |r| r.generation);
            let seen = published.iter().filter_map(|n| n.generations.get(name).copied()).max().unwrap_or(0);
            let local = catalog.volumes.get(name).map_or(0, |v| v.generation());
            highest = highest.max(committed).max(seen).max(local);
        }
        Ok(highest + 1)
    }
}
