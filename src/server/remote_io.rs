//! READs and WRITEs whose one piece another cluster node serves (a remote
//! target) are sent from the connection's reader and answered from the
//! forwarding link's reader: no I/O thread parks for the round trip, and
//! the request costs two thread hand-offs fewer than on the pool. What
//! cannot go this way (no open link, a lost link, limits) runs on the
//! blocking pool as before, where the remote client dials, resends and
//! fails over within its bound; the gate ticket stays held throughout.

use super::execute::{execute, finish, reply_error, reply_read, Admitted, ConnectionCtx};
use super::outgoing::never_waiting;
use crate::nbd::*;
use crate::volume::target::{within, OnStarted, Started};
use crate::volume::{Route, Ticket};
use bytes::Bytes;
use std::sync::Arc;

/// The route of `req` if it is a READ or WRITE lying whole in one piece
/// that goes to another node.
pub(super) fn whole_remote_route(ctx: &ConnectionCtx, req: &RequestHeader) -> Option<Route> {
    if !matches!(req.command, CMD_READ | CMD_WRITE) || req.length == 0 || !ctx.volume.forwards_any() {
        return None;
    }
    let route = ctx.volume.route(req.offset, req.length as u64);
    let whole = matches!(route.pieces.as_slice(), [p] if p.length == req.length as u64 && route.translation.forwards(p));
    whole.then_some(route)
}

/// Sends `req` (admitted: `ticket`) through `route`'s remote target.
pub(super) fn start(ctx: Arc<ConnectionCtx>, req: RequestHeader, payload: Bytes, permit: Admitted, ticket: Ticket, route: Route) {
    if !ctx.fence.is_open() {
        // `execute` closes the connection without running it.
        return execute(ctx, req, payload, permit, Some(ticket));
    }
    let piece = route.pieces[0];
    let translation = route.translation;
    let write = (req.command == CMD_WRITE).then(|| (payload.clone(), req.flags & CMD_FLAG_FUA != 0));
    // Runs on the link's reader, which answers every connection using the
    // link: it never waits for a client's socket.
    let done: OnStarted = Box::new(move |started| match started {
        Started::Done(result) => {
            drop(ticket);
            cork_until_wait(&ctx);
            never_waiting(|| match (req.command, result) {
                (CMD_READ, Ok(data)) => reply_read(&ctx, &req, Bytes::from(data), permit),
                (CMD_READ, Err(e)) => reply_error(&ctx, &req, NbdError::from_io(&e), &format!("READ: {e}"), permit),
                (_, result) => finish(&ctx, &req, result.map(drop), permit),
            })
        }
        // Within the bound it had since it was started, not a new one.
        Started::Resend { deadline } => {
            let pool = Arc::clone(&ctx.pools.blocking);
            pool.spawn(move || within(deadline, || execute(ctx, req, payload, permit, Some(ticket))));
        }
    });
    translation.start_forwarded(&piece, write.as_ref().map(|(data, fua)| (&data[..], *fua)), done);
}

/// Holds the replies the link's reader writes to `ctx`'s client back
/// until that reader has no more replies buffered (up to the sink's cork
/// limit): several replies then leave in one write and one wakeup of the
/// client. A thread that does not run deferred work writes at once.
fn cork_until_wait(ctx: &Arc<ConnectionCtx>) {
    let later = Arc::clone(ctx);
    if crate::sync::defer_until_wait(move || never_waiting(|| later.sink.uncork())) {
        ctx.sink.cork();
    }
}
