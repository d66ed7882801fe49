//! Holes an adversarial test found (issue 10), each reproduced against the real binaries: role
//! escalation through token creation, forged report versions, hostile report fields, enrollment
//! with another server's fingerprint, unaudited reads of unknown devices, and database file modes.

mod common;

use common::{Server, SimAgent};
use serde_json::{json, Value};

fn audit(server: &Server) -> Vec<Value> {
    server.ctl_json(&["audit", "list", "--limit", "1000"]).as_array().unwrap().clone()
}

/// The device credential an agent holds (read through the agent library, as the agent would).
fn credential(agent: &SimAgent) -> String {
    let platform = tenon_agent::platform::simulated::SimulatedPlatform::open(&agent.device_file).unwrap();
    tenon_agent::vault::Vault::new(&agent.state_dir, &platform).load().unwrap().state.credential
}

/// POSTs `body` to a device endpoint with `credential`; returns the status and the body.
fn device_post(server: &Server, path: &str, credential: &str, body: &str) -> (u16, Value) {
    let resp = ureq::post(&format!("{}/api/v1{path}", server.url))
        .set("Authorization", &format!("Bearer {credential}"))
        .set("Content-Type", "application/json")
        .send_string(body);
    let (status, resp) = match resp {
        Ok(r) => (r.status(), r),
        Err(ureq::Error::Status(s, r)) => (s, r),
        Err(e) => panic!("request failed: {e}"),
    };
    let text = resp.into_string().unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

fn report_body(agent_version: &str, hostname: &str, config_version: &str, last_error: Value) -> String {
    format!(
        r#"{{"agent_version": {}, "hostname": {}, "signed_in_users": [], "config_version": {config_version},
             "config_sha256": null, "last_error": {last_error}, "policies": {{}}}}"#,
        json!(agent_version),
        json!(hostname)
    )
}

#[test]
fn a_token_grants_only_the_roles_it_holds() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"), "127.0.0.1:0");
    let helpdesk = server.ctl_ok(&["admin-tokens", "create", "helpdesk", "--role", "admin"]).trim().to_string();

    // The escalation: an admin-only token mints itself a recovery-keys token. Refused, audited.
    for roles in [vec!["--role", "recovery-keys"], vec!["--role", "admin", "--role", "recovery-keys"]] {
        let mut args = vec!["admin-tokens", "create", "escalated"];
        args.extend(roles);
        let out = server.ctl_as(&helpdesk, &args);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("HTTP 403"), "{out:?}");
    }
    let raw = ureq::post(&format!("{}/api/v1/admin/tokens", server.url))
        .set("Authorization", &format!("Bearer {helpdesk}"))
        .send_json(json!({"name": "escalated", "roles": ["recovery-keys"]}));
    let Err(ureq::Error::Status(403, resp)) = raw else { panic!("expected 403, got {raw:?}") };
    assert_eq!(resp.header("Content-Type"), Some("application/problem+json"));
    let problem: Value = resp.into_json().unwrap();
    assert_eq!(problem["code"], json!("forbidden"));
    let names: Vec<String> = server
        .ctl_json(&["admin-tokens", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["bootstrap", "helpdesk"], "no escalated token exists");
    let denied: Vec<Value> =
        audit(&server).into_iter().filter(|e| e["action"] == json!("admin_token.create_denied")).collect();
    assert_eq!(denied.len(), 3, "each refusal is audited");
    assert!(denied.iter().all(|e| e["actor"].as_str().unwrap().starts_with("helpdesk")
        && e["details"]["missing_roles"] == json!(["recovery-keys"])));

    // What it holds it may grant; the bootstrap token holds both roles and grants both.
    assert!(server.ctl_as(&helpdesk, &["admin-tokens", "create", "deputy", "--role", "admin"]).status.success());
    let officer = server.ctl_ok(&["admin-tokens", "create", "officer", "--role", "recovery-keys"]).trim().to_string();
    // A recovery-keys-only token cannot create tokens at all (that needs admin).
    let out = server.ctl_as(&officer, &["admin-tokens", "create", "x", "--role", "recovery-keys"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("HTTP 403"), "{out:?}");
    let both = server.ctl_json(&["admin-tokens", "create", "both", "--role", "admin", "--role", "recovery-keys"]);
    let both = both["token"].as_str().unwrap();
    assert!(server.ctl_as(both, &["admin-tokens", "create", "officer2", "--role", "recovery-keys"]).status.success());
    server.stop();
}

#[test]
fn a_report_cannot_push_the_servers_versions() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"), "127.0.0.1:0");
    let token = server.enroll_token(2);
    let a = SimAgent::new(tmp.path(), "a", json!({"hostname": "PC-A"}));
    let id = a.enroll(&server, &token);
    a.ok(&["sync", "--once"]);
    let issued = server.ctl_json(&["devices", "show", &id])["config_version"].as_u64().unwrap();
    let cred = credential(&a);

    // The forged claims: 2^63 (the reproduction), u64::MAX (which wrapped to 0), 2^53 + 1 (which
    // canonical JSON cannot carry exactly). Each is accepted as a report and ignored as a version.
    for claim in ["9223372036854775808", "18446744073709551615", "9007199254740993"] {
        let (status, body) =
            device_post(&server, "/device/report", &cred, &report_body("0.1.0", "PC-A", claim, json!(null)));
        assert_eq!(status, 202, "{body}");
        let shown = server.ctl_json(&["devices", "show", &id]);
        assert_eq!(shown["config_version"].as_u64(), Some(issued), "claim {claim} moved the server's version");
    }
    // Past u64 it is not a report at all.
    let (status, _) = device_post(
        &server,
        "/device/report",
        &cred,
        &report_body("0.1.0", "PC-A", "18446744073709551616", json!(null)),
    );
    assert_eq!(status, 400);
    let suspicious: Vec<Value> =
        audit(&server).into_iter().filter(|e| e["action"] == json!("device.suspicious_report")).collect();
    assert_eq!(suspicious.len(), 3, "each distinct claim is recorded once: {suspicious:?}");
    assert!(suspicious.iter().any(|e| e["details"]["claimed_version"] == json!(9223372036854775808u64)
        && e["details"]["issued_version"] == json!(issued)));
    // The same claim again is not audited again.
    device_post(&server, "/device/report", &cred, &report_body("0.1.0", "PC-A", "9007199254740993", json!(null)));
    assert_eq!(audit(&server).iter().filter(|e| e["action"] == json!("device.suspicious_report")).count(), 3);

    // The device is not frozen: the next change arrives with the next version.
    server.ctl_ok(&["settings", "set", "--tenant", "Policies.SetNetworkOptimizationID", "false"]);
    assert!(a.ok(&["sync", "--once"]).contains("sync updated"));
    let s = a.status();
    assert_eq!(s["config_version"].as_u64(), Some(issued + 1));
    assert_eq!(s["last_error"], json!(null));

    // A "held envelope" proves a version only if this server signed it for this device.
    let (status, _) = device_post(&server, "/device/config/held", &cred, "{\"signed\": {}, \"signatures\": []}");
    assert_eq!(status, 400);
    let b = SimAgent::new(tmp.path(), "b", json!({"hostname": "PC-B"}));
    b.enroll(&server, &token);
    b.ok(&["sync", "--once"]);
    let platform = tenon_agent::platform::simulated::SimulatedPlatform::open(&b.device_file).unwrap();
    let b_envelope = tenon_agent::vault::Vault::new(&b.state_dir, &platform).load().unwrap().state.envelope.unwrap();
    let (status, body) = device_post(&server, "/device/config/held", &cred, &b_envelope);
    assert_eq!(status, 400, "another device's envelope proves nothing: {body}");
    assert_eq!(server.ctl_json(&["devices", "show", &id])["config_version"].as_u64(), Some(issued + 1));
    server.stop();
}

#[test]
fn report_fields_are_bounded_and_hostile_text_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"), "127.0.0.1:0");
    let a = SimAgent::new(tmp.path(), "a", json!({"hostname": "PC-A"}));
    let id = a.enroll(&server, &server.enroll_token(1));
    a.ok(&["sync", "--once"]);
    let cred = credential(&a);
    // A host name like the reproduction's (1,000,000 characters) is over the report size cap (100,000
    // is enough to show it); one that fits the cap is still refused as a host name.
    let oversized = ureq::post(&format!("{}/api/v1/device/report", server.url))
        .set("Authorization", &format!("Bearer {cred}"))
        .set("Content-Type", "application/json")
        .send_string(&report_body("0.1.0", &"a".repeat(100_000), "1", json!(null)));
    match oversized {
        Err(ureq::Error::Status(413, _)) => {}
        // Refused before the body was read: the server answers 413 and closes while the client is
        // still writing, which the client may see as a broken pipe. Either way nothing is stored.
        Err(ureq::Error::Transport(t)) if t.to_string().contains("Broken pipe") || t.to_string().contains("reset") => {}
        other => panic!("an oversized report must be refused, got {other:?}"),
    }
    let long_host = "a".repeat(60_000);
    let long_error = "e".repeat(5000);
    let cases = [
        ("0.1.0", long_host.as_str(), json!(null)),
        ("0.1.0", "PC\u{1b}]0;owned\u{7}\u{1b}[2J", json!(null)),
        ("0.1.0", "<img src=x onerror=alert(1)>", json!(null)),
        ("\u{1b}[31m0.1.0", "PC-A", json!(null)),
        ("0.1.0", "PC-A", json!("boom \u{1b}[2J")),
        ("0.1.0", "PC-A", json!(long_error)),
    ];
    for (version, host, error) in cases {
        let (status, body) = device_post(&server, "/device/report", &cred, &report_body(version, host, "1", error));
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["code"], json!("bad_request"));
    }
    let shown = server.ctl_json(&["devices", "show", &id]);
    assert_eq!(shown["hostname"], json!("PC-A"));
    assert!(!server.ctl_ok(&["devices", "list"]).contains('\u{1b}'));

    // The same bounds hold at enrollment.
    let token = server.enroll_token(1);
    let resp = ureq::post(&format!("{}/api/v1/enroll", server.url))
        .send_json(json!({"token": token, "hostname": "PC\u{1b}[2J", "agent_version": "0.1.0"}));
    assert!(matches!(resp, Err(ureq::Error::Status(400, _))), "{resp:?}");
    // And a real agent whose errors carry control characters still reports (it cleans them).
    let mut d = a.device();
    d["hostname"] = json!("bad host\u{1b}");
    a.set_device(&d);
    a.ok(&["sync", "--once"]);
    let shown = server.ctl_json(&["devices", "show", &id]);
    assert_eq!(shown["hostname"], json!("unknown"));
    assert!(shown["last_error"].as_str().unwrap().contains("not a valid DNS or NetBIOS name"), "{shown}");
    assert!(!shown["last_error"].as_str().unwrap().contains('\u{1b}'));
    server.stop();
}

#[test]
fn a_token_with_another_servers_fingerprint_uses_up_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"), "127.0.0.1:0");
    let token = server.enroll_token(1);
    let (head, _fingerprint) = token.rsplit_once('.').unwrap();
    let forged = format!("{head}.{}", "a".repeat(64));

    // The agent checks the root key before the token leaves the machine.
    let a = SimAgent::new(tmp.path(), "a", json!({"hostname": "PC-A"}));
    let out = a.run(&["enroll", "--server", &server.url, "--token", &forged]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("root key"), "{out:?}");
    // And the server refuses such a token without using it (an older or hostile agent skips the check).
    let resp = ureq::post(&format!("{}/api/v1/enroll", server.url))
        .send_json(json!({"token": forged, "hostname": "PC-A", "agent_version": "0.1.0"}));
    assert!(matches!(resp, Err(ureq::Error::Status(400, _))), "{resp:?}");
    assert_eq!(server.ctl_json(&["devices", "list"]), json!([]), "no orphan device");
    // The single use is still there for the real token.
    let id = a.enroll(&server, &token);
    assert_eq!(server.ctl_json(&["devices", "list"])[0]["id"], json!(id));
    server.stop();
}

#[test]
fn unknown_devices_are_404_and_reads_of_them_are_audited() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"), "127.0.0.1:0");
    let ghost = "00000000-0000-4000-8000-000000000000";
    let out = server.ctl(&["recovery-keys", "show", ghost]);
    assert_eq!(out.status.code(), Some(1));
    assert!(audit(&server).iter().any(|e| e["action"] == json!("recovery_key.read")
        && e["target"] == json!(ghost)
        && e["details"]["device_known"] == json!(false)));
    for path in ["reports", "config"] {
        let resp = ureq::get(&format!("{}/api/v1/admin/devices/{ghost}/{path}", server.url))
            .set("Authorization", &format!("Bearer {}", server.token))
            .call();
        let Err(ureq::Error::Status(404, resp)) = resp else { panic!("{path}: expected 404, got {resp:?}") };
        assert_eq!(resp.header("Content-Type"), Some("application/problem+json"));
    }
    server.stop();
}

#[cfg(unix)]
#[test]
fn database_files_are_readable_by_the_owner_alone() {
    use std::os::unix::fs::PermissionsExt;
    if common::sqlite_only("checks the file modes of DATA_DIR/tenon.db and its -wal and -shm files") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mode = |f: &str| std::fs::metadata(data.join(f)).unwrap().permissions().mode() & 0o777;
    let server = Server::start(&data, "127.0.0.1:0");
    let a = SimAgent::new(tmp.path(), "a", json!({"hostname": "PC-A"}));
    a.enroll(&server, &server.enroll_token(1));
    for f in ["tenon.db", "tenon.db-wal", "tenon.db-shm"] {
        assert_eq!(mode(f), 0o600, "{f}");
    }
    server.stop();
    // A database left world-readable by an older version is tightened at start.
    std::fs::set_permissions(data.join("tenon.db"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let server = Server::start(&data, "127.0.0.1:0");
    assert_eq!(mode("tenon.db"), 0o600);
    server.stop();
}
