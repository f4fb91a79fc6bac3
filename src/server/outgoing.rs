//! The writer's side of the reply sink: the replies taken from the queue
//! and not yet completely written, and the `writev` that sends them. Held
//! only by the thread with the writer role (see `sink.rs`), and who that
//! may be (`Writer`), which decides how long a write may wait.

use super::sink::Reply;
use super::stream::{Stream, Wait};
use std::collections::VecDeque;
use std::cell::Cell;
use std::io::{self, IoSlice};
use std::time::Duration;

/// The socket's send timeout during transmission: how long a pool thread
/// writing a reply waits for room before it hands off to the flusher.
pub(super) const WORKER_WAIT: Duration = Duration::from_millis(10);

/// How long the flusher waits for a client that reads nothing before the
/// connection is dropped.
pub(super) const FLUSHER_PATIENCE: Duration = Duration::from_secs(60);

thread_local! {
    /// Set on a connection's reader thread (`ReplySink::on_reader_thread`):
    /// replies written there never wait for the socket.
    pub(super) static ON_READER: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` writing replies like the reader: never waiting for a full
/// socket (the flusher takes over). For a thread that answers many
/// connections (a forwarding link's reader): one client that does not
/// read must not hold up the others' replies.
pub(super) fn never_waiting<T>(f: impl FnOnce() -> T) -> T {
    crate::sync::with_local(&ON_READER, true, f)
}

/// Who holds the writer role, which decides how long it waits.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Writer {
    /// The connection's reader: never waits.
    Reader,
    /// A pool thread: up to `WORKER_WAIT`, then hands off.
    Worker,
    /// The flusher: as long as the client makes progress.
    Flusher,
}

impl Writer {
    pub(super) fn current() -> Writer {
        if ON_READER.get() {
            Writer::Reader
        } else {
            Writer::Worker
        }
    }
}

/// Most iovecs handed to one writev (IOV_MAX is 1024 on Linux).
const MAX_IOV: usize = 1024;

/// What the writer role holder owns: the socket and the replies it took
/// from the queue but has not finished writing.
pub(super) struct Outgoing {
    stream: Stream,
    pub(super) batch: VecDeque<Reply>,
    /// Bytes of `batch[0]` already written.
    sent: usize,
    /// Bytes of `batch` not yet written.
    pub(super) unsent: usize,
}

impl Outgoing {
    pub(super) fn new(stream: Stream) -> Outgoing {
        Outgoing { stream, batch: VecDeque::new(), sent: 0, unsent: 0 }
    }

    /// One `writev` of the batch; drops every reply written completely.
    /// Returns whether all that was offered went out.
    pub(super) fn write_some(&mut self, how: Wait) -> io::Result<bool> {
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(self.batch.len().min(MAX_IOV));
        let mut skip = self.sent;
        'fill: for reply in &self.batch {
            for part in &reply.parts {
                if skip >= part.len() {
                    skip -= part.len();
                    continue;
                }
                slices.push(IoSlice::new(&part[skip..]));
                skip = 0;
                if slices.len() == MAX_IOV {
                    break 'fill;
                }
            }
        }
        let offered: usize = slices.iter().map(|s| s.len()).sum();
        let n = self.stream.send_vectored(&slices, how)?;
        drop(slices);
        self.advance(n);
        Ok(n == offered)
    }

    /// Accounts for `n` more bytes written, dropping finished replies (and
    /// so returning their permits).
    fn advance(&mut self, mut n: usize) {
        self.unsent -= n;
        while let Some(front) = self.batch.front() {
            let left = front.len() - self.sent;
            if n < left {
                self.sent += n;
                return;
            }
            n -= left;
            self.sent = 0;
            self.batch.pop_front();
        }
    }

    pub(super) fn clear(&mut self) {
        self.batch.clear();
        self.sent = 0;
        self.unsent = 0;
    }
}
