//! Per-volume I/O and swap counters, read by the metrics exporter at scrape
//! time. The request path only does relaxed atomic adds on them: no lock, no
//! allocation (a few uncontended `lock add`s per request, next to a request
//! that costs tens of microseconds). Counters reset when a volume object is
//! rebuilt (a reload that re-creates it); Prometheus treats that as a reset.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;
use std::time::Duration;

/// When a request was admitted, in the request clock's raw units.
#[derive(Debug, Clone, Copy)]
pub struct Stamp(u64);

/// The request clock: the CPU's invariant TSC where it has one (`quanta`
/// checks and calibrates it once, ~1 ms), else the OS monotonic clock. Two
/// `std::time::Instant::now()` per request cost ~80 ns on this project's
/// VMs (vDSO clock_gettime), ~2% of a 4 KiB read's server CPU; two TSC
/// reads cost ~25 ns.
fn clock() -> &'static quanta::Clock {
    static CLOCK: OnceLock<quanta::Clock> = OnceLock::new();
    CLOCK.get_or_init(quanta::Clock::new)
}

/// The request kinds counted apart (the server maps NBD commands onto them;
/// this layer knows no protocol).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
    Cache,
    BlockStatus,
    /// A command the server does not know (answered EINVAL).
    Unknown,
}

impl Op {
    pub const ALL: [Op; 8] = [Op::Read, Op::Write, Op::Flush, Op::Trim, Op::WriteZeroes, Op::Cache, Op::BlockStatus, Op::Unknown];

    /// The `op` label value.
    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Trim => "trim",
            Op::WriteZeroes => "write_zeroes",
            Op::Cache => "cache",
            Op::BlockStatus => "block_status",
            Op::Unknown => "unknown",
        }
    }
}

/// What a finished swap attempt came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwapResult {
    Ok,
    CommitFailed,
    DrainTimeout,
}

impl SwapResult {
    pub const ALL: [SwapResult; 3] = [SwapResult::Ok, SwapResult::CommitFailed, SwapResult::DrainTimeout];

    /// The `result` label value.
    pub fn name(self) -> &'static str {
        match self {
            SwapResult::Ok => "ok",
            SwapResult::CommitFailed => "commit_failed",
            SwapResult::DrainTimeout => "drain_timeout",
        }
    }
}

/// Upper bounds of the duration histograms' buckets, in nanoseconds (what
/// `observe` compares against; the `+Inf` bucket comes after them). One
/// fixed set for requests and swaps: 10 µs (a page-cache 4 KiB read) to
/// 10 s (a slow device or a long hold).
const BUCKETS_NS: [u64; 19] = [
    10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000, 5_000_000, 10_000_000, 25_000_000, 50_000_000, 100_000_000, 250_000_000,
    500_000_000, 1_000_000_000, 2_500_000_000, 5_000_000_000, 10_000_000_000,
];

/// [`BUCKETS_NS`] in seconds, the `le` labels.
pub const BUCKETS: [f64; 19] = {
    let mut out = [0.0; 19];
    let mut i = 0;
    while i < out.len() {
        out[i] = BUCKETS_NS[i] as f64 / 1e9;
        i += 1;
    }
    out
};

/// A duration histogram over [`BUCKETS`]: per-bucket (not cumulative)
/// counts, so an observation is one add, plus the sum in nanoseconds.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_ns: AtomicU64,
}

/// A histogram as read at one moment: cumulative bucket counts, the last
/// one (`+Inf`) equal to `count`.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    pub cumulative: [u64; BUCKETS.len() + 1],
    pub sum_seconds: f64,
}

impl HistogramSnapshot {
    pub fn count(&self) -> u64 {
        self.cumulative[BUCKETS.len()]
    }

    /// Both histograms' observations together.
    pub fn merged(&self, other: &HistogramSnapshot) -> HistogramSnapshot {
        HistogramSnapshot { cumulative: std::array::from_fn(|i| self.cumulative[i] + other.cumulative[i]), sum_seconds: self.sum_seconds + other.sum_seconds }
    }
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        self.observe_ns(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    fn observe_ns(&self, ns: u64) {
        let i = BUCKETS_NS.iter().position(|&b| ns <= b).unwrap_or(BUCKETS_NS.len());
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(ns, Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut cumulative = [0u64; BUCKETS.len() + 1];
        let mut total = 0;
        for (c, out) in self.counts.iter().zip(cumulative.iter_mut()) {
            total += c.load(Relaxed);
            *out = total;
        }
        HistogramSnapshot { cumulative, sum_seconds: self.sum_ns.load(Relaxed) as f64 / 1e9 }
    }
}

const OPS: usize = Op::ALL.len();

/// One volume's counters (one `Arc` per [`Volume`](super::Volume), shared
/// by its connections).
#[derive(Debug)]
pub struct VolumeStats {
    /// Per op and result (succeeded, failed): durations. Their counts are
    /// the request counts (one add per request instead of two).
    latency: [[Histogram; 2]; OPS],
    /// Requests admitted; minus those completed (the histograms' counts),
    /// the requests in flight (one add per request instead of an add and
    /// a subtract).
    admitted: AtomicU64,
    /// Bytes of successful reads, writes, trims, write-zeroes.
    read: AtomicU64,
    written: AtomicU64,
    trimmed: AtomicU64,
    zeroed: AtomicU64,
    connections: AtomicU64,
    swaps: [AtomicU64; SwapResult::ALL.len()],
    swap_hold: Histogram,
    swap_drain: Histogram,
}

/// Everything in [`VolumeStats`] read at one moment (each value atomically,
/// not the set: a scrape may see a request counted but not yet its bytes).
#[derive(Debug, Clone, PartialEq)]
pub struct StatsSnapshot {
    /// Per [`Op::ALL`]: (succeeded, failed).
    pub requests: [(u64, u64); OPS],
    pub read_bytes: u64,
    pub written_bytes: u64,
    pub trimmed_bytes: u64,
    pub zeroed_bytes: u64,
    pub in_flight: u64,
    pub connections: u64,
    /// Per [`Op::ALL`].
    pub latency: Vec<HistogramSnapshot>,
    /// Per [`SwapResult::ALL`].
    pub swaps: [u64; SwapResult::ALL.len()],
    pub swap_hold: HistogramSnapshot,
    pub swap_drain: HistogramSnapshot,
}

impl Default for VolumeStats {
    fn default() -> Self {
        VolumeStats::new()
    }
}

impl VolumeStats {
    pub fn new() -> VolumeStats {
        clock(); // calibrated now, not on a request
        VolumeStats {
            latency: Default::default(),
            admitted: AtomicU64::new(0),
            read: AtomicU64::new(0),
            written: AtomicU64::new(0),
            trimmed: AtomicU64::new(0),
            zeroed: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            swaps: Default::default(),
            swap_hold: Histogram::default(),
            swap_drain: Histogram::default(),
        }
    }

    /// Now, for a request's duration: its `started` stamp.
    pub fn now() -> Stamp {
        Stamp(clock().raw())
    }

    /// A request was admitted (it will be [`completed`](Self::completed)).
    pub fn started(&self) {
        self.admitted.fetch_add(1, Relaxed);
    }

    /// A request's reply is ready: `bytes` is its length (counted for
    /// reads, writes, trims and write-zeroes that succeeded), `started`
    /// when it was admitted ([`now`](Self::now)).
    pub fn completed(&self, op: Op, ok: bool, bytes: u64, started: Stamp) {
        let clock = clock();
        let elapsed_ns = clock.delta_as_nanos(started.0, clock.raw());
        let i = op as usize;
        if ok {
            let counter = match op {
                Op::Read => Some(&self.read),
                Op::Write => Some(&self.written),
                Op::Trim => Some(&self.trimmed),
                Op::WriteZeroes => Some(&self.zeroed),
                _ => None,
            };
            if let Some(c) = counter {
                c.fetch_add(bytes, Relaxed);
            }
        }
        self.latency[i][usize::from(!ok)].observe_ns(elapsed_ns);
    }

    pub fn connection_opened(&self) {
        self.connections.fetch_add(1, Relaxed);
    }

    pub fn connection_closed(&self) {
        self.connections.fetch_sub(1, Relaxed);
    }

    /// A swap attempt ended: `hold` is how long its ranges were held (none
    /// when it never held them), `drain` how long draining took.
    pub fn swap_finished(&self, result: SwapResult, hold: Option<Duration>, drain: Option<Duration>) {
        self.swaps[result as usize].fetch_add(1, Relaxed);
        if let Some(h) = hold {
            self.swap_hold.observe(h);
        }
        if let Some(d) = drain {
            self.swap_drain.observe(d);
        }
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        // Completions first: a request is admitted before it completes, so
        // `admitted` read after them is at least their count (saturating
        // anyway: relaxed loads of different counters promise no order).
        let by_result: Vec<[HistogramSnapshot; 2]> = self.latency.iter().map(|[ok, failed]| [ok.snapshot(), failed.snapshot()]).collect();
        let admitted = self.admitted.load(Relaxed);
        StatsSnapshot {
            requests: std::array::from_fn(|i| (by_result[i][0].count(), by_result[i][1].count())),
            read_bytes: self.read.load(Relaxed),
            written_bytes: self.written.load(Relaxed),
            trimmed_bytes: self.trimmed.load(Relaxed),
            zeroed_bytes: self.zeroed.load(Relaxed),
            in_flight: admitted.saturating_sub(by_result.iter().flatten().map(HistogramSnapshot::count).sum()),
            connections: self.connections.load(Relaxed),
            latency: by_result.iter().map(|[ok, failed]| ok.merged(failed)).collect(),
            swaps: std::array::from_fn(|i| self.swaps[i].load(Relaxed)),
            swap_hold: self.swap_hold.snapshot(),
            swap_drain: self.swap_drain.snapshot(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_match_and_histograms_cumulate() {
        for (s, ns) in BUCKETS.iter().zip(BUCKETS_NS) {
            assert_eq!((s * 1e9).round() as u64, ns);
        }
        let h = Histogram::default();
        h.observe(Duration::from_micros(10)); // on the bound: first bucket
        h.observe(Duration::from_micros(11));
        h.observe(Duration::from_secs(60)); // beyond every bound: +Inf only
        let s = h.snapshot();
        assert_eq!(&s.cumulative[..3], &[1, 2, 2]);
        assert_eq!((s.cumulative[BUCKETS.len() - 1], s.count()), (2, 3));
        assert!((s.sum_seconds - 60.000_021).abs() < 1e-9);
    }

    #[test]
    fn requests_count_bytes_only_on_success() {
        let v = VolumeStats::default();
        for (op, ok) in [(Op::Write, true), (Op::Write, false), (Op::Read, true), (Op::WriteZeroes, true), (Op::Flush, true)] {
            v.started();
            v.completed(op, ok, 4096, VolumeStats::now());
        }
        v.started();
        let s = v.snapshot();
        assert_eq!((s.requests[Op::Write as usize], s.requests[Op::Read as usize], s.requests[Op::Flush as usize]), ((1, 1), (1, 0), (1, 0)));
        assert_eq!((s.read_bytes, s.written_bytes, s.trimmed_bytes, s.zeroed_bytes), (4096, 4096, 0, 4096));
        assert_eq!((s.in_flight, s.latency[Op::Write as usize].count()), (1, 2));
        assert!(s.latency[Op::Write as usize].sum_seconds < 1.0, "durations are in seconds: {}", s.latency[Op::Write as usize].sum_seconds);
        v.swap_finished(SwapResult::DrainTimeout, None, Some(Duration::from_millis(3)));
        let s = v.snapshot();
        assert_eq!((s.swaps, s.swap_hold.count(), s.swap_drain.count()), ([0, 0, 1], 0, 1));
    }
}
