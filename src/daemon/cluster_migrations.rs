//! Migrations in a cluster. The job runs on one node, the copier, which
//! holds the migration's claim in etcd (`Cluster::claim_migration`, bound
//! to its lease); `migrate abort` through any other node goes to the
//! claimant over the peer link, and `migrate status` asks every node.
//! `migrate start` of a volume whose committed table has a destination
//! leg that no live node copies (the copier died) takes the migration
//! over here, as `pvmove` is run again after a crash: the spec comes from
//! the table, and the copy checks its work (other nodes may still copy or
//! write), so a second copier is safe.

use super::migrations::MigrateRequest;
use super::{Daemon, DaemonError};
use crate::api::{MigrationList, MigrationStatus, PeerRequest};
use crate::cluster::peer;
use crate::map::Range;
use crate::migrate::{self, MigrationSpec};
use crate::volume::Volume;
use std::time::Duration;

/// How long a status question to the copier may take.
const ASK_LIMIT: Duration = Duration::from_secs(5);
/// An abort drops the leg by a barrier on every node before it answers.
const ABORT_LIMIT: Duration = Duration::from_secs(120);

impl Daemon {
    /// This node's cluster id (cluster mode).
    pub(super) fn node_id(&self) -> Option<String> {
        self.cluster.get().map(|c| c.node().to_string())
    }

    /// The node other than this one that holds the claim on `volume`'s
    /// migration, as (node, peer).
    fn copier_of(&self, volume: &str) -> Result<Option<(String, String)>, DaemonError> {
        let Some(cluster) = self.cluster.get() else { return Ok(None) };
        let Some(node) = cluster.migration_claimant(volume)?.filter(|n| n != cluster.node()) else { return Ok(None) };
        let peer = cluster.status().nodes.into_iter().find(|n| n.node == node).map(|n| n.peer);
        Ok(peer.map(|p| (node, p)))
    }

    /// The jobs of the other live nodes, running and finished (of
    /// `volume` only, with `Some`). A node that does not answer is skipped
    /// with a warning: status must not fail because one node is slow.
    pub(super) fn migrations_elsewhere(&self, volume: Option<&str>) -> Vec<MigrationStatus> {
        let Some(cluster) = self.cluster.get() else { return Vec::new() };
        let others: Vec<_> = cluster.status().nodes.into_iter().filter(|n| n.alive && n.node != cluster.node()).collect();
        let ask = PeerRequest::Migrations { volume: volume.map(String::from) };
        let mut found = Vec::new();
        for (n, answer) in others.iter().zip(peer::on_every(&others, |n| peer::call::<MigrationList>(&n.peer, &ask, ASK_LIMIT))) {
            match answer {
                Ok(list) => found.extend(list.migrations),
                Err(e) => tracing::warn!(node = %n.node, error = %e, "cannot ask a node for its migrations"),
            }
        }
        found
    }

    /// `migrate abort` of a job that runs on another node.
    pub(super) fn abort_elsewhere(&self, volume: &str) -> Result<MigrationStatus, DaemonError> {
        let (node, peer) = self.copier_of(volume)?.ok_or_else(|| DaemonError::NoRunningMigration(volume.into()))?;
        tracing::info!(volume, copier = %node, "migrate abort: sent to the node that copies");
        peer::call(&peer, &PeerRequest::MigrateAbort { volume: volume.into() }, ABORT_LIMIT).map_err(DaemonError::Peer)
    }

    /// In a cluster, before a migration starts here: `None` if the table
    /// has no mirror leg (a new migration), else the spec of the migration
    /// the table shows, to take over (the job's claim in etcd refuses it
    /// while its copier lives).
    pub(super) fn takeover_spec(&self, volume: &Volume, req: &MigrateRequest) -> Result<Option<MigrationSpec>, DaemonError> {
        let table = volume.table();
        let legged: Vec<_> = table.extents().iter().filter(|e| e.target.legs().is_some()).collect();
        if self.cluster.get().is_none() || legged.is_empty() {
            return Ok(None);
        }
        let not_one = |why: String| DaemonError::ClusterTable { volume: volume.name().into(), reason: format!("cannot take over the migration its table shows: {why}") };
        // The migration's destination: the last leg of each mirror extent.
        let mut spec: Option<MigrationSpec> = None;
        for e in legged {
            let legs = e.target.legs().expect("filtered");
            let dest = legs.last().expect("a mirror has legs");
            if dest.store != req.to {
                return Err(not_one(format!("its destination is '{}', not '{}'", dest.store, req.to)));
            }
            match &mut spec {
                None => {
                    spec = Some(MigrationSpec {
                        volume: volume.name().into(),
                        range: Range::new(e.start, e.length),
                        dest: dest.store.clone(),
                        dest_offset: dest.offset,
                        chunk: req.chunk.unwrap_or(migrate::DEFAULT_CHUNK),
                        rate: req.rate.unwrap_or(migrate::DEFAULT_RATE),
                        discard_source: req.discard_source,
                    })
                }
                Some(s) if s.range.end == e.start && s.dest_offset + s.range.len() == dest.offset => s.range.end += e.length,
                Some(_) => return Err(not_one("its mirror extents are not one range onto one destination range".into())),
            }
        }
        let spec = spec.expect("at least one extent");
        if req.range.is_some_and(|r| r != spec.range) || req.to_offset.is_some_and(|o| o != spec.dest_offset) {
            return Err(not_one(format!("it moves {:?} to offset {} of '{}'", spec.range, spec.dest_offset, spec.dest)));
        }
        tracing::info!(volume = volume.name(), dest = %spec.dest, "migrate start: the table shows a migration this node does not run; taking it over unless another node holds its claim");
        Ok(Some(spec))
    }

    /// The copier reads the range's stores and writes the destination
    /// itself, so it must reach them all (which also leaves every extent of
    /// the migration's tables a node that serves it: the copier).
    pub(super) fn reaches_migration(&self, volume: &Volume, spec: &MigrationSpec) -> Result<(), DaemonError> {
        if self.cluster.get().is_none() {
            return Ok(());
        }
        let catalog = self.catalog();
        let table = volume.table();
        let mut stores: Vec<String> = vec![spec.dest.clone()];
        for p in table.pieces(spec.range.start, spec.range.len()) {
            let e = &table.extents()[p.extent];
            stores.extend(e.target.store_ranges(e.length).into_iter().map(|(s, _)| s.to_string()));
        }
        match stores.into_iter().find(|s| !catalog.stores.contains_key(s)) {
            Some(s) => Err(DaemonError::ClusterTable {
                volume: volume.name().into(),
                reason: format!("this node does not reach store '{s}' of the migration: start it through a node that reaches every store it reads and writes"),
            }),
            None => Ok(()),
        }
    }
}

/// A peer's answer for `node`'s own statuses.
pub(super) fn stamped(mut list: Vec<MigrationStatus>, node: Option<String>) -> Vec<MigrationStatus> {
    for m in &mut list {
        m.node = node.clone();
    }
    list
}
