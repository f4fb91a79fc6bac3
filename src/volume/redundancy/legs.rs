//! One mirror leg of a volume, by store name: its condition, why it
//! failed, which regions it lacks (stale), and its reads in flight (reads
//! go to the least busy leg that has the data).

use super::bitmap::RegionBitmap;
use crate::backend::Backend;
use crate::sync::lock;
use serde::{Deserialize, Serialize};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LegCondition {
    /// Has every region.
    InSync,
    /// Takes every write; regions marked stale are being copied to it and
    /// are never read from it.
    Resyncing,
    /// Dropped after an error: takes no I/O; the regions written meanwhile
    /// are marked stale, so a re-add copies only those.
    Failed,
    /// Left the mirror as its own volume (split); shown until merged.
    Split,
}

impl LegCondition {
    fn from_u8(v: u8) -> LegCondition {
        match v {
            0 => LegCondition::InSync,
            1 => LegCondition::Resyncing,
            2 => LegCondition::Failed,
            _ => LegCondition::Split,
        }
    }

    fn as_u8(self) -> u8 {
        match self {
            LegCondition::InSync => 0,
            LegCondition::Resyncing => 1,
            LegCondition::Failed => 2,
            LegCondition::Split => 3,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            LegCondition::InSync => "in_sync",
            LegCondition::Resyncing => "resyncing",
            LegCondition::Failed => "failed",
            LegCondition::Split => "split",
        }
    }
}

#[derive(Debug)]
pub struct LegState {
    store: String,
    condition: AtomicU8,
    reason: Mutex<Option<String>>,
    /// Regions this leg lacks.
    stale: RegionBitmap,
    reads: AtomicU32,
    /// The open store, once a target used it (to tell failed stores apart
    /// when flushing).
    backend: Mutex<Option<Arc<dyn Backend>>>,
    /// Bytes of regions resync brought to this leg since the daemon
    /// started (holes included), of data it actually copied, and the rate.
    pub copied: AtomicU64,
    pub data: AtomicU64,
    pub rate: AtomicU64,
    /// Whether every other writer of the leg (the other nodes of a
    /// cluster) knows it failed; false from a failure here until it is
    /// announced (`Redundancy::ensure_announced`).
    announced: AtomicBool,
    /// Held by the one thread announcing the failure; others wait on it.
    pub(super) announcing: Mutex<()>,
}

impl LegState {
    pub fn new(store: &str, condition: LegCondition, reason: Option<String>, stale: RegionBitmap) -> LegState {
        LegState {
            store: store.into(),
            condition: AtomicU8::new(condition.as_u8()),
            reason: Mutex::new(reason),
            stale,
            reads: AtomicU32::new(0),
            backend: Mutex::new(None),
            copied: AtomicU64::new(0),
            data: AtomicU64::new(0),
            rate: AtomicU64::new(0),
            announced: AtomicBool::new(true),
            announcing: Mutex::new(()),
        }
    }

    pub fn store(&self) -> &str {
        &self.store
    }

    pub fn condition(&self) -> LegCondition {
        LegCondition::from_u8(self.condition.load(Ordering::SeqCst))
    }

    pub fn reason(&self) -> Option<String> {
        lock(&self.reason).clone()
    }

    pub fn stale(&self) -> &RegionBitmap {
        &self.stale
    }

    /// Sets the condition; returns the previous one.
    pub fn set_condition(&self, c: LegCondition, reason: Option<String>) -> LegCondition {
        *lock(&self.reason) = reason;
        LegCondition::from_u8(self.condition.swap(c.as_u8(), Ordering::SeqCst))
    }

    /// Marks the leg failed unless it already is; true if this call did.
    /// The other writers do not know yet.
    pub fn fail(&self, reason: String) -> bool {
        self.fail_as(reason, false)
    }

    /// [`fail`](Self::fail), saying whether the other writers know already
    /// (`announced`: one of them said so). `announced` is set before the
    /// condition, so a writer that finds the leg failed finds it too.
    pub fn fail_as(&self, reason: String, announced: bool) -> bool {
        let now = LegCondition::Failed.as_u8();
        let mut cur = self.condition.load(Ordering::SeqCst);
        loop {
            let c = LegCondition::from_u8(cur);
            if !matches!(c, LegCondition::InSync | LegCondition::Resyncing) {
                if announced {
                    self.set_announced(true);
                }
                return false;
            }
            self.announced.store(announced, Ordering::SeqCst);
            match self.condition.compare_exchange(cur, now, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => break,
                Err(seen) => cur = seen,
            }
        }
        *lock(&self.reason) = Some(reason);
        true
    }

    /// Has every region from now on: its stale map cleared and synced,
    /// then in sync (the caller persists the condition, `save_legs`).
    pub fn make_in_sync(&self) -> std::io::Result<()> {
        {
            let _w = self.stale.writer();
            self.stale.clear_all();
        }
        self.stale.sync()?;
        self.set_condition(LegCondition::InSync, None);
        Ok(())
    }

    pub fn announced(&self) -> bool {
        self.announced.load(Ordering::SeqCst)
    }

    pub fn set_announced(&self, yes: bool) {
        self.announced.store(yes, Ordering::SeqCst);
    }

    /// Takes writes (in sync or resyncing).
    pub fn writable(&self) -> bool {
        matches!(self.condition(), LegCondition::InSync | LegCondition::Resyncing)
    }

    /// Has the data of every region in `rs`.
    pub fn readable(&self, rs: Range<usize>) -> bool {
        match self.condition() {
            LegCondition::InSync => true,
            LegCondition::Resyncing => !self.stale.any(rs),
            _ => false,
        }
    }

    pub fn reads(&self) -> u32 {
        self.reads.load(Ordering::Relaxed)
    }

    pub fn read_started(&self) {
        self.reads.fetch_add(1, Ordering::Relaxed);
    }

    pub fn read_ended(&self) {
        self.reads.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn attach(&self, backend: &Arc<dyn Backend>) {
        *lock(&self.backend) = Some(backend.clone());
    }

    pub fn backend(&self) -> Option<Arc<dyn Backend>> {
        lock(&self.backend).clone()
    }
}

/// The persisted form of a leg (`legs.json`); stale regions live in their
/// own bitmap file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LegRecord {
    pub store: String,
    pub condition: LegCondition,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_decide_reads_and_writes() {
        let leg = LegState::new("a", LegCondition::Resyncing, None, RegionBitmap::in_memory(4));
        leg.stale().set_volatile(1..2);
        assert!(leg.writable() && leg.readable(0..1) && !leg.readable(0..2));
        assert!(leg.fail("EIO".into()));
        assert!(!leg.fail("again".into()), "only the first failure counts");
        assert!(!leg.writable() && !leg.readable(0..1));
        assert_eq!(leg.reason().as_deref(), Some("EIO"));
        assert_eq!(serde_json::to_string(&LegCondition::InSync).unwrap(), "\"in_sync\"");
    }
}
