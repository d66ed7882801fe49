//! tenonctl: the administrator's command line for a Tenon server.
//!
//! `tenonctl --server URL (--token-file FILE | --token TOKEN) [--json] COMMAND` (or `TENON_SERVER`,
//! `TENON_TOKEN_FILE`, `TENON_TOKEN`).
//! Every read prints a table for people, or JSON with `--json`. Errors are one line on stderr;
//! exit codes: 0 ok, 1 failure, 2 usage.

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tenon_core::api::{Problem, SettingScope};
use tenon_core::ids::{DeviceId, GroupName};
use tenon_core::policy::signatures::DefaultUse;
use tenon_core::policy::state::common_state;

mod directory;
mod packages;
mod signature_files;
mod table;

use table::{cell, print_json, print_table};

#[derive(Parser)]
#[command(name = "tenonctl", version, about = "Administer a Tenon server")]
struct Cli {
    /// Server URL, such as http://127.0.0.1:8440.
    #[arg(long, env = "TENON_SERVER", default_value = "http://127.0.0.1:8440", global = true)]
    server: String,
    /// Admin token. Prefer --token-file: a token on the command line is visible in the process list.
    #[arg(long, env = "TENON_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// A file holding the admin token, such as DATA_DIR/admin.token (the bootstrap one). Wins over
    /// --token and TENON_TOKEN.
    #[arg(long, env = "TENON_TOKEN_FILE", global = true, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Trust the server's certificate if this CA issued it (PEM), such as DATA_DIR/tls/ca.pem of a
    /// server started with --tls-self-signed. Without it: the system roots.
    #[arg(long, env = "TENON_CA_FILE", global = true, value_name = "FILE")]
    ca_file: Option<PathBuf>,
    /// On the server machine: the server's data dir, for its CA (DATA_DIR/tls/ca.pem) and, when no
    /// token is given, the bootstrap admin token (DATA_DIR/admin.token).
    #[arg(long, env = "TENON_DATA_DIR", global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// After a change, wait until every device it reaches is re-signed (progress on stderr).
    /// Without it a change that reaches many devices answers at once and re-signs in the
    /// background (`tenonctl resign status`).
    #[arg(long, global = true)]
    wait: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Enrollment tokens.
    #[command(name = "enroll-token", subcommand)]
    EnrollToken(EnrollTokenCmd),
    /// The local directory.
    #[command(subcommand)]
    Users(UsersCmd),
    /// Settings at tenant, group and user scope.
    #[command(subcommand)]
    Settings(SettingsCmd),
    /// Directory groups.
    #[command(subcommand)]
    Groups(GroupsCmd),
    /// Enrolled devices.
    #[command(subcommand)]
    Devices(DevicesCmd),
    /// The audit log.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Delivery Optimization peer groups.
    #[command(subcommand)]
    Networks(NetworksCmd),
    /// BitLocker recovery keys escrowed by devices (needs the recovery-keys role; every read is
    /// audited and makes the device rotate the keys it returned).
    #[command(name = "recovery-keys", subcommand)]
    RecoveryKeys(RecoveryKeysCmd),
    /// Background re-signing of the devices a change reached.
    #[command(subcommand)]
    Resign(ResignCmd),
    /// The server answering: its store, and its part among the servers of one database.
    #[command(subcommand)]
    Server(ServerCmd),
    /// Admin tokens and their roles.
    #[command(name = "admin-tokens", subcommand)]
    AdminTokens(AdminTokensCmd),
    /// Outlook signature templates.
    #[command(subcommand)]
    Signatures(SignaturesCmd),
    /// Software packages: upload, assign, follow their state on the devices.
    #[command(subcommand)]
    Packages(packages::PackagesCmd),
    /// Directory sources: users and groups from Microsoft Graph (Entra ID) or Active Directory.
    #[command(subcommand)]
    Directory(directory::DirectoryCmd),
}

#[derive(Subcommand)]
enum RecoveryKeysCmd {
    /// The current recovery password of each protector of a device.
    Show {
        device_id: String,
        /// Also the superseded keys kept in the archive.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Subcommand)]
enum AdminTokensCmd {
    /// Create an admin token; prints the token alone (or JSON with --json).
    #[command(long_about = "Create an admin token; prints the token alone (or JSON with --json).\n\n\
Roles:\n  \
admin          everything except reading recovery keys\n  \
recovery-keys  read BitLocker recovery keys; each read is audited and makes the device rotate the key\n\n\
A token may grant only roles it holds itself: creating a token needs admin, and creating a token\n\
with recovery-keys needs a token that has both. The bootstrap token (DATA_DIR/admin.token) has both.")]
    Create {
        name: String,
        /// A role: admin (everything but reading recovery keys) or recovery-keys (reading them;
        /// audited; the device rotates the key). Repeat for both.
        #[arg(long = "role", required = true, value_parser = ["admin", "recovery-keys"])]
        roles: Vec<String>,
    },
    /// List admin tokens (names, roles, created, revoked; never the secrets).
    List,
    /// Revoke an admin token by its id (the middle part of tadm.ID.SECRET).
    Revoke { id: String },
}

#[derive(Subcommand)]
enum EnrollTokenCmd {
    /// Create a token; prints the token alone (or JSON with --json).
    Create {
        /// How many devices may enroll with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// How long it is valid, such as 24h or 7d.
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        ttl: Duration,
        /// With an organisation's certificate: agents trust only the top CA of the server's chain
        /// file instead of their system roots. (With --tls-self-signed the server's CA is always pinned.)
        #[arg(long)]
        pin_ca: bool,
    },
    /// List enrollment tokens: id, state (active, expired, used_up, revoked), uses left, expiry.
    /// Never the secrets.
    List,
    /// Revoke a token by its id (the part after `tenr.`); devices enrolled with it stay enrolled.
    Revoke { id: String },
}

#[derive(Subcommand)]
enum UsersCmd {
    /// Import a JSON array of Graph-shaped users (each with userPrincipalName, optional groups: [names]).
    Import { file: PathBuf },
    /// List users.
    List,
    /// Remove a user, their user-scope settings and group memberships. Their devices are
    /// re-signed and keep their last configuration until their next sync. A user who is a
    /// device's primary user is refused unless --force, which clears it.
    Remove {
        upn: String,
        #[arg(long)]
        force: bool,
    },
}

#[derive(Args, Clone)]
#[group(required = true, multiple = false)]
struct ScopeArgs {
    /// Tenant-wide default.
    #[arg(long)]
    tenant: bool,
    /// A group by name ("All Users" is everyone).
    #[arg(long)]
    group: Option<String>,
    /// A user by UPN.
    #[arg(long)]
    user: Option<String>,
}

impl ScopeArgs {
    fn scope(&self) -> SettingScope {
        match (&self.group, &self.user) {
            (Some(g), _) => SettingScope::Group(g.clone()),
            (_, Some(u)) => SettingScope::User(u.clone()),
            _ => SettingScope::Tenant,
        }
    }
}

#[derive(Subcommand)]
enum SettingsCmd {
    /// Set KEY to a JSON value (or the word undefined, to delete it at this scope).
    Set {
        #[command(flatten)]
        scope: ScopeArgs,
        key: String,
        value: String,
    },
    /// Remove KEY from this scope (the weaker scopes' value applies again).
    Unset {
        #[command(flatten)]
        scope: ScopeArgs,
        key: String,
    },
    /// Every key Tenon understands: type, default, scope, delivery, description (needs no server).
    Keys {
        /// docs/settings.md as generated from the schema.
        #[arg(long, conflicts_with = "json")]
        markdown: bool,
    },
    /// List settings (all scopes, or one).
    List {
        #[arg(long)]
        tenant: bool,
        #[arg(long)]
        group: Option<String>,
        #[arg(long)]
        user: Option<String>,
    },
}

#[derive(Subcommand)]
enum GroupsCmd {
    /// Set a group's priority: when a user is in several groups, the higher priority wins.
    SetPriority { name: String, priority: i64 },
}

#[derive(Subcommand)]
enum DevicesCmd {
    /// List devices.
    List {
        /// Only devices without a primary user.
        #[arg(long)]
        without_primary: bool,
        /// Only devices whose primary user is not the user signed in most often.
        #[arg(long)]
        primary_mismatch: bool,
        /// Include decommissioned devices.
        #[arg(long)]
        all: bool,
        /// At most N devices (a page); the next page starts with --after the last id shown.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=10000))]
        limit: Option<u32>,
        /// Start after this device id (the last one of the previous page).
        #[arg(long, value_name = "ID")]
        after: Option<String>,
    },
    /// Show one device, by id or by its (unique) host name.
    Show { id: String },
    /// The configuration the device currently gets (version, hash and payload).
    Config { id: String },
    /// Report history of one device.
    Reports {
        id: String,
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Make UPN the device's primary user (or clear it with --clear).
    SetPrimary {
        id: String,
        #[arg(required_unless_present = "clear")]
        upn: Option<String>,
        #[arg(long, conflicts_with = "upn")]
        clear: bool,
    },
    /// Revoke the device's credential and clear its primary user; history is kept.
    Decommission { id: String },
    /// Install an available package now, or try a failed one again (at the device's next
    /// check-in).
    Install { id: String, package: String },
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Newest entries first.
    List {
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

#[derive(Subcommand)]
enum NetworksCmd {
    /// Each peer group with its gateway MAC, device count and last seen.
    List,
}

#[derive(Subcommand)]
enum SignaturesCmd {
    /// Create or replace a template. Images the HTML references (`src=` or `background=`, relative
    /// to the HTML file's folder) are uploaded with it. Placeholders such as
    /// {{Graph_User_DisplayName}} are filled per user from the directory.
    Set {
        /// Template name; the files on the devices are NAME.htm, NAME.txt and NAME.rtf.
        name: String,
        /// The HTML template (UTF-8, UTF-16 with BOM, or Windows-1252 as Word saves it).
        #[arg(long)]
        html: PathBuf,
        /// A text version; without it the text is derived from the HTML.
        #[arg(long)]
        txt: Option<PathBuf>,
        /// Make it Outlook's default for new mail, replies, or both; `none` clears it. Without
        /// this option an existing template keeps its default and a new one has none.
        #[arg(long, value_name = "new|reply|both|none")]
        default: Option<String>,
        /// A group whose members get it (repeatable). Without it an existing template keeps its
        /// groups and a new one goes to "All Users" (everyone).
        #[arg(long = "group", value_name = "NAME")]
        groups: Vec<String>,
    },
    /// List templates: groups, default, images.
    List {
        /// Include the HTML and text of each template (with --json).
        #[arg(long)]
        full: bool,
    },
    /// Remove a template; devices delete the files Tenon wrote for it at their next sync.
    Remove { name: String },
}

#[derive(Subcommand)]
enum ServerCmd {
    /// Which server answered, its store, whether its database answers, whether it runs the
    /// database-wide jobs, and the last change of other servers it applied.
    Status,
}

#[derive(Subcommand)]
enum ResignCmd {
    /// How far re-signing is: devices queued, done of the run in hand, generations.
    Status,
}

pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e}; use a duration such as 24h or 7d"))
}

pub(crate) struct Client {
    base: String,
    token: String,
    http: ureq::Agent,
}

impl Client {
    fn new(
        server: &str,
        token: Option<String>,
        token_file: Option<&std::path::Path>,
        ca_file: Option<&std::path::Path>,
    ) -> anyhow::Result<Self> {
        check_server_url(server)?;
        let token = match token_file {
            Some(f) => Some(std::fs::read_to_string(f).map_err(|e| {
                usage(format!(
                    "cannot read the token file {}: {e}; check --token-file (or TENON_TOKEN_FILE)",
                    f.display()
                ))
            })?),
            None => token,
        };
        let token = token
            .filter(|t| !t.trim().is_empty())
            .ok_or_else(|| usage("no admin token: pass --token-file FILE (the bootstrap token is DATA_DIR/admin.token) or set TENON_TOKEN".into()))?;
        let mut http =
            ureq::AgentBuilder::new().timeout_connect(Duration::from_secs(10)).timeout(Duration::from_secs(300));
        if server.trim().starts_with("https://") {
            http = http.tls_config(tls_config(ca_file)?);
        }
        let http = http.build();
        Ok(Self { base: server.trim_end_matches('/').to_string(), token: token.trim().to_string(), http })
    }

    /// After a change: with `wait`, follows the background re-signing until the change is on
    /// every device's check-in, showing progress on stderr.
    fn settle(&self, v: &mut Value, wait: bool) -> anyhow::Result<()> {
        let Some(generation) = v["resign_generation"].as_u64() else { return Ok(()) };
        if !wait || v["resign_complete"].as_bool().unwrap_or(true) {
            return Ok(());
        }
        use std::io::IsTerminal;
        let tty = std::io::stderr().is_terminal();
        let started = std::time::Instant::now();
        let mut last_line = std::time::Instant::now() - Duration::from_secs(10);
        loop {
            let s = self.call("GET", "/resign", None)?;
            if s["completed_generation"].as_u64().unwrap_or(0) >= generation {
                v["resign_complete"] = json!(true);
                v["devices_updated"] = s["last_resigned"].clone();
                if tty {
                    eprint!("\r\x1b[K");
                }
                eprintln!("re-signed in {:.1} s", started.elapsed().as_secs_f64());
                return Ok(());
            }
            let line = format!(
                "re-signing: {} of {} devices in this run, {} queued ({:.0} s)",
                s["done"],
                s["total"],
                s["queued"],
                started.elapsed().as_secs_f64()
            );
            if tty {
                eprint!("\r\x1b[K{line}");
            } else if last_line.elapsed() >= Duration::from_secs(5) {
                eprintln!("{line}");
                last_line = std::time::Instant::now();
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> anyhow::Result<Value> {
        let url = format!("{}/api/v1/admin{path}", self.base);
        let req = self.http.request(method, &url).set("Authorization", &format!("Bearer {}", self.token));
        let resp = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        self.answer(resp)
    }

    /// A request to `/api/v1/admin{path}` with the admin token, for callers that send their own body.
    fn request(&self, method: &str, path: &str) -> ureq::Request {
        let url = format!("{}/api/v1/admin{path}", self.base);
        self.http.request(method, &url).set("Authorization", &format!("Bearer {}", self.token))
    }

    /// The JSON of a success; a refusal's problem detail or the transport failure as the error.
    fn answer(&self, resp: Result<ureq::Response, ureq::Error>) -> anyhow::Result<Value> {
        match resp {
            Ok(r) if r.status() == 204 => Ok(Value::Null),
            Ok(r) => r.into_json().context("the server's answer is not JSON"),
            Err(ureq::Error::Status(code, r)) => {
                let text = r.into_string().unwrap_or_default();
                match serde_json::from_str::<Problem>(&text) {
                    Ok(p) => Err(anyhow::Error::new(ServerRefused { status: code, code: p.code, detail: p.detail })),
                    Err(_) => bail!(
                        "server answered HTTP {code}: {}",
                        table::visible(&text.chars().take(200).collect::<String>())
                    ),
                }
            }
            Err(ureq::Error::Transport(t)) => {
                let detail = tenon_core::api::error_chain(&t);
                if detail.contains("certificate") || detail.contains("UnknownIssuer") {
                    bail!(
                        "cannot reach the server at {}: {detail}; the server's certificate is not trusted: pass \
                         --ca-file FILE (TENON_CA_FILE) with the CA that issued it (DATA_DIR/tls/ca.pem for \
                         --tls-self-signed, or --data-dir DIR on the server machine)",
                        self.base
                    )
                }
                bail!("cannot reach the server at {}: {detail}; check --server (or TENON_SERVER) and that tenon-server is running", self.base)
            }
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS };
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {msg}");
            let refused_usage =
                e.downcast_ref::<ServerRefused>().is_some_and(|r| USAGE_CODES.contains(&r.code.as_str()));
            if e.downcast_ref::<UsageError>().is_some() || refused_usage {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// The CA file and token file, filled in from `--data-dir` where not given.
fn server_files(cli: &Cli) -> anyhow::Result<(Option<PathBuf>, Option<PathBuf>)> {
    let mut ca = cli.ca_file.clone();
    let mut token_file = cli.token_file.clone();
    if let Some(dir) = &cli.data_dir {
        if !dir.is_dir() {
            return Err(usage(format!(
                "--data-dir {} is not a directory; give the server's data dir (its --data-dir)",
                dir.display()
            )));
        }
        let own_ca = dir.join("tls").join("ca.pem");
        if ca.is_none() && own_ca.exists() {
            ca = Some(own_ca);
        }
        let admin = dir.join("admin.token");
        if token_file.is_none() && cli.token.is_none() && admin.exists() {
            token_file = Some(admin);
        }
    }
    Ok((ca, token_file))
}

/// rustls (ring) trusting the CA in `ca_file`, or else the system roots.
fn tls_config(ca_file: Option<&std::path::Path>) -> anyhow::Result<std::sync::Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(f) => {
            use rustls_pki_types::pem::PemObject;
            let pem = std::fs::read(f).map_err(|e| {
                usage(format!("cannot read the CA file {}: {e}; check --ca-file (or TENON_CA_FILE)", f.display()))
            })?;
            let certs: Vec<_> = rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<_, _>>()
                .map_err(|_| usage(format!("--ca-file {} is not a PEM certificate file", f.display())))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(usage(format!(
                    "--ca-file {} holds no CA certificate (expected -----BEGIN CERTIFICATE----- blocks)",
                    f.display()
                )));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
        }
    }
    let config =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .context("the TLS provider has no protocol versions")?
            .with_root_certificates(roots)
            .with_no_client_auth();
    Ok(std::sync::Arc::new(config))
}

/// `--server` must be an http:// or https:// URL; `127.0.0.1:8440` alone is a common slip.
fn check_server_url(server: &str) -> anyhow::Result<()> {
    let s = server.trim();
    if s.starts_with("http://") || s.starts_with("https://") {
        return Ok(());
    }
    Err(usage(format!(
        "--server {s:?} has no http:// or https:// in front; write it as http://{} (or https://...)",
        s.split("://").last().unwrap_or(s)
    )))
}

/// The server refused a request with a problem+json answer.
#[derive(Debug)]
struct ServerRefused {
    status: u16,
    code: String,
    detail: String,
}

impl std::fmt::Display for ServerRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (HTTP {})", table::visible(&self.detail), self.status)
    }
}

impl std::error::Error for ServerRefused {}

/// Refusals that mean the command line was wrong (exit code 2, like a usage error).
const USAGE_CODES: [&str; 4] =
    ["unknown_setting", "invalid_setting_value", "server_managed_setting", "invalid_setting_scope"];

/// A usage error found after parsing (exit code 2).
#[derive(Debug)]
struct UsageError(String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

pub(crate) fn usage(msg: String) -> anyhow::Error {
    anyhow::Error::new(UsageError(msg))
}

/// What a change's answer says about re-signing, for people.
pub(crate) fn resigned_text(v: &Value) -> String {
    if v["resign_complete"].as_bool().unwrap_or(true) {
        format!("{} devices re-signed", v["devices_updated"])
    } else {
        format!(
            "re-signing {} devices in the background (`tenonctl resign status` shows progress; --wait waits)",
            v["devices_to_resign"]
        )
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let json_out = cli.json;
    let wait = cli.wait;
    // The schema is compiled in: listing it needs no server.
    if let Command::Settings(SettingsCmd::Keys { markdown }) = &cli.command {
        if *markdown {
            print!("{}", tenon_core::schema::markdown());
        } else {
            let rows: Vec<Value> = tenon_core::schema::SETTINGS
                .iter()
                .map(|s| {
                    let mut v = serde_json::to_value(s).unwrap_or(Value::Null);
                    v["type_text"] = json!(s.ty.describe());
                    v["default"] = serde_json::from_str(s.default).unwrap_or(Value::Null);
                    v
                })
                .collect();
            if json_out {
                print_json(&Value::Array(rows));
            } else {
                let rows: Vec<Value> = rows
                    .iter()
                    .map(|r| {
                        let by = if r["source"] == json!("admin") { "admin" } else { "server" };
                        let default = if r["default"].is_null() { "-".to_string() } else { r["default"].to_string() };
                        json!({"key": r["key"], "type": r["type_text"], "default": default,
                               "scope": r["scope"], "delivery": r["delivery"], "by": by,
                               "description": r["description"]})
                    })
                    .collect();
                print_table(
                    false,
                    &Value::Array(rows),
                    &[
                        ("KEY", "key"),
                        ("TYPE", "type"),
                        ("DEFAULT", "default"),
                        ("SCOPE", "scope"),
                        ("DELIVERY", "delivery"),
                        ("SET BY", "by"),
                        ("DESCRIPTION", "description"),
                    ],
                );
                println!("Keys of your own go under Custom.* (any JSON value, delivered as is).");
            }
        }
        return Ok(());
    }
    let (ca_file, token_file) = server_files(&cli)?;
    let c = Client::new(&cli.server, cli.token, token_file.as_deref(), ca_file.as_deref())?;
    match cli.command {
        Command::Settings(SettingsCmd::Keys { .. }) => unreachable!("answered above"),
        Command::EnrollToken(EnrollTokenCmd::List) => {
            let v = c.call("GET", "/enroll-tokens", None)?;
            print_table(
                json_out,
                &v,
                &[
                    ("ID", "id"),
                    ("STATE", "state"),
                    ("USES LEFT", "uses_left"),
                    ("USES", "uses"),
                    ("EXPIRES", "expires_at"),
                    ("CREATED", "created_at"),
                    ("REVOKED", "revoked_at"),
                ],
            );
        }
        Command::EnrollToken(EnrollTokenCmd::Revoke { id }) => {
            let id = enroll_token_id(&id);
            c.call("POST", &format!("/enroll-tokens/{}/revoke", urlencode(&id)), None)?;
            if !json_out {
                println!("enrollment token {id} revoked: no device can enroll with it; enrolled devices stay enrolled");
            }
        }
        Command::Users(UsersCmd::Remove { upn, force }) => {
            let mut v = c.call("DELETE", &format!("/users/{}?force={force}", urlencode(&upn)), None)?;
            c.settle(&mut v, wait)?;
            if json_out {
                print_json(&v);
            } else {
                let cleared = v["cleared_primary"].as_array().map(Vec::len).unwrap_or(0);
                println!(
                    "user {} removed; {} (they keep their last configuration until their next sync){}",
                    cell(&v["upn"]),
                    resigned_text(&v),
                    if cleared > 0 {
                        format!("; primary user cleared on {}", cell(&v["cleared_primary"]))
                    } else {
                        String::new()
                    }
                );
            }
        }
        Command::EnrollToken(EnrollTokenCmd::Create { uses, ttl, pin_ca }) => {
            let v = c.call(
                "POST",
                "/enroll-tokens",
                Some(&json!({"uses": uses, "ttl_seconds": ttl.as_secs(), "pin_ca": pin_ca})),
            )?;
            if json_out {
                print_json(&v);
            } else {
                println!("{}", v["token"].as_str().unwrap_or_default());
            }
        }
        Command::Users(UsersCmd::Import { file }) => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let users: Value = serde_json::from_str(&text).map_err(|e| {
                usage(format!("{} is not valid JSON ({e}); it must hold a JSON array of user objects", file.display()))
            })?;
            if !users.is_array() {
                return Err(usage(format!("{} must hold a JSON array of user objects", file.display())));
            }
            let mut v = c.call("POST", "/users/import", Some(&users))?;
            c.settle(&mut v, wait)?;
            if json_out {
                print_json(&v);
            } else {
                println!("imported: {} new, {} updated; {}", v["created"], v["updated"], resigned_text(&v));
            }
        }
        Command::Users(UsersCmd::List) => {
            let v = c.call("GET", "/users", None)?;
            print_table(
                json_out,
                &v,
                &[("UPN", "upn"), ("NAME", "display_name"), ("GROUPS", "groups"), ("SOURCE", "source"), ("ID", "id")],
            );
        }
        Command::Settings(SettingsCmd::Set { scope, key, value }) => {
            let body = if value.trim() == "undefined" {
                json!({"scope": scope.scope(), "key": key, "undefined": true})
            } else {
                let parsed: Value = serde_json::from_str(&value).map_err(|e| {
                    usage(format!(
                        "value {value:?} is not JSON ({e}); quote strings as JSON, e.g. '\"text\"', or use true, 5, {{...}} or undefined"
                    ))
                })?;
                json!({"scope": scope.scope(), "key": key, "value": parsed})
            };
            let mut v = c.call("PUT", "/settings", Some(&body))?;
            c.settle(&mut v, wait)?;
            if json_out {
                print_json(&v);
            } else {
                println!("set {key}; {}", resigned_text(&v));
            }
            if let Some(w) = v["warning"].as_str() {
                eprintln!("warning: {}", table::visible(w));
            }
        }
        Command::Settings(SettingsCmd::Unset { scope, key }) => {
            let mut v = c.call("POST", "/settings/unset", Some(&json!({"scope": scope.scope(), "key": key})))?;
            c.settle(&mut v, wait)?;
            if json_out {
                print_json(&v);
            } else {
                println!("unset {key}; {}", resigned_text(&v));
            }
        }
        Command::Settings(SettingsCmd::List { tenant, group, user }) => {
            let q = match (tenant, group, user) {
                (true, None, None) => "?tenant=true".to_string(),
                (false, Some(g), None) => format!("?group={}", urlencode(&g)),
                (false, None, Some(u)) => format!("?user={}", urlencode(&u)),
                (false, None, None) => String::new(),
                _ => return Err(usage("choose at most one of --tenant, --group and --user".into())),
            };
            let v = c.call("GET", &format!("/settings{q}"), None)?;
            let rows: Vec<Value> = v
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| {
                    let scope = match (s["scope"]["kind"].as_str(), s["scope"]["name"].as_str()) {
                        (Some("tenant"), _) => "tenant".to_string(),
                        (Some(k), Some(n)) => format!("{k}:{n}"),
                        _ => "?".into(),
                    };
                    json!({"scope": scope, "key": s["key"], "value": s["value"]})
                })
                .collect();
            if json_out {
                print_json(&v);
            } else {
                print_table(false, &Value::Array(rows), &[("SCOPE", "scope"), ("KEY", "key"), ("VALUE", "value")]);
            }
        }
        Command::Groups(GroupsCmd::SetPriority { name, priority }) => {
            let mut v =
                c.call("PUT", &format!("/groups/{}/priority", urlencode(&name)), Some(&json!({"priority": priority})))?;
            c.settle(&mut v, wait)?;
            if json_out {
                print_json(&v);
            } else {
                println!("group {name} priority {priority}; {}", resigned_text(&v));
            }
        }
        Command::Devices(DevicesCmd::List { without_primary, primary_mismatch, all, limit, after }) => {
            let mut q = format!(
                "/devices?without_primary={without_primary}&primary_mismatch={primary_mismatch}&include_decommissioned={all}"
            );
            if let Some(l) = limit {
                q.push_str(&format!("&limit={l}"));
            }
            if let Some(a) = &after {
                q.push_str(&format!("&after={}", urlencode(a)));
            }
            let v = c.call("GET", &q, None)?;
            let shown = v.as_array().map(Vec::len).unwrap_or(0);
            if let (Some(l), Some(last)) = (limit, v.as_array().and_then(|a| a.last())) {
                if shown == l as usize {
                    eprintln!("more may follow: add --after {}", cell(&last["id"]));
                }
            }
            print_table(
                json_out,
                &v,
                &[
                    ("ID", "id"),
                    ("HOSTNAME", "hostname"),
                    ("PRIMARY USER", "primary_user"),
                    ("VERSION", "config_version"),
                    ("REPORTED", "reported_config_version"),
                    ("LAST SEEN", "last_seen"),
                    ("STATUS", "status"),
                ],
            );
        }
        Command::Devices(DevicesCmd::Show { id }) => {
            let id = c.resolve_device(&id)?;
            let v = c.call("GET", &format!("/devices/{}", urlencode(&id)), None)?;
            if json_out {
                print_json(&v);
            } else {
                for k in [
                    "id",
                    "hostname",
                    "status",
                    "primary_user",
                    "config_version",
                    "config_sha256",
                    "reported_config_version",
                    "last_seen",
                    "enrolled_at",
                    "agent_version",
                    "signed_in_users",
                    "last_error",
                ] {
                    println!("{k:<24} {}", cell(&v[k]));
                }
                if let Some(p) = v["policies"].as_object() {
                    for (name, s) in p {
                        let reason = s
                            .get("reason")
                            .and_then(Value::as_str)
                            .map(|r| format!(" ({})", table::visible(r)))
                            .unwrap_or_default();
                        let state = s["state"].as_str().unwrap_or("unknown");
                        let common = common_state(name, state).as_str();
                        let state = if common == state {
                            cell(&s["state"])
                        } else {
                            format!("{} [{common}]", cell(&s["state"]))
                        };
                        println!("policy {:<17} {state}{reason}", table::visible(name));
                        if name == "bitlocker" {
                            print_bitlocker(s);
                        }
                    }
                }
            }
        }
        Command::Devices(DevicesCmd::Config { id }) => {
            let id = c.resolve_device(&id)?;
            let v = c.call("GET", &format!("/devices/{}/config", urlencode(&id)), None)?;
            print_json(if json_out { &v } else { &v["payload"] });
        }
        Command::Devices(DevicesCmd::Reports { id, limit }) => {
            let id = c.resolve_device(&id)?;
            let v = c.call("GET", &format!("/devices/{}/reports?limit={limit}", urlencode(&id)), None)?;
            let rows: Vec<Value> = v
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| {
                    json!({"received_at": r["received_at"], "version": r["report"]["config_version"],
                           "users": r["report"]["signed_in_users"], "error": r["report"]["last_error"]})
                })
                .collect();
            if json_out {
                print_json(&v);
            } else {
                print_table(
                    false,
                    &Value::Array(rows),
                    &[("RECEIVED", "received_at"), ("VERSION", "version"), ("USERS", "users"), ("ERROR", "error")],
                );
            }
        }
        Command::Devices(DevicesCmd::SetPrimary { id, upn, clear }) => {
            let id = c.resolve_device(&id)?;
            let upn = if clear { None } else { upn };
            c.call("PUT", &format!("/devices/{}/primary", urlencode(&id)), Some(&json!({"upn": upn})))?;
            if !json_out {
                match upn {
                    Some(u) => println!("primary user of {id} is now {u}; the device gets it at its next sync"),
                    None => println!("primary user of {id} cleared"),
                }
            }
        }
        Command::Devices(DevicesCmd::Decommission { id }) => {
            let id = c.resolve_device(&id)?;
            c.call("POST", &format!("/devices/{}/decommission", urlencode(&id)), None)?;
            if !json_out {
                println!("device {id} decommissioned: its credential is revoked and its primary user cleared");
            }
        }
        Command::Audit(AuditCmd::List { limit }) => {
            let v = c.call("GET", &format!("/audit?limit={limit}"), None)?;
            print_table(
                json_out,
                &v,
                &[("AT", "at"), ("ACTOR", "actor"), ("ACTION", "action"), ("TARGET", "target"), ("DETAILS", "details")],
            );
        }
        Command::Signatures(cmd) => signatures(&c, json_out, wait, cmd)?,
        Command::Packages(cmd) => packages::run(&c, json_out, wait, cmd)?,
        Command::Directory(cmd) => directory::run(&c, json_out, wait, cmd)?,
        Command::Devices(DevicesCmd::Install { id, package }) => {
            let id = c.resolve_device(&id)?;
            let v =
                c.call("POST", &format!("/devices/{}/install", urlencode(&id)), Some(&json!({"package": package})))?;
            if json_out {
                print_json(&v);
            } else {
                println!(
                    "{} {} requested on device {id} (request {}); it installs at the device's next check-in",
                    cell(&v["package"]),
                    cell(&v["version"]),
                    v["request"]
                );
            }
        }
        Command::Resign(ResignCmd::Status) => {
            let v = c.call("GET", "/resign", None)?;
            if json_out {
                print_json(&v);
            } else if v["completed_generation"] == v["requested_generation"] && v["queued"] == json!(0) {
                println!(
                    "nothing to re-sign: every change is on the devices' check-ins (change {}; its run re-signed {} devices)",
                    v["completed_generation"], v["last_resigned"]
                );
            } else {
                println!(
                    "re-signing: {} of {} devices in this run, {} queued; changes up to {} done, {} requested",
                    v["done"], v["total"], v["queued"], v["completed_generation"], v["requested_generation"]
                );
            }
        }
        Command::Server(ServerCmd::Status) => {
            let v = c.call("GET", "/server", None)?;
            if json_out {
                print_json(&v);
            } else {
                println!(
                    "server {} on {} (database {}); {} devices; {}; other servers' changes applied up to {}",
                    v["server_id"].as_str().unwrap_or("?"),
                    v["store"].as_str().unwrap_or("?"),
                    v["database"].as_str().unwrap_or("?"),
                    v["devices"],
                    if v["runs_jobs"].as_bool().unwrap_or(false) {
                        "runs the database-wide jobs"
                    } else {
                        "another server runs the database-wide jobs"
                    },
                    v["applied_change"]
                );
            }
        }
        Command::Networks(NetworksCmd::List) => {
            let v = c.call("GET", "/networks", None)?;
            print_table(
                json_out,
                &v,
                &[
                    ("GROUP ID", "group_id"),
                    ("GATEWAY MAC", "gateway_mac"),
                    ("GATEWAY IP", "gateway_ip"),
                    ("DEVICES", "device_count"),
                    ("LAST SEEN", "last_seen"),
                ],
            );
        }
        Command::RecoveryKeys(RecoveryKeysCmd::Show { device_id, all }) => {
            let device_id = c.resolve_device(&device_id)?;
            let v = c.call("GET", &format!("/devices/{}/recovery-keys?all={all}", urlencode(&device_id)), None)?;
            if json_out {
                print_json(&v);
            } else if v.as_array().is_none_or(|a| a.is_empty()) {
                println!("no recovery keys escrowed for device {device_id}");
            } else {
                let mut cols = vec![
                    ("MOUNT", "mount"),
                    ("PROTECTOR ID", "protector_id"),
                    ("RECOVERY PASSWORD", "recovery_password"),
                    ("RECEIVED", "received_at"),
                ];
                if all {
                    cols.push(("SUPERSEDED BY", "superseded_by"));
                    cols.push(("RETIRED", "retired_at"));
                }
                let keys = v.as_array().into_iter().flatten();
                let conflicts: Vec<&Value> = keys.clone().filter(|k| k["conflict"] == json!(true)).collect();
                if !conflicts.is_empty() {
                    cols.push(("CONFLICT", "conflict"));
                }
                print_table(false, &v, &cols);
                for k in keys.filter(|k| !k["error"].is_null()) {
                    eprintln!("warning: protector {}: {}", cell(&k["protector_id"]), cell(&k["error"]));
                }
                // On stdout, beside the keys: whoever reads them must not miss that one may be forged.
                let mut seen = Vec::new();
                for k in conflicts {
                    if !seen.contains(&&k["protector_id"]) {
                        seen.push(&k["protector_id"]);
                        println!("WARNING: protector {}: {}", cell(&k["protector_id"]), cell(&k["warning"]));
                    }
                }
                eprintln!("this read was audited; the device will rotate these keys at its next sync");
            }
        }
        Command::AdminTokens(AdminTokensCmd::List) => {
            let v = c.call("GET", "/tokens", None)?;
            print_table(
                json_out,
                &v,
                &[
                    ("ID", "id"),
                    ("NAME", "name"),
                    ("ROLES", "roles"),
                    ("CREATED", "created_at"),
                    ("REVOKED", "revoked_at"),
                ],
            );
        }
        Command::AdminTokens(AdminTokensCmd::Revoke { id }) => {
            c.call("POST", &format!("/tokens/{}/revoke", urlencode(&id)), None)?;
            if !json_out {
                println!("admin token {id} revoked");
            }
        }
        Command::AdminTokens(AdminTokensCmd::Create { name, roles }) => {
            let v = c.call("POST", "/tokens", Some(&json!({"name": name, "roles": roles})))?;
            if json_out {
                print_json(&v);
            } else {
                println!("{}", v["token"].as_str().unwrap_or_default());
            }
        }
    }
    Ok(())
}

/// The BitLocker status details of `devices show`: progress and each recovery key's escrow.
fn print_bitlocker(s: &Value) {
    if let Some(m) = s.get("message").or_else(|| s.get("warning")).and_then(Value::as_str) {
        println!("  {m}");
    }
    if s.get("mount").is_some() {
        println!("  volume {} {} {}%", cell(&s["mount"]), cell(&s["encryption"]), cell(&s["percent"]));
    }
    for p in s.get("protectors").and_then(Value::as_array).into_iter().flatten() {
        if p.get("tenon_escrowed").is_some() {
            println!(
                "  recovery password {}: tenon escrow {}, entra {} ({} attempts)",
                cell(&p["id"]),
                if p["tenon_escrowed"] == json!(true) { "stored" } else { "pending" },
                cell(&p["entra"]),
                cell(&p["entra_attempts"])
            );
        } else {
            println!("  protector {} ({})", cell(&p["id"]), cell(&p["kind"]));
        }
    }
    if let Some(r) = s.get("rotations_pending") {
        println!("  rotations pending: {}", cell(r));
    }
    if let Some(w) = s.get("escrow_warning") {
        println!("  WARNING: {}", cell(w));
    }
    for e in s.get("errors").and_then(Value::as_array).into_iter().flatten() {
        println!("  error: {}", cell(e));
    }
}

fn signatures(c: &Client, json_out: bool, wait: bool, cmd: SignaturesCmd) -> anyhow::Result<()> {
    match cmd {
        SignaturesCmd::Set { name, html, txt, default, groups } => {
            let default = match default.as_deref().map(|d| d.trim().to_ascii_lowercase()) {
                None => None,
                Some(d) if d == "none" => Some(Value::Null),
                Some(d) => Some(json!(d.parse::<DefaultUse>().map_err(|e| usage(format!("--default {e} or none")))?)),
            };
            let template = signature_files::read_template(&html, txt.as_deref()).map_err(|e| usage(e.to_string()))?;
            // What the admin left out stays as it is on an existing template.
            let existing = if groups.is_empty() || default.is_none() {
                let list = c.call("GET", "/signatures", None)?;
                list.as_array().into_iter().flatten().find(|t| t["name"] == json!(name)).cloned()
            } else {
                None
            };
            let groups = match (groups.is_empty(), &existing) {
                (false, _) => json!(groups),
                (true, Some(e)) => e["groups"].clone(),
                (true, None) => json!([GroupName::ALL_USERS]),
            };
            let default = default.or_else(|| existing.as_ref().map(|e| e["default"].clone())).unwrap_or(Value::Null);
            let body = json!({"html": template.html, "txt": template.txt, "default": default, "groups": groups,
                              "images": template.images});
            let mut v = c.call("PUT", &format!("/signatures/{}", urlencode(&name)), Some(&body))?;
            c.settle(&mut v, wait)?;
            if json_out {
                print_json(&v);
            } else {
                let images = template.images.keys().cloned().collect::<Vec<_>>();
                println!(
                    "signature {name} {} for {} ({} users{}); {}",
                    if v["created"] == json!(true) { "created" } else { "updated" },
                    cell(&groups),
                    v["users"],
                    if images.is_empty() { String::new() } else { format!(", images {}", images.join(", ")) },
                    resigned_text(&v)
                );
            }
            if v["users"] == json!(0) {
                eprintln!(
                    "warning: no user is in {} yet; check the group names with `tenonctl users list`",
                    cell(&groups)
                );
            }
        }
        SignaturesCmd::List { full } => {
            let v = c.call("GET", &format!("/signatures?full={full}"), None)?;
            if json_out {
                print_json(&v);
            } else {
                let rows: Vec<Value> = v
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|t| {
                        let images: Vec<String> = t["images"]
                            .as_object()
                            .into_iter()
                            .flatten()
                            .map(|(n, size)| format!("{n} ({} B)", cell(size)))
                            .collect();
                        json!({"name": t["name"], "groups": t["groups"], "default": t["default"],
                               "images": images, "updated_at": t["updated_at"]})
                    })
                    .collect();
                print_table(
                    false,
                    &Value::Array(rows),
                    &[
                        ("NAME", "name"),
                        ("GROUPS", "groups"),
                        ("DEFAULT", "default"),
                        ("IMAGES", "images"),
                        ("UPDATED", "updated_at"),
                    ],
                );
            }
        }
        SignaturesCmd::Remove { name } => {
            let mut v = c.call("DELETE", &format!("/signatures/{}", urlencode(&name)), None)?;
            c.settle(&mut v, wait)?;
            if json_out {
                print_json(&v);
            } else {
                println!(
                    "signature {} removed; {}; they delete its files at their next sync",
                    cell(&v["name"]),
                    resigned_text(&v)
                );
            }
        }
    }
    Ok(())
}

pub(crate) fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The id inside `tenr.ID.SECRET.FPR`, when a whole token was given (the id alone otherwise).
fn enroll_token_id(arg: &str) -> String {
    let a = arg.trim();
    match a.strip_prefix("tenr.") {
        Some(rest) => rest.split('.').next().unwrap_or(rest).to_string(),
        None => a.to_string(),
    }
}

impl Client {
    /// A device argument: an id as it is, or a host name that names exactly one device.
    fn resolve_device(&self, arg: &str) -> anyhow::Result<String> {
        if let Ok(id) = DeviceId::parse(arg.trim()) {
            return Ok(id.to_string());
        }
        let v = self.call(
            "GET",
            &format!("/devices?include_decommissioned=true&hostname={}", urlencode(arg.trim())),
            None,
        )?;
        let all: Vec<&Value> = v.as_array().into_iter().flatten().collect();
        let active: Vec<&&Value> = all.iter().filter(|d| d["status"] == json!("active")).collect();
        let pick = match (all.len(), active.len()) {
            (1, _) => all[0],
            (_, 1) => *active[0],
            (0, _) => bail!(
                "no device {}: neither an id nor a host name the server knows; `tenonctl devices list` shows them",
                table::visible(arg)
            ),
            _ => bail!(
                "host name {} names {} devices ({}); give the id instead",
                table::visible(arg),
                all.len(),
                all.iter().map(|d| cell(&d["id"])).collect::<Vec<_>>().join(", ")
            ),
        };
        pick["id"].as_str().map(str::to_string).context("the server listed a device without an id")
    }
}
