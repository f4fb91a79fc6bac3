//! Which node serves the extents this node cannot (cluster mode, a
//! backend's `nodes` leaving this node out): the `Forwarder` the volume
//! layer asks when it opens such an extent's remote target.
//!
//! One link (`RemoteExport`, a few NBD connections) per volume, table
//! generation and set of stores, shared by the extents that need the same
//! stores and kept only while a translation uses it. The node it connects
//! to is chosen at each (re)connect among the members alive now that
//! reach every one of the stores, in the order the first store's `nodes`
//! lists them: when that node dies, the link moves to the next.

use crate::cluster::Members;
use crate::config::BackendConfig;
use crate::endpoint::Endpoint;
use crate::remote::{RemoteExport, RemoteOptions};
use crate::sync::lock;
use crate::volume::Forwarder;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};

type LinkKey = (String, u64, Vec<String>);

#[derive(Debug)]
pub struct ForwardRoutes {
    /// Per store, the nodes that reach it (`None`: all).
    reach: Mutex<HashMap<String, Option<Vec<String>>>>,
    /// Set once the node has joined.
    members: OnceLock<Members>,
    links: Mutex<HashMap<LinkKey, Weak<RemoteExport>>>,
}

impl ForwardRoutes {
    pub fn new(backends: &[BackendConfig]) -> Arc<ForwardRoutes> {
        let routes = ForwardRoutes { reach: Mutex::new(HashMap::new()), members: OnceLock::new(), links: Mutex::new(HashMap::new()) };
        routes.set_backends(backends);
        Arc::new(routes)
    }

    /// The backends as configured now (after a reload).
    pub fn set_backends(&self, backends: &[BackendConfig]) {
        *lock(&self.reach) = backends.iter().map(|b| (b.spec.name.clone(), b.nodes.clone())).collect();
    }

    /// Adds `backends` to the known ones, keeping the others: a catalog
    /// being staged builds its volumes before it is in force (and an
    /// aborted one leaves only names nothing uses).
    pub fn learn_backends(&self, backends: &[BackendConfig]) {
        lock(&self.reach).extend(backends.iter().map(|b| (b.spec.name.clone(), b.nodes.clone())));
    }

    pub fn joined(&self, members: Members) {
        let _ = self.members.set(members);
    }

    /// The forwarder of volume `volume`.
    pub fn for_volume(self: &Arc<Self>, volume: &str) -> Box<dyn Forwarder> {
        Box::new(VolumeForwarder { routes: self.clone(), volume: volume.into() })
    }

    /// The endpoints of the live nodes reaching every store, best first.
    fn candidates(&self, stores: &[String]) -> Vec<Endpoint> {
        let Some(members) = self.members.get() else { return Vec::new() };
        let reach = lock(&self.reach).clone();
        let reaches = |node: &str| stores.iter().all(|s| reach.get(s).is_some_and(|r| r.as_ref().is_none_or(|n| n.iter().any(|x| x == node))));
        let order = stores.iter().find_map(|s| reach.get(s).cloned().flatten()).unwrap_or_default();
        let mut serving: Vec<(String, String)> = members.serving().into_iter().filter(|(n, _)| reaches(n)).collect();
        serving.sort_by_key(|(n, _)| order.iter().position(|x| x == n).unwrap_or(usize::MAX));
        serving.into_iter().filter_map(|(_, e)| e.parse().ok()).collect()
    }
}

#[derive(Debug)]
struct VolumeForwarder {
    routes: Arc<ForwardRoutes>,
    volume: String,
}

impl Forwarder for VolumeForwarder {
    fn export_for(&self, generation: u64, stores: &[&str]) -> Result<Arc<RemoteExport>, String> {
        let mut stores: Vec<String> = stores.iter().map(|s| s.to_string()).collect();
        stores.sort();
        stores.dedup();
        let reach = lock(&self.routes.reach);
        if let Some(s) = stores.iter().find(|s| !reach.contains_key(*s)) {
            return Err(format!("store '{s}' is not a backend of this node's config"));
        }
        drop(reach);
        let key = (self.volume.clone(), generation, stores.clone());
        let mut links = lock(&self.routes.links);
        links.retain(|_, l| l.strong_count() > 0);
        if let Some(link) = links.get(&key).and_then(Weak::upgrade) {
            return Ok(link);
        }
        let routes = self.routes.clone();
        let wanted = stores.clone();
        let options = RemoteOptions {
            export: self.volume.clone(),
            stamp: Some(generation),
            ..RemoteOptions::default()
        };
        let link = Arc::new(RemoteExport::new(options, Arc::new(move || routes.candidates(&wanted))));
        links.insert(key, Arc::downgrade(&link));
        Ok(link)
    }
}
