//! Prometheus metrics, served on their own listener (`serve --metrics-listen ADDR`, off by default)
//! so that scrapes never share the agents' port and the API never exposes them.
//!
//! What is measured:
//! - every request: `tenon_http_requests_total{route, status}` and
//!   `tenon_http_request_duration_seconds{route}` (route = the matched pattern, never the raw path,
//!   so device ids do not become label values);
//! - by outcome, for the device endpoints: `tenon_checkins_total{outcome}` (304, 200, 401, 410, ...),
//!   `tenon_enrollments_total`, `tenon_reports_total`, `tenon_escrow_uploads_total`;
//! - database commits: `tenon_db_commit_seconds{op}`;
//! - at scrape time: `tenon_devices{last_seen}` (buckets from the check-in index, in memory) and
//!   `tenon_entra_escrows{state}` (pending and failed Entra escrows as the agents last reported them).
//!
//! The hot path: every counter and histogram a request touches is registered once, the first time
//! its route is served, and found by the matched route afterwards, so recording a request allocates
//! nothing beyond what the middleware itself does. Without `--metrics-listen` no recorder is installed and every
//! handle is a no-op.

use crate::state::AppState;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics::{counter, gauge, histogram, Counter, Histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Instant;

/// Status codes that get a label of their own; the rest are counted as `other`.
const STATUSES: [(u16, &str); 16] = [
    (200, "200"),
    (201, "201"),
    (202, "202"),
    (204, "204"),
    (304, "304"),
    (400, "400"),
    (401, "401"),
    (403, "403"),
    (404, "404"),
    (408, "408"),
    (409, "409"),
    (410, "410"),
    (413, "413"),
    (429, "429"),
    (500, "500"),
    (503, "503"),
];

fn status_index(s: StatusCode) -> usize {
    STATUSES.iter().position(|(c, _)| *c == s.as_u16()).unwrap_or(STATUSES.len())
}

/// The handles of one route: a counter per status (plus `other`), its latency histogram, and the
/// per-outcome counters of the device endpoints.
struct RouteMetrics {
    by_status: Vec<Counter>,
    outcome: Option<Vec<Counter>>,
    duration: Histogram,
}

impl RouteMetrics {
    fn new(route: &str) -> Self {
        let outcome_family = match route {
            "/api/v1/device/config" => Some("tenon_checkins_total"),
            "/api/v1/enroll" => Some("tenon_enrollments_total"),
            "/api/v1/device/report" => Some("tenon_reports_total"),
            "/api/v1/device/escrow" => Some("tenon_escrow_uploads_total"),
            _ => None,
        };
        let labels = STATUSES.iter().map(|(_, l)| *l).chain(std::iter::once("other"));
        let route = route.to_string();
        Self {
            by_status: labels
                .clone()
                .map(|s| counter!("tenon_http_requests_total", "route" => route.clone(), "status" => s))
                .collect(),
            outcome: outcome_family.map(|family| labels.map(|s| counter!(family, "outcome" => s)).collect()),
            duration: histogram!("tenon_http_request_duration_seconds", "route" => route),
        }
    }

    fn record(&self, status: StatusCode, started: Instant) {
        let i = status_index(status);
        self.by_status[i].increment(1);
        if let Some(o) = &self.outcome {
            o[i].increment(1);
        }
        self.duration.record(started.elapsed().as_secs_f64());
    }
}

/// Every route's handles, by matched pattern, registered the first time the route is served (the
/// only allocation; later requests take a read lock and a map lookup).
#[derive(Default)]
pub struct HttpMetrics {
    routes: RwLock<HashMap<Arc<str>, Arc<RouteMetrics>>>,
}

impl HttpMetrics {
    fn route(&self, route: &str) -> Arc<RouteMetrics> {
        if let Some(m) = self.routes.read().unwrap_or_else(|p| p.into_inner()).get(route) {
            return m.clone();
        }
        let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
        routes.entry(Arc::from(route)).or_insert_with(|| Arc::new(RouteMetrics::new(route))).clone()
    }
}

/// The middleware: times the request and counts its status under its matched route.
pub async fn track(State(m): State<Arc<HttpMetrics>>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    // MatchedPath holds an Arc<str>: cloning it is a reference count, not an allocation.
    let route = req.extensions().get::<MatchedPath>().cloned();
    let resp = next.run(req).await;
    m.route(route.as_ref().map_or("unmatched", MatchedPath::as_str)).record(resp.status(), started);
    resp
}

/// Records how long a database commit took.
pub fn commit_took(op: &'static str, started: Instant) {
    histogram!("tenon_db_commit_seconds", "op" => op).record(started.elapsed().as_secs_f64());
}

/// Installs the Prometheus recorder; from then on every handle records.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    let latency = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
    PrometheusBuilder::new()
        .set_buckets(&latency)
        .map_err(|e| anyhow::anyhow!("metrics buckets: {e}"))?
        .install_recorder()
        .map_err(|e| anyhow::anyhow!("cannot install the metrics recorder: {e}"))
}

/// `GET /metrics` on the metrics listener: refreshes the scrape-time gauges, then renders.
pub async fn render(State((state, handle)): State<(Arc<AppState>, PrometheusHandle)>) -> Response {
    let now = state.now();
    for (bucket, n) in state.index.last_seen_buckets(now) {
        gauge!("tenon_devices", "last_seen" => bucket).set(n as f64);
    }
    match entra_escrows(&state).await {
        Ok((pending, failed)) => {
            gauge!("tenon_entra_escrows", "state" => "pending").set(pending as f64);
            gauge!("tenon_entra_escrows", "state" => "failed").set(failed as f64);
        }
        Err(e) => tracing::warn!(error = %e, "metrics: cannot count Entra escrows"),
    }
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"))],
        handle.render(),
    )
        .into_response()
}

/// Recovery-password protectors whose Entra escrow the agents last reported as pending or failed.
async fn entra_escrows(state: &AppState) -> sqlx::Result<(i64, i64)> {
    let sql = match crate::store::backend(&state.db) {
        crate::store::Backend::Sqlite => {
            "SELECT COALESCE(SUM(json_extract(p.value, '$.entra') = 'pending'), 0),
                    COALESCE(SUM(json_extract(p.value, '$.entra') = 'failed'), 0)
             FROM devices d, json_each(d.policies, '$.bitlocker.protectors') p
             WHERE d.status = 'active' AND json_valid(d.policies)"
        }
        crate::store::Backend::Postgres => {
            "SELECT COUNT(*) FILTER (WHERE p->>'entra' = 'pending'), COUNT(*) FILTER (WHERE p->>'entra' = 'failed')
             FROM devices d,
                  jsonb_array_elements(CASE WHEN jsonb_typeof(d.policies::jsonb #> '{bitlocker,protectors}') = 'array'
                                            THEN d.policies::jsonb #> '{bitlocker,protectors}' ELSE '[]'::jsonb END) p
             WHERE d.status = 'active'"
        }
    };
    sqlx::query_as(sql).fetch_one(&state.db).await
}
