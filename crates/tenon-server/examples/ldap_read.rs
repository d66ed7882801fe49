//! One read of an Active Directory domain through `directory::ldap`, printing counts and the time
//! it took (for bench/directory-ldap.sh and for trying a DC by hand). With `--cursor-in` the read is
//! a delta since that cursor; `--cursor-out` keeps the cursor the read returned.
//!
//!   cargo run --example ldap_read -- --url ldaps://dc1.example.com --base-dn DC=example,DC=com \
//!       --bind-dn CN=svc-tenon,OU=Service,DC=example,DC=com --password-file pw [--ca-file ca.pem]

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use tenon_core::dirsync::{SourceBatch, SyncProgress};
use tenon_server::directory::ldap::{self, LdapConfig};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    url: String,
    #[arg(long)]
    base_dn: String,
    #[arg(long)]
    bind_dn: Option<String>,
    #[arg(long)]
    password_file: Option<PathBuf>,
    #[arg(long)]
    ca_file: Option<PathBuf>,
    #[arg(long)]
    allow_plain_ldap: bool,
    #[arg(long)]
    cursor_in: Option<PathBuf>,
    #[arg(long)]
    cursor_out: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = LdapConfig {
        url: args.url,
        bind_dn: args.bind_dn,
        base_dn: args.base_dn,
        ca_pem: args.ca_file.map(std::fs::read).transpose().context("--ca-file")?,
        allow_plain_ldap: args.allow_plain_ldap,
    };
    let password = args.password_file.map(std::fs::read_to_string).transpose().context("--password-file")?;
    let password = password.as_deref().map(|p| p.trim_end_matches(['\r', '\n']));
    let cursor = args.cursor_in.map(std::fs::read_to_string).transpose().context("--cursor-in")?;
    let pages = std::sync::atomic::AtomicU64::new(0);
    let progress = |p: SyncProgress| pages.store(p.pages, std::sync::atomic::Ordering::Relaxed);
    let started = Instant::now();
    let batch = ldap::read(&config, password, cursor.as_deref(), &progress).await?;
    let elapsed = started.elapsed().as_secs_f64();
    let pages = pages.load(std::sync::atomic::Ordering::Relaxed);
    let cursor = match &batch {
        SourceBatch::Full { users, groups, cursor, .. } => {
            println!("full read: {} users, {} groups, {pages} pages in {elapsed:.2} s", users.len(), groups.len());
            cursor
        }
        SourceBatch::Delta { users_changed, users_removed, groups_changed, groups_removed, cursor, .. } => {
            println!(
                "delta read: {} users changed, {} removed, {} groups changed, {} removed, {pages} pages in {elapsed:.2} s",
                users_changed.len(),
                users_removed.len(),
                groups_changed.len(),
                groups_removed.len()
            );
            cursor
        }
    };
    if let (Some(path), Some(cursor)) = (args.cursor_out, cursor) {
        std::fs::write(path, cursor).context("--cursor-out")?;
    }
    Ok(())
}
