//! A connected client socket, TCP or Unix, plain or (after STARTTLS) TLS.

use nix::sys::socket::{getsockopt, sendmsg, sockopt, MsgFlags, UnixAddr};
use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use crate::tls::TlsSession;

/// Whether a write may wait for the peer to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Up to the socket's send timeout.
    Yes,
    /// Not at all (`MSG_DONTWAIT`): what fits in the socket buffer.
    No,
}

#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    /// Clones share the session (see `TlsSession`).
    Tls(TlsSession<Stream>),
}

impl Stream {
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tls(s) => Stream::Tls(s.clone()),
        })
    }

    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(timeout),
            Stream::Unix(s) => s.set_read_timeout(timeout),
            Stream::Tls(s) => {
                s.set_read_timeout(timeout);
                Ok(())
            }
        }
    }

    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(timeout),
            Stream::Unix(s) => s.set_write_timeout(timeout),
            Stream::Tls(s) => {
                s.set_write_timeout(timeout);
                Ok(())
            }
        }
    }

    pub fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
            Stream::Tls(s) => {
                s.shutdown();
                Ok(())
            }
        };
    }

    pub fn peer(&self) -> String {
        match self {
            Stream::Tcp(s) => s.peer_addr().map_or_else(|_| "tcp:?".into(), |a| format!("tcp:{a}")),
            Stream::Unix(_) => "unix".into(),
            Stream::Tls(s) => s.with_socket(|plain| plain.peer()),
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    /// Request bytes already decrypted inside a TLS session, which a poll
    /// of the socket would not see.
    pub fn tls_pending(&self) -> bool {
        match self {
            Stream::Tls(s) => s.pending(),
            _ => false,
        }
    }

    /// One `sendmsg` of `bufs`; returns the bytes written, which may be
    /// fewer than offered. With `Wait::No` a full socket is `WouldBlock`.
    pub fn send_vectored(&self, bufs: &[IoSlice<'_>], how: Wait) -> io::Result<usize> {
        if let Stream::Tls(s) = self {
            return s.send_vectored(bufs, how == Wait::Yes);
        }
        let mut flags = MsgFlags::MSG_NOSIGNAL;
        if how == Wait::No {
            flags |= MsgFlags::MSG_DONTWAIT;
        }
        loop {
            match sendmsg::<UnixAddr>(self.as_raw_fd(), bufs, &[], flags, None) {
                Ok(0) if bufs.iter().any(|b| !b.is_empty()) => {
                    return Err(io::Error::new(io::ErrorKind::WriteZero, "peer stopped reading"))
                }
                Ok(n) => return Ok(n),
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The socket's send buffer size (`SO_SNDBUF`).
    pub fn send_buffer_size(&self) -> Option<usize> {
        getsockopt(self, sockopt::SndBuf).ok()
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
            // SAFETY: the session owns the socket for as long as `self`
            // (one of its handles) lives.
            Stream::Tls(s) => unsafe { BorrowedFd::borrow_raw(s.as_raw_fd()) },
        }
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tls(s) => s.as_raw_fd(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Unix(s) => s.write_vectored(bufs),
            Stream::Tls(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
