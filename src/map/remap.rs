//! Building new tables from old ones: re-pointing a range (migration
//! cutover), or rewriting the targets inside a range (adding or dropping
//! mirror legs).

use super::{Extent, Leg, MapError, Range, TargetSpec};

/// `extents` with `range` re-pointed at `target`; extents partly inside the
/// range are split. Adjacent extents that continue each other's mapping
/// are merged. Fails when an extent would have to be cut where its layout
/// cannot start (inside a stripe row).
pub fn remap(extents: &[Extent], range: Range, target: &TargetSpec) -> Result<Vec<Extent>, MapError> {
    rewrite(extents, range, |part| target.advanced(part.start - range.start).ok_or_else(|| uncuttable(0, part, part.start - range.start)))
}

/// `extents` with the target of every part inside `range` replaced by
/// `f(part)`, where `part` is that part as an extent of its own (cut at the
/// range's ends). Adjacent extents that continue each other are merged.
pub fn rewrite(extents: &[Extent], range: Range, mut f: impl FnMut(&Extent) -> Result<TargetSpec, MapError>) -> Result<Vec<Extent>, MapError> {
    let mut out: Vec<Extent> = Vec::with_capacity(extents.len() + 2);
    for (index, e) in extents.iter().enumerate() {
        if e.end() <= range.start || e.start >= range.end {
            push_merged(&mut out, e.clone());
            continue;
        }
        let (start, end) = (e.start.max(range.start), e.end().min(range.end));
        let cut = |at: u64| e.target.advanced(at).ok_or_else(|| uncuttable(index, e, at));
        if e.start < start {
            cut(start - e.start)?;
            push_merged(&mut out, Extent { start: e.start, length: start - e.start, target: e.target.clone() });
        }
        let part = Extent { start, length: end - start, target: cut(start - e.start)? };
        let target = f(&part)?;
        push_merged(&mut out, Extent { target, ..part });
        if e.end() > end {
            push_merged(&mut out, Extent { start: end, length: e.end() - end, target: cut(end - e.start)? });
        }
    }
    Ok(out)
}

/// `extents` with a leg on `store` added to every extent inside `range`
/// (`store` from `offset` at `range.start`): a linear extent becomes a
/// two-leg mirror of `region`, a mirror gains a leg. Zero and stripe
/// extents cannot be mirrored.
pub fn add_leg(extents: &[Extent], range: Range, store: &str, offset: u64, region: u64) -> Result<Vec<Extent>, MapError> {
    let index_of = |start: u64| extents.partition_point(|e| e.end() <= start);
    rewrite(extents, range, |part| {
        let new = Leg { store: store.into(), offset: offset + (part.start - range.start) };
        let refuse = |reason: &str| MapError::Layout { index: index_of(part.start), reason: reason.into() };
        let legs = match &part.target {
            TargetSpec::Linear { .. } | TargetSpec::Mirror { .. } if part.target.store_ranges(1).iter().any(|(x, _)| *x == store) => {
                return Err(refuse(&format!("already on store '{store}'")));
            }
            TargetSpec::Linear { store, offset } => vec![Leg { store: store.clone(), offset: *offset }, new],
            TargetSpec::Mirror { legs, .. } => legs.iter().cloned().chain([new]).collect(),
            TargetSpec::Zero => return Err(refuse("a zero extent: it has no data to mirror")),
            TargetSpec::Stripe { .. } => return Err(refuse("a stripe: mirroring a stripe is not supported")),
            TargetSpec::Thin { .. } => return Err(refuse("a pool volume: its chunks are placed by its pool")),
        };
        let region = match &part.target {
            TargetSpec::Mirror { region, .. } => *region,
            _ => region,
        };
        Ok(TargetSpec::Mirror { legs, region })
    })
}

/// `extents` with the leg on `store` dropped from every mirror inside
/// `range` (a mirror left with one leg becomes linear on it).
pub fn drop_leg(extents: &[Extent], range: Range, store: &str) -> Result<Vec<Extent>, MapError> {
    let index_of = |start: u64| extents.partition_point(|e| e.end() <= start);
    rewrite(extents, range, |part| {
        Ok(match &part.target {
            TargetSpec::Mirror { legs, region } if legs.iter().any(|l| l.store == store) => {
                let kept: Vec<Leg> = legs.iter().filter(|l| l.store != store).cloned().collect();
                match kept.as_slice() {
                    [] => return Err(MapError::Layout { index: index_of(part.start), reason: format!("'{store}' is the only leg") }),
                    [one] => TargetSpec::Linear { store: one.store.clone(), offset: one.offset },
                    _ => TargetSpec::Mirror { legs: kept, region: *region },
                }
            }
            other => other.clone(),
        })
    })
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
    fn legs_are_added_and_dropped_inside_a_range() {
        let old = vec![ext(0, 100, "a", 0), ext(100, 100, "b", 50)];
        let m = add_leg(&old, Range::new(50, 100), "d", 1000, 4096).unwrap();
        let leg = |s: &str, o: u64| Leg { store: s.into(), offset: o };
        assert_eq!(m[1], Extent { start: 50, length: 50, target: TargetSpec::Mirror { legs: vec![leg("a", 50), leg("d", 1000)], region: 4096 } });
        assert_eq!(m[2], Extent { start: 100, length: 50, target: TargetSpec::Mirror { legs: vec![leg("b", 50), leg("d", 1050)], region: 4096 } });
        assert!(add_leg(&m, Range::new(50, 10), "d", 0, 4096).unwrap_err().to_string().contains("already on store 'd'"));
        let back = drop_leg(&m, Range::new(0, 200), "d").unwrap();
        assert_eq!(back, old, "dropping the leg merges the linear pieces back");
        let moved = drop_leg(&m, Range::new(0, 200), "a").unwrap();
        assert_eq!(moved[1], ext(50, 50, "d", 1000));
        let zero = vec![Extent { start: 0, length: 10, target: TargetSpec::Zero }];
        assert!(add_leg(&zero, Range::new(0, 10), "d", 0, 4096).is_err());
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
