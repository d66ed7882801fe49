//! The write path under concurrency: enrollments and reports group-committed by one writer, and a
//! change that reaches many devices re-signed in the background while `tenonctl --wait` follows
//! it. Every address is loopback.

mod common;

use common::Server;
use serde_json::{json, Value};
use std::collections::BTreeSet;

const NO_LIMITS: &[&str] =
    &["--enroll-rate-per-address", "off", "--enroll-rate-per-token", "off", "--report-rate-per-address", "off"];

/// Enrolls `n` devices from `threads` threads at once; returns (id, credential, etag) of each.
fn enroll_many(server: &Server, token: &str, n: usize, threads: usize) -> Vec<(String, String, String)> {
    let url = server.url.clone();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (url, token) = (url.clone(), token.to_string());
            std::thread::spawn(move || {
                let agent = ureq::agent();
                (t..n)
                    .step_by(threads)
                    .map(|i| {
                        let v: Value = agent
                            .post(&format!("{url}/api/v1/enroll"))
                            .send_json(
                                json!({"token": token, "hostname": format!("PC-{i:05}"), "agent_version": "test"}),
                            )
                            .unwrap_or_else(|e| panic!("enrollment {i} failed: {e}"))
                            .into_json()
                            .unwrap();
                        let cred = v["credential"].as_str().unwrap().to_string();
                        let etag = agent
                            .get(&format!("{url}/api/v1/device/config"))
                            .set("Authorization", &format!("Bearer {cred}"))
                            .call()
                            .unwrap()
                            .header("ETag")
                            .unwrap()
                            .to_string();
                        (v["device_id"].as_str().unwrap().to_string(), cred, etag)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
}

fn report(i: usize, n: usize) -> Value {
    json!({"agent_version": "test", "hostname": format!("PC-{i:05}"), "signed_in_users": [],
           "config_version": null, "config_sha256": null, "last_error": null,
           "policies": {"bench": {"state": "ok", "details": {"n": n}}}})
}

#[test]
fn concurrent_enrollments_and_reports_all_commit_and_each_token_use_counts_once() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start_with(&tmp.path().join("data"), "127.0.0.1:0", NO_LIMITS);
    const N: usize = 400;
    let token = server.enroll_token(N as u32);
    let devices = enroll_many(&server, &token, N, 16);
    let ids: BTreeSet<&str> = devices.iter().map(|d| d.0.as_str()).collect();
    assert_eq!(ids.len(), N, "every enrollment got its own device");

    // The token had exactly N uses: one more enrollment is refused, none was counted twice.
    let extra = ureq::post(&format!("{}/api/v1/enroll", server.url))
        .send_json(json!({"token": token, "hostname": "PC-EXTRA", "agent_version": "test"}));
    match extra {
        Err(ureq::Error::Status(401, r)) => assert!(r.into_string().unwrap().contains("no uses left")),
        other => panic!("the token should be used up: {other:?}"),
    }

    // Every device reports twice at once from 16 threads: every report is acknowledged (202),
    // none gets a 5xx, and each acknowledged report is in the device's history.
    let url = server.url.clone();
    let handles: Vec<_> = (0..16)
        .map(|t| {
            let chunk: Vec<_> = devices.iter().enumerate().skip(t).step_by(16).map(|(i, d)| (i, d.1.clone())).collect();
            let url = url.clone();
            std::thread::spawn(move || {
                let agent = ureq::agent();
                for round in 0..2 {
                    for (i, cred) in &chunk {
                        let r = agent
                            .post(&format!("{url}/api/v1/device/report"))
                            .set("Authorization", &format!("Bearer {cred}"))
                            .send_json(report(*i, round))
                            .unwrap_or_else(|e| panic!("report of device {i} failed: {e}"));
                        assert_eq!(r.status(), 202);
                        let v: Value = r.into_json().unwrap();
                        assert!(v["etag"].as_str().is_some_and(|e| e.starts_with('"')), "{v}");
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    for (id, _, _) in devices.iter().step_by(37) {
        let history = server.ctl_json(&["devices", "reports", id]);
        assert_eq!(history.as_array().map(Vec::len), Some(2), "both reports of {id} are stored: {history}");
    }
    let audit = server.ctl_json(&["audit", "list", "--limit", "1000"]);
    let enrolls = audit.as_array().unwrap().iter().filter(|e| e["action"] == json!("device.enroll")).count();
    assert_eq!(enrolls, N, "each enrollment is audited once");
    assert!(!server.log_tail().contains("database is locked"), "{}", server.log_tail());
}

#[test]
fn a_change_reaching_many_devices_is_resigned_in_the_background_and_wait_follows_it() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start_with(&tmp.path().join("data"), "127.0.0.1:0", NO_LIMITS);
    const N: usize = 3_000;
    let token = server.enroll_token(N as u32);
    let devices = enroll_many(&server, &token, N, 16);

    // The answer names how many devices the change reaches and the generation to wait for.
    let v = server.ctl_json(&["settings", "set", "--tenant", "Custom.Wave", "1"]);
    assert_eq!(v["devices_to_resign"], json!(N), "{v}");
    let generation = v["resign_generation"].as_u64().expect("a generation");
    if v["resign_complete"] == json!(true) {
        assert_eq!(v["devices_updated"], json!(N), "{v}");
    } else {
        assert_eq!(v["devices_updated"], Value::Null, "{v}");
    }

    // --wait returns only once every device's check-in serves the change.
    let out = server.ctl_ok(&["--wait", "settings", "set", "--tenant", "Custom.Wave", "2"]);
    assert!(out.contains("set Custom.Wave; ") && out.contains("devices re-signed"), "{out}");
    let status = server.ctl_json(&["resign", "status"]);
    assert!(status["completed_generation"].as_u64().unwrap() > generation, "{status}");
    assert_eq!(status["queued"], json!(0), "{status}");

    // Every device gets a new envelope carrying the second value.
    let agent = ureq::agent();
    for (id, cred, etag) in &devices {
        let r = agent
            .get(&format!("{}/api/v1/device/config", server.url))
            .set("Authorization", &format!("Bearer {cred}"))
            .set("If-None-Match", etag)
            .call()
            .unwrap();
        assert_eq!(r.status(), 200, "device {id} still holds its first envelope");
        let env: Value = r.into_json().unwrap();
        let payload = env["signed"]["payload"].to_string();
        assert!(payload.contains("\"Wave\":2"), "device {id}: {payload:.300}");
    }
    let status = server.ctl_ok(&["resign", "status"]);
    assert!(status.contains("nothing to re-sign"), "{status}");
}
