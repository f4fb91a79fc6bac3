//! `cluster status`: the cluster as the local node sees it in etcd;
//! `cluster apply`: new volume tables on every node, one barrier each.

use super::{render, CliResult, ServerAddress};
use clap::Subcommand;
use super::invalid;
use nbdvirt::api::{ApplyReport, ClusterStatus, Request};

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
    /// Change the tables of the volumes of --config FILE on every node at
    /// once (hold, drain, commit in etcd, swap, resume), through the
    /// node whose control socket FILE names (or --control).
    Apply {
        #[command(flatten)]
        server: ServerAddress,
        #[arg(long)]
        json: bool,
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
        ClusterCommand::Apply { server, json } => {
            let file = server.config_path().ok_or_else(|| invalid("cluster apply needs --config FILE (the volumes to apply)"))?;
            let config = std::fs::canonicalize(&file).map_err(|e| invalid(format!("{}: {e}", file.display())))?;
            let report: ApplyReport = server.call(&Request::ClusterApply { config })?;
            if json {
                render::json(&report);
            } else if report.volumes.is_empty() {
                println!("nothing to change: every volume already has these tables");
            } else {
                for v in &report.volumes {
                    let fenced = if v.fenced.is_empty() { String::new() } else { format!("; fenced: {}", v.fenced.join(", ")) };
                    println!(
                        "{}: generation {} on {} (hold {:.1} ms, etcd commit {:.1} ms, attempt {}{fenced})",
                        v.volume,
                        v.generation,
                        v.nodes.join(", "),
                        v.hold_us as f64 / 1000.0,
                        v.commit_us as f64 / 1000.0,
                        v.attempts
                    );
                }
            }
            Ok(())
        }
    }
}

fn print(s: &ClusterStatus) {
    let coordinator = s.coordinator.as_ref().map_or_else(|| "none".to_string(), |c| format!("{} (epoch {})", c.node, c.epoch));
    println!("cluster {} on etcd {}: coordinator {coordinator}", s.name, s.etcd.join(", "));
    let left = s.serving_left_ms.map_or_else(String::new, |ms| format!(", serving for {:.1} s more without a renewal", ms as f64 / 1000.0));
    println!("this node: {} ({}{left}; lease TTL {} s)", s.node, s.state, s.lease_ttl_ms / 1000);
    if let Some(e) = &s.etcd_error {
        println!("etcd: {e}");
    }
    let mut t = render::table(&["NODE", "PEER", "ALIVE", "LEASE LEFT", "ROLE", "GENERATIONS"]);
    for n in &s.nodes {
        let lease = n.lease_left_ms.map_or_else(|| "-".to_string(), |ms| format!("{} s", ms / 1000));
        let role = if n.coordinator { "coordinator" } else { "" };
        let gens = n.generations.iter().map(|(v, g)| format!("{v}={g}")).collect::<Vec<_>>().join(" ");
        t.add_row(vec![n.node.clone(), n.peer.clone(), if n.alive { "yes" } else { "no" }.into(), lease, role.into(), gens]);
    }
    println!("{t}");
    println!("(as of {:.1} s ago)", s.observed_ms_ago as f64 / 1000.0);
}
