//! One connection to the server in the transmission phase (a `Link`):
//! callers write requests under a lock and wait for their own reply
//! (`call`), or leave a completion that the reader runs (`start`; a
//! reader's requests leave together, `held.rs`); one reader thread
//! per link takes the replies off the socket and hands each to its waiter
//! by cookie (`reply_reader.rs`). A link that breaks is dead for good: its
//! waiters are told at once (they resend elsewhere) and the socket is shut
//! down, which also ends the reader.

use super::handshake::{connect_forwarding, ExportInfo, ServerSocket};
use super::reply::{Chunk, Progress, Span};
use super::reply_reader::read_replies;
use crate::endpoint::Endpoint;
use crate::nbd::*;
use crate::sync::lock;
use std::collections::HashMap;
use std::io::{self, IoSlice, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::{JoinHandle, ThreadId};
use std::time::{Duration, Instant};

/// One request as sent: `payload` only for WRITE.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    pub command: u16,
    pub flags: u16,
    pub offset: u64,
    pub length: u32,
    pub payload: &'a [u8],
}

/// Why a call got no answer from the server.
#[derive(Debug)]
pub enum CallError {
    /// The link broke (the reason): the request may go elsewhere.
    Lost(String),
    /// No reply before the deadline; the link has been killed.
    TimedOut,
}

/// The server's answer: the data of a READ (empty otherwise), or its NBD
/// error and message.
pub type Answer = Result<Vec<u8>, (u32, String)>;

/// What a waiter is told.
#[derive(Debug)]
pub enum Outcome {
    Done(Answer),
    /// The link broke: the request may go elsewhere.
    Lost(String),
    /// A started request got no reply by its deadline (the link is killed).
    TimedOut,
    /// Nothing was sent: no link was open for it (`Links::start`).
    NotSent,
}

/// Runs once with a started request's outcome, on the link's reader
/// thread (or the thread that kills the link): it must not block.
pub type OnOutcome = Box<dyn FnOnce(Outcome) + Send>;

/// How a waiter is told its outcome.
enum Notify {
    /// A caller blocked in `call` (which keeps its own deadline).
    Caller(SyncSender<Outcome>),
    /// A request sent by `start`; the reader enforces its deadline.
    Started { deadline: Instant, done: OnOutcome },
}

impl Notify {
    fn tell(self, outcome: Outcome) {
        match self {
            Notify::Caller(tx) => {
                let _ = tx.try_send(outcome);
            }
            Notify::Started { done, .. } => done(outcome),
        }
    }
}

/// A request waiting for its reply; a READ's data are assembled in `data`.
struct Waiter {
    span: Span,
    data: Vec<u8>,
    progress: Progress,
    notify: Notify,
}

/// How often the reader looks for started requests past their deadline
/// (also the reader's socket timeout, so an idle link is looked at too).
pub(super) const OVERDUE_TICK: Duration = Duration::from_millis(200);

/// Waiters by cookie, and once dead, why (no waiter is added then).
#[derive(Default)]
struct Inbox {
    dead: Option<String>,
    waiting: HashMap<u64, Waiter>,
}

/// What the reader thread shares with the callers.
pub(super) struct LinkState {
    inbox: Mutex<Inbox>,
    dead: AtomicBool,
    /// A handle on the socket to shut it down from any thread.
    socket: ServerSocket,
}

impl LinkState {
    /// Marks the link dead, tells every waiter, shuts the socket (the
    /// reader wakes with EOF). Only the first reason counts.
    fn kill(&self, why: &str) {
        let waiting = {
            let mut inbox = lock(&self.inbox);
            if inbox.dead.is_some() {
                return;
            }
            inbox.dead = Some(why.to_string());
            self.dead.store(true, Ordering::Release);
            std::mem::take(&mut inbox.waiting)
        };
        let _ = self.socket.shutdown();
        for w in waiting.into_values() {
            w.notify.tell(Outcome::Lost(why.to_string()));
        }
    }

    /// Answers started requests past their deadline `TimedOut` and, if
    /// there were any, fails the link (the server is not answering: the
    /// other waiters are resent on a fresh link, as `call` does).
    pub(super) fn expire_overdue(&self) -> Result<(), String> {
        let now = Instant::now();
        let overdue: Vec<Waiter> = {
            let mut inbox = lock(&self.inbox);
            let late: Vec<u64> = inbox
                .waiting
                .iter()
                .filter(|(_, w)| matches!(w.notify, Notify::Started { deadline, .. } if deadline <= now))
                .map(|(c, _)| *c)
                .collect();
            late.iter().filter_map(|c| inbox.waiting.remove(c)).collect()
        };
        if overdue.is_empty() {
            return Ok(());
        }
        for w in overdue {
            w.notify.tell(Outcome::TimedOut);
        }
        Err("no reply in time".into())
    }

    /// Takes a waiter's span and buffer out to fill them without the lock.
    pub(super) fn checkout(&self, cookie: u64) -> Result<(Span, Vec<u8>), String> {
        let mut inbox = lock(&self.inbox);
        let w = inbox.waiting.get_mut(&cookie).ok_or_else(|| format!("reply to unknown cookie {cookie}"))?;
        Ok((w.span, std::mem::take(&mut w.data)))
    }

    /// Puts the buffer back with the chunk's effect; at DONE, answers the
    /// waiter (an incomplete READ is the server's fault: `Err`).
    pub(super) fn checkin(&self, cookie: u64, data: Vec<u8>, chunk: &Chunk, done: bool) -> Result<(), String> {
        let (notify, answer) = {
            let mut inbox = lock(&self.inbox);
            // Gone only if the link was killed meanwhile: nothing to answer.
            let Some(w) = inbox.waiting.get_mut(&cookie) else { return Ok(()) };
            w.data = data;
            w.progress.apply(chunk);
            if !done {
                return Ok(());
            }
            let w = inbox.waiting.remove(&cookie).expect("present");
            match w.progress.finish(&w.span) {
                Ok(answer) => (w.notify, answer.map(|()| w.data)),
                Err(why) => {
                    // Left waiting: the kill that follows tells it why.
                    inbox.waiting.insert(cookie, w);
                    return Err(why);
                }
            }
        };
        // Outside the lock: a completion sends the client its reply.
        notify.tell(Outcome::Done(answer));
        Ok(())
    }
}

/// One connection: writer, reader thread, waiters.
pub struct Link {
    pub endpoint: Endpoint,
    pub info: ExportInfo,
    state: Arc<LinkState>,
    writer: Mutex<ServerSocket>,
    reader: Mutex<Option<JoinHandle<()>>>,
    reader_id: ThreadId,
    next_cookie: AtomicU64,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Link({}, dead: {})", self.endpoint, self.is_dead())
    }
}

impl Link {
    /// Connects and negotiates (`timeout` per connect, read and write of the
    /// handshake), then starts the reader. A write that blocks longer than
    /// `write_timeout` (the server stopped reading) kills the link.
    pub fn open(endpoint: &Endpoint, export: &str, stamp: Option<u64>, timeout: Duration, write_timeout: Duration) -> Result<Link, String> {
        let (socket, info) = connect_forwarding(endpoint, export, stamp, timeout).map_err(|e| e.to_string())?;
        let setup = |e: io::Error| format!("setting up the connection: {e}");
        socket.set_write_timeout(Some(write_timeout)).map_err(setup)?;
        let reader_socket = socket.try_clone().map_err(setup)?;
        // Shared with the writer's handle (one socket): reads only wake
        // the reader to look for overdue requests.
        reader_socket.set_read_timeout(Some(OVERDUE_TICK)).map_err(setup)?;
        let state = Arc::new(LinkState { inbox: Mutex::default(), dead: AtomicBool::new(false), socket: socket.try_clone().map_err(setup)? });
        let shared = Arc::clone(&state);
        let reader = std::thread::Builder::new()
            .name("nbdvirt-fwd".into())
            .spawn(move || {
                let Err(why) = read_replies(&shared, reader_socket);
                shared.kill(&why);
            })
            .map_err(|e| format!("starting the reply reader: {e}"))?;
        Ok(Link {
            reader_id: reader.thread().id(),
            endpoint: endpoint.clone(),
            info,
            state,
            writer: Mutex::new(socket),
            reader: Mutex::new(Some(reader)),
            next_cookie: AtomicU64::new(1),
        })
    }

    pub fn is_dead(&self) -> bool {
        self.state.dead.load(Ordering::Acquire)
    }

    /// Closes the link for `why`: its waiters are answered `Lost`.
    pub fn kill(&self, why: &str) {
        self.state.kill(why);
    }

    /// Sends `ask`; `notify` is told its outcome (`Lost` at once if the
    /// link is dead).
    fn post(self: &Arc<Self>, ask: &Ask<'_>, notify: Notify) {
        let status = (ask.command == CMD_BLOCK_STATUS).then_some(self.info.allocation);
        let span = Span { offset: ask.offset, length: ask.length, read: ask.command == CMD_READ, status: status.flatten() };
        if status == Some(None) {
            // No base:allocation from this server: empty reads as all data.
            return notify.tell(Outcome::Done(Ok(Vec::new())));
        }
        // The read buffer is made here, outside the inbox lock.
        let data = if span.read { vec![0u8; ask.length as usize] } else { Vec::new() };
        let cookie = self.next_cookie.fetch_add(1, Ordering::Relaxed);
        {
            let mut inbox = lock(&self.state.inbox);
            if let Some(why) = inbox.dead.clone() {
                drop(inbox);
                return notify.tell(Outcome::Lost(why));
            }
            inbox.waiting.insert(cookie, Waiter { span, data, progress: Progress::default(), notify });
        }
        let header = RequestHeader { flags: ask.flags, command: ask.command, cookie, offset: ask.offset, length: ask.length }.encode();
        super::held::send(self, &header, ask.payload);
    }

    /// Writes a request (header and payload in one sendmsg(2) when the
    /// socket takes them whole).
    pub(super) fn write_parts(&self, header: &[u8], payload: &[u8]) {
        let sent = write_all_vectored(&mut *lock(&self.writer), &mut [IoSlice::new(header), IoSlice::new(payload)]);
        self.kill_unless_sent(sent);
    }

    /// Writes requests held back together (`held`); on a dead link their
    /// waiters were already told.
    pub(super) fn write_now(&self, bytes: &[u8]) {
        if !self.is_dead() {
            let sent = lock(&self.writer).write_all(bytes);
            self.kill_unless_sent(sent);
        }
    }

    fn kill_unless_sent(&self, sent: io::Result<()>) {
        if let Err(e) = sent {
            // A part-written request leaves the stream unusable; the kill
            // answers the waiters of what was not answered yet.
            self.kill(&format!("sending: {e}"));
        }
    }

    /// Sends `ask` without waiting: `done` runs with its outcome, on the
    /// reader thread; past `deadline` it is told `TimedOut`.
    pub fn start(self: &Arc<Self>, ask: &Ask<'_>, deadline: Instant, done: OnOutcome) {
        self.post(ask, Notify::Started { deadline, done });
    }

    /// Sends `ask` and waits for its reply until `deadline`.
    pub fn call(self: &Arc<Self>, ask: &Ask<'_>, deadline: Instant) -> Result<Answer, CallError> {
        // Nothing this thread held back waits while it does.
        crate::sync::run_deferred();
        let (tx, rx) = sync_channel(1);
        self.post(ask, Notify::Caller(tx));
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Outcome::Done(answer)) => Ok(answer),
            Ok(Outcome::Lost(why)) => Err(CallError::Lost(why)),
            Ok(Outcome::TimedOut) => Err(CallError::TimedOut),
            Ok(Outcome::NotSent) => Err(CallError::Lost("not sent".into())),
            Err(RecvTimeoutError::Timeout) => {
                self.kill("no reply in time");
                Err(CallError::TimedOut)
            }
            // Every waiter is answered before it is dropped; still, never hang.
            Err(RecvTimeoutError::Disconnected) => Err(CallError::Lost("reply reader ended".into())),
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.kill("closed");
        // The socket is shut down: the reader's next read returns at once.
        // A completion run by the reader may drop the last handle on the
        // link (a swapped-out table): the reader then ends by itself.
        if let Some(reader) = lock(&self.reader).take() {
            if std::thread::current().id() != self.reader_id {
                let _ = reader.join();
            }
        }
    }
}

/// `write_all` over several buffers: one sendmsg(2) for header and payload
/// when the socket takes them whole.
fn write_all_vectored(w: &mut impl Write, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
