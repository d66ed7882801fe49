//! The `signatures` policy: writes each signed-in user's Outlook signatures (rendered by
//! `tenon_core::policy::signatures` from `users[upn].Signatures`) into
//! `<profile>\AppData\Roaming\Microsoft\Signatures` and sets their Outlook defaults.
//!
//! What it owns, tracked per user in the policy state (`{"users": {upn: {"files": {path: sha256},
//! "registry": {value: data}}}}`):
//! - Files it wrote: `NAME.htm`, `NAME.txt`, `NAME.rtf`, `NAME_files\IMAGE` (or `NAME (upn).*` with
//!   `Signatures.Options.IncludeUpnInName`). A file is rewritten only when its content differs from
//!   the plan, so unchanged signatures keep their modification time. When a template disappears, its
//!   files are deleted if they are still as Tenon wrote them; a file the user edited since is left in
//!   place and no longer tracked (it is the user's now). A planned file that the user edited is
//!   rewritten: the organisation's signature is the organisation's. Files Tenon never wrote (the
//!   user's own signatures) are never touched.
//! - `NewSignature` / `ReplySignature` (REG_SZ, the file name stem) under
//!   `HKU\<SID>\Software\Microsoft\Office\16.0\Common\MailSettings`. Without a SID (the simulated
//!   platform) the hive is named by the UPN: `HKU\<UPN>\...`. A value is removed only while it still
//!   holds what Tenon set.
//!
//! Users who are not signed in are left alone until they are; a signed-in user without a config
//! in the payload is skipped (the server does not know them yet), while a config without
//! `Signatures` means "no signatures" and cleans up what Tenon wrote.
//!
//! States (docs/policy-states.md): `not_applicable` when no user of the payload has a template
//! assigned and there is nothing of Tenon's to clean up (the profile folder is not even looked up);
//! `waiting` when templates are assigned but nobody is signed in; `ok` when every signed-in user's
//! files are as planned (`changed: true` when this run wrote or removed something); `failed` with
//! the reason otherwise.

use super::{Policy, PolicyContext};
use crate::platform::{Platform, PlatformError, RegValue, SessionUser};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tenon_core::api::PolicyStatus;
use tenon_core::canonical::sha256_hex;
use tenon_core::policy::signatures::{file_hashes, parse_user_signatures, plan_user, sync_files, SignatureError};

pub struct Signatures;

const MAIL_SETTINGS: &str = r"Software\Microsoft\Office\16.0\Common\MailSettings";

#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    #[serde(default)]
    users: BTreeMap<String, UserState>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct UserState {
    /// Path relative to the Signatures folder (`/`-separated) -> sha256 of what Tenon wrote.
    #[serde(default)]
    files: BTreeMap<String, String>,
    /// Registry value name -> the data Tenon set.
    #[serde(default)]
    registry: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
enum ApplyError {
    #[error(transparent)]
    Config(#[from] SignatureError),
    #[error(transparent)]
    Platform(#[from] PlatformError),
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// What happened for one user, for the report.
#[derive(Default)]
struct UserReport {
    templates: Vec<String>,
    written: Vec<String>,
    removed: Vec<String>,
    released: Vec<String>,
    unknown: Map<String, Value>,
    registry: Vec<String>,
}

impl UserReport {
    fn changed(&self) -> bool {
        !(self.written.is_empty() && self.removed.is_empty() && self.registry.is_empty())
    }

    fn to_json(&self) -> Value {
        let mut v = json!({"templates": self.templates, "written": self.written, "removed": self.removed});
        if !self.released.is_empty() {
            v["left_as_user_changed"] = json!(self.released);
        }
        if !self.unknown.is_empty() {
            v["unknown_placeholders"] = Value::Object(self.unknown.clone());
        }
        if !self.registry.is_empty() {
            v["registry"] = json!(self.registry);
        }
        v
    }
}

impl Policy for Signatures {
    fn name(&self) -> &'static str {
        "signatures"
    }

    fn apply(&self, ctx: &mut PolicyContext<'_>) -> PolicyStatus {
        // State this version cannot read would make Tenon forget what it owns; starting empty is the
        // safe direction (nothing gets deleted that is not provably Tenon's).
        let mut state: State = serde_json::from_value(ctx.state.clone()).unwrap_or_default();
        let users = match ctx.platform.signed_in_users() {
            Ok(u) => u,
            Err(e) => return PolicyStatus::new("failed").with_reason(format!("cannot list signed-in users: {e}")),
        };
        let assigned = ctx.users.values().any(|c| {
            c.get("Signatures")
                .and_then(|s| s.get("Templates"))
                .and_then(Value::as_object)
                .is_some_and(|t| !t.is_empty())
        });
        let mut details = Map::new();
        let mut failures = Vec::new();
        let mut changed = false;
        for user in &users {
            let upn = user.upn.trim().to_lowercase();
            let Some(config) = ctx.users.get(&upn).and_then(Value::as_object) else {
                details.insert(upn, json!({"skipped": "no configuration for this user yet"}));
                continue;
            };
            let mut report = UserReport::default();
            let us = state.users.entry(upn.clone()).or_default();
            match apply_user(ctx.platform, user, &upn, config, us, &mut report) {
                Ok(()) => {
                    changed |= report.changed();
                    details.insert(upn, report.to_json());
                }
                Err(e) => {
                    changed |= report.changed();
                    let mut v = report.to_json();
                    v["error"] = json!(e.to_string());
                    details.insert(upn.clone(), v);
                    failures.push(format!("{upn}: {e}"));
                }
            }
        }
        state.users.retain(|_, us| !(us.files.is_empty() && us.registry.is_empty()));
        *ctx.state = serde_json::to_value(&state).unwrap_or(Value::Null);
        let status = if !failures.is_empty() {
            PolicyStatus::new("failed").with_reason(failures.join("; "))
        } else if !assigned && !changed {
            PolicyStatus::new("not_applicable").with_reason("no signature templates assigned")
        } else if users.is_empty() {
            PolicyStatus::new("waiting").with_reason("no user is signed in")
        } else {
            PolicyStatus::new("ok")
        };
        status.with("changed", changed).with("users", Value::Object(details))
    }
}

/// `<profile>\AppData\Roaming\Microsoft\Signatures`, i.e. `%APPDATA%\Microsoft\Signatures`.
fn signatures_dir(platform: &dyn Platform, user: &SessionUser) -> Result<PathBuf, PlatformError> {
    Ok(platform.profile_dir(user)?.join("AppData").join("Roaming").join("Microsoft").join("Signatures"))
}

/// A plan path (`Corp_files/logo.png`) below `dir`. Its components were checked as Windows file
/// names by the plan, so it cannot leave `dir`.
fn path_in(dir: &Path, rel: &str) -> PathBuf {
    rel.split('/').fold(dir.to_path_buf(), |p, c| p.join(c))
}

fn io<'p>(action: &'static str, path: &'p Path) -> impl FnOnce(std::io::Error) -> ApplyError + 'p {
    move |source| ApplyError::Io { action, path: path.display().to_string(), source }
}

fn read_hash(path: &Path) -> Result<Option<String>, ApplyError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(sha256_hex(&bytes))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io("cannot read", path)(e)),
    }
}

/// Writes through a temporary file and a rename, so Outlook never reads half a signature.
fn write_file(path: &Path, bytes: &[u8]) -> Result<(), ApplyError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io("cannot create", parent))?;
    }
    let tmp = path.with_file_name(format!(
        ".{}.tenon-tmp",
        path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    ));
    std::fs::write(&tmp, bytes).map_err(io("cannot write", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("cannot replace", path))
}

fn apply_user(
    platform: &dyn Platform,
    user: &SessionUser,
    upn: &str,
    config: &Map<String, Value>,
    us: &mut UserState,
    report: &mut UserReport,
) -> Result<(), ApplyError> {
    let plan = plan_user(&parse_user_signatures(config)?, upn)?;
    for t in &plan.templates {
        report.templates.push(t.name.clone());
        if !t.unknown.is_empty() {
            report.unknown.insert(t.name.clone(), json!(t.unknown));
        }
    }
    // Nothing planned and nothing of Tenon's to remove: no need for the profile (a device without
    // profiles, or whose profile cannot be found, has nothing to do here).
    let planned_default = plan.new_signature.is_some() || plan.reply_signature.is_some();
    if plan.files.is_empty() && !planned_default && us.files.is_empty() && us.registry.is_empty() {
        return Ok(());
    }
    let dir = signatures_dir(platform, user)?;
    let desired = file_hashes(&plan.files);
    let mut on_disk = BTreeMap::new();
    for rel in desired.keys().chain(us.files.keys()) {
        if let Some(sha) = read_hash(&path_in(&dir, rel))? {
            on_disk.insert(rel.clone(), sha);
        }
    }
    let sync = sync_files(&desired, &us.files, &on_disk);

    for rel in &sync.write {
        write_file(&path_in(&dir, rel), &plan.files[rel])?;
        us.files.insert(rel.clone(), desired[rel].clone());
        report.written.push(rel.clone());
    }
    // Files already as planned are Tenon's too (also after a lost state).
    for (rel, sha) in &desired {
        us.files.insert(rel.clone(), sha.clone());
    }
    for rel in &sync.delete {
        let path = path_in(&dir, rel);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("cannot delete", &path)(e)),
        }
        us.files.remove(rel);
        report.removed.push(rel.clone());
        // An emptied `NAME_files` folder goes too; one the user put files into stays.
        if let Some(parent) = path.parent().filter(|p| *p != dir) {
            let _ = std::fs::remove_dir(parent);
        }
    }
    for rel in &sync.release {
        us.files.remove(rel);
        report.released.push(rel.clone());
    }

    let hive = user.sid.as_deref().unwrap_or(upn);
    let key = format!(r"HKU\{hive}\{MAIL_SETTINGS}");
    for (value, want) in [("NewSignature", &plan.new_signature), ("ReplySignature", &plan.reply_signature)] {
        let current = platform.reg_get(&key, value)?;
        match want {
            Some(want) => {
                if current.as_ref() != Some(&RegValue::Sz(want.clone())) {
                    platform.reg_set(&key, value, &RegValue::Sz(want.clone()))?;
                    report.registry.push(format!("set {value}"));
                }
                us.registry.insert(value.to_string(), want.clone());
            }
            None => {
                if let Some(set) = us.registry.remove(value) {
                    if current == Some(RegValue::Sz(set)) {
                        platform.reg_delete(&key, value)?;
                        report.registry.push(format!("removed {value}"));
                    }
                }
            }
        }
    }
    Ok(())
}
