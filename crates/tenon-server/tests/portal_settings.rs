//! The portal's users, groups and settings pages against the real server: membership, source,
//! a user's effective configuration with the origin of each value, escaping, and the settings
//! write in two steps (preview with the devices reached, then save), with bad input refused on
//! the page, nothing changed and the typed value kept.

mod common;

use common::portal_client::*;
use common::{Server, SimAgent};
use serde_json::{json, Value};
use std::path::Path;

const XSS_NAME: &str = "</script><script>alert(1)</script>";
const ANNA: &str = "anna@contoso.com";
const BEN: &str = "ben@contoso.com";
const KEY: &str = "Policies.SetCurrentUserAdministrator";

fn fleet(tmp: &Path) -> (Server, String, String, SimAgent) {
    let server = Server::start(&tmp.join("data"), "127.0.0.1:0");
    let users = tmp.join("users.json");
    let list = json!([
        {"userPrincipalName": ANNA, "id": "u-anna", "displayName": XSS_NAME, "groups": ["Engineering"]},
        {"userPrincipalName": BEN, "id": "u-ben", "displayName": "Ben Brown", "groups": ["Sales Team"]}
    ]);
    std::fs::write(&users, list.to_string()).unwrap();
    server.ctl_ok(&["users", "import", users.to_str().unwrap()]);
    server.ctl_ok(&["settings", "set", "--tenant", "Custom.Site", "\"Berlin\""]);
    server.ctl_ok(&["settings", "set", "--group", "Engineering", "Custom.Site", "\"Munich\""]);
    server.ctl_ok(&["settings", "set", "--group", "All Users", "Custom.Floor", "3"]);
    let a = SimAgent::new(tmp, "a", json!({"hostname": "PC-ANNA", "signed_in_users": [ANNA]}));
    let token = server.enroll_token(1);
    let id = a.enroll(&server, &token);
    a.ok(&["sync", "--once"]);
    let cookie = sign_in(&server, &server.token.clone());
    (server, id, cookie, a)
}

#[test]
fn users_and_groups_pages_show_membership_source_and_origins() {
    let tmp = tempfile::tempdir().unwrap();
    let (server, id, cookie, _a) = fleet(tmp.path());
    let c = Some(cookie.as_str());

    let r = get(&server, "/users?q=contoso", c, &[]);
    assert_eq!(r.status, 200);
    assert!(r.body.contains("/users/anna%40contoso.com"), "{}", r.body);
    assert!(r.body.contains("Ben Brown") && r.body.contains("<td>file</td>"));
    assert!(!r.body.contains(XSS_NAME), "a display name is escaped");
    let r = get(&server, "/users?q=brown", c, &[]);
    assert!(r.body.contains(BEN) && !r.body.contains(ANNA));

    let r = get(&server, "/users/anna%40contoso.com", c, &[]);
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains(&format!("/devices/{id}")), "her device is linked");
    // Each value with its origin: the group overrides the tenant; "All Users" has its own key.
    let row = |path: &str| {
        let at = r.body.find(&format!("<code>{path}</code>")).unwrap_or_else(|| panic!("{path} in {}", r.body));
        r.body[at..at + r.body[at..].find("</tr>").unwrap()].to_string()
    };
    assert!(row("Custom.Site").contains("Munich") && row("Custom.Site").contains("group Engineering"));
    assert!(row("Custom.Floor").contains("All Users"));
    assert!(!r.body.contains(XSS_NAME));

    let r = get(&server, "/users/nobody%40contoso.com", c, &[]);
    assert_eq!(r.status, 404);
    assert!(r.body.contains("no user nobody@contoso.com"));

    let r = get(&server, "/groups", c, &[]);
    assert!(r.body.contains("/groups/Sales%20Team") && r.body.contains("/groups/All%20Users"), "{}", r.body);
    let r = get(&server, "/groups/Sales%20Team", c, &[]);
    assert_eq!(r.status, 200);
    assert!(r.body.contains(BEN) && !r.body.contains(ANNA));
    let r = get(&server, "/groups/All%20Users", c, &[]);
    assert!(r.body.contains(BEN) && r.body.contains(ANNA) && r.body.contains("Custom.Floor"));
    assert_eq!(get(&server, "/groups/Nope", c, &[]).status, 404);
    // Signed out, every page sends the browser to sign in.
    assert_eq!(get(&server, "/users", None, &[]).status, 303);
}

#[test]
fn settings_preview_save_and_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let (server, id, cookie, a) = fleet(tmp.path());
    let c = Some(cookie.as_str());
    let page = get(&server, "/settings?scope=group:Engineering", c, &[]);
    assert_eq!(page.status, 200);
    assert!(page.header("content-security-policy").is_some_and(|v| v.contains("script-src 'self'")));
    assert!(page.headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("x-frame-options")));
    assert!(page.body.contains("Custom.Site") && page.body.contains("Munich"));
    let csrf = csrf_of(&page.body);
    let before = server.ctl_json(&["settings", "list"]);
    let audit_len = server.ctl_json(&["audit", "list"]).as_array().unwrap().len();
    let send = |fields: &[(&str, &str)]| {
        let mut all = vec![("csrf", csrf.as_str()), ("scope", "group:Engineering")];
        all.extend_from_slice(fields);
        post(&server, "/settings", c, &all)
    };

    // Bad input: a message, the typed value kept, nothing stored.
    for (key, value, says) in [
        (KEY, "yes please", "not JSON"),
        ("Policies.NoSuchThing", "true", "unknown setting"),
        (KEY, "42", "must be"),
        ("bad key!", "true", "key is not valid"),
    ] {
        for step in ["preview", "save"] {
            let r = send(&[("key", key), ("value", value), ("op", "set"), ("step", step)]);
            assert_eq!(r.status, 422, "{key} {value} {step}: {}", r.body);
            assert!(r.body.contains(says), "{key} {value}: {}", r.body);
            assert!(r.body.contains("role=\"alert\""));
            assert!(r.body.contains(&format!("value=\"{}\"", key)), "the key is kept");
            assert!(r.body.contains(value), "the value is kept");
        }
    }
    let r = send(&[("key", "Custom.Nope"), ("op", "unset"), ("step", "save")]);
    assert_eq!(r.status, 422);
    assert!(r.body.contains("no setting Custom.Nope"));
    let r = post(
        &server,
        "/settings",
        c,
        &[("csrf", "forged"), ("scope", "group:Engineering"), ("key", KEY), ("value", "true"), ("step", "save")],
    );
    assert_eq!(r.status, 403);
    assert!(r.body.contains("Nothing was changed") && r.body.contains(KEY));
    assert_eq!(server.ctl_json(&["settings", "list"]), before, "nothing changed");
    assert_eq!(server.ctl_json(&["audit", "list"]).as_array().unwrap().len(), audit_len);

    // The preview names the devices reached and changes nothing.
    let r = send(&[("key", KEY), ("value", "true"), ("op", "set"), ("step", "preview")]);
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("<strong id=\"preview-count\">1</strong>") && r.body.contains("PC-ANNA"), "{}", r.body);
    assert_eq!(server.ctl_json(&["settings", "list"]), before);

    // Saving: stored, audited with the session's token, the device re-signed.
    let version = server.ctl_json(&["devices", "show", &id])["config_version"].as_u64().unwrap();
    let r = send(&[("key", KEY), ("value", "true"), ("op", "set"), ("step", "save")]);
    assert_eq!(r.status, 303, "{}", r.body);
    let done = get(&server, r.location.as_deref().unwrap(), c, &[]);
    assert!(done.body.contains("Saved: set Policies.SetCurrentUserAdministrator"), "{}", done.body);
    let listed = server.ctl_json(&["settings", "list"]);
    assert!(listed.as_array().unwrap().iter().any(|s| s["key"] == KEY && s["value"] == "true"), "{listed}");
    let last: Vec<Value> = server.ctl_json(&["audit", "list"]).as_array().unwrap().clone();
    assert!(
        last.iter()
            .any(|e| e["action"] == "settings.set" && e["actor"].as_str().unwrap_or_default().starts_with("bootstrap")),
        "{last:?}"
    );
    a.ok(&["sync", "--once"]);
    let after = server.ctl_json(&["devices", "show", &id])["config_version"].as_u64().unwrap();
    assert!(after > version, "{after} > {version}");

    // Removing, through the same two steps.
    let r = send(&[("key", KEY), ("op", "unset"), ("step", "save")]);
    assert_eq!(r.status, 303, "{}", r.body);
    let listed = server.ctl_json(&["settings", "list"]);
    assert!(!listed.as_array().unwrap().iter().any(|s| s["key"] == KEY));
    // A user scope names a user that exists.
    assert_eq!(get(&server, "/settings?scope=user:ghost@contoso.com", c, &[]).status, 400);
    assert_eq!(get(&server, "/settings?scope=planet", c, &[]).status, 400);
}
