//! What a directory source (Microsoft Graph, Active Directory over LDAP, an imported file) hands
//! the server after one read: users and groups in one shape whatever the directory, as a full
//! snapshot or as the changes since the source's last cursor. The readers (tenon-server's
//! `directory::graph` and `directory::ldap`) fill these types; applying them (the deletion guard,
//! UPN collisions between sources, the directory the compiler sees) is pure and lives beside them.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeSet;

/// One user as a source reports it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SourceUser {
    /// The directory's own stable id: Graph's `id`, AD's `objectGUID` as a lower-case GUID string
    /// (`xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, in the byte order AD displays it).
    pub external_id: String,
    /// The user's UPN; `None` when the directory has none (the user is skipped and counted).
    pub upn: Option<String>,
    /// Graph field names, whatever the source: `displayName`, `givenName`, `surname`,
    /// `jobTitle`, `department`, `companyName`, `mail`, `businessPhones` (an array of strings),
    /// `mobilePhone`, `faxNumber`, `officeLocation`, `streetAddress`, `city`, `postalCode`,
    /// `state`, `country`, `onPremisesExtensionAttributes` (`extensionAttribute1`..`15`), and
    /// `msDS-UserPasswordExpiryTimeComputed` (a decimal FILETIME string with AD's meaning: `0`
    /// must change now, `9223372036854775807` never) when the expiry is known. Fields the
    /// directory has no value for are absent.
    pub record: Map<String, Value>,
    /// False for a disabled account (Graph `accountEnabled: false`, AD `userAccountControl` bit 2).
    pub account_enabled: bool,
}

/// One group as a source reports it, its membership already resolved to users (nested groups
/// flattened).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SourceGroup {
    /// Graph's group `id`, AD's `objectGUID` (as for users).
    pub external_id: String,
    /// The name Tenon's settings and assignments use: Graph's `displayName`, AD's `cn`.
    pub name: String,
    /// The `external_id`s of the users in the group, directly or through nested groups.
    pub member_user_ids: BTreeSet<String>,
}

/// The outcome of one completed read. A read that fails part-way returns an error instead, never
/// a partial batch: nothing of it is applied.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SourceBatch {
    /// Everything the source has: what is not in it is gone from the source.
    Full { users: Vec<SourceUser>, groups: Vec<SourceGroup>, cursor: Option<String>, skipped_without_upn: u64 },
    /// What changed since the cursor the read was given.
    Delta {
        users_changed: Vec<SourceUser>,
        /// `external_id`s of users deleted from the source.
        users_removed: Vec<String>,
        /// Groups whose name or membership changed, each with its whole (resolved) membership.
        groups_changed: Vec<SourceGroup>,
        /// `external_id`s of groups deleted from the source.
        groups_removed: Vec<String>,
        cursor: Option<String>,
        skipped_without_upn: u64,
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
