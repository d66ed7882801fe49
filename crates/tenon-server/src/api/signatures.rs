//! Signature template endpoints: thin handlers over `crate::signatures`.

use super::extract::{Admin, ApiJson, ApiQuery};
use crate::error::{ApiError, ApiResult};
use crate::signatures::{SignatureChange, SignatureSummary};
use crate::state::AppState;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use tenon_core::policy::signatures::{DefaultUse, SignatureTemplate};

/// The body of `PUT /admin/signatures/{name}`: a whole template (the name comes from the path).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignatureBody {
    /// Optional; when given it must match the path.
    name: Option<String>,
    html: String,
    #[serde(default)]
    txt: Option<String>,
    #[serde(default)]
    default: Option<DefaultUse>,
    groups: Vec<String>,
    /// Image file name -> content, base64.
    #[serde(default)]
    images: BTreeMap<String, String>,
}

pub async fn put_signature(
    State(state): State<Arc<AppState>>,
    Admin(actor): Admin,
    Path(name): Path<String>,
    ApiJson(body): ApiJson<SignatureBody>,
) -> ApiResult<Response> {
    if body.name.as_ref().is_some_and(|n| *n != name) {
        return Err(ApiError::BadRequest(format!(
            "the body names signature {:?} but the path names {name:?}; leave name out of the body",
            body.name.unwrap_or_default()
        )));
    }
    let t = SignatureTemplate {
        name,
        html: body.html,
        txt: body.txt,
        default: body.default,
        groups: body.groups,
        images: body.images,
    };
    let change: SignatureChange = state.put_signature(&actor, t).await?;
    let status = if change.created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, answer(&state, change).await).into_response())
}

#[derive(Deserialize)]
pub struct ListQuery {
    #[serde(default)]
    full: bool,
}

pub async fn list_signatures(
    State(state): State<Arc<AppState>>,
    Admin(_): Admin,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> ApiResult<Json<Vec<SignatureSummary>>> {
    Ok(Json(state.list_signatures(q.full).await?))
}

pub async fn remove_signature(
    State(state): State<Arc<AppState>>,
    Admin(actor): Admin,
    Path(name): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    let change = state.remove_signature(&actor, &name).await?;
    Ok(answer(&state, change).await)
}

async fn answer(state: &AppState, change: SignatureChange) -> Json<serde_json::Value> {
    let body = serde_json::json!({"name": change.name, "created": change.created, "users": change.users});
    super::admin::resign_answer(state, change.resign, body).await
}
