//! Directory sources: the organisation's users and groups read from Microsoft Graph (Entra ID),
//! Active Directory over LDAP, or an imported file, kept in sync on an interval. Each reader
//! (`graph`, `ldap`) turns one read of its directory into a `tenon_core::dirsync::SourceBatch`;
//! applying a batch (deletion guard, UPN ownership, the projection the compiler sees) is pure and
//! lives in tenon-core.

pub mod graph;

use tenon_core::dirsync::SyncProgress;

/// Called by a reader after every page it read, with the running totals.
pub type Progress<'a> = &'a (dyn Fn(SyncProgress) + Send + Sync);

pub mod ldap;
