//! The simulated fleet and its connections: each connection is a task ("lane") that takes its
//! next request from a schedule (open loop) or as soon as the last answer is in (closed loop),
//! sends it, retries a 503 after its Retry-After, and counts what happened.

use crate::client::{Answer, Conn, Failure, Req, Target};
use crate::schedule::{next_checkin, Pace, SplitMix};
use crate::stats::KindStats;
use bytes::Bytes;
use hyper::Method;
use serde_json::{json, Value};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The kinds of request, each with its own figures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Enroll,
    Checkin,
    Report,
    /// A report with another signed-in user (the server re-compiles the device's envelope).
    UserChange,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Enroll => "enroll",
            Kind::Checkin => "checkin",
            Kind::Report => "report",
            Kind::UserChange => "user_change",
        }
    }

    fn expected(self, status: u16) -> bool {
        match self {
            Kind::Enroll => matches!(status, 200 | 201),
            Kind::Checkin => matches!(status, 200 | 304),
            Kind::Report | Kind::UserChange => matches!(status, 200 | 202),
        }
    }
}

/// What a simulated device knows.
pub struct Device {
    pub bearer: Arc<str>,
    pub hostname: String,
    pub state: Mutex<DeviceState>,
}

#[derive(Default)]
pub struct DeviceState {
    /// The ETag of the last envelope the device got (sent as If-None-Match).
    pub etag: Option<String>,
    /// Reports sent: the counter that makes each report differ from the last.
    pub reports: u64,
    /// Which simulated user is signed in (`user{N+1}@contoso.com`).
    pub user: u64,
    pub baseline: Baseline,
}

/// A device's part in the change-propagation measurement.
#[derive(Default, Clone, PartialEq, Eq)]
pub enum Baseline {
    #[default]
    Unmarked,
    /// At the mark the device held the envelope with this ETag.
    Held(String),
    /// At the mark the device had no envelope yet: it cannot tell an old one from a new one.
    NoEnvelope,
    /// Got an envelope with another ETag after the mark.
    Changed,
}

/// The change-propagation measurement (`run --watch-change`).
#[derive(Default)]
pub struct Watch {
    pub stop_when_all: bool,
    pub mark: OnceLock<Instant>,
    /// Devices that held an envelope at the mark.
    pub measurable: AtomicUsize,
    /// For each device that got a new envelope: the time from the mark to its answer.
    pub changed: Mutex<Vec<Duration>>,
}

pub struct Ctx {
    pub timeout: Duration,
    pub start: Instant,
    /// Requests due before this (the warm-up) are sent but not counted.
    pub measure_from: Instant,
    pub deadline: Instant,
    pub devices: Vec<Device>,
    next: [AtomicU64; 4],
    limit: [Option<u64>; 4],
    pub interval: Duration,
    pub jitter: f64,
    // Enrollment.
    pub token: String,
    pub hostname_prefix: String,
    pub enrolled: Mutex<Vec<Option<(String, String)>>>,
    pub enrolled_count: AtomicU64,
    // The change window (SIGUSR1 .. SIGUSR2): 0 before, 1 inside, 2 after.
    phase: AtomicU8,
    pub window_start: OnceLock<Instant>,
    pub window_end: OnceLock<Instant>,
    pub watch: Option<Watch>,
    pub stop: tokio::sync::watch::Sender<bool>,
}

pub struct CtxOptions {
    pub timeout: Duration,
    pub start: Instant,
    pub measure_from: Instant,
    pub deadline: Instant,
    pub devices: Vec<Device>,
    pub interval: Duration,
    pub jitter: f64,
    pub token: String,
    pub hostname_prefix: String,
    /// How many devices to enroll; `None`: no limit (enrollments during a run).
    pub enroll_count: Option<u64>,
    pub report_count: Option<u64>,
    pub watch: Option<Watch>,
}

impl Ctx {
    pub fn new(o: CtxOptions) -> Self {
        let mut limit = [None; 4];
        limit[Kind::Enroll as usize] = o.enroll_count;
        limit[Kind::Report as usize] = o.report_count;
        Self {
            timeout: o.timeout,
            start: o.start,
            measure_from: o.measure_from,
            deadline: o.deadline,
            devices: o.devices,
            next: Default::default(),
            limit,
            interval: o.interval,
            jitter: o.jitter,
            token: o.token,
            hostname_prefix: o.hostname_prefix,
            enrolled: Mutex::new(vec![None; o.enroll_count.unwrap_or(0) as usize]),
            enrolled_count: AtomicU64::new(0),
            phase: AtomicU8::new(0),
            window_start: OnceLock::new(),
            window_end: OnceLock::new(),
            watch: o.watch,
            stop: tokio::sync::watch::channel(false).0,
        }
    }

    /// The next device for a kind of request taken in turn (all but the scheduled check-ins);
    /// `None` once the kind's count is used up.
    fn pick(&self, kind: Kind) -> Option<usize> {
        let n = self.next[kind as usize].fetch_add(1, Ordering::Relaxed);
        if self.limit[kind as usize].is_some_and(|l| n >= l) {
            return None;
        }
        match kind {
            Kind::Enroll => Some(n as usize),
            _ if self.devices.is_empty() => None,
            _ => Some((n % self.devices.len() as u64) as usize),
        }
    }

    pub fn hostname(prefix: &str, index: usize) -> String {
        format!("{prefix}-{:05}", index + 1)
    }

    /// SIGUSR1: the change is about to be made. Opens the change window and, with
    /// `--watch-change`, notes the envelope each device holds now.
    pub fn mark(&self) {
        let now = Instant::now();
        if self.window_start.set(now).is_err() {
            return;
        }
        self.phase.store(1, Ordering::SeqCst);
        if let Some(w) = &self.watch {
            let _ = w.mark.set(now);
            let mut held = 0;
            for d in &self.devices {
                let mut st = d.state.lock().expect("device state");
                st.baseline = match &st.etag {
                    Some(e) => {
                        held += 1;
                        Baseline::Held(e.clone())
                    }
                    None => Baseline::NoEnvelope,
                };
            }
            w.measurable.store(held, Ordering::SeqCst);
            eprintln!(
                "fleetsim: change mark at {:.3} s; {held} of {} devices hold an envelope",
                (now - self.start).as_secs_f64(),
                self.devices.len()
            );
        } else {
            eprintln!("fleetsim: change window opened at {:.3} s", (now - self.start).as_secs_f64());
        }
    }

    /// SIGUSR2: the change was made (the admin write returned). Closes the change window.
    pub fn end_window(&self) {
        if self.phase.compare_exchange(1, 2, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
            let now = Instant::now();
            let _ = self.window_end.set(now);
            eprintln!("fleetsim: change window closed at {:.3} s", (now - self.start).as_secs_f64());
        }
    }

    /// Whether a request due at `due` belongs to the change window (asked once it is answered,
    /// so a request due in the window counts there however late it was sent or answered).
    fn in_window(&self, due: Instant) -> bool {
        match self.window_start.get() {
            Some(ws) if due >= *ws => self.window_end.get().is_none_or(|we| due < *we),
            _ => false,
        }
    }

    fn report_body(&self, d: &Device, st: &DeviceState) -> Bytes {
        // The ETag is "VERSION-SHA256": what the device holds, as an agent reports it.
        let held = st.etag.as_deref().map(|e| e.trim_matches('"')).and_then(|e| e.split_once('-'));
        let version = held.and_then(|(v, _)| v.parse::<u64>().ok());
        let sha = held.map(|(_, s)| s).filter(|s| s.len() == 64);
        let body = json!({
            "agent_version": "fleetsim",
            "hostname": d.hostname,
            "signed_in_users": [format!("user{}@contoso.com", st.user + 1)],
            "config_version": version,
            "config_sha256": sha,
            "last_error": null,
            // A policy status as the agent sends it (PolicyStatus: `state` and flattened details);
            // the counter makes every report differ from the device's previous one.
            "policies": {"bench": {"state": "ok", "n": st.reports}},
        });
        Bytes::from(serde_json::to_vec(&body).expect("JSON"))
    }

    fn build(&self, kind: Kind, idx: usize) -> Req {
        let device = |path| {
            let d = &self.devices[idx];
            (d, Req { method: Method::GET, path, bearer: Some(d.bearer.clone()), if_none_match: None, json: None })
        };
        match kind {
            Kind::Enroll => {
                let body = json!({"token": self.token, "hostname": Self::hostname(&self.hostname_prefix, idx), "agent_version": "fleetsim"});
                Req {
                    method: Method::POST,
                    path: "/api/v1/enroll",
                    bearer: None,
                    if_none_match: None,
                    json: Some(Bytes::from(serde_json::to_vec(&body).expect("JSON"))),
                }
            }
            Kind::Checkin => {
                let (d, mut req) = device("/api/v1/device/config");
                req.if_none_match = d.state.lock().expect("device state").etag.clone();
                req
            }
            Kind::Report | Kind::UserChange => {
                let (d, mut req) = device("/api/v1/device/report");
                let mut st = d.state.lock().expect("device state");
                st.reports += 1;
                if kind == Kind::UserChange {
                    st.user += 1;
                }
                req.method = Method::POST;
                req.json = Some(self.report_body(d, &st));
                req
            }
        }
    }

    /// What an expected answer changes; `Err` names an answer that could not be used.
    fn on_answer(&self, kind: Kind, idx: usize, a: &Answer, sent: Instant) -> Result<(), &'static str> {
        match kind {
            Kind::Enroll => {
                let v: Value = serde_json::from_slice(&a.body).map_err(|_| "bad_answer")?;
                let (Some(id), Some(cred)) = (v["device_id"].as_str(), v["credential"].as_str()) else {
                    return Err("bad_answer");
                };
                if let Some(slot) = self.enrolled.lock().expect("enrolled").get_mut(idx) {
                    *slot = Some((id.to_string(), cred.to_string()));
                }
                self.enrolled_count.fetch_add(1, Ordering::Relaxed);
            }
            Kind::Checkin if a.status == 200 => {
                let etag = a.etag.clone().ok_or("no_etag")?;
                let mut st = self.devices[idx].state.lock().expect("device state");
                if let Some(w) = &self.watch {
                    if let (Some(mark), Baseline::Held(old)) = (w.mark.get(), &st.baseline) {
                        if sent >= *mark && *old != etag {
                            st.baseline = Baseline::Changed;
                            let mut changed = w.changed.lock().expect("changed");
                            changed.push(Instant::now() - *mark);
                            if w.stop_when_all && changed.len() >= w.measurable.load(Ordering::SeqCst) {
                                let _ = self.stop.send(true);
                            }
                        }
                    }
                }
                st.etag = Some(etag);
            }
            _ => {}
        }
        Ok(())
    }
}

/// Where a lane's requests come from.
pub enum Source {
    /// The devices this connection checks in for, by their next due time.
    Checkins { due: BinaryHeap<Reverse<(Instant, usize)>>, rng: SplitMix },
    /// Open loop: the lane's share of a fixed rate; `sent` slots used so far.
    Paced { pace: Pace, sent: u64 },
    /// Closed loop: the next request as soon as the last answer is in.
    Closed,
}

/// What one request (with its retries) came to.
#[derive(Default)]
struct Outcome {
    statuses: Vec<u16>,
    errors: Vec<String>,
    latency: Option<Duration>,
}

impl Outcome {
    fn apply(&self, s: &mut KindStats) {
        for st in &self.statuses {
            s.status(*st);
        }
        for e in &self.errors {
            s.error(e);
        }
        if let Some(l) = self.latency {
            s.latency(l);
        }
    }
}

const MAX_ATTEMPTS: u32 = 10;

async fn execute(ctx: &Ctx, conn: &mut Conn, kind: Kind, idx: usize, due: Instant) -> Outcome {
    let req = ctx.build(kind, idx);
    let mut out = Outcome::default();
    for attempt in 1..=MAX_ATTEMPTS {
        let sent = Instant::now();
        match conn.send(&req, ctx.timeout).await {
            Ok(a) => {
                out.statuses.push(a.status);
                let retry = a.status == 503 || (kind == Kind::Enroll && a.status == 429);
                if retry {
                    out.errors.push(a.status.to_string());
                    let wait = a.retry_after.unwrap_or(Duration::from_secs(1));
                    if attempt < MAX_ATTEMPTS && Instant::now() + wait < ctx.deadline {
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                } else if kind.expected(a.status) {
                    match ctx.on_answer(kind, idx, &a, sent) {
                        Ok(()) => out.latency = Some(Instant::now() - due),
                        Err(e) => out.errors.push(e.to_string()),
                    }
                } else {
                    out.errors.push(a.status.to_string());
                }
                return out;
            }
            Err(f) => {
                out.errors.push(f.as_str().to_string());
                // Only enrollment insists: the enrolled devices are what the later runs use.
                if kind == Kind::Enroll && attempt < 5 && f != Failure::Timeout {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                return out;
            }
        }
    }
    out
}

/// One connection's task. Returns its figures for the whole run and for the change window.
pub async fn lane(ctx: Arc<Ctx>, kind: Kind, mut source: Source, target: Arc<Target>) -> LaneResult {
    let mut conn = Conn::new(target);
    let mut total = KindStats::default();
    let mut window = KindStats::default();
    let mut stop = ctx.stop.subscribe();
    conn.warm(ctx.timeout).await;
    // Closed-loop lanes too begin at the start, not as soon as they are connected.
    tokio::time::sleep_until(ctx.start.into()).await;
    loop {
        let now = Instant::now();
        if *stop.borrow() || now >= ctx.deadline {
            break;
        }
        let (due, idx) = match &mut source {
            Source::Checkins { due, .. } => match due.peek() {
                Some(Reverse((t, i))) if *t < ctx.deadline => {
                    let (t, i) = (*t, *i);
                    due.pop();
                    (t, i)
                }
                _ => break,
            },
            Source::Paced { pace, sent } => {
                let t = ctx.start + pace.at(*sent);
                if t >= ctx.deadline {
                    break;
                }
                let Some(i) = ctx.pick(kind) else { break };
                *sent += 1;
                (t, i)
            }
            Source::Closed => match ctx.pick(kind) {
                Some(i) => (now, i),
                None => break,
            },
        };
        if due > now {
            tokio::select! {
                _ = tokio::time::sleep_until(due.into()) => {}
                _ = stop.wait_for(|s| *s) => break,
            }
        }
        let out = execute(&ctx, &mut conn, kind, idx, due).await;
        if due >= ctx.measure_from {
            out.apply(&mut total);
        }
        if ctx.in_window(due) {
            out.apply(&mut window);
        }
        if let Source::Checkins { due: heap, rng } = &mut source {
            heap.push(Reverse((due + next_checkin(ctx.interval, ctx.jitter, rng.next_signed_unit()), idx)));
        }
    }
    // Requests that were due before the end but never sent: the lane fell behind its schedule.
    let end = Instant::now().min(ctx.deadline);
    total.unsent = match &source {
        Source::Checkins { due, .. } => due.iter().filter(|Reverse((t, _))| *t < end).count() as u64,
        Source::Paced { pace, sent } => pace.due_by(end.saturating_duration_since(ctx.start)).saturating_sub(*sent),
        Source::Closed => 0,
    };
    (kind, total, window)
}

/// A lane's figures: its kind, the whole run's and the change window's.
pub type LaneResult = (Kind, KindStats, KindStats);
/// Figures by kind, in the order of [`Kind`].
pub type ByKind = Vec<(Kind, KindStats)>;

/// Merges the lanes' figures by kind.
pub fn merge(results: Vec<LaneResult>) -> (ByKind, ByKind) {
    let mut total: Vec<(Kind, KindStats)> = Vec::new();
    let mut window: Vec<(Kind, KindStats)> = Vec::new();
    for (kind, t, w) in results {
        for (list, s) in [(&mut total, t), (&mut window, w)] {
            match list.iter_mut().find(|(k, _)| *k == kind) {
                Some((_, acc)) => acc.merge(&s),
                None => list.push((kind, s)),
            }
        }
    }
    total.sort_by_key(|(k, _)| *k);
    window.sort_by_key(|(k, _)| *k);
    (total, window)
}
