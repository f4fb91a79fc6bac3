//! Volumes: a name, a mapping table and the open stores it points at.
//! Every request is translated here; the server only schedules the pieces.
//!
//! A [`Translation`] pairs one immutable [`MappingTable`] generation with the
//! backend handle of each extent. The volume holds the current translation in
//! an `ArcSwap`: a request loads it once (one atomic load, no lock) and keeps
//! that `Arc` until it completes, so a later swap can never change the
//! translation under an in-flight request.

mod catalog;
mod translation;

pub use catalog::Catalog;
pub use translation::{Route, Translation, TranslateError};

use crate::map::MappingTable;
use arc_swap::ArcSwap;
use std::sync::Arc;

/// Static facts about a volume, fixed for its lifetime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSpec {
    pub name: String,
    pub description: String,
    pub read_only: bool,
    /// Alignment of the mapping and preferred I/O size advertised to clients.
    pub block_size: u32,
}

#[derive(Debug)]
pub struct Volume {
    spec: VolumeSpec,
    current: ArcSwap<Translation>,
}

impl Volume {
    pub fn new(spec: VolumeSpec, translation: Translation) -> Volume {
        Volume { spec, current: ArcSwap::from_pointee(translation) }
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    pub fn spec(&self) -> &VolumeSpec {
        &self.spec
    }

    pub fn size(&self) -> u64 {
        self.current.load().table().size()
    }

    /// The translation in force now. Callers keep the returned `Arc` for the
    /// whole life of a request.
    pub fn translation(&self) -> Arc<Translation> {
        self.current.load_full()
    }

    pub fn table(&self) -> MappingTable {
        self.current.load().table().clone()
    }

    /// Translates `[offset, offset+length)`; the range must already be
    /// checked against `size()`.
    pub fn route(&self, offset: u64, length: u64) -> Route {
        Route::new(self.translation(), offset, length)
    }

    /// Makes every completed write to any store of this volume durable.
    /// Stores are shared by all connections, so this covers writes made
    /// through other connections too (multi-conn consistency).
    pub fn flush(&self) -> std::io::Result<()> {
        self.translation().flush()
    }
}
