//! The portal's handlers: each gathers what its page shows and hands it to a template
//! (`templates/portal/`, askama: every value is HTML-escaped unless a template says otherwise,
//! and none does). Writes call the same domain functions as the admin API, so their audit rows
//! are the same, naming the session's admin token.

use super::assets::{urls, AssetUrls};
use super::device_list::{self, Counts, ListQuery, SortKey};
use super::security::{csrf_matches, presented_csrf, vary_hx};
use super::sessions::{Session, SignedIn};
use super::Portal;
use crate::api::extract::ClientAddr;
use crate::api::rfc3339;
use crate::error::ApiError;
use crate::state::{ROLE_ADMIN, ROLE_RECOVERY_KEYS};
use askama::Template;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use serde_json::{Map, Value};
use sqlx::Row;
use std::collections::HashMap;
use std::sync::Arc;

// ---- shared pieces ------------------------------------------------------------------------

/// A submitted form (`application/x-www-form-urlencoded`), parsed by hand so that a malformed
/// body is a message on the page rather than a problem+json.
pub struct Form(HashMap<String, String>);

impl Form {
    pub(super) fn parse(body: &[u8]) -> Form {
        Form(url::form_urlencoded::parse(body).into_owned().collect())
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
}

/// What the header of every page needs.
pub struct Layout {
    pub title: String,
    pub assets: AssetUrls,
    pub session: Option<SessionView>,
}

/// The signed-in administrator, as pages show them (the token's name, never the token).
pub struct SessionView {
    pub name: String,
    pub csrf: String,
    /// The token has the `admin` role: the nav shows only the pages the session may open.
    pub admin: bool,
}

impl Layout {
    pub(super) fn new(title: impl Into<String>, session: Option<&Session>) -> Self {
        Layout {
            title: title.into(),
            assets: urls(),
            session: session.map(|s| SessionView {
                name: s.actor.name.clone(),
                csrf: s.csrf(),
                admin: s.actor.has_role(ROLE_ADMIN),
            }),
        }
    }
}

/// Renders a template as a page with a status. A template that fails to render (it cannot,
/// short of a bug) is an error page, never a half page.
pub(super) fn page(status: StatusCode, t: &impl Template) -> Response {
    match t.render() {
        Ok(html) => (status, Html(html)).into_response(),
        Err(e) => error_page(ApiError::Internal(anyhow::anyhow!("template: {e}"))),
    }
}

#[derive(Template)]
#[template(path = "portal/message.html")]
struct MessagePage {
    layout: Layout,
    heading: String,
    message: String,
    /// A form to try again, or a link onwards.
    link: Option<(String, String)>,
}

pub(super) fn message(
    status: StatusCode,
    session: Option<&Session>,
    heading: &str,
    text: String,
    link: Option<(&str, &str)>,
) -> Response {
    page(
        status,
        &MessagePage {
            layout: Layout::new(heading, session),
            heading: heading.to_string(),
            message: text,
            link: link.map(|(h, l)| (h.to_string(), l.to_string())),
        },
    )
}

/// An error page. Internal errors are logged with a reference and shown only by it: a page never
/// carries a query, a path on disk or a secret.
pub fn error_page(e: ApiError) -> Response {
    let status = e.status();
    let text = match &e {
        ApiError::Internal(err) => {
            let reference = crate::secrets::short_id();
            tracing::error!(reference = %reference, error = %format!("{err:#}"), "portal: internal error");
            format!("Something went wrong on the server (reference {reference}); nothing was changed. The server's log has the details.")
        }
        other => other.to_string(),
    };
    message(status, None, "Something went wrong", text, Some(("/", "Back to the overview")))
}

/// What the same-origin check answers a cross-site write.
pub fn refused_cross_site() -> Response {
    message(
        StatusCode::FORBIDDEN,
        None,
        "Request refused",
        "This form was sent from another site, so it was refused and nothing was changed. Open the portal directly and try again.".into(),
        Some(("/", "Open the portal")),
    )
}

/// `2026-12-07T10:00:00Z (3 min ago)`, or `never`.
pub(super) fn when(now: i64, t: Option<i64>) -> String {
    let Some(t) = t else { return "never".into() };
    let age = now - t;
    let ago = match age {
        i64::MIN..=-1 => "in the future".to_string(),
        0..=59 => "just now".to_string(),
        60..=3599 => format!("{} min ago", age / 60),
        3600..=86_399 => format!("{} h ago", age / 3600),
        _ => format!("{} days ago", age / 86_400),
    };
    format!("{} ({ago})", rfc3339(t))
}

pub(super) fn encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

pub(super) fn device_href(id: &str) -> String {
    format!("/devices/{}", encode(id))
}

// ---- sign-in and sign-out -----------------------------------------------------------------

#[derive(Template)]
#[template(path = "portal/signin.html")]
struct SigninPage {
    layout: Layout,
    notice: Option<String>,
    error: Option<String>,
}

fn signin_page(status: StatusCode, notice: Option<&str>, error: Option<String>) -> Response {
    page(status, &SigninPage { layout: Layout::new("Sign in", None), notice: notice.map(str::to_string), error })
}

/// `GET /signin`: the form, with why the browser was sent here.
pub async fn signin_form(State(p): State<Arc<Portal>>, headers: HeaderMap, RawQuery(q): RawQuery) -> Response {
    if let Ok(Ok(_)) = p.session(&headers).await {
        return Redirect::to("/").into_response();
    }
    let why = q
        .as_deref()
        .and_then(|q| url::form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == "why").map(|(_, v)| v.into_owned()));
    let notice = match why.as_deref() {
        Some("expired") => Some("Your session expired. Sign in again; nothing you saved was lost."),
        Some("revoked") => {
            Some("The admin token of your session was revoked, which ended the session. Sign in with another token.")
        }
        Some("signed-out") => Some("You are signed out."),
        _ => None,
    };
    signin_page(StatusCode::OK, notice, None)
}

/// `POST /signin`: exchanges a pasted admin token for a session. Rate-limited per address;
/// every refusal is audited. The token is never echoed back, not even into the form.
pub async fn signin(State(p): State<Arc<Portal>>, ClientAddr(addr): ClientAddr, body: Bytes) -> Response {
    if let Some(ip) = addr {
        if let Err(wait) = p.signin_limiter.check(&crate::ratelimit::address_key(ip), p.now_ns()) {
            let secs = wait.seconds();
            let mut resp = signin_page(
                StatusCode::TOO_MANY_REQUESTS,
                None,
                Some(format!("Too many sign-in attempts from your address. Wait {secs} seconds, then try again.")),
            );
            if let Ok(v) = secs.to_string().parse() {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
            return resp;
        }
    }
    let form = Form::parse(&body);
    let token = form.get("token").map(str::trim).unwrap_or_default();
    if token.is_empty() {
        return signin_page(StatusCode::BAD_REQUEST, None, Some("Paste an admin token to sign in.".into()));
    }
    let refused = |status: StatusCode, reason: &'static str, text: &str| {
        let (p, text) = (p.clone(), text.to_string());
        async move {
            p.app.client.auth_failed(crate::auth_failures::AuthKind::Admin, addr);
            if let Err(e) = p.audit_signin_failed(addr, reason).await {
                return error_page(e);
            }
            signin_page(status, None, Some(text))
        }
    };
    let actor = match p.app.authenticate_admin(token).await {
        Ok(actor) => actor,
        Err(ApiError::Unauthorized(_)) => {
            return refused(
                StatusCode::UNAUTHORIZED,
                "not a valid admin token",
                "That is not a valid admin token: it may be mistyped, incomplete or revoked. Paste the whole token (it starts with the admin prefix), or create one with `tenonctl admin-tokens create NAME`.",
            )
            .await
        }
        Err(e) => return error_page(e),
    };
    // A `recovery-keys`-only token signs in too: it sees devices and reveals keys, nothing else
    // (see `sessions::allowed_without_admin`).
    if !actor.has_role(ROLE_ADMIN) && !actor.has_role(ROLE_RECOVERY_KEYS) {
        return refused(
            StatusCode::FORBIDDEN,
            "token has neither the admin nor the recovery-keys role",
            "This admin token has neither the admin nor the recovery-keys role, one of which the portal needs. Sign in with a token created with `--role admin` or `--role recovery-keys`.",
        )
        .await;
    }
    match p.create_session(&actor, addr).await {
        Ok(id) => {
            let mut resp = Redirect::to("/").into_response();
            resp.headers_mut().insert(header::SET_COOKIE, p.session_cookie(&id));
            resp
        }
        Err(e) => error_page(e),
    }
}

/// `POST /signout`: ends the session (with its CSRF token: another site cannot sign you out).
pub async fn signout(State(p): State<Arc<Portal>>, SignedIn(s): SignedIn, headers: HeaderMap, body: Bytes) -> Response {
    let form = Form::parse(&body);
    if !csrf_matches(s.raw_id(), presented_csrf(&form, &headers)) {
        return csrf_refused_message(&s);
    }
    if let Err(e) = p.end_session(&s).await {
        return error_page(e);
    }
    let mut resp = Redirect::to("/signin?why=signed-out").into_response();
    resp.headers_mut().insert(header::SET_COOKIE, p.cleared_cookie());
    resp
}

pub(super) const CSRF_REFUSED: &str =
    "This form's security token does not belong to your current session (the page may be from an \
     earlier session, or the form came from somewhere else). Nothing was changed. Check the form and send it again.";

/// What a session without the `admin` role gets on a page or write that needs it.
pub fn needs_admin(s: &Session) -> Response {
    message(
        StatusCode::FORBIDDEN,
        Some(s),
        "Not allowed",
        "This needs an admin token with the admin role; yours has only the recovery-keys role, which shows devices and reveals recovery keys. Nothing was changed.".into(),
        Some(("/devices", "Go to the devices")),
    )
}

fn csrf_refused_message(s: &Session) -> Response {
    message(
        StatusCode::FORBIDDEN,
        Some(s),
        "Nothing was changed",
        CSRF_REFUSED.into(),
        Some(("/", "Back to the overview")),
    )
}

// ---- overview -----------------------------------------------------------------------------

#[derive(Template)]
#[template(path = "portal/overview.html")]
struct OverviewPage {
    layout: Layout,
    counts: Counts,
    /// (filter word, label, count) per BitLocker bucket.
    bitlocker: Vec<(&'static str, &'static str, usize)>,
}

/// `GET /`: the fleet at a glance; each number links to the devices it counts.
pub async fn overview(State(p): State<Arc<Portal>>, SignedIn(s): SignedIn) -> Response {
    let counts = {
        let world = p.app.world.read().await;
        device_list::counts(&world, p.app.now())
    };
    let bitlocker = device_list::bitlocker_cards(&counts);
    page(StatusCode::OK, &OverviewPage { layout: Layout::new("Overview", Some(&s)), counts, bitlocker })
}

// ---- devices ------------------------------------------------------------------------------

/// One row as the table shows it.
pub struct RowView {
    pub href: String,
    pub hostname: String,
    pub user: String,
    pub last_seen: String,
    pub version: u64,
    pub active: bool,
}

/// A sortable column's header: its link and whether (and how) the list is sorted by it.
pub struct ColumnView {
    pub label: &'static str,
    pub href: String,
    /// `ascending`, `descending` or `none`, for `aria-sort`.
    pub aria_sort: &'static str,
}

/// The table with its paging: rendered inside the page, or alone for htmx.
pub struct DeviceTable {
    pub q: String,
    pub sort: &'static str,
    pub dir: &'static str,
    pub columns: Vec<ColumnView>,
    pub rows: Vec<RowView>,
    pub total: usize,
    pub page: usize,
    pub pages: usize,
    pub prev: Option<String>,
    pub next: Option<String>,
    pub filters: Vec<(&'static str, &'static str, bool)>,
}

#[derive(Template)]
#[template(path = "portal/devices.html")]
struct DevicesPage {
    layout: Layout,
    table: DeviceTable,
}

#[derive(Template)]
#[template(path = "portal/devices_table.html")]
struct DevicesFragment {
    table: DeviceTable,
}

fn list_href(lq: &ListQuery, sort: SortKey, descending: bool, page: usize) -> String {
    let mut s = url::form_urlencoded::Serializer::new(String::new());
    if !lq.q.is_empty() {
        s.append_pair("q", &lq.q);
    }
    s.append_pair("filter", lq.filter.word());
    s.append_pair("sort", sort.word());
    s.append_pair("dir", if descending { "desc" } else { "asc" });
    if page > 1 {
        s.append_pair("page", &page.to_string());
    }
    if lq.per_page != device_list::DEFAULT_PER_PAGE {
        s.append_pair("per", &lq.per_page.to_string());
    }
    format!("/devices?{}", s.finish())
}

/// `GET /devices`: search, filter, sort and page in the query string; with `HX-Request` only
/// the table (the search box updates it as one types).
pub async fn devices(
    State(p): State<Arc<Portal>>,
    SignedIn(s): SignedIn,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Response {
    let pairs: Vec<(String, String)> =
        url::form_urlencoded::parse(q.as_deref().unwrap_or_default().as_bytes()).into_owned().collect();
    let lq = ListQuery::from_pairs(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let now = p.app.now();
    let listing = {
        let world = p.app.world.read().await;
        device_list::list(&world, || p.names(&world), &lq, now)
    };
    let columns = [
        ("Host name", SortKey::Hostname),
        ("Primary user", SortKey::User),
        ("Last seen", SortKey::LastSeen),
        ("Config version", SortKey::Version),
    ]
    .into_iter()
    .map(|(label, key)| {
        let sorted = lq.sort == key;
        ColumnView {
            label,
            // A sorted column's link reverses it; another column sorts ascending.
            href: list_href(&lq, key, sorted && !lq.descending, 1),
            aria_sort: match (sorted, lq.descending) {
                (false, _) => "none",
                (true, false) => "ascending",
                (true, true) => "descending",
            },
        }
    })
    .collect();
    let table = DeviceTable {
        sort: lq.sort.word(),
        dir: if lq.descending { "desc" } else { "asc" },
        columns,
        rows: listing
            .rows
            .into_iter()
            .map(|r| RowView {
                href: device_href(&r.id),
                user: match (r.primary, r.primary_name) {
                    (Some(upn), Some(name)) => format!("{name} ({upn})"),
                    (Some(upn), None) => upn,
                    (None, _) => "none".into(),
                },
                hostname: r.hostname,
                last_seen: when(now, r.last_seen),
                version: r.version,
                active: r.active,
            })
            .collect(),
        total: listing.total,
        page: listing.page,
        pages: listing.pages,
        prev: (listing.page > 1).then(|| list_href(&lq, lq.sort, lq.descending, listing.page - 1)),
        next: (listing.page < listing.pages).then(|| list_href(&lq, lq.sort, lq.descending, listing.page + 1)),
        filters: [
            ("active", "All active"),
            ("seen-24h", "Seen in the last 24 h"),
            ("stale", "Not seen in 7 days"),
            ("without-primary", "Without a primary user"),
            ("decommissioned", "Decommissioned"),
            ("primary-mismatch", "Primary user mismatch"),
            ("failing", "Sync or a policy failed"),
            ("entra-pending", "Entra escrow pending"),
            ("entra-failed", "Entra escrow failed"),
            ("bitlocker-encrypted", "BitLocker: encrypted and escrowed"),
            ("bitlocker-encrypting", "BitLocker: encrypting"),
            ("bitlocker-action-required", "BitLocker: action required"),
            ("bitlocker-not-capable", "BitLocker: not capable"),
            ("bitlocker-failed", "BitLocker: failed"),
            ("bitlocker-not-required", "BitLocker: not required"),
        ]
        .into_iter()
        .map(|(w, l)| (w, l, w == lq.filter.word()))
        .collect(),
        q: lq.q,
    };
    let resp = if headers.contains_key("hx-request") {
        page(StatusCode::OK, &DevicesFragment { table })
    } else {
        page(StatusCode::OK, &DevicesPage { layout: Layout::new("Devices", Some(&s)), table })
    };
    vary_hx(resp)
}

// ---- one device ---------------------------------------------------------------------------

pub struct PolicyView {
    pub name: String,
    pub state: String,
    pub reason: String,
    pub details: Vec<(String, String)>,
}

pub struct PackageView {
    pub name: String,
    pub state: String,
    pub version: String,
    pub detail: String,
    /// required, available or uninstall.
    pub intent: String,
    /// An install may be requested (`tenonctl devices install`): any intent but uninstall.
    pub installable: bool,
}

/// Why a stored recovery key is no longer current, for the device page and the reveal page (the
/// times as the page shows them).
pub(super) fn archived_status(superseded_at: Option<String>, retired_at: Option<String>) -> String {
    match (superseded_at, retired_at) {
        // A rotation both supersedes the old key and removes its protector: say the former.
        (Some(t), _) => format!("archived: superseded {t}"),
        (None, Some(t)) => format!("archived: protector removed {t}"),
        (None, None) => "archived: replaced by a newer upload".into(),
    }
}

/// A stored recovery key without its password (`AppState::recovery_key_metadata`).
pub struct KeyMetaView {
    pub mount: String,
    pub protector_id: String,
    pub received_at: String,
    /// "current", "current, in conflict", "superseded 3 days ago", "retired ...".
    pub status: String,
    pub current: bool,
    pub read_count: i64,
}

pub struct UserSeen {
    pub upn: String,
    pub last_seen: String,
    pub sightings: i64,
}

pub struct DeviceDetail {
    pub id: String,
    pub href: String,
    pub hostname: String,
    pub status: String,
    pub active: bool,
    pub primary: Option<String>,
    pub primary_name: Option<String>,
    pub config_version: u64,
    pub config_sha256: String,
    pub reported_version: String,
    pub last_seen: String,
    pub last_report: String,
    pub enrolled_at: String,
    pub agent_version: String,
    pub last_error: Option<String>,
    pub signed_in: Vec<String>,
    pub policies: Vec<PolicyView>,
    pub packages: Vec<PackageView>,
    pub users: Vec<UserSeen>,
    pub keys: Vec<KeyMetaView>,
    /// Archived (superseded or retired) keys among `keys`.
    pub archived_keys: usize,
}

/// The device page's forms as the administrator left them, with what the server said about them
/// (reassign, decommission, reveal recovery keys).
#[derive(Default)]
pub struct ReassignForm {
    pub upn: String,
    pub error: Option<String>,
    pub done: Option<String>,
    pub decommission_error: Option<String>,
    pub reveal_error: Option<String>,
    pub reason: String,
    /// The reveal form's "include archived keys" box, as it was left.
    pub archived: bool,
    pub install_error: Option<String>,
}

#[derive(Template)]
#[template(path = "portal/device.html")]
struct DevicePage {
    layout: Layout,
    csrf: String,
    d: DeviceDetail,
    form: ReassignForm,
    /// The session's token has `admin` (reassign, decommission) / `recovery-keys` (reveal).
    can_write: bool,
    can_reveal: bool,
}

/// A JSON value as one line of text (strings without their quotes).
pub(super) fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

async fn device_detail(p: &Portal, id: &str) -> Result<Option<DeviceDetail>, ApiError> {
    let now = p.app.now();
    let row = sqlx::query(
        "SELECT hostname, status, enrolled_at, agent_version, reported_version, last_error, signed_in_users,
                policies, packages, last_report_at
         FROM devices WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(&p.app.db)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let (primary, primary_name, version, sha, active) = {
        let world = p.app.world.read().await;
        match world.devices.get(id) {
            Some(m) => (
                m.primary.as_ref().map(|u| u.as_str().to_string()),
                m.primary.as_ref().and_then(|u| device_list::display_name(&world, u)),
                m.version,
                m.sha256.clone(),
                m.active,
            ),
            None => return Ok(None),
        }
    };
    let policies: Map<String, Value> =
        row.get::<Option<&str>, _>(7).and_then(|s| serde_json::from_str(s).ok()).unwrap_or_default();
    let policies = policies
        .into_iter()
        .map(|(name, v)| {
            let mut details: Vec<(String, String)> = v
                .as_object()
                .map(|o| {
                    o.iter()
                        .filter(|(k, _)| *k != "state" && *k != "reason")
                        .map(|(k, v)| (k.clone(), text_of(v)))
                        .collect()
                })
                .unwrap_or_default();
            details.sort();
            PolicyView {
                name,
                state: v.get("state").map(text_of).unwrap_or_else(|| "unknown".into()),
                reason: v.get("reason").map(text_of).unwrap_or_default(),
                details,
            }
        })
        .collect();
    let reported: Map<String, Value> =
        row.get::<Option<&str>, _>(8).and_then(|s| serde_json::from_str(s).ok()).unwrap_or_default();
    let packages = p
        .app
        .device_packages(id, &reported)
        .await
        .into_iter()
        .map(|(name, v)| {
            let intent = v.get("intent").map(text_of).unwrap_or_default();
            PackageView {
                name,
                state: v.get("state").map(text_of).unwrap_or_default(),
                version: v.get("version").map(text_of).unwrap_or_default(),
                detail: v.get("detail").map(text_of).unwrap_or_default(),
                installable: intent != "uninstall",
                intent,
            }
        })
        .collect();
    let keys: Vec<KeyMetaView> = p
        .app
        .recovery_key_metadata(id)
        .await?
        .into_iter()
        .map(|k| KeyMetaView {
            status: match (k.current, k.retired_at, k.superseded_at) {
                (true, _, _) if k.conflict => "current, in conflict (the device holds several passwords)".into(),
                (true, _, _) if k.rotation_open => "current; rotation requested, not yet done by the device".into(),
                (true, _, _) => "current".into(),
                (false, retired, superseded) => {
                    archived_status(superseded.map(|t| when(now, Some(t))), retired.map(|t| when(now, Some(t))))
                }
            },
            mount: k.mount,
            protector_id: k.protector_id,
            received_at: when(now, Some(k.received_at)),
            current: k.current,
            read_count: k.read_count,
        })
        .collect();
    let archived_keys = keys.iter().filter(|k| !k.current).count();
    let users = sqlx::query(
        "SELECT upn, last_seen, sightings FROM device_users WHERE device_id = $1 ORDER BY sightings DESC, upn LIMIT 50",
    )
    .bind(id)
    .fetch_all(&p.app.db)
    .await?
    .iter()
    .map(|r| UserSeen { upn: r.get(0), last_seen: when(now, Some(r.get(1))), sightings: r.get(2) })
    .collect();
    Ok(Some(DeviceDetail {
        id: id.to_string(),
        href: device_href(id),
        hostname: row.get(0),
        status: row.get(1),
        active,
        primary,
        primary_name,
        config_version: version,
        config_sha256: sha,
        reported_version: row
            .get::<Option<i64>, _>(4)
            .map(|v| v.to_string())
            .unwrap_or_else(|| "none reported yet".into()),
        last_seen: when(now, p.app.index.last_seen(id)),
        last_report: when(now, row.get::<Option<i64>, _>(9)),
        enrolled_at: when(now, Some(row.get(2))),
        agent_version: row.get::<Option<String>, _>(3).unwrap_or_default(),
        last_error: row.get(5),
        signed_in: row.get::<Option<&str>, _>(6).and_then(|s| serde_json::from_str(s).ok()).unwrap_or_default(),
        policies,
        packages,
        users,
        keys,
        archived_keys,
    }))
}

pub(super) async fn device_page(p: &Portal, s: &Session, id: &str, status: StatusCode, form: ReassignForm) -> Response {
    match device_detail(p, id).await {
        Ok(Some(d)) => page(
            status,
            &DevicePage {
                layout: Layout::new(format!("Device {}", d.hostname), Some(s)),
                csrf: s.csrf(),
                d,
                form,
                can_write: s.actor.has_role(ROLE_ADMIN),
                can_reveal: s.actor.has_role(ROLE_RECOVERY_KEYS),
            },
        ),
        Ok(None) => message(
            StatusCode::NOT_FOUND,
            Some(s),
            "No such device",
            format!("There is no device {id}. The device list shows the enrolled devices."),
            Some(("/devices", "Go to the devices")),
        ),
        Err(e) => error_page(e),
    }
}

/// `GET /devices/{id}`.
pub async fn device(
    State(p): State<Arc<Portal>>,
    SignedIn(s): SignedIn,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Response {
    // After a successful reassignment (post/redirect/get): say so once.
    let done = q.as_deref().and_then(|q| {
        q.split('&').find_map(|kv| match kv {
            "done=primary" => Some("The primary user was reassigned."),
            "done=decommissioned" => Some("The device was decommissioned."),
            "done=install" => Some("The install was requested: the device installs the package at its next sync."),
            _ => None,
        })
    });
    let form = ReassignForm { done: done.map(str::to_string), ..Default::default() };
    device_page(&p, &s, &id.to_lowercase(), StatusCode::OK, form).await
}

/// `POST /devices/{id}/primary`: reassigns the primary user, after a confirmation box. Through
/// `AppState::set_primary`, as `tenonctl devices set-primary` (the same audit row, naming the
/// session's token). Any refusal re-renders the page with the typed value kept.
pub async fn reassign_primary(
    State(p): State<Arc<Portal>>,
    SignedIn(s): SignedIn,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let id = id.to_lowercase();
    let form = Form::parse(&body);
    let upn = form.get("upn").map(str::trim).unwrap_or_default().to_string();
    let refuse = |status: StatusCode, error: String| {
        let form = ReassignForm { upn: upn.clone(), error: Some(error), ..Default::default() };
        let (p, s, id) = (&p, &s, &id);
        async move { device_page(p, s, id, status, form).await }
    };
    if !csrf_matches(s.raw_id(), presented_csrf(&form, &headers)) {
        return refuse(StatusCode::FORBIDDEN, CSRF_REFUSED.into()).await;
    }
    if upn.is_empty() {
        return refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Type the user principal name of the new primary user.".into(),
        )
        .await;
    }
    if form.get("confirm") != Some("yes") {
        return refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Tick the confirmation box to reassign the primary user; nothing was changed.".into(),
        )
        .await;
    }
    match p.app.set_primary(&s.actor, &id, Some(&upn)).await {
        Ok(()) => Redirect::to(&format!("{}?done=primary", device_href(&id))).into_response(),
        Err(e @ (ApiError::NotFound(_) | ApiError::BadRequest(_) | ApiError::Conflict(_))) => {
            let status = e.status();
            refuse(status, format!("{e} Nothing was changed.")).await
        }
        Err(e) => error_page(e),
    }
}
