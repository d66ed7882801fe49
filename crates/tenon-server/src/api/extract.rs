//! Request extractors that turn every malformed input into a problem+json 4xx: JSON bodies,
//! admin tokens and device credentials.

use crate::auth_failures::AuthKind;
use crate::error::ApiError;
use crate::index::{DeviceAuth, DeviceSlot};
use crate::secrets;
use crate::state::{Actor, AppState, ROLE_ADMIN};
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use serde::de::DeserializeOwned;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// A JSON body whose every failure is a problem+json that says what to fix.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Self(v)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(r: JsonRejection) -> ApiError {
    if body_timed_out(&r) {
        return ApiError::RequestTimeout(
            "the request body did not arrive in time; send it at once, on a connection that is not stalled".into(),
        );
    }
    match r.status() {
        StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::PayloadTooLarge("request body is larger than this endpoint accepts; send less at a time".into())
        }
        StatusCode::UNSUPPORTED_MEDIA_TYPE => {
            ApiError::UnsupportedMediaType("send the body as JSON with Content-Type: application/json".into())
        }
        _ => match r {
            JsonRejection::JsonDataError(e) => {
                ApiError::BadRequest(format!("request body has the wrong shape: {}", e.body_text()))
            }
            JsonRejection::JsonSyntaxError(e) => {
                ApiError::BadRequest(format!("request body is not valid JSON: {}", e.body_text()))
            }
            other => ApiError::BadRequest(format!("request body could not be read: {}", other.body_text())),
        },
    }
}

/// Whether reading the body failed because the listener's body-read timeout fired.
fn body_timed_out(r: &JsonRejection) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(r);
    while let Some(e) = source {
        if e.is::<crate::listener::BodyReadTimedOut>() {
            return true;
        }
        source = e.source();
    }
    false
}

/// The peer's address, as the listener recorded it (absent when the router is driven in-process,
/// where no per-address limit applies).
pub struct ClientAddr(pub Option<IpAddr>);

impl ClientAddr {
    pub fn of(parts: &Parts) -> Option<IpAddr> {
        parts.extensions.get::<axum::extract::ConnectInfo<SocketAddr>>().map(|c| c.0.ip())
    }
}

impl<S: Send + Sync> FromRequestParts<S> for ClientAddr {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Infallible> {
        Ok(Self(Self::of(parts)))
    }
}

fn bearer(parts: &Parts) -> Option<&str> {
    let v = parts.headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token.trim())
}

/// An authenticated administrator with the `admin` role (every admin endpoint but the
/// recovery-key read, which checks its own role and audits refusals).
pub struct Admin(pub Actor);

impl FromRequestParts<Arc<AppState>> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, ApiError> {
        let AdminToken(actor) = AdminToken::from_request_parts(parts, state).await?;
        if !actor.has_role(ROLE_ADMIN) {
            return Err(ApiError::Forbidden(format!(
                "this admin token lacks the {ROLE_ADMIN} role; use a token created with `tenonctl admin-tokens create NAME --role {ROLE_ADMIN}`"
            )));
        }
        Ok(Admin(actor))
    }
}

/// A valid admin token, whatever its roles; the handler decides.
pub struct AdminToken(pub Actor);

impl FromRequestParts<Arc<AppState>> for AdminToken {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, ApiError> {
        let failed = || state.client.auth_failed(AuthKind::Admin, ClientAddr::of(parts));
        let Some(token) = bearer(parts) else {
            failed();
            return Err(ApiError::Unauthorized(
                "missing admin token: send Authorization: Bearer <token> (tenonctl --token)".into(),
            ));
        };
        let result = state.authenticate_admin(token).await.map(AdminToken);
        if matches!(result, Err(ApiError::Unauthorized(_))) {
            failed();
        }
        result
    }
}

/// An authenticated, active device.
pub struct Device {
    pub id: String,
    pub slot: Arc<DeviceSlot>,
}

impl FromRequestParts<Arc<AppState>> for Device {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, ApiError> {
        authenticate_device(parts, state)
    }
}

/// The check-in path's authentication: header parse, one hash, one map lookup, no allocation
/// beyond the returned id.
pub fn authenticate_device(parts: &Parts, state: &AppState) -> Result<Device, ApiError> {
    let invalid = || {
        state.client.auth_failed(AuthKind::Device, ClientAddr::of(parts));
        ApiError::Unauthorized(
            "device credential is missing or not valid; re-enroll the device with `tenon-agent enroll`".into(),
        )
    };
    let token = bearer(parts).ok_or_else(invalid)?;
    let (id, secret, rest) = secrets::split_token(token, secrets::DEVICE_PREFIX).ok_or_else(invalid)?;
    if rest.is_some() {
        return Err(invalid());
    }
    match state.index.authenticate(id, &secrets::digest_secret(secret)) {
        DeviceAuth::Ok(slot) => Ok(Device { id: id.to_string(), slot }),
        DeviceAuth::Unknown => Err(invalid()),
        DeviceAuth::Revoked => Err(ApiError::Gone(
            "this device was decommissioned by an administrator and its credential revoked; re-enroll it with a new enrollment token".into(),
        )),
    }
}

/// A query string whose failures are problem+json.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(v)| Self(v))
            .map_err(|e| ApiError::BadRequest(format!("query string is not valid: {}", e.body_text())))
    }
}
