//! The directory and settings as the server holds them, and the compiler that turns them into one
//! device's payload: `{"machine": <config>, "users": {<upn>: <config>}}` (DESIGN.md section 2).
//!
//! `machine` is the effective config of the device's primary user, or tenant and "All Users"
//! settings while it has none. `users` holds every user known to sign in to the device. The
//! compiler adds the fields the server derives (`Client.*`) and strips backend-only keys.

use crate::ids::{GroupName, SettingKey, Upn};
use crate::settings::{EffectiveSettings, Layers, ScopeSettings};
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
}

/// Everything the compiler reads.
#[derive(Clone, Debug, Default)]
pub struct Directory {
    pub tenant: ScopeSettings,
    pub groups: BTreeMap<GroupName, Group>,
    pub users: HashMap<Upn, User>,
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
        EffectiveSettings::merge(&Layers {
            tenant: Some(&self.tenant),
            all_users,
            groups: &group_settings,
            user: user.map(|u| &u.settings),
        })
    }

    /// The config one user receives on one device.
    fn user_config(&self, upn: Option<&Upn>, primary: Option<&Upn>) -> Map<String, Value> {
        let mut eff = self.effective_for(upn);
        let is_primary = upn.is_some() && upn == primary;
        set(&mut eff, "Client.IsPrimaryOfUser", Value::Bool(is_primary));
        if let Some(user) = upn.and_then(|u| self.users.get(u)) {
            if let Some(filetime) = password_expiry_filetime(&user.record) {
                set(&mut eff, "Client.PasswordExpiry", json!({ "filetime": filetime }));
            }
        }
        if eff.is_true("SoftwarePackageOverrides.IgnoreUserRestrictions") {
            set(&mut eff, "Client.MandatoryInstalls.IgnoreUserRestrictions", Value::Bool(true));
        }
        eff.for_device()
    }

    /// Compiles one device's payload.
    pub fn device_payload(&self, primary: Option<&Upn>, device_users: &BTreeSet<Upn>) -> DevicePayload {
        let mut machine = self.user_config(primary, primary);
        if let Some(p) = primary {
            let client = machine.entry("Client").or_insert_with(|| json!({}));
            if let Some(c) = client.as_object_mut() {
                c.insert("PrimaryUser".into(), Value::String(p.to_string()));
            }
        }
        let mut users = Map::new();
        for upn in device_users.iter().chain(primary) {
            if !users.contains_key(upn.as_str()) {
                users.insert(upn.to_string(), Value::Object(self.user_config(Some(upn), primary)));
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
            },
        );
        d.users.insert(
            upn("ben@x.com"),
            User {
                id: None,
                record: json!({}),
                groups: [GroupName::parse("Sales").unwrap()].into(),
                settings: ScopeSettings::new(),
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
}
