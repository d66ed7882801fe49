//! The portal's signatures page against the real server: uploading a template through the page
//! (CSRF required, refusals keep what was typed, the domain's limits apply), the listing, a
//! preview for a user whose directory values are hostile (escaped in every portal response; the
//! preview document served with its own strict headers), removal with confirmation, the role gate,
//! and audit rows naming the session's token.

mod common;

use common::portal_client::*;
use common::Server;
use serde_json::{json, Value};
use std::path::Path;

const ANNA: &str = "anna@contoso.com";
const BEN: &str = "ben@contoso.com";
const XSS_NAME: &str = "</script><script>alert(1)</script>";
const XSS_TITLE: &str = "<img src=x onerror=alert(1)>";
const PAGE_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
     connect-src 'self'; form-action 'self'; frame-src 'self'; frame-ancestors 'none'; base-uri 'none'";
const PREVIEW_CSP: &str = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; \
     form-action 'none'; frame-ancestors 'self'; base-uri 'none'; sandbox";
const HTML: &str = "<html><body style=\"font-family: Calibri\">\n<p><b>{{Graph_User_DisplayName}}</b><br>\n\
     {{Graph_User_JobTitle}}<br>\nFax: {{Graph_User_FaxNumber}}</p>\n<p><img src=\"logo.png\" alt=\"Contoso\"></p>\n</body></html>";

fn audit(server: &Server) -> Vec<Value> {
    server.ctl_json(&["audit", "list"]).as_array().unwrap().clone()
}

fn signature_names(server: &Server) -> Vec<String> {
    server
        .ctl_json(&["signatures", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect()
}

/// A server with Anna (hostile display name and job title, in Staff) and Ben (in Sales); a
/// template `Logo` with an image, stored by `tenonctl`; an admin token named `portal-admin`.
fn setup(tmp: &Path) -> (Server, String, String) {
    let server = Server::start(&tmp.join("data"), "127.0.0.1:0");
    let users = tmp.join("users.json");
    let list = json!([
        {"userPrincipalName": ANNA, "id": "u-anna", "displayName": XSS_NAME, "jobTitle": XSS_TITLE, "groups": ["Staff"]},
        {"userPrincipalName": BEN, "id": "u-ben", "displayName": "Ben Brown", "jobTitle": "Sales", "groups": ["Sales"]}
    ]);
    std::fs::write(&users, list.to_string()).unwrap();
    server.ctl_ok(&["users", "import", users.to_str().unwrap()]);
    let dir = tmp.join("sig");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("Logo.htm"), HTML).unwrap();
    std::fs::write(dir.join("logo.png"), b"\x89PNG\r\n\x1a\nfake").unwrap();
    server.ctl_ok(&["signatures", "set", "Logo", "--html", dir.join("Logo.htm").to_str().unwrap(), "--group", "Staff"]);
    let token = server.ctl_ok(&["admin-tokens", "create", "portal-admin", "--role", "admin"]).trim().to_string();
    let cookie = sign_in(&server, &token);
    (server, token, cookie)
}

/// No portal response may carry a hostile directory value as markup.
fn assert_no_live_markup(body: &str, what: &str) {
    for bad in [XSS_NAME, XSS_TITLE, "<script>alert", "<img src=x"] {
        assert!(!body.contains(bad), "{what} carries {bad:?} unescaped: {body}");
    }
}

#[test]
fn upload_preview_and_remove_through_the_page() {
    let tmp = tempfile::tempdir().unwrap();
    let (server, _token, cookie) = setup(tmp.path());
    let c = Some(cookie.as_str());

    // The list: the template stored by tenonctl, with its group, image and link.
    let page = get(&server, "/signatures", c, &[]);
    assert_eq!(page.status, 200, "{}", page.body);
    assert_security_headers(&page, "the signatures page");
    assert!(page.body.contains("href=\"/signatures\">Signatures</a>"), "the nav links the page");
    assert!(page.body.contains("href=\"/signatures/Logo\"") && page.body.contains("logo.png ("), "{}", page.body);
    assert!(page.body.contains("href=\"/groups/Staff\""));
    let csrf = csrf_of(&page.body);
    let audit_len = audit(&server).len();

    // A forged CSRF token: refused, nothing stored, everything typed kept.
    let html = "<p>{{Graph_User_DisplayName}}</p>\n<p>Title: {{Graph_User_JobTitle}}</p>\n<p>Fax: {{Graph_User_FaxNumber}}</p>";
    let fields = |csrf: &'static str, name: &'static str| {
        vec![
            ("csrf", csrf),
            ("name", name),
            ("html", html),
            ("txt", ""),
            ("default", "new"),
            ("groups", "Staff, Sales"),
        ]
    };
    let r = post(&server, "/signatures", c, &fields("forged", "Corp"));
    assert_eq!(r.status, 403);
    assert!(r.body.contains("Nothing was changed") && r.body.contains("role=\"alert\""));
    assert!(r.body.contains("value=\"Corp\"") && r.body.contains("value=\"Staff, Sales\""), "{}", r.body);
    assert!(r.body.contains("&#60;p&#62;{{Graph_User_DisplayName}}&#60;/p&#62;"), "the HTML is kept: {}", r.body);
    assert!(r.body.contains("<option value=\"new\" selected>"));
    assert_eq!(signature_names(&server), ["Logo"]);
    assert_eq!(audit(&server).len(), audit_len);

    // The domain's validation and limits, as for `tenonctl signatures set`.
    let csrf: &'static str = Box::leak(csrf.into_boxed_str());
    let r = post(&server, "/signatures", c, &fields(csrf, "Co/rp"));
    assert_eq!(r.status, 422, "{}", r.body);
    assert!(r.body.contains("Windows file name") && r.body.contains("value=\"Co/rp\""), "{}", r.body);
    let huge = format!("<p>{}</p>", "x".repeat(1024 * 1024 + 1));
    let r = post(&server, "/signatures", c, &[("csrf", csrf), ("name", "Huge"), ("html", &huge), ("groups", "Staff")]);
    assert_eq!(r.status, 422);
    assert!(r.body.contains("the limit is 1024 KiB"), "{}", &r.body[..2000.min(r.body.len())]);
    let r = post(&server, "/signatures", c, &[("csrf", csrf), ("name", "Pic"), ("html", "<img src=\"new.png\">")]);
    assert_eq!(r.status, 422);
    assert!(r.body.contains("tenonctl signatures set"));
    assert_eq!(signature_names(&server), ["Logo"]);

    // Saved: a redirect to its page; audited with the session's token name.
    let r = post(&server, "/signatures", c, &fields(csrf, "Corp"));
    assert_eq!(r.status, 303, "{}", r.body);
    assert_eq!(r.location.as_deref(), Some("/signatures/Corp?done=created&users=2"));
    assert_eq!(signature_names(&server), ["Corp", "Logo"]);
    let r = get(&server, "/signatures/Corp?done=created&users=2", c, &[]);
    assert!(r.body.contains("Saved (created). It reaches 2 user(s)"), "{}", r.body);
    let row = audit(&server).into_iter().find(|e| e["action"] == "signatures.create").unwrap();
    assert!(row["actor"].as_str().unwrap().starts_with("portal-admin ("), "{row}");
    assert_eq!(row["target"], json!("Corp"));
    let listed = server.ctl_json(&["signatures", "list"]);
    assert_eq!(listed[0]["groups"], json!(["Staff", "Sales"]));
    assert_eq!(listed[0]["default"], json!("new"));
    let page = get(&server, "/signatures", c, &[]);
    assert!(page.body.contains("href=\"/signatures/Corp\"") && page.body.contains("<td>new</td>"));

    // The preview for Anna: hostile values escaped everywhere; empty lines dropped.
    let r = get(&server, "/signatures/Corp?user=anna%40contoso.com", c, &[]);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("content-security-policy"), Some(PAGE_CSP));
    assert_eq!(r.header("x-frame-options"), Some("DENY"));
    assert_no_live_markup(&r.body, "the signature page");
    assert!(
        r.body.contains(
            "<iframe class=\"signature-preview\" sandbox src=\"/signatures/Corp/preview.html?user=anna%40contoso.com\""
        ),
        "{}",
        r.body
    );
    // The text rendering shows the value as text; the HTML source shows the renderer's escape.
    assert!(r.body.contains("&#60;/script&#62;&#60;script&#62;alert(1)&#60;/script&#62;"), "{}", r.body);
    assert!(r.body.contains("&#38;lt;img src=x onerror=alert(1)&#38;gt;"), "{}", r.body);
    assert!(!r.body.contains("Fax:"), "a line whose placeholders are all empty drops out");
    let r = get(&server, "/signatures/Corp/preview.html?user=anna%40contoso.com", c, &[]);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("content-security-policy"), Some(PREVIEW_CSP));
    assert_eq!(r.header("x-frame-options"), Some("SAMEORIGIN"));
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    assert!(r.header("content-type").is_some_and(|v| v.starts_with("text/html")));
    assert_no_live_markup(&r.body, "the preview document");
    assert!(r.body.contains("<p>&lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt;</p>"), "{}", r.body);
    assert!(r.body.contains("Title: &lt;img src=x onerror=alert(1)&gt;"), "{}", r.body);
    // The image of a template is inlined (on the device it sits in `Logo_files/`).
    let r = get(&server, "/signatures/Logo/preview.html?user=anna%40contoso.com", c, &[]);
    assert!(r.body.contains("src=\"data:image/png;base64,iVBORw0KGgpmYWtl\""), "{}", r.body);
    assert!(!r.body.contains("Fax:"));
    // Ben is not in Logo's groups: said, still previewed.
    let r = get(&server, "/signatures/Logo?user=ben%40contoso.com", c, &[]);
    assert!(r.body.contains("in none of this template") && r.body.contains("Ben Brown"));
    let r = get(&server, "/signatures/Corp?user=nobody%40contoso.com", c, &[]);
    assert_eq!(r.status, 404);
    assert!(r.body.contains("no user nobody@contoso.com") && r.body.contains("value=\"nobody@contoso.com\""));
    assert_eq!(get(&server, "/signatures/Corp/preview.html?user=nobody%40contoso.com", c, &[]).status, 404);
    assert_eq!(get(&server, "/signatures/Nope", c, &[]).status, 404);

    // Replacing through the page keeps the images the HTML still references.
    let r = get(&server, "/signatures?edit=Logo", c, &[]);
    assert!(r.body.contains("value=\"Logo\"") && r.body.contains("&#60;img src=&#34;logo.png&#34;"), "{}", r.body);
    let replaced = HTML.replace("Fax:", "Telefax:");
    let r = post(
        &server,
        "/signatures",
        c,
        &[("csrf", csrf), ("name", "Logo"), ("html", &replaced), ("default", "both"), ("groups", "")],
    );
    assert_eq!(r.status, 303, "{}", r.body);
    let logo = server.ctl_json(&["signatures", "list"])[1].clone();
    assert_eq!((logo["groups"].clone(), logo["default"].clone()), (json!(["Staff"]), json!("both")));
    assert!(logo["images"]["logo.png"].is_number(), "{logo}");
    assert!(audit(&server)
        .iter()
        .any(|e| e["action"] == "signatures.update"
            && e["actor"].as_str().is_some_and(|a| a.starts_with("portal-admin ("))));

    // Removal: confirmation required, CSRF required, then gone and audited.
    let r = post(&server, "/signatures/Corp/remove", c, &[("csrf", csrf)]);
    assert_eq!(r.status, 422);
    assert!(r.body.contains("Tick the confirmation box"));
    let r = post(&server, "/signatures/Corp/remove", c, &[("csrf", "forged"), ("confirm", "yes")]);
    assert_eq!(r.status, 403);
    assert_eq!(signature_names(&server), ["Corp", "Logo"]);
    let r = post(&server, "/signatures/Corp/remove", c, &[("csrf", csrf), ("confirm", "yes")]);
    assert_eq!(r.status, 303, "{}", r.body);
    assert_eq!(r.location.as_deref(), Some("/signatures?done=removed&name=Corp"));
    assert_eq!(signature_names(&server), ["Logo"]);
    let row = audit(&server).into_iter().find(|e| e["action"] == "signatures.remove").unwrap();
    assert!(row["actor"].as_str().unwrap().starts_with("portal-admin ("), "{row}");
    let r = get(&server, "/signatures?done=removed&name=Corp", c, &[]);
    assert!(r.body.contains("Removed signature Corp") && !r.body.contains("href=\"/signatures/Corp\""));
    assert_eq!(post(&server, "/signatures/Corp/remove", c, &[("csrf", csrf), ("confirm", "yes")]).status, 404);
}

#[test]
fn signatures_need_an_admin_session() {
    let tmp = tempfile::tempdir().unwrap();
    let (server, _token, _cookie) = setup(tmp.path());
    // Signed out: to the sign-in page, the preview document too.
    for path in ["/signatures", "/signatures/Logo", "/signatures/Logo/preview.html?user=anna%40contoso.com"] {
        let r = get(&server, path, None, &[]);
        assert_eq!(r.status, 303, "{path}");
        assert_eq!(r.location.as_deref(), Some("/signin?why=signin"));
    }
    // A recovery-keys-only session: no nav link, every signatures route refused.
    let officer = server.ctl_ok(&["admin-tokens", "create", "officer", "--role", "recovery-keys"]).trim().to_string();
    let oc = sign_in(&server, &officer);
    let o = Some(oc.as_str());
    let overview = get(&server, "/", o, &[]);
    assert!(!overview.body.contains("/signatures"));
    let csrf = csrf_of(&overview.body);
    for path in ["/signatures", "/signatures/Logo", "/signatures/Logo/preview.html?user=anna%40contoso.com"] {
        let r = get(&server, path, o, &[]);
        assert_eq!(r.status, 403, "{path}");
        assert_no_live_markup(&r.body, path);
    }
    let r = post(&server, "/signatures", o, &[("csrf", &csrf), ("name", "X"), ("html", "<p>x</p>")]);
    assert_eq!(r.status, 403);
    let r = post(&server, "/signatures/Logo/remove", o, &[("csrf", &csrf), ("confirm", "yes")]);
    assert_eq!(r.status, 403);
    assert_eq!(signature_names(&server), ["Logo"]);
}
