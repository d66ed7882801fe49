//! BitLocker end to end: the real server, tenonctl and agents on simulated devices. Enforcement,
//! escrow to the server (archive, audited role-checked reads, rotation after a read), skips,
//! Entra retries, a killed agent, escrow-key rotation, and a grep of everything written for the key.

mod common;

use common::{bin, KillOnDrop, Server, SimAgent};
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const ENABLED: &str = "Policies.RequireSecurityFeatures.BitlockerEnabled";

fn device(hostname: &str, extra: Value) -> Value {
    let mut d = json!({
        "hostname": hostname,
        "tpm": {"present": true, "ready": true},
        "vm": {"manufacturer": "Dell Inc.", "model": "Latitude 7440"},
        "volumes": [{"mount": "C:", "encryption": "none", "protectors": []}],
    });
    for (k, v) in extra.as_object().unwrap() {
        d[k] = v.clone();
    }
    d
}

/// A server with BitLocker enforcement switched on for everyone.
fn server_with_bitlocker(root: &Path) -> Server {
    let server = Server::start(&root.join("data"), "127.0.0.1:0");
    server.ctl_ok(&["settings", "set", "--tenant", ENABLED, "true"]);
    server
}

/// Everything the agents and tenonctl printed, for the leak check.
#[derive(Default)]
struct Transcript(Vec<u8>);

impl Transcript {
    fn add(&mut self, out: &Output) {
        self.0.extend_from_slice(&out.stdout);
        self.0.extend_from_slice(&out.stderr);
    }
}

fn agent_cmd(agent: &SimAgent, clock_offset: Option<&str>) -> Command {
    let mut c = Command::new(bin("tenon-agent"));
    c.arg("--state-dir")
        .arg(&agent.state_dir)
        .arg("--platform")
        .arg(format!("simulated:{}", agent.device_file.display()));
    if let Some(o) = clock_offset {
        c.env("TENON_AGENT_CLOCK_OFFSET", o);
    }
    c
}

/// `sync --once` (optionally with the clock moved forward); returns the bitlocker status.
fn sync(agent: &SimAgent, offset: Option<&str>, t: &mut Transcript) -> Value {
    let out = agent_cmd(agent, offset).args(["sync", "--once"]).output().unwrap();
    t.add(&out);
    assert!(out.status.success(), "sync failed: {}", String::from_utf8_lossy(&out.stderr));
    agent.status()["policies"]["bitlocker"].clone()
}

/// Syncs until the bitlocker state is `state` (at most `max` syncs); returns the status.
fn sync_until(agent: &SimAgent, state: &str, max: usize, t: &mut Transcript) -> Value {
    let mut last = Value::Null;
    for _ in 0..max {
        last = sync(agent, None, t);
        if last["state"] == json!(state) {
            return last;
        }
    }
    panic!("bitlocker never reached {state}; last status {last:#}");
}

fn volume(agent: &SimAgent) -> Value {
    agent.device()["volumes"][0].clone()
}

/// (protector id, numerical password) of each recovery password on the simulated volume.
fn recovery_passwords(agent: &SimAgent) -> Vec<(String, String)> {
    volume(agent)["protectors"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"] == json!("recovery_password"))
        .map(|p| (p["id"].as_str().unwrap().to_string(), p["numerical_password"].as_str().unwrap().to_string()))
        .collect()
}

fn audit(server: &Server, t: &mut Transcript) -> Vec<Value> {
    let out = server.ctl(&["audit", "list", "--json"]);
    t.add(&out);
    assert!(out.status.success());
    serde_json::from_slice::<Value>(&out.stdout).unwrap().as_array().unwrap().clone()
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[test]
fn full_escrow_run_role_checks_rotation_and_no_key_anywhere() {
    let tmp = tempfile::tempdir().unwrap();
    let server = server_with_bitlocker(tmp.path());
    let mut t = Transcript::default();
    let agent = SimAgent::new(tmp.path(), "pc", device("PC-1", json!({})));
    let id = agent.enroll(&server, &server.enroll_token(1));

    // The volume ends encrypted after a few syncs, passing through enforcing.
    let first = sync(&agent, None, &mut t);
    assert_eq!(first["state"], json!("enforcing"), "{first:#}");
    let done = sync_until(&agent, "encrypted", 10, &mut t);
    assert_eq!(done["percent"], json!(100));
    assert_eq!(done["warning"].as_str().map(|w| w.contains("not secured in Entra")), Some(true));
    let vol = volume(&agent);
    assert_eq!(vol["encryption"], json!("encrypted"));
    assert_eq!(vol["encryption_method"], json!("XTS-AES-256"));
    let keys = recovery_passwords(&agent);
    assert_eq!(keys.len(), 1, "{vol:#}");
    let (protector, password) = keys[0].clone();
    assert_eq!(
        agent.device()["registry"]["HKLM\\SYSTEM\\CurrentControlSet\\Control\\BitLocker"]["PreventDeviceEncryption"]
            ["value"],
        json!(0)
    );

    // devices show carries the agent's bitlocker status object.
    let shown = server.ctl_json(&["devices", "show", &id]);
    let bl = &shown["policies"]["bitlocker"];
    assert_eq!(bl["state"], json!("encrypted"));
    let escrowed = bl["protectors"].as_array().unwrap().iter().find(|p| p["id"] == json!(protector)).unwrap();
    assert_eq!(escrowed["tenon_escrowed"], json!(true));
    let human = server.ctl(&["devices", "show", &id]);
    t.add(&human);
    let human_text = String::from_utf8_lossy(&human.stdout).to_string();
    assert!(human_text.contains("policy bitlocker") && human_text.contains("encrypted"), "{human_text}");
    assert!(human_text.contains(&format!("recovery password {protector}: tenon escrow stored")), "{human_text}");

    // Token management: one token with only the admin role, one with only the recovery-keys role.
    let out = server.ctl(&["admin-tokens", "create", "helpdesk", "--role", "admin"]);
    t.add(&out);
    let helpdesk = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(helpdesk.starts_with("tadm."), "the token alone is printed: {helpdesk}");
    let out = server.ctl(&["admin-tokens", "create", "security-officer", "--role", "recovery-keys"]);
    t.add(&out);
    let officer = String::from_utf8(out.stdout).unwrap().trim().to_string();

    // Without the role: 403 problem+json, audited, no key in the answer or the audit log.
    let denied = server.ctl_as(&helpdesk, &["recovery-keys", "show", &id]);
    t.add(&denied);
    assert_eq!(denied.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&denied.stderr).contains("recovery-keys role"));
    let raw = ureq::get(&format!("{}/api/v1/admin/devices/{id}/recovery-keys", server.url))
        .set("Authorization", &format!("Bearer {helpdesk}"))
        .call();
    match raw {
        Err(ureq::Error::Status(403, r)) => {
            assert_eq!(r.header("Content-Type"), Some("application/problem+json"));
            let body = r.into_string().unwrap();
            assert!(!contains(body.as_bytes(), &password));
            assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["code"], json!("forbidden"));
        }
        other => panic!("expected 403, got {other:?}"),
    }
    let log = audit(&server, &mut t);
    let denials: Vec<&Value> = log.iter().filter(|e| e["action"] == json!("recovery_key.read_denied")).collect();
    assert_eq!(denials.len(), 2, "{log:#?}");
    assert!(denials[0]["actor"].as_str().unwrap().contains("helpdesk"));
    assert_eq!(denials[0]["target"], json!(id));
    // And the officer's token cannot administer (separation of duties).
    let out = server.ctl_as(&officer, &["settings", "set", "--tenant", "Policies.X", "1"]);
    t.add(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("HTTP 403"));

    // The officer reads the key: the same 48 digits the device holds.
    let read = server.ctl_as(&officer, &["recovery-keys", "show", &id, "--json"]);
    assert!(read.status.success(), "{}", String::from_utf8_lossy(&read.stderr));
    let read: Value = serde_json::from_slice(&read.stdout).unwrap();
    assert_eq!(read.as_array().unwrap().len(), 1, "{read:#}");
    assert_eq!(read[0]["protector_id"], json!(protector));
    assert_eq!(read[0]["mount"], json!("C:"));
    assert_eq!(read[0]["recovery_password"], json!(password));
    assert!(read[0]["received_at"].is_string());
    let table = server.ctl_as(&officer, &["recovery-keys", "show", &id]);
    let table_text = String::from_utf8_lossy(&table.stdout).to_string();
    assert!(table_text.contains(&password) && table_text.contains(&protector), "{table_text}");

    // The read is audited: who, when, which device and protector; never the key.
    let log = audit(&server, &mut t);
    let reads: Vec<&Value> = log.iter().filter(|e| e["action"] == json!("recovery_key.read")).collect();
    assert_eq!(reads.len(), 2, "both reads are audited: {log:#?}");
    for r in &reads {
        assert!(r["actor"].as_str().unwrap().contains("security-officer"));
        assert_eq!(r["target"], json!(id));
        assert!(r["at"].is_string());
        assert_eq!(r["details"]["keys"][0]["protector_id"], json!(protector));
    }

    // At the next sync the device rotates the key: new protector, escrowed with `replaces`, old one gone.
    let mut rotated = None;
    for _ in 0..4 {
        let s = sync(&agent, None, &mut t);
        let now = recovery_passwords(&agent);
        if now.len() == 1 && now[0].0 != protector {
            assert_eq!(s["state"], json!("encrypted"), "{s:#}");
            rotated = Some(now[0].clone());
            break;
        }
    }
    let (new_protector, new_password) = rotated.expect("the key was rotated");
    assert_ne!(new_password, password);
    assert_eq!(volume(&agent)["encryption"], json!("encrypted"), "rotation never decrypts");
    // The archive holds both; the old one is marked superseded by the new one.
    let archive = server.ctl_as(&officer, &["recovery-keys", "show", &id, "--all", "--json"]);
    assert!(archive.status.success());
    let archive: Value = serde_json::from_slice(&archive.stdout).unwrap();
    let find = |p: &str| archive.as_array().unwrap().iter().find(|k| k["protector_id"] == json!(p)).cloned().unwrap();
    let old = find(&protector);
    let new = find(&new_protector);
    assert_eq!(old["recovery_password"], json!(password));
    assert_eq!(old["superseded_by"], json!(new_protector));
    assert_eq!(new["recovery_password"], json!(new_password));
    assert_eq!(new["replaces"], json!(protector));
    assert_eq!(new["superseded_by"], Value::Null);
    let log = audit(&server, &mut t);
    assert!(log.iter().any(|e| e["action"] == json!("recovery_key.escrow")
        && e["details"]["protector_id"] == json!(new_protector)
        && e["details"]["replaces"] == json!(protector)));
    // The rotation completed when the device reported the old protector gone from the volume.
    assert!(log.iter().any(|e| e["action"] == json!("recovery_key.retired")
        && e["details"]["protector_id"] == json!(protector)
        && e["details"]["replaced_by"] == json!(new_protector)
        && e["details"]["rotation_completed"] == json!(true)));

    // Leak check: nothing the server or agent wrote holds either password, with or without dashes.
    let mut everything = t.0.clone();
    everything.extend(std::fs::read(&server.stderr_log).unwrap());
    everything.extend(std::fs::read(agent.state_dir.join("status.json")).unwrap());
    everything.extend(common::store_bytes(&server.data_dir));
    let stop_log = server.stderr_log.clone();
    let data_dir = server.data_dir.clone();
    server.stop();
    everything.extend(std::fs::read(stop_log).unwrap());
    everything.extend(common::store_bytes(&data_dir));
    assert!(everything.len() > 10_000, "the transcript is not empty");
    // It did capture the escrow traffic: the protector ids are there, just never the keys.
    assert!(contains(&everything, &protector) && contains(&everything, &new_protector));
    for pw in [&password, &new_password] {
        assert!(!contains(&everything, pw), "the recovery password leaked");
        assert!(!contains(&everything, &pw.replace('-', "")), "the recovery password leaked (without dashes)");
    }
    // The server's log has the escrow events, by protector id only.
    let log_text = std::fs::read_to_string(data_dir.with_extension("server.log")).unwrap();
    assert!(log_text.contains("recovery key escrowed") && log_text.contains(&new_protector));
}

#[test]
fn tpm_not_ready_and_virtual_machines_are_skipped_with_reasons() {
    let tmp = tempfile::tempdir().unwrap();
    let server = server_with_bitlocker(tmp.path());
    let mut t = Transcript::default();
    let token = server.enroll_token(3);
    let no_tpm =
        SimAgent::new(tmp.path(), "notpm", device("PC-TPM", json!({"tpm": {"present": true, "ready": false}})));
    let vm = SimAgent::new(
        tmp.path(),
        "vm",
        device("VM-1", json!({"vm": {"manufacturer": "QEMU", "model": "Standard PC (Q35 + ICH9, 2009)"}})),
    );
    let vm_ok = SimAgent::new(
        tmp.path(),
        "vmok",
        device(
            "VM-2",
            json!({"vm": {"manufacturer": "QEMU", "model": "Standard PC"}, "env": {"RjDisableVmDetection": "1"}}),
        ),
    );
    let ids: Vec<String> = [&no_tpm, &vm, &vm_ok].iter().map(|a| a.enroll(&server, &token)).collect();

    let s = sync(&no_tpm, None, &mut t);
    assert_eq!((s["state"].as_str(), s["reason"].as_str()), (Some("skipped"), Some("tpm_not_ready")), "{s:#}");
    let s = sync(&vm, None, &mut t);
    assert_eq!((s["state"].as_str(), s["reason"].as_str()), (Some("skipped"), Some("virtual_machine")), "{s:#}");
    for a in [&no_tpm, &vm] {
        sync(a, None, &mut t);
        assert_eq!(volume(a)["encryption"], json!("none"));
        assert!(recovery_passwords(a).is_empty(), "a skipped device gets no protector");
    }
    // The server shows the skip and its reason, and holds no key.
    let shown = server.ctl_json(&["devices", "show", &ids[1]]);
    assert_eq!(shown["policies"]["bitlocker"]["reason"], json!("virtual_machine"));
    assert_eq!(server.ctl_json(&["recovery-keys", "show", &ids[0]]), json!([]));

    // The same VM with RjDisableVmDetection=1 is enforced and its key escrowed.
    sync_until(&vm_ok, "encrypted", 10, &mut t);
    let keys = recovery_passwords(&vm_ok);
    let read = server.ctl_json(&["recovery-keys", "show", &ids[2]]);
    assert_eq!(read[0]["recovery_password"], json!(keys[0].1));
    server.stop();
}

#[test]
fn entra_escrow_retries_with_backoff_then_succeeds_or_fails_for_good() {
    let tmp = tempfile::tempdir().unwrap();
    let server = server_with_bitlocker(tmp.path());
    server.ctl_ok(&["settings", "set", "--tenant", "Policies.RequireSecurityFeatures.EntraEscrowMaxAttempts", "3"]);
    let mut t = Transcript::default();
    let token = server.enroll_token(2);
    let flaky =
        SimAgent::new(tmp.path(), "flaky", device("PC-F", json!({"entra_joined": true, "entra_escrow_fails": 2})));
    let broken =
        SimAgent::new(tmp.path(), "broken", device("PC-B", json!({"entra_joined": true, "entra_escrow_fails": -1})));
    let id_flaky = flaky.enroll(&server, &token);
    let id_broken = broken.enroll(&server, &token);

    for a in [&flaky, &broken] {
        let s = sync(a, None, &mut t);
        assert_eq!(
            (s["state"].as_str(), s["reason"].as_str()),
            (Some("escrow_pending"), Some("entra_escrow_pending")),
            "{s:#}"
        );
        // The next attempt waits for the backoff: an immediate sync does not retry.
        let again = sync(a, None, &mut t);
        let p = &again["protectors"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["kind"] == json!("recovery_password"))
            .unwrap()
            .clone();
        assert_eq!(p["entra_attempts"], json!(1), "{again:#}");
        assert!(p["entra_next_attempt_at"].is_i64());
        assert_eq!(p["tenon_escrowed"], json!(true), "the Tenon escrow does not wait for Entra");
    }
    // Play the clock forward past each backoff (at most 6 h apart).
    let mut flaky_last = Value::Null;
    let mut broken_last = Value::Null;
    for hours in [7, 14, 21, 28] {
        let offset = format!("{hours}h");
        flaky_last = sync(&flaky, Some(&offset), &mut t);
        broken_last = sync(&broken, Some(&offset), &mut t);
    }
    assert_eq!(flaky_last["state"], json!("encrypted"), "{flaky_last:#}");
    let p = flaky_last["protectors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["kind"] == json!("recovery_password"))
        .unwrap()
        .clone();
    assert_eq!((p["entra"].as_str(), p["entra_attempts"].as_u64()), (Some("escrowed"), Some(3)));
    assert_eq!(
        (broken_last["state"].as_str(), broken_last["reason"].as_str()),
        (Some("escrow_failed"), Some("entra_escrow_failed")),
        "{broken_last:#}"
    );
    let p = broken_last["protectors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["kind"] == json!("recovery_password"))
        .unwrap()
        .clone();
    assert_eq!((p["entra"].as_str(), p["entra_attempts"].as_u64()), (Some("failed"), Some(3)));
    // Reported to the server, and the Tenon escrow holds both keys regardless.
    assert_eq!(
        server.ctl_json(&["devices", "show", &id_broken])["policies"]["bitlocker"]["state"],
        json!("escrow_failed")
    );
    for (a, id) in [(&flaky, &id_flaky), (&broken, &id_broken)] {
        let read = server.ctl_json(&["recovery-keys", "show", id]);
        assert_eq!(read[0]["recovery_password"], json!(recovery_passwords(a)[0].1));
    }
    server.stop();
}

#[test]
fn agent_killed_between_escrow_attempts_still_converges() {
    let tmp = tempfile::tempdir().unwrap();
    let server = server_with_bitlocker(tmp.path());
    let mut t = Transcript::default();
    let agent = SimAgent::new(tmp.path(), "pc", device("PC-K", json!({"entra_joined": true, "entra_escrow_fails": 2})));
    let id = agent.enroll(&server, &server.enroll_token(1));

    // The service loop, killed (SIGKILL) at two points: as soon as the volume has a recovery
    // password (mid-run), and, restarted, once it has made an Entra attempt (waiting for the retry).
    let run_until = |what: &str, done: &dyn Fn(&Value) -> bool| {
        let mut child = KillOnDrop(agent_cmd(&agent, None).args(["run", "--interval", "1s"]).spawn().unwrap());
        let deadline = Instant::now() + Duration::from_secs(20);
        while !std::fs::read(&agent.device_file)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .is_some_and(|d| done(&d))
        {
            assert!(Instant::now() < deadline, "the agent never got to: {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
        child.kill().unwrap();
        child.wait().unwrap();
    };
    run_until("a recovery password", &|d| {
        d["volumes"][0]["protectors"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p["type"] == json!("recovery_password")))
    });
    run_until("an Entra attempt", &|d| d["entra_escrow_fails"].as_i64().is_some_and(|f| f < 2));

    // Later syncs (past the Entra backoff) converge: one recovery password, escrowed to both.
    let mut last = Value::Null;
    for hours in [0, 0, 7, 14, 21, 28] {
        last = sync(&agent, Some(&format!("{hours}h")), &mut t);
        if last["state"] == json!("encrypted") {
            break;
        }
    }
    assert_eq!(last["state"], json!("encrypted"), "{last:#}");
    let keys = recovery_passwords(&agent);
    assert_eq!(keys.len(), 1, "no stray recovery password after the kill: {last:#}");
    let p = last["protectors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["kind"] == json!("recovery_password"))
        .unwrap()
        .clone();
    assert_eq!((p["tenon_escrowed"].as_bool(), p["entra"].as_str()), (Some(true), Some("escrowed")));
    assert_eq!(agent.device()["entra_escrow_fails"], json!(0), "both failures were used up, none skipped");
    let read = server.ctl_json(&["recovery-keys", "show", &id]);
    for (protector, password) in &keys {
        let stored = read.as_array().unwrap().iter().find(|k| k["protector_id"] == json!(protector));
        assert_eq!(
            stored.map(|k| k["recovery_password"].clone()),
            Some(json!(password)),
            "every key on the volume is escrowed"
        );
    }
    assert_eq!(volume(&agent)["encryption"], json!("encrypted"));
    server.stop();
}

#[test]
fn escrow_key_rotation_rewraps_stored_keys_and_keeps_agents_working() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = server_with_bitlocker(tmp.path());
    let addr = server.addr.clone();
    let mut t = Transcript::default();
    let agent = SimAgent::new(tmp.path(), "pc", device("PC-R", json!({})));
    let id = agent.enroll(&server, &server.enroll_token(1));
    sync_until(&agent, "encrypted", 10, &mut t);
    let (protector, password) = recovery_passwords(&agent)[0].clone();
    let old_key = std::fs::read(data.join("keys/escrow.x25519")).unwrap();

    // Offline only: the running server holds the data-dir lock.
    let busy = common::server_command("rotate-escrow-key", &data).output().unwrap();
    assert_eq!(busy.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&busy.stderr).contains("in use by another tenon-server"));
    server.stop();
    let out = common::server_command("rotate-escrow-key", &data).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 stored recovery keys re-sealed"));
    assert!(!contains(&out.stdout, &password) && !contains(&out.stderr, &password));
    let new_key = std::fs::read(data.join("keys/escrow.x25519")).unwrap();
    assert_ne!(new_key, old_key);
    assert_eq!(std::fs::read(data.join("keys/escrow.x25519.old-1")).unwrap(), old_key);
    assert!(!data.join("keys/escrow.x25519.next").exists());

    // The server opens the re-wrapped key with the new escrow key alone: the old key file is
    // set aside, so anything sealed to the old key would now be refused.
    std::fs::rename(data.join("keys/escrow.x25519.old-1"), tmp.path().join("old-escrow-key")).unwrap();
    let server = Server::start(&data, &addr);
    let read = server.ctl_json(&["recovery-keys", "show", &id]);
    assert_eq!(read[0]["recovery_password"], json!(password));
    // The agent pinned the old key at enrollment; the server hands it the new one, signed, so the
    // rotation the read asked for is sealed to the new key and accepted.
    let s = sync(&agent, None, &mut t);
    assert!(s.get("errors").is_none(), "{s:#}");
    let new_keys = recovery_passwords(&agent);
    assert_eq!(new_keys.len(), 1, "{s:#}");
    assert_ne!(new_keys[0].0, protector, "rotated at the first sync after the read");
    let read = server.ctl_json(&["recovery-keys", "show", &id]);
    assert_eq!(read[0]["recovery_password"], json!(new_keys[0].1));
    let held = {
        let platform = tenon_agent::platform::simulated::SimulatedPlatform::open(&agent.device_file).unwrap();
        tenon_agent::vault::Vault::new(&agent.state_dir, &platform).load().unwrap().state.escrow_public_key
    };
    let new_public = tenon_core::policy::escrow::escrow_public_key(&new_key.clone().try_into().unwrap());
    use base64::Engine;
    assert_eq!(held, Some(base64::engine::general_purpose::STANDARD.encode(new_public)), "the vault holds the new key");
    server.stop();
    let log = std::fs::read_to_string(data.with_extension("server.log")).unwrap();
    assert!(log.contains("escrowed recovery keys verified"), "the start-up check ran");
    assert!(!log.contains("do NOT open"));

    // A lost escrow key: the start-up check says so (counts only), and a rotation refuses to run
    // rather than drop the keys it cannot open; restoring the key file brings everything back.
    let current = data.join("keys/escrow.x25519");
    let good_key = std::fs::read(&current).unwrap();
    std::fs::write(&current, [7u8; 32]).unwrap();
    if common::pg_base().is_some() {
        // On a shared database another escrow key may be another server's: it refuses to start
        // (on SQLite, the one server of its database starts and reports the keys that do not open).
        let out = common::server_command("serve", &data)
            .args(["--listen", &addr, "--log-format", "text"])
            .env("TENON_LOG", "off")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("another escrow key") && err.contains("copy DATA_DIR/keys/"), "{err}");
        std::fs::write(&current, &good_key).unwrap();
        let server = Server::start(&data, &addr);
        let read = server.ctl_json(&["recovery-keys", "show", &id, "--all"]);
        assert_eq!(read.as_array().unwrap().len(), 2, "the archive is intact: {read:#}");
        server.stop();
        return;
    }
    let server = Server::start(&data, &addr);
    let deadline = Instant::now() + Duration::from_secs(20);
    let log = loop {
        // The check runs in the background right after start.
        let log = std::fs::read_to_string(data.with_extension("server.log")).unwrap();
        if log.contains("do NOT open") || Instant::now() > deadline {
            break log;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    server.stop();
    assert!(common::strip_ansi(&log).contains("total=2 current=0 older_key=0 failed=2"), "{log}");
    assert!(!contains(log.as_bytes(), &new_keys[0].1));
    let out = common::server_command("rotate-escrow-key", &data).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("do not open with any escrow key"), "{out:?}");
    std::fs::remove_file(data.join("keys/escrow.x25519.next")).unwrap();
    std::fs::write(&current, &good_key).unwrap();
    let server = Server::start(&data, &addr);
    let read = server.ctl_json(&["recovery-keys", "show", &id, "--all"]);
    assert_eq!(read.as_array().unwrap().len(), 2, "the archive is intact: {read:#}");
    assert!(read.as_array().unwrap().iter().all(|k| k["error"].is_null() && k["recovery_password"].is_string()));
    server.stop();
}

#[test]
fn escrow_and_token_endpoints_refuse_bad_input() {
    use tenon_core::policy::escrow::{escrow_public_key, seal, SealRandomness};
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"), "127.0.0.1:0");
    let enrolled: Value = ureq::post(&format!("{}/api/v1/enroll", server.url))
        .send_json(json!({"token": server.enroll_token(1), "hostname": "PC", "agent_version": "t"}))
        .unwrap()
        .into_json()
        .unwrap();
    let cred = format!("Bearer {}", enrolled["credential"].as_str().unwrap());
    let id = enrolled["device_id"].as_str().unwrap().to_string();
    let escrow_pk: [u8; 32] = {
        use base64::Engine;
        let b =
            base64::engine::general_purpose::STANDARD.decode(enrolled["escrow_public_key"].as_str().unwrap()).unwrap();
        b.try_into().unwrap()
    };
    let pw = "123453-654324-000000-720885-111111-222222-333333-444444";
    let random = SealRandomness::from_bytes(&[9u8; 56]);
    let post = |body: Value| match ureq::post(&format!("{}/api/v1/device/escrow", server.url))
        .set("Authorization", &cred)
        .send_json(body)
    {
        Ok(r) => (r.status(), r.into_json::<Value>().unwrap()),
        Err(ureq::Error::Status(s, r)) => {
            assert_eq!(r.header("Content-Type"), Some("application/problem+json"));
            (s, r.into_json::<Value>().unwrap())
        }
        Err(e) => panic!("{e}"),
    };
    let good = seal(&escrow_pk, &id, "C:", "{P-1}", pw, &random).unwrap();
    let mut tampered = json!(good);
    tampered["protector_id"] = json!("{P-2}");
    let mut unknown_alg = json!(good);
    unknown_alg["alg"] = json!("rot13");
    let mut self_replace = json!(good);
    self_replace["replaces"] = json!("{P-1}");
    let mut long_mount = json!(good);
    long_mount["mount"] = json!("x".repeat(500));
    let cases: Vec<(Value, u16)> = vec![
        (json!({}), 400),
        (json!([1, 2]), 400),
        (json!(seal(&escrow_public_key(&[5; 32]), &id, "C:", "{P-1}", pw, &random).unwrap()), 400),
        (json!(seal(&escrow_pk, "someone-else", "C:", "{P-1}", pw, &random).unwrap()), 400),
        (tampered, 400),
        (unknown_alg, 400),
        (self_replace, 400),
        (long_mount, 400),
    ];
    for (body, expected) in cases {
        let (status, answer) = post(body.clone());
        assert_eq!(status, expected, "{body}: {answer}");
        assert_eq!(answer["code"], json!("bad_request"));
    }
    let (status, receipt) = post(json!(good));
    assert_eq!(status, 201, "{receipt}");
    assert_eq!(receipt["protector_id"], json!("{P-1}"));
    assert!(receipt["stored_at"].is_i64());
    let rotations: Value = ureq::get(&format!("{}/api/v1/device/escrow/rotations", server.url))
        .set("Authorization", &cred)
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(rotations["rotations"], json!([]));
    // The current escrow key, signed by the envelope-signing key the device trusts.
    assert_eq!(rotations["escrow_key"]["public_key"], enrolled["escrow_public_key"]);
    assert_eq!(rotations["escrow_key"]["signature"]["keyid"].as_str().map(str::len), Some(64));
    assert_eq!(server.ctl_json(&["recovery-keys", "show", &id])[0]["recovery_password"], json!(pw));
    let rotations: Value = ureq::get(&format!("{}/api/v1/device/escrow/rotations", server.url))
        .set("Authorization", &cred)
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(rotations["rotations"], json!(["{P-1}"]), "a read asks for rotation");
    // Unknown device: 404 for a reader, and the admin endpoint needs a known device.
    let out = server.ctl(&["recovery-keys", "show", "no-such-device"]);
    assert_eq!(out.status.code(), Some(1));

    // Admin tokens: known roles only, at least one, and only an admin may create them.
    for (args, code) in
        [(vec!["admin-tokens", "create", "x", "--role", "root"], 2), (vec!["admin-tokens", "create", "x"], 2)]
    {
        assert_eq!(server.ctl(&args).status.code(), Some(code), "{args:?}");
    }
    let bad = ureq::post(&format!("{}/api/v1/admin/tokens", server.url))
        .set("Authorization", &format!("Bearer {}", server.token))
        .send_json(json!({"name": "x", "roles": []}));
    assert!(matches!(bad, Err(ureq::Error::Status(400, _))));
    let officer = server.ctl_ok(&["admin-tokens", "create", "officer", "--role", "recovery-keys"]).trim().to_string();
    let out = server.ctl_as(&officer, &["admin-tokens", "create", "y", "--role", "admin"]);
    assert_eq!(out.status.code(), Some(1), "a recovery-keys-only token cannot mint tokens");
    assert!(String::from_utf8_lossy(&out.stderr).contains("HTTP 403"));
    let created = server.ctl_json(&["admin-tokens", "create", "both", "--role", "admin", "--role", "recovery-keys"]);
    assert_eq!(created["roles"], json!(["admin", "recovery-keys"]));

    let log = server.ctl_json(&["audit", "list"]);
    assert!(log.as_array().unwrap().iter().any(|e| e["action"] == json!("admin_token.create")
        && e["details"]["name"] == json!("officer")
        && e["actor"].as_str().unwrap().starts_with("bootstrap")));

    // Listing never shows secrets; a revoked token stops working at once; the last admin stays.
    let listed = server.ctl_json(&["admin-tokens", "list"]);
    let names: Vec<&str> = listed.as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["bootstrap", "officer", "both"]);
    let secret = officer.rsplit('.').next().unwrap();
    assert!(!listed.to_string().contains(secret));
    let officer_id = officer.split('.').nth(1).unwrap();
    server.ctl_ok(&["admin-tokens", "revoke", officer_id]);
    let out = server.ctl_as(&officer, &["recovery-keys", "show", &id]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("HTTP 401"), "{out:?}");
    let both = created["token"].as_str().unwrap();
    let bootstrap_id = server.token.split('.').nth(1).unwrap().to_string();
    assert!(server.ctl_as(both, &["admin-tokens", "revoke", &bootstrap_id]).status.success());
    let both_id = created["id"].as_str().unwrap();
    let out = server.ctl_as(both, &["admin-tokens", "revoke", both_id]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("last one with the admin role"), "{out:?}");
    let log = server.ctl_as(both, &["audit", "list", "--json"]);
    let log: Value = serde_json::from_slice(&log.stdout).unwrap();
    assert!(log
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["action"] == json!("admin_token.revoke") && e["target"] == json!(officer_id)));
    server.stop();
}
