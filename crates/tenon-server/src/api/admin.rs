//! Admin endpoints: thin handlers that parse, authorise, call the domain in `state`, and shape
//! the answer. Every write is audited inside its own transaction (see `state`).

use super::extract::{Admin, AdminToken, ApiJson, ApiQuery};
use crate::error::{ApiError, ApiResult};
use crate::state::{device_not_found, AppState, ROLE_ADMIN, ROLE_RECOVERY_KEYS};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use sqlx::any::AnyRow;
use sqlx::Row;
use std::collections::BTreeMap;
use std::sync::Arc;
use tenon_core::api::{
    DeviceView, EnrollTokenRequest, EnrollTokenResponse, SetSettingRequest, SettingScope, UnsetSettingRequest,
};
use tenon_core::settings::SettingValue;

pub fn rfc3339(t: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|d| d.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| t.to_string())
}

/// Audit details store Unix seconds (`expires_at`, `*_at`); people read RFC 3339.
fn readable_times(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .map(|(k, v)| match v.as_i64() {
                    Some(t) if k == "at" || k.ends_with("_at") => (k, Value::String(rfc3339(t))),
                    _ => (k, readable_times(v)),
                })
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.into_iter().map(readable_times).collect()),
        other => other,
    }
}

pub async fn create_enroll_token(
    State(state): State<Arc<AppState>>,
    Admin(actor): Admin,
    ApiJson(req): ApiJson<EnrollTokenRequest>,
) -> ApiResult<Response> {
    let (token, expires_at) = state.create_enroll_token(&actor, req.uses, req.ttl_seconds, req.pin_ca).await?;
    let body = EnrollTokenResponse { token, uses: req.uses, expires_at: rfc3339(expires_at) };
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

pub async fn list_enroll_tokens(State(state): State<Arc<AppState>>, Admin(_): Admin) -> ApiResult<Json<Value>> {
    Ok(Json(Value::Array(state.list_enroll_tokens().await?)))
}

pub async fn revoke_enroll_token(
    State(state): State<Arc<AppState>>,
    Admin(actor): Admin,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    state.revoke_enroll_token(&actor, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
pub struct RemoveUserQuery {
    #[serde(default)]
    force: bool,
}

pub async fn remove_user(
    State(state): State<Arc<AppState>>,
    Admin(actor): Admin,
    Path(upn): Path<String>,
    ApiQuery(q): ApiQuery<RemoveUserQuery>,
) -> ApiResult<Json<Value>> {
    let r = state.remove_user(&actor, &upn, q.force).await?;
    Ok(resign_answer(&state, r.resign, json!({"upn": upn.trim().to_lowercase(), "cleared_primary": r.cleared_primary}))
        .await)
}

pub async fn import_users(
    State(state): State<Arc<AppState>>,
    Admin(actor): Admin,
    ApiJson(users): ApiJson<Vec<Value>>,
) -> ApiResult<Json<Value>> {
    let (created, updated, resigned) = state.import_users(&actor, users).await?;
    // The request and the directory entries it replaced were freed; give the pages back.
    crate::release_free_memory();
    Ok(resign_answer(&state, resigned, json!({"created": created, "updated": updated})).await)
}

/// The directory's users: each record's Graph fields, with `upn` and `userPrincipalName`, `id`,
/// `groups` (names), `source` (the directory source, or `file` for imported users) and
/// `passwordExpiresAt` (RFC 3339; null for never or unknown, `passwordNeverExpires` tells which).
pub async fn list_users(State(state): State<Arc<AppState>>, Admin(_): Admin) -> ApiResult<Json<Value>> {
    let world = state.world.read().await;
    let mut users: Vec<Value> = world
        .directory
        .users
        .iter()
        .filter(|(_, u)| u.id.is_some() || !u.record.is_null())
        .map(|(upn, u)| {
            let mut v = match &u.record {
                Value::Object(m) => m.clone(),
                _ => serde_json::Map::new(),
            };
            let expiry = password_expiry(&u.record);
            v.insert("upn".into(), json!(upn));
            v.insert("userPrincipalName".into(), json!(upn));
            v.insert("id".into(), json!(u.id));
            v.insert("display_name".into(), u.record.get("displayName").cloned().unwrap_or(Value::Null));
            v.insert("groups".into(), json!(u.groups));
            v.insert("source".into(), json!(u.source.as_deref().unwrap_or(crate::directory::sources::FILE_SOURCE)));
            v.insert("passwordExpiresAt".into(), json!(expiry.and_then(|e| e.map(rfc3339))));
            v.insert("passwordNeverExpires".into(), json!(expiry == Some(None)));
            Value::Object(v)
        })
        .collect();
    users.sort_by(|a, b| a["upn"].as_str().cmp(&b["upn"].as_str()));
    Ok(Json(Value::Array(users)))
}

/// `None`: unknown; `Some(None)`: never expires; `Some(Some(t))`: expires at Unix time `t` (a
/// password that must change now expired at the start of the FILETIME epoch).
fn password_expiry(record: &Value) -> Option<Option<i64>> {
    let raw = record.get(tenon_core::directory::PASSWORD_EXPIRY_ATTRIBUTE)?;
    let ft = match raw {
        Value::String(s) => s.parse::<i64>().ok()?,
        Value::Number(n) => n.as_i64().or_else(|| n.as_u64().map(|_| i64::MAX))?,
        _ => return None,
    };
    Some(match ft {
        tenon_core::dirsync::FILETIME_NEVER => None,
        0 => Some(-11_644_473_600),
        ft => tenon_core::dirsync::filetime_to_unix(ft),
    })
}

pub async fn set_setting(
    State(state): State<Arc<AppState>>,
    Admin(actor): Admin,
    ApiJson(req): ApiJson<SetSettingRequest>,
) -> ApiResult<Json<Value>> {
    let value = match (req.undefined, req.value) {
        (true, None) => SettingValue::Undefined,
        (false, Some(v)) => SettingValue::Set(v),
        (true, Some(_)) => return Err(ApiError::BadRequest("give either value or undefined: true, not both".into())),
        (false, None) => {
            return Err(ApiError::BadRequest(
                "missing value: give a JSON value, or undefined: true to delete the key at this scope".into(),
            ))
        }
    };
    let n = state.set_setting(&actor, &req.scope, &req.key, value).await?;
    let warning = state.empty_group_warning(&req.scope).await;
    Ok(resign_answer(&state, n, json!({"warning": warning})).await)
}

pub async fn unset_setting(
    State(state): State<Arc<AppState>>,
    Admin(actor): Admin,
    ApiJson(req): ApiJson<UnsetSettingRequest>,
) -> ApiResult<Json<Value>> {
    let n = state.unset_setting(&actor, &req.scope, &req.key).await?;
    Ok(resign_answer(&state, n, json!({})).await)
}

#[derive(Deserialize)]
pub struct SettingsQuery {
    tenant: Option<bool>,
    group: Option<String>,
    user: Option<String>,
}

pub async fn list_settings(
    State(state): State<Arc<AppState>>,
    Admin(_): Admin,
    ApiQuery(q): ApiQuery<SettingsQuery>,
) -> ApiResult<Json<Value>> {
    let scope = match (q.tenant.unwrap_or(false), q.group, q.user) {
        (true, None, None) => Some(SettingScope::Tenant),
        (false, Some(g), None) => Some(SettingScope::Group(g)),
        (false, None, Some(u)) => Some(SettingScope::User(u.to_lowercase())),
        (false, None, None) => None,
        _ => return Err(ApiError::BadRequest("choose at most one of tenant, group and user".into())),
    };
    Ok(Json(Value::Array(state.list_settings(scope.as_ref()).await?)))
}

#[derive(Deserialize)]
pub struct PriorityRequest {
    priority: i64,
}

pub async fn set_group_priority(
    State(state): State<Arc<AppState>>,
    Admin(actor): Admin,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<PriorityRequest>,
) -> ApiResult<Json<Value>> {
    let n = state.set_group_priority(&actor, &name, req.priority).await?;
    Ok(resign_answer(&state, n, json!({})).await)
}

const DEVICE_COLUMNS: &str =
    "id, hostname, primary_user, e.config_version AS config_version, e.config_sha256 AS config_sha256,
     reported_version, reported_sha256, s.last_seen AS last_seen, enrolled_at, status, agent_version,
     signed_in_users, last_error, policies, packages";
/// The devices with their envelope facts and last-seen time (tables of their own since 0007).
const DEVICE_TABLES: &str = "devices JOIN device_envelopes e ON e.device_id = devices.id
     LEFT JOIN device_last_seen s ON s.device_id = devices.id";

fn device_view(state: &AppState, row: &AnyRow) -> DeviceView {
    let id: String = row.get("id");
    let last_seen = state.index.last_seen(&id).max(row.get::<Option<i64>, _>("last_seen"));
    DeviceView {
        hostname: row.get("hostname"),
        primary_user: row.get("primary_user"),
        config_version: row.get::<i64, _>("config_version") as u64,
        config_sha256: row.get("config_sha256"),
        reported_config_version: row.get::<Option<i64>, _>("reported_version").map(|v| v as u64),
        reported_config_sha256: row.get("reported_sha256"),
        last_seen: last_seen.map(rfc3339),
        enrolled_at: rfc3339(row.get("enrolled_at")),
        status: row.get("status"),
        agent_version: row.get("agent_version"),
        signed_in_users: serde_json::from_str(row.get::<&str, _>("signed_in_users")).unwrap_or_default(),
        last_error: row.get("last_error"),
        policies: serde_json::from_str::<Map<String, Value>>(row.get::<&str, _>("policies")).unwrap_or_default(),
        packages: row
            .get::<Option<&str>, _>("packages")
            .and_then(|p| serde_json::from_str::<Map<String, Value>>(p).ok())
            .unwrap_or_default(),
        id,
    }
}

#[derive(Deserialize)]
pub struct DevicesQuery {
    #[serde(default)]
    without_primary: bool,
    #[serde(default)]
    primary_mismatch: bool,
    #[serde(default)]
    include_decommissioned: bool,
    /// Only devices with this host name (case-insensitive).
    hostname: Option<String>,
    /// At most this many devices (1 to 10000).
    limit: Option<i64>,
    /// The page after this device id (the last id of the previous page), in listing order.
    after: Option<String>,
}

pub async fn list_devices(
    State(state): State<Arc<AppState>>,
    Admin(_): Admin,
    ApiQuery(q): ApiQuery<DevicesQuery>,
) -> ApiResult<Json<Vec<DeviceView>>> {
    // Keyset paging in the listing order (hostname, id): stable while devices come and go.
    let cursor = match &q.after {
        None => None,
        Some(after) => Some(
            sqlx::query_scalar::<_, String>("SELECT hostname FROM devices WHERE id = $1")
                .bind(after.to_lowercase())
                .fetch_optional(&state.db)
                .await?
                .map(|h| (h, after.to_lowercase()))
                .ok_or_else(|| {
                    ApiError::BadRequest(format!(
                        "after={after}: no such device; pass the last id of the previous page"
                    ))
                })?,
        ),
    };
    let limit = match q.limit {
        None => None,
        Some(n @ 1..=10_000) => Some(n as usize),
        Some(n) => return Err(ApiError::BadRequest(format!("limit={n}: give a number from 1 to 10000"))),
    };
    let rows = sqlx::query(&format!(
        "SELECT {DEVICE_COLUMNS} FROM {DEVICE_TABLES}
         WHERE ($1 IS NULL OR (hostname, id) > ($1, $2)) AND ($3 IS NULL OR LOWER(hostname) = LOWER($3))
           AND ($4 OR status = 'active') AND (NOT $5 OR primary_user IS NULL)
         ORDER BY hostname, id"
    ))
    .bind(cursor.as_ref().map(|c| c.0.as_str()))
    .bind(cursor.as_ref().map(|c| c.1.as_str()))
    .bind(q.hostname.as_deref().map(str::trim))
    .bind(q.include_decommissioned)
    .bind(q.without_primary)
    .fetch_all(&state.db)
    .await?;
    // The user signed in most often on each device, for the mismatch report.
    let mut most_seen: BTreeMap<String, (i64, String)> = BTreeMap::new();
    if q.primary_mismatch {
        for r in
            sqlx::query("SELECT device_id, upn, sightings FROM device_users ORDER BY device_id, sightings DESC, upn")
                .fetch_all(&state.db)
                .await?
        {
            most_seen.entry(r.get(0)).or_insert((r.get(2), r.get(1)));
        }
    }
    let mut out = Vec::new();
    for row in &rows {
        let view = device_view(&state, row);
        if view.status != "active" && !q.include_decommissioned {
            continue;
        }
        if q.without_primary && view.primary_user.is_some() {
            continue;
        }
        if q.primary_mismatch {
            let top = most_seen.get(&view.id).map(|(_, u)| u);
            if top.is_none() || view.primary_user.as_ref() == top {
                continue;
            }
        }
        out.push(view);
        if limit.is_some_and(|l| out.len() >= l) {
            break;
        }
    }
    Ok(Json(out))
}

pub async fn show_device(
    State(state): State<Arc<AppState>>,
    Admin(_): Admin,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let row = sqlx::query(&format!("SELECT {DEVICE_COLUMNS} FROM {DEVICE_TABLES} WHERE id = $1"))
        .bind(id.to_lowercase())
        .fetch_optional(&state.db)
        .await?
        .ok_or_else(|| device_not_found(&id))?;
    let mut view = device_view(&state, &row);
    view.packages = state.device_packages(&view.id, &view.packages).await;
    let users: Vec<Value> = sqlx::query(
        "SELECT upn, first_seen, last_seen, sightings FROM device_users WHERE device_id = $1 ORDER BY sightings DESC, upn",
    )
    .bind(&view.id)
    .fetch_all(&state.db)
    .await?
    .iter()
    .map(|r| {
        json!({"upn": r.get::<String, _>(0), "first_seen": rfc3339(r.get(1)), "last_seen": rfc3339(r.get(2)), "sightings": r.get::<i64, _>(3)})
    })
    .collect();
    let mut v = serde_json::to_value(view).map_err(|e| ApiError::Internal(e.into()))?;
    v["users"] = Value::Array(users);
    Ok(Json(v))
}

/// The payload a device currently gets (what `tenonctl devices config` shows).
pub async fn device_config(
    State(state): State<Arc<AppState>>,
    Admin(_): Admin,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let slot = state.index.get(&id.to_lowercase()).ok_or_else(|| device_not_found(&id))?;
    let current = slot.current();
    let envelope: Value = serde_json::from_slice(&current.bytes).map_err(|e| ApiError::Internal(e.into()))?;
    Ok(Json(json!({
        "version": current.version,
        "payload_sha256": current.payload_sha256,
        "expires_at": envelope["signed"]["expires_at"].as_i64().map(rfc3339),
        "payload": envelope["signed"]["payload"],
    })))
}

#[derive(Deserialize)]
pub struct HistoryQuery {
    limit: Option<i64>,
}

pub async fn device_reports(
    State(state): State<Arc<AppState>>,
    Admin(_): Admin,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<HistoryQuery>,
) -> ApiResult<Json<Value>> {
    let limit = q.limit.unwrap_or(50).clamp(1, 1000);
    let id = id.to_lowercase();
    let known: Option<String> =
        sqlx::query_scalar("SELECT id FROM devices WHERE id = $1").bind(&id).fetch_optional(&state.db).await?;
    if known.is_none() {
        return Err(device_not_found(&id));
    }
    let rows = sqlx::query("SELECT received_at, report FROM reports WHERE device_id = $1 ORDER BY id DESC LIMIT $2")
        .bind(&id)
        .bind(limit)
        .fetch_all(&state.db)
        .await?;
    Ok(Json(Value::Array(
        rows.iter()
            .map(|r| {
                json!({"received_at": rfc3339(r.get(0)),
                       "report": serde_json::from_str::<Value>(r.get::<&str, _>(1)).unwrap_or(Value::Null)})
            })
            .collect(),
    )))
}

#[derive(Deserialize)]
pub struct PrimaryRequest {
    upn: Option<String>,
}

pub async fn set_primary(
    State(state): State<Arc<AppState>>,
    Admin(actor): Admin,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<PrimaryRequest>,
) -> ApiResult<StatusCode> {
    state.set_primary(&actor, &id.to_lowercase(), req.upn.as_deref()).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn decommission(
    State(state): State<Arc<AppState>>,
    Admin(actor): Admin,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    state.decommission(&actor, &id.to_lowercase()).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
pub struct AuditQuery {
    limit: Option<i64>,
}

pub async fn audit_list(
    State(state): State<Arc<AppState>>,
    Admin(_): Admin,
    ApiQuery(q): ApiQuery<AuditQuery>,
) -> ApiResult<Json<Value>> {
    let limit = q.limit.unwrap_or(200).clamp(1, 10_000);
    let rows = sqlx::query("SELECT id, at, actor, action, target, details FROM audit ORDER BY id DESC LIMIT $1")
        .bind(limit)
        .fetch_all(&state.db)
        .await?;
    Ok(Json(Value::Array(
        rows.iter()
            .map(|r| {
                json!({
                    "id": r.get::<i64, _>(0),
                    "at": rfc3339(r.get(1)),
                    "actor": r.get::<String, _>(2),
                    "action": r.get::<String, _>(3),
                    "target": r.get::<Option<String>, _>(4),
                    "details": readable_times(serde_json::from_str::<Value>(r.get::<&str, _>(5)).unwrap_or(Value::Null)),
                })
            })
            .collect(),
    )))
}

/// Delivery Optimization peer groups as devices report them: one row per group id.
pub async fn networks(State(state): State<Arc<AppState>>, Admin(_): Admin) -> ApiResult<Json<Value>> {
    let rows = sqlx::query(
        "SELECT id, hostname, policies, s.last_seen FROM devices LEFT JOIN device_last_seen s ON s.device_id = devices.id
         WHERE status = 'active'",
    )
        .fetch_all(&state.db)
        .await?;
    let mut groups: BTreeMap<String, (Value, Value, Vec<String>, i64)> = BTreeMap::new();
    for r in &rows {
        let policies: Value = serde_json::from_str(r.get::<&str, _>(2)).unwrap_or(Value::Null);
        let d = &policies["delivery_optimization"];
        let Some(group_id) = d.get("group_id").and_then(Value::as_str) else { continue };
        let id: String = r.get(0);
        let seen = state.index.last_seen(&id).max(r.get::<Option<i64>, _>(3)).unwrap_or(0);
        let e = groups.entry(group_id.to_string()).or_insert((Value::Null, Value::Null, Vec::new(), 0));
        e.0 = d.get("gateway_mac").cloned().unwrap_or(Value::Null);
        e.1 = d.get("gateway_ip").cloned().unwrap_or(Value::Null);
        e.2.push(r.get::<String, _>(1));
        e.3 = e.3.max(seen);
    }
    Ok(Json(Value::Array(
        groups
            .into_iter()
            .map(|(gid, (mac, ip, hosts, seen))| {
                json!({"group_id": gid, "gateway_mac": mac, "gateway_ip": ip, "device_count": hosts.len(),
                       "devices": hosts, "last_seen": (seen > 0).then(|| rfc3339(seen))})
            })
            .collect(),
    )))
}

#[derive(Deserialize)]
pub struct RecoveryKeysQuery {
    #[serde(default)]
    all: bool,
}

/// A device's recovery keys, for a token with the `recovery-keys` role: audited, counted, and the
/// keys read are marked for rotation (see `escrow`). A token without the role gets 403, audited.
pub async fn recovery_keys(
    State(state): State<Arc<AppState>>,
    AdminToken(actor): AdminToken,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<RecoveryKeysQuery>,
) -> ApiResult<Response> {
    let keys = state.read_recovery_keys(&actor, &id.to_lowercase(), q.all).await?;
    let mut resp = Json(Value::Array(keys)).into_response();
    // Recovery passwords must not linger in caches between the server and the administrator.
    resp.headers_mut().insert(axum::http::header::CACHE_CONTROL, axum::http::HeaderValue::from_static("no-store"));
    Ok(resp)
}

#[derive(Deserialize)]
pub struct CreateTokenRequest {
    name: String,
    roles: Vec<String>,
}

/// Creates an admin token with the given roles (needs the `admin` role). The token is shown once.
pub async fn create_admin_token(
    State(state): State<Arc<AppState>>,
    Admin(actor): Admin,
    ApiJson(req): ApiJson<CreateTokenRequest>,
) -> ApiResult<Response> {
    let name = req.name.trim();
    if name.is_empty() || name.len() > 100 || name.chars().any(char::is_control) {
        return Err(ApiError::BadRequest("name must be 1 to 100 printable characters".into()));
    }
    let known = [ROLE_ADMIN, ROLE_RECOVERY_KEYS];
    let mut roles: Vec<&str> = Vec::new();
    for r in &req.roles {
        let Some(k) = known.iter().find(|k| **k == r.as_str()) else {
            return Err(ApiError::BadRequest(format!(
                "unknown role {r:?}; roles are {ROLE_ADMIN} and {ROLE_RECOVERY_KEYS}"
            )));
        };
        if !roles.contains(k) {
            roles.push(k);
        }
    }
    if roles.is_empty() {
        return Err(ApiError::BadRequest(format!(
            "give at least one role ({ROLE_ADMIN}, {ROLE_RECOVERY_KEYS}); a token without roles can do nothing"
        )));
    }
    // A token grants only roles it holds itself: an `admin` token cannot mint itself the right to
    // read recovery keys. Refusals are audited before the 403 leaves.
    let missing: Vec<&str> = roles.iter().copied().filter(|r| !actor.has_role(r)).collect();
    if !missing.is_empty() {
        state.audit_token_grant_denied(&actor, name, &roles, &missing).await?;
        return Err(ApiError::Forbidden(format!(
            "this token cannot grant the role(s) {} because it does not hold them; a token may grant only its own roles \
             (the bootstrap token in DATA_DIR/admin.token holds {ROLE_ADMIN} and {ROLE_RECOVERY_KEYS}); this attempt was audited",
            missing.join(", ")
        )));
    }
    let (token, id) = state.create_admin_token(name, &roles, Some(&actor)).await?;
    Ok((StatusCode::CREATED, Json(json!({"token": token, "id": id, "name": name, "roles": roles}))).into_response())
}

pub async fn list_admin_tokens(State(state): State<Arc<AppState>>, Admin(_): Admin) -> ApiResult<Json<Value>> {
    Ok(Json(Value::Array(state.list_admin_tokens().await?)))
}

pub async fn revoke_admin_token(
    State(state): State<Arc<AppState>>,
    Admin(actor): Admin,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    state.revoke_admin_token(&actor, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// How long an admin write waits for the re-signing it caused before it answers. A change that
/// reaches a few thousand devices is on their check-ins by then (`devices_updated` says how many
/// were re-issued); a larger one answers with the count still to go (`resign_complete: false`,
/// `devices_updated: null`) and `tenonctl ... --wait` follows `GET /api/v1/admin/resign`.
const RESIGN_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Adds the re-signing a change caused to its answer: `devices_to_resign` (the devices the
/// change may affect), `resign_generation` (complete once `GET /resign` shows
/// `completed_generation` at or above it), `resign_complete` and `devices_updated`.
pub(crate) async fn resign_answer(state: &AppState, ticket: crate::resign::Ticket, mut body: Value) -> Json<Value> {
    // A change that reaches no device is complete as it commits: it does not wait behind a run
    // that re-signs others.
    let done = if ticket.devices == 0 {
        Some(crate::resign::Completed { generation: ticket.generation, resigned: 0 })
    } else {
        state.resign.wait(ticket, RESIGN_WAIT).await
    };
    body["devices_to_resign"] = ticket.devices.into();
    body["resign_generation"] = ticket.generation.into();
    body["resign_complete"] = done.is_some().into();
    body["devices_updated"] = done.map(|c| c.resigned).into();
    Json(body)
}

/// `GET /api/v1/admin/resign`: how far background re-signing is.
pub async fn resign_status(State(state): State<Arc<AppState>>, Admin(_): Admin) -> Json<Value> {
    let (queued, done, total) = state.resign.progress();
    let completed = state.resign.completed();
    Json(json!({
        "completed_generation": completed.generation,
        "last_resigned": completed.resigned,
        "requested_generation": state.resign.requested(),
        "queued": queued,
        "done": done,
        "total": total,
    }))
}

/// `GET /api/v1/admin/server`: this server, its store, and its part among the servers of one
/// database (`tenonctl server status`).
pub async fn server_status(State(state): State<Arc<AppState>>, Admin(_): Admin) -> Json<Value> {
    use std::sync::atomic::Ordering;
    Json(json!({
        "server_id": state.origin,
        "store": match crate::store::backend(&state.db) {
            crate::store::Backend::Sqlite => "sqlite",
            crate::store::Backend::Postgres => "postgres",
        },
        "database": if state.database_ok.load(Ordering::Relaxed) { "ok" } else { "unreachable" },
        "runs_jobs": state.holds_jobs(),
        "applied_change": state.applied_seq.load(Ordering::Relaxed),
        "devices": state.index.len(),
    }))
}
