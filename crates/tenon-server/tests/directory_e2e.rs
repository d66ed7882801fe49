//! End to end for directory sources: the real server and tenonctl against the Graph-shaped fake on
//! loopback, with simulated agents. A directory change reaches only the devices it concerns (a
//! department in a signature, a password expiry, a group membership); a sync that fails changes
//! nothing; the deletion guard holds a mass removal until it is accepted; the client secret is
//! never shown.

mod common;
#[path = "common/graph_fake.rs"]
mod graph_fake;

use common::{Server, SimAgent};
use graph_fake::{upn, user_id, Fault, GraphFake, Target, CLIENT_ID, CLIENT_SECRET, TENANT_ID};
use serde_json::{json, Value};
use std::path::Path;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn secret_file(dir: &Path, secret: &str) -> String {
    let p = dir.join("entra.secret");
    std::fs::write(&p, format!("{secret}\n")).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    p.to_str().unwrap().to_string()
}

fn add_graph(server: &Server, fake: &GraphFake, secret: &str, extra: &[&str]) -> std::process::Output {
    let dir = server.data_dir.parent().unwrap();
    let file = secret_file(dir, secret);
    let mut args = vec![
        "directory",
        "add",
        "graph",
        "entra",
        "--tenant-id",
        TENANT_ID,
        "--client-id",
        CLIENT_ID,
        "--client-secret-file",
        &file,
        "--authority",
        fake.url(),
        "--graph-url",
        fake.url(),
    ];
    args.extend_from_slice(extra);
    server.ctl(&args)
}

fn sync(server: &Server, extra: &[&str]) -> (bool, Value, String) {
    let mut args = vec!["directory", "sync", "entra", "--json"];
    args.extend_from_slice(extra);
    let out = server.ctl(&args);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let v = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    (out.status.success(), v, stderr)
}

fn status(server: &Server) -> Value {
    let all = server.ctl_json(&["directory", "status"]);
    all.as_array().unwrap().iter().find(|s| s["name"] == "entra").cloned().expect("entra in status")
}

fn user<'a>(users: &'a Value, upn: &str) -> Option<&'a Value> {
    users.as_array().unwrap().iter().find(|u| u["userPrincipalName"] == upn)
}

fn version(agent: &SimAgent) -> u64 {
    agent.status()["config_version"].as_u64().unwrap()
}

#[test]
fn a_graph_directory_syncs_and_its_changes_reach_only_the_devices_they_concern() {
    let rt = runtime();
    let fake = rt.block_on(GraphFake::generate(60, 6));
    fake.set_page_sizes(25, 4, 10);
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"), "127.0.0.1:0");

    // A user imported from a file before the directory came: the file keeps it.
    let early = tmp.path().join("early.json");
    std::fs::write(&early, json!([{"userPrincipalName": upn(0), "department": "From the file"}]).to_string()).unwrap();
    server.ctl_ok(&["users", "import", early.to_str().unwrap()]);

    // A wrong secret is refused at the first sync, saying what to do; nothing is imported.
    let out = add_graph(&server, &fake, "not-the-secret", &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (ok, _, stderr) = sync(&server, &[]);
    assert!(!ok, "a rejected secret fails the sync");
    assert!(stderr.contains("AADSTS7000215") && stderr.contains("--client-secret-file"), "{stderr}");
    assert!(status(&server)["last_error"].as_str().unwrap().contains("AADSTS7000215"));
    assert_eq!(server.ctl_json(&["users", "list"]).as_array().unwrap().len(), 1);

    // The right one, given again with --replace. The server reads it at once by itself; a sync
    // asked for meanwhile waits for that one and reads what changed since (nothing).
    let out = add_graph(&server, &fake, CLIENT_SECRET, &["--replace"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (ok, report, stderr) = sync(&server, &[]);
    assert!(ok, "{stderr}\n{}", server.log_tail());
    assert!(stderr.contains("pages read"), "progress on stderr: {stderr}");
    assert_eq!(report["users"], 60);
    assert_eq!(report["groups"], 6);
    let st = status(&server);
    assert_eq!(st["users"], 60);
    assert!(st["last_error"].is_null() && st["last_success"].is_string(), "{st}");
    assert_eq!(st["collisions"], json!([{"upn": upn(0), "owner": "file", "other": "entra"}]));

    // Users carry the Graph fields, their groups (group 0 holds group 1: nested), the source and
    // the password expiry Entra would compute (2026-11-01 + 90 days; never for
    // DisablePasswordExpiration).
    let users = server.ctl_json(&["users", "list"]);
    assert_eq!(users.as_array().unwrap().len(), 60);
    let u0 = user(&users, &upn(0)).unwrap();
    assert_eq!((&u0["source"], &u0["department"]), (&json!("file"), &json!("From the file")));
    let u1 = user(&users, &upn(1)).expect("user1 listed");
    assert_eq!(u1["source"], "entra");
    assert_eq!(u1["department"], "Dept 1");
    assert_eq!(u1["onPremisesExtensionAttributes"]["extensionAttribute1"], "cost-center-1");
    assert_eq!(u1["groups"], json!(["Group 0", "Group 1"]), "nested: group 0 holds group 1");
    assert_eq!(u1["passwordExpiresAt"], "2027-01-30T08:00:00Z");
    let u19 = user(&users, &upn(19)).unwrap();
    assert!(u19["passwordExpiresAt"].is_null() && u19["passwordNeverExpires"] == true, "{u19}");
    assert_eq!(user(&users, &upn(49)).unwrap()["accountEnabled"], false, "disabled accounts are marked");

    // Devices: anna's (user1, primary) and ben's (user2). A signature shows the department; a
    // group setting shows membership.
    let html = tmp.path().join("sig.htm");
    std::fs::write(&html, "<p>{{Graph_User_DisplayName}}, {{Graph_User_Department}}</p>").unwrap();
    server.ctl_ok(&["signatures", "set", "Corp", "--html", html.to_str().unwrap()]);
    server.ctl_ok(&["settings", "set", "--group", "Group 3", "Custom.Group3", "true"]);
    let token = server.enroll_token(2);
    let profiles = tmp.path().join("profiles");
    let agent = |name: &str, u: &str| {
        let a = SimAgent::new(
            tmp.path(),
            name,
            json!({"hostname": name, "signed_in_users": [u], "profiles_dir": profiles}),
        );
        a.enroll(&server, &token);
        a.ok(&["sync", "--once"]);
        a.ok(&["sync", "--once"]);
        a
    };
    let a = agent("PC-ANNA", &upn(1));
    let b = agent("PC-BEN", &upn(2));
    let sig = profiles.join(upn(1)).join("AppData/Roaming/Microsoft/Signatures/Corp.htm");
    let text = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    assert!(text(&sig).contains("Dept 1"), "{}", text(&sig));
    let (va, vb) = (version(&a), version(&b));

    // 1. A department change re-renders user1's signature: only PC-ANNA is re-signed.
    fake.set_user_field(&user_id(1), "department", json!("Finance"));
    let (ok, report, stderr) = sync(&server, &["--wait"]);
    assert!(ok, "{stderr}");
    assert_eq!(report["read"], "delta", "a later sync reads only the changes");
    assert_eq!((report["users_changed"].as_u64(), report["devices_resigned"].as_u64()), (Some(1), Some(1)), "{report}");
    a.ok(&["sync", "--once"]);
    b.ok(&["sync", "--once"]);
    assert!(version(&a) > va);
    assert_eq!(version(&b), vb, "PC-BEN is not touched");
    assert!(text(&sig).contains("Finance"), "{}", text(&sig));
    let va = version(&a);

    // 2. A new password expiry for user2 moves ben's warning: only PC-BEN.
    fake.set_user_field(&user_id(2), "lastPasswordChangeDateTime", json!("2026-12-01T08:00:00Z"));
    let (ok, report, _) = sync(&server, &["--wait"]);
    assert!(ok);
    assert_eq!(report["devices_resigned"], 1, "{report}");
    b.ok(&["sync", "--once"]);
    a.ok(&["sync", "--once"]);
    assert!(version(&b) > vb);
    assert_eq!(version(&a), va);
    let expiry = &b.held_payload()["users"][upn(2)]["Client"]["PasswordExpiry"]["filetime"];
    // 2026-12-01T08:00:00Z (1796112000) + 90 days.
    let due = tenon_core::dirsync::unix_to_filetime(1_796_112_000 + 90 * 86_400);
    assert_eq!(expiry, &json!(due.to_string()));
    let vb = version(&b);

    // 3. user1 joins Group 3: its setting reaches PC-ANNA's machine config.
    fake.add_member(&graph_fake::group_id(3), &user_id(1));
    let (ok, report, _) = sync(&server, &["--wait"]);
    assert!(ok);
    assert_eq!(report["devices_resigned"], 1, "{report}");
    a.ok(&["sync", "--once"]);
    assert_eq!(a.held_payload()["machine"]["Custom"]["Group3"], true);
    assert_eq!(version(&b), vb);

    // 4. A malformed page on the next read: the sync fails, nothing changes, the directory keeps
    // serving.
    fake.set_user_field(&user_id(5), "department", json!("Later"));
    fake.inject(Target::Users, Some(1), 1, Fault::Malformed);
    let (ok, _, stderr) = sync(&server, &[]);
    assert!(!ok, "a malformed page fails the sync");
    assert!(!stderr.is_empty());
    let users = server.ctl_json(&["users", "list"]);
    assert_eq!(user(&users, &upn(5)).unwrap()["department"], "Dept 5");
    assert_eq!(users.as_array().unwrap().len(), 60);

    // 5. Forty users deleted at once: more than 10% / 20 users, so the removals are held and the
    // other changes land; --accept-deletions applies them.
    for i in 10..50 {
        fake.remove_user(&user_id(i));
    }
    let (ok, report, _) = sync(&server, &[]);
    assert!(ok);
    assert_eq!(report["held_deletions"], 40, "{report}");
    let users = server.ctl_json(&["users", "list"]);
    assert_eq!(users.as_array().unwrap().len(), 60, "held users stay");
    assert_eq!(user(&users, &upn(5)).unwrap()["department"], "Later", "the rest of the sync applied");
    assert_eq!(status(&server)["held_deletions"], 40);
    let (ok, report, _) = sync(&server, &["--accept-deletions"]);
    assert!(ok);
    assert_eq!(report["held_deletions"], 0);
    assert_eq!(server.ctl_json(&["users", "list"]).as_array().unwrap().len(), 20);

    // A directory user is changed in its directory, not by a file import.
    let file = tmp.path().join("users.json");
    std::fs::write(&file, json!([{"userPrincipalName": upn(1), "department": "From a file"}]).to_string()).unwrap();
    let out = server.ctl(&["users", "import", file.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("(entra)"), "{stderr}");

    // The secret is in no listing, log, audit row or error.
    let listing = String::from_utf8(server.ctl(&["directory", "list", "--json"]).stdout).unwrap();
    let audit = String::from_utf8(server.ctl(&["audit", "list", "--json"]).stdout).unwrap();
    let log = std::fs::read_to_string(&server.stderr_log).unwrap_or_default();
    for (what, text) in [("directory list", &listing), ("audit", &audit), ("server log", &log)] {
        assert!(!text.contains(CLIENT_SECRET) && !text.contains("not-the-secret"), "secret in {what}");
    }
    assert!(audit.contains("directory.sync") && audit.contains("directory.add"));

    // Removing the source removes its users; the file's stays.
    server.ctl_ok(&["directory", "remove", "entra"]);
    let left = server.ctl_json(&["users", "list"]);
    assert_eq!(left.as_array().unwrap().len(), 1);
    assert_eq!(left[0]["userPrincipalName"], upn(0));
    drop(rt);
}

#[test]
fn bad_source_definitions_are_refused_with_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"), "127.0.0.1:0");
    let secret = secret_file(tmp.path(), "s");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["ldap", "ad", "--url", "ldap://dc1.contoso.com", "--base-dn", "DC=contoso,DC=com"], "--allow-plain-ldap"),
        (vec!["ldap", "ad", "--url", "dc1.contoso.com", "--base-dn", "DC=contoso,DC=com"], "ldaps://"),
        (vec!["ldap", "ad", "--url", "ldaps://dc1", "--base-dn", "contoso"], "DC=contoso,DC=com"),
        (vec!["ldap", "file", "--url", "ldaps://dc1", "--base-dn", "DC=x"], "users import"),
        (
            vec!["graph", "entra", "--tenant-id", "t", "--client-id", "c", "--client-secret-file", "/nonexistent"],
            "/nonexistent",
        ),
        (
            vec!["graph", "bad name", "--tenant-id", "t", "--client-id", "c", "--client-secret-file", &secret],
            "source name",
        ),
    ];
    for (args, needle) in cases {
        let mut all = vec!["directory", "add"];
        all.extend_from_slice(&args);
        let out = server.ctl(&all);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} accepted");
        assert!(stderr.contains(needle), "{args:?}: {needle:?} not in {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    }
    let out = server.ctl(&["directory", "sync", "nothing"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("directory list"));
    assert!(server.ctl_json(&["directory", "list"]).as_array().unwrap().is_empty());
}
