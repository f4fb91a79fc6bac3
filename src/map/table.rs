use super::TargetSpec;
use serde::{Deserialize, Serialize};

/// A contiguous run of the volume mapped onto one target.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Extent {
    pub start: u64,
    pub length: u64,
    pub target: TargetSpec,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.start + self.length
    }
}

/// One generation of a volume's mapping. Immutable once built: a change is a
/// new table with a higher generation, swapped in whole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MappingTable {
    generation: u64,
    size: u64,
    extents: Vec<Extent>,
}

/// The part of a request that falls into one extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// Index of the extent in the table.
    pub extent: usize,
    /// Offset of this piece within the request.
    pub request_offset: u64,
    /// Offset of this piece in the volume.
    pub volume_offset: u64,
    pub length: u64,
    /// Offset of this piece within its extent; the extent's target adds
    /// its own placement (e.g. a linear target's store offset).
    pub extent_offset: u64,
}

impl MappingTable {
    /// Builds a table from extents that must tile `[0, size)` in order; see
    /// [`crate::map::validate_layout`] for the checks and their messages.
    pub fn new(generation: u64, extents: Vec<Extent>) -> Result<Self, crate::map::MapError> {
        crate::map::validate_layout(&extents)?;
        let size = extents.last().map_or(0, Extent::end);
        Ok(MappingTable { generation, size, extents })
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn extents(&self) -> &[Extent] {
        &self.extents
    }

    /// The same extents under another generation number.
    pub fn with_generation(&self, generation: u64) -> Self {
        MappingTable { generation, ..self.clone() }
    }

    /// Index of the extent containing `offset` (O(log n)). `None` past the end.
    pub fn find(&self, offset: u64) -> Option<usize> {
        if offset >= self.size {
            return None;
        }
        // First extent whose end is beyond offset: extents are sorted and
        // contiguous, so it contains offset.
        Some(self.extents.partition_point(|e| e.end() <= offset))
    }

    /// Splits `[offset, offset+length)` into per-extent pieces. The range must
    /// lie inside the volume (callers check bounds first); pieces outside are
    /// simply not produced.
    pub fn pieces(&self, offset: u64, length: u64) -> Pieces<'_> {
        Pieces { table: self, next: self.find(offset), pos: offset, end: offset.saturating_add(length).min(self.size), origin: offset }
    }
}

/// Iterator over the pieces of a request; see [`MappingTable::pieces`].
pub struct Pieces<'a> {
    table: &'a MappingTable,
    next: Option<usize>,
    pos: u64,
    end: u64,
    origin: u64,
}

impl Iterator for Pieces<'_> {
    type Item = Piece;

    fn next(&mut self) -> Option<Piece> {
        let index = self.next?;
        if self.pos >= self.end {
            return None;
        }
        let extent = &self.table.extents[index];
        let within = self.pos - extent.start;
        // A layout that places chunks on different stores (stripe) is cut
        // at its chunk boundaries, so each piece is one store range.
        let chunk_end = match extent.target.boundary() {
            Some(unit) => extent.start + (within / unit + 1) * unit,
            None => u64::MAX,
        };
        let stop = extent.end().min(self.end).min(chunk_end);
        let piece = Piece {
            extent: index,
            request_offset: self.pos - self.origin,
            volume_offset: self.pos,
            length: stop - self.pos,
            extent_offset: within,
        };
        self.pos = stop;
        self.next = Some(if stop == extent.end() { index + 1 } else { index });
        Some(piece)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(name: &str, start: u64, length: u64, offset: u64) -> Extent {
        Extent { start, length, target: TargetSpec::Linear { store: name.into(), offset } }
    }

    #[test]
    fn lookup_and_split() {
        let t = MappingTable::new(
            1,
            vec![store("a", 0, 4096, 8192), Extent { start: 4096, length: 4096, target: TargetSpec::Zero }, store("b", 8192, 8192, 0)],
        )
        .unwrap();
        assert_eq!(t.size(), 16384);
        assert_eq!(t.find(0), Some(0));
        assert_eq!(t.find(4095), Some(0));
        assert_eq!(t.find(4096), Some(1));
        assert_eq!(t.find(16383), Some(2));
        assert_eq!(t.find(16384), None);

        let p: Vec<_> = t.pieces(4000, 5000).collect();
        assert_eq!(p.len(), 3);
        assert_eq!((p[0].volume_offset, p[0].length, p[0].extent_offset, p[0].request_offset), (4000, 96, 4000, 0));
        assert_eq!((p[1].volume_offset, p[1].length, p[1].request_offset), (4096, 4096, 96));
        assert_eq!((p[2].volume_offset, p[2].length, p[2].extent_offset, p[2].request_offset), (8192, 808, 0, 4192));
        assert_eq!(p.iter().map(|p| p.length).sum::<u64>(), 5000);
    }

    #[test]
    fn stripe_extents_are_cut_at_chunks() {
        use crate::map::Leg;
        let members = vec![Leg { store: "c".into(), offset: 0 }, Leg { store: "d".into(), offset: 0 }];
        let t = MappingTable::new(1, vec![store("a", 0, 4096, 0), Extent { start: 4096, length: 16384, target: TargetSpec::Stripe { members, chunk: 4096 } }])
            .unwrap();
        let p: Vec<_> = t.pieces(2048, 10240).map(|p| (p.extent, p.volume_offset, p.length, p.extent_offset)).collect();
        assert_eq!(p, vec![(0, 2048, 2048, 2048), (1, 4096, 4096, 0), (1, 8192, 4096, 4096)]);
        let tail: Vec<_> = t.pieces(12000, 8480).map(|p| (p.volume_offset, p.length)).collect();
        assert_eq!(tail, vec![(12000, 288), (12288, 4096), (16384, 4096)]);
    }

    #[test]
    fn empty_request_has_no_pieces() {
        let t = MappingTable::new(1, vec![store("a", 0, 4096, 0)]).unwrap();
        assert_eq!(t.pieces(100, 0).count(), 0);
        assert_eq!(t.pieces(4096, 10).count(), 0);
    }
}
