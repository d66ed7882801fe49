//! Bad input at every edge: each answer is a 4xx problem+json a person can act on, never a 5xx.

mod common;

use common::Server;
use serde_json::{json, Value};

struct Call<'a> {
    method: &'a str,
    path: &'a str,
    auth: Option<String>,
    content_type: Option<&'a str>,
    body: Option<Vec<u8>>,
}

/// Raw HTTP/1.1 so that an oversized body the server refuses before reading it all still yields
/// the server's answer (a client library may give up with a broken pipe instead).
fn send(server: &Server, c: &Call) -> (u16, Option<String>, Value) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(&server.addr).unwrap();
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    let body = c.body.clone().unwrap_or_default();
    let mut head = format!(
        "{} {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
        c.method,
        c.path,
        server.addr,
        body.len()
    );
    if let Some(a) = &c.auth {
        head.push_str(&format!("Authorization: {a}\r\n"));
    }
    if let Some(ct) = c.content_type {
        head.push_str(&format!("Content-Type: {ct}\r\n"));
    }
    head.push_str("\r\n");
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(&body);
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status: u16 = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let ct = head.lines().find_map(|l| {
        l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("content-type")).map(|(_, v)| v.trim().to_string())
    });
    (status, ct, serde_json::from_str(body).unwrap_or(Value::Null))
}

#[test]
fn every_endpoint_answers_bad_input_with_a_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"), "127.0.0.1:0");
    let admin = Some(format!("Bearer {}", server.token));
    let token = server.enroll_token(1);
    let enrolled: Value = ureq::post(&format!("{}/api/v1/enroll", server.url))
        .send_json(json!({"token": token, "hostname": "PC", "agent_version": "t"}))
        .unwrap()
        .into_json()
        .unwrap();
    let device = Some(format!("Bearer {}", enrolled["credential"].as_str().unwrap()));
    let id = enrolled["device_id"].as_str().unwrap().to_string();
    let json_ct = Some("application/json");
    let huge = {
        let mut v = b"[".to_vec();
        v.extend(std::iter::repeat_n(b"1,".as_slice(), 700_000).flatten());
        v.extend_from_slice(b"1]");
        v
    };
    let wrong_admin = Some("Bearer tadm.0000000000000000.nope".to_string());
    let forged_device = Some(format!("Bearer tdev.{id}.forged"));
    let dev_path = format!("/api/v1/admin/devices/{id}/primary");
    // (method, path, auth, content type, body, expected status, expected code)
    let cases: Vec<(Call, u16, &str)> = vec![
        (
            Call {
                method: "POST",
                path: "/api/v1/enroll",
                auth: None,
                content_type: json_ct,
                body: Some(b"{".to_vec()),
            },
            400,
            "bad_request",
        ),
        (
            Call {
                method: "POST",
                path: "/api/v1/enroll",
                auth: None,
                content_type: json_ct,
                body: Some(br#"{"token":5}"#.to_vec()),
            },
            400,
            "bad_request",
        ),
        (
            Call {
                method: "POST",
                path: "/api/v1/enroll",
                auth: None,
                content_type: json_ct,
                body: Some(br#"{"token":"x","hostname":"h","agent_version":"1"}"#.to_vec()),
            },
            401,
            "unauthorized",
        ),
        (
            Call {
                method: "POST",
                path: "/api/v1/enroll",
                auth: None,
                content_type: json_ct,
                body: Some(format!(r#"{{"token":"{token}","hostname":"h","agent_version":"1"}}"#).into_bytes()),
            },
            401,
            "unauthorized",
        ),
        (
            Call {
                method: "POST",
                path: "/api/v1/enroll",
                auth: None,
                content_type: Some("text/plain"),
                body: Some(b"{}".to_vec()),
            },
            415,
            "unsupported_media_type",
        ),
        (
            Call {
                method: "POST",
                path: "/api/v1/enroll",
                auth: None,
                content_type: json_ct,
                body: Some(huge.clone()),
            },
            413,
            "payload_too_large",
        ),
        (
            Call { method: "GET", path: "/api/v1/device/config", auth: None, content_type: None, body: None },
            401,
            "unauthorized",
        ),
        (
            Call {
                method: "GET",
                path: "/api/v1/device/config",
                auth: forged_device.clone(),
                content_type: None,
                body: None,
            },
            401,
            "unauthorized",
        ),
        (
            Call { method: "GET", path: "/api/v1/device/config", auth: admin.clone(), content_type: None, body: None },
            401,
            "unauthorized",
        ),
        (
            Call {
                method: "GET",
                path: "/api/v1/device/trust",
                auth: Some("Basic abc".into()),
                content_type: None,
                body: None,
            },
            401,
            "unauthorized",
        ),
        (
            Call {
                method: "POST",
                path: "/api/v1/device/report",
                auth: device.clone(),
                content_type: json_ct,
                body: Some(b"[]".to_vec()),
            },
            400,
            "bad_request",
        ),
        (
            Call {
                method: "POST",
                path: "/api/v1/device/report",
                auth: device.clone(),
                content_type: json_ct,
                body: Some(br#"{"agent_version":"1","hostname":"h","signed_in_users":["not a upn"]}"#.to_vec()),
            },
            400,
            "bad_request",
        ),
        (
            Call {
                method: "POST",
                path: "/api/v1/device/report",
                auth: device.clone(),
                content_type: json_ct,
                body: Some(huge.clone()),
            },
            413,
            "payload_too_large",
        ),
        (
            Call {
                method: "POST",
                path: "/api/v1/device/report",
                auth: None,
                content_type: json_ct,
                body: Some(b"{}".to_vec()),
            },
            401,
            "unauthorized",
        ),
        (
            Call {
                method: "POST",
                path: "/api/v1/admin/enroll-tokens",
                auth: None,
                content_type: json_ct,
                body: Some(b"{}".to_vec()),
            },
            401,
            "unauthorized",
        ),
        (
            Call {
                method: "POST",
                path: "/api/v1/admin/enroll-tokens",
                auth: wrong_admin.clone(),
                content_type: json_ct,
                body: Some(br#"{"uses":1,"ttl_seconds":60}"#.to_vec()),
            },
            401,
            "unauthorized",
        ),
        (
            Call {
                method: "POST",
                path: "/api/v1/admin/enroll-tokens",
                auth: device.clone(),
                content_type: json_ct,
                body: Some(br#"{"uses":1,"ttl_seconds":60}"#.to_vec()),
            },
            401,
            "unauthorized",
        ),
        (
            Call {
                method: "POST",
                path: "/api/v1/admin/enroll-tokens",
                auth: admin.clone(),
                content_type: json_ct,
                body: Some(br#"{"uses":-1,"ttl_seconds":60}"#.to_vec()),
            },
            400,
            "bad_request",
        ),
        (
            Call {
                method: "POST",
                path: "/api/v1/admin/enroll-tokens",
                auth: admin.clone(),
                content_type: json_ct,
                body: Some(br#"{"uses":0,"ttl_seconds":60}"#.to_vec()),
            },
            400,
            "bad_request",
        ),
        (
            Call {
                method: "POST",
                path: "/api/v1/admin/users/import",
                auth: admin.clone(),
                content_type: json_ct,
                body: Some(br#"{"not":"an array"}"#.to_vec()),
            },
            400,
            "bad_request",
        ),
        (
            Call {
                method: "POST",
                path: "/api/v1/admin/users/import",
                auth: admin.clone(),
                content_type: json_ct,
                body: Some(br#"[{"displayName":"no upn"}]"#.to_vec()),
            },
            400,
            "bad_request",
        ),
        (
            Call {
                method: "POST",
                path: "/api/v1/admin/users/import",
                auth: admin.clone(),
                content_type: json_ct,
                body: Some(br#"[{"userPrincipalName":"a@b.c","groups":"x"}]"#.to_vec()),
            },
            400,
            "bad_request",
        ),
        (
            Call {
                method: "PUT",
                path: "/api/v1/admin/settings",
                auth: admin.clone(),
                content_type: json_ct,
                body: Some(br#"{"scope":{"kind":"tenant"},"key":"a..b","value":1}"#.to_vec()),
            },
            400,
            "bad_request",
        ),
        (
            Call {
                method: "PUT",
                path: "/api/v1/admin/settings",
                auth: admin.clone(),
                content_type: json_ct,
                body: Some(br#"{"scope":{"kind":"tenant"},"key":"A.B"}"#.to_vec()),
            },
            400,
            "bad_request",
        ),
        (
            Call {
                method: "PUT",
                path: "/api/v1/admin/settings",
                auth: admin.clone(),
                content_type: json_ct,
                body: Some(br#"{"scope":{"kind":"user","name":"ghost@x.com"},"key":"Custom.B","value":1}"#.to_vec()),
            },
            404,
            "not_found",
        ),
        (
            Call {
                method: "PUT",
                path: "/api/v1/admin/settings",
                auth: admin.clone(),
                content_type: json_ct,
                body: Some(br#"{"scope":{"kind":"tenant"},"key":"Policies.NoSuchThing","value":true}"#.to_vec()),
            },
            400,
            "unknown_setting",
        ),
        (
            Call {
                method: "PUT",
                path: "/api/v1/admin/settings",
                auth: admin.clone(),
                content_type: json_ct,
                body: Some(
                    br#"{"scope":{"kind":"tenant"},"key":"Policies.SetNetworkOptimizationID","value":5}"#.to_vec(),
                ),
            },
            400,
            "invalid_setting_value",
        ),
        (
            Call {
                method: "PUT",
                path: "/api/v1/admin/settings",
                auth: admin.clone(),
                content_type: json_ct,
                body: Some(br#"{"scope":{"kind":"planet"},"key":"A","value":1}"#.to_vec()),
            },
            400,
            "bad_request",
        ),
        (
            Call {
                method: "POST",
                path: "/api/v1/admin/settings/unset",
                auth: admin.clone(),
                content_type: json_ct,
                body: Some(br#"{"scope":{"kind":"tenant"},"key":"Never.Set"}"#.to_vec()),
            },
            404,
            "not_found",
        ),
        (
            Call {
                method: "GET",
                path: "/api/v1/admin/devices/nope",
                auth: admin.clone(),
                content_type: None,
                body: None,
            },
            404,
            "not_found",
        ),
        (
            Call {
                method: "PUT",
                path: &dev_path,
                auth: admin.clone(),
                content_type: json_ct,
                body: Some(br#"{"upn":"ghost@x.com"}"#.to_vec()),
            },
            404,
            "not_found",
        ),
        (
            Call {
                method: "PUT",
                path: &dev_path,
                auth: admin.clone(),
                content_type: json_ct,
                body: Some(br#"{"upn":7}"#.to_vec()),
            },
            400,
            "bad_request",
        ),
        (
            Call {
                method: "POST",
                path: "/api/v1/admin/devices/nope/decommission",
                auth: admin.clone(),
                content_type: None,
                body: None,
            },
            404,
            "not_found",
        ),
        (
            Call {
                method: "GET",
                path: "/api/v1/admin/settings?tenant=true&group=x",
                auth: admin.clone(),
                content_type: None,
                body: None,
            },
            400,
            "bad_request",
        ),
        (
            Call {
                method: "GET",
                path: "/api/v1/admin/audit?limit=abc",
                auth: admin.clone(),
                content_type: None,
                body: None,
            },
            400,
            "bad_request",
        ),
        (
            Call {
                method: "DELETE",
                path: "/api/v1/admin/devices",
                auth: admin.clone(),
                content_type: None,
                body: None,
            },
            405,
            "method_not_allowed",
        ),
        (
            Call { method: "GET", path: "/api/v2/anything", auth: None, content_type: None, body: None },
            404,
            "not_found",
        ),
    ];
    for (call, status, code) in &cases {
        let (got, ct, body) = send(&server, call);
        let what = format!(
            "{} {} {:?}",
            call.method,
            call.path,
            call.body.as_ref().map(|b| String::from_utf8_lossy(&b[..b.len().min(80)]).to_string())
        );
        assert_eq!(got, *status, "{what}: {body}");
        assert_eq!(ct.as_deref(), Some("application/problem+json"), "{what}");
        assert_eq!(body["code"], json!(code), "{what}: {body}");
        assert_eq!(body["status"], json!(status), "{what}");
        let detail = body["detail"].as_str().unwrap_or_default();
        assert!(detail.len() > 15, "{what}: detail too thin: {detail:?}");
        assert!(!detail.contains(&server.token), "{what}: the admin token leaked");
    }
    server.stop();
}

#[test]
fn tenonctl_refuses_values_that_are_not_json() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"), "127.0.0.1:0");
    let out = server.ctl(&["settings", "set", "--tenant", "Policies.X", "yes please"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not JSON"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line on stderr: {err}");
    // Nothing was stored.
    assert_eq!(server.ctl_json(&["settings", "list"]), json!([]));
    // And `undefined` is accepted as the delete marker.
    server.ctl_ok(&["settings", "set", "--tenant", "Custom.X", "undefined"]);
    let list = server.ctl_json(&["settings", "list"]);
    assert_eq!(list[0]["value"], json!("undefined"));
    // A file that is not a JSON array is a usage error too.
    let f = tmp.path().join("users.json");
    std::fs::write(&f, "{}").unwrap();
    let out = server.ctl(&["users", "import", f.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    // Missing token.
    let out = std::process::Command::new(common::bin("tenonctl"))
        .args(["--server", &server.url, "devices", "list"])
        .env_remove("TENON_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    server.stop();
}

#[test]
fn a_second_server_on_a_data_dir_in_use_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = Server::start(&data, "127.0.0.1:0");
    let out = common::server_command("serve", &data).args(["--listen", "127.0.0.1:0"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is in use by another tenon-server"), "{err}");
    // The first one is unharmed.
    assert!(ureq::get(&format!("{}/healthz", server.url)).call().is_ok());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(data.join("admin.token")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    server.stop();
}
