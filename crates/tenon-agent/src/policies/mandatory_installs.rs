//! The `mandatory_installs` status: reports whether mandatory packages may install right now (only
//! while the primary user is signed in, or when the device ignores user restrictions) and why, so the
//! helpdesk can see why a package waits. It changes nothing; the package feature calls
//! `tenon_core::policy::install_gate::mandatory_installs_allowed` itself before installing.

use super::{Policy, PolicyContext};
use serde_json::Value;
use tenon_core::api::PolicyStatus;
use tenon_core::policy::install_gate::{mandatory_installs_allowed, InstallFacts};

pub struct MandatoryInstalls;

impl Policy for MandatoryInstalls {
    fn name(&self) -> &'static str {
        "mandatory_installs"
    }

    fn apply(&self, ctx: &mut PolicyContext<'_>) -> PolicyStatus {
        let signed_in = match ctx.platform.signed_in_users() {
            Ok(s) => s.into_iter().map(|s| s.upn).collect(),
            Err(e) => return PolicyStatus::new("failed").with_reason(format!("cannot list signed-in users: {e}")),
        };
        let facts = InstallFacts::new(signed_in, ctx.machine);
        let (allowed, reason) = mandatory_installs_allowed(&facts, ctx.machine);
        // "Not allowed now" is a normal condition (the owner is away), not a failure: the state stays ok.
        PolicyStatus::new("ok")
            .with_reason(reason)
            .with("allowed", allowed)
            .with("primary_user", facts.primary.map(Value::String).unwrap_or(Value::Null))
    }
}
