//! The pool engine against memory stores: create every layout, tables,
//! thin mapping and commit, restart, check, delete.

use super::*;
use crate::api::{PoolChoice, VolumePriority};
use crate::backend::{open_backend, BackendSpec};
use crate::config::OnFull;
use std::time::Duration;

fn store(name: &str, size: u64) -> PoolStore {
    let spec = BackendSpec { name: name.into(), path: None, size: Some(size), direct: false, read_only: false, delay: None, sharing: Default::default() };
    PoolStore { backend: name.into(), handle: open_backend(&spec).unwrap(), path: None, reserved: Vec::new() }
}

fn pool(on_full: OnFull) -> PoolConfig {
    PoolConfig {
        name: "p".into(),
        class: Some("ssd".into()),
        backends: vec!["a".into(), "b".into(), "c".into()],
        chunk: 1 << 20,
        priority: 0,
        on_full,
        queue_timeout: Duration::from_millis(300),
        low_water_percent: 10,
        grow_percent: None,
        line: 1,
    }
}

fn create(name: &str, size: u64, layout: &str, thin: bool, priority: VolumePriority) -> VolumeCreate {
    VolumeCreate { name: name.into(), size, from: PoolChoice::Pool("p".into()), layout: layout.parse().unwrap(), thin, priority, description: String::new() }
}

#[test]
fn volumes_of_every_layout_survive_a_restart_and_free_their_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let stores = vec![store("a", 8 << 20), store("b", 8 << 20), store("c", 8 << 20)];
    let (pools, reports) = Pools::open(dir.path(), &[pool(OnFull::Error)], &stores).unwrap();
    assert_eq!(reports[0].chunks, 24);
    let none = |_: &str| false;
    pools.create(&create("lin", 4 << 20, "linear", false, VolumePriority::Normal), &none).unwrap();
    pools.create(&create("mir", 2 << 20, "mirror:2", false, VolumePriority::Normal), &none).unwrap();
    pools.create(&create("str", 6 << 20, "stripe:3", false, VolumePriority::Normal), &none).unwrap();
    pools.create(&create("thin", 64 << 20, "linear", true, VolumePriority::Normal), &none).unwrap();
    let err = pools.create(&create("big", 16 << 20, "linear", false, VolumePriority::Normal), &none).unwrap_err();
    assert!(matches!(err, PoolError::NoSpace { .. }), "{err}");
    assert!(matches!(pools.create(&create("odd", 3 << 19, "linear", false, VolumePriority::Normal), &none), Err(PoolError::Invalid(_))));
    assert!(matches!(pools.create(&create("lin", 1 << 20, "linear", false, VolumePriority::Normal), &none), Err(PoolError::Exists(_))));
    let t = pools.table("mir").unwrap();
    assert_eq!(t.size(), 2 << 20);
    assert!(t.extents().iter().all(|e| e.target.legs().is_some_and(|l| l.len() == 2)));
    assert_eq!(pools.table("str").unwrap().extents().len(), 1, "a stripe's chunks line up into one extent");
    let s = &pools.status(None).unwrap()[0];
    assert_eq!(s.allocated, (4 + 4 + 6) << 20);
    assert_eq!(s.free + s.allocated, s.size);
    // Thin: a write maps a chunk; commit makes it durable.
    let map = pools.chunk_map("thin").unwrap();
    assert!(map.lookup(5).is_none());
    let place = map.map(5).unwrap();
    place.store.write_at(b"hello", place.offset, false).unwrap();
    assert!(map.uncommitted());
    map.commit().unwrap();
    assert!(!map.uncommitted());
    pools.close().unwrap();
    drop(pools);

    let (pools, reports) = Pools::open(dir.path(), &[pool(OnFull::Error)], &stores).unwrap();
    assert!(reports[0].errors.is_empty(), "{:?}", reports[0].errors);
    assert_eq!(reports[0].leaked_returned, 0);
    let map = pools.chunk_map("thin").unwrap();
    let place = map.lookup(5).expect("the committed mapping is back");
    let mut buf = [0u8; 5];
    place.store.read_at(&mut buf, place.offset).unwrap();
    assert_eq!(&buf, b"hello");
    assert_eq!(pools.status(None).unwrap()[0].allocated, 15 << 20);
    let check = pools.check(None).unwrap();
    assert!(check[0].errors.is_empty() && check[0].leaked_returned == 0, "{check:?}");
    // Grow and shrink.
    pools.grow("lin", 6 << 20).unwrap();
    assert_eq!(pools.table("lin").unwrap().size(), 6 << 20);
    assert!(!pools.tail_holds_data("lin", 4 << 20).unwrap());
    pools.shrink("lin", 4 << 20).unwrap();
    assert!(pools.tail_holds_data("thin", 4 << 20).unwrap());
    for v in ["lin", "mir", "str", "thin"] {
        pools.delete(v).unwrap();
    }
    let s = &pools.status(None).unwrap()[0];
    assert_eq!((s.allocated, s.free), (0, 24 << 20));
    assert!(pools.check(None).unwrap()[0].errors.is_empty());
}

#[test]
fn full_pools_answer_enospc_and_low_priority_space_is_reclaimed() {
    let dir = tempfile::tempdir().unwrap();
    let stores = vec![store("a", 4 << 20), store("b", 4 << 20), store("c", 4 << 20)];
    let (pools, _) = Pools::open(dir.path(), &[pool(OnFull::Error)], &stores).unwrap();
    let none = |_: &str| false;
    pools.create(&create("scratch", 8 << 20, "linear", false, VolumePriority::Low), &none).unwrap();
    pools.create(&create("thin", 8 << 20, "linear", true, VolumePriority::Normal), &none).unwrap();
    let thin = pools.chunk_map("thin").unwrap();
    let scratch = pools.chunk_map("scratch").unwrap();
    for c in 0..4 {
        let p = thin.map(c).unwrap();
        p.store.write_at(b"data", p.offset, false).unwrap();
    }
    for c in 0..8 {
        let p = scratch.lookup(c).unwrap();
        p.store.write_at(b"scratch", p.offset, false).unwrap();
    }
    // A scratch chunk that holds only zeros goes first.
    let zeros = scratch.lookup(7).unwrap();
    zeros.store.trim(zeros.offset, 1 << 20, false).unwrap();
    assert_eq!(thin.map(4).unwrap_err().raw_os_error(), Some(libc::ENOSPC));
    // The pool thread reclaims in the background for the failed write: the
    // zero-only chunk goes first.
    while pools.status(None).unwrap()[0].free == 0 {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(scratch.lookup(7).is_none(), "the zero-only chunk was reclaimed first");
    // A normal volume that needs the scratch volume's space gets it.
    pools.create(&create("data", 6 << 20, "linear", false, VolumePriority::Normal), &none).unwrap();
    let left = (0..8).filter(|c| scratch.lookup(*c).is_some()).count();
    assert_eq!(left, 2, "one zero-only and five more scratch chunks were reclaimed");
    assert!((0..4).all(|c| thin.lookup(c).is_some()), "normal data is never reclaimed");
    let s = &pools.status(None).unwrap()[0];
    assert_eq!(s.reclaimed, 6 << 20);
    pools.close().unwrap();
}

#[test]
fn partial_zeroing_of_a_whole_chunk_unmaps_it_and_a_racing_write_is_told_to_write_again() {
    let dir = tempfile::tempdir().unwrap();
    let stores = vec![store("a", 8 << 20), store("b", 8 << 20), store("c", 8 << 20)];
    let (pools, _) = Pools::open(dir.path(), &[pool(OnFull::Error)], &stores).unwrap();
    pools.create(&create("t", 8 << 20, "linear", true, VolumePriority::Normal), &|_| false).unwrap();
    let map = pools.chunk_map("t").unwrap();
    let place = map.map(0).unwrap();
    assert!(map.wrote_to(0, 0, 4096, &place), "nothing changed under the write");
    // Half the chunk zeroed: still mapped; the other half too: unmapped.
    map.zeroed(0, 0, 512 << 10).unwrap();
    assert!(map.lookup(0).is_some());
    map.zeroed(0, 512 << 10, 512 << 10).unwrap();
    assert!(map.lookup(0).is_none(), "a chunk zeroed all over holds nothing");
    assert!(!map.wrote_to(0, 0, 4096, &place), "a write through the old place must be made again");
    // A write in between forgets the zeroed part it touched.
    let place = map.map(1).unwrap();
    map.zeroed(1, 0, 512 << 10).unwrap();
    assert!(map.wrote_to(1, 4096, 4096, &place));
    map.zeroed(1, 512 << 10, 512 << 10).unwrap();
    assert!(map.lookup(1).is_some(), "the written 64th was not zeroed since");
    map.commit().unwrap();
    assert_eq!(pools.status(None).unwrap()[0].allocated, 1 << 20);
    pools.close().unwrap();
}

#[test]
fn owner_records_of_no_volume_are_leaks_and_pending_changes_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let stores = vec![store("a", 8 << 20), store("b", 8 << 20), store("c", 8 << 20)];
    let (pools, _) = Pools::open(dir.path(), &[pool(OnFull::Error)], &stores).unwrap();
    pools.create(&create("t", 16 << 20, "linear", true, VolumePriority::Normal), &|_| false).unwrap();
    let map = pools.chunk_map("t").unwrap();
    let thin = crate::sync::lock(&pools.inner.state).volumes["t"].map.clone().unwrap();
    map.map(0).unwrap();
    map.map(1).unwrap();
    assert!(thin.durable_entries().is_empty(), "maps not committed yet are not durable");
    map.commit().unwrap();
    let durable = thin.durable_entries();
    assert_eq!(durable.keys().copied().collect::<Vec<_>>(), vec![0, 1]);
    map.unmap(1).unwrap();
    map.map(2).unwrap();
    assert_eq!(thin.durable_entries(), durable, "an uncommitted unmap and map change nothing durable");
    // An owner record of a volume that does not exist: a leak, returned
    // by the online check and not an error.
    let ghost = |id| super::meta::MapEntry { volume: "ghost".into(), pool: "p".into(), vchunk: 0, copy: 0, id };
    let free_id = |pools: &Pools| {
        let st = crate::sync::lock(&pools.inner.state);
        let s = &st.pools["p"].space.stores[1];
        (0..8).find(|i| s.is_free(*i)).map(|i| (1u64 << 40) | i).unwrap()
    };
    pools.inner.meta.apply(&super::meta::Batch { mapped: vec![ghost(free_id(&pools))], ..Default::default() }).unwrap();
    let check = pools.check(None).unwrap();
    assert_eq!((check[0].leaked_returned, check[0].errors.clone()), (1, Vec::<String>::new()), "{check:?}");
    assert_eq!(pools.check(None).unwrap()[0].leaked_returned, 0, "returned once");
    // The same at start-up.
    pools.inner.meta.apply(&super::meta::Batch { mapped: vec![ghost(free_id(&pools))], ..Default::default() }).unwrap();
    pools.close().unwrap();
    drop(pools);
    let (pools, reports) = Pools::open(dir.path(), &[pool(OnFull::Error)], &stores).unwrap();
    assert_eq!((reports[0].leaked_returned, reports[0].errors.clone()), (1, Vec::<String>::new()), "{reports:?}");
    let map = pools.chunk_map("t").unwrap();
    assert!(map.lookup(0).is_some() && map.lookup(1).is_none() && map.lookup(2).is_some(), "the closing commit kept the last changes");
    assert_eq!(pools.status(None).unwrap()[0].allocated, 2 << 20);
    // A second record for a chunk that has one: reported, the first kept.
    let first = map.lookup(0).unwrap();
    let twice = super::meta::MapEntry { volume: "t".into(), ..ghost(free_id(&pools)) };
    pools.inner.meta.apply(&super::meta::Batch { mapped: vec![twice], ..Default::default() }).unwrap();
    pools.close().unwrap();
    drop((pools, map));
    let (pools, reports) = Pools::open(dir.path(), &[pool(OnFull::Error)], &stores).unwrap();
    assert!(reports[0].errors.len() == 1 && reports[0].errors[0].contains("is owned by chunks"), "{reports:?}");
    let place = pools.chunk_map("t").unwrap().lookup(0).unwrap();
    assert_eq!((place.offset, Arc::ptr_eq(&place.store, &first.store)), (first.offset, true), "the first record wins");
    pools.close().unwrap();
}

#[test]
fn a_database_with_the_old_map_table_opens_and_loses_that_table() {
    let dir = tempfile::tempdir().unwrap();
    let stores = vec![store("a", 8 << 20), store("b", 8 << 20), store("c", 8 << 20)];
    let (pools, _) = Pools::open(dir.path(), &[pool(OnFull::Error)], &stores).unwrap();
    pools.create(&create("lin", 2 << 20, "linear", false, VolumePriority::Normal), &|_| false).unwrap();
    pools.close().unwrap();
    drop(pools);
    let path = dir.path().join("pools.redb");
    let legacy: redb::TableDefinition<(&str, u64, u8), u64> = redb::TableDefinition::new("map");
    {
        let db = redb::Database::create(&path).unwrap();
        let tx = db.begin_write().unwrap();
        tx.open_table(legacy).unwrap().insert(("lin", 0, 0), 0).unwrap();
        tx.commit().unwrap();
    }
    let (pools, reports) = Pools::open(dir.path(), &[pool(OnFull::Error)], &stores).unwrap();
    assert!(reports[0].errors.is_empty(), "{reports:?}");
    assert_eq!(pools.table("lin").unwrap().size(), 2 << 20);
    pools.close().unwrap();
    drop(pools);
    use redb::TableHandle as _;
    let db = redb::Database::create(&path).unwrap();
    let names: Vec<String> = db.begin_read().unwrap().list_tables().unwrap().map(|t| t.name().to_string()).collect();
    assert!(!names.contains(&"map".to_string()), "{names:?}");
}

#[test]
fn free_chunks_that_hold_data_are_zeroed_when_mapped_and_holes_are_clean() {
    let dir = tempfile::tempdir().unwrap();
    let stores = vec![store("a", 8 << 20), store("b", 8 << 20), store("c", 8 << 20)];
    let clean = |pools: &Pools| crate::sync::lock(&pools.inner.state).pools["p"].space.stores.iter().map(|s| s.clean_chunks()).sum::<u64>();
    let (pools, _) = Pools::open(dir.path(), &[pool(OnFull::Error)], &stores).unwrap();
    assert_eq!(clean(&pools), 24, "new sparse stores: every chunk is a hole");
    pools.create(&create("t", 32 << 20, "linear", true, VolumePriority::Normal), &|_| false).unwrap();
    let map = pools.chunk_map("t").unwrap();
    map.map(0).unwrap();
    assert_eq!(clean(&pools), 23, "a chunk handed out is no longer clean");
    map.commit().unwrap();
    pools.close().unwrap();
    drop(pools);
    // What a write leaves behind when a crash loses its mapping: data in
    // free chunks, here in the first bytes of every chunk of every store.
    for s in &stores {
        for k in 0..8u64 {
            s.handle.write_at(b"left over", k << 20, false).unwrap();
        }
    }
    let (pools, _) = Pools::open(dir.path(), &[pool(OnFull::Error)], &stores).unwrap();
    assert_eq!(clean(&pools), 0, "no free chunk reads zeros");
    let map = pools.chunk_map("t").unwrap();
    for c in 1..24 {
        let place = map.map(c).unwrap();
        let mut buf = [1u8; 9];
        place.store.read_at(&mut buf, place.offset).unwrap();
        assert_eq!(buf, [0u8; 9], "chunk {c} was zeroed before it was mapped");
    }
    pools.close().unwrap();
}
