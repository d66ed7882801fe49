//! The HTTP API: routes, body limits and the problem+json fallbacks.

mod admin;
pub use admin::rfc3339;
mod device;
mod directory;
pub mod extract;
mod packages;
mod signatures;

use crate::error::ApiError;
use crate::state::AppState;
use axum::extract::{DefaultBodyLimit, State};
use axum::routing::{get, post, put};
use axum::Router;
use std::sync::Arc;

/// Most bodies are small; user imports may be large.
const BODY_LIMIT: usize = 1024 * 1024;
const IMPORT_LIMIT: usize = 32 * 1024 * 1024;
/// Signature templates carry their images; the domain answers a too-large template with a
/// message that says what to shrink, so the transport limit sits well above that.
const SIGNATURE_LIMIT: usize = 16 * 1024 * 1024;
/// A real report is a few KB (one status per policy); 64 KiB leaves room for a long error text
/// and the log tails of failed packages (the agent sends at most 24 KiB of them).
pub const REPORT_LIMIT: usize = 64 * 1024;
/// An enrollment is a token, a hostname and a version.
const ENROLL_LIMIT: usize = 16 * 1024;

/// Runs a request's handler on a task of its own. A client that goes away (an agent killed
/// mid-sync, a timed-out connection) makes hyper drop the request's future; dropped in the middle of
/// a database call, it can leave a transaction open on a pooled connection (holding SQLite's write
/// lock) or half-done work behind. On its own task the handler always runs to its end; only the
/// answer is lost.
pub(crate) async fn run_to_completion(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    match tokio::spawn(next.run(req)).await {
        Ok(resp) => resp,
        Err(e) => ApiError::Internal(anyhow::anyhow!("the request's task failed: {e}")).into_response(),
    }
}

/// What the port answers while the server loads its fleet: 503 with `Retry-After: 1` for every
/// request; `/healthz` says `starting` (and is 200 only once the server serves).
pub fn starting_router() -> Router {
    Router::new().fallback(|| async {
        crate::error::ApiError::Unavailable {
            detail: "starting: the server is loading its fleet; retry in a second".into(),
            retry_after_secs: 1,
        }
    })
}

pub fn router(state: Arc<AppState>) -> Router {
    let admin = Router::new()
        .route("/enroll-tokens", post(admin::create_enroll_token).get(admin::list_enroll_tokens))
        .route("/enroll-tokens/{id}/revoke", post(admin::revoke_enroll_token))
        .route("/users/import", post(admin::import_users).layer(DefaultBodyLimit::max(IMPORT_LIMIT)))
        .route("/users", get(admin::list_users))
        .route("/users/{upn}", axum::routing::delete(admin::remove_user))
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
        .route("/packages", get(packages::list).post(packages::upload))
        .route("/packages/check", post(packages::check))
        .route("/packages/{name}", get(packages::show).delete(packages::remove))
        .route("/packages/{name}/assign", post(packages::assign))
        .route("/packages/{name}/unassign", post(packages::unassign))
        .route("/packages/{name}/status", get(packages::status))
        .route("/devices/{id}/install", post(packages::install))
        .route("/directory/sources", post(directory::add).get(directory::list))
        .route("/directory/sources/{name}", axum::routing::delete(directory::remove))
        .route("/directory/sources/{name}/sync", post(directory::sync))
        .route("/directory/status", get(directory::status))
        .route("/audit", get(admin::audit_list))
        .route("/resign", get(admin::resign_status))
        .route("/server", get(admin::server_status))
        .route("/networks", get(admin::networks));
    let api = Router::new()
        .route("/enroll", post(device::enroll).layer(DefaultBodyLimit::max(ENROLL_LIMIT)))
        .route("/device/trust", get(device::trust))
        .route("/trust", get(device::public_trust))
        .route(
            "/device/config/held",
            post(device::prove_held).layer(DefaultBodyLimit::max(tenon_core::envelope::MAX_ENVELOPE_BYTES + 4096)),
        )
        .route("/device/report", post(device::report).layer(DefaultBodyLimit::max(REPORT_LIMIT)))
        .route("/device/escrow", post(device::escrow))
        .route("/device/packages/{sha256}", get(packages::download))
        .route("/device/escrow/rotations", get(device::escrow_rotations))
        .route("/device/escrow/retired", post(device::escrow_retired))
        .nest("/admin", admin)
        .route_layer(axum::middleware::from_fn(run_to_completion))
        // The check-in: memory only, nothing to protect from cancellation, and the hot path.
        .route("/device/config", get(device::config));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .nest("/api/v1", api)
        .fallback(|| async { ApiError::NotFound("no such endpoint; the API lives under /api/v1".into()) })
        .method_not_allowed_fallback(|| async {
            ApiError::MethodNotAllowed("this endpoint does not accept that method".into())
        })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

/// For a load balancer that should keep sending check-ins while the database is away: 200
/// whenever the server serves, with `degraded` in the body when the database does not answer.
async fn healthz(State(state): State<Arc<AppState>>) -> &'static str {
    if state.database_ok.load(std::sync::atomic::Ordering::Relaxed) {
        "ok"
    } else {
        "degraded: database unreachable (check-ins are answered from memory; writes answer 503)"
    }
}

/// Fails (503) while the database does not answer: for a balancer or orchestrator that should
/// send only to servers that can also write.
async fn readyz(State(state): State<Arc<AppState>>) -> Result<&'static str, ApiError> {
    if state.database_ok.load(std::sync::atomic::Ordering::Relaxed) {
        Ok("ready")
    } else {
        Err(ApiError::DatabaseUnavailable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower_service::Service;

    #[tokio::test]
    async fn while_starting_every_request_gets_503_with_retry_after() {
        for path in ["/healthz", "/api/v1/device/config", "/api/v1/admin/devices"] {
            let req = axum::http::Request::get(path).body(axum::body::Body::empty()).unwrap();
            let resp = starting_router().call(req).await.unwrap();
            assert_eq!(resp.status(), 503, "{path}");
            assert_eq!(resp.headers()["retry-after"], "1");
            let body = axum::body::to_bytes(resp.into_body(), 4096).await.unwrap();
            let problem: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(problem["code"], "starting");
            assert!(problem["detail"].as_str().unwrap().contains("starting"));
        }
    }
}
