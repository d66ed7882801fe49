//! The one set of policy states every report maps onto (documented in docs/policy-states.md).
//! Policies may report a richer `state` (BitLocker's `enforcing`, `escrow_pending`, ...); each
//! such state belongs to exactly one common state, given by [`common_state`], which is what
//! administrators filter and count by.

use serde::Serialize;

/// What a policy's state means to an administrator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CommonState {
    /// The device is as the configuration says.
    Ok,
    /// The policy has nothing to do here (off, not assigned, not possible on this device); the
    /// reason says why.
    NotApplicable,
    /// Blocked on something outside Tenon: a user to sign in, a network to appear.
    Waiting,
    /// Under way: continues at the next syncs without anyone acting.
    Pending,
    /// It did not work; the reason says what failed and what to do.
    Failed,
    /// The agent cannot tell (a fact it needs is missing), or a state this version does not know.
    Unknown,
}

impl CommonState {
    pub const ALL: [CommonState; 6] =
        [Self::Ok, Self::NotApplicable, Self::Waiting, Self::Pending, Self::Failed, Self::Unknown];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::NotApplicable => "not_applicable",
            Self::Waiting => "waiting",
            Self::Pending => "pending",
            Self::Failed => "failed",
            Self::Unknown => "unknown",
        }
    }
}

/// Every policy-specific state reported today, with the common state it belongs to. A policy
/// that adds a state adds it here (docs/policy-states.md lists this table).
pub const DETAILED_STATES: &[(&str, &str, CommonState)] = &[
    ("bitlocker", "encrypted", CommonState::Ok),
    ("bitlocker", "not_applicable", CommonState::NotApplicable),
    ("bitlocker", "skipped", CommonState::NotApplicable),
    ("bitlocker", "enforcing", CommonState::Pending),
    ("bitlocker", "escrow_pending", CommonState::Pending),
    ("bitlocker", "escrow_failed", CommonState::Failed),
    ("bitlocker", "action_required", CommonState::Failed),
    ("delivery_optimization", "applied", CommonState::Ok),
    ("delivery_optimization", "compliant", CommonState::Ok),
    ("delivery_optimization", "disabled", CommonState::NotApplicable),
    ("delivery_optimization", "removed", CommonState::NotApplicable),
    ("delivery_optimization", "managed_elsewhere", CommonState::NotApplicable),
    ("delivery_optimization", "no_gateway", CommonState::Waiting),
    ("local_admin", "disabled", CommonState::NotApplicable),
];

/// The common state of `policy`'s reported `state`: the common names are themselves, the
/// detailed ones come from [`DETAILED_STATES`], anything else is [`CommonState::Unknown`].
pub fn common_state(policy: &str, state: &str) -> CommonState {
    if let Some(c) = CommonState::ALL.into_iter().find(|c| c.as_str() == state) {
        return c;
    }
    DETAILED_STATES
        .iter()
        .find(|(p, s, _)| *p == policy && *s == state)
        .map(|(_, _, c)| *c)
        .unwrap_or(CommonState::Unknown)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_map_onto_the_common_set() {
        let check = |policy: &str, state: &str, want: CommonState| {
            assert_eq!(common_state(policy, state), want, "{policy} {state}")
        };
        check("signatures", "ok", CommonState::Ok);
        check("signatures", "not_applicable", CommonState::NotApplicable);
        check("password_expiry", "unknown", CommonState::Unknown);
        check("bitlocker", "enforcing", CommonState::Pending);
        check("bitlocker", "escrow_failed", CommonState::Failed);
        check("delivery_optimization", "no_gateway", CommonState::Waiting);
        // A detailed state belongs to its policy only.
        check("signatures", "enforcing", CommonState::Unknown);
        check("anything", "something_new", CommonState::Unknown);
        for (p, s, _) in DETAILED_STATES {
            assert_eq!(DETAILED_STATES.iter().filter(|(q, t, _)| q == p && t == s).count(), 1, "{p} {s} twice");
        }
    }
}
