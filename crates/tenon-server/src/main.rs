//! tenon-server command line: `tenon-server serve [--listen ADDR] [--data-dir DIR] [--database URL]`
//! and `tenon-server rotate-escrow-key [--data-dir DIR]`.

use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tenon_server::ratelimit::Rate;

#[derive(Parser)]
#[command(name = "tenon-server", version, about = "Tenon backend: signed per-device configuration for Windows fleets")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8440")]
        listen: SocketAddr,
        /// Directory for keys, the admin token and the SQLite database.
        #[arg(long, default_value = "./tenon-data")]
        data_dir: PathBuf,
        /// Database URL (default: SQLite at DATA_DIR/tenon.db).
        #[arg(long)]
        database: Option<String>,
        /// How long a signed configuration stays valid on a device that cannot reach the server.
        #[arg(long, default_value = "7d", value_parser = parse_duration)]
        envelope_ttl: u64,
        #[command(flatten)]
        limits: Box<ClientLimitArgs>,
    },
    /// Generate a new escrow key and re-seal every stored recovery key to it (offline: stop the
    /// server first; this takes the data-dir lock).
    RotateEscrowKey {
        /// The server's data directory.
        #[arg(long, default_value = "./tenon-data")]
        data_dir: PathBuf,
        /// Database URL (default: SQLite at DATA_DIR/tenon.db).
        #[arg(long)]
        database: Option<String>,
    },
    /// Create a new envelope-signing key, listed by the root key beside the current one. Run it
    /// with the server stopped; at its next start the server re-signs every envelope with it.
    RotateSigningKey {
        #[arg(long, default_value = "./tenon-data")]
        data_dir: PathBuf,
    },
}

/// Bounds on what clients may hold and send (README, "Limits on clients").
#[derive(clap::Args)]
struct ClientLimitArgs {
    /// Open connections at most; at the cap a new connection closes the oldest one with no request in progress.
    #[arg(long, default_value_t = 10_000)]
    max_connections: usize,
    /// A request head must arrive within this time of connecting (or of the previous response).
    #[arg(long, default_value = "10s", value_parser = parse_timeout)]
    header_read_timeout: Duration,
    /// A request body must arrive within this time of its head (else 408).
    #[arg(long, default_value = "30s", value_parser = parse_timeout)]
    body_read_timeout: Duration,
    /// A connection with no request in progress on which nothing moves for this long is closed.
    #[arg(long, default_value = "60s", value_parser = parse_timeout)]
    idle_timeout: Duration,
    /// Reports per device: COUNT/DURATION (a burst of COUNT, refilled over DURATION) or `off`.
    #[arg(long, default_value = "20/20m", value_parser = parse_rate)]
    report_rate_per_device: RateArg,
    /// Reports per source address (IPv4, or IPv6 /64).
    #[arg(long, default_value = "1000/1m", value_parser = parse_rate)]
    report_rate_per_address: RateArg,
    /// Enrollments per enrollment token.
    #[arg(long, default_value = "120/1m", value_parser = parse_rate)]
    enroll_rate_per_token: RateArg,
    /// Enrollments per source address.
    #[arg(long, default_value = "120/1m", value_parser = parse_rate)]
    enroll_rate_per_address: RateArg,
    /// Reports kept per device: the most recent N...
    #[arg(long, default_value_t = 20)]
    report_history_last: u32,
    /// ...and the latest of each day for this many days.
    #[arg(long, default_value_t = 30)]
    report_history_days: u32,
    /// How often failed authentications are logged, as one line of counts.
    #[arg(long, default_value = "60s", value_parser = parse_timeout)]
    auth_failure_log_interval: Duration,
}

#[derive(Clone, Copy)]
struct RateArg(Option<Rate>);

fn parse_rate(s: &str) -> Result<RateArg, String> {
    Rate::parse(s).map(RateArg).map_err(|e| e.to_string())
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e}; use a duration such as 500ms, 10s or 1m"))?;
    if d < Duration::from_millis(100) {
        return Err("must be at least 100ms".into());
    }
    Ok(d)
}

fn parse_duration(s: &str) -> Result<u64, String> {
    humantime::parse_duration(s)
        .map(|d| d.as_secs())
        .map_err(|e| format!("{e}; use a duration such as 24h or 7d"))
        .and_then(|s| if s >= 60 { Ok(s) } else { Err("must be at least 60s".into()) })
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
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TENON_LOG").unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Serve { listen, data_dir, database, envelope_ttl, limits } => {
            let opts = tenon_server::ServeOptions {
                database,
                envelope_ttl: envelope_ttl as i64,
                connections: tenon_server::listener::ConnectionLimits {
                    max_connections: limits.max_connections,
                    header_read_timeout: limits.header_read_timeout,
                    body_read_timeout: limits.body_read_timeout,
                    idle_timeout: limits.idle_timeout,
                },
                rates: tenon_server::ratelimit::ClientRates {
                    report_per_device: limits.report_rate_per_device.0,
                    report_per_address: limits.report_rate_per_address.0,
                    enroll_per_token: limits.enroll_rate_per_token.0,
                    enroll_per_address: limits.enroll_rate_per_address.0,
                },
                report_history: tenon_server::report_history::ReportHistory {
                    last: limits.report_history_last,
                    days: limits.report_history_days,
                },
                auth_failure_log_interval: limits.auth_failure_log_interval,
                ..tenon_server::ServeOptions::new(listen, data_dir)
            };
            runtime.block_on(tenon_server::serve(opts))
        }
        Command::RotateEscrowKey { data_dir, database } => {
            runtime.block_on(tenon_server::rotate_escrow_key(&data_dir, database.as_deref()))
        }
        Command::RotateSigningKey { data_dir } => tenon_server::datadir::DataDir::open(&data_dir)
            .and_then(|d| d.rotate_signing_key(tenon_server::state::system_clock()()))
            .map(|n| println!("signing key {n} created; start the server to re-sign every envelope with it")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
