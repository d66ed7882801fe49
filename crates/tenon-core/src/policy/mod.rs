//! Pure policy decisions: each module turns configuration and device facts into a plan or a verdict
//! that the agent then carries out through its platform layer (DESIGN.md section 3).

pub mod bitlocker;
pub mod delivery_optimization;
pub mod escrow;
pub mod install_gate;
pub mod local_admin;
pub mod password_expiry;
pub mod signatures;
pub mod state;

use serde_json::{Map, Value};

/// Reads a dotted path (`Policies.PasswordExpiryWarning.Enabled`) from a config map.
pub(crate) fn config_path<'m>(config: &'m Map<String, Value>, path: &str) -> Option<&'m Value> {
    let mut parts = path.split('.');
    let mut cur = config.get(parts.next()?)?;
    for p in parts {
        cur = cur.as_object()?.get(p)?;
    }
    Some(cur)
}

/// The device's primary user as the server states it in `payload.machine` (`Client.PrimaryUser`, a
/// UPN), lower-cased; `None` when the device has none.
pub fn primary_user(machine: &Map<String, Value>) -> Option<String> {
    config_path(machine, "Client.PrimaryUser")
        .and_then(Value::as_str)
        .map(|s| s.trim().to_lowercase())
        .filter(|s| !s.is_empty())
}
