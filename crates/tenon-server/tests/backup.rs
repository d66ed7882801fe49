//! `tenon-server backup` and `restore` against the real binaries: an online backup taken while
//! admin writes go on, a wiped data dir restored, and the fleet carrying on without re-enrolling;
//! plus the archives restore must refuse without touching the target.

mod common;

use common::{bin, Server, SimAgent};
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

fn server_cmd(args: &[&str]) -> Output {
    Command::new(bin("tenon-server")).args(args).output().unwrap()
}

fn ok(out: Output) -> String {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn bitlocker_device(hostname: &str) -> Value {
    json!({
        "hostname": hostname,
        "tpm": {"present": true, "ready": true},
        "vm": {"manufacturer": "Dell Inc.", "model": "Latitude 7440"},
        "volumes": [{"mount": "C:", "encryption": "none", "protectors": []}],
    })
}

fn recovery_password(agent: &SimAgent) -> (String, String) {
    let d = agent.device();
    let p = d["volumes"][0]["protectors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["type"] == json!("recovery_password"))
        .expect("a recovery password on the volume")
        .clone();
    (p["id"].as_str().unwrap().to_string(), p["numerical_password"].as_str().unwrap().to_string())
}

#[test]
fn an_online_backup_restores_a_server_the_fleet_keeps_using() {
    if common::sqlite_only("the backup archive holds a snapshot of the SQLite file DATA_DIR/tenon.db") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = Server::start(&data, "127.0.0.1:0");
    let addr = server.addr.clone();
    server.ctl_ok(&["settings", "set", "--tenant", "Policies.RequireSecurityFeatures.BitlockerEnabled", "true"]);
    let token = server.enroll_token(2);
    let a = SimAgent::new(tmp.path(), "a", bitlocker_device("PC-A"));
    let b = SimAgent::new(tmp.path(), "b", json!({"hostname": "PC-B"}));
    let id_a = a.enroll(&server, &token);
    let id_b = b.enroll(&server, &token);
    // A escrows its recovery key (a few syncs walk the volume to encrypted).
    for _ in 0..4 {
        a.ok(&["sync", "--once"]);
    }
    b.ok(&["sync", "--once"]);
    let (protector, password) = recovery_password(&a);

    // Back up while an administrator keeps writing.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, url, tok) = (stop.clone(), server.url.clone(), server.token.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let out = Command::new(bin("tenonctl"))
                    .args(["--server", &url, "--token", &tok, "settings", "set", "--tenant", "Custom.Counter"])
                    .arg(n.to_string())
                    .output()
                    .unwrap();
                assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            }
            n
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(300));
    let archive = tmp.path().join("tenon.backup");
    let printed = ok(server_cmd(&["backup", "--data-dir", path(&data), "--to", path(&archive)]));
    assert!(printed.contains("backup written to"), "{printed}");
    stop.store(true, Ordering::SeqCst);
    let writes = writer.join().unwrap();
    assert!(writes > 1, "the backup ran while writes went on ({writes} writes)");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&archive).unwrap().permissions().mode() & 0o777, 0o600);
    }
    // A backup never overwrites.
    assert_eq!(server_cmd(&["backup", "--data-dir", path(&data), "--to", path(&archive)]).status.code(), Some(1));

    // The agents move on past what the backup holds.
    a.ok(&["sync", "--once"]);
    b.ok(&["sync", "--once"]);
    let held_a = a.status()["config_version"].as_u64().unwrap();
    let held_b = b.status()["config_version"].as_u64().unwrap();
    server.stop();

    // Disaster: the data dir is gone. Restore refuses a non-empty target, then restores.
    std::fs::remove_dir_all(&data).unwrap();
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("stray"), "x").unwrap();
    let out = server_cmd(&["restore", "--from", path(&archive), "--data-dir", path(&data)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not empty"));
    assert_eq!(std::fs::read_to_string(data.join("stray")).unwrap(), "x", "the target was left as it was");
    std::fs::remove_dir_all(&data).unwrap();
    ok(server_cmd(&["restore", "--from", path(&archive), "--data-dir", path(&data)]));

    // The same server comes back: agents sync without re-enrolling, versions never go down.
    let server = Server::start(&data, &addr);
    for (agent, held) in [(&a, held_a), (&b, held_b)] {
        // The first sync may be refused as a rollback (the backup is older than what the device
        // holds); the device shows its envelope and the next sync continues above it.
        let _ = agent.run(&["sync", "--once"]);
        agent.ok(&["sync", "--once"]);
        let s = agent.status();
        assert_eq!(s["last_error"], json!(null), "{s}");
        assert!(s["config_version"].as_u64().unwrap() >= held, "version went down: {s}");
    }
    let ids: Vec<String> = server
        .ctl_json(&["devices", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_string())
        .collect();
    assert!(ids.contains(&id_a) && ids.contains(&id_b) && ids.len() == 2, "{ids:?}");
    let keys = server.ctl_json(&["recovery-keys", "show", &id_a]);
    assert!(
        keys.as_array()
            .unwrap()
            .iter()
            .any(|k| k["protector_id"] == json!(protector) && k["recovery_password"] == json!(password)),
        "the escrowed key reads back: {keys}"
    );
    server.stop();
}

#[test]
fn restore_refuses_damaged_sealed_and_foreign_archives_without_touching_the_target() {
    if common::sqlite_only("backup and restore archive the SQLite file DATA_DIR/tenon.db") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = Server::start(&data, "127.0.0.1:0");
    server.stop();
    let pass = tmp.path().join("pass");
    std::fs::write(&pass, "correct horse battery staple\n").unwrap();
    let short = tmp.path().join("short");
    std::fs::write(&short, "short").unwrap();
    let sealed = tmp.path().join("sealed.backup");
    let out =
        server_cmd(&["backup", "--data-dir", path(&data), "--to", path(&sealed), "--passphrase-file", path(&short)]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("shorter than 12"), "{out:?}");
    ok(server_cmd(&["backup", "--data-dir", path(&data), "--to", path(&sealed), "--passphrase-file", path(&pass)]));
    // Sealed: the signing key is not in the archive in the clear.
    let signing = std::fs::read(data.join("keys/signing-1.ed25519")).unwrap();
    let raw = std::fs::read(&sealed).unwrap();
    assert!(!raw.windows(signing.len()).any(|w| w == signing.as_slice()));

    let target = tmp.path().join("restored");
    let restore = |from: &Path, extra: &[&str]| {
        let mut args = vec!["restore", "--from", path(from), "--data-dir", path(&target)];
        args.extend_from_slice(extra);
        server_cmd(&args)
    };
    let refused = |out: Output, why: &str| {
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains(why), "{why}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(!target.exists(), "a refused restore leaves nothing behind");
    };
    refused(restore(&sealed, &[]), "--passphrase-file");
    let wrong = tmp.path().join("wrong");
    std::fs::write(&wrong, "not the passphrase at all").unwrap();
    refused(restore(&sealed, &["--passphrase-file", path(&wrong)]), "does not open");

    // Truncated anywhere: refused.
    for cut in [100, raw.len() / 2, raw.len() - 1100] {
        let t = tmp.path().join(format!("cut-{cut}"));
        std::fs::write(&t, &raw[..cut]).unwrap();
        let out = restore(&t, &["--passphrase-file", path(&pass)]);
        assert_eq!(out.status.code(), Some(1), "cut at {cut}: {out:?}");
        assert!(!target.exists());
    }
    // From a newer version: refused.
    let newer = tmp.path().join("newer.backup");
    {
        let mut src = tar::Archive::new(std::fs::File::open(&sealed).unwrap());
        let mut dst = tar::Builder::new(std::fs::File::create(&newer).unwrap());
        for e in src.entries().unwrap() {
            let mut e = e.unwrap();
            let name = e.path().unwrap().to_string_lossy().into_owned();
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut bytes).unwrap();
            if name == "tenon-backup.json" {
                let mut m: Value = serde_json::from_slice(&bytes).unwrap();
                m["schema_version"] = json!(99_999_999_999i64);
                bytes = serde_json::to_vec(&m).unwrap();
            }
            let mut h = tar::Header::new_gnu();
            h.set_size(bytes.len() as u64);
            h.set_mode(0o600);
            h.set_cksum();
            dst.append_data(&mut h, name, bytes.as_slice()).unwrap();
        }
        dst.finish().unwrap();
    }
    refused(restore(&newer, &["--passphrase-file", path(&pass)]), "schema version");
    refused(restore(&tmp.path().join("pass"), &[]), "not");

    // The real passphrase restores a server that starts with the same keys.
    ok(restore(&sealed, &["--passphrase-file", path(&pass)]));
    assert_eq!(std::fs::read(target.join("keys/signing-1.ed25519")).unwrap(), signing);
    let server = Server::start(&target, "127.0.0.1:0");
    assert!(server.ctl(&["devices", "list"]).status.success());
    server.stop();
}

#[test]
fn package_content_travels_with_the_backup_unless_left_out() {
    if common::sqlite_only("the backup archive holds a snapshot of the SQLite file DATA_DIR/tenon.db") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = Server::start(&data, "127.0.0.1:0");
    let addr = server.addr.clone();
    let exe = tmp.path().join("tool-setup.exe");
    let installer = b"MZ an installer only this test uploads".to_vec();
    std::fs::write(&exe, &installer).unwrap();
    server.ctl_ok(&[
        "packages",
        "upload",
        path(&exe),
        "--name",
        "Tool",
        "--version",
        "1",
        "--detect",
        r"file:C:\Tool\t.exe",
    ]);
    let content: Vec<std::path::PathBuf> =
        std::fs::read_dir(data.join("packages/content")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(content.len(), 1, "{content:?}");
    let sha = content[0].file_name().unwrap().to_str().unwrap().to_string();

    let with = tmp.path().join("with.backup");
    let printed = ok(server_cmd(&["backup", "--data-dir", path(&data), "--to", path(&with)]));
    assert!(printed.contains(&format!("1 package content files, {} bytes", installer.len())), "{printed}");
    let without = tmp.path().join("without.backup");
    let printed = ok(server_cmd(&["backup", "--data-dir", path(&data), "--to", path(&without), "--without-packages"]));
    assert!(printed.contains("package content left out (--without-packages)"), "{printed}");
    let out = server_cmd(&[
        "backup",
        "--data-dir",
        path(&data),
        "--to",
        path(&tmp.path().join("x")),
        "--without-packages",
        "--package-dir",
        path(&data.join("packages")),
    ]);
    assert_eq!(out.status.code(), Some(2), "the two flags contradict each other");
    server.stop();

    // Left out: the restored data dir has no content.
    let bare = tmp.path().join("bare");
    ok(server_cmd(&["restore", "--from", path(&without), "--data-dir", path(&bare)]));
    assert!(!bare.join("packages/content").join(&sha).exists());

    // Carried: restored under its hash, owner-only, and a device installs from it.
    std::fs::remove_dir_all(&data).unwrap();
    ok(server_cmd(&["restore", "--from", path(&with), "--data-dir", path(&data)]));
    let restored = data.join("packages/content").join(&sha);
    assert_eq!(std::fs::read(&restored).unwrap(), installer);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(data.join("packages/content")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }
    let server = Server::start(&data, &addr);
    server.ctl_ok(&["packages", "assign", "Tool", "--tenant", "--wait"]);
    let agent = SimAgent::new(tmp.path(), "a", json!({"hostname": "PC-A", "signed_in_users": ["anna@contoso.com"]}));
    let id = agent.enroll(&server, &server.enroll_token(1));
    for _ in 0..3 {
        agent.ok(&["sync", "--once"]);
    }
    let state = server.ctl_json(&["devices", "show", &id])["packages"]["Tool"].clone();
    assert_eq!(state["state"], json!("installed"), "{state}");
    server.stop();
}
