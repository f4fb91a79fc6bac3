//! Placing a range on a store, given the ranges already in use there. Pure
//! functions: no store is opened or locked here.

use crate::map::Range;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("offset {offset} is not aligned to the block size {align}")]
    Misaligned { offset: u64, align: u64 },
    #[error("is too small: {offset}+{length} ends past its {size} bytes")]
    PastEnd { offset: u64, length: u64, size: u64 },
    #[error("range {offset}+{length} is in use ({}+{} is mapped)", used.start, used.len())]
    InUse { offset: u64, length: u64, used: Range },
    #[error("has no free range of {length} bytes ({size} bytes, {in_use} range(s) in use)")]
    NoFreeRange { length: u64, size: u64, in_use: usize },
}

/// Checks that `length` bytes at `offset` fit a store of `size` bytes
/// without overlapping `used`.
pub fn check_at(used: &[Range], size: u64, offset: u64, length: u64, align: u64) -> Result<u64, PlacementError> {
    if !offset.is_multiple_of(align) {
        return Err(PlacementError::Misaligned { offset, align });
    }
    let want = Range::new(offset, length);
    if want.end > size {
        return Err(PlacementError::PastEnd { offset, length, size });
    }
    if let Some(u) = used.iter().find(|u| u.overlaps(&want)) {
        return Err(PlacementError::InUse { offset, length, used: *u });
    }
    Ok(offset)
}

/// The lowest `align`-aligned offset where `length` bytes fit a store of
/// `size` bytes between the `used` ranges (in any order, may overlap).
pub fn lowest_free(used: &[Range], size: u64, length: u64, align: u64) -> Result<u64, PlacementError> {
    let mut sorted = used.to_vec();
    sorted.sort_by_key(|r| r.start);
    let mut candidate = 0u64;
    for u in &sorted {
        if u.start >= candidate + length {
            break;
        }
        candidate = candidate.max(u.end.div_ceil(align) * align);
    }
    if candidate + length > size {
        return Err(PlacementError::NoFreeRange { length, size, in_use: used.len() });
    }
    Ok(candidate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowest_free_skips_used_ranges_and_aligns() {
        assert_eq!(lowest_free(&[], 100, 10, 4), Ok(0));
        // A gap too small is skipped; the end of a range is rounded up.
        let used = [Range::new(8, 10), Range::new(0, 5)];
        assert_eq!(lowest_free(&used, 100, 3, 4), Ok(20));
        assert_eq!(lowest_free(&used, 100, 8, 1), Ok(18));
        // A gap exactly large enough is taken.
        assert_eq!(lowest_free(&[Range::new(0, 4), Range::new(12, 4)], 100, 8, 4), Ok(4));
        assert_eq!(lowest_free(&used, 22, 8, 4), Err(PlacementError::NoFreeRange { length: 8, size: 22, in_use: 2 }));
    }

    #[test]
    fn check_at_reports_why() {
        let used = [Range::new(16, 16)];
        assert_eq!(check_at(&used, 64, 0, 16, 8), Ok(0));
        assert_eq!(check_at(&used, 64, 3, 8, 8), Err(PlacementError::Misaligned { offset: 3, align: 8 }));
        assert_eq!(check_at(&used, 64, 56, 16, 8), Err(PlacementError::PastEnd { offset: 56, length: 16, size: 64 }));
        assert_eq!(check_at(&used, 64, 8, 16, 8), Err(PlacementError::InUse { offset: 8, length: 16, used: Range::new(16, 16) }));
    }
}
