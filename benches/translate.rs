//! What the per-piece dispatch of a `Translation` costs (one dynamic call
//! into the extent's target, then the store's own call).
//!
//!   cargo bench --bench translate
//!
//! Written against API that did not change with the target trait (the
//! table comes from its JSON wire format), so the same file measures the
//! code before and after.
//!
//! * `translate/fast_zero_certain_linear`: pure dispatch, no I/O: the
//!   question a multi-piece FAST_ZERO asks of every piece.
//! * `translate/read_zero_512`: a 512-byte read of a zero extent (a fill).
//! * `translate/read_linear_4k`: a 4 KiB read of a memfd store (pread).
//! * `translate/route_4k`: `Route::new` for a 4 KiB request (load + split).

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use nbdvirt::backend::{open_backend, Backend, BackendSpec, ZeroMode};
use nbdvirt::map::MappingTable;
use nbdvirt::volume::{Route, Translation};
use std::collections::HashMap;
use std::sync::Arc;

fn bench(c: &mut Criterion) {
    let spec = BackendSpec { name: "a".into(), path: None, size: Some(1 << 20), direct: false, read_only: false, delay: None, sharing: Default::default() };
    let stores: HashMap<String, Arc<dyn Backend>> = HashMap::from([("a".to_string(), open_backend(&spec).unwrap())]);
    let table: MappingTable = serde_json::from_str(
        r#"{"generation":1,"size":2097152,"extents":[
            {"start":0,"length":1048576,"target":{"kind":"store","store":"a","offset":0}},
            {"start":1048576,"length":1048576,"target":{"kind":"zero"}}]}"#,
    )
    .unwrap();
    let t = Arc::new(Translation::new(table, &stores).unwrap());
    let linear = t.table().pieces(4096, 4096).next().unwrap();
    let zero = t.table().pieces(1 << 20, 512).next().unwrap();
    let mode = ZeroMode { may_trim: true, fast_only: true };
    let mut buf = vec![0u8; 4096];
    let mut g = c.benchmark_group("translate");
    g.bench_function("fast_zero_certain_linear", |b| b.iter(|| black_box(&t).fast_zero_certain(black_box(&linear), mode)));
    g.bench_function("read_zero_512", |b| b.iter(|| black_box(&t).read(black_box(&zero), &mut buf[..512]).unwrap()));
    g.bench_function("read_linear_4k", |b| b.iter(|| black_box(&t).read(black_box(&linear), &mut buf).unwrap()));
    g.bench_function("route_4k", |b| b.iter(|| Route::new(black_box(&t).clone(), black_box(8192), 4096).pieces.len()));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
