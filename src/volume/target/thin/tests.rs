//! The thin target over an in-memory chunk map on one memfd store. The
//! fake map punches a chunk when it maps it, as the pool does, so a chunk
//! reused after an unmap reads zeros where it was not written.

use super::*;
use crate::backend::{open_backend, BackendSpec};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::Mutex;

const CHUNK: u64 = 65536;
/// Chunks the store holds: fewer than the volume has (overcommitted).
const SLOTS: u64 = 4;
const CHUNKS: u64 = 8;
const TRIM: ZeroMode = ZeroMode { may_trim: true, fast_only: false };
const NO_HOLE: ZeroMode = ZeroMode { may_trim: false, fast_only: false };

#[derive(Debug, Default)]
struct State {
    /// Chunk → store slot.
    map: HashMap<u64, u64>,
    free: Vec<u64>,
    uncommitted: bool,
}

#[derive(Debug)]
struct FakeMap {
    stores: Vec<Arc<dyn Backend>>,
    state: Mutex<State>,
    commits: AtomicUsize,
    maps: AtomicUsize,
    unmaps: AtomicUsize,
    written: AtomicU64,
    /// Running I/Os: enter minus leave.
    active: AtomicI64,
    /// Maps left that a racing TRIM undoes at once.
    stolen: AtomicUsize,
    /// A chunk whose place lies past the largest file size (I/O fails).
    broken: Option<u64>,
    /// `map` may wait for space.
    waits: AtomicBool,
    /// Writes left that find their chunk unmapped under them.
    lose: AtomicUsize,
    /// `zeroed` calls: (chunk, within, bytes).
    zeroed: Mutex<Vec<(u64, u64, u64)>>,
}

impl FakeMap {
    fn new(broken: Option<u64>) -> Arc<FakeMap> {
        let spec = BackendSpec { name: "pool".into(), path: None, size: Some(SLOTS * CHUNK), direct: false, read_only: false, delay: None, sharing: Default::default() };
        let store = open_backend(&spec).unwrap();
        // Old data everywhere: a chunk mapped without punching would show it.
        store.write_at(&vec![0xee; (SLOTS * CHUNK) as usize], 0, false).unwrap();
        let state = State { free: (0..SLOTS).rev().collect(), ..State::default() };
        Arc::new(FakeMap {
            stores: vec![store],
            state: Mutex::new(state),
            commits: AtomicUsize::new(0),
            maps: AtomicUsize::new(0),
            unmaps: AtomicUsize::new(0),
            written: AtomicU64::new(0),
            active: AtomicI64::new(0),
            stolen: AtomicUsize::new(0),
            broken,
            waits: AtomicBool::new(false),
            lose: AtomicUsize::new(0),
            zeroed: Mutex::new(Vec::new()),
        })
    }

    fn place(&self, slot: u64) -> ChunkPlace {
        ChunkPlace { store: self.stores[0].clone(), offset: slot * CHUNK }
    }

    fn mapped(&self) -> usize {
        self.state.lock().unwrap().map.len()
    }

    fn free_slot(&self, state: &mut State, c: u64) {
        if let Some(slot) = state.map.remove(&c) {
            self.stores[0].trim(slot * CHUNK, CHUNK, false).unwrap();
            state.free.push(slot);
            state.uncommitted = true;
        }
    }
}

impl ChunkMap for FakeMap {
    fn chunk_size(&self) -> u64 {
        CHUNK
    }
    fn lookup(&self, c: u64) -> Option<ChunkPlace> {
        if self.broken == Some(c) {
            return Some(ChunkPlace { store: self.stores[0].clone(), offset: i64::MAX as u64 - 8 });
        }
        self.state.lock().unwrap().map.get(&c).map(|s| self.place(*s))
    }
    fn map(&self, c: u64) -> io::Result<ChunkPlace> {
        let mut state = self.state.lock().unwrap();
        if let Some(slot) = state.map.get(&c) {
            return Ok(self.place(*slot));
        }
        let slot = state.free.pop().ok_or(Errno::ENOSPC)?;
        self.stores[0].trim(slot * CHUNK, CHUNK, false)?;
        state.map.insert(c, slot);
        state.uncommitted = true;
        self.maps.fetch_add(1, SeqCst);
        if self.stolen.load(SeqCst) > 0 {
            self.stolen.fetch_sub(1, SeqCst);
            self.free_slot(&mut state, c);
        }
        Ok(self.place(slot))
    }
    fn unmap(&self, c: u64) -> io::Result<()> {
        self.unmaps.fetch_add(1, SeqCst);
        self.free_slot(&mut self.state.lock().unwrap(), c);
        Ok(())
    }
    fn wrote(&self, _c: u64, bytes: u64) {
        self.written.fetch_add(bytes, SeqCst);
    }
    fn wrote_to(&self, c: u64, _within: u64, bytes: u64, place: &ChunkPlace) -> bool {
        self.wrote(c, bytes);
        let mut state = self.state.lock().unwrap();
        if self.lose.load(SeqCst) > 0 {
            // Unmapped (and punched) under the write, as when a partial
            // TRIM completes the zeroing of the rest of the chunk.
            self.lose.fetch_sub(1, SeqCst);
            self.free_slot(&mut state, c);
        }
        state.map.get(&c).is_some_and(|slot| slot * CHUNK == place.offset)
    }
    fn zeroed(&self, c: u64, within: u64, bytes: u64) -> io::Result<()> {
        self.zeroed.lock().unwrap().push((c, within, bytes));
        Ok(())
    }
    fn enter(&self) -> u64 {
        self.active.fetch_add(1, SeqCst) as u64
    }
    fn leave(&self, _token: u64) {
        self.active.fetch_sub(1, SeqCst);
    }
    fn commit(&self) -> io::Result<()> {
        self.stores[0].flush()?;
        self.state.lock().unwrap().uncommitted = false;
        self.commits.fetch_add(1, SeqCst);
        Ok(())
    }
    fn uncommitted(&self) -> bool {
        self.state.lock().unwrap().uncommitted
    }
    fn stores(&self) -> &[Arc<dyn Backend>] {
        &self.stores
    }
    fn may_wait(&self) -> bool {
        self.waits.load(SeqCst)
    }
}

fn thin(broken: Option<u64>) -> (ThinTarget, Arc<FakeMap>) {
    let map = FakeMap::new(broken);
    (ThinTarget::new(map.clone(), CHUNKS * CHUNK), map)
}

fn read(t: &ThinTarget, offset: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0x55; len as usize];
    t.read(offset, &mut buf).unwrap();
    buf
}

fn errno(r: io::Result<()>) -> Option<i32> {
    r.unwrap_err().raw_os_error()
}

fn run(length: u64, hole: bool) -> Allocation {
    Allocation { length, hole }
}

#[test]
fn unmapped_chunks_read_zeros_and_map_nothing() {
    let (t, m) = thin(None);
    assert_eq!(read(&t, 0, 2 * CHUNK + 10), vec![0; (2 * CHUNK + 10) as usize]);
    t.cache(0, CHUNKS * CHUNK).unwrap();
    assert_eq!((m.mapped(), m.maps.load(SeqCst), m.active.load(SeqCst)), (0, 0, 0));
}

#[test]
fn a_partial_write_to_a_new_chunk_leaves_the_rest_zero() {
    let (t, m) = thin(None);
    t.write(3 * CHUNK + 1000, &[7; 100], false).unwrap();
    let chunk = read(&t, 3 * CHUNK, CHUNK);
    assert!(chunk[..1000].iter().all(|b| *b == 0));
    assert_eq!(chunk[1000..1100], [7; 100]);
    assert!(chunk[1100..].iter().all(|b| *b == 0));
    assert_eq!((m.mapped(), m.written.load(SeqCst), m.active.load(SeqCst)), (1, 100, 0));
    // A second write to it maps nothing more.
    t.write(3 * CHUNK, &[8; 10], false).unwrap();
    assert_eq!(m.maps.load(SeqCst), 1);
    assert_eq!(read(&t, 3 * CHUNK, 12), [8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 0, 0]);
}

#[test]
fn calls_spanning_chunks_are_served_chunk_by_chunk() {
    let (t, m) = thin(None);
    let data: Vec<u8> = (0..CHUNK + 200).map(|i| (i % 251) as u8).collect();
    t.write(CHUNK - 100, &data, false).unwrap();
    assert_eq!(m.mapped(), 3);
    assert_eq!(read(&t, CHUNK - 100, data.len() as u64), data);
    // Whole chunk 1 unmapped, the ends of chunks 0 and 2 punched.
    t.trim(CHUNK - 100, data.len() as u64, false).unwrap();
    assert_eq!((m.mapped(), m.unmaps.load(SeqCst)), (2, 1));
    assert_eq!(read(&t, 0, 3 * CHUNK), vec![0; (3 * CHUNK) as usize]);
    assert_eq!(m.active.load(SeqCst), 0);
}

#[test]
fn whole_chunk_trim_unmaps_and_partial_trim_reaches_the_store() {
    let (t, m) = thin(None);
    t.write(CHUNK, &vec![1; (2 * CHUNK) as usize], false).unwrap();
    t.trim(CHUNK, CHUNK + CHUNK / 2, false).unwrap();
    assert_eq!((m.mapped(), m.unmaps.load(SeqCst)), (1, 1));
    assert_eq!(*m.zeroed.lock().unwrap(), [(2, 0, CHUNK / 2)], "the map hears of the partial trim");
    assert_eq!(read(&t, CHUNK, CHUNK), vec![0; CHUNK as usize]);
    let two = read(&t, 2 * CHUNK, CHUNK);
    assert!(two[..(CHUNK / 2) as usize].iter().all(|b| *b == 0));
    assert!(two[(CHUNK / 2) as usize..].iter().all(|b| *b == 1));
    // Trimming unmapped chunks, whole or partial, does nothing.
    t.trim(4 * CHUNK, CHUNK + 10, false).unwrap();
    assert_eq!((m.mapped(), m.unmaps.load(SeqCst), m.maps.load(SeqCst)), (1, 1, 2));
    // The freed chunk serves the next new one, read as zeros.
    t.write(5 * CHUNK, &[3; 4], false).unwrap();
    assert_eq!(read(&t, 5 * CHUNK, 8), [3, 3, 3, 3, 0, 0, 0, 0]);
}

#[test]
fn write_zeroes_unmaps_whole_chunks_or_provisions_without_holes() {
    let (t, m) = thin(None);
    t.write(0, &vec![4; (2 * CHUNK) as usize], false).unwrap();
    t.write_zeroes(0, CHUNK + 16, TRIM, false).unwrap();
    assert_eq!((m.mapped(), m.unmaps.load(SeqCst)), (1, 1));
    assert_eq!(read(&t, CHUNK, 17), [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4]);
    // Partial zeroing of an unmapped chunk without NO_HOLE maps nothing.
    t.write_zeroes(2 * CHUNK, 16, TRIM, false).unwrap();
    assert_eq!(m.mapped(), 1);
    // NO_HOLE maps the chunks (allocated zeros) and never unmaps, nor
    // tells the map of zeros it could unmap.
    t.write_zeroes(CHUNK, 2 * CHUNK, NO_HOLE, false).unwrap();
    assert_eq!((m.mapped(), m.unmaps.load(SeqCst)), (2, 1));
    assert_eq!(*m.zeroed.lock().unwrap(), [(1, 0, 16)]);
    assert_eq!(read(&t, CHUNK, 2 * CHUNK), vec![0; (2 * CHUNK) as usize]);
    assert_eq!(m.active.load(SeqCst), 0);
}

#[test]
fn fast_zero_is_certain_on_a_memfd_pool() {
    let (t, m) = thin(None);
    let fast = ZeroMode { may_trim: true, fast_only: true };
    assert!(t.fast_zero_certain(fast));
    t.write(0, &[1; 10], false).unwrap();
    t.write_zeroes(0, 2 * CHUNK, fast, false).unwrap();
    t.write_zeroes(3 * CHUNK, 10, ZeroMode { may_trim: false, fast_only: true }, false).unwrap();
    assert_eq!((m.mapped(), m.active.load(SeqCst)), (1, 0));
}

#[test]
fn fua_commits_new_mappings_and_flush_commits() {
    let (t, m) = thin(None);
    t.write(0, &[1; 512], true).unwrap();
    assert_eq!((m.commits.load(SeqCst), m.uncommitted()), (1, false));
    // Overwriting a committed chunk with FUA needs no commit.
    t.write(0, &[2; 512], true).unwrap();
    assert_eq!(m.commits.load(SeqCst), 1);
    // Without FUA the mapping waits for a flush...
    t.write(CHUNK, &[3; 512], false).unwrap();
    assert_eq!((m.commits.load(SeqCst), m.uncommitted()), (1, true));
    // ...or for any FUA write, even to a chunk mapped long ago.
    t.write(0, &[4; 512], true).unwrap();
    assert_eq!((m.commits.load(SeqCst), m.uncommitted()), (2, false));
    t.trim(0, CHUNK, true).unwrap();
    assert_eq!((m.commits.load(SeqCst), m.uncommitted()), (3, false));
    t.trim(2 * CHUNK, CHUNK, true).unwrap();
    assert_eq!(m.commits.load(SeqCst), 3, "nothing changed, nothing pending");
    t.write_zeroes(CHUNK, CHUNK, TRIM, false).unwrap();
    t.flush().unwrap();
    assert_eq!((m.commits.load(SeqCst), m.uncommitted()), (4, false));
    assert!(t.redundant());
    assert_eq!(t.stores().len(), 1);
}

#[test]
fn a_map_that_may_wait_makes_the_target_wait() {
    let (t, m) = thin(None);
    assert!(!t.may_wait() && t.can_wait());
    m.waits.store(true, SeqCst);
    assert!(t.may_wait());
    assert!(!t.may_block(), "only while the pool is short, not for good");
    assert_eq!((t.min_io(), t.rotational()), (1, false));
}

#[test]
fn block_status_holes_for_unmapped_data_for_written() {
    let (t, _m) = thin(None);
    assert_eq!(t.block_status(0, CHUNKS * CHUNK, 8).unwrap(), vec![run(CHUNKS * CHUNK, true)]);
    t.write(CHUNK, &vec![9; CHUNK as usize], false).unwrap();
    // The first 4KiB of chunk 3: the rest of it is a hole on the store and
    // joins the unmapped chunks after it.
    t.write(3 * CHUNK, &[9; 4096], false).unwrap();
    let all = vec![run(CHUNK, true), run(CHUNK, false), run(CHUNK, true), run(4096, false), run(5 * CHUNK - 4096, true)];
    assert_eq!(t.block_status(0, CHUNKS * CHUNK, 16).unwrap(), all);
    assert_eq!(t.block_status(0, CHUNKS * CHUNK, 3).unwrap(), all[..3]);
    assert_eq!(t.block_status(0, CHUNKS * CHUNK, 1).unwrap(), all[..1]);
    assert_eq!(t.block_status(CHUNK + 100, 200, 4).unwrap(), vec![run(200, false)]);
}

#[test]
fn no_space_reaches_the_caller_and_io_leaves() {
    let (t, m) = thin(None);
    for c in 0..SLOTS {
        t.write(c * CHUNK, &[1], false).unwrap();
    }
    assert_eq!(errno(t.write(SLOTS * CHUNK, &[1], true)), Some(Errno::ENOSPC as i32));
    assert_eq!(errno(t.write_zeroes(SLOTS * CHUNK, 10, NO_HOLE, false)), Some(Errno::ENOSPC as i32));
    assert_eq!(m.active.load(SeqCst), 0);
    // Trimming a chunk makes room again.
    t.trim(0, CHUNK, false).unwrap();
    t.write(SLOTS * CHUNK, &[1], false).unwrap();
}

#[test]
fn store_errors_and_bad_ranges_leave_too() {
    let (t, m) = thin(Some(2));
    let mut buf = [0; 16];
    assert!(t.read(2 * CHUNK, &mut buf).is_err());
    assert!(t.write(2 * CHUNK, &buf, false).is_err());
    let _ = t.block_status(2 * CHUNK, 16, 2);
    let _ = t.cache(2 * CHUNK, 16);
    assert_eq!(m.active.load(SeqCst), 0);
    assert_eq!(errno(t.write(CHUNKS * CHUNK - 1, &[1, 2], false)), Some(Errno::EINVAL as i32));
    assert_eq!(errno(t.trim(u64::MAX, 2, false)), Some(Errno::EINVAL as i32));
    assert_eq!(m.mapped(), 0);
}

#[test]
fn a_mapping_lost_to_a_racing_trim_is_mapped_again() {
    for stolen in [1, MAP_TRIES] {
        let (t, m) = thin(None);
        m.stolen.store(stolen, SeqCst);
        t.write(CHUNK + 5, &[6; 5], false).unwrap();
        assert_eq!(read(&t, CHUNK, 12), [0, 0, 0, 0, 0, 6, 6, 6, 6, 6, 0, 0], "stolen {stolen}");
        assert_eq!((m.mapped(), m.active.load(SeqCst)), (1, 0));
    }
}

#[test]
fn a_write_whose_chunk_was_unmapped_under_it_is_made_again() {
    let (t, m) = thin(None);
    t.write(0, &[1; 8], false).unwrap();
    t.write(CHUNK, &[1; 8], true).unwrap();
    let commits = m.commits.load(SeqCst);
    m.lose.store(2, SeqCst);
    t.write(4, &[2; 8], true).unwrap();
    assert_eq!(read(&t, 0, 14), [0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2, 0, 0], "earlier data went with the chunk, the write stayed");
    assert_eq!((m.mapped(), m.active.load(SeqCst)), (2, 0));
    assert_eq!(m.commits.load(SeqCst), commits + 1, "FUA commits the new mapping");
    m.lose.store(usize::MAX, SeqCst);
    assert!(t.write(CHUNK, &[3], false).is_err(), "gives up rather than spin");
    assert_eq!(m.active.load(SeqCst), 0);
}
