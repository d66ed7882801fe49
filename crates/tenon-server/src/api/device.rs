//! Device endpoints: enrollment, the check-in (the hot path), the trust chain, reports and
//! recovery-key escrow.

use super::extract::{authenticate_device, ApiJson, ClientAddr, Device};
use crate::auth_failures::AuthKind;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use axum::extract::rejection::StringRejection;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::json;
use std::sync::Arc;
use tenon_core::api::{DeviceReport, EnrollRequest, EnrollResponse, TrustBundle};
use tenon_core::policy::escrow::{escrow_public_key, sign_escrow_key, EscrowReceipt, EscrowRetired, EscrowUpload};

pub async fn enroll(
    State(state): State<Arc<AppState>>,
    ClientAddr(source): ClientAddr,
    ApiJson(req): ApiJson<EnrollRequest>,
) -> ApiResult<Response> {
    let token_id = crate::secrets::split_token(&req.token, crate::secrets::ENROLL_PREFIX).map(|(id, _, _)| id);
    state.client.check_enroll(token_id, source)?;
    let enrolled = state.enroll(&req.token, &req.hostname, &req.agent_version).await;
    if matches!(enrolled, Err(ApiError::Unauthorized(_))) {
        state.client.auth_failed(AuthKind::Enrollment, source);
    }
    let (device_id, credential) = enrolled?;
    tracing::info!(device = %device_id, hostname = %req.hostname, "device enrolled");
    let escrow_public = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(state.keys.escrow.current));
    let body = EnrollResponse {
        device_id: device_id.to_string(),
        credential,
        trust: state.keys.trust_bundle(),
        escrow_public_key: Some(B64.encode(escrow_public.as_bytes())),
        server_time: state.now(),
    };
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// The check-in. An unchanged device gets 304 from memory: no database, no body.
pub async fn config(State(state): State<Arc<AppState>>, device: Device, headers: HeaderMap) -> Response {
    device.slot.touch(state.now());
    let current = device.slot.current();
    let unchanged = headers
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes().split(|b| *b == b',').any(|t| t.trim_ascii() == current.etag.as_bytes()));
    let cache = HeaderValue::from_static("no-cache");
    if unchanged {
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, current.etag.clone()), (header::CACHE_CONTROL, cache)])
            .into_response();
    }
    (
        StatusCode::OK,
        [
            (header::ETAG, current.etag.clone()),
            (header::CACHE_CONTROL, cache),
            (header::CONTENT_TYPE, HeaderValue::from_static("application/json")),
        ],
        current.bytes.clone(),
    )
        .into_response()
}

pub async fn trust(State(state): State<Arc<AppState>>, _device: Device) -> Json<TrustBundle> {
    Json(state.keys.trust_bundle())
}

/// The trust bundle without a credential: the root public key and the key lists are public, and an
/// agent checks the root against its enrollment token's fingerprint before it sends the token.
pub async fn public_trust(State(state): State<Arc<AppState>>) -> Json<TrustBundle> {
    Json(state.keys.trust_bundle())
}

/// `POST /api/v1/device/config/held`: the envelope the device holds, sent when the server's looked
/// older (see `AppState::prove_held_envelope`). Answers the ETag to fetch next.
pub async fn prove_held(
    State(state): State<Arc<AppState>>,
    device: Device,
    body: Result<String, StringRejection>,
) -> ApiResult<Response> {
    let body = body.map_err(|r| match r.status() {
        StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::PayloadTooLarge("the envelope is larger than any envelope this server issues".into())
        }
        _ => ApiError::BadRequest(format!("the envelope could not be read: {}", r.body_text())),
    })?;
    let etag = state.prove_held_envelope(&device.id, &body).await?;
    Ok((StatusCode::OK, Json(json!({ "etag": etag }))).into_response())
}

/// A device that may send a report now: authenticated, within the report rates per device and
/// per address, with a body no larger than the cap (all checked before the body is read).
pub struct ReportingDevice(Device);

impl FromRequestParts<Arc<AppState>> for ReportingDevice {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, ApiError> {
        let device = authenticate_device(parts, state)?;
        state.client.check_report(&device.id, ClientAddr::of(parts))?;
        // Refuse an announced oversized body before reading any of it (a chunked one is cut off
        // by the route's body limit as it arrives).
        let announced = parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if announced.is_some_and(|n| n > super::REPORT_LIMIT as u64) {
            return Err(ApiError::PayloadTooLarge(format!(
                "a report is at most {} KiB; send only the policy statuses and a short error",
                super::REPORT_LIMIT / 1024
            )));
        }
        Ok(Self(device))
    }
}

/// A report. Its size is capped by the route's body limit, its rate by [`ReportingDevice`].
pub async fn report(
    State(state): State<Arc<AppState>>,
    ReportingDevice(device): ReportingDevice,
    ApiJson(report): ApiJson<DeviceReport>,
) -> ApiResult<Response> {
    let checked = report.check().map_err(|e| ApiError::BadRequest(format!("report refused: {e}")))?;
    let etag = state.record_report(&device.id, report, checked).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "etag": etag }))).into_response())
}

/// Escrows a sealed recovery key. 201 with the receipt only once the key is committed.
pub async fn escrow(
    State(state): State<Arc<AppState>>,
    device: Device,
    ApiJson(upload): ApiJson<EscrowUpload>,
) -> ApiResult<(StatusCode, Json<EscrowReceipt>)> {
    let receipt = state.escrow_upload(&device.id, &upload).await?;
    Ok((StatusCode::CREATED, Json(receipt)))
}

/// The protectors whose keys an administrator read and the device should rotate, those with
/// conflicting escrowed passwords, and the current escrow key, signed.
pub async fn escrow_rotations(
    State(state): State<Arc<AppState>>,
    device: Device,
) -> ApiResult<Json<serde_json::Value>> {
    let (rotations, conflicts) = state.escrow_rotations(&device.id).await?;
    // The current escrow key, signed, so agents move to it after `rotate-escrow-key`.
    let escrow_key = sign_escrow_key(&state.keys.signing, &escrow_public_key(&state.keys.escrow.current));
    Ok(Json(json!({ "rotations": rotations, "escrow_key": escrow_key, "conflicts": conflicts })))
}

/// The device reports a recovery protector gone from its volume: only this completes a rotation.
pub async fn escrow_retired(
    State(state): State<Arc<AppState>>,
    device: Device,
    ApiJson(retired): ApiJson<EscrowRetired>,
) -> ApiResult<Json<serde_json::Value>> {
    let rotation_completed = state.escrow_retired(&device.id, &retired).await?;
    Ok(Json(json!({ "protector_id": retired.protector_id, "rotation_completed": rotation_completed })))
}
