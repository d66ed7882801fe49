//! Several servers, one PostgreSQL database (the postgres stage of scripts/test runs these; on
//! SQLite alone they say why they skip): any server answers any device, a write on one reaches
//! the others' check-ins within a second, versions never go down or carry two payloads, the
//! jobs move when their server dies, and a database that goes away and comes back.
mod common;

use common::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The base URL of the cluster, or None (and a line saying so) on the SQLite stage.
fn postgres(test: &str) -> Option<String> {
    let base = pg_base();
    if base.is_none() {
        eprintln!("SKIPPED on SQLite: {test} needs PostgreSQL (it runs in the postgres stage of scripts/test)");
    }
    base
}

/// A name no other test of this run uses (process id, time and a counter).
fn unique() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("{}_{nanos}_{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// A fresh database on the cluster.
fn fresh_database(base: &str) -> String {
    let name = format!("scale_{}", unique());
    psql(&format!("{base}/postgres"), &format!("CREATE DATABASE \"{name}\""));
    format!("{base}/{name}")
}

/// A data dir holding `from`'s keys and admin token: a second server of the same database.
fn same_keys(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    let status = Command::new("cp").arg("-a").arg(from.join("keys")).arg(to).status().unwrap();
    assert!(status.success());
    std::fs::copy(from.join("admin.token"), to.join("admin.token")).unwrap();
}

fn server_on(dir: &Path, url: &str) -> Server {
    Server::start_with(dir, "127.0.0.1:0", &["--database", url])
}

/// The device's credential and id, from its vault.
fn credential(agent: &SimAgent) -> (String, String) {
    let platform = tenon_agent::platform::simulated::SimulatedPlatform::open(&agent.device_file).unwrap();
    let state = tenon_agent::vault::Vault::new(&agent.state_dir, &platform).load().unwrap().state;
    (state.device_id, state.credential)
}

/// One check-in as the device: status and ETag.
fn check_in(server: &Server, cred: &str) -> (u16, String) {
    let r = server
        .http()
        .get(&format!("{}/api/v1/device/config", server.url))
        .set("Authorization", &format!("Bearer {cred}"))
        .call();
    match r {
        Ok(r) => (r.status(), r.header("etag").unwrap_or_default().to_string()),
        Err(ureq::Error::Status(code, r)) => (code, r.header("etag").unwrap_or_default().to_string()),
        Err(e) => panic!("check-in failed: {e}"),
    }
}

fn version_of(etag: &str) -> u64 {
    etag.trim_matches('"').split('-').next().and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("ETag {etag:?}"))
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    started.elapsed()
}

fn status(server: &Server) -> Value {
    server.ctl_json(&["server", "status"])
}

#[test]
fn two_servers_serve_one_fleet_and_agree_on_every_version() {
    let Some(base) = postgres("two_servers_serve_one_fleet") else { return };
    let url = fresh_database(&base);
    let root = tempfile::tempdir().unwrap();
    let a = server_on(&root.path().join("a"), &url);
    same_keys(&a.data_dir, &root.path().join("b"));
    let b = server_on(&root.path().join("b"), &url);
    assert_eq!(status(&a)["store"], "postgres");

    // Enrolled through B; A knows it in memory (its check-in index) within a second.
    let agent = SimAgent::new(root.path(), "pc1", json!({"hostname": "PC1"}));
    agent.enroll(&b, &a.enroll_token(5));
    agent.ok(&["sync", "--once"]);
    let (id, cred) = credential(&agent);
    let took = wait_for("A sees B's enrollment", Duration::from_secs(1), || check_in(&a, &cred).0 == 200);
    eprintln!("enrollment on B reached A's check-ins in {took:?}");

    // A setting written on A reaches B's check-in within a second of its answer.
    let (_, before) = check_in(&b, &cred);
    a.ctl_ok(&["settings", "set", "--tenant", "Custom.Wave", "\"one\""]);
    let took = wait_for("B serves A's change", Duration::from_secs(1), || check_in(&b, &cred).1 != before);
    eprintln!("a change on A reached B's check-ins in {took:?}");
    agent.ok(&["sync", "--once"]);
    assert_eq!(agent.held_payload()["machine"]["Custom"]["Wave"], json!("one"));

    // Both servers write at once, 15 changes each. Seen from either server, the version never
    // goes down, and one version always carries one payload.
    let mut seen: std::collections::BTreeMap<u64, String> = Default::default();
    let writers: Vec<_> = [(&a, "A"), (&b, "B")]
        .into_iter()
        .map(|(s, name)| {
            let (url, token) = (s.url.clone(), s.token.clone());
            std::thread::spawn(move || {
                for i in 0..15 {
                    let out = Command::new(bin("tenonctl"))
                        .args(["--server", &url, "--token", &token, "settings", "set", "--tenant"])
                        .arg(format!("Custom.From{name}"))
                        .arg(format!("{i}"))
                        .output()
                        .unwrap();
                    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
                }
            })
        })
        .collect();
    let mut last = [0u64; 2];
    while writers.iter().any(|w| !w.is_finished()) {
        for (k, s) in [&a, &b].into_iter().enumerate() {
            let (code, etag) = check_in(s, &cred);
            assert_eq!(code, 200);
            let v = version_of(&etag);
            assert!(v >= last[k], "server {k}'s version went down: {} -> {v}", last[k]);
            last[k] = v;
            let prior = seen.entry(v).or_insert_with(|| etag.clone());
            assert_eq!(*prior, etag, "version {v} was issued with two payloads");
        }
    }
    writers.into_iter().for_each(|w| w.join().unwrap());
    // Both end on the same envelope, which holds both servers' last writes.
    wait_for("both servers agree", Duration::from_secs(2), || check_in(&a, &cred).1 == check_in(&b, &cred).1);
    agent.ok(&["sync", "--once"]);
    let payload = agent.held_payload();
    assert_eq!(payload["machine"]["Custom"]["FromA"], json!(14), "{payload}");
    assert_eq!(payload["machine"]["Custom"]["FromB"], json!(14), "{payload}");
    assert_eq!(
        a.ctl_json(&["devices", "show", &id])["config_version"],
        b.ctl_json(&["devices", "show", &id])["config_version"]
    );

    // Decommissioned on B: A refuses the device within a second.
    b.ctl_ok(&["devices", "decommission", &id]);
    wait_for("A refuses the decommissioned device", Duration::from_secs(1), || check_in(&a, &cred).0 == 410);
}

#[test]
fn the_jobs_move_when_their_server_dies_and_the_other_keeps_serving() {
    let Some(base) = postgres("the_jobs_move_when_their_server_dies") else { return };
    let url = fresh_database(&base);
    let root = tempfile::tempdir().unwrap();
    let mut a = server_on(&root.path().join("a"), &url);
    same_keys(&a.data_dir, &root.path().join("b"));
    let b = server_on(&root.path().join("b"), &url);
    wait_for("one server runs the jobs", Duration::from_secs(8), || status(&a)["runs_jobs"] == json!(true));
    assert_eq!(status(&b)["runs_jobs"], json!(false), "one server at a time");

    let agent = SimAgent::new(root.path(), "pc1", json!({"hostname": "PC1"}));
    agent.enroll(&a, &a.enroll_token(5));
    let (_, cred) = credential(&agent);
    a.ctl_ok(&["settings", "set", "--tenant", "Custom.Before", "\"acknowledged\""]);

    // Under load: writes go to A one after the other (each one acknowledged or not), check-ins
    // to B, and A is killed in the middle, without a chance to hand anything over.
    let (a_url, a_token) = (a.url.clone(), a.token.clone());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut acknowledged = Vec::new();
            for i in 0.. {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let out = Command::new(bin("tenonctl"))
                    .args(["--server", &a_url, "--token", &a_token, "settings", "set", "--tenant"])
                    .arg(format!("Custom.Ack{i}"))
                    .arg("true")
                    .output()
                    .unwrap();
                if out.status.success() {
                    acknowledged.push(i);
                }
            }
            acknowledged
        })
    };
    wait_for("writes are acknowledged", Duration::from_secs(10), || {
        a.ctl_json(&["settings", "list"]).to_string().contains("Ack3\"")
    });
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    for _ in 0..50 {
        assert_eq!(check_in(&b, &cred).0, 200, "B answers check-ins while A dies");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acknowledged = writer.join().unwrap();
    // Ack3 was stored, so Ack0..=Ack2 (written one after the other) were acknowledged.
    assert!(acknowledged.len() >= 3, "{acknowledged:?}");
    let on_b = b.ctl_json(&["settings", "list"]).to_string();
    for i in &acknowledged {
        assert!(on_b.contains(&format!("Ack{i}\"")), "Custom.Ack{i} was acknowledged by A but B does not have it");
    }
    eprintln!("{} writes acknowledged by A before it was killed, all on B", acknowledged.len());
    let took = wait_for("B takes the jobs over", Duration::from_secs(30), || status(&b)["runs_jobs"] == json!(true));
    eprintln!("the jobs moved to B {took:?} after A died");
    // B serves the device, with what A acknowledged.
    let (code, _) = check_in(&b, &cred);
    assert_eq!(code, 200);
    let settings = b.ctl_json(&["settings", "list"]);
    assert!(settings.to_string().contains("acknowledged"), "{settings}");
}

#[test]
fn a_server_with_other_keys_refuses_to_serve_the_database() {
    let Some(base) = postgres("a_server_with_other_keys_refuses") else { return };
    let url = fresh_database(&base);
    let root = tempfile::tempdir().unwrap();
    let a = server_on(&root.path().join("a"), &url);
    let (code, err) = refused(&root.path().join("other"), &url);
    assert_ne!(code, 0);
    assert!(err.contains("another root key") && err.contains("copy DATA_DIR/keys/"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    drop(a);
}

/// Runs `serve` expecting it to refuse: its exit code and stderr (killed after 20 s).
fn refused(data_dir: &Path, url: &str) -> (i32, String) {
    let log = data_dir.with_extension("err");
    std::fs::create_dir_all(data_dir.parent().unwrap()).unwrap();
    let mut child = Command::new(bin("tenon-server"))
        .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "text", "--data-dir"])
        .arg(data_dir)
        .args(["--database", url])
        .env("TENON_LOG", "off")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let code = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s.code().unwrap_or(-1);
        }
        if started.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("the server did not refuse to start");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (code, std::fs::read_to_string(log).unwrap())
}

#[test]
fn a_newer_schema_and_a_user_without_rights_are_refused_with_what_to_do() {
    let Some(base) = postgres("a_newer_schema_and_a_user_without_rights") else { return };
    let url = fresh_database(&base);
    let root = tempfile::tempdir().unwrap();
    server_on(&root.path().join("a"), &url).stop();
    psql(
        &url,
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
         VALUES (9999, 'from the future', true, '\\x00', 1)",
    );
    let tables_before = psql(&url, "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = 'public'");
    let (code, err) = refused(&root.path().join("a"), &url);
    assert_ne!(code, 0);
    assert!(err.contains("schema version 9999") && err.contains("nothing was changed"), "{err}");
    assert_eq!(
        psql(&url, "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = 'public'"),
        tables_before
    );

    // A user that may log in but not create tables (PostgreSQL 15 grants no CREATE on public).
    let weak = format!("weak_{}", unique());
    psql(&format!("{base}/postgres"), &format!("CREATE ROLE {weak} LOGIN"));
    let empty = fresh_database(&base);
    psql(&empty, "REVOKE CREATE ON SCHEMA public FROM PUBLIC");
    let weak_url = empty.replacen("postgres://postgres@", &format!("postgres://{weak}@"), 1);
    let (code, err) = refused(&root.path().join("weak"), &weak_url);
    assert_ne!(code, 0);
    assert!(
        err.contains("may not create the tables") && err.contains("GRANT") || err.contains("CREATE ON SCHEMA"),
        "{err}"
    );
}

#[test]
fn a_database_url_that_does_not_parse_is_refused_in_one_line() {
    let root = tempfile::tempdir().unwrap();
    for url in ["postgres://tenon:secret@db:notaport/tenon", "mysql://u@h/db"] {
        let (code, err) = refused(&root.path().join("d"), url);
        assert_ne!(code, 0);
        assert!(err.contains("postgres://USER"), "{url}: {err}");
        assert!(!err.contains("secret"), "the password is never shown: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
}

/// A cluster of this test's own, to stop and start.
struct OwnCluster {
    dir: PathBuf,
    url: String,
}

impl OwnCluster {
    fn script() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/pg-cluster")
    }

    fn start() -> OwnCluster {
        let dir = std::env::temp_dir().join(format!("tenon-pg-{}", unique()));
        let out = Command::new(Self::script()).arg("start").arg(&dir).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let url = String::from_utf8(out.stdout).unwrap().trim().to_string();
        OwnCluster { dir, url }
    }

    fn run(&self, what: &str) {
        let out = Command::new(Self::script()).arg(what).arg(&self.dir).output().unwrap();
        assert!(out.status.success(), "pg-cluster {what}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        let _ = Command::new(Self::script()).arg("stop").arg(&self.dir).output();
    }
}

#[test]
fn while_the_database_is_away_check_ins_go_on_writes_wait_and_all_recovers() {
    let Some(_) = postgres("while_the_database_is_away") else { return };
    let cluster = OwnCluster::start();
    let url = fresh_database(&cluster.url);
    let root = tempfile::tempdir().unwrap();
    let server = server_on(&root.path().join("a"), &url);
    let agent = SimAgent::new(root.path(), "pc1", json!({"hostname": "PC1"}));
    agent.enroll(&server, &server.enroll_token(5));
    agent.ok(&["sync", "--once"]);
    let (_, cred) = credential(&agent);
    let http = server.http();
    let body = |path: &str| match http.get(&format!("{}{path}", server.url)).call() {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(c, r)) => (c, r.into_string().unwrap()),
        Err(e) => panic!("{path}: {e}"),
    };
    assert_eq!(body("/healthz"), (200, "ok".into()));

    cluster.run("pause");
    wait_for("healthz says degraded", Duration::from_secs(5), || {
        body("/healthz").1.starts_with("degraded: database unreachable")
    });
    assert_eq!(body("/healthz").0, 200, "a balancer keeps sending check-ins");
    assert_eq!(body("/readyz").0, 503);
    // Check-ins are answered from memory.
    let (_, etag) = check_in(&server, &cred);
    let r = http
        .get(&format!("{}/api/v1/device/config", server.url))
        .set("Authorization", &format!("Bearer {cred}"))
        .set("If-None-Match", &etag)
        .call()
        .unwrap();
    assert_eq!(r.status(), 304);
    agent.ok(&["sync", "--once"]);
    // A write answers 503 problem+json with Retry-After, and says what to do.
    let r = http
        .put(&format!("{}/api/v1/admin/settings", server.url))
        .set("Authorization", &format!("Bearer {}", server.token))
        .send_json(json!({"scope": "tenant", "key": "Custom.Later", "value": "\"x\""}));
    match r {
        Err(ureq::Error::Status(503, r)) => {
            assert!(r.header("retry-after").is_some());
            assert_eq!(r.header("content-type"), Some("application/problem+json"));
            let problem: Value = r.into_json().unwrap();
            assert_eq!(problem["code"], "database_unavailable", "{problem}");
        }
        other => panic!("expected 503, got {other:?}"),
    }
    let out = server.ctl(&["settings", "set", "--tenant", "Custom.Later", "\"x\""]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("database cannot be reached"));

    // Back: everything recovers by itself.
    cluster.run("resume");
    wait_for("readyz again", Duration::from_secs(20), || body("/readyz").0 == 200);
    assert_eq!(body("/healthz"), (200, "ok".into()));
    server.ctl_ok(&["settings", "set", "--tenant", "Custom.Later", "\"x\""]);
    agent.ok(&["sync", "--once"]);
    assert_eq!(agent.held_payload()["machine"]["Custom"]["Later"], json!("x"));
}
