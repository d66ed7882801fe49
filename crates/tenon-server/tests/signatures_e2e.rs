//! End to end for Outlook signatures: templates stored with tenonctl, filled per user from the
//! directory by the real server, rendered by a simulated agent into each signed-in user's profile.

mod common;

use common::{Server, SimAgent};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

const ANNA: &str = "anna@contoso.com";
const KEN: &str = "ken@contoso.com";
const SCRIPT_TITLE: &str = "<script>alert(1)</script> & \"R&D\"";
/// Not a real PNG, but bytes that must arrive exactly.
const LOGO: &[u8] = b"\x89PNG\r\n\x1a\n\x00\x01\x02\xfe\xff logo";

fn write_users(dir: &Path, anna_title: &str) -> PathBuf {
    let p = dir.join("users.json");
    let users = json!([
        {"userPrincipalName": ANNA, "id": "u-anna", "displayName": "Anna Müller", "givenName": "Anna",
         "jobTitle": anna_title, "businessPhones": ["+49 30 1234"], "groups": ["Staff"]},
        {"userPrincipalName": KEN, "id": "u-ken", "displayName": "山田 健 (Yamada Ken)", "jobTitle": "Ingénieur",
         "businessPhones": [], "faxNumber": "+81 3 5555", "groups": ["Staff"]},
        {"userPrincipalName": "guest@contoso.com", "displayName": "Guest", "groups": ["Guests"]}
    ]);
    std::fs::write(&p, users.to_string()).unwrap();
    p
}

fn write_fixture(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir.join("images")).unwrap();
    std::fs::write(dir.join("images/logo.png"), LOGO).unwrap();
    let html = dir.join("fixture.htm");
    std::fs::write(
        &html,
        "<html><body>\n<p>{{Graph_User_DisplayName}}<br>\n{{Graph_User_JobTitle}}<br>\n\
         Tel: {{Graph_User_BusinessPhone}}<br>\nFax: {{Graph_User_FaxNumber}}</p>\n\
         <p><img src=\"images/logo.png\" alt=\"Contoso\"></p>\n</body></html>\n",
    )
    .unwrap();
    html
}

fn sig_dir(profiles: &Path, upn: &str) -> PathBuf {
    profiles.join(upn).join("AppData/Roaming/Microsoft/Signatures")
}

/// A signature file as text, without the byte order mark Tenon writes.
fn text(path: PathBuf) -> String {
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    String::from_utf8(bytes).unwrap().trim_start_matches('\u{feff}').to_string()
}

fn version(agent: &SimAgent) -> u64 {
    agent.status()["config_version"].as_u64().unwrap()
}

fn assert_usage_error(out: &std::process::Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "expected a usage error, got: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line on stderr: {stderr}");
    assert!(stderr.contains(needle), "{needle:?} not in {stderr}");
}

#[test]
fn signatures_reach_each_signed_in_user_and_follow_the_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = Server::start(&data, "127.0.0.1:0");
    let addr = server.addr.clone();
    server.ctl_ok(&["users", "import", write_users(tmp.path(), SCRIPT_TITLE).to_str().unwrap()]);
    let html = write_fixture(&tmp.path().join("fixture"));
    let html_arg = html.to_str().unwrap();

    // Usage errors: exit 2, one line that names the problem.
    let out = server.ctl(&["signatures", "set", "Corporate", "--html", html_arg, "--default", "always"]);
    assert_usage_error(&out, "always");
    let out = server.ctl(&["signatures", "set", "Corporate", "--html", "/nonexistent/sig.htm"]);
    assert_usage_error(&out, "/nonexistent/sig.htm");
    let broken = tmp.path().join("fixture/broken.htm");
    std::fs::write(&broken, "<p>x</p><img src=\"images/missing-logo.png\">").unwrap();
    let out = server.ctl(&["signatures", "set", "Corporate", "--html", broken.to_str().unwrap()]);
    assert_usage_error(&out, "missing-logo.png");
    // The server refuses what cannot become a Windows file name, saying why.
    let out = server.ctl(&["signatures", "set", "CON", "--html", html_arg]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("reserved device name"));
    assert_eq!(server.ctl_json(&["signatures", "list"]), json!([]));

    let set = server.ctl_json(&[
        "signatures",
        "set",
        "Corporate",
        "--html",
        html_arg,
        "--default",
        "both",
        "--group",
        "Staff",
    ]);
    assert_eq!(set["created"], json!(true));
    assert_eq!(set["users"], json!(2));
    let list = server.ctl_json(&["signatures", "list"]);
    assert_eq!(list[0]["name"], json!("Corporate"));
    assert_eq!(list[0]["groups"], json!(["Staff"]));
    assert_eq!(list[0]["default"], json!("both"));
    assert_eq!(list[0]["images"], json!({"logo.png": LOGO.len()}));
    assert!(list[0].get("html").is_none(), "the list leaves out the HTML unless asked");
    let full = server.ctl_json(&["signatures", "list", "--full"]);
    assert!(full[0]["html"].as_str().unwrap().contains("{{Graph_User_JobTitle}}"));

    // One device, two users signed in; Anna has a signature of her own.
    let profiles = tmp.path().join("profiles");
    std::fs::create_dir_all(sig_dir(&profiles, ANNA)).unwrap();
    std::fs::write(sig_dir(&profiles, ANNA).join("Mine.htm"), "<p>my own</p>").unwrap();
    let agent = SimAgent::new(
        tmp.path(),
        "pc",
        json!({"hostname": "PC-SHARED", "signed_in_users": [ANNA, KEN], "profiles_dir": profiles}),
    );
    agent.enroll(&server, &server.enroll_token(1));
    agent.ok(&["sync", "--once"]);
    let v1 = version(&agent);
    assert_eq!(agent.status()["last_error"], json!(null));

    let anna = sig_dir(&profiles, ANNA);
    let ken = sig_dir(&profiles, KEN);
    let anna_htm = text(anna.join("Corporate.htm"));
    assert!(anna_htm.contains("Anna Müller"), "{anna_htm}");
    assert!(anna_htm.contains("&lt;script&gt;alert(1)&lt;/script&gt; &amp; &quot;R&amp;D&quot;"), "{anna_htm}");
    assert!(!anna_htm.contains("<script>"), "{anna_htm}");
    assert!(anna_htm.contains("Tel: +49 30 1234"));
    assert!(!anna_htm.contains("Fax:"), "Anna has no fax number, so its line drops: {anna_htm}");
    assert!(anna_htm.contains("src=\"Corporate_files/logo.png\""), "{anna_htm}");
    let anna_txt = text(anna.join("Corporate.txt"));
    assert!(anna_txt.contains(SCRIPT_TITLE), "{anna_txt}");
    assert!(!anna_txt.contains("&amp;"), "{anna_txt}");
    let anna_rtf = text(anna.join("Corporate.rtf"));
    assert!(anna_rtf.is_ascii());
    assert!(anna_rtf.contains("Anna M\\u252?ller"), "{anna_rtf}");
    assert_eq!(std::fs::read(anna.join("Corporate_files/logo.png")).unwrap(), LOGO);

    let ken_htm = text(ken.join("Corporate.htm"));
    assert!(ken_htm.contains("山田 健 (Yamada Ken)") && ken_htm.contains("Ingénieur"), "{ken_htm}");
    assert!(ken_htm.contains("Fax: +81 3 5555") && !ken_htm.contains("Tel:"), "{ken_htm}");
    assert!(!ken_htm.contains("Anna"), "each user gets their own values: {ken_htm}");
    assert!(text(ken.join("Corporate.txt")).contains("山田 健 (Yamada Ken)"));
    let ken_rtf = text(ken.join("Corporate.rtf"));
    assert!(ken_rtf.contains("\\u23665?\\u30000? \\u20581?"), "{ken_rtf}");
    assert!(ken_rtf.contains("Ing\\u233?nieur"), "{ken_rtf}");
    assert_eq!(std::fs::read(ken.join("Corporate_files/logo.png")).unwrap(), LOGO);
    let registry = &agent.device()["registry"];
    let mail_settings = format!("HKU\\{ANNA}\\Software\\Microsoft\\Office\\16.0\\Common\\MailSettings");
    assert_eq!(registry[&mail_settings]["NewSignature"]["value"], json!("Corporate"), "{registry}");
    assert_eq!(registry[&mail_settings]["ReplySignature"]["value"], json!("Corporate"), "{registry}");

    // Templates survive a restart: the server compiles the same payload, the agent sees no change.
    server.stop();
    let server = Server::start(&data, &addr);
    assert_eq!(server.ctl_json(&["signatures", "list"])[0]["images"], json!({"logo.png": LOGO.len()}));
    assert!(agent.ok(&["sync", "--once"]).contains("sync unchanged"));

    // A changed job title reaches the device at its next sync, through the config hash.
    let ken_before = std::fs::read(ken.join("Corporate.htm")).unwrap();
    server.ctl_ok(&["users", "import", write_users(tmp.path(), "Head of R&D").to_str().unwrap()]);
    assert!(agent.ok(&["sync", "--once"]).contains("sync updated"));
    assert!(version(&agent) > v1);
    let anna_htm = text(anna.join("Corporate.htm"));
    assert!(anna_htm.contains("Head of R&amp;D") && !anna_htm.contains("script"), "{anna_htm}");
    assert!(text(anna.join("Corporate.txt")).contains("Head of R&D"));
    assert_eq!(std::fs::read(ken.join("Corporate.htm")).unwrap(), ken_before, "Ken's signature did not change");

    // Updating the HTML without --group keeps the assignment.
    let again = server.ctl_json(&["signatures", "set", "Corporate", "--html", html_arg]);
    assert_eq!(again["created"], json!(false));
    assert_eq!(server.ctl_json(&["signatures", "list"])[0]["groups"], json!(["Staff"]));
    assert_eq!(server.ctl_json(&["signatures", "list"])[0]["default"], json!("both"));

    // Removing the template deletes exactly Tenon's files; Anna's own signature stays.
    let v2 = version(&agent);
    let removed = server.ctl_json(&["signatures", "remove", "Corporate"]);
    assert_eq!(removed["devices_updated"], json!(1));
    let out = server.ctl(&["signatures", "remove", "Corporate"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("signatures list"));
    assert!(agent.ok(&["sync", "--once"]).contains("sync updated"));
    assert!(version(&agent) > v2);
    let left = |dir: &Path| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map(|rd| rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        names.sort();
        names
    };
    assert_eq!(left(&anna), ["Mine.htm"]);
    assert_eq!(std::fs::read_to_string(anna.join("Mine.htm")).unwrap(), "<p>my own</p>");
    assert_eq!(left(&ken), Vec::<String>::new());
    let registry = &agent.device()["registry"];
    assert!(registry[&mail_settings].get("NewSignature").is_none(), "{registry}");

    let audit = server.ctl_json(&["audit", "list"]);
    let actions: Vec<&str> = audit.as_array().unwrap().iter().filter_map(|a| a["action"].as_str()).collect();
    for a in ["signatures.create", "signatures.update", "signatures.remove"] {
        assert!(actions.contains(&a), "{a} not audited: {actions:?}");
    }
    server.stop();
}

#[test]
fn signature_endpoints_answer_bad_input_with_problems() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"), "127.0.0.1:0");
    let url = format!("{}/api/v1/admin/signatures", server.url);
    let put = |name: &str, body: Value| match ureq::put(&format!("{url}/{name}"))
        .set("Authorization", &format!("Bearer {}", server.token))
        .send_json(body)
    {
        Ok(r) => (r.status(), r.into_json::<Value>().unwrap()),
        Err(ureq::Error::Status(code, r)) => {
            assert_eq!(r.content_type(), "application/problem+json");
            (code, r.into_json::<Value>().unwrap())
        }
        Err(e) => panic!("{e}"),
    };
    let (code, p) = put("Corp", json!({"html": "<p>x</p>", "groups": []}));
    assert_eq!((code, p["code"].as_str()), (400, Some("bad_request")));
    assert!(p["detail"].as_str().unwrap().contains("All Users"), "{p}");
    let (code, p) = put("Corp", json!({"html": "<p>x</p>", "groups": ["Staff"], "images": {"a.png": "%%%"}}));
    assert_eq!(code, 400);
    assert!(p["detail"].as_str().unwrap().contains("a.png"), "{p}");
    let (code, _) = put("Corp", json!({"html": "<p>x</p>", "groups": ["Staff"], "default": "sometimes"}));
    assert_eq!(code, 400);
    let (code, p) = put("Corp", json!({"name": "Other", "html": "<p>x</p>", "groups": ["Staff"]}));
    assert_eq!(code, 400, "{p}");
    // A template too large for the devices' config limit is refused with what to do about it.
    let big = "A".repeat(2 * 1024 * 1024);
    let (code, p) = put("Corp", json!({"html": "<p>x</p>", "groups": ["Staff"], "images": {"huge.png": big}}));
    assert_eq!(code, 400);
    assert!(p["detail"].as_str().unwrap().contains("smaller images"), "{p}");
    let (code, p) = put("Corp", json!({"html": "<p>x</p>", "groups": [" Staff ", "Staff"]}));
    assert_eq!(code, 201, "{p}");
    assert_eq!(server.ctl_json(&["signatures", "list"])[0]["groups"], json!(["Staff"]));
    let (code, p) = put("corp", json!({"html": "<p>x</p>", "groups": ["Staff"]}));
    assert_eq!((code, p["code"].as_str()), (409, Some("conflict")));
    let resp = ureq::delete(&format!("{url}/Nope")).set("Authorization", &format!("Bearer {}", server.token)).call();
    match resp {
        Err(ureq::Error::Status(404, r)) => assert_eq!(r.content_type(), "application/problem+json"),
        other => panic!("expected 404, got {other:?}"),
    }
    let resp = ureq::get(&url).call();
    assert!(matches!(resp, Err(ureq::Error::Status(401, _))));

    // Templates that each fit but together would push a device's config past what the agent
    // accepts are refused before they are stored, naming the device; the device keeps syncing.
    let users = tmp.path().join("users.json");
    std::fs::write(&users, json!([{"userPrincipalName": ANNA, "groups": ["Staff"]}]).to_string()).unwrap();
    server.ctl_ok(&["users", "import", users.to_str().unwrap()]);
    let agent = SimAgent::new(tmp.path(), "pc", json!({"hostname": "PC", "signed_in_users": [ANNA]}));
    let id = agent.enroll(&server, &server.enroll_token(1));
    agent.ok(&["sync", "--once"]);
    let image = "A".repeat(1000 * 1024);
    let mut refused = None;
    for n in 0..6 {
        let (code, p) =
            put(&format!("Big{n}"), json!({"html": "<p>x</p>", "groups": ["All Users"], "images": {"i.png": image}}));
        if code == 400 {
            refused = Some((n, p));
            break;
        }
        assert_eq!(code, 201, "{p}");
    }
    let (n, p) = refused.expect("the device's config limit is enforced");
    assert!(n >= 3, "refused too early, at template {n}");
    assert!(p["detail"].as_str().unwrap().contains(&id), "{p}");
    let names: Vec<Value> =
        server.ctl_json(&["signatures", "list"]).as_array().unwrap().iter().map(|t| t["name"].clone()).collect();
    assert!(!names.contains(&json!(format!("Big{n}"))), "a refused template is not stored: {names:?}");
    agent.ok(&["sync", "--once"]);
    assert_eq!(agent.status()["last_error"], json!(null));
    server.stop();
}
