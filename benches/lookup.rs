//! Mapping-table lookup cost with 1,000,000 extents.
//!
//!   cargo bench --bench lookup
//!
//! * `find/random_1M_extents`: `MappingTable::find` at uniformly random byte
//!   offsets (a binary search over 1M extents; at 48 bytes per `Extent` the
//!   table is ~48 MB, far beyond the caches, so the last steps of each search
//!   miss them).
//! * `pieces/cross2_1M_extents`: `MappingTable::pieces(offset, 4096)` for a 4 KiB
//!   request straddling the boundary between two random neighbouring
//!   extents, consuming both pieces.
//! * `find/dense_ends_reference`: NOT nbdvirt code: the same search over a
//!   plain `Vec<u64>` of extent ends, to show what the 48-byte `Extent`
//!   stride costs.
//! * `find/one_extent` and `pieces/one_extent`: the same calls on a 1-extent
//!   table, the common single-file layout, as a floor.
//! * `build/new_1M_extents`: `MappingTable::new` (validation included) from a ready
//!   `Vec<Extent>` of 1M extents; `build/vec_and_new_1M_extents` also builds the Vec
//!   (one `String` store name per extent, as the config loader does).

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use nbdvirt::map::{Extent, MappingTable, TargetSpec};
use std::time::Duration;

const EXTENTS: usize = 1_000_000;
const BLOCK: u64 = 4096;
/// Random offsets (or extent indices) drawn up front and cycled through.
const SAMPLES: usize = 1 << 16;

/// xorshift64*: deterministic, dependency-free, good enough for offsets.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// 1M extents of 1..=256 blocks (4 KiB .. 1 MiB, pseudo-random lengths so
/// the search is not over a regular grid), alternating between two stores
/// with every 16th extent a zero extent.
fn extents(n: usize) -> Vec<Extent> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut start = 0u64;
    let mut store_pos = [0u64; 2];
    (0..n)
        .map(|i| {
            let length = (rng.next() % 256 + 1) * BLOCK;
            let target = if i % 16 == 15 {
                TargetSpec::Zero
            } else {
                let s = i % 2;
                let offset = store_pos[s];
                store_pos[s] += length;
                TargetSpec::Linear { store: if s == 0 { "a".to_string() } else { "b".to_string() }, offset }
            };
            let e = Extent { start, length, target };
            start += length;
            e
        })
        .collect()
}

fn lookup(c: &mut Criterion) {
    let table = MappingTable::new(1, extents(EXTENTS)).expect("valid layout");
    eprintln!(
        "lookup: {EXTENTS} extents, size_of::<Extent>() = {} bytes, {:.1} MB of extents",
        std::mem::size_of::<Extent>(),
        (EXTENTS * std::mem::size_of::<Extent>()) as f64 / 1e6
    );
    assert_eq!(table.extents().len(), EXTENTS);
    let size = table.size();
    let one = MappingTable::new(1, vec![Extent { start: 0, length: size, target: TargetSpec::Linear { store: "a".into(), offset: 0 } }])
        .expect("valid layout");

    let mut rng = Rng(42);
    let offsets: Vec<u64> = (0..SAMPLES).map(|_| rng.next() % size).collect();
    // Requests that start 2 KiB before the end of a random extent and so
    // cross into the next one.
    let crossing: Vec<u64> = (0..SAMPLES).map(|_| table.extents()[(rng.next() % (EXTENTS as u64 - 1)) as usize].end() - 2048).collect();
    for &o in crossing.iter().take(1000) {
        assert_eq!(table.pieces(o, 4096).count(), 2);
    }

    let mut g = c.benchmark_group("find");
    g.throughput(Throughput::Elements(1));
    g.bench_function("random_1M_extents", |b| {
        let mut i = 0usize;
        b.iter(|| {
            i = (i + 1) & (SAMPLES - 1);
            black_box(table.find(black_box(offsets[i])))
        })
    });
    g.bench_function("one_extent", |b| {
        let mut i = 0usize;
        b.iter(|| {
            i = (i + 1) & (SAMPLES - 1);
            black_box(one.find(black_box(offsets[i])))
        })
    });
    // Reference point, not nbdvirt code: the same binary search over a dense
    // `Vec<u64>` of extent ends (8 bytes per extent instead of the 48-byte
    // `Extent`), i.e. what a separate search key array would cost.
    let ends: Vec<u64> = table.extents().iter().map(Extent::end).collect();
    for &o in offsets.iter().take(1000) {
        assert_eq!(Some(ends.partition_point(|&e| e <= o)), table.find(o));
    }
    g.bench_function("dense_ends_reference", |b| {
        let mut i = 0usize;
        b.iter(|| {
            i = (i + 1) & (SAMPLES - 1);
            let o = black_box(offsets[i]);
            black_box(ends.partition_point(|&e| e <= o))
        })
    });
    g.finish();

    let mut g = c.benchmark_group("pieces");
    g.throughput(Throughput::Elements(1));
    g.bench_function("cross2_1M_extents", |b| {
        let mut i = 0usize;
        b.iter(|| {
            i = (i + 1) & (SAMPLES - 1);
            let mut total = 0u64;
            for p in table.pieces(black_box(crossing[i]), 4096) {
                total += p.extent_offset ^ p.length;
            }
            black_box(total)
        })
    });
    g.bench_function("one_extent", |b| {
        let mut i = 0usize;
        b.iter(|| {
            i = (i + 1) & (SAMPLES - 1);
            let mut total = 0u64;
            for p in one.pieces(black_box(offsets[i] & !(BLOCK - 1)).min(size - 4096), 4096) {
                total += p.extent_offset ^ p.length;
            }
            black_box(total)
        })
    });
    g.finish();

    let source = extents(EXTENTS);
    let mut g = c.benchmark_group("build");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    g.throughput(Throughput::Elements(EXTENTS as u64));
    g.bench_function("new_1M_extents", |b| {
        b.iter_batched(|| source.clone(), |v| MappingTable::new(1, v).expect("valid"), BatchSize::LargeInput)
    });
    g.bench_function("vec_and_new_1M_extents", |b| b.iter(|| MappingTable::new(1, extents(EXTENTS)).expect("valid")));
    g.finish();
}

criterion_group!(benches, lookup);
criterion_main!(benches);
