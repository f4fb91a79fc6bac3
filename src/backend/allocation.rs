//! Which parts of a file hold data and which are holes (`SEEK_DATA` /
//! `SEEK_HOLE`), for BLOCK_STATUS, with the last data run found kept.
//!
//! `SEEK_HOLE` costs time in proportion to the distance to the next hole:
//! on a fully allocated 512 MiB tmpfs file each call walks the page cache
//! to the end of the file, and nbdcopy asks once per request, which made
//! that walk 6.5 % of the server's CPU in a copy out of a volume (perf,
//! docs/PERFORMANCE.md §14). The run
//! found is remembered, so the next question inside it needs no syscall.
//!
//! A remembered run can only be wrong in one direction: it may call data
//! what became a hole since (the store punched one while it was being
//! scanned, or another process did), never the other way round, because
//! writes only turn holes into data. NBD allows that (a hole reported as
//! data is just not skipped), and our own punches forget the run.

use super::Allocation;
use crate::sync::lock;
use nix::errno::Errno;
use nix::unistd::{lseek, Whence};
use std::io;
use std::ops::Range;
use std::os::fd::RawFd;
use std::sync::Mutex;

#[derive(Debug, Default)]
pub(super) struct AllocationMap {
    /// The last data run `SEEK_HOLE` reported: no hole in it.
    known_data: Mutex<Option<Range<u64>>>,
}

impl AllocationMap {
    /// Forgets what was learnt: the store is about to punch a hole, or has.
    pub(super) fn forget(&self) {
        *lock(&self.known_data) = None;
    }

    fn known_data_end(&self, pos: u64) -> Option<u64> {
        lock(&self.known_data).as_ref().filter(|run| run.contains(&pos)).map(|run| run.end)
    }

    fn learn(&self, run: Range<u64>) {
        *lock(&self.known_data) = Some(run);
    }

    /// The allocation of `[offset, offset + length)` of `fd`, in at most
    /// `max_runs` runs (at least one).
    pub(super) fn scan(&self, fd: RawFd, offset: u64, length: u64, max_runs: usize) -> io::Result<Vec<Allocation>> {
        let end = offset + length;
        let mut runs = Vec::new();
        let mut pos = offset;
        while pos < end && runs.len() < max_runs.max(1) {
            if let Some(data_end) = self.known_data_end(pos) {
                let stop = data_end.min(end);
                runs.push(Allocation { length: stop - pos, hole: false });
                pos = stop;
                continue;
            }
            let data = match lseek(fd, pos as i64, Whence::SeekData) {
                Ok(data) => (data as u64).min(end),
                Err(Errno::ENXIO) => end, // only a hole from here to EOF
                // No SEEK_DATA support: report everything as data.
                Err(_) => return Ok(vec![Allocation { length, hole: false }]),
            };
            if data > pos {
                runs.push(Allocation { length: data - pos, hole: true });
                pos = data;
                continue;
            }
            let hole = match lseek(fd, pos as i64, Whence::SeekHole) {
                Ok(hole) => {
                    let hole = hole as u64;
                    if hole > pos {
                        self.learn(pos..hole);
                    }
                    hole.min(end)
                }
                Err(_) => end,
            };
            // The file may have changed between the two seeks; always advance.
            let hole = hole.max(pos + 1).min(end);
            runs.push(Allocation { length: hole - pos, hole: false });
            pos = hole;
        }
        Ok(runs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;

    const MIB: u64 = 1 << 20;

    fn punch(file: &std::fs::File, offset: u64, length: u64) {
        use nix::fcntl::{fallocate, FallocateFlags};
        let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        fallocate(file.as_raw_fd(), flags, offset as i64, length as i64).unwrap();
    }

    /// Data at 1-3 MiB and 5-6 MiB of an 8 MiB sparse file.
    fn sparse_file() -> std::fs::File {
        let file = tempfile::tempfile().unwrap();
        file.set_len(8 * MIB).unwrap();
        file.write_all_at(&vec![7u8; 2 * MIB as usize], MIB).unwrap();
        file.write_all_at(&vec![7u8; MIB as usize], 5 * MIB).unwrap();
        file
    }

    fn shape(runs: &[Allocation]) -> Vec<(u64, bool)> {
        runs.iter().map(|r| (r.length / MIB, r.hole)).collect()
    }

    #[test]
    fn reports_holes_and_data_and_answers_inside_a_known_run_alike() {
        let file = sparse_file();
        let map = AllocationMap::default();
        let first = map.scan(file.as_raw_fd(), 0, 8 * MIB, 16).unwrap();
        assert_eq!(shape(&first), [(1, true), (2, false), (2, true), (1, false), (2, true)]);
        // Inside the remembered run (5-6 MiB): the same answer.
        assert_eq!(shape(&map.scan(file.as_raw_fd(), 5 * MIB, 3 * MIB, 16).unwrap()), [(1, false), (2, true)]);
        assert_eq!(shape(&map.scan(file.as_raw_fd(), 0, 8 * MIB, 2).unwrap()), [(1, true), (2, false)]);
    }

    #[test]
    fn a_punched_hole_shows_once_the_map_forgets() {
        let file = sparse_file();
        let map = AllocationMap::default();
        assert_eq!(shape(&map.scan(file.as_raw_fd(), MIB, 2 * MIB, 16).unwrap()), [(2, false)]);
        punch(&file, 2 * MIB, MIB);
        // Until told, the remembered run still says data: what NBD allows.
        assert_eq!(shape(&map.scan(file.as_raw_fd(), MIB, 2 * MIB, 16).unwrap()), [(2, false)]);
        map.forget();
        assert_eq!(shape(&map.scan(file.as_raw_fd(), MIB, 2 * MIB, 16).unwrap()), [(1, false), (1, true)]);
    }

    #[test]
    fn writes_into_a_hole_show_at_once() {
        let file = sparse_file();
        let map = AllocationMap::default();
        assert_eq!(shape(&map.scan(file.as_raw_fd(), 0, 8 * MIB, 16).unwrap())[2], (2, true));
        file.write_all_at(&vec![1u8; MIB as usize], 3 * MIB).unwrap();
        let runs = map.scan(file.as_raw_fd(), 0, 8 * MIB, 16).unwrap();
        assert_eq!(shape(&runs), [(1, true), (3, false), (1, true), (1, false), (2, true)]);
    }
}
