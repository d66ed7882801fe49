//! tenon-fleetsim: a simulated fleet for load tests of tenon-server. `enroll` enrolls N devices and
//! writes their credentials; `run` makes them check in, report and change users at given rates over
//! many keep-alive connections and prints counts, rates and latency percentiles per kind of
//! request, and with `--watch-change` how long an admin change took to reach every device. With no
//! subcommand (`fleet.rs`, the contract's form) it does both in one go: enroll with `--token` (or
//! read `--creds`), then run at `--interval` for `--duration`.

mod args;
mod client;
mod enroll;
mod fleet;
mod run;
mod schedule;
mod sim;
mod stats;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "tenon-fleetsim", version)]
#[command(about = "Simulated Tenon devices: enrollment, check-ins, reports and change propagation under load")]
#[command(long_about = "Simulated Tenon devices: enrollment, check-ins, reports and change propagation under load.

Every connection is a keep-alive HTTP/1.1 connection owned by one task that sends its requests back
to back. Open loop (a rate): requests are due on a fixed schedule and latency is measured from the
time a request was due, so a slow server shows as latency, not as requests never sent; requests
still due at the end are counted as unsent. Closed loop (max): each connection sends the next
request as soon as it has the answer. A 503 is counted (errors by kind \"503\") and retried after
its Retry-After. Latency includes retries.

  tenon-fleetsim --server URL[,URL...] --devices N --interval 30s --duration 60s --token T [--json]
  tenon-fleetsim --server URL --devices N --interval 30s --duration 60s --creds creds.txt
  tenon-fleetsim enroll --server URL --token T --devices N --out creds.txt
  tenon-fleetsim run --server URL[,URL2] --creds creds.txt --duration 30s --checkin-interval 30s --report-rate 300/s
  tenon-fleetsim run ... --checkin-interval 1s --watch-change   # then: kill -USR1 PID; make the change; kill -USR2 PID

Without a subcommand (the first two lines): with --token it enrolls the N devices (printing the
enrollment's time and rate), then runs them for --duration: each checks in every --interval (±
--jitter) with its own credentials over keep-alive connections, round robin over the servers, and
by default changed reports at DEVICES/INTERVAL/10 per second and user changes at
DEVICES/INTERVAL/100 per second (--report-rate, --user-change-rate). Without --token the devices
are the first N of --creds FILE. Then it prints what `run` prints (with --json one object of mode
\"fleet\" whose `enrollment` holds the enrollment's figures).")]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true, arg_required_else_help = true)]
struct Cli {
    /// Worker threads of the runtime.
    #[arg(long, global = true, default_value_t = 2)]
    threads: usize,
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    fleet: fleet::FleetArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Enroll N devices as fast as the server allows and write `DEVICE_ID CREDENTIAL` lines (mode
    /// 0600). Prints the count, time, rate and latency; exits 1 unless every device was enrolled.
    /// The server must run with `--enroll-rate-per-address off --enroll-rate-per-token off` for
    /// more than a few hundred devices from one address.
    Enroll(enroll::EnrollArgs),
    /// Run the enrolled devices: check-ins at their interval, changed reports, user changes and
    /// new enrollments at given rates. Prints per kind of request: count, achieved rate, latency p50/p90/p99/max,
    /// statuses and errors by kind. Reports beyond about 20 per device in 20 minutes need the
    /// server's `--report-rate-per-device off`; from one address `--report-rate-per-address off`.
    Run(Box<run::RunArgs>),
}

/// What to do, once the command line is checked.
enum Job {
    Enroll(enroll::EnrollArgs),
    Run(Box<run::RunArgs>),
    Fleet(Box<fleet::Plan>),
}

impl Cli {
    /// The job, or the one-line usage error of the top-level form (exit 2).
    fn job(self) -> Result<Job, String> {
        Ok(match self.command {
            Some(Command::Enroll(a)) => Job::Enroll(a),
            Some(Command::Run(a)) => Job::Run(a),
            None => Job::Fleet(Box::new(self.fleet.plan()?)),
        })
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let threads = cli.threads;
    let job = match cli.job() {
        Ok(j) => j,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(threads.max(1)).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tenon-fleetsim: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match job {
            Job::Enroll(a) => enroll::enroll(a).await,
            Job::Run(a) => run::run(*a).await,
            Job::Fleet(p) => fleet::fleet(*p).await,
        }
    });
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("tenon-fleetsim: {e:#}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_arguments_parse() {
        let cli = Cli::try_parse_from([
            "tenon-fleetsim",
            "run",
            "--server",
            "http://127.0.0.1:1,http://127.0.0.1:2",
            "--creds",
            "c.txt",
            "--duration",
            "20s",
            "--checkin-rate",
            "3333/s",
            "--report-rate",
            "max",
            "--jitter",
            "5%",
        ])
        .unwrap();
        let Some(Command::Run(a)) = cli.command else { panic!("not run") };
        assert_eq!(a.common.server.len(), 2);
        assert_eq!(a.duration, std::time::Duration::from_secs(20));
        assert_eq!(a.checkin_rate, Some(args::Load::Rate(3333.0)));
        assert_eq!(a.report_rate, args::Load::Max);
        assert_eq!(a.jitter, 0.05);
        assert!(Cli::try_parse_from(["tenon-fleetsim", "run", "--server", "x", "--creds", "c", "--stop-when-changed"])
            .is_err());
    }

    /// The top-level form: what parses, into what, and what is refused with which exit code.
    #[test]
    fn top_level_form_table() {
        use crate::args::Load;
        use crate::fleet::Fleet;
        // (arguments after the program name, expected: Ok((fleet, devices, interval s, duration s,
        // report rate, user-change rate)) or Err(exit code)).
        type Want = Result<(Fleet, usize, u64, u64, Load, Load), i32>;
        let base = "--server http://127.0.0.1:1,http://127.0.0.1:2 --devices 3000 --interval 30s --duration 60s";
        let table: Vec<(String, Want)> = vec![
            (
                format!("{base} --token T"),
                Ok((Fleet::Enroll { token: "T".into(), out: None }, 3000, 30, 60, Load::Rate(10.0), Load::Rate(1.0))),
            ),
            (
                format!("{base} --token T --out c.txt --json"),
                Ok((
                    Fleet::Enroll { token: "T".into(), out: Some("c.txt".into()) },
                    3000,
                    30,
                    60,
                    Load::Rate(10.0),
                    Load::Rate(1.0),
                )),
            ),
            (
                format!("{base} --creds c.txt"),
                Ok((Fleet::Creds("c.txt".into()), 3000, 30, 60, Load::Rate(10.0), Load::Rate(1.0))),
            ),
            (
                format!("{base} --creds c.txt --report-rate 50/s --user-change-rate off --ca-file ca.pem"),
                Ok((Fleet::Creds("c.txt".into()), 3000, 30, 60, Load::Rate(50.0), Load::Off)),
            ),
            (
                format!("{base} --token T --report-rate max --watch-change --stop-when-changed --warmup 30s"),
                Ok((Fleet::Enroll { token: "T".into(), out: None }, 3000, 30, 60, Load::Max, Load::Rate(1.0))),
            ),
            // Neither --token nor --creds: the one-line usage error, exit 2.
            (base.to_string(), Err(2)),
            (format!("{base} --json"), Err(2)),
            // Both, or --out without --token.
            (format!("{base} --token T --creds c.txt"), Err(2)),
            (format!("{base} --creds c.txt --out o.txt"), Err(2)),
            // Missing or bad required values.
            ("--server http://127.0.0.1:1 --interval 30s --duration 60s --token T".to_string(), Err(2)),
            ("--server http://127.0.0.1:1 --devices 10 --duration 60s --token T".to_string(), Err(2)),
            ("--server http://127.0.0.1:1 --devices 10 --interval 30s --token T".to_string(), Err(2)),
            ("--devices 10 --interval 30s --duration 60s --token T".to_string(), Err(2)),
            ("--server http://127.0.0.1:1 --devices 0 --interval 30s --duration 60s --token T".to_string(), Err(2)),
            ("--server http://127.0.0.1:1 --devices 10 --interval 0s --duration 60s --token T".to_string(), Err(2)),
            ("--server http://127.0.0.1:1 --devices 10 --interval 30x --duration 60s --token T".to_string(), Err(2)),
            (format!("{base} --token T --stop-when-changed"), Err(2)),
            // The form's arguments do not mix with a subcommand's.
            (format!("{base} --token T run --creds c.txt"), Err(2)),
            // No arguments at all: the help (exit 2).
            (String::new(), Err(2)),
        ];
        for (line, want) in table {
            let argv = std::iter::once("tenon-fleetsim").chain(line.split_whitespace());
            let got: Result<_, i32> = match Cli::try_parse_from(argv) {
                Err(e) => Err(e.exit_code()),
                Ok(cli) => match cli.job() {
                    Err(msg) => {
                        assert!(!msg.contains('\n') && msg.starts_with("tenon-fleetsim: "), "{line}: {msg}");
                        if !line.contains("--token") && !line.contains("--creds") {
                            assert!(msg.contains("--token") && msg.contains("--creds"), "{line}: {msg}");
                        }
                        Err(2)
                    }
                    Ok(Job::Fleet(p)) => {
                        assert_eq!(p.run.common.server.len(), if line.contains(",http") { 2 } else { 1 }, "{line}");
                        assert_eq!(p.run.common.json, line.contains("--json"), "{line}");
                        assert_eq!(p.run.common.ca_file.is_some(), line.contains("--ca-file"), "{line}");
                        assert_eq!(p.run.watch_change, line.contains("--watch-change"), "{line}");
                        assert_eq!(p.run.jitter, 0.1, "{line}");
                        assert_eq!(p.run.checkin_rate, None, "{line}");
                        assert_eq!(p.run.enroll_rate, Load::Off, "{line}");
                        Ok((
                            p.fleet,
                            p.devices,
                            p.run.checkin_interval.as_secs(),
                            p.run.duration.as_secs(),
                            p.run.report_rate,
                            p.run.user_change_rate,
                        ))
                    }
                    Ok(_) => panic!("{line}: a subcommand"),
                },
            };
            assert_eq!(got, want, "{line}");
        }
    }

    /// The subcommands still parse as before, their required arguments their own.
    #[test]
    fn subcommands_unchanged_table() {
        let table: [(&str, bool); 6] = [
            ("enroll --server http://127.0.0.1:1 --token T --devices 10 --out c.txt", true),
            (
                "enroll --server http://127.0.0.1:1 --devices 10 --out c.txt",
                std::env::var_os("TENON_FLEETSIM_TOKEN").is_some(),
            ),
            ("run --server http://127.0.0.1:1 --creds c.txt", true),
            ("run --server http://127.0.0.1:1 --creds c.txt --checkin-interval 1s --watch-change --json", true),
            ("run --server http://127.0.0.1:1", false),
            ("run --creds c.txt --interval 30s", false),
        ];
        for (line, ok) in table {
            let argv = std::iter::once("tenon-fleetsim").chain(line.split_whitespace());
            let parsed = Cli::try_parse_from(argv).map(|cli| cli.job());
            assert_eq!(matches!(parsed, Ok(Ok(Job::Enroll(_) | Job::Run(_)))), ok, "{line}");
        }
    }
}
