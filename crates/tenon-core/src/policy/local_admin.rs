//! Local admin rights for the primary user (`Policies.SetCurrentUserAdministrator`, the "makeAdmin"
//! switch): which members of the local Administrators group to add or remove, given what Tenon
//! added before.
//!
//! Config contract (server -> agent), in `payload.machine` (the primary user's effective config):
//! - `Policies.SetCurrentUserAdministrator`: `true` makes the primary user a local administrator;
//!   anything else (absent, `false`) means no.
//! - `Client.PrimaryUser`: the primary user's UPN in lower case, absent when the device has none.
//!   The server does not know SIDs: the agent takes the SID from the primary user's session when that
//!   user is signed in, and otherwise names the account `AzureAD\<upn>`.
//!
//! Rules:
//! - Tenon records every membership it adds (in the policy's persisted state) and only ever removes
//!   recorded ones: when the setting turns off, when the device has no primary user any more, or when
//!   the primary user changes. Members it did not add are never touched.
//! - A primary user who was already an administrator before Tenon is not recorded, so Tenon never
//!   removes that membership later.
//! - Accounts are compared by SID when both sides have one, else by name (case-insensitive). A member
//!   list that carries SIDs (Windows) names Entra users by display name, so a UPN-based name cannot be
//!   matched against it: there Tenon waits until the primary user signs in and the SID is known,
//!   rather than risk claiming a membership that an administrator made by hand.
//! - The plan is idempotent: after a successful apply, planning again yields no actions.

use serde::{Deserialize, Serialize};

/// A member of a local group, as the platform lists it or as Tenon adds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Such as `AzureAD\anna@contoso.com`.
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sid: Option<String>,
}

impl Member {
    /// The account Tenon adds for a UPN: `AzureAD\<upn>`, with its SID when known.
    pub fn for_upn(upn: &str, sid: Option<&str>) -> Self {
        Self { name: format!("AzureAD\\{}", upn.trim().to_lowercase()), sid: sid.map(str::to_string) }
    }

    /// Whether two entries name the same account: by SID when both have one, else by name.
    pub fn same_account(&self, other: &Member) -> bool {
        match (&self.sid, &other.sid) {
            (Some(a), Some(b)) => a.eq_ignore_ascii_case(b),
            _ => self.name.to_lowercase() == other.name.to_lowercase(),
        }
    }
}

/// What Tenon remembers between runs: the memberships it added itself.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalAdminState {
    #[serde(default)]
    pub added: Vec<Member>,
}

impl LocalAdminState {
    /// Updates the record after `action` succeeded on the device.
    pub fn record(&mut self, action: &AdminAction) {
        match action {
            AdminAction::Add(m) => {
                if !self.added.iter().any(|a| a.same_account(m)) {
                    self.added.push(m.clone());
                }
            }
            AdminAction::Remove(m) | AdminAction::Forget(m) => self.added.retain(|a| !a.same_account(m)),
        }
    }
}

/// The facts the plan is made from.
#[derive(Clone, Copy, Debug)]
pub struct LocalAdminFacts<'a> {
    /// `Policies.SetCurrentUserAdministrator` is `true`.
    pub enabled: bool,
    /// The primary user's UPN.
    pub primary: Option<&'a str>,
    /// The primary user's SID, known while that user is signed in.
    pub primary_sid: Option<&'a str>,
    /// The current members of the local Administrators group.
    pub members: &'a [Member],
}

/// One step of the plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdminAction {
    /// Add to Administrators and record it as Tenon's.
    Add(Member),
    /// Remove a membership Tenon added, then drop it from the record.
    Remove(Member),
    /// Drop from the record a membership that is already gone (someone removed it by hand).
    Forget(Member),
}

/// Where the primary user stands once the plan is carried out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The setting is off: only Tenon's earlier memberships are removed.
    Off,
    /// The setting is on but the device has no primary user.
    NoPrimaryUser,
    /// The SID is needed and not known yet: the primary user has to sign in once.
    WaitingForSignIn { upn: String },
    /// The primary user is (or will be, after the plan) a local administrator.
    Admin { upn: String, by_tenon: bool },
}

impl Outcome {
    /// The `state` of the policy status.
    pub fn state(&self) -> &'static str {
        match self {
            Outcome::Off => "disabled",
            Outcome::NoPrimaryUser | Outcome::WaitingForSignIn { .. } => "pending",
            Outcome::Admin { .. } => "ok",
        }
    }

    pub fn reason(&self) -> String {
        match self {
            Outcome::Off => "Policies.SetCurrentUserAdministrator is off".into(),
            Outcome::NoPrimaryUser => "the device has no primary user".into(),
            Outcome::WaitingForSignIn { upn } => {
                format!("waiting for primary user {upn} to sign in, so that the account's SID is known")
            }
            Outcome::Admin { upn, by_tenon: true } => format!("primary user {upn} is a local administrator"),
            Outcome::Admin { upn, by_tenon: false } => {
                format!("primary user {upn} was already a local administrator; Tenon leaves that membership alone")
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalAdminPlan {
    pub actions: Vec<AdminAction>,
    pub outcome: Outcome,
}

/// Decides what to change in the Administrators group.
pub fn plan(facts: &LocalAdminFacts<'_>, state: &LocalAdminState) -> LocalAdminPlan {
    let present = |m: &Member| facts.members.iter().any(|x| x.same_account(m));
    let recorded = |m: &Member| state.added.iter().any(|x| x.same_account(m));
    let members_have_sids = facts.members.iter().any(|m| m.sid.is_some());

    let (wanted, outcome) = match (facts.enabled, facts.primary) {
        (false, _) => (None, Outcome::Off),
        (true, None) => (None, Outcome::NoPrimaryUser),
        (true, Some(upn)) if facts.primary_sid.is_none() && members_have_sids => {
            (None, Outcome::WaitingForSignIn { upn: upn.to_string() })
        }
        (true, Some(upn)) => {
            let m = Member::for_upn(upn, facts.primary_sid);
            // Present but not in the record: an administrator made it by hand before Tenon.
            let by_tenon = recorded(&m) || !present(&m);
            (Some(m), Outcome::Admin { upn: upn.to_string(), by_tenon })
        }
    };

    let mut actions = Vec::new();
    for old in &state.added {
        if wanted.as_ref().is_some_and(|w| w.same_account(old)) {
            continue;
        }
        actions.push(if present(old) { AdminAction::Remove(old.clone()) } else { AdminAction::Forget(old.clone()) });
    }
    // While waiting for the SID, a recorded membership of the same primary user stays: it is Tenon's
    // and still wanted.
    if let Outcome::WaitingForSignIn { upn } = &outcome {
        let name_only = Member::for_upn(upn, None);
        actions.retain(|a| !matches!(a, AdminAction::Remove(m) | AdminAction::Forget(m) if m.name.eq_ignore_ascii_case(&name_only.name)));
    }
    if let Some(w) = wanted {
        if !present(&w) {
            actions.push(AdminAction::Add(w));
        }
    }
    LocalAdminPlan { actions, outcome }
}

#[cfg(test)]
mod tests {
    use super::*;
    use AdminAction::*;

    fn m(name: &str) -> Member {
        Member { name: name.to_string(), sid: None }
    }

    fn ms(name: &str, sid: &str) -> Member {
        Member { name: name.to_string(), sid: Some(sid.to_string()) }
    }

    const ANNA: &str = "AzureAD\\anna@x.com";
    const BOB: &str = "AzureAD\\bob@x.com";
    const MANUAL: &str = "AzureAD\\manual@x.com";

    #[allow(clippy::too_many_arguments)]
    fn check(
        enabled: bool,
        primary: Option<&str>,
        primary_sid: Option<&str>,
        members: &[Member],
        added: &[Member],
        expected_actions: &[AdminAction],
        expected_state: &str,
    ) {
        let state = LocalAdminState { added: added.to_vec() };
        let facts = LocalAdminFacts { enabled, primary, primary_sid, members };
        let p = plan(&facts, &state);
        assert_eq!(p.actions, expected_actions, "{facts:?} {state:?}");
        assert_eq!(p.outcome.state(), expected_state, "{facts:?} {state:?}");

        // Carrying the plan out and planning again changes nothing (idempotence).
        let mut members = members.to_vec();
        let mut state = state;
        for a in &p.actions {
            match a {
                Add(x) => members.push(x.clone()),
                Remove(x) => members.retain(|y| !y.same_account(x)),
                Forget(_) => {}
            }
            state.record(a);
        }
        let again = plan(&LocalAdminFacts { enabled, primary, primary_sid, members: &members }, &state);
        assert_eq!(again.actions, vec![], "second plan after {p:?}");
        assert_eq!(again.outcome, p.outcome);
    }

    #[test]
    fn table() {
        let anna = Some("anna@x.com");
        // On, primary not yet admin: Tenon adds it.
        check(true, anna, None, &[m(MANUAL)], &[], &[Add(m(ANNA))], "ok");
        // Already added by Tenon: nothing.
        check(true, anna, None, &[m(MANUAL), m(ANNA)], &[m(ANNA)], &[], "ok");
        // Case differences do not matter.
        check(true, Some("Anna@X.com"), None, &[m("azuread\\ANNA@x.com")], &[m(ANNA)], &[], "ok");
        // Primary was a manual admin before Tenon: not claimed, not touched.
        check(true, anna, None, &[m(ANNA)], &[], &[], "ok");
        // Setting off: remove exactly Tenon's, the manual admin stays.
        check(false, anna, None, &[m(MANUAL), m(ANNA)], &[m(ANNA)], &[Remove(m(ANNA))], "disabled");
        // Setting off, primary was a manual admin: untouched.
        check(false, anna, None, &[m(MANUAL), m(ANNA)], &[], &[], "disabled");
        // Setting off, nothing recorded: nothing at all.
        check(false, None, None, &[m(MANUAL)], &[], &[], "disabled");
        // Primary changes: the old Tenon-added goes, the new one is added.
        check(true, Some("bob@x.com"), None, &[m(MANUAL), m(ANNA)], &[m(ANNA)], &[Remove(m(ANNA)), Add(m(BOB))], "ok");
        // Primary changes to the manual admin: old Tenon-added goes, manual one is not claimed.
        check(true, Some("manual@x.com"), None, &[m(MANUAL), m(ANNA)], &[m(ANNA)], &[Remove(m(ANNA))], "ok");
        // Primary cleared (decommission or reassignment pending): Tenon's membership goes.
        check(true, None, None, &[m(ANNA)], &[m(ANNA)], &[Remove(m(ANNA))], "pending");
        // Someone removed Tenon's membership by hand while the setting is off: forget it.
        check(false, anna, None, &[m(MANUAL)], &[m(ANNA)], &[Forget(m(ANNA))], "disabled");
        // ... while it is on: Tenon enforces it again.
        check(true, anna, None, &[m(MANUAL)], &[m(ANNA)], &[Add(m(ANNA))], "ok");
    }

    #[test]
    fn by_sid_where_known() {
        let anna = Some("anna@x.com");
        let anna_sid = Some("S-1-12-1-1");
        // Windows lists Entra members by display name with their SID.
        let listed_anna = ms("AzureAD\\AnnaSmith", "S-1-12-1-1");
        let builtin = ms("DESKTOP\\Administrator", "S-1-5-21-9-500");
        // Signed in, SID known: added by SID.
        check(true, anna, anna_sid, std::slice::from_ref(&builtin), &[], &[Add(ms(ANNA, "S-1-12-1-1"))], "ok");
        // Manual admin recognised by SID despite a different name.
        check(true, anna, anna_sid, &[builtin.clone(), listed_anna.clone()], &[], &[], "ok");
        // Tenon's record matches the listed member by SID.
        check(
            false,
            anna,
            None,
            std::slice::from_ref(&listed_anna),
            &[ms(ANNA, "S-1-12-1-1")],
            &[Remove(ms(ANNA, "S-1-12-1-1"))],
            "disabled",
        );
        // Not signed in, members carry SIDs: wait rather than guess.
        check(true, anna, None, &[builtin.clone(), listed_anna.clone()], &[], &[], "pending");
        // ... and keep a membership Tenon already added for the same user.
        check(true, anna, None, &[builtin.clone(), listed_anna.clone()], &[ms(ANNA, "S-1-12-1-1")], &[], "pending");
        // ... but still remove a former primary user's.
        let listed_bob = ms("AzureAD\\Bob", "S-1-12-1-2");
        check(
            true,
            anna,
            None,
            &[builtin, listed_bob],
            &[ms(BOB, "S-1-12-1-2")],
            &[Remove(ms(BOB, "S-1-12-1-2"))],
            "pending",
        );
    }

    #[test]
    fn reasons() {
        let p = plan(
            &LocalAdminFacts { enabled: true, primary: Some("anna@x.com"), primary_sid: None, members: &[m(ANNA)] },
            &LocalAdminState::default(),
        );
        assert_eq!(p.outcome, Outcome::Admin { upn: "anna@x.com".into(), by_tenon: false });
        assert!(p.outcome.reason().contains("already"));
        assert_eq!(Outcome::NoPrimaryUser.reason(), "the device has no primary user");
    }
}
