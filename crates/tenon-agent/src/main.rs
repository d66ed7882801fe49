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
#[command(name = "tenon-agent", version = tenon_agent::agent::AGENT_VERSION, about = "Tenon device agent")]
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
    /// Enroll this device with a server. The token comes from --token-file, TENON_ENROLL_TOKEN or
    /// --token (on the command line it is visible in the process list; prefer the other two).
    Enroll {
        #[arg(long)]
        server: String,
        /// The enrollment token (prefer --token-file or TENON_ENROLL_TOKEN).
        #[arg(long, env = "TENON_ENROLL_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// A file holding the enrollment token (wins over --token and TENON_ENROLL_TOKEN).
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        /// Discard an existing enrollment.
        #[arg(long)]
        force: bool,
        /// Accept plain http:// to a server that is not on this machine (the device credential
        /// then crosses the network readable).
        #[arg(long)]
        allow_insecure_http: bool,
    },
    /// Check in, fetch the configuration if it changed, verify, store, apply, and report if the
    /// report changed since the last one the server acknowledged (or that one is a day old).
    Sync {
        /// Sync once and exit (the only mode; `run` is the loop).
        #[arg(long, required = true)]
        once: bool,
        /// Send the report even if nothing in it changed.
        #[arg(long)]
        report: bool,
    },
    /// The service loop (enrolls first with what the installer left, if not enrolled yet).
    Run {
        /// Check-in interval (jittered by 20%).
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        interval: Duration,
    },
    /// Install a package of this device's plan now (an available one, or a failed one again),
    /// then sync.
    Install { name: String },
    /// Show what the agent holds and how the last sync went.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// The Windows service: install, uninstall, start, stop (and `run`, which the service manager calls).
    #[command(subcommand)]
    Service(ServiceCmd),
}

#[derive(Subcommand, Clone, Copy)]
enum ServiceCmd {
    /// Register the service (LocalSystem, automatic start) with this --state-dir and --platform.
    Install,
    /// Stop and remove the service.
    Uninstall,
    Start,
    Stop,
    /// The service entry point (started by the service manager, not by hand).
    Run,
    /// Delete the state directory (what the MSI runs on uninstall with TENON_PURGE=1).
    #[command(hide = true)]
    PurgeState,
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
    if !matches!(cli.command, Command::Service(ServiceCmd::Run)) {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("TENON_LOG").unwrap_or_else(|_| "info".into()))
            .with_writer(std::io::stderr)
            // Colour codes only for a person at a terminal, never in a log file or a pipe.
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
    let Some(state_dir) = cli.state_dir.clone().or_else(default_state_dir) else {
        eprintln!("error: --state-dir DIR is required on this system");
        return ExitCode::from(2);
    };
    if let Command::Status { json } = cli.command {
        return show_status(&state_dir, json);
    }
    if let Command::Service(cmd) = cli.command {
        return service(cmd, &state_dir, &cli.platform);
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
        Command::Enroll { server, token, token_file, force, allow_insecure_http } => {
            let s = server.trim();
            if !(s.starts_with("http://") || s.starts_with("https://")) {
                eprintln!("error: --server {s:?} has no http:// or https:// in front; write it as http://{s} (or https://...)");
                return ExitCode::from(2);
            }
            let token = match enroll_token(token, token_file.as_deref()) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            let opts = tenon_agent::agent::EnrollOptions { force, allow_insecure_http };
            agent.enroll_with(&server, &token, opts).map(|id| {
                println!("{id}");
            })
        }
        Command::Sync { report, .. } => {
            let opts = tenon_agent::agent::SyncOptions { force_report: report };
            let r = agent.sync_once_with(opts).map(|s| {
                let v = s.config_version.map(|v| v.to_string()).unwrap_or_else(|| "none".into());
                let sent = if s.reported { "report sent" } else { "no report (unchanged since the last one)" };
                println!("sync {}: configuration version {v}; {sent}", s.result);
                for p in &s.problems {
                    eprintln!("warning: {p}");
                }
            });
            report_memory();
            r
        }
        Command::Install { name } => {
            let r = agent.request_install(&name).map(|s| {
                println!("sync {}: install of {name} requested; `tenon-agent status --json` shows its state", s.result);
                for p in &s.problems {
                    eprintln!("warning: {p}");
                }
            });
            report_memory();
            r
        }
        Command::Run { interval } => {
            // Ctrl-C and SIGTERM end the process; every write the agent makes is atomic, so an
            // interrupted sync leaves the last complete state. The Windows service stops through
            // the service control manager, which sets this flag.
            let stop = AtomicBool::new(false);
            agent.run_installed(interval, &stop)
        }
        Command::Status { .. } | Command::Service(_) => unreachable!("handled above"),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The enrollment token from `--token-file`, else `--token` / `TENON_ENROLL_TOKEN`.
fn enroll_token(token: Option<String>, file: Option<&std::path::Path>) -> Result<String, String> {
    let token = match file {
        Some(f) => std::fs::read_to_string(f)
            .map_err(|e| format!("cannot read the token file {}: {e}; check --token-file", f.display()))?,
        None => token.unwrap_or_default(),
    };
    let token = token.trim();
    if token.is_empty() {
        return Err("no enrollment token: pass --token-file FILE or set TENON_ENROLL_TOKEN                     (create one with `tenonctl enroll-token create`)"
            .into());
    }
    Ok(token.to_string())
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
    println!(
        "last report:    {}{}",
        or(&status.last_report_at),
        if status.last_sync_reported { " (by the last sync)" } else { "" }
    );
    if let Some(e) = &status.enrollment_error {
        println!("enrollment:     {e}");
    }
    if status.decommissioned {
        println!("decommissioned: yes, re-enroll this device");
    }
    for (name, s) in &status.policies {
        let reason = s.get("reason").and_then(|v| v.as_str()).map(|r| format!(" ({r})")).unwrap_or_default();
        println!("policy {name}: {}{reason}", s.get("state").and_then(|v| v.as_str()).unwrap_or("?"));
    }
    ExitCode::SUCCESS
}

/// With `TENON_PRINT_MEMORY=1`, prints the process's resident memory (a figure for benchmarks).
fn report_memory() {
    if std::env::var_os("TENON_PRINT_MEMORY").is_none() {
        return;
    }
    #[cfg(windows)]
    if let Ok((working_set, peak)) = tenon_agent::platform::windows::process_memory() {
        eprintln!("resident memory: {working_set} bytes (peak {peak} bytes)");
    }
    #[cfg(unix)]
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        for line in status.lines().filter(|l| l.starts_with("VmRSS") || l.starts_with("VmHWM")) {
            eprintln!("{line}");
        }
    }
}

#[cfg(windows)]
static SERVICE_ARGS: std::sync::OnceLock<(PathBuf, String)> = std::sync::OnceLock::new();

/// The service's loop: the same as `run`, stopped by the service manager through `stop`.
#[cfg(windows)]
fn service_loop(stop: std::sync::Arc<AtomicBool>) -> anyhow::Result<()> {
    let (dir, spec) = SERVICE_ARGS.get().ok_or_else(|| anyhow::anyhow!("service arguments missing"))?;
    tenon_agent::service::prepare_at_start(dir);
    let platform = open_platform(spec).map_err(anyhow::Error::msg)?;
    let agent = Agent::new(dir, platform.as_ref(), system_clock());
    agent.run_installed(Duration::from_secs(60), &stop).map_err(anyhow::Error::from)
}

#[cfg(windows)]
fn service(cmd: ServiceCmd, state_dir: &std::path::Path, platform: &str) -> ExitCode {
    use tenon_agent::service;
    let result = match cmd {
        ServiceCmd::Install => std::env::current_exe()
            .map_err(|e| anyhow::anyhow!("cannot find this program's path: {e}"))
            .and_then(|exe| {
                service::install(&exe, state_dir, &["--platform".into(), platform.into()]).map_err(anyhow::Error::from)
            })
            .map(|()| {
                println!("service {} installed; start it with `tenon-agent service start`", service::SERVICE_NAME)
            }),
        ServiceCmd::Uninstall => {
            service::uninstall().map_err(anyhow::Error::from).map(|()| println!("service removed"))
        }
        ServiceCmd::Start => service::start().map_err(anyhow::Error::from).map(|()| println!("service started")),
        ServiceCmd::Stop => service::stop().map_err(anyhow::Error::from).map(|()| println!("service stopped")),
        ServiceCmd::PurgeState => service::purge_state(state_dir)
            .map_err(anyhow::Error::from)
            .map(|()| println!("deleted {}", state_dir.display())),
        ServiceCmd::Run => {
            match service::open_log(state_dir) {
                Ok(log) => {
                    let _ = tracing_subscriber::fmt()
                        .with_env_filter(
                            tracing_subscriber::EnvFilter::try_from_env("TENON_LOG").unwrap_or_else(|_| "info".into()),
                        )
                        .with_ansi(false)
                        .with_writer(log)
                        .try_init();
                }
                Err(e) => eprintln!("warning: cannot open the service log: {e}"),
            }
            let _ = SERVICE_ARGS.set((state_dir.to_path_buf(), platform.to_string()));
            service::run_dispatcher(service_loop).map_err(anyhow::Error::from)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(not(windows))]
fn service(_cmd: ServiceCmd, _state_dir: &std::path::Path, _platform: &str) -> ExitCode {
    eprintln!(
        "error: the service commands are for Windows; on this system run `tenon-agent run` under your service manager"
    );
    ExitCode::from(2)
}
