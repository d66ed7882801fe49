//! Slow and greedy clients: half-sent requests, idle and stalled connections, the connection cap,
//! the report size cap, report and enrollment rate limits, the bounded report history and the
//! aggregate log of failed authentications. Every address is loopback.

mod common;

use common::Server;
use serde_json::{json, Value};
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Options that make the timeouts testable in seconds.
const SHORT: &[&str] = &["--header-read-timeout", "1s", "--body-read-timeout", "1s", "--idle-timeout", "1s"];

fn start(tmp: &tempfile::TempDir, extra: &[&str]) -> Server {
    Server::start_with(&tmp.path().join("data"), "127.0.0.1:0", extra)
}

/// Enrolls one device over HTTP; returns its id and credential.
fn enroll(server: &Server, token: &str) -> (String, String) {
    let v: Value = ureq::post(&format!("{}/api/v1/enroll", server.url))
        .send_json(json!({"token": token, "hostname": "PC-SLOW", "agent_version": "test"}))
        .expect("enrollment succeeds")
        .into_json()
        .unwrap();
    (v["device_id"].as_str().unwrap().to_string(), v["credential"].as_str().unwrap().to_string())
}

fn report_body() -> Value {
    json!({"agent_version": "test", "hostname": "PC-SLOW", "signed_in_users": [], "config_version": null,
           "config_sha256": null, "last_error": null, "policies": {}})
}

#[allow(clippy::result_large_err)] // ureq's own error, in a test helper
fn send_report(server: &Server, credential: &str) -> Result<ureq::Response, ureq::Error> {
    ureq::post(&format!("{}/api/v1/device/report", server.url))
        .set("Authorization", &format!("Bearer {credential}"))
        .send_json(report_body())
}

/// Opens a connection and sends the start of a request head, never its end.
fn half_sent(addr: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: tenon\r\nX-Slow: ").unwrap();
    s
}

/// Whether the server closed `s`: a read ends (EOF or reset) within `wait`.
fn closed_within(s: &TcpStream, wait: Duration) -> bool {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 1024];
    let mut reader = s;
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue, // e.g. a 408 before the close
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return false,
            Err(_) => return true,
        }
    }
}

/// Times a `/healthz` and an unchanged check-in on fresh connections.
fn timed_healthz_and_checkin(server: &Server, credential: &str) -> (Duration, Duration) {
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(5)).build();
    let t = Instant::now();
    let r = agent.get(&format!("{}/healthz", server.url)).call().expect("/healthz answers");
    assert_eq!(r.status(), 200);
    let healthz = t.elapsed();
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(5)).build();
    let t = Instant::now();
    let r = agent
        .get(&format!("{}/api/v1/device/config", server.url))
        .set("Authorization", &format!("Bearer {credential}"))
        .call()
        .expect("check-in answers");
    assert_eq!(r.status(), 200);
    (healthz, t.elapsed())
}

#[test]
fn half_sent_requests_do_not_block_healthz_or_checkins_and_are_closed_at_the_header_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let server = start(&tmp, SHORT);
    let (_, credential) = enroll(&server, &server.enroll_token(1));
    let slow: Vec<TcpStream> = (0..400).map(|_| half_sent(&server.addr)).collect();
    let (healthz, checkin) = timed_healthz_and_checkin(&server, &credential);
    assert!(healthz < Duration::from_secs(1), "/healthz took {healthz:?} with 400 half-sent requests open");
    assert!(checkin < Duration::from_secs(1), "a check-in took {checkin:?} with 400 half-sent requests open");
    // The header timeout is 1 s: every half-sent connection is closed soon after.
    std::thread::sleep(Duration::from_millis(1500));
    let open = slow.iter().filter(|s| !closed_within(s, Duration::from_millis(1500))).count();
    assert_eq!(open, 0, "{open} half-sent connections were still open after the header timeout");
}

#[test]
fn at_the_connection_cap_the_oldest_idle_connections_make_room() {
    let tmp = tempfile::tempdir().unwrap();
    // A long header timeout, so only the cap can close the flood.
    let server = start(&tmp, &["--max-connections", "50", "--header-read-timeout", "60s"]);
    let (_, credential) = enroll(&server, &server.enroll_token(1));
    let slow: Vec<TcpStream> = (0..200).map(|_| half_sent(&server.addr)).collect();
    for _ in 0..3 {
        let (healthz, checkin) = timed_healthz_and_checkin(&server, &credential);
        assert!(healthz < Duration::from_secs(1), "/healthz took {healthz:?} at the connection cap");
        assert!(checkin < Duration::from_secs(1), "a check-in took {checkin:?} at the connection cap");
    }
    // The oldest were closed to make room for the newer ones.
    let oldest_open = slow[..100].iter().filter(|s| !closed_within(s, Duration::from_millis(300))).count();
    assert_eq!(oldest_open, 0, "{oldest_open} of the 100 oldest half-sent connections are still open");
    let open = slow[150..].iter().filter(|s| !closed_within(s, Duration::from_millis(100))).count();
    assert!(open > 0, "the newest connections under the cap stay open");
}

#[test]
fn idle_connections_are_closed() {
    let tmp = tempfile::tempdir().unwrap();
    let server = start(&tmp, SHORT);
    // Connected and silent.
    let silent = TcpStream::connect(&server.addr).unwrap();
    // One complete keep-alive request, then idle.
    let mut kept = TcpStream::connect(&server.addr).unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: tenon\r\n\r\n").unwrap();
    kept.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 512];
    let n = kept.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"), "the request itself is answered");
    assert!(!closed_within(&kept, Duration::from_millis(300)), "a fresh keep-alive connection stays open");
    assert!(closed_within(&silent, Duration::from_secs(3)), "a silent connection is closed");
    assert!(closed_within(&kept, Duration::from_secs(3)), "an idle keep-alive connection is closed");
}

#[test]
fn a_body_that_does_not_arrive_in_time_gets_408() {
    let tmp = tempfile::tempdir().unwrap();
    let server = start(&tmp, SHORT);
    let mut s = TcpStream::connect(&server.addr).unwrap();
    s.write_all(
        b"POST /api/v1/enroll HTTP/1.1\r\nHost: tenon\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n{\"token\":",
    )
    .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let t = Instant::now();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "expected 408, got {answer:?}");
    assert!(answer.contains("request_timeout"), "a problem+json body: {answer}");
    assert!(t.elapsed() < Duration::from_secs(4), "answered at the body timeout, took {:?}", t.elapsed());
}

#[test]
fn a_report_over_the_size_cap_gets_413() {
    let tmp = tempfile::tempdir().unwrap();
    let server = start(&tmp, &[]);
    let (_, credential) = enroll(&server, &server.enroll_token(1));
    // Announce a 200 KB report (the general body limit is 1 MiB) and send its first bytes: the
    // answer comes from the Content-Length alone. (Sending it all races the server's close.)
    let mut s = TcpStream::connect(&server.addr).unwrap();
    let head = format!(
        "POST /api/v1/device/report HTTP/1.1\r\nHost: tenon\r\nAuthorization: Bearer {credential}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{{\"last_error\": \"",
        200 * 1024
    );
    s.write_all(head.as_bytes()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "expected 413, got {answer:?}");
    assert!(answer.contains("payload_too_large"), "a problem+json body: {answer}");
    // A real-sized report still goes through.
    assert_eq!(send_report(&server, &credential).unwrap().status(), 202);
}

#[test]
fn a_burst_of_ten_reports_is_accepted_and_a_flood_gets_429_with_retry_after() {
    let tmp = tempfile::tempdir().unwrap();
    // The production default per device.
    let server = start(&tmp, &[]);
    let (_, credential) = enroll(&server, &server.enroll_token(2));
    for i in 0..10 {
        assert_eq!(send_report(&server, &credential).unwrap().status(), 202, "report {i} of the burst");
    }
    let mut refused = None;
    for _ in 0..50 {
        match send_report(&server, &credential) {
            Ok(r) => assert_eq!(r.status(), 202),
            Err(ureq::Error::Status(429, r)) => {
                refused = Some(r);
                break;
            }
            Err(e) => panic!("unexpected answer {e:?}"),
        }
    }
    let r = refused.expect("a flood of reports is refused");
    let retry: u64 = r.header("Retry-After").expect("Retry-After is set").parse().expect("Retry-After in seconds");
    assert!((1..=3600).contains(&retry), "Retry-After {retry}");
    assert_eq!(r.header("Content-Type"), Some("application/problem+json"));
    let p: Value = r.into_json().unwrap();
    assert_eq!(p["code"], "rate_limited");
    assert_eq!(p["status"], 429);
    // Another device is not affected.
    let (_, other) = enroll(&server, &server.enroll_token(1));
    assert_eq!(send_report(&server, &other).unwrap().status(), 202);
}

#[test]
fn enrollments_are_rate_limited_per_source_address_and_per_token() {
    let tmp = tempfile::tempdir().unwrap();
    let server = start(&tmp, &["--enroll-rate-per-address", "3/1m", "--enroll-rate-per-token", "off"]);
    let token = server.enroll_token(10);
    for _ in 0..3 {
        enroll(&server, &token);
    }
    let err = ureq::post(&format!("{}/api/v1/enroll", server.url))
        .send_json(json!({"token": token, "hostname": "PC-4", "agent_version": "test"}))
        .expect_err("the fourth enrollment from one address within a minute is refused");
    match err {
        ureq::Error::Status(429, r) => {
            let retry: u64 = r.header("Retry-After").expect("Retry-After").parse().unwrap();
            assert!((1..=60).contains(&retry), "Retry-After {retry}");
        }
        other => panic!("expected 429, got {other:?}"),
    }
    // Refused attempts with a bad token count against the address too (guessing is throttled).
    let err = ureq::post(&format!("{}/api/v1/enroll", server.url))
        .send_json(json!({"token": "tenr.nope.nope.nope", "hostname": "PC-5", "agent_version": "test"}))
        .expect_err("refused");
    assert!(matches!(err, ureq::Error::Status(429, _)), "{err:?}");
    server.stop();

    let tmp = tempfile::tempdir().unwrap();
    let server = start(&tmp, &["--enroll-rate-per-address", "off", "--enroll-rate-per-token", "2/1m"]);
    let (a, b) = (server.enroll_token(10), server.enroll_token(10));
    enroll(&server, &a);
    enroll(&server, &a);
    let err = ureq::post(&format!("{}/api/v1/enroll", server.url))
        .send_json(json!({"token": a, "hostname": "PC-3", "agent_version": "test"}))
        .expect_err("a third enrollment with one token is refused");
    assert!(matches!(err, ureq::Error::Status(429, _)), "{err:?}");
    enroll(&server, &b);
}

#[test]
fn the_report_history_stays_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let server =
        start(&tmp, &["--report-history-last", "5", "--report-history-days", "3", "--report-rate-per-device", "off"]);
    let (id, credential) = enroll(&server, &server.enroll_token(1));
    for i in 0..40 {
        let mut body = report_body();
        body["last_error"] = json!(format!("report {i}"));
        let r = ureq::post(&format!("{}/api/v1/device/report", server.url))
            .set("Authorization", &format!("Bearer {credential}"))
            .send_json(body)
            .unwrap();
        assert_eq!(r.status(), 202);
    }
    let errors = history_errors(&server, &id);
    // All 40 arrived today: the last five are kept (today's latest is among them).
    assert_eq!(errors, ["report 39", "report 38", "report 37", "report 36", "report 35"]);
}

/// The `last_error` of each stored report of `id`, newest first.
fn history_errors(server: &Server, id: &str) -> Vec<String> {
    let reports: Value = ureq::get(&format!("{}/api/v1/admin/devices/{id}/reports?limit=1000", server.url))
        .set("Authorization", &format!("Bearer {}", server.token))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    reports.as_array().unwrap().iter().map(|r| r["report"]["last_error"].as_str().unwrap_or("").to_string()).collect()
}

#[test]
fn a_report_that_repeats_the_last_one_adds_no_history_row() {
    let tmp = tempfile::tempdir().unwrap();
    let server = start(&tmp, &["--report-rate-per-device", "off"]);
    let (id, credential) = enroll(&server, &server.enroll_token(1));
    let post = |body: &Value| {
        let r = ureq::post(&format!("{}/api/v1/device/report", server.url))
            .set("Authorization", &format!("Bearer {credential}"))
            .send_json(body.clone())
            .unwrap();
        assert_eq!(r.status(), 202);
    };
    let history = || history_errors(&server, &id);
    let mut body = report_body();
    body["last_error"] = json!("first");
    for _ in 0..5 {
        post(&body);
    }
    assert_eq!(history(), ["first"], "five identical reports are one history row");
    body["last_error"] = json!("second");
    post(&body);
    post(&body);
    body["last_error"] = json!("first");
    post(&body);
    assert_eq!(history(), ["first", "second", "first"], "each change is kept, newest first");
    // The device row still follows every report.
    let shown = server.ctl_json(&["devices", "show", &id]);
    assert_eq!(shown["last_error"], json!("first"), "{shown}");
}

#[test]
fn failed_authentications_are_logged_in_aggregate_without_secrets() {
    let tmp = tempfile::tempdir().unwrap();
    let server = start(&tmp, &["--auth-failure-log-interval", "1s"]);
    let (device_id, _) = enroll(&server, &server.enroll_token(1));
    let device_secret = "DEVICESECRETguess0123456789";
    let admin_secret = "ADMINSECRETguess0123456789";
    let enroll_secret = "ENROLLSECRETguess0123456789";
    for _ in 0..5 {
        let r = ureq::get(&format!("{}/api/v1/device/config", server.url))
            .set("Authorization", &format!("Bearer tdev.{device_id}.{device_secret}"))
            .call();
        assert!(matches!(r, Err(ureq::Error::Status(401, _))));
    }
    for _ in 0..3 {
        let r = ureq::get(&format!("{}/api/v1/admin/devices", server.url))
            .set("Authorization", &format!("Bearer tadm.nosuch.{admin_secret}"))
            .call();
        assert!(matches!(r, Err(ureq::Error::Status(401, _))));
    }
    for _ in 0..2 {
        let r = ureq::post(&format!("{}/api/v1/enroll", server.url)).send_json(
            json!({"token": format!("tenr.nosuch.{enroll_secret}.fpr"), "hostname": "X", "agent_version": "t"}),
        );
        assert!(matches!(r, Err(ureq::Error::Status(401, _))));
    }
    // One line per interval (the failures may straddle two): wait until every failure is logged.
    let count = |line: &str, field: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(field).and_then(|v| v.strip_prefix('=')))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let (log, lines) = loop {
        let log = common::strip_ansi(&std::fs::read_to_string(&server.stderr_log).unwrap());
        let lines: Vec<String> =
            log.lines().filter(|l| l.contains("failed authentications")).map(String::from).collect();
        let total: u64 = lines
            .iter()
            .map(|l| count(l, "device_credential") + count(l, "admin_token") + count(l, "enrollment_token"))
            .sum();
        if total >= 10 || Instant::now() > deadline {
            break (log, lines);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!((1..=2).contains(&lines.len()), "one aggregate line per interval, not one per request:\n{log}");
    let sum = |field: &str| lines.iter().map(|l| count(l, field)).sum::<u64>();
    assert_eq!((sum("device_credential"), sum("admin_token"), sum("enrollment_token")), (5, 3, 2), "{lines:?}");
    assert!(lines.iter().all(|l| l.contains("127.0.0.1 (")), "the source address is named: {lines:?}");
    for secret in [device_secret, admin_secret, enroll_secret] {
        assert!(!log.contains(secret), "a presented secret reached the log");
    }
}

#[test]
fn the_agent_reports_a_429_and_keeps_its_configuration() {
    let tmp = tempfile::tempdir().unwrap();
    let server = start(&tmp, &["--report-rate-per-device", "1/1h"]);
    let token = server.enroll_token(1);
    let agent = common::SimAgent::new(
        tmp.path(),
        "pc",
        json!({"hostname": "PC-1", "signed_in_users": [], "network": {"gateway_ip": "192.0.2.1", "gateway_mac": "00:11:22:33:44:55"}}),
    );
    agent.enroll(&server, &token);
    agent.ok(&["sync", "--once"]);
    // The second report within the hour is refused: the sync still succeeds, says why, and keeps
    // the configuration it holds. (`--report`: an agent sends a report only when it changed, and
    // this one must be sent whatever the first sync left to say.)
    agent.ok(&["sync", "--once", "--report"]);
    let status = agent.status();
    let last_error = status["last_error"].as_str().unwrap_or_default();
    assert!(last_error.contains("rate limiting"), "last_error says the server is rate limiting: {status}");
    assert!(last_error.contains("retry after"), "and when to retry: {status}");
    assert!(status["config_version"].as_u64().is_some());
}
