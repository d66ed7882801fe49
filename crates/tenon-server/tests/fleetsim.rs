//! `tenon-fleetsim` in the contract's form against a real server (and, in the postgres stage,
//! against two servers of one database, round robin): it enrolls the devices, checks them in
//! with their own credentials, reports, and prints what it measured.
mod common;

use common::*;
use serde_json::Value;
use std::process::Command;

fn fleetsim(servers: &str, token: &str, devices: usize) -> Value {
    let out = Command::new(bin("tenon-fleetsim"))
        .args(["--server", servers, "--devices", &devices.to_string(), "--interval", "1s", "--duration", "3s"])
        .args(["--token", token, "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

fn check(run: &Value, devices: u64) {
    assert_eq!(run["enrollment"]["enrolled"], devices, "{run}");
    let checkin = &run["kinds"]["checkin"];
    // 3 s at one check-in per device per second, open loop: about 3 per device.
    let count = checkin["count"].as_u64().unwrap();
    assert!(count >= 2 * devices, "check-ins: {checkin}");
    assert_eq!(checkin["errors_total"], 0, "{checkin}");
    let statuses = checkin["statuses"].as_object().unwrap();
    assert!(statuses.keys().all(|s| s == "200" || s == "304"), "{checkin}");
    assert!(statuses.get("304").and_then(Value::as_u64).unwrap_or(0) > 0, "devices hold their ETag: {checkin}");
    let p = &checkin["latency_ms"];
    assert!(
        p["p50"].as_f64().unwrap() <= p["p99"].as_f64().unwrap()
            && p["p99"].as_f64().unwrap() <= p["max"].as_f64().unwrap()
    );
    assert!(run["kinds"]["report"]["count"].as_u64().unwrap() > 0, "{run}");
}

#[test]
fn the_simulator_enrolls_checks_in_and_reports_against_a_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), "127.0.0.1:0");
    // An enrollment token, and an admin token (fleetsim creates the enrollment token itself).
    let run = fleetsim(&server.url, &server.enroll_token(40), 40);
    check(&run, 40);
    let run = fleetsim(&server.url, &server.token, 25);
    check(&run, 25);
    let devices = server.ctl_json(&["devices", "list", "--limit", "1000"]);
    assert_eq!(devices.as_array().unwrap().len(), 65);
}

#[test]
fn the_simulator_drives_two_servers_of_one_database_round_robin() {
    let Some(_) = pg_base() else {
        eprintln!("SKIPPED on SQLite: two servers need one PostgreSQL database (the postgres stage of scripts/test)");
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let (a_dir, b_dir) = (root.path().join("a"), root.path().join("b"));
    let a = Server::start(&a_dir, "127.0.0.1:0");
    // B serves A's database with A's keys.
    std::fs::create_dir_all(&b_dir).unwrap();
    assert!(Command::new("cp").arg("-a").arg(a_dir.join("keys")).arg(&b_dir).status().unwrap().success());
    std::fs::copy(a_dir.join("admin.token"), b_dir.join("admin.token")).unwrap();
    let url = database_url_for(&a_dir).unwrap();
    let b = Server::start_with(&b_dir, "127.0.0.1:0", &["--database", &url]);
    let run = fleetsim(&format!("{},{}", a.url, b.url), &a.token, 40);
    check(&run, 40);
    assert_eq!(run["servers"].as_array().unwrap().len(), 2);
    // Both servers know every device.
    for s in [&a, &b] {
        let devices = s.ctl_json(&["devices", "list", "--limit", "1000"]);
        assert_eq!(devices.as_array().unwrap().len(), 40);
    }
}
