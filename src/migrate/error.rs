//! Why a migration could not start, go on or cut over.

use crate::map::MapError;
use crate::persist::PersistError;
use crate::volume::{SwapError, TranslateError};
use nix::errno::Errno;
use std::io;

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The destination store is not open.
    #[error("no backend named '{0}'")]
    UnknownStore(String),
    /// Attaching or detaching write forwarding failed (drain timeout).
    #[error(transparent)]
    Forwarding(SwapError),
    /// The cutover swap failed: drain timeout, or its commit was refused
    /// or failed; the mapping stays on the source.
    #[error("cutover: {0}")]
    Cutover(SwapError),
    /// The cutover table does not validate.
    #[error(transparent)]
    Table(#[from] MapError),
    /// The cutover table names a store that is not open.
    #[error(transparent)]
    Translate(#[from] TranslateError),
    /// Making the destination durable failed. The message starts with the
    /// errno name ("ENOSPC: ..."), as job reasons always did.
    #[error("{errno:?}: syncing destination: {source}")]
    DestinationSync { errno: Errno, source: io::Error },
    #[error("persisting migration progress: {0}")]
    Progress(io::Error),
    #[error(transparent)]
    State(#[from] PersistError),
    #[error("starting the copier thread: {0}")]
    Spawn(io::Error),
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
}

impl MigrateError {
    pub(super) fn destination_sync(source: io::Error) -> MigrateError {
        MigrateError::DestinationSync { errno: crate::backend::errno_of(&source), source }
    }

    pub fn kind(&self) -> MigrateErrorKind {
        match self {
            MigrateError::UnknownStore(_) => MigrateErrorKind::NotFound,
            MigrateError::Forwarding(e) | MigrateError::Cutover(e) => match e {
                SwapError::DrainTimeout { .. } => MigrateErrorKind::Busy,
                SwapError::Invalid { .. } => MigrateErrorKind::Invalid,
                SwapError::Commit { .. } => MigrateErrorKind::Io,
            },
            MigrateError::Table(_) | MigrateError::Translate(_) => MigrateErrorKind::Invalid,
            MigrateError::DestinationSync { .. } | MigrateError::Progress(_) | MigrateError::State(_) | MigrateError::Spawn(_) => {
                MigrateErrorKind::Io
            }
        }
    }
}
