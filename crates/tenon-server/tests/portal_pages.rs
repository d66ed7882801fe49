//! The portal's pages beyond the foundation (issue 17), against the real server with simulated
//! agents: the overview's numbers and their links (also after a restart, from the database),
//! decommission, revealing recovery keys (roles, reason, audit, rotation), the audit log's filters,
//! networks and packages, with a hostile admin-token name shown as text on every page.

mod common;

use common::portal_client::*;
use common::{Server, SimAgent};
use serde_json::{json, Value};
use std::path::Path;

const ANNA: &str = "anna@contoso.com";
const BEN: &str = "ben@contoso.com";
const HOSTILE: &str = "<img src=x onerror=alert(1)>";
const HOSTILE_ESCAPED: &str = "&#60;img src=x onerror=alert(1)&#62;";
const BITLOCKER: &str = "Policies.RequireSecurityFeatures.BitlockerEnabled";
const SITE_A: (&str, &str) = ("192.168.10.1", "aa:bb:cc:00:11:22");

fn audit(server: &Server) -> Vec<Value> {
    server.ctl_json(&["audit", "list"]).as_array().unwrap().clone()
}

/// A simulated PC that can have BitLocker, behind site A's gateway.
fn pc(hostname: &str, users: &[&str], extra: Value) -> Value {
    let mut d = json!({
        "hostname": hostname,
        "signed_in_users": users,
        "tpm": {"present": true, "ready": true},
        "vm": {"manufacturer": "Dell Inc.", "model": "Latitude 7440"},
        "volumes": [{"mount": "C:", "encryption": "none", "protectors": []}],
        "network": {"gateway_ip": SITE_A.0, "gateway_mac": SITE_A.1},
    });
    for (k, v) in extra.as_object().unwrap() {
        d[k] = v.clone();
    }
    d
}

fn server_with_users(tmp: &Path) -> Server {
    let server = Server::start(&tmp.join("data"), "127.0.0.1:0");
    let users = tmp.join("users.json");
    let list = json!([
        {"userPrincipalName": ANNA, "id": "u-anna", "displayName": "Anna Adams", "groups": ["Staff"]},
        {"userPrincipalName": BEN, "id": "u-ben", "displayName": "Ben Brown", "groups": ["Staff"]}
    ]);
    std::fs::write(&users, list.to_string()).unwrap();
    server.ctl_ok(&["users", "import", users.to_str().unwrap()]);
    server.ctl_ok(&["settings", "set", "--tenant", BITLOCKER, "true"]);
    server
}

fn set_users(agent: &SimAgent, users: &[&str]) {
    let mut d = agent.device();
    d["signed_in_users"] = json!(users);
    agent.set_device(&d);
}

/// The number on the overview's card that links to `filter`.
fn card(body: &str, filter: &str) -> u64 {
    let link = format!("href=\"/devices?filter={filter}\"><span class=\"n\">");
    let at = body.find(&link).unwrap_or_else(|| panic!("no card for {filter}: {body}")) + link.len();
    body[at..].split('<').next().unwrap().parse().unwrap()
}

/// (protector id, numerical password) of each recovery password on the simulated volume.
fn recovery_passwords(agent: &SimAgent) -> Vec<(String, String)> {
    agent.device()["volumes"][0]["protectors"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"] == json!("recovery_password"))
        .map(|p| (p["id"].as_str().unwrap().to_string(), p["numerical_password"].as_str().unwrap().to_string()))
        .collect()
}

/// Syncs until the server holds the device as encrypted with its key escrowed.
fn sync_until_encrypted(agent: &SimAgent, server: &Server, id: &str) {
    for _ in 0..12 {
        agent.ok(&["sync", "--once"]);
        let bl = server.ctl_json(&["devices", "show", id])["policies"]["bitlocker"].clone();
        let escrowed =
            bl["protectors"].as_array().is_some_and(|ps| ps.iter().any(|p| p["tenon_escrowed"] == json!(true)));
        if bl["state"] == json!("encrypted") && escrowed {
            return;
        }
    }
    panic!("never encrypted and escrowed");
}

#[test]
fn overview_counts_link_to_filtered_lists_and_survive_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let server = server_with_users(tmp.path());
    // PC-ENC: BitLocker encrypted and escrowed; Anna first (primary), then Ben seen more often: a mismatch.
    let enc = SimAgent::new(tmp.path(), "enc", pc("PC-ENC", &[ANNA], json!({})));
    // PC-VM: a virtual machine, so BitLocker is not possible; nobody signs in.
    let vm = SimAgent::new(
        tmp.path(),
        "vm",
        pc("PC-VM", &[], json!({"vm": {"manufacturer": "QEMU", "model": "Standard PC (Q35 + ICH9, 2009)"}})),
    );
    let token = server.enroll_token(2);
    let enc_id = enc.enroll(&server, &token);
    vm.enroll(&server, &token);
    enc.ok(&["sync", "--once"]);
    vm.ok(&["sync", "--once"]);
    for users in [&[BEN][..], &[], &[BEN]] {
        set_users(&enc, users);
        enc.ok(&["sync", "--once"]);
    }
    let mismatch: Vec<Value> = server.ctl_json(&["devices", "list", "--primary-mismatch"]).as_array().unwrap().clone();
    assert_eq!(mismatch.len(), 1, "the API agrees: {mismatch:?}");
    let bl_state = server.ctl_json(&["devices", "show", &enc_id])["policies"]["bitlocker"]["state"].clone();
    assert_eq!(bl_state, json!("encrypted"), "four syncs encrypt the simulated disk and escrow its key");

    let check = |server: &Server| {
        let cookie = sign_in(server, &server.token);
        let o = get(server, "/", Some(&cookie), &[]);
        assert_eq!(o.status, 200);
        assert_security_headers(&o, "overview");
        let b = &o.body;
        for (filter, n) in [
            ("active", 2),
            ("seen-24h", 2),
            ("stale", 0),
            ("without-primary", 1),
            ("primary-mismatch", 1),
            ("bitlocker-encrypted", 1),
            ("bitlocker-not-capable", 1),
            ("bitlocker-encrypting", 0),
            ("bitlocker-action-required", 0),
            ("bitlocker-failed", 0),
            ("entra-pending", 0),
            ("entra-failed", 0),
            ("failing", 0),
        ] {
            assert_eq!(card(b, filter), n, "{filter}");
        }
        assert!(b.contains("href=\"/networks\"><span class=\"n\">1</span> peer groups"), "{b}");
        // Each link lists what it counts.
        let list = |f: &str| get(server, &format!("/devices?filter={f}"), Some(&cookie), &[]).body;
        for (f, shown, hidden) in [
            ("primary-mismatch", "PC-ENC", "PC-VM"),
            ("bitlocker-encrypted", "PC-ENC", "PC-VM"),
            ("bitlocker-not-capable", "PC-VM", "PC-ENC"),
            ("without-primary", "PC-VM", "PC-ENC"),
        ] {
            let b = list(f);
            assert!(b.contains(shown) && !b.contains(hidden), "{f}: {b}");
            assert!(b.contains(&format!("<option value=\"{f}\" selected>")), "{f} is selected in the filter");
        }
    };
    check(&server);
    // After a restart the numbers come from the database (the device rows and their sightings).
    let data = tmp.path().join("data");
    server.stop();
    let server = Server::start(&data, "127.0.0.1:0");
    check(&server);
}

#[test]
fn decommission_needs_the_confirmation_box() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"), "127.0.0.1:0");
    let a = SimAgent::new(tmp.path(), "a", json!({"hostname": "PC-GONE", "signed_in_users": []}));
    let id = a.enroll(&server, &server.enroll_token(1));
    a.ok(&["sync", "--once"]);
    let cookie = sign_in(&server, &server.token);
    let page = get(&server, &format!("/devices/{id}"), Some(&cookie), &[]).body;
    assert!(page.contains("Decommission device") && page.contains(&format!("/devices/{id}/reports")));
    let csrf = csrf_of(&page);
    let path = format!("/devices/{id}/decommission");
    let status = || server.ctl_json(&["devices", "show", &id])["status"].clone();

    let r = post(&server, &path, Some(&cookie), &[("csrf", &csrf)]);
    assert_eq!(r.status, 422);
    assert!(r.body.contains("Tick the confirmation box to decommission"), "{}", r.body);
    let r = post(&server, &path, Some(&cookie), &[("csrf", &"0".repeat(64)), ("confirm", "yes")]);
    assert_eq!(r.status, 403);
    assert_eq!(status(), json!("active"));

    let r = post(&server, &path, Some(&cookie), &[("csrf", &csrf), ("confirm", "yes")]);
    assert_eq!((r.status, r.location.clone()), (303, Some(format!("/devices/{id}?done=decommissioned"))), "{}", r.body);
    assert_eq!(status(), json!("decommissioned"));
    let after = get(&server, r.location.as_deref().unwrap(), Some(&cookie), &[]).body;
    assert!(after.contains("The device was decommissioned") && !after.contains("Decommission device"));
    let rows: Vec<Value> = audit(&server).into_iter().filter(|e| e["action"] == "device.decommission").collect();
    let bootstrap_id = server.token.split('.').nth(1).unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["actor"], json!(format!("bootstrap ({bootstrap_id})")));
    // Twice: a message, not an error.
    let r = post(&server, &path, Some(&cookie), &[("csrf", &csrf), ("confirm", "yes")]);
    assert_eq!(r.status, 409, "{}", r.body);
    // The report history shows what the device sent.
    let h = get(&server, &format!("/devices/{id}/reports"), Some(&cookie), &[]);
    assert_eq!(h.status, 200);
    assert!(h.body.contains("Reports of PC-GONE") && h.body.contains("The whole report"), "{}", h.body);
}

#[test]
fn revealing_recovery_keys_needs_the_role_and_a_reason_and_requests_rotation() {
    let tmp = tempfile::tempdir().unwrap();
    let server = server_with_users(tmp.path());
    let agent = SimAgent::new(tmp.path(), "pc", pc("PC-KEY", &[], json!({})));
    let id = agent.enroll(&server, &server.enroll_token(1));
    sync_until_encrypted(&agent, &server, &id);
    let keys = recovery_passwords(&agent);
    assert_eq!(keys.len(), 1);
    let (protector, password) = keys[0].clone();
    let helpdesk = server.ctl_ok(&["admin-tokens", "create", "helpdesk", "--role", "admin"]).trim().to_string();
    let officer = server.ctl_ok(&["admin-tokens", "create", "officer", "--role", "recovery-keys"]).trim().to_string();
    let device = format!("/devices/{id}");
    let reveal = format!("/devices/{id}/recovery-keys");

    // An admin-only session: no reveal form, and the POST refuses (audited).
    let h = sign_in(&server, &helpdesk);
    let page = get(&server, &device, Some(&h), &[]).body;
    assert!(!page.contains("Reveal recovery keys") && !page.contains(&reveal), "{page}");
    let r = post(&server, &reveal, Some(&h), &[("csrf", &csrf_of(&page)), ("reason", "user on the phone")]);
    assert_eq!(r.status, 403);
    assert!(!r.body.contains(&password));
    assert!(audit(&server).iter().any(|e| e["action"] == "recovery_key.read_denied" && e["target"] == json!(id)));

    // A recovery-keys-only session sees the device read-only, with the reveal form.
    let o = sign_in(&server, &officer);
    let page = get(&server, &device, Some(&o), &[]).body;
    assert!(page.contains("Reveal recovery keys"), "{page}");
    assert!(!page.contains("Decommission device") && !page.contains("Reassign primary user"));
    assert!(!page.contains("href=\"/audit\""), "the nav shows only what the session may open");
    let csrf = csrf_of(&page);
    for (path, fields) in [
        (format!("{device}/primary"), vec![("csrf", csrf.as_str()), ("upn", ANNA), ("confirm", "yes")]),
        (format!("{device}/decommission"), vec![("csrf", csrf.as_str()), ("confirm", "yes")]),
    ] {
        let r = post(&server, &path, Some(&o), &fields);
        assert_eq!(r.status, 403, "{path}");
        assert!(r.body.contains("needs an admin token"), "{}", r.body);
    }
    assert_eq!(server.ctl_json(&["devices", "show", &id])["status"], json!("active"));

    // Without a reason: refused, nothing read.
    let r = post(&server, &reveal, Some(&o), &[("csrf", &csrf), ("reason", "  ")]);
    assert_eq!(r.status, 422);
    assert!(r.body.contains("Type why you need the recovery keys") && !r.body.contains(&password));
    assert!(!audit(&server).iter().any(|e| e["action"] == "recovery_key.read"));

    // With one: the key, once, not cached, the rotation said; the audit row has reason and token.
    let reason = format!("user locked out, ticket {HOSTILE}");
    let r = post(&server, &reveal, Some(&o), &[("csrf", &csrf), ("reason", &reason)]);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert_security_headers(&r, "keys");
    assert!(r.body.contains(&password) && r.body.contains(&protector), "{}", r.body);
    assert!(r.body.contains("rotation requested") && r.body.contains(HOSTILE_ESCAPED) && !r.body.contains(HOSTILE));
    let officer_id = officer.split('.').nth(1).unwrap();
    let rows: Vec<Value> = audit(&server).into_iter().filter(|e| e["action"] == "recovery_key.read").collect();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["actor"], json!(format!("officer ({officer_id})")));
    assert_eq!(rows[0]["details"]["reason"], json!(reason));
    assert_eq!(rows[0]["details"]["rotation_requested"], json!([protector]));
    assert!(!serde_json::to_string(&rows).unwrap().contains(&password), "never a key in the audit log");
    // The key is in no other page and no URL.
    let page = get(&server, &device, Some(&o), &[]).body;
    assert!(!page.contains(&password));
    assert!(r.location.is_none());
    // At the next sync the device rotates the key it gave away.
    agent.ok(&["sync", "--once"]);
    agent.ok(&["sync", "--once"]);
    let now: Vec<String> = recovery_passwords(&agent).into_iter().map(|(_, p)| p).collect();
    assert!(!now.contains(&password), "rotated: {now:?}");
}

#[test]
fn audit_filters_networks_and_packages_show_hostile_values_as_text() {
    let tmp = tempfile::tempdir().unwrap();
    let server = server_with_users(tmp.path());
    let hostile = server.ctl_ok(&["admin-tokens", "create", HOSTILE, "--role", "admin"]).trim().to_string();
    let agents: Vec<SimAgent> = ["PC-A1", "PC-A2"]
        .iter()
        .enumerate()
        .map(|(i, h)| SimAgent::new(tmp.path(), &format!("a{i}"), pc(h, &[ANNA], json!({}))))
        .collect();
    let token = server.enroll_token(2);
    for a in &agents {
        a.enroll(&server, &token);
        a.ok(&["sync", "--once"]);
    }
    let exe = tmp.path().join("tool-setup.exe");
    std::fs::write(&exe, b"MZ fake installer").unwrap();
    let up = server.ctl_as(
        &hostile,
        &[
            "packages",
            "upload",
            exe.to_str().unwrap(),
            "--name",
            "Tool",
            "--version",
            "1",
            "--detect",
            r"file:C:\Tool\t.exe",
        ],
    );
    assert!(up.status.success(), "{}", String::from_utf8_lossy(&up.stderr));
    server.ctl_ok(&["packages", "assign", "Tool", "--tenant", "--wait"]);
    agents[0].ok(&["sync", "--once"]);

    let cookie = sign_in(&server, &hostile);
    let pages: Vec<(String, Resp)> = ["/", "/audit", "/networks", "/packages", "/packages/Tool"]
        .iter()
        .map(|p| (p.to_string(), get(&server, p, Some(&cookie), &[])))
        .collect();
    for (path, r) in &pages {
        assert_eq!(r.status, 200, "{path}: {}", r.body);
        assert_security_headers(r, path);
        assert!(r.body.contains(HOSTILE_ESCAPED) && !r.body.contains(HOSTILE), "{path}: {}", r.body);
        for link in ["href=\"/networks\"", "href=\"/packages\"", "href=\"/audit\""] {
            assert!(r.body.contains(link), "{path}: the nav links {link}");
        }
    }
    let body = |p: &str| pages.iter().find(|(q, _)| q == p).unwrap().1.body.clone();

    // Networks: site A's group with both devices, linked.
    let nets = body("/networks");
    assert!(nets.contains("aa:bb:cc:00:11:22") && nets.contains("PC-A1") && nets.contains("PC-A2"), "{nets}");
    // Packages: the list, and the per-state counts with the devices in each.
    assert!(body("/packages").contains("href=\"/packages/Tool\""));
    let pkg = body("/packages/Tool");
    assert!(pkg.contains("2 devices have this package") && pkg.contains("PC-A1") && pkg.contains("PC-A2"), "{pkg}");
    let status = server.ctl_json(&["packages", "status", "Tool"]);
    for (state, n) in status["counts"].as_object().unwrap() {
        assert!(pkg.contains(&format!("<span class=\"n\">{n}</span> {state}")), "{state}: {pkg}");
    }
    assert_eq!(get(&server, "/packages/Nope", Some(&cookie), &[]).status, 404);

    // Audit: filters by actor, action (prefix) and time; newest first.
    let audit_page = |q: &str| get(&server, &format!("/audit?{q}"), Some(&cookie), &[]).body;
    let all = body("/audit");
    assert!(all.find("portal.signin").unwrap() < all.find("packages.upload").unwrap(), "newest first");
    let by_actor = audit_page("actor=onerror");
    assert!(by_actor.contains("packages.upload") && !by_actor.contains("settings.set"), "{by_actor}");
    let by_action = audit_page("action=packages");
    assert!(by_action.contains("packages.upload") && !by_action.contains("portal.signin"), "{by_action}");
    let exact = audit_page("action=portal.signin");
    assert!(exact.contains("portal.signin") && !exact.contains("packages."));
    assert!(audit_page("from=2099-01-01").contains("No audit row matches"));
    assert!(audit_page("to=2000-01-01").contains("No audit row matches"));
    assert!(audit_page("from=2000-01-01&to=2099-01-01").contains("packages.upload"));
    let bad = audit_page("from=yesterday%3Cb%3E");
    assert!(bad.contains("is not a time") && bad.contains("yesterday&#60;b&#62;") && bad.contains("packages.upload"));
}

#[test]
fn the_device_page_installs_an_assigned_package_on_request() {
    let tmp = tempfile::tempdir().unwrap();
    let server = server_with_users(tmp.path());
    let agent = SimAgent::new(tmp.path(), "pc", pc("PC-INST", &[ANNA], json!({})));
    let id = agent.enroll(&server, &server.enroll_token(1));
    agent.ok(&["sync", "--once"]);
    let exe = tmp.path().join("tool-setup.exe");
    std::fs::write(&exe, b"MZ fake installer").unwrap();
    for (name, intent) in [("Tool", "available"), ("Old Tool", "uninstall")] {
        server.ctl_ok(&[
            "packages",
            "upload",
            exe.to_str().unwrap(),
            "--name",
            name,
            "--version",
            "1",
            "--detect",
            r"file:C:\Tool\t.exe",
        ]);
        server.ctl_ok(&["packages", "assign", name, "--user", ANNA, "--intent", intent, "--wait"]);
    }
    agent.ok(&["sync", "--once"]);
    let state = || server.ctl_json(&["devices", "show", &id])["packages"]["Tool"]["state"].clone();
    assert_eq!(state(), json!("waiting"), "available: nothing runs until asked");
    let runs = || agent.device()["installer_runs"].as_array().cloned().unwrap_or_default();
    assert!(runs().is_empty());

    let helpdesk = server.ctl_ok(&["admin-tokens", "create", "helpdesk", "--role", "admin"]).trim().to_string();
    let h = sign_in(&server, &helpdesk);
    let device = format!("/devices/{id}");
    let install = format!("{device}/packages/install");
    let page = get(&server, &device, Some(&h), &[]).body;
    assert!(
        page.contains(&format!("action=\"{install}\"")) && page.contains("aria-label=\"Install now: Tool\""),
        "{page}"
    );
    assert!(!page.contains("Install now: Old Tool") && page.contains("uninstalled by its assignment"), "{page}");
    let csrf = csrf_of(&page);
    let requests = || audit(&server).into_iter().filter(|e| e["action"] == "device.install").count();
    let version = || server.ctl_json(&["devices", "show", &id])["config_version"].as_u64().unwrap();
    let before = version();

    // Refused: a forged CSRF token, an unknown package, one only to be uninstalled. Nothing requested.
    let r = post(&server, &install, Some(&h), &[("csrf", "forged"), ("package", "Tool")]);
    assert_eq!(r.status, 403);
    let r = post(&server, &install, Some(&h), &[("csrf", &csrf), ("package", "Nope<b>")]);
    assert_eq!(r.status, 404, "{}", r.body);
    assert!(r.body.contains("Nothing was requested") && r.body.contains("Nope&#60;b&#62;"), "{}", r.body);
    let r = post(&server, &install, Some(&h), &[("csrf", &csrf), ("package", "Old Tool")]);
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(r.body.contains("intent uninstall"), "{}", r.body);
    // A recovery-keys-only session may not.
    let officer = server.ctl_ok(&["admin-tokens", "create", "officer", "--role", "recovery-keys"]).trim().to_string();
    let o = sign_in(&server, &officer);
    let opage = get(&server, &device, Some(&o), &[]).body;
    assert!(!opage.contains("Install now: Tool"), "{opage}");
    let r = post(&server, &install, Some(&o), &[("csrf", &csrf_of(&opage)), ("package", "Tool")]);
    assert_eq!(r.status, 403);
    assert_eq!((requests(), version()), (0, before));

    // Requested: back to the device page, said once; audited with the session's token; the
    // device's configuration carries the request and the agent installs at its next sync.
    let r = post(&server, &install, Some(&h), &[("csrf", &csrf), ("package", "Tool")]);
    assert_eq!(r.status, 303, "{}", r.body);
    assert_eq!(r.location.as_deref(), Some(format!("{device}?done=install#packages").as_str()));
    let done = get(&server, &format!("{device}?done=install"), Some(&h), &[]).body;
    assert!(done.contains("The install was requested"), "{done}");
    let rows: Vec<Value> = audit(&server).into_iter().filter(|e| e["action"] == "device.install").collect();
    assert_eq!(rows.len(), 1);
    assert!(rows[0]["actor"].as_str().unwrap().starts_with("helpdesk ("), "{rows:?}");
    assert_eq!(rows[0]["details"]["package"], json!("Tool"));
    assert!(version() > before);
    agent.ok(&["sync", "--once"]);
    agent.ok(&["sync", "--once"]);
    let r = runs();
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0]["package"], json!("Tool"));
    assert_eq!(state(), json!("installed"));
    let page = get(&server, &device, Some(&h), &[]).body;
    assert!(page.contains("<td>Tool</td><td>available</td><td>installed</td>"), "{page}");
}

#[test]
fn the_device_page_lists_escrowed_keys_and_reveals_the_archived_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let server = server_with_users(tmp.path());
    let agent = SimAgent::new(tmp.path(), "pc", pc("PC-ARCH", &[], json!({})));
    let id = agent.enroll(&server, &server.enroll_token(1));
    sync_until_encrypted(&agent, &server, &id);
    let (protector, first) = recovery_passwords(&agent)[0].clone();
    let officer = server.ctl_ok(&["admin-tokens", "create", "officer", "--role", "recovery-keys"]).trim().to_string();
    let o = sign_in(&server, &officer);
    let device = format!("/devices/{id}");
    let reveal = format!("/devices/{id}/recovery-keys");

    // One key, current; the page lists it without its password.
    let page = get(&server, &device, Some(&o), &[]).body;
    assert!(page.contains("(1 current, 0 archived)") && page.contains(&protector), "{page}");
    assert!(!page.contains(&first));
    // Revealed, then rotated by the device: the first key is archived, superseded by a new one.
    let r = post(&server, &reveal, Some(&o), &[("csrf", &csrf_of(&page)), ("reason", "ticket 1")]);
    assert!(r.body.contains(&first) && r.body.contains("current: rotation requested"), "{}", r.body);
    let page = get(&server, &device, Some(&o), &[]).body;
    assert!(page.contains("current; rotation requested, not yet done by the device"), "{page}");
    for _ in 0..4 {
        agent.ok(&["sync", "--once"]);
    }
    let (_, second) = recovery_passwords(&agent)[0].clone();
    assert_ne!(first, second);
    let page = get(&server, &device, Some(&o), &[]).body;
    assert!(page.contains("(1 current, 1 archived)") && page.contains("archived: superseded"), "{page}");
    assert!(!page.contains("rotation requested, not yet done"), "the rotation is done: {page}");
    assert!(!page.contains(&first) && !page.contains(&second));
    // An admin-only session sees the list, not the reveal form.
    let helpdesk = server.ctl_ok(&["admin-tokens", "create", "helpdesk", "--role", "admin"]).trim().to_string();
    let hpage = get(&server, &device, Some(&sign_in(&server, &helpdesk)), &[]).body;
    assert!(hpage.contains("(1 current, 1 archived)") && !hpage.contains("Reveal recovery keys"), "{hpage}");

    // Without the box: the current key only. With it: the archived one too, marked; both audited.
    let csrf = csrf_of(&page);
    let r = post(&server, &reveal, Some(&o), &[("csrf", &csrf), ("reason", "ticket 2")]);
    assert!(r.body.contains(&second) && !r.body.contains(&first), "{}", r.body);
    let r = post(&server, &reveal, Some(&o), &[("csrf", &csrf), ("reason", "ticket 3"), ("archived", "yes")]);
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains(&second) && r.body.contains(&first), "{}", r.body);
    let old_row = r.body.split("<tr").find(|row| row.contains(&first)).unwrap();
    assert!(old_row.contains("class=\"archived\"") && old_row.contains("archived: superseded"), "{old_row}");
    let rows: Vec<Value> = audit(&server).into_iter().filter(|e| e["action"] == "recovery_key.read").collect();
    assert_eq!(rows.len(), 3);
    let last = rows.iter().find(|e| e["details"]["reason"] == json!("ticket 3")).unwrap();
    assert_eq!(last["details"]["include_superseded"], json!(true));
    // A refused reveal keeps the box as it was left.
    let r = post(&server, &reveal, Some(&o), &[("csrf", &csrf), ("reason", ""), ("archived", "yes")]);
    assert_eq!(r.status, 422);
    assert!(r.body.contains("name=\"archived\" value=\"yes\" checked"), "{}", r.body);
}
