//! The pool thread: commits pending chunk maps at least every second
//! (dm-thin's period), reclaims and auto-extends for pools that have
//! writers waiting, and brings the meters up to date (persisted every
//! minute, with a sample for `pool usage --since`).

use super::inner::{Inner, VolState};
use super::meta::Batch;
use super::volumes::unix_now;
use crate::sync::lock;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

const PERIOD: Duration = Duration::from_secs(1);
const METER_PERIOD: Duration = Duration::from_secs(60);
/// Per-second meter snapshots kept in memory (two persisted periods).
const RECENT: usize = 120;

/// Folds what a volume wrote and held since the last update into its meter.
/// The allocation is taken as the current one since the last update (at
/// most a second ago: an allocation change counts from the last tick).
pub fn meter_now(v: &mut VolState, chunk: u64, now: f64) {
    let w = v.map.as_ref().map_or(0, |m| m.written.swap(0, Relaxed));
    let allocated = v.allocated_chunks() * chunk;
    let u = &mut v.usage;
    u.written += w + std::mem::take(&mut v.written_unmetered);
    u.byte_seconds += allocated as f64 * (now - u.until).max(0.0);
    u.until = now;
    u.allocated = allocated;
    if v.recent.len() >= RECENT {
        v.recent.pop_front();
    }
    v.recent.push_back(v.usage.clone());
}

impl Inner {
    /// Brings every meter up to now (in memory).
    fn meter_all(&self) {
        let now = unix_now();
        let mut st = lock(&self.state);
        let chunks: std::collections::BTreeMap<String, u64> = st.pools.iter().map(|(n, p)| (n.clone(), p.chunk())).collect();
        for v in st.volumes.values_mut() {
            meter_now(v, chunks[&v.record.pool], now);
        }
    }

    /// Every meter brought up to now, as a batch (with a sample each).
    pub fn meter_batch(&self) -> Batch {
        self.meter_all();
        let st = lock(&self.state);
        let mut batch = Batch::default();
        for v in st.volumes.values() {
            batch.usage.push((v.record.name.clone(), v.usage.clone()));
            batch.samples.push((v.record.name.clone(), v.usage.until as u64, v.usage.clone()));
        }
        batch
    }

    /// Grows one file store of `pool` by its `grow` percent; true if done.
    fn extend(&self, pool: &str) -> bool {
        let mut st = lock(&self.state);
        let Some(p) = st.pools.get_mut(pool) else { return false };
        let Some(percent) = p.config.grow_percent else { return false };
        let chunk = p.chunk();
        let Some(k) = p.space.stores.iter().position(|s| s.handle.is_some() && s.path.is_some()) else { return false };
        let s = &mut p.space.stores[k];
        let add = (s.chunks * percent as u64 / 100).max(1);
        let path = s.path.clone().expect("checked");
        let grown = std::fs::OpenOptions::new().write(true).open(&path).and_then(|f| {
            let len = f.metadata()?.len();
            let want = (s.chunks + add) * chunk;
            if len < want {
                f.set_len(want)?;
            }
            Ok(())
        });
        if let Err(e) = grown {
            tracing::warn!(pool, store = %s.backend, "auto-extend failed: {e}");
            return false;
        }
        s.extend(s.chunks + add, chunk, &[]);
        s.scan_clean(chunk);
        p.record.stores[k].chunks = s.chunks;
        let record = p.record.clone();
        tracing::warn!(pool, store = %p.record.stores[k].backend, chunks = add, "pool auto-extended a file store");
        p.note_free_space();
        drop(st);
        if let Err(e) = self.meta.apply(&Batch { pools: vec![record], ..Batch::default() }) {
            tracing::error!(pool, "recording an auto-extend: {e}");
        }
        self.space_freed.notify_all();
        true
    }

    /// One pass: space for waiters, commit, meters.
    pub fn tick(self: &Arc<Self>, last_meter: &mut Instant) {
        let short: Vec<(String, u64)> = lock(&self.state)
            .pools
            .iter_mut()
            .filter(|(_, p)| p.waiting > 0 || p.short > 0)
            .map(|(n, p)| (n.clone(), std::mem::take(&mut p.short).max(p.waiting).max(1)))
            .collect();
        for (pool, want) in short {
            match self.reclaim(&pool, want) {
                Ok(0) => {
                    self.extend(&pool);
                }
                Ok(_) => {}
                Err(e) => tracing::error!(pool, "reclaim failed: {e}"),
            }
        }
        let extra = if last_meter.elapsed() >= METER_PERIOD {
            *last_meter = Instant::now();
            self.meter_batch()
        } else {
            self.meter_all();
            Batch::default()
        };
        let pending = lock(&self.state).volumes.values().any(|v| v.map.as_ref().is_some_and(|m| crate::volume::target::ChunkMap::uncommitted(m.as_ref())));
        if pending || !extra.is_empty() {
            if let Err(e) = self.commit_with(extra) {
                tracing::error!("pool commit failed (retried next second): {e}");
            }
        }
    }
}

/// Runs until `inner.stop`.
pub fn run(inner: Arc<Inner>) {
    let mut last_meter = Instant::now();
    while !inner.stop.load(SeqCst) {
        {
            let kicked = lock(&inner.kick.0);
            let (mut kicked, _) = inner.kick.1.wait_timeout_while(kicked, PERIOD, |k| !*k).unwrap_or_else(|p| p.into_inner());
            *kicked = false;
        }
        if inner.stop.load(SeqCst) {
            break;
        }
        inner.tick(&mut last_meter);
    }
}
