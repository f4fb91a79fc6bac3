//! The node-to-node link on `[cluster] peer`: one JSON `PeerRequest` per
//! TCP connection, answered with one `Response` line. Plain threads (a
//! request may hold for seconds); every read and write is bounded.

use super::priority::BarrierPriority;
use crate::api::{ApiError, ErrorKind, PeerRequest, Response};
use serde::de::DeserializeOwned;
use std::io::{BufRead, BufReader, Write};
use crate::endpoint::Endpoint;
use crate::server::{Listener, Stream};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Longest a request line may take to arrive.
const READ_LIMIT: Duration = Duration::from_secs(10);
/// Largest request line (a table of many extents fits easily).
const MAX_LINE: u64 = 16 << 20;

/// What answers the peer link (the daemon).
pub trait PeerHandler: Send + Sync {
    fn handle(&self, request: PeerRequest) -> Response;
}

pub struct PeerServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl PeerServer {
    /// Listens on `addr` (`HOST:PORT`) and answers with `handler`.
    pub fn start(addr: &str, handler: Arc<dyn PeerHandler>) -> std::io::Result<PeerServer> {
        let listener = Listener::bind(&Endpoint::Tcp(addr.to_string())).map_err(|e| std::io::Error::new(e.kind(), format!("[cluster] peer {addr}: {e}")))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new().name("nbdvirt-peer".into()).spawn(move || {
            // Accepts a barrier's `Hold` and `Decide` connections.
            BarrierPriority::raise_inherited();
            while !flag.load(Ordering::Relaxed) {
                // Woken by a connection at once (a barrier waits on every
                // answer); the timeout only notices `stop`.
                match listener.accept_timeout(Duration::from_millis(200)) {
                    Ok(Some(Stream::Tcp(stream))) => {
                        let handler = handler.clone();
                        let _ = std::thread::Builder::new().name("nbdvirt-peer-req".into()).spawn(move || serve_one(stream, &*handler));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "peer link: accept failed");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        })?;
        Ok(PeerServer { stop, thread: Some(thread) })
    }
}

impl Drop for PeerServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve_one(stream: TcpStream, handler: &dyn PeerHandler) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(READ_LIMIT));
    let _ = stream.set_write_timeout(Some(READ_LIMIT));
    let mut line = String::new();
    let mut reader = BufReader::new((&stream).take(MAX_LINE));
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let answer = match serde_json::from_str::<PeerRequest>(&line) {
        Ok(request) => {
            // Started at the accept thread's priority (`priority.rs`).
            if !matches!(request, PeerRequest::Hold(_) | PeerRequest::Decide { .. }) {
                BarrierPriority::normal();
            }
            handler.handle(request)
        }
        Err(e) => Response::err(ApiError::new(ErrorKind::Invalid, format!("peer link: bad request: {e}"))),
    };
    let mut out = serde_json::to_vec(&answer).unwrap_or_default();
    out.push(b'\n');
    let _ = (&stream).write_all(&out);
}

use std::io::Read;

/// Sends `request` to the node at `peer` (`tcp:HOST:PORT`) and waits up to
/// `limit` for its answer.
pub fn call<T: DeserializeOwned>(peer: &str, request: &PeerRequest, limit: Duration) -> Result<T, ApiError> {
    let io = |what: &str, e: std::io::Error| ApiError::new(ErrorKind::Io, format!("peer {peer}: {what}: {e}"));
    let addr = peer.strip_prefix("tcp:").unwrap_or(peer);
    let target = addr.to_socket_addrs().map_err(|e| io("resolve", e))?.next().ok_or_else(|| ApiError::new(ErrorKind::Io, format!("peer {peer}: no address")))?;
    let stream = TcpStream::connect_timeout(&target, limit.min(Duration::from_secs(2))).map_err(|e| io("connect", e))?;
    let _ = stream.set_nodelay(true);
    stream.set_read_timeout(Some(limit)).map_err(|e| io("socket", e))?;
    stream.set_write_timeout(Some(limit)).map_err(|e| io("socket", e))?;
    let mut line = serde_json::to_vec(request).map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?;
    line.push(b'\n');
    (&stream).write_all(&line).map_err(|e| io("send", e))?;
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer).map_err(|e| io("no answer", e))?;
    if answer.is_empty() {
        return Err(ApiError::new(ErrorKind::Io, format!("peer {peer}: closed without an answer")));
    }
    let response: Response = serde_json::from_str(&answer).map_err(|e| ApiError::new(ErrorKind::Other, format!("peer {peer}: bad answer: {e}")))?;
    let value = response.into_result()?;
    serde_json::from_value(value).map_err(|e| ApiError::new(ErrorKind::Other, format!("peer {peer}: unexpected answer: {e}")))
}

/// `call` on every node at once (a thread each, so one slow node costs
/// its own wait only); the answers in the nodes' order.
pub fn on_every<N: Sync, T: Send>(nodes: &[N], call: impl Fn(&N) -> T + Sync) -> Vec<T> {
    std::thread::scope(|s| {
        let handles: Vec<_> = nodes.iter().map(|n| s.spawn(|| call(n))).collect();
        handles.into_iter().map(|h| h.join().expect("a peer call does not panic")).collect()
    })
}
