//! Wire types of the HTTP API shared by the server, the agent and tenonctl (serde only, no I/O).
//!
//! Device endpoints (Bearer device credential):
//! - `POST /api/v1/enroll` [`EnrollRequest`] -> [`EnrollResponse`] (Bearer-less: the enrollment token is the body)
//! - `GET  /api/v1/device/config` with `If-None-Match: "<etag>"` -> 200 envelope + `ETag`, or 304
//! - `GET  /api/v1/device/trust` -> [`TrustBundle`]
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

/// What the agent reports after each sync.
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
}

/// A request for an enrollment token.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EnrollTokenRequest {
    pub uses: u32,
    pub ttl_seconds: u64,
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
