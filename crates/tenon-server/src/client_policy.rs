//! What the server allows each client: the rate limits on reports and enrollments, the tally of
//! failed authentications and the report history kept. Held by [`crate::state::AppState`].

use crate::auth_failures::{AuthFailures, AuthKind};
use crate::error::{ApiError, ApiResult};
use crate::ratelimit::{address_key, ClientLimiters, ClientRates, KeyedLimiter, RetryAfter};
use crate::report_history::ReportHistory;
use std::hash::Hash;
use std::net::IpAddr;

#[derive(Default)]
pub struct ClientPolicy {
    pub limiters: ClientLimiters,
    pub auth_failures: AuthFailures,
    pub history: ReportHistory,
}

impl ClientPolicy {
    pub fn new(rates: &ClientRates, history: ReportHistory) -> Self {
        Self { limiters: ClientLimiters::new(rates), auth_failures: AuthFailures::default(), history }
    }

    /// May this device send a report now, from this address?
    pub fn check_report(&self, device_id: &str, source: Option<IpAddr>) -> ApiResult<()> {
        let l = &self.limiters;
        let now = l.now_ns();
        if let Some(ip) = source {
            refuse(&l.report_per_address, &address_key(ip), now, "reports from this address")?;
        }
        refuse(&l.report_per_device, &device_id.to_string(), now, "reports from this device")
    }

    /// May this address enroll a device now, with this enrollment token id (if the token parsed)?
    pub fn check_enroll(&self, token_id: Option<&str>, source: Option<IpAddr>) -> ApiResult<()> {
        let l = &self.limiters;
        let now = l.now_ns();
        if let Some(ip) = source {
            refuse(&l.enroll_per_address, &address_key(ip), now, "enrollments from this address")?;
        }
        match token_id {
            Some(id) => refuse(&l.enroll_per_token, &id.to_string(), now, "enrollments with this token"),
            None => Ok(()),
        }
    }

    pub fn auth_failed(&self, kind: AuthKind, source: Option<IpAddr>) {
        self.auth_failures.record(kind, source);
    }
}

fn refuse<K: Hash + Eq + Clone>(limiter: &KeyedLimiter<K>, key: &K, now: u64, what: &str) -> ApiResult<()> {
    limiter.check(key, now).map_err(|RetryAfter(wait)| {
        let retry_after_secs = RetryAfter(wait).seconds();
        let rate = limiter.rate().map(|r| r.to_string()).unwrap_or_default();
        ApiError::TooManyRequests {
            detail: format!("too many {what} (the limit is {rate}); retry after {retry_after_secs} s"),
            retry_after_secs,
        }
    })
}
