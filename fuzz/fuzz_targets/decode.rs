//! Feeds arbitrary bytes to every decoder of the NBD codec (the harness is
//! `nbdvirt::fuzzing::decode`, shared with the stable driver in
//! tests/fuzz/). Run with nightly: cargo +nightly fuzz run decode
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(v) = nbdvirt::fuzzing::decode::run(data) {
        panic!("{v}");
    }
});
