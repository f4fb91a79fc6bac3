//! The one lock helper of the crate, a scoped setting of a thread-local,
//! and work a thread puts off until it is about to wait.
//!
//! A panic while a lock is held (a bug, never an I/O error: those are
//! values) must not take every later request down with a poisoned lock:
//! the data behind our locks stays consistent between statements, so the
//! guard is taken over as it is.

use std::cell::{Cell, RefCell};
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

/// Work put off until a thread waits, in the order it was put off.
type Deferred = Vec<Box<dyn FnOnce()>>;

thread_local! {
    /// This thread's deferred work; `None` on a thread that never said it
    /// runs such work (`runs_deferred_work`).
    static BEFORE_WAIT: RefCell<Option<Deferred>> = const { RefCell::new(None) };
}

/// Declares that this thread calls [`run_deferred`] before every wait
/// (a read that may sleep), so that [`defer_until_wait`] may put work off
/// on it.
pub fn runs_deferred_work() {
    BEFORE_WAIT.with(|b| b.borrow_mut().get_or_insert_with(Vec::new).clear());
}

/// Puts `f` off until this thread is about to wait, if it runs deferred
/// work; otherwise returns false and the caller does what `f` would
/// (at once). Lets a thread that handles several requests in a row write
/// their output together: a forwarding link's reader its replies, a
/// connection's reader its forwarded requests (`remote/held.rs`).
pub fn defer_until_wait(f: impl FnOnce() + 'static) -> bool {
    BEFORE_WAIT.with(|b| match b.borrow_mut().as_mut() {
        Some(list) => {
            list.push(Box::new(f));
            true
        }
        None => false,
    })
}

/// Runs the work put off on this thread, in the order it was put off.
pub fn run_deferred() {
    loop {
        // Taken out first: deferred work may put off more.
        let work = BEFORE_WAIT.with(|b| b.borrow_mut().as_mut().map(std::mem::take).unwrap_or_default());
        if work.is_empty() {
            return;
        }
        work.into_iter().for_each(|f| f());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deferred_work_waits_for_run_deferred_only_where_the_thread_runs_it() {
        std::thread::spawn(|| {
            assert!(!defer_until_wait(|| unreachable!("not deferred")), "a thread that never said it runs deferred work");
            runs_deferred_work();
            let done = std::rc::Rc::new(Cell::new(0));
            let (d1, d2) = (done.clone(), done.clone());
            assert!(defer_until_wait(move || {
                d1.set(d1.get() * 10 + 1);
                let d3 = d1.clone();
                assert!(defer_until_wait(move || d3.set(d3.get() * 10 + 3)));
            }));
            assert!(defer_until_wait(move || d2.set(d2.get() * 10 + 2)));
            assert_eq!(done.get(), 0, "nothing ran yet");
            run_deferred();
            assert_eq!(done.get(), 123, "in order, and work deferred by deferred work too");
            run_deferred();
            assert_eq!(done.get(), 123);
        })
        .join()
        .unwrap();
    }
}
