//! The model's options that name an export (EXPORT_NAME, LIST, INFO, GO,
//! LIST/SET_META_CONTEXT): an export the client may not use must look
//! exactly like one that does not exist, and what a usable one reports
//! (size, flags, names, contexts) must match the fixture.

use super::expect::{Agreed, End, Flow, Walker};
use super::fixture::{self, Visibility, DEFAULT, TRACKERS, VOLUMES};
use super::replies::{info_entry, info_request, meta_entry, meta_request, server_entry, u16_at, u32_at, u64_at, Reply};
use super::Violation;
use crate::nbd::*;

/// Flags this server may advertise at all.
const KNOWN_FLAGS: u16 = TFLAG_HAS_FLAGS
    | TFLAG_READ_ONLY
    | TFLAG_SEND_FLUSH
    | TFLAG_SEND_FUA
    | TFLAG_ROTATIONAL
    | TFLAG_SEND_TRIM
    | TFLAG_SEND_WRITE_ZEROES
    | TFLAG_SEND_DF
    | TFLAG_CAN_MULTI_CONN
    | TFLAG_SEND_CACHE
    | TFLAG_SEND_FAST_ZERO;

/// The most metadata contexts one SET_META_CONTEXT may select.
const MAX_SELECTED: usize = 32;

fn size_of(volume: &str) -> u64 {
    VOLUMES.iter().find(|v| v.0 == volume).map_or(0, |v| v.1)
}

/// The contexts a META_CONTEXT query list must produce on `volume`, in
/// order (qemu's rules: see `server/meta.rs`; restated here as the oracle).
fn contexts(volume: &str, list: bool, queries: &[String]) -> Vec<String> {
    let all = list && queries.is_empty();
    let mut out = Vec::new();
    if all || queries.iter().any(|q| q == META_BASE_ALLOCATION || q == "base:") {
        out.push(META_BASE_ALLOCATION.to_string());
    }
    let all_bitmaps = all || (list && queries.iter().any(|q| q == META_QEMU_NAMESPACE || q == META_DIRTY_BITMAP_PREFIX));
    let trackers = if volume == DEFAULT { TRACKERS } else { 0 };
    for name in (0..trackers).map(fixture::tracker_name) {
        let full = format!("{META_DIRTY_BITMAP_PREFIX}{name}");
        if all_bitmaps || queries.contains(&full) {
            out.push(full);
        }
    }
    out
}

impl Walker<'_> {
    /// What `name` is to this client now.
    fn lookup(&self, name: &str) -> Result<&'static str, Visibility> {
        let volume = fixture::resolve(name).ok_or(Visibility::Unknown)?;
        match fixture::visible(volume, self.who) {
            Visibility::Usable => Ok(volume),
            other => Err(other),
        }
    }

    /// The error a failed lookup must be answered with.
    fn refusal(v: Visibility) -> u32 {
        if v == Visibility::NeedsTls {
            REP_ERR_TLS_REQD
        } else {
            REP_ERR_UNKNOWN
        }
    }

    fn check_flags(&self, flags: u16, read_only: bool) -> Result<(), Violation> {
        let writes = TFLAG_SEND_FUA | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO;
        let ok = flags & (TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH) == TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH
            && (flags & TFLAG_READ_ONLY != 0) == read_only
            && flags & writes == if read_only { 0 } else { writes }
            && (flags & TFLAG_SEND_DF != 0) == self.structured
            && flags & !KNOWN_FLAGS == 0;
        if ok {
            Ok(())
        } else {
            Err(Violation::new(format!("transmission flags {flags:#x} (read-only {read_only}, structured {})", self.structured)))
        }
    }

    fn agreed(&self, volume: &'static str, requested: &str, read_only: bool, flags: u16) -> Agreed {
        let meta = match &self.meta {
            Some((export, selected)) if export == requested || fixture::resolve(export) == Some(volume) => selected.clone(),
            _ => Vec::new(),
        };
        Agreed { volume, read_only, structured: self.structured, meta, flags }
    }

    pub(super) fn export_name(&mut self, payload: &[u8], end: usize) -> Result<Flow, Violation> {
        let name = std::str::from_utf8(payload).ok().filter(|n| n.len() <= self.setup.max_export_name);
        let Some((name, volume)) = name.and_then(|n| self.lookup(n).ok().map(|v| (n, v))) else {
            return match self.raw(end) {
                None => Ok(Flow::End(End::Closed)),
                Some(out) => Err(Violation::new(format!("refused EXPORT_NAME answered with {} bytes", out.len()))),
            };
        };
        let read_only = fixture::read_only(volume, self.who);
        let Some(out) = self.raw(end) else {
            return if self.write_failed() { Ok(Flow::End(End::WriteFailed)) } else { Err(Violation::new("EXPORT_NAME got no reply")) };
        };
        let len = if self.no_zeroes { 10 } else { 134 };
        let flags = u16_at(out, 8).unwrap_or(0);
        if out.len() != len || u64_at(out, 0) != Some(size_of(volume)) || out[10..].iter().any(|b| *b != 0) {
            return Err(Violation::new(format!("EXPORT_NAME reply {out:02x?} for '{volume}'")));
        }
        self.check_flags(flags, read_only)?;
        self.note(OPT_EXPORT_NAME, 1);
        Ok(Flow::End(End::Transmit(self.agreed(volume, name, read_only, flags))))
    }

    /// The replies before a final ACK (which must have no data).
    fn before_ack<'r>(option: u32, r: &'r [Reply<'r>]) -> Result<&'r [Reply<'r>], Violation> {
        match r.split_last() {
            Some((last, rest)) if last.kind == REP_ACK && last.data.is_empty() => Ok(rest),
            _ => Err(Violation::new(format!("{} ended without a plain ACK: {:x?}", option_name(option), r.iter().map(|r| r.kind).collect::<Vec<_>>()))),
        }
    }

    pub(super) fn list(&mut self, end: usize) -> Result<Flow, Violation> {
        let Some(r) = self.replies(OPT_LIST, end)? else { return Ok(Flow::End(End::WriteFailed)) };
        let mut seen = Vec::new();
        for e in Self::before_ack(OPT_LIST, &r)? {
            let entry = (e.kind == REP_SERVER).then(|| server_entry(e.data)).flatten();
            let Some((name, description)) = entry else { return Err(Violation::new(format!("LIST entry {e:02x?}"))) };
            let name = std::str::from_utf8(name).map_err(|_| Violation::new("LIST entry name is not UTF-8"))?;
            if self.lookup(name) != Ok(name) || seen.contains(&name) {
                return Err(Violation::new(format!("LIST shows '{name}' to {:?} (or twice)", self.who)));
            }
            if description != fixture::description(name).as_bytes() {
                return Err(Violation::new(format!("LIST shows '{name}' with another description")));
            }
            seen.push(name);
        }
        let expected = VOLUMES.iter().filter(|v| self.lookup(v.0).is_ok()).count();
        if seen.len() != expected {
            return Err(Violation::new(format!("LIST shows {seen:?} to {:?}; {expected} are usable", self.who)));
        }
        self.note(OPT_LIST, seen.len() as u64);
        Ok(Flow::Next)
    }

    pub(super) fn info_or_go(&mut self, option: u32, payload: &[u8], end: usize) -> Result<Flow, Violation> {
        let Some((name, requests)) = info_request(payload) else { return self.expect_error(option, end, REP_ERR_INVALID) };
        if name.len() > self.setup.max_export_name {
            return self.expect_error(option, end, REP_ERR_TOO_BIG);
        }
        let volume = match self.lookup(&name) {
            Ok(v) => v,
            Err(v) => return self.expect_error(option, end, Self::refusal(v)),
        };
        let read_only = fixture::read_only(volume, self.who);
        let Some(r) = self.replies(option, end)? else { return Ok(Flow::End(End::WriteFailed)) };
        let mut seen = [0usize; 4];
        let mut flags = None;
        let description = fixture::description(volume);
        for e in Self::before_ack(option, &r)? {
            let entry = (e.kind == REP_INFO).then(|| info_entry(e.data)).flatten();
            let ok = match entry {
                Some((INFO_EXPORT, d)) if d.len() == 10 && u64_at(d, 0) == Some(size_of(volume)) => {
                    flags = u16_at(d, 8);
                    true
                }
                Some((INFO_NAME, d)) => requests.contains(&INFO_NAME) && d == volume.as_bytes(),
                Some((INFO_DESCRIPTION, d)) => requests.contains(&INFO_DESCRIPTION) && d == description.as_bytes(),
                Some((INFO_BLOCK_SIZE, d)) if d.len() == 12 => {
                    let (min, preferred, max) = (u32_at(d, 0).unwrap_or(0), u32_at(d, 4).unwrap_or(0), u32_at(d, 8).unwrap_or(0));
                    min.is_power_of_two() && min <= preferred && preferred <= max && max <= MAX_PAYLOAD
                }
                _ => false,
            };
            let kind = entry.map_or(usize::MAX, |(k, _)| k as usize);
            if !ok || kind >= seen.len() {
                return Err(Violation::new(format!("{} of '{volume}' answered {e:02x?} (requests {requests:?})", option_name(option))));
            }
            seen[kind] += 1;
        }
        let wanted = |info: u16| requests.contains(&info) && (info != INFO_DESCRIPTION || !description.is_empty());
        let expected = [1, wanted(INFO_NAME) as usize, wanted(INFO_DESCRIPTION) as usize, 1];
        if seen != expected {
            return Err(Violation::new(format!("{} of '{volume}' sent infos {seen:?} (export, name, description, block size), expected {expected:?}", option_name(option))));
        }
        let flags = flags.unwrap_or(0);
        self.check_flags(flags, read_only)?;
        self.note(option, 1 + requests.len().min(8) as u64);
        if option == OPT_INFO {
            return Ok(Flow::Next);
        }
        Ok(Flow::End(End::Transmit(self.agreed(volume, &name, read_only, flags))))
    }

    pub(super) fn meta_context(&mut self, option: u32, payload: &[u8], end: usize) -> Result<Flow, Violation> {
        let list = option == OPT_LIST_META_CONTEXT;
        if !list {
            // proto.md: SET replaces the selection, even when it fails.
            self.meta = None;
            if !self.structured {
                return self.expect_error(option, end, REP_ERR_INVALID);
            }
        }
        let Some((name, queries)) = meta_request(payload) else { return self.expect_error(option, end, REP_ERR_INVALID) };
        if name.len() > self.setup.max_export_name {
            return self.expect_error(option, end, REP_ERR_TOO_BIG);
        }
        let volume = match self.lookup(&name) {
            Ok(v) => v,
            Err(v) => return self.expect_error(option, end, Self::refusal(v)),
        };
        let expected = contexts(volume, list, &queries);
        if !list && expected.len() > MAX_SELECTED {
            return self.expect_error(option, end, REP_ERR_TOO_BIG);
        }
        let Some(r) = self.replies(option, end)? else { return Ok(Flow::End(End::WriteFailed)) };
        let entries = Self::before_ack(option, &r)?;
        let got: Vec<_> = entries.iter().map(|e| (e.kind == REP_META_CONTEXT).then(|| meta_entry(e.data)).flatten()).collect();
        let want: Vec<_> = expected.iter().zip(1u32..).map(|(n, id)| Some((if list { 0 } else { id }, n.as_bytes()))).collect();
        if got != want {
            return Err(Violation::new(format!("{} {queries:?} on '{volume}' answered {got:?}, expected {want:?}", option_name(option))));
        }
        if !list {
            self.meta = Some((name, expected.into_iter().zip(1u32..).map(|(n, id)| (id, n)).collect()));
        }
        self.note(option, got.len().min(40) as u64 + list as u64 * 64);
        Ok(Flow::Next)
    }
}
