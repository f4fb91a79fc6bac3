//! The connections of one remote export and the way a request gets through
//! them: round-robin over up to N links, all to one endpoint; a link that
//! breaks is replaced by dialing again (the candidates in their order of
//! preference, the endpoint in use first), and the request is resent until
//! its bound has passed.

use super::connection::{Answer, Ask, CallError, Link, OnOutcome, Outcome};
use super::handshake::ExportInfo;
use super::reply::nbd_error;
use super::{RemoteOptions, RemoteStatus};
use crate::endpoint::Endpoint;
use crate::nbd::*;
use crate::sync::{lock, wait_timeout};
use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Largest READ or WRITE to send: the server's maximum, within ours.
pub fn payload_piece(info: &ExportInfo) -> u64 {
    match info.maximum_block {
        0 => MAX_PAYLOAD as u64,
        m => m.min(MAX_PAYLOAD) as u64,
    }
}

/// Candidates, asked at each dial.
pub type Candidates = Arc<dyn Fn() -> Vec<Endpoint> + Send + Sync>;

/// Waits between rounds of dialing while no candidate answers.
const BACKOFF_FIRST: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_millis(500);
/// How long an endpoint that said ESHUTDOWN is tried after the others.
const SHUN: Duration = Duration::from_secs(2);

/// Where the links go, and the last thing that went wrong.
#[derive(Default)]
struct Place {
    /// The endpoint every live link is connected to.
    current: Option<Endpoint>,
    info: Option<ExportInfo>,
    shunned: Vec<(Endpoint, Instant)>,
    last_error: Option<String>,
}

pub struct Links {
    options: RemoteOptions,
    candidates: Candidates,
    slots: Vec<Mutex<Option<Arc<Link>>>>,
    /// Slots in use: all, or one when the server cannot keep several
    /// connections coherent (no CAN_MULTI_CONN: a FLUSH on one would not
    /// cover writes acknowledged on another).
    width: AtomicUsize,
    next: AtomicUsize,
    /// One dial at a time (true while one runs): a dead first candidate
    /// costs one connect timeout, not one per waiting request.
    dialing: Mutex<bool>,
    dialed: Condvar,
    place: Mutex<Place>,
    sent: AtomicU64,
    retries: AtomicU64,
    failed: AtomicU64,
}

/// Clears the dialing flag however the dial ends.
struct Turn<'a>(&'a Links);

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        *lock(&self.0.dialing) = false;
        // All: a waiter past its deadline leaves without dialing.
        self.0.dialed.notify_all();
    }
}

impl Links {
    pub fn new(options: RemoteOptions, candidates: Candidates) -> Links {
        let n = options.connections.max(1);
        Links {
            slots: (0..n).map(|_| Mutex::new(None)).collect(),
            width: AtomicUsize::new(n),
            next: AtomicUsize::new(0),
            dialing: Mutex::new(false),
            dialed: Condvar::new(),
            place: Mutex::default(),
            sent: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            options,
            candidates,
        }
    }

    pub fn export(&self) -> &str {
        &self.options.export
    }

    /// The export as the server described it, connecting first if no link
    /// ever was (the flags decide how requests are sent).
    pub fn info(&self) -> io::Result<ExportInfo> {
        if let Some(info) = lock(&self.place).info.clone() {
            return Ok(info);
        }
        let link = self.acquire(Instant::now() + self.options.bound)?;
        Ok(link.info.clone())
    }

    pub fn size(&self) -> Option<u64> {
        lock(&self.place).info.as_ref().map(|i| i.size)
    }

    /// Counts a failed request on its way to the caller.
    pub fn tally<T>(&self, r: io::Result<T>) -> io::Result<T> {
        if r.is_err() {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// Sends `ask` until it is answered or its bound has passed. An NBD
    /// error comes back as the caller's error, except ESHUTDOWN (the server
    /// is stopping or fenced), which is retried elsewhere like a lost link.
    pub fn submit(&self, ask: &Ask<'_>) -> io::Result<Vec<u8>> {
        let deadline = self.deadline();
        if deadline <= Instant::now() {
            // A resend past its bound: nothing is sent (a call with no time
            // left would kill a healthy link).
            return Err(self.give_up());
        }
        let mut attempts = 0u64;
        let mut backoff = BACKOFF_FIRST;
        loop {
            if attempts > 0 {
                // The first resend goes at once (another link or a fresh
                // dial); later ones wait a little, so that a server that
                // takes requests and drops them does not make a hot loop.
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(self.give_up());
                }
                if attempts > 1 {
                    std::thread::sleep(backoff.min(left));
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
            let link = self.acquire(deadline)?;
            if attempts > 0 {
                self.retries.fetch_add(1, Ordering::Relaxed);
            }
            attempts += 1;
            self.sent.fetch_add(1, Ordering::Relaxed);
            let answer: Answer = match link.call(ask, deadline) {
                Ok(answer) => answer,
                Err(CallError::Lost(why)) => {
                    self.note(format!("forwarding to {}: {why}", link.endpoint));
                    continue;
                }
                Err(CallError::TimedOut) => {
                    self.note(format!("forwarding to {}: no reply within {:?}", link.endpoint, self.options.bound));
                    return Err(self.give_up());
                }
            };
            match answer {
                Ok(data) => return Ok(data),
                Err((code, message)) if code == NbdError::Shutdown.code() => {
                    let why = format!("forwarding to {}: server shutting down (ESHUTDOWN) {message}", link.endpoint);
                    link.kill(&why);
                    self.shun(&link.endpoint);
                    self.note(why);
                }
                Err((code, message)) => {
                    tracing::debug!(export = %self.options.export, endpoint = %link.endpoint, code, %message, "forwarded request failed");
                    return Err(nbd_error(code));
                }
            }
        }
    }

    /// Sends `ask` on an open link without waiting: `done` runs with the
    /// outcome on the link's reader. `Lost` at once when the turn's slot
    /// has no open link (the caller then takes `submit`, which dials).
    pub fn start(&self, ask: &Ask<'_>, deadline: Instant, done: OnOutcome) {
        let width = self.width.load(Ordering::Relaxed);
        let i = self.next.fetch_add(1, Ordering::Relaxed) % width;
        match self.live(i) {
            Some(link) => {
                self.sent.fetch_add(1, Ordering::Relaxed);
                link.start(ask, deadline, done);
            }
            None => done(Outcome::NotSent),
        }
    }

    /// The deadline of a request sent now: the bound from now, or the
    /// one `within` set on this thread.
    pub fn deadline(&self) -> Instant {
        super::deadline::current().unwrap_or_else(|| Instant::now() + self.options.bound)
    }

    /// The flags and largest payload of the export, once a link told them.
    pub fn known_limits(&self) -> Option<(u16, u64)> {
        lock(&self.place).info.as_ref().map(|i| (i.flags, payload_piece(i)))
    }

    /// A started request that goes the blocking way after all.
    pub fn resent(&self, why: Option<String>) {
        self.retries.fetch_add(1, Ordering::Relaxed);
        if let Some(why) = why {
            self.note(format!("forwarding: {why}"));
        }
    }

    /// The error of a started request that got no reply in its bound.
    pub fn timed_out(&self) -> io::Error {
        self.note(format!("forwarding: no reply within {:?}", self.options.bound));
        self.give_up()
    }

    /// A live link, dialing when the slot's turn has none; waits between
    /// rounds while no candidate answers, never past `deadline`.
    fn acquire(&self, deadline: Instant) -> io::Result<Arc<Link>> {
        let mut backoff = BACKOFF_FIRST;
        loop {
            match self.link(deadline) {
                Ok(link) => return Ok(link),
                Err(Some(why)) => self.note(why),
                Err(None) => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.give_up());
            }
            std::thread::sleep(backoff.min(left));
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    fn live(&self, i: usize) -> Option<Arc<Link>> {
        lock(&self.slots[i]).as_ref().filter(|l| !l.is_dead()).cloned()
    }

    /// `Err(None)`: out of time before anything was tried.
    fn link(&self, deadline: Instant) -> Result<Arc<Link>, Option<String>> {
        let width = self.width.load(Ordering::Relaxed);
        let i = self.next.fetch_add(1, Ordering::Relaxed) % width;
        if let Some(link) = self.live(i) {
            return Ok(link);
        }
        let _turn = self.turn(deadline)?;
        // Another dial may have filled this slot while we waited, or found
        // a server that takes one connection only.
        let i = i % self.width.load(Ordering::Relaxed);
        if let Some(link) = self.live(i) {
            return Ok(link);
        }
        let link = Arc::new(self.dial(deadline)?);
        let i = if link.info.flags & TFLAG_CAN_MULTI_CONN == 0 {
            self.width.store(1, Ordering::Relaxed);
            0
        } else {
            i
        };
        // The old link (dead) is dropped outside the slot lock: its drop
        // joins its reader.
        let old = lock(&self.slots[i]).replace(Arc::clone(&link));
        drop(old);
        Ok(link)
    }

    fn turn(&self, deadline: Instant) -> Result<Turn<'_>, Option<String>> {
        let mut busy = lock(&self.dialing);
        while *busy {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(None);
            }
            busy = wait_timeout(&self.dialed, busy, left).0;
        }
        *busy = true;
        Ok(Turn(self))
    }

    /// The endpoints to try: the one in use first (links stay together),
    /// then the candidates in order, those shunned last.
    fn order(&self) -> Vec<Endpoint> {
        let mut list = (self.candidates)();
        let mut place = lock(&self.place);
        let now = Instant::now();
        place.shunned.retain(|(_, until)| *until > now);
        if let Some(current) = &place.current {
            if let Some(at) = list.iter().position(|e| e == current) {
                let e = list.remove(at);
                list.insert(0, e);
            }
        }
        let shunned = |e: &Endpoint| place.shunned.iter().any(|(s, _)| s == e);
        let (mut first, last): (Vec<_>, Vec<_>) = list.into_iter().partition(|e| !shunned(e));
        first.extend(last);
        first
    }

    /// Connects to the first endpoint that answers. Moving to another
    /// endpoint closes the links to the old one: all links go to one
    /// server, so that a FLUSH covers every write acknowledged before it.
    fn dial(&self, deadline: Instant) -> Result<Link, Option<String>> {
        let order = self.order();
        if order.is_empty() {
            return Err(Some("no candidate endpoint to forward to".into()));
        }
        let mut last = None;
        for endpoint in order {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            // A zero timeout is refused by connect(2) wrappers: at least 1 ms.
            let timeout = self.options.connect_timeout.min(left).max(Duration::from_millis(1));
            match Link::open(&endpoint, &self.options.export, self.options.stamp, timeout, self.options.bound) {
                Ok(link) => {
                    self.adopt(&link);
                    return Ok(link);
                }
                Err(e) => {
                    let why = format!("forwarding to {endpoint}: {e}");
                    self.note(why.clone());
                    last = Some(why);
                    let mut place = lock(&self.place);
                    if place.current.as_ref() == Some(&endpoint) {
                        place.current = None;
                    }
                }
            }
        }
        Err(last)
    }

    fn adopt(&self, link: &Link) {
        let moved = {
            let mut place = lock(&self.place);
            place.info = Some(link.info.clone());
            let moved = place.current.as_ref() != Some(&link.endpoint);
            place.current = Some(link.endpoint.clone());
            moved
        };
        if moved {
            tracing::info!(export = %self.options.export, endpoint = %link.endpoint, "forwarding connected");
            for slot in &self.slots {
                if let Some(old) = lock(slot).as_ref().filter(|l| l.endpoint != link.endpoint) {
                    old.kill(&format!("moved to {}", link.endpoint));
                }
            }
        }
    }

    fn shun(&self, endpoint: &Endpoint) {
        let mut place = lock(&self.place);
        place.shunned.retain(|(e, _)| e != endpoint);
        place.shunned.push((endpoint.clone(), Instant::now() + SHUN));
        if place.current.as_ref() == Some(endpoint) {
            place.current = None;
        }
    }

    fn note(&self, why: String) {
        tracing::debug!(export = %self.options.export, "{why}");
        lock(&self.place).last_error = Some(why);
    }

    /// The error of a request whose bound has passed.
    fn give_up(&self) -> io::Error {
        let last = lock(&self.place).last_error.clone().unwrap_or_else(|| "no answer".into());
        io::Error::new(io::ErrorKind::TimedOut, format!("export '{}': gave up after {:?}: {last}", self.options.export, self.options.bound))
    }

    pub fn status(&self) -> RemoteStatus {
        let connections = self.slots.iter().filter(|s| lock(s).as_ref().is_some_and(|l| !l.is_dead())).count();
        let place = lock(&self.place);
        RemoteStatus {
            endpoint: place.current.as_ref().filter(|_| connections > 0).map(|e| e.to_string()),
            connections,
            sent: self.sent.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            last_error: place.last_error.clone(),
        }
    }

    /// Closes every link; their readers end and are joined.
    pub fn close(&self) {
        for slot in &self.slots {
            if let Some(l) = lock(slot).as_ref() {
                l.kill("closed");
            }
        }
        for slot in &self.slots {
            let old = lock(slot).take();
            drop(old);
        }
    }
}
