//! Prometheus metrics: `[server] metrics = "tcp:HOST:PORT"` serves
//! `GET /metrics` in the classic text format (`text.rs`), rendered at each
//! scrape (`collect.rs`) from views the daemon hands over: its status,
//! mirror, migration, pool and cluster views, and every volume's counters
//! (`volume::VolumeStats`, plain atomics the server bumps per request).
//! The HTTP side is `http.rs`. Beside `daemon`, below `cli`: it reads `api`
//! and `volume` types only; `daemon/metrics.rs` wires it to a daemon.

mod cluster;
mod collect;
mod http;
mod text;

pub use collect::{render, VolumeCounters, Views};
pub use http::{Collect, MetricsError, MetricsServer};
pub use text::CONTENT_TYPE;
