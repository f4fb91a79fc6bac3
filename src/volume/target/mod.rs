//! Open targets: what an extent's spec ([`TargetSpec`]) becomes once its
//! stores are open, like a device-mapper `target_type` instance.
//!
//! Offsets handed to a target are offsets within its extent; the target
//! places them (a linear target adds its store offset). A [`Translation`]
//! holds one `Arc<dyn Target>` per extent, so serving a piece is one dynamic
//! call and nothing in the server knows which kinds of target exist.
//!
//! Adding a target type: a variant (and its checks) in `map::TargetSpec`,
//! one file here, one arm in [`open_target`].
//!
//! [`Translation`]: super::Translation

mod linear;
mod mirror;
mod remote;
mod stripe;
mod thin;
mod zero;

pub use linear::LinearTarget;
pub use mirror::MirrorTarget;
pub use remote::{within, Forwarder, OnStarted, RemoteTarget, Started};
pub use stripe::StripeTarget;
pub use thin::{ChunkMap, ChunkPlace, ThinTarget};
pub use zero::ZeroTarget;

use super::redundancy::Redundancy;
use crate::backend::{Allocation, Backend, ZeroMode};
use crate::map::TargetSpec;
use std::collections::HashMap;
use std::fmt::Debug;
use std::io;
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("store '{store}' is not open")]
    MissingStore { store: String },
    #[error("mirror state: {message}")]
    State { message: String },
    #[error("forwarding: {message}")]
    Forward { message: String },
}

/// What opening a target needs besides its spec.
#[derive(Debug, Clone, Copy)]
pub struct TargetCtx<'a> {
    pub stores: &'a HashMap<String, Arc<dyn Backend>>,
    /// Volume offset of the extent's first byte (bitmaps count regions of
    /// the volume).
    pub extent_start: u64,
    /// Length of the extent.
    pub length: u64,
    pub redundancy: &'a Arc<Redundancy>,
    /// The generation of the table being opened (stamps forwarding).
    pub generation: u64,
    /// Where extents on stores not open here go (a cluster node); `None`:
    /// such an extent is an error.
    pub forward: Option<&'a dyn Forwarder>,
}

/// One extent's mapping, opened. Every offset is within the extent.
pub trait Target: Send + Sync + Debug {
    /// Fills all of `buf` from `offset` or fails.
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// With `fua`, the data is durable when this returns.
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()>;
    fn trim(&self, offset: u64, length: u64, fua: bool) -> io::Result<()>;
    fn write_zeroes(&self, offset: u64, length: u64, mode: ZeroMode, fua: bool) -> io::Result<()>;
    /// Allocation map, at most `max_runs` runs (see `Backend::block_status`).
    fn block_status(&self, offset: u64, length: u64, max_runs: usize) -> io::Result<Vec<Allocation>>;
    /// Prefetch; advisory.
    fn cache(&self, offset: u64, length: u64) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()> {
        self.stores().iter().try_for_each(|s| s.flush())
    }
    /// Whether this target survives the loss of a store (then its own
    /// `flush` decides, and the translation does not flush its stores).
    fn redundant(&self) -> bool {
        false
    }
    /// Whether the translation calls this target's `flush` on FLUSH
    /// (rather than flushing its stores): redundant targets, and those
    /// whose data lives elsewhere.
    fn flushes_itself(&self) -> bool {
        self.redundant()
    }
    /// This target as a remote one (its requests can be started without
    /// waiting); `None` for every target that serves locally.
    fn as_remote(&self) -> Option<&RemoteTarget> {
        None
    }
    /// What a remote target forwards: the stores it needs and the link's
    /// state (status). `None` for every target that serves locally.
    fn forwarding(&self) -> Option<(Vec<String>, crate::remote::RemoteStatus)> {
        None
    }

    /// Smallest I/O unit this target accepts: its stores' largest.
    fn min_io(&self) -> u32 {
        self.stores().iter().map(|s| s.info().min_io).max().unwrap_or(1)
    }
    /// Whether a small I/O may take long (see `Backend::may_block`): if any
    /// of its stores may.
    fn may_block(&self) -> bool {
        self.stores().iter().any(|s| s.may_block())
    }
    /// Whether a request may have to wait now (a thin volume whose pool
    /// is short of space, `on_full = "queue"`): then it runs where waiting
    /// holds up no one else. Asked per request, so it must be cheap.
    fn may_wait(&self) -> bool {
        false
    }
    /// Whether `may_wait` can ever be true (the translation asks only
    /// those targets).
    fn can_wait(&self) -> bool {
        false
    }
    fn rotational(&self) -> bool {
        self.stores().iter().any(|s| s.info().rotational)
    }
    /// Whether fast zeroing in `mode` is certain to succeed, known before
    /// trying (see `Backend::fast_zero_certain`).
    fn fast_zero_certain(&self, mode: ZeroMode) -> bool;
    /// The open stores this target reads and writes (for FLUSH and the
    /// volume's retired list).
    fn stores(&self) -> &[Arc<dyn Backend>];
}

/// Opens `spec` against the open stores.
pub fn open_target(spec: &TargetSpec, ctx: &TargetCtx<'_>) -> Result<Arc<dyn Target>, TargetError> {
    let store = |name: &str| ctx.stores.get(name).cloned().ok_or_else(|| TargetError::MissingStore { store: name.into() });
    if let Some(forward) = ctx.forward {
        let needed: Vec<&str> = spec.store_ranges(ctx.length).into_iter().map(|(s, _)| s).collect();
        if needed.iter().any(|s| !ctx.stores.contains_key(*s)) {
            let export = forward.export_for(ctx.generation, &needed).map_err(|message| TargetError::Forward { message })?;
            return Ok(Arc::new(RemoteTarget::new(export, ctx.extent_start, needed.iter().map(|s| s.to_string()).collect())));
        }
    }
    Ok(match spec {
        TargetSpec::Linear { store: name, offset } => Arc::new(LinearTarget::new(store(name)?, *offset)),
        TargetSpec::Zero => Arc::new(ZeroTarget),
        TargetSpec::Mirror { legs, .. } => {
            let red = ctx.redundancy;
            let mut open = Vec::with_capacity(legs.len());
            for (i, leg) in legs.iter().enumerate() {
                let rs = red.regions_of(ctx.extent_start, ctx.length);
                let state = red.leg_for_target(&leg.store, i == 0, rs).map_err(|e| TargetError::State { message: e.to_string() })?;
                open.push((state, store(&leg.store)?, leg.offset));
            }
            Arc::new(MirrorTarget::new(open, ctx.extent_start, red.clone()))
        }
        TargetSpec::Stripe { members, chunk } => {
            let stores = members.iter().map(|m| store(&m.store)).collect::<Result<Vec<_>, _>>()?;
            Arc::new(StripeTarget::new(stores, members.clone(), *chunk))
        }
        TargetSpec::Thin { .. } => {
            let map = ctx.redundancy.chunk_map().ok_or_else(|| TargetError::State { message: "a thin extent needs its pool's chunk map".into() })?;
            Arc::new(ThinTarget::new(map, ctx.length))
        }
    })
}
