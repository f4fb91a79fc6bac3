use super::mirror::Mirror;
use crate::backend::{Allocation, Backend, ZeroMode};
use crate::map::{MappingTable, Piece, Target};
use std::collections::HashMap;
use std::io;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum TranslateError {
    #[error("extent {index}: store '{store}' is not open")]
    MissingStore { index: usize, store: String },
}

/// One generation of a volume's mapping with its stores opened, and the
/// write mirror of a migration in progress, if any.
#[derive(Debug, Clone)]
pub struct Translation {
    table: MappingTable,
    /// Per extent: the store handle, `None` for a zero extent.
    targets: Vec<Option<Arc<dyn Backend>>>,
    /// Each distinct store once, for flush.
    stores: Vec<Arc<dyn Backend>>,
    min_io: u32,
    rotational: bool,
    /// Some store may block for long: never run I/O inline on a reader.
    may_block: bool,
    mirror: Option<Arc<Mirror>>,
}

impl Translation {
    pub fn new(table: MappingTable, stores: &HashMap<String, Arc<dyn Backend>>) -> Result<Translation, TranslateError> {
        let mut targets = Vec::with_capacity(table.extents().len());
        let mut distinct: Vec<Arc<dyn Backend>> = Vec::new();
        for (index, extent) in table.extents().iter().enumerate() {
            match &extent.target {
                Target::Zero => targets.push(None),
                Target::Store { store, .. } => {
                    let backend =
                        stores.get(store).ok_or_else(|| TranslateError::MissingStore { index, store: store.clone() })?;
                    if !distinct.iter().any(|b| Arc::ptr_eq(b, backend)) {
                        distinct.push(backend.clone());
                    }
                    targets.push(Some(backend.clone()));
                }
            }
        }
        let min_io = distinct.iter().map(|b| b.info().min_io).max().unwrap_or(1);
        let rotational = distinct.iter().any(|b| b.info().rotational);
        let may_block = distinct.iter().any(|b| b.may_block());
        Ok(Translation { table, targets, stores: distinct, min_io, rotational, may_block, mirror: None })
    }

    /// The same table with `mirror` attached (or detached).
    pub fn with_mirror(&self, mirror: Option<Arc<Mirror>>) -> Translation {
        Translation { mirror, ..self.clone() }
    }

    pub fn mirror(&self) -> Option<&Arc<Mirror>> {
        self.mirror.as_ref()
    }

    pub fn table(&self) -> &MappingTable {
        &self.table
    }

    /// The smallest I/O unit every store accepts (1 unless O_DIRECT).
    pub fn min_io(&self) -> u32 {
        self.min_io
    }

    pub fn rotational(&self) -> bool {
        self.rotational
    }

    /// Whether I/O through this table may block for long (see `Backend::may_block`),
    /// counting a migration destination too.
    pub fn may_block(&self) -> bool {
        self.may_block || self.mirror.as_ref().is_some_and(|m| m.dest().may_block())
    }

    pub fn stores(&self) -> &[Arc<dyn Backend>] {
        &self.stores
    }

    /// Flushes every store, and a migration's destination: a mirrored write
    /// is answered only once it is on both, so FLUSH must cover both.
    pub fn flush(&self) -> io::Result<()> {
        for store in &self.stores {
            store.flush()?;
        }
        if let Some(m) = &self.mirror {
            if !m.is_disabled() {
                m.dest().flush()?;
            }
        }
        Ok(())
    }

    /// Runs a change through the mirror when one covers the piece.
    fn mirrored(
        &self,
        piece: &Piece,
        source: impl FnOnce() -> io::Result<()>,
        dest_op: impl Fn(&dyn Backend, u64, u64, u64) -> io::Result<()>,
    ) -> io::Result<()> {
        match &self.mirror {
            Some(m) => m.change(piece.volume_offset, piece.length, source, dest_op),
            None => source(),
        }
    }

    fn target(&self, piece: &Piece) -> Option<&Arc<dyn Backend>> {
        self.targets[piece.extent].as_ref()
    }

    pub fn read(&self, piece: &Piece, buf: &mut [u8]) -> io::Result<()> {
        match self.target(piece) {
            Some(store) => store.read_at(buf, piece.target_offset),
            None => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    pub fn write(&self, piece: &Piece, data: &[u8], fua: bool) -> io::Result<()> {
        let source = || match self.target(piece) {
            Some(store) => store.write_at(data, piece.target_offset, fua),
            // A zero extent has nowhere to keep data; zeros are already there.
            None if data.iter().all(|b| *b == 0) => Ok(()),
            None => Err(io::Error::from_raw_os_error(libc::ENOSPC)),
        };
        self.mirrored(piece, source, |dest, off, start, len| dest.write_at(&data[start as usize..(start + len) as usize], off, fua))
    }

    pub fn trim(&self, piece: &Piece, fua: bool) -> io::Result<()> {
        let source = || match self.target(piece) {
            Some(store) => store.trim(piece.target_offset, piece.length, fua),
            None => Ok(()),
        };
        // Trimmed source data reads back as zeros on files; keep the copy
        // identical by zeroing (punching) the destination.
        let zero = ZeroMode { may_trim: true, fast_only: false };
        self.mirrored(piece, source, |dest, off, _, len| dest.write_zeroes(off, len, zero, fua))
    }

    pub fn write_zeroes(&self, piece: &Piece, mode: ZeroMode, fua: bool) -> io::Result<()> {
        let source = || match self.target(piece) {
            Some(store) => store.write_zeroes(piece.target_offset, piece.length, mode, fua),
            None => Ok(()),
        };
        let dest_mode = ZeroMode { fast_only: false, ..mode };
        self.mirrored(piece, source, |dest, off, _, len| dest.write_zeroes(off, len, dest_mode, fua))
    }

    /// See `Backend::fast_zero_certain`; zero extents are trivially fast.
    pub fn fast_zero_certain(&self, piece: &Piece, mode: ZeroMode) -> bool {
        self.target(piece).is_none_or(|store| store.fast_zero_certain(mode))
    }

    pub fn block_status(&self, piece: &Piece, max_runs: usize) -> io::Result<Vec<Allocation>> {
        match self.target(piece) {
            Some(store) => store.block_status(piece.target_offset, piece.length, max_runs),
            None => Ok(vec![Allocation { length: piece.length, hole: true }]),
        }
    }

    pub fn cache(&self, piece: &Piece) -> io::Result<()> {
        match self.target(piece) {
            Some(store) => store.cache(piece.target_offset, piece.length),
            None => Ok(()),
        }
    }
}

/// A request translated against one translation: the pieces, and the
/// translation they were computed with (kept alive while they run).
#[derive(Debug, Clone)]
pub struct Route {
    pub translation: Arc<Translation>,
    pub pieces: Vec<Piece>,
}

impl Route {
    pub fn new(translation: Arc<Translation>, offset: u64, length: u64) -> Route {
        let pieces = translation.table().pieces(offset, length).collect();
        Route { translation, pieces }
    }
}
