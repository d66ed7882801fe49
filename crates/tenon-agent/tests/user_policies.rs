//! End-to-end tests of the user policies (`local_admin`, `password_expiry`) on the
//! simulated platform: a device JSON file in a temp dir, policies run as the agent runs them,
//! effects read back from the file.

use serde_json::{json, Map, Value};
use std::path::PathBuf;
use tenon_agent::platform::simulated::SimulatedPlatform;
use tenon_agent::policies::{self, Policy, PolicyContext};
use tenon_core::api::PolicyStatus;

const MANUAL: &str = "AzureAD\\manual@x.com";
const ANNA: &str = "AzureAD\\anna@x.com";
const BOB: &str = "AzureAD\\bob@x.com";
const DAY: i64 = 86_400;
/// 2026-01-01T09:00:00Z.
const NOW: i64 = 1_767_225_600 + 9 * 3600;

struct Device {
    _dir: tempfile::TempDir,
    path: PathBuf,
    platform: SimulatedPlatform,
    /// Each policy's persisted state, carried between runs as the agent's vault does.
    states: Map<String, Value>,
}

impl Device {
    fn new(device: Value) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("device.json");
        std::fs::write(&path, device.to_string()).unwrap();
        let platform = SimulatedPlatform::open(&path).unwrap();
        Self { _dir: dir, path, platform, states: Map::new() }
    }

    fn run(&mut self, policy: &dyn Policy, machine: Value, users: Value, now: i64) -> PolicyStatus {
        let mut state = self.states.get(policy.name()).cloned().unwrap_or(Value::Null);
        let mut ctx = PolicyContext {
            platform: &self.platform,
            machine: machine.as_object().unwrap(),
            users: users.as_object().unwrap(),
            now,
            state: &mut state,
            escrow: &tenon_agent::policies::NoEscrow,
            store: &tenon_agent::policies::NoStore,
        };
        let status = policy.apply(&mut ctx);
        self.states.insert(policy.name().to_string(), state);
        status
    }

    fn file(&self) -> Value {
        serde_json::from_str(&self.bytes()).unwrap()
    }

    fn bytes(&self) -> String {
        std::fs::read_to_string(&self.path).unwrap()
    }

    fn admins(&self) -> Vec<String> {
        let v = self.file()["local_groups"]["Administrators"].clone();
        serde_json::from_value(v).unwrap()
    }

    fn set(&self, key: &str, value: Value) {
        let mut f = self.file();
        f[key] = value;
        std::fs::write(&self.path, f.to_string()).unwrap();
    }

    fn notifications(&self) -> Vec<Value> {
        self.file()["notifications"].as_array().cloned().unwrap_or_default()
    }
}

fn policy(name: &str) -> Box<dyn Policy> {
    policies::all().into_iter().find(|p| p.name() == name).unwrap_or_else(|| panic!("{name} is not in all()"))
}

fn machine(make_admin: Option<bool>, primary: Option<&str>) -> Value {
    let mut m = json!({"Client": {}});
    if let Some(on) = make_admin {
        m["Policies"] = json!({"SetCurrentUserAdministrator": on});
    }
    if let Some(p) = primary {
        m["Client"]["PrimaryUser"] = json!(p);
    }
    m
}

fn device(signed_in: &[&str]) -> Device {
    Device::new(json!({
        "hostname": "PC1",
        "signed_in_users": signed_in,
        "local_groups": {"Administrators": [MANUAL]},
    }))
}

#[test]
fn admin_added_when_on_and_primary_signed_in() {
    let mut d = device(&["anna@x.com"]);
    let la = policy("local_admin");
    let status = d.run(&*la, machine(Some(true), Some("anna@x.com")), json!({}), NOW);
    assert_eq!(d.admins(), vec![MANUAL, ANNA]);
    assert_eq!(status.state, "ok");
    assert_eq!(status.details["added"], json!([ANNA]));
    assert_eq!(status.details["tenon_members"], json!([ANNA]));
    assert_eq!(status.details["primary_user"], json!("anna@x.com"));
}

#[test]
fn setting_off_or_absent_adds_nobody() {
    let mut d = device(&["anna@x.com"]);
    let la = policy("local_admin");
    assert_eq!(d.run(&*la, machine(Some(false), Some("anna@x.com")), json!({}), NOW).state, "disabled");
    assert_eq!(d.run(&*la, machine(None, Some("anna@x.com")), json!({}), NOW).state, "disabled");
    assert_eq!(d.admins(), vec![MANUAL]);
}

#[test]
fn setting_false_removes_exactly_tenons_membership() {
    let mut d = device(&["anna@x.com"]);
    let la = policy("local_admin");
    d.run(&*la, machine(Some(true), Some("anna@x.com")), json!({}), NOW);
    assert_eq!(d.admins(), vec![MANUAL, ANNA]);
    let status = d.run(&*la, machine(Some(false), Some("anna@x.com")), json!({}), NOW);
    assert_eq!(d.admins(), vec![MANUAL]);
    assert_eq!(status.state, "disabled");
    assert_eq!(status.details["removed"], json!([ANNA]));
    assert_eq!(status.details["tenon_members"], json!([]));
}

#[test]
fn pre_existing_manual_admin_is_never_claimed_or_removed() {
    // The primary user was made an administrator by hand before Tenon.
    let mut d = device(&["manual@x.com"]);
    let la = policy("local_admin");
    let status = d.run(&*la, machine(Some(true), Some("manual@x.com")), json!({}), NOW);
    assert_eq!(d.admins(), vec![MANUAL]);
    assert_eq!(status.state, "ok");
    assert_eq!(
        status.reason.as_deref(),
        Some("primary user manual@x.com was already a local administrator; Tenon leaves that membership alone")
    );
    assert_eq!(status.details["tenon_members"], json!([]));
    // Turning the setting off, or handing the device to someone else, leaves it alone.
    d.run(&*la, machine(Some(false), Some("manual@x.com")), json!({}), NOW);
    assert_eq!(d.admins(), vec![MANUAL]);
    d.run(&*la, machine(Some(true), Some("anna@x.com")), json!({}), NOW);
    assert_eq!(d.admins(), vec![MANUAL, ANNA]);
    d.run(&*la, machine(Some(true), None), json!({}), NOW);
    assert_eq!(d.admins(), vec![MANUAL]);
}

#[test]
fn primary_change_swaps_tenons_membership() {
    let mut d = device(&["anna@x.com"]);
    let la = policy("local_admin");
    d.run(&*la, machine(Some(true), Some("anna@x.com")), json!({}), NOW);
    d.set("signed_in_users", json!(["bob@x.com"]));
    let status = d.run(&*la, machine(Some(true), Some("bob@x.com")), json!({}), NOW);
    assert_eq!(d.admins(), vec![MANUAL, BOB]);
    assert_eq!(status.details["removed"], json!([ANNA]));
    assert_eq!(status.details["added"], json!([BOB]));
    assert_eq!(status.details["tenon_members"], json!([BOB]));
}

#[test]
fn primary_cleared_removes_tenons_membership() {
    let mut d = device(&["anna@x.com"]);
    let la = policy("local_admin");
    d.run(&*la, machine(Some(true), Some("anna@x.com")), json!({}), NOW);
    let status = d.run(&*la, machine(Some(true), None), json!({}), NOW);
    assert_eq!(d.admins(), vec![MANUAL]);
    assert_eq!(status.state, "pending");
    assert_eq!(status.reason.as_deref(), Some("the device has no primary user"));
}

#[test]
fn applying_twice_changes_nothing() {
    for (make_admin, primary) in
        [(Some(true), Some("anna@x.com")), (Some(false), Some("anna@x.com")), (Some(true), None)]
    {
        let mut d = device(&["anna@x.com"]);
        let la = policy("local_admin");
        // Start from a device where Tenon has already added anna once.
        d.run(&*la, machine(Some(true), Some("anna@x.com")), json!({}), NOW);
        d.run(&*la, machine(make_admin, primary), json!({}), NOW);
        let (bytes, state) = (d.bytes(), d.states.clone());
        let status = d.run(&*la, machine(make_admin, primary), json!({}), NOW);
        assert_eq!(d.bytes(), bytes, "{make_admin:?} {primary:?}");
        assert_eq!(d.states, state);
        assert_eq!(status.details["added"], json!([]));
        assert_eq!(status.details["removed"], json!([]));
    }
}

#[test]
fn membership_removed_by_hand_is_forgotten_when_off() {
    let mut d = device(&["anna@x.com"]);
    let la = policy("local_admin");
    d.run(&*la, machine(Some(true), Some("anna@x.com")), json!({}), NOW);
    d.set("local_groups", json!({"Administrators": [MANUAL]}));
    let status = d.run(&*la, machine(Some(false), Some("anna@x.com")), json!({}), NOW);
    assert_eq!(d.admins(), vec![MANUAL]);
    assert_eq!(status.details["tenon_members"], json!([]));
    // Later turning it on again for another user must not touch anna.
    d.set("local_groups", json!({"Administrators": [MANUAL, ANNA]}));
    d.run(&*la, machine(Some(true), Some("bob@x.com")), json!({}), NOW);
    assert_eq!(d.admins(), vec![MANUAL, ANNA, BOB]);
}

/// The FILETIME of a Unix time, as the directory stores it.
fn filetime(unix: i64) -> u64 {
    (unix + 11_644_473_600) as u64 * 10_000_000
}

fn users_expiring(upn: &str, filetime: Value) -> Value {
    json!({upn: {"Client": {"PasswordExpiry": {"filetime": filetime}, "IsPrimaryOfUser": true}}})
}

#[test]
fn password_warnings_at_each_threshold_once_per_day() {
    let mut d = device(&["anna@x.com"]);
    let pe = policy("password_expiry");
    let expires = NOW + 14 * DAY;
    let users = users_expiring("anna@x.com", json!(filetime(expires)));
    let m = machine(None, Some("anna@x.com"));

    // (days before expiry, whether a new warning is due, what it says)
    let steps: &[(f64, bool, &str)] = &[
        (20.0, false, ""),
        (15.0, false, ""),
        (14.0, true, "in 14 days"),
        (14.0 - 1.0 / 24.0, false, ""), // an hour later, same day, same threshold
        (13.0, true, "in 13 days"),     // the next day, still inside the 14-day band
        (7.0, true, "in 7 days"),
        (6.9, false, ""),
        (3.0, true, "in 3 days"),
        (2.9, false, ""),
        (1.0, true, "in 1 day."),
        (0.9, false, ""),
    ];
    let mut expected = 0;
    for &(days_before, due, text) in steps {
        let now = expires - (days_before * DAY as f64) as i64;
        let s = d.run(&*pe, m.clone(), users.clone(), now);
        assert_eq!(s.state, "ok");
        let line = &s.details["users"]["anna@x.com"];
        assert_eq!(line["days_left"], json!(days_before.floor() as i64), "{days_before}");
        let n = d.notifications();
        if due {
            expected += 1;
            assert_eq!(line["notified"], json!(true), "{days_before}");
            assert!(n[expected - 1]["message"].as_str().unwrap().contains(text), "{days_before}: {n:?}");
            assert_eq!(n[expected - 1]["user"], json!("anna@x.com"));
        } else {
            assert_eq!(line["notified"], Value::Null, "{days_before}");
        }
        assert_eq!(n.len(), expected, "{days_before}");
        let in_window = days_before < 15.0;
        assert_eq!(line["state"], json!(if in_window { "warned" } else { "ok" }), "{days_before}");
    }

    // Expired: "change it now", once a day.
    let s = d.run(&*pe, m.clone(), users.clone(), expires + 60);
    assert_eq!(s.details["users"]["anna@x.com"]["state"], json!("must_change"));
    assert_eq!(d.notifications().len(), expected + 1);
    assert_eq!(d.notifications()[expected]["title"], json!("Change your password now"));
}

#[test]
fn must_change_now_says_change_it_now() {
    let mut d = device(&["anna@x.com"]);
    let pe = policy("password_expiry");
    let users = users_expiring("anna@x.com", json!(0));
    let s = d.run(&*pe, json!({}), users.clone(), NOW);
    assert_eq!(s.details["users"]["anna@x.com"], json!({"days_left": 0, "state": "must_change", "notified": true}));
    let n = d.notifications();
    assert_eq!(n.len(), 1);
    assert!(n[0]["message"].as_str().unwrap().contains("Change it now"));
    d.run(&*pe, json!({}), users.clone(), NOW + 3600);
    assert_eq!(d.notifications().len(), 1);
    d.run(&*pe, json!({}), users, NOW + DAY);
    assert_eq!(d.notifications().len(), 2);
}

#[test]
fn never_expiring_passwords_get_no_notification() {
    let mut d = device(&["anna@x.com", "bob@x.com"]);
    let pe = policy("password_expiry");
    let mut users = users_expiring("anna@x.com", json!(0x7FFF_FFFF_FFFF_FFFFu64));
    // As a double-based serialiser would print it.
    users["bob@x.com"] =
        serde_json::from_str(r#"{"Client": {"PasswordExpiry": {"filetime": 9223372036854776000}}}"#).unwrap();
    let s = d.run(&*pe, json!({}), users, NOW);
    assert_eq!(s.details["users"]["anna@x.com"], json!({"days_left": null, "state": "never"}));
    assert_eq!(s.details["users"]["bob@x.com"], json!({"days_left": null, "state": "never"}));
    assert_eq!(d.notifications().len(), 0);
}

#[test]
fn only_signed_in_users_are_warned_and_everyone_is_reported() {
    let mut d = device(&["anna@x.com"]);
    let pe = policy("password_expiry");
    let mut users = users_expiring("anna@x.com", json!(filetime(NOW + 7 * DAY)));
    users["bob@x.com"] = json!({"Client": {"PasswordExpiry": {"filetime": filetime(NOW + 3 * DAY)}}});
    users["carl@x.com"] = json!({"Client": {}});
    let s = d.run(&*pe, json!({}), users, NOW);
    let n = d.notifications();
    assert_eq!(n.len(), 1);
    assert_eq!(n[0]["user"], json!("anna@x.com"));
    assert_eq!(s.details["users"]["anna@x.com"], json!({"days_left": 7, "state": "warned", "notified": true}));
    assert_eq!(s.details["users"]["bob@x.com"], json!({"days_left": 3, "state": "expiring"}));
    // A user without an expiry who is not signed in is not reported.
    assert_eq!(s.details["users"].get("carl@x.com"), None);
}

#[test]
fn warnings_follow_the_users_config() {
    let mut d = device(&["anna@x.com"]);
    let pe = policy("password_expiry");
    let mut users = users_expiring("anna@x.com", json!(filetime(NOW + 7 * DAY)));
    users["anna@x.com"]["Policies"] = json!({"PasswordExpiryWarning": {"Enabled": false}});
    let s = d.run(&*pe, json!({}), users.clone(), NOW);
    assert_eq!(s.details["users"]["anna@x.com"], json!({"days_left": 7, "state": "ok"}));
    assert_eq!(d.notifications().len(), 0);
    users["anna@x.com"]["Policies"] = json!({"PasswordExpiryWarning": {"ThresholdDays": [5]}});
    d.run(&*pe, json!({}), users.clone(), NOW);
    assert_eq!(d.notifications().len(), 0);
    d.run(&*pe, json!({}), users.clone(), NOW + 2 * DAY);
    assert_eq!(d.notifications().len(), 1);
    users["anna@x.com"]["Policies"] = json!({"PasswordExpiryWarning": {"ThresholdDays": "often"}});
    let s = d.run(&*pe, json!({}), users, NOW);
    assert_eq!(s.state, "failed");
    assert_eq!(s.details["users"]["anna@x.com"]["state"], json!("invalid"));
}

#[test]
fn signed_in_user_without_expiry_is_unknown() {
    let mut d = device(&["anna@x.com"]);
    let pe = policy("password_expiry");
    let s = d.run(&*pe, json!({}), json!({}), NOW);
    assert_eq!(s.details["users"]["anna@x.com"], json!({"days_left": null, "state": "unknown"}));
    assert_eq!(d.notifications().len(), 0);
    // Issue 12: the policy said `ok` while nobody could tell; an unknown expiry is `unknown`.
    assert_eq!(s.state, "unknown");
    assert!(s.reason.as_deref().unwrap().contains("anna@x.com"), "{s:?}");
    // Nobody to look at: nothing to do.
    let mut d = device(&[]);
    assert_eq!(d.run(&*pe, json!({}), json!({}), NOW).state, "not_applicable");
}
