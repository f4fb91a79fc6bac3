//! The one lock helper of the crate, and a scoped setting of a
//! thread-local.
//!
//! A panic while a lock is held (a bug, never an I/O error: those are
//! values) must not take every later request down with a poisoned lock:
//! the data behind our locks stays consistent between statements, so the
//! guard is taken over as it is.

use std::cell::Cell;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::thread::LocalKey;
use std::time::Duration;

/// Locks `m`, ignoring poisoning.
#[inline]
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `Condvar::wait`, ignoring poisoning.
#[inline]
pub fn wait<'a, T>(cv: &Condvar, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    cv.wait(guard).unwrap_or_else(|p| p.into_inner())
}

/// `Condvar::wait_timeout`, ignoring poisoning; true if it timed out.
#[inline]
pub fn wait_timeout<'a, T>(cv: &Condvar, guard: MutexGuard<'a, T>, timeout: Duration) -> (MutexGuard<'a, T>, bool) {
    let (g, r) = cv.wait_timeout(guard, timeout).unwrap_or_else(|p| p.into_inner());
    (g, r.timed_out())
}

/// Runs `f` with the thread-local `key` set to `value`, and puts back what
/// it held however `f` ends (a panic included).
pub fn with_local<T: Copy + 'static, R>(key: &'static LocalKey<Cell<T>>, value: T, f: impl FnOnce() -> R) -> R {
    struct Restore<T: Copy + 'static>(&'static LocalKey<Cell<T>>, T);
    impl<T: Copy + 'static> Drop for Restore<T> {
        fn drop(&mut self) {
            self.0.set(self.1);
        }
    }
    let _restore = Restore(key, key.replace(value));
    f()
}
