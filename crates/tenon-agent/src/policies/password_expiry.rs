//! The `password_expiry` policy: warns each signed-in user whose password expires soon (or must be
//! changed now) with a message in their session, and reports days left per user. The decision is
//! `tenon_core::policy::password_expiry` (which documents the thresholds, the once-per-threshold-per-day
//! rule and the config contract).
//!
//! Reads `payload.users[upn]` (a per-user policy). Status details:
//! `{"users": {"<upn>": {"days_left": n | null, "state": "..."}}}` for every user of the payload with a
//! `Client.PasswordExpiry` and every signed-in user. States: `ok` (outside the warning window),
//! `warned` (inside it, and warned today), `expiring` (inside it, not warned today: not signed in),
//! `must_change` (FILETIME 0 or expired), `never`, `unknown` (a signed-in user without a known
//! expiry), `invalid` (the expiry or the warning config cannot be read).
//! `notified: true` marks a warning shown on this run.
//!
//! The policy's state (docs/policy-states.md): `failed` when an expiry or the warning config cannot
//! be read or a warning cannot be shown; otherwise `unknown` when a signed-in user's expiry is not
//! known (never `ok`: nobody can tell whether their password is about to expire);
//! `not_applicable` when there is no user to look at; `ok` otherwise.
//!
//! State: `{"warned": {"<upn>": [[threshold, utc_day], ...]}}`, only today's entries kept.

use super::{config_get, Policy, PolicyContext};
use crate::platform::SessionUser;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use tenon_core::api::PolicyStatus;
use tenon_core::policy::password_expiry::{
    band, days_left, must_change, utc_day, warnings_due, PasswordExpiry, WarningConfig,
};

pub struct PasswordExpiryWarnings;

#[derive(Default, Serialize, Deserialize)]
struct State {
    #[serde(default)]
    warned: BTreeMap<String, Vec<(u32, i64)>>,
}

impl Policy for PasswordExpiryWarnings {
    fn name(&self) -> &'static str {
        "password_expiry"
    }

    fn apply(&self, ctx: &mut PolicyContext<'_>) -> PolicyStatus {
        let sessions = match ctx.platform.signed_in_users() {
            Ok(s) => s,
            Err(e) => return PolicyStatus::new("failed").with_reason(format!("cannot list signed-in users: {e}")),
        };
        let mut signed_in: BTreeMap<String, SessionUser> = BTreeMap::new();
        for s in sessions {
            // One warning per user even with several sessions: the first session gets it.
            signed_in.entry(s.upn.trim().to_lowercase()).or_insert(s);
        }

        // A lost state only means a warning may be shown twice today, so start afresh.
        let today = utc_day(ctx.now);
        let mut state: State = serde_json::from_value(ctx.state.clone()).unwrap_or_default();
        for warned in state.warned.values_mut() {
            warned.retain(|(_, day)| *day == today);
        }
        state.warned.retain(|_, w| !w.is_empty());

        let users: BTreeSet<String> =
            ctx.users.keys().map(|u| u.to_lowercase()).chain(signed_in.keys().cloned()).collect();
        let mut report = Map::new();
        let mut failures = Vec::new();
        let mut unknown = Vec::new();
        for upn in users {
            let config = ctx.users.iter().find(|(k, _)| k.to_lowercase() == upn).and_then(|(_, v)| v.as_object());
            let session = signed_in.get(&upn);
            let raw = config.and_then(|c| config_get(c, "Client.PasswordExpiry"));
            let (Some(config), Some(raw)) = (config, raw) else {
                if session.is_some() {
                    unknown.push(upn.clone());
                    report.insert(upn, json!({"days_left": null, "state": "unknown"}));
                }
                continue;
            };
            let parsed = PasswordExpiry::from_json(raw).and_then(|e| Ok((e, WarningConfig::from_config(config)?)));
            let (expiry, warning_config) = match parsed {
                Ok(p) => p,
                Err(e) => {
                    report.insert(upn.clone(), json!({"days_left": null, "state": "invalid", "error": e.to_string()}));
                    failures.push(format!("{upn}: {e}"));
                    continue;
                }
            };
            let days = days_left(expiry, ctx.now);
            let mut notified = false;
            if let (Some(session), true) = (session, warning_config.enabled) {
                let warned = state.warned.entry(upn.clone()).or_default();
                if let Some(w) = warnings_due(expiry, ctx.now, &warning_config.thresholds_days, warned) {
                    match ctx.platform.notify_user(session, w.title(), &w.message()) {
                        Ok(()) => {
                            warned.push(w.key());
                            notified = true;
                        }
                        // Not recorded, so the next run tries again.
                        Err(e) => failures.push(format!("cannot warn {upn}: {e}")),
                    }
                }
            }
            let in_window =
                warning_config.enabled && days.is_some_and(|d| band(d, &warning_config.thresholds_days).is_some());
            let warned_today = state.warned.get(&upn).is_some_and(|w| !w.is_empty());
            let user_state = match expiry {
                PasswordExpiry::Never => "never",
                e if must_change(e, ctx.now) => "must_change",
                _ if in_window && warned_today => "warned",
                _ if in_window => "expiring",
                _ => "ok",
            };
            let mut line = json!({"days_left": days, "state": user_state});
            if notified {
                line["notified"] = Value::Bool(true);
            }
            report.insert(upn, line);
        }
        state.warned.retain(|_, w| !w.is_empty());
        if let Ok(v) = serde_json::to_value(&state) {
            *ctx.state = v;
        }

        let status = if !failures.is_empty() {
            PolicyStatus::new("failed").with_reason(failures.join("; "))
        } else if !unknown.is_empty() {
            PolicyStatus::new("unknown").with_reason(format!(
                "the password expiry of {} is not known: the directory has no {} for them",
                unknown.join(", "),
                tenon_core::directory::PASSWORD_EXPIRY_ATTRIBUTE
            ))
        } else if report.is_empty() {
            PolicyStatus::new("not_applicable").with_reason("no user is signed in and no expiry is known")
        } else {
            PolicyStatus::new("ok")
        };
        status.with("users", report)
    }
}
