//! Where a job's table changes take effect when the volume is served by
//! a cluster: on every node at once (a barrier), never on this node
//! alone, so that every node writes the destination while one copies;
//! and the claim that makes this node the one copier.

use super::MigrateError;
use crate::map::Extent;

/// The cluster's way of changing one volume's table everywhere; the
/// daemon implements it with `cluster apply`'s barrier.
pub trait ClusterTables: Send + Sync {
    /// Puts `extents` in force for `volume` on every node; returns the
    /// generation committed.
    fn apply(&self, volume: &str, extents: Vec<Extent>) -> Result<u64, MigrateError>;
    /// Makes this node the copier of `volume`'s migration, cluster-wide
    /// (refused while another live node is).
    fn claim(&self, volume: &str) -> Result<(), MigrateError>;
    /// Ends the claim (the job ended).
    fn release(&self, volume: &str);
}
