//! The CLI's side of the control socket: one request, one typed answer.

use crate::api::{ApiError, ErrorKind, Request, Response};
use serde::de::DeserializeOwned;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the server's control socket {}: {source} (is `nbdvirt serve` running? use --control or --config)", path.display())]
    Connect { path: PathBuf, source: std::io::Error },
    /// The socket's mode (or a directory above it) keeps this user out:
    /// the same answer as the server's own check, so that scripts see one
    /// exit code for "not allowed" whichever layer said it.
    #[error("permission denied: cannot connect to the control socket {}: only root, the server's user and members of its control_group may (and every directory above the socket must let them through)", path.display())]
    ConnectDenied { path: PathBuf },
    #[error("control socket: {0}")]
    Io(std::io::Error),
    #[error("control socket: bad answer: {0}")]
    Envelope(serde_json::Error),
    /// The answer was well-formed JSON but not the expected type: a client
    /// and server of different versions, or a bug. Never guessed around.
    #[error("control socket: cannot parse the server's answer as {what}: {error}")]
    Unparsable { what: &'static str, error: serde_json::Error },
    #[error(transparent)]
    Api(#[from] ApiError),
}

impl ClientError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            ClientError::Api(e) => e.kind,
            ClientError::ConnectDenied { .. } => ErrorKind::PermissionDenied,
            _ => ErrorKind::Other,
        }
    }
}

impl From<ClientError> for ApiError {
    fn from(e: ClientError) -> ApiError {
        match e {
            ClientError::Api(e) => e,
            other => ApiError::new(other.kind(), other.to_string()),
        }
    }
}

/// The last path segment of a type's name (`MigrationList`), for errors.
fn short_type_name<T>() -> &'static str {
    let full = std::any::type_name::<T>();
    full.rsplit("::").next().unwrap_or(full)
}

/// Sends one request and waits (bounded by `timeout`) for its answer, which
/// must parse as a `T`.
pub fn call<T: DeserializeOwned>(path: &Path, request: &Request, timeout: Duration) -> Result<T, ClientError> {
    let mut stream = UnixStream::connect(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::PermissionDenied => ClientError::ConnectDenied { path: path.into() },
        _ => ClientError::Connect { path: path.into(), source },
    })?;
    stream.set_read_timeout(Some(timeout)).map_err(ClientError::Io)?;
    let mut line = serde_json::to_vec(request).map_err(ClientError::Envelope)?;
    line.push(b'\n');
    stream.write_all(&line).map_err(ClientError::Io)?;
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply).map_err(ClientError::Io)?;
    let response: Response = serde_json::from_str(&reply).map_err(ClientError::Envelope)?;
    let value = response.into_result()?;
    serde_json::from_value(value).map_err(|error| ClientError::Unparsable { what: short_type_name::<T>(), error })
}
