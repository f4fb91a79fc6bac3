//! One TLS session used by two threads at once: the connection's reader
//! decrypts requests while the reply writer encrypts replies. OpenSSL
//! forbids concurrent calls on one session, so both go through a mutex,
//! held only while OpenSSL works: the socket is non-blocking, and a thread
//! whose call needs the network releases the lock and waits in poll(2).
//! The reader therefore never blocks the writer, and a client that stops
//! reading blocks only the writer (until the write timeout).

use super::TlsPeer;
use crate::sync::lock;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use openssl::ssl::{ErrorCode, SslStream};
use std::io::{self, IoSlice, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct TlsSession<S> {
    shared: Arc<Shared<S>>,
}

impl<S> Clone for TlsSession<S> {
    fn clone(&self) -> Self {
        TlsSession { shared: self.shared.clone() }
    }
}

impl<S> std::fmt::Debug for TlsSession<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TlsSession({})", self.shared.peer.protocol)
    }
}

struct Shared<S> {
    ssl: Mutex<SslStream<S>>,
    fd: RawFd,
    read_timeout: Mutex<Option<Duration>>,
    write_timeout: Mutex<Option<Duration>>,
    /// Small replies are gathered here into one TLS record (TLS has no
    /// writev; a record per 16-byte reply header would double the cost).
    scratch: Mutex<Vec<u8>>,
    peer: TlsPeer,
}

/// Bytes gathered into one write; larger slices are written directly.
const GATHER: usize = 64 * 1024;

impl<S: Read + Write + AsRawFd> TlsSession<S> {
    /// Takes over an established session and makes its socket non-blocking.
    pub fn new(stream: SslStream<S>, peer: TlsPeer) -> io::Result<TlsSession<S>> {
        let fd = stream.get_ref().as_raw_fd();
        set_nonblocking(fd)?;
        Ok(TlsSession {
            shared: Arc::new(Shared {
                ssl: Mutex::new(stream),
                fd,
                read_timeout: Mutex::new(None),
                write_timeout: Mutex::new(None),
                scratch: Mutex::new(Vec::with_capacity(GATHER)),
                peer,
            }),
        })
    }

    /// Runs `f` on the socket under the session (e.g. for its address).
    pub fn with_socket<R>(&self, f: impl FnOnce(&S) -> R) -> R {
        f(lock(&self.shared.ssl).get_ref())
    }

    pub fn peer(&self) -> &TlsPeer {
        &self.shared.peer
    }

    /// Decrypted bytes waiting inside the session: a reader that polls the
    /// socket for the next request must look here first.
    pub fn pending(&self) -> bool {
        lock(&self.shared.ssl).ssl().pending() > 0
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) {
        *lock(&self.shared.read_timeout) = t;
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) {
        *lock(&self.shared.write_timeout) = t;
    }

    /// Sends close_notify if the session is free, then shuts the socket.
    pub fn shutdown(&self) {
        if let Ok(mut s) = self.shared.ssl.try_lock() {
            let _ = s.shutdown();
        }
        let _ = nix::sys::socket::shutdown(self.shared.fd, nix::sys::socket::Shutdown::Both);
    }

    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.recv(buf, true)
    }

    /// One read; `wait: false` returns `WouldBlock` when no whole record
    /// has arrived.
    pub fn recv(&self, buf: &mut [u8], wait: bool) -> io::Result<usize> {
        let deadline = deadline(*lock(&self.shared.read_timeout));
        loop {
            let result = lock(&self.shared.ssl).ssl_read(buf);
            match result {
                Ok(n) => return Ok(n),
                Err(e) => match e.code() {
                    ErrorCode::ZERO_RETURN => return Ok(0),
                    ErrorCode::WANT_READ | ErrorCode::WANT_WRITE if !wait => {
                        return Err(io::Error::new(io::ErrorKind::WouldBlock, "no TLS record yet"))
                    }
                    ErrorCode::WANT_READ => self.wait(PollFlags::POLLIN, deadline)?,
                    ErrorCode::WANT_WRITE => self.wait(PollFlags::POLLOUT, deadline)?,
                    ErrorCode::SYSCALL if e.io_error().is_none() => return Ok(0),
                    _ => return Err(into_io(e)),
                },
            }
        }
    }

    pub fn write(&self, buf: &[u8]) -> io::Result<usize> {
        self.send(buf, true)
    }

    /// One write; `wait: false` returns `WouldBlock` instead of waiting for
    /// room. A retry after `WouldBlock` must offer the same bytes first
    /// (OpenSSL may hold part of a record): the reply sink does, it
    /// consumes nothing that was not written.
    fn send(&self, buf: &[u8], wait: bool) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let deadline = deadline(*lock(&self.shared.write_timeout));
        loop {
            let result = lock(&self.shared.ssl).ssl_write(buf);
            match result {
                Ok(n) => return Ok(n),
                Err(e) => match e.code() {
                    ErrorCode::WANT_WRITE | ErrorCode::WANT_READ if !wait => {
                        return Err(io::Error::new(io::ErrorKind::WouldBlock, "TLS socket full"))
                    }
                    ErrorCode::WANT_WRITE => self.wait(PollFlags::POLLOUT, deadline)?,
                    ErrorCode::WANT_READ => self.wait(PollFlags::POLLIN, deadline)?,
                    _ => return Err(into_io(e)),
                },
            }
        }
    }

    pub fn write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.send_vectored(bufs, true)
    }

    /// Writes the first slice directly if it is large, else gathers small
    /// slices (and the head of a large one) into one record.
    pub fn send_vectored(&self, bufs: &[IoSlice<'_>], wait: bool) -> io::Result<usize> {
        let mut slices = bufs.iter().filter(|b| !b.is_empty());
        let Some(first) = slices.next() else { return Ok(0) };
        if first.len() >= GATHER / 4 {
            return self.send(first, wait);
        }
        let mut scratch = lock(&self.shared.scratch);
        scratch.clear();
        for slice in std::iter::once(first).chain(slices) {
            let room = GATHER - scratch.len();
            scratch.extend_from_slice(&slice[..slice.len().min(room)]);
            if scratch.len() == GATHER {
                break;
            }
        }
        self.send(&scratch, wait)
    }

    fn wait(&self, events: PollFlags, deadline: Option<Instant>) -> io::Result<()> {
        loop {
            let timeout = match deadline {
                None => PollTimeout::NONE,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(io::Error::new(io::ErrorKind::WouldBlock, "TLS socket timed out"));
                    }
                    PollTimeout::try_from(left.as_millis().clamp(1, 60_000) as i32).unwrap_or(PollTimeout::MAX)
                }
            };
            // SAFETY: the fd belongs to the SslStream this session owns,
            // which outlives the call.
            let fd = unsafe { BorrowedFd::borrow_raw(self.shared.fd) };
            match poll(&mut [PollFd::new(fd, events)], timeout) {
                Ok(0) => {}
                Ok(_) => return Ok(()),
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(io::Error::from_raw_os_error(e as i32)),
            }
        }
    }
}

impl<S> AsRawFd for TlsSession<S> {
    fn as_raw_fd(&self) -> RawFd {
        self.shared.fd
    }
}

fn deadline(timeout: Option<Duration>) -> Option<Instant> {
    timeout.map(|t| Instant::now() + t)
}

fn into_io(e: openssl::ssl::Error) -> io::Error {
    match e.into_io_error() {
        Ok(io) => io,
        Err(e) => io::Error::other(e.to_string()),
    }
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = fcntl(fd, FcntlArg::F_GETFL).map_err(io::Error::from)?;
    fcntl(fd, FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK)).map_err(io::Error::from)?;
    Ok(())
}
