//! The deadline of the blocking requests a thread sends: their bound from
//! now, unless `within` says otherwise. A started request that comes back
//! to be sent the blocking way (`Started::Resend`) runs on a pool thread
//! inside `within(deadline, ..)`, so it keeps the bound it had since it
//! was started instead of getting a fresh one (the forwarding bound counts
//! from the request's arrival).

use std::cell::Cell;
use std::time::Instant;

thread_local! {
    /// Set by `within`: the deadline of the blocking requests this thread
    /// sends, instead of their own bound from now.
    static DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Runs `f` (which sends requests the blocking way on this thread) with
/// `deadline` as their deadline when given: a started request sent again
/// keeps the bound it had since it was started, never a fresh one.
pub fn within<T>(deadline: Option<Instant>, f: impl FnOnce() -> T) -> T {
    crate::sync::with_local(&DEADLINE, deadline.or(DEADLINE.get()), f)
}

/// The deadline `within` set on this thread, if any.
pub(super) fn current() -> Option<Instant> {
    DEADLINE.get()
}
