//! The `local_admin` policy: makes the primary user a member of the local Administrators group while
//! `Policies.SetCurrentUserAdministrator` is true, and removes only the memberships Tenon added.
//! The decision is `tenon_core::policy::local_admin::plan` (which documents the rules and the config
//! contract); this module reads the facts, carries the plan out and records what Tenon added.

use super::{Policy, PolicyContext};
use crate::platform::Account;
use serde_json::Value;
use tenon_core::api::PolicyStatus;
use tenon_core::policy::local_admin::{plan, AdminAction, LocalAdminFacts, LocalAdminState, Member};
use tenon_core::policy::primary_user;

/// The local Administrators group, by the name the platform layer knows it under.
const GROUP: &str = "Administrators";

pub struct LocalAdmin;

impl Policy for LocalAdmin {
    fn name(&self) -> &'static str {
        "local_admin"
    }

    fn apply(&self, ctx: &mut PolicyContext<'_>) -> PolicyStatus {
        // A value of the wrong type is reported, not guessed at; memberships stay as they are.
        let enabled = match tenon_core::schema::read(ctx.machine, "Policies.SetCurrentUserAdministrator") {
            Ok(v) => v == Some(&Value::Bool(true)),
            Err(e) => return PolicyStatus::new("failed").with_reason(format!("{e}; nothing changed")),
        };
        let primary = primary_user(ctx.machine);

        // The SID comes from the primary user's session; without one the account goes by name.
        let sessions = match ctx.platform.signed_in_users() {
            Ok(s) => s,
            Err(e) if e.is_unavailable() => Vec::new(),
            Err(e) => return PolicyStatus::new("failed").with_reason(format!("cannot list signed-in users: {e}")),
        };
        let primary_sid = primary
            .as_deref()
            .and_then(|p| sessions.iter().find(|s| s.upn.trim().to_lowercase() == p))
            .and_then(|s| s.sid.clone());

        let members: Vec<Member> = match ctx.platform.local_group_members(GROUP) {
            Ok(list) => list.into_iter().map(|a| Member { name: a.name, sid: a.sid }).collect(),
            Err(e) => return PolicyStatus::new("failed").with_reason(format!("cannot list the {GROUP} group: {e}")),
        };

        // A state that does not parse would make Tenon forget what it added; refuse to act rather
        // than strand an admin membership or claim someone else's.
        let mut state: LocalAdminState = match &*ctx.state {
            Value::Null => LocalAdminState::default(),
            v => match serde_json::from_value(v.clone()) {
                Ok(s) => s,
                Err(e) => {
                    return PolicyStatus::new("failed")
                        .with_reason(format!("the remembered local admin state is unreadable ({e}); nothing changed"))
                }
            },
        };

        let facts = LocalAdminFacts {
            enabled,
            primary: primary.as_deref(),
            primary_sid: primary_sid.as_deref(),
            members: &members,
        };
        let plan = plan(&facts, &state);

        let (mut added, mut removed, mut failures) = (Vec::new(), Vec::new(), Vec::new());
        for action in &plan.actions {
            let result = match action {
                AdminAction::Add(m) => {
                    ctx.platform.add_local_group_member(GROUP, &account(m)).map(|()| added.push(m.name.clone()))
                }
                AdminAction::Remove(m) => {
                    ctx.platform.remove_local_group_member(GROUP, &account(m)).map(|()| removed.push(m.name.clone()))
                }
                AdminAction::Forget(_) => Ok(()),
            };
            match result {
                Ok(()) => state.record(action),
                Err(e) => failures.push(e.to_string()),
            }
        }
        if let Ok(v) = serde_json::to_value(&state) {
            *ctx.state = v;
        }

        let status = if failures.is_empty() {
            PolicyStatus::new(plan.outcome.state()).with_reason(plan.outcome.reason())
        } else {
            PolicyStatus::new("failed").with_reason(failures.join("; "))
        };
        status
            .with("primary_user", primary.map(Value::String).unwrap_or(Value::Null))
            .with("enabled", enabled)
            .with("added", added)
            .with("removed", removed)
            .with("tenon_members", state.added.iter().map(|m| m.name.clone()).collect::<Vec<_>>())
    }
}

fn account(m: &Member) -> Account {
    Account { name: m.name.clone(), sid: m.sid.clone() }
}
