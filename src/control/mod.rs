//! The control plane: a Unix socket (owner-only) speaking one JSON object
//! per line, and the client the CLI uses. The messages are `crate::api`'s.
//! See docs/CONTROL.md.

pub mod client;
pub mod server;
