//! `reload`: re-read the config file and apply it under live I/O, in three
//! steps — plan (decide and refuse, nothing opened), stage (open stores,
//! build every new translation: nothing changed yet), apply (swaps, each
//! atomic and persisted, then the new catalog).

mod apply;
pub(super) use apply::StagedReload;
pub(super) use plan::{Plan, ReloadPlan};
mod plan;

use super::{Daemon, DaemonError};
use crate::api::ReloadReport;
use crate::config::Config;
use crate::sync::lock;

/// Settings a reload cannot change in a running server.
fn needs_restart(old: &Config, new: &Config) -> Vec<String> {
    let (o, n) = (&old.server, &new.server);
    let mut out = Vec::new();
    if n.listen != o.listen {
        out.push("server.listen".into());
    }
    if n.control != o.control {
        out.push("server.control".into());
    }
    // The socket's group and mode are set atomically when it is bound
    // (control/bind.rs); changing them on the live socket, and the
    // directories above it, would open windows and loosen what the daemon
    // may not own. So the group bound at start stays in force.
    if n.control_group != o.control_group {
        out.push("server.control_group".into());
    }
    if n.state_dir != o.state_dir {
        out.push("server.state_dir".into());
    }
    if n.io_threads != o.io_threads || n.max_inflight != o.max_inflight || n.max_request != o.max_request || n.busy_poll != o.busy_poll {
        out.push("server.io_threads/max_inflight/max_request/busy_poll".into());
    }
    if n.metrics != o.metrics {
        out.push("server.metrics".into());
    }
    out
}

impl Daemon {
    /// In a cluster the volumes and backends are the cluster's: `new` (the
    /// file, whose names are those last read: `reload_cluster_wide`) keeps
    /// the running ones, with the file's settings where it has them.
    fn keep_cluster_catalog(&self, new: &mut Config) {
        let running = lock(&self.config);
        let volumes = running.volumes.iter().map(|r| new.volumes.iter().find(|v| v.name == r.name).unwrap_or(r).clone()).collect();
        let backends = running.backends.iter().map(|r| new.backends.iter().find(|b| b.spec.name == r.spec.name).unwrap_or(r).clone()).collect();
        new.volumes = volumes;
        new.backends = backends;
    }

    /// Re-reads the config file and applies it under live I/O.
    pub fn reload(&self, force: bool) -> Result<ReloadReport, DaemonError> {
        let path = self.config_path.clone().ok_or(DaemonError::NoConfigFile)?;
        // Read once: in a cluster its text may become the cluster's catalog.
        let read = crate::config::ConfigText::read(&path)?;
        let mut new = read.parse()?;
        // Credentials first: a bad certificate fails the reload before
        // anything changes.
        let mut security = super::security(&new)?;
        let mut report = ReloadReport { needs_restart: needs_restart(&lock(&self.config), &new), ..ReloadReport::default() };
        let clustered = self.cluster.get().is_some();
        let mut file = None;
        if clustered {
            // In a cluster what this file changed since it was last read
            // changes on every node at once (as `cluster apply`); what it
            // merely lags behind (the cluster changed it since) stays: a
            // reload for new TLS files must not revert it. Before the admin
            // lock: a catalog barrier's hold takes it on every node.
            self.reload_cluster_wide(super::cluster_apply::catalog_source(read), &new, force, &mut report)?;
        }
        let _admin = lock(&self.admin);
        if clustered {
            file = Some(new.clone());
            self.keep_cluster_catalog(&mut new);
            security = super::security(&new)?;
        }
        let mut plan = self.plan_reload(&new, force)?;
        if clustered {
            for p in &mut plan.plans {
                if let plan::Plan::Swap(volume, _) = p {
                    tracing::info!(volume = volume.name(), "reload: the file's table for this volume is older than the cluster's; the cluster's stays");
                    *p = plan::Plan::Keep(volume.clone());
                }
            }
            if !plan.removed.is_empty() || plan.plans.iter().any(|p| !matches!(p, plan::Plan::Keep(_))) {
                return Err(DaemonError::ClusterTable { volume: String::new(), reason: "a reload cannot add or remove volumes in a cluster (`nbdvirt cluster apply` can)".into() });
            }
        }
        let staged = self.stage_reload(&new, plan)?;
        let swapped_cluster_wide = std::mem::take(&mut report.swapped);
        let swap_failed = self.apply_reload(new, staged, &mut report);
        report.swapped.extend(swapped_cluster_wide);
        lock(&self.server).set_security(security);
        if let Some(file) = file {
            *lock(&self.file_read) = file;
        }
        tracing::info!(?report, "reload applied");
        if report.errors.is_empty() {
            Ok(report)
        } else {
            Err(DaemonError::ReloadPartial { errors: report.errors, swap_failed })
        }
    }
}
