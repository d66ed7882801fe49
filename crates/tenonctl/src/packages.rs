//! `tenonctl packages ...`: upload (streamed, with progress), list, show, remove, assign,
//! unassign, status.

use crate::table::{cell, print_json, print_table};
use crate::{resigned_text, urlencode, usage, Client};
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use std::io::Read;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Subcommand)]
pub enum PackagesCmd {
    /// Upload an installer (a new version of NAME replaces the previous one; devices upgrade at
    /// their next check-in). An MSI's ProductCode, ProductVersion and ProductName are read from
    /// it, and its detection rule defaults to its ProductCode.
    Upload {
        file: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        version: String,
        /// msi, exe or script (.ps1, .cmd, .bat); default: from the file's extension.
        #[arg(long)]
        kind: Option<String>,
        /// Appended to the install command (msiexec /i FILE /qn /norestart /l*v LOG ARGS).
        #[arg(long, allow_hyphen_values = true, value_name = "ARGS")]
        install_args: Option<String>,
        /// The uninstall command's arguments (MSI: appended to msiexec /x {ProductCode} /qn /norestart).
        #[arg(long, allow_hyphen_values = true, value_name = "ARGS")]
        uninstall_args: Option<String>,
        /// How the agent tells it is installed: msi:{PRODUCT-CODE}, file:C:\path[>=VERSION] or
        /// registry:HKLM\PATH:NAME[=VALUE|>=VERSION] (suffix @32 for the 32-bit view).
        #[arg(long, value_name = "RULE")]
        detect: Option<String>,
        /// A package that must be installed first (repeatable).
        #[arg(long = "depends-on", value_name = "NAME")]
        depends_on: Vec<String>,
        /// Lower installs first (after dependencies).
        #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
        order: i64,
        /// The installer is stopped (its whole process tree) after this long.
        #[arg(long, value_parser = crate::parse_duration, value_name = "DUR")]
        timeout: Option<Duration>,
    },
    /// The uploaded packages.
    List,
    /// One package: content, detection, dependencies, assignments.
    Show { name: String },
    /// Remove a package and its content (refused while it is assigned).
    Remove { name: String },
    /// Assign a package to the tenant, a group or a user.
    Assign {
        name: String,
        #[command(flatten)]
        target: TargetArgs,
        /// required (mandatory), available (on request) or uninstall.
        #[arg(long, default_value = "required")]
        intent: String,
        /// Who must be signed in for a required package to install: primary, secondary or both.
        #[arg(long, default_value = "primary")]
        users: String,
    },
    /// Remove one assignment.
    Unassign {
        name: String,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// The package's state on every device whose plan holds it, with counts by state.
    Status { name: String },
}

#[derive(Args)]
#[group(required = true, multiple = false)]
pub struct TargetArgs {
    #[arg(long)]
    tenant: bool,
    #[arg(long, value_name = "G")]
    group: Option<String>,
    #[arg(long, value_name = "UPN")]
    user: Option<String>,
}

impl TargetArgs {
    fn json(&self) -> Value {
        match (&self.group, &self.user) {
            (Some(g), _) => json!({"kind": "group", "name": g}),
            (_, Some(u)) => json!({"kind": "user", "name": u}),
            _ => json!({"kind": "tenant"}),
        }
    }
}

/// Reads the file in chunks for the upload, showing progress on stderr.
struct Progress<R> {
    inner: R,
    sent: u64,
    total: u64,
    started: Instant,
    last: Instant,
    tty: bool,
}

impl<R: Read> Read for Progress<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sent += n as u64;
        let every = if self.tty { Duration::from_millis(200) } else { Duration::from_secs(5) };
        if self.last.elapsed() >= every || (n == 0 && self.sent == self.total) {
            self.last = Instant::now();
            let secs = self.started.elapsed().as_secs_f64().max(0.001);
            let line = format!(
                "uploading: {:.1} of {:.1} MiB ({:.0}%), {:.1} MiB/s",
                self.sent as f64 / 1048576.0,
                self.total as f64 / 1048576.0,
                self.sent as f64 * 100.0 / self.total.max(1) as f64,
                self.sent as f64 / secs / 1048576.0
            );
            if self.tty {
                eprint!("\r\x1b[K{line}");
            } else {
                eprintln!("{line}");
            }
        }
        Ok(n)
    }
}

fn target_text(t: &Value) -> String {
    match t["kind"].as_str() {
        Some("group") => format!("group {}", cell(&t["name"])),
        Some("user") => format!("user {}", cell(&t["name"])),
        _ => "tenant".into(),
    }
}

pub fn run(c: &Client, json_out: bool, wait: bool, cmd: PackagesCmd) -> anyhow::Result<()> {
    match cmd {
        PackagesCmd::Upload {
            file,
            name,
            version,
            kind,
            install_args,
            uninstall_args,
            detect,
            depends_on,
            order,
            timeout,
        } => {
            let f = std::fs::File::open(&file)
                .map_err(|e| usage(format!("cannot read {}: {e}; give the installer's path", file.display())))?;
            let size = f.metadata().map(|m| m.len()).unwrap_or(0);
            if size == 0 {
                return Err(usage(format!("{} is empty; give the installer file", file.display())));
            }
            let file_name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let meta = json!({
                "name": name, "version": version, "file_name": file_name, "kind": kind,
                "install_args": install_args.unwrap_or_default(), "uninstall_args": uninstall_args.unwrap_or_default(),
                "detect": detect, "depends_on": depends_on, "order": order,
                "timeout_secs": timeout.map(|t| t.as_secs().max(1)),
            });
            // Checked first: a refusal sent while the body is still streaming would be lost.
            c.call("POST", "/packages/check", Some(&meta))?;
            use std::io::IsTerminal;
            let tty = std::io::stderr().is_terminal();
            let reader = Progress {
                inner: std::io::BufReader::with_capacity(1 << 20, f),
                sent: 0,
                total: size,
                started: Instant::now(),
                last: Instant::now(),
                tty,
            };
            let req = c
                .request("POST", &format!("/packages?meta={}", urlencode(&meta.to_string())))
                .set("Content-Type", "application/octet-stream")
                .set("Content-Length", &size.to_string())
                // A large installer over a slow link: no overall limit, the server's own body
                // timeout catches a stalled upload.
                .timeout(Duration::from_secs(24 * 3600));
            let started = Instant::now();
            let result = c.answer(req.send(reader));
            if tty {
                eprint!("\r\x1b[K");
            }
            let mut v = result?;
            eprintln!("uploaded {:.1} MiB in {:.1} s", size as f64 / 1048576.0, started.elapsed().as_secs_f64());
            c.settle(&mut v, wait)?;
            if json_out {
                print_json(&v);
            } else {
                println!(
                    "package {} {} {} ({} bytes, sha256 {}, detect {}); {}",
                    cell(&v["name"]),
                    cell(&v["version"]),
                    if v["created"] == json!(true) { "uploaded" } else { "replaces the previous version" },
                    v["size"],
                    cell(&v["sha256"]),
                    cell(&v["detect"]),
                    resigned_text(&v)
                );
                if let Some(m) = v["msi"].as_object() {
                    println!(
                        "MSI: {} {} {}",
                        cell(&m["product_name"]),
                        cell(&m["product_version"]),
                        cell(&m["product_code"])
                    );
                }
            }
        }
        PackagesCmd::List => {
            let v = c.call("GET", "/packages", None)?;
            let rows: Vec<Value> = v
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| {
                    let targets: Vec<String> = p["assignments"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|a| format!("{} {}", target_text(&a["target"]), cell(&a["intent"])))
                        .collect();
                    json!({"name": p["name"], "version": p["version"], "kind": p["kind"], "size": p["size"],
                           "detect": p["detect"], "assigned": if targets.is_empty() { "-".to_string() } else { targets.join(", ") }})
                })
                .collect();
            if json_out {
                print_json(&v);
            } else {
                print_table(
                    false,
                    &Value::Array(rows),
                    &[
                        ("NAME", "name"),
                        ("VERSION", "version"),
                        ("KIND", "kind"),
                        ("SIZE", "size"),
                        ("DETECT", "detect"),
                        ("ASSIGNED", "assigned"),
                    ],
                );
            }
        }
        PackagesCmd::Show { name } => {
            let v = c.call("GET", &format!("/packages/{}", urlencode(&name)), None)?;
            if json_out {
                print_json(&v);
            } else {
                for k in [
                    "name",
                    "version",
                    "kind",
                    "file_name",
                    "size",
                    "sha256",
                    "detect",
                    "install_args",
                    "uninstall_args",
                    "depends_on",
                    "order",
                    "timeout_secs",
                    "uploaded_at",
                    "uploaded_by",
                    "content_present",
                ] {
                    println!("{k:<16} {}", cell(&v[k]));
                }
                if let Some(m) = v["msi"].as_object() {
                    println!(
                        "{:<16} {} {} {}",
                        "msi",
                        cell(&m["product_name"]),
                        cell(&m["product_version"]),
                        cell(&m["product_code"])
                    );
                }
                for a in v["assignments"].as_array().into_iter().flatten() {
                    println!(
                        "{:<16} {} intent {} users {}",
                        "assigned",
                        target_text(&a["target"]),
                        cell(&a["intent"]),
                        cell(&a["users"])
                    );
                }
            }
        }
        PackagesCmd::Remove { name } => {
            let v = c.call("DELETE", &format!("/packages/{}", urlencode(&name)), None)?;
            if json_out {
                print_json(&v);
            } else {
                println!("package {} removed with its content", cell(&v["name"]));
            }
        }
        PackagesCmd::Assign { name, target, intent, users } => {
            let body = json!({"target": target.json(), "intent": intent.trim().to_ascii_lowercase(),
                              "users": users.trim().to_ascii_lowercase()});
            let mut v = c.call("POST", &format!("/packages/{}/assign", urlencode(&name)), Some(&body))?;
            c.settle(&mut v, wait)?;
            if json_out {
                print_json(&v);
            } else {
                println!(
                    "package {} assigned to {} ({}, users {}; {} devices); {}",
                    cell(&v["name"]),
                    target_text(&v["target"]),
                    cell(&v["intent"]),
                    cell(&v["users"]),
                    v["devices"],
                    resigned_text(&v)
                );
            }
        }
        PackagesCmd::Unassign { name, target } => {
            let body = json!({"target": target.json()});
            let mut v = c.call("POST", &format!("/packages/{}/unassign", urlencode(&name)), Some(&body))?;
            c.settle(&mut v, wait)?;
            if json_out {
                print_json(&v);
            } else {
                println!(
                    "package {} unassigned from {} ({} devices); {}",
                    cell(&v["name"]),
                    target_text(&v["target"]),
                    v["devices"],
                    resigned_text(&v)
                );
            }
        }
        PackagesCmd::Status { name } => {
            let v = c.call("GET", &format!("/packages/{}/status", urlencode(&name)), None)?;
            if json_out {
                print_json(&v);
            } else {
                let counts: Vec<String> =
                    v["counts"].as_object().into_iter().flatten().map(|(k, n)| format!("{k} {n}")).collect();
                println!(
                    "package {} {}: {}",
                    cell(&v["name"]),
                    cell(&v["version"]),
                    if counts.is_empty() { "on no device".to_string() } else { counts.join(", ") }
                );
                print_table(
                    false,
                    &v["devices"],
                    &[("DEVICE", "device_id"), ("STATE", "state"), ("EXIT", "exit_code"), ("DETAIL", "detail")],
                );
            }
        }
    }
    Ok(())
}
