//! The users and groups pages: membership, where each user comes from (a file or a directory
//! source), and a user's effective configuration with the scope each value came from
//! (`tenon_core::settings::origins`). Read from the server's memory, like the device list.

use super::pages::{device_href, message, page, Layout};
use super::sessions::SignedIn;
use super::Portal;
use askama::Template;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::Response;
use std::sync::Arc;
use tenon_core::directory::User;
use tenon_core::ids::{GroupName, Upn};
use tenon_core::settings::{Origin, ScopeSettings, BACKEND_ONLY_ROOTS};

/// Lists longer than this are cut, with a note (the search narrows them).
const LIST_LIMIT: usize = 500;

/// A path segment, percent-encoded (a group name may hold spaces: "All Users").
pub(super) fn segment(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>().replace('+', "%20")
}

pub(super) fn user_href(upn: &str) -> String {
    format!("/users/{}", segment(upn))
}

pub(super) fn group_href(name: &str) -> String {
    format!("/groups/{}", segment(name))
}

/// `/settings?scope=...` for a scope word (`tenant`, `group:NAME`, `user:UPN`).
pub(super) fn settings_href(scope: &str) -> String {
    let q: String = url::form_urlencoded::Serializer::new(String::new()).append_pair("scope", scope).finish();
    format!("/settings?{q}")
}

fn source_of(u: &User) -> String {
    u.source.clone().unwrap_or_else(|| "file".into())
}

fn display_name(u: &User) -> String {
    u.record.get("displayName").and_then(|v| v.as_str()).unwrap_or_default().to_string()
}

fn query_param(q: Option<&str>, name: &str) -> String {
    q.and_then(|q| url::form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == name).map(|(_, v)| v.into_owned()))
        .unwrap_or_default()
}

/// One setting as a scope holds it.
pub struct SettingRow {
    pub key: String,
    pub value: String,
}

fn setting_rows(s: &ScopeSettings) -> Vec<SettingRow> {
    s.iter().map(|(k, v)| SettingRow { key: k.to_string(), value: v.to_text() }).collect()
}

// ---- users --------------------------------------------------------------------------------

pub struct UserRow {
    pub href: String,
    pub upn: String,
    pub name: String,
    pub groups: Vec<(String, String)>,
    pub source: String,
}

#[derive(Template)]
#[template(path = "portal/users.html")]
struct UsersPage {
    layout: Layout,
    q: String,
    rows: Vec<UserRow>,
    total: usize,
}

/// `GET /users?q=`: the directory's users, searched by UPN or display name.
pub async fn users(State(p): State<Arc<Portal>>, SignedIn(s): SignedIn, RawQuery(q): RawQuery) -> Response {
    let q = query_param(q.as_deref(), "q").trim().to_string();
    let needle = q.to_lowercase();
    let (mut rows, total) = {
        let world = p.app.world.read().await;
        let mut matched: Vec<(&Upn, &User)> = world
            .directory
            .users
            .iter()
            .filter(|(upn, u)| {
                needle.is_empty()
                    || upn.as_str().to_lowercase().contains(&needle)
                    || display_name(u).to_lowercase().contains(&needle)
            })
            .collect();
        let total = matched.len();
        matched.sort_by(|a, b| a.0.cmp(b.0));
        let rows: Vec<UserRow> = matched
            .into_iter()
            .take(LIST_LIMIT)
            .map(|(upn, u)| UserRow {
                href: user_href(upn.as_str()),
                upn: upn.to_string(),
                name: display_name(u),
                groups: u.groups.iter().map(|g| (group_href(g.as_str()), g.to_string())).collect(),
                source: source_of(u),
            })
            .collect();
        (rows, total)
    };
    rows.shrink_to_fit();
    page(StatusCode::OK, &UsersPage { layout: Layout::new("Users", Some(&s)), q, rows, total })
}

pub struct OriginRow {
    pub path: String,
    pub value: String,
    pub origin: String,
    pub origin_href: String,
    pub server_only: bool,
}

pub struct DeviceRef {
    pub href: String,
    pub hostname: String,
    pub primary: bool,
}

#[derive(Template)]
#[template(path = "portal/user.html")]
struct UserPage {
    layout: Layout,
    upn: String,
    name: String,
    id: String,
    source: String,
    groups: Vec<(String, String)>,
    settings: Vec<SettingRow>,
    settings_href: String,
    devices: Vec<DeviceRef>,
    effective: Vec<OriginRow>,
}

/// `GET /users/{upn}`: membership, source, devices, and the effective configuration with the
/// origin of each value.
pub async fn user(State(p): State<Arc<Portal>>, SignedIn(s): SignedIn, Path(upn): Path<String>) -> Response {
    let not_found = |s| {
        message(
            StatusCode::NOT_FOUND,
            Some(s),
            "No such user",
            format!("There is no user {upn} in the directory. The users page lists them."),
            Some(("/users", "Go to the users")),
        )
    };
    let Ok(parsed) = Upn::parse(&upn) else { return not_found(&s) };
    let world = p.app.world.read().await;
    let Some(u) = world.directory.users.get(&parsed) else {
        drop(world);
        return not_found(&s);
    };
    let user_scope = format!("user:{parsed}");
    let effective = world
        .directory
        .origins_for(Some(&parsed))
        .into_iter()
        .map(|o| {
            let (origin, href) = match &o.origin {
                Origin::Tenant => ("tenant".to_string(), settings_href("tenant")),
                Origin::AllUsers => {
                    (GroupName::ALL_USERS.to_string(), settings_href(&format!("group:{}", GroupName::ALL_USERS)))
                }
                Origin::Group(g) => (format!("group {g}"), settings_href(&format!("group:{g}"))),
                Origin::User => ("user".to_string(), settings_href(&user_scope)),
            };
            let root = o.path.split('.').next().unwrap_or_default();
            OriginRow {
                server_only: BACKEND_ONLY_ROOTS.contains(&root),
                path: o.path,
                value: o.value.to_string(),
                origin,
                origin_href: href,
            }
        })
        .collect();
    let mut devices: Vec<DeviceRef> = world
        .devices
        .iter()
        .filter(|(_, m)| m.primary.as_ref() == Some(&parsed) || m.users.contains(&parsed))
        .map(|(id, m)| DeviceRef {
            href: device_href(id),
            hostname: m.hostname.clone(),
            primary: m.primary.as_ref() == Some(&parsed),
        })
        .collect();
    devices.sort_by(|a, b| b.primary.cmp(&a.primary).then_with(|| a.hostname.cmp(&b.hostname)));
    devices.truncate(LIST_LIMIT);
    let view = UserPage {
        layout: Layout::new(format!("User {parsed}"), Some(&s)),
        upn: parsed.to_string(),
        name: display_name(u),
        id: u.id.clone().unwrap_or_default(),
        source: source_of(u),
        groups: u.groups.iter().map(|g| (group_href(g.as_str()), g.to_string())).collect(),
        settings: setting_rows(&u.settings),
        settings_href: settings_href(&user_scope),
        devices,
        effective,
    };
    drop(world);
    page(StatusCode::OK, &view)
}

// ---- groups -------------------------------------------------------------------------------

pub struct GroupRow {
    pub href: String,
    pub name: String,
    /// "All Users" applies below every other group, whatever its priority says.
    pub all_users: bool,
    pub priority: i64,
    pub members: usize,
    pub settings: usize,
}

#[derive(Template)]
#[template(path = "portal/groups.html")]
struct GroupsPage {
    layout: Layout,
    rows: Vec<GroupRow>,
}

fn is_member(g: &GroupName, u: &User) -> bool {
    g.is_all_users() || u.groups.contains(g)
}

/// `GET /groups`: every group with its priority, member count and number of settings.
pub async fn groups(State(p): State<Arc<Portal>>, SignedIn(s): SignedIn) -> Response {
    let rows = {
        let world = p.app.world.read().await;
        let dir = &world.directory;
        let mut names: Vec<GroupName> = dir.groups.keys().cloned().collect();
        if !names.iter().any(GroupName::is_all_users) {
            names.insert(0, GroupName::all_users());
        }
        names
            .into_iter()
            .map(|g| GroupRow {
                href: group_href(g.as_str()),
                all_users: g.is_all_users(),
                members: dir.users.values().filter(|u| is_member(&g, u)).count(),
                priority: dir.groups.get(&g).map(|x| x.priority).unwrap_or_default(),
                settings: dir.groups.get(&g).map(|x| x.settings.len()).unwrap_or_default(),
                name: g.to_string(),
            })
            .collect()
    };
    page(StatusCode::OK, &GroupsPage { layout: Layout::new("Groups", Some(&s)), rows })
}

#[derive(Template)]
#[template(path = "portal/group.html")]
struct GroupPage {
    layout: Layout,
    name: String,
    all_users: bool,
    priority: i64,
    members: Vec<UserRow>,
    total: usize,
    settings: Vec<SettingRow>,
    settings_href: String,
}

/// `GET /groups/{name}`: the members (with their source) and the settings set on the group.
pub async fn group(State(p): State<Arc<Portal>>, SignedIn(s): SignedIn, Path(name): Path<String>) -> Response {
    let missing = |s| {
        message(
            StatusCode::NOT_FOUND,
            Some(s),
            "No such group",
            format!("There is no group {name}. The groups page lists them."),
            Some(("/groups", "Go to the groups")),
        )
    };
    let Ok(g) = GroupName::parse(&name) else { return missing(&s) };
    let world = p.app.world.read().await;
    let dir = &world.directory;
    let known = g.is_all_users() || dir.groups.contains_key(&g) || dir.users.values().any(|u| u.groups.contains(&g));
    if !known {
        drop(world);
        return missing(&s);
    }
    let mut members: Vec<(&Upn, &User)> = dir.users.iter().filter(|(_, u)| is_member(&g, u)).collect();
    members.sort_by(|a, b| a.0.cmp(b.0));
    let total = members.len();
    let view = GroupPage {
        layout: Layout::new(format!("Group {g}"), Some(&s)),
        all_users: g.is_all_users(),
        priority: dir.groups.get(&g).map(|x| x.priority).unwrap_or_default(),
        members: members
            .into_iter()
            .take(LIST_LIMIT)
            .map(|(upn, u)| UserRow {
                href: user_href(upn.as_str()),
                upn: upn.to_string(),
                name: display_name(u),
                groups: Vec::new(),
                source: source_of(u),
            })
            .collect(),
        total,
        settings: dir.groups.get(&g).map(|x| setting_rows(&x.settings)).unwrap_or_default(),
        settings_href: settings_href(&format!("group:{g}")),
        name: g.to_string(),
    };
    drop(world);
    page(StatusCode::OK, &view)
}
