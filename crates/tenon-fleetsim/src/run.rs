//! `tenon-fleetsim run`: enrolled devices check in, report and change users at the given rates;
//! optionally measures how long an admin change takes to reach every device.

use crate::args::{parse_duration, parse_fraction, parse_load, Load};
use crate::enroll::Common;
use crate::schedule::{first_checkin, Pace, SplitMix};
use crate::sim::{lane, merge, Ctx, CtxOptions, Device, DeviceState, Kind, Source, Watch};
use crate::stats::{quantile, round3, KindStats};
use anyhow::{bail, Context};
use clap::Args;
use serde_json::{json, Map, Value};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub common: Common,
    /// The credentials file written by `enroll` (`DEVICE_ID CREDENTIAL [ETAG]` per line).
    #[arg(long)]
    pub creds: PathBuf,
    /// Use only the first N devices of the file.
    #[arg(long)]
    pub devices: Option<usize>,
    /// How long to run and measure (at most, with --stop-when-changed or --report-count).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Run this long before --duration begins without counting anything, e.g. one check-in
    /// interval, so that every device holds its envelope (a check-in that gets 200) before the
    /// measurement and the check-ins measured are the steady state's.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Each device checks in once per interval (open loop: DEVICES / INTERVAL check-ins per
    /// second, the first ones spread evenly over the first interval).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub checkin_interval: Duration,
    /// Instead of --checkin-interval: the fleet's check-in rate (the interval is DEVICES / RATE),
    /// `max` (closed loop: every connection checks in for the next device as soon as it has an
    /// answer) or `off`.
    #[arg(long, value_parser = parse_load, value_name = "R/s|max|off")]
    pub checkin_rate: Option<Load>,
    /// Each interval is moved by up to this much either way, at random.
    #[arg(long, default_value = "10%", value_parser = parse_fraction)]
    pub jitter: f64,
    /// Connections for check-ins.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Changed reports in total, spread over the devices in turn: a rate (open loop), `max` (closed
    /// loop over --report-connections) or `off`. Every report differs from that device's last one.
    #[arg(long, default_value = "off", value_parser = parse_load, value_name = "R/s|max|off")]
    pub report_rate: Load,
    /// Stop sending reports after this many (e.g. the fleet's size, for one report per device).
    #[arg(long)]
    pub report_count: Option<u64>,
    /// Connections for reports (separate from the check-ins').
    #[arg(long, default_value_t = 16)]
    pub report_connections: usize,
    /// Reports with another signed-in user (user1@contoso.com becomes user2@contoso.com, ...), which
    /// make the server re-compile that device's envelope; counted as `user_change`.
    #[arg(long, default_value = "off", value_parser = parse_load, value_name = "R/s|max|off")]
    pub user_change_rate: Load,
    /// Connections for the user changes.
    #[arg(long, default_value_t = 2)]
    pub user_change_connections: usize,
    /// Spread the signed-in users over the fleet: the device on line N of --creds (from 0) signs
    /// in as user{(N mod USERS) + 1}@contoso.com (1: every device as user1@contoso.com).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub users: u64,
    /// Measure change propagation: at SIGUSR1 fleetsim notes the envelope (ETag) every device
    /// holds; afterwards it counts, per device, the time from that signal to the first 200 answer
    /// with another ETag, and prints when the first, 50 %, 90 %, 99 % and all of those devices had
    /// one. Send SIGUSR1 just before making the change and SIGUSR2 once it is applied (the admin
    /// write, or its `--wait`, returned). SIGUSR1..SIGUSR2 is also the change window: the requests
    /// due in it have their figures printed apart, with or without this flag. Devices with no envelope yet at SIGUSR1 are left out: send it only once
    /// every device has checked in (after one interval). Use a short interval (e.g. 1 s) to see the
    /// server's part rather than the interval's.
    #[arg(long)]
    pub watch_change: bool,
    /// With --watch-change: end the run as soon as every device has a new envelope.
    #[arg(long, requires = "watch_change")]
    pub stop_when_changed: bool,
    /// New devices enrolled during the run (host names PREFIX-NEW-00001, ...; they do not join
    /// the simulated fleet): a rate, `max` or `off`. Needs --enroll-token.
    #[arg(long, default_value = "off", value_parser = parse_load, value_name = "R/s|max|off")]
    pub enroll_rate: Load,
    /// The enrollment token for --enroll-rate; also TENON_FLEETSIM_TOKEN.
    #[arg(long, env = "TENON_FLEETSIM_TOKEN", hide_env_values = true)]
    pub enroll_token: Option<String>,
    /// Connections for the enrollments.
    #[arg(long, default_value_t = 2)]
    pub enroll_connections: usize,
    /// Seed of the jitter.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

pub fn load_devices(args: &RunArgs) -> anyhow::Result<Vec<Device>> {
    let text = std::fs::read_to_string(&args.creds).with_context(|| format!("cannot read {}", args.creds.display()))?;
    let mut devices = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut parts = line.split_whitespace();
        let (Some(_id), Some(cred)) = (parts.next(), parts.next()) else {
            bail!("{} line {}: expected DEVICE_ID CREDENTIAL", args.creds.display(), n + 1);
        };
        let etag = parts.next().map(str::to_string);
        let index = devices.len();
        devices.push(Device {
            bearer: Arc::from(cred),
            hostname: Ctx::hostname(&args.common.hostname_prefix, index),
            state: Mutex::new(DeviceState { etag, user: index as u64 % args.users, ..Default::default() }),
        });
        if args.devices.is_some_and(|max| devices.len() >= max) {
            break;
        }
    }
    if devices.is_empty() {
        bail!("{} lists no device", args.creds.display());
    }
    Ok(devices)
}

pub async fn run(args: RunArgs) -> anyhow::Result<bool> {
    if args.enroll_rate != Load::Off && args.enroll_token.is_none() {
        bail!("--enroll-rate needs --enroll-token (or TENON_FLEETSIM_TOKEN)");
    }
    let devices = load_devices(&args)?;
    run_devices(args, devices, None).await
}

/// Runs `devices` as `args` says (its `creds` and `devices` are not read) and prints the figures.
/// With `enrollment` (the top-level form) the JSON object is of mode `fleet` and carries it under
/// `enrollment` (the enrollment's figures, or null for devices read from a credentials file).
pub async fn run_devices(args: RunArgs, devices: Vec<Device>, enrollment: Option<Value>) -> anyhow::Result<bool> {
    let targets = crate::client::targets(&args.common.server, args.common.ca_file.as_deref())?;
    let n = devices.len();
    let (checkin_load, interval) = match args.checkin_rate {
        Some(Load::Rate(r)) => (Load::Rate(r), Duration::from_secs_f64(n as f64 / r)),
        Some(other) => (other, args.checkin_interval),
        None if args.checkin_interval.is_zero() => (Load::Off, Duration::ZERO),
        None => (Load::Rate(n as f64 / args.checkin_interval.as_secs_f64()), args.checkin_interval),
    };
    // Signals first: SIGUSR1's default action would end the process.
    use tokio::signal::unix::{signal, SignalKind};
    let mut usr1 = signal(SignalKind::user_defined1())?;
    let mut usr2 = signal(SignalKind::user_defined2())?;
    // A moment to open the connections before the schedules begin.
    let start = Instant::now() + Duration::from_millis(250);
    let ctx = Arc::new(Ctx::new(CtxOptions {
        timeout: args.common.timeout,
        start,
        measure_from: start + args.warmup,
        deadline: start + args.warmup + args.duration,
        devices,
        interval,
        jitter: args.jitter,
        token: args.enroll_token.clone().unwrap_or_default(),
        hostname_prefix: format!("{}-NEW", args.common.hostname_prefix),
        enroll_count: None,
        report_count: args.report_count,
        watch: args.watch_change.then(|| Watch { stop_when_all: args.stop_when_changed, ..Default::default() }),
    }));
    {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = usr1.recv() => ctx.mark(),
                    _ = usr2.recv() => ctx.end_window(),
                }
            }
        });
    }

    let mut lanes = Vec::new();
    let mut next_target = 0usize;
    let mut spawn = |kind: Kind, source: Source| {
        let t = targets[next_target % targets.len()].clone();
        next_target += 1;
        lanes.push(tokio::spawn(lane(ctx.clone(), kind, source, t)));
    };
    match checkin_load {
        Load::Off => {}
        Load::Max => (0..args.connections.max(1)).for_each(|_| spawn(Kind::Checkin, Source::Closed)),
        Load::Rate(_) => {
            let c = args.connections.clamp(1, n);
            for l in 0..c {
                let due: BinaryHeap<_> =
                    (l..n).step_by(c).map(|d| Reverse((start + first_checkin(d, n, interval), d))).collect();
                let rng = SplitMix::new(args.seed ^ (l as u64).wrapping_mul(0x9e37_79b9));
                spawn(Kind::Checkin, Source::Checkins { due, rng });
            }
        }
    }
    for (kind, load, conns) in [
        (Kind::Report, args.report_rate, args.report_connections),
        (Kind::UserChange, args.user_change_rate, args.user_change_connections),
        (Kind::Enroll, args.enroll_rate, args.enroll_connections),
    ] {
        let c = conns.max(1);
        match load {
            Load::Off => {}
            Load::Max => (0..c).for_each(|_| spawn(kind, Source::Closed)),
            Load::Rate(r) => (0..c).for_each(|l| spawn(kind, Source::Paced { pace: Pace::new(r, c, l), sent: 0 })),
        }
    }
    let describe = |load: Load, conns: usize| match load {
        Load::Off => "off".to_string(),
        Load::Max => format!("max (closed loop) over {conns} connections"),
        Load::Rate(r) => format!("{r:.1}/s (open loop) over {conns} connections"),
    };
    let setup = format!(
        "{n} devices; check-ins {}{}; reports {}; user changes {}; enrollments {}",
        describe(checkin_load, args.connections),
        if matches!(checkin_load, Load::Rate(_)) {
            format!(" (interval {:.2} s ±{:.0} %)", interval.as_secs_f64(), args.jitter * 100.0)
        } else {
            String::new()
        },
        describe(args.report_rate, args.report_connections),
        describe(args.user_change_rate, args.user_change_connections),
        describe(args.enroll_rate, args.enroll_connections),
    );
    eprintln!(
        "fleetsim: running for at most {:.1} s after a warm-up of {:.1} s: {setup}",
        args.duration.as_secs_f64(),
        args.warmup.as_secs_f64()
    );

    let mut results = Vec::new();
    for l in lanes {
        results.push(l.await?);
    }
    let end = Instant::now().min(ctx.deadline);
    let seconds = end.saturating_duration_since(ctx.measure_from).as_secs_f64();
    let (total, window) = merge(results);
    let kinds_json = |list: &[(Kind, KindStats)], secs: f64| -> Value {
        let m: Map<String, Value> =
            list.iter().map(|(k, s)| (k.name().to_string(), s.summary(secs).to_json())).collect();
        Value::Object(m)
    };

    let window_info = ctx.window_start.get().map(|ws| {
        let we = ctx.window_end.get().copied().unwrap_or(end).min(end);
        (ws.saturating_duration_since(start), we.saturating_duration_since(start), ctx.window_end.get().is_some())
    });
    let change = ctx.watch.as_ref().map(|w| {
        let mut times = w.changed.lock().expect("changed").clone();
        times.sort();
        let measurable = w.measurable.load(Ordering::SeqCst);
        (w.mark.get().is_some(), measurable, times)
    });

    if args.common.json {
        let mut out = json!({
            "mode": if enrollment.is_some() { "fleet" } else { "run" },
            "servers": targets.iter().map(|t| t.url.clone()).collect::<Vec<_>>(),
            "devices": n,
            "seconds": round3(seconds),
            "warmup_s": round3(args.warmup.as_secs_f64()),
            "setup": setup,
            "checkin_interval_s": round3(interval.as_secs_f64()),
            "kinds": kinds_json(&total, seconds),
            "change_window": null,
            "change": null,
        });
        if let Some(e) = enrollment {
            out["enrollment"] = e;
        }
        if let Some((ws, we, closed)) = window_info {
            let secs = (we - ws).as_secs_f64();
            out["change_window"] = json!({
                "start_s": round3(ws.as_secs_f64()), "end_s": round3(we.as_secs_f64()), "closed_by_sigusr2": closed,
                "seconds": round3(secs), "kinds": kinds_json(&window, secs),
            });
        }
        if let Some((marked, measurable, times)) = &change {
            let s = |q: f64| quantile(times, q).map(|d| round3(d.as_secs_f64()));
            let all =
                (*measurable > 0 && times.len() >= *measurable).then(|| round3(times[times.len() - 1].as_secs_f64()));
            out["change"] = json!({
                "marked": marked, "devices_with_envelope_at_mark": measurable, "no_envelope_at_mark": if *marked { n - measurable } else { 0 },
                "changed": times.len(), "first_s": s(0.0), "p50_s": s(0.5), "p90_s": s(0.9), "p99_s": s(0.99), "all_s": all,
            });
        }
        println!("{out}");
    } else {
        println!(
            "run: {seconds:.2} s against {}: {setup}",
            targets.iter().map(|t| t.url.as_str()).collect::<Vec<_>>().join(",")
        );
        for (k, s) in &total {
            println!("{}", s.summary(seconds).line(k.name()));
        }
        if let Some((ws, we, closed)) = window_info {
            let secs = (we - ws).as_secs_f64();
            println!(
                "change window: {:.2} s .. {:.2} s ({secs:.2} s{}):",
                ws.as_secs_f64(),
                we.as_secs_f64(),
                if closed { "" } else { ", no SIGUSR2: until the end" }
            );
            for (k, s) in window.iter().filter(|(_, s)| !s.is_empty()) {
                println!("  {}", s.summary(secs).line(k.name()));
            }
        }
        match &change {
            Some((false, _, _)) => println!("change propagation: no SIGUSR1 received, nothing measured"),
            Some((true, measurable, times)) => {
                let f = |q: f64| quantile(times, q).map_or("-".to_string(), |d| format!("{:.2} s", d.as_secs_f64()));
                let all = if *measurable > 0 && times.len() >= *measurable {
                    format!("all {}", f(1.0))
                } else {
                    format!("not all by the end ({} still without)", measurable - times.len().min(*measurable))
                };
                println!(
                    "change propagation: {} of {measurable} devices got a new envelope after the mark ({} had none at the mark): first {}, p50 {}, p90 {}, p99 {}, {all}",
                    times.len(),
                    n - measurable,
                    f(0.0),
                    f(0.5),
                    f(0.9),
                    f(0.99)
                );
            }
            None => {}
        }
    }
    Ok(true)
}
