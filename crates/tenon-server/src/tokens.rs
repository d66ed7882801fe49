//! Admin tokens (created, listed, revoked, checked on every admin request) and enrollment
//! tokens, stored only as SHA-256 hashes of their secrets.

use crate::error::{ApiError, ApiResult};
use crate::secrets;
use crate::state::*;
use crate::store::audit;
use serde_json::{json, Value};
use sqlx::Row;

impl AppState {
    /// Creates the bootstrap admin token when there is none; returns the token to write out.
    pub async fn bootstrap_admin_token(&self) -> anyhow::Result<Option<String>> {
        let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM admin_tokens WHERE revoked_at IS NULL")
            .fetch_one(&self.db)
            .await?;
        if count > 0 {
            return Ok(None);
        }
        let (token, _) = self.create_admin_token("bootstrap", &[ROLE_ADMIN, ROLE_RECOVERY_KEYS], None).await?;
        Ok(Some(token))
    }

    pub async fn create_admin_token(
        &self,
        name: &str,
        roles: &[&str],
        actor: Option<&Actor>,
    ) -> anyhow::Result<(String, String)> {
        let id = secrets::short_id();
        let cred = secrets::new_credential(secrets::ADMIN_PREFIX, &id);
        let mut tx = crate::store::begin_write(&self.db).await?;
        sqlx::query(
            "INSERT INTO admin_tokens (id, name, secret_sha256, roles, created_at, created_seq)
             VALUES ($1, $2, $3, $4, $5, (SELECT COALESCE(MAX(created_seq), 0) + 1 FROM admin_tokens))",
        )
        .bind(&id)
        .bind(name)
        .bind(&cred.secret_sha256)
        .bind(serde_json::to_string(roles)?)
        .bind(self.now())
        .execute(&mut *tx)
        .await?;
        let who = actor.map(Actor::label).unwrap_or_else(|| "server".into());
        audit(&mut tx, self.now(), &who, "admin_token.create", Some(&id), json!({"name": name, "roles": roles}))
            .await?;
        tx.commit().await?;
        Ok((cred.token, id))
    }

    /// Records a refused attempt to create a token with roles the caller does not hold.
    pub async fn audit_token_grant_denied(
        &self,
        actor: &Actor,
        name: &str,
        roles: &[&str],
        missing: &[&str],
    ) -> ApiResult<()> {
        let mut tx = crate::store::begin_write(&self.db).await?;
        audit(
            &mut tx,
            self.now(),
            &actor.label(),
            "admin_token.create_denied",
            None,
            json!({"name": name, "roles": roles, "missing_roles": missing}),
        )
        .await?;
        tx.commit().await?;
        tracing::warn!(actor = %actor.label(), missing = ?missing, "admin token creation refused: roles the caller does not hold");
        Ok(())
    }

    /// Every admin token (never its secret), oldest first.
    pub async fn list_admin_tokens(&self) -> ApiResult<Vec<Value>> {
        let rows = sqlx::query("SELECT id, name, roles, created_at, revoked_at FROM admin_tokens ORDER BY created_seq")
            .fetch_all(&self.db)
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                json!({
                    "id": r.get::<String, _>(0),
                    "name": r.get::<String, _>(1),
                    "roles": serde_json::from_str::<Value>(r.get::<&str, _>(2)).unwrap_or(Value::Null),
                    "created_at": crate::api::rfc3339(r.get(3)),
                    "revoked_at": r.get::<Option<i64>, _>(4).map(crate::api::rfc3339),
                })
            })
            .collect())
    }

    /// Revokes an admin token. The last active token with the admin role cannot be revoked: nobody
    /// could administer the server afterwards.
    pub async fn revoke_admin_token(&self, actor: &Actor, id: &str) -> ApiResult<()> {
        let now = self.now();
        let mut tx = crate::store::begin_write(&self.db).await?;
        let row = sqlx::query("SELECT name, roles, revoked_at FROM admin_tokens WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| {
                ApiError::NotFound(format!("no admin token {id}; `tenonctl admin-tokens list` shows them"))
            })?;
        if row.get::<Option<i64>, _>(2).is_some() {
            return Err(ApiError::Conflict(format!("admin token {id} is already revoked")));
        }
        let is_admin = serde_json::from_str::<Vec<String>>(row.get::<&str, _>(1))
            .unwrap_or_default()
            .iter()
            .any(|r| r == ROLE_ADMIN);
        if is_admin {
            let admins: Vec<String> = sqlx::query_scalar("SELECT roles FROM admin_tokens WHERE revoked_at IS NULL")
                .fetch_all(&mut *tx)
                .await?;
            let active_admins = admins
                .iter()
                .filter(|r| serde_json::from_str::<Vec<String>>(r).unwrap_or_default().iter().any(|r| r == ROLE_ADMIN))
                .count();
            if active_admins <= 1 {
                return Err(ApiError::Conflict(format!(
                    "admin token {id} is the last one with the {ROLE_ADMIN} role; create another before revoking it"
                )));
            }
        }
        sqlx::query("UPDATE admin_tokens SET revoked_at = $1 WHERE id = $2")
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        audit(&mut tx, now, &actor.label(), "admin_token.revoke", Some(id), json!({"name": row.get::<String, _>(0)}))
            .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn authenticate_admin(&self, token: &str) -> ApiResult<Actor> {
        let unauthorized = || {
            ApiError::Unauthorized(
                "admin token is missing or not valid; pass --token (or TENON_TOKEN) with a token such as the one in DATA_DIR/admin.token".into(),
            )
        };
        let (id, secret, rest) = secrets::split_token(token, secrets::ADMIN_PREFIX).ok_or_else(unauthorized)?;
        if rest.is_some() {
            return Err(unauthorized());
        }
        let row =
            sqlx::query("SELECT name, secret_sha256, roles FROM admin_tokens WHERE id = $1 AND revoked_at IS NULL")
                .bind(id)
                .fetch_optional(&self.db)
                .await?
                .ok_or_else(unauthorized)?;
        if !secrets::secret_matches(secret, row.get::<&str, _>(1)) {
            return Err(unauthorized());
        }
        let roles: Vec<String> = serde_json::from_str(row.get::<&str, _>(2)).unwrap_or_default();
        Ok(Actor { token_id: id.to_string(), name: row.get(0), roles })
    }

    // ---- enrollment --------------------------------------------------------------------------

    pub async fn create_enroll_token(
        &self,
        actor: &Actor,
        uses: u32,
        ttl_seconds: u64,
        pin_ca: bool,
    ) -> ApiResult<(String, i64)> {
        if uses == 0 || uses > 100_000 {
            return Err(ApiError::BadRequest("uses must be between 1 and 100000".into()));
        }
        if ttl_seconds == 0 || ttl_seconds > 366 * 24 * 3600 {
            return Err(ApiError::BadRequest("ttl must be between 1 second and 366 days".into()));
        }
        // The token tells the agent how to trust this server's TLS certificate.
        let tls_part =
            match &self.tls {
                Some(tls) => Some(tls.token_trust(pin_ca).map_err(ApiError::BadRequest)?),
                None if pin_ca => return Err(ApiError::BadRequest(
                    "--pin-ca needs a server that serves TLS; start it with --tls-cert/--tls-key or --tls-self-signed"
                        .into(),
                )),
                None => None,
            };
        let id = secrets::short_id();
        let cred = secrets::new_credential(secrets::ENROLL_PREFIX, &id);
        let now = self.now();
        let expires_at = now + ttl_seconds as i64;
        let mut tx = crate::store::begin_write(&self.db).await?;
        sqlx::query(
            "INSERT INTO enroll_tokens (id, secret_sha256, uses_total, uses_left, expires_at, created_at, created_by)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&id)
        .bind(&cred.secret_sha256)
        .bind(uses as i64)
        .bind(uses as i64)
        .bind(expires_at)
        .bind(now)
        .bind(actor.label())
        .execute(&mut *tx)
        .await?;
        audit(
            &mut tx,
            now,
            &actor.label(),
            "enroll_token.create",
            Some(&id),
            json!({"uses": uses, "expires_at": expires_at}),
        )
        .await?;
        tx.commit().await?;
        // The token carries the root key's fingerprint so the agent can pin it, and the TLS trust.
        let mut token = format!("{}.{}", cred.token, self.keys.root_fingerprint());
        if let Some(trust) = tls_part {
            token.push('.');
            token.push_str(trust.token_part());
        }
        Ok((token, expires_at))
    }
}
