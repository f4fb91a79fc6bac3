//! The in-memory transport a handshake case runs on: reads come from the
//! client's script (in chunks as small as one byte, so every partial read
//! path is taken), writes are recorded with the read position they were
//! made at, and STARTTLS "succeeds" without crypto: TLS is marked as
//! running and the script goes on in the clear, so the state machine after
//! STARTTLS is exercised as much as before it.
//!
//! It also bounds the case: past a step budget, or on reads after EOF,
//! it fails every call and records why, so a server loop that would spin
//! forever ends the case instead.

use crate::server::security::Transport;
use crate::tls::{TlsError, TlsPeer, TlsServer};
use std::io::{self, Read, Write};
use std::time::Duration;

/// What STARTTLS does on this transport.
#[derive(Debug, Clone)]
pub enum TlsOutcome {
    /// The handshake "works" and proves this.
    Succeed(TlsPeer),
    /// The handshake fails (a wrong key, a client that goes away).
    Fail,
}

/// Output written while the server had read `at` bytes of the script.
#[derive(Debug, Default)]
pub struct Written {
    pub at: usize,
    pub bytes: Vec<u8>,
}

pub struct ScriptTransport<'a> {
    script: &'a [u8],
    pos: usize,
    /// Most bytes one read returns.
    chunk: usize,
    tls: TlsOutcome,
    /// Read position when STARTTLS was run, and how often it was.
    pub tls_started_at: Option<usize>,
    pub start_tls_calls: usize,
    pub out: Vec<Written>,
    out_total: usize,
    /// Output accepted before writes fail (a client that stopped reading).
    out_limit: usize,
    pub write_failed: bool,
    /// Calls made after a write failed or after EOF was reported.
    pub calls_after_end: usize,
    eof_seen: bool,
    steps: usize,
    max_steps: usize,
    /// Why the transport cut the case short, if it did.
    pub runaway: Option<String>,
}

impl<'a> ScriptTransport<'a> {
    pub fn new(script: &'a [u8], chunk: usize, tls: TlsOutcome, out_limit: usize) -> ScriptTransport<'a> {
        // Each read returns at least a byte or reports EOF, each option
        // costs a handful of writes: a server that makes progress needs far
        // fewer calls than this.
        let max_steps = 64 + 4 * script.len();
        ScriptTransport {
            script,
            pos: 0,
            chunk: chunk.max(1),
            tls,
            tls_started_at: None,
            start_tls_calls: 0,
            out: Vec::new(),
            out_total: 0,
            out_limit,
            write_failed: false,
            calls_after_end: 0,
            eof_seen: false,
            steps: 0,
            max_steps,
            runaway: None,
        }
    }

    /// Bytes of the script the server consumed.
    pub fn consumed(&self) -> usize {
        self.pos
    }

    fn step(&mut self) -> io::Result<()> {
        self.steps += 1;
        if self.write_failed || self.eof_seen {
            self.calls_after_end += 1;
        }
        if self.steps > self.max_steps && self.runaway.is_none() {
            self.runaway = Some(format!("more than {} transport calls for a {}-byte script", self.max_steps, self.script.len()));
        }
        if self.calls_after_end > 16 && self.runaway.is_none() {
            self.runaway = Some("kept calling the transport after EOF or a failed write".into());
        }
        match self.runaway {
            Some(_) => Err(io::Error::other("fuzz transport: step bound exceeded")),
            None => Ok(()),
        }
    }
}

impl Read for ScriptTransport<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.step()?;
        let n = buf.len().min(self.chunk).min(self.script.len() - self.pos);
        if n == 0 && !buf.is_empty() {
            self.eof_seen = true;
        }
        buf[..n].copy_from_slice(&self.script[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl Write for ScriptTransport<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.step()?;
        if self.write_failed || self.out_total + buf.len() > self.out_limit {
            self.write_failed = true;
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "fuzz transport: the client stopped reading"));
        }
        self.out_total += buf.len();
        match self.out.last_mut() {
            Some(w) if w.at == self.pos => w.bytes.extend_from_slice(buf),
            _ => self.out.push(Written { at: self.pos, bytes: buf.to_vec() }),
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.step()
    }
}

impl Transport for ScriptTransport<'_> {
    fn start_tls(&mut self, _tls: &TlsServer, _timeout: Duration) -> Result<TlsPeer, TlsError> {
        self.step()?;
        self.start_tls_calls += 1;
        if self.tls_started_at.is_some() {
            return Err(TlsError::Handshake("TLS is already running".into()));
        }
        match &self.tls {
            TlsOutcome::Succeed(peer) => {
                self.tls_started_at = Some(self.pos);
                Ok(peer.clone())
            }
            TlsOutcome::Fail => Err(TlsError::Handshake("fuzz transport: handshake failed".into())),
        }
    }
}
