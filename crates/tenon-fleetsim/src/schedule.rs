//! When requests are due. Open-loop schedules are fixed in advance and never move because an
//! answer was slow: a request's latency is measured from the time it was due, so a stalled server
//! shows up as latency instead of as requests that were quietly never sent (coordinated omission).

use std::time::Duration;

/// One lane's share of an open-loop rate: `lanes` connections together send `rate` requests per
/// second, each one every `lanes / rate` seconds, staggered so the sends are spread evenly.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pace {
    period: f64,
    offset: f64,
}

impl Pace {
    pub fn new(rate: f64, lanes: usize, lane: usize) -> Self {
        let lanes = lanes.max(1) as f64;
        Self { period: lanes / rate, offset: lane as f64 / rate }
    }

    /// When the lane's `k`-th request (from 0) is due, after the start.
    pub fn at(&self, k: u64) -> Duration {
        Duration::from_secs_f64(self.offset + k as f64 * self.period)
    }

    /// How many of the lane's requests are due at or before `elapsed`.
    pub fn due_by(&self, elapsed: Duration) -> u64 {
        let t = elapsed.as_secs_f64();
        if t < self.offset {
            return 0;
        }
        ((t - self.offset) / self.period).floor() as u64 + 1
    }
}

/// A device's first check-in after the start: the fleet's first check-ins are spread evenly over
/// one interval, so `devices / interval` check-ins per second from the first second on.
pub fn first_checkin(device: usize, devices: usize, interval: Duration) -> Duration {
    interval.mul_f64(device as f64 / devices.max(1) as f64)
}

/// The time to a device's next check-in: the interval, moved by up to `jitter` (a fraction) either
/// way; `u` is uniform in `[-1, 1)`. The mean stays the interval, so the fleet's rate does too.
pub fn next_checkin(interval: Duration, jitter: f64, u: f64) -> Duration {
    interval.mul_f64((1.0 + jitter * u).max(0.0))
}

/// SplitMix64: a small, seedable generator for the jitter (nothing here needs more).
pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[-1, 1)`.
    pub fn next_signed_unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_share_a_rate_evenly() {
        // 4 lanes at 100/s: each lane every 40 ms, the lanes 10 ms apart.
        let lanes: Vec<Pace> = (0..4).map(|l| Pace::new(100.0, 4, l)).collect();
        let mut sends: Vec<Duration> = lanes.iter().flat_map(|p| (0..25).map(|k| p.at(k))).collect();
        sends.sort();
        assert_eq!(sends.len(), 100);
        for (i, t) in sends.iter().enumerate() {
            assert!((t.as_secs_f64() - i as f64 * 0.01).abs() < 1e-9, "send {i} at {t:?}");
        }
        let due: u64 = lanes.iter().map(|p| p.due_by(Duration::from_millis(1005))).sum();
        assert_eq!(due, 101); // the sends at 0, 10, ..., 1000 ms
        assert_eq!(Pace::new(100.0, 4, 3).due_by(Duration::from_millis(29)), 0);
        assert_eq!(Pace::new(100.0, 4, 3).due_by(Duration::from_millis(31)), 1);
    }

    #[test]
    fn first_checkins_spread_over_one_interval() {
        let i = Duration::from_secs(30);
        assert_eq!(first_checkin(0, 100_000, i), Duration::ZERO);
        assert_eq!(first_checkin(50_000, 100_000, i), Duration::from_secs(15));
        // 100,000 devices at 30 s: 3,333 first check-ins in the first second.
        let in_first_second = (0..100_000).filter(|d| first_checkin(*d, 100_000, i) < Duration::from_secs(1)).count();
        assert_eq!(in_first_second, 3334);
    }

    #[test]
    fn jitter_keeps_the_mean() {
        let i = Duration::from_secs(30);
        assert_eq!(next_checkin(i, 0.1, -1.0), Duration::from_secs(27));
        assert_eq!(next_checkin(i, 0.1, 0.0), i);
        let mut r = SplitMix::new(7);
        let n = 100_000;
        let mean = (0..n).map(|_| next_checkin(i, 0.1, r.next_signed_unit()).as_secs_f64()).sum::<f64>() / n as f64;
        assert!((mean - 30.0).abs() < 0.05, "mean {mean}");
        let mut r = SplitMix::new(7);
        assert!((0..n).map(|_| r.next_signed_unit()).all(|u| (-1.0..1.0).contains(&u)));
    }
}
