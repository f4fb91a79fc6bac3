//! A link's reader thread: takes the server's replies off the socket and
//! hands each to its waiter (`LinkState`), judged by the pure `reply`;
//! started requests past their deadline are answered on its read ticks.

use super::connection::{LinkState, OVERDUE_TICK};
use super::handshake::ServerSocket;
use super::reply::{body_len, decode_chunk_header, decode_simple_reply, parse_chunk, Chunk, MAX_SMALL_CHUNK};
use crate::nbd::*;
use std::io::{self, BufReader, Read};
use std::time::Instant;

/// The reader's buffer: several small replies per recv(2).
const READ_BUFFER: usize = 64 * 1024;

/// Fills `buf`; a read timeout (every `OVERDUE_TICK`) only looks for
/// started requests past their deadline. Before a read that may sleep,
/// the work the completions put off runs (their replies, written
/// together: `crate::sync::defer_until_wait`).
fn read_fully(s: &mut BufReader<ServerSocket>, buf: &mut [u8], what: &str, state: &LinkState) -> Result<(), String> {
    let mut got = 0;
    while got < buf.len() {
        if s.buffer().is_empty() {
            crate::sync::run_deferred();
        }
        match s.read(&mut buf[got..]) {
            Ok(0) => return Err("the server closed the connection".into()),
            Ok(n) => got += n,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted) => state.expire_overdue()?,
            Err(e) => return Err(format!("reading {what}: {e}")),
        }
    }
    Ok(())
}

/// `data[at..at + len]`; `parse_chunk` placed it inside the request, and
/// a READ's buffer is the request's length, but a slip must not panic.
fn region(data: &mut [u8], at: usize, len: usize) -> Result<&mut [u8], String> {
    let size = data.len();
    at.checked_add(len).and_then(|end| data.get_mut(at..end)).ok_or_else(|| format!("chunk at {at}+{len} outside a {size}-byte buffer"))
}

/// The reader thread: replies until the link breaks; returns why.
pub(super) fn read_replies(state: &LinkState, socket: ServerSocket) -> Result<std::convert::Infallible, String> {
    crate::sync::runs_deferred_work();
    let _flushed = RunDeferredAtExit;
    let mut s = BufReader::with_capacity(READ_BUFFER, socket);
    let mut body = Vec::with_capacity(MAX_SMALL_CHUNK as usize);
    let mut next_check = Instant::now() + OVERDUE_TICK;
    loop {
        // A server answering others but never one request: found here.
        let now = Instant::now();
        if now >= next_check {
            state.expire_overdue()?;
            next_check = now + OVERDUE_TICK;
        }
        let mut magic = [0u8; 4];
        read_fully(&mut s, &mut magic, "a reply", state)?;
        match u32::from_be_bytes(magic) {
            SIMPLE_REPLY_MAGIC => {
                let mut rest = [0u8; 12];
                read_fully(&mut s, &mut rest, "a reply", state)?;
                let (error, cookie) = decode_simple_reply(&rest);
                let (span, mut data) = state.checkout(cookie)?;
                // Only a successful READ carries data after a simple reply.
                let chunk = if error != 0 {
                    Chunk::Error { code: error, message: String::new() }
                } else if span.read {
                    read_fully(&mut s, &mut data, "read data", state)?;
                    Chunk::Data { at: 0, len: data.len() }
                } else {
                    Chunk::None
                };
                state.checkin(cookie, data, &chunk, true)?;
            }
            STRUCTURED_REPLY_MAGIC => {
                let mut rest = [0u8; 16];
                read_fully(&mut s, &mut rest, "a reply chunk", state)?;
                let h = decode_chunk_header(&rest);
                body.resize(body_len(&h)?, 0);
                read_fully(&mut s, &mut body, "a reply chunk", state)?;
                let (span, mut data) = state.checkout(h.cookie)?;
                let chunk = parse_chunk(&h, &body, &span)?;
                match chunk {
                    Chunk::Data { at, len } => read_fully(&mut s, region(&mut data, at, len)?, "read data", state)?,
                    Chunk::Hole { at, len } => region(&mut data, at, len)?.fill(0),
                    Chunk::Status { ref descriptors } => data.extend_from_slice(descriptors),
                    Chunk::None | Chunk::OtherStatus | Chunk::Error { .. } => {}
                }
                state.checkin(h.cookie, data, &chunk, h.flags & REPLY_FLAG_DONE != 0)?;
            }
            other => return Err(format!("bad reply magic {other:#x}")),
        }
    }
}

/// Runs the work completions put off when the reader ends, however it
/// ends: replies held back for it must not wait for a read that never
/// comes.
struct RunDeferredAtExit;

impl Drop for RunDeferredAtExit {
    fn drop(&mut self) {
        crate::sync::run_deferred();
    }
}
