//! The `/metrics` endpoint: a small blocking HTTP server (`tiny_http`) on
//! one thread of its own, that renders a fresh exposition per scrape. It
//! answers `GET /metrics` only (404 otherwise) and stops when told to (it
//! looks at its stop flag every 200 ms), so a daemon shutdown never waits
//! on it for long.

use super::text::CONTENT_TYPE;
use crate::endpoint::Endpoint;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Renders the exposition; called on the metrics thread per scrape.
pub type Collect = Box<dyn Fn() -> String + Send>;

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics endpoint '{0}': only tcp:HOST:PORT is served")]
    NotTcp(String),
    #[error("metrics endpoint '{endpoint}': cannot listen: {source}")]
    Bind {
        endpoint: String,
        #[source]
        source: std::io::Error,
    },
}

/// How often the serving thread looks at its stop flag.
const TICK: Duration = Duration::from_millis(200);

pub struct MetricsServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Binds `endpoint` (errors here, not later: a port in use fails the
    /// start) and serves scrapes on a new thread.
    pub fn start(endpoint: &Endpoint, collect: Collect) -> Result<MetricsServer, MetricsError> {
        let Endpoint::Tcp(addr) = endpoint else {
            return Err(MetricsError::NotTcp(endpoint.to_string()));
        };
        let bind_err = |source| MetricsError::Bind { endpoint: endpoint.to_string(), source };
        let listener = TcpListener::bind(addr.as_str()).map_err(bind_err)?;
        let local = listener.local_addr().map_err(bind_err)?;
        let server = tiny_http::Server::from_listener(listener, None).map_err(|e| bind_err(std::io::Error::other(e.to_string())))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("nbdvirt-metrics".into())
            .spawn(move || serve(&server, &flag, &collect))
            .map_err(bind_err)?;
        tracing::info!(endpoint = %local, "serving Prometheus metrics on /metrics");
        Ok(MetricsServer { addr: local, stop, thread: Some(thread) })
    }

    /// The address bound (the real port when the endpoint asked for 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving and waits for the thread (at most one tick plus a
    /// scrape in progress).
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Not from the serving thread itself (the last reference to the
        // daemon may be dropped there, at the end of a scrape).
        if let Some(t) = self.thread.take().filter(|t| t.thread().id() != std::thread::current().id()) {
            let _ = t.join();
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.halt();
    }
}

fn serve(server: &tiny_http::Server, stop: &AtomicBool, collect: &Collect) {
    while !stop.load(Ordering::Relaxed) {
        let request = match server.recv_timeout(TICK) {
            Ok(Some(r)) => r,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "metrics endpoint: accept failed");
                std::thread::sleep(TICK);
                continue;
            }
        };
        let path = request.url().split('?').next().unwrap_or_default();
        let result = if *request.method() == tiny_http::Method::Get && path == "/metrics" {
            let header = tiny_http::Header::from_bytes("Content-Type", CONTENT_TYPE).expect("a valid header");
            request.respond(tiny_http::Response::from_string(collect()).with_header(header))
        } else {
            request.respond(tiny_http::Response::from_string("only GET /metrics is served here\n").with_status_code(404))
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "metrics endpoint: reply not sent");
        }
    }
}
