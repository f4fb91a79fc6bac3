//! `pause` and `resume` in a cluster: a volume's clients reach it through
//! every node, so an operator's pause holds it on every live node (each
//! node's own pause, with the same automatic resume, so every hold is
//! bounded even if the asking node dies); `resume` ends them all. All or
//! nothing: if one node cannot pause, the others resume at once.

use super::{Daemon, DaemonError};
use crate::api::PeerRequest;
use crate::cluster::peer;
use crate::map::Range;
use std::sync::Arc;
use std::time::Duration;

/// Beyond the drain, what a peer's answer may take.
const PEER_SLACK: Duration = Duration::from_secs(2);

impl Daemon {
    /// The live nodes other than this one, as (node, peer).
    fn other_live_nodes(&self) -> Result<Vec<(String, String)>, DaemonError> {
        let cluster = self.cluster.get().ok_or(DaemonError::NotClustered)?;
        let (nodes, _) = cluster.live_nodes()?;
        Ok(nodes.into_iter().filter(|n| n.node != cluster.node()).map(|n| (n.node, n.peer)).collect())
    }

    pub(super) fn pause_everywhere(self: &Arc<Self>, volume: &str, range: Option<Range>, timeout: Duration) -> Result<String, DaemonError> {
        let others = self.other_live_nodes()?;
        self.pause_here(volume, range, timeout)?;
        let limit = crate::sync::lock(&self.config).server.pause_timeout + PEER_SLACK;
        let request = PeerRequest::Pause { volume: volume.into(), range, timeout_ms: timeout.as_millis() as u64 };
        let answers = peer::on_every(&others, |(_, p)| peer::call::<String>(p, &request, limit));
        let failed: Vec<String> = others.iter().zip(&answers).filter_map(|((n, _), a)| a.as_ref().err().map(|e| format!("{n}: {}", e.message))).collect();
        if !failed.is_empty() {
            // All or nothing: undo the pauses that took.
            let _ = self.resume_everywhere(volume);
            return Err(DaemonError::ClusterTable { volume: volume.into(), reason: format!("not paused: {} could not pause ({})", failed.len(), failed.join("; ")) });
        }
        let mut nodes: Vec<&str> = others.iter().map(|(n, _)| n.as_str()).collect();
        nodes.push(self.cluster.get().expect("cluster mode").node());
        nodes.sort_unstable();
        tracing::info!(volume, nodes = ?nodes, "paused by operator on every live node");
        Ok(format!("volume '{volume}' paused on {} (automatic resume after {timeout:?})", nodes.join(", ")))
    }

    /// Resumes every node's pause of `volume`; fails only if none was
    /// paused. A node that cannot be told resumes by its own timeout.
    pub(super) fn resume_everywhere(&self, volume: &str) -> Result<String, DaemonError> {
        let others = self.other_live_nodes()?;
        let here = self.resume_here(volume);
        let request = PeerRequest::Resume { volume: volume.into() };
        let answers = peer::on_every(&others, |(_, p)| peer::call::<String>(p, &request, PEER_SLACK));
        let mut resumed: Vec<&str> = others.iter().zip(&answers).filter(|(_, a)| a.is_ok()).map(|((n, _), _)| n.as_str()).collect();
        if here.is_ok() {
            resumed.push(self.cluster.get().expect("cluster mode").node());
        }
        if resumed.is_empty() {
            return here;
        }
        resumed.sort_unstable();
        let silent: Vec<String> = others.iter().zip(&answers).filter_map(|((n, _), a)| a.as_ref().err().filter(|e| e.kind != crate::api::ErrorKind::Conflict).map(|e| format!("{n}: {}", e.message))).collect();
        for s in &silent {
            tracing::warn!(volume, node = %s, "resume not confirmed; that node resumes at its pause's timeout");
        }
        Ok(format!("volume '{volume}' resumed on {}", resumed.join(", ")))
    }
}
