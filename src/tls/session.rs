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
            let result = {
                let mut ssl = lock(&self.shared.ssl);
                ssl.ssl_read(buf).map(|n| read_buffered(&mut ssl, buf, n))
            };
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

    /// Writes as much of `bufs` as the socket takes, like a `writev`:
    /// fewer bytes than offered only when the socket is full (then
    /// `WouldBlock` if nothing went). One SSL_write takes one record at most
    /// (partial-write mode), so this loops; a short count must mean "full"
    /// to the reply sink, which hands a full socket to its flusher thread.
    pub fn send_vectored(&self, bufs: &[IoSlice<'_>], wait: bool) -> io::Result<usize> {
        let mut done = 0;
        loop {
            match self.send_gathered(bufs, done, wait) {
                Ok(0) => return Ok(done),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && done > 0 => return Ok(done),
                Err(e) => return Err(e),
            }
        }
    }

    /// One SSL_write of `bufs` after its first `skip` bytes: the next slice
    /// directly if it is large, else the small slices (and the head of a
    /// large one) gathered into one buffer. A retry after `WouldBlock`
    /// offers the same bytes first, as OpenSSL requires.
    fn send_gathered(&self, bufs: &[IoSlice<'_>], mut skip: usize, wait: bool) -> io::Result<usize> {
        let mut slices = bufs.iter().filter_map(|b| {
            let rest = b.get(skip.min(b.len())..).unwrap_or_default();
            skip = skip.saturating_sub(b.len());
            (!rest.is_empty()).then_some(rest)
        });
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

/// After a read of `n` bytes, decrypts the further records OpenSSL has
/// already taken from the socket (read-ahead) into the rest of `buf`: a
/// client that pipelines sends a record per request, and SSL_read returns
/// one record at a time. The reader then sees every waiting request at
/// once and corks their replies together (one record and one send for
/// several replies). Stops at the first record not wholly buffered, so it
/// never waits; an error here shows again at the next read.
fn read_buffered<S: Read + Write>(ssl: &mut SslStream<S>, buf: &mut [u8], mut n: usize) -> usize {
    while n > 0 && n < buf.len() && has_pending(ssl.ssl()) {
        match ssl.ssl_read(&mut buf[n..]) {
            Ok(more) if more > 0 => n += more,
            _ => break,
        }
    }
    n
}

/// Bytes buffered inside the session, decrypted or not (`SSL_has_pending`).
fn has_pending(ssl: &openssl::ssl::SslRef) -> bool {
    use foreign_types::ForeignTypeRef;
    extern "C" {
        fn SSL_has_pending(s: *const openssl_sys::SSL) -> std::ffi::c_int;
    }
    // SAFETY: a valid SSL pointer borrowed for the call; SSL_has_pending
    // (OpenSSL >= 1.1.0, vendored here) only reads the session's buffers.
    unsafe { SSL_has_pending(ssl.as_ptr()) == 1 }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{TlsClient, TlsClientFiles, TlsFiles, TlsServer};
    use std::os::unix::net::UnixStream;

    /// A PSK session over a socket pair: (server session, client stream).
    fn pair() -> (TlsSession<UnixStream>, SslStream<UnixStream>) {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys.psk");
        std::fs::write(&keys, "alice:000102030405060708090a0b0c0d0e0f\n").unwrap();
        let server = TlsServer::load(&TlsFiles { psk: Some(keys.clone()), ..Default::default() }).unwrap();
        let client = TlsClient::load(&TlsClientFiles { psk: Some(keys), ..Default::default() }).unwrap();
        let (ours, theirs) = UnixStream::pair().unwrap();
        let connecting = std::thread::spawn(move || client.connect(None, theirs).unwrap());
        let (stream, peer) = server.accept(ours).unwrap();
        (TlsSession::new(stream, peer).unwrap(), connecting.join().unwrap())
    }

    /// A pipelining client sends a record per request; one read takes
    /// every record that has arrived, so the reader sees them all at once.
    #[test]
    fn one_read_takes_every_record_already_arrived() {
        let (session, mut client) = pair();
        for i in 0..5u8 {
            client.write_all(&[i; 32]).unwrap();
        }
        std::thread::sleep(Duration::from_millis(100));
        let mut buf = vec![0u8; 4096];
        let n = session.recv(&mut buf, true).unwrap();
        assert_eq!(n, 160, "five 32-byte records in one read");
        assert!(buf[..160].chunks(32).enumerate().all(|(i, c)| c.iter().all(|&b| b == i as u8)));
        assert!(matches!(session.recv(&mut buf, false), Err(e) if e.kind() == io::ErrorKind::WouldBlock));
    }

    /// A write of more than one record's worth goes out whole while the
    /// socket has room (a short count tells the reply sink "socket full"),
    /// and stops short, without waiting, once it is full.
    #[test]
    fn a_vectored_write_is_short_only_when_the_socket_is_full() {
        let (session, mut client) = pair();
        let replies: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i; 4112]).collect();
        let slices: Vec<IoSlice<'_>> = replies.iter().map(|r| IoSlice::new(r)).collect();
        assert_eq!(session.send_vectored(&slices, false).unwrap(), 41120, "four records' worth in one call");
        let mut got = vec![0u8; 41120];
        client.read_exact(&mut got).unwrap();
        assert!(got.chunks(4112).enumerate().all(|(i, c)| c.iter().all(|&b| b == i as u8)));

        let big = vec![7u8; 16 << 20];
        let n = session.send_vectored(&[IoSlice::new(&big)], false).unwrap();
        assert!(n > 0 && n < big.len(), "a client that does not read: {n} bytes taken");
        let reading = std::thread::spawn(move || {
            let mut all = vec![0u8; 16 << 20];
            client.read_exact(&mut all).unwrap();
            all
        });
        let mut sent = n;
        while sent < big.len() {
            sent += session.send_vectored(&[IoSlice::new(&big[sent..])], true).unwrap();
        }
        assert!(reading.join().unwrap().iter().all(|&b| b == 7));
    }
}
