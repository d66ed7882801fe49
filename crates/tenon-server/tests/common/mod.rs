//! Test support: the real binaries on ephemeral loopback ports with temporary data directories.
#![allow(dead_code)]

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
        let mut child = Command::new(bin("tenon-server"))
            .args(["serve", "--listen", listen, "--data-dir"])
            .arg(data_dir)
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
            let line = lines.next().expect("server exited early").unwrap();
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
