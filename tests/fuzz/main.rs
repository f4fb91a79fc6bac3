//! The fuzz targets on stable Rust, as part of `cargo test`: each target
//! replays its committed corpus (fuzz/corpus/TARGET), then runs generated
//! and mutated inputs for NBDVIRT_FUZZ_SECONDS (default 60; 0 replays the
//! corpus only; NBDVIRT_FUZZ_SEED repeats a run). The two targets run side
//! by side. A failing input is written to the corpus and named in the
//! failure. The harnesses are `nbdvirt::fuzzing`, shared with the
//! cargo-fuzz targets in fuzz/; see docs/FUZZING.md.

mod alloc;
mod driver;
mod generate;
mod mutate;

use driver::{drive, Target};

/// Counts every allocation, so a case that holds more than
/// `driver::ALLOC_LIMIT` bytes at once fails.
#[global_allocator]
static COUNTING: alloc::Counting = alloc::Counting;

fn handshake_case(input: &[u8]) -> Result<Vec<u64>, String> {
    nbdvirt::fuzzing::handshake::run(input).map(|r| r.features).map_err(|v| format!("violation: {v}"))
}

fn decode_case(input: &[u8]) -> Result<Vec<u64>, String> {
    nbdvirt::fuzzing::decode::run(input).map(|()| Vec::new()).map_err(|v| format!("violation: {v}"))
}

static HANDSHAKE: Target = Target { name: "handshake", run: handshake_case, generate: generate::handshake };
static DECODE: Target = Target { name: "decode", run: decode_case, generate: generate::decode };

/// Option haggling through the real server code (handshake.rs, exports.rs)
/// and the transmission checks after GO.
#[test]
fn handshake() {
    drive(&HANDSHAKE);
}

/// The wire decoders of `nbdvirt::nbd`.
#[test]
fn decode() {
    drive(&DECODE);
}
