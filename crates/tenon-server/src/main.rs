//! tenon-server command line: `tenon-server serve [--listen ADDR] [--data-dir DIR] [--database URL]`
//! and the offline tools: `rotate-escrow-key`, `rotate-signing-key`, `backup`, `restore`.

use clap::{Parser, Subcommand};
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tenon_server::ratelimit::Rate;

#[derive(Parser)]
#[command(name = "tenon-server", version, about = "Tenon backend: signed per-device configuration for Windows fleets")]
// A flag given twice takes the last value: the config file's values come first (see
// `expand_config`), so the command line wins.
#[command(args_override_self = true)]
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
        /// Where package content is stored (default: DATA_DIR/packages). With several servers on
        /// one database, point every server at the same shared directory.
        #[arg(long)]
        package_dir: Option<PathBuf>,
        /// How long a signed configuration stays valid on a device that cannot reach the server.
        #[arg(long, default_value = "7d", value_parser = parse_duration)]
        envelope_ttl: u64,
        /// Serve Prometheus metrics at http://ADDR/metrics (a separate listener; off by default).
        #[arg(long)]
        metrics_listen: Option<SocketAddr>,
        /// Log lines as text (for people) or JSON objects, one per line (for log shippers).
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
        /// A TOML file whose keys are these flags' names (`listen = "0.0.0.0:8440"`,
        /// `data-dir = "/var/lib/tenon"`, `envelope-ttl = "7d"`); flags on the command line win.
        /// Also TENON_CONFIG.
        #[arg(long, env = "TENON_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        tls: TlsArgs,
        #[command(flatten)]
        limits: Box<ClientLimitArgs>,
        #[command(flatten)]
        portal: Box<PortalArgs>,
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
    /// Write one archive (mode 0600) with the database, the root, signing and escrow keys, the
    /// admin token, the TLS directory and the software packages' content. Safe while the server
    /// serves: the database is copied as one consistent snapshot.
    Backup {
        /// The server's data directory.
        #[arg(long, default_value = "./tenon-data")]
        data_dir: PathBuf,
        /// Database URL (default: SQLite at DATA_DIR/tenon.db).
        #[arg(long)]
        database: Option<String>,
        /// The archive to write (must not exist yet).
        #[arg(long)]
        to: PathBuf,
        /// Seal the keys and tokens in the archive with the passphrase in this file (Argon2id +
        /// XChaCha20-Poly1305); restore then needs the same file.
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
        /// The server's package directory, if `serve` was given `--package-dir` (default:
        /// DATA_DIR/packages).
        #[arg(long, conflicts_with = "without_packages")]
        package_dir: Option<PathBuf>,
        /// Leave the packages' content out (back it up yourself: a restored server without it holds
        /// packages its devices cannot download).
        #[arg(long)]
        without_packages: bool,
    },
    /// Restore a backup into an empty (or new) data directory; the archive is checked whole before
    /// anything is written. Start the server on that directory afterwards.
    Restore {
        /// The archive written by `tenon-server backup`.
        #[arg(long)]
        from: PathBuf,
        /// The data directory to create (must be empty or missing).
        #[arg(long)]
        data_dir: PathBuf,
        /// The passphrase file the backup was sealed with, if it was.
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
    },
    /// Create a new envelope-signing key, listed by the root key beside the current one. Run it
    /// with the server stopped; at its next start the server re-signs every envelope with it.
    RotateSigningKey {
        #[arg(long, default_value = "./tenon-data")]
        data_dir: PathBuf,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("TENON_LOG").unwrap_or_else(|_| "info,sqlx=warn".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).init(),
        // Colour only for a person at a terminal: a log file or journal keeps plain text.
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

/// `serve --config FILE` (or `TENON_CONFIG`): every key of the TOML file is a `serve` flag's long
/// name (`data-dir` or `data_dir`); its value becomes that flag, placed before the command line's own
/// arguments, so that a flag given on the command line wins. Unknown keys are refused by name.
fn expand_config(args: Vec<OsString>) -> Result<Vec<OsString>, String> {
    if args.get(1).and_then(|a| a.to_str()) != Some("serve") {
        return Ok(args);
    }
    let mut file: Option<PathBuf> = None;
    let mut it = args.iter().skip(2);
    while let Some(a) = it.next() {
        match a.to_str() {
            Some("--config") => file = it.next().map(PathBuf::from),
            Some(s) if s.starts_with("--config=") => file = Some(PathBuf::from(&s["--config=".len()..])),
            _ => {}
        }
    }
    let file = match file.or_else(|| std::env::var_os("TENON_CONFIG").map(PathBuf::from)) {
        Some(f) => f,
        None => return Ok(args),
    };
    let text =
        std::fs::read_to_string(&file).map_err(|e| format!("cannot read the config file {}: {e}", file.display()))?;
    let table: toml::Table =
        text.parse().map_err(|e| format!("the config file {} is not valid TOML: {e}", file.display()))?;
    let cmd = <Cli as clap::CommandFactory>::command();
    let serve = cmd.find_subcommand("serve").ok_or("no serve command")?;
    let flags: Vec<(String, bool)> = serve
        .get_arguments()
        .filter_map(|a| {
            let takes_value = !matches!(a.get_action(), clap::ArgAction::SetTrue | clap::ArgAction::SetFalse);
            a.get_long().map(|l| (l.to_string(), takes_value))
        })
        .filter(|(l, _)| l != "config" && l != "help")
        .collect();
    let mut injected = Vec::new();
    for (key, value) in &table {
        let name = key.replace('_', "-");
        let Some((_, takes_value)) = flags.iter().find(|(l, _)| *l == name) else {
            let known: Vec<&str> = flags.iter().map(|(l, _)| l.as_str()).collect();
            return Err(format!(
                "the config file {} has an unknown key {key:?}; the keys are the serve flags: {}",
                file.display(),
                known.join(", ")
            ));
        };
        let values: Vec<String> = match value {
            toml::Value::String(s) => vec![s.clone()],
            toml::Value::Integer(i) => vec![i.to_string()],
            toml::Value::Float(f) => vec![f.to_string()],
            toml::Value::Boolean(b) if !takes_value => {
                if *b {
                    injected.push(OsString::from(format!("--{name}")));
                }
                continue;
            }
            toml::Value::Boolean(b) => vec![b.to_string()],
            toml::Value::Array(items) => items
                .iter()
                .map(|v| match v {
                    toml::Value::String(s) => Ok(s.clone()),
                    toml::Value::Integer(i) => Ok(i.to_string()),
                    other => {
                        Err(format!("{key} in {}: {} is not a string or a number", file.display(), other.type_str()))
                    }
                })
                .collect::<Result<_, _>>()?,
            other => {
                return Err(format!(
                    "{key} in {}: a {} is not a string, number or boolean",
                    file.display(),
                    other.type_str()
                ))
            }
        };
        if !takes_value {
            return Err(format!("{key} in {} is a switch: give it true or false", file.display()));
        }
        for v in values {
            injected.push(OsString::from(format!("--{name}")));
            injected.push(OsString::from(v));
        }
    }
    let mut out = args[..2].to_vec();
    out.extend(injected);
    out.extend(args[2..].iter().cloned());
    Ok(out)
}

/// HTTPS (README, "HTTPS"). Without TLS only loopback addresses may be served.
#[derive(clap::Args)]
struct TlsArgs {
    /// The organisation's certificate: a PEM chain, server certificate first (re-read on SIGHUP
    /// and when the file changes).
    #[arg(long, value_name = "FILE", requires = "tls_key", conflicts_with = "tls_self_signed")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Run a CA of the server's own in DATA_DIR/tls (its certificate: DATA_DIR/tls/ca.pem) and
    /// serve a certificate it issues, renewed before expiry. Enrollment tokens pin this CA.
    #[arg(long)]
    tls_self_signed: bool,
    /// Names of the self-signed server certificate (default: localhost, 127.0.0.1, the host name).
    #[arg(long, value_name = "NAME,...", value_delimiter = ',', requires = "tls_self_signed")]
    tls_names: Vec<String>,
    /// Serve plain HTTP on a non-loopback address (tokens and credentials cross the network readable).
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_self_signed"])]
    insecure_http: bool,
}

impl TlsArgs {
    fn source(&self) -> Option<tenon_server::tls::TlsSource> {
        use tenon_server::tls::TlsSource;
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(TlsSource::Files { cert: cert.clone(), key: key.clone() }),
            _ if self.tls_self_signed => Some(TlsSource::SelfSigned {
                names: if self.tls_names.is_empty() {
                    tenon_server::tls::default_names()
                } else {
                    self.tls_names.iter().map(|n| n.trim().to_string()).filter(|n| !n.is_empty()).collect()
                },
            }),
            _ => None,
        }
    }
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

/// The web portal (`/`): how long its sessions last and how often an address may try to sign in.
#[derive(clap::Args)]
struct PortalArgs {
    /// A portal session not used for this long ends (sign in again).
    #[arg(long, default_value = "30m", value_parser = parse_session_duration)]
    portal_session_idle: Duration,
    /// A portal session ends this long after sign-in, however much it is used.
    #[arg(long, default_value = "12h", value_parser = parse_session_duration)]
    portal_session_max: Duration,
    /// Portal sign-in attempts per source address: COUNT/DURATION or `off`.
    #[arg(long, default_value = "10/1m", value_parser = parse_rate)]
    portal_signin_rate: RateArg,
}

/// A session of at least a second (the store counts whole seconds) and at most 30 days.
fn parse_session_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e}; use a duration such as 30m or 12h"))?;
    if d < Duration::from_secs(1) || d > Duration::from_secs(30 * 24 * 3600) {
        return Err("must be between 1s and 30 days".into());
    }
    Ok(d)
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

/// mimalloc instead of the system allocator: with glibc's, freed directory and request memory
/// stayed in per-thread arenas and fragmented pages, so re-importing the same 100,000 users grew
/// the resident size by 70-140 % (`bench/import.sh`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args = match expand_config(std::env::args_os().collect()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS };
        }
    };
    init_logging(match &cli.command {
        Command::Serve { log_format, .. } => *log_format,
        _ => LogFormat::Text,
    });
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Serve {
            listen,
            data_dir,
            database,
            package_dir,
            envelope_ttl,
            limits,
            metrics_listen,
            log_format: _,
            config: _,
            tls,
            portal,
        } => {
            let opts = tenon_server::ServeOptions {
                database,
                package_dir,
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
                metrics_listen,
                tls: tls.source(),
                insecure_http: tls.insecure_http,
                portal: tenon_server::portal::PortalOptions {
                    session_idle: portal.portal_session_idle,
                    session_max: portal.portal_session_max,
                    signin_rate: portal.portal_signin_rate.0,
                },
                ..tenon_server::ServeOptions::new(listen, data_dir)
            };
            runtime.block_on(tenon_server::serve(opts))
        }
        Command::RotateEscrowKey { data_dir, database } => {
            runtime.block_on(tenon_server::rotate_escrow_key(&data_dir, database.as_deref()))
        }
        Command::Backup { data_dir, database, to, passphrase_file, package_dir, without_packages } => {
            let packages = (!without_packages).then(|| package_dir.unwrap_or_else(|| data_dir.join("packages")));
            runtime
                .block_on(tenon_server::backup::backup(
                    &data_dir,
                    database.as_deref(),
                    &to,
                    passphrase_file.as_deref(),
                    packages.as_deref(),
                    tenon_server::state::system_clock()(),
                ))
                .map(|s| {
                    println!(
                        "backup written to {} ({} bytes, {} files{}; {}); keep it where the server's keys may be",
                        s.path.display(),
                        s.bytes,
                        s.files,
                        if s.sealed { ", keys sealed with the passphrase" } else { ", keys NOT encrypted" },
                        match s.packages {
                            Some((n, bytes)) => format!("{n} package content files, {bytes} bytes"),
                            None => "package content left out (--without-packages)".into(),
                        }
                    )
                })
        }
        Command::Restore { from, data_dir, passphrase_file } => {
            tenon_server::backup::restore(&from, &data_dir, passphrase_file.as_deref()).map(|n| {
                println!(
                    "restored {n} files into {}; start the server with --data-dir {}",
                    data_dir.display(),
                    data_dir.display()
                )
            })
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
