//! Wire types of the HTTP API shared by the server, the agent and tenonctl (serde only, no I/O).
//!
//! Device endpoints (Bearer device credential):
//! - `POST /api/v1/enroll` [`EnrollRequest`] -> [`EnrollResponse`] (Bearer-less: the enrollment token is the body)
//! - `GET  /api/v1/device/config` with `If-None-Match: "<etag>"` -> 200 envelope + `ETag`, or 304
//! - `GET  /api/v1/device/trust` -> [`TrustBundle`] (also `GET /api/v1/trust` without a credential:
//!   the agent checks the root key against its enrollment token before it sends the token)
//! - `POST /api/v1/device/config/held` with the envelope the device holds -> `{"etag"}`: sent after
//!   a rollback refusal; the server continues numbering above it only if it signed that envelope
//!   (a report's bare `config_version` never moves the server's numbering)
//! - `POST /api/v1/device/report` [`DeviceReport`] -> 202
//! - `POST /api/v1/device/escrow` [`crate::policy::escrow::EscrowUpload`] -> 201
//!   [`crate::policy::escrow::EscrowReceipt`], sent only after the key is committed
//! - `GET  /api/v1/device/escrow/rotations` -> `{"rotations": [protector id], "escrow_key":
//!   SignedEscrowKey}`: keys an admin read, and the current escrow key signed by a signing key
//!
//! Admin endpoints (Bearer admin token) live under `/api/v1/admin/`; they need the token role
//! `admin`, except `GET devices/{id}/recovery-keys[?all=true]`, which needs `recovery-keys`.
//! `POST tokens {name, roles}` creates tokens.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The ETag of an envelope: it names the exact envelope (version and payload), so a re-issue with
/// a fresh expiry is fetched even though the payload is unchanged.
pub fn envelope_etag(version: u64, payload_sha256: &str) -> String {
    format!("\"{version}-{payload_sha256}\"")
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EnrollRequest {
    pub token: String,
    pub hostname: String,
    pub agent_version: String,
}

/// The root key and the chain of root-signed key lists, oldest first.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrustBundle {
    pub root_public_key: String,
    pub key_lists: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EnrollResponse {
    pub device_id: String,
    /// Shown once; the server keeps only its hash.
    pub credential: String,
    pub trust: TrustBundle,
    /// X25519 public key (base64) that recovery keys are sealed to before they leave the device.
    pub escrow_public_key: Option<String>,
    pub server_time: i64,
}

/// A policy's status as the agent reports it: a `state` plus whatever the policy adds.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct PolicyStatus {
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(flatten)]
    pub details: Map<String, Value>,
}

impl PolicyStatus {
    pub fn new(state: &str) -> Self {
        Self { state: state.to_string(), reason: None, details: Map::new() }
    }

    pub fn with_reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.details.insert(key.to_string(), value.into());
        self
    }
}

/// What the agent reports: after a sync in which it changed, and at least once a day.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DeviceReport {
    pub agent_version: String,
    pub hostname: String,
    #[serde(default)]
    pub signed_in_users: Vec<String>,
    pub config_version: Option<u64>,
    pub config_sha256: Option<String>,
    /// Why the last sync or verification failed, if it did.
    pub last_error: Option<String>,
    /// Policy name -> status.
    #[serde(default)]
    pub policies: Map<String, Value>,
    /// Package name -> its state on the device (`tenon_core::packages`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub packages: std::collections::BTreeMap<String, crate::packages::PackageReport>,
}

/// Bounds of a report's fields. A real report is a few KB; everything in it reaches
/// administrators' terminals and pages, so the server refuses what no agent would send.
pub const MAX_REPORTED_USERS: usize = 1000;
pub const MAX_REPORTED_POLICIES: usize = 64;
pub const MAX_POLICY_NAME_LEN: usize = 64;
pub const MAX_AGENT_VERSION_LEN: usize = 64;
pub const MAX_LAST_ERROR_LEN: usize = 4096;
pub const MAX_REPORTED_PACKAGES: usize = 256;
pub const MAX_PACKAGE_DETAIL_LEN: usize = 1024;
pub const MAX_PACKAGE_LOG_LEN: usize = 4096;

/// Why a report (or an enrollment's host name and agent version) was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReportError {
    #[error("hostname: {0}")]
    Hostname(crate::ids::IdError),
    #[error("agent_version must be 1 to {MAX_AGENT_VERSION_LEN} printable ASCII characters without spaces")]
    AgentVersion,
    #[error(
        "last_error must be at most {MAX_LAST_ERROR_LEN} bytes without control characters other than newline and tab"
    )]
    LastError,
    #[error("config_sha256 must be 64 lower-case hex digits")]
    ConfigSha256,
    #[error("signed_in_users lists more than {MAX_REPORTED_USERS} users")]
    TooManyUsers,
    #[error("signed_in_users: {0}")]
    SignedInUser(crate::ids::IdError),
    #[error("policies lists more than {MAX_REPORTED_POLICIES} policies")]
    TooManyPolicies,
    #[error("policy names must be 1 to {MAX_POLICY_NAME_LEN} characters of a-z, 0-9 and '_'")]
    PolicyName,
    #[error("packages: {0}")]
    Packages(String),
}

/// A report whose fields were checked: what the server stores.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckedReport {
    pub hostname: crate::ids::Hostname,
    pub signed_in_users: std::collections::BTreeSet<crate::ids::Upn>,
}

/// Whether `s` is an agent version as agents send it (`0.1.0`, `1.2.3-rc.1+build`).
pub fn valid_agent_version(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_AGENT_VERSION_LEN && s.bytes().all(|b| b.is_ascii_graphic())
}

/// Whether a character may appear in reported free text (`last_error`): no C0/C1 controls but
/// newline and tab, and no Unicode bidi controls (which can make text read differently from what it
/// is on an administrator's screen).
pub fn allowed_in_report_text(c: char) -> bool {
    (!c.is_control() || c == '\n' || c == '\t') && !matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Makes free text fit a report: disallowed characters become U+FFFD and the text is cut at
/// `MAX_LAST_ERROR_LEN` bytes on a character boundary (with an ellipsis). The agent uses it on
/// everything it puts in `last_error`, so its reports always pass [`DeviceReport::check`].
pub fn report_text(s: &str) -> String {
    let mut out: String = s.chars().map(|c| if allowed_in_report_text(c) { c } else { '\u{fffd}' }).collect();
    if out.len() > MAX_LAST_ERROR_LEN {
        let mut cut = MAX_LAST_ERROR_LEN - '…'.len_utf8();
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push('…');
    }
    out
}

impl DeviceReport {
    /// Checks every field against its bounds ("parse, don't validate": the server stores only
    /// what this returns, plus the policy statuses whose names it checked).
    pub fn check(&self) -> Result<CheckedReport, ReportError> {
        let hostname = crate::ids::Hostname::parse(&self.hostname).map_err(ReportError::Hostname)?;
        if !valid_agent_version(&self.agent_version) {
            return Err(ReportError::AgentVersion);
        }
        if let Some(e) = &self.last_error {
            if e.len() > MAX_LAST_ERROR_LEN || !e.chars().all(allowed_in_report_text) {
                return Err(ReportError::LastError);
            }
        }
        if let Some(h) = &self.config_sha256 {
            if h.len() != 64 || !h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
                return Err(ReportError::ConfigSha256);
            }
        }
        if self.signed_in_users.len() > MAX_REPORTED_USERS {
            return Err(ReportError::TooManyUsers);
        }
        let signed_in_users = self
            .signed_in_users
            .iter()
            .map(|u| crate::ids::Upn::parse(u).map_err(ReportError::SignedInUser))
            .collect::<Result<_, _>>()?;
        if self.policies.len() > MAX_REPORTED_POLICIES {
            return Err(ReportError::TooManyPolicies);
        }
        let name_ok = |n: &str| {
            !n.is_empty()
                && n.len() <= MAX_POLICY_NAME_LEN
                && n.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        };
        if !self.policies.keys().all(|n| name_ok(n)) {
            return Err(ReportError::PolicyName);
        }
        if self.packages.len() > MAX_REPORTED_PACKAGES {
            return Err(ReportError::Packages(format!("at most {MAX_REPORTED_PACKAGES} packages")));
        }
        for (name, p) in &self.packages {
            crate::packages::check_name(name).map_err(|e| ReportError::Packages(e.to_string()))?;
            crate::packages::check_version_label(&p.version).map_err(|e| ReportError::Packages(e.to_string()))?;
            let text_ok = |t: &Option<String>, max: usize| {
                t.as_ref().is_none_or(|t| t.len() <= max && t.chars().all(allowed_in_report_text))
            };
            if !text_ok(&p.detail, MAX_PACKAGE_DETAIL_LEN) || !text_ok(&p.log_tail, MAX_PACKAGE_LOG_LEN) {
                return Err(ReportError::Packages(format!(
                    "package {name:?}: detail at most {MAX_PACKAGE_DETAIL_LEN} bytes and log_tail at most {MAX_PACKAGE_LOG_LEN}, without control characters other than newline and tab"
                )));
            }
        }
        Ok(CheckedReport { hostname, signed_in_users })
    }
}

/// A request for an enrollment token.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EnrollTokenRequest {
    pub uses: u32,
    pub ttl_seconds: u64,
    /// With an organisation's certificate: pin the top CA of the served chain instead of trusting
    /// the system roots.
    #[serde(default)]
    pub pin_ca: bool,
}

/// What an enrollment token `tenr.<id>.<secret>.<root>[.<tls>]` tells the agent to trust.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenTrust<'a> {
    /// Hex SHA-256 of the server's root signing key.
    pub root_fingerprint: &'a str,
    /// How to trust the server's TLS certificate; `None`: the token came from a plain-HTTP server.
    pub tls: Option<TlsTrust>,
}

/// How an agent trusts the server's TLS certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TlsTrust {
    /// The operating system's root certificates.
    SystemRoots,
    /// Exactly the CA whose certificate has this SHA-256 (lowercase hex), and no other.
    PinnedCa(String),
}

impl TlsTrust {
    /// The token's last part: `sys`, or the CA fingerprint.
    pub fn token_part(&self) -> &str {
        match self {
            TlsTrust::SystemRoots => "sys",
            TlsTrust::PinnedCa(f) => f,
        }
    }
}

/// An error and its causes in one line, each cause once (a refused TLS certificate says why
/// only in its source).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Reads the trust parts of an enrollment token; `None` when they are malformed.
pub fn token_trust(token: &str) -> Option<TokenTrust<'_>> {
    let mut parts = token.trim().split('.');
    if parts.next()? != "tenr" {
        return None;
    }
    let (_id, _secret) = (parts.next()?, parts.next()?);
    let root_fingerprint = parts.next().filter(|f| is_sha256_hex(f))?;
    let tls = match parts.next() {
        None => None,
        Some("sys") => Some(TlsTrust::SystemRoots),
        Some(f) if is_sha256_hex(f) => Some(TlsTrust::PinnedCa(f.to_string())),
        Some(_) => return None,
    };
    if parts.next().is_some() {
        return None;
    }
    Some(TokenTrust { root_fingerprint, tls })
}

#[cfg(test)]
mod token_tests {
    use super::*;

    #[test]
    fn token_trust_parts() {
        let root = "a".repeat(64);
        let ca = "0123456789abcdef".repeat(4);
        assert_eq!(token_trust(&format!("tenr.i.s.{root}")), Some(TokenTrust { root_fingerprint: &root, tls: None }));
        assert_eq!(token_trust(&format!("tenr.i.s.{root}.sys")).unwrap().tls, Some(TlsTrust::SystemRoots));
        assert_eq!(token_trust(&format!(" tenr.i.s.{root}.{ca}\n")).unwrap().tls, Some(TlsTrust::PinnedCa(ca.clone())));
        assert_eq!(token_trust(&format!("tenr.i.s.{root}.nope")), None);
        assert_eq!(token_trust(&format!("tenr.i.s.{root}.sys.x")), None);
        assert_eq!(token_trust("tenr.i.s.short"), None);
        assert_eq!(token_trust(&format!("tena.i.s.{root}")), None);
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EnrollTokenResponse {
    pub token: String,
    pub uses: u32,
    pub expires_at: String,
}

/// Where a setting lives.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", tag = "kind", content = "name")]
pub enum SettingScope {
    Tenant,
    Group(String),
    User(String),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SetSettingRequest {
    pub scope: SettingScope,
    pub key: String,
    /// JSON value, or absent with `undefined: true` to delete the key at this scope.
    #[serde(default)]
    pub value: Option<Value>,
    #[serde(default)]
    pub undefined: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UnsetSettingRequest {
    pub scope: SettingScope,
    pub key: String,
}

/// A device as administrators see it (`tenonctl devices show --json`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DeviceView {
    pub id: String,
    pub hostname: String,
    pub primary_user: Option<String>,
    pub config_version: u64,
    pub config_sha256: String,
    /// What the device last said it holds.
    pub reported_config_version: Option<u64>,
    pub reported_config_sha256: Option<String>,
    pub last_seen: Option<String>,
    pub enrolled_at: String,
    pub status: String,
    pub agent_version: Option<String>,
    pub signed_in_users: Vec<String>,
    pub last_error: Option<String>,
    pub policies: Map<String, Value>,
    /// Package name -> `{state, version, detail, exit_code}` (`devices show`: every package of
    /// the device's plan, `pending` until the device reports its current version).
    #[serde(default)]
    pub packages: Map<String, Value>,
}

/// RFC 9457 problem details.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Problem {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// Stable code clients can switch on.
    pub code: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn report() -> DeviceReport {
        DeviceReport {
            agent_version: "0.1.0".into(),
            hostname: "PC-1".into(),
            signed_in_users: vec!["Anna@Contoso.com".into()],
            config_version: Some(3),
            config_sha256: Some("ab".repeat(32)),
            last_error: Some("vault: repaired\n\tdetail".into()),
            policies: json!({"bitlocker": {"state": "ok"}}).as_object().unwrap().clone(),
            packages: Default::default(),
        }
    }

    #[test]
    fn reports_are_checked_field_by_field() {
        let ok = report().check().unwrap();
        assert_eq!(ok.hostname.as_str(), "PC-1");
        assert_eq!(ok.signed_in_users.iter().next().unwrap().as_str(), "anna@contoso.com");
        type Edit = fn(&mut DeviceReport);
        type Expect = fn(&ReportError) -> bool;
        let cases: &[(Edit, Expect)] = &[
            (|r| r.hostname = "x".repeat(1_000_000), |e| matches!(e, ReportError::Hostname(_))),
            (|r| r.hostname = "PC\u{1b}]0;owned\u{7}".into(), |e| matches!(e, ReportError::Hostname(_))),
            (|r| r.agent_version = "\u{1b}[31m1.0".into(), |e| *e == ReportError::AgentVersion),
            (|r| r.agent_version = "1".repeat(65), |e| *e == ReportError::AgentVersion),
            (|r| r.agent_version = String::new(), |e| *e == ReportError::AgentVersion),
            (|r| r.last_error = Some("a\u{1b}[2Jb".into()), |e| *e == ReportError::LastError),
            (|r| r.last_error = Some("evil\u{202e}txt".into()), |e| *e == ReportError::LastError),
            (|r| r.last_error = Some("e".repeat(MAX_LAST_ERROR_LEN + 1)), |e| *e == ReportError::LastError),
            (|r| r.config_sha256 = Some("AB".repeat(32)), |e| *e == ReportError::ConfigSha256),
            (|r| r.config_sha256 = Some("ab".into()), |e| *e == ReportError::ConfigSha256),
            (|r| r.signed_in_users = vec!["not a upn".into()], |e| matches!(e, ReportError::SignedInUser(_))),
            (|r| r.signed_in_users = vec!["a@b".into(); MAX_REPORTED_USERS + 1], |e| *e == ReportError::TooManyUsers),
            (
                |r| {
                    r.policies = (0..=MAX_REPORTED_POLICIES).map(|i| (format!("p{i}"), json!({}))).collect();
                },
                |e| *e == ReportError::TooManyPolicies,
            ),
            (
                |r| {
                    r.policies.insert("Bit\u{1b}".into(), json!({}));
                },
                |e| *e == ReportError::PolicyName,
            ),
            (
                |r| {
                    let mut p = crate::packages::PackageReport::new(crate::packages::State::Failed, "1.0", None);
                    p.log_tail = Some("x".repeat(MAX_PACKAGE_LOG_LEN + 1));
                    r.packages.insert("App".into(), p);
                },
                |e| matches!(e, ReportError::Packages(_)),
            ),
            (
                |r| {
                    let p = crate::packages::PackageReport::new(
                        crate::packages::State::Failed,
                        "1.0",
                        Some("a\u{1b}[31m".into()),
                    );
                    r.packages.insert("App".into(), p);
                },
                |e| matches!(e, ReportError::Packages(_)),
            ),
            (
                |r| {
                    let p = crate::packages::PackageReport::new(crate::packages::State::Installed, "1.0", None);
                    r.packages.insert("bad/name".into(), p);
                },
                |e| matches!(e, ReportError::Packages(_)),
            ),
        ];
        for (i, (edit, expected)) in cases.iter().enumerate() {
            let mut r = report();
            edit(&mut r);
            let err = r.check().expect_err(&format!("case {i} must be refused"));
            assert!(expected(&err), "case {i}: {err:?}");
        }
    }

    #[test]
    fn report_text_always_passes_the_check() {
        for input in
            ["plain", "esc \u{1b}[2J here", "bidi \u{202e}x", &"é".repeat(5000), &"x".repeat(MAX_LAST_ERROR_LEN)]
        {
            let mut r = report();
            r.last_error = Some(report_text(input));
            assert!(r.check().is_ok(), "{input:?}");
            assert!(r.last_error.unwrap().len() <= MAX_LAST_ERROR_LEN);
        }
        assert_eq!(report_text("a\u{1b}b"), "a\u{fffd}b");
        assert_eq!(report_text("short"), "short");
    }
}
