//! Claims: a key bound to this node's membership lease, created only if
//! absent (etcd's lock recipe). A migration's copier holds
//! `migrations/<volume>` while its job runs, so one node copies at a time
//! and another may take the job over only once the claim is gone: released
//! at the job's end, or deleted by etcd with the copier's lease.

use super::{keys, Cluster, ClusterError};
use std::sync::atomic::Ordering;

impl Cluster {
    /// Claims the migration of `volume` for this node (already ours: fine).
    pub fn claim_migration(&self, volume: &str) -> Result<(), ClusterError> {
        let lease = self.shared.lease.load(Ordering::SeqCst);
        if lease == 0 {
            return Err(ClusterError::LeaseExpired);
        }
        let key = keys::migration(self.name(), volume);
        let me = self.node().as_bytes().to_vec();
        match self.run(|e| async move { e.create(&key, me, lease).await })?? {
            Ok(_) => Ok(()),
            Err(held) if held.value == self.node().as_bytes() && held.lease == lease => Ok(()),
            Err(held) => Err(ClusterError::Claimed { volume: volume.into(), node: String::from_utf8_lossy(&held.value).into_owned() }),
        }
    }

    /// The node holding the claim on `volume`'s migration, if any.
    pub fn migration_claimant(&self, volume: &str) -> Result<Option<String>, ClusterError> {
        let key = keys::migration(self.name(), volume);
        let held = self.run(|e| async move { e.get(&key).await })??;
        Ok(held.map(|e| String::from_utf8_lossy(&e.value).into_owned()))
    }

    /// Gives the claim up (best effort: it dies with the lease anyway).
    pub fn release_migration(&self, volume: &str) {
        let key = keys::migration(self.name(), volume);
        let lease = self.shared.lease.load(Ordering::SeqCst);
        if let Err(e) = self.run(|e| async move { e.delete_if_lease(&key, lease).await }).and_then(|r| r.map_err(Into::into)) {
            tracing::warn!(volume, error = %e, "could not release the migration's claim; it goes with this node's lease");
        }
    }
}
