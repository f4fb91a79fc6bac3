//! Where a volume's redundancy state lives on disk, and the atomic
//! write of `legs.json`.

use super::LegRecord;
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LegsFile {
    pub region: u64,
    pub legs: Vec<LegRecord>,
}

pub fn legs_path(dir: &Path) -> PathBuf {
    dir.join("legs.json")
}

pub fn intent_path(dir: &Path) -> PathBuf {
    dir.join("intent.bits")
}

pub fn stale_path(dir: &Path, store: &str) -> PathBuf {
    dir.join(format!("leg-{store}.stale"))
}

pub fn tracker_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.track"))
}

/// Write, fsync, rename, fsync the directory: the old or the new file,
/// never half of one.
pub fn save_legs(dir: &Path, region: u64, legs: &[LegRecord]) -> io::Result<()> {
    let body = serde_json::to_vec_pretty(&LegsFile { region, legs: legs.to_vec() }).map_err(io::Error::other)?;
    let tmp = dir.join("legs.json.tmp");
    let mut f = fs::File::create(&tmp)?;
    f.write_all(&body)?;
    f.sync_all()?;
    fs::rename(&tmp, legs_path(dir))?;
    fs::File::open(dir)?.sync_all()
}

pub fn load_legs(dir: &Path) -> io::Result<Option<LegsFile>> {
    match fs::read(legs_path(dir)) {
        Ok(raw) => serde_json::from_slice(&raw)
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", legs_path(dir).display()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Names of the trackers with a file in `dir`.
pub fn tracker_names(dir: &Path) -> io::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if let Some(stem) = name.strip_suffix(".track") {
            names.push(stem.to_string());
        }
    }
    names.sort();
    Ok(names)
}
