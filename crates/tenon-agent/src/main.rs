//! tenon-agent command line:
//! `tenon-agent --state-dir DIR [--platform native | --platform simulated:FILE] COMMAND`.
//!
//! Environment: `TENON_LOG` (log filter, default `info`); `TENON_AGENT_CLOCK_OFFSET` (a duration
//! such as `6h`, honoured ONLY with `--platform simulated:FILE`) moves the agent's clock forward,
//! so tests and demos can play through schedules measured in hours (the Entra escrow backoff)
//! without waiting. The native platform ignores it: a real device runs on the real clock.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;
use tenon_agent::agent::{system_clock, Agent, Clock};
use tenon_agent::platform::Platform;
use tenon_agent::status::Status;

#[derive(Parser)]
#[command(name = "tenon-agent", version, about = "Tenon device agent")]
struct Cli {
    /// Where the agent keeps its vault and status (Windows default: %ProgramData%\Tenon).
    #[arg(long, global = true)]
    state_dir: Option<PathBuf>,
    /// `native` (the real OS; Windows only) or `simulated:FILE` (a device described by a JSON file;
    /// with it, the environment variable TENON_AGENT_CLOCK_OFFSET=DURATION moves the clock forward).
    #[arg(long, global = true, default_value = "native")]
    platform: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Enroll this device with a server.
    Enroll {
        #[arg(long)]
        server: String,
        #[arg(long)]
        token: String,
        /// Discard an existing enrollment.
        #[arg(long)]
        force: bool,
    },
    /// Check in, fetch the configuration if it changed, verify, store, apply and report.
    Sync {
        /// Sync once and exit (the only mode; `run` is the loop).
        #[arg(long, required = true)]
        once: bool,
    },
    /// The service loop.
    Run {
        /// Check-in interval (jittered by 20%).
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        interval: Duration,
    },
    /// Show what the agent holds and how the last sync went.
    Status {
        #[arg(long)]
        json: bool,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e}; use a duration such as 60s or 5m"))
}

fn default_state_dir() -> Option<PathBuf> {
    if cfg!(windows) {
        std::env::var_os("ProgramData").map(|p| PathBuf::from(p).join("Tenon"))
    } else {
        None
    }
}

fn open_platform(spec: &str) -> Result<Box<dyn Platform>, String> {
    if let Some(file) = spec.strip_prefix("simulated:") {
        return tenon_agent::platform::simulated::SimulatedPlatform::open(std::path::Path::new(file))
            .map(|p| Box::new(p) as Box<dyn Platform>)
            .map_err(|e| e.to_string());
    }
    if spec != "native" {
        return Err(format!("--platform {spec:?} is not known; use native or simulated:FILE"));
    }
    native_platform()
}

#[cfg(windows)]
fn native_platform() -> Result<Box<dyn Platform>, String> {
    Ok(Box::new(tenon_agent::platform::windows::WindowsPlatform::new()))
}

#[cfg(not(windows))]
fn native_platform() -> Result<Box<dyn Platform>, String> {
    Err("the native platform is Windows only; on this system use --platform simulated:FILE".into())
}

/// The system clock; on the simulated platform moved forward by `TENON_AGENT_CLOCK_OFFSET`.
fn clock_for(platform: &str) -> Result<Clock, String> {
    let system = system_clock();
    let Some(offset) = std::env::var("TENON_AGENT_CLOCK_OFFSET").ok().filter(|v| !v.trim().is_empty()) else {
        return Ok(system);
    };
    if !platform.starts_with("simulated:") {
        tracing::warn!("TENON_AGENT_CLOCK_OFFSET is ignored: it applies only to --platform simulated:FILE");
        return Ok(system);
    }
    let secs = humantime::parse_duration(offset.trim())
        .map_err(|e| format!("TENON_AGENT_CLOCK_OFFSET={offset:?} is not a duration ({e}); use such as 6h"))?
        .as_secs() as i64;
    Ok(Arc::new(move || system().saturating_add(secs)))
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS };
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("TENON_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let Some(state_dir) = cli.state_dir.clone().or_else(default_state_dir) else {
        eprintln!("error: --state-dir DIR is required on this system");
        return ExitCode::from(2);
    };
    if let Command::Status { json } = cli.command {
        return show_status(&state_dir, json);
    }
    let platform = match open_platform(&cli.platform) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let clock = match clock_for(&cli.platform) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let agent = Agent::new(&state_dir, platform.as_ref(), clock);
    let result = match cli.command {
        Command::Enroll { server, token, force } => agent.enroll(&server, &token, force).map(|id| {
            println!("{id}");
        }),
        Command::Sync { .. } => agent.sync_once().map(|s| {
            let v = s.config_version.map(|v| v.to_string()).unwrap_or_else(|| "none".into());
            println!("sync {}: configuration version {v}", s.result);
            for p in &s.problems {
                eprintln!("warning: {p}");
            }
        }),
        Command::Run { interval } => {
            // Ctrl-C and SIGTERM end the process; every write the agent makes is atomic, so an
            // interrupted sync leaves the last complete state. The Windows service stops through
            // the service control manager, which sets this flag.
            let stop = AtomicBool::new(false);
            agent.run(interval, &stop)
        }
        Command::Status { .. } => unreachable!("handled above"),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn show_status(dir: &std::path::Path, json: bool) -> ExitCode {
    let status = Status::load(dir);
    if json {
        println!("{}", serde_json::to_string_pretty(&status).expect("status serialises"));
        return ExitCode::SUCCESS;
    }
    let or = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    println!("device id:      {}", or(&status.device_id));
    println!("server:         {}", or(&status.server_url));
    println!("config version: {}", status.config_version.map(|v| v.to_string()).unwrap_or_else(|| "-".into()));
    println!("config sha256:  {}", or(&status.config_sha256));
    println!("last sync:      {} ({})", or(&status.last_sync), or(&status.last_sync_result));
    println!("last error:     {}", or(&status.last_error));
    if status.decommissioned {
        println!("decommissioned: yes, re-enroll this device");
    }
    for (name, s) in &status.policies {
        println!("policy {name}: {}", s.get("state").and_then(|v| v.as_str()).unwrap_or("?"));
    }
    ExitCode::SUCCESS
}
