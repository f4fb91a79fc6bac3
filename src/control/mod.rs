//! The control plane: a Unix socket speaking one JSON object per line,
//! reachable by root, the server's own user and `control_group` only, and
//! the client the CLI uses. The messages are `crate::api`'s. See
//! docs/CONTROL.md.

mod access;
mod bind;
pub mod client;
pub mod server;
