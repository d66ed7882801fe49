//! The agent's status file (`status.json` in the state directory): what `tenon-agent status`
//! shows. It holds no secrets; the vault is the source of truth for configuration.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::Path;

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub device_id: Option<String>,
    pub server_url: Option<String>,
    /// Version and payload hash of the configuration the agent holds and applies.
    pub config_version: Option<u64>,
    pub config_sha256: Option<String>,
    /// When the last check-in with the server succeeded (RFC 3339).
    pub last_sync: Option<String>,
    /// `unchanged`, `updated`, `rejected` or `failed`.
    pub last_sync_result: Option<String>,
    /// When the agent last tried.
    pub last_attempt: Option<String>,
    /// Why the last sync did not fully succeed; null when it did.
    pub last_error: Option<String>,
    /// When the server last acknowledged a report from this device (RFC 3339). A sync reports only
    /// when the report changed since the last acknowledged one, or that one is a day old.
    #[serde(default)]
    pub last_report_at: Option<String>,
    /// Whether the last sync sent a report (and the server acknowledged it).
    #[serde(default)]
    pub last_sync_reported: bool,
    /// The server revoked this device; it must be re-enrolled.
    #[serde(default)]
    pub decommissioned: bool,
    /// Why an installed agent is not enrolled yet (no server given, or the token did not work)
    /// and what to do; null once enrolled. Never contains the token.
    #[serde(default)]
    pub enrollment_error: Option<String>,
    #[serde(default)]
    pub policies: Map<String, Value>,
}

impl Status {
    pub fn path(dir: &Path) -> std::path::PathBuf {
        dir.join("status.json")
    }

    pub fn load(dir: &Path) -> Self {
        std::fs::read(Self::path(dir)).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
    }

    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let bytes = serde_json::to_vec_pretty(self).expect("status serialises");
        crate::vault::write_atomic(&Self::path(dir), &bytes)
    }
}

pub fn rfc3339(t: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|d| d.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| t.to_string())
}
