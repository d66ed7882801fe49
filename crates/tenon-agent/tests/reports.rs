//! The agent reports only what changed: a sync whose report equals the last one the server
//! acknowledged sends none (the check-in is the sign of life), a change sends exactly one, a
//! failed delivery is retried, and after `FULL_REPORT_INTERVAL` the unchanged report is sent
//! anyway. Against the mock server, with a clock the test moves.

mod mock;

use mock::{envelope, root, signer, Mock, DEVICE, NOW};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use tenon_agent::agent::{Agent, SyncOptions, SyncSummary, FULL_REPORT_INTERVAL};
use tenon_agent::platform::simulated::SimulatedPlatform;
use tenon_agent::status::Status;
use tenon_agent::vault::{LastReport, Vault};
use tenon_core::trust::key_id;

struct Fixture {
    dir: tempfile::TempDir,
    mock: Mock,
    state_dir: std::path::PathBuf,
    platform: SimulatedPlatform,
    /// The agent's clock (Unix seconds).
    clock: Arc<AtomicI64>,
}

impl Fixture {
    /// An agent enrolled with the mock that synced once (holding version 5, one report sent).
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let device_file = dir.path().join("device.json");
        let device = json!({"hostname": "PC", "signed_in_users": [],
            "network": {"gateway_ip": "192.0.2.1", "gateway_mac": "02:00:5e:00:00:01"}});
        std::fs::write(&device_file, device.to_string()).unwrap();
        let platform = SimulatedPlatform::open(&device_file).unwrap();
        let mock = Mock::start();
        let clock = Arc::new(AtomicI64::new(NOW));
        let f = Fixture { state_dir: dir.path().join("state"), dir, mock, platform, clock };
        f.enroll();
        // Not "good": Delivery Optimization stays off, so the policies' statuses are the same
        // from the first sync on (turning it on reports `applied`, then `compliant`).
        f.mock.serve(envelope(DEVICE, 5, NOW + 30 * 86_400, "plain", &signer()));
        let s = f.sync();
        assert_eq!(s.config_version, Some(5));
        assert!(s.reported, "the first sync of an enrollment reports");
        assert_eq!(f.mock.reports(), 1);
        f
    }

    fn enroll(&self) {
        let token = format!("tenr.id.secret.{}", key_id(&root().verifying_key()));
        self.agent().enroll(&self.mock.url, &token, true).unwrap();
    }

    fn agent(&self) -> Agent<'_> {
        let clock = self.clock.clone();
        Agent::new(&self.state_dir, &self.platform, Arc::new(move || clock.load(Ordering::SeqCst)))
    }

    fn sync(&self) -> SyncSummary {
        self.agent().sync_once().unwrap()
    }

    fn advance(&self, secs: i64) {
        self.clock.fetch_add(secs, Ordering::SeqCst);
    }

    fn set_signed_in(&self, users: &[&str]) {
        let path = self.dir.path().join("device.json");
        let mut d: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        d["signed_in_users"] = json!(users);
        std::fs::write(&path, d.to_string()).unwrap();
    }

    fn last_report(&self) -> Option<LastReport> {
        Vault::new(&self.state_dir, &self.platform).load().unwrap().state.last_report
    }

    fn vault_bytes(&self) -> Vec<u8> {
        std::fs::read(Vault::new(&self.state_dir, &self.platform).primary_path()).unwrap()
    }

    fn status(&self) -> Status {
        Status::load(&self.state_dir)
    }
}

#[test]
fn an_unchanged_sync_sends_no_report_and_writes_nothing() {
    let f = Fixture::new();
    let stored = f.last_report().expect("the acknowledged report is remembered");
    assert_eq!(stored.sent_at, NOW);
    assert_eq!(f.status().last_report_at.as_deref(), Some("2027-01-15T08:00:00Z"));
    assert!(f.status().last_sync_reported);
    let vault = f.vault_bytes();
    let fetches = f.mock.state.lock().unwrap().fetches;
    f.advance(60);
    let s = f.sync();
    assert_eq!(s.result, "unchanged");
    assert!(!s.reported);
    assert_eq!(f.mock.reports(), 1, "two syncs with nothing changed send one report");
    // It still checked in (the sign of life), wrote nothing, and says it did not report.
    assert_eq!(f.mock.state.lock().unwrap().fetches, fetches + 1);
    assert_eq!(f.vault_bytes(), vault, "an unchanged sync writes nothing to the vault");
    let status = f.status();
    assert!(!status.last_sync_reported);
    assert_eq!(status.last_report_at.as_deref(), Some("2027-01-15T08:00:00Z"), "kept from the last report");
    assert_eq!(status.last_sync.as_deref(), Some("2027-01-15T08:01:00Z"));
}

#[test]
fn a_sign_in_sends_one_report() {
    let f = Fixture::new();
    f.set_signed_in(&["Anna@Contoso.com"]);
    f.advance(60);
    assert!(f.sync().reported);
    assert_eq!(f.mock.reports(), 2);
    assert_eq!(f.mock.last_report()["signed_in_users"], json!(["anna@contoso.com"]));
    assert_eq!(f.last_report().unwrap().sent_at, NOW + 60);
    f.advance(60);
    assert!(!f.sync().reported);
    // The same users in another order, or one of them in two sessions, are no change.
    f.set_signed_in(&["ben@contoso.com", "anna@contoso.com"]);
    f.advance(60);
    assert!(f.sync().reported);
    assert_eq!(f.mock.last_report()["signed_in_users"], json!(["anna@contoso.com", "ben@contoso.com"]));
    f.set_signed_in(&["anna@contoso.com", "ben@contoso.com", "ANNA@contoso.com"]);
    f.advance(60);
    assert!(!f.sync().reported);
    // Signing out is a change too.
    f.set_signed_in(&[]);
    f.advance(60);
    assert!(f.sync().reported);
    assert_eq!(f.mock.last_report()["signed_in_users"], json!([]));
    assert_eq!(f.mock.reports(), 4);
}

#[test]
fn a_failed_delivery_is_retried_at_the_next_sync() {
    let f = Fixture::new();
    let before = f.last_report().unwrap();
    f.mock.state.lock().unwrap().fail_reports = true;
    f.set_signed_in(&["anna@contoso.com"]);
    f.advance(60);
    let s = f.sync();
    assert!(!s.reported);
    assert!(s.problems.iter().any(|p| p.contains("report not delivered")), "{:?}", s.problems);
    assert_eq!(f.mock.state.lock().unwrap().failed_reports, 1);
    // Not acknowledged: the stored report stays the previous one.
    assert_eq!(f.last_report(), Some(before.clone()));
    assert!(!f.status().last_sync_reported);
    assert_eq!(f.status().last_report_at.as_deref(), Some("2027-01-15T08:00:00Z"));
    // Still failing: tried again at every sync.
    f.advance(60);
    assert!(!f.sync().reported);
    assert_eq!(f.mock.state.lock().unwrap().failed_reports, 2);
    // The server is back: the same report is delivered once.
    f.mock.state.lock().unwrap().fail_reports = false;
    f.advance(60);
    let s = f.sync();
    assert!(s.reported);
    assert!(s.problems.is_empty(), "{:?}", s.problems);
    assert_eq!(f.mock.reports(), 2);
    assert_eq!(f.mock.last_report()["signed_in_users"], json!(["anna@contoso.com"]));
    assert_ne!(f.last_report().unwrap().sha256, before.sha256);
    f.advance(60);
    assert!(!f.sync().reported);
    assert_eq!(f.mock.reports(), 2);
}

#[test]
fn an_unchanged_report_is_sent_again_after_a_day() {
    let f = Fixture::new();
    let first = f.mock.last_report();
    f.advance(FULL_REPORT_INTERVAL - 1);
    assert!(!f.sync().reported, "not yet a day old");
    assert_eq!(f.mock.reports(), 1);
    f.advance(1);
    assert!(f.sync().reported, "a day old: the full report goes out although nothing changed");
    assert_eq!(f.mock.reports(), 2);
    assert_eq!(f.mock.last_report(), first);
    assert_eq!(f.last_report().unwrap().sent_at, NOW + FULL_REPORT_INTERVAL);
    // And the day counts from this report.
    f.advance(FULL_REPORT_INTERVAL - 1);
    assert!(!f.sync().reported);
    assert_eq!(f.mock.reports(), 2);
}

#[test]
fn a_clock_set_back_sends_the_report_again() {
    let f = Fixture::new();
    f.clock.store(NOW - 3600, Ordering::SeqCst);
    assert!(f.sync().reported, "the last report seems to come from the future; its age says nothing");
    assert_eq!(f.last_report().unwrap().sent_at, NOW - 3600);
    assert!(!f.sync().reported);
    assert_eq!(f.mock.reports(), 2);
}

#[test]
fn report_forced_and_after_re_enrollment() {
    let f = Fixture::new();
    let forced = f.agent().sync_once_with(SyncOptions { force_report: true }).unwrap();
    assert!(forced.reported);
    assert_eq!(f.mock.reports(), 2);
    assert!(f.status().last_sync_reported);
    // A new identity has reported nothing, even though its report is the same as the old one's.
    f.enroll();
    assert_eq!(f.last_report(), None);
    assert!(f.sync().reported);
    assert_eq!(f.mock.reports(), 3);
    assert!(!f.sync().reported);
}

#[test]
fn a_report_that_changes_the_configuration_fetches_it_at_once() {
    let f = Fixture::new();
    // The server compiles a new configuration once it learns that anna signed in; its answer to
    // the report names it, and the agent fetches it in the same sync and reports holding it.
    f.mock.state.lock().unwrap().after_report = Some(envelope(DEVICE, 6, NOW + 30 * 86_400, "plain6", &signer()));
    f.set_signed_in(&["anna@contoso.com"]);
    f.advance(60);
    let fetches = f.mock.state.lock().unwrap().fetches;
    let s = f.sync();
    assert_eq!((s.result, s.config_version, s.reported), ("updated", Some(6), true));
    assert_eq!(f.mock.state.lock().unwrap().fetches, fetches + 2, "fetched again after the report");
    let reports = f.mock.state.lock().unwrap().reports.clone();
    assert_eq!(reports.len(), 3);
    assert_eq!(reports[1]["config_version"], json!(5));
    assert_eq!(reports[2]["config_version"], json!(6));
    assert_eq!(f.status().config_version, Some(6));
    // Then nothing changes: no report, one check-in.
    f.advance(60);
    assert!(!f.sync().reported);
    assert_eq!(f.mock.reports(), 3);
    assert_eq!(f.mock.state.lock().unwrap().fetches, fetches + 3);
}

#[test]
fn a_refused_configuration_is_reported_once_while_it_stays() {
    let f = Fixture::new();
    // An expired envelope (a frozen server): refused at every sync, with the clock moving on. The
    // refusal must not carry the clock reading, or every sync would report it.
    f.mock.serve(envelope(DEVICE, 6, NOW - 1, "stale", &signer()));
    f.advance(60);
    assert!(f.agent().sync_once().is_err());
    assert_eq!(f.mock.reports(), 2);
    assert!(f.mock.last_report()["last_error"].as_str().unwrap().contains("expired"));
    let error = f.status().last_error;
    f.advance(60);
    assert!(f.agent().sync_once().is_err());
    assert_eq!(f.mock.reports(), 2, "the same refusal is not reported again");
    assert_eq!(f.status().last_error, error);
    assert!(!f.status().last_sync_reported);
}
