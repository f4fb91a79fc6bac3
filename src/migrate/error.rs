//! Why a migration could not start, go on or cut over.

use crate::map::MapError;
use crate::persist::PersistError;
use crate::volume::{SwapError, TranslateError};
use std::io;

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The destination store is not open.
    #[error("no backend named '{0}'")]
    UnknownStore(String),
    /// A swap of the migration (adding the destination leg, the cutover,
    /// dropping the leg) failed: drain timeout, or its commit was refused
    /// or failed; the mapping stays as it was.
    #[error("cutover: {0}")]
    Cutover(SwapError),
    /// The cutover table does not validate.
    #[error(transparent)]
    Table(#[from] MapError),
    /// The cutover table names a store that is not open.
    #[error(transparent)]
    Translate(#[from] TranslateError),
    #[error("persisting migration progress: {0}")]
    Progress(io::Error),
    #[error(transparent)]
    State(#[from] PersistError),
    #[error("starting the copier thread: {0}")]
    Spawn(io::Error),
    /// A change of the table on every node of the cluster failed (no
    /// coordinator, etcd down, a node that did not hold …), or another
    /// node holds the migration's claim.
    #[error("cluster: {message}")]
    Cluster { kind: MigrateErrorKind, message: String },
}

/// What a caller can do about a [`MigrateError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrateErrorKind {
    /// Something named does not exist.
    NotFound,
    /// In-flight I/O did not drain in time: retry later.
    Busy,
    /// The request or the resulting table is not valid.
    Invalid,
    /// Reading or writing a store or the state directory failed.
    Io,
    /// Another cluster node's job migrates the volume.
    Taken,
}

impl MigrateError {
    pub fn kind(&self) -> MigrateErrorKind {
        match self {
            MigrateError::UnknownStore(_) => MigrateErrorKind::NotFound,
            MigrateError::Cutover(e) => match e {
                SwapError::DrainTimeout { .. } => MigrateErrorKind::Busy,
                SwapError::Invalid { .. } => MigrateErrorKind::Invalid,
                SwapError::Commit { .. } => MigrateErrorKind::Io,
            },
            MigrateError::Table(_) | MigrateError::Translate(_) => MigrateErrorKind::Invalid,
            MigrateError::Progress(_) | MigrateError::State(_) | MigrateError::Spawn(_) => MigrateErrorKind::Io,
            MigrateError::Cluster { kind, .. } => *kind,
        }
    }
}
