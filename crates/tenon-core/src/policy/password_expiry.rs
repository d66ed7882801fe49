//! Password-expiry warnings: the directory's `msDS-UserPasswordExpiryTimeComputed` (a FILETIME)
//! turned into an expiry, days left, and the decision whether to warn the signed-in user now.
//!
//! Config contract (server -> agent), in `payload.users[upn]`:
//! - `Client.PasswordExpiry` = `{"filetime": N}` when the directory record has the attribute, where
//!   `N` is the FILETIME as a JSON number (or a decimal string). Absent when the directory has none.
//! - `Policies.PasswordExpiryWarning.Enabled` (bool, default `true`).
//! - `Policies.PasswordExpiryWarning.ThresholdDays` (array of whole days, default `[14, 7, 3, 1]`).
//!
//! Special FILETIME values: `0` = the user must change the password now; `0x7FFFFFFFFFFFFFFF` = never
//! expires. JSON numbers above 2^53 are not exact once they pass through an IEEE double (the JCS
//! canonical form prints numbers as doubles): `0x7FFFFFFFFFFFFFFF` arrives as `9223372036854775808`
//! (or `9223372036854776000`). So every value at or above `0x7FFFFFFFFFFFFFFF`, including anything
//! beyond the range of u64, means "never"; a real expiry there would be in the year 30828.
//!
//! Warning rule: the warning window opens at the largest threshold. Inside it, the threshold that
//! applies is the smallest one that is still >= the whole days left, and the user is warned once per
//! (threshold, day): at most once a day while the band stays the same, and again the same day when a
//! lower threshold is crossed. A password that must be changed now (or has expired) gets "change it
//! now" once a day (threshold 0). "Day" is the UTC day of `now` (`now / 86400`), not the user's local
//! day: a warning may repeat a few hours apart around UTC midnight, which is harmless.

use super::config_path;
use serde_json::{Map, Value};

/// The FILETIME that means "never expires" (`i64::MAX`).
pub const FILETIME_NEVER: u64 = 0x7FFF_FFFF_FFFF_FFFF;
/// Seconds from 1601-01-01 (the FILETIME epoch) to 1970-01-01 (the Unix epoch).
const FILETIME_EPOCH_OFFSET_SECS: i64 = 11_644_473_600;
/// FILETIME counts 100 ns ticks.
const TICKS_PER_SECOND: u64 = 10_000_000;
const SECONDS_PER_DAY: i64 = 86_400;
/// The thresholds used when the config does not name any.
pub const DEFAULT_THRESHOLD_DAYS: [u32; 4] = [14, 7, 3, 1];

/// When a password expires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PasswordExpiry {
    /// FILETIME 0: the user must change the password at the next opportunity.
    MustChangeNow,
    /// The password never expires.
    Never,
    /// Expires at this Unix time (seconds).
    At(i64),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExpiryError {
    #[error("Client.PasswordExpiry must be {{\"filetime\": N}} with N a non-negative whole number, got {0}")]
    Malformed(String),
    #[error("Policies.PasswordExpiryWarning.{key} is invalid: {detail}")]
    Config { key: &'static str, detail: String },
}

impl PasswordExpiry {
    /// Converts a FILETIME (100 ns ticks since 1601-01-01 UTC).
    pub fn from_filetime(filetime: u64) -> Self {
        match filetime {
            0 => Self::MustChangeNow,
            ft if ft >= FILETIME_NEVER => Self::Never,
            // ft < 2^63, so ft / 10^7 fits an i64 easily.
            ft => Self::At((ft / TICKS_PER_SECOND) as i64 - FILETIME_EPOCH_OFFSET_SECS),
        }
    }

    /// Reads the value of `Client.PasswordExpiry`: `{"filetime": N}`, or `N` bare, where `N` is a JSON
    /// number or a decimal string.
    pub fn from_json(value: &Value) -> Result<Self, ExpiryError> {
        let malformed = || ExpiryError::Malformed(value.to_string());
        let n = match value {
            Value::Object(m) => m.get("filetime").ok_or_else(malformed)?,
            other => other,
        };
        let filetime = match n {
            Value::Number(num) => match (num.as_u64(), num.as_f64()) {
                (Some(u), _) => u,
                // Written with a fraction or exponent, or larger than u64: a double.
                (None, Some(f)) if f >= 0.0 => {
                    if f >= FILETIME_NEVER as f64 {
                        FILETIME_NEVER
                    } else {
                        f as u64
                    }
                }
                _ => return Err(malformed()),
            },
            Value::String(s) => parse_decimal(s.trim()).ok_or_else(malformed)?,
            _ => return Err(malformed()),
        };
        Ok(Self::from_filetime(filetime))
    }
}

/// A non-negative decimal integer; digits beyond u64 saturate, since they mean "never" anyway.
fn parse_decimal(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(s.parse::<u64>().unwrap_or(u64::MAX))
}

/// Whole days left (rounded down), negative once expired; `Some(0)` for "must change now" and
/// `None` for "never".
pub fn days_left(expiry: PasswordExpiry, now: i64) -> Option<i64> {
    match expiry {
        PasswordExpiry::MustChangeNow => Some(0),
        PasswordExpiry::Never => None,
        PasswordExpiry::At(t) => Some((t - now).div_euclid(SECONDS_PER_DAY)),
    }
}

/// True once the password can no longer be used as it is.
pub fn must_change(expiry: PasswordExpiry, now: i64) -> bool {
    match expiry {
        PasswordExpiry::MustChangeNow => true,
        PasswordExpiry::Never => false,
        PasswordExpiry::At(t) => t <= now,
    }
}

/// The UTC day number of a Unix time: the "day" of "once per threshold per day".
pub fn utc_day(now: i64) -> i64 {
    now.div_euclid(SECONDS_PER_DAY)
}

/// The threshold whose band `days` falls in: the smallest threshold >= `days`.
pub fn band(days: i64, thresholds_days: &[u32]) -> Option<u32> {
    thresholds_days.iter().copied().filter(|&t| i64::from(t) >= days).min()
}

/// What to tell the user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WarningKind {
    /// The password expires in `days_left` whole days.
    Expiring { days_left: i64 },
    /// It must be changed now, or has expired.
    ChangeNow,
}

/// A warning that is due; record `(threshold, day)` once it reached the user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warning {
    pub kind: WarningKind,
    /// The threshold (days) this warning is for; 0 for "change it now".
    pub threshold: u32,
    /// The UTC day it is for.
    pub day: i64,
}

impl Warning {
    pub fn key(&self) -> (u32, i64) {
        (self.threshold, self.day)
    }

    pub fn title(&self) -> &'static str {
        match self.kind {
            WarningKind::Expiring { .. } => "Your password expires soon",
            WarningKind::ChangeNow => "Change your password now",
        }
    }

    pub fn message(&self) -> String {
        let how = "Press Ctrl+Alt+Del and choose \"Change a password\".";
        match self.kind {
            WarningKind::ChangeNow => format!("Your password has expired or must be changed. Change it now. {how}"),
            WarningKind::Expiring { days_left: d } if d <= 0 => {
                format!("Your password expires within a day. Change it now to keep working without interruption. {how}")
            }
            WarningKind::Expiring { days_left: 1 } => format!("Your password expires in 1 day. {how}"),
            WarningKind::Expiring { days_left: d } => format!("Your password expires in {d} days. {how}"),
        }
    }
}

/// Whether to warn now: `already_warned` holds the `(threshold, day)` pairs already shown to this
/// user (entries of earlier days may be dropped by the caller; they never matter).
pub fn warnings_due(
    expiry: PasswordExpiry,
    now: i64,
    thresholds_days: &[u32],
    already_warned: &[(u32, i64)],
) -> Option<Warning> {
    let day = utc_day(now);
    let warning = if must_change(expiry, now) {
        Warning { kind: WarningKind::ChangeNow, threshold: 0, day }
    } else {
        let days = days_left(expiry, now)?;
        let threshold = band(days, thresholds_days)?;
        Warning { kind: WarningKind::Expiring { days_left: days }, threshold, day }
    };
    (!already_warned.contains(&warning.key())).then_some(warning)
}

/// `Policies.PasswordExpiryWarning` of a user's config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WarningConfig {
    pub enabled: bool,
    pub thresholds_days: Vec<u32>,
}

impl WarningConfig {
    pub fn from_config(config: &Map<String, Value>) -> Result<Self, ExpiryError> {
        let enabled = match config_path(config, "Policies.PasswordExpiryWarning.Enabled") {
            None | Some(Value::Null) => true,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                return Err(ExpiryError::Config {
                    key: "Enabled",
                    detail: format!("expected true or false, got {other}"),
                })
            }
        };
        let thresholds_days = match config_path(config, "Policies.PasswordExpiryWarning.ThresholdDays") {
            None | Some(Value::Null) => DEFAULT_THRESHOLD_DAYS.to_vec(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_u64().and_then(|n| u32::try_from(n).ok()))
                .collect::<Option<Vec<u32>>>()
                .ok_or_else(|| ExpiryError::Config {
                    key: "ThresholdDays",
                    detail: format!(
                        "expected an array of whole days such as [14, 7, 3, 1], got {}",
                        Value::Array(items.clone())
                    ),
                })?,
            Some(other) => {
                return Err(ExpiryError::Config {
                    key: "ThresholdDays",
                    detail: format!("expected an array of whole days such as [14, 7, 3, 1], got {other}"),
                })
            }
        };
        Ok(Self { enabled, thresholds_days })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const DAY: i64 = 86_400;
    /// 2026-01-01T00:00:00Z.
    const JAN_1_2026: i64 = 1_767_225_600;

    #[test]
    fn filetime_conversion_and_special_values() {
        let check = |ft: u64, expected: PasswordExpiry| assert_eq!(PasswordExpiry::from_filetime(ft), expected, "{ft}");
        check(0, PasswordExpiry::MustChangeNow);
        check(0x7FFF_FFFF_FFFF_FFFF, PasswordExpiry::Never);
        check(9_223_372_036_854_775_808, PasswordExpiry::Never);
        check(u64::MAX, PasswordExpiry::Never);
        // 1970-01-01T00:00:00Z: the epoch offset times 10^7 ticks.
        check(116_444_736_000_000_000, PasswordExpiry::At(0));
        // 2026-01-01T00:00:00Z = 1_767_225_600 (20454 days since 1970 * 86400), + 11_644_473_600.
        check(134_116_992_000_000_000, PasswordExpiry::At(JAN_1_2026));
        // 2024-02-29T12:34:56Z, sub-second ticks are dropped.
        check(133_536_836_960_000_000, PasswordExpiry::At(1_709_210_096));
        check(133_536_836_969_999_999, PasswordExpiry::At(1_709_210_096));
        // 1601-01-01: before Unix time, still a date (long expired).
        check(1, PasswordExpiry::At(-FILETIME_EPOCH_OFFSET_SECS));
    }

    #[test]
    fn json_forms_including_precision_loss() {
        let check = |v: Value, expected: Result<PasswordExpiry, ()>| {
            assert_eq!(PasswordExpiry::from_json(&v).map_err(|_| ()), expected, "{v}");
        };
        check(json!({"filetime": 134_116_992_000_000_000u64}), Ok(PasswordExpiry::At(JAN_1_2026)));
        check(json!({"filetime": "134116992000000000"}), Ok(PasswordExpiry::At(JAN_1_2026)));
        check(json!(134_116_992_000_000_000u64), Ok(PasswordExpiry::At(JAN_1_2026)));
        check(json!({"filetime": 0}), Ok(PasswordExpiry::MustChangeNow));
        check(json!({"filetime": "0"}), Ok(PasswordExpiry::MustChangeNow));
        check(json!({"filetime": 9_223_372_036_854_775_807u64}), Ok(PasswordExpiry::Never));
        check(json!({"filetime": "9223372036854775807"}), Ok(PasswordExpiry::Never));
        check(json!({"filetime": "9223372036854775808"}), Ok(PasswordExpiry::Never));
        check(json!({"filetime": "99999999999999999999999"}), Ok(PasswordExpiry::Never));
        // What a double-based serialiser prints for 0x7FFFFFFFFFFFFFFF.
        let parsed: Value = serde_json::from_str(r#"{"filetime": 9223372036854776000}"#).unwrap();
        check(parsed, Ok(PasswordExpiry::Never));
        let parsed: Value = serde_json::from_str(r#"{"filetime": 9.223372036854776e18}"#).unwrap();
        check(parsed, Ok(PasswordExpiry::Never));
        let parsed: Value = serde_json::from_str(r#"{"filetime": 1e30}"#).unwrap();
        check(parsed, Ok(PasswordExpiry::Never));
        let parsed: Value = serde_json::from_str(r#"{"filetime": 1.34116992e17}"#).unwrap();
        check(parsed, Ok(PasswordExpiry::At(JAN_1_2026)));
        check(json!({"filetime": -1}), Err(()));
        check(json!({"filetime": "-1"}), Err(()));
        check(json!({"filetime": "soon"}), Err(()));
        check(json!({"filetime": null}), Err(()));
        check(json!({}), Err(()));
        check(json!(true), Err(()));
    }

    #[test]
    fn days_left_rounds_down_and_goes_negative() {
        let now = JAN_1_2026;
        let check = |e: PasswordExpiry, expected: Option<i64>| assert_eq!(days_left(e, now), expected, "{e:?}");
        check(PasswordExpiry::Never, None);
        check(PasswordExpiry::MustChangeNow, Some(0));
        check(PasswordExpiry::At(now + 14 * DAY), Some(14));
        check(PasswordExpiry::At(now + 14 * DAY - 1), Some(13));
        check(PasswordExpiry::At(now + 1), Some(0));
        check(PasswordExpiry::At(now), Some(0));
        check(PasswordExpiry::At(now - 1), Some(-1));
        check(PasswordExpiry::At(now - 3 * DAY), Some(-3));
    }

    #[test]
    fn thresholds_with_a_fixed_clock() {
        let now = JAN_1_2026 + 9 * 3600; // 09:00 UTC
        let today = utc_day(now);
        let t = &DEFAULT_THRESHOLD_DAYS;
        let at = |days: i64| PasswordExpiry::At(now + days * DAY);
        let expiring = |days_left: i64, threshold: u32| {
            Some(Warning { kind: WarningKind::Expiring { days_left }, threshold, day: today })
        };
        let change_now = Some(Warning { kind: WarningKind::ChangeNow, threshold: 0, day: today });
        let check = |e: PasswordExpiry, warned: &[(u32, i64)], expected: Option<Warning>| {
            assert_eq!(warnings_due(e, now, t, warned), expected, "{e:?} after {warned:?}");
        };
        // Outside the window: nothing.
        check(at(30), &[], None);
        check(at(15), &[], None);
        // Each threshold, once per day.
        check(at(14), &[], expiring(14, 14));
        check(at(14), &[(14, today)], None);
        check(at(14), &[(14, today - 1)], expiring(14, 14));
        check(at(10), &[], expiring(10, 14));
        check(at(7), &[(14, today)], expiring(7, 7));
        check(at(7), &[(14, today), (7, today)], None);
        check(at(3), &[(7, today)], expiring(3, 3));
        check(at(3), &[(3, today)], None);
        check(at(1), &[(3, today)], expiring(1, 1));
        check(at(1), &[(1, today)], None);
        check(PasswordExpiry::At(now + 3600), &[(1, today)], None);
        check(PasswordExpiry::At(now + 3600), &[], expiring(0, 1));
        // "Change it now": FILETIME 0 and expired passwords, once a day.
        check(PasswordExpiry::MustChangeNow, &[], change_now.clone());
        check(PasswordExpiry::MustChangeNow, &[(1, today)], change_now.clone());
        check(PasswordExpiry::MustChangeNow, &[(0, today)], None);
        check(PasswordExpiry::MustChangeNow, &[(0, today - 1)], change_now.clone());
        check(at(0), &[], change_now.clone());
        check(at(-5), &[], change_now);
        // Never expires: never a warning.
        check(PasswordExpiry::Never, &[], None);
    }

    #[test]
    fn custom_and_empty_thresholds() {
        let now = JAN_1_2026;
        assert_eq!(warnings_due(PasswordExpiry::At(now + 20 * DAY), now, &[30, 5], &[]).map(|w| w.threshold), Some(30));
        assert_eq!(warnings_due(PasswordExpiry::At(now + 5 * DAY), now, &[5, 30], &[]).map(|w| w.threshold), Some(5));
        assert_eq!(warnings_due(PasswordExpiry::At(now + DAY), now, &[], &[]), None);
        assert_eq!(
            warnings_due(PasswordExpiry::MustChangeNow, now, &[], &[]).map(|w| w.kind),
            Some(WarningKind::ChangeNow)
        );
    }

    #[test]
    fn utc_day_boundaries() {
        assert_eq!(utc_day(JAN_1_2026), utc_day(JAN_1_2026 + DAY - 1));
        assert_eq!(utc_day(JAN_1_2026) + 1, utc_day(JAN_1_2026 + DAY));
        assert_eq!(utc_day(-1), -1);
    }

    #[test]
    fn messages_name_the_days() {
        let w = |kind| Warning { kind, threshold: 7, day: 0 };
        assert!(w(WarningKind::Expiring { days_left: 7 }).message().contains("in 7 days"));
        assert!(w(WarningKind::Expiring { days_left: 1 }).message().contains("in 1 day."));
        assert!(w(WarningKind::Expiring { days_left: 0 }).message().contains("within a day"));
        assert!(w(WarningKind::ChangeNow).message().contains("Change it now"));
    }

    #[test]
    fn warning_config() {
        let check = |config: Value, expected: Result<(bool, Vec<u32>), ()>| {
            let m = config.as_object().unwrap();
            let got = WarningConfig::from_config(m).map(|c| (c.enabled, c.thresholds_days)).map_err(|_| ());
            assert_eq!(got, expected, "{config}");
        };
        check(json!({}), Ok((true, vec![14, 7, 3, 1])));
        check(json!({"Policies": {"PasswordExpiryWarning": {"Enabled": false}}}), Ok((false, vec![14, 7, 3, 1])));
        check(json!({"Policies": {"PasswordExpiryWarning": {"ThresholdDays": [10, 2]}}}), Ok((true, vec![10, 2])));
        check(json!({"Policies": {"PasswordExpiryWarning": {"ThresholdDays": []}}}), Ok((true, vec![])));
        check(json!({"Policies": {"PasswordExpiryWarning": {"ThresholdDays": [10, -2]}}}), Err(()));
        check(json!({"Policies": {"PasswordExpiryWarning": {"ThresholdDays": "14"}}}), Err(()));
        check(json!({"Policies": {"PasswordExpiryWarning": {"Enabled": "yes"}}}), Err(()));
    }
}
