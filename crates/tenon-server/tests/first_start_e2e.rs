//! First-start enrollment, as the MSI sets it up: the installer leaves `HKLM\SOFTWARE\Tenon`
//! `EnrollServer` / `EnrollToken` (here in a simulated device's registry), and `tenon-agent run`
//! (the service's loop) enrolls with them, deletes the token and syncs; a used-up token keeps it
//! running and saying why; no server keeps it waiting, saying how to enroll, until an enrollment
//! by hand. The token is never in the agent's output.

mod common;

use common::{Server, SimAgent};
use serde_json::{json, Value};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};
use tenon_agent::first_start::{INSTALL_KEY, SERVER_VALUE, TOKEN_VALUE};

fn device(server: Option<&str>, token: Option<&str>) -> Value {
    let mut values = serde_json::Map::new();
    if let Some(s) = server {
        values.insert(SERVER_VALUE.into(), json!({"type": "REG_SZ", "value": s}));
    }
    if let Some(t) = token {
        values.insert(TOKEN_VALUE.into(), json!({"type": "REG_SZ", "value": t}));
    }
    json!({"hostname": "msi-pc", "registry": {INSTALL_KEY: values}})
}

/// `tenon-agent run` in the background, its stderr (the log) in a file.
struct Running {
    child: Child,
    log: std::path::PathBuf,
}

impl Running {
    fn start(agent: &SimAgent) -> Running {
        let log = agent.device_file.with_extension("log");
        let file = std::fs::File::create(&log).unwrap();
        let child = agent
            .command(&["run", "--interval", "2s"])
            .env("TENON_LOG", "info")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap();
        Running { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn still_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn status(agent: &SimAgent) -> Value {
    std::fs::read(agent.state_dir.join("status.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null)
}

fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn registry_values(agent: &SimAgent) -> Value {
    agent.device()["registry"][INSTALL_KEY].clone()
}

#[test]
fn enrolls_at_first_start_deletes_the_token_and_syncs() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("server"), "127.0.0.1:0");
    let token = server.enroll_token(1);
    let agent = SimAgent::new(tmp.path(), "pc", device(Some(&server.url), Some(&token)));
    let mut run = Running::start(&agent);
    wait_until("the agent synced", 60, || status(&agent)["config_version"].is_u64());
    let st = status(&agent);
    let id = st["device_id"].as_str().unwrap().to_string();
    assert!(st["enrollment_error"].is_null(), "{st}");
    assert!(registry_values(&agent).get(TOKEN_VALUE).is_none(), "token deleted: {}", registry_values(&agent));
    assert_eq!(registry_values(&agent)[SERVER_VALUE]["value"], server.url.as_str(), "the server value stays");
    let devices = server.ctl_json(&["devices", "list"]);
    assert_eq!(devices.as_array().unwrap().len(), 1);
    assert_eq!(devices[0]["id"], id.as_str());
    assert!(run.still_running());
    let log = run.log();
    assert!(log.contains("enrolled at first start"), "{log}");
    assert!(!log.contains(&token), "the token is never logged");
    assert!(!std::fs::read_to_string(agent.state_dir.join("status.json")).unwrap().contains(&token));
}

#[test]
fn a_used_up_token_keeps_the_agent_running_and_saying_why() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("server"), "127.0.0.1:0");
    let token = server.enroll_token(1);
    let first = SimAgent::new(tmp.path(), "first", json!({"hostname": "first"}));
    first.enroll(&server, &token);

    let agent = SimAgent::new(tmp.path(), "pc", device(Some(&server.url), Some(&token)));
    let mut run = Running::start(&agent);
    wait_until("enrollment_error is set", 60, || status(&agent)["enrollment_error"].is_string());
    // It retries (with backoff) and keeps running; the token stays for the next attempt.
    std::thread::sleep(Duration::from_secs(6));
    assert!(run.still_running(), "the agent keeps running: {}", run.log());
    let st = status(&agent);
    assert!(st["device_id"].is_null() && st["config_version"].is_null(), "{st}");
    assert_eq!(registry_values(&agent)[TOKEN_VALUE]["value"], token.as_str(), "kept for the retry");
    let shown = agent.status();
    assert!(shown["enrollment_error"].is_string(), "status --json shows it: {shown}");
    let log = run.log();
    assert!(log.contains("enrollment with"), "the log says why: {log}");
    assert!(!log.contains(&token) && !shown.to_string().contains(&token), "the token is never shown");
    assert_eq!(server.ctl_json(&["devices", "list"]).as_array().unwrap().len(), 1);
}

#[test]
fn without_a_server_it_waits_saying_how_to_enroll_then_picks_up_a_manual_enrollment() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("server"), "127.0.0.1:0");
    let agent = SimAgent::new(tmp.path(), "pc", json!({"hostname": "pc"}));
    let mut run = Running::start(&agent);
    wait_until("enrollment_error is set", 60, || status(&agent)["enrollment_error"].is_string());
    assert!(run.still_running());
    let why = status(&agent)["enrollment_error"].as_str().unwrap().to_string();
    assert!(why.contains("tenon-agent enroll --server URL --token-file FILE"), "{why}");
    // The status file and the log are written one after the other: the log line may come a moment later.
    wait_until("the log says how to enroll", 10, || {
        run.log().contains("tenon-agent enroll --server URL --token-file FILE")
    });

    let token = server.enroll_token(1);
    let id = agent.enroll(&server, &token);
    wait_until("the waiting agent synced", 60, || status(&agent)["config_version"].is_u64());
    let st = status(&agent);
    assert_eq!(st["device_id"], id.as_str());
    assert!(st["enrollment_error"].is_null(), "{st}");
    assert!(run.still_running());
}
