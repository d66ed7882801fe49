//! End to end on simulated devices: the Delivery Optimization policy groups devices by gateway,
//! touches only its own values, and is idempotent (DESIGN.md sections 3 and 7).

use serde_json::{json, Map, Value};
use std::path::PathBuf;
use tenon_agent::platform::simulated::SimulatedPlatform;
use tenon_agent::policies::{all, PolicyContext};
use tenon_core::api::PolicyStatus;

const KEY: &str = r"HKLM\SOFTWARE\Policies\Microsoft\Windows\DeliveryOptimization";

/// A simulated device and the policy state the agent keeps for it between runs.
struct Device {
    _dir: tempfile::TempDir,
    path: PathBuf,
    state: Value,
}

impl Device {
    fn new(device: Value) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("device.json");
        std::fs::write(&path, device.to_string()).unwrap();
        Device { _dir: dir, path, state: Value::Null }
    }

    fn behind(gateway_ip: &str, gateway_mac: &str) -> Self {
        Self::new(json!({"hostname": "PC", "network": {"gateway_ip": gateway_ip, "gateway_mac": gateway_mac}}))
    }

    /// Runs the registered policy as the agent does after a sync, with `machine` as the config.
    fn run(&mut self, machine: Value) -> PolicyStatus {
        let platform = SimulatedPlatform::open(&self.path).unwrap();
        let policy = all().into_iter().find(|p| p.name() == "delivery_optimization").expect("registered");
        let machine: Map<String, Value> = machine.as_object().cloned().unwrap();
        let users = Map::new();
        let mut ctx = PolicyContext {
            platform: &platform,
            machine: &machine,
            users: &users,
            now: 0,
            state: &mut self.state,
            escrow: &tenon_agent::policies::NoEscrow,
            store: &tenon_agent::policies::NoStore,
        };
        policy.apply(&mut ctx)
    }

    fn run_default(&mut self) -> PolicyStatus {
        self.run(json!({}))
    }

    fn bytes(&self) -> Vec<u8> {
        std::fs::read(&self.path).unwrap()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.bytes()).unwrap()
    }

    fn do_key(&self) -> Value {
        self.json()["registry"][KEY].clone()
    }

    fn edit(&self, f: impl FnOnce(&mut Value)) {
        let mut dev = self.json();
        f(&mut dev);
        std::fs::write(&self.path, dev.to_string()).unwrap();
    }
}

fn off() -> Value {
    json!({"Policies": {"SetNetworkOptimizationID": false}})
}

fn group_of(dev: &Device) -> String {
    dev.do_key()["DOGroupId"]["value"].as_str().expect("a DOGroupId").to_string()
}

fn assert_unchanged(dev: &mut Device, machine: Value, state: &str) {
    let before = dev.bytes();
    assert_eq!(dev.run(machine).state, state);
    assert_eq!(dev.bytes(), before, "the device file must not change");
}

#[test]
fn devices_behind_one_gateway_share_a_group() {
    let mut a = Device::behind("10.1.0.1", "00:1a:2b:3c:4d:5e");
    let mut b = Device::behind("10.1.0.1", "00-1A-2B-3C-4D-5E");
    let mut c = Device::behind("10.1.0.1", "00:1a:2b:3c:4d:5f");
    for d in [&mut a, &mut b, &mut c] {
        let s = d.run_default();
        assert_eq!(s.state, "applied", "{s:?}");
        assert_eq!(s.details["group_id"], json!(group_of(d)));
        assert_eq!(d.do_key()["DODownloadMode"], json!({"type": "REG_DWORD", "value": 2}));
        assert_eq!(d.do_key()["DOGroupId"]["type"], "REG_SZ");
    }
    assert_eq!(group_of(&a), group_of(&b));
    assert_ne!(group_of(&a), group_of(&c));
    // Bytes 65 30 06 00 | 00 00 | 01 00 | 00 01 | 00 1a 2b 3c 4d 5e (ip[1]=1, ip[2]=0, ip[3]=1).
    assert_eq!(group_of(&a), "00063065-0000-0001-0001-001a2b3c4d5e");
    let s = a.run_default();
    assert_eq!(
        (s.details["gateway_ip"].as_str(), s.details["gateway_mac"].as_str()),
        (Some("10.1.0.1"), Some("00:1a:2b:3c:4d:5e"))
    );
}

#[test]
fn applying_twice_changes_nothing() {
    let mut d = Device::behind("192.168.77.1", "aa:bb:cc:dd:ee:01");
    assert_eq!(d.run_default().state, "applied");
    let state = d.state.clone();
    assert_unchanged(&mut d, json!({}), "compliant");
    assert_eq!(d.state, state);
}

#[test]
fn opting_out_removes_exactly_tenons_values() {
    let mut d = Device::behind("192.168.77.1", "aa:bb:cc:dd:ee:01");
    d.edit(|dev| dev["registry"] = json!({KEY: {"DOMaxCacheAge": {"type": "REG_DWORD", "value": 604800}}}));
    assert_eq!(d.run(json!({"Policies": {"SetNetworkOptimizationID": true}})).state, "applied");
    assert_eq!(d.run(off()).state, "removed");
    assert_eq!(d.do_key(), json!({"DOMaxCacheAge": {"type": "REG_DWORD", "value": 604800}}));
    assert_unchanged(&mut d, off(), "disabled");

    // A value someone changed after Tenon wrote it is theirs now and stays.
    let mut d = Device::behind("192.168.77.1", "aa:bb:cc:dd:ee:01");
    d.run_default();
    d.edit(|dev| dev["registry"][KEY]["DODownloadMode"]["value"] = json!(0));
    assert_eq!(d.run(off()).state, "removed");
    assert_eq!(d.do_key(), json!({"DODownloadMode": {"type": "REG_DWORD", "value": 0}}));
}

#[test]
fn foreign_values_are_left_alone() {
    let foreign = json!({"type": "REG_SZ", "value": "7d8c1e2a-0000-4000-8000-000000000001"});
    let mut d = Device::behind("10.1.0.1", "00:1a:2b:3c:4d:5e");
    d.edit(|dev| dev["registry"] = json!({KEY: {"DOGroupId": foreign}}));
    assert_unchanged(&mut d, json!({}), "managed_elsewhere");
    assert_unchanged(&mut d, off(), "disabled");

    let mut d = Device::behind("10.1.0.1", "00:1a:2b:3c:4d:5e");
    d.edit(|dev| dev["registry"] = json!({KEY: {"DOGroupIdSource": {"type": "REG_DWORD", "value": 1}}}));
    let s = d.run_default();
    assert_eq!(s.state, "managed_elsewhere");
    assert!(s.reason.unwrap().contains("DOGroupIdSource"));
    assert_unchanged(&mut d, json!({}), "managed_elsewhere");

    // An MDM that takes over later: Tenon withdraws its DOGroupId so the two are never both set.
    let mut d = Device::behind("10.1.0.1", "00:1a:2b:3c:4d:5e");
    d.run_default();
    d.edit(|dev| dev["registry"][KEY]["DOGroupIdSource"] = json!({"type": "REG_DWORD", "value": 5}));
    assert_eq!(d.run_default().state, "managed_elsewhere");
    assert_eq!(d.do_key().get("DOGroupId"), None);
    assert_eq!(d.do_key()["DOGroupIdSource"]["value"], 5);
}

#[test]
fn no_gateway_writes_nothing() {
    let mut d = Device::new(json!({"hostname": "PC"}));
    assert_unchanged(&mut d, json!({}), "no_gateway");
    assert_eq!(d.json().get("registry"), None);
    let mut d = Device::new(json!({"network": {"gateway_ip": "10.1.0.1"}}));
    assert_unchanged(&mut d, json!({}), "no_gateway");
}

#[test]
fn a_new_gateway_replaces_tenons_group() {
    let mut d = Device::behind("10.1.0.1", "00:1a:2b:3c:4d:5e");
    d.run_default();
    let first = group_of(&d);
    d.edit(|dev| dev["network"] = json!({"gateway_ip": "10.2.0.1", "gateway_mac": "00:1a:2b:3c:4d:99"}));
    let s = d.run_default();
    assert_eq!(s.state, "applied");
    assert_ne!(group_of(&d), first);
    assert_eq!(s.details["group_id"], json!(group_of(&d)));
    assert_eq!(d.do_key()["DODownloadMode"]["value"], 2);

    // Leaving every network drops the group of the last site rather than keeping a stale one.
    d.edit(|dev| dev["network"] = json!({}));
    assert_eq!(d.run_default().state, "no_gateway");
    assert_eq!(d.do_key(), json!({}));
}

#[test]
fn a_lost_state_still_recognises_tenons_values() {
    let mut d = Device::behind("10.1.0.1", "00:1a:2b:3c:4d:5e");
    d.run_default();
    d.state = Value::Null;
    assert_unchanged(&mut d, json!({}), "compliant");
    assert_eq!(d.run(off()).state, "removed");
    assert_eq!(d.do_key(), json!({}));
}

#[test]
fn platform_errors_become_failed_statuses() {
    let mut d = Device::new(json!({"network": {"gateway_ip": "not-an-ip", "gateway_mac": "00:1a:2b:3c:4d:5e"}}));
    let s = d.run_default();
    assert_eq!(s.state, "failed");
    assert!(s.reason.unwrap().contains("default gateway"));

    let mut d = Device::behind("10.1.0.1", "00:1a:2b:3c:4d:5e");
    d.edit(|dev| dev["registry"] = json!({KEY: {"DOGroupId": {"type": "REG_BINARY", "value": "00"}}}));
    let s = d.run_default();
    assert_eq!(s.state, "failed");
    assert!(s.reason.unwrap().contains(KEY));
    assert_eq!(d.state, Value::Null);

    // Writes fail (the simulated device writes through a temp file next to it, here a directory).
    let mut d = Device::behind("10.1.0.1", "00:1a:2b:3c:4d:5e");
    std::fs::create_dir(d.path.with_extension("tmp-write")).unwrap();
    let s = d.run_default();
    assert_eq!(s.state, "failed");
    assert!(s.reason.as_deref().unwrap().starts_with("cannot set DOGroupId="), "{s:?}");
    assert_eq!(s.details["gateway_mac"], "00:1a:2b:3c:4d:5e");
    assert!(!s.details.contains_key("group_id"));
    assert_eq!(d.state, json!({}));
}

#[test]
fn state_records_what_was_written() {
    let mut d = Device::behind("10.1.0.1", "00:1a:2b:3c:4d:5e");
    d.run_default();
    assert_eq!(d.state, json!({"group_id": "00063065-0000-0001-0001-001a2b3c4d5e", "download_mode": 2}));
}

/// Issue 12: `5` and `"yes"` were taken as "on". A value of the wrong type is reported as
/// `failed` with the expected type, and the device stays exactly as it was.
#[test]
fn a_value_of_the_wrong_type_is_reported_not_guessed() {
    let mut d = Device::behind("192.168.77.1", "aa:bb:cc:dd:ee:01");
    for bad in [json!(5), json!("yes")] {
        let before = d.bytes();
        let s = d.run(json!({"Policies": {"SetNetworkOptimizationID": bad}}));
        assert_eq!(s.state, "failed", "{s:?}");
        assert!(s.reason.as_deref().unwrap().contains("true or false"), "{s:?}");
        assert_eq!(d.bytes(), before, "nothing may be written for {bad}");
    }
}
