//! The options that name an export (LIST, INFO, GO, LIST/SET_META_CONTEXT)
//! and what a given client may see of each: an export it is not allowed
//! to use is unknown to it, exactly as one that does not exist.

use super::handshake::{block_sizes, export_flags, Haggle, Negotiated, Step};
use super::meta::{matching_contexts, MetaContexts, MAX_SELECTED};
use super::counters::Limit;
use super::security::Transport;
use crate::nbd::*;
use crate::volume::Volume;
use std::io;
use std::sync::Arc;

pub(super) enum Lookup {
    /// The volume, and whether it is read-only for this client.
    Found(Arc<Volume>, bool),
    Unknown,
    /// A `tls_only` volume asked for before STARTTLS.
    TlsRequired,
}

impl Lookup {
    pub(super) fn why(&self) -> &'static str {
        match self {
            Lookup::Found(..) => "found",
            Lookup::Unknown => "unknown or not allowed",
            Lookup::TlsRequired => "TLS required",
        }
    }
}

impl<T: Transport> Haggle<'_, T> {
    /// Resolves `name` (empty: the default export) as this client may see it.
    pub(super) fn lookup(&self, name: &str) -> Lookup {
        let Some(volume) = self.ctx.catalog.export(name).cloned() else { return Lookup::Unknown };
        let Some(access) = self.ctx.security.access(volume.name()) else {
            return Lookup::Found(volume.clone(), volume.spec().read_only);
        };
        if !access.allows(self.who) {
            self.ctx.counters.access_denied();
            tracing::warn!(client = %self.who, export = volume.name(), "client not allowed on this export; answered as unknown");
            return Lookup::Unknown;
        }
        if access.tls_only && !self.tls() {
            return Lookup::TlsRequired;
        }
        let read_only = volume.spec().read_only || access.read_only_for(self.who);
        Lookup::Found(volume, read_only)
    }

    /// The lookup, or the error reply that ends the option.
    fn lookup_or_reply(&mut self, option: u32, name: &str) -> io::Result<Result<(Arc<Volume>, bool), Step>> {
        if name.len() > self.ctx.security.max_export_name {
            self.ctx.counters.trip(Limit::ExportName);
            tracing::warn!(client = %self.who, bytes = name.len(), "export name above max_export_name");
            return self.error(option, REP_ERR_TOO_BIG, "export name too long").map(Err);
        }
        match self.lookup(name) {
            Lookup::Found(v, ro) => Ok(Ok((v, ro))),
            Lookup::Unknown => self.error(option, REP_ERR_UNKNOWN, &format!("no export named '{name}'")).map(Err),
            Lookup::TlsRequired => self.error(option, REP_ERR_TLS_REQD, "this export needs TLS: send NBD_OPT_STARTTLS first").map(Err),
        }
    }

    pub(super) fn list(&mut self, data: &[u8]) -> io::Result<Step> {
        if !data.is_empty() {
            return self.error(OPT_LIST, REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
        }
        let mut out = Vec::new();
        for volume in self.ctx.catalog.volumes.values() {
            // Listed only if GO would find it (proto.md lets SELECTIVETLS
            // omit TLS-only exports).
            if let Some(access) = self.ctx.security.access(volume.name()) {
                if !access.allows(self.who) || (access.tls_only && !self.tls()) {
                    continue;
                }
            }
            out.extend_from_slice(&rep_server(volume.name(), &volume.spec().description));
        }
        out.extend_from_slice(&option_reply(OPT_LIST, REP_ACK, &[]));
        self.send(&out)?;
        Ok(Step::Continue)
    }

    pub(super) fn info_or_go(&mut self, option: u32, data: &[u8]) -> io::Result<Step> {
        let request = match decode_info_request(data) {
            Ok(r) => r,
            Err(e) => return self.error(option, REP_ERR_INVALID, &e.to_string()),
        };
        let (volume, read_only) = match self.lookup_or_reply(option, &request.export)? {
            Ok(found) => found,
            Err(step) => return Ok(step),
        };
        let flags = export_flags(&volume, self.structured, read_only);
        let mut out = rep_info_export(option, volume.size(), flags);
        // Each answered once however often it is asked for: a 64 KiB option
        // holds 32K requests, and answering every one turned it into a
        // reply of megabytes (found by the fuzzer, fuzz/corpus/handshake/).
        if request.requests.contains(&INFO_NAME) {
            out.extend_from_slice(&rep_info_string(option, INFO_NAME, volume.name()));
        }
        let description = &volume.spec().description;
        if request.requests.contains(&INFO_DESCRIPTION) && !description.is_empty() {
            out.extend_from_slice(&rep_info_string(option, INFO_DESCRIPTION, description));
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
        Ok(Step::Transmit(Negotiated { volume, structured: self.structured, meta, flags, read_only }))
    }

    pub(super) fn meta_context(&mut self, option: u32, data: &[u8]) -> io::Result<Step> {
        if option == OPT_SET_META_CONTEXT {
            // proto.md: SET replaces the previous selection, even when it fails.
            self.meta = None;
        }
        if option == OPT_SET_META_CONTEXT && !self.structured {
            return self.error(option, REP_ERR_INVALID, "negotiate NBD_OPT_STRUCTURED_REPLY first");
        }
        let request = match decode_meta_context_request(data) {
            Ok(r) => r,
            Err(e) => return self.error(option, REP_ERR_INVALID, &e.to_string()),
        };
        let volume = match self.lookup_or_reply(option, &request.export)? {
            Ok((volume, _)) => volume,
            Err(step) => return Ok(step),
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
}
