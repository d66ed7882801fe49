//! End to end for software packages (issue 15) with the real server, tenonctl and simulated
//! agents: upload (an MSI's own properties read, bad uploads refused), assignment with the
//! primary-user restriction, download checked against the signed plan, install, upgrade,
//! uninstall, Intune's exit codes, retries, install requests, tampered content and a full disk.

mod common;

use common::{Server, SimAgent};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

const ANNA: &str = "anna@contoso.com";
const BEN: &str = "ben@contoso.com";
const V1_CODE: &str = "{A1B2C3D4-0001-4000-8000-000000000001}";
const V2_CODE: &str = "{A1B2C3D4-0002-4000-8000-000000000002}";

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/packages").join(name)
}

fn setup(tmp: &Path) -> Server {
    let server = Server::start(&tmp.join("data"), "127.0.0.1:0");
    let users = tmp.join("users.json");
    std::fs::write(
        &users,
        json!([
            {"userPrincipalName": ANNA, "id": "u-anna", "displayName": "Anna Adams", "groups": ["Staff"]},
            {"userPrincipalName": BEN, "id": "u-ben", "displayName": "Ben Brown", "groups": ["Staff"]}
        ])
        .to_string(),
    )
    .unwrap();
    server.ctl_ok(&["users", "import", users.to_str().unwrap()]);
    server
}

fn fails(server: &Server, args: &[&str]) -> String {
    let out = server.ctl(args);
    assert!(!out.status.success(), "tenonctl {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn package(server: &Server, id: &str, name: &str) -> Value {
    server.ctl_json(&["devices", "show", id])["packages"][name].clone()
}

fn runs(agent: &SimAgent) -> Vec<Value> {
    agent.device()["installer_runs"].as_array().cloned().unwrap_or_default()
}

fn set(agent: &SimAgent, key: &str, v: Value) {
    let mut d = agent.device();
    d[key] = v;
    agent.set_device(&d);
}

fn sync(agent: &SimAgent) {
    agent.ok(&["sync", "--once"]);
}

#[test]
fn msi_is_installed_for_the_signed_in_primary_user_upgraded_and_uninstalled() {
    let tmp = tempfile::tempdir().unwrap();
    let server = setup(tmp.path());

    // Upload: the MSI's properties come from the MSI; detection defaults to its product code.
    let up = server.ctl_json(&[
        "packages",
        "upload",
        fixture("app-1.0.0.msi").to_str().unwrap(),
        "--name",
        "Fixture App",
        "--version",
        "1.0.0",
    ]);
    assert_eq!(up["detect"], json!(format!("msi:{V1_CODE}")));
    assert_eq!(up["msi"]["product_name"], json!("Tenon Fixture App"));
    assert_eq!(up["msi"]["product_version"], json!("1.0.0"));
    let sha_v1 = up["sha256"].as_str().unwrap().to_string();
    let stored = tmp.path().join("data/packages/content").join(&sha_v1);
    assert_eq!(std::fs::read(&stored).unwrap(), std::fs::read(fixture("app-1.0.0.msi")).unwrap());
    let list = server.ctl_json(&["packages", "list"]);
    assert_eq!(list[0]["name"], json!("Fixture App"));
    assert_eq!(list[0]["kind"], json!("msi"));

    // A: Anna is its primary user and signed in. B: Ben's device, Ben signed out.
    let a = SimAgent::new(tmp.path(), "a", json!({"hostname": "PC-A", "signed_in_users": [ANNA]}));
    let b = SimAgent::new(tmp.path(), "b", json!({"hostname": "PC-B", "signed_in_users": [BEN]}));
    let token = server.enroll_token(2);
    let id_a = a.enroll(&server, &token);
    let id_b = b.enroll(&server, &token);
    sync(&a);
    sync(&b);
    set(&b, "signed_in_users", json!([]));
    sync(&b);

    server.ctl_ok(&["packages", "assign", "Fixture App", "--group", "Staff", "--wait"]);
    // The plan is in the signed payload, with the content's hash and size.
    sync(&a);
    let plan = &a.held_payload()["machine"]["Packages"]["Fixture App"];
    assert_eq!(plan["sha256"], json!(sha_v1));
    assert_eq!(plan["intent"], json!("required"));
    assert_eq!(plan["users"], json!("primary"));
    let dev = a.device();
    assert_eq!(dev["msi_products"][V1_CODE], json!("1.0.0"), "{dev}");
    let r = runs(&a);
    assert_eq!(r.len(), 1);
    let cmd = r[0]["command"].as_str().unwrap();
    assert!(cmd.starts_with("msiexec.exe /i ") && cmd.contains("/qn /norestart /l*v"), "{cmd}");
    assert_eq!(package(&server, &id_a, "Fixture App")["state"], json!("installed"));

    // B waits for its primary user, and says so.
    sync(&b);
    let pb = package(&server, &id_b, "Fixture App");
    assert_eq!(pb["state"], json!("waiting"), "{pb}");
    assert!(pb["detail"].as_str().unwrap().contains("ben@contoso.com is not signed in"), "{pb}");
    assert!(runs(&b).is_empty());
    let st = server.ctl_json(&["packages", "status", "Fixture App"]);
    assert_eq!(st["counts"], json!({"installed": 1, "waiting": 1}), "{st}");
    assert_eq!(st["version"], json!("1.0.0"));
    // Another sync with nothing changed runs nothing: detection says installed.
    sync(&a);
    assert_eq!(runs(&a).len(), 1);

    // Ben signs in: it installs.
    set(&b, "signed_in_users", json!([BEN]));
    sync(&b);
    assert_eq!(package(&server, &id_b, "Fixture App")["state"], json!("installed"));

    // The higher version replaces the first; the old content is gone from the server.
    let up2 = server.ctl_json(&[
        "packages",
        "upload",
        fixture("app-2.0.0.msi").to_str().unwrap(),
        "--name",
        "Fixture App",
        "--version",
        "2.0.0",
        "--wait",
    ]);
    assert_eq!(up2["previous_version"], json!("1.0.0"));
    assert!(!stored.exists(), "the previous version's content is deleted");
    sync(&a);
    assert_eq!(a.device()["msi_products"][V2_CODE], json!("2.0.0"));
    let pa = package(&server, &id_a, "Fixture App");
    assert_eq!((pa["state"].clone(), pa["version"].clone()), (json!("installed"), json!("2.0.0")), "{pa}");
    // The agent keeps only the content of its plan.
    let held: Vec<String> = std::fs::read_dir(a.state_dir.join("packages"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "logs")
        .collect();
    assert_eq!(held, vec![up2["sha256"].as_str().unwrap().to_string()]);

    // Removal is refused while assigned, naming the assignment.
    let err = fails(&server, &["packages", "remove", "Fixture App"]);
    assert!(err.contains("--group \"Staff\""), "{err}");

    // Uninstall intent for Anna: msiexec /x by product code, confirmed by detection.
    server.ctl_ok(&["packages", "assign", "Fixture App", "--user", ANNA, "--intent", "uninstall", "--wait"]);
    sync(&a);
    let last = runs(&a).last().cloned().unwrap();
    assert!(
        last["command"].as_str().unwrap().starts_with(&format!("msiexec.exe /x {V2_CODE} /qn /norestart")),
        "{last}"
    );
    assert!(a.device()["msi_products"].get(V2_CODE).is_none());
    assert_eq!(package(&server, &id_a, "Fixture App")["state"], json!("uninstalled"));
    // Ben keeps it.
    sync(&b);
    assert_eq!(package(&server, &id_b, "Fixture App")["state"], json!("installed"));

    // Unassigned everywhere, then removed with its content.
    server.ctl_ok(&["packages", "unassign", "Fixture App", "--user", ANNA]);
    server.ctl_ok(&["packages", "unassign", "Fixture App", "--group", "Staff"]);
    server.ctl_ok(&["packages", "remove", "Fixture App"]);
    assert!(server.ctl_json(&["packages", "list"]).as_array().unwrap().is_empty());
    let audit = server.ctl_ok(&["audit", "list", "--json"]);
    for action in ["packages.upload", "packages.update", "packages.assign", "packages.unassign", "packages.remove"] {
        assert!(audit.contains(action), "audit has {action}");
    }
}

#[test]
fn exit_codes_retries_requests_dependencies_and_bad_content() {
    let tmp = tempfile::tempdir().unwrap();
    let server = setup(tmp.path());
    let exe = tmp.path().join("tool-setup.exe");
    std::fs::write(&exe, b"MZ fake installer").unwrap();
    let script = tmp.path().join("runtime.cmd");
    std::fs::write(&script, b"@echo off\r\nexit /b 3010\r\n").unwrap();

    // Bad input is refused with what to do; nothing is kept.
    let trunc = tmp.path().join("broken.msi");
    std::fs::write(&trunc, &std::fs::read(fixture("app-1.0.0.msi")).unwrap()[..4000]).unwrap();
    let e = fails(&server, &["packages", "upload", trunc.to_str().unwrap(), "--name", "Broken", "--version", "1"]);
    assert!(e.contains("not an MSI"), "{e}");
    let e = fails(
        &server,
        &["packages", "upload", exe.to_str().unwrap(), "--name", "Tool", "--version", "1", "--kind", "zip"],
    );
    assert!(e.contains("msi, exe or script") || e.contains("kind"), "{e}");
    let e = fails(
        &server,
        &[
            "packages",
            "upload",
            exe.to_str().unwrap(),
            "--name",
            "Tool",
            "--version",
            "1",
            "--detect",
            "file:relative.exe",
        ],
    );
    assert!(e.contains("detection rule"), "{e}");
    let e = fails(
        &server,
        &[
            "packages",
            "upload",
            exe.to_str().unwrap(),
            "--name",
            "Tool",
            "--version",
            "1",
            "--detect",
            r"file:C:\Tool\tool.exe",
            "--install-args",
            "/S\n/X",
        ],
    );
    assert!(e.contains("--install-args"), "{e}");
    let e = fails(&server, &["packages", "upload", exe.to_str().unwrap(), "--name", "Tool", "--version", "1"]);
    assert!(e.contains("--detect"), "{e}");
    let e = fails(
        &server,
        &[
            "packages",
            "upload",
            exe.to_str().unwrap(),
            "--name",
            "Tool",
            "--version",
            "1",
            "--detect",
            r"file:C:\Tool\tool.exe",
            "--depends-on",
            "Runtime",
        ],
    );
    assert!(e.contains("Runtime") && e.contains("not uploaded"), "{e}");
    let tmp_left = std::fs::read_dir(tmp.path().join("data/packages/tmp")).unwrap().count();
    assert_eq!(tmp_left, 0, "no partial content kept");
    assert!(std::fs::read_dir(tmp.path().join("data/packages/content")).unwrap().next().is_none());

    // Runtime (a script that asks for a restart), Tool depends on it (an EXE that fails twice).
    server.ctl_ok(&[
        "packages",
        "upload",
        script.to_str().unwrap(),
        "--name",
        "Runtime",
        "--version",
        "1.0",
        "--detect",
        r"registry:HKLM\SOFTWARE\Contoso\Runtime:Version>=1.0",
    ]);
    server.ctl_ok(&[
        "packages",
        "upload",
        exe.to_str().unwrap(),
        "--name",
        "Tool",
        "--version",
        "2.1",
        "--install-args",
        "/S /norestart",
        "--detect",
        r"file:C:\Program Files\Tool\tool.exe>=2.1",
        "--depends-on",
        "Runtime",
        "--timeout",
        "10m",
    ]);
    // A cycle is refused, naming it.
    let e = fails(
        &server,
        &[
            "packages",
            "upload",
            script.to_str().unwrap(),
            "--name",
            "Runtime",
            "--version",
            "1.1",
            "--detect",
            r"registry:HKLM\SOFTWARE\Contoso\Runtime:Version>=1.0",
            "--depends-on",
            "Tool",
        ],
    );
    assert!(e.contains("Runtime -> Tool -> Runtime") || e.contains("Tool -> Runtime -> Tool"), "{e}");

    let a = SimAgent::new(
        tmp.path(),
        "a",
        json!({"hostname": "PC-A", "signed_in_users": [ANNA],
               "installer_exit_codes": {"Tool": [1603, 1618], "Runtime": [3010]}}),
    );
    let id = a.enroll(&server, &server.enroll_token(1));
    sync(&a);
    // Available: nothing runs until asked.
    server.ctl_ok(&["packages", "assign", "Tool", "--user", ANNA, "--intent", "available", "--wait"]);
    sync(&a);
    let p = package(&server, &id, "Tool");
    assert_eq!(p["state"], json!("waiting"), "{p}");
    assert!(p["detail"].as_str().unwrap().contains("available"), "{p}");
    // The dependency came along with the dependent's intent.
    assert_eq!(package(&server, &id, "Runtime")["state"], json!("waiting"));
    assert!(runs(&a).is_empty());

    // Asked at the device: Runtime first (3010: reboot pending, Tenon does not restart), then
    // Tool, which fails with 1603: the code and the log in the report, retried after a backoff.
    a.ok(&["install", "Tool"]);
    let r = runs(&a);
    assert_eq!(r.iter().map(|r| r["package"].clone()).collect::<Vec<_>>(), vec![json!("Runtime"), json!("Tool")]);
    assert!(r[0]["command"].as_str().unwrap().starts_with("cmd.exe /c "), "{r:?}");
    assert!(r[1]["command"].as_str().unwrap().ends_with("tool-setup.exe /S /norestart"), "{r:?}");
    sync(&a);
    let rt = package(&server, &id, "Runtime");
    assert_eq!(rt["state"], json!("reboot_pending"), "Tenon never restarts a device: {rt}");
    let t = package(&server, &id, "Tool");
    assert_eq!((t["state"].clone(), t["exit_code"].clone()), (json!("failed"), json!(1603)), "{t}");
    assert!(t["log_tail"].as_str().unwrap().contains("simulated run"), "{t}");
    // Within the backoff nothing runs again.
    sync(&a);
    assert_eq!(runs(&a).len(), 2);
    // After it: 1618 (another installation running) waits with a retry time, not a failure.
    let later = |offset: &str| {
        let out = a.command(&["sync", "--once"]).env("TENON_AGENT_CLOCK_OFFSET", offset).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    later("6m");
    let t = package(&server, &id, "Tool");
    assert_eq!(t["state"], json!("waiting"), "{t}");
    assert!(t["detail"].as_str().unwrap().contains("retry after"), "{t}");
    later("20m");
    let t = package(&server, &id, "Tool");
    assert_eq!((t["state"].clone(), t["version"].clone()), (json!("installed"), json!("2.1")), "{t}");
    assert_eq!(a.device()["files"][r"C:\Program Files\Tool\tool.exe"]["version"], json!("2.1"));
    assert_eq!(runs(&a).len(), 4);

    // Three failures, then it stays failed until an administrator asks again.
    server.ctl_ok(&[
        "packages",
        "upload",
        exe.to_str().unwrap(),
        "--name",
        "Broken Tool",
        "--version",
        "1",
        "--detect",
        r"file:C:\Broken\b.exe",
    ]);
    set(&a, "installer_exit_codes", json!({"Broken Tool": [2, 2, 2, 2]}));
    server.ctl_ok(&["packages", "assign", "Broken Tool", "--tenant", "--wait"]);
    sync(&a);
    later("10m");
    later("50m");
    later("4h");
    later("8h");
    let count = |name: &str| runs(&a).iter().filter(|r| r["package"] == json!(name)).count();
    assert_eq!(count("Broken Tool"), 3, "at most 3 attempts per version");
    let bt = package(&server, &id, "Broken Tool");
    assert_eq!(bt["state"], json!("failed"));
    assert!(bt["detail"].as_str().unwrap().contains("gave up after 3 attempts"), "{bt}");
    let st = server.ctl_json(&["packages", "status", "Broken Tool"]);
    assert_eq!(st["counts"], json!({"failed": 1}));
    assert_eq!(st["devices"][0]["device_id"], json!(id));
    server.ctl_ok(&["devices", "install", &id, "Broken Tool"]);
    later("8h");
    assert_eq!(count("Broken Tool"), 4, "an administrator's request tries again");

    // Tampered content on the server's disk: the agent refuses it by hash; nothing runs.
    let tampered = tmp.path().join("tampered.exe");
    std::fs::write(&tampered, b"MZ original").unwrap();
    let up = server.ctl_json(&[
        "packages",
        "upload",
        tampered.to_str().unwrap(),
        "--name",
        "Tampered",
        "--version",
        "1",
        "--detect",
        r"file:C:\T\t.exe",
    ]);
    let on_disk = tmp.path().join("data/packages/content").join(up["sha256"].as_str().unwrap());
    std::fs::write(&on_disk, b"MZ evil!!!!").unwrap(); // same size: the hash catches it
    server.ctl_ok(&["packages", "assign", "Tampered", "--tenant", "--wait"]);
    later("8h");
    let tp = package(&server, &id, "Tampered");
    assert_eq!(tp["state"], json!("failed"), "{tp}");
    assert!(tp["detail"].as_str().unwrap().contains("does not match the signed plan"), "{tp}");
    assert_eq!(count("Tampered"), 0);

    // A full disk: a clean failure, nothing partial kept or run, retried later.
    server.ctl_ok(&["packages", "unassign", "Tampered", "--tenant"]);
    let big = tmp.path().join("big.exe");
    let mut bytes = b"MZ".to_vec();
    bytes.resize(3 * 1024 * 1024, 7);
    std::fs::write(&big, &bytes).unwrap();
    server.ctl_ok(&[
        "packages",
        "upload",
        big.to_str().unwrap(),
        "--name",
        "Big",
        "--version",
        "1",
        "--detect",
        r"file:C:\Big\big.exe",
    ]);
    server.ctl_ok(&["packages", "assign", "Big", "--tenant", "--wait"]);
    set(&a, "disk_free_bytes", json!(10 * 1024 * 1024));
    later("8h");
    let bp = package(&server, &id, "Big");
    assert_eq!(bp["state"], json!("failed"), "{bp}");
    assert!(bp["detail"].as_str().unwrap().contains("not enough disk space"), "{bp}");
    assert_eq!(count("Big"), 0);
    set(&a, "disk_free_bytes", json!(10u64 << 30));
    later("9h");
    assert_eq!(package(&server, &id, "Big")["state"], json!("installed"));

    // A device may fetch only content of its own plan.
    let body = server
        .http()
        .get(&format!("{}/api/v1/device/packages/{}", server.url, "0".repeat(64)))
        .set("Authorization", "Bearer tend.nope.nope")
        .call();
    assert!(matches!(body, Err(ureq::Error::Status(401, _))));
}

fn credential(agent: &SimAgent) -> String {
    let platform = tenon_agent::platform::simulated::SimulatedPlatform::open(&agent.device_file).unwrap();
    tenon_agent::vault::Vault::new(&agent.state_dir, &platform).load().unwrap().state.credential
}

#[test]
fn content_is_served_by_range_and_only_to_devices_whose_plan_names_it() {
    let tmp = tempfile::tempdir().unwrap();
    let server = setup(tmp.path());
    let file = tmp.path().join("setup.exe");
    let mut bytes = b"MZ".to_vec();
    bytes.extend((0..2_000_000u32).map(|i| (i % 253) as u8));
    std::fs::write(&file, &bytes).unwrap();
    let up = server.ctl_json(&[
        "packages",
        "upload",
        file.to_str().unwrap(),
        "--name",
        "Tool",
        "--version",
        "1",
        "--detect",
        r"file:C:\T\t.exe",
    ]);
    let sha = up["sha256"].as_str().unwrap().to_string();
    // A: Anna's device, which gets Tool; B: Ben's, which does not.
    let a = SimAgent::new(tmp.path(), "a", json!({"hostname": "PC-A", "signed_in_users": [ANNA]}));
    let b = SimAgent::new(tmp.path(), "b", json!({"hostname": "PC-B", "signed_in_users": [BEN]}));
    let token = server.enroll_token(2);
    a.enroll(&server, &token);
    b.enroll(&server, &token);
    sync(&a);
    sync(&b);
    server.ctl_ok(&["packages", "assign", "Tool", "--user", ANNA, "--intent", "available", "--wait"]);
    let url = format!("{}/api/v1/device/packages/{sha}", server.url);
    #[allow(clippy::result_large_err)]
    let get = |cred: &str, range: Option<&str>| {
        let mut req = server.http().get(&url).set("Authorization", &format!("Bearer {cred}"));
        if let Some(r) = range {
            req = req.set("Range", r);
        }
        req.call()
    };
    // B's credential is refused for content outside its plan, like unknown content.
    match get(&credential(&b), None) {
        Err(ureq::Error::Status(404, _)) => {}
        other => panic!("B must get 404, got {other:?}"),
    }
    // A stops after the first 700,000 bytes, then asks for the rest: nothing is sent twice.
    let cred = credential(&a);
    let mut first = vec![0u8; 700_000];
    std::io::Read::read_exact(&mut get(&cred, None).unwrap().into_reader(), &mut first).unwrap();
    let rest = get(&cred, Some("bytes=700000-")).unwrap();
    assert_eq!(rest.status(), 206);
    assert_eq!(rest.header("Content-Range").unwrap(), format!("bytes 700000-{}/{}", bytes.len() - 1, bytes.len()));
    let mut tail = Vec::new();
    std::io::Read::read_to_end(&mut rest.into_reader(), &mut tail).unwrap();
    println!(
        "resumed download over HTTP: {} bytes content, {} fetched, {} fetched twice",
        bytes.len(),
        first.len() + tail.len(),
        first.len() + tail.len() - bytes.len()
    );
    first.extend(tail);
    assert_eq!(first, bytes);
}
