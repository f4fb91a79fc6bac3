//! Operators' manual pauses: at most one per volume, each ended by
//! `resume` or by its own timeout, whichever comes first.

use super::{Daemon, DaemonError};
use crate::map::Range;
use crate::sync::lock;
use crate::volume::{HoldId, Volume};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A manual pause of one volume.
struct ManualPause {
    /// The volume object paused (not looked up by name later: the name may
    /// have been removed and re-added meanwhile).
    volume: Arc<Volume>,
    hold: HoldId,
    /// Tells this pause from a later one of the same volume, so that an old
    /// timer does not end a new pause.
    token: u64,
}

impl ManualPause {
    fn end(self) {
        self.volume.resume(self.hold);
    }
}

#[derive(Default)]
pub struct PauseRegistry {
    pauses: Mutex<HashMap<String, ManualPause>>,
    next_token: AtomicU64,
}

impl PauseRegistry {
    pub fn contains(&self, volume: &str) -> bool {
        lock(&self.pauses).contains_key(volume)
    }

    fn insert(&self, name: &str, volume: Arc<Volume>, hold: HoldId) -> u64 {
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        lock(&self.pauses).insert(name.to_string(), ManualPause { volume, hold, token });
        token
    }

    /// Ends the pause of `volume`, if it is the one `token` names (any one
    /// when `None`). True if a pause ended.
    pub fn end(&self, volume: &str, token: Option<u64>) -> bool {
        let mut pauses = lock(&self.pauses);
        if pauses.get(volume).is_none_or(|p| token.is_some_and(|t| p.token != t)) {
            return false;
        }
        let p = pauses.remove(volume).expect("checked");
        drop(pauses);
        p.end();
        true
    }

    /// Ends every pause (shutdown: parked requests must finish or get
    /// ESHUTDOWN now, not when their pause would have timed out).
    pub fn end_all(&self) {
        let all: Vec<_> = lock(&self.pauses).drain().collect();
        for (name, p) in all {
            tracing::info!(volume = %name, "shutdown ends the manual pause");
            p.end();
        }
    }
}

impl Daemon {
    /// Holds `range` (the whole volume if `None`) of `volume` until `resume`
    /// or until `timeout` passes, whichever is first; in a cluster on every
    /// live node (`cluster_pauses.rs`).
    pub fn pause(self: &Arc<Self>, volume: &str, range: Option<Range>, timeout: Duration) -> Result<String, DaemonError> {
        match self.cluster.get() {
            Some(_) => self.pause_everywhere(volume, range, timeout),
            None => self.pause_here(volume, range, timeout),
        }
    }

    /// Ends the pause of `volume`; in a cluster on every live node.
    pub fn resume(&self, volume: &str) -> Result<String, DaemonError> {
        match self.cluster.get() {
            Some(_) => self.resume_everywhere(volume),
            None => self.resume_here(volume),
        }
    }

    /// The pause on this node alone.
    pub(super) fn pause_here(self: &Arc<Self>, volume: &str, range: Option<Range>, timeout: Duration) -> Result<String, DaemonError> {
        let _admin = lock(&self.admin);
        let v = self.volume(volume)?;
        if self.pauses.contains(volume) {
            return Err(DaemonError::AlreadyPaused(volume.into()));
        }
        if let Some(r) = range {
            if r.is_empty() || r.end > v.size() {
                return Err(DaemonError::RangeOutside { volume: volume.into(), range: r, size: v.size() });
            }
        }
        let drain_timeout = lock(&self.config).server.pause_timeout;
        let hold = v.pause(range.into_iter().collect(), drain_timeout)?;
        let token = self.pauses.insert(volume, v.clone(), hold);
        let me = Arc::downgrade(self);
        let name = volume.to_string();
        std::thread::spawn(move || {
            std::thread::sleep(timeout);
            if me.upgrade().is_some_and(|d| d.pauses.end(&name, Some(token))) {
                tracing::warn!(volume = %name, ?timeout, "manual pause timed out; resumed");
            }
        });
        tracing::info!(volume, ?range, ?timeout, "paused by operator");
        Ok(format!("volume '{volume}' paused (automatic resume after {timeout:?})"))
    }

    pub(super) fn resume_here(&self, volume: &str) -> Result<String, DaemonError> {
        let _admin = lock(&self.admin);
        self.volume(volume)?;
        if !self.pauses.end(volume, None) {
            return Err(DaemonError::NotPaused(volume.into()));
        }
        tracing::info!(volume, "resumed by operator");
        Ok(format!("volume '{volume}' resumed"))
    }
}
