//! Running one admitted request: translate it through the volume, run
//! its pieces (in parallel when it crosses extents), queue the reply on the
//! sink. Called inline by the reader or on a pool thread; the reader side
//! (decoding, checks, budget, gate) is in `connection.rs`.

use super::budget::Permit;
use super::buffers::Buffer;
use super::meta::{dirty_descriptors, Context, MetaContexts};
use super::pool::{Pools, WorkerPool};
use super::sink::{Reply, ReplySink};
use crate::backend::ZeroMode;
use crate::nbd::*;
use crate::volume::{Op, Route, Stamp, Ticket, Volume};
use bytes::Bytes;
use std::io;
use std::sync::Arc;

/// What every admitted request carries to its reply: its budget permit and
/// when it was admitted. Whichever path produces the reply records the
/// request in the volume's counters first (so a client that has its reply
/// sees it counted), then sends it.
pub(super) struct Admitted {
    pub(super) permit: Permit,
    pub(super) started: Stamp,
}

impl Admitted {
    /// Counts the request (op, result, bytes, duration) and hands back the
    /// permit for its reply.
    fn done(self, ctx: &ConnectionCtx, req: &RequestHeader, ok: bool) -> Option<Permit> {
        ctx.volume.counters().completed(op_of(req.command), ok, req.length as u64, self.started);
        Some(self.permit)
    }
}

/// The counters' name for an NBD command.
fn op_of(command: u16) -> Op {
    match command {
        CMD_READ => Op::Read,
        CMD_WRITE => Op::Write,
        CMD_FLUSH => Op::Flush,
        CMD_TRIM => Op::Trim,
        CMD_WRITE_ZEROES => Op::WriteZeroes,
        CMD_CACHE => Op::Cache,
        CMD_BLOCK_STATUS => Op::BlockStatus,
        _ => Op::Unknown,
    }
}

/// What every request of a connection needs, shared with pool jobs.
pub(super) struct ConnectionCtx {
    pub(super) volume: Arc<Volume>,
    pub(super) structured: bool,
    /// The volume's own setting, or `read_only_for` this client.
    pub(super) read_only: bool,
    /// The metadata contexts BLOCK_STATUS answers for.
    pub(super) meta: MetaContexts,
    pub(super) sink: ReplySink,
    pub(super) pools: Arc<Pools>,
    /// Spreads this connection's gate registrations over the gate's shards.
    pub(super) shard: usize,
    /// Largest READ/WRITE accepted (`ConnLimits::max_request`).
    pub(super) max_request: u32,
    /// Past its deadline no request runs (`fence.rs`).
    pub(super) fence: Arc<super::ServeFence>,
    /// The generation a forwarding cluster node routed this connection's
    /// requests with (`forwarded.rs`); `None` for every other client.
    pub(super) stamp: Option<u64>,
}

impl ConnectionCtx {
    /// The pool for `command` on this volume now (see [`Pools`]).
    ///
    /// Forwarded requests (a stamped connection) always take the CPU pool:
    /// they touch only stores this node reaches, and on the blocking pool
    /// they could queue behind this node's own requests that wait on the
    /// forwarding node, which may be waiting on us in turn (two nodes that
    /// each forward to the other).
    pub(super) fn pool_for(&self, command: u16) -> &Arc<WorkerPool> {
        if self.stamp.is_some() || (matches!(command, CMD_READ | CMD_WRITE) && !self.volume.translation().may_block()) {
            &self.pools.cpu
        } else {
            &self.pools.blocking
        }
    }
}

/// Most descriptors in one block-status chunk (per context).
const MAX_DESCRIPTORS: usize = 16 * 1024;

pub(super) fn reply_error(ctx: &ConnectionCtx, req: &RequestHeader, err: NbdError, msg: &str, admitted: Admitted) {
    tracing::debug!(command = command_name(req.command), offset = req.offset, length = req.length, error = err.name(), msg, "request failed");
    let bytes = if ctx.structured {
        chunk_error(req.cookie, err.code(), msg)
    } else {
        simple_reply(req.cookie, err.code()).to_vec()
    };
    ctx.sink.send(Reply::new(bytes, admitted.done(ctx, req, false)));
}

pub(super) fn reply_ok(ctx: &ConnectionCtx, req: &RequestHeader, admitted: Admitted) {
    ctx.sink.send(Reply::new(simple_reply(req.cookie, 0).to_vec(), admitted.done(ctx, req, true)));
}

pub(super) fn finish(ctx: &ConnectionCtx, req: &RequestHeader, result: io::Result<()>, permit: Admitted) {
    match result {
        Ok(()) => reply_ok(ctx, req, permit),
        Err(e) => reply_error(ctx, req, NbdError::from_io(&e), &format!("{}: {e}", command_name(req.command)), permit),
    }
}

/// The first error of a set of piece results.
fn first_error(results: Vec<io::Result<()>>) -> io::Result<()> {
    results.into_iter().collect()
}

/// Whether a request reaches past the end of the table it was routed on:
/// checked against the export's size when it arrived, it may have been
/// held by a swap that shrank the volume (pool volumes), and the smaller
/// table's pieces would not cover it. Answered like any request past the
/// end.
fn past_end(route: &Route, req: &RequestHeader) -> Option<NbdError> {
    let end = req.offset.saturating_add(req.length as u64);
    (end > route.translation.table().size()).then_some(if req.command == CMD_WRITE { NbdError::NoSpc } else { NbdError::Inval })
}

/// Runs on an I/O thread. `ticket` is the request's gate admission; it is
/// dropped once the request's I/O is done.
pub(super) fn execute(ctx: Arc<ConnectionCtx>, req: RequestHeader, payload: Bytes, permit: Admitted, ticket: Option<Ticket>) {
    if !ctx.fence.is_open() {
        // Checked here, where every path (inline, pool, released from a
        // hold) runs a request. The socket closes before the "reply", so
        // the client sees a dead server, not an error, and resends.
        tracing::warn!("request not run: this cluster node is fenced; closing the connection");
        ctx.sink.close();
        drop(ticket);
        return reply_error(&ctx, &req, NbdError::Shutdown, "fenced", permit);
    }
    let fua = req.flags & CMD_FLAG_FUA != 0;
    match req.command {
        CMD_READ => read(ctx, req, permit, ticket),
        CMD_FLUSH => {
            let result = ctx.volume.flush();
            finish(&ctx, &req, result, permit);
        }
        CMD_BLOCK_STATUS => {
            block_status(&ctx, &req, permit);
            drop(ticket);
        }
        CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES | CMD_CACHE => {
            let route = Arc::new(ctx.volume.route(req.offset, req.length as u64));
            if let Some(err) = past_end(&route, &req) {
                drop(ticket);
                return reply_error(&ctx, &req, err, "past the end of the export (it shrank)", permit);
            }
            let mode = ZeroMode { may_trim: req.flags & CMD_FLAG_NO_HOLE == 0, fast_only: req.flags & CMD_FLAG_FAST_ZERO != 0 };
            let work = {
                let route = route.clone();
                move |i: usize| {
                    let piece = &route.pieces[i];
                    let t = &route.translation;
                    match req.command {
                        CMD_WRITE => {
                            let start = piece.request_offset as usize;
                            t.write(piece, &payload[start..start + piece.length as usize], fua)
                        }
                        CMD_TRIM => t.trim(piece, fua),
                        CMD_WRITE_ZEROES => t.write_zeroes(piece, mode, fua),
                        _ => t.cache(piece),
                    }
                }
            };
            // A fast zero over several stores either runs fast everywhere or
            // fails before touching anything (one store failing after another
            // zeroed its part would change the export despite ENOTSUP).
            if req.command == CMD_WRITE_ZEROES
                && mode.fast_only
                && route.pieces.len() > 1
                && !route.pieces.iter().all(|p| route.translation.fast_zero_certain(p, mode))
            {
                drop(ticket);
                return reply_error(&ctx, &req, NbdError::NotSup, "WRITE_ZEROES: fast zeroing is not certain on every store", permit);
            }
            if route.pieces.len() <= 1 {
                let result = if route.pieces.is_empty() { Ok(()) } else { work(0) };
                drop(ticket);
                finish(&ctx, &req, result, permit);
            } else {
                let pool = ctx.pool_for(req.command).clone();
                let n = route.pieces.len();
                pool.fan_out(n, work, move |results| {
                    drop(ticket);
                    finish(&ctx, &req, first_error(results), permit)
                });
            }
        }
        _ => reply_error(&ctx, &req, NbdError::Inval, "unknown command", permit),
    }
}

/// Bytes in front of read data: the reply header.
fn read_prefix(structured: bool) -> usize {
    if structured {
        transmission::OFFSET_DATA_PREFIX
    } else {
        SIMPLE_REPLY_LEN
    }
}

fn write_read_header(ctx: &ConnectionCtx, req: &RequestHeader, out: &mut [u8]) {
    if ctx.structured {
        transmission::write_offset_data_prefix(out, REPLY_FLAG_DONE, req.cookie, req.offset, req.length);
    } else {
        write_simple_reply(out, req.cookie, 0);
    }
}

/// A successful READ's reply: its header and `data`, in one writev.
pub(super) fn reply_read(ctx: &ConnectionCtx, req: &RequestHeader, data: Bytes, permit: Admitted) {
    let mut header = vec![0u8; read_prefix(ctx.structured)];
    write_read_header(ctx, req, &mut header);
    ctx.sink.send(Reply { parts: vec![Bytes::from(header), data], permit: permit.done(ctx, req, true) });
}

pub(super) fn read(ctx: Arc<ConnectionCtx>, req: RequestHeader, permit: Admitted, ticket: Option<Ticket>) {
    let route = ctx.volume.route(req.offset, req.length as u64);
    if let Some(err) = past_end(&route, &req) {
        drop(ticket);
        return reply_error(&ctx, &req, err, "past the end of the export (it shrank)", permit);
    }
    let prefix = read_prefix(ctx.structured);
    if route.pieces.len() == 1 {
        // Common case: one page-aligned buffer read in place, sent after
        // the header in the same writev.
        let mut buf = Buffer::take(req.length as usize);
        let result = route.translation.read(&route.pieces[0], &mut buf);
        drop(ticket);
        match result {
            Ok(()) => reply_read(&ctx, &req, Bytes::from(buf), permit),
            Err(e) => reply_error(&ctx, &req, NbdError::from_io(&e), &format!("READ: {e}"), permit),
        }
        return;
    }
    let route: Arc<Route> = Arc::new(route);
    let pool = ctx.pool_for(CMD_READ).clone();
    let n = route.pieces.len();
    let work = {
        let route = route.clone();
        move |i: usize| -> io::Result<Bytes> {
            let piece = &route.pieces[i];
            let mut buf = Buffer::take(piece.length as usize);
            route.translation.read(piece, &mut buf)?;
            Ok(Bytes::from(buf))
        }
    };
    pool.fan_out(n, work, move |results| {
        drop(ticket);
        let mut parts = Vec::with_capacity(results.len() + 1);
        let mut header = vec![0u8; prefix];
        write_read_header(&ctx, &req, &mut header);
        parts.push(Bytes::from(header));
        for r in results {
            match r {
                Ok(b) => parts.push(b),
                Err(e) => return reply_error(&ctx, &req, NbdError::from_io(&e), &format!("READ: {e}"), permit),
            }
        }
        ctx.sink.send(Reply { parts, permit: permit.done(&ctx, &req, true) });
    });
}

/// One chunk per selected context, in selection order, sent as one reply.
/// Everything is gathered first so that a failure answers a single error
/// chunk instead of a half-sent set of chunks.
pub(super) fn block_status(ctx: &ConnectionCtx, req: &RequestHeader, permit: Admitted) {
    let req_one = req.flags & CMD_FLAG_REQ_ONE != 0;
    let max = if req_one { 1 } else { MAX_DESCRIPTORS };
    let mut chunks = Vec::with_capacity(ctx.meta.selected.len());
    for (id, context) in &ctx.meta.selected {
        let descriptors = match context {
            Context::BaseAllocation => match allocation_descriptors(ctx, req, max) {
                Ok(d) => d,
                Err(e) => return reply_error(ctx, req, NbdError::from_io(&e), &format!("BLOCK_STATUS: {e}"), permit),
            },
            Context::DirtyBitmap(name) => {
                let runs = ctx.volume.dirty_runs(name, req.offset, req.length as u64, max);
                dirty_descriptors(runs.as_deref(), req.length, max)
            }
            // A stamp says nothing about the data, but proto.md wants one
            // chunk per selected context.
            Context::Stamp(_) => vec![Descriptor { length: req.length, flags: 0 }],
        };
        chunks.push((*id, descriptors));
    }
    ctx.sink.send(Reply::new(block_status_reply(req.cookie, &chunks), permit.done(ctx, req, true)));
}

/// base:allocation of the request's range through the table.
fn allocation_descriptors(ctx: &ConnectionCtx, req: &RequestHeader, max: usize) -> io::Result<Vec<Descriptor>> {
    let route = ctx.volume.route(req.offset, req.length as u64);
    if past_end(&route, req).is_some() {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut descriptors: Vec<Descriptor> = Vec::new();
    for piece in &route.pieces {
        let runs = route.translation.block_status(piece, max)?;
        let mut covered = 0;
        for run in runs {
            covered += run.length;
            let flags = if run.hole { STATE_HOLE | STATE_ZERO } else { 0 };
            match descriptors.last_mut() {
                Some(last) if last.flags == flags => last.length += run.length as u32,
                _ => descriptors.push(Descriptor { length: run.length as u32, flags }),
            }
        }
        // Stop when the store reported only part of the piece, or we have
        // as many descriptors as we may send: the client asks again.
        if covered < piece.length || descriptors.len() >= max {
            break;
        }
    }
    descriptors.truncate(max);
    Ok(descriptors)
}
