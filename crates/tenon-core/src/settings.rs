//! Settings as data, and the one merge rule that turns scoped settings into an effective config.
//!
//! Each scope (tenant, the built-in group "All Users", each group, the user) holds a flat map of
//! dotted keys to values. Scopes are applied from the weakest to the strongest:
//! tenant < "All Users" < groups by ascending priority < user. Applying a key:
//! - a JSON object merges into an object already at that path, key by key, recursively;
//! - any other value (scalar, array) replaces what is there;
//! - [`SettingValue::Undefined`] deletes the path, and with it whatever weaker scopes put there.
//!
//! `Allow.*` keys are combined separately across the groups and the user: an explicit `false`
//! anywhere wins, otherwise any `true` grants. Keys under [`BACKEND_ONLY_ROOTS`] are for the server
//! to evaluate and are stripped from what devices receive.

use crate::ids::SettingKey;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// Top-level keys that only the server evaluates; devices never see them.
/// (`Devices.*` is read by the server: the primary-user detection window.)
pub const BACKEND_ONLY_ROOTS: [&str; 4] = ["Allow", "Devices", "Restrict", "SoftwarePackageOverrides"];

/// What one scope says about one key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "value")]
pub enum SettingValue {
    Set(Value),
    /// Delete the key, overriding weaker scopes.
    Undefined,
}

impl SettingValue {
    /// Parses what an administrator typed: JSON, or the bare word `undefined`.
    pub fn parse_cli(text: &str) -> Result<Self, serde_json::Error> {
        if text.trim() == "undefined" {
            return Ok(Self::Undefined);
        }
        serde_json::from_str(text).map(Self::Set)
    }

    /// The stored text form: JSON, or `undefined`.
    pub fn to_text(&self) -> String {
        match self {
            Self::Set(v) => v.to_string(),
            Self::Undefined => "undefined".to_string(),
        }
    }
}

/// The settings of one scope, ordered by key so parents apply before their children.
pub type ScopeSettings = BTreeMap<SettingKey, SettingValue>;

/// The scopes that apply to one user, weakest first.
#[derive(Clone, Copy, Debug, Default)]
pub struct Layers<'a> {
    pub tenant: Option<&'a ScopeSettings>,
    pub all_users: Option<&'a ScopeSettings>,
    /// The user's groups, ordered by ascending priority (the last one wins).
    pub groups: &'a [&'a ScopeSettings],
    pub user: Option<&'a ScopeSettings>,
}

/// The merged settings, including backend-only keys.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct EffectiveSettings(pub Map<String, Value>);

impl EffectiveSettings {
    /// Merges the layers with the written rule.
    pub fn merge(layers: &Layers<'_>) -> Self {
        let mut tree = Map::new();
        let ordered =
            layers.tenant.into_iter().chain(layers.all_users).chain(layers.groups.iter().copied()).chain(layers.user);
        for scope in ordered {
            apply_scope(&mut tree, scope);
        }
        // `Allow.*` across "All Users", the groups and the user.
        let allow_sources: Vec<&ScopeSettings> =
            layers.all_users.into_iter().chain(layers.groups.iter().copied()).chain(layers.user).collect();
        let mut allow_keys: Vec<&SettingKey> =
            allow_sources.iter().flat_map(|s| s.keys()).filter(|k| k.root() == "Allow").collect();
        allow_keys.sort();
        allow_keys.dedup();
        for key in allow_keys {
            let votes = allow_sources.iter().filter_map(|s| match s.get(key) {
                Some(SettingValue::Set(Value::Bool(b))) => Some(*b),
                _ => None,
            });
            if let Some(granted) = combine_allow(votes) {
                set_path(&mut tree, key, Value::Bool(granted));
            }
        }
        Self(tree)
    }

    /// The value at a dotted path, if any.
    pub fn get(&self, path: &str) -> Option<&Value> {
        get_path(&self.0, path)
    }

    /// `true` only when the path holds the boolean `true`.
    pub fn is_true(&self, path: &str) -> bool {
        self.get(path) == Some(&Value::Bool(true))
    }

    /// Sets a value that the server derives (such as `Client.IsPrimaryOfUser`).
    pub fn set(&mut self, key: &SettingKey, value: Value) {
        set_path(&mut self.0, key, value);
    }

    /// What a device receives: everything but the backend-only keys.
    pub fn for_device(mut self) -> Map<String, Value> {
        for root in BACKEND_ONLY_ROOTS {
            self.0.remove(root);
        }
        self.0
    }
}

/// Where one value of an effective configuration came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    Tenant,
    AllUsers,
    /// A directory group, by name.
    Group(String),
    User,
}

/// One leaf of an effective configuration (a scalar, an array or an empty object), at its dotted
/// path, with the scope whose setting put it there.
#[derive(Clone, Debug, PartialEq)]
pub struct KeyOrigin {
    pub path: String,
    pub value: Value,
    pub origin: Origin,
}

/// The origin of every leaf of `EffectiveSettings::merge(layers)`; `group_names[i]` names
/// `layers.groups[i]`. Pure, and follows the merge rule exactly:
/// - a leaf comes from the strongest scope with a set key at the leaf or at an ancestor whose
///   value reaches the leaf (an object at `A` containing `B` reaches `A.B`). No stronger scope
///   can have removed or replaced it, or the leaf would not be in the merge;
/// - an `Allow.*` key that was voted on comes from the strongest scope that cast the deciding
///   vote (the strongest `false`, or the strongest `true` when nobody said false).
pub fn origins(layers: &Layers<'_>, group_names: &[&str]) -> Vec<KeyOrigin> {
    let effective = EffectiveSettings::merge(layers);
    let mut named: Vec<(Origin, &ScopeSettings)> = Vec::new();
    named.extend(layers.tenant.map(|s| (Origin::Tenant, s)));
    named.extend(layers.all_users.map(|s| (Origin::AllUsers, s)));
    for (i, g) in layers.groups.iter().enumerate() {
        let name = group_names.get(i).map(|n| n.to_string()).unwrap_or_default();
        named.push((Origin::Group(name), *g));
    }
    named.extend(layers.user.map(|s| (Origin::User, s)));
    let mut leaves = Vec::new();
    flatten(&mut Vec::new(), &effective.0, &mut leaves);
    leaves
        .into_iter()
        .filter_map(|(segments, value)| {
            let path = segments.join(".");
            let origin = if segments.first().map(String::as_str) == Some("Allow") {
                allow_origin(&named, &path, &value).or_else(|| leaf_origin(&named, &segments))
            } else {
                leaf_origin(&named, &segments)
            }?;
            Some(KeyOrigin { path, value, origin })
        })
        .collect()
}

fn flatten(prefix: &mut Vec<String>, tree: &Map<String, Value>, out: &mut Vec<(Vec<String>, Value)>) {
    for (k, v) in tree {
        prefix.push(k.clone());
        match v {
            Value::Object(o) if !o.is_empty() => flatten(prefix, o, out),
            leaf => out.push((prefix.clone(), leaf.clone())),
        }
        prefix.pop();
    }
}

fn leaf_origin(named: &[(Origin, &ScopeSettings)], leaf: &[String]) -> Option<Origin> {
    named.iter().rev().find_map(|(origin, scope)| {
        let reaches = scope.iter().any(|(key, value)| {
            let SettingValue::Set(v) = value else { return false };
            let segs: Vec<&str> = key.segments().collect();
            if segs.len() > leaf.len() || segs.iter().zip(leaf).any(|(a, b)| *a != b) {
                return false;
            }
            let mut cur = v;
            for seg in &leaf[segs.len()..] {
                match cur.as_object().and_then(|o| o.get(seg)) {
                    Some(next) => cur = next,
                    None => return false,
                }
            }
            true
        });
        reaches.then(|| origin.clone())
    })
}

/// The deciding vote of an `Allow.*` key (the tenant does not vote).
fn allow_origin(named: &[(Origin, &ScopeSettings)], path: &str, value: &Value) -> Option<Origin> {
    let decided = value.as_bool()?;
    named.iter().rev().filter(|(o, _)| *o != Origin::Tenant).find_map(|(origin, scope)| {
        let voted = scope.iter().any(|(k, v)| k.as_str() == path && *v == SettingValue::Set(Value::Bool(decided)));
        voted.then(|| origin.clone())
    })
}

/// The `Allow.*` combiner: `None` when nobody voted, `Some(false)` when anyone said false,
/// `Some(true)` when someone said true and nobody said false.
pub fn combine_allow(votes: impl IntoIterator<Item = bool>) -> Option<bool> {
    let mut result = None;
    for v in votes {
        if !v {
            return Some(false);
        }
        result = Some(true);
    }
    result
}

fn apply_scope(tree: &mut Map<String, Value>, scope: &ScopeSettings) {
    for (key, value) in scope {
        match value {
            SettingValue::Undefined => remove_path(tree, key),
            SettingValue::Set(v) => merge_at_path(tree, key, v.clone()),
        }
    }
}

/// The path's parent object, creating (or replacing non-objects with) objects on the way.
fn parent_object<'m>(tree: &'m mut Map<String, Value>, key: &SettingKey) -> (&'m mut Map<String, Value>, String) {
    let segments: Vec<&str> = key.segments().collect();
    let (last, parents) = segments.split_last().expect("a SettingKey has at least one segment");
    let mut node = tree;
    for seg in parents {
        let slot = node.entry(seg.to_string()).or_insert_with(|| Value::Object(Map::new()));
        if !slot.is_object() {
            *slot = Value::Object(Map::new());
        }
        node = slot.as_object_mut().expect("just made an object");
    }
    (node, last.to_string())
}

fn set_path(tree: &mut Map<String, Value>, key: &SettingKey, value: Value) {
    let (parent, last) = parent_object(tree, key);
    parent.insert(last, value);
}

fn merge_at_path(tree: &mut Map<String, Value>, key: &SettingKey, value: Value) {
    let (parent, last) = parent_object(tree, key);
    match parent.get_mut(&last) {
        Some(existing) => deep_merge(existing, value),
        None => {
            parent.insert(last, value);
        }
    }
}

/// Objects merge by key; anything else replaces.
pub fn deep_merge(dst: &mut Value, src: Value) {
    match (dst, src) {
        (Value::Object(d), Value::Object(s)) => {
            for (k, v) in s {
                match d.get_mut(&k) {
                    Some(existing) => deep_merge(existing, v),
                    None => {
                        d.insert(k, v);
                    }
                }
            }
        }
        (dst, src) => *dst = src,
    }
}

fn remove_path(tree: &mut Map<String, Value>, key: &SettingKey) {
    let segments: Vec<&str> = key.segments().collect();
    let (last, parents) = segments.split_last().expect("a SettingKey has at least one segment");
    let mut node = tree;
    for seg in parents {
        match node.get_mut(*seg).and_then(Value::as_object_mut) {
            Some(next) => node = next,
            None => return,
        }
    }
    node.remove(*last);
}

fn get_path<'m>(tree: &'m Map<String, Value>, path: &str) -> Option<&'m Value> {
    let mut parts = path.split('.');
    let mut cur = tree.get(parts.next()?)?;
    for p in parts {
        cur = cur.as_object()?.get(p)?;
    }
    Some(cur)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn scope(pairs: &[(&str, &str)]) -> ScopeSettings {
        pairs.iter().map(|(k, v)| (SettingKey::parse(k).unwrap(), SettingValue::parse_cli(v).unwrap())).collect()
    }

    /// One line per case: tenant, all users, groups (weakest first), user => expected device view.
    fn check(
        tenant: &[(&str, &str)],
        all: &[(&str, &str)],
        groups: &[&[(&str, &str)]],
        user: &[(&str, &str)],
        expected: Value,
    ) {
        let t = scope(tenant);
        let a = scope(all);
        let g: Vec<ScopeSettings> = groups.iter().map(|g| scope(g)).collect();
        let grefs: Vec<&ScopeSettings> = g.iter().collect();
        let u = scope(user);
        let eff =
            EffectiveSettings::merge(&Layers { tenant: Some(&t), all_users: Some(&a), groups: &grefs, user: Some(&u) });
        let mut full = Value::Object(eff.0.clone());
        if let Some(allow) = full.get("Allow").cloned() {
            // Keep Allow visible to the table by moving it under a test-only key.
            full.as_object_mut().unwrap().insert("_allow".into(), allow);
        }
        let mut device = Value::Object(eff.for_device());
        if let Some(allow) = full.get("_allow") {
            device.as_object_mut().unwrap().insert("_allow".into(), allow.clone());
        }
        assert_eq!(device, expected);
    }

    #[test]
    fn merge_rules() {
        check(&[("A.B", "1")], &[], &[], &[], json!({"A": {"B": 1}}));
        check(&[("A.B", "1")], &[("A.B", "2")], &[], &[], json!({"A": {"B": 2}}));
        check(&[("A.B", "1")], &[], &[&[("A.B", "2")], &[("A.B", "3")]], &[], json!({"A": {"B": 3}}));
        check(&[("A.B", "1")], &[], &[&[("A.B", "3")]], &[("A.B", "4")], json!({"A": {"B": 4}}));
        check(&[("A", r#"{"x":1,"y":2}"#)], &[], &[], &[("A", r#"{"y":3}"#)], json!({"A": {"x": 1, "y": 3}}));
        check(&[("A.L", "[1,2]")], &[], &[], &[("A.L", "[3]")], json!({"A": {"L": [3]}}));
        check(&[("A.B", "1"), ("A.C", "2")], &[], &[], &[("A.B", "undefined")], json!({"A": {"C": 2}}));
        check(&[("A.B", "1")], &[], &[], &[("A", "undefined")], json!({}));
        check(&[("A", "5")], &[], &[], &[("A.B", "1")], json!({"A": {"B": 1}}));
        check(&[("A.B", "1")], &[], &[], &[("A", "\"flat\"")], json!({"A": "flat"}));
        check(&[("A.B.C", "null")], &[], &[], &[], json!({"A": {"B": {"C": null}}}));
    }

    #[test]
    fn backend_only_keys_are_stripped() {
        check(
            &[("Restrict.X", "true"), ("SoftwarePackageOverrides.Y", "1"), ("Policies.Z", "true")],
            &[],
            &[],
            &[],
            json!({"Policies": {"Z": true}}),
        );
    }

    #[test]
    fn allow_combines_across_groups_and_user() {
        check(&[], &[], &[&[("Allow.X", "true")], &[]], &[], json!({"_allow": {"X": true}}));
        check(&[], &[], &[&[("Allow.X", "true")], &[("Allow.X", "false")]], &[], json!({"_allow": {"X": false}}));
        // An explicit false in a weaker group still wins over a stronger true.
        check(
            &[],
            &[],
            &[&[("Allow.X", "false")], &[("Allow.X", "true")]],
            &[("Allow.X", "true")],
            json!({"_allow": {"X": false}}),
        );
        check(&[], &[("Allow.X", "true")], &[], &[("Allow.X", "true")], json!({"_allow": {"X": true}}));
        check(&[("Allow.X", "false")], &[], &[&[("Allow.X", "true")]], &[], json!({"_allow": {"X": true}}));
        check(&[("Allow.X", "true")], &[], &[], &[], json!({"_allow": {"X": true}}));
        assert_eq!(combine_allow([]), None);
        assert_eq!(combine_allow([true, true]), Some(true));
        assert_eq!(combine_allow([true, false, true]), Some(false));
    }

    /// One line per case: tenant, all users, groups (named g1, g2, ... weakest first), user =>
    /// the expected (path, origin) of every leaf.
    fn check_origins(
        tenant: &[(&str, &str)],
        all: &[(&str, &str)],
        groups: &[&[(&str, &str)]],
        user: &[(&str, &str)],
        expected: &[(&str, &str)],
    ) {
        let t = scope(tenant);
        let a = scope(all);
        let g: Vec<ScopeSettings> = groups.iter().map(|g| scope(g)).collect();
        let grefs: Vec<&ScopeSettings> = g.iter().collect();
        let names: Vec<String> = (1..=g.len()).map(|i| format!("g{i}")).collect();
        let nrefs: Vec<&str> = names.iter().map(String::as_str).collect();
        let u = scope(user);
        let layers = Layers { tenant: Some(&t), all_users: Some(&a), groups: &grefs, user: Some(&u) };
        let got: Vec<(String, String)> = origins(&layers, &nrefs)
            .into_iter()
            .map(|o| {
                let who = match o.origin {
                    Origin::Tenant => "tenant".to_string(),
                    Origin::AllUsers => "all".to_string(),
                    Origin::Group(g) => g,
                    Origin::User => "user".to_string(),
                };
                (o.path, who)
            })
            .collect();
        let want: Vec<(String, String)> = expected.iter().map(|(p, o)| (p.to_string(), o.to_string())).collect();
        assert_eq!(got, want, "tenant {tenant:?} all {all:?} groups {groups:?} user {user:?}");
    }

    #[test]
    fn origins_follow_the_merge_rule() {
        check_origins(&[("A.B", "1")], &[], &[], &[], &[("A.B", "tenant")]);
        check_origins(&[("A.B", "1")], &[("A.B", "2")], &[], &[], &[("A.B", "all")]);
        check_origins(&[("A.B", "1")], &[], &[&[("A.B", "2")], &[("A.B", "3")]], &[], &[("A.B", "g2")]);
        check_origins(&[("A.B", "1")], &[], &[&[("A.B", "3")]], &[("A.B", "4")], &[("A.B", "user")]);
        // An object merges: each of its leaves keeps its own origin.
        check_origins(
            &[("A", r#"{"x":1,"y":2}"#)],
            &[],
            &[],
            &[("A", r#"{"y":3}"#)],
            &[("A.x", "tenant"), ("A.y", "user")],
        );
        check_origins(&[("A", r#"{"x":1}"#)], &[], &[&[("A.y", "2")]], &[], &[("A.x", "tenant"), ("A.y", "g1")]);
        // Removed and replaced paths leave no row for the weaker scope.
        check_origins(&[("A.B", "1"), ("A.C", "2")], &[], &[], &[("A.B", "undefined")], &[("A.C", "tenant")]);
        check_origins(&[("A.B", "1")], &[], &[], &[("A", "undefined")], &[]);
        check_origins(&[("A", "5")], &[], &[], &[("A.B", "1")], &[("A.B", "user")]);
        check_origins(&[("A.B", "1")], &[], &[&[("A", "\"flat\"")]], &[], &[("A", "g1")]);
        // Arrays and empty objects are leaves.
        check_origins(
            &[("A.L", "[1,2]")],
            &[("A.E", "{}")],
            &[],
            &[("A.L", "[3]")],
            &[("A.E", "all"), ("A.L", "user")],
        );
        // A removal in the same scope after its parent was set.
        check_origins(&[], &[], &[&[("A", r#"{"x":1,"y":2}"#), ("A.x", "undefined")]], &[], &[("A.y", "g1")]);
    }

    #[test]
    fn allow_origin_is_the_deciding_vote() {
        check_origins(&[], &[], &[&[("Allow.X", "true")], &[]], &[], &[("Allow.X", "g1")]);
        check_origins(
            &[],
            &[],
            &[&[("Allow.X", "false")], &[("Allow.X", "true")]],
            &[("Allow.X", "true")],
            &[("Allow.X", "g1")],
        );
        check_origins(&[("Allow.X", "false")], &[], &[&[("Allow.X", "true")]], &[], &[("Allow.X", "g1")]);
        // Nobody but the tenant said anything: the tenant's value stands.
        check_origins(&[("Allow.X", "true")], &[], &[], &[], &[("Allow.X", "tenant")]);
    }

    #[test]
    fn cli_values() {
        assert_eq!(SettingValue::parse_cli("undefined").unwrap(), SettingValue::Undefined);
        assert_eq!(SettingValue::parse_cli("true").unwrap(), SettingValue::Set(json!(true)));
        assert!(SettingValue::parse_cli("yes").is_err());
        assert!(SettingValue::parse_cli("{").is_err());
    }
}
