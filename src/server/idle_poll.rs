//! How long an idle connection's reader polls for the next request before
//! it sleeps in `recv`, adapted to how soon this client's requests came.
//!
//! A client waiting on its last reply sends the next request within
//! microseconds; a reader asleep in `recv` has to be woken by an
//! inter-processor interrupt, which on a virtual machine costs more than a
//! whole 4 KiB request (QD1 latency 65 µs asleep vs 30 µs polling,
//! docs/PERFORMANCE.md §1). But a poll that ends without a request is CPU
//! burnt for nothing, and a client with think time between requests makes
//! every poll such a one (`server.busy_poll` per request: 50 µs of a core
//! per request, for as many connections as there are).
//!
//! So polling adapts to the client, like KVM's halt polling but with a
//! simpler rule that survives a noisy host: a poll that catches the next
//! request keeps polling on; after `MISSES_TO_STOP` polls in a row that
//! caught nothing the reader sleeps at once instead, and only probes now
//! and then (every `PROBE_FIRST` idle waits, backing off to every
//! `PROBE_LAST` while the probes keep missing) whether the client has
//! become quick again. A sleep that was over within `busy_poll`, wake-up
//! included, also turns polling back on. (A first version sized the window
//! from the measured gaps; it shrank to nothing on a quick client: a gap
//! measured across a sleep includes the wake-up, which on a VM alone
//! exceeds 50 µs.)

use std::os::fd::RawFd;
use std::time::{Duration, Instant};

/// Polls in a row that caught nothing before the reader stops polling.
const MISSES_TO_STOP: u32 = 3;
/// While stopped, every how many idle waits a probe polls the full window;
/// the interval doubles after each probe that misses, up to `PROBE_LAST`.
const PROBE_FIRST: u32 = 16;
const PROBE_LAST: u32 = 128;

/// What the poll of one idle wait did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Polled {
    /// Not polled (off, or stopped between probes): the reader sleeps.
    Skipped,
    /// Data came within the window.
    Caught,
    /// The window ended without data: polling was wasted.
    Missed,
}

#[derive(Debug)]
pub struct IdlePoll {
    /// The configured window (`server.busy_poll`); zero turns polling off.
    max: Duration,
    misses: u32,
    /// Idle waits since polling stopped or the last probe.
    waits: u32,
    probe_every: u32,
}

impl IdlePoll {
    pub fn new(max: Duration) -> IdlePoll {
        IdlePoll { max, misses: 0, waits: 0, probe_every: PROBE_FIRST }
    }

    fn stopped(&self) -> bool {
        self.misses >= MISSES_TO_STOP
    }

    /// Polls `fd` without sleeping for up to the window, unless polling has
    /// stopped for this client; returns as soon as data (or an end of
    /// stream, or an error, which the following read reports) is there.
    /// Yields the CPU each round to any runnable thread, so a poll never
    /// competes with real work.
    pub fn poll(&mut self, fd: RawFd) -> Polled {
        match self.next_window() {
            None => Polled::Skipped,
            Some(window) if wait_readable(fd, window) => Polled::Caught,
            Some(_) => Polled::Missed,
        }
    }

    /// How long this idle wait polls, if at all.
    fn next_window(&mut self) -> Option<Duration> {
        if self.max.is_zero() {
            return None;
        }
        if self.stopped() {
            self.waits += 1;
            if self.waits < self.probe_every {
                return None;
            }
            self.waits = 0;
            self.probe_every = (self.probe_every * 2).min(PROBE_LAST);
        }
        Some(self.max)
    }

    /// Learns from one idle wait: what its poll did, and how long after the
    /// reader went idle the next request's first bytes were there.
    pub fn record(&mut self, polled: Polled, gap: Duration) {
        let quick = match polled {
            Polled::Caught => true,
            Polled::Missed => false,
            Polled::Skipped => {
                if self.max.is_zero() || gap > self.max {
                    return;
                }
                true
            }
        };
        if quick {
            self.misses = 0;
            self.waits = 0;
            self.probe_every = PROBE_FIRST;
        } else {
            self.misses = self.misses.saturating_add(1);
        }
    }
}

/// Whether `fd` has data (or EOF, or an error) within `window`, found by
/// `recv(MSG_PEEK|MSG_DONTWAIT)` + `sched_yield` rounds.
fn wait_readable(fd: RawFd, window: Duration) -> bool {
    let start = Instant::now();
    let mut byte = 0u8;
    while start.elapsed() < window {
        // SAFETY: a one-byte peek into a local; nothing is consumed.
        let n = unsafe { libc::recv(fd, (&raw mut byte).cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
        if n >= 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EAGAIN) {
            return true;
        }
        std::thread::yield_now();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    const MAX: Duration = Duration::from_micros(50);

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    /// What a wake-up from `recv` adds to a gap measured across a sleep.
    const WAKE: Duration = Duration::from_micros(60);

    /// The polls of `waits` idle waits of a client whose requests come
    /// `gap` after the reader goes idle: a poll catches them iff gap <= the
    /// window; a reader that slept sees them WAKE later.
    fn run(p: &mut IdlePoll, gap: Duration, waits: usize) -> Vec<Polled> {
        (0..waits)
            .map(|_| {
                let (polled, seen) = match p.next_window() {
                    None => (Polled::Skipped, gap + WAKE),
                    Some(w) if gap <= w => (Polled::Caught, gap),
                    Some(w) => (Polled::Missed, gap.max(w) + WAKE),
                };
                p.record(polled, seen);
                polled
            })
            .collect()
    }

    #[test]
    fn a_quick_client_is_always_polled_and_a_stray_miss_changes_nothing() {
        let mut p = IdlePoll::new(MAX);
        assert!(run(&mut p, us(20), 100).iter().all(|&x| x == Polled::Caught));
        assert_eq!(run(&mut p, us(400), 2), [Polled::Missed, Polled::Missed], "two host hiccups");
        assert_eq!(run(&mut p, us(20), 1), [Polled::Caught]);
        assert_eq!(run(&mut p, us(400), 2), [Polled::Missed, Polled::Missed], "the count starts anew");
    }

    #[test]
    fn a_client_with_think_time_is_probed_ever_more_rarely() {
        let mut p = IdlePoll::new(MAX);
        let polls = run(&mut p, us(150), 3 + 16 + 32 + 64 + 128 * 4);
        let missed: Vec<usize> = polls.iter().enumerate().filter(|(_, &x)| x == Polled::Missed).map(|(i, _)| i).collect();
        assert_eq!(missed, [0, 1, 2, 18, 50, 114, 242, 370, 498, 626], "three misses, then probes at 16, 32, 64, 128, 128 ...");
        assert!(polls.iter().all(|&x| x != Polled::Caught));
    }

    #[test]
    fn a_probe_or_a_short_sleep_turns_polling_back_on() {
        let mut p = IdlePoll::new(MAX);
        run(&mut p, us(150), 3 + 16 + 5);
        assert!(p.stopped());
        let polls = run(&mut p, us(20), 40);
        assert_eq!(polls[..26], [Polled::Skipped; 26], "asleep (gaps with the wake-up > 50 us) until the probe at 32");
        assert_eq!(polls[26..], [Polled::Caught; 14]);
        run(&mut p, us(150), 3);
        assert!(p.stopped());
        p.record(Polled::Skipped, us(40));
        assert!(!p.stopped(), "a sleep over within the window: a quick client again");
        run(&mut p, us(150), 3);
        assert_eq!(p.probe_every, PROBE_FIRST, "the back-off starts anew");
    }

    #[test]
    fn zero_means_off() {
        let mut p = IdlePoll::new(Duration::ZERO);
        let (ours, mut peer) = UnixStream::pair().unwrap();
        peer.write_all(b"x").unwrap();
        assert_eq!(p.poll(ours.as_raw_fd()), Polled::Skipped);
        p.record(Polled::Skipped, us(1));
        assert_eq!(p.poll(ours.as_raw_fd()), Polled::Skipped);
    }

    #[test]
    fn the_poll_returns_at_once_when_data_waits_and_after_the_window_when_none_comes() {
        let (ours, mut peer) = UnixStream::pair().unwrap();
        let t = Instant::now();
        assert_eq!(IdlePoll::new(Duration::from_millis(20)).poll(ours.as_raw_fd()), Polled::Missed);
        assert!(t.elapsed() >= Duration::from_millis(20), "nothing came: polled the whole window");
        peer.write_all(b"x").unwrap();
        let t = Instant::now();
        assert_eq!(IdlePoll::new(Duration::from_secs(30)).poll(ours.as_raw_fd()), Polled::Caught);
        assert!(t.elapsed() < Duration::from_secs(30), "data waiting: returned long before the window's end");
        let mut byte = [0u8; 1];
        assert_eq!(std::io::Read::read(&mut &ours, &mut byte).unwrap(), 1, "the peek consumed nothing");
    }
}
