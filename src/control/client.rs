//! The CLI's side of the control socket.

use super::protocol::{Request, Response};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Sends one request and waits (bounded by `timeout`) for its response.
pub fn call(path: &Path, request: &Request, timeout: Duration) -> Result<serde_json::Value, String> {
    let mut stream = UnixStream::connect(path).map_err(|e| {
        format!("cannot reach the server's control socket {}: {e} (is `nbdvirt serve` running? use --control or --config)", path.display())
    })?;
    stream.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    let mut line = serde_json::to_vec(request).map_err(|e| e.to_string())?;
    line.push(b'\n');
    stream.write_all(&line).map_err(|e| format!("control socket: {e}"))?;
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply).map_err(|e| format!("control socket: no answer: {e}"))?;
    let response: Response = serde_json::from_str(&reply).map_err(|e| format!("control socket: bad answer: {e}"))?;
    if response.ok {
        Ok(response.result.unwrap_or(serde_json::Value::Null))
    } else {
        Err(response.error.unwrap_or_else(|| "unknown error".into()))
    }
}
