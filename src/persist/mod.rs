//! Durable record of each volume's mapping in force, under `state_dir`:
//!
//! ```text
//! STATE_DIR/volumes/NAME/current.json          the committed generation
//! STATE_DIR/volumes/NAME/history/GEN.json      every generation ever committed
//! ```
//!
//! A commit is split so that the part done while I/O is paused is short:
//! [`StateDir::prepare`] writes `current.json.tmp` and fsyncs it (before the
//! pause); [`StateDir::commit_prepared`] renames it over `current.json` and
//! fsyncs the directory (while paused); [`StateDir::archive`] then writes the
//! history copy. A crash at any point leaves `current.json` naming exactly
//! one complete generation: the old one until the rename is durable, the new
//! one after. The history is an archive for operators, never read to decide
//! what is in force.

mod generation;

pub use generation::GenerationCommit;

use crate::api::GenerationRecord;
use crate::map::{Extent, MappingTable};
use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Reading persisted state failed.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// The file is not there (e.g. a generation never archived).
    #[error("{}: not found", path.display())]
    NotFound { path: PathBuf },
    /// The file is there but does not parse.
    #[error("{}: corrupt state: {source}", path.display())]
    Corrupt { path: PathBuf, source: serde_json::Error },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
}

impl PersistError {
    fn io(path: &Path, source: io::Error) -> PersistError {
        match source.kind() {
            io::ErrorKind::NotFound => PersistError::NotFound { path: path.to_path_buf() },
            _ => PersistError::Io { path: path.to_path_buf(), source },
        }
    }
}

/// Reads and parses one JSON file of the state directory.
fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, PersistError> {
    let bytes = fs::read(path).map_err(|e| PersistError::io(path, e))?;
    serde_json::from_slice(&bytes).map_err(|source| PersistError::Corrupt { path: path.to_path_buf(), source })
}

/// A committed generation as persisted in the state directory is exactly
/// what `history` answers: one type, `api::GenerationRecord`.
impl GenerationRecord {
    /// The record of `table` as a committed generation of `volume`, now:
    /// the one place a record is built from a table.
    pub fn new(volume: &str, table: &MappingTable, config_extents: &[Extent], reason: &str) -> GenerationRecord {
        GenerationRecord {
            volume: volume.into(),
            generation: table.generation(),
            extents: table.extents().to_vec(),
            config_extents: config_extents.to_vec(),
            reason: reason.into(),
            committed_at: now_secs(),
        }
    }

    pub fn has_runtime_changes(&self) -> bool {
        self.extents != self.config_extents
    }
}

#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

fn context(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

fn write_durably(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = OpenOptions::new().write(true).create(true).truncate(true).open(path).map_err(|e| context(path, e))?;
    f.write_all(bytes).map_err(|e| context(path, e))?;
    f.sync_all().map_err(|e| context(path, e))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| context(dir, e))
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl StateDir {
    pub fn open(root: &Path) -> io::Result<StateDir> {
        fs::create_dir_all(root.join("volumes")).map_err(|e| context(root, e))?;
        Ok(StateDir { root: root.to_path_buf() })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn volume_dir(&self, volume: &str) -> PathBuf {
        self.root.join("volumes").join(volume)
    }

    /// The committed record of `volume`, if it was ever committed.
    pub fn load(&self, volume: &str) -> Result<Option<GenerationRecord>, PersistError> {
        match read_json(&self.volume_dir(volume).join("current.json")) {
            Ok(record) => Ok(Some(record)),
            Err(PersistError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Makes `record` the committed generation of its volume, durably
    /// (all three steps at once).
    pub fn commit(&self, record: &GenerationRecord) -> io::Result<()> {
        self.prepare(record)?;
        self.commit_prepared(&record.volume)?;
        self.archive(record)
    }

    /// Writes `record` next to the committed one, durably, without making
    /// it current.
    pub fn prepare(&self, record: &GenerationRecord) -> io::Result<()> {
        let dir = self.volume_dir(&record.volume);
        fs::create_dir_all(&dir).map_err(|e| context(&dir, e))?;
        let bytes = serde_json::to_vec_pretty(record).map_err(io::Error::other)?;
        write_durably(&dir.join("current.json.tmp"), &bytes)
    }

    /// Makes the prepared record current: rename, then fsync the directory.
    pub fn commit_prepared(&self, volume: &str) -> io::Result<()> {
        let dir = self.volume_dir(volume);
        let current = dir.join("current.json");
        fs::rename(dir.join("current.json.tmp"), &current).map_err(|e| context(&current, e))?;
        sync_dir(&dir)
    }

    /// Copies a committed record into the history.
    pub fn archive(&self, record: &GenerationRecord) -> io::Result<()> {
        let history = self.volume_dir(&record.volume).join("history");
        fs::create_dir_all(&history).map_err(|e| context(&history, e))?;
        let bytes = serde_json::to_vec_pretty(record).map_err(io::Error::other)?;
        write_durably(&history.join(format!("{:010}.json", record.generation)), &bytes)?;
        sync_dir(&history)
    }

    /// Writes `value` as JSON to `STATE_DIR/rel` atomically and durably
    /// (temp file, fsync, rename, fsync directory).
    pub fn write_json<T: Serialize>(&self, rel: &Path, value: &T) -> io::Result<()> {
        let path = self.root.join(rel);
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_else(|| self.root.clone());
        fs::create_dir_all(&dir).map_err(|e| context(&dir, e))?;
        let bytes = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
        let tmp = path.with_extension("json.tmp");
        write_durably(&tmp, &bytes)?;
        fs::rename(&tmp, &path).map_err(|e| context(&path, e))?;
        sync_dir(&dir)
    }

    /// `STATE_DIR/rel` parsed, `None` if it does not exist.
    pub fn read_json<T: for<'de> Deserialize<'de>>(&self, rel: &Path) -> Result<Option<T>, PersistError> {
        match read_json(&self.root.join(rel)) {
            Ok(value) => Ok(Some(value)),
            Err(PersistError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every `*.json` under `STATE_DIR/rel`, parsed (name, value).
    pub fn read_json_dir<T: for<'de> Deserialize<'de>>(&self, rel: &Path) -> Result<Vec<(String, T)>, PersistError> {
        let dir = self.root.join(rel);
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(PersistError::io(&dir, e)),
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".json")) else { continue };
            out.push((name.to_string(), read_json(&path)?));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Archived generations of `volume`, oldest first.
    pub fn history(&self, volume: &str) -> io::Result<Vec<u64>> {
        let dir = self.volume_dir(volume).join("history");
        let mut gens = Vec::new();
        match fs::read_dir(&dir) {
            Ok(entries) => {
                for e in entries.flatten() {
                    if let Some(g) = e.file_name().to_str().and_then(|n| n.strip_suffix(".json")).and_then(|n| n.parse().ok()) {
                        gens.push(g);
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(context(&dir, e)),
        }
        gens.sort_unstable();
        Ok(gens)
    }

    /// One archived generation.
    pub fn load_generation(&self, volume: &str, generation: u64) -> Result<GenerationRecord, PersistError> {
        read_json(&self.volume_dir(volume).join("history").join(format!("{generation:010}.json")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::map::TargetSpec;

    #[test]
    fn commit_load_and_history() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        assert_eq!(state.load("v").unwrap(), None);
        let extents = vec![Extent { start: 0, length: 4096, target: TargetSpec::Linear { store: "a".into(), offset: 0 } }];
        let mut rec = GenerationRecord {
            volume: "v".into(),
            generation: 1,
            extents: extents.clone(),
            config_extents: extents,
            reason: "initial".into(),
            committed_at: now_secs(),
        };
        state.commit(&rec).unwrap();
        rec.generation = 2;
        rec.extents[0].target = TargetSpec::Zero;
        state.commit(&rec).unwrap();
        assert_eq!(state.load("v").unwrap(), Some(rec.clone()));
        assert!(rec.has_runtime_changes());
        assert_eq!(state.history("v").unwrap(), vec![1, 2]);
        assert_eq!(state.load_generation("v", 1).unwrap().generation, 1);
        std::fs::write(dir.path().join("volumes/v/current.json"), b"{").unwrap();
        assert!(matches!(state.load("v"), Err(PersistError::Corrupt { .. })));
        assert!(state.load("v").unwrap_err().to_string().contains("corrupt"));
        assert!(matches!(state.load_generation("v", 9), Err(PersistError::NotFound { .. })));
    }
}
