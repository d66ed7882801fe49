//! The mandatory-install gate: mandatory packages install only while the device's primary user is
//! signed in, so a laptop waiting for its next owner, or used by a helpdesk technician, is not
//! changed behind someone else's back.
//!
//! Config contract (server -> agent), in `payload.machine`:
//! - `Client.PrimaryUser`: the primary user's UPN in lower case, absent when the device has none.
//! - `Client.MandatoryInstalls.IgnoreUserRestrictions`: `true` when the server evaluated the
//!   backend-only `SoftwarePackageOverrides.IgnoreUserRestrictions` as true for this device (the
//!   backend-only key itself is stripped from device configs).

use super::{config_path, primary_user};
use serde_json::{Map, Value};

/// What the gate needs to know about the device.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InstallFacts {
    /// UPNs of the users signed in interactively right now.
    pub signed_in: Vec<String>,
    /// The primary user's UPN, if the device has one.
    pub primary: Option<String>,
}

impl InstallFacts {
    /// Facts from the signed-in users and the primary user named in `payload.machine`.
    pub fn new(signed_in: Vec<String>, machine: &Map<String, Value>) -> Self {
        Self { signed_in, primary: primary_user(machine) }
    }
}

/// Whether mandatory installs may run now, and why (a sentence for the report).
pub fn mandatory_installs_allowed(facts: &InstallFacts, config: &Map<String, Value>) -> (bool, String) {
    if config_path(config, "Client.MandatoryInstalls.IgnoreUserRestrictions") == Some(&Value::Bool(true)) {
        return (true, "user restrictions are ignored for this device (IgnoreUserRestrictions)".into());
    }
    let Some(primary) = facts.primary.as_deref() else {
        return (false, "no primary user".into());
    };
    if facts.signed_in.iter().any(|u| u.trim().to_lowercase() == primary.to_lowercase()) {
        (true, format!("primary user {primary} is signed in"))
    } else {
        (false, format!("primary user {primary} is not signed in"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn gate_table() {
        let check = |signed_in: &[&str], primary: Option<&str>, config: Value, expected: (bool, &str)| {
            let facts = InstallFacts {
                signed_in: signed_in.iter().map(|s| s.to_string()).collect(),
                primary: primary.map(str::to_string),
            };
            let (allowed, reason) = mandatory_installs_allowed(&facts, config.as_object().unwrap());
            assert_eq!((allowed, reason.as_str()), expected, "{signed_in:?} {primary:?} {config}");
        };
        let ignore = json!({"Client": {"MandatoryInstalls": {"IgnoreUserRestrictions": true}}});
        check(&["anna@x.com"], Some("anna@x.com"), json!({}), (true, "primary user anna@x.com is signed in"));
        check(
            &["bob@x.com", "Anna@X.com"],
            Some("anna@x.com"),
            json!({}),
            (true, "primary user anna@x.com is signed in"),
        );
        check(&["bob@x.com"], Some("anna@x.com"), json!({}), (false, "primary user anna@x.com is not signed in"));
        check(&[], Some("anna@x.com"), json!({}), (false, "primary user anna@x.com is not signed in"));
        check(&["bob@x.com"], None, json!({}), (false, "no primary user"));
        check(&[], None, json!({}), (false, "no primary user"));
        let ignored = (true, "user restrictions are ignored for this device (IgnoreUserRestrictions)");
        check(&[], None, ignore.clone(), ignored);
        check(&["bob@x.com"], Some("anna@x.com"), ignore, ignored);
        let not_true = json!({"Client": {"MandatoryInstalls": {"IgnoreUserRestrictions": "true"}}});
        check(&[], Some("anna@x.com"), not_true, (false, "primary user anna@x.com is not signed in"));
        let off = json!({"Client": {"MandatoryInstalls": {"IgnoreUserRestrictions": false}}});
        check(&[], None, off, (false, "no primary user"));
    }

    #[test]
    fn facts_read_the_primary_user_from_the_machine_config() {
        let machine = json!({"Client": {"PrimaryUser": "Anna@X.com"}});
        let facts = InstallFacts::new(vec!["anna@x.com".into()], machine.as_object().unwrap());
        assert_eq!(facts.primary.as_deref(), Some("anna@x.com"));
        assert!(mandatory_installs_allowed(&facts, machine.as_object().unwrap()).0);
        let facts = InstallFacts::new(vec!["anna@x.com".into()], &Map::new());
        assert_eq!(facts.primary, None);
    }
}
