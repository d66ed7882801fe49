//! Failed authentications (device credentials, admin tokens, enrollment tokens), counted and
//! logged in aggregate: one log line per interval with the counts and the busiest source
//! addresses, never a line per request and never what was presented. Brute force shows up as a
//! rising count without flooding the log.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Source addresses remembered per interval; past this, failures are still counted.
const MAX_SOURCES: usize = 4096;
/// Addresses named in the log line.
const TOP_SOURCES: usize = 5;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthKind {
    Device,
    Admin,
    Enrollment,
}

#[derive(Default)]
pub struct AuthFailures {
    device: AtomicU64,
    admin: AtomicU64,
    enrollment: AtomicU64,
    sources: Mutex<HashMap<IpAddr, u64>>,
}

/// The failures since the previous [`AuthFailures::take`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct FailureSummary {
    pub device: u64,
    pub admin: u64,
    pub enrollment: u64,
    /// Distinct source addresses seen (at most [`MAX_SOURCES`]).
    pub sources: usize,
    /// The busiest addresses, most failures first.
    pub top: Vec<(IpAddr, u64)>,
}

impl FailureSummary {
    pub fn total(&self) -> u64 {
        self.device + self.admin + self.enrollment
    }
}

impl AuthFailures {
    pub fn record(&self, kind: AuthKind, source: Option<IpAddr>) {
        let counter = match kind {
            AuthKind::Device => &self.device,
            AuthKind::Admin => &self.admin,
            AuthKind::Enrollment => &self.enrollment,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Some(ip) = source {
            let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
            let room = sources.len() < MAX_SOURCES;
            match sources.get_mut(&ip) {
                Some(n) => *n += 1,
                None if room => {
                    sources.insert(ip, 1);
                }
                None => {}
            }
        }
    }

    /// Takes the counts and resets them.
    pub fn take(&self) -> FailureSummary {
        let sources = std::mem::take(&mut *self.sources.lock().unwrap_or_else(|p| p.into_inner()));
        let mut top: Vec<(IpAddr, u64)> = sources.iter().map(|(ip, n)| (*ip, *n)).collect();
        top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        top.truncate(TOP_SOURCES);
        FailureSummary {
            device: self.device.swap(0, Ordering::Relaxed),
            admin: self.admin.swap(0, Ordering::Relaxed),
            enrollment: self.enrollment.swap(0, Ordering::Relaxed),
            sources: sources.len(),
            top,
        }
    }

    /// Logs the failures since the last call, if any, as one warning.
    pub fn log(&self, interval: std::time::Duration) {
        let s = self.take();
        if s.total() == 0 {
            return;
        }
        let top = s.top.iter().map(|(ip, n)| format!("{ip} ({n})")).collect::<Vec<_>>().join(", ");
        tracing::warn!(
            device_credential = s.device,
            admin_token = s.admin,
            enrollment_token = s.enrollment,
            sources = s.sources,
            top_sources = %top,
            interval = %humantime::format_duration(interval),
            "failed authentications"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_kind_and_source_then_resets() {
        let f = AuthFailures::default();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..3 {
            f.record(AuthKind::Device, Some(a));
        }
        f.record(AuthKind::Admin, Some(b));
        f.record(AuthKind::Enrollment, None);
        assert_eq!(
            f.take(),
            FailureSummary { device: 3, admin: 1, enrollment: 1, sources: 2, top: vec![(a, 3), (b, 1)] }
        );
        assert_eq!(f.take(), FailureSummary::default());
    }

    #[test]
    fn sources_are_bounded_but_every_failure_counts() {
        let f = AuthFailures::default();
        for i in 0..(MAX_SOURCES as u32 + 100) {
            f.record(AuthKind::Device, Some(IpAddr::V4(i.into())));
        }
        let s = f.take();
        assert_eq!(s.device, MAX_SOURCES as u64 + 100);
        assert_eq!(s.sources, MAX_SOURCES);
        assert_eq!(s.top.len(), TOP_SOURCES);
    }
}
