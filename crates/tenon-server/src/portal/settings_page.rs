//! The settings page: one scope's settings (`tenant`, `group:NAME`, `user:UPN`), and setting or
//! removing a key in two steps: a preview that checks the value (JSON, then the settings schema)
//! and says which devices the change reaches (`AppState::devices_for_scope`), then the save,
//! through `AppState::set_setting`/`unset_setting` as `tenonctl settings set`/`unset` (the same
//! schema check and audit row, naming the session's admin token). A refusal at either step is a
//! message on the page with what the administrator typed still in the form.

use super::directory_pages::{group_href, user_href};
use super::pages::{device_href, error_page, message, page, Form, Layout, CSRF_REFUSED};
use super::security::{csrf_matches, presented_csrf};
use super::sessions::{Session, SignedIn};
use super::Portal;
use crate::error::ApiError;
use crate::state::AppState;
use askama::Template;
use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use std::sync::Arc;
use std::time::Duration;
use tenon_core::api::SettingScope;
use tenon_core::ids::{GroupName, SettingKey, Upn};
use tenon_core::schema::SETTINGS;
use tenon_core::settings::{ScopeSettings, SettingValue};

/// How many affected devices the preview names (it always gives the count).
const PREVIEW_NAMES: usize = 50;
/// How long a save waits for the re-signer before answering (the change is saved either way).
const RESIGN_WAIT: Duration = Duration::from_secs(5);

/// `tenant`, `group:NAME` or `user:UPN`, checked (a user must exist, as for `tenonctl`).
fn parse_scope(word: &str) -> Result<SettingScope, String> {
    let word = word.trim();
    if word.is_empty() || word == "tenant" {
        return Ok(SettingScope::Tenant);
    }
    if let Some(g) = word.strip_prefix("group:") {
        return GroupName::parse(g.trim()).map(|g| SettingScope::Group(g.to_string())).map_err(|e| e.to_string());
    }
    if let Some(u) = word.strip_prefix("user:") {
        return Upn::parse(u.trim()).map(|u| SettingScope::User(u.to_string())).map_err(|e| e.to_string());
    }
    Err(format!("{word:?} is not a scope: use tenant, group:NAME or user:UPN"))
}

fn scope_word(scope: &SettingScope) -> String {
    match scope {
        SettingScope::Tenant => "tenant".into(),
        SettingScope::Group(g) => format!("group:{g}"),
        SettingScope::User(u) => format!("user:{u}"),
    }
}

fn scope_title(scope: &SettingScope) -> String {
    match scope {
        SettingScope::Tenant => "the tenant".into(),
        SettingScope::Group(g) => format!("group {g}"),
        SettingScope::User(u) => format!("user {u}"),
    }
}

/// The scope's page in the directory (its members or its effective configuration).
fn scope_page(scope: &SettingScope) -> Option<String> {
    match scope {
        SettingScope::Tenant => None,
        SettingScope::Group(g) => Some(group_href(g)),
        SettingScope::User(u) => Some(user_href(u)),
    }
}

/// A setting at this scope, with the link that loads it into the form.
pub struct CurrentRow {
    pub key: String,
    pub value: String,
    pub edit_href: String,
}

/// What the form holds: as typed, with what the server said about it.
#[derive(Default)]
pub struct EditForm {
    pub key: String,
    pub value: String,
    pub error: Option<String>,
    /// Which field the error is about (`key` or `value`), for `aria-invalid`.
    pub error_field: &'static str,
}

/// The preview of a checked change, with the form that saves it.
pub struct Preview {
    /// `set` or `unset`.
    pub op: &'static str,
    pub summary: String,
    pub before: String,
    pub count: usize,
    pub devices: Vec<(String, String)>,
}

#[derive(Template)]
#[template(path = "portal/settings.html")]
struct SettingsPage {
    layout: Layout,
    csrf: String,
    scope: String,
    title: String,
    scope_href: Option<String>,
    current: Vec<CurrentRow>,
    known_keys: Vec<&'static str>,
    form: EditForm,
    preview: Option<Preview>,
    done: Option<String>,
}

fn scope_settings<'d>(dir: &'d tenon_core::directory::Directory, scope: &SettingScope) -> Option<&'d ScopeSettings> {
    match scope {
        SettingScope::Tenant => Some(&dir.tenant),
        SettingScope::Group(g) => GroupName::parse(g).ok().and_then(|g| dir.groups.get(&g)).map(|g| &g.settings),
        SettingScope::User(u) => Upn::parse(u).ok().and_then(|u| dir.users.get(&u)).map(|u| &u.settings),
    }
}

async fn render(
    p: &Portal,
    s: &Session,
    scope: &SettingScope,
    status: StatusCode,
    form: EditForm,
    preview: Option<Preview>,
    done: Option<String>,
) -> Response {
    let word = scope_word(scope);
    let current = {
        let world = p.app.world.read().await;
        scope_settings(&world.directory, scope)
            .map(|set| {
                set.iter()
                    .map(|(k, v)| {
                        let q = url::form_urlencoded::Serializer::new(String::new())
                            .append_pair("scope", &word)
                            .append_pair("key", k.as_str())
                            .finish();
                        CurrentRow { key: k.to_string(), value: v.to_text(), edit_href: format!("/settings?{q}#edit") }
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let title = scope_title(scope);
    page(
        status,
        &SettingsPage {
            layout: Layout::new(format!("Settings of {title}"), Some(s)),
            csrf: s.csrf(),
            scope: word,
            title,
            scope_href: scope_page(scope),
            current,
            known_keys: SETTINGS.iter().map(|k| k.key).collect(),
            form,
            preview,
            done,
        },
    )
}

fn bad_scope(s: &Session, why: String) -> Response {
    message(StatusCode::BAD_REQUEST, Some(s), "No such scope", why, Some(("/settings", "Go to the tenant's settings")))
}

/// A user scope names a user in the directory (as `tenonctl settings set --user` requires).
async fn check_user(p: &Portal, scope: &SettingScope) -> Result<(), String> {
    if let SettingScope::User(u) = scope {
        let exists = match Upn::parse(u) {
            Ok(u) => p.app.world.read().await.directory.users.contains_key(&u),
            Err(_) => false,
        };
        if !exists {
            return Err(format!(
                "There is no user {u} in the directory; import it first with `tenonctl users import FILE`."
            ));
        }
    }
    Ok(())
}

/// `GET /settings?scope=...[&key=K]`: the scope's settings and the form (loaded with `K`'s
/// current value when given).
pub async fn settings(State(p): State<Arc<Portal>>, SignedIn(s): SignedIn, RawQuery(q): RawQuery) -> Response {
    let pairs: Vec<(String, String)> =
        url::form_urlencoded::parse(q.as_deref().unwrap_or_default().as_bytes()).into_owned().collect();
    let get = |name: &str| pairs.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str()).unwrap_or_default();
    let scope = match parse_scope(get("scope")) {
        Ok(scope) => scope,
        Err(why) => return bad_scope(&s, why),
    };
    if let Err(why) = check_user(&p, &scope).await {
        return bad_scope(&s, why);
    }
    let mut form = EditForm { key: get("key").trim().to_string(), ..Default::default() };
    if let Ok(k) = SettingKey::parse(&form.key) {
        let world = p.app.world.read().await;
        if let Some(v) = scope_settings(&world.directory, &scope).and_then(|set| set.get(&k)) {
            form.value = v.to_text();
        }
    }
    let done = match get("done") {
        "set" | "unset" => Some(format!(
            "Saved: {} {} at {}. {} device(s) reached by this scope get their new configuration at their next sync.",
            if get("done") == "set" { "set" } else { "removed" },
            get("key"),
            scope_title(&scope),
            get("n").parse::<usize>().unwrap_or_default()
        )),
        _ => None,
    };
    render(&p, &s, &scope, StatusCode::OK, form, None, done).await
}

/// What a checked change is.
struct Change {
    key: SettingKey,
    /// `None`: remove the key at this scope.
    value: Option<SettingValue>,
}

/// Checks a change without writing it: the key, the value as JSON, the schema, and for a
/// removal that the key is set here. The error says which field is wrong.
async fn check(
    p: &Portal,
    scope: &SettingScope,
    op: &str,
    key: &str,
    value: &str,
) -> Result<Change, (&'static str, String)> {
    let key = SettingKey::parse(key).map_err(|e| ("key", format!("The key is not valid: {e}.")))?;
    match op {
        "unset" => {
            let world = p.app.world.read().await;
            if scope_settings(&world.directory, scope).is_none_or(|set| !set.contains_key(&key)) {
                return Err(("key", format!("{} has no setting {key} to remove.", scope_title(scope))));
            }
            Ok(Change { key, value: None })
        }
        _ => {
            if value.trim().is_empty() {
                return Err((
                    "value",
                    "Type a value as JSON: true, 42, \"text\" (with the quotes), [1, 2] or {\"a\": 1}.".into(),
                ));
            }
            let v = SettingValue::parse_cli(value).map_err(|e| {
                ("value", format!("The value is not JSON ({e}). Text needs double quotes, as in \"Berlin\"; write undefined to delete the key here and at weaker scopes."))
            })?;
            let tenant_wide = match scope {
                SettingScope::Tenant => true,
                SettingScope::Group(g) => GroupName::parse(g).is_ok_and(|g| g.is_all_users()),
                SettingScope::User(_) => false,
            };
            tenon_core::schema::validate_at(&key, &v, tenant_wide).map_err(|e| {
                let field =
                    if matches!(e, tenon_core::schema::SchemaError::WrongType { .. }) { "value" } else { "key" };
                (field, format!("Refused: {e}."))
            })?;
            Ok(Change { key, value: Some(v) })
        }
    }
}

/// `POST /settings`: `step=preview` checks the change and shows the devices it reaches;
/// `step=save` writes it; `step=edit` returns to the form with the values kept.
pub async fn settings_post(
    State(p): State<Arc<Portal>>,
    SignedIn(s): SignedIn,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let form = Form::parse(&body);
    let scope = match parse_scope(form.get("scope").unwrap_or_default()) {
        Ok(scope) => scope,
        Err(why) => return bad_scope(&s, why),
    };
    let key = form.get("key").map(str::trim).unwrap_or_default().to_string();
    let value = form.get("value").unwrap_or_default().to_string();
    let op = if form.get("op") == Some("unset") { "unset" } else { "set" };
    let refuse = |status: StatusCode, field: &'static str, error: String| {
        let form = EditForm { key: key.clone(), value: value.clone(), error: Some(error), error_field: field };
        let (p, s, scope) = (&p, &s, &scope);
        async move { render(p, s, scope, status, form, None, None).await }
    };
    if !csrf_matches(s.raw_id(), presented_csrf(&form, &headers)) {
        return refuse(StatusCode::FORBIDDEN, "", CSRF_REFUSED.into()).await;
    }
    if let Err(why) = check_user(&p, &scope).await {
        return refuse(StatusCode::NOT_FOUND, "", why).await;
    }
    let step = form.get("step").unwrap_or("preview");
    if step == "edit" {
        let kept = EditForm { key: key.clone(), value: value.clone(), ..Default::default() };
        return render(&p, &s, &scope, StatusCode::OK, kept, None, None).await;
    }
    let change = match check(&p, &scope, op, &key, &value).await {
        Ok(c) => c,
        Err((field, why)) => return refuse(StatusCode::UNPROCESSABLE_ENTITY, field, why).await,
    };
    if step == "save" {
        let result = match &change.value {
            Some(v) => p.app.set_setting(&s.actor, &scope, change.key.as_str(), v.clone()).await,
            None => p.app.unset_setting(&s.actor, &scope, change.key.as_str()).await,
        };
        return match result {
            Ok(ticket) => {
                // Wait briefly so the device page shows the new version when the admin looks.
                if ticket.devices > 0 {
                    let _ = p.app.resign.wait(ticket, RESIGN_WAIT).await;
                }
                let q = url::form_urlencoded::Serializer::new(String::new())
                    .append_pair("scope", &scope_word(&scope))
                    .append_pair("done", op)
                    .append_pair("key", change.key.as_str())
                    .append_pair("n", &ticket.devices.to_string())
                    .finish();
                Redirect::to(&format!("/settings?{q}")).into_response()
            }
            Err(
                e @ (ApiError::BadRequest(_) | ApiError::NotFound(_) | ApiError::Conflict(_) | ApiError::Setting(_)),
            ) => {
                let status = e.status();
                refuse(status, "", format!("{e}. Nothing was changed.")).await
            }
            Err(e) => error_page(e),
        };
    }
    // The preview: what changes, and where.
    let (before, count, devices) = {
        let world = p.app.world.read().await;
        let before = scope_settings(&world.directory, &scope)
            .and_then(|set| set.get(&change.key))
            .map(SettingValue::to_text)
            .unwrap_or_else(|| "not set here".into());
        let ids = AppState::devices_for_scope(&world, &scope);
        let mut named: Vec<(String, String)> =
            ids.iter().filter_map(|id| world.devices.get(id).map(|m| (m.hostname.clone(), device_href(id)))).collect();
        named.sort();
        named.truncate(PREVIEW_NAMES);
        (before, ids.len(), named.into_iter().map(|(h, href)| (href, h)).collect())
    };
    let summary = match &change.value {
        Some(v) => format!("Set {} to {} at {}.", change.key, v.to_text(), scope_title(&scope)),
        None => format!("Remove {} from {}.", change.key, scope_title(&scope)),
    };
    let kept = EditForm { key: key.clone(), value: value.clone(), ..Default::default() };
    let preview = Preview { op, summary, before, count, devices };
    render(&p, &s, &scope, StatusCode::OK, kept, Some(preview), None).await
}
