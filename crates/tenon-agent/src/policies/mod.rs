//! Policies: each turns the verified configuration and the device's facts into a plan (pure, in
//! tenon-core), applies it through the [`Platform`], and returns a status for the report.
//!
//! A policy's `state` is persisted in the encrypted vault between runs. Policies use it to remember
//! what Tenon itself wrote, so that they overwrite or remove only their own changes.

pub mod delivery_optimization;
pub mod local_admin;
pub mod mandatory_installs;
pub mod password_expiry;
pub mod signatures;

use crate::platform::Platform;
use serde_json::{Map, Value};
use tenon_core::api::PolicyStatus;

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
}

/// One policy of the agent.
pub trait Policy {
    /// The name under which the status is reported (`policies.<name>` in `devices show`).
    fn name(&self) -> &'static str;
    fn apply(&self, ctx: &mut PolicyContext<'_>) -> PolicyStatus;
}

/// Every policy the agent runs, in the order it runs them.
pub fn all() -> Vec<Box<dyn Policy>> {
    vec![
        Box::new(delivery_optimization::DeliveryOptimization),
        Box::new(local_admin::LocalAdmin),
        Box::new(mandatory_installs::MandatoryInstalls),
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
