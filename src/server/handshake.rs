//! Option haggling on a fresh connection (fixed newstyle). Ends with the
//! export chosen and the transmission features agreed, or with the
//! connection closed.

use super::meta::{matching_contexts, MetaContexts, MAX_SELECTED};
use super::stream::Stream;
use crate::nbd::*;
use crate::volume::{Catalog, Volume};
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// What the client and server agreed on.
pub struct Negotiated {
    pub volume: Arc<Volume>,
    pub structured: bool,
    /// The metadata contexts the client selected, with their ids.
    pub meta: MetaContexts,
    pub flags: u16,
}

/// Transmission flags for `volume`.
pub fn export_flags(volume: &Volume, structured: bool) -> u16 {
    let mut flags = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_CACHE | TFLAG_CAN_MULTI_CONN;
    if volume.spec().read_only {
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

enum Step {
    Continue,
    Transmit(Negotiated),
    Close,
}

struct Haggle<'a> {
    stream: &'a mut Stream,
    catalog: &'a Catalog,
    stopping: &'a AtomicBool,
    no_zeroes: bool,
    structured: bool,
    /// Export the meta contexts were selected for, and what was selected.
    meta: Option<(String, MetaContexts)>,
}

/// Runs the handshake. `Ok(None)` means the client ended it (ABORT, EOF, or
/// an unknown export with NBD_OPT_EXPORT_NAME).
pub fn negotiate(stream: &mut Stream, catalog: &Catalog, stopping: &AtomicBool) -> io::Result<Option<Negotiated>> {
    stream.write_all(&server_greeting())?;
    let mut flags = [0u8; 4];
    stream.read_exact(&mut flags)?;
    let client_flags = decode_client_flags(&flags).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    let mut h = Haggle {
        stream,
        catalog,
        stopping,
        no_zeroes: client_flags & FLAG_C_NO_ZEROES != 0,
        structured: false,
        meta: None,
    };
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

impl Haggle<'_> {
    fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    fn error(&mut self, option: u32, reply: u32, message: &str) -> io::Result<Step> {
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

    fn option(&mut self, header: OptionHeader) -> io::Result<Step> {
        let option = header.option;
        if header.length > MAX_OPTION_LEN {
            if option == OPT_EXPORT_NAME {
                return Ok(Step::Close); // no way to answer an error to EXPORT_NAME
            }
            self.discard(header.length as u64)?;
            return self.error(option, REP_ERR_TOO_BIG, "option payload too large");
        }
        let mut data = vec![0u8; header.length as usize];
        self.stream.read_exact(&mut data)?;
        if self.stopping.load(Ordering::Relaxed) {
            if option == OPT_EXPORT_NAME {
                return Ok(Step::Close);
            }
            self.error(option, REP_ERR_SHUTDOWN, "server is shutting down")?;
            return Ok(Step::Close);
        }
        let bad = |e: DecodeError| e.to_string();
        match option {
            OPT_EXPORT_NAME => {
                let Ok(name) = String::from_utf8(data) else { return Ok(Step::Close) };
                let Some(volume) = self.catalog.export(&name).cloned() else {
                    tracing::info!(export = %name, "unknown export requested with EXPORT_NAME; closing");
                    return Ok(Step::Close);
                };
                let flags = export_flags(&volume, self.structured);
                self.send(&export_name_reply(volume.size(), flags, self.no_zeroes))?;
                let meta = self.meta_for(volume.name(), &name);
                Ok(Step::Transmit(Negotiated { volume, structured: self.structured, meta, flags }))
            }
            OPT_ABORT => {
                let _ = self.send(&option_reply(option, REP_ACK, &[]));
                Ok(Step::Close)
            }
            OPT_LIST => {
                if !data.is_empty() {
                    return self.error(option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
                }
                let mut out = Vec::new();
                for volume in self.catalog.volumes.values() {
                    out.extend_from_slice(&rep_server(volume.name(), &volume.spec().description));
                }
                out.extend_from_slice(&option_reply(option, REP_ACK, &[]));
                self.send(&out)?;
                Ok(Step::Continue)
            }
            OPT_STARTTLS => self.error(option, REP_ERR_UNSUP, "TLS is not supported yet"),
            OPT_INFO | OPT_GO => {
                let request = match decode_info_request(&data) {
                    Ok(r) => r,
                    Err(e) => return self.error(option, REP_ERR_INVALID, &bad(e)),
                };
                let Some(volume) = self.catalog.export(&request.export).cloned() else {
                    let msg = format!("no export named '{}'", request.export);
                    return self.error(option, REP_ERR_UNKNOWN, &msg);
                };
                let flags = export_flags(&volume, self.structured);
                let mut out = rep_info_export(option, volume.size(), flags);
                for info in &request.requests {
                    match *info {
                        INFO_NAME => out.extend_from_slice(&rep_info_string(option, INFO_NAME, volume.name())),
                        INFO_DESCRIPTION if !volume.spec().description.is_empty() => {
                            out.extend_from_slice(&rep_info_string(option, INFO_DESCRIPTION, &volume.spec().description))
                        }
                        _ => {}
                    }
                }
                // Always sent: our constraints are ones clients should know.
                let (min, preferred, max) = block_sizes(&volume);
                out.extend_from_slice(&rep_info_block_size(option, min, preferred, max));
                out.extend_from_slice(&option_reply(option, REP_ACK, &[]));
                self.send(&out)?;
                if option == OPT_INFO {
                    return Ok(Step::Continue);
                }
                let meta = self.meta_for(volume.name(), &request.export);
                Ok(Step::Transmit(Negotiated { volume, structured: self.structured, meta, flags }))
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    return self.error(option, REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data");
                }
                self.structured = true;
                self.send(&option_reply(option, REP_ACK, &[]))?;
                Ok(Step::Continue)
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                if option == OPT_SET_META_CONTEXT {
                    // proto.md: SET replaces the previous selection, even
                    // when it fails.
                    self.meta = None;
                }
                if option == OPT_SET_META_CONTEXT && !self.structured {
                    return self.error(option, REP_ERR_INVALID, "negotiate NBD_OPT_STRUCTURED_REPLY first");
                }
                let request = match decode_meta_context_request(&data) {
                    Ok(r) => r,
                    Err(e) => return self.error(option, REP_ERR_INVALID, &bad(e)),
                };
                let Some(volume) = self.catalog.export(&request.export) else {
                    let msg = format!("no export named '{}'", request.export);
                    return self.error(option, REP_ERR_UNKNOWN, &msg);
                };
                let list = option == OPT_LIST_META_CONTEXT;
                let contexts = matching_contexts(list, &request.queries, &volume.dirty_bitmaps());
                if !list && contexts.len() > MAX_SELECTED {
                    let msg = format!("{} metadata contexts selected; at most {MAX_SELECTED} per connection", contexts.len());
                    return self.error(option, REP_ERR_TOO_BIG, &msg);
                }
                let mut out = Vec::new();
                if list {
                    // LIST's ids mean nothing (proto.md: SHOULD be 0).
                    for c in &contexts {
                        out.extend_from_slice(&rep_meta_context(option, 0, &c.wire_name()));
                    }
                } else {
                    let selected = MetaContexts::numbered(contexts);
                    for (id, c) in &selected.selected {
                        out.extend_from_slice(&rep_meta_context(option, *id, &c.wire_name()));
                    }
                    self.meta = Some((request.export, selected));
                }
                out.extend_from_slice(&option_reply(option, REP_ACK, &[]));
                self.send(&out)?;
                Ok(Step::Continue)
            }
            _ => self.error(option, REP_ERR_UNSUP, "option not supported"),
        }
    }

    /// The selected contexts apply only if they were selected for the
    /// export now being entered (by name, or both being the default).
    fn meta_for(&self, volume_name: &str, requested: &str) -> MetaContexts {
        match &self.meta {
            Some((export, meta)) if export == requested || self.catalog.export(export).is_some_and(|v| v.name() == volume_name) => meta.clone(),
            _ => MetaContexts::default(),
        }
    }
}
