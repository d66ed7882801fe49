//! tenon-server command line: `tenon-server serve [--listen ADDR] [--data-dir DIR] [--database URL]`
//! and `tenon-server rotate-escrow-key [--data-dir DIR]`.

use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

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
        // Colour codes only for a person at a terminal, never in a log file or a pipe.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Serve { listen, data_dir, database, envelope_ttl } => {
            let opts = tenon_server::ServeOptions { listen, data_dir, database, envelope_ttl: envelope_ttl as i64 };
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
