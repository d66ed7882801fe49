//! A device's health as its last report said, reduced to what the portal's overview counts and
//! filters by (BitLocker bucket, Delivery Optimization group, failures, Entra escrows). Kept in
//! each device's in-memory metadata, set at load and at every report, so the overview over
//! 100,000 devices is a scan of memory, never a query over the reported JSON.

use serde_json::{Map, Value};
use tenon_core::policy::state::{common_state, CommonState};

/// Where a device stands with BitLocker, as the overview groups it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BitlockerBucket {
    /// Encrypted, and the recovery key is stored where it must be.
    EncryptedEscrowed,
    /// Under way: encrypting, or a key still being escrowed.
    Encrypting,
    /// An administrator must act (a step failed, the volume is decrypting).
    ActionRequired,
    /// Required, but the device cannot have it (no TPM, a virtual machine, ...).
    NotCapable,
    /// Escrow failed on every attempt, or the policy failed.
    Failed,
    /// BitLocker is not required on this device.
    NotRequired,
}

impl BitlockerBucket {
    pub const ALL: [BitlockerBucket; 6] = [
        Self::EncryptedEscrowed,
        Self::Encrypting,
        Self::ActionRequired,
        Self::NotCapable,
        Self::Failed,
        Self::NotRequired,
    ];

    /// The word in `/devices?filter=bitlocker-WORD`.
    pub fn word(self) -> &'static str {
        match self {
            Self::EncryptedEscrowed => "encrypted",
            Self::Encrypting => "encrypting",
            Self::ActionRequired => "action-required",
            Self::NotCapable => "not-capable",
            Self::Failed => "failed",
            Self::NotRequired => "not-required",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::EncryptedEscrowed => "encrypted and escrowed",
            Self::Encrypting => "encrypting",
            Self::ActionRequired => "action required",
            Self::NotCapable => "not capable",
            Self::Failed => "failed",
            Self::NotRequired => "not required",
        }
    }

    pub fn parse(word: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|b| b.word() == word)
    }

    /// The bucket of BitLocker's reported `state` (docs/policy-states.md); `unknown` or a state
    /// this version does not know is in no bucket.
    pub fn of_state(state: &str) -> Option<Self> {
        Some(match state {
            "encrypted" | "ok" => Self::EncryptedEscrowed,
            "action_required" => Self::ActionRequired,
            "skipped" => Self::NotCapable,
            "not_applicable" => Self::NotRequired,
            other => match common_state("bitlocker", other) {
                CommonState::Pending | CommonState::Waiting => Self::Encrypting,
                CommonState::Failed => Self::Failed,
                _ => return None,
            },
        })
    }
}

/// The Delivery Optimization group a device reported, with the gateway that defines it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DoGroup {
    pub group_id: String,
    pub gateway_mac: Option<String>,
    pub gateway_ip: Option<String>,
}

/// What the overview needs of one device's last report (small: it is kept for every device).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceHealth {
    pub bitlocker: Option<BitlockerBucket>,
    pub delivery_optimization: Option<Box<DoGroup>>,
    /// The last sync reported an error, or a policy's state is a failure.
    pub failing: bool,
    /// A recovery-password protector whose Entra escrow is pending / failed.
    pub entra_pending: bool,
    pub entra_failed: bool,
}

fn text(v: Option<&Value>) -> Option<String> {
    v.and_then(Value::as_str).map(str::to_string)
}

impl DeviceHealth {
    /// From a report's `policies` and `last_error` (as stored in `devices`).
    pub fn from_report(policies: &Map<String, Value>, last_error: Option<&str>) -> Self {
        let state_of = |p: &Value| p.get("state").and_then(Value::as_str).unwrap_or("unknown").to_string();
        let bitlocker = policies.get("bitlocker");
        let protectors = bitlocker.and_then(|b| b.get("protectors")).and_then(Value::as_array);
        let entra = |want: &str| {
            protectors.is_some_and(|ps| ps.iter().any(|p| p.get("entra").and_then(Value::as_str) == Some(want)))
        };
        let delivery_optimization = policies.get("delivery_optimization").and_then(|d| {
            let group_id = text(d.get("group_id"))?;
            Some(Box::new(DoGroup {
                group_id,
                gateway_mac: text(d.get("gateway_mac")),
                gateway_ip: text(d.get("gateway_ip")),
            }))
        });
        DeviceHealth {
            bitlocker: bitlocker.and_then(|b| BitlockerBucket::of_state(&state_of(b))),
            delivery_optimization,
            failing: last_error.is_some_and(|e| !e.trim().is_empty())
                || policies.iter().any(|(name, p)| common_state(name, &state_of(p)) == CommonState::Failed),
            entra_pending: entra("pending"),
            entra_failed: entra("failed"),
        }
    }

    /// From the stored JSON text of `devices.policies` (damaged or absent: nothing reported).
    pub fn from_stored(policies: Option<&str>, last_error: Option<&str>) -> Self {
        let policies: Map<String, Value> = policies.and_then(|s| serde_json::from_str(s).ok()).unwrap_or_default();
        Self::from_report(&policies, last_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn bitlocker_states_fall_into_buckets() {
        use BitlockerBucket::*;
        for (state, expected) in [
            ("encrypted", Some(EncryptedEscrowed)),
            ("enforcing", Some(Encrypting)),
            ("escrow_pending", Some(Encrypting)),
            ("action_required", Some(ActionRequired)),
            ("skipped", Some(NotCapable)),
            ("escrow_failed", Some(Failed)),
            ("failed", Some(Failed)),
            ("not_applicable", Some(NotRequired)),
            ("unknown", None),
            ("<b>", None),
        ] {
            assert_eq!(BitlockerBucket::of_state(state), expected, "{state}");
        }
        for b in BitlockerBucket::ALL {
            assert_eq!(BitlockerBucket::parse(b.word()), Some(b));
        }
    }

    #[test]
    fn a_report_reduces_to_its_health() {
        let policies = json!({
            "bitlocker": {"state": "escrow_pending", "protectors": [{"entra": "ok"}, {"entra": "pending"}]},
            "delivery_optimization": {"state": "applied", "group_id": "g-1", "gateway_mac": "aa"},
            "local_admin": {"state": "failed"},
        });
        let h = DeviceHealth::from_report(policies.as_object().unwrap(), None);
        assert_eq!(h.bitlocker, Some(BitlockerBucket::Encrypting));
        assert_eq!(h.delivery_optimization.as_ref().map(|d| d.group_id.as_str()), Some("g-1"));
        assert!(h.failing && h.entra_pending && !h.entra_failed);
        let ok = DeviceHealth::from_stored(Some(r#"{"bitlocker":{"state":"encrypted"}}"#), Some(" "));
        assert!(!ok.failing);
        assert!(DeviceHealth::from_stored(None, Some("sync failed")).failing);
        assert_eq!(DeviceHealth::from_stored(Some("not json"), None), DeviceHealth::default());
    }
}
