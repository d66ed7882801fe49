//! The `signatures` policy end to end on the simulated platform: per-user values, images, defaults
//! in the registry, rewrites only on change, and removal of exactly what Tenon wrote.

use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};
use tenon_agent::platform::simulated::SimulatedPlatform;
use tenon_agent::platform::{Platform, RegValue};
use tenon_agent::policies::signatures::Signatures;
use tenon_agent::policies::{Policy, PolicyContext};
use tenon_core::api::PolicyStatus;
use tenon_core::policy::signatures::{user_signature_config, DefaultUse, SignatureTemplate};

const ANNA: &str = "anna@contoso.com";
const BEN: &str = "ben@contoso.com";
const MAIL_SETTINGS: &str = r"Software\Microsoft\Office\16.0\Common\MailSettings";
/// "PNGDATA" in base64.
const LOGO: &str = "UE5HREFUQQ==";

struct Device {
    dir: tempfile::TempDir,
    platform: SimulatedPlatform,
    state: Value,
}

impl Device {
    fn new(users: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("device.json");
        let profiles = dir.path().join("profiles");
        std::fs::write(&path, json!({"signed_in_users": users, "profiles_dir": profiles}).to_string()).unwrap();
        let platform = SimulatedPlatform::open(&path).unwrap();
        Device { dir, platform, state: Value::Null }
    }

    fn sig_dir(&self, upn: &str) -> PathBuf {
        self.dir.path().join("profiles").join(upn).join("AppData/Roaming/Microsoft/Signatures")
    }

    fn read(&self, upn: &str, file: &str) -> String {
        std::fs::read_to_string(self.sig_dir(upn).join(file)).unwrap()
    }

    fn files(&self, upn: &str) -> Vec<String> {
        let mut out = Vec::new();
        list(&self.sig_dir(upn), "", &mut out);
        out.sort();
        out
    }

    fn apply(&mut self, users: &Map<String, Value>) -> PolicyStatus {
        let machine = Map::new();
        let mut ctx = PolicyContext {
            platform: &self.platform,
            machine: &machine,
            users,
            now: 0,
            state: &mut self.state,
            escrow: &tenon_agent::policies::NoEscrow,
            store: &tenon_agent::policies::NoStore,
        };
        Signatures.apply(&mut ctx)
    }

    fn reg(&self, upn: &str, name: &str) -> Option<RegValue> {
        self.platform.reg_get(&format!(r"HKU\{upn}\{MAIL_SETTINGS}"), name).unwrap()
    }
}

fn list(dir: &Path, prefix: &str, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries {
        let e = e.unwrap();
        let name = format!("{prefix}{}", e.file_name().to_string_lossy());
        if e.file_type().unwrap().is_dir() {
            out.push(format!("{name}/"));
            list(&e.path(), &format!("{name}/"), out);
        } else {
            out.push(name);
        }
    }
}

fn template(name: &str, default: Option<DefaultUse>, images: &[(&str, &str)]) -> SignatureTemplate {
    SignatureTemplate {
        name: name.into(),
        html: format!(
            "<p><b>{{{{Graph_User_DisplayName}}}}</b><br>{{{{Graph_User_JobTitle}}}}<br>Fax: {{{{Graph_User_FaxNumber}}}}</p><p>{name}</p><img src=\"logo.png\">"
        ),
        txt: None,
        default,
        groups: vec!["All Users".into()],
        images: images.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
    }
}

/// `payload.users` as the server would compile it for these users.
fn payload(templates: &[SignatureTemplate], users: &[(&str, Value)], options: Option<Value>) -> Map<String, Value> {
    users
        .iter()
        .map(|(upn, directory)| {
            let mut sig = user_signature_config(templates, &[], directory);
            if let Some(o) = &options {
                sig["Options"] = o.clone();
            }
            (upn.to_string(), json!({"Signatures": sig}))
        })
        .collect()
}

fn anna() -> Value {
    json!({"displayName": "Anna Berg", "jobTitle": "<script>alert(1)</script> & \"R&D\"", "mail": ANNA})
}

fn ben() -> Value {
    json!({"displayName": "Ben Öztürk", "jobTitle": "Vertrieb 東京", "faxNumber": "+49 40 1"})
}

#[test]
fn two_users_on_one_device_each_get_their_own_values() {
    let mut dev = Device::new(&[ANNA, "Ben@Contoso.com"]);
    let users = payload(&[template("Corp", None, &[])], &[(ANNA, anna()), (BEN, ben())], None);
    let status = dev.apply(&users);
    assert_eq!(status.state, "ok", "{status:?}");

    let a = dev.read(ANNA, "Corp.htm");
    assert!(a.starts_with('\u{feff}'));
    assert!(a.contains("<b>Anna Berg</b>") && !a.contains("Ben"));
    assert!(a.contains("&lt;script&gt;alert(1)&lt;/script&gt; &amp; &quot;R&amp;D&quot;") && !a.contains("<script>"));
    assert!(!a.contains("Fax"), "Anna has no fax, so the line goes: {a}");
    assert!(dev.read(ANNA, "Corp.txt").contains("<script>alert(1)</script> & \"R&D\"\r\n"));

    // The UPN's case on the device does not matter; the profile folder is the signed-in name.
    let b = std::fs::read_to_string(
        dev.dir.path().join("profiles/Ben@Contoso.com/AppData/Roaming/Microsoft/Signatures/Corp.htm"),
    )
    .unwrap();
    assert!(b.contains("<b>Ben Öztürk</b>") && b.contains("Fax: +49 40 1") && !b.contains("Anna"));
    let rtf = std::fs::read_to_string(
        dev.dir.path().join("profiles/Ben@Contoso.com/AppData/Roaming/Microsoft/Signatures/Corp.rtf"),
    )
    .unwrap();
    assert!(rtf.contains("Ben \\u214?zt\\u252?rk") && rtf.contains("Vertrieb \\u26481?\\u20140?"), "{rtf}");
    assert_eq!(status.details["users"][ANNA]["templates"], json!(["Corp"]));
}

#[test]
fn roaming_option_puts_the_upn_in_the_name() {
    let mut dev = Device::new(&[ANNA]);
    let t = template("Corp", Some(DefaultUse::New), &[("logo.png", LOGO)]);
    let users = payload(&[t], &[(ANNA, anna())], Some(json!({"IncludeUpnInName": true})));
    assert_eq!(dev.apply(&users).state, "ok");
    let base = format!("Corp ({ANNA})");
    assert_eq!(
        dev.files(ANNA),
        [
            format!("{base}.htm"),
            format!("{base}.rtf"),
            format!("{base}.txt"),
            format!("{base}_files/"),
            format!("{base}_files/logo.png")
        ]
    );
    assert!(dev.read(ANNA, &format!("{base}.htm")).contains("src=\"Corp%20(anna@contoso.com)_files/logo.png\""));
    assert_eq!(dev.reg(ANNA, "NewSignature"), Some(RegValue::Sz(base)));
}

#[test]
fn images_land_in_the_files_folder() {
    let mut dev = Device::new(&[ANNA]);
    let users = payload(&[template("Corp", None, &[("logo.png", LOGO)])], &[(ANNA, anna())], None);
    assert_eq!(dev.apply(&users).state, "ok");
    assert_eq!(std::fs::read(dev.sig_dir(ANNA).join("Corp_files/logo.png")).unwrap(), b"PNGDATA");
    assert!(dev.read(ANNA, "Corp.htm").contains("<img src=\"Corp_files/logo.png\">"));
}

#[test]
fn a_second_apply_rewrites_nothing() {
    let mut dev = Device::new(&[ANNA]);
    let users = payload(&[template("Corp", Some(DefaultUse::Both), &[("logo.png", LOGO)])], &[(ANNA, anna())], None);
    assert_eq!(dev.apply(&users).state, "ok");
    // Age every file, so a rewrite would show even on a coarse clock.
    let old = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    for f in dev.files(ANNA).iter().filter(|f| !f.ends_with('/')) {
        std::fs::File::options().write(true).open(dev.sig_dir(ANNA).join(f)).unwrap().set_modified(old).unwrap();
    }
    let status = dev.apply(&users);
    assert_eq!(status.state, "ok", "{status:?}");
    assert_eq!(status.details["changed"], json!(false));
    assert_eq!(status.details["users"][ANNA]["written"], json!([]));
    for f in dev.files(ANNA).iter().filter(|f| !f.ends_with('/')) {
        assert_eq!(std::fs::metadata(dev.sig_dir(ANNA).join(f)).unwrap().modified().unwrap(), old, "{f} was rewritten");
    }

    // A changed job title rewrites exactly the files whose content changed.
    let mut changed = anna();
    changed["jobTitle"] = json!("Head of Sales");
    let status = dev.apply(&payload(
        &[template("Corp", Some(DefaultUse::Both), &[("logo.png", LOGO)])],
        &[(ANNA, changed)],
        None,
    ));
    assert_eq!(status.state, "ok");
    assert_eq!(status.details["users"][ANNA]["written"], json!(["Corp.htm", "Corp.rtf", "Corp.txt"]));
    assert!(dev.read(ANNA, "Corp.txt").contains("Head of Sales"));
}

#[test]
fn a_removed_template_deletes_exactly_its_files() {
    let mut dev = Device::new(&[ANNA]);
    let corp = template("Corp", Some(DefaultUse::New), &[("logo.png", LOGO)]);
    let sales = template("Sales", Some(DefaultUse::Reply), &[]);
    assert_eq!(dev.apply(&payload(&[corp.clone(), sales], &[(ANNA, anna())], None)).state, "ok");
    // The user's own signature, next to Tenon's.
    std::fs::write(dev.sig_dir(ANNA).join("Mine.htm"), "<p>my own</p>").unwrap();
    assert_eq!(dev.reg(ANNA, "ReplySignature"), Some(RegValue::Sz("Sales".into())));

    let status = dev.apply(&payload(&[corp], &[(ANNA, anna())], None));
    assert_eq!(status.state, "ok", "{status:?}");
    assert_eq!(dev.files(ANNA), ["Corp.htm", "Corp.rtf", "Corp.txt", "Corp_files/", "Corp_files/logo.png", "Mine.htm"]);
    assert_eq!(dev.read(ANNA, "Mine.htm"), "<p>my own</p>");
    assert_eq!(dev.reg(ANNA, "ReplySignature"), None);
    assert_eq!(dev.reg(ANNA, "NewSignature"), Some(RegValue::Sz("Corp".into())));

    // No templates at all: Corp goes with its image folder, the user's own file stays.
    let status = dev.apply(&payload(&[], &[(ANNA, anna())], None));
    assert_eq!(status.details["users"][ANNA]["removed"].as_array().unwrap().len(), 4);
    assert_eq!(dev.files(ANNA), ["Mine.htm"]);
    assert_eq!(dev.reg(ANNA, "NewSignature"), None);
}

#[test]
fn what_the_user_changed_after_removal_stays_theirs() {
    let mut dev = Device::new(&[ANNA]);
    let t = template("Corp", Some(DefaultUse::New), &[]);
    dev.apply(&payload(&[t], &[(ANNA, anna())], None));
    std::fs::write(dev.sig_dir(ANNA).join("Corp.txt"), "edited by Anna").unwrap();
    let key = format!(r"HKU\{ANNA}\{MAIL_SETTINGS}");
    dev.platform.reg_set(&key, "NewSignature", &RegValue::Sz("Mine".into())).unwrap();

    let status = dev.apply(&payload(&[], &[(ANNA, anna())], None));
    assert_eq!(status.state, "ok");
    assert_eq!(dev.files(ANNA), ["Corp.txt"]);
    assert_eq!(status.details["users"][ANNA]["left_as_user_changed"], json!(["Corp.txt"]));
    assert_eq!(dev.reg(ANNA, "NewSignature"), Some(RegValue::Sz("Mine".into())));
    // Released for good: a later run does not touch it either.
    assert_eq!(dev.apply(&payload(&[], &[(ANNA, anna())], None)).state, "not_applicable");
    assert_eq!(dev.read(ANNA, "Corp.txt"), "edited by Anna");
}

#[test]
fn unknown_placeholders_and_bad_configs_are_reported() {
    let mut dev = Device::new(&[ANNA, BEN]);
    let mut t = template("Corp", None, &[]);
    t.html.push_str("{{Graph_User_JobTitel}}");
    let mut users = payload(&[t], &[(ANNA, anna())], None);
    // Ben's config names a template that would escape the Signatures folder.
    users.insert(BEN.into(), json!({"Signatures": {"Templates": {"..\\evil": {"html": "x"}}, "Values": {}}}));
    let status = dev.apply(&users);
    assert_eq!(status.state, "failed");
    assert!(status.reason.as_deref().unwrap().starts_with(BEN));
    assert_eq!(status.details["users"][ANNA]["unknown_placeholders"], json!({"Corp": ["Graph_User_JobTitel"]}));
    assert!(dev.files(BEN).is_empty());
    assert!(!dev.dir.path().join("profiles").join("evil.htm").exists());
}

#[test]
fn users_without_config_are_skipped_and_nothing_assigned_is_not_applicable() {
    let mut dev = Device::new(&[ANNA]);
    let status = dev.apply(&Map::new());
    assert_eq!(status.state, "not_applicable");
    assert_eq!(status.reason.as_deref(), Some("no signature templates assigned"));
    assert!(status.details["users"][ANNA]["skipped"].is_string());
    assert!(dev.files(ANNA).is_empty());
    let mut dev = Device::new(&[]);
    assert_eq!(dev.apply(&Map::new()).state, "not_applicable");
    // Templates assigned, but nobody signed in: it waits for a user.
    let status = dev.apply(&payload(&[template("Corp", None, &[])], &[(ANNA, anna())], None));
    assert_eq!((status.state.as_str(), status.reason.as_deref()), ("waiting", Some("no user is signed in")));
    assert!(tenon_agent::policies::all().iter().any(|p| p.name() == "signatures"));
}

/// Issue 12: a fresh device whose file names no profiles_dir, with no template assigned, reported
/// `failed` ("profiles_dir is not set"). Nothing to do is `not_applicable`, and the profile folder
/// is not even looked up.
#[test]
fn nothing_assigned_on_a_device_without_profiles_is_not_applicable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("device.json");
    std::fs::write(&path, json!({"hostname": "PC-1", "signed_in_users": [ANNA]}).to_string()).unwrap();
    let platform = SimulatedPlatform::open(&path).unwrap();
    let mut state = Value::Null;
    let users = payload(&[], &[(ANNA, anna())], None);
    let mut ctx = PolicyContext {
        platform: &platform,
        machine: &Map::new(),
        users: &users,
        now: 0,
        state: &mut state,
        escrow: &tenon_agent::policies::NoEscrow,
        store: &tenon_agent::policies::NoStore,
    };
    let status = Signatures.apply(&mut ctx);
    assert_eq!(status.state, "not_applicable", "{status:?}");
    assert_eq!(status.reason.as_deref(), Some("no signature templates assigned"));
}
