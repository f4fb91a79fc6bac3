//! One node's membership, renewed tick by tick on the cluster thread: join
//! (a lease and the node's key, created only if absent), renew (which moves
//! the serving fence), publish (the node's volume generations), elect (try
//! to become coordinator) and observe (what `cluster status` shows).

use super::etcd::{Etcd, EtcdError};
use super::keys::{self, MemberRecord, NodeRecord, VolumeRecord};
use super::{lease, ClusterError, LocalTables, Shared};
use crate::api::{CoordinatorView, NodeView};
use crate::sync::lock;
use std::sync::Arc;
use std::time::Instant;

/// A node registered in etcd under its lease.
struct Joined {
    lease: i64,
    published: NodeRecord,
}

pub(super) struct Member {
    pub(super) shared: Arc<Shared>,
    local: Arc<dyn LocalTables>,
    etcd: Option<Etcd>,
    joined: Option<Joined>,
    /// Ever joined: a node that loses its lease is fenced, not joining.
    was_joined: bool,
    /// The serving deadline of the last renewal etcd granted: failsafe
    /// serves at most `failsafe` past it.
    pub(super) leased_until: Option<Instant>,
    /// The peers the last failsafe round missed (logged when it changes).
    pub(super) failsafe_missing: Option<Vec<String>>,
}

impl Member {
    pub(super) fn new(shared: Arc<Shared>, local: Arc<dyn LocalTables>) -> Member {
        Member { shared, local, etcd: None, joined: None, was_joined: false, leased_until: None, failsafe_missing: None }
    }

    fn cfg(&self) -> &crate::config::ClusterConfig {
        &self.shared.cfg
    }

    /// One round; the caller records the error, if any, and tries again at
    /// the next tick.
    pub(super) async fn tick(&mut self) -> Result<(), ClusterError> {
        let etcd = match &self.etcd {
            Some(e) => e.clone(),
            None => {
                let e = Etcd::connect(&self.cfg().etcd, super::call_limit(self.cfg())).await?;
                self.etcd = Some(e.clone());
                *lock(&self.shared.etcd) = Some(e.clone());
                e
            }
        };
        if self.shared.rejoin.swap(false, std::sync::atomic::Ordering::SeqCst) {
            // No failsafe on the old table: only a fresh renewal opens.
            self.leased_until = None;
            if let Some(joined) = self.joined.take() {
                self.shared.lease.store(0, std::sync::atomic::Ordering::SeqCst);
                tracing::warn!("a barrier's outcome is unknown here: leaving the cluster to join again on the committed tables");
                // Best effort: if etcd cannot be told, the lease expires.
                let _ = etcd.revoke(joined.lease).await;
            }
        }
        match self.keep_membership(&etcd).await {
            Ok(()) => self.set_failsafe(false),
            Err(ClusterError::Etcd(e)) => {
                self.ride_out().await;
                return Err(ClusterError::Etcd(e));
            }
            Err(e) => return Err(e),
        }
        self.publish(&etcd).await?;
        self.elect(&etcd).await?;
        self.observe(&etcd).await
    }

    /// Joins if not a member, and renews. A lease that expired while the
    /// node served on in failsafe is replaced at once, the fence left open:
    /// inside the failsafe window no barrier commits past this node.
    async fn keep_membership(&mut self, etcd: &Etcd) -> Result<(), ClusterError> {
        if self.joined.is_none() {
            self.join(etcd).await?;
        }
        match self.renew(etcd).await {
            Err(ClusterError::LeaseExpired) if self.riding_out() => {
                tracing::info!("etcd answers again; the lease expired meanwhile: joining anew while serving on in failsafe");
                self.join(etcd).await?;
                self.renew(etcd).await
            }
            r => r,
        }
    }

    fn record(&self) -> NodeRecord {
        NodeRecord {
            node: self.cfg().node.clone(),
            peer: self.cfg().peer.to_string(),
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").into(),
            generations: self.local.generations(),
            serve: self.cfg().serve.as_ref().map(ToString::to_string),
        }
    }

    async fn join(&mut self, etcd: &Etcd) -> Result<(), ClusterError> {
        let cfg = self.cfg().clone();
        let (id, _) = etcd.grant(cfg.lease_ttl).await?;
        let record = self.record();
        let value = serde_json::to_vec(&record).expect("a node record serializes");
        match etcd.create(&keys::node(&cfg.name, &cfg.node), value, id).await {
            Ok(Ok(_)) => {}
            Ok(Err(existing)) => {
                let _ = etcd.revoke(id).await;
                let peer = serde_json::from_slice::<NodeRecord>(&existing.value).map_or_else(|_| "?".into(), |r| r.peer);
                return Err(ClusterError::DuplicateNode { cluster: cfg.name, node: cfg.node, peer });
            }
            Err(e) => {
                let _ = etcd.revoke(id).await;
                return Err(e.into());
            }
        }
        let member = serde_json::to_vec(&MemberRecord { node: cfg.node.clone(), peer: cfg.peer.to_string() }).expect("serializes");
        // Current again: no longer shown as fenced.
        let joined = async {
            self.catch_up(etcd, &cfg).await?;
            etcd.put(&keys::member(&cfg.name, &cfg.node), member, 0).await?;
            etcd.delete(&keys::fenced(&cfg.name, &cfg.node)).await.map_err(ClusterError::from)
        };
        if let Err(e) = joined.await {
            let _ = etcd.revoke(id).await;
            return Err(e);
        }
        tracing::info!(cluster = %cfg.name, node = %cfg.node, lease = format!("{id:x}"), "joined the cluster");
        self.joined = Some(Joined { lease: id, published: record });
        self.shared.lease.store(id, std::sync::atomic::Ordering::SeqCst);
        self.was_joined = true;
        Ok(())
    }

    /// Brings this node's tables to the committed ones. Read after the
    /// node's key exists: a barrier committed later either listed this
    /// node (it holds too) or fails its check that no node joined since.
    async fn catch_up(&self, etcd: &Etcd, cfg: &crate::config::ClusterConfig) -> Result<(), ClusterError> {
        let mut records = Vec::new();
        for entry in etcd.list(&keys::volumes(&cfg.name)).await? {
            records.push(serde_json::from_slice::<VolumeRecord>(&entry.value).map_err(|e| ClusterError::BadRecord(e.to_string()))?);
        }
        let catalog = match etcd.get(&keys::catalog(&cfg.name)).await? {
            Some(entry) => Some(serde_json::from_slice::<keys::CatalogRecord>(&entry.value).map_err(|e| ClusterError::BadRecord(e.to_string()))?),
            None => None,
        };
        let local = self.local.clone();
        // On a blocking thread: a swap may wait for a hold to end, and a
        // hold may need etcd, whose I/O this thread drives.
        tokio::task::spawn_blocking(move || local.catch_up(catalog.as_ref(), &records))
            .await
            .map_err(|e| ClusterError::CatchUp(e.to_string()))?
            .map_err(ClusterError::CatchUp)?;
        // Read once the volumes are built: a node that announced a failure
        // before this read either wrote its mark before it, or told this
        // node after the volumes were here (`legs.rs`).
        let mut marks = Vec::new();
        for entry in etcd.list(&keys::failed_legs(&cfg.name)).await? {
            marks.push(serde_json::from_slice::<keys::FailedLegRecord>(&entry.value).map_err(|e| ClusterError::BadRecord(e.to_string()))?);
        }
        let mut peers = Vec::new();
        for entry in etcd.list(&keys::nodes(&cfg.name)).await? {
            if let Ok(r) = serde_json::from_slice::<NodeRecord>(&entry.value) {
                if r.node != cfg.node {
                    peers.push((r.node, r.peer));
                }
            }
        }
        let local = self.local.clone();
        tokio::task::spawn_blocking(move || local.mirror_legs(&marks, &peers))
            .await
            .map_err(|e| ClusterError::CatchUp(e.to_string()))?
            .map_err(ClusterError::CatchUp)
    }

    async fn renew(&mut self, etcd: &Etcd) -> Result<(), ClusterError> {
        let ttl = self.cfg().lease_ttl;
        let joined = self.joined.as_ref().expect("renew after join");
        let sent = Instant::now();
        let granted = etcd.renew(joined.lease).await?;
        match lease::serve_until(sent, granted, ttl) {
            Some(deadline) => {
                self.leased_until = Some(deadline);
                self.shared.open_fence(deadline);
            }
            None => {
                // In failsafe the fence stays: `keep_membership` joins anew.
                if !self.riding_out() {
                    self.shared.fence.close();
                    // No failsafe either until a renewal of the next lease.
                    self.leased_until = None;
                    tracing::warn!(lease = format!("{:x}", joined.lease), "membership lease expired in etcd: fenced, serving nothing until re-joined");
                }
                self.joined = None;
                self.shared.lease.store(0, std::sync::atomic::Ordering::SeqCst);
                return Err(ClusterError::LeaseExpired);
            }
        }
        Ok(())
    }

    async fn publish(&mut self, etcd: &Etcd) -> Result<(), ClusterError> {
        let record = self.record();
        let cfg = self.cfg().clone();
        let joined = self.joined.as_mut().expect("publish after join");
        if record != joined.published {
            let value = serde_json::to_vec(&record).expect("a node record serializes");
            etcd.put(&keys::node(&cfg.name, &cfg.node), value, joined.lease).await?;
            joined.published = record;
        }
        Ok(())
    }

    /// Becomes coordinator if there is none; learns who is otherwise.
    async fn elect(&mut self, etcd: &Etcd) -> Result<(), ClusterError> {
        let cfg = self.cfg().clone();
        let lease = self.joined.as_ref().expect("elect after join").lease;
        let (node, epoch) = match etcd.create(&keys::coordinator(&cfg.name), cfg.node.clone().into_bytes(), lease).await? {
            Ok(revision) => (cfg.node.clone(), revision),
            Err(entry) => (String::from_utf8_lossy(&entry.value).into_owned(), entry.create_revision),
        };
        let newer = epoch > super::lock_view(&self.shared).highest_epoch;
        self.shared.note_epoch(epoch)?;
        if newer {
            if node == cfg.node {
                tracing::info!(epoch, "this node is now the coordinator");
            } else {
                tracing::info!(coordinator = %node, epoch, "coordinator");
            }
        }
        super::lock_view(&self.shared).coordinator = Some(CoordinatorView { node, epoch });
        Ok(())
    }

    async fn observe(&mut self, etcd: &Etcd) -> Result<(), ClusterError> {
        let cfg = self.cfg().clone();
        let observed = Instant::now();
        let mut nodes: Vec<NodeView> = Vec::new();
        for entry in etcd.list(&keys::members(&cfg.name)).await? {
            if let Ok(m) = serde_json::from_slice::<MemberRecord>(&entry.value) {
                nodes.push(NodeView { node: m.node, peer: m.peer, alive: false, lease_left_ms: None, coordinator: false, generations: Default::default(), fenced_by: None, serve: None });
            }
        }
        for entry in etcd.list(&keys::nodes(&cfg.name)).await? {
            let Ok(record) = serde_json::from_slice::<NodeRecord>(&entry.value) else { continue };
            let left = etcd.ttl_left(entry.lease).await?;
            let i = match nodes.iter().position(|n| n.node == record.node) {
                Some(i) => i,
                None => {
                    nodes.push(NodeView { node: record.node.clone(), peer: String::new(), alive: false, lease_left_ms: None, coordinator: false, generations: Default::default(), fenced_by: None, serve: None });
                    nodes.len() - 1
                }
            };
            let n = &mut nodes[i];
            n.peer = record.peer;
            n.alive = left.is_some();
            n.lease_left_ms = left.map(|s| s as u64 * 1000);
            n.generations = record.generations;
            n.serve = record.serve;
        }
        let fenced = keys::fenced_all(&cfg.name);
        for entry in etcd.list(&fenced).await? {
            let node = String::from_utf8_lossy(&entry.key[fenced.len()..]).into_owned();
            if let Some(n) = nodes.iter_mut().find(|n| n.node == node) {
                n.fenced_by = Some(String::from_utf8_lossy(&entry.value).into_owned());
            }
        }
        nodes.sort_by(|a, b| a.node.cmp(&b.node));
        let catalog = etcd.get(&keys::catalog(&cfg.name)).await?.and_then(|e| serde_json::from_slice::<keys::CatalogRecord>(&e.value).ok());
        let mut view = super::lock_view(&self.shared);
        view.catalog = catalog.map(|c| crate::api::CatalogView { file: c.file, node: c.node, applied_at: c.applied_at });
        // A lease lives at least a TTL: looks less than half a TTL apart see
        // every lease alive at least once, so a member seen dead at both
        // has been dead since the first. After a longer gap it may have
        // joined and died in between: dead since now, to be sure.
        let continuous = observed.duration_since(view.observed) < cfg.lease_ttl / 2;
        for n in &mut nodes {
            n.coordinator = view.coordinator.as_ref().is_some_and(|c| c.node == n.node && n.alive);
            if n.alive {
                view.dead_since.remove(&n.node);
            } else if continuous {
                view.dead_since.entry(n.node.clone()).or_insert(observed);
            } else {
                view.dead_since.insert(n.node.clone(), observed);
            }
        }
        view.nodes = nodes;
        view.observed = observed;
        Ok(())
    }

    /// (registered now, ever registered), for the state `status` reports.
    pub(super) fn joined(&self) -> (bool, bool) {
        (self.joined.is_some(), self.was_joined)
    }

    /// Leaves the cluster: revoking the lease deletes the node's key and,
    /// if it held it, the coordinator key.
    pub(super) async fn leave(&mut self) {
        if let (Some(etcd), Some(joined)) = (&self.etcd, self.joined.take()) {
            self.shared.lease.store(0, std::sync::atomic::Ordering::SeqCst);
            match etcd.revoke(joined.lease).await {
                Ok(()) => tracing::info!("left the cluster"),
                Err(e) => tracing::warn!(error = %e, "could not revoke the membership lease: it expires by itself"),
            }
        }
    }
}

impl From<EtcdError> for ClusterError {
    fn from(e: EtcdError) -> ClusterError {
        ClusterError::Etcd(e)
    }
}
