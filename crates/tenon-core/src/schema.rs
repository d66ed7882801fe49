//! The settings schema: every key Tenon understands, declared once with its type, default, scope,
//! delivery and a one-line description. The server refuses what is not declared here (except under
//! [`FREE_FORM_ROOT`]), the agent refuses a declared key of the wrong type instead of guessing, and
//! `docs/settings.md` is rendered from [`SETTINGS`] by [`markdown`] (a test fails on drift).
//!
//! A key may be set at a declared key or at any prefix of declared keys (such as
//! `Policies.PasswordExpiryWarning`); a prefix takes an object whose members are checked in turn.

use crate::ids::SettingKey;
use crate::settings::SettingValue;
use serde::Serialize;
use serde_json::{Map, Value};

/// Keys under this root are the organisation's own: any JSON value, delivered to devices as is.
pub const FREE_FORM_ROOT: &str = "Custom";

/// What a setting's value must be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum ValueType {
    Bool,
    /// A whole number in `min..=max`.
    Integer {
        min: i64,
        max: i64,
    },
    /// An array of whole days (0 to 3650).
    DayList,
    /// A string (server-derived keys only).
    String,
    /// An object the server builds (server-derived keys only).
    Object,
}

impl ValueType {
    /// How the type reads in an error message or the docs.
    pub fn describe(&self) -> String {
        match self {
            Self::Bool => "true or false".into(),
            Self::Integer { min, max } => format!("a whole number from {min} to {max}"),
            Self::DayList => "an array of whole days such as [14, 7, 3, 1]".into(),
            Self::String => "a string".into(),
            Self::Object => "an object".into(),
        }
    }

    pub fn accepts(&self, v: &Value) -> bool {
        match self {
            Self::Bool => v.is_boolean(),
            Self::Integer { min, max } => v.as_i64().is_some_and(|n| (*min..=*max).contains(&n)),
            Self::DayList => v.as_array().is_some_and(|a| a.iter().all(|d| d.as_u64().is_some_and(|n| n <= 3650))),
            Self::String => v.is_string(),
            Self::Object => v.is_object(),
        }
    }
}

/// Whose configuration a setting is read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// `payload.machine`: the device's primary user's effective config (tenant and "All Users"
    /// until the device has one).
    Machine,
    /// `payload.users[upn]`: each user who signs in.
    User,
    /// Read by the server from the tenant and "All Users" settings.
    Server,
}

/// Whether devices receive the key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    Delivered,
    /// Evaluated by the server and stripped from what devices receive.
    BackendOnly,
}

/// Who writes a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// `tenonctl settings set`.
    Admin,
    /// The server derives it; the text says from what (admins cannot set it).
    Server(&'static str),
}

/// One declared setting.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct SettingSpec {
    pub key: &'static str,
    #[serde(rename = "type")]
    pub ty: ValueType,
    /// The behaviour when the key is unset, as JSON text (`null`: nothing).
    pub default: &'static str,
    pub scope: Scope,
    pub delivery: Delivery,
    pub source: Source,
    pub description: &'static str,
}

const fn admin(
    key: &'static str,
    ty: ValueType,
    default: &'static str,
    scope: Scope,
    delivery: Delivery,
    description: &'static str,
) -> SettingSpec {
    SettingSpec { key, ty, default, scope, delivery, source: Source::Admin, description }
}

const fn derived(
    key: &'static str,
    ty: ValueType,
    scope: Scope,
    from: &'static str,
    description: &'static str,
) -> SettingSpec {
    SettingSpec {
        key,
        ty,
        default: "null",
        scope,
        delivery: Delivery::Delivered,
        source: Source::Server(from),
        description,
    }
}

/// Every key Tenon understands, sorted by key. Features that read a new key add it here.
pub const SETTINGS: &[SettingSpec] = &[
    derived(
        "Client.IsPrimaryOfUser",
        ValueType::Bool,
        Scope::User,
        "the device's primary user (`tenonctl devices set-primary`)",
        "Whether this user is the device's primary user.",
    ),
    derived(
        "Client.MandatoryInstalls.IgnoreUserRestrictions",
        ValueType::Bool,
        Scope::Machine,
        "`SoftwarePackageOverrides.IgnoreUserRestrictions` of the primary user",
        "Mandatory packages may install while the primary user is not signed in.",
    ),
    derived(
        "Client.PasswordExpiry",
        ValueType::Object,
        Scope::User,
        "the user's `msDS-UserPasswordExpiryTimeComputed` in the directory",
        "When the user's password expires: `{\"filetime\": \"N\"}` (0: must change now).",
    ),
    derived(
        "Client.PrimaryUser",
        ValueType::String,
        Scope::Machine,
        "the device's primary user (`tenonctl devices set-primary`)",
        "The UPN of the device's primary user.",
    ),
    admin(
        "Devices.PrimaryUserDetectionWindowHours",
        ValueType::Integer { min: 0, max: 8760 },
        "0",
        Scope::Server,
        Delivery::BackendOnly,
        "Hours after enrollment during which the first signed-in user becomes primary (0: the first contact only).",
    ),
    derived(
        "Packages",
        ValueType::Object,
        Scope::Machine,
        "the packages assigned to the tenant, the primary user's groups and the primary user (`tenonctl packages assign`)",
        "The device's package plan: per package its version, content hash and size, arguments, detection rule, dependencies, order, intent and user restriction.",
    ),
    admin(
        "Policies.PasswordExpiryWarning.Enabled",
        ValueType::Bool,
        "true",
        Scope::User,
        Delivery::Delivered,
        "Warn signed-in users whose password expires soon.",
    ),
    admin(
        "Policies.PasswordExpiryWarning.ThresholdDays",
        ValueType::DayList,
        "[14,7,3,1]",
        Scope::User,
        Delivery::Delivered,
        "Days before the expiry at which a user is warned (once per threshold per day).",
    ),
    admin(
        "Policies.RequireSecurityFeatures.BitlockerEnabled",
        ValueType::Bool,
        "false",
        Scope::Machine,
        Delivery::Delivered,
        "Encrypt the OS volume with BitLocker (TPM ready, not on VMs or multi-session hosts) and escrow its recovery key.",
    ),
    admin(
        "Policies.RequireSecurityFeatures.EntraEscrowMaxAttempts",
        ValueType::Integer { min: 1, max: 1000 },
        "5",
        Scope::Machine,
        Delivery::Delivered,
        "Entra ID escrow attempts per recovery key before its rollout is marked failed.",
    ),
    admin(
        "Policies.SetCurrentUserAdministrator",
        ValueType::Bool,
        "false",
        Scope::Machine,
        Delivery::Delivered,
        "Make the primary user a local administrator (Tenon removes only memberships it added).",
    ),
    admin(
        "Policies.SetNetworkOptimizationID",
        ValueType::Bool,
        "true",
        Scope::Machine,
        Delivery::Delivered,
        "Delivery Optimization peer groups by default gateway (DOGroupId, DODownloadMode=2).",
    ),
    admin(
        "Signatures.Options.IncludeUpnInName",
        ValueType::Bool,
        "false",
        Scope::User,
        Delivery::Delivered,
        "Name signature files `NAME (upn)` so several accounts in one profile do not collide.",
    ),
    derived(
        "Signatures.Templates",
        ValueType::Object,
        Scope::User,
        "the templates assigned to the user's groups (`tenonctl signatures set`)",
        "The user's Outlook signature templates.",
    ),
    derived(
        "Signatures.Values",
        ValueType::Object,
        Scope::User,
        "the user's directory record (`tenonctl users import`)",
        "The directory values the signature placeholders are filled with.",
    ),
    admin(
        "SoftwarePackageOverrides.IgnoreUserRestrictions",
        ValueType::Bool,
        "false",
        Scope::Machine,
        Delivery::BackendOnly,
        "Let mandatory packages install without the primary user signed in (read for the primary user).",
    ),
];

/// Why a setting was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SchemaError {
    #[error("unknown setting {key}{} (`tenonctl settings keys` lists the valid keys; keys of your own go under Custom.*)", suggestion.as_ref().map(|s| format!("; did you mean {s}?")).unwrap_or_default())]
    Unknown { key: String, suggestion: Option<String> },
    #[error("{key} must be {expected}, not {got}")]
    WrongType { key: String, expected: String, got: String },
    #[error("{key} is set by the server from {from}; it cannot be set directly")]
    ServerManaged { key: String, from: &'static str },
    #[error("{key} is read by the server from the tenant and \"All Users\" only; set it with --tenant or --group \"All Users\"")]
    TenantWideOnly { key: String },
}

impl SchemaError {
    /// The stable problem code the server answers with.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Unknown { .. } => "unknown_setting",
            Self::WrongType { .. } => "invalid_setting_value",
            Self::ServerManaged { .. } => "server_managed_setting",
            Self::TenantWideOnly { .. } => "invalid_setting_scope",
        }
    }
}

/// The declared setting `key`, if any.
pub fn lookup(key: &str) -> Option<&'static SettingSpec> {
    SETTINGS.iter().find(|s| s.key == key)
}

fn is_prefix(key: &str) -> bool {
    SETTINGS.iter().any(|s| s.key.len() > key.len() && s.key.starts_with(key) && s.key.as_bytes()[key.len()] == b'.')
}

/// [`validate`], and for a group other than "All Users" or a user (`tenant_wide` false) also that
/// no key read by the server only from the tenant-wide settings is set there, where it would do nothing.
pub fn validate_at(key: &SettingKey, value: &SettingValue, tenant_wide: bool) -> Result<(), SchemaError> {
    validate(key, value)?;
    if tenant_wide || matches!(value, SettingValue::Undefined) {
        return Ok(());
    }
    let k = key.as_str();
    let below = |s: &SettingSpec| s.key == k || (s.key.starts_with(k) && s.key.as_bytes().get(k.len()) == Some(&b'.'));
    let server_read = |s: &&SettingSpec| s.scope == Scope::Server && below(s);
    match SETTINGS.iter().find(server_read) {
        Some(s) => Err(SchemaError::TenantWideOnly { key: s.key.to_string() }),
        None => Ok(()),
    }
}

/// Checks what an administrator wants to store at `key`.
pub fn validate(key: &SettingKey, value: &SettingValue) -> Result<(), SchemaError> {
    if key.root() == FREE_FORM_ROOT {
        return Ok(());
    }
    match value {
        SettingValue::Undefined => match lookup(key.as_str()) {
            Some(SettingSpec { source: Source::Server(from), .. }) => {
                Err(SchemaError::ServerManaged { key: key.to_string(), from })
            }
            Some(_) => Ok(()),
            None if is_prefix(key.as_str()) => Ok(()),
            None => Err(unknown(key.as_str())),
        },
        SettingValue::Set(v) => validate_value(key.as_str(), v),
    }
}

fn validate_value(key: &str, v: &Value) -> Result<(), SchemaError> {
    if let Some(spec) = lookup(key) {
        if let Source::Server(from) = spec.source {
            return Err(SchemaError::ServerManaged { key: key.to_string(), from });
        }
        return check(spec, v).map(|_| ());
    }
    if !is_prefix(key) {
        return Err(unknown(key));
    }
    let Value::Object(members) = v else {
        return Err(SchemaError::WrongType {
            key: key.to_string(),
            expected: "an object of settings below it".into(),
            got: shown(v),
        });
    };
    for (name, member) in members {
        validate_value(&format!("{key}.{name}"), member)?;
    }
    Ok(())
}

/// `Ok(value)` when `v` has the declared type of `spec`.
pub fn check<'v>(spec: &SettingSpec, v: &'v Value) -> Result<&'v Value, SchemaError> {
    if spec.ty.accepts(v) {
        Ok(v)
    } else {
        Err(SchemaError::WrongType { key: spec.key.to_string(), expected: spec.ty.describe(), got: shown(v) })
    }
}

/// Reads a declared key from a delivered config: `Ok(None)` when absent (or null), an error when
/// it has the wrong type, so a policy reports the mismatch instead of guessing.
pub fn read<'m>(config: &'m Map<String, Value>, key: &str) -> Result<Option<&'m Value>, SchemaError> {
    let mut parts = key.split('.');
    let mut cur = parts.next().and_then(|p| config.get(p));
    for p in parts {
        cur = cur.and_then(Value::as_object).and_then(|o| o.get(p));
    }
    match (cur, lookup(key)) {
        (None | Some(Value::Null), _) => Ok(None),
        (Some(v), Some(spec)) => check(spec, v).map(Some),
        (Some(v), None) => Ok(Some(v)),
    }
}

fn shown(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 60 {
        format!("{}…", s.chars().take(60).collect::<String>())
    } else {
        s
    }
}

/// An unknown key, with the nearest declared key or prefix when one is close.
fn unknown(key: &str) -> SchemaError {
    let mut candidates: Vec<String> = Vec::new();
    for s in SETTINGS.iter().filter(|s| s.source == Source::Admin) {
        for (i, c) in s.key.char_indices() {
            if c == '.' {
                candidates.push(s.key[..i].to_string());
            }
        }
        candidates.push(s.key.to_string());
    }
    let lower = key.to_lowercase();
    let suggestion = candidates.iter().find(|c| c.to_lowercase() == lower).cloned().or_else(|| {
        candidates
            .iter()
            .map(|c| (strsim::levenshtein(&lower, &c.to_lowercase()), c))
            .filter(|(d, c)| *d <= (c.len() / 5).max(2))
            .min_by_key(|(d, _)| *d)
            .map(|(_, c)| c.clone())
            // A key typed short: the shortest declared key it begins.
            .or_else(|| {
                candidates
                    .iter()
                    .filter(|c| lower.contains('.') && c.to_lowercase().starts_with(&lower))
                    .min_by_key(|c| c.len())
                    .cloned()
            })
    });
    SchemaError::Unknown { key: key.to_string(), suggestion }
}

fn scope_text(s: Scope) -> &'static str {
    match s {
        Scope::Machine => "machine",
        Scope::User => "user",
        Scope::Server => "server",
    }
}

/// The schema as `docs/settings.md` holds it.
pub fn markdown() -> String {
    let mut out = String::from(
        "# Settings\n\n\
         <!-- Generated from crates/tenon-core/src/schema.rs by `tenonctl settings keys --markdown`; do not edit. -->\n\n\
         Every key Tenon understands. `tenonctl settings set` refuses any other key (with the nearest\n\
         valid one as a suggestion) and a value of the wrong type, and stores nothing. Keys of your own\n\
         (for your scripts on the devices) go under `Custom.*`: any JSON value, delivered as is.\n\n\
         A key can also be set at a prefix of declared keys, with an object value, such as\n\
         `tenonctl settings set --tenant Policies.PasswordExpiryWarning '{\"Enabled\": false}'`; each member\n\
         is checked. Scopes merge tenant < \"All Users\" < groups by priority < user (objects merge by key,\n\
         other values replace, `undefined` deletes).\n\n\
         - **scope** `machine`: read from the device's primary user's config (tenant and \"All Users\"\n  \
         while the device has none); `user`: read from each signed-in user's config; `server`: read by\n  \
         the server from the tenant and \"All Users\" settings.\n\
         - **delivery** `delivered`: devices receive it; `backend_only`: the server evaluates it and\n  \
         strips it from what devices receive.\n\
         - **set by** `admin`: `tenonctl settings set`; `server`: derived by the server, cannot be set.\n\n\
         | key | type | default | scope | delivery | set by | description |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for s in SETTINGS {
        let (by, description) = match s.source {
            Source::Admin => ("admin".to_string(), s.description.to_string()),
            Source::Server(from) => ("server".to_string(), format!("{} From {from}.", s.description)),
        };
        let default = if s.default == "null" { "-".to_string() } else { format!("`{}`", s.default) };
        out.push_str(&format!(
            "| `{}` | {} | {} | {} | {} | {} | {} |\n",
            s.key,
            s.ty.describe(),
            default,
            scope_text(s.scope),
            match s.delivery {
                Delivery::Delivered => "delivered",
                Delivery::BackendOnly => "backend_only",
            },
            by,
            description.replace('|', "\\|"),
        ));
    }
    out.push_str(
        "\n`Allow.*` and `Restrict.*` are backend-only roots (`Allow.*` combines across groups and the\n\
         user: an explicit `false` wins, otherwise any `true` grants) reserved for the features that\n\
         evaluate them; no key under them is defined yet, so setting one is refused.\n",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::BACKEND_ONLY_ROOTS;
    use serde_json::json;

    fn check_set(key: &str, value: Value) -> Result<(), SchemaError> {
        validate(&SettingKey::parse(key).unwrap(), &SettingValue::Set(value))
    }

    #[test]
    fn declared_once_sorted_and_defaults_are_valid() {
        for w in SETTINGS.windows(2) {
            assert!(w[0].key < w[1].key, "{} must sort before {}", w[0].key, w[1].key);
        }
        for s in SETTINGS {
            assert!(SettingKey::parse(s.key).is_ok(), "{}", s.key);
            let default: Value = serde_json::from_str(s.default).unwrap();
            assert!(default.is_null() || s.ty.accepts(&default), "{}: default {default}", s.key);
            assert!(!s.description.is_empty() && s.description.ends_with('.'), "{}", s.key);
        }
    }

    #[test]
    fn backend_only_matches_the_merge_rule() {
        for s in SETTINGS {
            let root = s.key.split('.').next().unwrap();
            assert_eq!(
                s.delivery == Delivery::BackendOnly,
                BACKEND_ONLY_ROOTS.contains(&root),
                "{}: delivery must agree with settings::BACKEND_ONLY_ROOTS",
                s.key
            );
        }
    }

    #[test]
    fn what_is_accepted_and_refused() {
        use SchemaError::*;
        fn wrong(k: &str) -> impl Fn(SchemaError) -> bool + '_ {
            move |e| matches!(e, SchemaError::WrongType { key, .. } if key == k)
        }
        assert_eq!(check_set("Policies.SetNetworkOptimizationID", json!(true)), Ok(()));
        assert!(check_set("Policies.SetNetworkOptimizationID", json!(5))
            .is_err_and(wrong("Policies.SetNetworkOptimizationID")));
        assert!(check_set("Policies.SetNetworkOptimizationID", json!("yes"))
            .is_err_and(wrong("Policies.SetNetworkOptimizationID")));
        assert_eq!(
            check_set("Policies.SetNetworkOptimizationId", json!(true)),
            Err(Unknown {
                key: "Policies.SetNetworkOptimizationId".into(),
                suggestion: Some("Policies.SetNetworkOptimizationID".into())
            })
        );
        assert_eq!(
            check_set("Policies.NoSuchThing", json!(true)),
            Err(Unknown { key: "Policies.NoSuchThing".into(), suggestion: None })
        );
        assert!(matches!(
            check_set("Policies.SetCurrentUserAdmin", json!(true)),
            Err(Unknown { suggestion: Some(s), .. }) if s == "Policies.SetCurrentUserAdministrator"
        ));
        assert_eq!(check_set("Custom.Anything.Goes", json!({"x": [1, "y"]})), Ok(()));
        assert_eq!(check_set("Custom", json!({"x": 1})), Ok(()));
        assert_eq!(
            check_set("Policies.PasswordExpiryWarning", json!({"Enabled": false, "ThresholdDays": [3]})),
            Ok(())
        );
        assert!(check_set("Policies.PasswordExpiryWarning", json!({"Enabled": "no"}))
            .is_err_and(wrong("Policies.PasswordExpiryWarning.Enabled")));
        assert!(check_set("Policies.PasswordExpiryWarning", json!(true))
            .is_err_and(wrong("Policies.PasswordExpiryWarning")));
        assert!(matches!(check_set("Policies", json!({"Nope": 1})), Err(Unknown { .. })));
        assert!(check_set("Policies.PasswordExpiryWarning.ThresholdDays", json!([14, -1])).is_err());
        assert!(check_set("Policies.RequireSecurityFeatures.EntraEscrowMaxAttempts", json!(0)).is_err());
        assert_eq!(check_set("Policies.RequireSecurityFeatures.EntraEscrowMaxAttempts", json!(3)), Ok(()));
        assert!(matches!(check_set("Client.PrimaryUser", json!("a@b.c")), Err(ServerManaged { .. })));
        assert!(matches!(check_set("Signatures", json!({"Templates": {}})), Err(ServerManaged { .. })));
        assert!(matches!(check_set("Allow.LocalAdmin", json!(true)), Err(Unknown { .. })));
        let undefined = |k: &str| validate(&SettingKey::parse(k).unwrap(), &SettingValue::Undefined);
        assert_eq!(undefined("Policies.SetNetworkOptimizationID"), Ok(()));
        assert_eq!(undefined("Policies.PasswordExpiryWarning"), Ok(()));
        assert!(matches!(undefined("Policies.Typo"), Err(Unknown { .. })));
        assert!(matches!(undefined("Client.IsPrimaryOfUser"), Err(ServerManaged { .. })));
        let at =
            |k: &str, v: Value, wide: bool| validate_at(&SettingKey::parse(k).unwrap(), &SettingValue::Set(v), wide);
        assert_eq!(at("Devices.PrimaryUserDetectionWindowHours", json!(24), true), Ok(()));
        assert!(matches!(at("Devices.PrimaryUserDetectionWindowHours", json!(24), false), Err(TenantWideOnly { .. })));
        assert!(matches!(
            at("Devices", json!({"PrimaryUserDetectionWindowHours": 1}), false),
            Err(TenantWideOnly { .. })
        ));
        assert_eq!(at("Policies.SetCurrentUserAdministrator", json!(true), false), Ok(()));
    }

    #[test]
    fn agents_read_declared_keys_by_type() {
        let cfg = |v: Value| v.as_object().unwrap().clone();
        let c = cfg(json!({"Policies": {"SetNetworkOptimizationID": "yes", "SetCurrentUserAdministrator": true}}));
        assert!(read(&c, "Policies.SetNetworkOptimizationID").is_err());
        assert_eq!(read(&c, "Policies.SetCurrentUserAdministrator"), Ok(Some(&json!(true))));
        assert_eq!(read(&c, "Policies.RequireSecurityFeatures.BitlockerEnabled"), Ok(None));
        assert_eq!(
            read(&cfg(json!({"Policies": {"SetNetworkOptimizationID": null}})), "Policies.SetNetworkOptimizationID"),
            Ok(None)
        );
    }
}
