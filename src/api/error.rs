//! What kind of failure a request met, on the wire and as an exit code.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The class of a failure: what a caller (a script, a cluster peer, a
/// metric label) can act on without parsing the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// A named volume, backend or migration does not exist.
    NotFound,
    /// The object is taken by another operation; retrying later may work.
    Busy,
    /// The request contradicts the current state (a range in use, run-time
    /// changes a config would undo); it will not work until that changes.
    Conflict,
    /// The request or the config is wrong in itself.
    Invalid,
    /// Reading or writing a store or the state directory failed.
    Io,
    /// A table swap did not happen (drain timeout, commit failure); the
    /// volume stays on its previous generation.
    SwapFailed,
    /// A pool has not enough free (or reclaimable) space for the request.
    NoSpace,
    /// The caller may not use the control socket: not root, not the
    /// server's own user, not in its `control_group`.
    PermissionDenied,
    /// A bug or an unexpected condition on the server.
    Internal,
    /// Anything else, including failures of the client itself (server
    /// unreachable, an answer it cannot parse).
    #[serde(other)]
    Other,
}

/// Process exit codes of the `nbdvirt` command. 2 is clap's usage error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ExitCode {
    Ok = 0,
    Other = 1,
    Usage = 2,
    NotFound = 3,
    BusyOrConflict = 4,
    Io = 5,
    SwapFailed = 6,
    Invalid = 7,
    NoSpace = 8,
    PermissionDenied = 9,
}

impl ErrorKind {
    pub fn exit_code(self) -> ExitCode {
        match self {
            ErrorKind::NotFound => ExitCode::NotFound,
            ErrorKind::Busy | ErrorKind::Conflict => ExitCode::BusyOrConflict,
            ErrorKind::Invalid => ExitCode::Invalid,
            ErrorKind::Io => ExitCode::Io,
            ErrorKind::SwapFailed => ExitCode::SwapFailed,
            ErrorKind::NoSpace => ExitCode::NoSpace,
            ErrorKind::PermissionDenied => ExitCode::PermissionDenied,
            ErrorKind::Internal | ErrorKind::Other => ExitCode::Other,
        }
    }

    /// The wire name (`not_found`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not_found",
            ErrorKind::Busy => "busy",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Invalid => "invalid",
            ErrorKind::Io => "io",
            ErrorKind::SwapFailed => "swap_failed",
            ErrorKind::NoSpace => "no_space",
            ErrorKind::PermissionDenied => "permission_denied",
            ErrorKind::Internal => "internal",
            ErrorKind::Other => "other",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed request: its kind and the human-readable reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> ApiError {
        ApiError { kind, message: message.into() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_snake_case_and_unknown_ones_are_other() {
        for k in [ErrorKind::NotFound, ErrorKind::Busy, ErrorKind::Conflict, ErrorKind::Invalid, ErrorKind::Io, ErrorKind::SwapFailed, ErrorKind::NoSpace, ErrorKind::PermissionDenied, ErrorKind::Internal] {
            assert_eq!(serde_json::to_value(k).unwrap(), k.as_str());
            assert_eq!(serde_json::from_value::<ErrorKind>(k.as_str().into()).unwrap(), k);
        }
        // A newer server's kind still parses on an older client.
        assert_eq!(serde_json::from_str::<ErrorKind>("\"quota\"").unwrap(), ErrorKind::Other);
    }

    #[test]
    fn one_exit_code_per_kind() {
        assert_eq!(ErrorKind::NotFound.exit_code() as u8, 3);
        assert_eq!(ErrorKind::Busy.exit_code() as u8, 4);
        assert_eq!(ErrorKind::Conflict.exit_code() as u8, 4);
        assert_eq!(ErrorKind::Io.exit_code() as u8, 5);
        assert_eq!(ErrorKind::SwapFailed.exit_code() as u8, 6);
        assert_eq!(ErrorKind::Invalid.exit_code() as u8, 7);
        assert_eq!(ErrorKind::NoSpace.exit_code() as u8, 8);
        assert_eq!(ErrorKind::PermissionDenied.exit_code() as u8, 9);
        assert_eq!(ErrorKind::Other.exit_code() as u8, 1);
    }
}
