//! Package endpoints: thin handlers over `crate::packages`, and the device's content download.

use super::extract::{Admin, ApiJson, ApiQuery, Device};
use crate::error::{ApiError, ApiResult};
use crate::packages::{content::is_sha256, PackageChange, PackageView, UploadMeta};
use crate::state::AppState;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::Value;
use std::sync::Arc;
use tenon_core::packages::{Intent, Target, Users};

#[derive(Deserialize)]
pub struct UploadQuery {
    /// The package's description, JSON ([`UploadMeta`]).
    meta: String,
}

/// `POST /admin/packages?meta=JSON` with the content as the body (streamed to disk, never held
/// in memory).
pub async fn upload(
    State(state): State<Arc<AppState>>,
    Admin(actor): Admin,
    ApiQuery(q): ApiQuery<UploadQuery>,
    body: Body,
) -> ApiResult<Response> {
    let meta: UploadMeta = serde_json::from_str(&q.meta)
        .map_err(|e| ApiError::BadRequest(format!("the package description (meta) is not valid: {e}")))?;
    let change = state.upload_package(&actor, meta, body).await?;
    let created = change.body["created"].as_bool() == Some(true);
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, answer(&state, change).await).into_response())
}

/// `POST /admin/packages/check` with the description as the JSON body: the checks an upload
/// makes before its content, without content.
pub async fn check(
    State(state): State<Arc<AppState>>,
    Admin(_): Admin,
    ApiJson(meta): ApiJson<UploadMeta>,
) -> ApiResult<Json<Value>> {
    state.check_upload(&meta).await?;
    Ok(Json(serde_json::json!({"ok": true})))
}

pub async fn list(State(state): State<Arc<AppState>>, Admin(_): Admin) -> ApiResult<Json<Vec<PackageView>>> {
    Ok(Json(state.list_packages().await?))
}

pub async fn show(
    State(state): State<Arc<AppState>>,
    Admin(_): Admin,
    Path(name): Path<String>,
) -> ApiResult<Json<PackageView>> {
    Ok(Json(state.show_package(&name).await?))
}

pub async fn remove(
    State(state): State<Arc<AppState>>,
    Admin(actor): Admin,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    let change = state.remove_package(&actor, &name).await?;
    Ok(answer(&state, change).await)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssignBody {
    target: Target,
    #[serde(default = "required")]
    intent: Intent,
    #[serde(default)]
    users: Users,
}

fn required() -> Intent {
    Intent::Required
}

pub async fn assign(
    State(state): State<Arc<AppState>>,
    Admin(actor): Admin,
    Path(name): Path<String>,
    ApiJson(b): ApiJson<AssignBody>,
) -> ApiResult<Json<Value>> {
    let change = state.assign_package(&actor, &name, b.target, b.intent, b.users).await?;
    Ok(answer(&state, change).await)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnassignBody {
    target: Target,
}

pub async fn unassign(
    State(state): State<Arc<AppState>>,
    Admin(actor): Admin,
    Path(name): Path<String>,
    ApiJson(b): ApiJson<UnassignBody>,
) -> ApiResult<Json<Value>> {
    let change = state.unassign_package(&actor, &name, b.target).await?;
    Ok(answer(&state, change).await)
}

pub async fn status(
    State(state): State<Arc<AppState>>,
    Admin(_): Admin,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(state.package_status(&name).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstallBody {
    package: String,
}

pub async fn install(
    State(state): State<Arc<AppState>>,
    Admin(actor): Admin,
    Path(id): Path<String>,
    ApiJson(b): ApiJson<InstallBody>,
) -> ApiResult<Json<Value>> {
    Ok(Json(state.request_install(&actor, &id.to_lowercase(), &b.package).await?))
}

async fn answer(state: &AppState, change: PackageChange) -> Json<Value> {
    super::admin::resign_answer(state, change.resign, change.body).await
}

/// `GET /device/packages/{sha256}`: content of the device's plan, with `Range` support (an
/// interrupted download resumes). Content outside the device's plan is refused like unknown
/// content, so a device cannot probe what others are sent.
pub async fn download(
    State(state): State<Arc<AppState>>,
    device: Device,
    Path(sha256): Path<String>,
    req: Request,
) -> ApiResult<Response> {
    let sha256 = sha256.to_ascii_lowercase();
    let refused = || {
        ApiError::NotFound(
            "no such content in this device's package plan; the agent fetches only what its signed plan names".into(),
        )
    };
    if !is_sha256(&sha256) {
        return Err(refused());
    }
    {
        let world = state.world.read().await;
        crate::packages::planned_content(&world, &device.id, &sha256).ok_or_else(refused)?;
    }
    let store = state
        .content
        .as_deref()
        .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("this server was started without a package directory")))?;
    if !store.has(&sha256) {
        tracing::error!(sha256 = %sha256, "package content named in a plan is missing from the package directory");
        return Err(ApiError::Unavailable {
            detail: "this server does not hold that content (with several servers, the package directory must be shared); try again later".into(),
            retry_after_secs: 300,
        });
    }
    let path = store.path_of(&sha256);
    // Without an extension the file is served as application/octet-stream.
    let mut serve = tower_http::services::ServeFile::new(&path);
    let resp = tower_service::Service::call(&mut serve, req)
        .await
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("serving package content failed: {e}")))?;
    Ok(resp.map(Body::new))
}
