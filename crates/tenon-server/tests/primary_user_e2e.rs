//! End to end for issue 5: the primary user detected at first contact, the mismatch and
//! without-primary reports, set-primary, local admin rights, decommission and re-enroll, and
//! password-expiry warnings, with the real server, tenonctl and simulated agents.

mod common;

use common::{Server, SimAgent};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

const ANNA: &str = "anna@contoso.com";
const BEN: &str = "ben@contoso.com";
const CARL: &str = "carl@contoso.com";

fn write_users(dir: &Path, users: Value) -> PathBuf {
    let p = dir.join("users.json");
    std::fs::write(&p, users.to_string()).unwrap();
    p
}

fn staff(dir: &Path) -> PathBuf {
    write_users(
        dir,
        json!([
            {"userPrincipalName": ANNA, "id": "u-anna", "displayName": "Anna Adams", "groups": ["Staff"]},
            {"userPrincipalName": BEN, "id": "u-ben", "displayName": "Ben Brown", "groups": ["Staff"]},
            {"userPrincipalName": CARL, "id": "u-carl", "displayName": "Carl Clark", "groups": ["Staff"]}
        ]),
    )
}

fn ids(list: &Value) -> Vec<String> {
    list.as_array().unwrap().iter().map(|d| d["id"].as_str().unwrap().to_string()).collect()
}

fn set_signed_in(agent: &SimAgent, users: &[&str]) {
    let mut d = agent.device();
    d["signed_in_users"] = json!(users);
    agent.set_device(&d);
}

fn admins(agent: &SimAgent) -> Value {
    agent.device()["local_groups"]["Administrators"].clone()
}

fn version(agent: &SimAgent) -> u64 {
    agent.status()["config_version"].as_u64().expect("the agent holds a configuration")
}

#[test]
fn first_contact_primary_reports_set_primary_and_local_admin() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"), "127.0.0.1:0");
    server.ctl_ok(&["users", "import", staff(tmp.path()).to_str().unwrap()]);

    // Carl is a local administrator by hand before Tenon arrives.
    let a = SimAgent::new(
        tmp.path(),
        "a",
        json!({"hostname": "PC-A", "signed_in_users": [ANNA],
               "local_groups": {"Administrators": ["AzureAD\\carl@contoso.com"]}}),
    );
    let b = SimAgent::new(tmp.path(), "b", json!({"hostname": "PC-B", "signed_in_users": []}));
    let token = server.enroll_token(2);
    let id_a = a.enroll(&server, &token);
    let id_b = b.enroll(&server, &token);
    a.ok(&["sync", "--once"]);
    b.ok(&["sync", "--once"]);

    // Anna was signed in at A's first contact: she is its primary user, and only her config says so.
    assert_eq!(server.ctl_json(&["devices", "show", &id_a])["primary_user"], json!(ANNA));
    let pa = a.held_payload();
    assert_eq!(pa["machine"]["Client"]["PrimaryUser"], json!(ANNA));
    assert_eq!(pa["users"][ANNA]["Client"]["IsPrimaryOfUser"], json!(true));
    // Nobody was signed in at B's first contact: no primary.
    assert_eq!(server.ctl_json(&["devices", "show", &id_b])["primary_user"], json!(null));
    assert!(b.held_payload()["machine"]["Client"].get("PrimaryUser").is_none());
    assert_eq!(ids(&server.ctl_json(&["devices", "list", "--without-primary"])), vec![id_b.clone()]);

    // Ben signs in to A as well: he gets his own config, which does not call him primary.
    set_signed_in(&a, &[ANNA, BEN]);
    a.ok(&["sync", "--once"]);
    let pa = a.held_payload();
    assert_eq!(pa["users"][BEN]["Client"]["IsPrimaryOfUser"], json!(false));
    assert_eq!(pa["users"][ANNA]["Client"]["IsPrimaryOfUser"], json!(true));
    assert_eq!(server.ctl_json(&["devices", "show", &id_a])["primary_user"], json!(ANNA));

    // The default detection window is the first contact only: a later sign-in on B (even within the
    // same second as its enrollment) does not make a primary user.
    set_signed_in(&b, &[BEN]);
    b.ok(&["sync", "--once"]);
    b.ok(&["sync", "--once"]);
    assert_eq!(server.ctl_json(&["devices", "show", &id_b])["primary_user"], json!(null));
    assert!(ids(&server.ctl_json(&["devices", "list", "--without-primary"])).contains(&id_b));

    // Mismatch report: A is not listed while anna is the user seen most often ...
    assert!(!ids(&server.ctl_json(&["devices", "list", "--primary-mismatch"])).contains(&id_a));
    // ... and is once ben uses it more than she does: he signs in and out again several times.
    // (The agent reports only what changed, so staying signed in through many syncs makes one
    // report; each new sign-in session is seen.)
    for _ in 0..3 {
        set_signed_in(&a, &[BEN]);
        a.ok(&["sync", "--once"]);
        set_signed_in(&a, &[]);
        a.ok(&["sync", "--once"]);
    }
    // Ben stays signed in for the rest of this test.
    set_signed_in(&a, &[BEN]);
    a.ok(&["sync", "--once"]);
    let show_a = server.ctl_json(&["devices", "show", &id_a]);
    assert_eq!(show_a["users"][0]["upn"], json!(BEN), "ben is seen most often: {show_a}");
    assert!(ids(&server.ctl_json(&["devices", "list", "--primary-mismatch"])).contains(&id_a));

    // Local admin for the primary user (anna), signed in or not; carl's manual membership stays.
    server.ctl_ok(&["settings", "set", "--group", "Staff", "Policies.SetCurrentUserAdministrator", "true"]);
    a.ok(&["sync", "--once"]);
    assert_eq!(admins(&a), json!(["AzureAD\\carl@contoso.com", "AzureAD\\anna@contoso.com"]));
    assert_eq!(a.status()["policies"]["local_admin"]["state"], json!("ok"));
    let device_before = a.device();
    assert!(a.ok(&["sync", "--once"]).contains("sync unchanged"));
    assert_eq!(a.device(), device_before, "applying twice changes nothing");

    // set-primary reaches the device at its next sync: new version, new Client.PrimaryUser; anna's
    // Tenon-added membership goes and ben's comes.
    let v = version(&a);
    server.ctl_ok(&["devices", "set-primary", &id_a, BEN]);
    assert_eq!(server.ctl_json(&["devices", "show", &id_a])["primary_user"], json!(BEN));
    assert!(a.ok(&["sync", "--once"]).contains("sync updated"));
    assert!(version(&a) > v);
    let pa = a.held_payload();
    assert_eq!(pa["machine"]["Client"]["PrimaryUser"], json!(BEN));
    assert_eq!(pa["users"][BEN]["Client"]["IsPrimaryOfUser"], json!(true));
    assert_eq!(pa["users"][ANNA]["Client"]["IsPrimaryOfUser"], json!(false));
    assert_eq!(admins(&a), json!(["AzureAD\\carl@contoso.com", "AzureAD\\ben@contoso.com"]));
    assert!(!ids(&server.ctl_json(&["devices", "list", "--primary-mismatch"])).contains(&id_a));

    // Turning the switch off removes exactly Tenon's membership.
    server.ctl_ok(&["settings", "set", "--group", "Staff", "Policies.SetCurrentUserAdministrator", "false"]);
    a.ok(&["sync", "--once"]);
    assert_eq!(admins(&a), json!(["AzureAD\\carl@contoso.com"]));
    assert_eq!(a.status()["policies"]["local_admin"]["state"], json!("disabled"));

    // set-primary to an unknown user is refused and changes nothing.
    let out = server.ctl(&["devices", "set-primary", &id_a, "nobody@contoso.com"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(server.ctl_json(&["devices", "show", &id_a])["primary_user"], json!(BEN));

    // --clear: the device loses its primary at the next sync and shows up as without one.
    let v = version(&a);
    server.ctl_ok(&["devices", "set-primary", &id_a, "--clear"]);
    assert!(a.ok(&["sync", "--once"]).contains("sync updated"));
    assert!(version(&a) > v);
    let pa = a.held_payload();
    assert!(pa["machine"]["Client"].get("PrimaryUser").is_none(), "{pa}");
    assert_eq!(pa["users"][BEN]["Client"]["IsPrimaryOfUser"], json!(false));
    assert_eq!(server.ctl_json(&["devices", "show", &id_a])["primary_user"], json!(null));
    // Ben is still signed in, but a cleared primary is not detected again outside the window.
    assert_eq!(server.ctl_json(&["devices", "show", &id_a])["primary_user"], json!(null));
    let without = ids(&server.ctl_json(&["devices", "list", "--without-primary"]));
    assert!(without.contains(&id_a) && without.contains(&id_b));

    // Every change is audited.
    let audit = server.ctl_json(&["audit", "list"]).to_string();
    for action in ["device.primary_detected", "device.set_primary"] {
        assert!(audit.contains(action), "{action} missing from the audit log");
    }
    server.stop();
}

#[test]
fn detection_window_lets_a_later_sign_in_become_primary() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"), "127.0.0.1:0");
    server.ctl_ok(&["users", "import", staff(tmp.path()).to_str().unwrap()]);
    server.ctl_ok(&["settings", "set", "--tenant", "Devices.PrimaryUserDetectionWindowHours", "24"]);
    let c = SimAgent::new(tmp.path(), "c", json!({"hostname": "PC-C", "signed_in_users": []}));
    let id = c.enroll(&server, &server.enroll_token(1));
    c.ok(&["sync", "--once"]);
    assert_eq!(server.ctl_json(&["devices", "show", &id])["primary_user"], json!(null));
    set_signed_in(&c, &[CARL]);
    c.ok(&["sync", "--once"]);
    assert_eq!(server.ctl_json(&["devices", "show", &id])["primary_user"], json!(CARL));
    assert_eq!(c.held_payload()["machine"]["Client"]["PrimaryUser"], json!(CARL));
    // Once there is a primary, another user signing in within the window does not replace it.
    set_signed_in(&c, &[ANNA]);
    c.ok(&["sync", "--once"]);
    assert_eq!(server.ctl_json(&["devices", "show", &id])["primary_user"], json!(CARL));
    server.stop();
}

/// Starts `run` and waits for it to end by itself; kills it and fails after `limit`.
fn run_until_exit(agent: &SimAgent, limit: Duration) -> (Option<i32>, String) {
    let mut child = agent
        .command(&["run", "--interval", "1s"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tenon-agent run");
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            return (status.code(), err);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("tenon-agent run did not stop by itself within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn decommission_stops_the_agent_and_re_enroll_gives_the_new_user() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"), "127.0.0.1:0");
    server.ctl_ok(&["users", "import", staff(tmp.path()).to_str().unwrap()]);
    server.ctl_ok(&["settings", "set", "--group", "Staff", "Policies.SetCurrentUserAdministrator", "true"]);

    let a = SimAgent::new(
        tmp.path(),
        "a",
        json!({"hostname": "PC-A", "signed_in_users": [ANNA], "local_groups": {"Administrators": ["Administrator"]}}),
    );
    let old_id = a.enroll(&server, &server.enroll_token(1));
    a.ok(&["sync", "--once"]);
    assert_eq!(server.ctl_json(&["devices", "show", &old_id])["primary_user"], json!(ANNA));
    assert_eq!(admins(&a), json!(["Administrator", "AzureAD\\anna@contoso.com"]));

    server.ctl_ok(&["devices", "decommission", &old_id]);

    // The next check-in is refused and the agent says it must be re-enrolled.
    let out = a.run(&["sync", "--once"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("re-enrolled"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line on stderr: {stderr}");
    let status = a.status();
    assert_eq!(status["decommissioned"], json!(true));
    assert!(status["last_error"].as_str().unwrap().contains("re-enrolled"), "{status}");
    assert_eq!(status["device_id"], json!(old_id));

    // The service loop stops by itself rather than retrying forever.
    let (code, err) = run_until_exit(&a, Duration::from_secs(20));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("re-enrolled"), "{err}");

    // The server keeps the device's history, without a primary user.
    assert!(!ids(&server.ctl_json(&["devices", "list"])).contains(&old_id));
    let all = server.ctl_json(&["devices", "list", "--all"]);
    let old = all.as_array().unwrap().iter().find(|d| d["id"] == json!(old_id)).expect("listed with --all");
    assert_eq!(old["status"], json!("decommissioned"));
    assert_eq!(old["primary_user"], json!(null));
    assert!(!server.ctl_json(&["devices", "reports", &old_id]).as_array().unwrap().is_empty());
    assert_eq!(server.ctl_json(&["devices", "show", &old_id])["users"][0]["upn"], json!(ANNA));
    let out = server.ctl(&["devices", "set-primary", &old_id, BEN]);
    assert_eq!(out.status.code(), Some(1), "a decommissioned device cannot get a primary user");

    // The laptop is handed to ben and re-enrolled (no --force needed after a decommission).
    set_signed_in(&a, &[BEN]);
    let new_id = a.enroll(&server, &server.enroll_token(1));
    assert_ne!(new_id, old_id);
    assert_eq!(a.status()["decommissioned"], json!(false));
    a.ok(&["sync", "--once"]);
    let show = server.ctl_json(&["devices", "show", &new_id]);
    assert_eq!(show["primary_user"], json!(BEN));
    let payload = a.held_payload();
    assert_eq!(payload["machine"]["Client"]["PrimaryUser"], json!(BEN));
    assert!(payload["users"].get(ANNA).is_none(), "{payload}");
    // Anna's admin right, which the previous enrollment added, does not linger; ben gets his.
    assert_eq!(admins(&a), json!(["Administrator", "AzureAD\\ben@contoso.com"]));
    assert_eq!(a.status()["last_error"], json!(null));

    // Handed on again without a decommission: enroll refuses to discard the identity silently, and
    // `--force` re-enrolls; carl, signed in at the new first contact, is primary.
    set_signed_in(&a, &[CARL]);
    let out = a.run(&["enroll", "--server", &server.url, "--token", &server.enroll_token(1)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    let token = server.enroll_token(1);
    let newest = a.ok(&["enroll", "--force", "--server", &server.url, "--token", &token]).trim().to_string();
    assert_ne!(newest, new_id);
    a.ok(&["sync", "--once"]);
    assert_eq!(server.ctl_json(&["devices", "show", &newest])["primary_user"], json!(CARL));
    assert_eq!(admins(&a), json!(["Administrator", "AzureAD\\carl@contoso.com"]));
    server.stop();
}

/// Unix seconds as a Windows FILETIME (100 ns ticks since 1601-01-01).
fn filetime(unix: i64) -> u64 {
    ((unix + 11_644_473_600) as u64) * 10_000_000
}

#[test]
fn password_expiry_warnings_reach_the_signed_in_users() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"), "127.0.0.1:0");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    // Three days and an hour ahead: three whole days left whenever the test runs.
    let in_three_days = filetime(now + 3 * 86_400 + 3_600);
    let users = write_users(
        tmp.path(),
        json!([
            {"userPrincipalName": ANNA, "msDS-UserPasswordExpiryTimeComputed": in_three_days},
            {"userPrincipalName": BEN, "msDS-UserPasswordExpiryTimeComputed": 0},
            {"userPrincipalName": CARL, "msDS-UserPasswordExpiryTimeComputed": 9_223_372_036_854_775_807u64}
        ]),
    );
    server.ctl_ok(&["users", "import", users.to_str().unwrap()]);
    let d = SimAgent::new(tmp.path(), "d", json!({"hostname": "PC-D", "signed_in_users": [ANNA, BEN, CARL]}));
    let id = d.enroll(&server, &server.enroll_token(1));
    d.ok(&["sync", "--once"]);

    let notes = d.device()["notifications"].as_array().cloned().unwrap_or_default();
    let for_user = |u: &str| notes.iter().filter(|n| n["user"] == json!(u)).cloned().collect::<Vec<_>>();
    let anna = for_user(ANNA);
    assert_eq!(anna.len(), 1, "{notes:?}");
    assert!(anna[0]["message"].as_str().unwrap().contains("expires in 3 days"), "{anna:?}");
    let ben = for_user(BEN);
    assert_eq!(ben.len(), 1, "{notes:?}");
    assert!(ben[0]["message"].as_str().unwrap().contains("Change it now"), "{ben:?}");
    assert!(for_user(CARL).is_empty(), "never-expiring passwords get no warning: {notes:?}");

    // Days left per user in the report.
    let users = &server.ctl_json(&["devices", "show", &id])["policies"]["password_expiry"]["users"];
    assert_eq!(users[ANNA]["days_left"], json!(3), "{users}");
    assert_eq!(users[ANNA]["state"], json!("warned"));
    assert_eq!(users[BEN]["days_left"], json!(0));
    assert_eq!(users[BEN]["state"], json!("must_change"));
    assert_eq!(users[CARL]["days_left"], json!(null));
    assert_eq!(users[CARL]["state"], json!("never"));

    // Once per threshold per day: another sync today warns nobody again.
    d.ok(&["sync", "--once"]);
    assert_eq!(d.device()["notifications"].as_array().unwrap().len(), notes.len());
    server.stop();
}
