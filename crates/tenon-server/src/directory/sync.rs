//! One sync of one source: read it (no lock held), apply the batch to what the server holds of
//! it, let the deletion guard decide, merge every source into the users the compiler reads, write
//! it all in one transaction, and re-sign only the devices of users whose data changed. A read
//! that fails changes nothing but the source's status.

use super::sources::{open_secret, SourceConfig, SourceRow, LDAP_FULL_EVERY_SECS};
use super::Progress;
use crate::error::ApiError;
use crate::state::AppState;
use crate::store::audit;
use crate::store::changes::Kind;
use serde::Serialize;
use serde_json::{json, Value};
use sqlx::Row;
use std::collections::{BTreeMap, BTreeSet};
use tenon_core::directory::{Directory, User};
use tenon_core::dirsync::{
    project, DeletionGuard, HeldGroup, HeldUser, Projection, SourceBatch, SourceError, SourceErrorKind, SourceState,
};
use tenon_core::ids::{GroupName, Upn};

/// What a completed sync did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SyncReport {
    pub source: String,
    /// `full` or `delta`.
    pub read: &'static str,
    pub users: usize,
    pub groups: usize,
    /// Directory users whose data the compiler sees changed (added, changed or removed).
    pub users_changed: usize,
    pub users_removed: usize,
    /// Removals the deletion guard holds until `directory sync NAME --accept-deletions`.
    pub held_deletions: usize,
    pub skipped_without_upn: u64,
    pub collisions: usize,
    pub devices_resigned: usize,
    /// The re-signing run that carries the change to those devices (`GET /admin/resign`).
    pub resign_generation: Option<u64>,
    pub seconds: f64,
}

/// Why a sync did not complete; nothing of it was applied.
#[derive(Clone, Debug, Serialize)]
pub struct SyncFailure {
    pub kind: SourceErrorKind,
    pub message: String,
}

impl From<SourceError> for SyncFailure {
    fn from(e: SourceError) -> Self {
        Self { kind: e.kind, message: e.message }
    }
}

impl From<ApiError> for SyncFailure {
    fn from(e: ApiError) -> Self {
        let message = match &e {
            ApiError::Internal(inner) => {
                tracing::error!(error = format!("{inner:#}"), "directory sync failed inside the server");
                "the server failed while applying the sync (see its log); nothing was changed".to_string()
            }
            other => other.to_string(),
        };
        Self { kind: SourceErrorKind::Other, message }
    }
}

/// Drops what the directory said of a user; settings an administrator gave it stay.
pub(crate) fn forget_directory_data(dir: &mut Directory, upn: &Upn) {
    let keep = dir.users.get(upn).is_some_and(|u| !u.settings.is_empty());
    if keep {
        if let Some(u) = dir.users.get_mut(upn) {
            u.id = None;
            u.record = Value::Null;
            u.groups.clear();
            u.source = None;
        }
    } else {
        dir.users.remove(upn);
    }
}

fn parse_rfc3339(s: &str) -> Option<i64> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok().map(|t| t.unix_timestamp())
}

/// Every source's held state, in the order the sources were added.
async fn load_states(conn: &mut crate::store::Conn) -> anyhow::Result<Vec<(String, SourceState)>> {
    let names: Vec<String> =
        sqlx::query_scalar("SELECT name FROM directory_sources ORDER BY created_seq").fetch_all(&mut *conn).await?;
    let mut states: BTreeMap<String, SourceState> = names.iter().map(|n| (n.clone(), SourceState::default())).collect();
    let rows =
        sqlx::query("SELECT source, kind, external_id, data FROM directory_objects").fetch_all(&mut *conn).await?;
    for row in rows {
        let (source, kind, id, data): (String, String, String, String) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        let Some(state) = states.get_mut(&source) else { continue };
        if kind == "user" {
            let u: HeldUser = serde_json::from_str(&data)?;
            state.users.insert(id, u);
        } else if kind == "group" {
            let g: HeldGroup = serde_json::from_str(&data)?;
            state.groups.insert(id, g);
        } else if kind == "meta" {
            let v: BTreeMap<String, u32> = serde_json::from_str(&data)?;
            state.password_validity_days = v;
        }
    }
    Ok(names
        .into_iter()
        .map(|n| {
            let s = states.remove(&n).unwrap_or_default();
            (n, s)
        })
        .collect())
}

impl AppState {
    /// Reads one source and applies what it read. `actor`: who asked (`schedule` for the
    /// server's own runs). Holds the server's directory sync lock for the whole run.
    pub async fn sync_source(
        &self,
        actor: &str,
        name: &str,
        accept_deletions: bool,
        progress: Progress<'_>,
    ) -> Result<SyncReport, SyncFailure> {
        let _one_at_a_time = self.directory_sync.lock().await;
        let started = std::time::Instant::now();
        let source = self.load_source(name).await?;
        let now = self.now();
        // LDAP sees no deletions incrementally: a full read every day catches them.
        let full_due = matches!(source.config, SourceConfig::Ldap { .. })
            && source.last_full_at.is_none_or(|t| now - t >= LDAP_FULL_EVERY_SECS);
        let cursor = if full_due { None } else { source.cursor.clone() };
        let read = match self.read_source(&source, cursor.as_deref(), progress).await {
            Err(e) if e.kind == SourceErrorKind::CursorExpired && cursor.is_some() => {
                tracing::info!(source = name, reason = %e.message, "the source's cursor expired; reading it whole");
                self.read_source(&source, None, progress).await
            }
            other => other,
        };
        let batch = match read {
            Ok(b) => b,
            Err(e) => {
                self.record_failure(name, &e.message).await;
                tracing::warn!(source = name, kind = ?e.kind, error = %e.message, "directory sync failed; nothing changed");
                return Err(e.into());
            }
        };
        let applied = self.apply_batch(actor, &source, batch, accept_deletions).await;
        // A sync of a large directory allocates as much as it holds, and frees it all.
        crate::release_free_memory();
        match applied {
            Ok(mut report) => {
                report.seconds = started.elapsed().as_secs_f64();
                tracing::info!(
                    source = name,
                    read = report.read,
                    users = report.users,
                    changed = report.users_changed,
                    held = report.held_deletions,
                    devices = report.devices_resigned,
                    seconds = report.seconds,
                    "directory sync applied"
                );
                Ok(report)
            }
            Err(e) => {
                // Another server's sync of the same source got there first: not the source's fault.
                let raced = matches!(e, ApiError::Conflict(_));
                let failure = SyncFailure::from(e);
                if !raced {
                    self.record_failure(name, &failure.message).await;
                }
                Err(failure)
            }
        }
    }

    async fn read_source(
        &self,
        source: &SourceRow,
        cursor: Option<&str>,
        progress: Progress<'_>,
    ) -> Result<SourceBatch, SourceError> {
        let secret = match &source.sealed_secret {
            Some(sealed) => Some(
                open_secret(&self.keys.escrow, &source.name, sealed)
                    .map_err(|m| SourceError::new(SourceErrorKind::Credentials, m))?,
            ),
            None => None,
        };
        match &source.config {
            SourceConfig::Graph { .. } => {
                let reader = self.graph_reader(source, secret.as_deref().map(String::as_str).unwrap_or_default())?;
                reader.read(cursor, progress).await
            }
            SourceConfig::Ldap { url, bind_dn, base_dn, ca_pem, allow_plain_ldap } => {
                let config = super::ldap::LdapConfig {
                    url: url.clone(),
                    bind_dn: bind_dn.clone(),
                    base_dn: base_dn.clone(),
                    ca_pem: ca_pem.as_ref().map(|p| p.as_bytes().to_vec()),
                    allow_plain_ldap: *allow_plain_ldap,
                };
                config.check()?;
                super::ldap::read(&config, secret.as_deref().map(String::as_str), cursor, progress).await
            }
        }
    }

    async fn record_failure(&self, name: &str, message: &str) {
        let now = self.now();
        let r = sqlx::query("UPDATE directory_sources SET last_run_at = $1, last_error = $2 WHERE name = $3")
            .bind(now)
            .bind(message)
            .bind(name)
            .execute(&self.db)
            .await;
        if let Err(e) = r {
            tracing::warn!(source = name, error = %e, "cannot record the failed directory sync");
        }
    }

    async fn apply_batch(
        &self,
        actor: &str,
        source: &SourceRow,
        batch: SourceBatch,
        accept_deletions: bool,
    ) -> Result<SyncReport, ApiError> {
        let name = source.name.as_str();
        let (read_kind, new_cursor) = match &batch {
            SourceBatch::Full { cursor, .. } => ("full", cursor.clone()),
            SourceBatch::Delta { cursor, .. } => ("delta", cursor.clone()),
        };
        let mut world = self.world.write().await;
        let now = self.now();
        let mut tx = self.begin_write(&mut world).await?;
        // Another server may have synced this source since it was read here: its cursor moved.
        let stored_cursor: Option<Option<String>> =
            sqlx::query_scalar("SELECT cursor FROM directory_sources WHERE name = $1")
                .bind(name)
                .fetch_optional(&mut *tx)
                .await?;
        match stored_cursor {
            None => return Err(ApiError::NotFound(format!("directory source {name} was removed during the sync"))),
            Some(c) if c != source.cursor => {
                return Err(ApiError::Conflict(format!(
                    "another server synced {name} meanwhile; nothing was changed (run the sync again if needed)"
                )))
            }
            Some(_) => {}
        }
        let mut states = load_states(&mut tx).await.map_err(ApiError::Internal)?;
        let Some(idx) = states.iter().position(|(n, _)| n == name) else {
            return Err(ApiError::NotFound(format!("directory source {name} was removed during the sync")));
        };
        let state = &mut states[idx].1;
        let before = state.user_count();
        let applied = state
            .apply(batch)
            .map_err(|e| ApiError::BadRequest(format!("the sync of {name} was refused: {e}; nothing was changed")))?;
        // The deletion guard. Users it held before stay held until they come back or an
        // administrator accepts; they are still in `state` (a delta read does not name them again).
        let mut held: BTreeSet<String> = source
            .held_deletions
            .iter()
            .filter(|id| !applied.users_touched.contains(*id) && state.users.contains_key(*id))
            .cloned()
            .collect();
        let removed_with_upn = applied.users_removed.values().filter(|u| u.upn.is_some()).count();
        let pending = removed_with_upn + held.iter().filter(|id| !applied.users_removed.contains_key(*id)).count();
        let mut removed = applied.users_removed.clone();
        if accept_deletions {
            for id in std::mem::take(&mut held) {
                if let Some(u) = state.users.remove(&id) {
                    removed.insert(id, u);
                }
            }
        } else if DeletionGuard::default().holds(before, pending) {
            let (keep, gone): (BTreeMap<_, _>, BTreeMap<_, _>) =
                std::mem::take(&mut removed).into_iter().partition(|(_, u)| u.upn.is_some());
            for (id, u) in keep {
                held.insert(id.clone());
                state.users.insert(id, u);
            }
            removed = gone;
        }
        // Graph drops a deleted user from its groups without saying so: the memberships of users
        // removed for good go here (a held user keeps them, so its devices keep their config).
        let mut groups_touched = applied.groups_touched.clone();
        if !removed.is_empty() {
            for (gid, g) in state.groups.iter_mut() {
                let before = g.members.users.len();
                g.members.users.retain(|u| !removed.contains_key(u));
                if g.members.users.len() != before {
                    groups_touched.insert(gid.clone());
                }
            }
        }
        let state = &states[idx].1;
        let users_total = state.user_count();
        let groups_total = state.groups.len();
        let meta = serde_json::to_string(&state.password_validity_days).map_err(|e| ApiError::Internal(e.into()))?;
        // What changed of this source's state, each row serialized as it is written (a first
        // read of a large directory touches every object).
        for id in &applied.users_touched {
            if let Some(u) = state.users.get(id) {
                let data = serde_json::to_string(u).map_err(|e| ApiError::Internal(e.into()))?;
                upsert_object(&mut tx, name, "user", id, &data).await?;
            }
        }
        for id in &groups_touched {
            if let Some(g) = state.groups.get(id) {
                let data = serde_json::to_string(g).map_err(|e| ApiError::Internal(e.into()))?;
                upsert_object(&mut tx, name, "group", id, &data).await?;
            }
        }
        upsert_object(&mut tx, name, "meta", "password_validity_days", &meta).await?;
        for id in removed.keys() {
            sqlx::query("DELETE FROM directory_objects WHERE source = $1 AND kind = 'user' AND external_id = $2")
                .bind(name)
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        for id in &applied.groups_removed {
            sqlx::query("DELETE FROM directory_objects WHERE source = $1 AND kind = 'group' AND external_id = $2")
                .bind(name)
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        let source_names: Vec<String> = states.iter().map(|(n, _)| n.clone()).collect();
        let mut projection = project(states, &parse_rfc3339);
        // Users imported from a file were there first: they keep their UPN.
        let mut file_collisions = Vec::new();
        projection.users.retain(|upn, p| {
            let file_owned = world.directory.users.get(upn).is_some_and(|u| u.source.is_none() && !u.record.is_null());
            if file_owned {
                file_collisions.push(json!({"upn": upn, "owner": super::sources::FILE_SOURCE, "other": p.source}));
            }
            !file_owned
        });
        let changes = diff(&world.directory, &projection);
        for upn in &changes.removed {
            sqlx::query("DELETE FROM user_groups WHERE upn = $1").bind(upn.as_str()).execute(&mut *tx).await?;
            sqlx::query("DELETE FROM users WHERE upn = $1").bind(upn.as_str()).execute(&mut *tx).await?;
        }
        let mut new_groups: BTreeSet<GroupName> = BTreeSet::new();
        for upn in &changes.changed {
            let p = &projection.users[upn];
            let record = Value::Object(p.record.clone()).to_string();
            sqlx::query(
                "INSERT INTO users (upn, id, record, updated_at, source) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (upn) DO UPDATE SET id = excluded.id, record = excluded.record,
                     updated_at = excluded.updated_at, source = excluded.source",
            )
            .bind(upn.as_str())
            .bind(&p.external_id)
            .bind(record)
            .bind(now)
            .bind(&p.source)
            .execute(&mut *tx)
            .await?;
            let known = &world.directory.groups;
            crate::store::directory::write_memberships(&mut tx, upn.as_str(), &p.groups, |g| {
                !known.contains_key(g) && new_groups.insert(g.clone())
            })
            .await?;
        }
        // Each source's status: its own counts, and the UPNs another source owns.
        let mut collisions: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
        for c in &projection.collisions {
            collisions.entry(c.other.as_str()).or_default().push(json!(c));
        }
        for c in &file_collisions {
            if let Some(other) = c["other"].as_str() {
                collisions.entry(other).or_default().push(c.clone());
            }
        }
        for n in &source_names {
            let list = collisions.get(n.as_str()).cloned().unwrap_or_default();
            sqlx::query("UPDATE directory_sources SET collisions = $1 WHERE name = $2")
                .bind(Value::Array(list).to_string())
                .bind(n)
                .execute(&mut *tx)
                .await?;
        }
        let skipped = projection.skipped.get(name).copied().unwrap_or(0);
        sqlx::query(
            "UPDATE directory_sources SET cursor = $1, last_full_at = COALESCE($2, last_full_at), last_run_at = $3,
                 last_success_at = $3, last_error = NULL, users = $4, groups = $5, skipped = $6, held_deletions = $7
             WHERE name = $8",
        )
        .bind(&new_cursor)
        .bind((read_kind == "full").then_some(now))
        .bind(now)
        .bind(users_total as i64)
        .bind(groups_total as i64)
        .bind(skipped as i64)
        .bind(serde_json::to_string(&held).map_err(|e| ApiError::Internal(e.into()))?)
        .bind(name)
        .execute(&mut *tx)
        .await?;
        let touched: BTreeSet<Upn> = changes.changed.iter().chain(&changes.removed).cloned().collect();
        audit(
            &mut tx,
            now,
            actor,
            "directory.sync",
            Some(name),
            json!({
                "read": read_kind, "users": users_total, "groups": groups_total,
                "users_changed": changes.changed.len(), "users_removed": changes.removed.len(),
                "held_deletions": held.len(), "accepted_deletions": accept_deletions,
            }),
        )
        .await?;
        if !touched.is_empty() {
            self.note(&mut tx, Kind::Directory, [""]).await?;
        }
        tx.commit().await?;
        let mut report = SyncReport {
            source: name.to_string(),
            read: read_kind,
            users: users_total,
            groups: groups_total,
            users_changed: changes.changed.len(),
            users_removed: changes.removed.len(),
            held_deletions: held.len(),
            skipped_without_upn: skipped,
            collisions: collisions.get(name).map_or(0, Vec::len),
            ..Default::default()
        };
        if touched.is_empty() {
            return Ok(report);
        }
        let dir = world.directory_mut();
        for upn in &changes.removed {
            forget_directory_data(dir, upn);
        }
        for upn in &changes.changed {
            let Some(p) = projection.users.remove(upn) else { continue };
            for g in &p.groups {
                dir.groups.entry(g.clone()).or_default();
            }
            let entry = dir.users.entry(upn.clone()).or_insert_with(User::default);
            entry.id = Some(p.external_id);
            entry.record = Value::Object(p.record);
            entry.groups = p.groups;
            entry.source = Some(p.source);
        }
        let ids = Self::devices_of_users(&world, &touched);
        let ticket = self.resign.enqueue(ids);
        report.devices_resigned = ticket.devices;
        report.resign_generation = Some(ticket.generation);
        Ok(report)
    }
}

async fn upsert_object(tx: &mut crate::store::Tx, source: &str, kind: &str, id: &str, data: &str) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO directory_objects (source, kind, external_id, data) VALUES ($1, $2, $3, $4)
         ON CONFLICT (source, kind, external_id) DO UPDATE SET data = excluded.data",
    )
    .bind(source)
    .bind(kind)
    .bind(id)
    .bind(data)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Which users the compiler's directory must change to match the projection.
#[derive(Debug, Default, PartialEq)]
struct UserChanges {
    /// Added, or their record, id, groups or owner differ.
    changed: Vec<Upn>,
    /// Owned by a directory source before, in no source now.
    removed: Vec<Upn>,
}

fn diff(current: &Directory, projection: &Projection) -> UserChanges {
    let mut out = UserChanges::default();
    for (upn, p) in &projection.users {
        let same = current.users.get(upn).is_some_and(|u| {
            u.source.as_deref() == Some(p.source.as_str())
                && u.id.as_deref() == Some(p.external_id.as_str())
                && u.groups == p.groups
                && u.record.as_object() == Some(&p.record)
        });
        if !same {
            out.changed.push(upn.clone());
        }
    }
    for (upn, u) in &current.users {
        if u.source.is_some() && !projection.users.contains_key(upn) {
            out.removed.push(upn.clone());
        }
    }
    out.removed.sort();
    out
}
