//! What an extent maps onto, as written in a table (the device-mapper
//! "table line"). A spec names stores; `volume::target` opens it.
//!
//! Everything outside this file asks a spec generic questions (which store
//! ranges it uses, what its tail looks like, where requests must be cut)
//! rather than matching variants, so a new layout adds a variant here, its
//! checks, and one file under `volume/target/`.

use super::{MapError, Range};
use serde::{Deserialize, Serialize};

/// One store range a layout puts bytes on: a mirror leg or a stripe member.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Leg {
    pub store: String,
    /// Store offset of the extent's first byte (mirror) or of the member's
    /// first chunk (stripe).
    pub offset: u64,
}

/// Default mirror region: the unit of the write-intent bitmap and resync.
pub const DEFAULT_REGION: u64 = 1 << 20;
/// Allowed mirror regions.
pub const REGION_MIN: u64 = 64 << 10;
pub const REGION_MAX: u64 = 16 << 20;
/// Smallest stripe chunk.
pub const CHUNK_MIN: u64 = 4 << 10;

/// Where an extent's bytes live.
///
/// Wire format (persisted state, control API): internally tagged by
/// `kind`. The linear variant is written `"store"`, as by earlier versions,
/// and `"linear"` is accepted too.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TargetSpec {
    /// The extent's bytes, in order, on the named store from `offset`.
    #[serde(rename = "store", alias = "linear")]
    Linear { store: String, offset: u64 },
    /// Reads as zeros and ignores writes of zeros, like dm-zero. Writes of
    /// data fail with ENOSPC: there is nowhere to put them.
    Zero,
    /// The same bytes on every leg (dm-raid1). Leg *states* (in sync,
    /// resyncing, failed) are runtime state of the volume, not of the table.
    /// One leg is a simplex mirror (e.g. after a split).
    Mirror { legs: Vec<Leg>, region: u64 },
    /// Chunk `c` of the extent on member `c % N`, at member chunk `c / N`
    /// (dm-stripe).
    Stripe { members: Vec<Leg>, chunk: u64 },
    /// A chunk-mapped pool volume (thin, or low priority): chunk `c` of the
    /// extent lives wherever the volume's chunk map says, or nowhere (reads
    /// zeros). The map is runtime state kept by the pool, not part of the
    /// table, so the extent names no store and cannot be cut.
    Thin { pool: String, chunk: u64 },
}

/// Allowed pool chunks (allocation units).
pub const POOL_CHUNK_MIN: u64 = 64 << 10;
pub const POOL_CHUNK_MAX: u64 = 64 << 20;

impl TargetSpec {
    /// Every store range that bytes `[within, within+length)` of the extent
    /// read or write (for a mirror: every leg's copy).
    pub fn locate(&self, within: u64, length: u64) -> Vec<(&str, Range)> {
        match self {
            TargetSpec::Linear { store, offset } => vec![(store.as_str(), Range::new(offset + within, length))],
            TargetSpec::Zero | TargetSpec::Thin { .. } => Vec::new(),
            TargetSpec::Mirror { legs, .. } => legs.iter().map(|l| (l.store.as_str(), Range::new(l.offset + within, length))).collect(),
            TargetSpec::Stripe { members, chunk } => {
                let mut out: Vec<(&str, Range)> = Vec::new();
                let (mut pos, end) = (within, within + length);
                while pos < end {
                    let (member, at) = stripe_place(members, *chunk, pos);
                    let take = (chunk - pos % chunk).min(end - pos);
                    let store = members[member].store.as_str();
                    match out.iter_mut().find(|(s, r)| *s == store && r.end == at) {
                        Some((_, r)) => r.end += take,
                        None => out.push((store, Range::new(at, take))),
                    }
                    pos += take;
                }
                out
            }
        }
    }

    /// Every store range an extent of `length` bytes reads or writes (for
    /// store validation, exclusivity, free-range scans and status).
    pub fn store_ranges(&self, length: u64) -> Vec<(&str, Range)> {
        match self {
            TargetSpec::Stripe { members, .. } => {
                let each = length / members.len().max(1) as u64;
                members.iter().map(|m| (m.store.as_str(), Range::new(m.offset, each))).collect()
            }
            _ => self.locate(0, length),
        }
    }

    /// The spec of the same mapping starting `by` bytes into the extent
    /// (the tail left when an extent is split), or `None` when the layout
    /// cannot start there (a stripe cut inside a row).
    pub fn advanced(&self, by: u64) -> Option<TargetSpec> {
        let shift = |legs: &[Leg], by: u64| legs.iter().map(|l| Leg { store: l.store.clone(), offset: l.offset + by }).collect();
        Some(match self {
            TargetSpec::Linear { store, offset } => TargetSpec::Linear { store: store.clone(), offset: offset + by },
            TargetSpec::Zero => TargetSpec::Zero,
            TargetSpec::Mirror { legs, region } => TargetSpec::Mirror { legs: shift(legs, by), region: *region },
            TargetSpec::Stripe { members, chunk } => {
                let row = chunk * members.len() as u64;
                if !by.is_multiple_of(row) {
                    return None;
                }
                TargetSpec::Stripe { members: shift(members, by / members.len() as u64), chunk: *chunk }
            }
            // Chunk numbers count from the extent's start: only whole.
            TargetSpec::Thin { .. } if by == 0 => self.clone(),
            TargetSpec::Thin { .. } => return None,
        })
    }

    /// Whether `next` carries on this mapping after `length` bytes, so the
    /// two extents can be one.
    pub fn continued_by(&self, length: u64, next: &TargetSpec) -> bool {
        self.advanced(length).as_ref() == Some(next)
    }

    /// Requests are cut at multiples of this (extent-relative), so each
    /// piece lands on one store range and pieces run in parallel.
    pub fn boundary(&self) -> Option<u64> {
        match self {
            TargetSpec::Stripe { chunk, .. } | TargetSpec::Thin { chunk, .. } => Some(*chunk),
            _ => None,
        }
    }

    /// The mirror legs, if this is a mirror.
    pub fn legs(&self) -> Option<&[Leg]> {
        match self {
            TargetSpec::Mirror { legs, .. } => Some(legs),
            _ => None,
        }
    }

    /// Checks the spec of extent `index`, `length` bytes long, on its own.
    pub fn validate(&self, index: usize, length: u64) -> Result<(), MapError> {
        let layout = |reason: String| Err(MapError::Layout { index, reason });
        let overflow = |legs: &[Leg], each: u64| legs.iter().all(|l| l.offset.checked_add(each).is_some());
        match self {
            TargetSpec::Linear { offset, .. } => offset.checked_add(length).map(drop).ok_or(MapError::Overflow { index }),
            TargetSpec::Zero => Ok(()),
            TargetSpec::Mirror { legs, region } => {
                if legs.is_empty() {
                    return layout("a mirror needs at least one leg".into());
                }
                if let Some(dup) = legs.iter().enumerate().find(|(i, l)| legs[..*i].iter().any(|o| o.store == l.store)) {
                    return layout(format!("store '{}' is a leg twice", dup.1.store));
                }
                if !region.is_power_of_two() || !(REGION_MIN..=REGION_MAX).contains(region) {
                    return layout(format!("region {region} must be a power of two from 64KiB to 16MiB"));
                }
                if !overflow(legs, length) {
                    return Err(MapError::Overflow { index });
                }
                Ok(())
            }
            TargetSpec::Stripe { members, chunk } => {
                if members.len() < 2 {
                    return layout("a stripe needs at least two stores".into());
                }
                if let Some(dup) = members.iter().enumerate().find(|(i, l)| members[..*i].iter().any(|o| o.store == l.store)) {
                    return layout(format!("store '{}' is a stripe member twice", dup.1.store));
                }
                if !chunk.is_power_of_two() || *chunk < CHUNK_MIN {
                    return layout(format!("chunk {chunk} must be a power of two of at least 4KiB"));
                }
                let row = chunk * members.len() as u64;
                if !length.is_multiple_of(row) {
                    return layout(format!("length {length} is not a multiple of chunk × stores ({chunk} × {} = {row})", members.len()));
                }
                if !overflow(members, length / members.len() as u64) {
                    return Err(MapError::Overflow { index });
                }
                Ok(())
            }
            TargetSpec::Thin { chunk, .. } => {
                if !chunk.is_power_of_two() || !(POOL_CHUNK_MIN..=POOL_CHUNK_MAX).contains(chunk) {
                    return layout(format!("chunk {chunk} must be a power of two from 64KiB to 64MiB"));
                }
                if !length.is_multiple_of(*chunk) {
                    return layout(format!("length {length} is not a multiple of the chunk {chunk}"));
                }
                Ok(())
            }
        }
    }
}

/// Member and member offset of extent byte `pos` of a stripe.
pub fn stripe_place(members: &[Leg], chunk: u64, pos: u64) -> (usize, u64) {
    let c = pos / chunk;
    let n = members.len() as u64;
    let member = (c % n) as usize;
    (member, members[member].offset + (c / n) * chunk + pos % chunk)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leg(store: &str, offset: u64) -> Leg {
        Leg { store: store.into(), offset }
    }

    #[test]
    fn wire_format_is_the_previous_one() {
        let linear = TargetSpec::Linear { store: "a".into(), offset: 4096 };
        let json = serde_json::to_string(&linear).unwrap();
        assert_eq!(json, r#"{"kind":"store","store":"a","offset":4096}"#);
        assert_eq!(serde_json::from_str::<TargetSpec>(&json).unwrap(), linear);
        let alias: TargetSpec = serde_json::from_str(r#"{"kind":"linear","store":"a","offset":4096}"#).unwrap();
        assert_eq!(alias, linear);
        assert_eq!(serde_json::to_string(&TargetSpec::Zero).unwrap(), r#"{"kind":"zero"}"#);
        let m = TargetSpec::Mirror { legs: vec![leg("a", 0), leg("b", 8)], region: DEFAULT_REGION };
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(json, r#"{"kind":"mirror","legs":[{"store":"a","offset":0},{"store":"b","offset":8}],"region":1048576}"#);
        assert_eq!(serde_json::from_str::<TargetSpec>(&json).unwrap(), m);
    }

    #[test]
    fn generic_questions() {
        let t = TargetSpec::Linear { store: "a".into(), offset: 100 };
        assert_eq!(t.store_ranges(50), vec![("a", Range::new(100, 50))]);
        assert_eq!(t.locate(10, 5), vec![("a", Range::new(110, 5))]);
        assert!(t.continued_by(50, &TargetSpec::Linear { store: "a".into(), offset: 150 }));
        assert!(!t.continued_by(50, &TargetSpec::Zero));
        assert!(TargetSpec::Zero.continued_by(7, &TargetSpec::Zero));
        assert!(TargetSpec::Zero.store_ranges(10).is_empty());
        assert!(matches!(TargetSpec::Linear { store: "a".into(), offset: u64::MAX }.validate(3, 1), Err(MapError::Overflow { index: 3 })));
    }

    #[test]
    fn mirror_uses_every_leg() {
        let m = TargetSpec::Mirror { legs: vec![leg("a", 0), leg("b", 4096)], region: DEFAULT_REGION };
        assert_eq!(m.locate(10, 5), vec![("a", Range::new(10, 5)), ("b", Range::new(4106, 5))]);
        assert!(m.continued_by(100, &TargetSpec::Mirror { legs: vec![leg("a", 100), leg("b", 4196)], region: DEFAULT_REGION }));
        assert!(m.validate(0, 1 << 20).is_ok());
        let twice = TargetSpec::Mirror { legs: vec![leg("a", 0), leg("a", 4096)], region: DEFAULT_REGION };
        assert!(matches!(twice.validate(1, 4096), Err(MapError::Layout { index: 1, .. })));
        let bad_region = TargetSpec::Mirror { legs: vec![leg("a", 0)], region: 1000 };
        assert!(bad_region.validate(0, 4096).unwrap_err().to_string().contains("region"));
    }

    #[test]
    fn stripe_places_chunks_round_robin() {
        let s = TargetSpec::Stripe { members: vec![leg("c", 0), leg("d", 1 << 20)], chunk: 4096 };
        // Chunk 0 on c@0, chunk 1 on d@1MiB, chunk 2 on c@4096.
        assert_eq!(s.locate(0, 4096), vec![("c", Range::new(0, 4096))]);
        assert_eq!(s.locate(4096 + 10, 10), vec![("d", Range::new((1 << 20) + 10, 10))]);
        assert_eq!(s.locate(4000, 8288), vec![("c", Range::new(4000, 96 + 4096)), ("d", Range::new(1 << 20, 4096))]);
        assert_eq!(s.store_ranges(16384), vec![("c", Range::new(0, 8192)), ("d", Range::new(1 << 20, 8192))]);
        assert_eq!(s.boundary(), Some(4096));
        assert!(s.advanced(4096).is_none(), "a stripe cannot start inside a row");
        assert_eq!(s.advanced(8192), Some(TargetSpec::Stripe { members: vec![leg("c", 4096), leg("d", (1 << 20) + 4096)], chunk: 4096 }));
        let err = s.validate(2, 12288).unwrap_err().to_string();
        assert!(err.contains("not a multiple of chunk × stores"), "{err}");
        assert!(TargetSpec::Stripe { members: vec![leg("c", 0)], chunk: 4096 }.validate(0, 4096).is_err());
        assert!(TargetSpec::Stripe { members: vec![leg("c", 0), leg("d", 0)], chunk: 1024 }.validate(0, 4096).is_err());
    }
}
