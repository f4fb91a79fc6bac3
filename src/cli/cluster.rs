//! `cluster status`: the cluster as the local node sees it in etcd.

use super::{render, CliResult, ServerAddress};
use clap::Subcommand;
use nbdvirt::api::{ClusterStatus, Request};

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
