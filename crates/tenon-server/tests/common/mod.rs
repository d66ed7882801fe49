//! Test support: the real binaries on ephemeral loopback ports with temporary data directories.
//! With `TENON_TEST_PG` set (a base URL from `scripts/pg-cluster start`), every server stores in
//! a PostgreSQL database of its own, one per data dir, instead of DATA_DIR/tenon.db.
#![allow(dead_code)]

pub mod portal_client;

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A binary of this workspace. `tenon-server` comes from Cargo; the others are its siblings in
/// the target directory (`cargo build --workspace --bins` builds them; `scripts/test` does).
pub fn bin(name: &str) -> PathBuf {
    let server = PathBuf::from(env!("CARGO_BIN_EXE_tenon-server"));
    if name == "tenon-server" {
        return server;
    }
    let p = server.parent().unwrap().join(name);
    assert!(p.exists(), "{} is missing: run `cargo build --workspace --bins` first (scripts/test does)", p.display());
    p
}

/// The PostgreSQL run: `TENON_TEST_PG` holds a cluster's base URL as `scripts/pg-cluster start`
/// prints it (`postgres://postgres@127.0.0.1:PORT`); unset, every server uses its SQLite file.
pub fn pg_base() -> Option<String> {
    let base = std::env::var("TENON_TEST_PG").ok()?;
    let base = base.trim().trim_end_matches('/');
    (!base.is_empty()).then(|| base.to_string())
}

/// For a test that is about the SQLite file itself (its permissions, copying it, the backup
/// archive that snapshots it): under PostgreSQL it says so on stderr and returns true, and the
/// test returns at once (`if common::sqlite_only("...") { return; }`).
pub fn sqlite_only(why: &str) -> bool {
    if pg_base().is_none() {
        return false;
    }
    // Straight to stderr, past the test harness's capture, so the run's log shows every skip.
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED under PostgreSQL: {why}");
    true
}

/// The path as the file system resolves it, also when its last components do not exist yet (a
/// data dir the server is about to create): the nearest existing ancestor canonicalized, plus the rest.
fn canonical(path: &Path) -> PathBuf {
    let path = if path.is_absolute() { path.to_path_buf() } else { std::env::current_dir().unwrap().join(path) };
    let mut rest = Vec::new();
    let mut at = path.as_path();
    loop {
        if let Ok(c) = at.canonicalize() {
            return rest.iter().rev().fold(c, |p: PathBuf, n| p.join(n));
        }
        match (at.parent(), at.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                at = parent;
            }
            _ => return path,
        }
    }
}

/// The PostgreSQL database of a data dir: `tenon_` and the first 16 hex digits of the SHA-256 of
/// its canonical path, so a server restarted on the same data dir finds the same database.
pub fn database_name_for(data_dir: &Path) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(canonical(data_dir).as_os_str().as_encoded_bytes());
    format!("tenon_{}", &hex::encode(digest)[..16])
}

/// Under PostgreSQL, the URL of the data dir's own database, created if it does not exist yet.
pub fn database_url_for(data_dir: &Path) -> Option<String> {
    let base = pg_base()?;
    let name = database_name_for(data_dir);
    static CREATED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut created = CREATED.lock().unwrap_or_else(|e| e.into_inner());
    if !created.contains(&name) {
        let out = pg_tool("psql")
            .arg(format!("{base}/postgres"))
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", &format!("CREATE DATABASE \"{name}\"")])
            .output()
            .expect("run psql");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() || err.contains("already exists"),
            "cannot create database {name} on {base}: {err}"
        );
        created.push(name.clone());
    }
    Some(format!("{base}/{name}"))
}

/// `--database URL` for a data dir under PostgreSQL, nothing for SQLite.
pub fn database_args(data_dir: &Path) -> Vec<String> {
    database_url_for(data_dir).map(|url| vec!["--database".to_string(), url]).unwrap_or_default()
}

/// The `tenon-server` subcommands that take `--database` (the others never open the database).
const TAKES_DATABASE: &[&str] = &["serve", "rotate-escrow-key", "backup"];

/// `tenon-server SUBCOMMAND --data-dir DATA_DIR`, with `--database` under PostgreSQL when the
/// subcommand takes it: for the tests that run the binary themselves rather than `Server::start`.
pub fn server_command(subcommand: &str, data_dir: &Path) -> Command {
    let mut cmd = Command::new(bin("tenon-server"));
    cmd.arg(subcommand).arg("--data-dir").arg(data_dir);
    if TAKES_DATABASE.contains(&subcommand) {
        cmd.args(database_args(data_dir));
    }
    cmd
}

/// A PostgreSQL client tool (psql, pg_dump): from PATH, else pg_config's bindir, else the newest
/// /usr/lib/postgresql/*/bin.
pub fn pg_tool(name: &str) -> Command {
    let in_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join(name)).find(|f| f.is_file()))
        .unwrap_or_default();
    let from_pg_config = || {
        let out = Command::new("pg_config").arg("--bindir").output().ok()?;
        let f = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join(name);
        f.is_file().then_some(f)
    };
    let from_debian = || {
        let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .flatten()
            .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin").join(name))))
            .filter(|(_, f)| f.is_file())
            .collect();
        versions.sort();
        versions.pop().map(|(_, f)| f)
    };
    let tool = in_path.or_else(from_pg_config).or_else(from_debian);
    Command::new(tool.unwrap_or_else(|| panic!("{name} is not installed (apt-get install postgresql)")))
}

/// Runs SQL on a PostgreSQL database; panics with psql's stderr when it fails.
pub fn psql(url: &str, sql: &str) -> String {
    let out =
        pg_tool("psql").arg(url).args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql]).output().unwrap();
    assert!(out.status.success(), "psql {sql:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Everything the store holds, as bytes to search (the leak checks): the SQLite files, or under
/// PostgreSQL a plain-text pg_dump of the data dir's database.
pub fn store_bytes(data_dir: &Path) -> Vec<u8> {
    match database_url_for(data_dir) {
        Some(url) => {
            let out = pg_tool("pg_dump").args(["--no-owner", "--dbname", &url]).output().unwrap();
            assert!(out.status.success(), "pg_dump failed: {}", String::from_utf8_lossy(&out.stderr));
            out.stdout
        }
        None => {
            ["tenon.db", "tenon.db-wal"].iter().filter_map(|f| std::fs::read(data_dir.join(f)).ok()).flatten().collect()
        }
    }
}

/// A copy of the stopped server's store under `name` (the SQLite files into DATA_DIR/../NAME, or
/// a PostgreSQL database made from the data dir's as a template), for `restore_store`.
pub fn snapshot_store(data_dir: &Path, name: &str) {
    match database_url_for(data_dir) {
        Some(_) => {
            let base = pg_base().unwrap();
            let (db, copy) = (database_name_for(data_dir), format!("{}_{name}", database_name_for(data_dir)));
            psql(&format!("{base}/postgres"), &format!("CREATE DATABASE \"{copy}\" TEMPLATE \"{db}\""));
        }
        None => {
            let copy = data_dir.with_file_name(name);
            std::fs::create_dir_all(&copy).unwrap();
            for f in ["tenon.db", "tenon.db-wal", "tenon.db-shm"] {
                let _ = std::fs::copy(data_dir.join(f), copy.join(f));
            }
        }
    }
}

/// Puts the store `snapshot_store` copied back in place of the stopped server's.
pub fn restore_store(data_dir: &Path, name: &str) {
    match database_url_for(data_dir) {
        Some(_) => {
            let base = pg_base().unwrap();
            let (db, copy) = (database_name_for(data_dir), format!("{}_{name}", database_name_for(data_dir)));
            let admin = format!("{base}/postgres");
            psql(&admin, &format!("DROP DATABASE \"{db}\" WITH (FORCE)"));
            psql(&admin, &format!("CREATE DATABASE \"{db}\" TEMPLATE \"{copy}\""));
        }
        None => {
            let copy = data_dir.with_file_name(name);
            for f in ["tenon.db", "tenon.db-wal", "tenon.db-shm"] {
                let _ = std::fs::remove_file(data_dir.join(f));
                if copy.join(f).exists() {
                    std::fs::copy(copy.join(f), data_dir.join(f)).unwrap();
                }
            }
        }
    }
}

pub struct Server {
    pub child: Child,
    pub url: String,
    pub addr: String,
    pub data_dir: PathBuf,
    pub token: String,
    pub stderr_log: PathBuf,
    /// For an https server: the CA that tenonctl and the test's HTTP client trust
    /// (DATA_DIR/tls/ca.pem by default).
    pub ca_file: Option<PathBuf>,
}

/// A ureq agent trusting exactly the CA certificates in `ca_pem`.
pub fn https_agent(ca_pem: &Path) -> ureq::Agent {
    ureq::AgentBuilder::new().tls_config(client_config(ca_pem)).timeout(Duration::from_secs(10)).build()
}

/// A rustls client configuration trusting exactly the CA certificates in `ca_pem`.
pub fn client_config(ca_pem: &Path) -> std::sync::Arc<rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(ca_pem).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let config =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    std::sync::Arc::new(config)
}

impl Server {
    /// Starts `tenon-server serve` on `listen` (use 127.0.0.1:0 for an ephemeral port).
    pub fn start(data_dir: &Path, listen: &str) -> Server {
        Self::start_with(data_dir, listen, &[])
    }

    /// Starts the server with extra `serve` options (short timeouts, other limits).
    pub fn start_with(data_dir: &Path, listen: &str, extra: &[&str]) -> Server {
        Self::start_trusting(data_dir, listen, extra, None)
    }

    /// Starts an https server whose certificate `ca_file` issued (an organisation's certificate).
    pub fn start_trusting(data_dir: &Path, listen: &str, extra: &[&str], ca_file: Option<&Path>) -> Server {
        let stderr_log = data_dir.with_extension("server.log");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&stderr_log).unwrap();
        // Under PostgreSQL every server gets its data dir's own database, unless the test chose one.
        let chose = extra.iter().any(|a| *a == "--database" || a.starts_with("--database="));
        let database = if chose { Vec::new() } else { database_args(data_dir) };
        let mut child = Command::new(bin("tenon-server"))
            .args(["serve", "--listen", listen, "--data-dir"])
            .arg(data_dir)
            .args(database)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("start tenon-server");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let deadline = Instant::now() + Duration::from_secs(30);
        let url = loop {
            assert!(Instant::now() < deadline, "server did not start");
            let Some(line) = lines.next() else {
                let log = std::fs::read_to_string(&stderr_log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(10).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                panic!("server exited early; its log ({}) ends:\n{}", stderr_log.display(), tail.join("\n"));
            };
            let line = line.unwrap();
            if let Some(rest) = line.strip_prefix("tenon-server listening on ") {
                break rest.split_whitespace().next().unwrap().to_string();
            }
        };
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let token = std::fs::read_to_string(data_dir.join("admin.token")).unwrap().trim().to_string();
        let addr = url.trim_start_matches("http://").trim_start_matches("https://").to_string();
        let own_ca = data_dir.join("tls").join("ca.pem");
        let ca_file =
            ca_file.map(Path::to_path_buf).or((url.starts_with("https://") && own_ca.exists()).then_some(own_ca));
        let s = Server { child, url, addr, data_dir: data_dir.to_path_buf(), token, stderr_log, ca_file };
        s.wait_healthy();
        s
    }

    /// A plain ureq agent, or for https one that trusts `ca_file`.
    pub fn http(&self) -> ureq::Agent {
        match &self.ca_file {
            Some(ca) => https_agent(ca),
            None => ureq::AgentBuilder::new().build(),
        }
    }

    /// tenonctl with this server's URL and CA.
    fn ctl_command(&self) -> Command {
        let mut cmd = Command::new(bin("tenonctl"));
        cmd.args(["--server", &self.url]);
        if let Some(ca) = &self.ca_file {
            cmd.arg("--ca-file").arg(ca);
        }
        cmd
    }

    fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let http = self.http();
        while Instant::now() < deadline {
            if http.get(&format!("{}/healthz", self.url)).call().is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("server never became healthy");
    }

    /// SIGTERM and wait, as an administrator's service manager would stop it.
    pub fn stop(mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Runs tenonctl against this server.
    pub fn ctl(&self, args: &[&str]) -> Output {
        self.ctl_command().args(["--token", &self.token]).args(args).output().expect("run tenonctl")
    }

    /// Runs tenonctl against this server with another admin token.
    pub fn ctl_as(&self, token: &str, args: &[&str]) -> Output {
        self.ctl_command().args(["--token", token]).args(args).output().expect("run tenonctl")
    }

    /// Runs tenonctl and parses its --json output; panics with stderr on failure.
    pub fn ctl_json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.ctl(&all);
        assert!(
            out.status.success(),
            "tenonctl {args:?} failed: {}\nserver log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
        serde_json::from_slice(&out.stdout).expect("tenonctl --json prints JSON")
    }

    /// The last lines of the server's log, for failure messages (a 500 names only a reference).
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.stderr_log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let errors: Vec<&str> = lines.iter().copied().filter(|l| l.contains("ERROR")).collect();
        format!("{}\n...\n{}", errors.join("\n"), lines[lines.len().saturating_sub(15)..].join("\n"))
    }

    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert!(
            out.status.success(),
            "tenonctl {args:?} failed: {}\nserver log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn enroll_token(&self, uses: u32) -> String {
        self.ctl_ok(&["enroll-token", "create", "--uses", &uses.to_string()]).trim().to_string()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A simulated device with its own state directory.
pub struct SimAgent {
    pub state_dir: PathBuf,
    pub device_file: PathBuf,
}

impl SimAgent {
    pub fn new(root: &Path, name: &str, device: Value) -> SimAgent {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let device_file = dir.join("device.json");
        std::fs::write(&device_file, serde_json::to_vec_pretty(&device).unwrap()).unwrap();
        SimAgent { state_dir: dir.join("state"), device_file }
    }

    /// The agent command for this device, not yet started.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin("tenon-agent"));
        cmd.arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--platform")
            .arg(format!("simulated:{}", self.device_file.display()))
            .args(args);
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run tenon-agent")
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "tenon-agent {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn enroll(&self, server: &Server, token: &str) -> String {
        self.ok(&["enroll", "--server", &server.url, "--token", token]).trim().to_string()
    }

    pub fn status(&self) -> Value {
        serde_json::from_str(&self.ok(&["status", "--json"])).unwrap()
    }

    pub fn device(&self) -> Value {
        serde_json::from_slice(&std::fs::read(&self.device_file).unwrap()).unwrap()
    }

    pub fn set_device(&self, device: &Value) {
        std::fs::write(&self.device_file, serde_json::to_vec_pretty(device).unwrap()).unwrap();
    }

    /// The payload the agent holds in its vault, decrypted through the agent library.
    pub fn held_payload(&self) -> Value {
        let platform = tenon_agent::platform::simulated::SimulatedPlatform::open(&self.device_file).unwrap();
        let vault = tenon_agent::vault::Vault::new(&self.state_dir, &platform);
        let state = vault.load().expect("vault loads").state;
        let env: Value = serde_json::from_str(state.envelope.as_deref().expect("an envelope is held")).unwrap();
        env["signed"]["payload"].clone()
    }
}

/// A log without terminal colour codes (ESC ... letter).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A child process killed when the guard drops, also when a test panics: a process left running
/// would keep writing into the test runner's output pipe (and `scripts/test`'s `tee` would wait
/// for it forever).
pub struct KillOnDrop(pub Child);

impl std::ops::Deref for KillOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
