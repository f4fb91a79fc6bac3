//! Building the table a migration cuts over to.

use super::{Extent, MapError, Range, TargetSpec};

/// `extents` with `range` re-pointed at `target`; extents partly inside the
/// range are split. Adjacent extents that continue each other's mapping
/// are merged. Fails when an extent would have to be cut where its layout
/// cannot start (inside a stripe row).
pub fn remap(extents: &[Extent], range: Range, target: &TargetSpec) -> Result<Vec<Extent>, MapError> {
    let mut out: Vec<Extent> = Vec::with_capacity(extents.len() + 2);
    let mut inserted = false;
    let moved = || Extent { start: range.start, length: range.len(), target: target.clone() };
    for (index, e) in extents.iter().enumerate() {
        if e.end() <= range.start || e.start >= range.end {
            if e.start >= range.end && !inserted {
                push_merged(&mut out, moved());
                inserted = true;
            }
            push_merged(&mut out, e.clone());
            continue;
        }
        if e.start < range.start {
            let at = range.start - e.start;
            if e.target.advanced(at).is_none() {
                return Err(uncuttable(index, e, at));
            }
            push_merged(&mut out, Extent { start: e.start, length: range.start - e.start, target: e.target.clone() });
        }
        if !inserted {
            push_merged(&mut out, moved());
            inserted = true;
        }
        if e.end() > range.end {
            let at = range.end - e.start;
            let tail = e.target.advanced(at).ok_or_else(|| uncuttable(index, e, at))?;
            push_merged(&mut out, Extent { start: range.end, length: e.end() - range.end, target: tail });
        }
    }
    if !inserted {
        push_merged(&mut out, moved());
    }
    Ok(out)
}

fn uncuttable(index: usize, e: &Extent, at: u64) -> MapError {
    let row = match &e.target {
        TargetSpec::Stripe { members, chunk } => chunk * members.len() as u64,
        _ => 1,
    };
    MapError::Uncuttable { index, layout: "stripe", at, row }
}

fn push_merged(out: &mut Vec<Extent>, e: Extent) {
    if let Some(last) = out.last_mut() {
        if last.end() == e.start && last.target.continued_by(last.length, &e.target) {
            last.length += e.length;
            return;
        }
    }
    out.push(e);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::map::{validate_layout, MappingTable};

    fn to(store: &str, offset: u64) -> TargetSpec {
        TargetSpec::Linear { store: store.into(), offset }
    }

    fn ext(start: u64, length: u64, store: &str, offset: u64) -> Extent {
        Extent { start, length, target: TargetSpec::Linear { store: store.into(), offset } }
    }

    #[test]
    fn splits_and_merges() {
        let old = vec![ext(0, 100, "a", 0), ext(100, 100, "b", 50)];
        let new = remap(&old, Range::new(50, 100), &to("d", 1000)).unwrap();
        assert_eq!(new, vec![ext(0, 50, "a", 0), ext(50, 100, "d", 1000), ext(150, 50, "b", 100)]);
        validate_layout(&new).unwrap();
        let whole = remap(&old, Range::new(0, 200), &to("d", 0)).unwrap();
        assert_eq!(whole, vec![ext(0, 200, "d", 0)]);
        // Moving back onto a continuation merges.
        let back = remap(&[ext(0, 100, "a", 0), ext(100, 100, "d", 7)], Range::new(100, 100), &to("a", 100)).unwrap();
        assert_eq!(back, vec![ext(0, 200, "a", 0)]);
        let t = MappingTable::new(1, remap(&old, Range::new(190, 10), &to("d", 0)).unwrap()).unwrap();
        assert_eq!(t.size(), 200);
    }
}
