//! Portal sessions: what a browser holds once an administrator pasted an admin token.
//!
//! The cookie carries a random 32-byte session id (base64url); the database keeps only its
//! SHA-256 (`portal_sessions.id_sha256`), with the admin token it stands for, an idle expiry
//! (`last_seen_at + idle_secs`) and an absolute one (`expires_at`). Every request reads the
//! session joined with its admin token, by primary key: one indexed query, like the API's own
//! token check, so a revoked token ends its sessions at the next request on every server of a
//! database (no cache to go stale). `last_seen_at` is written at most once a minute (or a tenth
//! of the idle time), so browsing does not become a stream of writes; a session may therefore
//! end up to that much before its idle time, never after.

use super::security::csrf_token;
use super::Portal;
use crate::error::ApiError;
use crate::state::{Actor, ROLE_ADMIN};
use crate::store::audit;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Redirect, Response};
use base64::Engine;
use serde_json::json;
use sha2::{Digest, Sha256};
use sqlx::Row;
use std::net::IpAddr;
use std::sync::Arc;

/// The cookie's name without TLS. Under TLS: `__Host-` prefixed (see [`Portal::tls`]).
const COOKIE: &str = "tenon_session";
const COOKIE_TLS: &str = "__Host-tenon_session";

/// A signed-in administrator's session, as the request presented it.
pub struct Session {
    /// The raw id from the cookie: the CSRF token is derived from it. Never logged or shown.
    id: [u8; 32],
    id_sha256: String,
    pub actor: Actor,
}

impl Session {
    /// The token every form of this session carries.
    pub fn csrf(&self) -> String {
        csrf_token(&self.id)
    }

    pub fn raw_id(&self) -> &[u8; 32] {
        &self.id
    }
}

/// Why a request has no session: said on the sign-in page it is sent to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoSession {
    /// No cookie, or one that names no session (signed out, or never valid).
    Missing,
    Expired,
    /// The session's admin token was revoked.
    Revoked,
}

impl NoSession {
    /// The `why` of `/signin?why=...` (a fixed word, never a secret).
    pub fn word(self) -> &'static str {
        match self {
            NoSession::Missing => "signin",
            NoSession::Expired => "expired",
            NoSession::Revoked => "revoked",
        }
    }
}

fn hash_id(id: &[u8; 32]) -> String {
    hex::encode(Sha256::digest(id))
}

/// The session id in the request's cookie, if one parses.
fn cookie_id(headers: &HeaderMap, name: &str) -> Option<[u8; 32]> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .and_then(|(_, v)| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(v.trim()).ok())
        .and_then(|b| b.try_into().ok())
}

impl Portal {
    fn cookie_name(&self) -> &'static str {
        if self.tls() {
            COOKIE_TLS
        } else {
            COOKIE
        }
    }

    /// `Set-Cookie` for a new session. No `Max-Age`: the cookie ends with the browser, and the
    /// server ends the session at its expiry anyway.
    pub(super) fn session_cookie(&self, id: &[u8; 32]) -> HeaderValue {
        let value = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(id);
        let secure = if self.tls() { "; Secure" } else { "" };
        let cookie = format!("{}={value}; Path=/; HttpOnly; SameSite=Strict{secure}", self.cookie_name());
        HeaderValue::from_str(&cookie).unwrap_or_else(|_| HeaderValue::from_static(""))
    }

    /// `Set-Cookie` that removes the session cookie.
    pub(super) fn cleared_cookie(&self) -> HeaderValue {
        let secure = if self.tls() { "; Secure" } else { "" };
        let cookie = format!("{}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{secure}", self.cookie_name());
        HeaderValue::from_str(&cookie).unwrap_or_else(|_| HeaderValue::from_static(""))
    }

    /// Stores a new session for `actor`; returns its id for the cookie.
    pub(super) async fn create_session(&self, actor: &Actor, source: Option<IpAddr>) -> Result<[u8; 32], ApiError> {
        let mut id = [0u8; 32];
        getrandom::fill(&mut id).map_err(|e| ApiError::Internal(anyhow::anyhow!("no randomness: {e}")))?;
        let now = self.app.now();
        let idle = self.opts.session_idle.as_secs() as i64;
        let expires_at = now.saturating_add(self.opts.session_max.as_secs() as i64);
        let mut tx = crate::store::begin_write(&self.app.db).await?;
        // Ended sessions are removed as new ones start: the table holds about the live ones.
        sqlx::query("DELETE FROM portal_sessions WHERE expires_at <= $1 OR last_seen_at + idle_secs <= $1")
            .bind(now)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO portal_sessions (id_sha256, admin_token_id, created_at, last_seen_at, idle_secs, expires_at, source)
             VALUES ($1, $2, $3, $3, $4, $5, $6)",
        )
        .bind(hash_id(&id))
        .bind(&actor.token_id)
        .bind(now)
        .bind(idle)
        .bind(expires_at)
        .bind(source.map(|a| a.to_string()))
        .execute(&mut *tx)
        .await?;
        audit(&mut tx, now, &actor.label(), "portal.signin", None, json!({"address": source.map(|a| a.to_string())}))
            .await?;
        tx.commit().await?;
        Ok(id)
    }

    /// Records a refused sign-in (a wrong, revoked or unprivileged token). The token is never
    /// stored; the admin token id is, when the token named one.
    pub(super) async fn audit_signin_failed(&self, source: Option<IpAddr>, why: &str) -> Result<(), ApiError> {
        let mut tx = crate::store::begin_write(&self.app.db).await?;
        audit(
            &mut tx,
            self.app.now(),
            "portal",
            "portal.signin_failed",
            None,
            json!({"address": source.map(|a| a.to_string()), "reason": why}),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Ends a session (sign-out), audited with its token's name.
    pub(super) async fn end_session(&self, session: &Session) -> Result<(), ApiError> {
        let mut tx = crate::store::begin_write(&self.app.db).await?;
        sqlx::query("DELETE FROM portal_sessions WHERE id_sha256 = $1")
            .bind(&session.id_sha256)
            .execute(&mut *tx)
            .await?;
        audit(&mut tx, self.app.now(), &session.actor.label(), "portal.signout", None, json!({})).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The request's session, or why there is none. Ends (deletes) a session found expired or
    /// whose token was revoked.
    pub(super) async fn session(&self, headers: &HeaderMap) -> Result<Result<Session, NoSession>, ApiError> {
        let Some(id) = cookie_id(headers, self.cookie_name()) else { return Ok(Err(NoSession::Missing)) };
        let id_sha256 = hash_id(&id);
        // Looked up by the hash of a 256-bit random value: comparing hashes leaks nothing an
        // attacker could steer, so an index lookup is as good as a constant-time compare.
        let row = sqlx::query(
            "SELECT s.admin_token_id, s.last_seen_at, s.idle_secs, s.expires_at, t.name, t.roles, t.revoked_at
             FROM portal_sessions s JOIN admin_tokens t ON t.id = s.admin_token_id WHERE s.id_sha256 = $1",
        )
        .bind(&id_sha256)
        .fetch_optional(&self.app.db)
        .await?;
        let Some(row) = row else { return Ok(Err(NoSession::Missing)) };
        let now = self.app.now();
        let (last_seen, idle, expires_at): (i64, i64, i64) = (row.get(1), row.get(2), row.get(3));
        let ended = if row.get::<Option<i64>, _>(6).is_some() {
            Some(NoSession::Revoked)
        } else if now >= expires_at || now >= last_seen.saturating_add(idle) {
            Some(NoSession::Expired)
        } else {
            None
        };
        if let Some(why) = ended {
            let mut tx = crate::store::begin_write(&self.app.db).await?;
            sqlx::query("DELETE FROM portal_sessions WHERE id_sha256 = $1").bind(&id_sha256).execute(&mut *tx).await?;
            tx.commit().await?;
            return Ok(Err(why));
        }
        if now - last_seen >= (idle / 10).clamp(0, 60) {
            let mut tx = crate::store::begin_write(&self.app.db).await?;
            sqlx::query("UPDATE portal_sessions SET last_seen_at = $1 WHERE id_sha256 = $2")
                .bind(now)
                .bind(&id_sha256)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        }
        let roles: Vec<String> = serde_json::from_str(row.get::<&str, _>(5)).unwrap_or_default();
        let actor = Actor { token_id: row.get(0), name: row.get(4), roles };
        Ok(Ok(Session { id, id_sha256, actor }))
    }
}

/// A page that needs a signed-in administrator takes this. Without a session: a redirect to the
/// sign-in page that says why (for htmx, `HX-Redirect`, so the whole page goes there).
pub struct SignedIn(pub Session);

impl FromRequestParts<Arc<Portal>> for SignedIn {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, portal: &Arc<Portal>) -> Result<Self, Response> {
        match portal.session(&parts.headers).await {
            Ok(Ok(s)) if !s.actor.has_role(ROLE_ADMIN) && !allowed_without_admin(&parts.method, parts.uri.path()) => {
                Err(super::pages::needs_admin(&s))
            }
            Ok(Ok(s)) => Ok(SignedIn(s)),
            Ok(Err(why)) => Err(to_signin(portal, why, parts.headers.contains_key("hx-request"))),
            Err(e) => Err(super::pages::error_page(e)),
        }
    }
}

/// What a session whose token lacks the `admin` role (it has `recovery-keys` only: see
/// `pages::signin`) may do: look at devices, reveal recovery keys, sign out. Checked here, once for
/// every page, so that a page added later is closed to such a session until it is listed here.
pub(super) fn allowed_without_admin(method: &axum::http::Method, path: &str) -> bool {
    let device_page = |p: &str| p == "/devices" || p.strip_prefix("/devices/").is_some_and(|rest| !rest.is_empty());
    if method == axum::http::Method::GET || method == axum::http::Method::HEAD {
        path == "/" || device_page(path)
    } else {
        path == "/signout"
            || path
                .strip_prefix("/devices/")
                .and_then(|rest| rest.strip_suffix("/recovery-keys"))
                .is_some_and(|id| !id.is_empty() && !id.contains('/'))
    }
}

fn to_signin(portal: &Portal, why: NoSession, htmx: bool) -> Response {
    let target = format!("/signin?why={}", why.word());
    let mut resp = if htmx {
        let mut r = axum::http::StatusCode::UNAUTHORIZED.into_response();
        if let Ok(v) = HeaderValue::from_str(&target) {
            r.headers_mut().insert("hx-redirect", v);
        }
        r
    } else {
        Redirect::to(&target).into_response()
    };
    // A cookie that names no live session is of no use to keep.
    if why != NoSession::Missing {
        resp.headers_mut().append(header::SET_COOKIE, portal.cleared_cookie());
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_without_admin_sees_devices_and_reveals_keys_only() {
        use axum::http::Method;
        for (method, path, allowed) in [
            (Method::GET, "/", true),
            (Method::GET, "/devices", true),
            (Method::GET, "/devices/abc", true),
            (Method::GET, "/devices/abc/reports", true),
            (Method::GET, "/audit", false),
            (Method::GET, "/settings", false),
            (Method::GET, "/signatures", false),
            (Method::GET, "/signatures/Corp", false),
            (Method::GET, "/signatures/Corp/preview.html", false),
            (Method::POST, "/signatures", false),
            (Method::POST, "/signatures/Corp/remove", false),
            (Method::POST, "/signout", true),
            (Method::POST, "/devices/abc/recovery-keys", true),
            (Method::POST, "/devices/abc/primary", false),
            (Method::POST, "/devices/abc/decommission", false),
            (Method::POST, "/devices//recovery-keys", false),
            (Method::POST, "/devices/a/b/recovery-keys", false),
        ] {
            assert_eq!(allowed_without_admin(&method, path), allowed, "{method} {path}");
        }
    }

    #[test]
    fn cookie_parsing_takes_only_a_well_formed_id_of_the_right_name() {
        let id = [7u8; 32];
        let v = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(id);
        let check = |cookie: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::COOKIE, HeaderValue::from_str(cookie).unwrap());
            cookie_id(&h, COOKIE)
        };
        assert_eq!(check(&format!("tenon_session={v}")), Some(id));
        assert_eq!(check(&format!("a=b; tenon_session={v}; c=d")), Some(id));
        assert_eq!(check(&format!("other={v}")), None);
        assert_eq!(check("tenon_session=short"), None);
        assert_eq!(check("tenon_session=!!!"), None);
        assert_eq!(check(&format!("tenon_session={v}{v}")), None);
    }
}
