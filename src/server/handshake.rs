//! Option haggling on a fresh connection (fixed newstyle). Ends with the
//! export chosen and the transmission features agreed, or with the
//! connection closed. STARTTLS, the TLS modes and the size limits live
//! here; which exports a client may see is `exports.rs`.

use super::counters::{Limit, ServerCounters};
use super::meta::MetaContexts;
use super::security::{add_tls_peer, Security, Transport};
use crate::access::ClientIdentity;
use crate::nbd::*;
use crate::tls::TlsMode;
use crate::volume::{Catalog, Volume};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// What the client and server agreed on.
pub struct Negotiated {
    pub volume: Arc<Volume>,
    pub structured: bool,
    /// The metadata contexts the client selected, with their ids.
    pub meta: MetaContexts,
    pub flags: u16,
    /// Read-only for this client (the volume's setting or `read_only_for`).
    pub read_only: bool,
}

/// Transmission flags for `volume` as this client sees it.
pub fn export_flags(volume: &Volume, structured: bool, read_only: bool) -> u16 {
    let mut flags = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_CACHE | TFLAG_CAN_MULTI_CONN;
    if read_only {
        flags |= TFLAG_READ_ONLY;
    } else {
        flags |= TFLAG_SEND_FUA | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO;
    }
    if structured {
        flags |= TFLAG_SEND_DF;
    }
    if volume.translation().rotational() {
        flags |= TFLAG_ROTATIONAL;
    }
    flags
}

/// Block sizes advertised in NBD_INFO_BLOCK_SIZE: (minimum, preferred, maximum).
pub fn block_sizes(volume: &Volume) -> (u32, u32, u32) {
    let min = volume.translation().min_io().max(1);
    let preferred = volume.spec().block_size.max(min);
    (min, preferred, MAX_PAYLOAD)
}

/// Everything the handshake consults; shared by all connections.
pub struct HandshakeCtx<'a> {
    pub catalog: &'a Catalog,
    pub security: &'a Security,
    pub stopping: &'a AtomicBool,
    pub counters: &'a ServerCounters,
    /// Bounds the TLS handshake (the whole haggle is bounded by the
    /// server's reaper).
    pub timeout: Duration,
}

pub(super) enum Step {
    Continue,
    Transmit(Negotiated),
    Close,
}

pub(super) struct Haggle<'a, T: Transport> {
    pub(super) stream: &'a mut T,
    pub(super) ctx: &'a HandshakeCtx<'a>,
    pub(super) who: &'a mut ClientIdentity,
    pub(super) no_zeroes: bool,
    pub(super) structured: bool,
    /// Export the meta contexts were selected for, and what was selected.
    pub(super) meta: Option<(String, MetaContexts)>,
}

/// Runs the handshake. `Ok(None)` means it ended without an export (ABORT,
/// EOF, a refused EXPORT_NAME). `who` gains what TLS proves.
pub fn negotiate<T: Transport>(stream: &mut T, ctx: &HandshakeCtx<'_>, who: &mut ClientIdentity) -> io::Result<Option<Negotiated>> {
    stream.write_all(&server_greeting())?;
    let mut flags = [0u8; 4];
    stream.read_exact(&mut flags)?;
    let client_flags = decode_client_flags(&flags).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    let mut h = Haggle { stream, ctx, who, no_zeroes: client_flags & FLAG_C_NO_ZEROES != 0, structured: false, meta: None };
    loop {
        let mut header = [0u8; OPTION_HEADER_LEN];
        match h.stream.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let header = decode_option_header(&header).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        match h.option(header)? {
            Step::Continue => {}
            Step::Transmit(n) => return Ok(Some(n)),
            Step::Close => return Ok(None),
        }
    }
}

impl<T: Transport> Haggle<'_, T> {
    pub(super) fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    pub(super) fn error(&mut self, option: u32, reply: u32, message: &str) -> io::Result<Step> {
        tracing::debug!(option = option_name(option), message, "option refused");
        self.send(&option_error(option, reply, message))?;
        Ok(Step::Continue)
    }

    /// Reads and discards `len` bytes without buffering them all.
    fn discard(&mut self, mut len: u64) -> io::Result<()> {
        let mut scratch = [0u8; 8192];
        while len > 0 {
            let n = len.min(scratch.len() as u64) as usize;
            self.stream.read_exact(&mut scratch[..n])?;
            len -= n as u64;
        }
        Ok(())
    }

    pub(super) fn tls(&self) -> bool {
        self.who.tls
    }

    fn option(&mut self, header: OptionHeader) -> io::Result<Step> {
        let option = header.option;
        if header.length > self.ctx.security.max_option_payload.min(MAX_OPTION_LEN) {
            self.ctx.counters.trip(Limit::OptionPayload);
            tracing::warn!(client = %self.who, option = option_name(option), bytes = header.length, "option payload above max_option_payload");
            if option == OPT_EXPORT_NAME {
                return Ok(Step::Close); // no way to answer an error to EXPORT_NAME
            }
            self.discard(header.length as u64)?;
            return self.error(option, REP_ERR_TOO_BIG, "option payload too large");
        }
        let mut data = vec![0u8; header.length as usize];
        self.stream.read_exact(&mut data)?;
        if self.ctx.stopping.load(Ordering::Relaxed) {
            if option == OPT_EXPORT_NAME {
                return Ok(Step::Close);
            }
            self.error(option, REP_ERR_SHUTDOWN, "server is shutting down")?;
            return Ok(Step::Close);
        }
        // FORCEDTLS: nothing but STARTTLS and ABORT before TLS.
        if self.ctx.security.tls == TlsMode::Require && !self.tls() && !matches!(option, OPT_STARTTLS | OPT_ABORT) {
            if option == OPT_EXPORT_NAME {
                tracing::info!(client = %self.who, "EXPORT_NAME before STARTTLS with tls = require; closing");
                return Ok(Step::Close);
            }
            return self.error(option, REP_ERR_TLS_REQD, "TLS is required: send NBD_OPT_STARTTLS first");
        }
        match option {
            OPT_EXPORT_NAME => self.export_name(data),
            OPT_ABORT => {
                let _ = self.send(&option_reply(option, REP_ACK, &[]));
                Ok(Step::Close)
            }
            OPT_LIST => self.list(&data),
            OPT_STARTTLS => self.start_tls(&data),
            OPT_INFO | OPT_GO => self.info_or_go(option, &data),
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    return self.error(option, REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data");
                }
                self.structured = true;
                self.send(&option_reply(option, REP_ACK, &[]))?;
                Ok(Step::Continue)
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => self.meta_context(option, &data),
            _ => self.error(option, REP_ERR_UNSUP, "option not supported"),
        }
    }

    fn start_tls(&mut self, data: &[u8]) -> io::Result<Step> {
        let option = OPT_STARTTLS;
        if !data.is_empty() {
            return self.error(option, REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data");
        }
        if self.tls() {
            return self.error(option, REP_ERR_INVALID, "TLS is already running");
        }
        let server = match (&self.ctx.security.tls, &self.ctx.security.tls_server) {
            (TlsMode::On | TlsMode::Require, Some(server)) => server.clone(),
            _ => return self.error(option, REP_ERR_POLICY, "TLS is off on this server"),
        };
        self.send(&option_reply(option, REP_ACK, &[]))?;
        match self.stream.start_tls(&server, self.ctx.timeout) {
            Ok(peer) => {
                self.ctx.counters.tls_handshake(true);
                tracing::info!(client = %self.who, tls = %peer.protocol, cn = ?peer.cert_cn, psk = ?peer.psk_identity, "TLS started");
                add_tls_peer(self.who, peer);
                // proto.md: everything negotiated before TLS is forgotten.
                self.structured = false;
                self.meta = None;
                Ok(Step::Continue)
            }
            Err(e) => {
                self.ctx.counters.tls_handshake(false);
                tracing::warn!(client = %self.who, error = %e, "TLS handshake failed; closing");
                // Too late to go on in the clear: the ACK was sent.
                Ok(Step::Close)
            }
        }
    }

    fn export_name(&mut self, data: Vec<u8>) -> io::Result<Step> {
        let Ok(name) = String::from_utf8(data) else { return Ok(Step::Close) };
        if name.len() > self.ctx.security.max_export_name {
            self.ctx.counters.trip(Limit::ExportName);
            tracing::warn!(client = %self.who, bytes = name.len(), "export name above max_export_name; closing");
            return Ok(Step::Close);
        }
        let (volume, read_only) = match self.lookup(&name) {
            super::exports::Lookup::Found(v, ro) => (v, ro),
            other => {
                tracing::info!(client = %self.who, export = %name, why = other.why(), "EXPORT_NAME refused; closing");
                return Ok(Step::Close);
            }
        };
        let flags = export_flags(&volume, self.structured, read_only);
        self.send(&export_name_reply(volume.size(), flags, self.no_zeroes))?;
        let meta = self.meta_for(volume.name(), &name);
        Ok(Step::Transmit(Negotiated { volume, structured: self.structured, meta, flags, read_only }))
    }

    /// The selected contexts apply only if they were selected for the
    /// export now being entered (by name, or both being the default).
    pub(super) fn meta_for(&self, volume_name: &str, requested: &str) -> MetaContexts {
        match &self.meta {
            Some((export, meta)) if export == requested || self.ctx.catalog.export(export).is_some_and(|v| v.name() == volume_name) => {
                meta.clone()
            }
            _ => MetaContexts::default(),
        }
    }
}
