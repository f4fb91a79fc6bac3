//! What a daemon operation can fail with; each variant has one `ErrorKind`.

use crate::api::{ApiError, ErrorKind};
use crate::config::ConfigError;
use crate::map::Range;
use crate::migrate::{MigrateError, MigrateErrorKind};
use crate::persist::PersistError;
use crate::pool::placement::PlacementError;
use crate::volume::SwapError;

/// A reload maps a range a running migration copies into.
#[derive(Debug, thiserror::Error)]
#[error("{at}: volume '{volume}': backend '{store}' range {}+{} is the destination of the running migration of volume '{migrating}' ({}+{})", range.start, range.len(), dest.start, dest.len())]
pub struct DestinationTaken {
    pub at: String,
    pub volume: String,
    pub store: String,
    pub range: Range,
    pub migrating: String,
    pub dest: Range,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("no volume named '{0}'")]
    NoVolume(String),
    #[error("no backend named '{0}'")]
    NoBackend(String),
    #[error("no migration of volume '{0}'")]
    NoMigration(String),
    #[error("no running migration of volume '{0}'")]
    NoRunningMigration(String),

    #[error("volume '{0}' is already paused")]
    AlreadyPaused(String),
    #[error("volume '{0}' is paused; resume it first")]
    Paused(String),
    #[error("volume '{0}' is already being migrated")]
    Migrating(String),
    #[error("{at}: volume '{volume}' is being migrated; its mapping cannot change until the migration ends (`nbdvirt migrate abort {volume}` or wait)")]
    MappingLocked { at: String, volume: String },
    #[error("volume '{volume}' is removed from the config but has {connections} client connection(s); disconnect them or reload with --force")]
    ClientsConnected { volume: String, connections: usize },
    #[error("volume '{volume}' has {connections} client connection(s) ({peers}); disconnect them or use --force")]
    VolumeInUse { volume: String, connections: usize, peers: String },
    /// Mirror, migration and split operations change a table; a pool
    /// volume's table belongs to its pool.
    #[error("volume '{0}' is a pool volume: its layout is managed by its pool (use `nbdvirt volume resize|delete`)")]
    PoolVolume(String),
    /// A name or a range both the config and a pool claim.
    #[error("{0}")]
    PoolConflict(String),

    #[error("volume '{0}' is not paused")]
    NotPaused(String),
    #[error("{at}: volume '{volume}': the config changed, but the volume's mapping was also changed at run time (generation {generation}, {reason}); applying the config would undo that. Make the config's extents match `nbdvirt status` and reload again")]
    RuntimeChanges { at: String, volume: String, generation: u64, reason: String },
    #[error(transparent)]
    MigrationDestination(Box<DestinationTaken>),
    #[error("destination '{dest}' {error}")]
    Placement { dest: String, error: PlacementError },

    #[error("the server runs on the embedded default; there is no config file to reload")]
    NoConfigFile,
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// TLS credential files that cannot be used.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("{at}: volume '{volume}': changing read_only, block_size or description of a live volume is not supported; remove it, reload, add it back (or restart)")]
    LiveSpecChange { at: String, volume: String },
    #[error("range {}+{} is not inside volume '{volume}' ({size} bytes)", range.start, range.len())]
    RangeOutside { volume: String, range: Range, size: u64 },
    #[error("range {}+{} is not aligned to the volume's block size {block}", range.start, range.len())]
    RangeMisaligned { range: Range, block: u64 },
    #[error("chunk {chunk} must be a positive multiple of the block size {block}")]
    BadChunk { chunk: u64, block: u64 },

    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    /// Reading or writing the state directory.
    #[error(transparent)]
    State(#[from] PersistError),
    #[error(transparent)]
    Migration(#[from] MigrateError),
    /// Boxed: its table errors would make every `DaemonError` large.
    #[error(transparent)]
    Mirror(Box<super::mirror_error::MirrorError>),
    /// Boxed like `Mirror`; its kind is the pool error's own.
    #[error(transparent)]
    Pool(Box<crate::pool::PoolError>),
    /// A persisted generation that is not a valid table.
    #[error("volume '{volume}': persisted generation {generation}: {source}")]
    CorruptTable { volume: String, generation: u64, source: Box<crate::map::MapError> },

    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
    #[error("this node is not in a cluster: its config has no [cluster] section")]
    NotClustered,
    #[error("{at}: [cluster] cannot change by a reload; restart the node to change it")]
    ClusterChange { at: String },
    /// A table change on one node only would make the nodes translate the
    /// same volume differently.
    #[error("{what}: not available in a cluster (it would change one node's volumes alone; a split copy would be one node's)")]
    ClusterWide { what: String },
    /// A table `cluster apply` or a barrier cannot use.
    #[error("{}{reason}", if volume.is_empty() { String::new() } else { format!("volume '{volume}': ") })]
    ClusterTable { volume: String, reason: String },
    /// A barrier this node cannot take part in now (tried again later).
    #[error("{0}")]
    ClusterBusy(String),
    /// What another node answered.
    #[error("{}", .0.message)]
    Peer(ApiError),

    #[error(transparent)]
    Swap(#[from] SwapError),
    /// Some swaps or additions of a reload failed; the rest is in force.
    #[error("reload partly failed: {}", errors.join("; "))]
    ReloadPartial { errors: Vec<String>, swap_failed: bool },
}

impl DaemonError {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> DaemonError {
        DaemonError::Io { what: what.into(), source }
    }

    pub fn kind(&self) -> ErrorKind {
        use DaemonError::*;
        match self {
            Mirror(e) => e.as_ref().kind(),
            Pool(e) => e.as_ref().kind(),
            VolumeInUse { .. } | ClusterBusy(_) => ErrorKind::Busy,
            PoolVolume(_) | PoolConflict(_) => ErrorKind::Conflict,
            NoVolume(_) | NoBackend(_) | NoMigration(_) | NoRunningMigration(_) => ErrorKind::NotFound,
            AlreadyPaused(_) | Paused(_) | Migrating(_) | MappingLocked { .. } | ClientsConnected { .. } => ErrorKind::Busy,
            NotPaused(_) | RuntimeChanges { .. } | MigrationDestination(_) => ErrorKind::Conflict,
            Placement { error, .. } => match error {
                PlacementError::InUse { .. } | PlacementError::NoFreeRange { .. } => ErrorKind::Conflict,
                PlacementError::Misaligned { .. } | PlacementError::PastEnd { .. } => ErrorKind::Invalid,
            },
            NoConfigFile | Config(_) | Tls(_) | LiveSpecChange { .. } | RangeOutside { .. } | RangeMisaligned { .. } | BadChunk { .. } => ErrorKind::Invalid,
            Io { .. } | CorruptTable { .. } => ErrorKind::Io,
            State(e) => match e {
                PersistError::NotFound { .. } => ErrorKind::NotFound,
                PersistError::Corrupt { .. } | PersistError::Io { .. } => ErrorKind::Io,
            },
            Migration(e) => match e.kind() {
                MigrateErrorKind::NotFound => ErrorKind::NotFound,
                // A migration's swap (leg added, cutover) did not drain.
                MigrateErrorKind::Busy => ErrorKind::SwapFailed,
                MigrateErrorKind::Invalid => ErrorKind::Invalid,
                MigrateErrorKind::Io => ErrorKind::Io,
                MigrateErrorKind::Taken => ErrorKind::Busy,
            },
            Cluster(e) => {
                use crate::cluster::ClusterError as C;
                match e {
                    C::DuplicateNode { .. } | C::StaleEpoch { .. } => ErrorKind::Conflict,
                    C::NotCoordinator(_) | C::EtcdDown(_) | C::MemberMayServe { .. } | C::Claimed { .. } => ErrorKind::Busy,
                    C::MemberAlive(_) => ErrorKind::Conflict,
                    C::NoMember(_) => ErrorKind::NotFound,
                    C::Barrier { .. } => ErrorKind::SwapFailed,
                    C::BarrierRefused { .. } => ErrorKind::Invalid,
                    _ => ErrorKind::Io,
                }
            }
            NotClustered | ClusterChange { .. } | ClusterWide { .. } | ClusterTable { .. } => ErrorKind::Invalid,
            Peer(e) => e.kind,
            Swap(_) => ErrorKind::SwapFailed,
            ReloadPartial { swap_failed: true, .. } => ErrorKind::SwapFailed,
            ReloadPartial { swap_failed: false, .. } => ErrorKind::Io,
        }
    }
}

impl From<DaemonError> for ApiError {
    fn from(e: DaemonError) -> ApiError {
        ApiError::new(e.kind(), e.to_string())
    }
}

impl From<crate::pool::PoolError> for DaemonError {
    fn from(e: crate::pool::PoolError) -> DaemonError {
        DaemonError::Pool(Box::new(e))
    }
}

impl From<super::mirror_error::MirrorError> for DaemonError {
    fn from(e: super::mirror_error::MirrorError) -> DaemonError {
        DaemonError::Mirror(Box::new(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_variant_has_its_kind_and_keeps_its_message() {
        let cases = [
            (DaemonError::NoVolume("x".into()), ErrorKind::NotFound, "no volume named 'x'"),
            (DaemonError::Migrating("v".into()), ErrorKind::Busy, "volume 'v' is already being migrated"),
            (DaemonError::NotPaused("v".into()), ErrorKind::Conflict, "volume 'v' is not paused"),
            (
                DaemonError::Placement { dest: "d".into(), error: PlacementError::PastEnd { offset: 0, length: 8, size: 4 } },
                ErrorKind::Invalid,
                "destination 'd' is too small: 0+8 ends past its 4 bytes",
            ),
            (
                DaemonError::Placement { dest: "d".into(), error: PlacementError::NoFreeRange { length: 8, size: 4, in_use: 1 } },
                ErrorKind::Conflict,
                "destination 'd' has no free range of 8 bytes",
            ),
            (DaemonError::io("state_dir", std::io::Error::from(std::io::ErrorKind::PermissionDenied)), ErrorKind::Io, "state_dir: permission denied"),
            (DaemonError::ReloadPartial { errors: vec!["a".into(), "b".into()], swap_failed: true }, ErrorKind::SwapFailed, "reload partly failed: a; b"),
            (crate::pool::PoolError::NoSpace { pool: "p".into(), needed: 8, available: 3 }.into(), ErrorKind::NoSpace, "pool 'p' is too small: 8 bytes needed"),
            (crate::pool::PoolError::UnknownClass("ssd".into()).into(), ErrorKind::NotFound, "no pool of class 'ssd'"),
            (DaemonError::VolumeInUse { volume: "v".into(), connections: 1, peers: "p".into() }, ErrorKind::Busy, "volume 'v' has 1 client connection(s)"),
        ];
        for (e, kind, message) in cases {
            let api = ApiError::from(e);
            assert_eq!(api.kind, kind, "{}", api.message);
            assert!(api.message.starts_with(message), "{} / {message}", api.message);
        }
    }
}
