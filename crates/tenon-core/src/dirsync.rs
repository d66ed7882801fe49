//! What a directory source (Microsoft Graph, Active Directory over LDAP, an imported file) hands
//! the server after one read: users and groups in one shape whatever the directory, as a full
//! snapshot or as the changes since the source's last cursor. The readers (tenon-server's
//! `directory::graph` and `directory::ldap`) fill these types; applying them (the deletion guard,
//! UPN collisions between sources, the directory the compiler sees) is pure and lives beside them.

use crate::directory::PASSWORD_EXPIRY_ATTRIBUTE;
use crate::ids::{GroupName, Upn};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet};

/// One user as a source reports it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SourceUser {
    /// The directory's own stable id: Graph's `id`, AD's `objectGUID` as a lower-case GUID string
    /// (`xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, in the byte order AD displays it).
    pub external_id: String,
    /// The user's UPN. In a whole record `None` means the directory has none (the user is
    /// skipped and counted); in a partial record it means "unchanged".
    pub upn: Option<String>,
    /// Graph field names, whatever the source: `displayName`, `givenName`, `surname`,
    /// `jobTitle`, `department`, `companyName`, `mail`, `businessPhones` (an array of strings),
    /// `mobilePhone`, `faxNumber`, `officeLocation`, `streetAddress`, `city`, `postalCode`,
    /// `state`, `country`, `onPremisesExtensionAttributes` (an object, `extensionAttribute1`..`15`),
    /// and for password expiry either `msDS-UserPasswordExpiryTimeComputed` (AD: a decimal
    /// FILETIME string, `0` must change now, `9223372036854775807` never) or Graph's own
    /// `lastPasswordChangeDateTime`, `passwordPolicies` and `onPremisesSyncEnabled`, from which the
    /// server computes it ([`SourceBatch`]'s `password_validity_days`). Fields the directory has no
    /// value for are absent; in a partial record a `null` value clears a field.
    pub record: Map<String, Value>,
    /// `Some(false)` for a disabled account (Graph `accountEnabled: false`, AD `userAccountControl`
    /// bit 0x2). `None`: enabled in a whole record, unchanged in a partial one.
    pub account_enabled: Option<bool>,
    /// True when `record` holds only what changed (Graph's delta answers: "at least the updated
    /// properties"): it is merged into what the server holds. False: the record replaces it.
    pub partial: bool,
}

/// The direct members of a group, by `external_id`: users and groups (nested groups are flattened
/// by the server, which holds every group of the source).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Members {
    pub users: BTreeSet<String>,
    pub groups: BTreeSet<String>,
}

/// How a read reports a group's membership.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum MemberChange {
    /// Every direct member (a full read; LDAP's incremental read of a changed group, which returns
    /// its whole `member` attribute).
    Whole(Members),
    /// Only what changed since the cursor (Graph's `members@delta`, with `@removed` entries in
    /// `removed`).
    Changed { added: Members, removed: Members },
}

/// One group as a source reports it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SourceGroup {
    /// Graph's group `id`, AD's `objectGUID` (as for users).
    pub external_id: String,
    /// The name Tenon's settings and assignments use: Graph's `displayName`, AD's `cn`. `None`
    /// only in a delta that did not carry it (unchanged).
    pub name: Option<String>,
    pub members: MemberChange,
}

/// The outcome of one completed read. A read that fails part-way returns an error instead, never
/// a partial batch: nothing of it is applied.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SourceBatch {
    /// Everything the source has: what is not in it is gone from the source.
    Full {
        users: Vec<SourceUser>,
        groups: Vec<SourceGroup>,
        /// What the next read starts from (Graph's delta links, AD's highest `uSNChanged`), opaque
        /// to the server; `None` when the source has no incremental read.
        cursor: Option<String>,
        /// Graph only: `passwordValidityPeriodInDays` of each verified domain (lower-case name).
        password_validity_days: BTreeMap<String, u32>,
    },
    /// What changed since the cursor the read was given.
    Delta {
        users_changed: Vec<SourceUser>,
        /// `external_id`s of users deleted from the source (or gone out of its scope).
        users_removed: Vec<String>,
        groups_changed: Vec<SourceGroup>,
        /// `external_id`s of groups deleted from the source.
        groups_removed: Vec<String>,
        cursor: Option<String>,
        password_validity_days: BTreeMap<String, u32>,
    },
}

/// Progress of a read, for `tenonctl directory sync` (pages read, users and groups seen so far).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncProgress {
    pub pages: u64,
    pub users: u64,
    pub groups: u64,
}

/// Why a read failed, in words an administrator can act on. Never holds a secret.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SourceError {
    pub kind: SourceErrorKind,
    /// What went wrong and what to do about it.
    pub message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceErrorKind {
    /// The credentials were refused (wrong secret or password, expired password).
    Credentials,
    /// Authenticated, but not allowed to read what is needed.
    Permissions,
    /// The directory could not be reached (DNS, connection, TLS).
    Unreachable,
    /// The directory answered something that is not what its protocol promises.
    Malformed,
    /// The directory asked to slow down longer than a sync waits.
    Throttled,
    /// The cursor is no longer valid: the caller starts a full read.
    CursorExpired,
    /// Anything else.
    Other,
}

impl SourceError {
    pub fn new(kind: SourceErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into() }
    }
}

/// Hard bounds on what one source may hand the server: the directory is hostile input.
pub const MAX_SOURCE_USERS: usize = 2_000_000;
pub const MAX_SOURCE_GROUPS: usize = 200_000;
/// Nesting deeper than this is cut off when memberships are flattened (AD allows cycles).
pub const MAX_NESTING: usize = 64;

/// What the server holds of one source between reads: every user and group it reported, by the
/// source's own id. Applying a batch to it is the only way it changes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SourceState {
    pub users: BTreeMap<String, HeldUser>,
    pub groups: BTreeMap<String, HeldGroup>,
    /// Graph: `passwordValidityPeriodInDays` by domain, from the latest read.
    pub password_validity_days: BTreeMap<String, u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldUser {
    pub upn: Option<String>,
    pub record: Map<String, Value>,
    pub enabled: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HeldGroup {
    pub name: String,
    pub members: Members,
}

/// What applying one batch did, for the sync's report and the deletion guard.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Users and groups whose held form changed (written back to the store).
    pub users_touched: BTreeSet<String>,
    pub groups_touched: BTreeSet<String>,
    /// Users the source no longer has, as they were held, before the guard decides.
    pub users_removed: BTreeMap<String, HeldUser>,
    pub groups_removed: BTreeSet<String>,
}

/// Why a batch was refused whole.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    #[error("the source reported {0} users, more than Tenon holds from one source ({MAX_SOURCE_USERS})")]
    TooManyUsers(usize),
    #[error("the source reported {0} groups, more than Tenon holds from one source ({MAX_SOURCE_GROUPS})")]
    TooManyGroups(usize),
}

impl SourceState {
    /// Applies one completed read. A full read replaces everything; a delta changes what it names.
    pub fn apply(&mut self, batch: SourceBatch) -> Result<Applied, ApplyError> {
        let mut done = Applied::default();
        match batch {
            SourceBatch::Full { users, groups, password_validity_days, .. } => {
                if users.len() > MAX_SOURCE_USERS {
                    return Err(ApplyError::TooManyUsers(users.len()));
                }
                if groups.len() > MAX_SOURCE_GROUPS {
                    return Err(ApplyError::TooManyGroups(groups.len()));
                }
                let mut next_users = BTreeMap::new();
                for u in users {
                    let held = HeldUser { upn: u.upn, record: u.record, enabled: u.account_enabled != Some(false) };
                    if self.users.get(&u.external_id) != Some(&held) {
                        done.users_touched.insert(u.external_id.clone());
                    }
                    next_users.insert(u.external_id, held);
                }
                let old = std::mem::take(&mut self.users);
                done.users_removed = old.into_iter().filter(|(id, _)| !next_users.contains_key(id)).collect();
                let mut next_groups: BTreeMap<String, HeldGroup> = BTreeMap::new();
                for g in groups {
                    let entry = next_groups.entry(g.external_id.clone()).or_default();
                    if let Some(name) = g.name {
                        entry.name = name;
                    }
                    merge_members(&mut entry.members, g.members);
                }
                for (id, g) in &next_groups {
                    if self.groups.get(id) != Some(g) {
                        done.groups_touched.insert(id.clone());
                    }
                }
                done.groups_removed = self.groups.keys().filter(|id| !next_groups.contains_key(*id)).cloned().collect();
                self.users = next_users;
                self.groups = next_groups;
                self.password_validity_days = password_validity_days;
            }
            SourceBatch::Delta {
                users_changed,
                users_removed,
                groups_changed,
                groups_removed,
                password_validity_days,
                ..
            } => {
                for u in users_changed {
                    let held = self.users.entry(u.external_id.clone()).or_default();
                    let before = held.clone();
                    if u.partial {
                        for (k, v) in u.record {
                            if v.is_null() {
                                held.record.remove(&k);
                            } else {
                                held.record.insert(k, v);
                            }
                        }
                        if u.upn.is_some() {
                            held.upn = u.upn;
                        }
                        if let Some(e) = u.account_enabled {
                            held.enabled = e;
                        }
                        if before == HeldUser::default() && u.account_enabled.is_none() {
                            held.enabled = true;
                        }
                    } else {
                        *held = HeldUser { upn: u.upn, record: u.record, enabled: u.account_enabled != Some(false) };
                    }
                    if *held != before {
                        done.users_touched.insert(u.external_id);
                    }
                }
                for id in users_removed {
                    if let Some(old) = self.users.remove(&id) {
                        done.users_touched.remove(&id);
                        done.users_removed.insert(id, old);
                    }
                }
                for g in groups_changed {
                    let held = self.groups.entry(g.external_id.clone()).or_default();
                    let before = held.clone();
                    if let Some(name) = g.name {
                        held.name = name;
                    }
                    match g.members {
                        MemberChange::Whole(m) => held.members = m,
                        MemberChange::Changed { added, removed } => {
                            for id in removed.users {
                                held.members.users.remove(&id);
                            }
                            for id in removed.groups {
                                held.members.groups.remove(&id);
                            }
                            held.members.users.extend(added.users);
                            held.members.groups.extend(added.groups);
                        }
                    }
                    if *held != before {
                        done.groups_touched.insert(g.external_id);
                    }
                }
                for id in groups_removed {
                    if self.groups.remove(&id).is_some() {
                        done.groups_touched.remove(&id);
                        done.groups_removed.insert(id);
                    }
                }
                if self.users.len() > MAX_SOURCE_USERS {
                    return Err(ApplyError::TooManyUsers(self.users.len()));
                }
                if self.groups.len() > MAX_SOURCE_GROUPS {
                    return Err(ApplyError::TooManyGroups(self.groups.len()));
                }
                if !password_validity_days.is_empty() {
                    self.password_validity_days = password_validity_days;
                }
            }
        }
        Ok(done)
    }

    /// Users with a UPN: what the deletion guard counts.
    pub fn user_count(&self) -> usize {
        self.users.values().filter(|u| u.upn.is_some()).count()
    }

    /// The names of the groups a user is in, directly or through nested groups.
    pub fn groups_of_users(&self) -> BTreeMap<&str, BTreeSet<&str>> {
        // Invert once: group -> parent groups, then walk up from each group a user is in.
        let mut parents: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (id, g) in &self.groups {
            for child in &g.members.groups {
                parents.entry(child.as_str()).or_default().push(id.as_str());
            }
        }
        let mut closure: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for id in self.groups.keys() {
            let mut seen = BTreeSet::new();
            let mut stack = vec![(id.as_str(), 0usize)];
            while let Some((g, depth)) = stack.pop() {
                if depth > MAX_NESTING || !seen.insert(g) {
                    continue;
                }
                for p in parents.get(g).into_iter().flatten() {
                    stack.push((p, depth + 1));
                }
            }
            closure.insert(id.as_str(), seen);
        }
        let mut out: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for (id, g) in &self.groups {
            for user in &g.members.users {
                let names = out.entry(user.as_str()).or_default();
                for anc in closure.get(id.as_str()).into_iter().flatten() {
                    if let Some(ag) = self.groups.get(*anc) {
                        if !ag.name.is_empty() {
                            names.insert(ag.name.as_str());
                        }
                    }
                }
            }
        }
        out
    }
}

fn merge_members(into: &mut Members, change: MemberChange) {
    match change {
        MemberChange::Whole(m) | MemberChange::Changed { added: m, .. } => {
            into.users.extend(m.users);
            into.groups.extend(m.groups);
        }
    }
}

/// The deletion guard: a read that removes more than `share` of a source's users, or more than
/// `floor` users, whichever is larger, is held until an administrator accepts it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DeletionGuard {
    pub share: f64,
    pub floor: usize,
}

impl Default for DeletionGuard {
    fn default() -> Self {
        Self { share: 0.10, floor: 20 }
    }
}

impl DeletionGuard {
    /// True when removing `removed` of `before` users must wait for `--accept-deletions`.
    pub fn holds(&self, before: usize, removed: usize) -> bool {
        let allowed = ((before as f64) * self.share).ceil() as usize;
        removed > allowed.max(self.floor)
    }
}

/// FILETIME of "never expires" (AD's 0x7FFFFFFFFFFFFFFF).
pub const FILETIME_NEVER: i64 = i64::MAX;
/// Entra's `passwordValidityPeriodInDays` for "passwords never expire".
pub const GRAPH_NEVER_EXPIRES_DAYS: u32 = 2_147_483_647;
const FILETIME_UNIX_EPOCH: i64 = 116_444_736_000_000_000;

/// Unix seconds to FILETIME (100 ns ticks since 1601).
pub fn unix_to_filetime(unix: i64) -> i64 {
    unix.saturating_mul(10_000_000).saturating_add(FILETIME_UNIX_EPOCH)
}

/// FILETIME to Unix seconds; `None` for "never" and for 0 ("must change now" has no date).
pub fn filetime_to_unix(ft: i64) -> Option<i64> {
    if ft <= 0 || ft == FILETIME_NEVER {
        return None;
    }
    Some((ft - FILETIME_UNIX_EPOCH).div_euclid(10_000_000))
}

/// A cloud user's password expiry as Entra computes it: `lastPasswordChangeDateTime` plus the
/// domain's validity period, never when `passwordPolicies` has `DisablePasswordExpiration` or the
/// domain's passwords never expire. `last_change_unix` is the parsed `lastPasswordChangeDateTime`.
/// `None`: unknown (no change time, or a domain the read did not list).
pub fn graph_password_expiry(
    last_change_unix: Option<i64>,
    password_policies: Option<&str>,
    validity_days: Option<u32>,
) -> Option<i64> {
    if password_policies
        .is_some_and(|p| p.split(',').any(|x| x.trim().eq_ignore_ascii_case("DisablePasswordExpiration")))
    {
        return Some(FILETIME_NEVER);
    }
    let days = validity_days?;
    if days >= GRAPH_NEVER_EXPIRES_DAYS {
        return Some(FILETIME_NEVER);
    }
    Some(unix_to_filetime(last_change_unix?.saturating_add(i64::from(days) * 86_400)))
}

/// A directory user as the compiler sees it, with the source that owns it.
#[derive(Clone, Debug, PartialEq)]
pub struct ProjectedUser {
    pub source: String,
    pub external_id: String,
    /// The Graph-shaped record: the source's fields, `accountEnabled`, and
    /// `msDS-UserPasswordExpiryTimeComputed` (a decimal FILETIME string) when the expiry is known.
    pub record: Map<String, Value>,
    pub groups: BTreeSet<GroupName>,
}

/// Two sources naming one UPN: the first added owns it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Collision {
    pub upn: String,
    pub owner: String,
    pub other: String,
}

/// Every directory source's users merged into one view.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Projection {
    pub users: BTreeMap<Upn, ProjectedUser>,
    pub collisions: Vec<Collision>,
    /// Users each source has that cannot be used: no UPN, or one that does not parse.
    pub skipped: BTreeMap<String, u64>,
    /// Group names that do not parse (control characters, too long), per source.
    pub skipped_groups: BTreeMap<String, u64>,
}

/// Graph's own fields for password expiry; the server computes the FILETIME from them.
const GRAPH_LAST_PASSWORD_CHANGE: &str = "lastPasswordChangeDateTime";
const GRAPH_PASSWORD_POLICIES: &str = "passwordPolicies";
const GRAPH_SYNC_ENABLED: &str = "onPremisesSyncEnabled";

/// Merges the sources, given by name in the order they were added (the first owns a UPN). Takes
/// them by value: each record moves into the projection, so a large directory is held once, not
/// twice. `parse_rfc3339` turns Graph's `lastPasswordChangeDateTime` into Unix seconds (time
/// parsing is the caller's: tenon-core keeps to no clock and no date library).
pub fn project(sources: Vec<(String, SourceState)>, parse_rfc3339: &dyn Fn(&str) -> Option<i64>) -> Projection {
    let mut out = Projection::default();
    // AD's expiry of each UPN, for users synced from AD whose cloud copy cannot know it.
    let mut on_premises_expiry: BTreeMap<Upn, Value> = BTreeMap::new();
    for (_, state) in &sources {
        for u in state.users.values() {
            if let (Some(upn), Some(v)) = (u.upn.as_deref(), u.record.get(PASSWORD_EXPIRY_ATTRIBUTE)) {
                if let Ok(upn) = Upn::parse(upn) {
                    on_premises_expiry.entry(upn).or_insert_with(|| v.clone());
                }
            }
        }
    }
    for (name, mut state) in sources {
        let users = std::mem::take(&mut state.users);
        let mut skipped_groups = 0u64;
        let group_names: BTreeMap<&str, Option<GroupName>> =
            state.groups.values().map(|g| (g.name.as_str(), GroupName::parse(&g.name).ok())).collect();
        for parsed in group_names.values() {
            if parsed.is_none() {
                skipped_groups += 1;
            }
        }
        let memberships = state.groups_of_users();
        let mut skipped = 0u64;
        for (id, u) in users {
            let Some(upn) = u.upn.as_deref().and_then(|s| Upn::parse(s).ok()) else {
                skipped += 1;
                continue;
            };
            if let Some(owner) = out.users.get(&upn) {
                out.collisions.push(Collision {
                    upn: upn.to_string(),
                    owner: owner.source.clone(),
                    other: name.clone(),
                });
                continue;
            }
            let mut record = u.record;
            record.insert("accountEnabled".into(), Value::Bool(u.enabled));
            if !record.contains_key(PASSWORD_EXPIRY_ATTRIBUTE) {
                let synced = record.get(GRAPH_SYNC_ENABLED).and_then(Value::as_bool) == Some(true);
                let expiry = if synced {
                    on_premises_expiry.get(&upn).cloned()
                } else {
                    let last = record.get(GRAPH_LAST_PASSWORD_CHANGE).and_then(Value::as_str).and_then(parse_rfc3339);
                    let policies = record.get(GRAPH_PASSWORD_POLICIES).and_then(Value::as_str);
                    let domain = upn.as_str().rsplit_once('@').map(|(_, d)| d).unwrap_or_default();
                    let days = state.password_validity_days.get(domain).copied();
                    graph_password_expiry(last, policies, days).map(|ft| Value::String(ft.to_string()))
                };
                if let Some(e) = expiry {
                    record.insert(PASSWORD_EXPIRY_ATTRIBUTE.into(), e);
                }
            }
            let groups = memberships
                .get(id.as_str())
                .into_iter()
                .flatten()
                .filter_map(|name| group_names.get(name).cloned().flatten())
                .collect();
            out.users.insert(upn, ProjectedUser { source: name.clone(), external_id: id, record, groups });
        }
        if skipped > 0 {
            out.skipped.insert(name.clone(), skipped);
        }
        if skipped_groups > 0 {
            out.skipped_groups.insert(name, skipped_groups);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn user(id: &str, upn: Option<&str>, record: Value, partial: bool) -> SourceUser {
        SourceUser {
            external_id: id.into(),
            upn: upn.map(Into::into),
            record: record.as_object().cloned().unwrap_or_default(),
            account_enabled: None,
            partial,
        }
    }

    fn members(users: &[&str], groups: &[&str]) -> Members {
        Members {
            users: users.iter().map(|s| s.to_string()).collect(),
            groups: groups.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn group(id: &str, name: Option<&str>, m: MemberChange) -> SourceGroup {
        SourceGroup { external_id: id.into(), name: name.map(Into::into), members: m }
    }

    fn full(users: Vec<SourceUser>, groups: Vec<SourceGroup>) -> SourceBatch {
        SourceBatch::Full { users, groups, cursor: None, password_validity_days: BTreeMap::new() }
    }

    fn delta(users_changed: Vec<SourceUser>, users_removed: &[&str], groups_changed: Vec<SourceGroup>) -> SourceBatch {
        SourceBatch::Delta {
            users_changed,
            users_removed: users_removed.iter().map(|s| s.to_string()).collect(),
            groups_changed,
            groups_removed: vec![],
            cursor: None,
            password_validity_days: BTreeMap::new(),
        }
    }

    #[test]
    fn a_full_read_replaces_and_a_delta_merges() {
        let mut s = SourceState::default();
        let done = s
            .apply(full(
                vec![
                    user("1", Some("anna@x.com"), json!({"department": "Sales", "city": "Bonn"}), false),
                    user("2", Some("ben@x.com"), json!({}), false),
                ],
                vec![group("g", Some("Staff"), MemberChange::Whole(members(&["1", "2"], &[])))],
            ))
            .unwrap();
        assert_eq!(done.users_touched.len(), 2);
        // A partial record changes what it names and clears what is null; the rest stays.
        let done = s
            .apply(delta(
                vec![user("1", None, json!({"department": "Finance", "city": null}), true)],
                &["2"],
                vec![group(
                    "g",
                    None,
                    MemberChange::Changed { added: members(&["3"], &[]), removed: members(&["2"], &[]) },
                )],
            ))
            .unwrap();
        assert_eq!(s.users["1"].record, json!({"department": "Finance"}).as_object().cloned().unwrap());
        assert_eq!(s.users["1"].upn.as_deref(), Some("anna@x.com"));
        assert_eq!(done.users_removed.keys().collect::<Vec<_>>(), ["2"]);
        assert_eq!(s.groups["g"].name, "Staff");
        assert_eq!(s.groups["g"].members, members(&["1", "3"], &[]));
        // The same full read twice touches nothing the second time.
        let again = full(vec![user("1", Some("anna@x.com"), json!({}), false)], vec![]);
        s.apply(again.clone()).unwrap();
        let done = s.apply(again).unwrap();
        assert!(done.users_touched.is_empty() && done.users_removed.is_empty());
    }

    #[test]
    fn nested_groups_flatten_and_cycles_end() {
        let mut s = SourceState::default();
        s.apply(full(
            vec![user("u", Some("u@x.com"), json!({}), false)],
            vec![
                group("a", Some("A"), MemberChange::Whole(members(&[], &["b"]))),
                group("b", Some("B"), MemberChange::Whole(members(&["u"], &["c"]))),
                group("c", Some("C"), MemberChange::Whole(members(&[], &["a"]))),
            ],
        ))
        .unwrap();
        let of = s.groups_of_users();
        assert_eq!(of["u"], BTreeSet::from(["A", "B", "C"]));
    }

    #[test]
    fn deletion_guard_allows_ten_percent_or_twenty() {
        let g = DeletionGuard::default();
        for (before, removed, held) in
            [(100, 20, false), (100, 21, true), (1000, 100, false), (1000, 101, true), (5, 5, false), (0, 0, false)]
        {
            assert_eq!(g.holds(before, removed), held, "{before} {removed}");
        }
    }

    #[test]
    fn graph_password_expiry_follows_entra() {
        let day = 86_400;
        for (policies, days, expect) in [
            (None, Some(90), Some(unix_to_filetime(1_000_000 + 90 * day))),
            (Some("DisablePasswordExpiration"), Some(90), Some(FILETIME_NEVER)),
            (Some("DisableStrongPassword, DisablePasswordExpiration"), Some(90), Some(FILETIME_NEVER)),
            (Some("DisableStrongPassword"), Some(90), Some(unix_to_filetime(1_000_000 + 90 * day))),
            (None, Some(GRAPH_NEVER_EXPIRES_DAYS), Some(FILETIME_NEVER)),
            (None, None, None),
        ] {
            assert_eq!(graph_password_expiry(Some(1_000_000), policies, days), expect, "{policies:?} {days:?}");
        }
        assert_eq!(filetime_to_unix(unix_to_filetime(1_700_000_000)), Some(1_700_000_000));
        assert_eq!(filetime_to_unix(FILETIME_NEVER), None);
        assert_eq!(filetime_to_unix(0), None);
    }

    #[test]
    fn the_first_source_owns_a_upn_and_expiry_comes_from_where_it_is_known() {
        let mut graph = SourceState::default();
        graph
            .apply(full(
                vec![
                    user(
                        "g1",
                        Some("Anna@X.com"),
                        json!({"lastPasswordChangeDateTime": "T", "department": "Cloud"}),
                        false,
                    ),
                    user("g2", Some("ben@x.com"), json!({"onPremisesSyncEnabled": true}), false),
                    user("g3", None, json!({}), false),
                ],
                vec![group("gg", Some("Staff"), MemberChange::Whole(members(&["g1", "g2"], &[])))],
            ))
            .unwrap();
        graph.password_validity_days.insert("x.com".into(), 90);
        let mut ad = SourceState::default();
        ad.apply(full(
            vec![
                user("a1", Some("anna@x.com"), json!({"department": "AD"}), false),
                user(
                    "a2",
                    Some("ben@x.com"),
                    json!({"msDS-UserPasswordExpiryTimeComputed": "133000000000000000"}),
                    false,
                ),
            ],
            vec![group("ag", Some("bad\u{7}name"), MemberChange::Whole(members(&["a1"], &[])))],
        ))
        .unwrap();
        let p = project(vec![("entra".into(), graph), ("ad".into(), ad)], &|s| (s == "T").then_some(1_000_000));
        let anna = &p.users[&Upn::parse("anna@x.com").unwrap()];
        assert_eq!(anna.source, "entra");
        assert_eq!(anna.record["department"], json!("Cloud"));
        assert_eq!(anna.record["accountEnabled"], json!(true));
        assert_eq!(
            anna.record[PASSWORD_EXPIRY_ATTRIBUTE],
            json!(unix_to_filetime(1_000_000 + 90 * 86_400).to_string())
        );
        assert_eq!(anna.groups, BTreeSet::from([GroupName::parse("Staff").unwrap()]));
        // Synced from AD: the cloud copy takes AD's expiry.
        let ben = &p.users[&Upn::parse("ben@x.com").unwrap()];
        assert_eq!(ben.record[PASSWORD_EXPIRY_ATTRIBUTE], json!("133000000000000000"));
        assert_eq!(p.collisions.len(), 2);
        assert_eq!(p.collisions[0], Collision { upn: "anna@x.com".into(), owner: "entra".into(), other: "ad".into() });
        assert_eq!(p.skipped.get("entra"), Some(&1));
        assert_eq!(p.skipped_groups.get("ad"), Some(&1));
    }
}
