//! Directory source endpoints: thin handlers over `crate::directory`. A sync answers as it goes:
//! one JSON line per page read (`{"progress": ...}`), `{"waiting": ...}` while another sync runs,
//! `{"heartbeat": SECONDS}` every 10 s, then `{"result": ...}` or `{"error": ...}`.

use super::admin::rfc3339;
use super::extract::{Admin, ApiJson, ApiQuery};
use crate::directory::sources::{AddSource, SourceRow, FILE_SOURCE};
use crate::error::ApiResult;
use crate::state::AppState;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

#[derive(Deserialize, Default)]
pub struct AddQuery {
    #[serde(default)]
    replace: bool,
}

pub async fn add(
    State(state): State<Arc<AppState>>,
    Admin(actor): Admin,
    ApiQuery(q): ApiQuery<AddQuery>,
    ApiJson(req): ApiJson<AddSource>,
) -> ApiResult<Response> {
    let v = state.add_source(&actor, req, q.replace).await?;
    let status = if q.replace { StatusCode::OK } else { StatusCode::CREATED };
    Ok((status, Json(v)).into_response())
}

fn row_json(s: &SourceRow) -> Value {
    json!({
        "name": s.name,
        "kind": s.config.kind(),
        "config": s.config.summary(),
        "interval_secs": s.interval_secs,
        "has_secret": s.sealed_secret.is_some(),
    })
}

pub async fn list(State(state): State<Arc<AppState>>, Admin(_): Admin) -> ApiResult<Json<Value>> {
    let mut out: Vec<Value> = state.list_sources().await?.iter().map(row_json).collect();
    if let Some(file) = file_source(&state).await {
        out.push(json!({"name": FILE_SOURCE, "kind": FILE_SOURCE, "config": {}, "interval_secs": null,
                        "has_secret": false, "users": file}));
    }
    Ok(Json(Value::Array(out)))
}

/// Users imported with `tenonctl users import` (the `file` source), if any.
async fn file_source(state: &AppState) -> Option<usize> {
    let world = state.world.read().await;
    let n = world.directory.users.values().filter(|u| u.source.is_none() && !u.record.is_null()).count();
    (n > 0).then_some(n)
}

pub async fn status(State(state): State<Arc<AppState>>, Admin(_): Admin) -> ApiResult<Json<Value>> {
    let mut out: Vec<Value> = state
        .list_sources()
        .await?
        .iter()
        .map(|s| {
            json!({
                "name": s.name,
                "kind": s.config.kind(),
                "last_success": s.last_success_at.map(rfc3339),
                "last_run": s.last_run_at.map(rfc3339),
                "last_error": s.last_error,
                "users": s.users,
                "groups": s.groups,
                "skipped_without_upn": s.skipped,
                "held_deletions": s.held_deletions.len(),
                "collisions": s.collisions,
                "next_run": rfc3339(s.next_run().max(state.now())),
                "interval_secs": s.interval_secs,
            })
        })
        .collect();
    if let Some(n) = file_source(&state).await {
        out.push(json!({"name": FILE_SOURCE, "kind": FILE_SOURCE, "last_success": null, "last_run": null,
                        "last_error": null, "users": n, "groups": null, "skipped_without_upn": 0,
                        "held_deletions": 0, "collisions": [], "next_run": null, "interval_secs": null}));
    }
    Ok(Json(Value::Array(out)))
}

#[derive(Deserialize, Default)]
pub struct SyncQuery {
    #[serde(default)]
    accept_deletions: bool,
}

/// How often a running sync's answer says it is alive (well under the listener's idle timeout).
const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(10);

/// The lines of a sync's answer, as they are produced.
struct Lines(tokio::sync::mpsc::UnboundedReceiver<Bytes>);

impl futures_util::Stream for Lines {
    type Item = Result<Bytes, std::convert::Infallible>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_recv(cx).map(|o| o.map(Ok))
    }
}

fn line(v: Value) -> Bytes {
    let mut s = v.to_string();
    s.push('\n');
    Bytes::from(s)
}

/// `POST /admin/directory/sources/{name}/sync[?accept_deletions=true]`: runs the sync now. The
/// answer is 200 with `application/x-ndjson` once the source is found; the last line says how
/// it ended.
pub async fn sync(
    State(state): State<Arc<AppState>>,
    Admin(actor): Admin,
    Path(name): Path<String>,
    ApiQuery(q): ApiQuery<SyncQuery>,
) -> ApiResult<Response> {
    state.load_source(&name).await?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let label = actor.label();
    tokio::spawn(async move {
        if state.directory_sync.try_lock().is_err() {
            let _ = tx.send(line(
                json!({"waiting": "another directory sync is running on this server; this one starts when it ends"}),
            ));
        }
        let progress_tx = tx.clone();
        let progress = move |p: tenon_core::dirsync::SyncProgress| {
            let _ = progress_tx.send(line(json!({"progress": p})));
        };
        let sync = state.sync_source(&label, &name, q.accept_deletions, &progress);
        tokio::pin!(sync);
        // A line now and then while nothing else moves (waiting for another sync, a slow page,
        // applying a large batch): the listener closes connections on which no byte moves.
        let started = std::time::Instant::now();
        let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + HEARTBEAT, HEARTBEAT);
        let end = loop {
            tokio::select! {
                r = &mut sync => break r,
                _ = heartbeat.tick() => {
                    let _ = tx.send(line(json!({"heartbeat": started.elapsed().as_secs()})));
                }
            }
        };
        let end = match end {
            Ok(report) => json!({"result": report}),
            Err(failure) => json!({"error": failure}),
        };
        let _ = tx.send(line(end));
    });
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(Lines(rx))).into_response())
}

pub async fn remove(
    State(state): State<Arc<AppState>>,
    Admin(actor): Admin,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(state.remove_source(&actor, &name).await?))
}
