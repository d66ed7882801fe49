//! The package engine as the agent runs it, on the simulated platform with an in-memory content
//! source: the user restrictions (primary, secondary, both, IgnoreUserRestrictions), a resumed
//! download that fetches no byte twice, a timeout, and a kill in the middle of an install.

use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use std::cell::RefCell;
use std::path::Path;
use tenon_agent::client::{ClientError, DownloadError};
use tenon_agent::platform::simulated::SimulatedPlatform;
use tenon_agent::policies::packages::{run, ContentSource, PackagesRun};
use tenon_agent::policies::NoStore;
use tenon_core::packages::{PackageReport, State};

const NOW: i64 = 1_767_225_600;

/// Content served from memory; `cut_after` makes the next fetch stop after that many bytes.
struct Memory {
    content: Vec<u8>,
    cut_after: RefCell<Option<usize>>,
    /// (offset asked, bytes sent) of each fetch.
    fetches: RefCell<Vec<(u64, usize)>>,
}

impl ContentSource for Memory {
    fn fetch(&self, _sha256: &str, offset: u64, out: &mut dyn std::io::Write) -> Result<u64, DownloadError> {
        let rest = &self.content[offset as usize..];
        let cut = self.cut_after.borrow_mut().take();
        let n = cut.unwrap_or(rest.len()).min(rest.len());
        out.write_all(&rest[..n]).map_err(DownloadError::Write)?;
        self.fetches.borrow_mut().push((offset, n));
        if cut.is_some() {
            return Err(DownloadError::Client(ClientError::Unreachable {
                url: "test".into(),
                detail: "connection reset".into(),
            }));
        }
        Ok(offset)
    }
}

fn plan(content: &[u8], users: &str, timeout: u64) -> Value {
    json!({"App": {
        "name": "App", "version": "1.0", "kind": "exe", "sha256": hex::encode(Sha256::digest(content)),
        "size": content.len(), "file_name": "app-setup.exe", "install_args": "/S", "uninstall_args": "",
        "detect": "file:C:\\App\\app.exe", "depends_on": [], "order": 0, "timeout_secs": timeout,
        "intent": "required", "users": users}})
}

struct Dev {
    dir: tempfile::TempDir,
    platform: SimulatedPlatform,
    state: Value,
}

impl Dev {
    fn new(signed_in: &[&str]) -> Dev {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("device.json");
        std::fs::write(&path, json!({"signed_in_users": signed_in}).to_string()).unwrap();
        let platform = SimulatedPlatform::open(&path).unwrap();
        Dev { dir, platform, state: Value::Null }
    }

    fn edit(&self, key: &str, v: Value) {
        let path = self.dir.path().join("device.json");
        let mut d: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        d[key] = v;
        std::fs::write(&path, d.to_string()).unwrap();
    }

    fn device(&self) -> Value {
        serde_json::from_slice(&std::fs::read(self.dir.path().join("device.json")).unwrap()).unwrap()
    }

    fn run(&mut self, machine: Value, content: &dyn ContentSource, now: i64) -> PackageReport {
        let dir = self.dir.path().join("packages");
        let machine: Map<String, Value> = machine.as_object().unwrap().clone();
        let mut r = PackagesRun {
            platform: &self.platform,
            machine: &machine,
            now,
            state: &mut self.state,
            store: &NoStore,
            content,
            dir: &dir,
        };
        let (_, mut reports) = run(&mut r);
        reports.remove("App").expect("App is reported")
    }

    fn packages_dir(&self) -> &Path {
        self.dir.path()
    }
}

fn machine(primary: Option<&str>, plan: Value, ignore: bool) -> Value {
    let mut client = json!({});
    if let Some(p) = primary {
        client["PrimaryUser"] = json!(p);
    }
    if ignore {
        client["MandatoryInstalls"] = json!({"IgnoreUserRestrictions": true});
    }
    json!({"Client": client, "Packages": plan})
}

fn memory(content: &[u8]) -> Memory {
    Memory { content: content.to_vec(), cut_after: RefCell::new(None), fetches: RefCell::new(Vec::new()) }
}

#[test]
fn user_restrictions_decide_when_a_required_package_installs() {
    let content = b"MZ app installer".to_vec();
    let src = memory(&content);
    let cases: [(&str, &[&str], bool, State, &str); 8] = [
        ("primary", &["anna@x.com"], false, State::Installed, ""),
        ("primary", &["bob@x.com"], false, State::Waiting, "primary user anna@x.com is not signed in"),
        ("primary", &["bob@x.com"], true, State::Installed, ""),
        ("secondary", &["anna@x.com"], false, State::Waiting, "no user other than the primary user is signed in"),
        ("secondary", &["anna@x.com", "bob@x.com"], false, State::Installed, ""),
        ("both", &[], false, State::Waiting, "no user is signed in"),
        ("both", &["bob@x.com"], false, State::Installed, ""),
        ("both", &["anna@x.com"], false, State::Installed, ""),
    ];
    for (users, signed_in, ignore, want, why) in cases {
        let mut d = Dev::new(signed_in);
        let r = d.run(machine(Some("anna@x.com"), plan(&content, users, 60), ignore), &src, NOW);
        assert_eq!(r.state, want, "{users} with {signed_in:?} (ignore {ignore}): {r:?}");
        if !why.is_empty() {
            assert_eq!(r.detail.as_deref(), Some(why));
        }
    }
    // Without a primary user, `primary` waits.
    let mut d = Dev::new(&["bob@x.com"]);
    let r = d.run(machine(None, plan(&content, "primary", 60), false), &src, NOW);
    assert_eq!((r.state, r.detail.as_deref()), (State::Waiting, Some("the device has no primary user")));
}

#[test]
fn an_interrupted_download_resumes_without_fetching_a_byte_twice() {
    let content: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let src = memory(&content);
    let mut d = Dev::new(&["anna@x.com"]);
    *src.cut_after.borrow_mut() = Some(1_234_567);
    let m = machine(Some("anna@x.com"), plan(&content, "primary", 60), false);
    let r = d.run(m.clone(), &src, NOW);
    assert_eq!(r.state, State::Failed, "{r:?}");
    assert!(r.detail.as_deref().unwrap().contains("resumes where it stopped"), "{r:?}");
    assert!(d.device().get("installer_runs").is_none(), "nothing partial runs");
    // A network problem does not use up the retry budget; after the short wait it resumes.
    let r = d.run(m, &src, NOW + 301);
    assert_eq!(r.state, State::Installed, "{r:?}");
    let fetches = src.fetches.borrow().clone();
    assert_eq!(fetches, vec![(0, 1_234_567), (1_234_567, 3_000_000 - 1_234_567)]);
    let fetched: usize = fetches.iter().map(|f| f.1).sum();
    println!(
        "resumed download: {} bytes content, {} fetched, {} fetched twice",
        content.len(),
        fetched,
        fetched - content.len()
    );
    assert_eq!(fetched, content.len());
    let held = d.packages_dir().join("packages").join(hex::encode(Sha256::digest(&content))).join("app-setup.exe");
    assert_eq!(std::fs::read(held).unwrap(), content);
    // What runs as SYSTEM (root) lies where only it may write.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(d.packages_dir().join("packages")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "STATE_DIR/packages is owner-only: {mode:o}");
    }
}

#[test]
fn a_hung_installer_times_out_and_a_killed_agent_detects_first() {
    let content = b"MZ slow installer".to_vec();
    let src = memory(&content);
    let mut d = Dev::new(&["anna@x.com"]);
    d.edit("installer_exit_codes", json!({"App": ["hang"]}));
    let m = machine(Some("anna@x.com"), plan(&content, "primary", 120), false);
    let r = d.run(m.clone(), &src, NOW);
    assert_eq!(r.state, State::TimedOut, "{r:?}");
    assert!(r.detail.as_deref().unwrap().contains("longer than 120 s"), "{r:?}");

    // A kill in the middle of the next run: the state says it was running. The installer did
    // finish (the file is there): detection comes first and nothing runs again.
    let mem = &mut d.state["packages"]["App"];
    mem["running"] = json!(true);
    mem["report"] = json!({"state": "installing", "version": "1.0"});
    mem["not_before"] = json!(0);
    d.edit("files", json!({"C:\\App\\app.exe": {"version": "1.0"}}));
    let runs_before = d.device()["installer_runs"].as_array().unwrap().len();
    let r = d.run(m, &src, NOW + 600);
    assert_eq!(r.state, State::Installed, "{r:?}");
    assert_eq!(d.device()["installer_runs"].as_array().unwrap().len(), runs_before);
}
