//! An administrator's first hour (issue 12), end to end with the real binaries: the settings
//! schema refuses what it cannot mean, whole lifecycles (enrollment tokens, users, paging), truthful
//! statuses on a fresh device, secrets out of argv, and the small things that cost trust.

mod common;

use common::{bin, KillOnDrop, Server, SimAgent};
use serde_json::{json, Value};
use std::process::{Command, Output};

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn import(server: &Server, dir: &std::path::Path, users: Value) {
    let f = dir.join("users.json");
    std::fs::write(&f, users.to_string()).unwrap();
    server.ctl_ok(&["users", "import", f.to_str().unwrap()]);
}

#[test]
fn settings_refuse_unknown_keys_and_wrong_types_and_store_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"), "127.0.0.1:0");
    import(&server, tmp.path(), json!([{"userPrincipalName": "anna@contoso.com", "groups": ["Engineering"]}]));

    let refused = [
        (vec!["--tenant", "Policies.NoSuchThing", "true"], "unknown setting Policies.NoSuchThing"),
        (
            vec!["--tenant", "Policies.SetNetworkOptimizationId", "true"],
            "did you mean Policies.SetNetworkOptimizationID?",
        ),
        (vec!["--tenant", "Policies.SetNetworkOptimizationID", "5"], "must be true or false, not 5"),
        (vec!["--tenant", "Policies.SetNetworkOptimizationID", "\"yes\""], "must be true or false"),
        (vec!["--group", "Engineering", "Client.PrimaryUser", "\"anna@contoso.com\""], "set by the server"),
        (vec!["--group", "Engineering", "Devices.PrimaryUserDetectionWindowHours", "24"], "--tenant"),
    ];
    for (args, says) in refused {
        let mut all = vec!["settings", "set"];
        all.extend(&args);
        let out = server.ctl(&all);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains(says), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    }
    assert_eq!(server.ctl_json(&["settings", "list"]), json!([]), "nothing may be stored");
    assert!(!server.ctl_ok(&["audit", "list"]).contains("settings.set"));

    // Keys of one's own live under Custom.*; a group nobody is in is accepted with a warning.
    server.ctl_ok(&["settings", "set", "--tenant", "Custom.Site", "{\"code\": 7}"]);
    let out =
        server.ctl(&["settings", "set", "--group", "NoSuchGroup", "Policies.SetCurrentUserAdministrator", "true"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("warning: no user is in group NoSuchGroup"), "{}", stderr(&out));
    let out =
        server.ctl(&["settings", "set", "--group", "Engineering", "Policies.SetCurrentUserAdministrator", "true"]);
    assert!(!stderr(&out).contains("warning"), "{}", stderr(&out));
    assert_eq!(server.ctl_json(&["settings", "list"]).as_array().unwrap().len(), 3);

    // The schema is listed without a server or a token.
    let out = Command::new(bin("tenonctl"))
        .args(["--server", "http://127.0.0.1:9", "settings", "keys", "--json"])
        .env_remove("TENON_TOKEN")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let keys: Value = serde_json::from_slice(&out.stdout).unwrap();
    let dosetting = keys.as_array().unwrap().iter().find(|k| k["key"] == json!("Policies.SetNetworkOptimizationID"));
    let dosetting = dosetting.expect("the DO key is listed");
    assert_eq!((&dosetting["type"]["kind"], &dosetting["default"]), (&json!("bool"), &json!(true)));
    assert_eq!((&dosetting["scope"], &dosetting["delivery"]), (&json!("machine"), &json!("delivered")));
    server.stop();
}

#[test]
fn enrollment_tokens_are_listed_without_secrets_and_can_be_revoked() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"), "127.0.0.1:0");
    let one = server.enroll_token(1);
    let two = server.enroll_token(5);
    let id_of = |t: &str| t.split('.').nth(1).unwrap().to_string();

    let a = SimAgent::new(tmp.path(), "a", json!({"hostname": "PC-A"}));
    a.enroll(&server, &one);
    let out = server.ctl(&["enroll-token", "list", "--json"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    for t in [&one, &two] {
        let secret = t.split('.').nth(2).unwrap();
        assert!(!text.contains(secret), "a token secret is listed: {text}");
    }
    let list: Value = serde_json::from_str(&text).unwrap();
    let state =
        |id: &str| list.as_array().unwrap().iter().find(|t| t["id"] == json!(id)).map(|t| t["state"].clone()).unwrap();
    assert_eq!(state(&id_of(&one)), json!("used_up"));
    assert_eq!(state(&id_of(&two)), json!("active"));
    assert!(list[0]["expires_at"].as_str().unwrap().contains('T'), "RFC 3339: {list:#}");

    server.ctl_ok(&["enroll-token", "revoke", &id_of(&two)]);
    let b = SimAgent::new(tmp.path(), "b", json!({"hostname": "PC-B"}));
    let out = b.run(&["enroll", "--server", &server.url, "--token", &two]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("revoked"), "{}", stderr(&out));
    let again = server.ctl(&["enroll-token", "revoke", &id_of(&two)]);
    assert_eq!(again.status.code(), Some(1));
    assert!(stderr(&again).contains("already revoked"), "{}", stderr(&again));
    let unknown = server.ctl(&["enroll-token", "revoke", "nosuchid"]);
    assert!(stderr(&unknown).contains("enroll-token list"), "{}", stderr(&unknown));
    let list = server.ctl_json(&["enroll-token", "list"]);
    assert!(list.as_array().unwrap().iter().any(|t| t["state"] == json!("revoked") && t["revoked_at"].is_string()));

    // Audit details show times a person reads.
    let audit = server.ctl_json(&["audit", "list"]);
    let created = audit.as_array().unwrap().iter().find(|e| e["action"] == json!("enroll_token.create")).unwrap();
    assert!(created["details"]["expires_at"].as_str().is_some_and(|t| t.ends_with('Z')), "{created:#}");
    assert!(audit.as_array().unwrap().iter().any(|e| e["action"] == json!("enroll_token.revoke")));
    server.stop();
}

#[test]
fn removing_a_user_who_owns_a_device_says_what_to_do_and_force_clears_it() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"), "127.0.0.1:0");
    import(
        &server,
        tmp.path(),
        json!([{"userPrincipalName": "anna@contoso.com", "groups": ["Engineering"]},
               {"userPrincipalName": "ben@contoso.com"}]),
    );
    server.ctl_ok(&["settings", "set", "--user", "anna@contoso.com", "Custom.Desk", "\"4.11\""]);
    let a = SimAgent::new(tmp.path(), "a", json!({"hostname": "PC-A", "signed_in_users": ["anna@contoso.com"]}));
    let id = a.enroll(&server, &server.enroll_token(1));
    a.ok(&["sync", "--once"]);
    assert_eq!(server.ctl_json(&["devices", "show", &id])["primary_user"], json!("anna@contoso.com"));

    let out = server.ctl(&["users", "remove", "anna@contoso.com"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("primary user of 1 device") && err.contains("set-primary") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(server.ctl_json(&["users", "list"]).as_array().unwrap().len(), 2, "nothing half-done");

    // Ben has no device: removed at once.
    server.ctl_ok(&["users", "remove", "ben@contoso.com"]);
    let v_before = server.ctl_json(&["devices", "show", &id])["config_version"].as_u64().unwrap();
    let out = server.ctl_ok(&["users", "remove", "anna@contoso.com", "--force"]);
    assert!(out.contains("primary user cleared"), "{out}");
    assert_eq!(server.ctl_json(&["users", "list"]), json!([]));
    assert_eq!(server.ctl_json(&["settings", "list"]), json!([]));
    let show = server.ctl_json(&["devices", "show", &id]);
    assert_eq!(show["primary_user"], json!(null));
    assert!(show["config_version"].as_u64().unwrap() > v_before, "the device is re-signed");
    // Until it syncs, the device keeps its last configuration.
    assert_eq!(a.held_payload()["users"]["anna@contoso.com"]["Custom"]["Desk"], json!("4.11"));
    a.ok(&["sync", "--once"]);
    assert!(a.held_payload()["machine"]["Client"].get("PrimaryUser").is_none());
    let audit = server.ctl_json(&["audit", "list"]);
    assert!(audit.as_array().unwrap().iter().any(|e| e["action"] == json!("users.remove")
        && e["target"] == json!("anna@contoso.com")
        && e["details"]["cleared_primary"] == json!([id.clone()])));
    let out = server.ctl(&["users", "remove", "anna@contoso.com"]);
    assert!(stderr(&out).contains("no user anna@contoso.com"), "{}", stderr(&out));
    server.stop();
}

#[test]
fn devices_page_and_are_found_by_host_name() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"), "127.0.0.1:0");
    let token = server.enroll_token(10);
    let mut ids = Vec::new();
    for (i, host) in ["PC-C", "PC-A", "PC-B", "PC-B"].iter().enumerate() {
        let a = SimAgent::new(tmp.path(), &format!("d{i}"), json!({"hostname": host}));
        ids.push(a.enroll(&server, &token));
    }
    let all = server.ctl_json(&["devices", "list"]);
    let order: Vec<Value> = all.as_array().unwrap().iter().map(|d| d["id"].clone()).collect();
    let out = server.ctl(&["devices", "list", "--limit", "2", "--json"]);
    let first: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(first.as_array().unwrap().iter().map(|d| d["id"].clone()).collect::<Vec<_>>(), order[..2]);
    let last = first[1]["id"].as_str().unwrap();
    assert!(stderr(&out).contains(&format!("--after {last}")), "{}", stderr(&out));
    let rest = server.ctl_json(&["devices", "list", "--limit", "10", "--after", last]);
    assert_eq!(rest.as_array().unwrap().iter().map(|d| d["id"].clone()).collect::<Vec<_>>(), order[2..]);
    assert_eq!(server.ctl(&["devices", "list", "--limit", "0"]).status.code(), Some(2));

    // A unique host name works wherever an id does (case-insensitive); a shared one says which ids.
    assert_eq!(server.ctl_json(&["devices", "show", "PC-A"])["id"], json!(ids[1]));
    assert_eq!(server.ctl_json(&["devices", "show", "pc-c"])["id"], json!(ids[0]));
    let out = server.ctl(&["devices", "show", "PC-B"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains(&ids[2]) && stderr(&out).contains(&ids[3]), "{}", stderr(&out));
    let out = server.ctl(&["devices", "show", "PC-1"]);
    assert!(stderr(&out).contains("devices list"), "{}", stderr(&out));
    server.stop();
}

#[test]
fn a_fresh_device_reports_truthful_statuses_and_a_readable_log() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"), "127.0.0.1:0");
    import(&server, tmp.path(), json!([{"userPrincipalName": "anna@contoso.com"}]));
    // The tour's device: no profiles_dir, no templates, no known password expiry.
    let a = SimAgent::new(
        tmp.path(),
        "a",
        json!({"hostname": "PC-1", "signed_in_users": ["anna@contoso.com"],
               "network": {"gateway_ip": "192.0.2.1", "gateway_mac": "00:11:22:33:44:55"},
               "local_groups": {"Administrators": []}}),
    );
    // The token from a file, as the README does it (never on the command line).
    let token_file = tmp.path().join("enroll.token");
    std::fs::write(&token_file, server.enroll_token(1)).unwrap();
    let id = a.ok(&["enroll", "--server", &server.url, "--token-file", token_file.to_str().unwrap()]);
    let id = id.trim();
    a.ok(&["sync", "--once"]);
    a.ok(&["sync", "--once"]);
    let policies = &server.ctl_json(&["devices", "show", id])["policies"];
    assert_eq!(policies["signatures"]["state"], json!("not_applicable"), "{policies:#}");
    assert_eq!(policies["signatures"]["reason"], json!("no signature templates assigned"));
    assert_eq!(policies["password_expiry"]["state"], json!("unknown"), "{policies:#}");
    let text = server.ctl_ok(&["devices", "show", id]);
    assert!(text.contains("policy signatures") && text.contains("not_applicable"), "{text}");

    // The service loop's log, written to a pipe: no colour codes, and fields a person reads.
    let mut child = KillOnDrop(
        a.command(&["run", "--interval", "1s"])
            .env_remove("TENON_LOG")
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut err = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = std::io::Read::read_to_end(&mut err, &mut buf);
        buf
    });
    std::thread::sleep(std::time::Duration::from_secs(3));
    let _ = child.kill();
    let _ = child.wait();
    let log = String::from_utf8_lossy(&reader.join().unwrap()).into_owned();
    assert!(log.contains("sync done"), "{log}");
    assert!(!log.contains('\u{1b}'), "colour codes in a piped log: {log:?}");
    assert!(!log.contains("Some("), "{log}");
    assert!(log.contains("version=") && !log.contains("version=none"), "{log}");
    let server_log = std::fs::read_to_string(&server.stderr_log).unwrap();
    assert!(!server_log.contains('\u{1b}'), "colour codes in the server's log file");
    server.stop();
}

#[test]
fn tenonctl_takes_the_token_from_a_file_and_wants_a_scheme() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"), "127.0.0.1:0");
    let token_file = server.data_dir.join("admin.token");
    let ctl = |args: &[&str]| {
        Command::new(bin("tenonctl")).args(args).env_remove("TENON_TOKEN").env_remove("TENON_SERVER").output().unwrap()
    };
    let out = ctl(&["--server", &server.url, "--token-file", token_file.to_str().unwrap(), "users", "list", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = Command::new(bin("tenonctl"))
        .args(["--server", &server.url, "users", "list"])
        .env("TENON_TOKEN_FILE", &token_file)
        .env_remove("TENON_TOKEN")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let out = ctl(&["--server", &server.url, "--token-file", "/nonexistent/admin.token", "users", "list"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("cannot read the token file"), "{}", stderr(&out));

    let bare = server.url.trim_start_matches("http://").to_string();
    let out = ctl(&["--server", &bare, "--token-file", token_file.to_str().unwrap(), "users", "list"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains(&format!("http://{bare}")) && !err.contains("RelativeUrlWithoutBase"), "{err}");

    let c = SimAgent::new(tmp.path(), "c", json!({"hostname": "PC-BARE"}));
    let out = c.command(&["enroll", "--server", &bare]).env("TENON_ENROLL_TOKEN", "x").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains(&format!("http://{bare}")), "{}", stderr(&out));

    // The agent: the enrollment token from the environment.
    let a = SimAgent::new(tmp.path(), "a", json!({"hostname": "PC-ENV"}));
    let token = server.enroll_token(1);
    let out = a.command(&["enroll", "--server", &server.url]).env("TENON_ENROLL_TOKEN", &token).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let b = SimAgent::new(tmp.path(), "b", json!({"hostname": "PC-NONE"}));
    let out = b.command(&["enroll", "--server", &server.url]).env_remove("TENON_ENROLL_TOKEN").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--token-file"), "{}", stderr(&out));
    server.stop();
}

#[test]
fn a_taken_port_is_refused_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let data = tmp.path().join("fresh-data");
    let out = common::server_command("serve", &data).args(["--listen", &addr]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("cannot listen on"), "{}", stderr(&out));
    assert!(!data.exists(), "the data dir was created although the port is taken");
}

#[test]
fn admin_tokens_create_help_explains_the_roles() {
    let out = Command::new(bin("tenonctl")).args(["admin-tokens", "create", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for says in [
        "admin          everything except reading recovery keys",
        "each read is audited and makes the device rotate the key",
        "A token may grant only roles it holds itself",
        "needs a token that has both",
        "The bootstrap token (DATA_DIR/admin.token) has both",
    ] {
        assert!(help.contains(says), "{says:?} missing from:\n{help}");
    }
}

/// A key stored before the schema existed (or by a newer version) is still loaded and delivered,
/// the server says so at startup, and it can always be removed.
#[test]
fn a_stored_key_the_schema_refuses_is_reported_and_stays_removable() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    Server::start(&data, "127.0.0.1:0").stop();
    let insert = "INSERT INTO settings (scope_kind, scope_name, key, value, updated_at) VALUES ('tenant', '', 'Policies.Team', '\"eng\"', 0)";
    if let Some(url) = common::database_url_for(&data) {
        common::psql(&url, insert);
    } else {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let opts = sqlx::sqlite::SqliteConnectOptions::new().filename(data.join("tenon.db"));
            let pool = sqlx::SqlitePool::connect_with(opts).await.unwrap();
            sqlx::query(insert).execute(&pool).await.unwrap();
            pool.close().await;
        });
    }
    let server = Server::start(&data, "127.0.0.1:0");
    let log = std::fs::read_to_string(&server.stderr_log).unwrap();
    assert!(log.contains("stored setting is not valid now") && log.contains("Policies.Team"), "{log}");
    assert_eq!(server.ctl_json(&["settings", "list"])[0]["key"], json!("Policies.Team"));
    server.ctl_ok(&["settings", "unset", "--tenant", "Policies.Team"]);
    assert_eq!(server.ctl_json(&["settings", "list"]), json!([]));
    server.stop();
}
