//! Cluster mode's families: this node's membership (state, how long it may
//! still serve, coordinator and epoch), every member as this node last saw
//! it, barriers in progress, and the links of forwarded extents. A node
//! without `[cluster]` shows none of them.

use super::text::{Exposition, Family};
use crate::api;

/// Node states, one-hot (an alert matches `state="fenced"`).
const NODE_STATES: [api::NodeState; 4] = [api::NodeState::Joining, api::NodeState::Serving, api::NodeState::Failsafe, api::NodeState::Fenced];

pub(super) fn membership(e: &mut Exposition, c: &api::ClusterStatus) {
    let mut state = Family::gauge("nbdvirt_cluster_node_state", "1 for this node's cluster state (joining, serving, failsafe, fenced), 0 for the others.");
    for s in NODE_STATES {
        state.sample(&[("state", &s.to_string())], c.state == s);
    }
    let mut left = Family::gauge("nbdvirt_cluster_serving_left_seconds", "How much longer this node may serve without another lease renewal.");
    if let Some(ms) = c.serving_left_ms {
        left.sample(&[], ms as f64 / 1000.0);
    }
    let mut coordinator = Family::gauge("nbdvirt_cluster_coordinator", "1 while this node is the cluster's coordinator.");
    coordinator.sample(&[], c.coordinator.as_ref().is_some_and(|k| k.node == c.node));
    let mut epoch = Family::gauge("nbdvirt_cluster_epoch", "The highest coordinator epoch this node has seen.");
    epoch.sample(&[], c.highest_epoch.max(0) as u64);
    let mut alive = Family::gauge("nbdvirt_cluster_member_alive", "1 while the member holds a live lease in etcd, as this node last saw.");
    let mut fenced = Family::gauge("nbdvirt_cluster_member_fenced", "1 while a barrier was committed past the member and it has not re-joined.");
    for n in &c.nodes {
        let l = [("node", n.node.as_str())];
        alive.sample(&l, n.alive);
        fenced.sample(&l, n.fenced_by.is_some());
    }
    let mut barriers = Family::gauge("nbdvirt_cluster_barriers", "Barriers in progress on this node, by role (coordinating or holding).");
    for role in ["coordinating", "holding"] {
        barriers.sample(&[("role", role)], c.barriers.iter().filter(|b| b.role == role).count() as u64);
    }
    for f in [state, left, coordinator, epoch, alive, fenced, barriers] {
        e.push(f);
    }
}

/// One series per volume and set of stores: extents needing the same
/// stores share one link, so its counters are shown once.
pub(super) fn forwarding(e: &mut Exposition, status: &api::Status) {
    let mut requests = Family::counter("nbdvirt_forwarded_requests_total", "Requests sent to another node for extents on stores this node cannot reach, resends included.");
    let mut retries = Family::counter("nbdvirt_forwarded_retries_total", "Forwarded requests sent again after a lost connection or ESHUTDOWN.");
    let mut failures = Family::counter("nbdvirt_forwarded_failures_total", "Forwarded requests that failed (an NBD error, or the forwarding bound passed).");
    let mut connections = Family::gauge("nbdvirt_forwarded_connections", "Open connections of the forwarding link.");
    for v in &status.volumes {
        let mut seen: Vec<String> = Vec::new();
        for f in v.extents.iter().filter_map(|x| x.forwarded.as_ref()) {
            let stores = f.stores.join(",");
            if seen.contains(&stores) {
                continue;
            }
            let l = [("volume", v.name.as_str()), ("stores", stores.as_str())];
            requests.sample(&l, f.requests);
            retries.sample(&l, f.retries);
            failures.sample(&l, f.failed);
            connections.sample(&l, f.connections as u64);
            seen.push(stores);
        }
    }
    for f in [requests, retries, failures, connections] {
        e.push(f);
    }
}
