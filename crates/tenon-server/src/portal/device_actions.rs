//! The device page's actions beyond the foundation's: decommission, installing a package on
//! request, report history, and revealing recovery keys (current, or with the archived ones). Each calls the same domain function as the admin API (`AppState::decommission`,
//! the `reports` table as `tenonctl devices reports`, `AppState::read_recovery_keys_because`), so
//! the audit rows are the API's, naming the session's admin token.

use super::pages::{
    device_href, device_page, error_page, message, page, text_of, when, Form, Layout, ReassignForm, CSRF_REFUSED,
};
use super::security::{csrf_matches, presented_csrf};
use super::sessions::SignedIn;
use super::Portal;
use crate::error::ApiError;
use crate::state::{ROLE_ADMIN, ROLE_RECOVERY_KEYS};
use askama::Template;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use serde_json::Value;
use sqlx::Row;
use std::sync::Arc;

/// Reports shown on the history page (the API's default).
const HISTORY_ROWS: i64 = 50;
/// A reason longer than this is refused rather than cut: the audit row must say what was typed.
const MAX_REASON: usize = 500;

/// `POST /devices/{id}/packages/install`: asks the device to install one package of its plan at
/// its next sync, as `tenonctl devices install` (`AppState::request_install`, the same audit row).
pub async fn install(
    State(p): State<Arc<Portal>>,
    SignedIn(s): SignedIn,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let id = id.to_lowercase();
    let form = Form::parse(&body);
    let refuse = |status: StatusCode, error: String| {
        let form = ReassignForm { install_error: Some(error), ..Default::default() };
        let (p, s, id) = (&p, &s, &id);
        async move { device_page(p, s, id, status, form).await }
    };
    if !csrf_matches(s.raw_id(), presented_csrf(&form, &headers)) {
        return refuse(StatusCode::FORBIDDEN, CSRF_REFUSED.into()).await;
    }
    if !s.actor.has_role(ROLE_ADMIN) {
        return super::pages::needs_admin(&s);
    }
    let name = form.get("package").map(str::trim).unwrap_or_default();
    if name.is_empty() {
        return refuse(StatusCode::UNPROCESSABLE_ENTITY, "Choose a package to install; nothing was requested.".into())
            .await;
    }
    match p.app.request_install(&s.actor, &id, name).await {
        Ok(_) => Redirect::to(&format!("{}?done=install#packages", device_href(&id))).into_response(),
        Err(e @ (ApiError::NotFound(_) | ApiError::BadRequest(_) | ApiError::Conflict(_))) => {
            let status = e.status();
            refuse(status, format!("{e}. Nothing was requested.")).await
        }
        Err(e) => error_page(e),
    }
}

/// `POST /devices/{id}/decommission`: after a confirmation box, as `tenonctl devices decommission`.
pub async fn decommission(
    State(p): State<Arc<Portal>>,
    SignedIn(s): SignedIn,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let id = id.to_lowercase();
    let form = Form::parse(&body);
    let refuse = |status: StatusCode, error: String| {
        let form = ReassignForm { decommission_error: Some(error), ..Default::default() };
        let (p, s, id) = (&p, &s, &id);
        async move { device_page(p, s, id, status, form).await }
    };
    if !csrf_matches(s.raw_id(), presented_csrf(&form, &headers)) {
        return refuse(StatusCode::FORBIDDEN, CSRF_REFUSED.into()).await;
    }
    // Also checked for every write by `SignedIn`; said again here because this is the write.
    if !s.actor.has_role(ROLE_ADMIN) {
        return super::pages::needs_admin(&s);
    }
    if form.get("confirm") != Some("yes") {
        return refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Tick the confirmation box to decommission the device; nothing was changed.".into(),
        )
        .await;
    }
    match p.app.decommission(&s.actor, &id).await {
        Ok(()) => Redirect::to(&format!("{}?done=decommissioned", device_href(&id))).into_response(),
        Err(e @ (ApiError::NotFound(_) | ApiError::Conflict(_))) => {
            let status = e.status();
            refuse(status, format!("{e}. Nothing was changed.")).await
        }
        Err(e) => error_page(e),
    }
}

pub struct ReportView {
    pub received_at: String,
    pub config_version: String,
    pub last_error: String,
    /// (policy, state, reason)
    pub policies: Vec<(String, String, String)>,
    /// The whole report, pretty-printed (escaped by the template like every value).
    pub json: String,
}

#[derive(Template)]
#[template(path = "portal/device_reports.html")]
struct ReportsPage {
    layout: Layout,
    id: String,
    href: String,
    hostname: String,
    reports: Vec<ReportView>,
}

/// `GET /devices/{id}/reports`: the last reports the device sent, newest first.
pub async fn reports(State(p): State<Arc<Portal>>, SignedIn(s): SignedIn, Path(id): Path<String>) -> Response {
    let id = id.to_lowercase();
    let now = p.app.now();
    let hostname = {
        let world = p.app.world.read().await;
        world.devices.get(&id).map(|m| m.hostname.clone())
    };
    let Some(hostname) = hostname else {
        return message(
            StatusCode::NOT_FOUND,
            Some(&s),
            "No such device",
            format!("There is no device {id}."),
            Some(("/devices", "Go to the devices")),
        );
    };
    let rows =
        match sqlx::query("SELECT received_at, report FROM reports WHERE device_id = $1 ORDER BY id DESC LIMIT $2")
            .bind(&id)
            .bind(HISTORY_ROWS)
            .fetch_all(&p.app.db)
            .await
        {
            Ok(rows) => rows,
            Err(e) => return error_page(e.into()),
        };
    let reports = rows
        .iter()
        .map(|r| {
            let report: Value = serde_json::from_str(r.get::<&str, _>(1)).unwrap_or(Value::Null);
            let mut policies: Vec<(String, String, String)> = report["policies"]
                .as_object()
                .map(|o| {
                    o.iter()
                        .map(|(k, v)| {
                            (
                                k.clone(),
                                v.get("state").map(text_of).unwrap_or_default(),
                                v.get("reason").map(text_of).unwrap_or_default(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            policies.sort();
            ReportView {
                received_at: when(now, Some(r.get(0))),
                config_version: report.get("config_version").map(text_of).unwrap_or_default(),
                last_error: report.get("last_error").filter(|v| !v.is_null()).map(text_of).unwrap_or_default(),
                policies,
                json: serde_json::to_string_pretty(&report).unwrap_or_default(),
            }
        })
        .collect();
    page(
        StatusCode::OK,
        &ReportsPage {
            layout: Layout::new(format!("Reports of {hostname}"), Some(&s)),
            href: device_href(&id),
            id,
            hostname,
            reports,
        },
    )
}

pub struct KeyView {
    pub mount: String,
    pub protector_id: String,
    pub password: String,
    pub error: String,
    pub received_at: String,
    pub warning: String,
    pub current: bool,
    /// "current: rotation requested", "archived: superseded ...", ...
    pub status: String,
}

#[derive(Template)]
#[template(path = "portal/recovery_keys.html")]
struct KeysPage {
    layout: Layout,
    href: String,
    hostname: String,
    keys: Vec<KeyView>,
    reason: String,
}

/// `POST /devices/{id}/recovery-keys`: reveals the device's current recovery keys, for a session
/// whose token has the `recovery-keys` role, with a typed reason. The keys are only ever in this
/// response (a POST, `Cache-Control: no-store`), never in a URL, a redirect or a log.
pub async fn reveal(
    State(p): State<Arc<Portal>>,
    SignedIn(s): SignedIn,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let id = id.to_lowercase();
    let form = Form::parse(&body);
    let reason = form.get("reason").map(str::trim).unwrap_or_default().to_string();
    let archived = form.get("archived") == Some("yes");
    let refuse = |status: StatusCode, error: String| {
        let form = ReassignForm { reveal_error: Some(error), reason: reason.clone(), archived, ..Default::default() };
        let (p, s, id) = (&p, &s, &id);
        async move { device_page(p, s, id, status, form).await }
    };
    if !csrf_matches(s.raw_id(), presented_csrf(&form, &headers)) {
        return refuse(StatusCode::FORBIDDEN, CSRF_REFUSED.into()).await;
    }
    if !s.actor.has_role(ROLE_RECOVERY_KEYS) {
        // Audited like the API's refusal: trying without the role leaves a trace.
        if let Err(e) = p.app.audit_recovery_denial(&s.actor, &id).await {
            return error_page(e);
        }
        return message(
            StatusCode::FORBIDDEN,
            Some(&s),
            "Not allowed",
            format!("Revealing recovery keys needs an admin token with the {ROLE_RECOVERY_KEYS} role; this attempt was refused and audited."),
            Some(("/devices", "Go to the devices")),
        );
    }
    if reason.is_empty() {
        return refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Type why you need the recovery keys (for the audit log); nothing was revealed.".into(),
        )
        .await;
    }
    if reason.chars().count() > MAX_REASON {
        return refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("The reason is longer than {MAX_REASON} characters; shorten it. Nothing was revealed."),
        )
        .await;
    }
    let hostname = {
        let world = p.app.world.read().await;
        world.devices.get(&id).map(|m| m.hostname.clone()).unwrap_or_default()
    };
    let keys = match p.app.read_recovery_keys_because(&s.actor, &id, archived, Some(&reason)).await {
        Ok(keys) => keys,
        Err(e @ ApiError::NotFound(_)) => {
            return message(
                StatusCode::NOT_FOUND,
                Some(&s),
                "No such device",
                e.to_string(),
                Some(("/devices", "Go to the devices")),
            )
        }
        Err(e) => return error_page(e),
    };
    let str_of = |k: &Value, f: &str| k.get(f).and_then(Value::as_str).unwrap_or_default().to_string();
    let opt_of = |k: &Value, f: &str| k.get(f).and_then(Value::as_str).map(str::to_string);
    let keys = keys
        .iter()
        .map(|k| KeyView {
            current: k["current"] == Value::Bool(true),
            status: if k["current"] == Value::Bool(true) {
                "current: rotation requested".into()
            } else {
                super::pages::archived_status(opt_of(k, "superseded_at"), opt_of(k, "retired_at"))
            },
            mount: str_of(k, "mount"),
            protector_id: str_of(k, "protector_id"),
            password: str_of(k, "recovery_password"),
            error: str_of(k, "error"),
            received_at: str_of(k, "received_at"),
            warning: str_of(k, "warning"),
        })
        .collect();

    let mut resp = page(
        StatusCode::OK,
        &KeysPage {
            layout: Layout::new(format!("Recovery keys of {hostname}"), Some(&s)),
            href: device_href(&id),
            hostname,
            keys,
            reason,
        },
    );
    // Pages are `no-store` already (security::headers); said here too because this one holds keys.
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}
