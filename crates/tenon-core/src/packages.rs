//! Software packages, the pure part: what a package is, its detection rule, how assignments
//! resolve into one device's signed package plan (`machine.Packages`), and the install engine's
//! decisions (what to do next with a package, what an installer's exit code means, the command
//! line). The server stores content and assignments; the agent detects, downloads and runs
//! through its platform; every decision between is here.
//!
//! Plan contract (server -> agent), `payload.machine.Packages`: an object by package name, each a
//! [`PlanEntry`]. Content is run only when its SHA-256 and size match the entry (TUF "targets").

use crate::ids::{GroupName, Upn};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// Longest package name, version, argument string and detection rule the server accepts.
pub const MAX_NAME_LEN: usize = 128;
pub const MAX_VERSION_LEN: usize = 64;
pub const MAX_ARGS_LEN: usize = 2048;
pub const MAX_RULE_LEN: usize = 1024;
pub const MAX_DEPENDENCIES: usize = 32;
/// Default per-run timeout (30 minutes), and the most an administrator may set (24 hours).
pub const DEFAULT_TIMEOUT_SECS: u64 = 30 * 60;
pub const MAX_TIMEOUT_SECS: u64 = 24 * 3600;
/// Failed runs of one version and arguments before a package stays failed.
pub const MAX_ATTEMPTS: u32 = 3;
/// Lines of an installer's log kept in a report.
pub const LOG_TAIL_LINES: usize = 50;

/// What kind of installer the content is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Msi,
    Exe,
    /// A `.ps1` (PowerShell) or `.cmd`/`.bat` (cmd) script, told apart by the file name.
    Script,
}

impl Kind {
    pub fn parse(s: &str) -> Result<Self, PackageError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "msi" => Ok(Self::Msi),
            "exe" => Ok(Self::Exe),
            "script" => Ok(Self::Script),
            other => Err(PackageError::new(format!("unknown package kind {other:?}; use msi, exe or script"))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Msi => "msi",
            Self::Exe => "exe",
            Self::Script => "script",
        }
    }

    /// The kind a file name suggests (`.msi`, `.exe`, `.ps1`/`.cmd`/`.bat`).
    pub fn from_file_name(name: &str) -> Option<Self> {
        let lower = name.to_ascii_lowercase();
        let ext = lower.rsplit_once('.').map(|(_, e)| e)?;
        match ext {
            "msi" => Some(Self::Msi),
            "exe" => Some(Self::Exe),
            "ps1" | "cmd" | "bat" => Some(Self::Script),
            _ => None,
        }
    }
}

/// What an assignment asks for. Across assignments of one package to a device, the strongest
/// wins: uninstall > required > available.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Intent {
    Available,
    Required,
    Uninstall,
}

impl Intent {
    pub fn parse(s: &str) -> Result<Self, PackageError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "available" => Ok(Self::Available),
            "required" | "mandatory" => Ok(Self::Required),
            "uninstall" => Ok(Self::Uninstall),
            other => Err(PackageError::new(format!("unknown intent {other:?}; use required, available or uninstall"))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Available => "available",
            Self::Required => "required",
            Self::Uninstall => "uninstall",
        }
    }
}

/// Who must be signed in for a required package to install.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Users {
    /// Only while the device's primary user is signed in (the default).
    #[default]
    Primary,
    /// Only while someone other than the primary user is signed in.
    Secondary,
    /// Whenever any user is signed in.
    Both,
}

impl Users {
    pub fn parse(s: &str) -> Result<Self, PackageError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "primary" => Ok(Self::Primary),
            "secondary" => Ok(Self::Secondary),
            "both" => Ok(Self::Both),
            other => Err(PackageError::new(format!("unknown --users {other:?}; use primary, secondary or both"))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Primary => "primary",
            Self::Secondary => "secondary",
            Self::Both => "both",
        }
    }
}

/// A package error: one sentence that says what is wrong and what to do.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PackageError(pub String);

impl PackageError {
    fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
}

/// What a registry detection rule checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegistryCheck {
    Exists,
    Equals(String),
    VersionAtLeast(String),
}

/// How the agent tells whether a package is installed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DetectRule {
    /// Windows Installer knows the product (`MsiQueryProductState`), optionally at least a version.
    Msi { product_code: String },
    /// A file exists (and its version resource is at least `min_version`).
    File { path: String, min_version: Option<String> },
    /// A registry value under HKLM (`view32`: the 32-bit view, `Wow6432Node`).
    Registry { key: String, name: String, check: RegistryCheck, view32: bool },
}

fn has_control(s: &str) -> bool {
    s.chars().any(char::is_control)
}

/// `{XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX}` in upper case, or an error.
pub fn normalise_product_code(s: &str) -> Result<String, PackageError> {
    let t = s.trim();
    let inner = t.strip_prefix('{').and_then(|t| t.strip_suffix('}')).unwrap_or(t);
    let groups: Vec<&str> = inner.split('-').collect();
    let lens = [8, 4, 4, 4, 12];
    let ok = groups.len() == 5
        && groups.iter().zip(lens).all(|(g, n)| g.len() == n && g.chars().all(|c| c.is_ascii_hexdigit()));
    if !ok {
        return Err(PackageError::new(format!(
            "{t:?} is not an MSI product code; write it as {{12345678-1234-1234-1234-123456789ABC}}"
        )));
    }
    Ok(format!("{{{}}}", inner.to_ascii_uppercase()))
}

/// A dotted version (`1.2.3.4`): up to 8 numeric parts.
fn parse_version(s: &str) -> Option<Vec<u64>> {
    let t = s.trim();
    if t.is_empty() {
        return None;
    }
    let parts: Option<Vec<u64>> = t.split('.').map(|p| p.trim().parse::<u64>().ok()).collect();
    parts.filter(|p| p.len() <= 8)
}

/// Compares dotted versions numerically, missing parts as 0 (`1.2` == `1.2.0`). `None` when either
/// is not a dotted version.
pub fn compare_versions(a: &str, b: &str) -> Option<std::cmp::Ordering> {
    let (mut a, mut b) = (parse_version(a)?, parse_version(b)?);
    let n = a.len().max(b.len());
    a.resize(n, 0);
    b.resize(n, 0);
    Some(a.cmp(&b))
}

fn check_version(v: &str, rule: &str) -> Result<String, PackageError> {
    let v = v.trim();
    if parse_version(v).is_none() {
        return Err(PackageError::new(format!("detection rule {rule:?}: {v:?} is not a dotted version such as 1.2.3")));
    }
    Ok(v.to_string())
}

impl DetectRule {
    /// Parses `msi:{PRODUCT-CODE}` | `file:C:\path[>=VERSION]` |
    /// `registry:HKLM\PATH:NAME[=VALUE|>=VERSION]`, each optionally with the suffix `@32`
    /// (registry only: the 32-bit view).
    pub fn parse(s: &str) -> Result<Self, PackageError> {
        let s = s.trim();
        let usage =
            "write msi:{PRODUCT-CODE}, file:C:\\path[>=VERSION] or registry:HKLM\\PATH:NAME[=VALUE|>=VERSION][@32]";
        if s.len() > MAX_RULE_LEN || has_control(s) {
            return Err(PackageError::new(format!(
                "a detection rule is at most {MAX_RULE_LEN} characters without control characters"
            )));
        }
        let (kind, rest) =
            s.split_once(':').ok_or_else(|| PackageError::new(format!("detection rule {s:?} has no kind; {usage}")))?;
        match kind.to_ascii_lowercase().as_str() {
            "msi" => Ok(Self::Msi { product_code: normalise_product_code(rest)? }),
            "file" => {
                let (path, min_version) = match rest.rsplit_once(">=") {
                    Some((p, v)) => (p, Some(check_version(v, s)?)),
                    None => (rest, None),
                };
                let path = path.trim();
                if !is_absolute_windows_path(path) {
                    return Err(PackageError::new(format!(
                        "detection rule {s:?}: {path:?} is not an absolute Windows path such as C:\\Program Files\\App\\app.exe"
                    )));
                }
                Ok(Self::File { path: path.to_string(), min_version })
            }
            "registry" => {
                let (body, view32) = match rest.strip_suffix("@32") {
                    Some(b) => (b, true),
                    None => (rest.strip_suffix("@64").unwrap_or(rest), false),
                };
                let (target, check) = if let Some((t, v)) = body.split_once(">=") {
                    (t, RegistryCheck::VersionAtLeast(check_version(v, s)?))
                } else if let Some((t, v)) = body.split_once('=') {
                    (t, RegistryCheck::Equals(v.to_string()))
                } else {
                    (body, RegistryCheck::Exists)
                };
                let (key, name) = target.rsplit_once(':').ok_or_else(|| {
                    PackageError::new(format!("detection rule {s:?}: no value name after the key; {usage}"))
                })?;
                let key = key.trim().trim_end_matches('\\');
                let upper = key.to_ascii_uppercase();
                let key = if let Some(r) = upper.strip_prefix("HKEY_LOCAL_MACHINE\\") {
                    format!("HKLM\\{}", &key[key.len() - r.len()..])
                } else if upper.starts_with("HKLM\\") {
                    format!("HKLM\\{}", &key[5..])
                } else {
                    return Err(PackageError::new(format!(
                        "detection rule {s:?}: the key must be under HKLM\\ (the agent runs as SYSTEM and sees no user's hive)"
                    )));
                };
                if key.len() <= 5 {
                    return Err(PackageError::new(format!("detection rule {s:?}: the key has no path; {usage}")));
                }
                Ok(Self::Registry { key, name: name.trim().to_string(), check, view32 })
            }
            other => Err(PackageError::new(format!("detection rule kind {other:?} is unknown; {usage}"))),
        }
    }

    pub fn product_code(&self) -> Option<&str> {
        match self {
            Self::Msi { product_code } => Some(product_code),
            _ => None,
        }
    }
}

impl fmt::Display for DetectRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Msi { product_code } => write!(f, "msi:{product_code}"),
            Self::File { path, min_version: None } => write!(f, "file:{path}"),
            Self::File { path, min_version: Some(v) } => write!(f, "file:{path}>={v}"),
            Self::Registry { key, name, check, view32 } => {
                write!(f, "registry:{key}:{name}")?;
                match check {
                    RegistryCheck::Exists => {}
                    RegistryCheck::Equals(v) => write!(f, "={v}")?,
                    RegistryCheck::VersionAtLeast(v) => write!(f, ">={v}")?,
                }
                if *view32 {
                    write!(f, "@32")?;
                }
                Ok(())
            }
        }
    }
}

impl Serialize for DetectRule {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for DetectRule {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

fn is_absolute_windows_path(p: &str) -> bool {
    let b = p.as_bytes();
    (b.len() >= 3 && b[0].is_ascii_alphabetic() && b[1] == b':' && b[2] == b'\\') || p.starts_with("\\\\")
}

/// Checks a package or dependency name: 1 to 128 characters, letters, digits, space and `.-_+()`.
pub fn check_name(name: &str) -> Result<String, PackageError> {
    let n = name.trim();
    let ok =
        !n.is_empty() && n.len() <= MAX_NAME_LEN && n.chars().all(|c| c.is_alphanumeric() || " .-_+()".contains(c));
    if !ok {
        return Err(PackageError::new(format!(
            "package name {n:?}: use 1 to {MAX_NAME_LEN} letters, digits, spaces and . - _ + ( )"
        )));
    }
    Ok(n.to_string())
}

/// Checks installer arguments: no NUL, no line breaks, bounded.
pub fn check_args(what: &str, args: &str) -> Result<String, PackageError> {
    if args.len() > MAX_ARGS_LEN || has_control(args) {
        return Err(PackageError::new(format!(
            "{what}: at most {MAX_ARGS_LEN} characters, on one line, without NUL or other control characters"
        )));
    }
    Ok(args.trim().to_string())
}

/// Checks a package version: 1 to 64 printable characters without spaces.
pub fn check_version_label(v: &str) -> Result<String, PackageError> {
    let v = v.trim();
    if v.is_empty() || v.len() > MAX_VERSION_LEN || v.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(PackageError::new(format!(
            "version {v:?}: use 1 to {MAX_VERSION_LEN} printable characters without spaces, such as 1.4.2"
        )));
    }
    Ok(v.to_string())
}

/// A stored package (its current version): what the server keeps and the plan carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Package {
    pub name: String,
    pub version: String,
    pub kind: Kind,
    /// SHA-256 of the content, lower-case hex.
    pub sha256: String,
    pub size: u64,
    /// The uploaded file's name (the agent keeps the content under it: a script's extension
    /// chooses its interpreter).
    pub file_name: String,
    #[serde(default)]
    pub install_args: String,
    #[serde(default)]
    pub uninstall_args: String,
    pub detect: DetectRule,
    #[serde(default)]
    pub depends_on: Vec<String>,
    #[serde(default)]
    pub order: i64,
    pub timeout_secs: u64,
    /// The Tenon agent's own MSI (its UpgradeCode is [`AGENT_UPGRADE_CODE`]): the install is
    /// handed to a detached msiexec, because the upgrade stops and replaces the agent running it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub self_update: bool,
}

/// The UpgradeCode of the tenon-agent MSI (crates/tenon-agent/msi/tenon-agent.wxs).
pub const AGENT_UPGRADE_CODE: &str = "{85F23B7A-2D4F-42CC-A0A3-0EC4C2C07268}";

/// Where an assignment applies.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", content = "name", rename_all = "snake_case")]
pub enum Target {
    Tenant,
    Group(String),
    User(String),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tenant => write!(f, "tenant"),
            Self::Group(g) => write!(f, "group {g:?}"),
            Self::User(u) => write!(f, "user {u}"),
        }
    }
}

/// One assignment of a package.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub package: String,
    pub target: Target,
    pub intent: Intent,
    pub users: Users,
}

/// One package of a device's signed plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanEntry {
    #[serde(flatten)]
    pub package: Package,
    pub intent: Intent,
    pub users: Users,
    /// Bumped by `tenonctl devices install ID NAME`: a new number asks the agent to install an
    /// available package now, or to try a failed one again.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub request: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Whether an assignment reaches a user (`None`: a device without a primary user, reached by
/// tenant and "All Users" assignments only).
fn reaches(target: &Target, user: Option<(&Upn, &BTreeSet<GroupName>)>) -> bool {
    match target {
        Target::Tenant => true,
        Target::Group(g) => {
            GroupName::parse(g).is_ok_and(|g| g.is_all_users())
                || user.is_some_and(|(_, groups)| groups.iter().any(|ug| ug.as_str() == g))
        }
        Target::User(u) => user.is_some_and(|(upn, _)| upn.as_str() == u),
    }
}

/// The package plan of a device: the assignments that reach its primary user (or, without one,
/// the tenant and "All Users"), the strongest intent per package (uninstall > required >
/// available; ties: the widest user restriction), and the dependencies of what is installed,
/// pulled in with their dependent's intent. `requests`: the device's install requests by name.
pub fn device_plan(
    packages: &BTreeMap<String, Package>,
    assignments: &[Assignment],
    user: Option<(&Upn, &BTreeSet<GroupName>)>,
    requests: &BTreeMap<String, u64>,
) -> BTreeMap<String, PlanEntry> {
    let mut chosen: BTreeMap<&str, (Intent, Users)> = BTreeMap::new();
    for a in assignments.iter().filter(|a| reaches(&a.target, user)) {
        let e = chosen.entry(a.package.as_str()).or_insert((a.intent, a.users));
        if (a.intent, users_rank(a.users)) > (e.0, users_rank(e.1)) {
            *e = (a.intent, a.users);
        }
    }
    // Dependencies of what is to be installed come along (a dependency assigned on its own keeps
    // its own intent unless this one is stronger and not an uninstall).
    let mut stack: Vec<(String, Intent, Users)> = chosen
        .iter()
        .filter(|(_, (i, _))| *i != Intent::Uninstall)
        .map(|(n, (i, u))| (n.to_string(), *i, *u))
        .collect();
    let mut pulled: BTreeMap<String, (Intent, Users)> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    while let Some((name, intent, users)) = stack.pop() {
        if !seen.insert((name.clone(), intent, users)) {
            continue;
        }
        let Some(p) = packages.get(&name) else { continue };
        for d in &p.depends_on {
            let slot = pulled.entry(d.clone()).or_insert((intent, users));
            if (intent, users_rank(users)) > (slot.0, users_rank(slot.1)) {
                *slot = (intent, users);
            }
            stack.push((d.clone(), intent, users));
        }
    }
    for (name, (intent, users)) in &pulled {
        match chosen.get(name.as_str()) {
            Some((Intent::Uninstall, _)) => {}
            Some(&(i, u)) if (i, users_rank(u)) >= (*intent, users_rank(*users)) => {}
            _ => {
                if let Some(p) = packages.get(name) {
                    chosen.insert(p.name.as_str(), (*intent, *users));
                }
            }
        }
    }
    chosen
        .into_iter()
        .filter_map(|(name, (intent, users))| {
            let p = packages.get(name)?;
            Some((
                name.to_string(),
                PlanEntry { package: p.clone(), intent, users, request: requests.get(name).copied().unwrap_or(0) },
            ))
        })
        .collect()
}

fn users_rank(u: Users) -> u8 {
    match u {
        Users::Primary => 0,
        Users::Secondary => 1,
        Users::Both => 2,
    }
}

/// Checks the dependencies of `packages`: every one exists and there is no cycle. The error names
/// the missing package or the cycle (`a -> b -> a`).
pub fn check_dependencies(packages: &BTreeMap<String, Package>) -> Result<(), PackageError> {
    for p in packages.values() {
        for d in &p.depends_on {
            if !packages.contains_key(d) {
                return Err(PackageError::new(format!(
                    "package {:?} depends on {d:?}, which is not uploaded; upload {d:?} first or remove the dependency",
                    p.name
                )));
            }
        }
    }
    // Depth-first search with colours; the path on the stack names the cycle.
    fn visit<'a>(
        name: &'a str,
        packages: &'a BTreeMap<String, Package>,
        done: &mut BTreeSet<&'a str>,
        path: &mut Vec<&'a str>,
    ) -> Result<(), PackageError> {
        if done.contains(name) {
            return Ok(());
        }
        if let Some(i) = path.iter().position(|n| *n == name) {
            let mut cycle: Vec<&str> = path[i..].to_vec();
            cycle.push(name);
            return Err(PackageError::new(format!(
                "the dependencies form a cycle: {}; remove one of these dependencies",
                cycle.join(" -> ")
            )));
        }
        path.push(name);
        if let Some(p) = packages.get(name) {
            for d in &p.depends_on {
                visit(d, packages, done, path)?;
            }
        }
        path.pop();
        done.insert(name);
        Ok(())
    }
    let mut done = BTreeSet::new();
    for name in packages.keys() {
        visit(name, packages, &mut done, &mut Vec::new())?;
    }
    Ok(())
}

/// The order the agent works through a plan: dependencies before their dependents, then `order`
/// (lower first), then name. Uninstalls run in the reverse of that order.
pub fn install_order(plan: &BTreeMap<String, PlanEntry>) -> Vec<&PlanEntry> {
    let mut out: Vec<&PlanEntry> = Vec::with_capacity(plan.len());
    let mut placed: BTreeSet<&str> = BTreeSet::new();
    let mut rest: Vec<&PlanEntry> = plan.values().collect();
    rest.sort_by(|a, b| a.package.order.cmp(&b.package.order).then_with(|| a.package.name.cmp(&b.package.name)));
    while !rest.is_empty() {
        // The first (by order, name) whose dependencies in the plan are placed; a cycle (the server
        // refuses them) falls back to the first remaining.
        let i = rest
            .iter()
            .position(|e| e.package.depends_on.iter().all(|d| placed.contains(d.as_str()) || !plan.contains_key(d)))
            .unwrap_or(0);
        let e = rest.remove(i);
        placed.insert(e.package.name.as_str());
        out.push(e);
    }
    out
}

/// A package's state on a device, as reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Pending,
    Downloading,
    Installing,
    Installed,
    Failed,
    TimedOut,
    RebootPending,
    Waiting,
    Uninstalled,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Downloading => "downloading",
            Self::Installing => "installing",
            Self::Installed => "installed",
            Self::Failed => "failed",
            Self::TimedOut => "timed_out",
            Self::RebootPending => "reboot_pending",
            Self::Waiting => "waiting",
            Self::Uninstalled => "uninstalled",
        }
    }

    pub const ALL: [State; 9] = [
        Self::Pending,
        Self::Downloading,
        Self::Installing,
        Self::Installed,
        Self::Failed,
        Self::TimedOut,
        Self::RebootPending,
        Self::Waiting,
        Self::Uninstalled,
    ];

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

/// What the agent remembers about one package between runs (in the vault).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remembered {
    /// `attempt_key` of the version and arguments the attempts count for.
    #[serde(default)]
    pub attempt_key: String,
    #[serde(default)]
    pub attempts: u32,
    /// Unix seconds before which no new attempt starts (backoff, or 1618 "retry later").
    #[serde(default)]
    pub not_before: i64,
    /// The last request number seen, and whether it is still to be honoured.
    #[serde(default)]
    pub request: u64,
    #[serde(default)]
    pub request_open: bool,
    /// An installer was started and its outcome not yet recorded (a killed agent): detection
    /// decides before anything runs again.
    #[serde(default)]
    pub running: bool,
    /// The last reported state and its details.
    #[serde(default)]
    pub report: Option<PackageReport>,
    /// `tenon-agent install NAME` at the device asked for it.
    #[serde(default)]
    pub local_request: bool,
}

/// What a device reports per package (`devices show ID --json` -> `packages`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageReport {
    pub state: State,
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i64>,
    /// The last lines of the installer's log (failures only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_tail: Option<String>,
}

impl PackageReport {
    pub fn new(state: State, version: &str, detail: impl Into<Option<String>>) -> Self {
        Self { state, version: version.to_string(), detail: detail.into(), exit_code: None, log_tail: None }
    }
}

/// Identifies "the same version and arguments": attempts are counted per key.
pub fn attempt_key(p: &Package, intent: Intent) -> String {
    format!("{}|{}|{}|{}|{}", intent.as_str(), p.version, p.sha256, p.install_args, p.uninstall_args)
}

/// Who is signed in, for the user restriction.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Session {
    /// UPNs in lower case.
    pub signed_in: Vec<String>,
    pub primary: Option<String>,
    /// `Client.MandatoryInstalls.IgnoreUserRestrictions`.
    pub ignore_user_restrictions: bool,
}

/// Whether a package's user restriction holds now; `Err` says why it waits.
pub fn restriction_holds(users: Users, s: &Session) -> Result<(), String> {
    if s.ignore_user_restrictions {
        return Ok(());
    }
    let primary = s.primary.as_deref();
    let is_primary = |u: &String| primary.is_some_and(|p| p.eq_ignore_ascii_case(u));
    match users {
        Users::Primary => match primary {
            None => Err("the device has no primary user".into()),
            Some(_) if s.signed_in.iter().any(is_primary) => Ok(()),
            Some(p) => Err(format!("primary user {p} is not signed in")),
        },
        Users::Secondary => {
            if s.signed_in.iter().any(|u| !is_primary(u)) {
                Ok(())
            } else {
                Err("no user other than the primary user is signed in".into())
            }
        }
        Users::Both => {
            if s.signed_in.is_empty() {
                Err("no user is signed in".into())
            } else {
                Ok(())
            }
        }
    }
}

/// What to do with one package now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing to run; report this.
    Report(PackageReport),
    /// Download (if not held) and install.
    Install,
    /// Run the uninstall.
    Uninstall,
}

/// The facts [`next_step`] decides from.
pub struct StepFacts<'a> {
    /// The detection rule holds now.
    pub detected: bool,
    pub session: &'a Session,
    /// Every dependency in the plan is installed now; `Err` names the first that is not.
    pub dependencies: Result<(), String>,
    pub now: i64,
}

/// Decides what to do with a package: detection first (installed: nothing runs), the intent, the
/// user restriction, dependencies, the retry budget and backoff. `mem` is updated for a new
/// version or a new request (attempts reset).
pub fn next_step(e: &PlanEntry, mem: &mut Remembered, f: &StepFacts<'_>) -> Step {
    let p = &e.package;
    let key = attempt_key(p, e.intent);
    if mem.attempt_key != key || e.request > mem.request {
        // A new version or arguments, or an administrator asked again: a fresh budget.
        mem.attempt_key = key;
        mem.attempts = 0;
        mem.not_before = 0;
    }
    if e.request > mem.request {
        mem.request = e.request;
        mem.request_open = true;
    }
    let requested = mem.request_open || mem.local_request;
    mem.running = false;
    let report = |state, detail: String| Step::Report(PackageReport::new(state, &p.version, Some(detail)));
    match e.intent {
        Intent::Uninstall => {
            if !f.detected {
                mem.request_open = false;
                return Step::Report(PackageReport::new(State::Uninstalled, &p.version, None));
            }
            if let Some(r) = budget(mem, f.now, &p.version) {
                return r;
            }
            Step::Uninstall
        }
        Intent::Required | Intent::Available => {
            if f.detected {
                mem.request_open = false;
                mem.local_request = false;
                if mem.report.as_ref().is_some_and(|r| r.state == State::RebootPending && r.version == p.version) {
                    return report(State::RebootPending, "installed; a restart completes it".into());
                }
                return Step::Report(PackageReport::new(State::Installed, &p.version, None));
            }
            if e.intent == Intent::Available && !requested {
                return report(
                    State::Waiting,
                    "available: installs when requested (tenonctl devices install, tenon-agent install)".into(),
                );
            }
            if e.intent == Intent::Required && !requested {
                if let Err(why) = restriction_holds(e.users, f.session) {
                    return report(State::Waiting, why);
                }
            }
            if let Err(dep) = &f.dependencies {
                return report(State::Waiting, format!("dependency {dep} is not installed"));
            }
            if let Some(r) = budget(mem, f.now, &p.version) {
                return r;
            }
            Step::Install
        }
    }
}

/// `Some(report)` when the retry budget is spent or a backoff runs.
fn budget(mem: &Remembered, now: i64, version: &str) -> Option<Step> {
    let last = mem.report.clone().filter(|r| r.version == version);
    if mem.attempts >= MAX_ATTEMPTS {
        let mut r = last.unwrap_or_else(|| PackageReport::new(State::Failed, version, None));
        if !matches!(r.state, State::Failed | State::TimedOut) {
            r.state = State::Failed;
        }
        let why = format!(
            "gave up after {MAX_ATTEMPTS} attempts; `tenonctl devices install ID NAME` tries again, so does a new version"
        );
        r.detail = Some(match r.detail {
            Some(d) if !d.contains("gave up") => format!("{d}; {why}"),
            Some(d) => d,
            None => why,
        });
        return Some(Step::Report(r));
    }
    if now < mem.not_before {
        let mut r = last.unwrap_or_else(|| PackageReport::new(State::Waiting, version, None));
        if r.state == State::Installing || r.state == State::Downloading {
            r.state = State::Waiting;
        }
        return Some(Step::Report(r));
    }
    None
}

/// Seconds to wait after the `attempts`-th failure: 5 min, 30 min, 2 h.
pub fn backoff_secs(attempts: u32) -> i64 {
    match attempts {
        0 | 1 => 5 * 60,
        2 => 30 * 60,
        _ => 2 * 3600,
    }
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunEnd {
    Exited(i64),
    TimedOut,
    /// Started detached (the agent's own upgrade): its end is not awaited; detection at the
    /// next sync (by the new agent) tells whether it worked.
    HandedOff,
}

/// What a run means, from its end and detection afterwards (Intune's default exit codes: 0 and
/// 1707 success, 3010 success with a reboot pending, 1641 success with a reboot started by the
/// installer, 1618 retry later, anything else failed). Updates `mem` (attempts, backoff) and
/// returns the report; `log_tail` goes into failures.
pub fn run_outcome(
    e: &PlanEntry,
    uninstall: bool,
    end: &RunEnd,
    detected_after: bool,
    log_tail: Option<String>,
    mem: &mut Remembered,
    now: i64,
) -> PackageReport {
    let v = &e.package.version;
    mem.running = false;
    let fail = |mem: &mut Remembered, state: State, detail: String, code: Option<i64>| {
        mem.attempts += 1;
        mem.not_before = now + backoff_secs(mem.attempts);
        PackageReport { state, version: v.clone(), detail: Some(detail), exit_code: code, log_tail: log_tail.clone() }
    };
    let code = match end {
        RunEnd::TimedOut => {
            return fail(
                mem,
                State::TimedOut,
                format!("the installer ran longer than {} s and was stopped", e.package.timeout_secs),
                None,
            )
        }
        RunEnd::Exited(c) => *c,
        RunEnd::HandedOff => {
            // Counted: an upgrade that never lands stops after the retry budget.
            mem.attempts += 1;
            mem.not_before = now + backoff_secs(mem.attempts);
            return PackageReport {
                state: State::Installing,
                version: v.clone(),
                detail: Some(
                    "handed to a detached msiexec: the upgrade replaces the running agent, and the new version reports in"
                        .into(),
                ),
                exit_code: None,
                log_tail: None,
            };
        }
    };
    let ok = |state: State, detail: Option<String>| PackageReport {
        state,
        version: v.clone(),
        detail,
        exit_code: Some(code),
        log_tail: None,
    };
    match code {
        1618 => {
            mem.not_before = now + 10 * 60;
            PackageReport {
                state: State::Waiting,
                version: v.clone(),
                detail: Some(format!("another installation is running (1618); retry after {}", rfc3339(now + 10 * 60))),
                exit_code: Some(code),
                log_tail: None,
            }
        }
        0 | 1707 | 3010 | 1641 => {
            let reboot = matches!(code, 3010 | 1641);
            if uninstall {
                if detected_after {
                    return fail(mem, State::Failed, "still detected after uninstall".into(), Some(code));
                }
                mem.attempts = 0;
                mem.local_request = false;
                mem.request_open = false;
                return ok(State::Uninstalled, reboot.then(|| "a restart completes the removal".to_string()));
            }
            if !detected_after {
                return fail(mem, State::Failed, "not detected after install".into(), Some(code));
            }
            mem.attempts = 0;
            mem.local_request = false;
            mem.request_open = false;
            match code {
                3010 => ok(State::RebootPending, Some("installed; a restart completes it (3010)".into())),
                1641 => ok(State::RebootPending, Some("installed; the installer started a restart (1641)".into())),
                _ => ok(State::Installed, None),
            }
        }
        other => fail(mem, State::Failed, format!("the installer exited with {other}"), Some(other)),
    }
}

fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| unix.to_string())
}

/// A command to run: program and arguments (already split; `raw_args` is appended verbatim on
/// Windows, where a program parses its own command line).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Command {
    pub program: String,
    pub args: Vec<String>,
    /// The administrator's argument string, passed as written.
    pub raw_args: String,
    /// The log file Windows Installer writes (`/l*v`), if any.
    pub log: Option<String>,
}

impl Command {
    /// The command line as the report shows it.
    pub fn display(&self) -> String {
        let mut s = self.program.clone();
        for a in &self.args {
            s.push(' ');
            if a.contains(' ') {
                s.push('"');
                s.push_str(a);
                s.push('"');
            } else {
                s.push_str(a);
            }
        }
        if !self.raw_args.is_empty() {
            s.push(' ');
            s.push_str(&self.raw_args);
        }
        s
    }
}

/// The install command for content at `file` (`log`: where msiexec writes its log).
pub fn install_command(p: &Package, file: &str, log: &str) -> Command {
    let raw_args = p.install_args.clone();
    match p.kind {
        Kind::Msi => Command {
            program: "msiexec.exe".into(),
            args: vec!["/i".into(), file.into(), "/qn".into(), "/norestart".into(), "/l*v".into(), log.into()],
            raw_args,
            log: Some(log.into()),
        },
        Kind::Exe => Command { program: file.into(), args: vec![], raw_args, log: None },
        Kind::Script => script_command(file, raw_args),
    }
}

fn script_command(file: &str, raw_args: String) -> Command {
    if file.to_ascii_lowercase().ends_with(".ps1") {
        Command {
            program: "powershell.exe".into(),
            args: vec![
                "-NoProfile".into(),
                "-NonInteractive".into(),
                "-ExecutionPolicy".into(),
                "Bypass".into(),
                "-File".into(),
                file.into(),
            ],
            raw_args,
            log: None,
        }
    } else {
        Command { program: "cmd.exe".into(), args: vec!["/c".into(), file.into()], raw_args, log: None }
    }
}

/// The uninstall command: `msiexec /x {ProductCode} /qn /norestart` for an MSI (its uninstall
/// arguments appended), else the content run with the uninstall arguments. `None` when there is
/// no way to uninstall (not an MSI and no uninstall arguments).
pub fn uninstall_command(p: &Package, file: &str, log: &str) -> Option<Command> {
    match (&p.kind, p.detect.product_code()) {
        (Kind::Msi, Some(code)) => Some(Command {
            program: "msiexec.exe".into(),
            args: vec!["/x".into(), code.into(), "/qn".into(), "/norestart".into(), "/l*v".into(), log.into()],
            raw_args: p.uninstall_args.clone(),
            log: Some(log.into()),
        }),
        (Kind::Msi, None) => Some(Command {
            program: "msiexec.exe".into(),
            args: vec!["/x".into(), file.into(), "/qn".into(), "/norestart".into(), "/l*v".into(), log.into()],
            raw_args: p.uninstall_args.clone(),
            log: Some(log.into()),
        }),
        _ if p.uninstall_args.is_empty() => None,
        (Kind::Exe, _) => {
            Some(Command { program: file.into(), args: vec![], raw_args: p.uninstall_args.clone(), log: None })
        }
        (Kind::Script, _) => Some(script_command(file, p.uninstall_args.clone())),
    }
}

/// The last `LOG_TAIL_LINES` lines of a log, bounded to 4 KiB, control characters but tab removed.
pub fn log_tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(LOG_TAIL_LINES);
    let mut out: String =
        lines[start..].join("\n").chars().filter(|c| *c == '\n' || *c == '\t' || !c.is_control()).collect();
    if out.len() > 4096 {
        let cut = out.len() - 4096;
        let cut = (cut..out.len()).find(|i| out.is_char_boundary(*i)).unwrap_or(out.len());
        out = out[cut..].to_string();
    }
    out
}

/// The one-word summary of a device's package states for the `packages` policy status: `failed`
/// if any failed or timed out, `pending` while any is pending, downloading or installing, `waiting`
/// while any waits, else `ok`.
pub fn summary_state<'a>(reports: impl IntoIterator<Item = &'a PackageReport>) -> &'static str {
    let mut worst = "ok";
    for r in reports {
        let s = match r.state {
            State::Failed | State::TimedOut => "failed",
            State::Pending | State::Downloading | State::Installing => "pending",
            State::Waiting => "waiting",
            _ => "ok",
        };
        let rank = |s: &str| match s {
            "failed" => 3,
            "pending" => 2,
            "waiting" => 1,
            _ => 0,
        };
        if rank(s) > rank(worst) {
            worst = s;
        }
    }
    worst
}

#[cfg(test)]
mod tests;
