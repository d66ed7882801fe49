//! tenon-server command line: `tenon-server serve [--listen ADDR] [--data-dir DIR] [--database URL]`
//! and the offline tools: `rotate-escrow-key`, `rotate-signing-key`, `backup`, `restore`.

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
    /// Write one archive (mode 0600) with the database, the root, signing and escrow keys, the
    /// admin token and the TLS directory. Safe while the server serves: the database is copied as
    /// one consistent snapshot.
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
        Command::Serve { listen, data_dir, database, envelope_ttl } => {
            let opts = tenon_server::ServeOptions { listen, data_dir, database, envelope_ttl: envelope_ttl as i64 };
            runtime.block_on(tenon_server::serve(opts))
        }
        Command::RotateEscrowKey { data_dir, database } => {
            runtime.block_on(tenon_server::rotate_escrow_key(&data_dir, database.as_deref()))
        }
        Command::Backup { data_dir, database, to, passphrase_file } => runtime
            .block_on(tenon_server::backup::backup(
                &data_dir,
                database.as_deref(),
                &to,
                passphrase_file.as_deref(),
                tenon_server::state::system_clock()(),
            ))
            .map(|s| {
                println!(
                    "backup written to {} ({} bytes, {} files{}); keep it where the server's keys may be",
                    s.path.display(),
                    s.bytes,
                    s.files,
                    if s.sealed { ", keys sealed with the passphrase" } else { ", keys NOT encrypted" }
                )
            }),
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
