//! What a directory source (Microsoft Graph, Active Directory over LDAP, an imported file) hands
//! the server after one read: users and groups in one shape whatever the directory, as a full
//! snapshot or as the changes since the source's last cursor. The readers (tenon-server's
//! `directory::graph` and `directory::ldap`) fill these types; applying them (the deletion guard,
//! UPN collisions between sources, the directory the compiler sees) is pure and lives beside them.

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
