//! What an extent maps onto, as written in a table (the device-mapper
//! "table line"). A spec names stores; `volume::target` opens it.
//!
//! Everything outside this file asks a spec generic questions (which store
//! ranges it uses, what its tail looks like) rather than matching variants,
//! so a new layout adds a variant here, its checks, and one file under
//! `volume/target/`.

use super::{MapError, Range};
use serde::{Deserialize, Serialize};

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
}

impl TargetSpec {
    /// Every store range that bytes `[within, within+length)` of the extent
    /// read or write, in the order of the bytes.
    pub fn locate(&self, within: u64, length: u64) -> Vec<(&str, Range)> {
        match self {
            TargetSpec::Linear { store, offset } => vec![(store.as_str(), Range::new(offset + within, length))],
            TargetSpec::Zero => Vec::new(),
        }
    }

    /// Every store range an extent of `length` bytes reads or writes (for
    /// store validation, exclusivity, free-range scans and status).
    pub fn store_ranges(&self, length: u64) -> Vec<(&str, Range)> {
        self.locate(0, length)
    }

    /// The spec of the same mapping starting `by` bytes into the extent
    /// (the tail left when an extent is split).
    pub fn advanced(&self, by: u64) -> TargetSpec {
        match self {
            TargetSpec::Linear { store, offset } => TargetSpec::Linear { store: store.clone(), offset: offset + by },
            TargetSpec::Zero => TargetSpec::Zero,
        }
    }

    /// Whether `next` carries on this mapping after `length` bytes, so the
    /// two extents can be one.
    pub fn continued_by(&self, length: u64, next: &TargetSpec) -> bool {
        self.advanced(length) == *next
    }

    /// Checks the spec of extent `index`, `length` bytes long, on its own.
    pub fn validate(&self, index: usize, length: u64) -> Result<(), MapError> {
        match self {
            TargetSpec::Linear { offset, .. } => offset.checked_add(length).map(drop).ok_or(MapError::Overflow { index }),
            TargetSpec::Zero => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format_is_the_previous_one() {
        let linear = TargetSpec::Linear { store: "a".into(), offset: 4096 };
        let json = serde_json::to_string(&linear).unwrap();
        assert_eq!(json, r#"{"kind":"store","store":"a","offset":4096}"#);
        assert_eq!(serde_json::from_str::<TargetSpec>(&json).unwrap(), linear);
        let alias: TargetSpec = serde_json::from_str(r#"{"kind":"linear","store":"a","offset":4096}"#).unwrap();
        assert_eq!(alias, linear);
        assert_eq!(serde_json::to_string(&TargetSpec::Zero).unwrap(), r#"{"kind":"zero"}"#);
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
}
