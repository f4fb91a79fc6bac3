//! Checks on mapping tables, with messages that name the extent at fault.

use super::{Extent, MappingTable};
use std::collections::HashMap;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    #[error("the mapping has no extents")]
    Empty,
    #[error("extent {index}: length is 0")]
    ZeroLength { index: usize },
    #[error("extent {index}: starts at {start} but the previous extent ends at {expected} ({kind})")]
    NotContiguous { index: usize, start: u64, expected: u64, kind: &'static str },
    #[error("extent {index}: {field} {value} is not a multiple of the block size {block_size}")]
    Misaligned { index: usize, field: &'static str, value: u64, block_size: u64 },
    #[error("extent {index}: store '{store}' is not defined")]
    UnknownStore { index: usize, store: String },
    #[error("extent {index}: range {offset}+{length} ends past the end of store '{store}' ({size} bytes)")]
    OutsideStore { index: usize, store: String, offset: u64, length: u64, size: u64 },
    #[error("extent {index}: offset overflows")]
    Overflow { index: usize },
    #[error("extent {index}: {reason}")]
    Layout { index: usize, reason: String },
    #[error("a {layout} extent cannot be cut at byte {at} of extent {index} (cut at a multiple of {row})")]
    Uncuttable { index: usize, layout: &'static str, at: u64, row: u64 },
    #[error(
        "store '{store}' range {offset}+{length} is mapped by both volume '{}' extent {} and volume '{}' extent {}; declare the store `shared = true` if that is intended",
        first.0, first.1, second.0, second.1
    )]
    Overlap { store: String, offset: u64, length: u64, first: (String, usize), second: (String, usize) },
}

/// Extents must be non-empty, in order, and tile `[0, size)` exactly.
pub fn validate_layout(extents: &[Extent]) -> Result<(), MapError> {
    if extents.is_empty() {
        return Err(MapError::Empty);
    }
    let mut expected = 0u64;
    for (index, e) in extents.iter().enumerate() {
        if e.length == 0 {
            return Err(MapError::ZeroLength { index });
        }
        if e.start != expected {
            let kind = if e.start > expected { "gap" } else { "overlap" };
            return Err(MapError::NotContiguous { index, start: e.start, expected, kind });
        }
        expected = e.start.checked_add(e.length).ok_or(MapError::Overflow { index })?;
        e.target.validate(index, e.length)?;
    }
    Ok(())
}

/// Every start, length and store range start must be a multiple of
/// `block_size`.
pub fn validate_alignment(table: &MappingTable, block_size: u64) -> Result<(), MapError> {
    for (index, e) in table.extents().iter().enumerate() {
        let mut fields = vec![("start", e.start), ("length", e.length)];
        fields.extend(e.target.store_ranges(e.length).into_iter().map(|(_, r)| ("backend_offset", r.start)));
        for (field, value) in fields {
            if value % block_size != 0 {
                return Err(MapError::Misaligned { index, field, value, block_size });
            }
        }
    }
    Ok(())
}

/// Every store an extent uses must exist, and its ranges lie inside it.
pub fn validate_stores(table: &MappingTable, store_sizes: &HashMap<String, u64>) -> Result<(), MapError> {
    for (index, e) in table.extents().iter().enumerate() {
        for (store, r) in e.target.store_ranges(e.length) {
            let size = *store_sizes.get(store).ok_or_else(|| MapError::UnknownStore { index, store: store.into() })?;
            if r.end > size {
                return Err(MapError::OutsideStore { index, store: store.into(), offset: r.start, length: r.len(), size });
            }
        }
    }
    Ok(())
}

/// No two extents (of the same or different volumes) may map overlapping
/// ranges of a store unless `is_shared(store)`. `tables` pairs each table
/// with the name of its volume, used in the message.
pub fn validate_exclusive<'a>(
    tables: impl IntoIterator<Item = (&'a str, &'a MappingTable)>,
    is_shared: impl Fn(&str) -> bool,
) -> Result<(), MapError> {
    // (offset, end, owner) per store, sorted, then adjacent pairs compared.
    type Owner = (String, usize); // (volume, extent index)
    let mut by_store: HashMap<&str, Vec<(u64, u64, Owner)>> = HashMap::new();
    for (volume, table) in tables {
        for (index, e) in table.extents().iter().enumerate() {
            for (store, r) in e.target.store_ranges(e.length) {
                if !is_shared(store) {
                    by_store.entry(store).or_default().push((r.start, r.end, (volume.to_string(), index)));
                }
            }
        }
    }
    for (store, mut ranges) in by_store {
        ranges.sort();
        for pair in ranges.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            if b.0 < a.1 {
                return Err(MapError::Overlap {
                    store: store.to_string(),
                    offset: b.0,
                    length: a.1.min(b.1) - b.0,
                    first: a.2.clone(),
                    second: b.2.clone(),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::map::TargetSpec;

    fn ext(start: u64, length: u64, store: &str, offset: u64) -> Extent {
        Extent { start, length, target: TargetSpec::Linear { store: store.into(), offset } }
    }

    #[test]
    fn layout_errors_name_the_extent() {
        assert_eq!(validate_layout(&[]), Err(MapError::Empty));
        let gap = validate_layout(&[ext(0, 10, "a", 0), ext(20, 10, "a", 10)]).unwrap_err();
        assert!(gap.to_string().contains("extent 1") && gap.to_string().contains("gap"), "{gap}");
        let overlap = validate_layout(&[ext(0, 10, "a", 0), ext(5, 10, "a", 10)]).unwrap_err();
        assert!(overlap.to_string().contains("overlap"));
        assert!(matches!(validate_layout(&[ext(0, 0, "a", 0)]), Err(MapError::ZeroLength { index: 0 })));
        assert!(matches!(validate_layout(&[ext(0, 10, "a", u64::MAX)]), Err(MapError::Overflow { .. })));
    }

    #[test]
    fn alignment_and_store_bounds() {
        let t = MappingTable::new(1, vec![ext(0, 4096, "a", 512)]).unwrap();
        assert!(matches!(validate_alignment(&t, 4096), Err(MapError::Misaligned { field: "backend_offset", .. })));
        assert!(validate_alignment(&t, 512).is_ok());
        let sizes = HashMap::from([("a".to_string(), 4096u64)]);
        assert!(matches!(validate_stores(&t, &sizes), Err(MapError::OutsideStore { .. })));
        let none = HashMap::new();
        assert!(matches!(validate_stores(&t, &none), Err(MapError::UnknownStore { .. })));
    }

    #[test]
    fn exclusive_unless_shared() {
        let a = MappingTable::new(1, vec![ext(0, 4096, "s", 0)]).unwrap();
        let b = MappingTable::new(1, vec![ext(0, 4096, "s", 2048)]).unwrap();
        let err = validate_exclusive([("a", &a), ("b", &b)], |_| false).unwrap_err();
        assert!(err.to_string().contains("volume 'a' extent 0") && err.to_string().contains("volume 'b' extent 0"), "{err}");
        assert!(validate_exclusive([("a", &a), ("b", &b)], |s| s == "s").is_ok());
        let c = MappingTable::new(1, vec![ext(0, 4096, "s", 4096)]).unwrap();
        assert!(validate_exclusive([("a", &a), ("c", &c)], |_| false).is_ok());
    }
}
