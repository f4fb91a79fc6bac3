//! `cluster status`: the cluster as the local node sees it in etcd;
//! `cluster apply`: a file's volumes, backends and tables on every node.

use super::{render, CliResult, ServerAddress};
use clap::Subcommand;
use super::invalid;
use nbdvirt::api::{ApiError, ApplyReport, ClusterStatus, ErrorKind, PeerRequest, Request};
use nbdvirt::cluster::{coordinator_of, peer, ClusterError};
use nbdvirt::config::{etcd_endpoint, ConfigText};
use std::path::Path;
use std::time::Duration;

#[derive(Subcommand)]
pub enum ClusterCommand {
    /// Show the nodes (alive, lease left, volume generations), the
    /// coordinator and its epoch, and this node's serving state.
    Status {
        #[command(flatten)]
        server: ServerAddress,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a node gone for good from the cluster's records (refused
    /// while it is alive or may still serve in failsafe).
    Forget {
        node: String,
        #[command(flatten)]
        server: ServerAddress,
    },
    /// Make the volumes and backends of --config FILE the cluster's (add
    /// and remove them on every node at once) and their tables (hold,
    /// drain, commit in etcd, swap, resume), through the node whose
    /// control socket FILE names (or --control); with --etcd, from any
    /// machine: straight to the coordinator found in etcd.
    Apply {
        #[command(flatten)]
        server: ServerAddress,
        #[arg(long)]
        json: bool,
        /// Remove volumes that still have clients (they are disconnected).
        #[arg(long)]
        force: bool,
        /// etcd client URLs (comma-separated or repeated): find the
        /// coordinator there instead of going through a local node.
        #[arg(long, value_delimiter = ',')]
        etcd: Vec<String>,
        /// The cluster's name, with --etcd (default: FILE's [cluster] name).
        #[arg(long, requires = "etcd")]
        cluster: Option<String>,
    },
}

pub fn run(cmd: ClusterCommand) -> CliResult {
    match cmd {
        ClusterCommand::Status { server, json } => {
            let status: ClusterStatus = server.call(&Request::ClusterStatus)?;
            if json {
                render::json(&status);
            } else {
                print(&status);
            }
            Ok(())
        }
        ClusterCommand::Forget { node, server } => {
            server.call::<serde_json::Value>(&Request::ClusterForget { node: node.clone() })?;
            println!("node {node} forgotten");
            Ok(())
        }
        ClusterCommand::Apply { server, json, force, etcd, cluster } => {
            let file = server.config_path().ok_or_else(|| invalid("cluster apply needs --config FILE (the volumes to apply)"))?;
            let config = std::fs::canonicalize(&file).map_err(|e| invalid(format!("{}: {e}", file.display())))?;
            let report: ApplyReport = if etcd.is_empty() { server.call(&Request::ClusterApply { config, force })? } else { apply_via_etcd(&config, &etcd, cluster, force)? };
            if json {
                render::json(&report);
            } else if report.volumes.is_empty() {
                println!("nothing to change: the cluster already has these volumes, backends and tables");
            } else {
                for v in &report.volumes {
                    let fenced = if v.fenced.is_empty() { String::new() } else { format!("; fenced: {}", v.fenced.join(", ")) };
                    let what = match v.volume == nbdvirt::api::CATALOG {
                        true => format!("volumes and backends (added: {}; removed: {})", list(&v.added), list(&v.removed)),
                        false => v.volume.clone(),
                    };
                    println!(
                        "{}: generation {} on {} (hold {:.1} ms, etcd commit {:.1} ms, attempt {}{fenced})",
                        what,
                        v.generation,
                        v.nodes.join(", "),
                        v.hold_us as f64 / 1000.0,
                        v.commit_us as f64 / 1000.0,
                        v.attempts
                    );
                }
            }
            // Committed, but a node did not take the table: it fenced
            // itself (or settles with etcd): not a success for scripts.
            let unconfirmed: Vec<String> = report.volumes.iter().flat_map(|v| v.unconfirmed.iter().map(move |u| format!("volume '{}' generation {}: {u}", v.volume, v.generation))).collect();
            if unconfirmed.is_empty() {
                Ok(())
            } else {
                Err(ApiError::new(ErrorKind::Io, format!("committed, but not confirmed by every node that held: {}", unconfirmed.join("; "))))
            }
        }
    }
}

/// `cluster apply --etcd`: FILE's text to the coordinator's peer link
/// (its backends and volumes are checked there, against the open ones).
fn apply_via_etcd(file: &Path, etcd: &[String], cluster: Option<String>, force: bool) -> Result<ApplyReport, ApiError> {
    let endpoints = etcd.iter().map(|e| etcd_endpoint(e).map_err(|m| invalid(format!("--etcd: {m}")))).collect::<Result<Vec<_>, _>>()?;
    let read = ConfigText::read(file).map_err(|e| invalid(e.to_string()))?;
    let config = read.parse().map_err(|e| invalid(e.to_string()))?;
    let name = cluster.or_else(|| config.cluster.as_ref().map(|c| c.name.clone())).ok_or_else(|| invalid(format!("{}: no [cluster] name in the file: give --cluster NAME", file.display())))?;
    let (node, _, peer) = coordinator_of(&endpoints, &name, Duration::from_secs(5)).map_err(|e| match e {
        ClusterError::NotCoordinator(m) => ApiError::new(ErrorKind::Busy, m),
        other => ApiError::new(ErrorKind::Io, other.to_string()),
    })?;
    // The text checked here is the text the coordinator parses.
    let request = PeerRequest::ApplyConfig { file: read.file, base: read.base, text: read.text, force };
    peer::call(&peer, &request, Duration::from_secs(600)).map_err(|e| ApiError::new(e.kind, format!("coordinator {node} ({peer}): {}", e.message)))
}

fn list(names: &[String]) -> String {
    if names.is_empty() { "none".into() } else { names.join(", ") }
}

fn print(s: &ClusterStatus) {
    let coordinator = s.coordinator.as_ref().map_or_else(|| "none".to_string(), |c| format!("{} (epoch {})", c.node, c.epoch));
    println!("cluster {} on etcd {}: coordinator {coordinator}", s.name, s.etcd.join(", "));
    let left = s.serving_left_ms.map_or_else(String::new, |ms| format!(", serving for {:.1} s more without a renewal", ms as f64 / 1000.0));
    println!("this node: {} ({}{left}; lease TTL {} s)", s.node, s.state, s.lease_ttl_ms / 1000);
    if let Some(e) = &s.etcd_error {
        println!("etcd: {e}");
    }
    match &s.catalog {
        Some(c) => {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            println!("volumes and backends: {} (cluster apply committed by {}, {} s ago)", c.file, c.node, now.saturating_sub(c.applied_at));
        }
        None => println!("volumes and backends: each node's config (no cluster apply added or removed any)"),
    }
    let mut t = render::table(&["NODE", "PEER", "ALIVE", "LEASE LEFT", "ROLE", "GENERATIONS", "FENCED BY"]);
    for n in &s.nodes {
        let lease = n.lease_left_ms.map_or_else(|| "-".to_string(), |ms| format!("{} s", ms / 1000));
        let role = if n.coordinator { "coordinator" } else { "" };
        let gens = n.generations.iter().map(|(v, g)| format!("{v}={g}")).collect::<Vec<_>>().join(" ");
        t.add_row(vec![n.node.clone(), n.peer.clone(), if n.alive { "yes" } else { "no" }.into(), lease, role.into(), gens, n.fenced_by.clone().unwrap_or_default()]);
    }
    println!("{t}");
    for b in &s.barriers {
        println!("barrier {} in progress here: {} volume {} to generation {} for {} ms", b.barrier, b.role, b.volume, b.generation, b.running_ms);
    }
    println!("(as of {:.1} s ago)", s.observed_ms_ago as f64 / 1000.0);
}
