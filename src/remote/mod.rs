//! The node's own NBD client, for forwarding I/O: a node that cannot reach
//! a store sends those pieces of a volume to a node that can.
//!
//! Blocking calls, made from many I/O threads at once, go round-robin over
//! a few connections to one server (`links`); each connection has a reader
//! thread that hands replies to their waiters (`connection`), judged by the
//! pure `reply`. A broken connection is replaced, moving to the next
//! candidate endpoint when its server is gone, and its requests are resent
//! there: at block level resending is safe (same data at the same offset),
//! as the Linux NBD client does on reconnect. Each request has a bound it
//! may take in all; an NBD error from the server is the caller's answer.

mod connection;
mod deadline;
pub mod handshake;
mod held;
mod links;
mod reply;
mod reply_reader;

pub use handshake::{ExportInfo, HandshakeError};

use crate::endpoint::Endpoint;
use crate::nbd::*;
use connection::{Ask, Outcome};
pub use deadline::within;
use links::{payload_piece, Links};
use reply::nbd_error;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How to reach the export and how long to try.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteOptions {
    /// The export's name on the remote server.
    pub export: String,
    /// Forwarding stamp, sent as the metadata-context query
    /// `nbdvirt:generation=N` (the server must select it); `None`: none.
    pub stamp: Option<u64>,
    /// Connections kept open (fewer if the server lacks CAN_MULTI_CONN).
    pub connections: usize,
    /// Longest a request may take, resends and failover included.
    pub bound: Duration,
    /// Per connect attempt, and per read or write of the handshake.
    pub connect_timeout: Duration,
}

impl Default for RemoteOptions {
    fn default() -> RemoteOptions {
        RemoteOptions {
            export: String::new(),
            stamp: None,
            connections: crate::defaults::forward_connections(),
            bound: crate::defaults::FORWARD_BOUND,
            connect_timeout: crate::defaults::FORWARD_CONNECT_TIMEOUT,
        }
    }
}

/// What a remote export is doing, for status reports.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RemoteStatus {
    /// The endpoint the open connections go to.
    pub endpoint: Option<String>,
    pub connections: usize,
    /// Requests put on the wire, resends included.
    pub sent: u64,
    /// Requests resent after a lost connection (or ESHUTDOWN).
    pub retries: u64,
    /// Requests that failed (NBD error or bound passed).
    pub failed: u64,
    pub last_error: Option<String>,
}

/// What a started READ or WRITE comes to (`RemoteExport::start`).
#[derive(Debug)]
pub enum Started {
    /// The answer: a READ's data (empty for a WRITE), or the error.
    Done(io::Result<Vec<u8>>),
    /// Not sent, or its link broke: send it the blocking way, within
    /// `deadline` (the bound it had since it was started; `None`: its own
    /// bound from now) by running it inside `within(deadline, ..)`.
    Resend { deadline: Option<Instant> },
}

/// Runs once with a started request's outcome; must not block.
pub type OnStarted = Box<dyn FnOnce(Started) + Send>;

/// An export on another server, reached through the candidates' NBD.
pub struct RemoteExport {
    links: Links,
}

impl std::fmt::Debug for RemoteExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteExport").field("export", &self.links.export()).field("status", &self.links.status()).finish()
    }
}

/// Largest piece of a TRIM, WRITE_ZEROES or CACHE (no payload: only the
/// 32-bit length limits them; kept aligned).
const BIG_PIECE: u64 = 1 << 30;
/// Zeros written at a time where the server has no WRITE_ZEROES.
const ZERO_PIECE: u64 = 1 << 20;

/// `[offset, offset + length)` cut in pieces of at most `piece` bytes.
fn pieces(offset: u64, length: u64, piece: u64) -> io::Result<impl Iterator<Item = (u64, u32)>> {
    let end = offset.checked_add(length).ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    let piece = piece.clamp(1, u32::MAX as u64);
    Ok((offset..end).step_by(piece as usize).map(move |at| (at, piece.min(end - at) as u32)))
}

impl RemoteExport {
    /// Lazy: nothing connects until the first request. `candidates` is
    /// asked at each (re)connect for the endpoints to try, in order of
    /// preference.
    pub fn new(options: RemoteOptions, candidates: Arc<dyn Fn() -> Vec<Endpoint> + Send + Sync>) -> RemoteExport {
        RemoteExport { links: Links::new(options, candidates) }
    }

    /// Starts a READ (`write` None) or a WRITE (data, FUA) of one piece
    /// without waiting for it: `done` runs with the outcome on the
    /// connection's reader thread, so it must not block. Only on a link
    /// already open, within the server's limits and flags; otherwise, or
    /// when the link breaks, `done` is told `Resend` and the caller sends
    /// the request the blocking way (dialing, resending, failing over).
    pub fn start(self: &Arc<Self>, offset: u64, length: u32, write: Option<(&[u8], bool)>, done: OnStarted) {
        let fits = self.links.known_limits().is_some_and(|(flags, piece)| {
            length > 0 && length as u64 <= piece && write.is_none_or(|(_, fua)| !fua || flags & TFLAG_SEND_FUA != 0)
        });
        let deadline = self.links.deadline();
        if !fits {
            return done(Started::Resend { deadline: Some(deadline) });
        }
        let (command, flags, payload) = match write {
            None => (CMD_READ, 0, &[][..]),
            Some((data, fua)) => (CMD_WRITE, if fua { CMD_FLAG_FUA } else { 0 }, data),
        };
        let export = Arc::clone(self);
        let ask = Ask { command, flags, offset, length, payload };
        self.links.start(&ask, deadline, Box::new(move |outcome| done(export.settle(outcome, deadline))));
    }

    fn settle(&self, outcome: Outcome, deadline: Instant) -> Started {
        let resend = Started::Resend { deadline: Some(deadline) };
        match outcome {
            Outcome::Done(Ok(data)) => Started::Done(Ok(data)),
            // Stopping or fenced: `submit` moves elsewhere.
            Outcome::Done(Err((code, _))) if code == NbdError::Shutdown.code() => {
                self.links.resent(None);
                resend
            }
            Outcome::Done(Err((code, message))) => {
                tracing::debug!(export = %self.links.export(), code, %message, "forwarded request failed");
                Started::Done(self.links.tally(Err(nbd_error(code))))
            }
            Outcome::Lost(why) => {
                self.links.resent(Some(why));
                resend
            }
            Outcome::TimedOut => Started::Done(self.links.tally(Err(self.links.timed_out()))),
            Outcome::NotSent => resend,
        }
    }

    /// Fills all of `buf` from `offset`, or fails.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.links.tally(self.read_inner(offset, buf))
    }

    fn read_inner(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let piece = payload_piece(&self.links.info()?);
        let mut rest = &mut buf[..];
        for (at, len) in pieces(offset, rest.len() as u64, piece)? {
            let data = self.links.submit(&Ask { command: CMD_READ, flags: 0, offset: at, length: len, payload: &[] })?;
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(len as usize);
            if data.len() != head.len() {
                return Err(io::Error::other(format!("read of {len} bytes answered with {}", data.len())));
            }
            head.copy_from_slice(&data);
            rest = tail;
        }
        Ok(())
    }

    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.links.tally(self.write_inner(offset, data, fua))
    }

    fn write_inner(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let info = self.links.info()?;
        let flags = self.fua_flag(&info, fua);
        for (at, len) in pieces(offset, data.len() as u64, payload_piece(&info))? {
            let start = (at - offset) as usize;
            let payload = &data[start..start + len as usize];
            self.links.submit(&Ask { command: CMD_WRITE, flags, offset: at, length: len, payload })?;
        }
        self.flush_unless_fua(&info, fua)
    }

    /// FUA as a flag where the server takes it; else `flush_unless_fua`
    /// makes the writes durable with a FLUSH after them.
    fn fua_flag(&self, info: &ExportInfo, fua: bool) -> u16 {
        if fua && info.flags & TFLAG_SEND_FUA != 0 {
            CMD_FLAG_FUA
        } else {
            0
        }
    }

    fn flush_unless_fua(&self, info: &ExportInfo, fua: bool) -> io::Result<()> {
        if fua && info.flags & TFLAG_SEND_FUA == 0 {
            self.flush_inner()
        } else {
            Ok(())
        }
    }

    /// A hint: a server without TRIM is not asked.
    pub fn trim(&self, offset: u64, length: u64, fua: bool) -> io::Result<()> {
        self.links.tally(self.trim_inner(offset, length, fua))
    }

    fn trim_inner(&self, offset: u64, length: u64, fua: bool) -> io::Result<()> {
        let info = self.links.info()?;
        if length == 0 || info.flags & TFLAG_SEND_TRIM == 0 {
            return Ok(());
        }
        let flags = self.fua_flag(&info, fua);
        for (at, len) in pieces(offset, length, BIG_PIECE)? {
            self.links.submit(&Ask { command: CMD_TRIM, flags, offset: at, length: len, payload: &[] })?;
        }
        self.flush_unless_fua(&info, fua)
    }

    /// Zeros `[offset, offset + length)`. Without WRITE_ZEROES on the server
    /// the zeros are written (a fast zero then fails with ENOTSUP, as
    /// proto.md has it: it must not be slower than a write).
    pub fn write_zeroes(&self, offset: u64, length: u64, no_hole: bool, fast_zero: bool, fua: bool) -> io::Result<()> {
        self.links.tally(self.write_zeroes_inner(offset, length, no_hole, fast_zero, fua))
    }

    fn write_zeroes_inner(&self, offset: u64, length: u64, no_hole: bool, fast_zero: bool, fua: bool) -> io::Result<()> {
        if length == 0 {
            return Ok(());
        }
        let info = self.links.info()?;
        let can = |flag: u16| info.flags & flag != 0;
        if fast_zero && !(can(TFLAG_SEND_WRITE_ZEROES) && can(TFLAG_SEND_FAST_ZERO)) {
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        }
        if !can(TFLAG_SEND_WRITE_ZEROES) {
            let zeros = vec![0u8; ZERO_PIECE.min(length) as usize];
            for (at, len) in pieces(offset, length, ZERO_PIECE)? {
                self.write_inner(at, &zeros[..len as usize], false)?;
            }
            return self.flush_unless_fua(&info, fua);
        }
        let mut flags = self.fua_flag(&info, fua);
        if no_hole {
            flags |= CMD_FLAG_NO_HOLE;
        }
        if fast_zero {
            flags |= CMD_FLAG_FAST_ZERO;
        }
        for (at, len) in pieces(offset, length, BIG_PIECE)? {
            self.links.submit(&Ask { command: CMD_WRITE_ZEROES, flags, offset: at, length: len, payload: &[] })?;
        }
        self.flush_unless_fua(&info, fua)
    }

    /// Makes every acknowledged write durable (a server without FLUSH has
    /// nothing to flush).
    pub fn flush(&self) -> io::Result<()> {
        self.links.tally(self.flush_inner())
    }

    fn flush_inner(&self) -> io::Result<()> {
        if self.links.info()?.flags & TFLAG_SEND_FLUSH == 0 {
            return Ok(());
        }
        self.links.submit(&Ask { command: CMD_FLUSH, flags: 0, offset: 0, length: 0, payload: &[] }).map(drop)
    }

    /// The allocation of `[offset, offset + length)` as the server's
    /// `base:allocation` says: (length, hole) runs from `offset`, at most
    /// `max_runs`, covering a prefix of the range (at most `BIG_PIECE`).
    /// A server that gave no such context reports all data, which is never
    /// wrong (a reader gets the zeros it would have skipped).
    pub fn block_status(&self, offset: u64, length: u64, max_runs: usize) -> io::Result<Vec<(u64, bool)>> {
        self.links.tally(self.block_status_inner(offset, length, max_runs))
    }

    fn block_status_inner(&self, offset: u64, length: u64, max_runs: usize) -> io::Result<Vec<(u64, bool)>> {
        let Some((at, len)) = pieces(offset, length, BIG_PIECE)?.next() else { return Ok(Vec::new()) };
        let raw = self.links.submit(&Ask { command: CMD_BLOCK_STATUS, flags: 0, offset: at, length: len, payload: &[] })?;
        if raw.is_empty() {
            return Ok(vec![(length, false)]);
        }
        let mut runs = reply::allocation_runs(&raw);
        runs.truncate(max_runs.max(1));
        Ok(runs)
    }

    /// A hint: a server without CACHE is not asked.
    pub fn cache(&self, offset: u64, length: u64) -> io::Result<()> {
        self.links.tally(self.cache_inner(offset, length))
    }

    fn cache_inner(&self, offset: u64, length: u64) -> io::Result<()> {
        if length == 0 || self.links.info()?.flags & TFLAG_SEND_CACHE == 0 {
            return Ok(());
        }
        for (at, len) in pieces(offset, length, BIG_PIECE)? {
            self.links.submit(&Ask { command: CMD_CACHE, flags: 0, offset: at, length: len, payload: &[] })?;
        }
        Ok(())
    }

    pub fn status(&self) -> RemoteStatus {
        self.links.status()
    }

    /// The export's size, once a connection told it.
    pub fn size(&self) -> Option<u64> {
        self.links.size()
    }
}

impl Drop for RemoteExport {
    /// Closes the sockets; each reader thread ends at once and is joined.
    fn drop(&mut self) {
        self.links.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_the_range() {
        let p: Vec<_> = pieces(100, 250, 100).unwrap().collect();
        assert_eq!(p, vec![(100, 100), (200, 100), (300, 50)]);
        assert_eq!(pieces(0, 0, 100).unwrap().count(), 0);
        assert!(pieces(u64::MAX - 1, 2, 100).is_err());
        // Pieces never exceed the 32-bit length of a request.
        assert!(pieces(0, 10 << 32, u64::MAX).unwrap().all(|(_, l)| l == u32::MAX || l > 0));
    }

    #[test]
    fn is_send_sync_debug() {
        fn check<T: Send + Sync + std::fmt::Debug>() {}
        check::<RemoteExport>();
    }
}
