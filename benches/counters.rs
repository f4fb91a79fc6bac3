//! What the metrics counters cost a request (docs/PERFORMANCE.md, "Metrics
//! cost").
//!
//!   cargo bench --bench counters
//!
//! * `counters/per_request`: what the server does per request for the
//!   metrics: the admission stamp, `started`, and `completed` (the second
//!   clock read, the byte counter, the histogram bucket and sum).
//! * `clock/quanta_pair` and `clock/std_instant_pair`: two reads of the
//!   request clock (TSC via quanta) vs two `std::time::Instant::now()`.
//!
//! Compare with the server's CPU per 4 KiB request (~4–5 µs,
//! docs/PERFORMANCE.md section 1).

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use nbdvirt::volume::{Op, VolumeStats};

fn bench(c: &mut Criterion) {
    let stats = VolumeStats::new();
    let mut g = c.benchmark_group("counters");
    let mut i = 0u64;
    g.bench_function("per_request", |b| {
        b.iter(|| {
            i += 1;
            let started = VolumeStats::now();
            stats.started();
            stats.completed(if i & 1 == 0 { Op::Read } else { Op::Write }, true, black_box(4096), started);
        })
    });
    g.finish();
    let mut g = c.benchmark_group("clock");
    g.bench_function("quanta_pair", |b| {
        let clock = quanta::Clock::new();
        b.iter(|| {
            let s = clock.raw();
            black_box(clock.delta_as_nanos(s, clock.raw()))
        })
    });
    g.bench_function("std_instant_pair", |b| {
        b.iter(|| {
            let s = std::time::Instant::now();
            black_box(s.elapsed())
        })
    });
    g.finish();
    black_box(stats.snapshot());
}

criterion_group!(benches, bench);
criterion_main!(benches);
