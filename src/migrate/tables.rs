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
    /// generation committed. `strict` (the cutover): a node that does not
    /// answer fails the change instead of being committed past once its
    /// lease has expired (it may have left a write half done: the copy
    /// must run again first, see `writers`).
    fn apply(&self, volume: &str, extents: Vec<Extent>, strict: bool) -> Result<u64, MigrateError>;
    /// The nodes that may write the volume now, each with its lease. A
    /// node of an earlier answer missing from a later one left in between
    /// (died, or was fenced), perhaps in the middle of a write that reached
    /// the source but not the destination after the copy had passed.
    fn writers(&self) -> Result<Vec<(String, i64)>, MigrateError>;
    /// Makes this node the copier of `volume`'s migration, cluster-wide
    /// (refused while another live node is).
    fn claim(&self, volume: &str) -> Result<(), MigrateError>;
    /// Ends the claim (the job ended).
    fn release(&self, volume: &str);
}
