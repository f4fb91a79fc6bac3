//! The reference model of option haggling: walks the client's script the
//! way proto.md and our policy say the server must, and checks every reply
//! the server wrote against it (what it answered, where in the script it
//! answered, how far it read, how it ended). The options that name an
//! export are in `expect_exports.rs`.

use super::fixture::{Peer, Who};
use super::replies::{replies_to, Reply};
use super::setup::Setup;
use super::transport::Written;
use super::Violation;
use crate::nbd::*;
use crate::tls::TlsMode;
use std::io;

/// How the server must end the handshake.
#[derive(Debug)]
pub enum End {
    Transmit(Agreed),
    Closed,
    Failed(io::ErrorKind),
    /// A reply could not be written: the server gives up with the error
    /// (ABORT, which ignores it, ends `Closed`).
    WriteFailed,
}

/// What a successful GO or EXPORT_NAME agreed on.
#[derive(Debug)]
pub struct Agreed {
    pub volume: &'static str,
    pub read_only: bool,
    pub structured: bool,
    pub meta: Vec<(u32, String)>,
    pub flags: u16,
}

/// The pseudo-option under which how a case ended is noted as a feature.
const END_FEATURE: u32 = u32::MAX;

pub(super) enum Flow {
    Next,
    End(End),
}

pub struct Walker<'a> {
    pub(super) setup: &'a Setup,
    script: &'a [u8],
    /// Output by read position, and whether the model accounted for it.
    groups: Vec<(usize, &'a [u8], bool)>,
    write_failed: bool,
    tls_started_at: Option<usize>,
    pub(super) who: Who,
    pub(super) structured: bool,
    /// The export a SET_META_CONTEXT selected for, and its contexts.
    pub(super) meta: Option<(String, Vec<(u32, String)>)>,
    pub(super) no_zeroes: bool,
    /// Behaviour seen, hashed (the driver keeps inputs that show new ones).
    pub features: Vec<u64>,
}

impl<'a> Walker<'a> {
    pub fn new(setup: &'a Setup, script: &'a [u8], out: &'a [Written], write_failed: bool, tls_started_at: Option<usize>) -> Walker<'a> {
        Walker {
            setup,
            script,
            groups: out.iter().map(|w| (w.at, w.bytes.as_slice(), false)).collect(),
            write_failed,
            tls_started_at,
            who: Who { origin: setup.origin, tls: None },
            structured: false,
            meta: None,
            no_zeroes: false,
            features: Vec::new(),
        }
    }

    /// Walks the whole script; returns how the server must have ended and
    /// how many bytes it must have read. Every output must be accounted for.
    pub fn walk(&mut self) -> Result<(End, usize), Violation> {
        let (end, consumed) = self.walk_options()?;
        if let Some((at, bytes, _)) = self.groups.iter().find(|g| !g.2) {
            return Err(Violation::new(format!("{} bytes written at script offset {at} answer no option", bytes.len())));
        }
        self.note(END_FEATURE, end_code(&end));
        Ok((end, consumed))
    }

    fn walk_options(&mut self) -> Result<(End, usize), Violation> {
        match self.group(0) {
            Some(g) if g == server_greeting() => {}
            other => return Err(Violation::new(format!("greeting {other:02x?}"))),
        }
        let script = self.script;
        let Some(flags) = script.get(..4) else { return Ok((End::Failed(io::ErrorKind::UnexpectedEof), script.len())) };
        let flags = u32::from_be_bytes([flags[0], flags[1], flags[2], flags[3]]);
        if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            return Ok((End::Failed(io::ErrorKind::InvalidData), 4));
        }
        self.no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
        let mut pos = 4;
        loop {
            let Some(header) = script.get(pos..pos + OPTION_HEADER_LEN) else { return Ok((End::Closed, script.len())) };
            let hdr_end = pos + OPTION_HEADER_LEN;
            if u64::from_be_bytes(header[..8].try_into().map_err(|_| Violation::new("header"))?) != IHAVEOPT {
                return Ok((End::Failed(io::ErrorKind::InvalidData), hdr_end));
            }
            let option = u32::from_be_bytes([header[8], header[9], header[10], header[11]]);
            let len = u32::from_be_bytes([header[12], header[13], header[14], header[15]]);
            let end = hdr_end + len as usize;
            if len > self.setup.max_option_payload.min(MAX_OPTION_LEN) {
                if option == OPT_EXPORT_NAME {
                    return Ok((End::Closed, hdr_end));
                }
                if end > script.len() {
                    return Ok((End::Failed(io::ErrorKind::UnexpectedEof), script.len()));
                }
                match self.expect_error(option, end, REP_ERR_TOO_BIG)? {
                    Flow::Next => pos = end,
                    Flow::End(e) => return Ok((e, end)),
                }
                continue;
            }
            let Some(payload) = script.get(hdr_end..end) else { return Ok((End::Failed(io::ErrorKind::UnexpectedEof), script.len())) };
            let flow = self.option(option, payload, end)?;
            if let Flow::End(e) = flow {
                return Ok((e, end));
            }
            pos = end;
        }
    }

    /// One complete option, `payload` read up to script offset `end`.
    fn option(&mut self, option: u32, payload: &[u8], end: usize) -> Result<Flow, Violation> {
        if self.setup.stopping {
            if option == OPT_EXPORT_NAME {
                return Ok(Flow::End(End::Closed));
            }
            return Ok(match self.expect_error(option, end, REP_ERR_SHUTDOWN)? {
                Flow::Next => Flow::End(End::Closed),
                stop => stop,
            });
        }
        if self.setup.mode == TlsMode::Require && self.who.tls.is_none() && !matches!(option, OPT_STARTTLS | OPT_ABORT) {
            if option == OPT_EXPORT_NAME {
                return Ok(Flow::End(End::Closed));
            }
            return self.expect_error(option, end, REP_ERR_TLS_REQD);
        }
        match option {
            OPT_EXPORT_NAME => self.export_name(payload, end),
            OPT_ABORT => match self.replies(option, end)? {
                None => Ok(Flow::End(End::Closed)),
                Some(r) => {
                    self.only(option, &r, REP_ACK)?;
                    Ok(Flow::End(End::Closed))
                }
            },
            OPT_LIST if !payload.is_empty() => self.expect_error(option, end, REP_ERR_INVALID),
            OPT_LIST => self.list(end),
            OPT_STARTTLS => self.start_tls(payload, end),
            OPT_INFO | OPT_GO => self.info_or_go(option, payload, end),
            OPT_STRUCTURED_REPLY if !payload.is_empty() => self.expect_error(option, end, REP_ERR_INVALID),
            OPT_STRUCTURED_REPLY => {
                let flow = self.expect_error(option, end, REP_ACK)?;
                self.structured = true;
                Ok(flow)
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => self.meta_context(option, payload, end),
            _ => self.expect_error(option, end, REP_ERR_UNSUP),
        }
    }

    fn start_tls(&mut self, payload: &[u8], end: usize) -> Result<Flow, Violation> {
        let option = OPT_STARTTLS;
        if !payload.is_empty() || self.who.tls.is_some() {
            return self.expect_error(option, end, REP_ERR_INVALID);
        }
        if self.setup.mode == TlsMode::Off {
            return self.expect_error(option, end, REP_ERR_POLICY);
        }
        if let Flow::End(e) = self.expect_error(option, end, REP_ACK)? {
            return Ok(Flow::End(e));
        }
        if self.setup.tls_fails {
            return Ok(Flow::End(End::Closed));
        }
        if self.tls_started_at != Some(end) {
            return Err(Violation::new(format!("STARTTLS acknowledged at offset {end}, TLS started at {:?}", self.tls_started_at)));
        }
        // proto.md: what was negotiated before TLS is forgotten.
        self.who.tls = Some(self.setup.peer);
        self.structured = false;
        self.meta = None;
        Ok(Flow::Next)
    }

    /// The output written right after the option ending at `end`.
    fn group(&mut self, end: usize) -> Option<&'a [u8]> {
        let g = self.groups.iter_mut().find(|g| g.0 == end && !g.2)?;
        g.2 = true;
        Some(g.1)
    }

    /// The replies to the option ending at `end`; `None` if the server could
    /// not write them (the case's client stopped reading).
    pub(super) fn replies(&mut self, option: u32, end: usize) -> Result<Option<Vec<Reply<'a>>>, Violation> {
        let tls = self.who.tls.is_some();
        match self.group(end) {
            Some(out) => replies_to(option, tls, out).map(Some),
            None if self.write_failed => Ok(None),
            None => Err(Violation::new(format!("option {} ({option}) ending at offset {end} got no reply", option_name(option)))),
        }
    }

    /// Raw output after the option ending at `end` (EXPORT_NAME's reply).
    pub(super) fn raw(&mut self, end: usize) -> Option<&'a [u8]> {
        self.group(end)
    }

    pub(super) fn write_failed(&self) -> bool {
        self.write_failed
    }

    /// Checks the option was answered by exactly one reply of `kind`.
    pub(super) fn expect_error(&mut self, option: u32, end: usize, kind: u32) -> Result<Flow, Violation> {
        match self.replies(option, end)? {
            None => Ok(Flow::End(End::WriteFailed)),
            Some(r) => self.only(option, &r, kind).map(|()| Flow::Next),
        }
    }

    fn only(&mut self, option: u32, r: &[Reply<'_>], kind: u32) -> Result<(), Violation> {
        self.note(option, kind as u64);
        match r {
            [one] if one.kind == kind && (kind != REP_ACK || one.data.is_empty()) => Ok(()),
            _ => Err(Violation::new(format!(
                "{} ({option}) answered {:x?}, expected only {kind:#x} (tls {:?}, structured {})",
                option_name(option),
                r.iter().map(|r| r.kind).collect::<Vec<_>>(),
                self.who.tls,
                self.structured
            ))),
        }
    }

    /// Records a behaviour: this option got this answer in this state.
    pub(super) fn note(&mut self, option: u32, answer: u64) {
        let peer = match self.who.tls {
            None => 0,
            Some(Peer::PskAlice) => 1,
            Some(Peer::PskBob) => 2,
            Some(Peer::CertAlice) => 3,
            Some(Peer::Anonymous) => 4,
        };
        let parts = [option.min(64) as u64, answer, peer, self.structured as u64, self.setup.server_class(), self.setup.origin as u64];
        let h = parts.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, p| (h ^ p).wrapping_mul(0x0100_0000_01b3));
        self.features.push(h);
    }
}

fn end_code(end: &End) -> u64 {
    match end {
        End::Transmit(a) => 1 + a.structured as u64 * 2 + !a.meta.is_empty() as u64 * 4 + a.read_only as u64 * 8,
        End::Closed => 16,
        End::Failed(io::ErrorKind::UnexpectedEof) => 32,
        End::Failed(_) => 33,
        End::WriteFailed => 64,
    }
}
