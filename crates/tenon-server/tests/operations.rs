//! Running the server as an operator does: the systemd unit in `deploy/` (checked by
//! `systemd-analyze verify`), the config file (every flag a key, flags win), and JSON logs.

mod common;

use common::bin;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn the_systemd_unit_verifies_and_is_sandboxed() {
    let unit = std::fs::read_to_string(repo().join("deploy/tenon-server.service")).unwrap();
    for directive in [
        "User=tenon",
        "ExecStart=/usr/local/bin/tenon-server serve --config /etc/tenon/server.toml",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/tenon",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "Restart=on-failure",
    ] {
        assert!(unit.lines().any(|l| l == directive), "the unit lacks {directive}");
    }
    let Ok(probe) = Command::new("systemd-analyze").arg("--version").output() else {
        // Debian's systemd package brings it; CI machines have it.
        println!("skipped the systemd-analyze part: systemd-analyze is not installed");
        return;
    };
    assert!(probe.status.success());
    // verify checks that ExecStart's binary exists: point it at the one just built.
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("tenon-server.service");
    std::fs::write(&copy, unit.replace("/usr/local/bin/tenon-server", bin("tenon-server").to_str().unwrap())).unwrap();
    let out = Command::new("systemd-analyze").arg("verify").arg(&copy).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify failed: {stderr}");
    // It reports bad values as warnings with exit 0: none may mention the unit.
    assert!(!stderr.contains("tenon-server.service"), "systemd-analyze complained: {stderr}");
}

/// Starts `tenon-server` with `args` (and `TENON_CONFIG`, if given); returns the child, the address
/// it listens on and its stderr file.
fn start(args: &[&str], dir: &Path, config_env: Option<&Path>) -> (std::process::Child, String, PathBuf) {
    let log = dir.join("stderr.log");
    let mut cmd = Command::new(bin("tenon-server"));
    if let Some(c) = config_env {
        cmd.env("TENON_CONFIG", c);
    }
    let mut child = cmd.args(args).stdout(Stdio::piped()).stderr(std::fs::File::create(&log).unwrap()).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(30);
    let addr = loop {
        assert!(Instant::now() < deadline, "server did not start");
        let line = lines.next().expect("server exited early").unwrap();
        if let Some(rest) = line.strip_prefix("tenon-server listening on ") {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    (child, addr, log)
}

fn stop(mut child: std::process::Child) {
    let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
    let _ = child.wait();
}

#[test]
fn a_config_file_sets_every_flag_and_the_command_line_wins() {
    let tmp = tempfile::tempdir().unwrap();
    let from_file = tmp.path().join("from-file");
    let config = tmp.path().join("server.toml");
    // Under PostgreSQL the file names the data dir's database too (`database` is a flag like the others).
    let database = common::database_url_for(&from_file).map(|url| format!("database = {url:?}\n")).unwrap_or_default();
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = {:?}\nenvelope-ttl = \"2d\"\nlog-format = \"json\"\n{database}",
            from_file
        ),
    )
    .unwrap();
    let (child, addr, log) = start(&["serve", "--config", config.to_str().unwrap()], tmp.path(), None);
    assert!(from_file.join("admin.token").exists(), "the data dir came from the file");
    assert!(ureq::get(&format!("{addr}/healthz")).call().is_ok());
    stop(child);
    // JSON logs: every line an object with a level and a message.
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).expect("a JSON log line")).collect();
    assert!(lines.iter().any(|l| l["message"] == "listening" && l["level"] == "INFO"), "{text}");

    // A flag on the command line beats the file (and so does TENON_CONFIG for the file itself).
    let from_flag = tmp.path().join("from-flag");
    let run2 = tmp.path().join("run2");
    std::fs::create_dir_all(&run2).unwrap();
    let database = common::database_args(&from_flag);
    let mut args = vec!["serve", "--data-dir", from_flag.to_str().unwrap(), "--log-format", "text"];
    args.extend(database.iter().map(String::as_str));
    let (child, _, log) = start(&args, &run2, Some(&config));
    assert!(from_flag.join("admin.token").exists());
    stop(child);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.lines().all(|l| serde_json::from_str::<Value>(l).is_err()), "text logs: {text}");
    assert!(!text.contains('\u{1b}'), "no colour codes in a log file: {text}");

    // Unknown keys and wrong types are refused by name, before anything starts.
    std::fs::write(&config, "listen = \"127.0.0.1:0\"\ndata-dri = \"/tmp/x\"\n").unwrap();
    let out = Command::new(bin("tenon-server")).args(["serve", "--config", config.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown key \"data-dri\"") && err.contains("data-dir"), "{err}");
    std::fs::write(&config, "listen = [\n").unwrap();
    let out = Command::new(bin("tenon-server")).args(["serve", "--config", config.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not valid TOML"));

    // The sample in deploy/ uses only keys the server knows.
    let sample = repo().join("deploy/server.toml");
    let out = Command::new(bin("tenon-server"))
        .args(["serve", "--config", sample.to_str().unwrap(), "--help"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn metrics_count_check_ins_by_outcome_on_their_own_listener() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let metrics_addr = format!("127.0.0.1:{port}");
    let database = common::database_args(&data);
    let mut args = vec![
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
        "--metrics-listen",
        &metrics_addr,
    ];
    args.extend(database.iter().map(String::as_str));
    let (child, url, _log) = start(&args, tmp.path(), None);
    let token = std::fs::read_to_string(data.join("admin.token")).unwrap().trim().to_string();
    let ctl = |args: &[&str]| {
        let out =
            Command::new(bin("tenonctl")).args(["--server", &url, "--token", &token]).args(args).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let enroll = ctl(&["enroll-token", "create"]).trim().to_string();
    let agent = common::SimAgent::new(tmp.path(), "a", serde_json::json!({"hostname": "PC-M"}));
    let out = agent.command(&["enroll", "--server", &url, "--token", &enroll]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // `--report`: the second sync changes nothing, so without it the agent would send no report,
    // and the report counter below is to count two.
    for _ in 0..2 {
        let out = agent.command(&["sync", "--once", "--report"]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let bad = ureq::get(&format!("{url}/api/v1/device/config"))
        .set("Authorization", "Bearer tdev.00000000-0000-4000-8000-000000000000.nope")
        .call();
    assert!(matches!(bad, Err(ureq::Error::Status(401, _))));

    let text = ureq::get(&format!("http://{metrics_addr}/metrics")).call().unwrap().into_string().unwrap();
    let value = |series: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.trim().parse().ok()))
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
    };
    // Each sync checks in once: the first gets the envelope (200), the second a 304.
    assert!(value(r#"tenon_checkins_total{outcome="200"}"#) >= 1.0);
    assert!(value(r#"tenon_checkins_total{outcome="304"}"#) >= 1.0);
    assert_eq!(value(r#"tenon_checkins_total{outcome="401"}"#), 1.0);
    assert_eq!(value(r#"tenon_enrollments_total{outcome="201"}"#), 1.0);
    assert!(value(r#"tenon_reports_total{outcome="202"}"#) >= 2.0);
    assert!(value(r#"tenon_http_request_duration_seconds_count{route="/api/v1/device/config"}"#) >= 3.0);
    assert_eq!(value(r#"tenon_devices{last_seen="1h"}"#), 1.0);
    assert_eq!(value(r#"tenon_entra_escrows{state="pending"}"#), 0.0);
    assert!(!text.contains("00000000-0000-4000-8000"), "raw paths and ids never become labels");
    // The API listener does not serve them.
    assert!(matches!(ureq::get(&format!("{url}/metrics")).call(), Err(ureq::Error::Status(404, _))));
    stop(child);
}
