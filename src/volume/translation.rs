use super::redundancy::Redundancy;
use super::target::{open_target, Forwarder, OnStarted, Started, Target, TargetCtx, TargetError};
use crate::remote::RemoteStatus;
use crate::backend::{Allocation, Backend, ZeroMode};
use crate::map::{MappingTable, Piece};
use std::collections::HashMap;
use std::io;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
#[error("extent {index}: {source}")]
pub struct TranslateError {
    pub index: usize,
    #[source]
    pub source: TargetError,
}

/// One generation of a volume's mapping with its targets opened.
#[derive(Debug, Clone)]
pub struct Translation {
    table: MappingTable,
    /// Per extent, its open target.
    targets: Vec<Arc<dyn Target>>,
    /// Each distinct store once (for retiring and status).
    stores: Vec<Arc<dyn Backend>>,
    /// Each distinct store of a non-redundant target once: a FLUSH fails
    /// if any of them cannot flush.
    strict_stores: Vec<Arc<dyn Backend>>,
    /// Targets that flush themselves: mirrors (tolerating a lost leg) and
    /// remote targets (FLUSH on the node that has the data).
    self_flushing: Vec<Arc<dyn Target>>,
    min_io: u32,
    rotational: bool,
    /// Some store may block for long: never run I/O inline on a reader.
    may_block: bool,
    /// Some extent goes to another node (asked per request before routing).
    forwards_any: bool,
    /// Targets that may have to wait at times (thin volumes of a pool
    /// short of space): asked per request.
    waiting: Vec<Arc<dyn Target>>,
    /// The volume's legs, intent log and change trackers (shared by every
    /// translation of the volume).
    redundancy: Arc<Redundancy>,
}

impl Translation {
    /// A translation with its own in-memory redundancy state (for volumes
    /// built outside a daemon: tools, tests).
    pub fn new(table: MappingTable, stores: &HashMap<String, Arc<dyn Backend>>) -> Result<Translation, TranslateError> {
        let redundancy = Redundancy::in_memory("", table.size(), crate::map::DEFAULT_REGION);
        Translation::open(table, stores, &redundancy)
    }

    /// Opens every extent's target; mirror targets share `redundancy`.
    pub fn open(
        table: MappingTable,
        stores: &HashMap<String, Arc<dyn Backend>>,
        redundancy: &Arc<Redundancy>,
    ) -> Result<Translation, TranslateError> {
        Translation::open_forwarding(table, stores, redundancy, None)
    }

    /// As `open`; an extent on a store not in `stores` goes to `forward`
    /// (a remote target) instead of failing.
    pub fn open_forwarding(
        table: MappingTable,
        stores: &HashMap<String, Arc<dyn Backend>>,
        redundancy: &Arc<Redundancy>,
        forward: Option<&dyn Forwarder>,
    ) -> Result<Translation, TranslateError> {
        let generation = table.generation();
        let targets = table
            .extents()
            .iter()
            .enumerate()
            .map(|(index, e)| {
                let ctx = TargetCtx { stores, extent_start: e.start, length: e.length, redundancy, generation, forward };
                open_target(&e.target, &ctx).map_err(|source| TranslateError { index, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let distinct = distinct_stores(targets.iter());
        let strict_stores = distinct_stores(targets.iter().filter(|t| !t.redundant()));
        let self_flushing = targets.iter().filter(|t| t.flushes_itself()).cloned().collect();
        let min_io = targets.iter().map(|t| t.min_io()).max().unwrap_or(1);
        let rotational = targets.iter().any(|t| t.rotational());
        let may_block = targets.iter().any(|t| t.may_block());
        let forwards_any = targets.iter().any(|t| t.as_remote().is_some());
        let waiting = targets.iter().filter(|t| t.can_wait()).cloned().collect();
        Ok(Translation {
            table,
            targets,
            stores: distinct,
            strict_stores,
            self_flushing,
            min_io,
            rotational,
            may_block,
            forwards_any,
            waiting,
            redundancy: redundancy.clone(),
        })
    }

    pub fn redundancy(&self) -> &Arc<Redundancy> {
        &self.redundancy
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

    /// Whether I/O through this table may block for long (see
    /// `Backend::may_block`), or may wait now (a thin volume whose pool is
    /// short of space): then it does not run inline or on the CPU pool.
    pub fn may_block(&self) -> bool {
        self.may_block || self.waiting.iter().any(|t| t.may_wait())
    }

    pub fn stores(&self) -> &[Arc<dyn Backend>] {
        &self.stores
    }

    /// Flushes every store; mirrors flush their legs themselves, tolerating
    /// a failed one.
    pub fn flush(&self) -> io::Result<()> {
        for store in &self.strict_stores {
            store.flush()?;
        }
        for target in &self.self_flushing {
            target.flush()?;
        }
        Ok(())
    }

    /// The extents forwarded to another node: (extent index, the stores
    /// it needs, the link's state).
    pub fn forwarding(&self) -> Vec<(usize, Vec<String>, RemoteStatus)> {
        self.targets.iter().enumerate().filter_map(|(i, t)| t.forwarding().map(|(stores, link)| (i, stores, link))).collect()
    }

    fn target(&self, piece: &Piece) -> &dyn Target {
        self.targets[piece.extent].as_ref()
    }

    pub fn read(&self, piece: &Piece, buf: &mut [u8]) -> io::Result<()> {
        self.target(piece).read(piece.extent_offset, buf)
    }

    /// Whether some extent goes to another node.
    pub fn forwards_any(&self) -> bool {
        self.forwards_any
    }

    /// Whether `piece` goes to another node: then `start_forwarded` can
    /// send it without waiting.
    pub fn forwards(&self, piece: &Piece) -> bool {
        self.target(piece).as_remote().is_some()
    }

    /// Starts a READ (`write` None) or WRITE of a piece that `forwards`;
    /// `done` runs with the outcome, `Resend` when the caller must run it
    /// the blocking way (`read`/`write`).
    pub fn start_forwarded(&self, piece: &Piece, write: Option<(&[u8], bool)>, done: OnStarted) {
        let (Some(remote), Ok(length)) = (self.target(piece).as_remote(), u32::try_from(piece.length)) else {
            return done(Started::Resend { deadline: None });
        };
        if write.is_some() {
            if let Err(e) = self.redundancy.track(piece.volume_offset, piece.length) {
                return done(Started::Done(Err(e)));
            }
        }
        remote.start(piece.extent_offset, length, write, done)
    }

    pub fn write(&self, piece: &Piece, data: &[u8], fua: bool) -> io::Result<()> {
        self.redundancy.track(piece.volume_offset, piece.length)?;
        self.target(piece).write(piece.extent_offset, data, fua)
    }

    pub fn trim(&self, piece: &Piece, fua: bool) -> io::Result<()> {
        self.redundancy.track(piece.volume_offset, piece.length)?;
        self.target(piece).trim(piece.extent_offset, piece.length, fua)
    }

    pub fn write_zeroes(&self, piece: &Piece, mode: ZeroMode, fua: bool) -> io::Result<()> {
        self.redundancy.track(piece.volume_offset, piece.length)?;
        self.target(piece).write_zeroes(piece.extent_offset, piece.length, mode, fua)
    }

    /// See `Target::fast_zero_certain`.
    pub fn fast_zero_certain(&self, piece: &Piece, mode: ZeroMode) -> bool {
        self.target(piece).fast_zero_certain(mode)
    }

    pub fn block_status(&self, piece: &Piece, max_runs: usize) -> io::Result<Vec<Allocation>> {
        self.target(piece).block_status(piece.extent_offset, piece.length, max_runs)
    }

    pub fn cache(&self, piece: &Piece) -> io::Result<()> {
        self.target(piece).cache(piece.extent_offset, piece.length)
    }
}

/// Each store of `targets` once, in order.
fn distinct_stores<'a>(targets: impl Iterator<Item = &'a Arc<dyn Target>>) -> Vec<Arc<dyn Backend>> {
    let mut distinct: Vec<Arc<dyn Backend>> = Vec::new();
    for store in targets.flat_map(|t| t.stores()) {
        if !distinct.iter().any(|b| Arc::ptr_eq(b, store)) {
            distinct.push(store.clone());
        }
    }
    distinct
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
