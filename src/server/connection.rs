//! The transmission phase of one connection. A reader thread decodes
//! requests continuously, checks them, and hands each to the I/O pool; the
//! pool translates it through the volume, runs its pieces (in parallel when
//! it crosses extents) and queues the reply on the sink. Replies therefore
//! leave in completion order, not arrival order.

use super::budget::{Budget, Permit};
use super::buffers::{footprint, Buffer};
use super::handshake::Negotiated;
use super::idle_poll::IdlePoll;
use super::pool::Pools;
use super::recv::RecvBuf;
use super::sink::ReplySink;
use super::execute::{execute, reply_error, Admitted, ConnectionCtx};
use super::forwarded::{self, Admission};
use super::remote_io;
use super::request_check::check_request;
use super::stream::Stream;
use crate::nbd::*;
use crate::map::Range;
use bytes::Bytes;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Settings of the transmission phase.
#[derive(Debug, Clone)]
pub struct ConnLimits {
    pub max_inflight_bytes: u64,
    /// Largest READ/WRITE accepted (`server.max_request`, at most
    /// `max_inflight_bytes`); larger ones are answered with an error.
    pub max_request: u32,
    pub max_inflight_requests: u64,
    /// How long a connection keeps answering ESHUTDOWN after a stop request
    /// before it is closed.
    pub shutdown_grace: Duration,
    /// Longest a reader with nothing in flight polls for the next request
    /// before it sleeps in `recv` (see `IdlePoll`).
    pub busy_poll: Duration,
}

/// Read-timeout tick: how often an idle reader looks at the stop flag.
const TICK: Duration = Duration::from_millis(200);

/// The reader's receive buffer (9,000 request headers).
const RECV_BUFFER: usize = 256 * 1024;

pub fn serve(
    id: u64,
    stream: Stream,
    negotiated: Negotiated,
    pools: Arc<Pools>,
    options: &super::ServerOptions,
    stopping: &AtomicBool,
) -> io::Result<()> {
    let limits = &options.limits;
    stream.set_read_timeout(Some(TICK))?;
    // How long a pool thread's reply write may wait for room before the
    // connection's flusher takes over (which then waits up to 60 s).
    stream.set_write_timeout(Some(super::outgoing::WORKER_WAIT))?;
    ReplySink::on_reader_thread();
    // Forwarded requests started here are written before the reader
    // waits (`uncork`), several in one write (`remote/held.rs`).
    crate::sync::runs_deferred_work();
    let stamp = negotiated.meta.stamp();
    let ctx = Arc::new(ConnectionCtx {
        volume: negotiated.volume,
        structured: negotiated.structured,
        read_only: negotiated.read_only,
        meta: negotiated.meta,
        sink: ReplySink::new(stream.try_clone()?, id),
        pools,
        shard: id as usize,
        max_request: limits.max_request,
        fence: options.fence.clone(),
        stamp,
    });
    let _counted = ConnectionCounted::new(&ctx.volume);
    let budget = Budget::new(limits.max_inflight_bytes, limits.max_inflight_requests);
    let mut reader = Reader {
        inner: RecvBuf::new(stream, RECV_BUFFER),
        stopping,
        stop_seen: None,
        grace: limits.shutdown_grace,
        idle_poll: IdlePoll::new(limits.busy_poll),
        sink: &ctx.sink,
    };
    let result = reader_loop(&ctx, &budget, &mut reader);
    uncork(&ctx.sink);
    // Finish what was accepted (DISC, EOF or stop): in-flight requests
    // complete and their replies are sent before the socket closes.
    budget.wait_idle(Duration::from_secs(3600));
    ctx.sink.close();
    result
}

/// Counts the connection in its volume's `connections` gauge for as long as
/// it lives, whichever way `serve` returns.
struct ConnectionCounted(Arc<crate::volume::VolumeStats>);

impl ConnectionCounted {
    fn new(volume: &crate::volume::Volume) -> ConnectionCounted {
        volume.counters().connection_opened();
        ConnectionCounted(volume.counters().clone())
    }
}

impl Drop for ConnectionCounted {
    fn drop(&mut self) {
        self.0.connection_closed();
    }
}

struct Reader<'a> {
    inner: RecvBuf,
    stopping: &'a AtomicBool,
    stop_seen: Option<Instant>,
    grace: Duration,
    idle_poll: IdlePoll,
    /// Uncorked before every read that may sleep (with the forwarded
    /// requests held back, `uncork`): held-back replies must never wait on
    /// the client, who may be waiting on them.
    sink: &'a ReplySink,
}

enum Next {
    Data,
    /// Clean end of stream between requests.
    Eof,
    /// Stopping and the grace period is over.
    Stop,
}

impl Reader<'_> {
    fn stopping(&mut self) -> bool {
        if self.stop_seen.is_none() && self.stopping.load(Ordering::Relaxed) {
            self.stop_seen = Some(Instant::now());
        }
        self.stop_seen.is_some()
    }

    /// Waits for the next request to start arriving.
    fn wait_request(&mut self, budget: &Budget) -> io::Result<Next> {
        // Set when the connection is idle: nothing buffered, nothing in
        // flight, so the wait lasts until the client sends again.
        let mut idle_since = None;
        if self.inner.buffer().is_empty() {
            uncork(self.sink);
            if budget.in_flight() == 0 && !self.inner.get_ref().tls_pending() {
                let since = Instant::now();
                idle_since = Some((since, self.idle_poll.poll(self.inner.get_ref().as_raw_fd())));
            }
        }
        loop {
            match self.inner.fill_buf() {
                Ok([]) => return Ok(Next::Eof),
                Ok(_) => {
                    if let Some((since, polled)) = idle_since {
                        self.idle_poll.record(polled, since.elapsed());
                    }
                    return Ok(Next::Data);
                }
                Err(e) if is_timeout(&e) => {
                    if self.stopping() && budget.in_flight() == 0 && self.stop_seen.is_some_and(|t| t.elapsed() >= self.grace) {
                        return Ok(Next::Stop);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Fills `buf` completely; read timeouts just retry (no byte is lost:
    /// a timed-out read consumes nothing).
    fn read_full(&mut self, buf: &mut [u8]) -> io::Result<()> {
        let mut got = 0;
        while got < buf.len() {
            if self.inner.buffer().is_empty() {
                uncork(self.sink);
            }
            match self.inner.read(&mut buf[got..]) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "client closed mid-request")),
                Ok(n) => got += n,
                Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn discard(&mut self, mut len: u64) -> io::Result<()> {
        let mut scratch = vec![0u8; 64 * 1024];
        while len > 0 {
            let n = len.min(scratch.len() as u64) as usize;
            self.read_full(&mut scratch[..n])?;
            len -= n as u64;
        }
        Ok(())
    }
}

/// Writes the replies and the forwarded requests the reader held back.
fn uncork(sink: &ReplySink) {
    sink.uncork();
    crate::sync::run_deferred();
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

fn reader_loop(ctx: &Arc<ConnectionCtx>, budget: &Arc<Budget>, reader: &mut Reader<'_>) -> io::Result<()> {
    loop {
        match reader.wait_request(budget)? {
            Next::Data => {}
            Next::Eof => {
                tracing::debug!("client closed the connection");
                return Ok(());
            }
            Next::Stop => return Ok(()),
        }
        let mut raw = [0u8; REQUEST_HEADER_LEN];
        reader.read_full(&mut raw)?;
        let req = match decode_request_header(&raw) {
            Ok(r) => r,
            Err(e) => {
                // Framing is lost; nothing sensible can follow.
                tracing::warn!(error = %e, "bad request header; closing connection");
                return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string()));
            }
        };
        if req.command == CMD_DISC {
            tracing::debug!("client sent NBD_CMD_DISC");
            return Ok(());
        }
        // The request's duration (nbdvirt_request_duration_seconds) runs
        // from here to its reply (a TSC read, see volume/stats.rs).
        let started = crate::volume::VolumeStats::now();
        // Payload first, so framing survives whatever we answer.
        let payload_len = req.payload_len();
        let payload = if payload_len > ctx.max_request {
            reader.discard(payload_len as u64)?;
            None
        } else if payload_len > 0 {
            let permit = reader.acquire(budget, footprint(payload_len as usize) as u64);
            let mut data = Buffer::take(payload_len as usize);
            reader.read_full(&mut data)?;
            Some((Bytes::from(data), permit))
        } else {
            None
        };
        // From here on every request gets exactly one reply, which counts
        // it done (`Admitted`).
        ctx.volume.counters().started();
        // Every request, even one answered with an error, holds a permit
        // until its reply is written: error replies to a client that does
        // not read them must not pile up without bound either.
        if reader.stopping() {
            let permit = match payload {
                Some((_, p)) => p,
                None => reader.acquire(budget, 0),
            };
            reply_error(ctx, &req, NbdError::Shutdown, "server is shutting down", Admitted { permit, started });
            continue;
        }
        if let Err((err, msg)) = check_request(&ctx.volume, ctx.structured, ctx.read_only, &ctx.meta, ctx.max_request, &req) {
            let permit = match payload {
                Some((_, p)) => p,
                None => reader.acquire(budget, 0),
            };
            reply_error(ctx, &req, err, &msg, Admitted { permit, started });
            continue;
        }
        let (data, permit) = match payload {
            Some((data, permit)) => (data, Admitted { permit, started }),
            None => {
                let reply_payload = if req.command == CMD_READ { footprint(req.length as usize) as u64 } else { 0 };
                (Bytes::new(), Admitted { permit: reader.acquire(budget, reply_payload), started })
            }
        };
        let ctx2 = ctx.clone();
        if req.command == CMD_FLUSH {
            // FLUSH has no range and is never held (see Volume::flush).
            ctx.pools.blocking.spawn(move || execute(ctx2, req, data, permit, None));
            continue;
        }
        // Through the volume's gate: admitted now, or parked behind a pause
        // and run (translated against the new table) when it is released.
        let range = Range::new(req.offset, req.length as u64);
        // A forwarding node's request on the current table (or the one
        // before) is admitted at once, never parked behind a hold
        // (`forwarded.rs`); then it runs like any other.
        let admitted = match ctx.stamp.map(|stamp| (stamp, forwarded::admission(stamp, ctx.volume.generation()))) {
            Some((_, Admission::Now)) => Some(ctx.volume.gate().enter_now(range, ctx.shard)),
            Some((stamp, Admission::Stale)) => {
                tracing::warn!(stamp, generation = ctx.volume.generation(), volume = ctx.volume.name(), "forwarded request from a node on another generation: closing its connection");
                ctx.sink.close();
                reply_error(ctx, &req, NbdError::Shutdown, "stale forwarding stamp", permit);
                continue;
            }
            Some((_, Admission::Gate)) | None => ctx.volume.gate().try_enter(range, ctx.shard),
        };
        match admitted {
            // Small reads and writes to stores that never block for long run
            // right here: a hand-off to the pool costs more than a 4 KiB
            // pread from the page cache (context switches), and replies still
            // leave through the sink in completion order.
            Some(ticket) if runs_inline(&ctx2, &req) => {
                // More requests already buffered: hold this reply back and
                // send it with theirs (uncorked before the reader sleeps).
                if reader.inner.buffer().len() >= REQUEST_HEADER_LEN {
                    ctx.sink.cork();
                } else {
                    uncork(&ctx.sink);
                }
                execute(ctx2, req, data, permit, Some(ticket))
            }
            Some(ticket) => match remote_io::whole_remote_route(&ctx2, &req) {
                // Its send is held back until the reader has nothing
                // buffered (it uncorks before every read that may sleep),
                // then written with the requests behind it in one write.
                Some(route) => remote_io::start(ctx2, req, data, permit, ticket, route),
                None => ctx.pool_for(req.command).spawn(move || execute(ctx2, req, data, permit, Some(ticket))),
            },
            None => ctx.volume.gate().enter(
                range,
                ctx.shard,
                Box::new(move |ticket| {
                    let pool = ctx2.pool_for(req.command).clone();
                    pool.spawn(move || execute(ctx2, req, data, permit, Some(ticket)));
                }),
            ),
        }
    }
}

impl Reader<'_> {
    /// A budget permit. Before waiting for one, the reader writes the
    /// replies a cork held back (they hold permits themselves) and takes
    /// whatever requests the socket holds into its buffer: a client that
    /// reads replies only once it can write again must be able to write
    /// while the reader waits (see `RecvBuf`).
    fn acquire(&mut self, budget: &Arc<Budget>, payload: u64) -> Permit {
        if let Some(permit) = budget.try_acquire(payload) {
            return permit;
        }
        uncork(self.sink);
        // A socket error shows again at the next read, which ends the
        // connection; this request still gets its reply (or is dropped
        // with the connection's output).
        if let Err(e) = self.inner.take_pending() {
            tracing::debug!(error = %e, "reading ahead before a budget wait failed");
        }
        budget.acquire(payload)
    }
}

/// Largest READ/WRITE run on the reader thread itself. 256 KiB (nbdcopy's
/// request size) rather than 128: nbdcopy into and out of a volume took
/// up to 27% less server CPU per request without the hand-off to the CPU
/// pool; 1 MiB inline gave seq reads nothing and made seq writes slower
/// (the reader then stops taking payloads while it writes one).
/// docs/PERFORMANCE.md §13.
const INLINE_MAX: u32 = 256 * 1024;

fn runs_inline(ctx: &ConnectionCtx, req: &RequestHeader) -> bool {
    matches!(req.command, CMD_READ | CMD_WRITE) && req.length <= INLINE_MAX && !ctx.volume.translation().may_block()
}
