//! The ends of things an administrator creates: enrollment tokens listed and revoked, users
//! removed, and the warning for a setting aimed at a group nobody is in yet. Each write is one
//! transaction with its audit row, like every other write in `state`.

use crate::api::rfc3339;
use crate::error::{ApiError, ApiResult};
use crate::state::{Actor, AppState};
use crate::store::audit;
use crate::store::changes::Kind;
use serde_json::{json, Value};
use sqlx::Row;
use std::collections::BTreeSet;
use tenon_core::api::SettingScope;
use tenon_core::ids::{GroupName, Upn};

/// What `users remove` did.
#[derive(Debug)]
pub struct UserRemoval {
    /// Devices whose primary user this was (now without one).
    pub cleared_primary: Vec<String>,
    /// The devices to re-sign (in the background).
    pub resign: crate::resign::Ticket,
}

impl AppState {
    /// Every enrollment token, newest first, without its secret: uses, expiry and a `state` of
    /// `active`, `expired`, `used_up` or `revoked`.
    pub async fn list_enroll_tokens(&self) -> ApiResult<Vec<Value>> {
        let now = self.now();
        let rows = sqlx::query(
            "SELECT id, uses_total, uses_left, expires_at, created_at, created_by, revoked_at
             FROM enroll_tokens ORDER BY created_at DESC, id",
        )
        .fetch_all(&self.db)
        .await?;
        Ok(rows
            .iter()
            .map(|r| {
                let (uses_left, expires_at, revoked_at) =
                    (r.get::<i64, _>(2), r.get::<i64, _>(3), r.get::<Option<i64>, _>(6));
                let state = match () {
                    _ if revoked_at.is_some() => "revoked",
                    _ if expires_at <= now => "expired",
                    _ if uses_left <= 0 => "used_up",
                    _ => "active",
                };
                json!({
                    "id": r.get::<String, _>(0),
                    "state": state,
                    "uses": r.get::<i64, _>(1),
                    "uses_left": uses_left,
                    "expires_at": rfc3339(expires_at),
                    "created_at": rfc3339(r.get(4)),
                    "created_by": r.get::<String, _>(5),
                    "revoked_at": revoked_at.map(rfc3339),
                })
            })
            .collect())
    }

    /// Revokes an enrollment token: no device can enroll with it afterwards. Devices already
    /// enrolled with it are not affected.
    pub async fn revoke_enroll_token(&self, actor: &Actor, id: &str) -> ApiResult<()> {
        let now = self.now();
        let mut tx = crate::store::begin_write(&self.db).await?;
        let revoked: Option<Option<i64>> = sqlx::query_scalar("SELECT revoked_at FROM enroll_tokens WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        match revoked {
            None => {
                return Err(ApiError::NotFound(format!(
                    "no enrollment token {id}; `tenonctl enroll-token list` shows them (the id is the part after tenr.)"
                )))
            }
            Some(Some(_)) => return Err(ApiError::Conflict(format!("enrollment token {id} is already revoked"))),
            Some(None) => {}
        }
        sqlx::query("UPDATE enroll_tokens SET revoked_at = $1 WHERE id = $2")
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        audit(&mut tx, now, &actor.label(), "enroll_token.revoke", Some(id), json!({})).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Removes a user from the directory with their user-scope settings and group memberships.
    /// A user who is the primary user of an active device is refused unless `force`, which clears
    /// the primary user of those devices. The affected devices are re-signed; until their next
    /// sync they keep the configuration they hold.
    pub async fn remove_user(&self, actor: &Actor, upn: &str, force: bool) -> ApiResult<UserRemoval> {
        let upn = Upn::parse(upn).map_err(|e| ApiError::BadRequest(e.to_string()))?;
        let mut world = self.world.write().await;
        let mut tx = self.begin_write(&mut world).await?;
        if !world.directory.users.contains_key(&upn) {
            return Err(ApiError::NotFound(format!("no user {upn}; `tenonctl users list` shows the directory")));
        }
        let mut cleared_primary: Vec<String> = world
            .devices
            .iter()
            .filter(|(_, m)| m.active && m.primary.as_ref() == Some(&upn))
            .map(|(id, _)| id.clone())
            .collect();
        cleared_primary.sort();
        if !cleared_primary.is_empty() && !force {
            return Err(ApiError::Conflict(format!(
                "{upn} is the primary user of {} device(s) ({}); give them another with `tenonctl devices set-primary ID UPN` \
                 (or --clear), or pass --force to remove the user and clear it",
                cleared_primary.len(),
                cleared_primary.join(", ")
            )));
        }
        let affected = Self::devices_of_users(&world, &BTreeSet::from([upn.clone()]));
        let now = self.now();
        sqlx::query("DELETE FROM user_groups WHERE upn = $1").bind(upn.as_str()).execute(&mut *tx).await?;
        sqlx::query("DELETE FROM users WHERE upn = $1").bind(upn.as_str()).execute(&mut *tx).await?;
        sqlx::query("DELETE FROM settings WHERE scope_kind = 'user' AND scope_name = $1")
            .bind(upn.as_str())
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE devices SET primary_user = NULL WHERE primary_user = $1")
            .bind(upn.as_str())
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM device_users WHERE upn = $1").bind(upn.as_str()).execute(&mut *tx).await?;
        audit(
            &mut tx,
            now,
            &actor.label(),
            "users.remove",
            Some(upn.as_str()),
            json!({"cleared_primary": cleared_primary, "devices": affected.len()}),
        )
        .await?;
        self.note(&mut tx, Kind::Directory, [""]).await?;
        self.note(&mut tx, Kind::Device, affected.iter().map(String::as_str)).await?;
        tx.commit().await?;
        world.directory_mut().users.remove(&upn);
        for meta in world.devices.values_mut() {
            let was_primary = meta.primary.as_ref() == Some(&upn);
            if was_primary {
                meta.primary = None;
            }
            if meta.users.remove(&upn) || was_primary {
                meta.refresh_key();
            }
        }
        let resign = self.resign.enqueue(affected);
        Ok(UserRemoval { cleared_primary, resign })
    }

    /// Stored settings the schema does not declare (written before the schema existed, or by a
    /// newer version): still delivered as stored, so the server says so at startup.
    pub async fn log_undeclared_settings(&self) {
        let world = self.world.read().await;
        let scopes = std::iter::once(("tenant".to_string(), &world.directory.tenant))
            .chain(world.directory.groups.iter().map(|(g, grp)| (format!("group {g}"), &grp.settings)))
            .chain(world.directory.users.iter().map(|(u, user)| (format!("user {u}"), &user.settings)));
        for (scope, settings) in scopes {
            for (key, value) in settings {
                if let Err(e) = tenon_core::schema::validate(key, value) {
                    tracing::warn!(
                        scope = %scope,
                        key = %key,
                        "stored setting is not valid now: {e}; remove it with `tenonctl settings unset` or move it under Custom.*"
                    );
                }
            }
        }
    }

    /// A warning when `scope` is a group (other than "All Users") that no user belongs to yet:
    /// the setting is stored, but reaches nobody until users join it.
    pub async fn empty_group_warning(&self, scope: &SettingScope) -> Option<String> {
        let SettingScope::Group(g) = scope else { return None };
        let g = GroupName::parse(g).ok()?;
        if g.is_all_users() {
            return None;
        }
        let world = self.world.read().await;
        let members = world.directory.users.values().filter(|u| u.groups.contains(&g)).count();
        (members == 0).then(|| {
            format!(
                "no user is in group {g} yet: the setting is stored but reaches nobody until users join it; \
                 check the name with `tenonctl users list`"
            )
        })
    }
}
