//! Software packages: works through the signed package plan (`payload.machine.Packages`) with
//! the pure engine of `tenon_core::packages` (what to do next, what a run means) and does only
//! the I/O here: detection and installer runs through the [`Platform`], content downloads from
//! the server into `STATE_DIR/packages/<sha256>/` (which inherits the state directory's
//! SYSTEM-and-Administrators-only ACL on Windows), checked by size and SHA-256 against the signed
//! plan before anything runs.
//!
//! What the engine remembers per package ([`Remembered`]) is persisted in the vault before and
//! after each run, so a killed agent resumes: detection first, then a fresh run; one installer at
//! a time, because packages are worked through in order on the sync thread.

use super::config_get;
use super::StateStore;
use crate::client::DownloadError;
use crate::platform::{InstallerRun, Platform};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tenon_core::api::PolicyStatus;
use tenon_core::packages::{
    backoff_secs, install_command, install_order, log_tail, next_step, run_outcome, summary_state, uninstall_command,
    Intent, PackageReport, PlanEntry, Remembered, RunEnd, Session, State, Step, StepFacts,
};
use tenon_core::policy::primary_user;

/// The name of the package status in `policies` and of its state in the vault.
pub const NAME: &str = "packages";

/// The most log-tail text one report carries, over all packages.
pub const MAX_LOG_TAILS_BYTES: usize = 24 * 1024;

/// Where content comes from (the agent: the server, with the device credential).
pub trait ContentSource {
    /// Writes the content from byte `offset` on into `out`; returns where what it wrote starts
    /// (`offset`, or 0 when the server sent everything again).
    fn fetch(&self, sha256: &str, offset: u64, out: &mut dyn Write) -> Result<u64, DownloadError>;
}

pub struct PackagesRun<'a> {
    pub platform: &'a dyn Platform,
    pub machine: &'a Map<String, Value>,
    pub now: i64,
    /// The persisted state: `{"packages": {NAME: Remembered}}`.
    pub state: &'a mut Value,
    pub store: &'a dyn StateStore,
    pub content: &'a dyn ContentSource,
    /// `STATE_DIR/packages`.
    pub dir: &'a Path,
}

/// The signed plan in a payload's machine config (empty without one).
pub fn plan_of(machine: &Map<String, Value>) -> Result<BTreeMap<String, PlanEntry>, String> {
    match machine.get("Packages") {
        None | Some(Value::Null) => Ok(BTreeMap::new()),
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| format!("the package plan cannot be read: {e}")),
    }
}

fn remembered(state: &Value) -> BTreeMap<String, Remembered> {
    state.get("packages").and_then(|v| serde_json::from_value(v.clone()).ok()).unwrap_or_default()
}

fn store_remembered(state: &mut Value, mem: &BTreeMap<String, Remembered>) {
    let v = serde_json::to_value(mem).unwrap_or(Value::Null);
    match state {
        Value::Object(m) => {
            m.insert("packages".into(), v);
        }
        _ => *state = serde_json::json!({ "packages": v }),
    }
}

/// Marks `name` as requested at the device (`tenon-agent install NAME`); the next run installs
/// it if the plan holds it. Errors name what the plan holds.
pub fn request_locally(state: &mut Value, machine: &Map<String, Value>, name: &str) -> Result<(), String> {
    let plan = plan_of(machine)?;
    let Some(e) = plan.get(name) else {
        let names: Vec<&str> = plan.keys().map(String::as_str).collect();
        return Err(format!(
            "package {name:?} is not in this device's plan (it has: {}); an administrator assigns it with `tenonctl packages assign`",
            if names.is_empty() { "none".to_string() } else { names.join(", ") }
        ));
    };
    if e.intent == Intent::Uninstall {
        return Err(format!("package {name:?} is to be uninstalled on this device, not installed"));
    }
    let mut mem = remembered(state);
    let m = mem.entry(name.to_string()).or_default();
    m.local_request = true;
    // A new request gets a fresh retry budget, as an administrator's does.
    m.attempts = 0;
    m.not_before = 0;
    store_remembered(state, &mem);
    Ok(())
}

/// Works through the plan; returns the status for `policies.packages` and each package's state.
pub fn run(r: &mut PackagesRun<'_>) -> (PolicyStatus, BTreeMap<String, PackageReport>) {
    let plan = match plan_of(r.machine) {
        Ok(p) => p,
        Err(e) => return (PolicyStatus::new("failed").with_reason(e), BTreeMap::new()),
    };
    let mut mem = remembered(r.state);
    mem.retain(|name, _| plan.contains_key(name));
    let wanted: BTreeSet<&str> = plan.values().map(|e| e.package.sha256.as_str()).collect();
    remove_unplanned_content(r.dir, &wanted);
    if plan.is_empty() {
        store_remembered(r.state, &mem);
        return (PolicyStatus::new("ok").with_reason("no packages are assigned to this device"), BTreeMap::new());
    }
    let session = Session {
        signed_in: match r.platform.signed_in_users() {
            Ok(users) => users.into_iter().map(|u| u.upn.to_lowercase()).collect(),
            Err(e) => {
                return (
                    PolicyStatus::new("failed").with_reason(format!("cannot list signed-in users: {e}")),
                    BTreeMap::new(),
                )
            }
        },
        primary: primary_user(r.machine),
        ignore_user_restrictions: config_get(r.machine, "Client.MandatoryInstalls.IgnoreUserRestrictions")
            == Some(&Value::Bool(true)),
    };
    // What is asked for brings its dependencies along (available ones too).
    let mut asked: Vec<String> = plan
        .values()
        .filter(|e| e.intent != Intent::Uninstall)
        .filter(|e| {
            mem.get(&e.package.name)
                .map_or(e.request > 0, |m| m.local_request || m.request_open || e.request > m.request)
        })
        .map(|e| e.package.name.clone())
        .collect();
    let mut seen = BTreeSet::new();
    while let Some(name) = asked.pop() {
        let Some(e) = plan.get(&name) else { continue };
        for d in &e.package.depends_on {
            if seen.insert(d.clone()) && plan.get(d).is_some_and(|de| de.intent == Intent::Available) {
                mem.entry(d.clone()).or_default().local_request = true;
                asked.push(d.clone());
            }
        }
    }
    let mut order: Vec<&PlanEntry> = install_order(&plan);
    // Removals run after the installs, dependents before what they depend on.
    let uninstalls: Vec<&PlanEntry> = order.iter().rev().filter(|e| e.intent == Intent::Uninstall).copied().collect();
    order.retain(|e| e.intent != Intent::Uninstall);
    order.extend(uninstalls);
    let mut reports: BTreeMap<String, PackageReport> = BTreeMap::new();
    for e in order {
        let name = e.package.name.clone();
        let mut m = mem.remove(&name).unwrap_or_default();
        let report = one(r, e, &mut m, &session, &reports, &mut mem);
        m.report = Some(report.clone());
        reports.insert(name.clone(), report);
        mem.insert(name, m);
        store_remembered(r.state, &mem);
        persist(r);
    }
    // The report stays far below the server's 64 KiB limit: log tails beyond this budget are left
    // out (the logs stay in STATE_DIR/packages/logs).
    let mut budget = MAX_LOG_TAILS_BYTES;
    for rep in reports.values_mut() {
        if let Some(t) = &rep.log_tail {
            if t.len() > budget {
                rep.log_tail = None;
            } else {
                budget -= t.len();
            }
        }
    }
    let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
    for rep in reports.values() {
        *counts.entry(rep.state.as_str()).or_default() += 1;
    }
    let state = summary_state(reports.values());
    let reason = counts.iter().map(|(s, n)| format!("{n} {s}")).collect::<Vec<_>>().join(", ");
    (PolicyStatus::new(state).with_reason(reason), reports)
}

/// One package: detection, the engine's step, and the download and run it asks for.
fn one(
    r: &mut PackagesRun<'_>,
    e: &PlanEntry,
    m: &mut Remembered,
    session: &Session,
    done: &BTreeMap<String, PackageReport>,
    others: &mut BTreeMap<String, Remembered>,
) -> PackageReport {
    let p = &e.package;
    let detected = match r.platform.detect(&p.detect) {
        Ok(d) => d,
        Err(err) => {
            return PackageReport::new(
                State::Failed,
                &p.version,
                Some(format!("cannot evaluate the detection rule {}: {err}", p.detect)),
            )
        }
    };
    let dependencies = p
        .depends_on
        .iter()
        .find(|d| !done.get(*d).is_some_and(|rep| matches!(rep.state, State::Installed | State::RebootPending)))
        .map_or(Ok(()), |d| Err(d.clone()));
    let facts = StepFacts { detected, session, dependencies, now: r.now };
    let uninstall = match next_step(e, m, &facts) {
        Step::Report(rep) => return rep,
        Step::Install => false,
        Step::Uninstall => true,
    };
    let log_dir = r.dir.join("logs");
    if let Err(e) = restricted_root(r.dir) {
        tracing::warn!(error = %e, dir = %r.dir.display(), "cannot restrict the packages directory");
    }
    let _ = std::fs::create_dir_all(&log_dir);
    let stem = safe_stem(&p.name);
    let log = log_dir.join(format!("{stem}.log"));
    let output = log_dir.join(format!("{stem}.out"));
    // An MSI uninstall goes by product code: no content needed.
    let needs_content = !(uninstall && p.kind == tenon_core::packages::Kind::Msi && p.detect.product_code().is_some());
    let file = if needs_content {
        // Shown while it downloads (persisted: a kill mid-download reports it honestly).
        m.report = Some(PackageReport::new(State::Downloading, &p.version, None));
        save(r, m, &p.name, others);
        match ensure_content(r, e) {
            Ok(f) => f,
            Err(Failure { detail, counts }) => {
                if counts {
                    m.attempts += 1;
                    m.not_before = r.now + backoff_secs(m.attempts);
                } else {
                    m.not_before = r.now + 5 * 60;
                }
                return PackageReport::new(State::Failed, &p.version, Some(detail));
            }
        }
    } else {
        r.dir.join(&p.sha256).join(&p.file_name)
    };
    let file_text = file.display().to_string();
    let log_text = log.display().to_string();
    let command = if uninstall {
        match uninstall_command(p, &file_text, &log_text) {
            Some(c) => c,
            None => {
                m.attempts = tenon_core::packages::MAX_ATTEMPTS;
                return PackageReport::new(
                    State::Failed,
                    &p.version,
                    Some("no way to uninstall it: upload the package again with --uninstall-args".into()),
                );
            }
        }
    } else {
        install_command(p, &file_text, &log_text)
    };
    let _ = std::fs::remove_file(&log);
    m.running = true;
    m.report = Some(PackageReport::new(State::Installing, &p.version, None));
    save(r, m, &p.name, others);
    let run = InstallerRun {
        package: &p.name,
        version: &p.version,
        kind: p.kind,
        detect: &p.detect,
        uninstall,
        command: &command,
        output: &output,
        timeout: Duration::from_secs(p.timeout_secs),
        detached: p.self_update && !uninstall,
    };
    let end = match r.platform.run_installer(&run) {
        Ok(end) => end,
        Err(err) => {
            m.running = false;
            m.attempts += 1;
            m.not_before = r.now + backoff_secs(m.attempts);
            return PackageReport::new(
                State::Failed,
                &p.version,
                Some(format!("the installer could not be started: {err}")),
            );
        }
    };
    let detected_after = r.platform.detect(&p.detect).unwrap_or(false);
    let tail = read_tail(command.log.as_deref().map(Path::new)).or_else(|| read_tail(Some(&output)));
    let mut rep = run_outcome(e, uninstall, &end, detected_after, tail, m, r.now);
    if matches!(end, RunEnd::Exited(_)) && rep.state == State::Failed && rep.detail.is_some() {
        let cmd = command.display();
        rep.detail = rep.detail.map(|d| format!("{d} ({})", cmd.chars().take(300).collect::<String>()));
    }
    rep
}

/// Writes the state durably now; a failure is logged (the vault is written again at the end of
/// the sync), never fatal to the run.
fn persist(r: &PackagesRun<'_>) {
    if let Err(e) = r.store.persist(r.state) {
        tracing::warn!(error = %e, "could not save the package state before continuing");
    }
}

/// Persists `m` (under `name`) with the others, so a kill now leaves the truth behind.
fn save(r: &mut PackagesRun<'_>, m: &Remembered, name: &str, others: &BTreeMap<String, Remembered>) {
    let mut all = others.clone();
    all.insert(name.to_string(), m.clone());
    store_remembered(r.state, &all);
    persist(r);
}

/// `STATE_DIR/packages`, created if missing and restricted to SYSTEM and Administrators (root
/// elsewhere) whatever it inherited: what lies in it runs as SYSTEM, so nobody else may put or
/// change a file there between the hash check and the run.
fn restricted_root(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    crate::vault::restrict_dir(dir)
}

struct Failure {
    detail: String,
    /// Counts against the retry budget (a content mismatch); a network or disk problem does not.
    counts: bool,
}

/// The content of `e`, downloaded (resuming a partial download) and checked by size and
/// SHA-256 against the signed plan. A file that does not match is deleted and never run.
fn ensure_content(r: &PackagesRun<'_>, e: &PlanEntry) -> Result<PathBuf, Failure> {
    let p = &e.package;
    let dir = r.dir.join(&p.sha256);
    let file = dir.join(&p.file_name);
    let partial = dir.join(format!("{}.partial", p.file_name));
    let fail = |detail: String, counts: bool| Failure { detail, counts };
    let plain = |s: &str| !s.is_empty() && !s.contains(['/', '\\', ':']) && !s.starts_with('.');
    if !(plain(&p.file_name) && p.sha256.len() == 64 && p.sha256.bytes().all(|b| b.is_ascii_hexdigit())) {
        return Err(fail(
            "the plan names its content with an unusable file name or hash; nothing was run".into(),
            true,
        ));
    }
    if file.is_file() {
        if verify(&file, p.size, &p.sha256).is_ok() {
            return Ok(file);
        }
        let _ = std::fs::remove_file(&file);
    }
    restricted_root(r.dir).map_err(|e| fail(format!("cannot create or restrict {}: {e}", r.dir.display()), false))?;
    std::fs::create_dir_all(&dir).map_err(|e| fail(format!("cannot create {}: {e}", dir.display()), false))?;
    let have = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
    let have = if have > p.size {
        let _ = std::fs::remove_file(&partial);
        0
    } else {
        have
    };
    if let Ok(Some(free)) = r.platform.free_disk_bytes(&dir) {
        let need = p.size - have;
        if free < need + 64 * 1024 * 1024 {
            return Err(fail(
                format!(
                    "not enough disk space to download it: {} MiB needed (and 64 MiB to spare), {} MiB free; retried later",
                    need >> 20,
                    free >> 20
                ),
                false,
            ));
        }
    }
    if have < p.size {
        let mut out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&partial)
            .map_err(|e| fail(format!("cannot write {}: {e}", partial.display()), false))?;
        let mut w = std::io::BufWriter::with_capacity(256 * 1024, &mut out);
        match r.content.fetch(&p.sha256, have, &mut w) {
            Ok(0) if have > 0 => {
                // The server sent everything instead of the rest: what was appended is unusable.
                drop(w);
                drop(out);
                let _ = std::fs::remove_file(&partial);
                return Err(fail(
                    "the server did not resume the download; it starts over at the next sync".into(),
                    false,
                ));
            }
            Ok(_) => {}
            Err(DownloadError::Write(err)) => {
                drop(w);
                drop(out);
                // A full disk: free what was written; nothing partial is ever run.
                let _ = std::fs::remove_file(&partial);
                return Err(fail(format!("cannot write the download ({err}); retried later"), false));
            }
            Err(DownloadError::Client(err)) => {
                let _ = w.flush();
                return Err(fail(format!("download interrupted ({err}); it resumes where it stopped"), false));
            }
        }
        if let Err(err) = w.flush().and_then(|_| w.get_ref().sync_all()) {
            drop(w);
            let _ = std::fs::remove_file(&partial);
            return Err(fail(format!("cannot write the download ({err}); retried later"), false));
        }
    }
    if let Err(why) = verify(&partial, p.size, &p.sha256) {
        let _ = std::fs::remove_file(&partial);
        return Err(fail(format!("the downloaded content {why}; it was deleted and nothing was run"), true));
    }
    std::fs::rename(&partial, &file).map_err(|e| fail(format!("cannot move the download into place: {e}"), false))?;
    Ok(file)
}

/// Checks a file's size and SHA-256 against the plan.
fn verify(path: &Path, size: u64, sha256: &str) -> Result<(), String> {
    let len = std::fs::metadata(path).map(|m| m.len()).map_err(|e| format!("cannot be read ({e})"))?;
    if len != size {
        return Err(format!("is {len} bytes, the signed plan says {size}"));
    }
    let mut f = std::fs::File::open(path).map_err(|e| format!("cannot be read ({e})"))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f.read(&mut buf).map_err(|e| format!("cannot be read ({e})"))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    let got = hex::encode(h.finalize());
    if got != sha256 {
        return Err(format!("does not match the signed plan (sha256 {got}, expected {sha256})"));
    }
    Ok(())
}

/// Deletes the content directories of packages no longer in the plan (and stray files).
fn remove_unplanned_content(dir: &Path, wanted: &BTreeSet<&str>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == "logs" || wanted.contains(name.as_str()) {
            continue;
        }
        let path = entry.path();
        if path.is_dir() {
            let _ = std::fs::remove_dir_all(&path);
        } else {
            let _ = std::fs::remove_file(&path);
        }
    }
}

fn read_tail(path: Option<&Path>) -> Option<String> {
    let bytes = std::fs::read(path?).ok()?;
    // msiexec writes its log in UTF-16 LE (with a BOM).
    let text = if bytes.starts_with(&[0xFF, 0xFE]) {
        let units: Vec<u16> = bytes[2..].chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
        String::from_utf16_lossy(&units)
    } else {
        String::from_utf8_lossy(&bytes).into_owned()
    };
    let t = log_tail(&text);
    (!t.trim().is_empty()).then_some(t)
}

fn safe_stem(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' { c } else { '_' }).collect()
}
