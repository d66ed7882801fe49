//! In-memory rate limits for reports and enrollments, per credential and per source address:
//! GCRA (the generic cell rate algorithm, a token bucket kept as one timestamp per key) over a map
//! whose size is capped.
//!
//! Why not the `governor` crate: its keyed store can only be swept (`retain_recent`), not capped,
//! and a client that rotates source addresses (an IPv6 /48 holds 2^80 of them) would grow it
//! without bound between sweeps. Here a full map first drops the keys whose bucket is full again
//! (they are indistinguishable from new keys), and if that frees nothing, new keys share one
//! overflow bucket: memory stays bounded and the flood throttles itself, not the known clients.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

/// Keys a limiter remembers at most before new keys share the overflow bucket.
pub const MAX_KEYS: usize = 100_000;

/// `COUNT/DURATION`: up to COUNT at once, refilled at COUNT per DURATION ("20/20m": a burst of 20,
/// then one a minute).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub burst: u32,
    pub per: Duration,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RateParseError {
    #[error("a rate is COUNT/DURATION, such as 20/20m or 120/1m, or `off`")]
    Shape,
    #[error("the count of a rate must be a whole number from 1 to 1000000")]
    Count,
    #[error("the duration of a rate must be at least one second, such as 30s, 20m or 1h")]
    Duration,
}

impl Rate {
    /// Parses `COUNT/DURATION`, or `off` for no limit.
    pub fn parse(s: &str) -> Result<Option<Rate>, RateParseError> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("off") {
            return Ok(None);
        }
        let (count, per) = s.split_once('/').ok_or(RateParseError::Shape)?;
        let burst: u32 = count.trim().parse().map_err(|_| RateParseError::Count)?;
        if burst == 0 || burst > 1_000_000 {
            return Err(RateParseError::Count);
        }
        let per = humantime::parse_duration(per.trim()).map_err(|_| RateParseError::Duration)?;
        if per < Duration::from_secs(1) {
            return Err(RateParseError::Duration);
        }
        Ok(Some(Rate { burst, per }))
    }

    /// Time between two requests at the sustained rate.
    fn emission_ns(&self) -> u64 {
        u64::try_from(self.per.as_nanos() / u128::from(self.burst)).unwrap_or(u64::MAX).max(1)
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.burst, humantime::format_duration(self.per))
    }
}

/// A refusal: try again after this long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryAfter(pub Duration);

impl RetryAfter {
    /// Whole seconds for a `Retry-After` header, at least 1.
    pub fn seconds(&self) -> u64 {
        self.0.as_secs() + u64::from(self.0.subsec_nanos() > 0)
    }
}

/// One rate, one bucket per key. Time is passed in (nanoseconds on any monotonic clock).
pub struct KeyedLimiter<K> {
    rate: Option<Rate>,
    max_keys: usize,
    state: Mutex<Buckets<K>>,
}

struct Buckets<K> {
    /// Theoretical arrival time per key: the bucket is full again at `tat`.
    tat: HashMap<K, u64>,
    overflow_tat: u64,
}

impl<K: Hash + Eq + Clone> KeyedLimiter<K> {
    pub fn new(rate: Option<Rate>, max_keys: usize) -> Self {
        Self { rate, max_keys, state: Mutex::new(Buckets { tat: HashMap::new(), overflow_tat: 0 }) }
    }

    pub fn rate(&self) -> Option<Rate> {
        self.rate
    }

    /// Takes one request from `key`'s bucket at time `now_ns`, or says how long to wait.
    pub fn check(&self, key: &K, now_ns: u64) -> Result<(), RetryAfter> {
        let Some(rate) = self.rate else { return Ok(()) };
        let t = rate.emission_ns();
        let tolerance = t.saturating_mul(u64::from(rate.burst - 1));
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if !s.tat.contains_key(key) && s.tat.len() >= self.max_keys {
            s.tat.retain(|_, tat| *tat > now_ns);
        }
        let room = s.tat.len() < self.max_keys;
        let slot = match s.tat.get_mut(key) {
            Some(tat) => tat,
            None if room => s.tat.entry(key.clone()).or_insert(0),
            None => &mut s.overflow_tat,
        };
        let tat = (*slot).max(now_ns);
        // GCRA: conforming while the bucket's fill time, less the burst tolerance, is not ahead.
        if tat - now_ns > tolerance {
            return Err(RetryAfter(Duration::from_nanos(tat - tolerance - now_ns)));
        }
        *slot = tat + t;
        Ok(())
    }

    /// Forgets the keys whose bucket is full again (they behave as new keys).
    pub fn sweep(&self, now_ns: u64) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.tat.retain(|_, tat| *tat > now_ns);
        let keep = self.max_keys.min(s.tat.len() * 2);
        s.tat.shrink_to(keep);
    }

    pub fn len(&self) -> usize {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).tat.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The key of a source address: an IPv4 address, or the /64 of an IPv6 one (a single host
/// usually holds a whole /64, so per-address limits on IPv6 are per /64).
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// The server's limits on reports and enrollments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientRates {
    pub report_per_device: Option<Rate>,
    pub report_per_address: Option<Rate>,
    pub enroll_per_token: Option<Rate>,
    pub enroll_per_address: Option<Rate>,
}

impl Default for ClientRates {
    /// Production defaults. A device may send a burst of 20 reports (one sync sends one; a
    /// device reports several times while BitLocker encrypts), then one a minute. One address
    /// (a site behind NAT) may send 1,000 at once, then about 16 a second (10,000 devices at a
    /// 15-minute interval need 11). Enrollment: 120 at once per token and per address, then 2 a
    /// second (a lab imaged in one go).
    fn default() -> Self {
        let rate = |burst, secs| Some(Rate { burst, per: Duration::from_secs(secs) });
        Self {
            report_per_device: rate(20, 20 * 60),
            report_per_address: rate(1000, 60),
            enroll_per_token: rate(120, 60),
            enroll_per_address: rate(120, 60),
        }
    }
}

/// The limiters, one per rate.
pub struct ClientLimiters {
    epoch: std::time::Instant,
    pub report_per_device: KeyedLimiter<String>,
    pub report_per_address: KeyedLimiter<IpAddr>,
    pub enroll_per_token: KeyedLimiter<String>,
    pub enroll_per_address: KeyedLimiter<IpAddr>,
}

impl ClientLimiters {
    pub fn new(rates: &ClientRates) -> Self {
        Self {
            epoch: std::time::Instant::now(),
            report_per_device: KeyedLimiter::new(rates.report_per_device, MAX_KEYS),
            report_per_address: KeyedLimiter::new(rates.report_per_address, MAX_KEYS),
            enroll_per_token: KeyedLimiter::new(rates.enroll_per_token, MAX_KEYS),
            enroll_per_address: KeyedLimiter::new(rates.enroll_per_address, MAX_KEYS),
        }
    }

    /// Monotonic nanoseconds for [`KeyedLimiter::check`].
    pub fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    pub fn sweep(&self) {
        let now = self.now_ns();
        self.report_per_device.sweep(now);
        self.report_per_address.sweep(now);
        self.enroll_per_token.sweep(now);
        self.enroll_per_address.sweep(now);
    }
}

impl Default for ClientLimiters {
    fn default() -> Self {
        Self::new(&ClientRates::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn parse_rates() {
        let r = |b, s| Ok(Some(Rate { burst: b, per: Duration::from_secs(s) }));
        let cases: &[(&str, Result<Option<Rate>, RateParseError>)] = &[
            ("20/20m", r(20, 1200)),
            ("120/1m", r(120, 60)),
            (" 5 / 10s ", r(5, 10)),
            ("off", Ok(None)),
            ("OFF", Ok(None)),
            ("20", Err(RateParseError::Shape)),
            ("0/1m", Err(RateParseError::Count)),
            ("x/1m", Err(RateParseError::Count)),
            ("5/100ms", Err(RateParseError::Duration)),
            ("5/soon", Err(RateParseError::Duration)),
        ];
        for (input, expected) in cases {
            assert_eq!(&Rate::parse(input), expected, "{input}");
        }
    }

    #[test]
    fn burst_then_sustained_rate() {
        // 3 at once, then one per 10 s.
        let l = KeyedLimiter::new(Some(Rate { burst: 3, per: Duration::from_secs(30) }), 10);
        let k = "dev".to_string();
        let cases: &[(u64, Result<(), RetryAfter>)] = &[
            (0, Ok(())),
            (0, Ok(())),
            (0, Ok(())),
            (0, Err(RetryAfter(Duration::from_secs(10)))),
            (4 * S, Err(RetryAfter(Duration::from_secs(6)))),
            (10 * S, Ok(())),
            (10 * S, Err(RetryAfter(Duration::from_secs(10)))),
            (100 * S, Ok(())),
            (100 * S, Ok(())),
            (100 * S, Ok(())),
            (100 * S, Err(RetryAfter(Duration::from_secs(10)))),
        ];
        for (i, (now, expected)) in cases.iter().enumerate() {
            assert_eq!(&l.check(&k, *now), expected, "step {i} at {now}");
        }
    }

    #[test]
    fn keys_are_independent_and_off_never_limits() {
        let l = KeyedLimiter::new(Some(Rate { burst: 1, per: Duration::from_secs(60) }), 10);
        assert!(l.check(&"a".to_string(), 0).is_ok());
        assert!(l.check(&"a".to_string(), 0).is_err());
        assert!(l.check(&"b".to_string(), 0).is_ok());
        let off = KeyedLimiter::<String>::new(None, 10);
        for _ in 0..1000 {
            assert!(off.check(&"a".to_string(), 0).is_ok());
        }
        assert!(off.is_empty());
    }

    #[test]
    fn memory_is_capped_and_new_keys_share_the_overflow_bucket() {
        let l = KeyedLimiter::new(Some(Rate { burst: 2, per: Duration::from_secs(60) }), 3);
        for k in 0..3u32 {
            assert!(l.check(&k, 0).is_ok());
        }
        // The map is full of active keys: keys 3, 4, 5... share one bucket of 2.
        assert!(l.check(&3, 0).is_ok());
        assert!(l.check(&4, 0).is_ok());
        assert!(l.check(&5, 0).is_err());
        assert_eq!(l.len(), 3);
        // Known keys keep their own bucket.
        assert!(l.check(&0, 0).is_ok());
        // Once the known buckets refill, new keys get their own again.
        assert!(l.check(&6, 120 * S).is_ok());
        assert!(l.check(&6, 120 * S).is_ok());
        assert!(l.check(&6, 120 * S).is_err());
        assert!(l.check(&7, 120 * S).is_ok());
        l.sweep(1000 * S);
        assert!(l.is_empty());
    }

    #[test]
    fn addresses_group_by_v4_and_v6_slash_64() {
        let cases = [
            ("192.0.2.7", "192.0.2.7"),
            ("::ffff:192.0.2.7", "192.0.2.7"),
            ("2001:db8:1:2:aaaa:bbbb:cccc:dddd", "2001:db8:1:2::"),
            ("::1", "::"),
        ];
        for (input, expected) in cases {
            assert_eq!(address_key(input.parse().unwrap()), expected.parse::<IpAddr>().unwrap(), "{input}");
        }
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(RetryAfter(Duration::from_millis(1)).seconds(), 1);
        assert_eq!(RetryAfter(Duration::from_secs(10)).seconds(), 10);
        assert_eq!(RetryAfter(Duration::from_millis(10_001)).seconds(), 11);
    }
}
