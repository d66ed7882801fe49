//! End to end: the real server binary, tenonctl and two simulated agents.

mod common;

use common::{KillOnDrop, Server, SimAgent};
use serde_json::json;

fn users_file(dir: &std::path::Path) -> std::path::PathBuf {
    let p = dir.join("users.json");
    let users = json!([
        {"userPrincipalName": "anna@contoso.com", "id": "u-anna", "displayName": "Anna Adams", "groups": ["Engineering"]},
        {"userPrincipalName": "ben@contoso.com", "id": "u-ben", "displayName": "Ben Brown", "groups": ["Sales"]}
    ]);
    std::fs::write(&p, users.to_string()).unwrap();
    p
}

#[test]
fn two_agents_get_their_own_config_and_survive_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = Server::start(&data, "127.0.0.1:0");
    let addr = server.addr.clone();

    server.ctl_ok(&["users", "import", users_file(tmp.path()).to_str().unwrap()]);
    server.ctl_ok(&["settings", "set", "--tenant", "Custom.Common", "1"]);
    server.ctl_ok(&["settings", "set", "--group", "Engineering", "Custom.Team", "\"eng\""]);
    server.ctl_ok(&["settings", "set", "--group", "Sales", "Custom.Team", "\"sales\""]);
    server.ctl_ok(&[
        "settings",
        "set",
        "--user",
        "ben@contoso.com",
        "SoftwarePackageOverrides.IgnoreUserRestrictions",
        "true",
    ]);

    let token = server.enroll_token(2);
    let a = SimAgent::new(tmp.path(), "a", json!({"hostname": "PC-ANNA", "signed_in_users": ["anna@contoso.com"]}));
    let b = SimAgent::new(tmp.path(), "b", json!({"hostname": "PC-BEN", "signed_in_users": ["ben@contoso.com"]}));
    let id_a = a.enroll(&server, &token);
    let id_b = b.enroll(&server, &token);
    assert_ne!(id_a, id_b);
    // The token had two uses.
    let c = SimAgent::new(tmp.path(), "c", json!({"hostname": "PC-3"}));
    let out = c.run(&["enroll", "--server", &server.url, "--token", &token]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no uses left"));

    a.ok(&["sync", "--once"]);
    b.ok(&["sync", "--once"]);

    // Each holds its own effective config, as the server compiled it.
    let pa = a.held_payload();
    let pb = b.held_payload();
    assert_eq!(pa["machine"]["Custom"], json!({"Common": 1, "Team": "eng"}));
    assert_eq!(pb["machine"]["Custom"], json!({"Common": 1, "Team": "sales"}));
    assert_eq!(pa["machine"]["Client"]["PrimaryUser"], json!("anna@contoso.com"));
    assert_eq!(pa["users"]["anna@contoso.com"]["Client"]["IsPrimaryOfUser"], json!(true));
    // Backend-only keys never reach the device.
    assert!(pb["machine"].get("SoftwarePackageOverrides").is_none());
    assert!(pb["users"]["ben@contoso.com"].get("SoftwarePackageOverrides").is_none());
    assert_eq!(pb["machine"]["Client"]["MandatoryInstalls"]["IgnoreUserRestrictions"], json!(true));

    let show_a = server.ctl_json(&["devices", "show", &id_a]);
    let status_a = a.status();
    assert_eq!(show_a["primary_user"], json!("anna@contoso.com"));
    assert_eq!(show_a["hostname"], json!("PC-ANNA"));
    assert_eq!(status_a["device_id"], json!(id_a));
    assert_eq!(status_a["config_version"], show_a["config_version"]);
    assert_eq!(status_a["config_sha256"], show_a["config_sha256"]);
    assert_eq!(status_a["last_error"], json!(null));
    assert!(status_a["last_sync"].is_string());
    assert!(show_a["last_seen"].is_string());
    assert!(show_a["policies"].is_object());
    let list = server.ctl_json(&["devices", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 2);

    // An unchanged sync is a 304: the agent says so, and the raw check-in has no body.
    let v_a = status_a["config_version"].as_u64().unwrap();
    let out = a.ok(&["sync", "--once"]);
    assert!(out.contains("sync unchanged"), "{out}");
    assert_eq!(a.status()["config_version"], json!(v_a));

    // A group change reaches only that group's devices, with a higher version.
    let v_b = b.status()["config_version"].as_u64().unwrap();
    server.ctl_ok(&["settings", "set", "--group", "Sales", "Custom.Team", "\"sales-2\""]);
    assert!(b.ok(&["sync", "--once"]).contains("sync updated"));
    assert!(a.ok(&["sync", "--once"]).contains("sync unchanged"));
    assert!(b.status()["config_version"].as_u64().unwrap() > v_b);
    assert_eq!(a.status()["config_version"], json!(v_a));
    assert_eq!(b.held_payload()["machine"]["Custom"]["Team"], json!("sales-2"));
    assert_eq!(a.held_payload()["machine"]["Custom"]["Team"], json!("eng"));

    // A restart loses nothing and the agents carry on.
    let before = server.ctl_json(&["devices", "list"]);
    let settings_before = server.ctl_json(&["settings", "list"]);
    server.stop();
    let server = Server::start(&data, &addr);
    assert_eq!(server.ctl_json(&["settings", "list"]), settings_before);
    let after = server.ctl_json(&["devices", "list"]);
    for (x, y) in before.as_array().unwrap().iter().zip(after.as_array().unwrap()) {
        for k in ["id", "hostname", "primary_user", "config_version", "config_sha256"] {
            assert_eq!(x[k], y[k], "{k} changed across a restart");
        }
    }
    assert!(a.ok(&["sync", "--once"]).contains("sync unchanged"));
    assert!(b.ok(&["sync", "--once"]).contains("sync unchanged"));
    server.ctl_ok(&["settings", "unset", "--group", "Sales", "Custom.Team"]);
    assert!(b.ok(&["sync", "--once"]).contains("sync updated"));
    assert!(b.held_payload()["machine"]["Custom"].get("Team").is_none());
    assert!(b.status()["config_version"].as_u64().unwrap() > v_b + 1);
    server.stop();
}

#[test]
fn unchanged_check_in_is_a_304_without_a_body() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"), "127.0.0.1:0");
    let token = server.enroll_token(1);
    let resp: serde_json::Value = ureq::post(&format!("{}/api/v1/enroll", server.url))
        .send_json(json!({"token": token, "hostname": "PC", "agent_version": "t"}))
        .unwrap()
        .into_json()
        .unwrap();
    let cred = resp["credential"].as_str().unwrap();
    let url = format!("{}/api/v1/device/config", server.url);
    let first = ureq::get(&url).set("Authorization", &format!("Bearer {cred}")).call().unwrap();
    assert_eq!(first.status(), 200);
    let etag = first.header("ETag").unwrap().to_string();
    let second =
        ureq::get(&url).set("Authorization", &format!("Bearer {cred}")).set("If-None-Match", &etag).call().unwrap();
    assert_eq!(second.status(), 304);
    assert_eq!(second.header("ETag"), Some(etag.as_str()));
    assert_eq!(second.into_string().unwrap(), "");
    server.stop();
}

#[test]
fn run_loop_backs_off_while_the_server_is_down_and_recovers() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = Server::start(&data, "127.0.0.1:0");
    let addr = server.addr.clone();
    let token = server.enroll_token(1);
    let a = SimAgent::new(tmp.path(), "a", json!({"hostname": "PC-RUN", "signed_in_users": []}));
    a.enroll(&server, &token);
    server.stop();

    // The agent starts while the server is down.
    let mut run = KillOnDrop(
        std::process::Command::new(common::bin("tenon-agent"))
            .arg("--state-dir")
            .arg(&a.state_dir)
            .arg("--platform")
            .arg(format!("simulated:{}", a.device_file.display()))
            .args(["run", "--interval", "1s"])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while a.status()["last_sync_result"] != json!("failed") {
        assert!(std::time::Instant::now() < deadline, "the agent never recorded the failed sync");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(a.status()["last_error"].as_str().unwrap().contains("unreachable"), "{}", a.status());

    // The server comes back on the same address; the agent's backoff brings it back without help.
    let server = Server::start(&data, &addr);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let s = a.status();
        if s["last_error"].is_null() && s["config_version"].as_u64().is_some() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the agent did not recover: {s}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let _ = run.kill();
    let _ = run.wait();
    server.stop();
}

#[test]
fn signing_key_rotation_reaches_agents_through_the_root_signed_key_list() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = Server::start(&data, "127.0.0.1:0");
    let addr = server.addr.clone();
    let token = server.enroll_token(1);
    let a = SimAgent::new(tmp.path(), "a", json!({"hostname": "PC-ROT"}));
    a.enroll(&server, &token);
    a.ok(&["sync", "--once"]);
    let before = a.status()["config_version"].as_u64().unwrap();

    // While the server runs, rotation is refused (the data dir is locked).
    let busy = common::server_command("rotate-signing-key", &data).output().unwrap();
    assert_eq!(busy.status.code(), Some(1));
    server.stop();
    let out = common::server_command("rotate-signing-key", &data).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let server = Server::start(&data, &addr);
    // The server serves the stored envelopes at once and re-signs every device with the new key
    // in the background; `resign status` says when that is done.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let st = server.ctl_json(&["resign", "status"]);
        if st["queued"] == json!(0)
            && st["total"] == json!(0)
            && st["completed_generation"] == st["requested_generation"]
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "re-signing after the rotation did not finish: {st}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(a.ok(&["sync", "--once"]).contains("sync updated"));
    let s = a.status();
    assert_eq!(s["last_error"], json!(null));
    assert!(s["config_version"].as_u64().unwrap() > before);
    let trust: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.join("keys/keylist-2.json")).unwrap()).unwrap();
    assert_eq!(trust["signed"]["version"], json!(2));
    server.stop();
}

#[test]
fn a_database_restored_from_backup_continues_above_the_devices_version() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = Server::start(&data, "127.0.0.1:0");
    let addr = server.addr.clone();
    let token = server.enroll_token(1);
    let a = SimAgent::new(tmp.path(), "a", json!({"hostname": "PC-BAK"}));
    a.enroll(&server, &token);
    a.ok(&["sync", "--once"]);
    server.stop();
    common::snapshot_store(&data, "backup");

    let server = Server::start(&data, &addr);
    server.ctl_ok(&["settings", "set", "--tenant", "Custom.Step", "1"]);
    server.ctl_ok(&["settings", "set", "--tenant", "Custom.Step", "2"]);
    a.ok(&["sync", "--once"]);
    let held = a.status()["config_version"].as_u64().unwrap();
    server.stop();
    common::restore_store(&data, "backup");

    // The restored server is behind: its envelope is refused as a rollback, the report tells the
    // server what the device holds, and the next sync gets a version above it.
    let server = Server::start(&data, &addr);
    let out = a.run(&["sync", "--once"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(a.status()["last_error"].as_str().unwrap().contains("rollback"));
    assert_eq!(a.status()["config_version"], json!(held));
    assert!(a.ok(&["sync", "--once"]).contains("sync updated"));
    assert!(a.status()["config_version"].as_u64().unwrap() > held);
    assert_eq!(a.status()["last_error"], json!(null));
    server.stop();
}
