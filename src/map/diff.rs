//! Which virtual ranges translate differently between two tables: exactly
//! the ranges a swap has to pause.

use super::MappingTable;

/// A half-open byte range `[start, end)` of a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Range {
    pub start: u64,
    pub end: u64,
}

impl Range {
    pub fn new(start: u64, length: u64) -> Range {
        Range { start, end: start.saturating_add(length) }
    }

    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }

    pub fn overlaps(&self, other: &Range) -> bool {
        self.start < other.end && other.start < self.end
    }
}

/// The ranges, in order and merged, where `old` and `new` send a byte to a
/// different place. Past the end of the shorter table everything differs.
pub fn diff(old: &MappingTable, new: &MappingTable) -> Vec<Range> {
    let (a, b) = (old.extents(), new.extents());
    let mut out: Vec<Range> = Vec::new();
    let mut push = |r: Range| match out.last_mut() {
        Some(last) if last.end == r.start => last.end = r.end,
        _ => out.push(r),
    };
    let (mut i, mut j, mut pos) = (0, 0, 0u64);
    while i < a.len() && j < b.len() {
        let (ea, eb) = (&a[i], &b[j]);
        let stop = ea.end().min(eb.end());
        // Within [pos, stop) each extent is one mapping: the same store
        // ranges in the same order means the same translation.
        if ea.target.locate(pos - ea.start, stop - pos) != eb.target.locate(pos - eb.start, stop - pos) {
            push(Range { start: pos, end: stop });
        }
        pos = stop;
        if ea.end() == stop {
            i += 1;
        }
        if eb.end() == stop {
            j += 1;
        }
    }
    let end = old.size().max(new.size());
    if pos < end {
        push(Range { start: pos, end });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::map::{Extent, TargetSpec};

    fn ext(start: u64, length: u64, store: &str, offset: u64) -> Extent {
        Extent { start, length, target: TargetSpec::Linear { store: store.into(), offset } }
    }

    #[test]
    fn identical_translation_has_empty_diff_even_when_recut() {
        let a = MappingTable::new(1, vec![ext(0, 100, "s", 0)]).unwrap();
        let b = MappingTable::new(2, vec![ext(0, 40, "s", 0), ext(40, 60, "s", 40)]).unwrap();
        assert!(diff(&a, &b).is_empty());
    }

    #[test]
    fn changed_parts_only() {
        let a = MappingTable::new(1, vec![ext(0, 100, "s", 0), ext(100, 100, "t", 0)]).unwrap();
        let b = MappingTable::new(2, vec![ext(0, 50, "s", 0), ext(50, 50, "u", 0), ext(100, 100, "t", 0)]).unwrap();
        assert_eq!(diff(&a, &b), vec![Range { start: 50, end: 100 }]);
        let c = MappingTable::new(3, vec![ext(0, 100, "s", 8), ext(100, 100, "t", 0)]).unwrap();
        assert_eq!(diff(&a, &c), vec![Range { start: 0, end: 100 }]);
        let z = MappingTable::new(4, vec![ext(0, 100, "s", 0), Extent { start: 100, length: 100, target: TargetSpec::Zero }]).unwrap();
        assert_eq!(diff(&a, &z), vec![Range { start: 100, end: 200 }]);
    }

    #[test]
    fn size_change_differs_past_the_end() {
        let a = MappingTable::new(1, vec![ext(0, 100, "s", 0)]).unwrap();
        let b = MappingTable::new(2, vec![ext(0, 150, "s", 0)]).unwrap();
        assert_eq!(diff(&a, &b), vec![Range { start: 100, end: 150 }]);
    }
}
