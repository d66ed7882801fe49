//! Settings at tenant, group and user scope, group priorities and the user import: each write
//! is checked against the settings schema, stored with its audit row and changes note, then
//! applied to the in-memory directory and queued for the re-signer.

use crate::error::{ApiError, ApiResult};
use crate::resign::Ticket;
use crate::state::*;
use crate::store::audit;
use crate::store::changes::Kind;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use tenon_core::api::SettingScope;
use tenon_core::directory::{Directory, Group, User};
use tenon_core::ids::{GroupName, SettingKey, Upn};
use tenon_core::settings::{ScopeSettings, SettingValue};

impl AppState {
    pub async fn set_setting(
        &self,
        actor: &Actor,
        scope: &SettingScope,
        key: &str,
        value: SettingValue,
    ) -> ApiResult<Ticket> {
        self.write_setting(actor, scope, key, Some(value)).await
    }

    pub async fn unset_setting(&self, actor: &Actor, scope: &SettingScope, key: &str) -> ApiResult<Ticket> {
        self.write_setting(actor, scope, key, None).await
    }

    /// Sets (`Some`) or removes (`None`) one key at one scope, audited, then re-signs the devices
    /// the scope reaches.
    async fn write_setting(
        &self,
        actor: &Actor,
        scope: &SettingScope,
        key: &str,
        value: Option<SettingValue>,
    ) -> ApiResult<Ticket> {
        let key = SettingKey::parse(key).map_err(|e| ApiError::BadRequest(e.to_string()))?;
        // Removing needs no schema check: a key an older version stored must stay removable.
        if let Some(v) = &value {
            let tenant_wide = match scope {
                SettingScope::Tenant => true,
                SettingScope::Group(g) => GroupName::parse(g).is_ok_and(|g| g.is_all_users()),
                SettingScope::User(_) => false,
            };
            tenon_core::schema::validate_at(&key, v, tenant_wide)?;
        }
        let mut world = self.world.write().await;
        let (kind, name) = self.check_scope(&world, scope)?;
        let now = self.now();
        let mut tx = self.begin_write(&mut world).await?;
        match &value {
            Some(value) => {
                if let SettingScope::Group(g) = scope {
                    sqlx::query("INSERT INTO groups (name) VALUES ($1) ON CONFLICT (name) DO NOTHING")
                        .bind(g)
                        .execute(&mut *tx)
                        .await?;
                }
                sqlx::query(
                    "INSERT INTO settings (scope_kind, scope_name, key, value, updated_at) VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (scope_kind, scope_name, key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                )
                .bind(kind)
                .bind(&name)
                .bind(key.as_str())
                .bind(value.to_text())
                .bind(now)
                .execute(&mut *tx)
                .await?;
                let details = json!({"key": key, "value": value.to_text()});
                audit(&mut tx, now, &actor.label(), "settings.set", Some(&scope_label(scope)), details).await?;
            }
            None => {
                let done = sqlx::query("DELETE FROM settings WHERE scope_kind = $1 AND scope_name = $2 AND key = $3")
                    .bind(kind)
                    .bind(&name)
                    .bind(key.as_str())
                    .execute(&mut *tx)
                    .await?;
                if done.rows_affected() == 0 {
                    return Err(ApiError::NotFound(format!(
                        "{} has no setting {key}; `tenonctl settings list` shows what is set",
                        scope_label(scope)
                    )));
                }
                let details = json!({"key": key});
                audit(&mut tx, now, &actor.label(), "settings.unset", Some(&scope_label(scope)), details).await?;
            }
        }
        self.note(&mut tx, Kind::Directory, [""]).await?;
        tx.commit().await?;
        let settings = scope_settings_mut(world.directory_mut(), scope)?;
        match value {
            Some(v) => settings.insert(key, v),
            None => settings.remove(&key),
        };
        let ids = Self::devices_for_scope(&world, scope);
        Ok(self.resign.enqueue(ids))
    }

    fn check_scope(&self, world: &World, scope: &SettingScope) -> ApiResult<(&'static str, String)> {
        Ok(match scope {
            SettingScope::Tenant => ("tenant", String::new()),
            SettingScope::Group(g) => {
                ("group", GroupName::parse(g).map_err(|e| ApiError::BadRequest(e.to_string()))?.to_string())
            }
            SettingScope::User(u) => {
                let upn = Upn::parse(u).map_err(|e| ApiError::BadRequest(e.to_string()))?;
                if !world.directory.users.contains_key(&upn) {
                    return Err(ApiError::NotFound(format!(
                        "no user {upn} in the directory; import it first with `tenonctl users import FILE`"
                    )));
                }
                ("user", upn.to_string())
            }
        })
    }

    pub async fn list_settings(&self, scope: Option<&SettingScope>) -> ApiResult<Vec<Value>> {
        let world = self.world.read().await;
        let mut out = Vec::new();
        let mut push = |scope: SettingScope, settings: &ScopeSettings| {
            for (k, v) in settings {
                out.push(json!({"scope": scope, "key": k, "value": v.to_text()}));
            }
        };
        let wanted = |s: &SettingScope| scope.is_none_or(|w| w == s);
        if wanted(&SettingScope::Tenant) {
            push(SettingScope::Tenant, &world.directory.tenant);
        }
        for (g, grp) in &world.directory.groups {
            let s = SettingScope::Group(g.to_string());
            if wanted(&s) {
                push(s, &grp.settings);
            }
        }
        let mut users: Vec<_> = world.directory.users.iter().collect();
        users.sort_by(|a, b| a.0.cmp(b.0));
        for (u, user) in users {
            let s = SettingScope::User(u.to_string());
            if wanted(&s) {
                push(s, &user.settings);
            }
        }
        Ok(out)
    }

    pub async fn set_group_priority(&self, actor: &Actor, group: &str, priority: i64) -> ApiResult<Ticket> {
        let g = GroupName::parse(group).map_err(|e| ApiError::BadRequest(e.to_string()))?;
        let mut world = self.world.write().await;
        let now = self.now();
        let mut tx = self.begin_write(&mut world).await?;
        sqlx::query("INSERT INTO groups (name, priority) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET priority = excluded.priority")
            .bind(g.as_str())
            .bind(priority)
            .execute(&mut *tx)
            .await?;
        audit(&mut tx, now, &actor.label(), "groups.set_priority", Some(g.as_str()), json!({"priority": priority}))
            .await?;
        self.note(&mut tx, Kind::Directory, [""]).await?;
        tx.commit().await?;
        world.directory_mut().groups.entry(g.clone()).or_default().priority = priority;
        let ids = Self::devices_for_scope(&world, &SettingScope::Group(g.to_string()));
        Ok(self.resign.enqueue(ids))
    }

    /// Imports Graph-shaped users; each needs `userPrincipalName`, may carry `groups: [names]`.
    /// Takes the request's users by value: each record moves into the directory instead of being
    /// copied, so an import of N users holds one copy of them, not two.
    pub async fn import_users(&self, actor: &Actor, users: Vec<Value>) -> ApiResult<(usize, usize, Ticket)> {
        let mut parsed = Vec::with_capacity(users.len());
        for (i, u) in users.into_iter().enumerate() {
            let Value::Object(mut obj) = u else {
                return Err(ApiError::BadRequest(format!("user #{i} is not a JSON object")));
            };
            let upn_raw = obj.get("userPrincipalName").and_then(Value::as_str).ok_or_else(|| {
                ApiError::BadRequest(format!("user #{i} has no \"userPrincipalName\" string; every user needs one"))
            })?;
            let upn = Upn::parse(upn_raw).map_err(|e| ApiError::BadRequest(format!("user #{i}: {e}")))?;
            let groups = match obj.get("groups") {
                None | Some(Value::Null) => BTreeSet::new(),
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|g| {
                        g.as_str()
                            .ok_or_else(|| {
                                ApiError::BadRequest(format!("user {upn}: groups must be an array of names"))
                            })
                            .and_then(|g| {
                                GroupName::parse(g).map_err(|e| ApiError::BadRequest(format!("user {upn}: {e}")))
                            })
                    })
                    .collect::<ApiResult<BTreeSet<_>>>()?,
                Some(_) => return Err(ApiError::BadRequest(format!("user {upn}: groups must be an array of names"))),
            };
            let id = match obj.get("id") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(_) => return Err(ApiError::BadRequest(format!("user {upn}: id must be a string"))),
            };
            obj.remove("groups");
            parsed.push((upn, id, Value::Object(obj), groups));
        }
        let mut world = self.world.write().await;
        // A user a directory source owns changes there, not through a file.
        let owned: Vec<String> = parsed
            .iter()
            .filter_map(|(upn, ..)| {
                let source = world.directory.users.get(upn)?.source.as_deref()?;
                Some(format!("{upn} ({source})"))
            })
            .collect();
        if !owned.is_empty() {
            return Err(ApiError::Conflict(format!(
                "{} user(s) in the file belong to a directory source, where they change: {}{}; leave them out of the file",
                owned.len(),
                owned.iter().take(5).cloned().collect::<Vec<_>>().join(", "),
                if owned.len() > 5 { ", ..." } else { "" }
            )));
        }
        let now = self.now();
        let mut tx = self.begin_write(&mut world).await?;
        let (mut created, mut updated) = (0, 0);
        let mut touched = BTreeSet::new();
        for (upn, id, record, groups) in &parsed {
            if world.directory.users.get(upn).is_some_and(|u| u.id.is_some() || !u.record.is_null()) {
                updated += 1;
            } else {
                created += 1;
            }
            sqlx::query(
                "INSERT INTO users (upn, id, record, updated_at) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (upn) DO UPDATE SET id = excluded.id, record = excluded.record, updated_at = excluded.updated_at",
            )
            .bind(upn.as_str())
            .bind(id)
            .bind(record.to_string())
            .bind(now)
            .execute(&mut *tx)
            .await?;
            crate::store::directory::write_memberships(&mut tx, upn.as_str(), groups, |_| true).await?;
            touched.insert(upn.clone());
        }
        audit(&mut tx, now, &actor.label(), "users.import", None, json!({"created": created, "updated": updated}))
            .await?;
        self.note(&mut tx, Kind::Directory, [""]).await?;
        tx.commit().await?;
        let directory = world.directory_mut();
        for (upn, id, record, groups) in parsed {
            for g in &groups {
                directory.groups.entry(g.clone()).or_insert_with(Group::default);
            }
            let entry = directory.users.entry(upn).or_insert_with(User::default);
            entry.id = id;
            entry.record = record;
            entry.groups = groups;
        }
        let ids = Self::devices_of_users(&world, &touched);
        Ok((created, updated, self.resign.enqueue(ids)))
    }
}

fn scope_label(scope: &SettingScope) -> String {
    match scope {
        SettingScope::Tenant => "tenant".into(),
        SettingScope::Group(g) => format!("group {g}"),
        SettingScope::User(u) => format!("user {u}"),
    }
}

fn scope_settings_mut<'d>(dir: &'d mut Directory, scope: &SettingScope) -> ApiResult<&'d mut ScopeSettings> {
    Ok(match scope {
        SettingScope::Tenant => &mut dir.tenant,
        SettingScope::Group(g) => {
            &mut dir
                .groups
                .entry(GroupName::parse(g).map_err(|e| ApiError::BadRequest(e.to_string()))?)
                .or_default()
                .settings
        }
        SettingScope::User(u) => {
            &mut dir.users.entry(Upn::parse(u).map_err(|e| ApiError::BadRequest(e.to_string()))?).or_default().settings
        }
    })
}
