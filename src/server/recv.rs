//! The reader's receive buffer: a `BufReader` that can also take what the
//! socket holds *without blocking* while earlier bytes are still unread
//! (moving them to the front first).
//!
//! A reader that must wait for budget calls [`RecvBuf::take_pending`]
//! first. Without it, requests already in its buffer would keep it from
//! reading the socket, the client's socket would stay full, and a client
//! that reads replies only once it can write again (nbd-tester-client)
//! would wait for nothing: its requests are only taken, never answered
//! early. The buffer is allocated once per connection either way; only the
//! pages a read reaches count in RSS.

use super::stream::Stream;
use std::io::{self, Read};
use std::mem::MaybeUninit;
use std::os::fd::AsRawFd;

pub struct RecvBuf {
    stream: Stream,
    /// Bytes `[start, end)` are received and not yet consumed; everything
    /// before `end` was written by the kernel at some point, so `[0, end)`
    /// is initialised.
    buf: Box<[MaybeUninit<u8>]>,
    start: usize,
    end: usize,
}

impl RecvBuf {
    pub fn new(stream: Stream, capacity: usize) -> RecvBuf {
        // Uninitialised: a zeroed buffer would be touched (and count in
        // RSS) in full for every connection, idle or not. A TLS session
        // decrypts into a `&mut [u8]`, which must be initialised memory.
        let mut buf = Box::new_uninit_slice(capacity);
        if stream.is_tls() {
            buf.fill(MaybeUninit::new(0));
        }
        RecvBuf { stream, buf, start: 0, end: 0 }
    }

    pub fn get_ref(&self) -> &Stream {
        &self.stream
    }

    /// The received bytes not yet consumed.
    pub fn buffer(&self) -> &[u8] {
        // SAFETY: `[start, end)` was written by `recv` (see `buf`).
        unsafe { std::slice::from_raw_parts(self.buf.as_ptr().add(self.start).cast::<u8>(), self.end - self.start) }
    }

    pub fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
    }

    /// The buffered bytes, reading from the socket (which may block, up to
    /// its read timeout) only if there are none. Empty means end of stream.
    pub fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            let n = self.recv_tail(false)?;
            self.end += n;
        }
        Ok(self.buffer())
    }

    /// Moves what the socket holds into the buffer's free space without
    /// waiting; returns the bytes taken (0 if none, or at end of stream,
    /// which the next `fill_buf` reports).
    pub fn take_pending(&mut self) -> io::Result<usize> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() && self.start >= self.buf.len() / 4 {
            // Only a full tail is worth a move, and only one that frees a
            // quarter of the buffer: a reader at its budget limit calls
            // this for every request it admits, and moving up to 256 KiB
            // to gain a few bytes each time would cost more than the
            // requests.
            let len = self.end - self.start;
            // SAFETY: moves initialised bytes within the buffer.
            unsafe { std::ptr::copy(self.buf.as_ptr().add(self.start), self.buf.as_mut_ptr(), len) };
            self.start = 0;
            self.end = len;
        }
        match self.recv_tail(true) {
            Ok(n) => {
                self.end += n;
                Ok(n)
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// One `recv` into `buf[end..]`.
    fn recv_tail(&mut self, dont_wait: bool) -> io::Result<usize> {
        let free = self.buf.len() - self.end;
        if free == 0 {
            return Ok(0);
        }
        if let Stream::Tls(tls) = &self.stream {
            // SAFETY: a TLS stream's buffer was zeroed in `new`.
            let tail = unsafe { std::slice::from_raw_parts_mut(self.buf.as_mut_ptr().add(self.end).cast::<u8>(), free) };
            return tls.recv(tail, !dont_wait);
        }
        let flags = if dont_wait { libc::MSG_DONTWAIT } else { 0 };
        // SAFETY: the kernel writes at most `free` bytes into the buffer's
        // tail, which we own; it is only read back up to the count returned.
        let n = unsafe { libc::recv(self.stream.as_raw_fd(), self.buf.as_mut_ptr().add(self.end).cast(), free, flags) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

impl Read for RecvBuf {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        // Large reads with nothing buffered go straight to the caller (a
        // WRITE payload), as `BufReader` does.
        if self.start == self.end && out.len() >= self.buf.len() {
            return self.stream.read(out);
        }
        let have = self.fill_buf()?;
        let n = have.len().min(out.len());
        out[..n].copy_from_slice(&have[..n]);
        self.consume(n);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    #[test]
    fn takes_pending_bytes_behind_unread_ones() {
        let (ours, mut peer) = UnixStream::pair().unwrap();
        let mut r = RecvBuf::new(Stream::Unix(ours), 16);
        peer.write_all(b"abcdef").unwrap();
        assert_eq!(r.fill_buf().unwrap(), b"abcdef");
        r.consume(4);
        assert_eq!(r.take_pending().unwrap(), 0, "nothing pending: no wait");
        peer.write_all(b"0123456789ABCDEFGH").unwrap();
        assert_eq!(r.take_pending().unwrap(), 10, "fills the tail behind 'ef'");
        assert_eq!(r.buffer(), b"ef0123456789");
        assert_eq!(r.take_pending().unwrap(), 4, "a full tail: 'ef...' moves to the front, freeing 4 bytes");
        assert_eq!(r.buffer(), b"ef0123456789ABCD");
        r.consume(1);
        assert_eq!(r.take_pending().unwrap(), 0, "a move would free too little");
        assert_eq!(r.buffer(), b"f0123456789ABCD");
        let mut out = [0u8; 4];
        r.read_exact(&mut out).unwrap();
        assert_eq!(&out, b"f012");
        let mut rest = vec![0u8; 13];
        r.read_exact(&mut rest).unwrap();
        assert_eq!(rest, b"3456789ABCDEFGH".as_slice()[..13]);
        drop(peer);
        let mut tail = Vec::new();
        r.read_to_end(&mut tail).unwrap();
        assert_eq!(tail, b"GH");
    }
}
