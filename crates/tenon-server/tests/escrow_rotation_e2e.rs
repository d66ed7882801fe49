//! Recovery-key rotation under fire and forged escrow uploads, end to end: the real server,
//! tenonctl and agents on simulated devices. An administrator reads the key, the agent's sync is
//! killed (SIGKILL) at a random point, then it syncs normally; after 100 such cycles every key an
//! administrator read is gone from the volume, the one key left is escrowed and opens, and the
//! server never called a rotation complete while the old protector was still on the volume. And a
//! forged upload under the device's real protector id is kept beside the real key and flagged.

mod common;

use common::{Server, SimAgent};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::process::Stdio;
use std::time::{Duration, Instant};

const ENABLED: &str = "Policies.RequireSecurityFeatures.BitlockerEnabled";

fn device(hostname: &str) -> Value {
    json!({
        "hostname": hostname,
        "tpm": {"present": true, "ready": true},
        "vm": {"manufacturer": "Dell Inc.", "model": "Latitude 7440"},
        "volumes": [{"mount": "C:", "encryption": "none", "protectors": []}],
    })
}

/// (protector id, numerical password) of each recovery password on the simulated volume.
fn recovery_passwords(agent: &SimAgent) -> Vec<(String, String)> {
    agent.device()["volumes"][0]["protectors"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"] == json!("recovery_password"))
        .map(|p| (p["id"].as_str().unwrap().to_string(), p["numerical_password"].as_str().unwrap().to_string()))
        .collect()
}

fn sync(agent: &SimAgent) -> Value {
    let out = agent.run(&["sync", "--once"]);
    assert!(out.status.success(), "sync failed: {}", String::from_utf8_lossy(&out.stderr));
    agent.status()["policies"]["bitlocker"].clone()
}

/// A small deterministic generator (xorshift), so a failing run can be repeated with its seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
fn rotation_survives_100_kills_at_random_points() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"), "127.0.0.1:0");
    server.ctl_ok(&["settings", "set", "--tenant", ENABLED, "true"]);
    let agent = SimAgent::new(tmp.path(), "pc", device("PC-KILL"));
    let id = agent.enroll(&server, &server.enroll_token(1));
    for _ in 0..10 {
        if sync(&agent)["state"] == json!("encrypted") {
            break;
        }
    }
    assert_eq!(agent.device()["volumes"][0]["encryption"], json!("encrypted"));

    // Kill points spread over a whole sync of this build on this machine (the issue saw 0-60 ms
    // on its own): the fastest of three syncs that rotate a key is the measure (the machine may
    // be busy, and a busy machine only moves kills earlier into the sync).
    let mut fastest = u64::MAX;
    for _ in 0..3 {
        server.ctl_json(&["recovery-keys", "show", &id]);
        let t = Instant::now();
        let out = agent.run(&["sync", "--once"]);
        assert!(out.status.success());
        fastest = fastest.min(t.elapsed().as_millis() as u64);
    }
    let sync_ms = fastest.clamp(20, 2000);
    let seed = std::env::var("TENON_KILL_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed_1234_u64);
    eprintln!("kill delays 0..={sync_ms} ms from seed {seed} (TENON_KILL_SEED)");
    let mut rng = Rng(seed);
    // Where the kills landed: before the rotation's add, between the add and the delete, after it.
    let (mut before_add, mut mid_rotation, mut after_delete) = (0, 0, 0);
    let mut read_passwords: BTreeSet<String> = BTreeSet::new();
    let mut most_on_volume = 0;
    let mut killed_mid_run = 0;
    let started = Instant::now();
    // Checks what the server says against the volume, with the agent stopped: every key the
    // server no longer calls current (retired, superseded: its rotation completed) is gone from
    // the volume. Reading them is an administrator's read, which asks for rotation of the current ones.
    let read_and_check = |read: &mut BTreeSet<String>, when: &str| {
        let keys = server.ctl_json(&["recovery-keys", "show", &id, "--all"]);
        let on_volume: Vec<String> = recovery_passwords(&agent).into_iter().map(|(p, _)| p).collect();
        for k in keys.as_array().unwrap() {
            let protector = k["protector_id"].as_str().unwrap().to_string();
            assert!(k["error"].is_null() && k["conflict"] == json!(false), "{when}: {k:#}");
            read.insert(k["recovery_password"].as_str().unwrap().to_string());
            if !k["retired_at"].is_null() || !k["superseded_by"].is_null() {
                assert!(
                    !on_volume.contains(&protector),
                    "{when}: the server completed the rotation of {protector} while it is still on the volume"
                );
            }
        }
    };
    // Each cycle: an administrator reads the current key; the sync rotating it is killed; the
    // server is checked against the volume (its whole archive read, which asks for rotation of the
    // current keys again); normal syncs converge.
    for cycle in 0..100 {
        for k in server.ctl_json(&["recovery-keys", "show", &id]).as_array().unwrap() {
            read_passwords.insert(k["recovery_password"].as_str().unwrap().to_string());
        }
        let old: Vec<String> = recovery_passwords(&agent).into_iter().map(|(p, _)| p).collect();
        let delay = rng.below(sync_ms + 1);
        let mut child = agent.command(&["sync", "--once"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(delay));
        if child.try_wait().unwrap().is_none() {
            killed_mid_run += 1;
        }
        child.kill().unwrap();
        child.wait().unwrap();
        let after: Vec<String> = recovery_passwords(&agent).into_iter().map(|(p, _)| p).collect();
        most_on_volume = most_on_volume.max(after.len());
        match (after.iter().any(|p| old.contains(p)), after.iter().any(|p| !old.contains(p))) {
            (true, false) => before_add += 1,
            (true, true) => mid_rotation += 1,
            _ => after_delete += 1,
        }
        read_and_check(&mut read_passwords, &format!("cycle {cycle}, killed after {delay} ms"));
        // Normal syncs finish the rotation.
        let mut converged = false;
        for _ in 0..3 {
            let out = agent.run(&["sync", "--once"]);
            assert!(out.status.success(), "sync failed: {}", String::from_utf8_lossy(&out.stderr));
            let keys = recovery_passwords(&agent);
            most_on_volume = most_on_volume.max(keys.len());
            if keys.len() == 1 && !read_passwords.contains(&keys[0].1) {
                converged = true;
                break;
            }
        }
        assert!(
            converged,
            "cycle {cycle} (killed after {delay} ms) did not converge: {:?}",
            recovery_passwords(&agent)
        );
    }
    eprintln!(
        "100 kill cycles in {:.1} s ({killed_mid_run} killed mid-sync: {before_add} before the add, {mid_rotation} between add and delete, {after_delete} after the delete); at most {most_on_volume} recovery passwords on the volume at once; {} passwords read",
        started.elapsed().as_secs_f64(),
        read_passwords.len()
    );
    assert!(killed_mid_run >= 30, "kills landed inside a sync: {killed_mid_run}");
    assert!(
        before_add >= 5 && mid_rotation >= 5 && after_delete >= 2,
        "the kills landed all over the rotation: {before_add} / {mid_rotation} / {after_delete}"
    );

    // Every password an administrator read is gone from the volume; exactly one numerical
    // password remains, escrowed: the server's current key for it opens to the volume's password.
    let keys = recovery_passwords(&agent);
    assert_eq!(keys.len(), 1, "exactly one numerical-password protector: {keys:?}");
    for (_, pw) in &keys {
        assert!(!read_passwords.contains(pw), "a password an administrator read is still on the volume");
    }
    let current = server.ctl_json(&["recovery-keys", "show", &id]);
    let current = current.as_array().unwrap();
    assert_eq!(current.len(), 1, "the server's current keys are the volume's: {current:#?}");
    assert_eq!(current[0]["protector_id"], json!(keys[0].0));
    assert_eq!(current[0]["recovery_password"], json!(keys[0].1));
    assert_eq!(agent.device()["volumes"][0]["encryption"], json!("encrypted"), "never decrypted");
    assert!(most_on_volume <= 3, "the volume never collected keys: at most {most_on_volume}");
    server.stop();
}

/// The device credential and escrow key of a freshly enrolled, encrypted simulated device.
struct Enrolled {
    credential: String,
    escrow_public: [u8; 32],
}

fn enrolled_credential(agent: &SimAgent) -> Enrolled {
    use base64::Engine;
    let platform = tenon_agent::platform::simulated::SimulatedPlatform::open(&agent.device_file).unwrap();
    let state = tenon_agent::vault::Vault::new(&agent.state_dir, &platform).load().unwrap().state;
    let pk = base64::engine::general_purpose::STANDARD.decode(state.escrow_public_key.unwrap()).unwrap();
    Enrolled { credential: format!("Bearer {}", state.credential), escrow_public: pk.try_into().unwrap() }
}

fn post(server: &Server, cred: &str, path: &str, body: Value) -> (u16, Value) {
    match ureq::post(&format!("{}/api/v1/device/{path}", server.url)).set("Authorization", cred).send_json(body) {
        Ok(r) => (r.status(), r.into_json().unwrap()),
        Err(ureq::Error::Status(s, r)) => (s, r.into_json().unwrap()),
        Err(e) => panic!("{e}"),
    }
}

fn rotations(server: &Server, cred: &str) -> Value {
    ureq::get(&format!("{}/api/v1/device/escrow/rotations", server.url))
        .set("Authorization", cred)
        .call()
        .unwrap()
        .into_json()
        .unwrap()
}

#[test]
fn forged_escrow_is_kept_beside_the_real_key_and_flagged() {
    use tenon_core::policy::escrow::{seal, SealRandomness};
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"), "127.0.0.1:0");
    server.ctl_ok(&["settings", "set", "--tenant", ENABLED, "true"]);
    let agent = SimAgent::new(tmp.path(), "pc", device("PC-FORGE"));
    let id = agent.enroll(&server, &server.enroll_token(1));
    for _ in 0..10 {
        if sync(&agent)["state"] == json!("encrypted") {
            break;
        }
    }
    let (protector, real) = recovery_passwords(&agent).remove(0);
    let dev = enrolled_credential(&agent);
    let audit_count = |action: &str| {
        let log = server.ctl_json(&["audit", "list"]);
        log.as_array().unwrap().iter().filter(|e| e["action"] == json!(action)).count()
    };
    let escrows_before = audit_count("recovery_key.escrow");

    // The real key uploaded again (a receipt lost to a crash): idempotent, nothing new.
    let again = seal(&dev.escrow_public, &id, "C:", &protector, &real, &SealRandomness::from_bytes(&[3; 56])).unwrap();
    let (status, receipt) = post(&server, &dev.credential, "escrow", json!(again));
    assert_eq!(status, 201, "{receipt}");
    assert_eq!(receipt["protector_id"], json!(protector));
    assert!(receipt.get("conflict").is_none(), "{receipt}");
    assert_eq!(audit_count("recovery_key.escrow"), escrows_before, "no new row, no new escrow event");
    assert_eq!(audit_count("recovery_key.escrow_conflict"), 0);

    // A made-up password under the real protector id, with the device's credential.
    let forged = "111111-222222-333333-444444-555555-666666-000000-000011";
    let sealed =
        seal(&dev.escrow_public, &id, "C:", &protector, forged, &SealRandomness::from_bytes(&[4; 56])).unwrap();
    let (status, receipt) = post(&server, &dev.credential, "escrow", json!(sealed));
    assert_eq!(status, 201, "{receipt}");
    assert_eq!(receipt["conflict"], json!(true));

    // The device's escrow status says so: the rotation check lists the conflict, and the agent
    // reports it in its BitLocker status (devices show).
    assert_eq!(rotations(&server, &dev.credential)["conflicts"], json!([protector]));
    let st = sync(&agent);
    assert_eq!(st["escrow_conflicts"], json!([protector]), "{st:#}");
    let shown = server.ctl_json(&["devices", "show", &id]);
    let bl = &shown["policies"]["bitlocker"];
    assert_eq!(bl["escrow_conflicts"], json!([protector]), "{bl:#}");
    assert!(bl["escrow_warning"].as_str().unwrap().contains(&protector), "{bl:#}");
    let human = String::from_utf8_lossy(&server.ctl(&["devices", "show", &id]).stdout).to_string();
    assert!(human.contains("WARNING: the Tenon server holds more than one"), "{human}");

    // recovery-keys show lists both, flagged, with a warning (JSON and table).
    let shown = server.ctl_json(&["recovery-keys", "show", &id]);
    let shown = shown.as_array().unwrap();
    assert_eq!(shown.len(), 2, "{shown:#?}");
    let passwords: BTreeSet<&str> = shown.iter().map(|k| k["recovery_password"].as_str().unwrap()).collect();
    assert_eq!(passwords, BTreeSet::from([real.as_str(), forged]));
    for k in shown {
        assert_eq!(k["protector_id"], json!(protector));
        assert_eq!(k["conflict"], json!(true));
        assert!(k["warning"].as_str().unwrap().contains("more than one different recovery password"), "{k}");
    }
    let table = server.ctl(&["recovery-keys", "show", &id]);
    let text = String::from_utf8_lossy(&table.stdout).to_string();
    assert!(text.contains(&real) && text.contains(forged), "{text}");
    assert!(text.contains(&format!("WARNING: protector {protector}")), "{text}");
    // Audited, by protector id only.
    let log = server.ctl_json(&["audit", "list"]);
    let conflicts: Vec<&Value> =
        log.as_array().unwrap().iter().filter(|e| e["action"] == json!("recovery_key.escrow_conflict")).collect();
    assert_eq!(conflicts.len(), 1, "{log:#}");
    assert_eq!(conflicts[0]["target"], json!(id));
    assert_eq!(conflicts[0]["details"]["protector_id"], json!(protector));
    assert!(!log.to_string().contains(forged) && !log.to_string().contains(&real));
    // The real key and the same forgery again are idempotent too: no third row (nor from the
    // first re-upload), no second conflict event.
    for again in [json!(again), json!(sealed)] {
        assert_eq!(post(&server, &dev.credential, "escrow", again).0, 201);
    }
    assert_eq!(server.ctl_json(&["recovery-keys", "show", &id, "--all"]).as_array().unwrap().len(), 2);
    assert_eq!(audit_count("recovery_key.escrow_conflict"), 1);

    // The read asked for a rotation: the device replaces the protector, so the conflict ends with
    // it. The current key is the new one alone; the archive keeps both flagged rows.
    let st = sync(&agent);
    assert!(st.get("escrow_conflicts").is_none(), "{st:#}");
    let (new_protector, new_password) = recovery_passwords(&agent).remove(0);
    assert_ne!(new_protector, protector);
    let shown = server.ctl_json(&["recovery-keys", "show", &id]);
    assert_eq!(shown.as_array().unwrap().len(), 1, "{shown:#}");
    assert_eq!((&shown[0]["recovery_password"], &shown[0]["conflict"]), (&json!(new_password), &json!(false)));
    assert_eq!(rotations(&server, &dev.credential)["conflicts"], json!([]));
    let all = server.ctl_json(&["recovery-keys", "show", &id, "--all"]);
    assert_eq!(all.as_array().unwrap().iter().filter(|k| k["conflict"] == json!(true)).count(), 2);
    server.stop();
}

#[test]
fn a_rotation_completes_only_when_the_device_reports_the_old_protector_gone() {
    use tenon_core::policy::escrow::{seal, SealRandomness};
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"), "127.0.0.1:0");
    let enrolled: Value = ureq::post(&format!("{}/api/v1/enroll", server.url))
        .send_json(json!({"token": server.enroll_token(1), "hostname": "PC", "agent_version": "t"}))
        .unwrap()
        .into_json()
        .unwrap();
    let cred = format!("Bearer {}", enrolled["credential"].as_str().unwrap());
    let id = enrolled["device_id"].as_str().unwrap().to_string();
    let pk: [u8; 32] = {
        use base64::Engine;
        let b =
            base64::engine::general_purpose::STANDARD.decode(enrolled["escrow_public_key"].as_str().unwrap()).unwrap();
        b.try_into().unwrap()
    };
    let old_pw = "123453-654324-000000-720885-111111-222222-333333-444444";
    let new_pw = "000000-111111-222222-333333-444444-555555-666666-000000";
    let old = seal(&pk, &id, "C:", "{OLD}", old_pw, &SealRandomness::from_bytes(&[1; 56])).unwrap();
    assert_eq!(post(&server, &cred, "escrow", json!(old)).0, 201);
    server.ctl_json(&["recovery-keys", "show", &id]);
    assert_eq!(rotations(&server, &cred)["rotations"], json!(["{OLD}"]), "the read asks for a rotation");

    // The new key arrives (replacing the old): the old protector is still on the volume, so the
    // rotation stays open and the old key stays current.
    let mut new = json!(seal(&pk, &id, "C:", "{NEW}", new_pw, &SealRandomness::from_bytes(&[2; 56])).unwrap());
    new["replaces"] = json!("{OLD}");
    assert_eq!(post(&server, &cred, "escrow", new).0, 201);
    assert_eq!(rotations(&server, &cred)["rotations"], json!(["{OLD}"]), "not complete on the upload");
    let current = server.ctl_json(&["recovery-keys", "show", &id]);
    let ids: BTreeSet<&str> = current.as_array().unwrap().iter().map(|k| k["protector_id"].as_str().unwrap()).collect();
    assert_eq!(ids, BTreeSet::from(["{OLD}", "{NEW}"]), "both open the volume until the old one is gone");

    // Bad reports are refused.
    for body in [json!({}), json!({"protector_id": ""}), json!({"protector_id": "{NEW}", "replaced_by": "{NEW}"})] {
        let (status, answer) = post(&server, &cred, "escrow/retired", body.clone());
        assert_eq!((status, answer["code"].as_str()), (400, Some("bad_request")), "{body}");
    }
    // The device reports the old protector gone: now it is complete, and repeating it is harmless.
    let (status, answer) =
        post(&server, &cred, "escrow/retired", json!({"protector_id": "{OLD}", "replaced_by": "{NEW}"}));
    assert_eq!((status, answer["rotation_completed"].as_bool()), (200, Some(true)), "{answer}");
    let (status, answer) =
        post(&server, &cred, "escrow/retired", json!({"protector_id": "{OLD}", "replaced_by": "{NEW}"}));
    assert_eq!((status, answer["rotation_completed"].as_bool()), (200, Some(false)), "{answer}");
    // {NEW} was read above, so its own rotation is what remains open.
    assert_eq!(rotations(&server, &cred)["rotations"], json!(["{NEW}"]));
    let all = server.ctl_json(&["recovery-keys", "show", &id, "--all"]);
    let old_row = all.as_array().unwrap().iter().find(|k| k["protector_id"] == json!("{OLD}")).unwrap();
    assert_eq!(old_row["superseded_by"], json!("{NEW}"));
    assert!(old_row["retired_at"].is_string());
    let current = server.ctl_json(&["recovery-keys", "show", &id]);
    assert_eq!(current.as_array().unwrap().len(), 1);
    assert_eq!(current[0]["protector_id"], json!("{NEW}"));
    let log = server.ctl_json(&["audit", "list"]);
    assert!(log.as_array().unwrap().iter().any(|e| e["action"] == json!("recovery_key.retired")
        && e["details"]["protector_id"] == json!("{OLD}")
        && e["details"]["rotation_completed"] == json!(true)));

    // A credential spamming different passwords for one protector cannot grow the archive without
    // bound: eight different ones are kept (all flagged), the next is refused with 409.
    use tenon_core::policy::escrow::recovery_password_from_key;
    for i in 1..=8u8 {
        let pw = recovery_password_from_key(&[i; 16]);
        let sealed = seal(&pk, &id, "C:", "{NEW}", &pw, &SealRandomness::from_bytes(&[i; 56])).unwrap();
        let (status, answer) = post(&server, &cred, "escrow", json!(sealed));
        if i < 8 {
            assert_eq!((status, answer["conflict"].as_bool()), (201, Some(true)), "{i}: {answer}");
        } else {
            assert_eq!((status, answer["code"].as_str()), (409, Some("conflict")), "{answer}");
        }
    }
    let current = server.ctl_json(&["recovery-keys", "show", &id]);
    assert_eq!(current.as_array().unwrap().len(), 8, "{current:#}");
    assert!(current.as_array().unwrap().iter().all(|k| k["conflict"] == json!(true)));
    server.stop();
}
