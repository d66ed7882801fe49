//! tenon-fleetsim: a simulated fleet for load tests of tenon-server. `enroll` enrolls N devices and
//! writes their credentials; `run` makes them check in, report and change users at given rates over
//! many keep-alive connections and prints counts, rates and latency percentiles per kind of
//! request, and with `--watch-change` how long an admin change took to reach every device.

mod args;
mod client;
mod enroll;
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

  tenon-fleetsim enroll --server URL --token T --devices N --out creds.txt
  tenon-fleetsim run --server URL[,URL2] --creds creds.txt --duration 30s --checkin-interval 30s --report-rate 300/s
  tenon-fleetsim run ... --checkin-interval 1s --watch-change   # then: kill -USR1 PID; make the change; kill -USR2 PID")]
struct Cli {
    /// Worker threads of the runtime.
    #[arg(long, global = true, default_value_t = 2)]
    threads: usize,
    #[command(subcommand)]
    command: Command,
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(cli.threads.max(1)).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tenon-fleetsim: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cli.command {
            Command::Enroll(a) => enroll::enroll(a).await,
            Command::Run(a) => run::run(*a).await,
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
        let Command::Run(a) = cli.command else { panic!("not run") };
        assert_eq!(a.common.server.len(), 2);
        assert_eq!(a.duration, std::time::Duration::from_secs(20));
        assert_eq!(a.checkin_rate, Some(args::Load::Rate(3333.0)));
        assert_eq!(a.report_rate, args::Load::Max);
        assert_eq!(a.jitter, 0.05);
        assert!(Cli::try_parse_from(["tenon-fleetsim", "run", "--server", "x", "--creds", "c", "--stop-when-changed"])
            .is_err());
    }
}
