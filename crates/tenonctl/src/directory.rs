//! `tenonctl directory ...`: directory sources (Microsoft Graph, Active Directory over LDAP)
//! added, listed, synced now with progress, and removed.

use crate::table::{print_json, print_table, visible};
use crate::{parse_duration, urlencode, usage, Client};
use anyhow::{bail, Context};
use clap::Subcommand;
use serde_json::{json, Value};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Subcommand)]
pub enum DirectoryCmd {
    /// Add a source (the server reads it at once, then on its interval).
    #[command(subcommand)]
    Add(AddCmd),
    /// The sources and what they read.
    List,
    /// Per source: last success, last error, users, groups, held deletions, next run.
    Status,
    /// Read a source now, showing progress; exits 1 when the sync fails.
    Sync {
        name: String,
        /// Apply the removals the deletion guard holds (more than 10% or 20 of the source's users).
        #[arg(long)]
        accept_deletions: bool,
    },
    /// Remove a source and the users it owns (their devices are re-signed without their directory data).
    Remove { name: String },
}

#[derive(Subcommand)]
pub enum AddCmd {
    /// Microsoft Graph (Entra ID): an app registration with the application permissions
    /// User.Read.All, GroupMember.Read.All and Domain.Read.All, admin-consented.
    Graph {
        name: String,
        #[arg(long, value_name = "T")]
        tenant_id: String,
        #[arg(long, value_name = "C")]
        client_id: String,
        /// A file holding the client secret (readable by you only; never passed on the command line).
        #[arg(long, value_name = "F")]
        client_secret_file: PathBuf,
        #[arg(long, value_name = "URL", default_value = "https://login.microsoftonline.com")]
        authority: String,
        #[arg(long, value_name = "URL", default_value = "https://graph.microsoft.com")]
        graph_url: String,
        #[arg(long, value_parser = parse_duration, value_name = "DUR", default_value = "15m")]
        interval: Duration,
        /// Change the settings of an existing source of that name (keeps what it read).
        #[arg(long)]
        replace: bool,
    },
    /// Active Directory over LDAP (LDAPS, or StartTLS with --allow-plain-ldap).
    Ldap {
        name: String,
        /// ldaps://dc1.contoso.com (or ldap://... with --allow-plain-ldap).
        #[arg(long, value_name = "URL")]
        url: String,
        /// The account to bind as (simple bind), such as CN=tenon-sync,OU=Service,DC=contoso,DC=com.
        #[arg(long, value_name = "DN", requires = "password_file")]
        bind_dn: Option<String>,
        /// A file holding the bind account's password.
        #[arg(long, value_name = "F", requires = "bind_dn")]
        password_file: Option<PathBuf>,
        #[arg(long, value_name = "DN")]
        base_dn: String,
        /// The CA (PEM) that issued the domain controllers' certificates, if not a system root.
        #[arg(long, value_name = "F")]
        ca_file: Option<PathBuf>,
        /// Allow ldap://: StartTLS when offered, else the password crosses the network in clear.
        #[arg(long)]
        allow_plain_ldap: bool,
        #[arg(long, value_parser = parse_duration, value_name = "DUR", default_value = "15m")]
        interval: Duration,
        /// Change the settings of an existing source of that name (keeps what it read).
        #[arg(long)]
        replace: bool,
    },
}

/// A secret file: its first line. Refused when others may read it (on Unix), so a secret left
/// world-readable is noticed before it is stored.
fn read_secret(path: &Path, flag: &str) -> anyhow::Result<String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| usage(format!("cannot read {flag} {}: {e}", path.display())))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path) {
            if meta.permissions().mode() & 0o077 != 0 {
                eprintln!(
                    "warning: {} is readable by other users; `chmod 600 {}` keeps the secret yours",
                    path.display(),
                    path.display()
                );
            }
        }
    }
    let secret = text.lines().next().unwrap_or_default().trim_end().to_string();
    if secret.is_empty() {
        bail!(usage(format!("{flag} {} is empty; put the secret on its first line", path.display())));
    }
    Ok(secret)
}

pub fn run(c: &Client, json_out: bool, wait: bool, cmd: DirectoryCmd) -> anyhow::Result<()> {
    match cmd {
        DirectoryCmd::Add(add) => {
            let (body, replace) = match add {
                AddCmd::Graph {
                    name,
                    tenant_id,
                    client_id,
                    client_secret_file,
                    authority,
                    graph_url,
                    interval,
                    replace,
                } => (
                    json!({
                        "name": name, "kind": "graph", "tenant_id": tenant_id, "client_id": client_id,
                        "authority": authority.trim_end_matches('/'), "graph_url": graph_url.trim_end_matches('/'),
                        "secret": read_secret(&client_secret_file, "--client-secret-file")?,
                        "interval_secs": interval.as_secs(),
                    }),
                    replace,
                ),
                AddCmd::Ldap {
                    name,
                    url,
                    bind_dn,
                    password_file,
                    base_dn,
                    ca_file,
                    allow_plain_ldap,
                    interval,
                    replace,
                } => {
                    let ca_pem = match &ca_file {
                        Some(f) => Some(
                            std::fs::read_to_string(f)
                                .map_err(|e| usage(format!("cannot read --ca-file {}: {e}", f.display())))?,
                        ),
                        None => None,
                    };
                    let secret = match &password_file {
                        Some(f) => Some(read_secret(f, "--password-file")?),
                        None => None,
                    };
                    (
                        json!({
                            "name": name, "kind": "ldap", "url": url, "bind_dn": bind_dn, "base_dn": base_dn,
                            "ca_pem": ca_pem, "allow_plain_ldap": allow_plain_ldap, "secret": secret,
                            "interval_secs": interval.as_secs(),
                        }),
                        replace,
                    )
                }
            };
            let v = c.call("POST", &format!("/directory/sources?replace={replace}"), Some(&body))?;
            if json_out {
                print_json(&v);
            } else {
                println!(
                    "{} source {} {}; the server reads it now and every {} (`tenonctl directory status`)",
                    v["kind"].as_str().unwrap_or("?"),
                    v["name"].as_str().unwrap_or("?"),
                    if replace { "changed" } else { "added" },
                    humantime::format_duration(Duration::from_secs(v["interval_secs"].as_u64().unwrap_or(0)))
                );
            }
        }
        DirectoryCmd::List => {
            let mut v = c.call("GET", "/directory/sources", None)?;
            if !json_out {
                for s in v.as_array_mut().into_iter().flatten() {
                    let cfg = &s["config"];
                    s["where"] = json!(cfg["graph_url"]
                        .as_str()
                        .map(|g| format!("{g} (tenant {})", cfg["tenant_id"].as_str().unwrap_or("?")))
                        .or_else(|| cfg["url"]
                            .as_str()
                            .map(|u| format!("{u} {}", cfg["base_dn"].as_str().unwrap_or_default())))
                        .unwrap_or_default());
                    s["every"] = json!(s["interval_secs"]
                        .as_u64()
                        .map(|i| humantime::format_duration(Duration::from_secs(i)).to_string()));
                }
            }
            print_table(json_out, &v, &[("NAME", "name"), ("KIND", "kind"), ("READS", "where"), ("EVERY", "every")]);
        }
        DirectoryCmd::Status => {
            let v = c.call("GET", "/directory/status", None)?;
            if json_out {
                print_json(&v);
            } else {
                print_table(
                    false,
                    &v,
                    &[
                        ("NAME", "name"),
                        ("KIND", "kind"),
                        ("USERS", "users"),
                        ("GROUPS", "groups"),
                        ("LAST SUCCESS", "last_success"),
                        ("HELD", "held_deletions"),
                        ("NEXT RUN", "next_run"),
                    ],
                );
                for s in v.as_array().into_iter().flatten() {
                    let name = s["name"].as_str().unwrap_or("?");
                    if let Some(e) = s["last_error"].as_str() {
                        println!("{name}: last error: {}", visible(e));
                    }
                    if s["held_deletions"].as_u64().unwrap_or(0) > 0 {
                        println!(
                            "{name}: {} user removals held; check the directory, then `tenonctl directory sync {name} --accept-deletions`",
                            s["held_deletions"]
                        );
                    }
                    let collisions = s["collisions"].as_array().map_or(0, Vec::len);
                    if collisions > 0 {
                        let first = &s["collisions"][0];
                        println!(
                            "{name}: {collisions} UPN(s) also in an earlier source, which keeps them (e.g. {} owned by {})",
                            visible(first["upn"].as_str().unwrap_or("?")),
                            first["owner"].as_str().unwrap_or("?")
                        );
                    }
                    if let Some(n) = s["skipped_without_upn"].as_u64().filter(|n| *n > 0) {
                        println!("{name}: {n} user(s) without a userPrincipalName skipped");
                    }
                }
            }
        }
        DirectoryCmd::Sync { name, accept_deletions } => {
            let path = format!("/directory/sources/{}/sync?accept_deletions={accept_deletions}", urlencode(&name));
            // A large directory takes a while: the answer streams a line per page read.
            let resp = c.request("POST", &path).timeout(Duration::from_secs(6 * 3600)).call();
            let resp = match resp {
                Ok(r) => r,
                Err(e) => {
                    c.answer(Err(e))?;
                    bail!("the server refused the sync");
                }
            };
            let mut end: Option<Value> = None;
            for line in std::io::BufReader::new(resp.into_reader()).lines() {
                let line =
                    line.context("the sync's answer broke off; `tenonctl directory status` shows how it ended")?;
                let Ok(v) = serde_json::from_str::<Value>(&line) else { continue };
                if let Some(p) = v.get("progress") {
                    eprintln!(
                        "{name}: {} pages read, {} users and {} groups seen",
                        p["pages"], p["users"], p["groups"]
                    );
                } else if let Some(w) = v.get("waiting").and_then(Value::as_str) {
                    eprintln!("{name}: {}", visible(w));
                } else if v.get("result").is_some() || v.get("error").is_some() {
                    end = Some(v);
                }
            }
            let Some(end) = end else {
                bail!("the sync's answer ended without a result; `tenonctl directory status` shows how it ended");
            };
            if let Some(err) = end.get("error") {
                if json_out {
                    print_json(&end);
                }
                bail!(
                    "sync of {name} failed ({}): {}",
                    err["kind"].as_str().unwrap_or("other"),
                    visible(err["message"].as_str().unwrap_or("?"))
                );
            }
            let mut r = end["result"].clone();
            if r["resign_generation"].is_u64() {
                // The sync's answer does not wait for the re-signing it queued: --wait follows it.
                r["resign_complete"] = json!(false);
                c.settle(&mut r, wait)?;
            }
            if json_out {
                print_json(&r);
            } else {
                println!(
                    "{name}: {} read in {:.1} s: {} users, {} groups; {} users changed, {} removed; {} devices re-signed",
                    r["read"].as_str().unwrap_or("?"),
                    r["seconds"].as_f64().unwrap_or(0.0),
                    r["users"],
                    r["groups"],
                    r["users_changed"],
                    r["users_removed"],
                    r["devices_resigned"]
                );
                if r["held_deletions"].as_u64().unwrap_or(0) > 0 {
                    println!(
                        "held: {} user removals wait for `tenonctl directory sync {name} --accept-deletions` (more than 10% or 20 of the source's users)",
                        r["held_deletions"]
                    );
                }
            }
        }
        DirectoryCmd::Remove { name } => {
            let v = c.call("DELETE", &format!("/directory/sources/{}", urlencode(&name)), None)?;
            if json_out {
                print_json(&v);
            } else {
                println!("removed {name}: {} users removed, {} devices re-signed", v["users_removed"], v["devices"]);
            }
        }
    }
    Ok(())
}
