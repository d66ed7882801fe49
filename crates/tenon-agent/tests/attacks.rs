//! Every verification rule, attacked. A mock server serves crafted envelopes; each case asserts the
//! rejection, the reason reported (status and report), and that the agent still holds and applies
//! its last known good configuration.

mod mock;

use ed25519_dalek::SigningKey;
use mock::{envelope, root, signer, Mock, DEVICE, NOW};
use serde_json::{json, Value};
use std::sync::Arc;
use tenon_agent::agent::{Agent, AgentError};
use tenon_agent::platform::simulated::SimulatedPlatform;
use tenon_agent::status::Status;
use tenon_agent::vault::Vault;
use tenon_core::canonical::{sha256_hex, to_canonical};
use tenon_core::trust::{key_id, sign_key_list, SignatureEntry};

const OTHER_DEVICE: &str = "99999999-1111-4222-8333-444455556666";

fn attacker() -> SigningKey {
    SigningKey::from_bytes(&[9; 32])
}

struct Fixture {
    _dir: tempfile::TempDir,
    mock: Mock,
    state_dir: std::path::PathBuf,
    platform: SimulatedPlatform,
}

impl Fixture {
    /// An agent enrolled with the mock, holding version 5 ("good").
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let device_file = dir.path().join("device.json");
        let device = json!({"hostname": "PC", "signed_in_users": [],
            "network": {"gateway_ip": "192.0.2.1", "gateway_mac": "02:00:5e:00:00:01"}});
        std::fs::write(&device_file, device.to_string()).unwrap();
        let platform = SimulatedPlatform::open(&device_file).unwrap();
        let mock = Mock::start();
        let f = Fixture { state_dir: dir.path().join("state"), _dir: dir, mock, platform };
        let token = format!("tenr.id.secret.{}", key_id(&root().verifying_key()));
        f.agent().enroll(&f.mock.url, &token, false).unwrap();
        f.mock.serve(envelope(DEVICE, 5, NOW + 3600, "good", &signer()));
        let s = f.agent().sync_once().unwrap();
        assert_eq!(s.config_version, Some(5));
        assert!(f.do_group_id().is_some(), "the good configuration was applied");
        f
    }

    /// The DOGroupId the applied configuration left in the simulated registry.
    fn do_group_id(&self) -> Option<Value> {
        use tenon_agent::platform::Platform;
        self.platform
            .reg_get("HKLM\\SOFTWARE\\Policies\\Microsoft\\Windows\\DeliveryOptimization", "DOGroupId")
            .unwrap()
            .map(|v| serde_json::to_value(v).unwrap())
    }

    fn agent(&self) -> Agent<'_> {
        Agent::new(&self.state_dir, &self.platform, Arc::new(|| NOW))
    }

    fn vault(&self) -> Vault<'_> {
        Vault::new(&self.state_dir, &self.platform)
    }

    fn held(&self) -> (u64, Value) {
        let st = self.vault().load().unwrap().state;
        let env: Value = serde_json::from_str(st.envelope.as_deref().unwrap()).unwrap();
        (env["signed"]["version"].as_u64().unwrap(), env["signed"]["payload"]["machine"]["Policies"]["Marker"].clone())
    }

    /// The agent refused what the mock served, says why, and still holds and applies version 5.
    fn assert_refused(&self, code: &str) {
        let err = self.agent().sync_once().expect_err("the envelope must be refused");
        assert!(matches!(err, AgentError::Rejected(_)), "{err}");
        assert!(err.to_string().contains(code), "{err} should name {code}");
        let status = Status::load(&self.state_dir);
        assert_eq!(status.last_sync_result.as_deref(), Some("rejected"));
        assert!(status.last_error.as_deref().unwrap_or("").contains(code), "{:?}", status.last_error);
        assert_eq!(status.config_version, Some(5));
        assert_eq!(self.held(), (5, json!("good")));
        // Still applied: what the refused configuration would have removed is in place.
        assert!(self.do_group_id().is_some(), "the refused configuration must not be applied");
        let report = self.mock.last_report();
        assert_eq!(report["config_version"], json!(5));
        assert!(report["last_error"].as_str().unwrap_or("").contains(code), "{report}");
    }
}

#[test]
fn accepts_and_then_answers_304() {
    let f = Fixture::new();
    // The sync after the one that applied still has news: Delivery Optimization went from
    // `applied` to `compliant`, which it reports (and the vault remembers that report).
    assert_eq!(f.agent().sync_once().unwrap().result, "unchanged");
    let reports = f.mock.state.lock().unwrap().reports.len();
    assert_eq!(f.mock.last_report()["policies"]["delivery_optimization"]["state"], json!("compliant"));
    let fetches = f.mock.state.lock().unwrap().fetches;
    let vault_before = std::fs::read(f.vault().primary_path()).unwrap();
    assert_eq!(f.agent().sync_once().unwrap().result, "unchanged");
    // An unchanged sync writes nothing to the vault (each write has a fresh nonce, so any rewrite
    // would change the bytes) and sends no report: the check-in is all.
    assert_eq!(std::fs::read(f.vault().primary_path()).unwrap(), vault_before);
    assert_eq!(f.mock.state.lock().unwrap().fetches, fetches + 1);
    assert_eq!(f.mock.state.lock().unwrap().reports.len(), reports);
    f.mock.serve(envelope(DEVICE, 6, NOW + 3600, "newer", &signer()));
    assert_eq!(f.agent().sync_once().unwrap().result, "updated");
    assert_eq!(f.held(), (6, json!("newer")));
    // An accepted configuration is applied: "newer" turns Delivery Optimization off.
    assert!(f.do_group_id().is_none());
}

#[test]
fn wrong_key() {
    let f = Fixture::new();
    f.mock.serve(envelope(DEVICE, 6, NOW + 3600, "evil", &attacker()));
    f.assert_refused("unknown_key");
}

#[test]
fn bad_signature() {
    let f = Fixture::new();
    let good = envelope(DEVICE, 6, NOW + 3600, "evil", &signer());
    let mut v: Value = serde_json::from_str(&good).unwrap();
    // Same key id, signature over something else.
    v["signatures"][0]["sig"] = json!(SignatureEntry::sign(&signer(), b"something else").sig);
    let signed_raw = to_canonical(&v["signed"]).unwrap();
    let forged =
        format!("{{\"signatures\":{},\"signed\":{}}}", v["signatures"], String::from_utf8(signed_raw).unwrap());
    f.mock.serve(forged);
    f.assert_refused("bad_signature");
}

#[test]
fn another_devices_envelope() {
    let f = Fixture::new();
    f.mock.serve(envelope(OTHER_DEVICE, 6, NOW + 3600, "evil", &signer()));
    f.assert_refused("wrong_device");
}

#[test]
fn older_version_rollback() {
    let f = Fixture::new();
    f.mock.serve(envelope(DEVICE, 4, NOW + 3600, "old", &signer()));
    f.assert_refused("rollback");
    // The agent showed the server the envelope it holds (the exact verified bytes of version 5), so
    // a server restored from a backup can continue above it; it never relies on a bare number.
    let proofs = f.mock.state.lock().unwrap().held_proofs.clone();
    assert_eq!(proofs, [f.vault().load().unwrap().state.envelope.unwrap()]);
}

#[test]
fn same_version_other_payload() {
    let f = Fixture::new();
    f.mock.serve(envelope(DEVICE, 5, NOW + 3600, "swapped", &signer()));
    f.assert_refused("version_reuse");
}

#[test]
fn version_beyond_the_safe_integer_range() {
    let f = Fixture::new();
    // Validly signed, but 2^53: past it canonical JSON loses precision, and a held 2^53 would make
    // every later envelope a rollback. Refused before it can become the stored version.
    let mut v: Value = serde_json::from_str(&envelope(DEVICE, 6, NOW + 3600, "evil", &signer())).unwrap();
    v["signed"]["version"] = json!(tenon_core::envelope::MAX_VERSION + 1);
    let signed_raw = to_canonical(&v["signed"]).unwrap();
    v["signatures"][0]["sig"] = json!(SignatureEntry::sign(&signer(), &signed_raw).sig);
    let forged =
        format!("{{\"signatures\":{},\"signed\":{}}}", v["signatures"], String::from_utf8(signed_raw).unwrap());
    f.mock.serve(forged);
    f.assert_refused("version_out_of_range");
}

#[test]
fn expired_envelope_freeze() {
    let f = Fixture::new();
    f.mock.serve(envelope(DEVICE, 6, NOW - 1, "stale", &signer()));
    f.assert_refused("expired");
}

#[test]
fn payload_hash_mismatch() {
    let f = Fixture::new();
    let body = json!({"device_id": DEVICE, "user_id": null, "version": 6, "issued_at": NOW, "expires_at": NOW + 3600,
        "payload_sha256": sha256_hex(b"not the payload"), "payload": {"machine": {"Policies": {"Marker": "evil"}}, "users": {}}});
    let signed = to_canonical(&body).unwrap();
    let sig = SignatureEntry::sign(&signer(), &signed);
    let lie = format!(
        "{{\"signatures\":[{}],\"signed\":{}}}",
        serde_json::to_string(&sig).unwrap(),
        String::from_utf8(signed).unwrap()
    );
    f.mock.serve(lie);
    f.assert_refused("hash_mismatch");
}

#[test]
fn signing_key_rotation_via_root_signed_key_list() {
    let f = Fixture::new();
    let next = SigningKey::from_bytes(&[3; 32]);
    {
        let mut s = f.mock.state.lock().unwrap();
        s.trust.as_mut().unwrap().key_lists.push(sign_key_list(&root(), 2, NOW, &[next.verifying_key()]));
    }
    f.mock.serve(envelope(DEVICE, 6, NOW + 3600, "rotated", &next));
    assert_eq!(f.agent().sync_once().unwrap().result, "updated");
    assert_eq!(f.held(), (6, json!("rotated")));
    // A key list that the root did not sign does not let an attacker in.
    {
        let mut s = f.mock.state.lock().unwrap();
        s.trust.as_mut().unwrap().key_lists.push(sign_key_list(&attacker(), 3, NOW, &[attacker().verifying_key()]));
    }
    f.mock.serve(envelope(DEVICE, 7, NOW + 3600, "evil", &attacker()));
    let err = f.agent().sync_once().unwrap_err();
    assert!(err.to_string().contains("unknown_key"), "{err}");
    assert_eq!(f.held(), (6, json!("rotated")));
}

fn damage(path: &std::path::Path, how: &str) {
    let mut raw = std::fs::read(path).unwrap();
    match how {
        "truncate" => raw.truncate(raw.len() / 2),
        _ => {
            let i = raw.len() - 7;
            raw[i] ^= 0x20;
        }
    }
    std::fs::write(path, raw).unwrap();
}

#[test]
fn truncated_or_bit_flipped_vault_copy_is_discarded() {
    for how in ["truncate", "flip"] {
        let f = Fixture::new();
        damage(&f.vault().primary_path(), how);
        // The damaged copy is discarded, reported, and the mirror's last known good is used.
        let s = f.agent().sync_once().unwrap();
        assert!(s.problems.iter().any(|p| p.contains("vault.bin discarded")), "{how}: {:?}", s.problems);
        let status = Status::load(&f.state_dir);
        assert!(status.last_error.unwrap_or_default().contains("vault.bin discarded"));
        assert_eq!(status.config_version, Some(5));
        assert_eq!(f.held(), (5, json!("good")));
        assert!(f.do_group_id().is_some());
        assert!(f.mock.last_report()["last_error"].as_str().unwrap().contains("vault.bin discarded"));
        // And repaired: the next sync is clean.
        assert!(f.agent().sync_once().unwrap().problems.is_empty());
    }
}

#[test]
fn both_vault_copies_damaged_are_refused_and_nothing_is_applied() {
    let f = Fixture::new();
    let reports = f.mock.state.lock().unwrap().reports.len();
    damage(&f.vault().primary_path(), "flip");
    damage(&f.vault().mirror_path(), "truncate");
    let err = f.agent().sync_once().unwrap_err();
    assert!(matches!(err, AgentError::Vault(tenon_agent::vault::VaultError::Corrupt { .. })), "{err}");
    let status = Status::load(&f.state_dir);
    assert!(status.last_error.unwrap().contains("both vault copies fail verification"));
    // Status still names what was last applied; nothing new was applied or fetched.
    assert_eq!(status.config_version, Some(5));
    assert!(f.do_group_id().is_some(), "what the last known good configuration applied stays");
    assert_eq!(f.mock.state.lock().unwrap().reports.len(), reports);
}

#[test]
fn missing_vault_key_is_refused_not_replaced() {
    let f = Fixture::new();
    std::fs::remove_file(f.vault().key_path()).unwrap();
    let err = f.agent().sync_once().unwrap_err();
    assert!(err.to_string().contains("vault key"), "{err}");
    let status = Status::load(&f.state_dir);
    assert!(status.last_error.unwrap().contains("is missing"));
    assert_eq!(status.config_version, Some(5));
    // The agent did not quietly make a new key (which would reset the rollback floor).
    assert!(!f.vault().key_path().exists());
    assert!(f.do_group_id().is_some(), "what the last known good configuration applied stays");
}
