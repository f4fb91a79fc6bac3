//! Errors of mirror and pair operations, each with its API kind.

use crate::api::ErrorKind;
use crate::map::MapError;

#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error("volume '{volume}' has no mirror leg on backend '{leg}'")]
    NoLeg { volume: String, leg: String },
    #[error("backend '{leg}' already is a leg of volume '{volume}' ({state}){hint}")]
    AlreadyLeg { volume: String, leg: String, state: &'static str, hint: &'static str },
    #[error("leg '{leg}' is the last in-sync copy of volume '{volume}'{at}; removing it would leave no complete copy (pass --force to remove it anyway)")]
    LastInSync { volume: String, leg: String, at: String },
    #[error("leg '{leg}' of volume '{volume}' is {state}, not failed; only a failed leg can be re-added")]
    NotFailed { volume: String, leg: String, state: &'static str },
    #[error("volume '{volume}' extent {index} is {what}")]
    NotMirrorable { volume: String, index: usize, what: String },
    #[error("leg '{leg}' of volume '{volume}' is still resyncing ({percent:.1}% in sync; the pair is duplex-pending); split it once it is in sync (`nbdvirt mirror status {volume}`)")]
    StillResyncing { volume: String, leg: String, percent: f64 },
    #[error("leg '{leg}' of volume '{volume}' is {state}; only an in-sync leg can be split off")]
    NotSplittable { volume: String, leg: String, state: &'static str },
    #[error("a volume named '{0}' already exists")]
    VolumeExists(String),
    #[error("volume '{volume}' was not split from '{into}' (no change tracker split-{volume} on both); nothing to merge")]
    NotAPair { volume: String, into: String },
    #[error("volume '{volume}' has {count} connected client(s) ({peers}); disconnect them or pass --force")]
    InUse { volume: String, count: usize, peers: String },
    #[error("volume '{volume}': {source}")]
    Table { volume: String, source: MapError },
    #[error("volume '{volume}': mirror state: {source}")]
    State { volume: String, source: std::io::Error },
}

impl MirrorError {
    pub fn kind(&self) -> ErrorKind {
        use MirrorError::*;
        match self {
            NoLeg { .. } => ErrorKind::NotFound,
            AlreadyLeg { .. } | LastInSync { .. } | NotFailed { .. } | VolumeExists(_) | NotSplittable { .. } => ErrorKind::Conflict,
            StillResyncing { .. } | InUse { .. } => ErrorKind::Busy,
            NotMirrorable { .. } | NotAPair { .. } | Table { .. } => ErrorKind::Invalid,
            State { .. } => ErrorKind::Io,
        }
    }
}
