//! Per-kind counts and latency histograms (HdrHistogram, microseconds), merged from the
//! connections at the end, and their summaries as text and JSON.

use hdrhistogram::Histogram;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::time::Duration;

/// What one kind of request (check-in, report, ...) saw on one connection, or on all of them.
#[derive(Clone)]
pub struct KindStats {
    /// Latency of every request that got its expected answer, from the time it was due (open
    /// loop) or first sent (closed loop) to the end of the answer, retries included.
    hist: Histogram<u64>,
    /// Every answer by HTTP status, retried ones (503) included.
    pub statuses: BTreeMap<u16, u64>,
    /// Every failure by kind: an unexpected status (`"503"`, `"401"`), `connect`, `timeout`, `io`.
    pub errors: BTreeMap<String, u64>,
    /// Open loop: requests that were due before the end but never sent (the generator or the
    /// connection fell behind its schedule).
    pub unsent: u64,
}

impl Default for KindStats {
    fn default() -> Self {
        Self {
            hist: Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds"),
            statuses: BTreeMap::new(),
            errors: BTreeMap::new(),
            unsent: 0,
        }
    }
}

impl KindStats {
    pub fn latency(&mut self, d: Duration) {
        self.hist.saturating_record((d.as_micros() as u64).max(1));
    }

    pub fn status(&mut self, status: u16) {
        *self.statuses.entry(status).or_default() += 1;
    }

    pub fn error(&mut self, kind: &str) {
        *self.errors.entry(kind.to_string()).or_default() += 1;
    }

    pub fn merge(&mut self, other: &KindStats) {
        self.hist.add(&other.hist).expect("histograms with the same bounds");
        for (s, n) in &other.statuses {
            *self.statuses.entry(*s).or_default() += n;
        }
        for (k, n) in &other.errors {
            *self.errors.entry(k.clone()).or_default() += n;
        }
        self.unsent += other.unsent;
    }

    pub fn is_empty(&self) -> bool {
        self.hist.is_empty() && self.statuses.is_empty() && self.errors.is_empty() && self.unsent == 0
    }

    pub fn summary(&self, seconds: f64) -> Summary {
        let ms = |us: u64| us as f64 / 1000.0;
        let count = self.hist.len();
        let q = |q: f64| if count == 0 { 0.0 } else { ms(self.hist.value_at_quantile(q)) };
        Summary {
            count,
            rate: if seconds > 0.0 { count as f64 / seconds } else { 0.0 },
            p50_ms: q(0.50),
            p90_ms: q(0.90),
            p99_ms: q(0.99),
            max_ms: if count == 0 { 0.0 } else { ms(self.hist.max()) },
            statuses: self.statuses.clone(),
            errors: self.errors.clone(),
            unsent: self.unsent,
        }
    }
}

/// A kind's figures over a stretch of time.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    /// Requests that got their expected answer.
    pub count: u64,
    pub rate: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub statuses: BTreeMap<u16, u64>,
    pub errors: BTreeMap<String, u64>,
    pub unsent: u64,
}

fn fmt_ms(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{:.2}s", ms / 1000.0)
    } else if ms >= 10.0 {
        format!("{ms:.1}ms")
    } else {
        format!("{ms:.2}ms")
    }
}

fn fmt_counts<K: std::fmt::Display>(m: &BTreeMap<K, u64>) -> String {
    if m.is_empty() {
        return "none".into();
    }
    m.iter().map(|(k, v)| format!("{k}:{v}")).collect::<Vec<_>>().join(",")
}

impl Summary {
    /// One line: `checkin  count=... rate=.../s p50=... p90=... p99=... max=... statuses=200:1,304:9 errors=none`.
    pub fn line(&self, kind: &str) -> String {
        let mut s = format!(
            "{kind:<12} count={} rate={:.1}/s p50={} p90={} p99={} max={} statuses={} errors={}",
            self.count,
            self.rate,
            fmt_ms(self.p50_ms),
            fmt_ms(self.p90_ms),
            fmt_ms(self.p99_ms),
            fmt_ms(self.max_ms),
            fmt_counts(&self.statuses),
            fmt_counts(&self.errors)
        );
        if self.unsent > 0 {
            s.push_str(&format!(" unsent={}", self.unsent));
        }
        s
    }

    pub fn to_json(&self) -> Value {
        let statuses: Map<String, Value> = self.statuses.iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
        let errors: Map<String, Value> = self.errors.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
        json!({
            "count": self.count,
            "rate_per_s": round3(self.rate),
            "latency_ms": {"p50": round3(self.p50_ms), "p90": round3(self.p90_ms), "p99": round3(self.p99_ms), "max": round3(self.max_ms)},
            "statuses": statuses,
            "errors": errors,
            "errors_total": self.errors.values().sum::<u64>(),
            "unsent": self.unsent,
        })
    }
}

pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// The value below which `q` of `sorted` lie (nearest rank); `None` for no values.
pub fn quantile(sorted: &[Duration], q: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_uniform_spread() {
        let mut s = KindStats::default();
        for ms in 1..=1000u64 {
            s.latency(Duration::from_millis(ms));
        }
        let mut other = KindStats::default();
        other.latency(Duration::from_secs(5));
        other.status(304);
        other.error("timeout");
        s.merge(&other);
        s.status(200);
        let sum = s.summary(10.0);
        assert_eq!(sum.count, 1001);
        assert!((sum.rate - 100.1).abs() < 1e-9);
        // HdrHistogram with 3 significant digits: within 0.1 %.
        for (got, want) in [(sum.p50_ms, 501.0), (sum.p90_ms, 901.0), (sum.p99_ms, 991.0), (sum.max_ms, 5000.0)] {
            assert!((got - want).abs() <= want * 0.001 + 0.001, "{got} vs {want}");
        }
        assert_eq!(sum.statuses, BTreeMap::from([(200, 1), (304, 1)]));
        assert_eq!(sum.errors, BTreeMap::from([("timeout".to_string(), 1)]));
        assert!(sum.line("checkin").contains("statuses=200:1,304:1 errors=timeout:1"));
        assert_eq!(sum.to_json()["errors_total"], 1);
    }

    #[test]
    fn empty_summary_is_zero() {
        let sum = KindStats::default().summary(0.0);
        assert_eq!((sum.count, sum.rate, sum.p99_ms, sum.max_ms), (0, 0.0, 0.0, 0.0));
    }

    #[test]
    fn nearest_rank_quantiles() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_secs).collect();
        assert_eq!(quantile(&v, 0.5), Some(Duration::from_secs(50)));
        assert_eq!(quantile(&v, 0.99), Some(Duration::from_secs(99)));
        assert_eq!(quantile(&v, 1.0), Some(Duration::from_secs(100)));
        assert_eq!(quantile(&v, 0.0), Some(Duration::from_secs(1)));
        assert_eq!(quantile(&[], 0.5), None);
    }
}
