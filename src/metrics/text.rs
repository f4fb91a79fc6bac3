//! The Prometheus text exposition format, version 0.0.4 (the classic one,
//! what `promtool check metrics` and every Prometheus server read): per
//! family `# HELP`, `# TYPE`, then its samples, all together. Not
//! OpenMetrics (no `# EOF`, counters named with their `_total`).
//! `prometheus-client`, the crate issue 11 suggests, encodes OpenMetrics
//! only (`# TYPE x counter` then `x_total`, `# EOF`), which Debian's
//! promtool 2.42 rejects; this encoder is a hundred lines over samples we
//! collect ourselves anyway, so no registry crate is used.

use crate::volume::{HistogramSnapshot, BUCKETS};
use std::fmt::Write;

/// The content type of the format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One metric family being filled; see [`Exposition::push`].
pub struct Family {
    name: &'static str,
    help: &'static str,
    kind: Kind,
    samples: String,
}

impl Family {
    pub fn new(name: &'static str, help: &'static str, kind: Kind) -> Family {
        Family { name, help, kind, samples: String::new() }
    }

    pub fn counter(name: &'static str, help: &'static str) -> Family {
        Family::new(name, help, Kind::Counter)
    }

    pub fn gauge(name: &'static str, help: &'static str) -> Family {
        Family::new(name, help, Kind::Gauge)
    }

    pub fn histogram(name: &'static str, help: &'static str) -> Family {
        Family::new(name, help, Kind::Histogram)
    }

    /// One sample of a counter or gauge.
    pub fn sample(&mut self, labels: &[(&str, &str)], value: impl Into<Value>) {
        line(&mut self.samples, self.name, "", labels, None, value.into());
    }

    /// A histogram's `_bucket` series (one per bound and `+Inf`), `_sum`
    /// and `_count`.
    pub fn observations(&mut self, labels: &[(&str, &str)], h: &HistogramSnapshot) {
        for (i, count) in h.cumulative.iter().enumerate() {
            let le = BUCKETS.get(i).map_or_else(|| "+Inf".to_string(), |b| b.to_string());
            line(&mut self.samples, self.name, "_bucket", labels, Some(&le), Value::Int(*count));
        }
        line(&mut self.samples, self.name, "_sum", labels, None, Value::Float(h.sum_seconds));
        line(&mut self.samples, self.name, "_count", labels, None, Value::Int(h.count()));
    }
}

/// A sample value: integers print exactly, floats as Prometheus spells them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    Int(u64),
    Float(f64),
}

impl From<u64> for Value {
    fn from(v: u64) -> Value {
        Value::Int(v)
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Value {
        Value::Float(v)
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Value {
        Value::Int(u64::from(v))
    }
}

fn line(out: &mut String, name: &str, suffix: &str, labels: &[(&str, &str)], le: Option<&str>, value: Value) {
    out.push_str(name);
    out.push_str(suffix);
    let extra = le.map(|le| ("le", le));
    let mut all = labels.iter().copied().chain(extra).peekable();
    if all.peek().is_some() {
        out.push('{');
        for (i, (k, v)) in all.enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{k}=\"{}\"", escape(v, true));
        }
        out.push('}');
    }
    out.push(' ');
    match value {
        Value::Int(v) => {
            let _ = write!(out, "{v}");
        }
        Value::Float(v) if v.is_nan() => out.push_str("NaN"),
        Value::Float(v) if v.is_infinite() => out.push_str(if v > 0.0 { "+Inf" } else { "-Inf" }),
        Value::Float(v) => {
            let _ = write!(out, "{v}");
        }
    }
    out.push('\n');
}

/// Escapes a label value (backslash, double quote, newline) or a HELP text
/// (backslash, newline).
fn escape(s: &str, quote: bool) -> std::borrow::Cow<'_, str> {
    if !s.contains(['\\', '\n', '"']) {
        return s.into();
    }
    let mut out = String::with_capacity(s.len() + 4);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if quote => out.push_str("\\\""),
            c => out.push(c),
        }
    }
    out.into()
}

/// A whole exposition: families in the order pushed.
#[derive(Default)]
pub struct Exposition {
    text: String,
}

impl Exposition {
    /// Appends `family`; one without samples is left out (Prometheus drops
    /// empty families anyway).
    pub fn push(&mut self, family: Family) {
        if family.samples.is_empty() {
            return;
        }
        let _ = writeln!(self.text, "# HELP {} {}", family.name, escape(family.help, false));
        let _ = writeln!(self.text, "# TYPE {} {}", family.name, family.kind.name());
        self.text.push_str(&family.samples);
    }

    pub fn finish(self) -> String {
        self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_print_in_the_classic_format() {
        let mut e = Exposition::default();
        let mut c = Family::counter("x_total", "Things \\ done.\nTwice.");
        c.sample(&[("volume", "a\"b\\c\nd")], 3u64);
        c.sample(&[], 1.5);
        e.push(c);
        e.push(Family::gauge("empty", "Nothing."));
        let mut g = Family::gauge("g", "G.");
        g.sample(&[("a", "1"), ("b", "2")], f64::INFINITY);
        e.push(g);
        assert_eq!(
            e.finish(),
            "# HELP x_total Things \\\\ done.\\nTwice.\n# TYPE x_total counter\nx_total{volume=\"a\\\"b\\\\c\\nd\"} 3\nx_total 1.5\n\
             # HELP g G.\n# TYPE g gauge\ng{a=\"1\",b=\"2\"} +Inf\n"
        );
    }

    #[test]
    fn histograms_have_buckets_sum_and_count() {
        let mut cumulative = [2u64; BUCKETS.len() + 1];
        cumulative[0] = 1;
        cumulative[BUCKETS.len()] = 3;
        let mut h = Family::histogram("d_seconds", "D.");
        h.observations(&[("op", "read")], &HistogramSnapshot { cumulative, sum_seconds: 0.25 });
        let mut e = Exposition::default();
        e.push(h);
        let text = e.finish();
        assert!(text.contains("d_seconds_bucket{op=\"read\",le=\"0.00001\"} 1\n"), "{text}");
        assert!(text.contains("d_seconds_bucket{op=\"read\",le=\"10\"} 2\nd_seconds_bucket{op=\"read\",le=\"+Inf\"} 3\n"), "{text}");
        assert!(text.ends_with("d_seconds_sum{op=\"read\"} 0.25\nd_seconds_count{op=\"read\"} 3\n"), "{text}");
    }
}
