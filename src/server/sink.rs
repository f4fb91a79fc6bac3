//! The reply side of a connection. Workers hand finished replies to the
//! sink; whichever thread finds the socket free becomes the writer and sends
//! what is queued, so under load many replies share a syscall and no thread
//! ever waits for the socket behind another.
//!
//! Only one thread per connection ever waits long for the client to read:
//! its **flusher**. The reader writes without blocking (`MSG_DONTWAIT`);
//! pool threads block at most `WORKER_WAIT` (the socket's send timeout),
//! inside the kernel, which refills the socket as the client drains it: a
//! 1 MiB reply fills a socket buffer several times even for a client that
//! reads at once. When the socket stays full they hand the writer role,
//! with the unwritten rest, to the flusher, started at the first such
//! hand-off. So a client that does not read its replies stalls neither the
//! reader (which keeps taking requests as long as the budget allows) nor a
//! pool thread other connections need for long. (Pool threads handing off
//! at the first full socket made the flusher the writer for good under
//! streaming 1 MiB reads, and cost 10-15% more CPU per read.)
//!
//! Replies are written in batches of about a socket buffer (but at least
//! four replies, so 1 MiB replies still share a `writev`), and each reply
//! is dropped, returning its budget permit, as soon as its last byte is out:
//! a reader waiting for budget resumes as the client reads, not once a
//! whole backlog has gone.
//!
//! The reader can also *cork* the sink while it still has requests buffered
//! that it will answer itself right away: replies then collect (up to
//! `MAX_CORKED`) and leave in one `writev` when it uncorks, instead of one
//! syscall and one client wake-up per 4 KiB request.

use super::budget::Permit;
use super::outgoing::{Outgoing, Writer, FLUSHER_PATIENCE, ON_READER};
use super::stream::{Stream, Wait};
use crate::sync::{lock, wait};
use bytes::Bytes;
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

/// A complete reply: wire bytes in order, and the permit it releases once sent.
pub struct Reply {
    pub parts: Vec<Bytes>,
    /// Held only for its `Drop`, which returns the budget once sent.
    #[allow(dead_code)]
    pub permit: Option<Permit>,
}

impl Reply {
    pub fn new(bytes: impl Into<Bytes>, permit: Option<Permit>) -> Reply {
        Reply { parts: vec![bytes.into()], permit }
    }

    pub(super) fn len(&self) -> usize {
        self.parts.iter().map(Bytes::len).sum()
    }
}

#[derive(Default)]
struct ReplyQueue {
    replies: VecDeque<Reply>,
    /// A thread holds the writer role (it alone touches `Outgoing`).
    writing: bool,
    broken: bool,
    corked: bool,
    /// The writer role was handed to the flusher, which has not taken it yet.
    handed_off: bool,
    flusher_started: bool,
    /// The sink is closed: the flusher ends.
    closed: bool,
}

struct Shared {
    queue: Mutex<ReplyQueue>,
    /// Wakes the flusher: the role was handed to it, or the sink closed.
    handed: Condvar,
    /// Locked by the writer role holder only, so never contended; it may
    /// be held across a blocking write (by the flusher).
    out: Mutex<Outgoing>,
    /// The socket of `out.stream`, for `close`, which must not wait for
    /// `out` (a flusher may hold it in a blocking write: the shutdown is
    /// what ends that write). Valid as long as `out` is, i.e. as `self`.
    fd: RawFd,
    /// Bytes taken from the queue per write: about a socket buffer.
    batch_bytes: usize,
    /// Names the flusher thread.
    id: u64,
    /// The connection's log span, for the flusher's messages.
    span: tracing::Span,
}

pub struct ReplySink {
    shared: Arc<Shared>,
}

/// Most replies held back while corked; more are written at once. Small on
/// purpose: the client refills its queue as replies arrive, so holding many
/// back idles it (4 KiB randwrite QD16: 32 cost 10%, 4 is neutral, while
/// reads gain ~8% from the shared writev).
const MAX_CORKED: usize = 4;

/// Bounds of a write batch. The socket's send buffer decides within them:
/// a batch much larger than it only holds permits longer (they return once
/// the whole `writev` is done), a much smaller one costs syscalls.
const MIN_BATCH: usize = 64 * 1024;
/// Replies a batch may always take, whatever their size: four 1 MiB
/// READ replies leave in one `writev` (one sleep in the kernel while the
/// client drains them), as before the byte cap.
const MIN_BATCH_REPLIES: usize = 4;
const MAX_BATCH: usize = 4 << 20;

impl ReplySink {
    /// `id` names the flusher thread (`nbdvirt-out-ID`) if one is needed;
    /// it logs in the current span (the connection's).
    pub fn new(stream: Stream, id: u64) -> ReplySink {
        let batch_bytes = stream.send_buffer_size().unwrap_or(MIN_BATCH).clamp(MIN_BATCH, MAX_BATCH);
        let fd = stream.as_raw_fd();
        let out = Outgoing::new(stream);
        let shared = Shared {
            queue: Mutex::new(ReplyQueue::default()),
            handed: Condvar::new(),
            out: Mutex::new(out),
            fd,
            batch_bytes,
            id,
            span: tracing::Span::current(),
        };
        ReplySink { shared: Arc::new(shared) }
    }

    /// Marks this thread as a connection's reader (see `Writer`).
    pub fn on_reader_thread() {
        ON_READER.set(true);
    }

    /// Queues `reply`, and writes the queue if no other thread is doing so.
    /// Waits for the client at most `WORKER_WAIT`, on the reader not at all.
    pub fn send(&self, reply: Reply) {
        {
            let mut q = lock(&self.shared.queue);
            if q.broken {
                return; // client gone: drop the reply, releasing its permit
            }
            q.replies.push_back(reply);
            if q.writing || (q.corked && q.replies.len() < MAX_CORKED) {
                return;
            }
            q.writing = true;
        }
        Shared::write(&self.shared, Writer::current());
    }

    /// Holds replies back until [`uncork`](Self::uncork). Only the reader
    /// corks, and it uncorks before anything that may block it.
    pub fn cork(&self) {
        lock(&self.shared.queue).corked = true;
    }

    /// Ends a cork and writes what collected meanwhile (without waiting).
    pub fn uncork(&self) {
        {
            let mut q = lock(&self.shared.queue);
            if !q.corked {
                return;
            }
            q.corked = false;
            if q.writing || q.replies.is_empty() || q.broken {
                return;
            }
            q.writing = true;
        }
        Shared::write(&self.shared, Writer::current());
    }

    /// Shuts the socket down (both directions); queued replies are dropped.
    pub fn close(&self) {
        self.shared.close();
        self.shared.shutdown();
    }
}

impl Drop for ReplySink {
    /// Lets the flusher thread end (it holds the shared state, not the sink).
    fn drop(&mut self) {
        self.shared.close();
    }
}

impl Shared {
    /// Shuts the socket down in both directions (the reader then sees EOF).
    fn shutdown(&self) {
        let _ = nix::sys::socket::shutdown(self.fd, nix::sys::socket::Shutdown::Both);
    }

    fn close(&self) {
        let mut q = lock(&self.queue);
        q.broken = true;
        q.closed = true;
        q.replies.clear();
        drop(q);
        self.handed.notify_all();
    }

    /// Writes until the queue is empty; the caller holds the writer role.
    /// A full socket makes a reader or worker hand the role to the flusher.
    fn write(this: &Arc<Shared>, writer: Writer) {
        let how = if writer == Writer::Reader { Wait::No } else { Wait::Yes };
        let mut out = lock(&this.out);
        let mut progress = Instant::now();
        loop {
            {
                let mut q = lock(&this.queue);
                if q.broken {
                    q.writing = false;
                    drop(q);
                    out.clear();
                    return;
                }
                while out.unsent < this.batch_bytes || out.batch.len() < MIN_BATCH_REPLIES {
                    let Some(reply) = q.replies.pop_front() else { break };
                    out.unsent += reply.len();
                    out.batch.push_back(reply);
                }
                if out.batch.is_empty() {
                    q.writing = false;
                    return;
                }
            }
            let before = out.unsent;
            let result = match out.write_some(how) {
                Ok(true) => continue,
                // The socket is full (or the write timed out): a write that
                // waits longer would be waiting for the client.
                Ok(false) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
                Err(e) => Err(e),
            };
            if result.is_ok() && writer != Writer::Flusher {
                drop(out);
                return Shared::hand_off(this);
            }
            if out.unsent < before {
                progress = Instant::now();
            }
            let e = match result {
                Ok(()) if progress.elapsed() < FLUSHER_PATIENCE => continue,
                Ok(()) => io::Error::new(io::ErrorKind::TimedOut, "the client read no reply for 60 s"),
                Err(e) => e,
            };
            tracing::debug!(error = %e, "reply write failed; dropping connection output");
            let mut q = lock(&this.queue);
            q.broken = true;
            q.writing = false;
            let dropped = std::mem::take(&mut q.replies);
            drop(q);
            drop(dropped);
            out.clear();
            this.shutdown();
            return;
        }
    }

    /// Gives the writer role (and the batch in `out`) to the flusher,
    /// starting it the first time.
    fn hand_off(this: &Arc<Shared>) {
        let mut q = lock(&this.queue);
        if q.closed {
            // The flusher is gone or going: nobody will write this.
            q.writing = false;
            drop(q);
            lock(&this.out).clear();
            return;
        }
        q.handed_off = true;
        if q.flusher_started {
            drop(q);
            this.handed.notify_one();
            return;
        }
        q.flusher_started = true;
        drop(q);
        let shared = this.clone();
        let spawned = std::thread::Builder::new().name(format!("nbdvirt-out-{}", this.id)).spawn(move || flusher(&shared));
        if let Err(e) = spawned {
            // No thread to hand to: finish the write here, waiting, as
            // before there were flushers.
            tracing::warn!(error = %e, "cannot start a reply flusher thread; writing on this thread");
            let mut q = lock(&this.queue);
            q.flusher_started = false;
            q.handed_off = false;
            drop(q);
            Shared::write(this, Writer::Flusher);
        }
    }
}

/// The flusher thread: waits for the writer role and writes, waiting for
/// the client as long as it must (the socket's send timeout ends a client
/// that never reads), until the sink closes.
fn flusher(shared: &Arc<Shared>) {
    let _span = shared.span.clone().entered();
    loop {
        {
            let mut q = lock(&shared.queue);
            while !q.handed_off && !q.closed {
                q = wait(&shared.handed, q);
            }
            if q.closed && !q.handed_off {
                return;
            }
            q.handed_off = false;
        }
        Shared::write(shared, Writer::Flusher);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    fn pending(peer: &mut UnixStream) -> Vec<u8> {
        let mut got = vec![0u8; 4096];
        match peer.read(&mut got) {
            Ok(n) => got[..n].to_vec(),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Vec::new(),
            Err(e) => panic!("read: {e}"),
        }
    }

    #[test]
    fn corked_replies_leave_together_on_uncork_or_when_too_many() {
        let (ours, mut peer) = UnixStream::pair().unwrap();
        peer.set_nonblocking(true).unwrap();
        let sink = ReplySink::new(Stream::Unix(ours), 1);
        sink.send(Reply::new(vec![1u8], None));
        assert_eq!(pending(&mut peer), [1], "uncorked: written at once");
        sink.cork();
        sink.send(Reply::new(vec![2u8], None));
        sink.send(Reply::new(vec![3u8], None));
        assert!(pending(&mut peer).is_empty(), "corked: held back");
        sink.uncork();
        assert_eq!(pending(&mut peer), [2, 3], "uncork writes in order");
        sink.cork();
        for i in 0..MAX_CORKED as u8 {
            sink.send(Reply::new(vec![10 + i], None));
        }
        assert_eq!(pending(&mut peer).len(), MAX_CORKED, "a full cork is written");
        sink.uncork();
        assert!(pending(&mut peer).is_empty());
    }

    /// A peer that does not read: `send` on a pool thread waits at most
    /// the socket's send timeout, once (then the flusher waits instead),
    /// and each reply returns its permit as soon as it is written, not
    /// when the whole backlog is.
    #[test]
    fn a_peer_that_does_not_read_blocks_no_sender_and_permits_return_per_reply() {
        use crate::server::budget::Budget;
        use std::time::{Duration, Instant};
        let (ours, mut peer) = UnixStream::pair().unwrap();
        // As `connection::serve` sets it.
        ours.set_write_timeout(Some(super::super::outgoing::WORKER_WAIT)).unwrap();
        let sink = ReplySink::new(Stream::Unix(ours), 2);
        let budget = Budget::new(1 << 30, 1 << 20);
        const N: usize = 64;
        const LEN: usize = 64 * 1024;
        let started = Instant::now();
        for i in 0..N {
            sink.send(Reply::new(vec![i as u8; LEN], Some(budget.acquire(LEN as u64))));
        }
        assert!(started.elapsed() < Duration::from_secs(5), "send waited for the peer");
        // The socket holds a few hundred KiB: most replies are still queued.
        assert!(budget.in_flight() > N as u64 / 2, "{} of {N} replies still held", budget.in_flight());
        let mut got = vec![0u8; N * LEN];
        peer.read_exact(&mut got[..LEN * N / 4]).unwrap();
        // A quarter read: its permits come back while the rest waits.
        let deadline = Instant::now() + Duration::from_secs(10);
        while budget.in_flight() > (N - N / 4 + 1) as u64 {
            assert!(Instant::now() < deadline, "permits of written replies not returned: {} held", budget.in_flight());
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(budget.in_flight() > 0);
        peer.read_exact(&mut got[LEN * N / 4..]).unwrap();
        for (i, reply) in got.chunks(LEN).enumerate() {
            assert!(reply.iter().all(|&b| b == i as u8), "reply {i} out of order or torn");
        }
        assert!(budget.wait_idle(Duration::from_secs(10)), "permits left after everything was read");
    }
}
