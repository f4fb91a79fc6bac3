//! The TLS relay, as nbd-client has one: the kernel's NBD client cannot
//! speak TLS, so it gets one end of a Unix socket pair and a thread per
//! connection copies bytes between the other end and the TLS session.
//!
//! One thread drives both directions of a session in a poll(2) loop with
//! non-blocking sockets: OpenSSL forbids concurrent calls on one session,
//! and a reader blocked in SSL_read would otherwise hold the writer up (a
//! lock around blocking calls deadlocks as soon as the server waits for a
//! request the writer cannot send).
//!
//! A relay ends when the kernel shuts its end (detach: the NBD_CMD_DISC
//! that precedes it is forwarded first, then close_notify), or when the
//! server's side ends (then the kernel's end is shut down, and the kernel
//! sees a dead connection as it would without TLS). The server closing
//! right after the kernel's NBD_CMD_DISC is the same detach: which side's
//! end the relay sees first is a race, so the relay follows the request
//! framing far enough to know whether a DISC went by.

use super::client::ServerSocket;
use crate::nbd::{decode_request_header, CMD_DISC, REQUEST_HEADER_LEN};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use openssl::ssl::{ErrorCode, SslStream};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;

/// Bytes buffered in each direction: a few TLS records' worth, so that
/// one direction stalling for a moment never holds up the other.
const BUFFER: usize = 256 * 1024;

/// Relay threads need little stack, and under `mlockall` every byte of it
/// stays resident.
const STACK: usize = 512 * 1024;

/// How a relay ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The device was detached: the kernel closed its end, or sent
    /// NBD_CMD_DISC and the server then closed.
    Detached,
    /// The server closed the session unasked; the kernel sees a dead
    /// connection.
    ServerClosed,
}

/// A relay that has ended, and how.
#[derive(Debug)]
pub struct RelayEnd {
    pub label: String,
    pub result: io::Result<Ended>,
}

impl RelayEnd {
    /// Whether it ended for a reason other than a detach.
    pub fn is_failure(&self) -> bool {
        !matches!(self.result, Ok(Ended::Detached))
    }
}

impl std::fmt::Display for RelayEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.result {
            Ok(Ended::Detached) => write!(f, "{}: relay ended (detached)", self.label),
            Ok(Ended::ServerClosed) => write!(f, "{}: the server closed the TLS connection", self.label),
            Err(e) => write!(f, "{}: TLS relay failed: {e}", self.label),
        }
    }
}

/// The running relays of one device.
#[derive(Debug, Default)]
pub struct Relays {
    running: Vec<(String, JoinHandle<io::Result<Ended>>)>,
}

impl Relays {
    pub fn new() -> Relays {
        Relays::default()
    }

    /// Starts relaying `session`; returns the socket to hand to the kernel.
    pub fn start(&mut self, label: String, session: SslStream<ServerSocket>) -> io::Result<OwnedFd> {
        let (kernel_end, ours) = UnixStream::pair()?;
        let handle = std::thread::Builder::new().name("tls-relay".into()).stack_size(STACK).spawn(move || relay(session, ours))?;
        self.running.push((label, handle));
        Ok(kernel_end.into())
    }

    pub fn len(&self) -> usize {
        self.running.len()
    }

    pub fn is_empty(&self) -> bool {
        self.running.is_empty()
    }

    /// Collects the relays that have ended, logging each.
    pub fn reap(&mut self) -> Vec<RelayEnd> {
        let mut ended = Vec::new();
        let mut i = 0;
        while i < self.running.len() {
            if !self.running[i].1.is_finished() {
                i += 1;
                continue;
            }
            let (label, handle) = self.running.swap_remove(i);
            let result = handle.join().unwrap_or_else(|_| Err(io::Error::other("the relay thread panicked")));
            let end = RelayEnd { label, result };
            if end.is_failure() {
                tracing::warn!("{end}");
            } else {
                tracing::debug!("{end}");
            }
            ended.push(end);
        }
        ended
    }
}

/// Bytes on their way in one direction: `buf[start..end]` is pending.
struct Pipe {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Pipe {
    fn new() -> Pipe {
        Pipe { buf: vec![0; BUFFER], start: 0, end: 0 }
    }

    fn pending(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn is_empty(&self) -> bool {
        self.start == self.end
    }

    fn has_room(&self) -> bool {
        self.end < self.buf.len() || self.start > 0
    }

    /// Free space after the pending bytes. Moving them to the front is
    /// safe while an SSL_write of them is waiting to be retried: the
    /// context has ACCEPT_MOVING_WRITE_BUFFER (TlsClient sets it).
    fn room(&mut self) -> &mut [u8] {
        if self.end == self.buf.len() && self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.buf[self.end..]
    }

    fn filled(&mut self, n: usize) {
        self.end += n;
    }

    fn consumed(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }
}

/// Follows the kernel's requests (28-byte headers, a WRITE's payload after
/// its header) until NBD_CMD_DISC goes by. A stream that loses framing is
/// no longer followed; it is relayed all the same.
#[derive(Default)]
struct Requests {
    header: [u8; REQUEST_HEADER_LEN],
    have: usize,
    payload_left: u64,
    disc: bool,
    lost: bool,
}

impl Requests {
    fn scan(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() && !self.disc && !self.lost {
            if self.payload_left > 0 {
                let n = self.payload_left.min(bytes.len() as u64) as usize;
                self.payload_left -= n as u64;
                bytes = &bytes[n..];
                continue;
            }
            let n = (REQUEST_HEADER_LEN - self.have).min(bytes.len());
            self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have == REQUEST_HEADER_LEN {
                self.have = 0;
                match decode_request_header(&self.header) {
                    Ok(h) => {
                        self.disc = h.command == CMD_DISC;
                        self.payload_left = h.payload_len() as u64;
                    }
                    Err(_) => self.lost = true,
                }
            }
        }
    }
}

/// What an OpenSSL call that could not go on waits for.
fn wants(e: &openssl::ssl::Error) -> Option<PollFlags> {
    match e.code() {
        ErrorCode::WANT_READ => Some(PollFlags::POLLIN),
        ErrorCode::WANT_WRITE => Some(PollFlags::POLLOUT),
        _ => None,
    }
}

fn tls_failure(what: &str, e: openssl::ssl::Error) -> io::Error {
    let kind = e.io_error().map(|io| io.kind()).unwrap_or(io::ErrorKind::Other);
    io::Error::new(kind, format!("{what}: {e}"))
}

fn gone(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset)
}

/// The relay loop of one connection; see the module comment.
fn relay(mut tls: SslStream<ServerSocket>, mut kernel: UnixStream) -> io::Result<Ended> {
    tls.get_ref().set_nonblocking(true)?;
    kernel.set_nonblocking(true)?;
    let mut up = Pipe::new(); // kernel → server: requests
    let mut down = Pipe::new(); // server → kernel: replies
    let mut kernel_eof = false;
    let mut kernel_gone = false; // writes to the kernel fail: drop replies
    let mut server_eof = false;
    let mut requests = Requests::default();
    loop {
        while !kernel_eof && up.has_room() {
            let room = up.room();
            match kernel.read(room) {
                Ok(0) => kernel_eof = true,
                Ok(n) => {
                    requests.scan(&room[..n]);
                    up.filled(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if gone(&e) => kernel_eof = true,
                Err(e) => return Err(io::Error::new(e.kind(), format!("reading from the kernel: {e}"))),
            }
        }
        let mut write_waits = PollFlags::empty();
        while !up.is_empty() {
            match tls.ssl_write(up.pending()) {
                Ok(n) => up.consumed(n),
                Err(e) => match wants(&e) {
                    Some(w) => {
                        write_waits = w;
                        break;
                    }
                    None => return Err(tls_failure("sending to the server", e)),
                },
            }
        }
        let mut read_waits = PollFlags::empty();
        while !server_eof && down.has_room() {
            match tls.ssl_read(down.room()) {
                Ok(n) => down.filled(n),
                Err(e) => match (wants(&e), e.code()) {
                    (Some(w), _) => {
                        read_waits = w;
                        break;
                    }
                    (None, ErrorCode::ZERO_RETURN) => server_eof = true,
                    // EOF without close_notify: a server that died.
                    (None, ErrorCode::SYSCALL) if e.io_error().is_none() => server_eof = true,
                    (None, _) => return Err(tls_failure("receiving from the server", e)),
                },
            }
        }
        while !down.is_empty() && !kernel_gone {
            match kernel.write(down.pending()) {
                Ok(n) => down.consumed(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if gone(&e) => kernel_gone = true,
                Err(e) => return Err(io::Error::new(e.kind(), format!("writing to the kernel: {e}"))),
            }
        }
        if kernel_gone {
            down.clear();
        }
        if kernel_eof && up.is_empty() {
            // Best effort: the socket is non-blocking, and the server
            // learns the end from the NBD_CMD_DISC before it anyway.
            let _ = tls.shutdown();
            return Ok(Ended::Detached);
        }
        if server_eof && down.is_empty() {
            let _ = kernel.shutdown(Shutdown::Both);
            return Ok(if requests.disc { Ended::Detached } else { Ended::ServerClosed });
        }
        let mut kernel_events = PollFlags::empty();
        if !kernel_eof && up.has_room() {
            kernel_events |= PollFlags::POLLIN;
        }
        if !down.is_empty() {
            kernel_events |= PollFlags::POLLOUT;
        }
        let server_events = write_waits | read_waits;
        // A socket with nothing to wait for stays out of the set: its
        // POLLHUP would otherwise wake the loop over and over.
        let mut fds = Vec::with_capacity(2);
        if !kernel_events.is_empty() {
            fds.push(PollFd::new(kernel.as_fd(), kernel_events));
        }
        if !server_events.is_empty() {
            fds.push(PollFd::new(tls.get_ref().as_fd(), server_events));
        }
        // The timeout is a safety net only: every state above that needs
        // no socket event was handled before getting here.
        match poll(&mut fds, PollTimeout::from(1000u16)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(io::Error::other(format!("poll: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::{RequestHeader, CMD_READ, CMD_WRITE};

    fn request(command: u16, length: u32) -> Vec<u8> {
        RequestHeader { flags: 0, command, cookie: 7, offset: 0, length }.encode().to_vec()
    }

    #[test]
    fn requests_see_disc_only_outside_write_payloads_whatever_the_cuts() {
        // A WRITE whose payload looks like a DISC header, then a READ, then
        // the real DISC.
        let mut stream = request(CMD_WRITE, 28);
        stream.extend(request(CMD_DISC, 0));
        stream.extend(request(CMD_READ, 4096));
        let before_disc = stream.len();
        stream.extend(request(CMD_DISC, 0));
        for cut in [1, 5, 27, 28, 29, 100] {
            let mut r = Requests::default();
            for (i, piece) in stream.chunks(cut).enumerate() {
                r.scan(piece);
                let seen = (i + 1) * cut;
                assert_eq!(r.disc, seen >= stream.len(), "cut {cut}, {seen} bytes seen ({before_disc} before the DISC)");
            }
        }
        let mut garbage = Requests::default();
        garbage.scan(&[0xff; 64]);
        assert!(garbage.lost && !garbage.disc);
    }

    #[test]
    fn pipe_moves_pending_bytes_to_the_front_only_when_full() {
        let mut p = Pipe::new();
        let room = p.room().len();
        assert_eq!(room, BUFFER);
        p.room()[..4].copy_from_slice(b"abcd");
        p.filled(4);
        p.consumed(1);
        assert_eq!(p.pending(), b"bcd");
        // Not full: the free space is after the pending bytes.
        assert_eq!(p.room().len(), BUFFER - 4);
        let n = p.room().len();
        p.filled(n);
        assert!(p.has_room(), "one consumed byte at the front is room");
        assert_eq!(p.room().len(), 1);
        assert_eq!(&p.pending()[..3], b"bcd");
        p.consumed(BUFFER - 1);
        assert!(p.is_empty());
        assert_eq!(p.room().len(), BUFFER);
    }
}
