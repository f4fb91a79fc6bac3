//! Fuzzing harnesses, shared by the stable driver (`tests/fuzz/`, run by
//! `cargo test`) and the cargo-fuzz targets (`fuzz/fuzz_targets/`, nightly).
//! Each takes arbitrary bytes and returns `Err` for a bug; a panic inside
//! is a bug too. See docs/FUZZING.md.
//!
//! - [`decode::run`]: every wire decoder of `crate::nbd`.
//! - [`handshake::run`]: the real option haggling
//!   (`server::handshake::negotiate`) driven byte by byte from an
//!   in-memory transport (STARTTLS included, without crypto), every reply
//!   checked against a reference model, then the bytes after GO through
//!   the transmission request checks.
//!
//! Test support, not part of the server: nothing else in the crate uses it.

pub mod decode;
mod expect;
mod expect_exports;
pub mod fixture;
pub mod handshake;
mod replies;
pub mod setup;
mod transmission;
mod transport;

/// A broken invariant: what the server did and what it should have done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation(pub String);

impl Violation {
    pub fn new(why: impl Into<String>) -> Violation {
        Violation(why.into())
    }
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Violation {}
