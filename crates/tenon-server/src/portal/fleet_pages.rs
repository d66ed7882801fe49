//! The fleet-wide pages beyond the overview: the audit log (filtered, paged), Delivery
//! Optimization networks (from memory, as `tenonctl networks list`) and packages (as
//! `tenonctl packages list` / `packages status`).

use super::device_list;
use super::pages::{device_href, encode, error_page, message, page, text_of, Layout};
use super::sessions::SignedIn;
use super::Portal;
use crate::api::rfc3339;
use crate::error::ApiError;
use askama::Template;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::Response;
use sqlx::Row;
use std::sync::Arc;

// ---- audit log ----------------------------------------------------------------------------

const AUDIT_PER_PAGE: i64 = 100;
/// Filter values longer than this are cut (they are search words, not documents).
const MAX_FILTER: usize = 200;

/// The audit page's query string: `actor` (substring, any case), `action` (the action or its
/// prefix: `recovery_key` matches `recovery_key.read`), `from` / `to` (a day `2026-12-07`, a time
/// `2026-12-07T10:00` in UTC, or RFC 3339; `to` is exclusive, a day includes that whole day),
/// `before` (the paging cursor: show rows older than this id).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct AuditQuery {
    pub actor: String,
    pub action: String,
    pub from: String,
    pub to: String,
    pub before: Option<i64>,
}

impl AuditQuery {
    pub fn from_query(q: Option<&str>) -> Self {
        let mut out = AuditQuery::default();
        for (k, v) in url::form_urlencoded::parse(q.unwrap_or_default().as_bytes()) {
            let v: String = v.trim().chars().take(MAX_FILTER).collect();
            match k.as_ref() {
                "actor" => out.actor = v,
                "action" => out.action = v,
                "from" => out.from = v,
                "to" => out.to = v,
                "before" => out.before = v.parse().ok().filter(|n: &i64| *n > 0),
                _ => {}
            }
        }
        out
    }

    /// The query string of this filter with another cursor.
    fn href(&self, before: Option<i64>) -> String {
        let mut s = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in [("actor", &self.actor), ("action", &self.action), ("from", &self.from), ("to", &self.to)] {
            if !v.is_empty() {
                s.append_pair(k, v);
            }
        }
        if let Some(b) = before {
            s.append_pair("before", &b.to_string());
        }
        format!("/audit?{}", s.finish())
    }
}

/// A time as the filter takes it, in Unix seconds; `end_of_day` moves a bare day to its end.
pub fn parse_time(s: &str, end_of_day: bool) -> Option<i64> {
    use time::macros::format_description;
    if let Ok(d) = time::Date::parse(s, format_description!("[year]-[month]-[day]")) {
        let t = d.midnight().assume_utc().unix_timestamp();
        return Some(if end_of_day { t + 86_400 } else { t });
    }
    for fmt in [
        format_description!("[year]-[month]-[day]T[hour]:[minute]"),
        format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]"),
    ] {
        if let Ok(t) = time::PrimitiveDateTime::parse(s, fmt) {
            return Some(t.assume_utc().unix_timestamp());
        }
    }
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok().map(|t| t.unix_timestamp())
}

/// `%`, `_` and the escape character itself match literally in a `LIKE ... ESCAPE '\'`.
fn like_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

pub struct AuditRow {
    pub id: i64,
    pub at: String,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub details: String,
}

#[derive(Template)]
#[template(path = "portal/audit.html")]
struct AuditPage {
    layout: Layout,
    q: AuditQuery,
    error: Option<String>,
    rows: Vec<AuditRow>,
    newest: Option<String>,
    older: Option<String>,
}

/// `GET /audit`: newest first, a page at a time (keyset on the row id, so a page stays the same
/// while rows are added).
pub async fn audit(State(p): State<Arc<Portal>>, SignedIn(s): SignedIn, RawQuery(raw): RawQuery) -> Response {
    let q = AuditQuery::from_query(raw.as_deref());
    let mut error = None;
    let mut bound = |v: &str, end: bool, label: &str| {
        if v.is_empty() {
            return None;
        }
        let t = parse_time(v, end);
        if t.is_none() {
            error = Some(format!(
                "\"{v}\" is not a time the {label} filter understands: give a day (2026-12-07), a UTC time (2026-12-07T10:00) or an RFC 3339 time. It was ignored."
            ));
        }
        t
    };
    let from = bound(&q.from, false, "from");
    let to = bound(&q.to, true, "to");
    let rows = sqlx::query(
        "SELECT id, at, actor, action, target, details FROM audit
         WHERE ($1 IS NULL OR LOWER(actor) LIKE $1 ESCAPE '\\') AND ($2 IS NULL OR action = $3 OR action LIKE $2 ESCAPE '\\')
           AND ($4 IS NULL OR at >= $4) AND ($5 IS NULL OR at < $5) AND ($6 IS NULL OR id < $6)
         ORDER BY id DESC LIMIT $7",
    )
    .bind((!q.actor.is_empty()).then(|| format!("%{}%", like_escape(&q.actor.to_lowercase()))))
    .bind((!q.action.is_empty()).then(|| format!("{}.%", like_escape(&q.action))))
    .bind(&q.action)
    .bind(from)
    .bind(to)
    .bind(q.before)
    .bind(AUDIT_PER_PAGE + 1)
    .fetch_all(&p.app.db)
    .await;
    let rows = match rows {
        Ok(r) => r,
        Err(e) => return error_page(e.into()),
    };
    let more = rows.len() as i64 > AUDIT_PER_PAGE;
    let rows: Vec<AuditRow> = rows
        .iter()
        .take(AUDIT_PER_PAGE as usize)
        .map(|r| AuditRow {
            id: r.get(0),
            at: rfc3339(r.get(1)),
            actor: r.get(2),
            action: r.get(3),
            target: r.get::<Option<String>, _>(4).unwrap_or_default(),
            details: r.get::<Option<&str>, _>(5).unwrap_or_default().to_string(),
        })
        .collect();
    let older = more.then(|| rows.last().map(|r| q.href(Some(r.id)))).flatten();
    let newest = q.before.is_some().then(|| q.href(None));
    page(StatusCode::OK, &AuditPage { layout: Layout::new("Audit log", Some(&s)), q, error, rows, newest, older })
}

// ---- networks -----------------------------------------------------------------------------

pub struct NetworkView {
    pub group_id: String,
    pub gateway_mac: String,
    pub gateway_ip: String,
    /// (device href, host name)
    pub devices: Vec<(String, String)>,
}

#[derive(Template)]
#[template(path = "portal/networks.html")]
struct NetworksPage {
    layout: Layout,
    groups: Vec<NetworkView>,
}

/// `GET /networks`: Delivery Optimization peer groups as active devices last reported them.
pub async fn networks(State(p): State<Arc<Portal>>, SignedIn(s): SignedIn) -> Response {
    let nets = {
        let world = p.app.world.read().await;
        device_list::networks(&world)
    };
    let groups = nets
        .into_iter()
        .map(|(group_id, (mac, ip, devices))| NetworkView {
            group_id,
            gateway_mac: mac.unwrap_or_default(),
            gateway_ip: ip.unwrap_or_default(),
            devices: devices.into_iter().map(|(id, host)| (device_href(&id), host)).collect(),
        })
        .collect();
    page(StatusCode::OK, &NetworksPage { layout: Layout::new("Networks", Some(&s)), groups })
}

// ---- packages -----------------------------------------------------------------------------

pub struct PackageRow {
    pub href: String,
    pub name: String,
    pub version: String,
    pub kind: String,
    pub uploaded: String,
    pub assignments: usize,
}

#[derive(Template)]
#[template(path = "portal/packages.html")]
struct PackagesPage {
    layout: Layout,
    packages: Vec<PackageRow>,
}

/// `GET /packages`.
pub async fn packages(State(p): State<Arc<Portal>>, SignedIn(s): SignedIn) -> Response {
    let list = match p.app.list_packages().await {
        Ok(l) => l,
        Err(e) => return error_page(e),
    };
    let packages = list
        .into_iter()
        .map(|v| PackageRow {
            href: format!("/packages/{}", encode(&v.name)),
            kind: serde_json::to_value(v.kind).ok().map(|k| text_of(&k)).unwrap_or_default(),
            uploaded: format!("{} by {}", v.uploaded_at, v.uploaded_by),
            assignments: v.assignments.len(),
            name: v.name,
            version: v.version,
        })
        .collect();
    page(StatusCode::OK, &PackagesPage { layout: Layout::new("Packages", Some(&s)), packages })
}

pub struct StateGroup {
    pub state: String,
    pub count: u64,
    /// (device href, host name, version, detail)
    pub devices: Vec<(String, String, String, String)>,
}

#[derive(Template)]
#[template(path = "portal/package.html")]
struct PackagePage {
    layout: Layout,
    name: String,
    version: String,
    total: usize,
    states: Vec<StateGroup>,
}

/// `GET /packages/{name}`: counts by state and the devices in each, as `tenonctl packages status`.
pub async fn package(State(p): State<Arc<Portal>>, SignedIn(s): SignedIn, Path(name): Path<String>) -> Response {
    let status = match p.app.package_status(&name).await {
        Ok(v) => v,
        Err(ApiError::NotFound(_)) => {
            return message(
                StatusCode::NOT_FOUND,
                Some(&s),
                "No such package",
                format!("There is no package {name}."),
                Some(("/packages", "Go to the packages")),
            )
        }
        Err(e) => return error_page(e),
    };
    let hostnames: std::collections::HashMap<String, String> = {
        let world = p.app.world.read().await;
        status["devices"]
            .as_array()
            .map(|ds| {
                ds.iter()
                    .filter_map(|d| d["device_id"].as_str())
                    .filter_map(|id| world.devices.get(id).map(|m| (id.to_string(), m.hostname.clone())))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut states: Vec<StateGroup> = status["counts"]
        .as_object()
        .map(|o| {
            o.iter()
                .map(|(k, v)| StateGroup { state: k.clone(), count: v.as_u64().unwrap_or(0), devices: Vec::new() })
                .collect()
        })
        .unwrap_or_default();
    let mut total = 0;
    for d in status["devices"].as_array().into_iter().flatten() {
        let id = d["device_id"].as_str().unwrap_or_default();
        let state = d["state"].as_str().unwrap_or_default();
        let Some(g) = states.iter_mut().find(|g| g.state == state) else { continue };
        total += 1;
        g.devices.push((
            device_href(id),
            hostnames.get(id).cloned().unwrap_or_else(|| id.to_string()),
            d.get("version").map(text_of).unwrap_or_default(),
            d.get("detail").filter(|v| !v.is_null()).map(text_of).unwrap_or_default(),
        ));
    }
    for g in &mut states {
        g.devices.sort_by_key(|d| d.1.to_lowercase());
    }
    page(
        StatusCode::OK,
        &PackagePage {
            layout: Layout::new(format!("Package {name}"), Some(&s)),
            name: status["name"].as_str().unwrap_or_default().to_string(),
            version: status["version"].as_str().unwrap_or_default().to_string(),
            total,
            states,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_times_parse() {
        for (s, end, expected) in [
            ("2026-12-07", false, Some(1_796_601_600)),
            ("2026-12-07", true, Some(1_796_688_000)),
            ("2026-12-07T10:00", false, Some(1_796_637_600)),
            ("2026-12-07T10:00:00Z", false, Some(1_796_637_600)),
            ("yesterday", false, None),
            ("", false, None),
        ] {
            assert_eq!(parse_time(s, end), expected, "{s}");
        }
    }

    #[test]
    fn audit_query_round_trips() {
        let q = AuditQuery::from_query(Some("actor=ops+%26+co&action=recovery_key&from=2026-12-01&before=42&x=1"));
        assert_eq!(
            (q.actor.as_str(), q.action.as_str(), q.from.as_str(), q.before),
            ("ops & co", "recovery_key", "2026-12-01", Some(42))
        );
        assert_eq!(AuditQuery::from_query(Some(q.href(Some(7)).trim_start_matches("/audit?"))).before, Some(7));
        assert_eq!(like_escape("a%b_c\\"), "a\\%b\\_c\\\\");
    }
}
