//! The Active Directory reader (`directory::ldap`) against a real Samba AD DC. Runs when
//! `TENON_TEST_SAMBA` names the env file that `scripts/samba-ad start DIR` wrote (DIR/env, or its
//! KEY=VALUE lines themselves), and the test binary runs inside the DC's network namespace (the DC
//! listens on 127.0.0.1 there): `scripts/test` does both. Otherwise every test says why it skipped.
//!
//! Tests share one DC and run in parallel, so each works in an OU of its own (the reader's base DN)
//! and creates its objects there with samba-tool and ldbadd/ldbmodify on the DC's sam.ldb.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::process::Command;
use std::sync::Mutex;

use tenon_core::dirsync::{MemberChange, SourceBatch, SourceErrorKind, SourceGroup, SourceUser, SyncProgress};
use tenon_server::directory::ldap::{self, LdapConfig};

struct Dc {
    ldap_url: String,
    ldaps_url: String,
    base_dn: String,
    admin_dn: String,
    admin_password: String,
    ca_pem: Vec<u8>,
    sam_ldb: String,
}

fn dc(test: &str) -> Option<Dc> {
    let Some(spec) = std::env::var("TENON_TEST_SAMBA").ok().filter(|s| !s.trim().is_empty()) else {
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: TENON_TEST_SAMBA is not set (scripts/samba-ad start DIR, then run the test binary in its \
             namespace with TENON_TEST_SAMBA=DIR/env; scripts/test does this)"
        );
        return None;
    };
    let text =
        if spec.contains('=') { spec } else { std::fs::read_to_string(&spec).expect("read TENON_TEST_SAMBA file") };
    let kv: HashMap<&str, &str> = text.lines().filter_map(|l| l.trim().split_once('=')).collect();
    let get = |k: &str| kv.get(k).unwrap_or_else(|| panic!("TENON_TEST_SAMBA has no {k}")).to_string();
    Some(Dc {
        ldap_url: get("SAMBA_LDAP_URL"),
        ldaps_url: get("SAMBA_LDAPS_URL"),
        base_dn: get("SAMBA_BASE_DN"),
        admin_dn: get("SAMBA_ADMIN_DN"),
        admin_password: std::fs::read_to_string(get("SAMBA_ADMIN_PASSWORD_FILE"))
            .expect("admin password")
            .trim()
            .into(),
        ca_pem: std::fs::read(get("SAMBA_CA_FILE")).expect("CA file"),
        sam_ldb: get("SAMBA_SAM_LDB"),
    })
}

/// A short name unique to this run (sAMAccountName allows 20 characters).
fn unique(prefix: &str) -> String {
    let mut b = [0u8; 3];
    getrandom::fill(&mut b).unwrap();
    format!("{prefix}{}", hex::encode(b))
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Dc {
    /// A fresh OU for one test; its DN is the reader's base DN.
    fn ou(&self, name: &str) -> String {
        let dn = format!("OU={},{}", unique(name), self.base_dn);
        self.ldif("ldbadd", &format!("dn: {dn}\nobjectClass: organizationalUnit\n"));
        dn
    }

    fn ldif(&self, tool: &str, ldif: &str) {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(ldif.as_bytes()).unwrap();
        run(tool, &["-H", &self.sam_ldb, file.path().to_str().unwrap()]);
    }

    fn modify(&self, dn: &str, attr: &str, value: &str) {
        self.ldif("ldbmodify", &format!("dn: {dn}\nchangetype: modify\nreplace: {attr}\n{attr}: {value}\n"));
    }

    /// A user with a password, created the way an administrator would.
    fn samba_user(&self, ou: &str, name: &str, password: &str, extra: &[&str]) -> String {
        let rel_ou = ou.strip_suffix(&format!(",{}", self.base_dn)).unwrap();
        let mut args = vec!["user", "create", name, password, "-H", &self.sam_ldb, "--use-username-as-cn"];
        let userou = format!("--userou={rel_ou}");
        args.push(&userou);
        args.extend_from_slice(extra);
        run("samba-tool", &args);
        format!("CN={name},{ou}")
    }

    fn admin(&self, base_dn: &str) -> LdapConfig {
        LdapConfig {
            url: self.ldaps_url.clone(),
            bind_dn: Some(self.admin_dn.clone()),
            base_dn: base_dn.into(),
            ca_pem: Some(self.ca_pem.clone()),
            allow_plain_ldap: false,
        }
    }
}

async fn read_as(
    config: &LdapConfig,
    password: &str,
    cursor: Option<&str>,
) -> Result<(SourceBatch, Vec<SyncProgress>), tenon_core::dirsync::SourceError> {
    let seen = Mutex::new(Vec::new());
    let progress = |p: SyncProgress| seen.lock().unwrap().push(p);
    let batch = ldap::read(config, Some(password), cursor, &progress).await?;
    Ok((batch, seen.into_inner().unwrap()))
}

fn full(batch: SourceBatch) -> (Vec<SourceUser>, Vec<SourceGroup>, String) {
    match batch {
        SourceBatch::Full { users, groups, cursor, .. } => (users, groups, cursor.expect("a cursor")),
        other => panic!("expected a full batch, got {other:?}"),
    }
}

fn by_upn<'a>(users: &'a [SourceUser], upn: &str) -> &'a SourceUser {
    users.iter().find(|u| u.upn.as_deref() == Some(upn)).unwrap_or_else(|| panic!("no {upn} in {users:?}"))
}

fn expiry(u: &SourceUser) -> &str {
    u.record["msDS-UserPasswordExpiryTimeComputed"].as_str().unwrap()
}

#[tokio::test]
async fn full_read_maps_every_field_and_password_state() {
    let Some(dc) = dc("full_read_maps_every_field_and_password_state") else { return };
    let ou = dc.ou("full");
    let name = unique("ann");
    let dn = dc.samba_user(
        &ou,
        &name,
        "Pa55word!one",
        &[
            "--given-name=Ann",
            "--surname=Example",
            "--department=Finance",
            "--job-title=Controller",
            "--company=Tenon Ltd",
            "--telephone-number=+44 20 7946 0000",
            "--mail-address=ann@tenon.test",
            "--physical-delivery-office=Room 4",
        ],
    );
    for (attr, value) in [
        ("displayName", "Ann Example"),
        ("mobile", "+44 7700 900000"),
        ("facsimileTelephoneNumber", "+44 20 7946 0001"),
        ("streetAddress", "1 High Street"),
        ("l", "London"),
        ("postalCode", "EC1A 1AA"),
        ("st", "Greater London"),
        ("co", "United Kingdom"),
        ("extensionAttribute1", "cost-centre-7"),
        ("extensionAttribute15", "last one"),
    ] {
        dc.modify(&dn, attr, value);
    }
    let disabled = unique("dis");
    dc.samba_user(&ou, &disabled, "Pa55word!two", &[]);
    run("samba-tool", &["user", "disable", &disabled, "-H", &dc.sam_ldb]);
    let must_change = unique("mc");
    dc.samba_user(&ou, &must_change, "Pa55word!three", &["--must-change-at-next-login"]);
    let never = unique("nev");
    dc.samba_user(&ou, &never, "Pa55word!four", &[]);
    run("samba-tool", &["user", "setexpiry", &never, "--noexpiry", "-H", &dc.sam_ldb]);
    // No UPN: reported with `upn: None` (the server skips and counts it).
    let no_upn = unique("nou");
    dc.ldif(
        "ldbadd",
        &format!("dn: CN={no_upn},{ou}\nobjectClass: user\nsAMAccountName: {no_upn}\ndisplayName: No UPN\n"),
    );

    let (batch, _) = read_as(&dc.admin(&ou), &dc.admin_password, None).await.unwrap();
    let (users, groups, _) = full(batch);
    assert_eq!(users.len(), 5, "{users:#?}");
    assert!(groups.is_empty());

    let ann = by_upn(&users, &format!("{name}@tenon.test"));
    let want = serde_json::json!({
        "displayName": "Ann Example",
        "givenName": "Ann",
        "surname": "Example",
        "jobTitle": "Controller",
        "department": "Finance",
        "companyName": "Tenon Ltd",
        "mail": "ann@tenon.test",
        "businessPhones": ["+44 20 7946 0000"],
        "mobilePhone": "+44 7700 900000",
        "faxNumber": "+44 20 7946 0001",
        "officeLocation": "Room 4",
        "streetAddress": "1 High Street",
        "city": "London",
        "postalCode": "EC1A 1AA",
        "state": "Greater London",
        "country": "United Kingdom",
        "onPremisesExtensionAttributes": {"extensionAttribute1": "cost-centre-7", "extensionAttribute15": "last one"},
    });
    let mut record = serde_json::Value::Object(ann.record.clone());
    let ann_expiry = record.as_object_mut().unwrap().remove("msDS-UserPasswordExpiryTimeComputed").unwrap();
    assert_eq!(record, want);
    // A normal user: pwdLastSet (now) + the domain's maximum age (42 days) as a FILETIME.
    let filetime_now = (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
        + 11_644_473_600) as i64
        * 10_000_000;
    let ann_expiry: i64 = ann_expiry.as_str().unwrap().parse().unwrap();
    let days = (ann_expiry - filetime_now) as f64 / 864e9;
    assert!((41.0..=43.0).contains(&days), "expiry {ann_expiry} is {days} days away");
    assert_eq!(ann.account_enabled, Some(true));
    assert!(!ann.partial);
    assert_eq!(ann.external_id.len(), 36);
    assert_eq!(ann.external_id, ann.external_id.to_lowercase());

    assert_eq!(by_upn(&users, &format!("{disabled}@tenon.test")).account_enabled, Some(false));
    assert_eq!(expiry(by_upn(&users, &format!("{must_change}@tenon.test"))), "0");
    assert_eq!(expiry(by_upn(&users, &format!("{never}@tenon.test"))), "9223372036854775807");
    let nameless = users.iter().find(|u| u.upn.is_none()).expect("the user without a UPN");
    assert_eq!(nameless.record["displayName"], "No UPN");
}

#[tokio::test]
async fn nested_groups_give_direct_memberships() {
    let Some(dc) = dc("nested_groups_give_direct_memberships") else { return };
    let ou = dc.ou("nest");
    let user = unique("nu");
    let user_dn = dc.samba_user(&ou, &user, "Pa55word!nest", &[]);
    let (a, b) = (unique("ga"), unique("gb"));
    let group = |name: &str, members: &[&str]| {
        let mut ldif = format!("dn: CN={name},{ou}\nobjectClass: group\nsAMAccountName: {name}\n");
        for m in members {
            ldif.push_str(&format!("member: {m}\n"));
        }
        dc.ldif("ldbadd", &ldif);
        format!("CN={name},{ou}")
    };
    let b_dn = group(&b, &[&user_dn]);
    // A also holds a member outside the base DN (Administrator): not part of this source.
    let a_dn = group(&a, &[&b_dn, &dc.admin_dn]);

    let (batch, _) = read_as(&dc.admin(&ou), &dc.admin_password, None).await.unwrap();
    let (users, groups, _) = full(batch);
    let user_id = by_upn(&users, &format!("{user}@tenon.test")).external_id.clone();
    let find = |name: &str| groups.iter().find(|g| g.name.as_deref() == Some(name)).unwrap().clone();
    let (ga, gb) = (find(&a), find(&b));
    assert_eq!(
        ga.members,
        MemberChange::Whole(tenon_core::dirsync::Members {
            users: BTreeSet::new(),
            groups: BTreeSet::from([gb.external_id.clone()])
        })
    );
    assert_eq!(
        gb.members,
        MemberChange::Whole(tenon_core::dirsync::Members {
            users: BTreeSet::from([user_id.clone()]),
            groups: BTreeSet::new()
        })
    );

    // AD hands out large groups in member;range slices; Samba only when asked, so ask in
    // slices of 2 for a group of 5.
    let many: Vec<String> =
        (0..5).map(|i| dc.samba_user(&ou, &unique(&format!("r{i}")), "Pa55word!rng", &[])).collect();
    let refs: Vec<&str> = many.iter().map(String::as_str).chain([a_dn.as_str()]).collect();
    let big = group(&unique("gr"), &refs);
    let sliced = ldap::group_members_in_slices(&dc.admin(&ou), Some(&dc.admin_password), &big, 2).await.unwrap();
    assert_eq!(sliced.len(), 6, "{sliced:?}");
    assert!(sliced.contains(&ga.external_id));
}

#[tokio::test]
async fn paging_reads_more_than_one_page() {
    let Some(dc) = dc("paging_reads_more_than_one_page") else { return };
    let ou = dc.ou("page");
    let prefix = unique("p");
    let mut ldif = String::new();
    for i in 0..1200 {
        ldif.push_str(&format!(
            "dn: CN={prefix}-{i},{ou}\nobjectClass: user\nsAMAccountName: {prefix}-{i}\nuserPrincipalName: {prefix}-{i}@tenon.test\ndepartment: D{}\n\n",
            i % 7
        ));
    }
    dc.ldif("ldbadd", &ldif);
    let (batch, progress) = read_as(&dc.admin(&ou), &dc.admin_password, None).await.unwrap();
    let (users, _, _) = full(batch);
    assert_eq!(users.len(), 1200);
    let last = progress.last().unwrap();
    assert!(last.pages >= 3, "{progress:?}");
    assert_eq!(last.users, 1200);
    // Progress after each page, the running totals only ever growing.
    assert!(progress.windows(2).all(|w| w[0].pages < w[1].pages && w[0].users <= w[1].users));
}

#[tokio::test]
async fn incremental_read_returns_what_changed_and_a_working_cursor() {
    let Some(dc) = dc("incremental_read_returns_what_changed_and_a_working_cursor") else { return };
    let ou = dc.ou("inc");
    let names: Vec<String> = (0..3).map(|i| unique(&format!("i{i}"))).collect();
    let dns: Vec<String> = names.iter().map(|n| dc.samba_user(&ou, n, "Pa55word!inc", &["--department=Ops"])).collect();
    let group = unique("ig");
    let group_dn = format!("CN={group},{ou}");
    dc.ldif("ldbadd", &format!("dn: {group_dn}\nobjectClass: group\nsAMAccountName: {group}\nmember: {}\n", dns[0]));
    let config = dc.admin(&ou);
    let (batch, _) = read_as(&config, &dc.admin_password, None).await.unwrap();
    let (users, _, cursor) = full(batch);
    let id = |i: usize| by_upn(&users, &format!("{}@tenon.test", names[i])).external_id.clone();

    dc.modify(&dns[1], "department", "Research");
    let (batch, _) = read_as(&config, &dc.admin_password, Some(&cursor)).await.unwrap();
    let SourceBatch::Delta { users_changed, users_removed, groups_changed, groups_removed, cursor, .. } = batch else {
        panic!("expected a delta")
    };
    assert_eq!(users_changed.len(), 1, "{users_changed:#?}");
    assert_eq!(users_changed[0].external_id, id(1));
    assert_eq!(users_changed[0].record["department"], "Research");
    assert!(users_removed.is_empty() && groups_changed.is_empty() && groups_removed.is_empty());
    let cursor = cursor.unwrap();

    // A member added to the group: the group comes whole, its unchanged members resolved too;
    // a user deleted: named in users_removed (tombstones, show-deleted control).
    dc.ldif("ldbmodify", &format!("dn: {group_dn}\nchangetype: modify\nadd: member\nmember: {}\n", dns[2]));
    run("samba-tool", &["user", "delete", &names[1], "-H", &dc.sam_ldb]);
    let (batch, _) = read_as(&config, &dc.admin_password, Some(&cursor)).await.unwrap();
    let SourceBatch::Delta { users_changed, users_removed, groups_changed, cursor, .. } = batch else {
        panic!("expected a delta")
    };
    assert!(users_changed.iter().all(|u| u.external_id != id(1)), "{users_changed:#?}");
    assert_eq!(users_removed, vec![id(1)]);
    assert_eq!(groups_changed.len(), 1);
    assert_eq!(
        groups_changed[0].members,
        MemberChange::Whole(tenon_core::dirsync::Members {
            users: BTreeSet::from([id(0), id(2)]),
            groups: BTreeSet::new()
        })
    );

    // Nothing changed since: an empty delta.
    let (batch, _) = read_as(&config, &dc.admin_password, Some(&cursor.unwrap())).await.unwrap();
    let SourceBatch::Delta { users_changed, groups_changed, .. } = batch else { panic!("expected a delta") };
    assert!(users_changed.is_empty() && groups_changed.is_empty());

    // A cursor from another DC (another invocationId) or an unreadable one: start over.
    let other = r#"{"v":1,"usn":5,"invocation_id":"00000000-0000-0000-0000-000000000000","dc":"CN=x"}"#;
    for bad in [other, "garbage"] {
        let e = read_as(&config, &dc.admin_password, Some(bad)).await.unwrap_err();
        assert_eq!(e.kind, SourceErrorKind::CursorExpired, "{e}");
    }
}

#[tokio::test]
async fn bind_failures_say_what_ad_said() {
    let Some(dc) = dc("bind_failures_say_what_ad_said") else { return };
    let ou = dc.ou("bind");
    let e = read_as(&dc.admin(&ou), "not-the-password", None).await.unwrap_err();
    assert_eq!(e.kind, SourceErrorKind::Credentials);
    assert!(e.message.contains("wrong password for") && e.message.contains("52e"), "{e}");
    assert!(!e.message.contains("not-the-password"));

    let svc = unique("svc");
    let svc_dn = dc.samba_user(&ou, &svc, "Pa55word!svc", &["--must-change-at-next-login"]);
    let config = LdapConfig { bind_dn: Some(svc_dn), ..dc.admin(&ou) };
    let e = read_as(&config, "Pa55word!svc", None).await.unwrap_err();
    assert_eq!(e.kind, SourceErrorKind::Credentials);
    assert!(e.message.contains("773") && e.message.contains("must be changed"), "{e}");
    assert!(!e.message.contains("Pa55word"));

    let locked_out = LdapConfig { bind_dn: Some(dc.admin_dn.clone()), ..dc.admin(&ou) };
    let progress = |_: SyncProgress| {};
    let e = ldap::read(&locked_out, None, None, &progress).await.unwrap_err();
    assert_eq!(e.kind, SourceErrorKind::Credentials, "a bind DN without a password: {e}");
}

#[tokio::test]
async fn unreachable_dc_is_unreachable() {
    let Some(dc) = dc("unreachable_dc_is_unreachable") else { return };
    // Nothing listens on port 1 in the DC's namespace.
    let config = LdapConfig { url: "ldaps://127.0.0.1:1".into(), ..dc.admin(&dc.base_dn) };
    let e = read_as(&config, &dc.admin_password, None).await.unwrap_err();
    assert_eq!(e.kind, SourceErrorKind::Unreachable);
    assert!(e.message.contains("cannot reach the domain controller at ldaps://127.0.0.1:1"), "{e}");
}

#[tokio::test]
async fn transport_rules() {
    let Some(dc) = dc("transport_rules") else { return };
    let ou = dc.ou("tls");
    let name = unique("t");
    dc.samba_user(&ou, &name, "Pa55word!tls", &[]);

    // LDAPS with the DC's CA file works.
    let (batch, _) = read_as(&dc.admin(&ou), &dc.admin_password, None).await.unwrap();
    assert_eq!(full(batch).0.len(), 1);

    // Without it: a TLS error that names --ca-file.
    let no_ca = LdapConfig { ca_pem: None, ..dc.admin(&ou) };
    let e = read_as(&no_ca, &dc.admin_password, None).await.unwrap_err();
    assert_eq!(e.kind, SourceErrorKind::Unreachable);
    assert!(e.message.contains("TLS") && e.message.contains("--ca-file"), "{e}");

    // Plain ldap:// is refused unless allowed, before anything is sent.
    let plain = LdapConfig { url: dc.ldap_url.clone(), ..dc.admin(&ou) };
    let e = read_as(&plain, &dc.admin_password, None).await.unwrap_err();
    assert_eq!(e.kind, SourceErrorKind::Other);
    assert!(e.message.contains("ldaps://") && e.message.contains("--allow-plain-ldap"), "{e}");

    // Allowed: the DC offers StartTLS, so it is used (and its certificate checked).
    let allowed = LdapConfig { allow_plain_ldap: true, ..plain.clone() };
    let (batch, _) = read_as(&allowed, &dc.admin_password, None).await.unwrap();
    assert_eq!(full(batch).0.len(), 1);
    let allowed_no_ca = LdapConfig { ca_pem: None, ..allowed };
    let e = read_as(&allowed_no_ca, &dc.admin_password, None).await.unwrap_err();
    assert!(e.message.contains("--ca-file"), "StartTLS with an untrusted certificate never falls back to plain: {e}");
}

#[tokio::test]
async fn anonymous_or_unknown_base_fails_clearly() {
    let Some(dc) = dc("anonymous_or_unknown_base_fails_clearly") else { return };
    let progress = |_: SyncProgress| {};
    let anonymous = LdapConfig { bind_dn: None, ..dc.admin(&dc.base_dn) };
    let e = ldap::read(&anonymous, None, None, &progress).await.unwrap_err();
    assert_eq!(e.kind, SourceErrorKind::Permissions, "{e}");
    let missing = dc.admin(&format!("OU=does-not-exist,{}", dc.base_dn));
    let e = read_as(&missing, &dc.admin_password, None).await.unwrap_err();
    assert!(e.message.contains("--base-dn"), "{e}");
}

/// The whole path against the DC: tenonctl adds the source (LDAPS with the domain's CA), the real
/// server syncs it, a simulated device of one of its users gets the user's directory data, and a
/// change in AD reaches that device alone through an incremental sync.
#[test]
fn tenonctl_adds_an_ad_source_whose_changes_reach_the_device() {
    let Some(dc) = dc("tenonctl_adds_an_ad_source_whose_changes_reach_the_device") else { return };
    let ou = dc.ou("e2e");
    let (anna, ben) = (unique("anna"), unique("ben"));
    let anna_dn = dc.samba_user(&ou, &anna, "Pa55word!e2e", &["--department=Sales", "--given-name=Anna"]);
    dc.samba_user(&ou, &ben, "Pa55word!e2e", &[]);
    run("samba-tool", &["user", "setexpiry", &ben, "--noexpiry", "-H", &dc.sam_ldb]);
    let (team, staff) = (unique("team"), unique("staff"));
    dc.ldif("ldbadd", &format!("dn: CN={team},{ou}\nobjectClass: group\nsAMAccountName: {team}\nmember: {anna_dn}\n"));
    dc.ldif(
        "ldbadd",
        &format!("dn: CN={staff},{ou}\nobjectClass: group\nsAMAccountName: {staff}\nmember: CN={team},{ou}\n"),
    );

    let tmp = tempfile::tempdir().unwrap();
    let server = common::Server::start(&tmp.path().join("data"), "127.0.0.1:0");
    let pw = tmp.path().join("bind.password");
    std::fs::write(&pw, format!("{}\n", dc.admin_password)).unwrap();
    let ca = tmp.path().join("ca.pem");
    std::fs::write(&ca, &dc.ca_pem).unwrap();
    let add = |name: &str, password_file: &std::path::Path| {
        server.ctl(&[
            "directory",
            "add",
            "ldap",
            name,
            "--url",
            &dc.ldaps_url,
            "--base-dn",
            &ou,
            "--bind-dn",
            &dc.admin_dn,
            "--password-file",
            password_file.to_str().unwrap(),
            "--ca-file",
            ca.to_str().unwrap(),
        ])
    };
    let out = add("ad", &pw);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let sync = |name: &str| {
        let out = server.ctl(&["directory", "sync", name, "--json", "--wait"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        (out.status.success(), v, String::from_utf8_lossy(&out.stderr).to_string())
    };
    let (ok, _, stderr) = sync("ad");
    assert!(ok, "{stderr}\n{}", server.log_tail());

    let users = server.ctl_json(&["users", "list"]);
    let find = |upn: &str| users.as_array().unwrap().iter().find(|u| u["userPrincipalName"] == upn).cloned();
    let a = find(&format!("{anna}@tenon.test")).expect("anna listed");
    assert_eq!(a["source"], "ad");
    assert_eq!(a["department"], "Sales");
    let mut groups: Vec<String> = serde_json::from_value(a["groups"].clone()).unwrap();
    groups.sort();
    let mut want = vec![staff.clone(), team.clone()];
    want.sort();
    assert_eq!(groups, want, "nested: {staff} holds {team}");
    assert!(a["passwordExpiresAt"].is_string(), "{a}");
    let b = find(&format!("{ben}@tenon.test")).expect("ben listed");
    assert_eq!(b["passwordNeverExpires"], true);

    // Anna's device: the group setting, her password expiry and a signature with her department.
    server.ctl_ok(&["settings", "set", "--group", &staff, "Custom.FromAd", "true"]);
    let html = tmp.path().join("sig.htm");
    std::fs::write(&html, "<p>{{Graph_User_GivenName}}, {{Graph_User_Department}}</p>").unwrap();
    server.ctl_ok(&["signatures", "set", "Corp", "--html", html.to_str().unwrap()]);
    let token = server.enroll_token(1);
    let anna_upn = format!("{anna}@tenon.test");
    let agent = common::SimAgent::new(
        tmp.path(),
        "PC-ANNA",
        serde_json::json!({"hostname": "PC-ANNA", "signed_in_users": [anna_upn]}),
    );
    agent.enroll(&server, &token);
    agent.ok(&["sync", "--once"]);
    agent.ok(&["sync", "--once"]);
    let payload = agent.held_payload();
    assert_eq!(payload["machine"]["Custom"]["FromAd"], true);
    assert!(payload["users"][&anna_upn]["Signatures"].to_string().contains("Sales"), "{payload}");
    assert!(payload["users"][&anna_upn]["Client"]["PasswordExpiry"]["filetime"].is_string(), "{payload}");
    let before = agent.status()["config_version"].as_u64().unwrap();

    // A department change in AD: an incremental read, one user changed, one device re-signed.
    dc.modify(&anna_dn, "department", "Finance");
    let (ok, report, stderr) = sync("ad");
    assert!(ok, "{stderr}");
    assert_eq!(report["read"], "delta", "{report}");
    assert_eq!(report["users_changed"], 1, "{report}");
    assert_eq!(report["devices_resigned"], 1, "{report}");
    agent.ok(&["sync", "--once"]);
    assert!(agent.status()["config_version"].as_u64().unwrap() > before);
    assert!(agent.held_payload()["users"][&anna_upn]["Signatures"].to_string().contains("Finance"));
    let users = server.ctl_json(&["users", "list"]);
    assert!(users
        .as_array()
        .unwrap()
        .iter()
        .any(|u| u["userPrincipalName"] == anna_upn && u["department"] == "Finance"));

    // A wrong bind password: the sync fails with AD's reason and changes nothing.
    let bad = tmp.path().join("bad.password");
    std::fs::write(&bad, "not-the-password\n").unwrap();
    let out = add("ad-wrong", &bad);
    assert!(out.status.success());
    let (ok, _, stderr) = sync("ad-wrong");
    assert!(!ok && stderr.contains("52e"), "{stderr}");
    assert!(!stderr.contains("not-the-password") && !stderr.contains(&dc.admin_password));
    let log = std::fs::read_to_string(&server.stderr_log).unwrap_or_default();
    assert!(!log.contains(&dc.admin_password), "the bind password is in the server's log");
}
