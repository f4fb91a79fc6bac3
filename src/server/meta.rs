//! Metadata contexts: which ones an export offers (`base:allocation`, and
//! `qemu:dirty-bitmap:NAME` for each change tracker of its volume), which
//! a LIST or SET query matches, the ids a connection agreed on, and the
//! descriptors of a dirty-bitmap context. Pure functions, so the handshake
//! and BLOCK_STATUS logic is testable without trackers or sockets.

use crate::nbd::*;
use crate::volume::DirtyRun;

/// Most contexts one connection may select. Every selected context costs a
/// chunk (up to `MAX_DESCRIPTORS` descriptors) in each BLOCK_STATUS reply
/// and a tracker query per request, so the selection is bounded like every
/// other per-connection resource.
pub const MAX_SELECTED: usize = 32;

/// A metadata context of an export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Context {
    BaseAllocation,
    /// A change tracker of the volume, by its tracker name (`split-NEWVOL`).
    DirtyBitmap(String),
    /// `nbdvirt:generation=N`: not a status context but a stamp. A cluster
    /// node forwarding pieces of a volume selects it with the generation of
    /// the table it routed them with, and this node checks every request of
    /// the connection against its own (`forwarded.rs`).
    Stamp(u64),
}

impl Context {
    /// The context's name on the wire.
    pub fn wire_name(&self) -> String {
        match self {
            Context::BaseAllocation => META_BASE_ALLOCATION.to_string(),
            Context::DirtyBitmap(name) => format!("{META_DIRTY_BITMAP_PREFIX}{name}"),
            Context::Stamp(generation) => format!("{META_STAMP_PREFIX}{generation}"),
        }
    }
}

/// The contexts a connection selected, each with the id it was given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetaContexts {
    pub selected: Vec<(u32, Context)>,
}

impl MetaContexts {
    /// Ids from 1 in selection order. Ids are per connection (proto.md), so
    /// numbering afresh on every SET is enough.
    pub fn numbered(contexts: Vec<Context>) -> MetaContexts {
        MetaContexts { selected: contexts.into_iter().zip(1u32..).map(|(c, id)| (id, c)).collect() }
    }

    pub fn is_empty(&self) -> bool {
        self.selected.is_empty()
    }

    /// The forwarding stamp the connection selected, if any.
    pub fn stamp(&self) -> Option<u64> {
        self.selected.iter().find_map(|(_, c)| match c {
            Context::Stamp(g) => Some(*g),
            _ => None,
        })
    }

    pub fn base_allocation(&self) -> Option<u32> {
        self.selected.iter().find(|(_, c)| *c == Context::BaseAllocation).map(|(id, _)| *id)
    }
}

/// The contexts of an export with change trackers `bitmaps` that `queries`
/// match: `base:allocation` first, then bitmaps in the volume's order, each
/// once however many queries name it. `list` is true for
/// NBD_OPT_LIST_META_CONTEXT.
///
/// As qemu-nbd does (docs/interop/nbd.txt): an empty LIST query list lists
/// every context, and the namespace queries `qemu:` and
/// `qemu:dirty-bitmap:` list every bitmap, but only in LIST; SET selects a
/// bitmap only by its full name, and an empty SET selects nothing. A name
/// unknown now simply matches nothing (proto.md). `base:` keeps selecting
/// base:allocation in SET too, as this server always has.
pub fn matching_contexts(list: bool, queries: &[String], bitmaps: &[String]) -> Vec<Context> {
    let all = list && queries.is_empty();
    let base = all || queries.iter().any(|q| query_selects_base_allocation(q));
    let all_bitmaps = all || (list && queries.iter().any(|q| q == META_QEMU_NAMESPACE || q == META_DIRTY_BITMAP_PREFIX));
    let mut out = Vec::new();
    if base {
        out.push(Context::BaseAllocation);
    }
    for name in bitmaps {
        let named = || queries.iter().any(|q| q.strip_prefix(META_DIRTY_BITMAP_PREFIX) == Some(name.as_str()));
        if all_bitmaps || named() {
            out.push(Context::DirtyBitmap(name.clone()));
        }
    }
    // Selected only by SET and only by its full name: a stamp means
    // something only to the node that sets it, so LIST never offers one.
    if !list {
        let stamp = queries.iter().filter_map(|q| q.strip_prefix(META_STAMP_PREFIX)?.parse::<u64>().ok()).next_back();
        out.extend(stamp.map(Context::Stamp));
    }
    out
}

/// The descriptors of a `qemu:dirty-bitmap` context for a BLOCK_STATUS of
/// `length` bytes, from the tracker's runs: at most `max` descriptors
/// (1 with REQ_ONE), adjacent runs of one state merged, never past
/// `length`. The runs may stop short of `length`: the client asks again.
///
/// `None` means the tracker is gone (the pair was merged while the client
/// stayed connected). qemu never faces this, it keeps an exported bitmap
/// busy so it cannot be removed; we cannot, and proto.md wants exactly one
/// chunk per selected context, so the context is not omitted. We report
/// the range *dirty*: an incremental backup then copies it (too much, but
/// correct), where "clean" would make it skip writes it never saw. A
/// tracker answering no runs at all is treated the same way, since a
/// chunk needs at least one descriptor.
pub fn dirty_descriptors(runs: Option<&[DirtyRun]>, length: u32, max: usize) -> Vec<Descriptor> {
    let max = max.max(1);
    let mut out: Vec<Descriptor> = Vec::new();
    let mut left = length;
    for run in runs.unwrap_or_default() {
        if left == 0 {
            break;
        }
        let len = run.length.min(left as u64) as u32;
        if len == 0 {
            continue;
        }
        let flags = if run.dirty { STATE_DIRTY } else { 0 };
        let full = out.len() == max;
        match out.last_mut() {
            Some(last) if last.flags == flags => last.length += len,
            _ if full => break,
            _ => out.push(Descriptor { length: len, flags }),
        }
        left -= len;
    }
    if out.is_empty() {
        out.push(Descriptor { length, flags: STATE_DIRTY });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(queries: &[&str]) -> Vec<String> {
        queries.iter().map(|s| s.to_string()).collect()
    }

    fn names(contexts: &[Context]) -> Vec<String> {
        contexts.iter().map(Context::wire_name).collect()
    }

    #[test]
    fn list_offers_every_context_by_empty_or_namespace_query() {
        let bitmaps = q(&["split-b", "split-c"]);
        let all = ["base:allocation", "qemu:dirty-bitmap:split-b", "qemu:dirty-bitmap:split-c"];
        assert_eq!(names(&matching_contexts(true, &[], &bitmaps)), all);
        assert_eq!(names(&matching_contexts(true, &q(&["qemu:"]), &bitmaps)), all[1..]);
        assert_eq!(names(&matching_contexts(true, &q(&["qemu:dirty-bitmap:"]), &bitmaps)), all[1..]);
        assert_eq!(names(&matching_contexts(true, &q(&["base:", "qemu:dirty-bitmap:split-c"]), &bitmaps)), ["base:allocation", all[2]]);
        assert!(matching_contexts(true, &q(&["qemu:dirty-bitmap:nope", "qemu:allocation-depth", "qemu"]), &bitmaps).is_empty());
        // No trackers: only base:allocation, as before.
        assert_eq!(names(&matching_contexts(true, &[], &[])), ["base:allocation"]);
    }

    #[test]
    fn set_selects_full_names_only_once_each() {
        let bitmaps = q(&["split-b", "split-c"]);
        assert!(matching_contexts(false, &[], &bitmaps).is_empty());
        assert!(matching_contexts(false, &q(&["qemu:", "qemu:dirty-bitmap:"]), &bitmaps).is_empty());
        let got = matching_contexts(false, &q(&["qemu:dirty-bitmap:split-c", "base:allocation", "qemu:dirty-bitmap:split-c", "x:y"]), &bitmaps);
        assert_eq!(names(&got), ["base:allocation", "qemu:dirty-bitmap:split-c"]);
        let ids = MetaContexts::numbered(got);
        assert_eq!(ids.base_allocation(), Some(1));
        assert_eq!(ids.selected[1], (2, Context::DirtyBitmap("split-c".into())));
        let only = MetaContexts::numbered(matching_contexts(false, &q(&["qemu:dirty-bitmap:split-b"]), &bitmaps));
        assert_eq!(only.base_allocation(), None);
        assert_eq!(only.selected, [(1, Context::DirtyBitmap("split-b".into()))]);
    }

    fn run(length: u64, dirty: bool) -> DirtyRun {
        DirtyRun { length, dirty }
    }

    #[test]
    fn dirty_descriptors_merge_cap_and_clamp() {
        let runs = [run(4096, false), run(4096, true), run(4096, true), run(8192, false), run(4096, true)];
        let d = |length, dirty: bool| Descriptor { length, flags: if dirty { STATE_DIRTY } else { 0 } };
        assert_eq!(dirty_descriptors(Some(&runs), 24576, 100), [d(4096, false), d(8192, true), d(8192, false), d(4096, true)]);
        // REQ_ONE / max descriptors: stop at the cap, merging still applies.
        assert_eq!(dirty_descriptors(Some(&runs), 24576, 1), [d(4096, false)]);
        assert_eq!(dirty_descriptors(Some(&runs), 24576, 2), [d(4096, false), d(8192, true)]);
        // Never past the request, even if the tracker says more.
        assert_eq!(dirty_descriptors(Some(&runs), 6000, 100), [d(4096, false), d(1904, true)]);
        // Short answers stay short; zero-length runs are skipped.
        assert_eq!(dirty_descriptors(Some(&[run(0, true), run(512, false)]), 4096, 100), [d(512, false)]);
    }

    proptest::proptest! {
        /// Whatever a tracker answers, the chunk is valid: 1..=max
        /// descriptors, none empty, neighbours differ, never past the request.
        #[test]
        fn dirty_descriptors_are_always_valid(
            runs in proptest::collection::vec((0u64..1 << 34, proptest::bool::ANY), 0..40),
            length in 1u32..,
            max in 0usize..8,
        ) {
            let runs: Vec<DirtyRun> = runs.into_iter().map(|(length, dirty)| DirtyRun { length, dirty }).collect();
            let d = dirty_descriptors(Some(&runs), length, max);
            proptest::prop_assert!(!d.is_empty() && d.len() <= max.max(1));
            proptest::prop_assert!(d.iter().all(|x| x.length > 0));
            proptest::prop_assert!(d.windows(2).all(|w| w[0].flags != w[1].flags));
            proptest::prop_assert!(d.iter().map(|x| x.length as u64).sum::<u64>() <= length as u64);
        }
    }

    #[test]
    fn a_vanished_tracker_reads_all_dirty() {
        let all = [Descriptor { length: 65536, flags: STATE_DIRTY }];
        assert_eq!(dirty_descriptors(None, 65536, 100), all);
        assert_eq!(dirty_descriptors(Some(&[]), 65536, 1), all);
    }

    #[test]
    fn a_forwarding_stamp_is_selected_by_set_only_and_listed_never() {
        let set = MetaContexts::numbered(matching_contexts(false, &q(&["base:allocation", "nbdvirt:generation=17"]), &[]));
        assert_eq!(set.stamp(), Some(17));
        assert_eq!(names(&set.selected.iter().map(|(_, c)| c.clone()).collect::<Vec<_>>()), ["base:allocation", "nbdvirt:generation=17"]);
        assert!(matching_contexts(true, &q(&["nbdvirt:generation=17"]), &[]).is_empty());
        assert!(matching_contexts(false, &q(&["nbdvirt:generation=x", "nbdvirt:generation="]), &[]).is_empty());
        assert_eq!(MetaContexts::numbered(matching_contexts(false, &q(&["base:allocation"]), &[])).stamp(), None);
    }
}
