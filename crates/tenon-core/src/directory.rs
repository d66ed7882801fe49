//! The directory and settings as the server holds them, and the compiler that turns them into one
//! device's payload: `{"machine": <config>, "users": {<upn>: <config>}}` (DESIGN.md section 2).
//!
//! `machine` is the effective config of the device's primary user, or tenant and "All Users"
//! settings while it has none. `users` holds every user known to sign in to the device. The
//! compiler adds the fields the server derives (`Client.*`, a user's `Signatures` templates and
//! directory values) and strips backend-only keys.

use crate::ids::{GroupName, SettingKey, Upn};
use crate::packages::{device_plan, Assignment, Package, PlanEntry};
use crate::policy::signatures::{user_signature_config, SignatureTemplate};
use crate::settings::{origins, EffectiveSettings, KeyOrigin, Layers, ScopeSettings};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// A directory group and its settings.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Group {
    /// Higher wins when a user is in several groups; ties go by name.
    pub priority: i64,
    pub settings: ScopeSettings,
}

/// A directory user.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct User {
    /// Directory object id (Graph `id`).
    pub id: Option<String>,
    /// The Graph-shaped record as imported.
    pub record: Value,
    pub groups: BTreeSet<GroupName>,
    pub settings: ScopeSettings,
    /// The directory source that owns the user (`tenonctl directory list`); `None`: imported
    /// from a file, or known only by its settings.
    pub source: Option<String>,
}

/// Everything the compiler reads.
#[derive(Clone, Debug, Default)]
pub struct Directory {
    pub tenant: ScopeSettings,
    pub groups: BTreeMap<GroupName, Group>,
    pub users: HashMap<Upn, User>,
    /// Outlook signature templates, sorted by name (a slice is what the signature compiler takes).
    pub signatures: Vec<SignatureTemplate>,
    /// Software packages by name (the current version of each) and their assignments.
    pub packages: BTreeMap<String, Package>,
    pub package_assignments: Vec<Assignment>,
}

/// A compiled payload and the primary user's directory id for the envelope.
#[derive(Clone, Debug, PartialEq)]
pub struct DevicePayload {
    pub payload: Value,
    pub user_id: Option<String>,
}

/// The directory attribute that carries the password expiry (FILETIME).
pub const PASSWORD_EXPIRY_ATTRIBUTE: &str = "msDS-UserPasswordExpiryTimeComputed";

impl Directory {
    /// The merged settings for a user (tenant and "All Users" only for `None` or an unknown user).
    pub fn effective_for(&self, upn: Option<&Upn>) -> EffectiveSettings {
        self.with_layers(upn, |layers, _| EffectiveSettings::merge(layers))
    }

    /// Each leaf of the user's merged settings with the scope it came from (the portal's user
    /// page); see [`crate::settings::origins`].
    pub fn origins_for(&self, upn: Option<&Upn>) -> Vec<KeyOrigin> {
        self.with_layers(upn, origins)
    }

    /// Calls `f` with the user's layers and the names of their groups, weakest first.
    fn with_layers<T>(&self, upn: Option<&Upn>, f: impl FnOnce(&Layers<'_>, &[&str]) -> T) -> T {
        let all_users = self.groups.get(&GroupName::all_users()).map(|g| &g.settings);
        let user = upn.and_then(|u| self.users.get(u));
        let mut groups: Vec<(&GroupName, &Group)> = user
            .map(|u| {
                u.groups
                    .iter()
                    .filter(|g| !g.is_all_users())
                    .filter_map(|g| self.groups.get(g).map(|grp| (g, grp)))
                    .collect()
            })
            .unwrap_or_default();
        groups.sort_by(|(an, a), (bn, b)| a.priority.cmp(&b.priority).then_with(|| an.cmp(bn)));
        let group_settings: Vec<&ScopeSettings> = groups.iter().map(|(_, g)| &g.settings).collect();
        let names: Vec<&str> = groups.iter().map(|(n, _)| n.as_str()).collect();
        let layers =
            Layers { tenant: Some(&self.tenant), all_users, groups: &group_settings, user: user.map(|u| &u.settings) };
        f(&layers, &names)
    }

    /// The config one user receives on one device. `Signatures` (templates with images, and the
    /// user's directory values) goes only into `users[upn]`, where the per-user policy reads it:
    /// repeating it in `machine` would double the largest part of the payload for nothing.
    fn user_config(&self, upn: Option<&Upn>, primary: Option<&Upn>, with_signatures: bool) -> Map<String, Value> {
        let mut eff = self.effective_for(upn);
        let is_primary = upn.is_some() && upn == primary;
        set(&mut eff, "Client.IsPrimaryOfUser", Value::Bool(is_primary));
        if let Some(user) = upn.and_then(|u| self.users.get(u)) {
            if let Some(filetime) = password_expiry_filetime(&user.record) {
                set(&mut eff, "Client.PasswordExpiry", json!({ "filetime": filetime }));
            }
        }
        if let Some(user) = upn.and_then(|u| self.users.get(u)).filter(|_| with_signatures) {
            self.merge_signatures(&mut eff, user);
        }
        if eff.is_true("SoftwarePackageOverrides.IgnoreUserRestrictions") {
            set(&mut eff, "Client.MandatoryInstalls.IgnoreUserRestrictions", Value::Bool(true));
        }
        eff.for_device()
    }

    /// Object-merges the user's signature templates and directory values at `Signatures`, so an
    /// admin's `Signatures.Options.*` setting stays next to them. A user without any assigned
    /// template gets no `Templates`, which the agent reads as "remove what Tenon wrote"; leaving
    /// out `Values` too keeps a directory change from re-signing devices where it shows nowhere.
    fn merge_signatures(&self, eff: &mut EffectiveSettings, user: &User) {
        let groups: Vec<String> = user.groups.iter().map(|g| g.to_string()).collect();
        let computed = user_signature_config(&self.signatures, &groups, &user.record);
        if computed["Templates"].as_object().is_none_or(Map::is_empty) {
            return;
        }
        let slot = eff.0.entry("Signatures").or_insert_with(|| json!({}));
        if !slot.is_object() {
            // A scalar set by an admin at `Signatures` cannot hold templates; the templates win.
            *slot = json!({});
        }
        if let (Some(slot), Value::Object(computed)) = (slot.as_object_mut(), computed) {
            for (k, v) in computed {
                slot.insert(k, v);
            }
        }
    }

    /// The package plan of a device with this primary user (tenant and "All Users" assignments
    /// without one); `requests`: its install requests by package name.
    pub fn package_plan(&self, primary: Option<&Upn>, requests: &BTreeMap<String, u64>) -> BTreeMap<String, PlanEntry> {
        if self.package_assignments.is_empty() {
            return BTreeMap::new();
        }
        let user = primary.and_then(|p| self.users.get(p).map(|u| (p, &u.groups)));
        let none = BTreeSet::new();
        let user = user.or_else(|| primary.map(|p| (p, &none)));
        device_plan(&self.packages, &self.package_assignments, user, requests)
    }

    /// Compiles one device's payload.
    pub fn device_payload(&self, primary: Option<&Upn>, device_users: &BTreeSet<Upn>) -> DevicePayload {
        self.device_payload_with(primary, device_users, &BTreeMap::new())
    }

    /// [`Directory::device_payload`] with the device's package install requests.
    pub fn device_payload_with(
        &self,
        primary: Option<&Upn>,
        device_users: &BTreeSet<Upn>,
        requests: &BTreeMap<String, u64>,
    ) -> DevicePayload {
        let mut machine = self.user_config(primary, primary, false);
        if let Some(p) = primary {
            let client = machine.entry("Client").or_insert_with(|| json!({}));
            if let Some(c) = client.as_object_mut() {
                c.insert("PrimaryUser".into(), Value::String(p.to_string()));
            }
        }
        let plan = self.package_plan(primary, requests);
        if !plan.is_empty() {
            machine.insert("Packages".into(), serde_json::to_value(plan).unwrap_or(Value::Null));
        }
        let mut users = Map::new();
        for upn in device_users.iter().chain(primary) {
            if !users.contains_key(upn.as_str()) {
                users.insert(upn.to_string(), Value::Object(self.user_config(Some(upn), primary, true)));
            }
        }
        DevicePayload {
            payload: json!({ "machine": machine, "users": users }),
            user_id: primary.and_then(|p| self.users.get(p)).and_then(|u| u.id.clone()),
        }
    }
}

fn set(eff: &mut EffectiveSettings, key: &str, value: Value) {
    let key = SettingKey::parse(key).expect("derived keys are valid");
    eff.set(&key, value);
}

/// The FILETIME as a decimal string: JSON numbers above 2^53 would lose precision in canonical
/// form, and "never expires" is 0x7FFFFFFFFFFFFFFF.
fn password_expiry_filetime(record: &Value) -> Option<String> {
    match record.get(PASSWORD_EXPIRY_ATTRIBUTE)? {
        Value::Number(n) => n.as_u64().map(|v| v.to_string()).or_else(|| n.as_i64().map(|v| v.to_string())),
        Value::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => Some(s.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::SettingValue;

    fn scope(pairs: &[(&str, Value)]) -> ScopeSettings {
        pairs.iter().map(|(k, v)| (SettingKey::parse(k).unwrap(), SettingValue::Set(v.clone()))).collect()
    }

    fn upn(s: &str) -> Upn {
        Upn::parse(s).unwrap()
    }

    fn directory() -> Directory {
        let mut d = Directory {
            tenant: scope(&[("Policies.A", json!("tenant")), ("Policies.B", json!(1))]),
            ..Default::default()
        };
        d.groups.insert(GroupName::all_users(), Group { priority: 0, settings: scope(&[("Policies.B", json!(2))]) });
        d.groups.insert(
            GroupName::parse("Sales").unwrap(),
            Group { priority: 10, settings: scope(&[("Policies.A", json!("sales"))]) },
        );
        d.groups.insert(
            GroupName::parse("Eng").unwrap(),
            Group { priority: 20, settings: scope(&[("Policies.A", json!("eng"))]) },
        );
        d.users.insert(
            upn("anna@x.com"),
            User {
                id: Some("id-anna".into()),
                record: json!({"msDS-UserPasswordExpiryTimeComputed": 9223372036854775807u64}),
                groups: ["Sales", "Eng"].iter().map(|g| GroupName::parse(g).unwrap()).collect(),
                settings: scope(&[("SoftwarePackageOverrides.IgnoreUserRestrictions", json!(true))]),
                source: None,
            },
        );
        d.users.insert(
            upn("ben@x.com"),
            User {
                id: None,
                record: json!({}),
                groups: [GroupName::parse("Sales").unwrap()].into(),
                settings: ScopeSettings::new(),
                source: None,
            },
        );
        d
    }

    #[test]
    fn device_payload_has_machine_and_users() {
        let d = directory();
        let users: BTreeSet<Upn> = [upn("ben@x.com")].into();
        let p = d.device_payload(Some(&upn("anna@x.com")), &users);
        assert_eq!(p.user_id.as_deref(), Some("id-anna"));
        let m = &p.payload["machine"];
        assert_eq!(m["Policies"], json!({"A": "eng", "B": 2}));
        assert_eq!(m["Client"]["IsPrimaryOfUser"], json!(true));
        assert_eq!(m["Client"]["PrimaryUser"], json!("anna@x.com"));
        assert_eq!(m["Client"]["MandatoryInstalls"]["IgnoreUserRestrictions"], json!(true));
        assert_eq!(m["Client"]["PasswordExpiry"], json!({"filetime": "9223372036854775807"}));
        assert!(m.get("SoftwarePackageOverrides").is_none());
        let ben = &p.payload["users"]["ben@x.com"];
        assert_eq!(ben["Policies"]["A"], json!("sales"));
        assert_eq!(ben["Client"]["IsPrimaryOfUser"], json!(false));
        assert!(p.payload["users"]["anna@x.com"].is_object());
    }

    #[test]
    fn without_primary_machine_is_tenant_and_all_users() {
        let d = directory();
        let p = d.device_payload(None, &BTreeSet::new());
        assert_eq!(
            p.payload,
            json!({"machine": {"Policies": {"A": "tenant", "B": 2}, "Client": {"IsPrimaryOfUser": false}}, "users": {}})
        );
        assert_eq!(p.user_id, None);
    }

    fn template(name: &str, groups: &[&str]) -> SignatureTemplate {
        SignatureTemplate {
            name: name.into(),
            html: "<p>{{Graph_User_DisplayName}}</p>".into(),
            txt: None,
            default: None,
            groups: groups.iter().map(|g| g.to_string()).collect(),
            images: BTreeMap::new(),
        }
    }

    #[test]
    fn signatures_go_to_assigned_users_only_and_keep_admin_options() {
        let mut d = directory();
        d.groups.get_mut(&GroupName::parse("Sales").unwrap()).unwrap().settings =
            scope(&[("Signatures.Options.IncludeUpnInName", json!(true))]);
        d.users.get_mut(&upn("anna@x.com")).unwrap().record["jobTitle"] = json!("CTO");
        d.signatures = vec![template("Corporate", &["Eng"]), template("Everyone", &[GroupName::ALL_USERS])];
        d.users.insert(upn("cleo@x.com"), User { record: json!({"displayName": "Cleo"}), ..Default::default() });
        let users: BTreeSet<Upn> = [upn("ben@x.com"), upn("cleo@x.com")].into();
        let p = d.device_payload(Some(&upn("anna@x.com")), &users);
        let names = |u: &str| -> Vec<String> {
            p.payload["users"][u]["Signatures"]["Templates"].as_object().unwrap().keys().cloned().collect()
        };
        assert_eq!(names("anna@x.com"), ["Corporate", "Everyone"]);
        assert_eq!(names("ben@x.com"), ["Everyone"]);
        assert_eq!(names("cleo@x.com"), ["Everyone"]);
        let anna = &p.payload["users"]["anna@x.com"]["Signatures"];
        assert_eq!(anna["Values"]["Graph_User_JobTitle"], json!("CTO"));
        assert_eq!(anna["Options"]["IncludeUpnInName"], json!(true));
        assert_eq!(p.payload["users"]["cleo@x.com"]["Signatures"]["Values"]["Graph_User_DisplayName"], json!("Cleo"));
        assert!(p.payload["users"]["cleo@x.com"]["Signatures"].get("Options").is_none());
        // Templates and values are per user; the machine config does not repeat them.
        assert_eq!(p.payload["machine"]["Signatures"], json!({"Options": {"IncludeUpnInName": true}}));

        // Without an assigned template there is no `Templates` (the agent removes what Tenon
        // wrote), and an admin's option is all that is left.
        d.signatures = vec![template("Corporate", &["Eng"])];
        let p = d.device_payload(Some(&upn("anna@x.com")), &users);
        assert_eq!(p.payload["users"]["ben@x.com"]["Signatures"], json!({"Options": {"IncludeUpnInName": true}}));
        assert!(p.payload["users"]["cleo@x.com"].get("Signatures").is_none());
        assert!(p.payload["users"]["anna@x.com"]["Signatures"]["Templates"]["Corporate"].is_object());
    }

    #[test]
    fn a_changed_directory_value_changes_the_payload() {
        let mut d = directory();
        d.signatures = vec![template("Corporate", &["Sales"])];
        let users: BTreeSet<Upn> = [upn("ben@x.com")].into();
        let before = d.device_payload(None, &users).payload;
        d.users.get_mut(&upn("ben@x.com")).unwrap().record["jobTitle"] = json!("Head of Sales");
        let after = d.device_payload(None, &users).payload;
        assert_ne!(before, after);
        assert_eq!(after["users"]["ben@x.com"]["Signatures"]["Values"]["Graph_User_JobTitle"], json!("Head of Sales"));
    }
}
