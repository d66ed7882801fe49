//! A mock Tenon server for the agent tests (`attacks.rs`, `reports.rs`): it serves one envelope,
//! records every request the agent makes, and can be told to refuse reports.
#![allow(dead_code)] // each test crate uses a part of it

use ed25519_dalek::SigningKey;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use tenon_core::api::{envelope_etag, TrustBundle};
use tenon_core::envelope::{issue, EnvelopeFields};
use tenon_core::trust::{sign_key_list, PublicKeyEntry};

pub const DEVICE: &str = "0a0b0c0d-1111-4222-8333-444455556666";
pub const NOW: i64 = 1_800_000_000;

pub fn root() -> SigningKey {
    SigningKey::from_bytes(&[1; 32])
}
pub fn signer() -> SigningKey {
    SigningKey::from_bytes(&[2; 32])
}

#[derive(Default)]
pub struct MockState {
    pub envelope: String,
    pub trust: Option<TrustBundle>,
    /// Reports acknowledged (202).
    pub reports: Vec<Value>,
    /// Reports refused with a 500 while `fail_reports` is set.
    pub failed_reports: usize,
    /// Answer reports with 500 instead of acknowledging them.
    pub fail_reports: bool,
    /// Served from the next report on, as a server does when a report changes what it compiles
    /// (a new user signed in); the report's answer then names this envelope's ETag.
    pub after_report: Option<String>,
    pub fetches: usize,
    /// Envelopes the agent showed as the one it holds (after a rollback refusal).
    pub held_proofs: Vec<String>,
}

pub struct Mock {
    pub url: String,
    pub state: Arc<Mutex<MockState>>,
}

impl Mock {
    pub fn start() -> Mock {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(MockState {
            trust: Some(TrustBundle {
                root_public_key: PublicKeyEntry::new(&root().verifying_key()).public,
                key_lists: vec![sign_key_list(&root(), 1, NOW - 100, &[signer().verifying_key()])],
            }),
            ..Default::default()
        }));
        let st = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                let (mut len, mut inm) = (0usize, None);
                loop {
                    let mut h = String::new();
                    reader.read_line(&mut h).unwrap();
                    if h.trim().is_empty() {
                        break;
                    }
                    let (k, v) = h.split_once(':').unwrap();
                    match k.to_ascii_lowercase().as_str() {
                        "content-length" => len = v.trim().parse().unwrap(),
                        "if-none-match" => inm = Some(v.trim().to_string()),
                        _ => {}
                    }
                }
                let mut body = vec![0; len];
                reader.read_exact(&mut body).unwrap();
                let mut s = st.lock().unwrap();
                let (status, out) = match path.as_str() {
                    "/api/v1/enroll" => (
                        201,
                        json!({"device_id": DEVICE, "credential": format!("tdev.{DEVICE}.secret"),
                               "trust": s.trust, "escrow_public_key": null, "server_time": NOW})
                        .to_string(),
                    ),
                    "/api/v1/device/config" => {
                        s.fetches += 1;
                        let etag = etag_of(&s.envelope);
                        if inm.as_deref() == Some(etag.as_str()) {
                            (304, String::new())
                        } else {
                            (200, s.envelope.clone())
                        }
                    }
                    "/api/v1/device/trust" | "/api/v1/trust" => (200, serde_json::to_string(&s.trust).unwrap()),
                    "/api/v1/device/config/held" => {
                        s.held_proofs.push(String::from_utf8(body).unwrap());
                        (200, json!({"etag": etag_of(&s.envelope)}).to_string())
                    }
                    "/api/v1/device/report" if s.fail_reports => {
                        s.failed_reports += 1;
                        (500, json!({"detail": "the server failed to handle this request"}).to_string())
                    }
                    "/api/v1/device/report" => {
                        s.reports.push(serde_json::from_slice(&body).unwrap());
                        if let Some(next) = s.after_report.take() {
                            s.envelope = next;
                        }
                        (202, json!({"etag": etag_of(&s.envelope)}).to_string())
                    }
                    _ => (404, "{}".into()),
                };
                let reason = match status {
                    200 => "OK",
                    201 => "Created",
                    202 => "Accepted",
                    304 => "Not Modified",
                    500 => "Internal Server Error",
                    _ => "Not Found",
                };
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{out}",
                    out.len()
                );
            }
        });
        Mock { url, state }
    }

    pub fn serve(&self, envelope: String) {
        self.state.lock().unwrap().envelope = envelope;
    }

    pub fn last_report(&self) -> Value {
        self.state.lock().unwrap().reports.last().cloned().expect("a report was sent")
    }

    /// How many reports the mock acknowledged.
    pub fn reports(&self) -> usize {
        self.state.lock().unwrap().reports.len()
    }
}

/// The ETag the real server would give an envelope (version and payload hash).
pub fn etag_of(envelope: &str) -> String {
    let v: Value = serde_json::from_str(envelope).unwrap_or(Value::Null);
    match (v["signed"]["version"].as_u64(), v["signed"]["payload_sha256"].as_str()) {
        (Some(ver), Some(sha)) => envelope_etag(ver, sha),
        _ => "\"none\"".into(),
    }
}

pub fn envelope(device: &str, version: u64, expires_at: i64, marker: &str, key: &SigningKey) -> String {
    issue(
        &EnvelopeFields { device_id: device, user_id: None, version, issued_at: NOW - 10, expires_at },
        // Only the good configuration keeps Delivery Optimization on: every other one turns it off,
        // so applying any of them would remove the registry values the good one wrote.
        json!({"machine": {"Policies": {"Marker": marker, "SetNetworkOptimizationID": marker == "good"}}, "users": {}}),
        key,
    )
    .unwrap()
    .bytes
}
