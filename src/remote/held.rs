//! Forwarded requests held back on a client connection's reader while it
//! still has requests buffered, and written together (one write per link)
//! before it reads again. The serving node then takes them in one recv(2),
//! runs them back to back and corks its replies (`server/sink.rs`), so one
//! wakeup on each side carries several requests instead of one: the same
//! cork the serving side has for replies, here for the forwarding side's
//! sends. Only a thread that runs deferred work holds sends back
//! (`crate::sync::runs_deferred_work`: a connection's reader, which runs
//! it before anything that may block it); the first send it holds puts
//! off the write of everything held until then. Every other thread (the
//! blocking pool's `call`s, link readers) writes at once.
//! docs/PERFORMANCE.md §17e.

use super::connection::Link;
use std::cell::RefCell;
use std::sync::Arc;

/// Bytes held for one link before they are written anyway.
const MAX_HELD: usize = 64 * 1024;
/// Requests with a larger payload are written at once: batching saves a
/// syscall, which only matters next to a small request's own cost, and a
/// copy into the held buffer would cost more than it saves.
const MAX_HELD_PAYLOAD: usize = 16 * 1024;

/// A link, compared by identity.
#[derive(Clone)]
struct ByAddress(Arc<Link>);

impl PartialEq for ByAddress {
    fn eq(&self, other: &ByAddress) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// What one thread holds: bytes per destination, in the order held.
struct Held<T> {
    /// The write of what is held is put off until the thread waits.
    corked: bool,
    sends: Vec<(T, Vec<u8>)>,
}

impl<T: PartialEq + Clone> Held<T> {
    const fn new() -> Held<T> {
        Held { corked: false, sends: Vec::new() }
    }

    /// Holds `parts` for `to` if corked and small enough; else, or once
    /// `to`'s bytes pass `MAX_HELD`, returns what is to be written now
    /// (earlier held bytes first, so that nothing is written twice).
    fn hold(&mut self, to: &T, parts: &[&[u8]]) -> Option<Vec<u8>> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let i = self.sends.iter().position(|(t, _)| t == to);
        if !self.corked || len > MAX_HELD_PAYLOAD {
            let mut now = i.map(|i| self.sends.remove(i).1).unwrap_or_default();
            now.reserve(len);
            parts.iter().for_each(|p| now.extend_from_slice(p));
            return Some(now);
        }
        let i = i.unwrap_or_else(|| {
            self.sends.push((to.clone(), Vec::with_capacity(MAX_HELD.min(len * 16))));
            self.sends.len() - 1
        });
        let bytes = &mut self.sends[i].1;
        parts.iter().for_each(|p| bytes.extend_from_slice(p));
        (bytes.len() >= MAX_HELD).then(|| self.sends.remove(i).1)
    }

    /// Ends the cork: everything held, per destination.
    fn uncork(&mut self) -> Vec<(T, Vec<u8>)> {
        self.corked = false;
        std::mem::take(&mut self.sends)
    }
}

thread_local! {
    static HELD: RefCell<Held<ByAddress>> = const { RefCell::new(Held::new()) };
}

/// Writes what this thread held back, one write per link (work put off
/// until the thread waits).
fn write_held() {
    let sends = HELD.with(|h| h.borrow_mut().uncork());
    for (ByAddress(link), bytes) in sends {
        link.write_now(&bytes);
    }
}

/// Sends `header` and `payload` on `link`, or holds them if this thread
/// runs deferred work. The write (and a failed write's kill, which runs
/// the waiters' completions) happens outside the thread's record.
pub(super) fn send(link: &Arc<Link>, header: &[u8], payload: &[u8]) {
    let corked = HELD.with(|h| {
        let mut h = h.borrow_mut();
        if !h.corked {
            h.corked = crate::sync::defer_until_wait(write_held);
        }
        h.corked
    });
    if !corked {
        return link.write_parts(header, payload);
    }
    if let Some(bytes) = HELD.with(|h| h.borrow_mut().hold(&ByAddress(Arc::clone(link)), &[header, payload])) {
        link.write_now(&bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uncorked_sends_go_at_once_and_corked_ones_wait_for_uncork() {
        let mut held = Held::<u8>::new();
        assert_eq!(held.hold(&1, &[b"ab", b"c"]), Some(b"abc".to_vec()), "not corked: written now");
        held.corked = true;
        assert_eq!(held.hold(&1, &[b"r1", b""]), None);
        assert_eq!(held.hold(&2, &[b"s1", b"x"]), None);
        assert_eq!(held.hold(&1, &[b"r2", b"yy"]), None);
        assert_eq!(held.uncork(), vec![(1, b"r1r2yy".to_vec()), (2, b"s1x".to_vec())], "one write per link, in order");
        assert!(!held.corked && held.sends.is_empty());
        assert_eq!(held.hold(&1, &[b"z", b""]), Some(b"z".to_vec()), "uncorked again");
    }

    #[test]
    fn a_full_or_large_send_leaves_with_what_was_held_before_it() {
        let mut held = Held::<u8>::new();
        held.corked = true;
        assert_eq!(held.hold(&1, &[b"h1", b""]), None);
        let large = vec![7u8; MAX_HELD_PAYLOAD + 1];
        let now = held.hold(&1, &[b"h2", &large]).expect("a large payload is not held");
        assert_eq!((&now[..4], now.len()), (&b"h1h2"[..], 4 + large.len()), "held bytes first, nothing lost");
        assert!(held.sends.is_empty());
        let small = vec![1u8; MAX_HELD_PAYLOAD];
        let mut written = 0;
        for _ in 0..MAX_HELD / MAX_HELD_PAYLOAD + 1 {
            written += held.hold(&1, &[b"", &small]).map_or(0, |b| b.len());
        }
        assert_eq!(written, MAX_HELD, "written once MAX_HELD bytes are held");
        assert_eq!(held.uncork().iter().map(|(_, b)| b.len()).sum::<usize>(), small.len());
    }
}
