//! The top-level form (no subcommand), the product design's contract:
//! `tenon-fleetsim --server URL[,URL...] --devices N --interval DUR --duration DUR [--token TOKEN] [--json]`.
//! With `--token` it enrolls the N devices first (as `enroll` does), then runs them (as `run` does):
//! check-ins every `--interval` with jitter, changed reports and user changes at rates proportional
//! to the check-ins unless given, for `--duration`, round robin over the servers. Without `--token`
//! the devices come from `--creds FILE`.

use crate::args::{parse_duration, parse_fraction, parse_load, Load};
use crate::enroll::{enroll_devices, write_creds, Common};
use crate::run::{load_devices, run_devices, RunArgs};
use crate::sim::{Ctx, Device, DeviceState};
use crate::stats::round3;
use clap::Args;
use serde_json::json;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The default report rate is the check-in rate divided by this: each device sends a changed
/// report about every 10 check-ins.
pub const REPORTS_PER_CHECKINS: f64 = 10.0;
/// The default user-change rate is the check-in rate divided by this.
pub const USER_CHANGES_PER_CHECKINS: f64 = 100.0;

#[derive(Args)]
pub struct FleetArgs {
    #[command(flatten)]
    pub common: Common,
    /// How many devices: enrolled first with --token, or the first N of --creds.
    #[arg(long, required = true)]
    pub devices: Option<usize>,
    /// Each device checks in once per interval, moved by up to --jitter either way (open loop:
    /// DEVICES / INTERVAL check-ins per second, the first ones spread over the first interval).
    #[arg(long, required = true, value_parser = parse_duration)]
    pub interval: Option<Duration>,
    /// How long to run and measure, after the enrollment and the warm-up.
    #[arg(long, required = true, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// An enrollment token with at least DEVICES uses (`tenonctl enroll-token create --uses N`),
    /// or an admin token (`tadm.…`, which creates one): enroll the devices first and print the
    /// enrollment's time and rate.
    #[arg(long, conflicts_with = "creds")]
    pub token: Option<String>,
    /// Instead of --token: a credentials file written by `enroll` (or by --out) with at least
    /// DEVICES lines.
    #[arg(long, value_name = "FILE")]
    pub creds: Option<PathBuf>,
    /// With --token: also write the enrolled devices' credentials to FILE (mode 0600), for later
    /// runs with --creds.
    #[arg(long, value_name = "FILE", requires = "token")]
    pub out: Option<PathBuf>,
    /// Connections for the enrollment, each enrolling one device after the other.
    #[arg(long, default_value_t = 32)]
    pub enroll_connections: usize,
    /// Run this long before --duration begins without counting anything (e.g. one interval, so
    /// that the check-ins measured are the steady state's 304s rather than the first fetches).
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Each interval is moved by up to this much either way, at random.
    #[arg(long, default_value = "10%", value_parser = parse_fraction)]
    pub jitter: f64,
    /// Connections for check-ins.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Changed reports in total, spread over the devices in turn (a rate, `max` or `off`).
    /// Default: the check-in rate / 10 (DEVICES / INTERVAL / 10: each device about every 10
    /// check-ins).
    #[arg(long, value_parser = parse_load, value_name = "R/s|max|off")]
    pub report_rate: Option<Load>,
    /// Connections for reports.
    #[arg(long, default_value_t = 16)]
    pub report_connections: usize,
    /// Reports with another signed-in user, which make the server re-compile that device's
    /// envelope (a rate, `max` or `off`). Default: the check-in rate / 100 (DEVICES / INTERVAL / 100).
    #[arg(long, value_parser = parse_load, value_name = "R/s|max|off")]
    pub user_change_rate: Option<Load>,
    /// Connections for the user changes.
    #[arg(long, default_value_t = 2)]
    pub user_change_connections: usize,
    /// Measure change propagation as `run --watch-change` does (SIGUSR1 before the change,
    /// SIGUSR2 once it is applied).
    #[arg(long)]
    pub watch_change: bool,
    /// With --watch-change: end the run as soon as every device has a new envelope.
    #[arg(long, requires = "watch_change")]
    pub stop_when_changed: bool,
    /// Seed of the jitter.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// Where the devices come from.
#[derive(Debug, PartialEq)]
pub enum Fleet {
    Enroll { token: String, out: Option<PathBuf> },
    Creds(PathBuf),
}

/// The one usage error clap cannot express: neither --token nor --creds.
pub const NO_DEVICES: &str =
    "tenon-fleetsim: pass --token TOKEN (enroll DEVICES devices first) or --creds FILE (devices enrolled before)";

/// A checked form: the fleet's source and the arguments of the run.
pub struct Plan {
    pub fleet: Fleet,
    pub devices: usize,
    pub enroll_connections: usize,
    pub run: RunArgs,
}

impl FleetArgs {
    /// Checks what clap does not and turns the form into `run`'s arguments.
    pub fn plan(self) -> Result<Plan, String> {
        // clap's `requires` is not enforced on the top level's arguments (subcommand_negates_reqs).
        if self.out.is_some() && self.token.is_none() {
            return Err(
                "tenon-fleetsim: --out writes the credentials of the devices --token enrolls; it needs --token"
                    .to_string(),
            );
        }
        if self.stop_when_changed && !self.watch_change {
            return Err("tenon-fleetsim: --stop-when-changed needs --watch-change".to_string());
        }
        let fleet = match (self.token, self.creds) {
            (Some(token), None) => Fleet::Enroll { token, out: self.out },
            (None, Some(creds)) => Fleet::Creds(creds),
            (None, None) => return Err(NO_DEVICES.to_string()),
            (Some(_), Some(_)) => return Err("tenon-fleetsim: pass either --token or --creds, not both".to_string()),
        };
        let (Some(devices), Some(interval), Some(duration)) = (self.devices, self.interval, self.duration) else {
            return Err("tenon-fleetsim: --devices, --interval and --duration are required".to_string());
        };
        if devices == 0 {
            return Err("tenon-fleetsim: --devices must be at least 1".to_string());
        }
        if interval.is_zero() {
            return Err("tenon-fleetsim: --interval must be more than 0".to_string());
        }
        let checkin_rate = devices as f64 / interval.as_secs_f64();
        let report_rate = self.report_rate.unwrap_or(Load::Rate(checkin_rate / REPORTS_PER_CHECKINS));
        let user_change_rate = self.user_change_rate.unwrap_or(Load::Rate(checkin_rate / USER_CHANGES_PER_CHECKINS));
        let run = RunArgs {
            common: self.common,
            creds: match &fleet {
                Fleet::Creds(p) => p.clone(),
                Fleet::Enroll { .. } => PathBuf::new(),
            },
            devices: Some(devices),
            duration,
            warmup: self.warmup,
            checkin_interval: interval,
            checkin_rate: None,
            jitter: self.jitter,
            connections: self.connections,
            report_rate,
            report_count: None,
            report_connections: self.report_connections,
            user_change_rate,
            user_change_connections: self.user_change_connections,
            users: 1,
            watch_change: self.watch_change,
            stop_when_changed: self.stop_when_changed,
            enroll_rate: Load::Off,
            enroll_token: None,
            enroll_connections: 1,
            seed: self.seed,
        };
        Ok(Plan { fleet, devices, enroll_connections: self.enroll_connections, run })
    }
}

pub async fn fleet(plan: Plan) -> anyhow::Result<bool> {
    // SIGUSR1/SIGUSR2 would end the process by default: ignored from here on, and handled once the
    // run begins (tokio's handler stays installed).
    {
        use tokio::signal::unix::{signal, SignalKind};
        let _ = signal(SignalKind::user_defined1())?;
        let _ = signal(SignalKind::user_defined2())?;
    }
    let Plan { fleet, devices: n, enroll_connections, run } = plan;
    let json = run.common.json;
    let (devices, enrollment) = match fleet {
        Fleet::Creds(_) => {
            let devices = load_devices(&run)?;
            if devices.len() < n {
                anyhow::bail!("{} lists {} devices, fewer than --devices {n}", run.creds.display(), devices.len());
            }
            (devices, serde_json::Value::Null)
        }
        Fleet::Enroll { token, out } => {
            eprintln!("fleetsim: enrolling {n} devices over {enroll_connections} connections");
            let token = crate::enroll::enrollment_token(&run.common, &token, n).await?;
            let e = enroll_devices(&run.common, &token, n, enroll_connections).await?;
            if let Some(out) = &out {
                write_creds(out, &e.creds)?;
            }
            let text = format!(
                "enrolled {} of {n} devices in {:.2} s: {:.1}/s over {enroll_connections} connections{}",
                e.creds.len(),
                e.seconds,
                e.rate(),
                out.as_ref().map(|p| format!("; credentials in {}", p.display())).unwrap_or_default()
            );
            if json {
                eprintln!("fleetsim: {text}");
            } else {
                println!("{text}");
                println!("{}", e.summary.line("enroll"));
            }
            let v = json!({
                "devices_requested": n,
                "enrolled": e.creds.len(),
                "seconds": round3(e.seconds),
                "rate_per_s": round3(e.rate()),
                "connections": enroll_connections,
                "out": out,
                "kinds": {"enroll": e.summary.to_json()},
            });
            if e.creds.len() < n {
                if json {
                    println!("{}", json!({"mode": "fleet", "enrollment": v, "kinds": null}));
                }
                eprintln!("tenon-fleetsim: only {} of {n} devices enrolled; not running them", e.creds.len());
                return Ok(false);
            }
            let devices = e
                .creds
                .into_iter()
                .enumerate()
                .map(|(i, (_, cred))| Device {
                    bearer: Arc::from(cred.as_str()),
                    hostname: Ctx::hostname(&run.common.hostname_prefix, i),
                    state: Mutex::new(DeviceState::default()),
                })
                .collect();
            (devices, v)
        }
    };
    run_devices(run, devices, Some(enrollment)).await
}
