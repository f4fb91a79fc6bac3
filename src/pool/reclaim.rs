//! Reclaim, when a pool is short. Chunks that hold only zeros come back
//! first: a normal thin volume's chunk is unmapped as soon as TRIMs and
//! WRITE_ZEROES have zeroed all of it (`ThinMap::zeroed`, safe against
//! racing writes); here, low-priority volumes' chunks whose store range is
//! all holes go first, then their other chunks, least recently written
//! first. Normal and high priority data is never taken: a store-level scan
//! of theirs could race a write in flight.

use super::inner::Inner;
use crate::api::VolumePriority;
use crate::sync::lock;
use std::io;
use std::sync::Arc;

impl Inner {
    /// Takes back up to `want` chunks of `pool`; returns how many were
    /// unmapped (free once committed, which this does).
    pub fn reclaim(self: &Arc<Self>, pool: &str, want: u64) -> io::Result<u64> {
        let maps: Vec<_> = {
            let st = lock(&self.state);
            st.volumes.values().filter(|v| v.record.pool == pool).filter_map(|v| v.map.clone().map(|m| (m, v.record.priority))).collect()
        };
        let mut got = 0;
        // Zero-only chunks first: nobody loses anything.
        'zero: for (m, _) in maps.iter().filter(|(_, p)| *p == VolumePriority::Low) {
            for (c, id, _) in m.mapped_chunks() {
                if got >= want {
                    break 'zero;
                }
                let Some(place) = crate::volume::target::ChunkMap::lookup(m.as_ref(), c) else { continue };
                let runs = place.store.block_status(place.offset, m_chunk(m), 1)?;
                if runs.len() == 1 && runs[0].hole && runs[0].length >= m_chunk(m) && m.unmap_if(c, Some(id))?.is_some() {
                    got += 1;
                }
            }
        }
        if got > 0 {
            tracing::info!(pool, chunks = got, "reclaimed low-priority chunks that held only zeros");
        }
        // Then low-priority data, oldest writes first.
        let mut low: Vec<(u32, u64, u64, usize)> = Vec::new();
        for (k, (m, prio)) in maps.iter().enumerate() {
            if *prio == VolumePriority::Low {
                low.extend(m.mapped_chunks().into_iter().map(|(c, id, stamp)| (stamp, c, id, k)));
            }
        }
        low.sort_unstable();
        let mut per_volume = std::collections::BTreeMap::<&str, u64>::new();
        for (_, c, id, k) in low {
            if got >= want {
                break;
            }
            if maps[k].0.unmap_if(c, Some(id))?.is_some() {
                got += 1;
                *per_volume.entry(maps[k].0.volume.as_str()).or_default() += 1;
            }
        }
        for (volume, chunks) in per_volume {
            tracing::warn!(pool, volume, chunks, "reclaimed chunks of a low-priority volume (they now read zeros)");
        }
        if got > 0 {
            if let Some(p) = lock(&self.state).pools.get_mut(pool) {
                p.reclaimed += got;
            }
            self.commit_all()?;
        }
        Ok(got)
    }
}

fn m_chunk(m: &super::chunks::ThinMap) -> u64 {
    crate::volume::target::ChunkMap::chunk_size(m)
}
