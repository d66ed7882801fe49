//! Tests of the BitLocker policy against the simulated device and an in-memory escrow server.
//! A journaling platform wrapper and the escrow server write into one list, so the tests check
//! the exact order of everything the policy does.

use super::*;
use crate::platform::simulated::SimulatedPlatform;
use crate::platform::*;
use crate::policies::escrow::MemoryEscrow;
use crate::policies::{EscrowSink, NoEscrow, StateStore};
use serde_json::{json, Map};
use std::cell::RefCell;
use std::net::IpAddr;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const DEVICE_ID: &str = "dev-1";
const ESCROW_SECRET: [u8; 32] = [42; 32];

type Journal = Arc<Mutex<Vec<String>>>;

/// Kills the agent (a panic the test catches) right after the n-th effect on the device or the
/// escrow server: the effect happened, and nothing after it did, as with a SIGKILL.
#[derive(Default)]
struct KillSwitch(Mutex<Option<u32>>);

impl KillSwitch {
    fn arm(&self, after_effects: Option<u32>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = after_effects;
    }

    fn tick(&self) {
        let mut left = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match *left {
            Some(n) if n <= 1 => {
                *left = None;
                drop(left);
                panic!("agent killed");
            }
            Some(n) => *left = Some(n - 1),
            None => {}
        }
    }
}

/// The escrow server, with its effects counted towards the kill switch.
struct KillableEscrow<'a> {
    inner: &'a MemoryEscrow,
    kill: &'a KillSwitch,
}

impl EscrowSink for KillableEscrow<'_> {
    fn escrow_target(&self) -> Option<crate::policies::EscrowTarget> {
        self.inner.escrow_target()
    }
    fn upload(
        &self,
        sealed: &tenon_core::policy::escrow::SealedRecoveryKey,
        replaces: Option<&str>,
    ) -> Result<tenon_core::policy::escrow::EscrowReceipt, String> {
        let r = self.inner.upload(sealed, replaces);
        self.kill.tick();
        r
    }
    fn pending_rotations(&self) -> Vec<String> {
        self.inner.pending_rotations()
    }
    fn report_retired(&self, protector_id: &str, replaced_by: Option<&str>) -> Result<(), String> {
        let r = self.inner.report_retired(protector_id, replaced_by);
        self.kill.tick();
        r
    }
    fn escrow_conflicts(&self) -> Vec<String> {
        self.inner.escrow_conflicts()
    }
}

/// What the agent's vault holds: the state as the policy last persisted it.
#[derive(Default)]
struct Durable(RefCell<Value>);

impl StateStore for Durable {
    fn persist(&self, state: &Value) -> Result<(), String> {
        *self.0.borrow_mut() = state.clone();
        Ok(())
    }
}

/// Delegates to the simulated device and journals every call that changes it (and password reads).
struct Journaled<'a> {
    inner: &'a SimulatedPlatform,
    journal: &'a Journal,
    /// A BitLocker call that fails, as a broken provider would.
    fail_on: Option<&'static str>,
    kill: &'a KillSwitch,
}

impl Journaled<'_> {
    fn log(&self, entry: String) {
        self.journal.lock().unwrap().push(entry);
    }

    /// Counts an effect (after it happened) towards the kill switch.
    fn effect<T>(&self, r: T) -> T {
        self.kill.tick();
        r
    }

    fn broken(&self, call: &'static str) -> PResult<()> {
        match self.fail_on {
            Some(c) if c == call => {
                Err(PlatformError::Os { what: call, code: 0x8031_0000, detail: "simulated provider failure".into() })
            }
            _ => Ok(()),
        }
    }
}

impl Platform for Journaled<'_> {
    fn hostname(&self) -> PResult<String> {
        self.inner.hostname()
    }
    fn reg_get(&self, key: &str, name: &str) -> PResult<Option<RegValue>> {
        self.inner.reg_get(key, name)
    }
    fn reg_set(&self, key: &str, name: &str, value: &RegValue) -> PResult<()> {
        self.log(format!("reg_set {key}\\{name}={value:?}"));
        self.effect(self.inner.reg_set(key, name, value))
    }
    fn reg_delete(&self, key: &str, name: &str) -> PResult<bool> {
        self.log(format!("reg_delete {key}\\{name}"));
        self.inner.reg_delete(key, name)
    }
    fn routes(&self) -> PResult<Vec<Route>> {
        self.inner.routes()
    }
    fn neighbours(&self) -> PResult<Vec<Neighbour>> {
        self.inner.neighbours()
    }
    fn resolve_mac(&self, ip: IpAddr, interface_index: u32) -> PResult<Option<[u8; 6]>> {
        self.inner.resolve_mac(ip, interface_index)
    }
    fn machine_env(&self, name: &str) -> PResult<Option<String>> {
        self.inner.machine_env(name)
    }
    fn computer_system(&self) -> PResult<ComputerSystem> {
        self.inner.computer_system()
    }
    fn tpm(&self) -> PResult<TpmState> {
        self.inner.tpm()
    }
    fn is_multi_session(&self) -> PResult<bool> {
        self.inner.is_multi_session()
    }
    fn entra_join(&self) -> PResult<EntraJoin> {
        self.inner.entra_join()
    }
    fn volumes(&self) -> PResult<Vec<Volume>> {
        self.inner.volumes()
    }
    fn add_recovery_password(&self, mount: &str) -> PResult<(String, String)> {
        let r = self.inner.add_recovery_password(mount);
        self.log(format!("add_recovery_password {}", r.as_ref().map(|(id, _)| id.as_str()).unwrap_or("failed")));
        self.effect(r)
    }
    fn add_tpm_protector(&self, mount: &str) -> PResult<String> {
        self.log("add_tpm_protector".into());
        self.broken("add_tpm_protector")?;
        self.effect(self.inner.add_tpm_protector(mount))
    }
    fn delete_protector(&self, mount: &str, protector_id: &str) -> PResult<()> {
        self.log(format!("delete_protector {protector_id}"));
        self.effect(self.inner.delete_protector(mount, protector_id))
    }
    fn encrypt(&self, mount: &str) -> PResult<()> {
        self.log("encrypt".into());
        self.broken("encrypt")?;
        self.effect(self.inner.encrypt(mount))
    }
    fn backup_to_entra(&self, mount: &str, protector_id: &str) -> PResult<()> {
        if self.fail_on == Some("kill_during_backup_to_entra") {
            panic!("agent killed during the Entra call");
        }
        let r = self.inner.backup_to_entra(mount, protector_id);
        self.log(format!("backup_to_entra {protector_id} {}", if r.is_ok() { "ok" } else { "failed" }));
        self.effect(r)
    }
    fn signed_in_users(&self) -> PResult<Vec<SessionUser>> {
        self.inner.signed_in_users()
    }
    fn local_group_members(&self, group: &str) -> PResult<Vec<Account>> {
        self.inner.local_group_members(group)
    }
    fn add_local_group_member(&self, group: &str, account: &Account) -> PResult<()> {
        self.inner.add_local_group_member(group, account)
    }
    fn remove_local_group_member(&self, group: &str, account: &Account) -> PResult<()> {
        self.inner.remove_local_group_member(group, account)
    }
    fn profile_dir(&self, user: &SessionUser) -> PResult<PathBuf> {
        self.inner.profile_dir(user)
    }
    fn notify_user(&self, user: &SessionUser, title: &str, message: &str) -> PResult<()> {
        self.inner.notify_user(user, title, message)
    }
    fn wrap_secret(&self, plain: &[u8]) -> PResult<Vec<u8>> {
        self.inner.wrap_secret(plain)
    }
    fn unwrap_secret(&self, wrapped: &[u8]) -> PResult<Vec<u8>> {
        self.inner.unwrap_secret(wrapped)
    }
    fn wait_network_change(&self, timeout: Duration) -> PResult<bool> {
        self.inner.wait_network_change(timeout)
    }
    fn detect(&self, rule: &tenon_core::packages::DetectRule) -> PResult<bool> {
        self.inner.detect(rule)
    }
    fn run_installer(&self, run: &InstallerRun<'_>) -> PResult<tenon_core::packages::RunEnd> {
        self.log(format!("run_installer {}", run.package));
        self.effect(self.inner.run_installer(run))
    }
    fn recovery_password(&self, mount: &str, protector_id: &str) -> PResult<String> {
        self.log(format!("recovery_password {protector_id}"));
        self.inner.recovery_password(mount, protector_id)
    }
}

/// A healthy physical laptop with an unencrypted C:, merged with `overrides` (top-level keys).
fn device_json(overrides: Value) -> Value {
    let mut dev = json!({
        "hostname": "PC1",
        "tpm": {"present": true, "ready": true},
        "vm": {"manufacturer": "Dell Inc.", "model": "Latitude 7440"},
        "multi_session": false,
        "env": {},
        "entra_joined": false,
        "entra_escrow_fails": 0,
        "volumes": [{"mount": "C:", "encryption": "none", "protectors": []}],
    });
    for (k, v) in overrides.as_object().unwrap() {
        dev[k] = v.clone();
    }
    dev
}

fn machine_config(extra: Value) -> Map<String, Value> {
    let mut rsf = json!({"BitlockerEnabled": true});
    for (k, v) in extra.as_object().unwrap() {
        rsf[k] = v.clone();
    }
    json!({"Policies": {"RequireSecurityFeatures": rsf}}).as_object().unwrap().clone()
}

/// One simulated device with its agent state, an escrow server, and a clock.
struct Agent {
    _dir: tempfile::TempDir,
    path: PathBuf,
    journal: Journal,
    escrow: MemoryEscrow,
    machine: Map<String, Value>,
    state: Value,
    /// The state as last persisted (what survives a kill).
    durable: Durable,
    kill: Rc<KillSwitch>,
    now: i64,
    /// Every status reported, as JSON text.
    reports: Vec<String>,
    /// Every recovery password the device ever held.
    passwords: Vec<String>,
    fail_on: Option<&'static str>,
}

impl Agent {
    fn new(device: Value, config: Map<String, Value>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("device.json");
        std::fs::write(&path, device.to_string()).unwrap();
        let journal = Journal::default();
        let escrow = MemoryEscrow::new(DEVICE_ID, ESCROW_SECRET).with_journal(journal.clone());
        let mut a = Self {
            _dir: dir,
            path,
            journal,
            escrow,
            machine: config,
            state: Value::Null,
            durable: Durable::default(),
            kill: Rc::default(),
            now: 1_000_000,
            reports: vec![],
            passwords: vec![],
            fail_on: None,
        };
        a.collect_passwords();
        a
    }

    fn run_with(&mut self, escrow: &dyn EscrowSink) -> PolicyStatus {
        // A fresh platform each run: nothing survives in memory between runs but `state`.
        let sim = SimulatedPlatform::open(&self.path).unwrap();
        let kill = self.kill.clone();
        let platform = Journaled { inner: &sim, journal: &self.journal, fail_on: self.fail_on, kill: &kill };
        let users = Map::new();
        let mut ctx = PolicyContext {
            platform: &platform,
            machine: &self.machine,
            users: &users,
            now: self.now,
            state: &mut self.state,
            escrow,
            store: &self.durable,
        };
        let status = Bitlocker.apply(&mut ctx);
        // The agent persists the state after the run.
        *self.durable.0.borrow_mut() = self.state.clone();
        self.reports.push(serde_json::to_string(&status).unwrap());
        self.collect_passwords();
        status
    }

    /// A run killed right after its `after`-th effect (if it gets that far); the agent restarts
    /// with what it had persisted. Returns whether the kill happened.
    fn run_killed(&mut self, after: u32) -> bool {
        let escrow = std::mem::replace(&mut self.escrow, MemoryEscrow::new("unused", [0; 32]));
        self.kill.arm(Some(after));
        let kill = self.kill.clone();
        let killed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.run_with(&KillableEscrow { inner: &escrow, kill: &kill })
        }))
        .is_err();
        self.kill.arm(None);
        self.escrow = escrow;
        if killed {
            self.state = self.durable.0.borrow().clone();
            self.collect_passwords();
        }
        killed
    }

    fn run(&mut self) -> PolicyStatus {
        let escrow = std::mem::replace(&mut self.escrow, MemoryEscrow::new("unused", [0; 32]));
        let status = self.run_with(&escrow);
        self.escrow = escrow;
        status
    }

    /// Runs until the state is `state` (at most 10 runs, the clock moving `step` seconds each).
    fn run_until(&mut self, state: &str, step: i64) -> PolicyStatus {
        for _ in 0..10 {
            let st = self.run();
            if st.state == state {
                return st;
            }
            self.now += step;
        }
        panic!("never reached {state}: {:?}", self.reports.last());
    }

    fn device(&self) -> Value {
        serde_json::from_str(&std::fs::read_to_string(&self.path).unwrap()).unwrap()
    }

    fn edit_device(&self, f: impl FnOnce(&mut Value)) {
        let mut d = self.device();
        f(&mut d);
        std::fs::write(&self.path, d.to_string()).unwrap();
    }

    fn volume(&self) -> Value {
        self.device()["volumes"][0].clone()
    }

    fn protector_ids(&self, kind: &str) -> Vec<String> {
        self.volume()["protectors"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["type"] == kind)
            .map(|p| p["id"].as_str().unwrap().to_string())
            .collect()
    }

    fn password_of(&self, id: &str) -> String {
        let vol = self.volume();
        let p = vol["protectors"].as_array().unwrap().iter().find(|p| p["id"] == id).unwrap();
        p["numerical_password"].as_str().unwrap().to_string()
    }

    fn collect_passwords(&mut self) {
        for vol in self.device()["volumes"].as_array().cloned().unwrap_or_default() {
            for p in vol["protectors"].as_array().cloned().unwrap_or_default() {
                if let Some(pw) = p["numerical_password"].as_str() {
                    if !self.passwords.iter().any(|x| x == pw) {
                        self.passwords.push(pw.to_string());
                    }
                }
            }
        }
    }

    fn take_journal(&self) -> Vec<String> {
        std::mem::take(&mut *self.journal.lock().unwrap())
    }
}

const REG: &str = r"reg_set HKLM\SYSTEM\CurrentControlSet\Control\BitLocker\PreventDeviceEncryption=Dword(0)";

fn protector_status<'s>(st: &'s PolicyStatus, id: &str) -> &'s Value {
    st.details["protectors"].as_array().unwrap().iter().find(|p| p["id"] == id).unwrap()
}

#[test]
fn setting_off_is_not_applicable_and_touches_nothing() {
    let mut a = Agent::new(device_json(json!({})), Map::new());
    let before = a.device();
    assert_eq!(a.run().state, "not_applicable");
    let mut off = Agent::new(device_json(json!({})), machine_config(json!({"BitlockerEnabled": false})));
    assert_eq!(off.run().state, "not_applicable");
    assert_eq!(a.device(), before);
    assert!(a.take_journal().is_empty() && off.take_journal().is_empty());
}

#[test]
fn a_setting_of_the_wrong_type_is_reported_not_guessed() {
    for bad in [json!({"BitlockerEnabled": "yes"}), json!({"BitlockerEnabled": true, "EntraEscrowMaxAttempts": "five"})]
    {
        let mut a = Agent::new(device_json(json!({})), machine_config(bad.clone()));
        let before = a.device();
        let st = a.run();
        assert_eq!((st.state.as_str(), st.reason.as_deref()), ("action_required", Some("invalid_setting")), "{bad}");
        assert!(st.details["error"].as_str().unwrap().contains("Policies.RequireSecurityFeatures."), "{st:?}");
        assert_eq!(a.device(), before, "nothing is done on a setting it cannot read");
        assert!(a.take_journal().is_empty());
    }
}

#[test]
fn skips_with_reasons_and_touches_nothing() {
    let check = |device: Value, reason: &str| {
        let mut a = Agent::new(device_json(device), machine_config(json!({})));
        let before = a.device();
        let st = a.run();
        assert_eq!((st.state.as_str(), st.reason.as_deref()), ("skipped", Some(reason)), "{st:?}");
        assert!(st.details["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert_eq!(a.device(), before, "a skipped device is left as it was");
        assert!(a.take_journal().is_empty());
    };
    check(json!({"tpm": {"present": true, "ready": false}}), "tpm_not_ready");
    check(json!({"tpm": {"present": false, "ready": false}}), "tpm_unavailable");
    check(json!({"tpm": null}), "tpm_unavailable");
    check(json!({"multi_session": true}), "multi_session");
    let vmware = json!({"manufacturer": "VMware, Inc.", "model": "VMware Virtual Platform"});
    check(json!({"vm": vmware}), "virtual_machine");
    check(json!({"vm": vmware, "env": {"RjDisableVmDetection": "0"}}), "virtual_machine");
    check(json!({"vm": vmware, "env": {"RjDisableVmDetection": "true"}}), "virtual_machine");
    check(json!({"volumes": []}), "no_os_volume");
}

#[test]
fn vm_with_detection_disabled_is_enforced() {
    let vm = json!({"manufacturer": "Microsoft Corporation", "model": "Virtual Machine"});
    let mut a =
        Agent::new(device_json(json!({"vm": vm, "env": {"RjDisableVmDetection": "1"}})), machine_config(json!({})));
    let st = a.run_until("encrypted", 60);
    assert_eq!(st.state, "encrypted");
    assert_eq!(a.volume()["encryption"], "encrypted");
    // A Surface (physical, Hyper-V on) needs no variable.
    let surface = json!({"manufacturer": "Microsoft Corporation", "model": "Surface Pro 9"});
    let mut s = Agent::new(device_json(json!({"vm": surface})), machine_config(json!({})));
    assert_ne!(s.run().state, "skipped");
}

#[test]
fn full_enforce_path_in_the_mandated_order() {
    let mut a = Agent::new(device_json(json!({})), machine_config(json!({})));
    let st = a.run();
    let rp = a.protector_ids("recovery_password");
    assert_eq!(rp.len(), 1);
    let rp = &rp[0];
    assert_eq!(
        a.take_journal(),
        vec![
            REG.to_string(),
            format!("add_recovery_password {rp}"),
            format!("escrow upload {rp}"),
            "add_tpm_protector".into(),
            "encrypt".into(),
        ]
    );
    // Progress is tracked across syncs: 25 % per volume read in the simulation.
    assert_eq!(st.state, "enforcing");
    assert_eq!(st.details["percent"], 25);
    assert_eq!(st.details["warning"], NOT_IN_ENTRA, "not Entra-joined is reported");
    assert_eq!(protector_status(&st, rp)["tenon_escrowed"], true);
    assert_eq!(protector_status(&st, rp)["entra"], "not_joined");
    a.now += 900;
    let st = a.run();
    assert_eq!((st.state.as_str(), &st.details["percent"]), ("enforcing", &json!(50)));
    let st = a.run_until("encrypted", 900);
    assert_eq!(st.details["percent"], 100);
    assert!(a.take_journal().is_empty(), "tracking progress changes nothing");
    // The device: registry value, XTS-AES-256 used-space encryption, one recovery password and a TPM.
    let dev = a.device();
    assert_eq!(
        dev["registry"][r"HKLM\SYSTEM\CurrentControlSet\Control\BitLocker"]["PreventDeviceEncryption"],
        json!({"type": "REG_DWORD", "value": 0})
    );
    let vol = a.volume();
    assert_eq!((&vol["encryption_method"], &vol["used_space_only"]), (&json!("XTS-AES-256"), &json!(true)));
    assert_eq!(a.protector_ids("tpm").len(), 1);
    // The escrow holds exactly that key, bound to this device and volume.
    let stored = a.escrow.stored();
    assert_eq!(stored.len(), 1);
    assert_eq!((stored[0].sealed.device_id.as_str(), stored[0].sealed.mount.as_str()), (DEVICE_ID, "C:"));
    assert_eq!(a.escrow.open_latest(rp).unwrap().as_str(), a.password_of(rp));
    // Further runs keep it as it is.
    a.now += 3600;
    assert_eq!(a.run().state, "encrypted");
    assert!(a.take_journal().is_empty());
}

#[test]
fn entra_joined_escrows_to_entra_after_tenon_and_before_the_tpm() {
    let mut a = Agent::new(device_json(json!({"entra_joined": true})), machine_config(json!({})));
    a.run();
    let rp = a.protector_ids("recovery_password").remove(0);
    assert_eq!(
        a.take_journal(),
        vec![
            REG.to_string(),
            format!("add_recovery_password {rp}"),
            format!("escrow upload {rp}"),
            format!("backup_to_entra {rp} ok"),
            "add_tpm_protector".into(),
            "encrypt".into(),
        ]
    );
    let st = a.run_until("encrypted", 60);
    assert!(st.details.get("warning").is_none());
    assert_eq!(protector_status(&st, &rp)["entra"], "escrowed");
    assert_eq!(a.volume()["protectors"][0]["entra_escrowed"], true);
}

fn entra_calls(journal: &[String]) -> Vec<String> {
    journal.iter().filter(|e| e.starts_with("backup_to_entra")).cloned().collect()
}

#[test]
fn entra_escrow_failing_twice_then_succeeding() {
    let mut a =
        Agent::new(device_json(json!({"entra_joined": true, "entra_escrow_fails": 2})), machine_config(json!({})));
    let t0 = a.now;
    let st = a.run();
    let rp = a.protector_ids("recovery_password").remove(0);
    let j = a.take_journal();
    assert_eq!(entra_calls(&j), vec![format!("backup_to_entra {rp} failed")]);
    // The failed Entra attempt does not hold encryption back: Tenon holds the key.
    assert_eq!(j[j.len() - 2..], ["add_tpm_protector".to_string(), "encrypt".to_string()]);
    assert_eq!((st.state.as_str(), st.reason.as_deref()), ("escrow_pending", Some("entra_escrow_pending")));
    let p = protector_status(&st, &rp);
    assert_eq!(
        (&p["entra"], &p["entra_attempts"], &p["entra_next_attempt_at"]),
        (&json!("pending"), &json!(1), &json!(t0 + 300))
    );
    assert!(st.details["errors"][0].as_str().unwrap().contains("attempt 1 of 5"));

    // Before the backoff has passed: no attempt.
    a.now = t0 + 299;
    assert_eq!(a.run().state, "escrow_pending");
    assert!(entra_calls(&a.take_journal()).is_empty());

    a.now = t0 + 300;
    let st = a.run();
    assert_eq!(entra_calls(&a.take_journal()), vec![format!("backup_to_entra {rp} failed")]);
    assert_eq!(protector_status(&st, &rp)["entra_next_attempt_at"], t0 + 300 + 600);

    a.now = t0 + 899;
    a.run();
    assert!(entra_calls(&a.take_journal()).is_empty());

    a.now = t0 + 900;
    let st = a.run();
    assert_eq!(entra_calls(&a.take_journal()), vec![format!("backup_to_entra {rp} ok")]);
    assert_eq!(protector_status(&st, &rp)["entra"], "escrowed");
    assert_eq!(protector_status(&st, &rp)["entra_attempts"], 3);
    assert_eq!(a.device()["entra_escrow_fails"], 0);
    let st = a.run_until("encrypted", 60);
    assert!(st.details.get("errors").is_none());
}

#[test]
fn entra_escrow_failing_always_is_marked_failed_after_max_attempts() {
    let mut a = Agent::new(
        device_json(json!({"entra_joined": true, "entra_escrow_fails": -1})),
        machine_config(json!({"EntraEscrowMaxAttempts": 3})),
    );
    let mut last = a.run();
    for _ in 0..8 {
        a.now += 6 * 3600;
        last = a.run();
    }
    let rp = a.protector_ids("recovery_password").remove(0);
    assert_eq!(entra_calls(&a.take_journal()).len(), 3, "exactly the configured number of attempts");
    assert_eq!((last.state.as_str(), last.reason.as_deref()), ("escrow_failed", Some("entra_escrow_failed")));
    assert_eq!(protector_status(&last, &rp)["entra"], "failed");
    assert!(protector_status(&last, &rp)["entra_last_error"].as_str().unwrap().contains("Entra"));
    // The volume is still encrypted and the key is in the Tenon escrow.
    assert_eq!(last.details["encryption"], "encrypted");
    assert_eq!(protector_status(&last, &rp)["tenon_escrowed"], true);
    assert_eq!(a.device()["entra_escrow_fails"], -1);
}

#[test]
fn agent_killed_between_entra_attempts_keeps_its_queue() {
    let device = device_json(json!({"entra_joined": true, "entra_escrow_fails": -1}));
    let mut a = Agent::new(device, machine_config(json!({"EntraEscrowMaxAttempts": 2})));
    let t0 = a.now;
    a.run();
    assert_eq!(entra_calls(&a.take_journal()).len(), 1);

    // Kill: only the persisted (serialized) state survives, plus the disk and the server.
    let persisted = serde_json::to_string(&a.state).unwrap();
    a.state = Value::Null;
    let restart = |a: &mut Agent, persisted: &str| a.state = serde_json::from_str(persisted).unwrap();
    restart(&mut a, &persisted);
    // Restarted right away: the backoff still holds.
    a.now = t0 + 10;
    let st = a.run();
    assert_eq!(st.state, "escrow_pending");
    assert!(entra_calls(&a.take_journal()).is_empty(), "no free retry after a restart");

    let persisted = serde_json::to_string(&a.state).unwrap();
    restart(&mut a, &persisted);
    a.now = t0 + 300;
    let st = a.run();
    assert_eq!(entra_calls(&a.take_journal()).len(), 1);
    // Attempts before and after the restart add up to the maximum.
    assert_eq!(st.state, "escrow_failed");

    let persisted = serde_json::to_string(&a.state).unwrap();
    restart(&mut a, &persisted);
    a.now = t0 + 100_000;
    assert_eq!(a.run().state, "escrow_failed");
    assert!(entra_calls(&a.take_journal()).is_empty());
    // Nothing was added twice across the restarts.
    assert_eq!(a.protector_ids("recovery_password").len(), 1);
    assert_eq!(a.escrow.stored().len(), 1);

    // Raising the maximum re-arms the queue; Entra recovers.
    a.machine = machine_config(json!({"EntraEscrowMaxAttempts": 5}));
    a.edit_device(|d| d["entra_escrow_fails"] = json!(0));
    let st = a.run();
    assert_eq!(st.state, "encrypted");
    assert_eq!(entra_calls(&a.take_journal()).len(), 1);
}

#[test]
fn agent_killed_during_an_entra_call_counts_the_attempt() {
    let mut a = Agent::new(device_json(json!({"entra_joined": true})), machine_config(json!({})));
    let t0 = a.now;
    a.fail_on = Some("kill_during_backup_to_entra");
    let killed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| a.run()));
    assert!(killed.is_err());
    // What the policy had written to its state before the kill is what the agent would persist.
    let persisted = serde_json::to_string(&a.state).unwrap();
    a.state = serde_json::from_str(&persisted).unwrap();
    a.fail_on = None;
    let rp = a.protector_ids("recovery_password").remove(0);
    a.take_journal();
    a.now = t0 + 10;
    let st = a.run();
    let j = a.take_journal();
    assert!(entra_calls(&j).is_empty(), "the interrupted attempt counts: backoff applies: {j:?}");
    assert_eq!(protector_status(&st, &rp)["entra_attempts"], 1);
    // The Tenon escrow from before the kill is remembered; no second key was added.
    assert!(!j.iter().any(|e| e.starts_with("add_recovery_password") || e.starts_with("escrow upload")));
    a.now = t0 + 300;
    a.run();
    assert_eq!(entra_calls(&a.take_journal()), vec![format!("backup_to_entra {rp} ok")]);
}

#[test]
fn agent_killed_after_adding_a_protector_escrows_it_on_restart() {
    let mut a = Agent::new(device_json(json!({})), machine_config(json!({})));
    a.escrow.fail_uploads(1);
    let st = a.run();
    assert_eq!((st.state.as_str(), st.reason.as_deref()), ("escrow_pending", Some("tenon_escrow_pending")));
    let rp = a.protector_ids("recovery_password").remove(0);
    // No TPM protector and no encryption before the Tenon escrow succeeded.
    assert!(a.protector_ids("tpm").is_empty());
    assert_eq!(a.volume()["encryption"], "none");
    a.take_journal();

    // Killed before the state was persisted: the agent restarts with nothing.
    a.state = Value::Null;
    a.run();
    assert_eq!(
        a.take_journal(),
        vec![
            format!("recovery_password {rp}"),
            format!("escrow upload {rp}"),
            "add_tpm_protector".into(),
            "encrypt".into()
        ],
        "the protector on the disk is escrowed, not replaced"
    );
    assert_eq!(a.protector_ids("recovery_password"), vec![rp.clone()]);
    assert_eq!(a.escrow.open_latest(&rp).unwrap().as_str(), a.password_of(&rp));
}

#[test]
fn without_server_escrow_nothing_is_encrypted() {
    let mut a = Agent::new(device_json(json!({})), machine_config(json!({})));
    let st = a.run_with(&NoEscrow);
    assert_eq!((st.state.as_str(), st.reason.as_deref()), ("escrow_pending", Some("tenon_escrow_pending")));
    assert!(st.details["errors"][0].as_str().unwrap().contains("server escrow not configured"));
    assert!(a.protector_ids("tpm").is_empty());
    assert_eq!(a.volume()["encryption"], "none");
    // Once the server escrow works, enforcement goes on with the same protector.
    let rp = a.protector_ids("recovery_password");
    a.run();
    assert_eq!(a.protector_ids("recovery_password"), rp);
    assert_eq!(a.volume()["encryption"], "encrypting");
}

#[test]
fn rotation_adds_escrows_then_deletes_the_old_key() {
    let mut a = Agent::new(device_json(json!({"entra_joined": true})), machine_config(json!({})));
    a.run_until("encrypted", 60);
    let old = a.protector_ids("recovery_password").remove(0);
    let old_password = a.password_of(&old);
    let tpm = a.protector_ids("tpm");
    a.take_journal();

    // An administrator read the key: the server asks for rotation.
    a.escrow.request_rotation(&old);
    let st = a.run();
    let new = a.protector_ids("recovery_password").remove(0);
    assert_ne!(new, old);
    assert_eq!(
        a.take_journal(),
        vec![
            format!("add_recovery_password {new}"),
            format!("escrow upload {new}"),
            format!("backup_to_entra {new} ok"),
            format!("delete_protector {old}"),
            format!("escrow retired {old}"),
        ]
    );
    assert_eq!(st.state, "encrypted");
    assert!(st.details.get("rotations_pending").is_none());
    // Exactly one recovery password (the new one), the TPM protector untouched, never decrypted.
    assert_eq!(a.protector_ids("recovery_password"), vec![new.clone()]);
    assert_eq!(a.protector_ids("tpm"), tpm);
    assert_eq!(a.volume()["encryption"], "encrypted");
    // The server archived both keys; the new one replaces the old and opens to the new password.
    let stored = a.escrow.stored();
    assert_eq!(stored.len(), 2);
    assert_eq!(stored[1].replaces.as_deref(), Some(old.as_str()));
    let new_password = a.escrow.open_latest(&new).unwrap();
    assert_eq!(new_password.as_str(), a.password_of(&new));
    assert_ne!(new_password.as_str(), old_password);
    assert!(a.escrow.pending_rotations().is_empty());
    assert_eq!(
        a.escrow.retired(),
        vec![crate::policies::escrow::Retired { protector_id: old.clone(), replaced_by: Some(new.clone()) }]
    );
    // A stale request for the deleted key is only answered: it is gone.
    a.escrow.request_rotation(&old);
    assert_eq!(a.run().state, "encrypted");
    assert_eq!(a.take_journal(), vec![format!("escrow retired {old}")]);
    assert!(a.escrow.pending_rotations().is_empty());
}

#[test]
fn rotation_waits_for_the_tenon_receipt_before_deleting() {
    let mut a = Agent::new(device_json(json!({})), machine_config(json!({})));
    a.run_until("encrypted", 60);
    let old = a.protector_ids("recovery_password").remove(0);
    a.take_journal();
    a.escrow.request_rotation(&old);
    a.escrow.fail_uploads(1);
    let st = a.run();
    assert_eq!(st.state, "escrow_pending");
    assert_eq!(a.protector_ids("recovery_password").len(), 2, "the old key stays until the new one is escrowed");
    assert_eq!(st.details["rotations_pending"], json!([old]));
    a.take_journal();
    // Restarted with the persisted state: the replacement is escrowed, not added again.
    let persisted = serde_json::to_string(&a.state).unwrap();
    a.state = serde_json::from_str(&persisted).unwrap();
    let st = a.run();
    let new = a.protector_ids("recovery_password").into_iter().find(|id| *id != old).unwrap();
    assert_eq!(
        a.take_journal(),
        vec![
            format!("recovery_password {new}"),
            format!("escrow upload {new}"),
            format!("delete_protector {old}"),
            format!("escrow retired {old}")
        ]
    );
    assert_eq!(st.state, "encrypted");
    assert_eq!(a.protector_ids("recovery_password"), vec![new]);
}

#[test]
fn an_encrypted_volume_is_never_decrypted_only_protected_and_escrowed() {
    // Encrypted by someone else, with their own recovery password and a TPM protector.
    let user_pw = "531058-303050-716078-383614-460922-106975-083446-139161";
    let vol = json!([{"mount": "C:", "encryption": "encrypted", "protectors": [
        {"id": "{TPM}", "type": "tpm"},
        {"id": "{USER}", "type": "recovery_password", "numerical_password": user_pw},
    ]}]);
    let mut a = Agent::new(device_json(json!({"volumes": vol})), machine_config(json!({})));
    let st = a.run();
    assert_eq!(
        a.take_journal(),
        vec![REG.to_string(), "recovery_password {USER}".into(), "escrow upload {USER}".into()]
    );
    assert_eq!(st.state, "encrypted");
    assert_eq!(a.volume()["encryption"], "encrypted");
    assert_eq!(a.escrow.open_latest("{USER}").unwrap().as_str(), user_pw);

    // Encrypted with only a TPM protector: a recovery password is added and escrowed; no Encrypt.
    let vol = json!([{"mount": "C:", "encryption": "encrypted", "protectors": [{"id": "{TPM}", "type": "tpm"}]}]);
    let mut b = Agent::new(device_json(json!({"volumes": vol})), machine_config(json!({})));
    let st = b.run();
    let rp = b.protector_ids("recovery_password").remove(0);
    assert_eq!(
        b.take_journal(),
        vec![REG.to_string(), format!("add_recovery_password {rp}"), format!("escrow upload {rp}")]
    );
    assert_eq!(st.state, "encrypted");
    assert_eq!(b.protector_ids("tpm"), vec!["{TPM}".to_string()]);

    // Encrypted, and the server escrow is down: still never decrypted, nothing removed.
    let vol = json!([{"mount": "C:", "encryption": "encrypted", "protectors": [{"id": "{TPM}", "type": "tpm"}]}]);
    let mut c = Agent::new(device_json(json!({"volumes": vol})), machine_config(json!({})));
    for _ in 0..3 {
        assert_eq!(c.run_with(&NoEscrow).state, "escrow_pending");
    }
    assert_eq!(c.volume()["encryption"], "encrypted");
    assert!(!c.take_journal().iter().any(|e| e.starts_with("encrypt") || e.starts_with("delete")));
}

#[test]
fn a_volume_being_decrypted_needs_a_person() {
    let vol = json!([{"mount": "C:", "encryption": "decrypting", "percent_encrypted": 60, "protectors": []}]);
    let mut a = Agent::new(device_json(json!({"volumes": vol})), machine_config(json!({})));
    let st = a.run();
    assert_eq!((st.state.as_str(), st.reason.as_deref()), ("action_required", Some("volume_decrypting")));
    assert_eq!(a.take_journal(), vec![REG.to_string()]);
}

#[test]
fn a_failing_platform_step_is_action_required_and_stops_the_run() {
    let mut a = Agent::new(device_json(json!({})), machine_config(json!({})));
    a.fail_on = Some("add_tpm_protector");
    let st = a.run();
    assert_eq!((st.state.as_str(), st.reason.as_deref()), ("action_required", Some("step_failed")));
    let errors = st.details["errors"].as_array().unwrap();
    assert!(errors[0].as_str().unwrap().starts_with("add TPM protector: "), "{errors:?}");
    assert!(!a.take_journal().contains(&"encrypt".to_string()), "nothing after a failed step runs");
    assert_eq!(a.volume()["encryption"], "none");
    // Fixed: the next run picks up where it stopped.
    a.fail_on = None;
    a.run();
    assert_eq!(a.take_journal(), vec!["add_tpm_protector".to_string(), "encrypt".into()]);
}

#[test]
fn no_recovery_password_in_any_report_state_or_journal() {
    let mut a = Agent::new(
        device_json(json!({"entra_joined": true, "entra_escrow_fails": 1})),
        machine_config(json!({"EntraEscrowMaxAttempts": 2})),
    );
    a.run_with(&NoEscrow);
    a.escrow.fail_uploads(1);
    a.run();
    a.state = Value::Null; // a kill that lost the state
    a.run_until("encrypted", 3600);
    let rp = a.protector_ids("recovery_password").remove(0);
    a.escrow.request_rotation(&rp);
    a.run();
    a.edit_device(|d| d["entra_escrow_fails"] = json!(-1));
    let rp2 = a.protector_ids("recovery_password").remove(0);
    a.escrow.request_rotation(&rp2);
    for _ in 0..4 {
        a.run();
        a.now += 6 * 3600;
    }
    assert!(a.passwords.len() >= 3, "the scenario created several keys: {}", a.passwords.len());
    assert!(a.reports.iter().any(|r| r.contains("escrow_failed")), "the scenario reached Entra failure");
    assert!(a.reports.iter().any(|r| r.contains("errors")), "the scenario produced errors");

    let mut everything = a.reports.clone();
    everything.push(a.state.to_string());
    everything.extend(a.journal.lock().unwrap().iter().cloned());
    everything.extend(a.escrow.stored().iter().map(|k| serde_json::to_string(&k.sealed).unwrap()));
    for pw in &a.passwords {
        let digits: String = pw.chars().filter(char::is_ascii_digit).collect();
        let fragments: Vec<&str> = (0..7).map(|i| &pw[i * 7..i * 7 + 13]).collect();
        for text in &everything {
            assert!(!text.contains(pw.as_str()) && !text.contains(&digits), "a recovery password leaked into: {text}");
            // No fragment either: no two adjacent groups of a key appear anywhere.
            assert!(!fragments.iter().any(|f| text.contains(f)), "part of a recovery password leaked into: {text}");
        }
    }
}

#[test]
fn policy_is_registered() {
    assert!(crate::policies::all().iter().any(|p| p.name() == "bitlocker"));
}

#[test]
fn unreadable_state_starts_fresh_without_losing_keys() {
    let mut a = Agent::new(device_json(json!({})), machine_config(json!({})));
    a.run();
    a.state = json!("garbage");
    a.take_journal();
    a.run();
    let rp = a.protector_ids("recovery_password");
    assert_eq!(rp.len(), 1, "no second key");
    // The key is escrowed again (the server archives it) rather than trusted from a lost record.
    assert_eq!(a.take_journal()[..2], [format!("recovery_password {}", rp[0]), format!("escrow upload {}", rp[0])]);
}

/// The recovery passwords on the volume, as (id, password).
fn recovery_keys(a: &Agent) -> Vec<(String, String)> {
    a.protector_ids("recovery_password").into_iter().map(|id| (id.clone(), a.password_of(&id))).collect()
}

/// The state every rotation must end in: one recovery password, not the read one, escrowed (the
/// server's copy opens to the volume's password), and the server told the old one is gone.
fn assert_rotated(a: &Agent, read: &(String, String), context: &str) {
    let keys = recovery_keys(a);
    assert_eq!(keys.len(), 1, "{context}: exactly one recovery password: {keys:?}");
    assert!(keys.iter().all(|(id, pw)| id != &read.0 && pw != &read.1), "{context}: the read key is gone");
    let (id, pw) = &keys[0];
    assert_eq!(a.escrow.open_latest(id).map(|p| p.to_string()).as_deref(), Some(pw.as_str()), "{context}");
    assert!(a.escrow.pending_rotations().is_empty(), "{context}: the server's request is done");
    assert!(a.escrow.retired().iter().any(|r| r.protector_id == read.0), "{context}: retirement reported");
}

#[test]
fn rotation_killed_after_any_effect_resumes_and_leaves_one_escrowed_key() {
    // Kill right after the 1st, 2nd, ... effect of the rotation run (add, upload, Entra, delete,
    // report); the restart has only what was persisted. Whatever the point, the next runs finish
    // the rotation with exactly one key, and the server hears of the retirement only after the
    // old protector is gone from the volume.
    let mut max_effects_seen = 0;
    for kill_after in 1..=8u32 {
        let mut a = Agent::new(device_json(json!({"entra_joined": true})), machine_config(json!({})));
        a.run_until("encrypted", 60);
        for cycle in 0..3 {
            let read = recovery_keys(&a).remove(0);
            a.escrow.request_rotation(&read.0);
            a.take_journal();
            let killed = a.run_killed(kill_after);
            let effects = a.take_journal().iter().filter(|e| !e.starts_with("recovery_password")).count();
            if !killed {
                max_effects_seen = max_effects_seen.max(effects);
            }
            // The server never hears "retired" for a protector still on the volume.
            let on_volume = a.protector_ids("recovery_password");
            for r in a.escrow.retired() {
                assert!(!on_volume.contains(&r.protector_id), "kill after {kill_after}: retired too early");
            }
            for _ in 0..2 {
                a.run();
            }
            assert_rotated(&a, &read, &format!("kill after effect {kill_after}, cycle {cycle}"));
            // A kill right after an Entra call leaves that attempt counted: it is retried after
            // the backoff, not at once.
            a.now += 600;
            assert_eq!(a.run().state, "encrypted", "kill after effect {kill_after}, cycle {cycle}");
            assert!(a.take_journal().iter().all(|e| !e.starts_with("add_")), "nothing more to do");
        }
    }
    // The kills covered every effect of a rotation run (add, upload, Entra, delete, report).
    assert_eq!(max_effects_seen, 5);
}

#[test]
fn a_key_added_just_before_a_kill_is_adopted_not_orphaned() {
    let mut a = Agent::new(device_json(json!({})), machine_config(json!({})));
    a.run_until("encrypted", 60);
    let read = recovery_keys(&a).remove(0);
    a.escrow.request_rotation(&read.0);
    a.take_journal();
    // Killed right after the add returned: the new id never reached the state, only the intent.
    assert!(a.run_killed(1));
    let j = a.take_journal();
    assert!(j[0].starts_with("add_recovery_password"), "{j:?}");
    let added = a.protector_ids("recovery_password").into_iter().find(|id| *id != read.0).unwrap();
    a.run();
    let j = a.take_journal();
    assert!(!j.iter().any(|e| e.starts_with("add_recovery_password")), "no second key: {j:?}");
    assert_eq!(a.protector_ids("recovery_password"), vec![added.clone()]);
    assert_eq!(a.escrow.stored().last().unwrap().replaces.as_deref(), Some(read.0.as_str()));
    assert_rotated(&a, &read, "adopted");
}

#[test]
fn surplus_keys_tenon_added_are_removed_and_reported_once_the_keeper_is_escrowed() {
    let mut a = Agent::new(device_json(json!({})), machine_config(json!({})));
    a.run_until("encrypted", 60);
    let keeper = a.protector_ids("recovery_password").remove(0);
    // A second key Tenon recorded as its own (as an interrupted run of an older agent could leave).
    let sim = SimulatedPlatform::open(&a.path).unwrap();
    let (extra, _) = sim.add_recovery_password("C:").unwrap();
    a.state["protectors"][&extra] = json!({"mount": "C:", "added_by_tenon": true});
    // And a person's own key, which is never touched.
    let (own, _) = sim.add_recovery_password("C:").unwrap();
    a.take_journal();
    let st = a.run();
    let j = a.take_journal();
    assert!(j.contains(&format!("delete_protector {extra}")), "{j:?}");
    assert!(j.contains(&format!("escrow retired {extra}")), "{j:?}");
    assert!(!j.contains(&format!("escrow upload {extra}")), "a surplus key is not escrowed first: {j:?}");
    assert!(j.contains(&format!("escrow upload {own}")), "a person's key is escrowed: {j:?}");
    let mut left = a.protector_ids("recovery_password");
    left.sort();
    let mut expected = vec![keeper, own];
    expected.sort();
    assert_eq!(left, expected);
    assert_eq!(st.state, "encrypted");
}

#[test]
fn an_escrow_conflict_is_reported_in_the_status() {
    let mut a = Agent::new(device_json(json!({})), machine_config(json!({})));
    a.run_until("encrypted", 60);
    let rp = a.protector_ids("recovery_password").remove(0);
    let st = a.run();
    assert!(st.details.get("escrow_conflicts").is_none());
    // Someone with the device credential uploaded a different password under this protector id.
    a.escrow.flag_conflict(&rp);
    let st = a.run();
    assert_eq!(st.details["escrow_conflicts"], json!([rp]));
    assert!(st.details["escrow_warning"].as_str().unwrap().contains(&rp));
    assert_eq!(protector_status(&st, &rp)["tenon_escrow_conflict"], true);
    // Remembered even when the server no longer says so (restarted, say).
    a.escrow.report_retired(&rp, None).unwrap();
    assert_eq!(a.run().details["escrow_conflicts"], json!([rp]));
}
