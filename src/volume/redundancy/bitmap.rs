//! A bitmap of regions kept in memory as atomics and, optionally, in a
//! file (one bit per region, little-endian 64-bit words, no header).
//!
//! Two ways to set bits:
//! - [`RegionBitmap::set_durable`]: the bits are on disk (pwrite +
//!   fdatasync) *before* they become visible in memory, so a bit seen set is
//!   a bit that survives a crash. The write-intent log and split trackers
//!   rely on this: a write is acknowledged only after its region's bit is
//!   seen set.
//! - [`RegionBitmap::set_volatile`] + [`RegionBitmap::sync`]: in memory
//!   now, on disk at the next sync (a leg's stale regions).
//!
//! Clearing is never urgent: a cleared bit lost in a crash only means a
//! region is resynced once more.

use crate::sync::lock;
use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Mutex, MutexGuard};

#[derive(Debug)]
pub struct RegionBitmap {
    words: Vec<AtomicU64>,
    regions: usize,
    file: Option<(PathBuf, File)>,
    /// Serialises writers of the file, and clearing against durable sets.
    writer: Mutex<()>,
    /// Set bits at the last [`sync`](Self::sync) (what a crash keeps).
    synced: AtomicUsize,
}

fn words_for(regions: usize) -> usize {
    regions.div_ceil(64)
}

impl RegionBitmap {
    pub fn in_memory(regions: usize) -> RegionBitmap {
        RegionBitmap { words: (0..words_for(regions)).map(|_| AtomicU64::new(0)).collect(), regions, file: None, writer: Mutex::new(()), synced: AtomicUsize::new(0) }
    }

    /// Opens (or creates, all clear) the bitmap at `path`. A file of the
    /// wrong length cannot be trusted: every bit is then set, so that
    /// whatever it tracked is treated as changed.
    pub fn open(path: &Path, regions: usize) -> io::Result<RegionBitmap> {
        let existed = path.exists();
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        let n = words_for(regions);
        let mut raw = vec![0u8; n * 8];
        let len = file.metadata()?.len();
        let all = if existed && len != raw.len() as u64 {
            tracing::warn!(path = %path.display(), len, expected = raw.len(), "bitmap has the wrong size; treating every region as set");
            true
        } else {
            if existed {
                file.read_exact_at(&mut raw, 0)?;
            }
            false
        };
        let words = raw
            .chunks(8)
            .map(|c| AtomicU64::new(if all { u64::MAX } else { u64::from_le_bytes(c.try_into().expect("8 bytes")) }))
            .collect();
        let bitmap = RegionBitmap { words, regions, file: Some((path.to_path_buf(), file)), writer: Mutex::new(()), synced: AtomicUsize::new(0) };
        bitmap.mask_tail();
        bitmap.synced.store(bitmap.count(), SeqCst);
        if !existed || all {
            bitmap.write_words(0..n)?;
            bitmap.file_sync()?;
        }
        Ok(bitmap)
    }

    /// Bits past `regions` in the last word stay clear.
    fn mask_tail(&self) {
        if !self.regions.is_multiple_of(64) {
            if let Some(last) = self.words.last() {
                last.fetch_and((1u64 << (self.regions % 64)) - 1, SeqCst);
            }
        }
    }

    pub fn regions(&self) -> usize {
        self.regions
    }

    pub fn path(&self) -> Option<&Path> {
        self.file.as_ref().map(|(p, _)| p.as_path())
    }

    pub fn get(&self, r: usize) -> bool {
        r < self.regions && self.words[r / 64].load(SeqCst) & (1 << (r % 64)) != 0
    }

    pub fn any(&self, rs: Range<usize>) -> bool {
        rs.into_iter().any(|r| self.get(r))
    }

    pub fn all(&self, rs: Range<usize>) -> bool {
        rs.into_iter().all(|r| self.get(r))
    }

    fn masks(rs: Range<usize>) -> impl Iterator<Item = (usize, u64)> {
        rs.map(|r| (r / 64, 1u64 << (r % 64)))
    }

    /// Sets `rs` and returns once they are on disk; only then are they
    /// visible to [`get`](Self::get).
    pub fn set_durable(&self, rs: Range<usize>) -> io::Result<()> {
        let rs = rs.start.min(self.regions)..rs.end.min(self.regions);
        if self.all(rs.clone()) {
            return Ok(());
        }
        let _w = lock(&self.writer);
        if self.all(rs.clone()) {
            return Ok(());
        }
        if let Some((_, file)) = &self.file {
            let (first, last) = (rs.start / 64, (rs.end - 1) / 64);
            let mut raw = Vec::with_capacity((last - first + 1) * 8);
            for w in first..=last {
                let mut word = self.words[w].load(SeqCst);
                for (mw, m) in Self::masks(rs.clone()) {
                    if mw == w {
                        word |= m;
                    }
                }
                raw.extend_from_slice(&word.to_le_bytes());
            }
            file.write_all_at(&raw, first as u64 * 8)?;
            file.sync_data()?;
        }
        for (w, m) in Self::masks(rs) {
            self.words[w].fetch_or(m, SeqCst);
        }
        Ok(())
    }

    /// Sets `rs` in memory; on disk at the next [`sync`](Self::sync).
    pub fn set_volatile(&self, rs: Range<usize>) {
        for (w, m) in Self::masks(rs.start.min(self.regions)..rs.end.min(self.regions)) {
            self.words[w].fetch_or(m, SeqCst);
        }
    }

    /// Clears `r` in memory. Whoever clears bits of a durable bitmap holds
    /// [`writer`](Self::writer) so that no durable set runs meanwhile.
    pub fn clear(&self, r: usize) {
        if r < self.regions {
            self.words[r / 64].fetch_and(!(1 << (r % 64)), SeqCst);
        }
    }

    pub fn clear_all(&self) {
        for w in &self.words {
            w.store(0, SeqCst);
        }
    }

    /// Excludes durable sets while bits are cleared and written back.
    pub fn writer(&self) -> MutexGuard<'_, ()> {
        lock(&self.writer)
    }

    fn write_words(&self, ws: Range<usize>) -> io::Result<()> {
        if let Some((_, file)) = &self.file {
            let raw: Vec<u8> = ws.clone().flat_map(|w| self.words[w].load(SeqCst).to_le_bytes()).collect();
            file.write_all_at(&raw, ws.start as u64 * 8)?;
        }
        Ok(())
    }

    fn file_sync(&self) -> io::Result<()> {
        match &self.file {
            Some((_, file)) => file.sync_data(),
            None => Ok(()),
        }
    }

    /// Writes the whole bitmap, without waiting for the disk (after
    /// clearing: losing it only resyncs more).
    pub fn write_back(&self) -> io::Result<()> {
        self.write_words(0..self.words.len())
    }

    /// Writes the whole bitmap and waits until it is on disk.
    pub fn sync(&self) -> io::Result<()> {
        let _w = lock(&self.writer);
        let count = self.count();
        self.write_words(0..self.words.len())?;
        self.file_sync()?;
        self.synced.store(count, SeqCst);
        Ok(())
    }

    /// Set bits as of the last sync (or open).
    pub fn synced_count(&self) -> usize {
        self.synced.load(SeqCst)
    }

    pub fn count(&self) -> usize {
        self.words.iter().map(|w| w.load(SeqCst).count_ones() as usize).sum()
    }

    /// The set regions, in order.
    pub fn iter_set(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.regions).filter(|r| self.get(*r))
    }

    /// Copies every set bit of `other` into this one (volatile).
    pub fn union_from(&self, other: &RegionBitmap) {
        for (a, b) in self.words.iter().zip(&other.words) {
            a.fetch_or(b.load(SeqCst), SeqCst);
        }
    }

    /// Removes the file (the bitmap stays usable in memory).
    pub fn remove_file(&self) -> io::Result<()> {
        match &self.file {
            Some((path, _)) => match std::fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durable_bits_survive_reopen_and_bad_sizes_mean_all_set() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.bits");
        let b = RegionBitmap::open(&path, 100).unwrap();
        assert_eq!(b.count(), 0);
        b.set_durable(3..5).unwrap();
        b.set_durable(70..71).unwrap();
        b.set_volatile(90..91);
        assert!(b.get(3) && b.get(4) && !b.get(5) && b.get(70) && b.get(90));
        drop(b);
        let b = RegionBitmap::open(&path, 100).unwrap();
        assert_eq!(b.iter_set().collect::<Vec<_>>(), vec![3, 4, 70], "volatile bits are not on disk without sync");
        b.set_volatile(90..91);
        b.sync().unwrap();
        let _w = b.writer();
        b.clear(3);
        b.write_back().unwrap();
        drop(_w);
        let b = RegionBitmap::open(&path, 100).unwrap();
        assert_eq!(b.iter_set().collect::<Vec<_>>(), vec![4, 70, 90]);
        let wrong = RegionBitmap::open(&path, 200).unwrap();
        assert_eq!(wrong.count(), 200, "a bitmap of another size is not trusted");
    }

    #[test]
    fn concurrent_durable_sets_all_land_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.bits");
        let b = std::sync::Arc::new(RegionBitmap::open(&path, 256).unwrap());
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let b = b.clone();
                std::thread::spawn(move || (0..32).for_each(|i| b.set_durable(t * 32 + i..t * 32 + i + 1).unwrap()))
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(b.count(), 256);
        assert_eq!(RegionBitmap::open(&path, 256).unwrap().count(), 256, "every bit seen set is on disk");
    }

    #[test]
    fn out_of_range_is_ignored() {
        let b = RegionBitmap::in_memory(10);
        b.set_durable(8..20).unwrap();
        assert_eq!(b.count(), 2);
        assert!(!b.get(15));
    }
}
