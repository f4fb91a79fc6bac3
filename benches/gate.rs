//! What the pause–drain gate costs a request when nothing is paused.
//!
//!   cargo bench --bench gate
//!
//! * `gate/try_enter_drop`: `Gate::try_enter` + dropping the ticket on the
//!   same thread, what the inline fast path does for every 4 KiB request
//!   (register in a shard, SeqCst fence + flag load, unregister).
//! * `gate/enter_boxed_job`: `Gate::enter` with a boxed job, the path a
//!   request takes after `try_enter` was refused (here nothing is held, so
//!   the job runs at once).
//! * `baseline/range_only`: building the `Range` and nothing else, the
//!   floor of the loop.
//!
//! Compare with the server's CPU per 4 KiB request (~5 µs,
//! docs/PERFORMANCE.md).

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use nbdvirt::map::Range;
use nbdvirt::volume::{Gate, Ticket};

fn offset(i: u64) -> u64 {
    (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 34) << 12
}

fn bench(c: &mut Criterion) {
    let gate = Gate::new();
    let mut g = c.benchmark_group("gate");
    let mut i = 0u64;
    g.bench_function("try_enter_drop", |b| {
        b.iter(|| {
            i += 1;
            let t = gate.try_enter(Range::new(offset(i), 4096), 3);
            drop(black_box(t));
        })
    });
    g.bench_function("enter_boxed_job", |b| {
        b.iter(|| {
            i += 1;
            gate.enter(Range::new(offset(i), 4096), 3, Box::new(|t: Ticket| drop(black_box(t))));
        })
    });
    g.finish();
    c.bench_function("baseline/range_only", |b| {
        b.iter(|| {
            i += 1;
            black_box(Range::new(offset(i), 4096));
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
