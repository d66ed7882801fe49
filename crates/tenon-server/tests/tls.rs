//! HTTPS: the server's own CA pinned by enrollment tokens, an organisation's certificate served
//! and reloaded, plain HTTP refused off loopback, and the bad inputs that refuse to start.

mod common;

use common::{bin, https_agent, Server, SimAgent};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn device(host: &str) -> serde_json::Value {
    json!({"hostname": host})
}

/// `tenon-server serve` that must refuse to start: its exit code and stderr.
fn refused(args: &[&str]) -> String {
    // Under PostgreSQL the data dir's database too, so the refusal is checked on that store.
    let data_dir = args.iter().position(|a| *a == "--data-dir").map(|i| Path::new(args[i + 1]));
    let database = data_dir.map(common::database_args).unwrap_or_default();
    let out = Command::new(bin("tenon-server")).arg("serve").args(args).args(database).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "serve {args:?} must refuse to start: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line that says what and what to do: {err}");
    err
}

fn pem_fingerprint(pem: &Path) -> String {
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::pem_file_iter(pem).unwrap().next().unwrap().unwrap();
    hex::encode(Sha256::digest(der.as_ref()))
}

/// The certificate a fresh handshake with `addr` gets: the SHA-256 of the leaf.
fn served_leaf(addr: &str, ca: &Path) -> String {
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut conn = rustls::ClientConnection::new(common::client_config(ca), name).unwrap();
    let mut sock = std::net::TcpStream::connect(addr).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).unwrap();
    }
    hex::encode(Sha256::digest(conn.peer_certificates().unwrap()[0].as_ref()))
}

/// An organisation's CA and the server certificates it issues, written as PEM files.
struct OrgCa {
    key: rcgen::KeyPair,
    cert: rcgen::Certificate,
    dir: PathBuf,
}

impl OrgCa {
    fn new(dir: &Path, name: &str) -> OrgCa {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        let cert = params.self_signed(&key).unwrap();
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ca.pem"), cert.pem()).unwrap();
        OrgCa { key, cert, dir }
    }

    fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// Issues a certificate for localhost and 127.0.0.1 valid from `from` to `until` (days from
    /// now); writes chain (leaf then CA) and key, returns their paths.
    fn issue(&self, tag: &str, from: i64, until: i64) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, format!("tenon {tag}"));
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now + time::Duration::days(from);
        params.not_after = now + time::Duration::days(until);
        let issuer = rcgen::Issuer::from_ca_cert_der(self.cert.der(), &self.key).unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        let (c, k) = (self.dir.join(format!("{tag}.pem")), self.dir.join(format!("{tag}.key")));
        std::fs::write(&c, format!("{}{}", cert.pem(), self.cert.pem())).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }
}

#[test]
fn the_servers_own_ca_is_pinned_by_enrollment_tokens_and_another_ca_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = Server::start_with(&data, "127.0.0.1:0", &["--tls-self-signed"]);
    assert!(server.url.starts_with("https://"), "{}", server.url);
    let ca = data.join("tls/ca.pem");
    assert_eq!(server.ca_file.as_deref(), Some(ca.as_path()));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(data.join("tls/ca.key")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the CA key is readable by its owner alone");
    }

    // tenonctl: refused without the CA (says what to pass), fine with --ca-file or --data-dir.
    let out = Command::new(bin("tenonctl"))
        .args(["--server", &server.url, "--token", &server.token, "devices", "list"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--ca-file"), "names the flag that fixes it: {err}");
    let out = Command::new(bin("tenonctl"))
        .arg("--server")
        .arg(&server.url)
        .arg("--data-dir")
        .arg(&data)
        .args(["devices", "list", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "--data-dir finds tls/ca.pem and admin.token: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The token carries the CA's fingerprint; the agent enrolls over https with nothing else.
    let token = server.enroll_token(2);
    assert_eq!(token.rsplit('.').next().unwrap(), pem_fingerprint(&ca), "the token pins the server's CA");
    let agent = SimAgent::new(tmp.path(), "pc1", device("PC1"));
    let id = agent.enroll(&server, &token);
    agent.ok(&["sync", "--once"]);
    let before = agent.status();
    assert_eq!(before["device_id"], id.as_str());
    assert!(before["config_version"].as_u64().unwrap() >= 1);
    assert!(before["last_error"].is_null(), "{before}");
    let shown = server.ctl_json(&["devices", "show", &id]);
    assert_eq!(shown["config_sha256"], before["config_sha256"]);

    // Another server, with a CA of its own, at the same address: the agent refuses it by name and
    // keeps what it has.
    let addr = server.addr.clone();
    server.stop();
    let imposter = Server::start_with(&tmp.path().join("other"), &addr, &["--tls-self-signed"]);
    let out = agent.run(&["sync", "--once"]);
    assert!(!out.status.success());
    let after = agent.status();
    let last_error = after["last_error"].as_str().unwrap();
    assert!(last_error.contains("not from the CA this device was enrolled with"), "{last_error}");
    assert!(last_error.contains(&pem_fingerprint(&ca)), "names the pinned CA: {last_error}");
    assert_eq!(after["config_version"], before["config_version"], "the last known good configuration is kept");
    assert_eq!(after["config_sha256"], before["config_sha256"]);
    drop(imposter);
}

#[test]
fn the_self_signed_certificate_names_are_chosen_and_the_ca_survives_restarts() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = Server::start_with(
        &data,
        "127.0.0.1:0",
        &["--tls-self-signed", "--tls-names", "localhost,127.0.0.1,tenon.test"],
    );
    let ca_before = std::fs::read(data.join("tls/ca.pem")).unwrap();
    let leaf_before = served_leaf(&server.addr, &data.join("tls/ca.pem"));
    let addr = server.addr.clone();
    server.stop();
    // Restart with other names: same CA, a new server certificate for the new names.
    let server = Server::start_with(&data, &addr, &["--tls-self-signed", "--tls-names", "localhost,127.0.0.1"]);
    assert_eq!(std::fs::read(data.join("tls/ca.pem")).unwrap(), ca_before, "the CA never changes");
    assert_ne!(served_leaf(&server.addr, &data.join("tls/ca.pem")), leaf_before, "re-issued for the new names");
    let leaf = served_leaf(&server.addr, &data.join("tls/ca.pem"));
    let addr = server.addr.clone();
    server.stop();
    // Same names: the certificate is kept (it is far from expiry).
    let server = Server::start_with(&data, &addr, &["--tls-self-signed", "--tls-names", "localhost,127.0.0.1"]);
    assert_eq!(served_leaf(&server.addr, &data.join("tls/ca.pem")), leaf);
}

#[test]
fn an_organisations_certificate_is_served_trusted_through_system_roots_or_a_pin_and_reloaded() {
    let tmp = tempfile::tempdir().unwrap();
    let org = OrgCa::new(tmp.path(), "contoso-ca");
    let (cert, key) = org.issue("server1", -1, 365);
    let data = tmp.path().join("data");
    let server = Server::start_trusting(
        &data,
        "127.0.0.1:0",
        &["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()],
        Some(&org.ca_file()),
    );
    assert!(server.url.starts_with("https://"));
    assert!(!data.join("tls/ca.pem").exists(), "no CA of its own with an organisation's certificate");

    // Tokens say "system roots", or pin the organisation's CA when asked.
    let sys_token = server.enroll_token(1);
    assert_eq!(sys_token.rsplit('.').next().unwrap(), "sys");
    let pinned = server.ctl_ok(&["enroll-token", "create", "--pin-ca"]).trim().to_string();
    assert_eq!(pinned.rsplit('.').next().unwrap(), pem_fingerprint(&org.ca_file()));

    // System roots: here the machine's bundle is SSL_CERT_FILE, which holds the organisation's CA.
    let a = SimAgent::new(tmp.path(), "pc-sys", device("PC-SYS"));
    let out = a
        .command(&["enroll", "--server", &server.url, "--token", &sys_token])
        .env("SSL_CERT_FILE", org.ca_file())
        .output()
        .unwrap();
    assert!(out.status.success(), "enroll with system roots: {}", String::from_utf8_lossy(&out.stderr));
    let out = a.command(&["sync", "--once"]).env("SSL_CERT_FILE", org.ca_file()).output().unwrap();
    assert!(out.status.success(), "sync with system roots: {}", String::from_utf8_lossy(&out.stderr));
    let b = SimAgent::new(tmp.path(), "pc-pin", device("PC-PIN"));
    b.enroll(&server, &pinned);
    b.ok(&["sync", "--once"]);

    // A keep-alive connection opened before the reload still works after it.
    let http = https_agent(&org.ca_file());
    http.get(&format!("{}/healthz", server.url)).call().unwrap();
    let first = served_leaf(&server.addr, &org.ca_file());
    let (cert2, key2) = org.issue("server2", -1, 365);
    std::fs::copy(&cert2, &cert).unwrap();
    std::fs::copy(&key2, &key).unwrap();
    let _ = Command::new("kill").arg("-HUP").arg(server.child.id().to_string()).status();
    let deadline = Instant::now() + Duration::from_secs(15);
    while served_leaf(&server.addr, &org.ca_file()) == first {
        assert!(Instant::now() < deadline, "the new certificate was not served after SIGHUP\n{}", server.log_tail());
        std::thread::sleep(Duration::from_millis(100));
    }
    http.get(&format!("{}/healthz", server.url)).call().expect("the open connection survives the reload");
    b.ok(&["sync", "--once"]);

    // Without a signal: the changed files are noticed within the poll interval (5 s).
    let second = served_leaf(&server.addr, &org.ca_file());
    let (cert3, key3) = org.issue("server3", -1, 365);
    std::fs::copy(&cert3, &cert).unwrap();
    std::fs::copy(&key3, &key).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while served_leaf(&server.addr, &org.ca_file()) == second {
        assert!(Instant::now() < deadline, "the changed files were not picked up\n{}", server.log_tail());
        std::thread::sleep(Duration::from_millis(200));
    }

    // A broken file on reload keeps the certificate being served.
    let serving = served_leaf(&server.addr, &org.ca_file());
    std::fs::File::create(&cert).unwrap().write_all(b"not a certificate").unwrap();
    let _ = Command::new("kill").arg("-HUP").arg(server.child.id().to_string()).status();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let log = common::strip_ansi(&std::fs::read_to_string(&server.stderr_log).unwrap());
        if log.contains("cannot reload the TLS certificate") {
            break;
        }
        assert!(Instant::now() < deadline, "the failed reload is logged\n{log}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(served_leaf(&server.addr, &org.ca_file()), serving);
    b.ok(&["sync", "--once"]);
}

#[test]
fn plain_http_is_for_loopback_only() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let err = refused(&["--listen", "0.0.0.0:0", "--data-dir", data.to_str().unwrap()]);
    assert!(
        err.contains("--tls-cert") && err.contains("--tls-self-signed") && err.contains("--insecure-http"),
        "{err}"
    );
    assert!(!data.exists(), "nothing is written before the refusal");

    let server = Server::start_with(&data, "0.0.0.0:0", &["--insecure-http"]);
    let log = std::fs::read_to_string(&server.stderr_log).unwrap();
    assert!(log.contains("WARNING") && log.contains("--insecure-http"), "a warning at every start: {log}");
    // `systemctl reload` (SIGHUP) does not end a server that has no certificate files to reload.
    let _ = Command::new("kill").arg("-HUP").arg(server.child.id().to_string()).status();
    std::thread::sleep(Duration::from_millis(300));
    server.http().get(&format!("{}/healthz", server.url)).call().expect("still serving after SIGHUP");

    // The agent refuses plain HTTP to another machine before anything is sent, and says how to accept it.
    let token = server.enroll_token(1);
    let agent = SimAgent::new(tmp.path(), "pc", device("PC"));
    let out = agent.run(&["enroll", "--server", "http://192.0.2.10:8440", "--token", &token]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--allow-insecure-http"), "{err}");
}

#[test]
fn bad_tls_input_refuses_to_start_with_one_line_that_says_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let org = OrgCa::new(tmp.path(), "org");
    let (good_cert, good_key) = org.issue("good", -1, 365);
    let (_, other_key) = org.issue("other", -1, 365);
    let (expired_cert, expired_key) = org.issue("expired", -30, -1);
    let garbage = tmp.path().join("garbage.pem");
    std::fs::write(&garbage, "this is not PEM\n").unwrap();
    let data = tmp.path().join("data");
    let d = data.to_str().unwrap();
    let s = |p: &PathBuf| p.to_str().unwrap().to_string();

    let err =
        refused(&["--listen", "127.0.0.1:0", "--data-dir", d, "--tls-cert", &s(&garbage), "--tls-key", &s(&good_key)]);
    assert!(err.contains("not a PEM certificate"), "{err}");
    let err =
        refused(&["--listen", "127.0.0.1:0", "--data-dir", d, "--tls-cert", &s(&good_cert), "--tls-key", &s(&garbage)]);
    assert!(err.contains("not a PEM private key"), "{err}");
    let err = refused(&[
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        d,
        "--tls-cert",
        &s(&good_cert),
        "--tls-key",
        &s(&other_key),
    ]);
    assert!(err.contains("does not match the certificate"), "{err}");
    let err = refused(&[
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        d,
        "--tls-cert",
        &s(&expired_cert),
        "--tls-key",
        &s(&expired_key),
    ]);
    assert!(err.contains("expired on") && err.contains("renew"), "{err}");

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let server = Server::start_with(&data, "127.0.0.1:0", &["--tls-self-signed"]);
        server.stop();
        let ca_key = data.join("tls/ca.key");
        std::fs::set_permissions(&ca_key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = refused(&["--listen", "127.0.0.1:0", "--data-dir", d, "--tls-self-signed"]);
        assert!(err.contains("ca.key") && err.contains("chmod 600"), "{err}");
    }
}
