//! The resync copy loop, on memory stores.

use super::*;
use crate::backend::{open_backend, BackendSpec};
use crate::map::{Extent, Leg, MappingTable, TargetSpec, DEFAULT_REGION};
use crate::volume::{Translation, Volume, VolumeSpec};
use std::collections::HashMap;
use std::time::Duration;

#[test]
fn regions_marked_stale_during_the_pass_are_copied_too() {
    let mem = |name: &str| open_backend(&BackendSpec { name: name.into(), path: None, size: Some(4 << 20), direct: false, read_only: false, delay: None, sharing: Default::default() }).unwrap();
    let stores = HashMap::from([("a".to_string(), mem("a")), ("b".to_string(), mem("b"))]);
    let legs = vec![Leg { store: "a".into(), offset: 0 }, Leg { store: "b".into(), offset: 0 }];
    let table = MappingTable::new(1, vec![Extent { start: 0, length: 4 << 20, target: TargetSpec::Mirror { legs, region: DEFAULT_REGION } }]).unwrap();
    let spec = VolumeSpec { name: "v".into(), description: String::new(), read_only: false, block_size: 4096 };
    let volume = Arc::new(Volume::new(spec, Translation::new(table, &stores).unwrap()));
    stores["a"].write_at(&[7; 4096], 3 << 20, false).unwrap();
    let red = volume.translation().redundancy().clone();
    let b = red.leg("b").unwrap();
    assert_eq!(b.condition(), LegCondition::Resyncing);
    // b lacks regions 0 and 2 when the job starts.
    b.stale().clear(1);
    b.stale().clear(3);
    // 2 MiB/s: half a second between the 1 MiB regions.
    let job = ResyncJob::start(volume.clone(), "b", 2 << 20);
    let t0 = Instant::now();
    while b.copied.load(Ordering::Relaxed) == 0 {
        assert!(t0.elapsed() < Duration::from_secs(10), "region 0 not copied");
        std::thread::sleep(Duration::from_millis(1));
    }
    // Region 3 becomes stale after the job's snapshot (a write that saw
    // the leg failed, marking it late).
    b.stale().set_volatile(3..4);
    job.join();
    assert_eq!(job.end(), Some(ResyncEnd::InSync));
    assert_eq!(b.stale().count(), 0, "region 3 was copied too");
    assert_eq!(b.condition(), LegCondition::InSync);
    let mut buf = [0u8; 4096];
    stores["b"].read_at(&mut buf, 3 << 20).unwrap();
    assert_eq!(buf, [7; 4096]);
}

/// The source leg as another node's write meets it: right after the
/// copier's first read of block 0 that node writes new bytes there, on
/// the source and then on the destination, before the copier writes its
/// (now old) bytes to the destination.
#[derive(Debug)]
struct WrittenElsewhere {
    inner: Arc<dyn Backend>,
    dest: Arc<dyn Backend>,
    done: std::sync::atomic::AtomicBool,
}

impl Backend for WrittenElsewhere {
    fn info(&self) -> &crate::backend::StoreInfo {
        self.inner.info()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)?;
        if offset == 0 && !self.done.swap(true, Ordering::SeqCst) {
            self.inner.write_at(&[9; 4096], 0, false)?;
            self.dest.write_at(&[9; 4096], 0, false)?;
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.inner.write_at(buf, offset, fua)
    }
    fn trim(&self, offset: u64, length: u64, fua: bool) -> io::Result<()> {
        self.inner.trim(offset, length, fua)
    }
    fn write_zeroes(&self, offset: u64, length: u64, mode: ZeroMode, fua: bool) -> io::Result<()> {
        self.inner.write_zeroes(offset, length, mode, fua)
    }
    fn fast_zero_certain(&self, mode: ZeroMode) -> bool {
        self.inner.fast_zero_certain(mode)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn block_status(&self, offset: u64, length: u64, max_runs: usize) -> io::Result<Vec<crate::backend::Allocation>> {
        self.inner.block_status(offset, length, max_runs)
    }
    fn cache(&self, offset: u64, length: u64) -> io::Result<()> {
        self.inner.cache(offset, length)
    }
}

/// Resyncs leg b of a 1 MiB mirror whose source a is written "elsewhere"
/// during the copy; returns block 0 of b afterwards.
fn resync_under_a_write_elsewhere(other_writers: bool) -> Vec<u8> {
    let mem = |name: &str| open_backend(&BackendSpec { name: name.into(), path: None, size: Some(1 << 20), direct: false, read_only: false, delay: None, sharing: Default::default() }).unwrap();
    let (a, b) = (mem("a"), mem("b"));
    a.write_at(&[7; 4096], 0, false).unwrap();
    let source: Arc<dyn Backend> = Arc::new(WrittenElsewhere { inner: a, dest: b.clone(), done: Default::default() });
    let stores = HashMap::from([("a".to_string(), source), ("b".to_string(), b.clone())]);
    let legs = vec![Leg { store: "a".into(), offset: 0 }, Leg { store: "b".into(), offset: 0 }];
    let table = MappingTable::new(1, vec![Extent { start: 0, length: 1 << 20, target: TargetSpec::Mirror { legs, region: DEFAULT_REGION } }]).unwrap();
    let spec = VolumeSpec { name: "v".into(), description: String::new(), read_only: false, block_size: 4096 };
    let volume = Arc::new(Volume::new(spec, Translation::new(table, &stores).unwrap()));
    volume.translation().redundancy().set_other_writers(other_writers);
    let job = ResyncJob::start(volume, "b", 0);
    job.join();
    assert_eq!(job.end(), Some(ResyncEnd::InSync));
    let mut block = vec![0u8; 4096];
    b.read_at(&mut block, 0).unwrap();
    block
}

#[test]
fn a_copy_that_another_node_wrote_under_is_copied_again() {
    // Alone, the copy's exclusion keeps writes out, so the copy trusts
    // what it read: here (a write it does not exclude) that loses the write.
    assert_eq!(resync_under_a_write_elsewhere(false), [7; 4096], "the race this guards against");
    assert_eq!(resync_under_a_write_elsewhere(true), [9; 4096], "the write from elsewhere survives the copy");
}
