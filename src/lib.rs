//! nbdvirt: virtual volumes as NBD exports, each translated through a
//! mapping table onto backing stores.
//!
//! Layers, data flowing one way (a lower layer never imports a higher one):
//! `nbd` (wire codec) → `server` (listeners, handshake, request pipeline) →
//! `volume` (translation) → `backend` (files, block devices, memory).
//! Beside them: `map` (pure tables and checks) and `config`; `remote` is
//! the node's own NBD client, forwarding I/O to another node.
//! See docs/ARCHITECTURE.md.

pub mod access;
pub mod api;
pub mod attach;
pub mod backend;
pub mod cluster;
pub mod config;
pub mod control;
pub mod daemon;
pub mod defaults;
pub mod endpoint;
pub mod fuzzing;
pub mod map;
pub mod metrics;
pub mod migrate;
pub mod mirror;
pub mod nbd;
pub mod persist;
pub mod pool;
pub mod remote;
pub mod server;
pub mod sync;
pub mod tls;
pub mod volume;
