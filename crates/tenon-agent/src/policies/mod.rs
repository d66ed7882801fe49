//! Policies: each turns the verified configuration and the device's facts into a plan (pure, in
//! tenon-core), applies it through the [`Platform`], and returns a status for the report.
//!
//! A policy's `state` is persisted in the encrypted vault between runs. Policies use it to remember
//! what Tenon itself wrote, so that they overwrite or remove only their own changes. A policy whose
//! steps must survive a kill between them (BitLocker) persists its state durably after each step
//! with [`PolicyContext::persist`]; the agent writes it to the vault at once.

pub mod bitlocker;
pub mod delivery_optimization;
pub mod escrow;
pub mod local_admin;
pub mod packages;
pub mod password_expiry;
pub mod signatures;

use crate::platform::Platform;
use serde_json::{Map, Value};
use tenon_core::api::PolicyStatus;
pub use tenon_core::policy::escrow::{EscrowReceipt, SealedRecoveryKey};

/// What a policy sees when it runs.
pub struct PolicyContext<'a> {
    pub platform: &'a dyn Platform,
    /// `payload.machine`: the effective config of the device's primary user (or tenant defaults).
    pub machine: &'a Map<String, Value>,
    /// `payload.users`: the effective config of each user of the device, by lower-case UPN.
    pub users: &'a Map<String, Value>,
    /// Unix seconds.
    pub now: i64,
    /// This policy's persisted state; `Value::Null` the first time.
    pub state: &'a mut Value,
    /// The Tenon server's recovery-key escrow ([`NoEscrow`] where there is none).
    pub escrow: &'a dyn EscrowSink,
    /// Where [`PolicyContext::persist`] writes `state` ([`NoStore`] where nothing is durable).
    pub store: &'a dyn StateStore,
}

impl PolicyContext<'_> {
    /// Writes this policy's `state` durably now (the agent: both vault copies), so that what a
    /// step did is remembered even if the agent is killed before the run ends.
    pub fn persist(&self) -> Result<(), String> {
        self.store.persist(self.state)
    }
}

/// Durable storage of one policy's state between the steps of a run.
pub trait StateStore {
    /// `Ok` once `state` is on disk; an error says why not (state holds no secrets).
    fn persist(&self, state: &Value) -> Result<(), String>;
}

/// Nothing is durable before the run ends (tests that do not simulate kills).
pub struct NoStore;

impl StateStore for NoStore {
    fn persist(&self, _state: &Value) -> Result<(), String> {
        Ok(())
    }
}

/// Where an escrowed key is sealed to: the server's escrow public key, and this device's id, which
/// the sealed key is bound to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EscrowTarget {
    pub device_id: String,
    /// X25519 public key (the `escrow_public_key` of the enrollment answer, decoded).
    pub public_key: [u8; 32],
}

/// The Tenon server's recovery-key escrow as policies see it. The agent implements it over HTTP
/// (`POST /api/v1/device/escrow` with a [`tenon_core::policy::escrow::EscrowUpload`] body);
/// [`escrow::MemoryEscrow`] is an in-memory server for tests.
pub trait EscrowSink {
    /// The key to seal to; `None` when the device is not enrolled or the server has no escrow key.
    fn escrow_target(&self) -> Option<EscrowTarget>;
    /// Uploads a sealed recovery key. `Ok` only once the server has stored it durably (its receipt);
    /// an error says why not (it never contains key material: only the sealed form is sent).
    /// `replaces` names the protector this key rotates out.
    fn upload(&self, sealed: &SealedRecoveryKey, replaces: Option<&str>) -> Result<EscrowReceipt, String>;
    /// Protector ids whose keys the server asks to rotate (an administrator read them). The server
    /// lists an id until the device reports it retired; the policy also remembers each request in
    /// its state until then. Empty when unknown or unreachable.
    fn pending_rotations(&self) -> Vec<String>;
    /// Tells the server a protector to retire is gone from the volume, `replaced_by` the escrowed
    /// key that stays. Idempotent; `Ok` once the server recorded it.
    fn report_retired(&self, protector_id: &str, replaced_by: Option<&str>) -> Result<(), String>;
    /// Protector ids for which the server holds more than one different recovery password (a
    /// forged or foreign upload). Empty when unknown or unreachable.
    fn escrow_conflicts(&self) -> Vec<String>;
}

/// No server escrow: every upload fails, so the BitLocker policy stops at `escrow_pending`.
pub struct NoEscrow;

impl EscrowSink for NoEscrow {
    fn escrow_target(&self) -> Option<EscrowTarget> {
        None
    }

    fn upload(&self, _sealed: &SealedRecoveryKey, _replaces: Option<&str>) -> Result<EscrowReceipt, String> {
        Err("server escrow not configured".into())
    }

    fn pending_rotations(&self) -> Vec<String> {
        Vec::new()
    }

    fn report_retired(&self, _protector_id: &str, _replaced_by: Option<&str>) -> Result<(), String> {
        Err("server escrow not configured".into())
    }

    fn escrow_conflicts(&self) -> Vec<String> {
        Vec::new()
    }
}

/// One policy of the agent.
pub trait Policy {
    /// The name under which the status is reported (`policies.<name>` in `devices show`).
    fn name(&self) -> &'static str;
    fn apply(&self, ctx: &mut PolicyContext<'_>) -> PolicyStatus;
}

/// Every policy the agent runs, in the order it runs them. Software packages
/// ([`packages::run`]) run after these: they need the content source and report per package.
pub fn all() -> Vec<Box<dyn Policy>> {
    vec![
        Box::new(bitlocker::Bitlocker),
        Box::new(delivery_optimization::DeliveryOptimization),
        Box::new(local_admin::LocalAdmin),
        Box::new(password_expiry::PasswordExpiryWarnings),
        Box::new(signatures::Signatures),
    ]
}

/// Reads a dotted path from a config map.
pub fn config_get<'m>(config: &'m Map<String, Value>, path: &str) -> Option<&'m Value> {
    let mut parts = path.split('.');
    let mut cur = config.get(parts.next()?)?;
    for p in parts {
        cur = cur.as_object()?.get(p)?;
    }
    Some(cur)
}
