//! The HTTP API: routes, body limits and the problem+json fallbacks.

mod admin;
pub use admin::rfc3339;
mod device;
pub mod extract;
mod signatures;

use crate::error::ApiError;
use crate::state::AppState;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post, put};
use axum::Router;
use std::sync::Arc;

/// Most bodies are small; user imports may be large.
const BODY_LIMIT: usize = 1024 * 1024;
const IMPORT_LIMIT: usize = 32 * 1024 * 1024;
/// Signature templates carry their images; the domain answers a too-large template with a
/// message that says what to shrink, so the transport limit sits well above that.
const SIGNATURE_LIMIT: usize = 16 * 1024 * 1024;
/// A real report is a few KB (one status per policy); 64 KiB leaves room for a long error text.
pub const REPORT_LIMIT: usize = 64 * 1024;
/// An enrollment is a token, a hostname and a version.
const ENROLL_LIMIT: usize = 16 * 1024;

pub fn router(state: Arc<AppState>) -> Router {
    let admin = Router::new()
        .route("/enroll-tokens", post(admin::create_enroll_token))
        .route("/users/import", post(admin::import_users).layer(DefaultBodyLimit::max(IMPORT_LIMIT)))
        .route("/users", get(admin::list_users))
        .route("/settings", get(admin::list_settings).put(admin::set_setting))
        .route("/settings/unset", post(admin::unset_setting))
        .route("/groups/{name}/priority", put(admin::set_group_priority))
        .route("/devices", get(admin::list_devices))
        .route("/devices/{id}", get(admin::show_device))
        .route("/devices/{id}/reports", get(admin::device_reports))
        .route("/devices/{id}/config", get(admin::device_config))
        .route("/devices/{id}/primary", put(admin::set_primary))
        .route("/devices/{id}/decommission", post(admin::decommission))
        .route("/devices/{id}/recovery-keys", get(admin::recovery_keys))
        .route("/tokens", post(admin::create_admin_token).get(admin::list_admin_tokens))
        .route("/tokens/{id}/revoke", post(admin::revoke_admin_token))
        .route("/signatures", get(signatures::list_signatures))
        .route(
            "/signatures/{name}",
            put(signatures::put_signature)
                .delete(signatures::remove_signature)
                .layer(DefaultBodyLimit::max(SIGNATURE_LIMIT)),
        )
        .route("/audit", get(admin::audit_list))
        .route("/networks", get(admin::networks));
    let api = Router::new()
        .route("/enroll", post(device::enroll).layer(DefaultBodyLimit::max(ENROLL_LIMIT)))
        .route("/device/config", get(device::config))
        .route("/device/trust", get(device::trust))
        .route("/device/report", post(device::report).layer(DefaultBodyLimit::max(REPORT_LIMIT)))
        .route("/device/escrow", post(device::escrow))
        .route("/device/escrow/rotations", get(device::escrow_rotations))
        .nest("/admin", admin);
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .nest("/api/v1", api)
        .fallback(|| async { ApiError::NotFound("no such endpoint; the API lives under /api/v1".into()) })
        .method_not_allowed_fallback(|| async {
            ApiError::MethodNotAllowed("this endpoint does not accept that method".into())
        })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}
