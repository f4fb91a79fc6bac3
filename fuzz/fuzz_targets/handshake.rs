//! The real option haggling (`server::handshake::negotiate`) on an
//! in-memory transport, every reply checked against the reference model,
//! then transmission requests after GO (the harness is
//! `nbdvirt::fuzzing::handshake`, shared with the stable driver in
//! tests/fuzz/; input format in src/fuzzing/setup.rs).
//! Run with nightly: cargo +nightly fuzz run handshake -- -malloc_limit_mb=4
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(v) = nbdvirt::fuzzing::handshake::run(data) {
        panic!("{v}");
    }
});
