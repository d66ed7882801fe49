//! The web portal (issue 17) against the real server: sign-in, sessions and their ends, the
//! security headers, escaping, the device search, CSRF and the one write (reassign the primary
//! user). The HTTP client follows no redirect and carries the cookie by hand, so every
//! `Set-Cookie` and `Location` is asserted as a browser would receive it.

mod common;

use common::portal_client::*;
use common::{Server, SimAgent};
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;

const XSS_NAME: &str = "</script><script>alert(1)</script>";
const ANNA: &str = "anna@contoso.com";
const BEN: &str = "ben@contoso.com";

fn audit(server: &Server) -> Vec<Value> {
    server.ctl_json(&["audit", "list"]).as_array().unwrap().clone()
}

fn users_file(dir: &Path) -> String {
    let p = dir.join("users.json");
    let users = json!([
        {"userPrincipalName": ANNA, "id": "u-anna", "displayName": XSS_NAME, "groups": ["Staff"]},
        {"userPrincipalName": BEN, "id": "u-ben", "displayName": "Ben Brown", "groups": ["Staff"]}
    ]);
    std::fs::write(&p, users.to_string()).unwrap();
    p.to_str().unwrap().to_string()
}

/// A server with two devices: PC-ANNA (Anna signed in at first contact, so she is its primary
/// user) and PC-OTHER (nobody).
fn fleet(tmp: &Path, extra: &[&str]) -> (Server, String) {
    let server = Server::start_with(&tmp.join("data"), "127.0.0.1:0", extra);
    server.ctl_ok(&["users", "import", &users_file(tmp)]);
    let a = SimAgent::new(tmp, "a", json!({"hostname": "PC-ANNA", "signed_in_users": [ANNA]}));
    let b = SimAgent::new(tmp, "b", json!({"hostname": "PC-OTHER", "signed_in_users": []}));
    let token = server.enroll_token(2);
    let id = a.enroll(&server, &token);
    b.enroll(&server, &token);
    a.ok(&["sync", "--once"]);
    b.ok(&["sync", "--once"]);
    assert_eq!(server.ctl_json(&["devices", "show", &id])["primary_user"], json!(ANNA));
    (server, id)
}

#[test]
fn signin_page_headers_wrong_token_and_assets() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"), "127.0.0.1:0");

    let r = get(&server, "/signin", None, &[]);
    assert_eq!(r.status, 200);
    assert_security_headers(&r, "sign-in page");
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert!(r.body.contains("Admin token"), "{}", r.body);

    // Not signed in: every page sends the browser to sign in.
    for path in ["/", "/devices", "/devices/x"] {
        let r = get(&server, path, None, &[]);
        assert_eq!((r.status, r.location.as_deref()), (303, Some("/signin?why=signin")), "{path}");
        assert_security_headers(&r, path);
    }
    // htmx gets the same as a header it follows with the whole page.
    let r = get(&server, "/devices", None, &[("HX-Request", "true")]);
    assert_eq!((r.status, r.header("hx-redirect")), (401, Some("/signin?why=signin")));

    // A wrong token: a message on the page, no cookie, never the typed token, an audit row.
    let wrong = "tadm.nosuchid.c2VjcmV0LXRoYXQtaXMtbm90LXZhbGlk";
    let r = post(&server, "/signin", None, &[("token", wrong)]);
    assert_eq!(r.status, 401);
    assert!(r.body.contains("not a valid admin token"), "{}", r.body);
    assert!(!r.body.contains(wrong) && !r.body.contains("c2VjcmV0"));
    assert!(r.cookies.is_empty());
    assert_security_headers(&r, "refused sign-in");
    let r = post(&server, "/signin", None, &[("token", "")]);
    assert_eq!(r.status, 400);
    assert!(r.body.contains("Paste an admin token"));
    assert!(audit(&server).iter().any(|e| e["action"] == "portal.signin_failed" && e["actor"] == "portal"));
    assert!(!serde_json::to_string(&audit(&server)).unwrap().contains("c2VjcmV0"), "the token is never audited");

    // A form posted from another site is refused before anything is read.
    let r = read(
        agent()
            .post(&format!("{}/signin", server.url))
            .set("Origin", "https://evil.example")
            .send_form(&[("token", &server.token)]),
    );
    assert_eq!(r.status, 403);
    assert!(r.cookies.is_empty());

    // Assets: content-hashed names, cached for a year, htmx byte for byte the pinned release.
    let r = get(&server, "/signin", None, &[]);
    let find = |prefix: &str| {
        let at = r.body.find(prefix).unwrap_or_else(|| panic!("no {prefix} in {}", r.body));
        r.body[at..].split('"').next().unwrap().to_string()
    };
    let (css, js) = (find("/assets/portal."), find("/assets/htmx."));
    let c = get(&server, &css, None, &[]);
    assert_eq!(c.status, 200);
    assert_eq!(c.header("cache-control"), Some("public, max-age=31536000, immutable"));
    assert!(c.header("content-type").unwrap().starts_with("text/css"));
    let etag = c.header("etag").unwrap().to_string();
    assert_eq!(get(&server, &css, None, &[("If-None-Match", &etag)]).status, 304);
    let j = agent().get(&format!("{}{js}", server.url)).call().unwrap();
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut j.into_reader(), &mut bytes).unwrap();
    use sha2::Digest;
    assert_eq!(
        hex::encode(sha2::Sha256::digest(&bytes)),
        "d6fdc75f204e6bdefa99b69bf1e6d4ac69b8a364f77929f45c13476b4000f717"
    );
    assert_eq!(get(&server, "/assets/portal.000000000000.css", None, &[]).status, 404);
}

#[test]
fn sign_in_cookie_pages_escaping_and_search() {
    let tmp = tempfile::tempdir().unwrap();
    let (server, id) = fleet(tmp.path(), &[]);

    let r = post(&server, "/signin", None, &[("token", &server.token)]);
    assert_eq!((r.status, r.location.as_deref()), (303, Some("/")));
    assert_eq!(r.cookies.len(), 1);
    let set = &r.cookies[0];
    assert!(set.starts_with("tenon_session="), "{set}");
    for flag in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set.split("; ").any(|a| a == flag), "{flag} missing in {set}");
    }
    assert!(!set.contains("Secure"), "plain HTTP: no Secure flag ({set})");
    let cookie = set.split(';').next().unwrap().to_string();
    // Signed in, the sign-in page sends the browser on to the overview.
    assert_eq!(get(&server, "/signin", Some(&cookie), &[]).location.as_deref(), Some("/"));

    let overview = get(&server, "/", Some(&cookie), &[]);
    assert_eq!(overview.status, 200);
    assert_security_headers(&overview, "overview");
    assert_eq!(overview.header("cache-control"), Some("no-store"));
    assert!(overview.body.contains("Signed in as bootstrap"), "{}", overview.body);
    assert!(overview.body.contains("href=\"/devices?filter=without-primary\""));
    let list = get(&server, "/devices", Some(&cookie), &[]);
    assert_eq!(list.status, 200);
    assert!(list.body.contains("PC-ANNA") && list.body.contains("PC-OTHER"));
    assert_eq!(list.header("vary"), Some("HX-Request"));

    // What the directory said is shown as text: escaped in the list and on the device page.
    // askama escapes with numeric references.
    let escaped = "&#60;/script&#62;&#60;script&#62;alert(1)&#60;/script&#62;";
    let page = get(&server, &format!("/devices/{id}"), Some(&cookie), &[]);
    assert_eq!(page.status, 200);
    for body in [&list.body, &page.body] {
        assert!(body.contains(escaped), "{body}");
        assert!(!body.contains(XSS_NAME));
        assert!(!body.contains("<script>alert"));
    }
    assert!(page.body.contains("PC-ANNA") && page.body.contains(ANNA));
    let show = server.ctl_json(&["devices", "show", &id]);
    assert!(page.body.contains(show["config_sha256"].as_str().unwrap()), "the config hash is shown");
    assert!(page.body.contains("bitlocker") || page.body.contains("delivery_optimization"), "each policy's status");

    // Search: by user (also by display name), by host name, by id; no match shows none.
    let search = |q: &str| get(&server, &format!("/devices?q={q}"), Some(&cookie), &[]).body;
    for q in ["anna%40contoso", "ANNA", "pc-ann", &id[..8]] {
        let b = search(q);
        assert!(b.contains("PC-ANNA") && !b.contains("PC-OTHER"), "q={q}: {b}");
    }
    let b = search("script");
    assert!(b.contains("PC-ANNA") && !b.contains("PC-OTHER"), "by display name: {b}");
    // A display name changed in the directory is searched as it is now.
    let renamed = tmp.path().join("renamed.json");
    let users = json!([{"userPrincipalName": ANNA, "id": "u-anna", "displayName": "Anna Zeta", "groups": ["Staff"]}]);
    std::fs::write(&renamed, users.to_string()).unwrap();
    server.ctl_ok(&["users", "import", renamed.to_str().unwrap()]);
    assert!(search("zeta").contains("PC-ANNA"), "the new name");
    assert!(!search("script").contains("PC-ANNA"), "not the old one");
    let b = search("nobody-like-this");
    assert!(b.contains("No device matches") && !b.contains("PC-ANNA"));
    // Filters and sorting live in the query string.
    let b = get(&server, "/devices?filter=without-primary", Some(&cookie), &[]).body;
    assert!(b.contains("PC-OTHER") && !b.contains("PC-ANNA"));
    let b = get(&server, "/devices?sort=hostname&dir=desc", Some(&cookie), &[]).body;
    assert!(b.find("PC-OTHER").unwrap() < b.find("PC-ANNA").unwrap(), "descending by host name");
    let b = get(&server, "/devices?per=1&page=2", Some(&cookie), &[]).body;
    assert!(b.contains("PC-OTHER") && !b.contains("PC-ANNA") && b.contains("Previous page"));
    // htmx asks for the table only.
    let frag = get(&server, "/devices?q=pc-other", Some(&cookie), &[("HX-Request", "true")]);
    assert_eq!(frag.status, 200);
    assert!(frag.body.trim_start().starts_with("<div id=\"device-table\">"), "{}", frag.body);
    assert!(frag.body.contains("PC-OTHER") && !frag.body.contains("<html"));
    assert_eq!(frag.header("vary"), Some("HX-Request"));

    // The token never reaches a page.
    let secret = server.token.rsplit('.').next().unwrap();
    for body in [&overview.body, &list.body, &page.body] {
        assert!(!body.contains(secret));
    }
    assert!(get(&server, "/devices/no-such-device", Some(&cookie), &[]).body.contains("No such device"));
}

#[test]
fn csrf_and_reassign_primary_user() {
    let tmp = tempfile::tempdir().unwrap();
    let (server, id) = fleet(tmp.path(), &[]);
    let a = sign_in(&server, &server.token);
    let b = sign_in(&server, &server.token);
    assert_ne!(a, b);
    let page = |cookie: &str| get(&server, &format!("/devices/{id}"), Some(cookie), &[]).body;
    let (csrf_a, csrf_b) = (csrf_of(&page(&a)), csrf_of(&page(&b)));
    assert_ne!(csrf_a, csrf_b, "every session has its own token");
    let path = format!("/devices/{id}/primary");
    let primary = || server.ctl_json(&["devices", "show", &id])["primary_user"].clone();

    // Missing, forged, and another session's token: refused with a message, the typed value
    // kept, nothing changed.
    let forged = "0".repeat(64);
    for (what, fields) in [
        ("missing", vec![("upn", BEN), ("confirm", "yes")]),
        ("forged", vec![("csrf", forged.as_str()), ("upn", BEN), ("confirm", "yes")]),
        ("replayed", vec![("csrf", csrf_b.as_str()), ("upn", BEN), ("confirm", "yes")]),
    ] {
        let r = post(&server, &path, Some(&a), &fields);
        assert_eq!(r.status, 403, "{what}");
        assert!(r.body.contains("Nothing was changed"), "{what}: {}", r.body);
        assert!(r.body.contains(&format!("value=\"{BEN}\"")), "{what}: the typed value is kept");
        assert_security_headers(&r, what);
        assert_eq!(primary(), json!(ANNA), "{what}");
    }
    // The htmx header is as good as the field, and as strict.
    let r = read(
        agent()
            .post(&format!("{}{path}", server.url))
            .set("Cookie", &a)
            .set("X-CSRF-Token", &csrf_b)
            .send_form(&[("upn", BEN), ("confirm", "yes")]),
    );
    assert_eq!(r.status, 403);
    // Sign-out needs the token too.
    let r = post(&server, "/signout", Some(&a), &[("csrf", &forged)]);
    assert_eq!(r.status, 403);
    assert_eq!(get(&server, "/", Some(&a), &[]).status, 200, "still signed in");

    // No confirmation, and a user who does not exist: refused, value kept, nothing changed.
    let r = post(&server, &path, Some(&a), &[("csrf", &csrf_a), ("upn", BEN)]);
    assert_eq!(r.status, 422);
    assert!(r.body.contains("confirmation box") && r.body.contains(&format!("value=\"{BEN}\"")));
    let r = post(&server, &path, Some(&a), &[("csrf", &csrf_a), ("upn", "nobody@contoso.com"), ("confirm", "yes")]);
    assert_eq!(r.status, 404);
    assert!(
        r.body.contains("no user nobody@contoso.com") && r.body.contains("value=\"nobody@contoso.com\""),
        "{}",
        r.body
    );
    assert_eq!(primary(), json!(ANNA));

    // Through: post/redirect/get, the new primary user, one audit row as tenonctl's, naming the token.
    let r = post(&server, &path, Some(&a), &[("csrf", &csrf_a), ("upn", BEN), ("confirm", "yes")]);
    assert_eq!((r.status, r.location.clone()), (303, Some(format!("/devices/{id}?done=primary"))), "{}", r.body);
    assert_eq!(primary(), json!(BEN));
    let after = get(&server, r.location.as_deref().unwrap(), Some(&a), &[]).body;
    assert!(after.contains("The primary user was reassigned") && after.contains("Ben Brown"));
    let bootstrap_id = server.token.split('.').nth(1).unwrap();
    let rows: Vec<Value> = audit(&server).into_iter().filter(|e| e["action"] == "device.set_primary").collect();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["actor"], json!(format!("bootstrap ({bootstrap_id})")));
    assert_eq!(rows[0]["target"], json!(id));
    assert_eq!(rows[0]["details"]["primary_user"], json!(BEN));
    assert_eq!(rows[0]["details"]["previous"], json!(ANNA));
}

#[test]
fn signout_and_revoked_token_end_sessions() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"), "127.0.0.1:0");

    let cookie = sign_in(&server, &server.token);
    let csrf = csrf_of(&get(&server, "/", Some(&cookie), &[]).body);
    let r = post(&server, "/signout", Some(&cookie), &[("csrf", &csrf)]);
    assert_eq!((r.status, r.location.as_deref()), (303, Some("/signin?why=signed-out")));
    assert!(r.cookies[0].contains("Max-Age=0"), "the cookie is cleared: {:?}", r.cookies);
    let r = get(&server, "/", Some(&cookie), &[]);
    assert_eq!((r.status, r.location.as_deref()), (303, Some("/signin?why=signin")), "the old cookie is refused");
    assert!(get(&server, "/signin?why=signed-out", None, &[]).body.contains("You are signed out"));
    assert!(audit(&server).iter().any(|e| e["action"] == "portal.signout"));

    // Revoking the token ends its sessions at the next request.
    let helpdesk = server.ctl_ok(&["admin-tokens", "create", "helpdesk", "--role", "admin"]).trim().to_string();
    let cookie = sign_in(&server, &helpdesk);
    assert!(get(&server, "/", Some(&cookie), &[]).body.contains("Signed in as helpdesk"));
    server.ctl_ok(&["admin-tokens", "revoke", helpdesk.split('.').nth(1).unwrap()]);
    let r = get(&server, "/devices", Some(&cookie), &[]);
    assert_eq!((r.status, r.location.as_deref()), (303, Some("/signin?why=revoked")));
    assert!(get(&server, "/signin?why=revoked", None, &[]).body.contains("was revoked"));
    // And it cannot sign in again.
    assert_eq!(post(&server, "/signin", None, &[("token", &helpdesk)]).status, 401);

    // A `recovery-keys`-only token signs in (to reveal keys; tests/portal_pages.rs has the rest),
    // but the pages that need `admin` refuse it.
    let officer = server.ctl_ok(&["admin-tokens", "create", "officer", "--role", "recovery-keys"]).trim().to_string();
    let cookie = sign_in(&server, &officer);
    assert_eq!(get(&server, "/devices", Some(&cookie), &[]).status, 200);
    assert_eq!(get(&server, "/audit", Some(&cookie), &[]).status, 403);
}

#[test]
fn idle_session_expires_and_signin_is_rate_limited() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start_with(
        &tmp.path().join("data"),
        "127.0.0.1:0",
        &["--portal-session-idle", "2s", "--portal-signin-rate", "4/1m"],
    );
    let cookie = sign_in(&server, &server.token);
    assert_eq!(get(&server, "/", Some(&cookie), &[]).status, 200);
    std::thread::sleep(Duration::from_millis(3200));
    let r = get(&server, "/", Some(&cookie), &[]);
    assert_eq!((r.status, r.location.as_deref()), (303, Some("/signin?why=expired")));
    assert!(r.cookies.iter().any(|c| c.contains("Max-Age=0")));
    assert!(get(&server, "/signin?why=expired", None, &[]).body.contains("Your session expired"));
    // Gone for good, not only for this request.
    assert_eq!(get(&server, "/", Some(&cookie), &[]).location.as_deref(), Some("/signin?why=signin"));

    // One sign-in was used above; three more pass the limiter, the fifth waits.
    for _ in 0..3 {
        assert_eq!(post(&server, "/signin", None, &[("token", "tadm.x.y")]).status, 401);
    }
    let r = post(&server, "/signin", None, &[("token", &server.token)]);
    assert_eq!(r.status, 429);
    assert!(r.body.contains("Too many sign-in attempts"), "{}", r.body);
    assert!(r.header("retry-after").is_some());
}
