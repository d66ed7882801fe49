//! The signatures page: the Outlook signature templates, uploading (creating or replacing) one
//! through `AppState::put_signature` as `tenonctl signatures set` (the same validation, limits
//! and audit row, naming the session's admin token), removing one after a confirmation box as
//! `tenonctl signatures remove`, and a preview rendered for a chosen directory user with
//! tenon-core's renderer, exactly as the agent writes the files.
//!
//! The HTML and text are pasted into text areas (no multipart upload: the portal's forms are
//! urlencoded and small, and a template's images come from `tenonctl signatures set`, which reads
//! them beside the `.htm`). Replacing a template keeps the images its new HTML still references.

use super::directory_pages::{group_href, user_href};
use super::pages::{encode, error_page, message, page, Form, Layout, CSRF_REFUSED};
use super::security::{csrf_matches, presented_csrf, PREVIEW_CSP, SIGNATURES_PAGE_CSP};
use super::sessions::{Session, SignedIn};
use super::Portal;
use crate::error::ApiError;
use askama::Template;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use base64::Engine;
use std::collections::BTreeMap;
use std::sync::Arc;
use tenon_core::ids::{GroupName, Upn};
use tenon_core::policy::signatures::{
    directory_values, file_base, image_file_name, image_href, image_references, link_images, render, DefaultUse,
    SignatureTemplate,
};

/// How many directory users the preview's user field suggests (any UPN can be typed).
const USER_SUGGESTIONS: usize = 500;

pub(super) fn signature_href(name: &str) -> String {
    format!("/signatures/{}", encode(name).replace('+', "%20"))
}

/// One template in the list.
pub struct TemplateRow {
    pub name: String,
    pub href: String,
    pub groups: Vec<(String, String)>,
    pub default: String,
    pub size: String,
    pub images: Vec<String>,
    pub updated_at: String,
}

/// The upload form as the administrator left it, with what the server said about it.
#[derive(Default)]
pub struct UploadForm {
    pub name: String,
    pub html: String,
    pub txt: String,
    pub default: String,
    pub groups: String,
    pub error: Option<String>,
}

#[derive(Template)]
#[template(path = "portal/signatures.html")]
struct SignaturesPage {
    layout: Layout,
    csrf: String,
    rows: Vec<TemplateRow>,
    form: UploadForm,
    done: Option<String>,
}

/// A rendered preview for one user.
pub struct PreviewView {
    pub upn: String,
    pub user_href: String,
    pub frame_src: String,
    pub html_source: String,
    pub txt: String,
    pub unknown: Vec<String>,
    /// The user is not in any of the template's groups: the agent would not write it for them.
    pub not_assigned: bool,
}

#[derive(Template)]
#[template(path = "portal/signature.html")]
struct SignaturePage {
    layout: Layout,
    csrf: String,
    row: TemplateRow,
    edit_href: String,
    user: String,
    users: Vec<String>,
    user_error: Option<String>,
    preview: Option<PreviewView>,
    remove_error: Option<String>,
    done: Option<String>,
}

fn kib(bytes: usize) -> String {
    if bytes < 1024 {
        format!("{bytes} B")
    } else {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    }
}

fn default_word(d: Option<DefaultUse>) -> &'static str {
    match d {
        None => "none",
        Some(DefaultUse::New) => "new",
        Some(DefaultUse::Reply) => "reply",
        Some(DefaultUse::Both) => "both",
    }
}

async fn rows(p: &Portal) -> Result<Vec<TemplateRow>, ApiError> {
    Ok(p.app
        .list_signatures(false)
        .await?
        .into_iter()
        .map(|t| TemplateRow {
            href: signature_href(&t.name),
            groups: t.groups.iter().map(|g| (g.clone(), group_href(g))).collect(),
            default: t.default.unwrap_or_else(|| "none".into()),
            size: format!(
                "{} HTML{}{}",
                kib(t.html_bytes),
                if t.has_txt { ", text version" } else { "" },
                if t.images.is_empty() { String::new() } else { format!(", images {}", kib(t.images.values().sum())) }
            ),
            images: t.images.iter().map(|(n, size)| format!("{n} ({})", kib(*size))).collect(),
            updated_at: t.updated_at,
            name: t.name,
        })
        .collect())
}

async fn list_page(p: &Portal, s: &Session, status: StatusCode, form: UploadForm, done: Option<String>) -> Response {
    match rows(p).await {
        Ok(rows) => page(
            status,
            &SignaturesPage { layout: Layout::new("Signatures", Some(s)), csrf: s.csrf(), rows, form, done },
        ),
        Err(e) => error_page(e),
    }
}

fn query_pairs(q: Option<&str>) -> Vec<(String, String)> {
    url::form_urlencoded::parse(q.unwrap_or_default().as_bytes()).into_owned().collect()
}

/// `GET /signatures[?edit=NAME]`: the templates and the upload form (loaded with `NAME` to
/// replace it).
pub async fn signatures(State(p): State<Arc<Portal>>, SignedIn(s): SignedIn, RawQuery(q): RawQuery) -> Response {
    let pairs = query_pairs(q.as_deref());
    let get = |name: &str| pairs.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str()).unwrap_or_default();
    let mut form = UploadForm { default: "none".into(), ..Default::default() };
    if !get("edit").is_empty() {
        let world = p.app.world.read().await;
        if let Some(t) = world.directory.signatures.iter().find(|t| t.name == get("edit")) {
            form = UploadForm {
                name: t.name.clone(),
                html: t.html.clone(),
                txt: t.txt.clone().unwrap_or_default(),
                default: default_word(t.default).into(),
                groups: t.groups.join(", "),
                error: None,
            };
        }
    }
    let done = match get("done") {
        "removed" => {
            Some(format!("Removed signature {}. Its users' devices delete its files at their next sync.", get("name")))
        }
        _ => None,
    };
    list_page(&p, &s, StatusCode::OK, form, done).await
}

/// The template the form describes, as `tenonctl signatures set` builds it: groups and default
/// left out keep an existing template's (a new one goes to "All Users"); images are the existing
/// template's that the new HTML still references, and a reference to any other image is refused
/// (as `tenonctl` refuses a missing image file).
fn template_of(form: &UploadForm, existing: Option<&SignatureTemplate>) -> Result<SignatureTemplate, String> {
    let name = form.name.trim().to_string();
    if name.is_empty() {
        return Err("Type the template's name (its file name in Outlook, without .htm).".into());
    }
    if form.html.trim().is_empty() {
        return Err("Paste the template's HTML (the .htm file Word or an editor saved).".into());
    }
    let default = match form.default.trim() {
        "" => existing.and_then(|e| e.default),
        "none" => None,
        d => Some(d.parse::<DefaultUse>().map_err(|e| format!("Default use: {e} or none."))?),
    };
    let mut groups: Vec<String> =
        form.groups.split([',', '\n']).map(str::trim).filter(|g| !g.is_empty()).map(str::to_string).collect();
    if groups.is_empty() {
        groups = existing.map(|e| e.groups.clone()).unwrap_or_else(|| vec![GroupName::ALL_USERS.to_string()]);
    }
    let mut images = BTreeMap::new();
    for reference in image_references(&form.html) {
        let file = image_file_name(&reference);
        match existing.and_then(|e| e.images.iter().find(|(n, _)| n.eq_ignore_ascii_case(file))) {
            Some((n, data)) => {
                images.insert(n.clone(), data.clone());
            }
            None => {
                return Err(format!(
                    "The HTML references the image {reference:?}, which this template does not have. The portal takes HTML and text only; upload a template with its images with `tenonctl signatures set {name} --html FILE.htm` (it reads the images beside the file), or point the reference at an https: address."
                ))
            }
        }
    }
    let txt = (!form.txt.trim().is_empty()).then(|| form.txt.clone());
    Ok(SignatureTemplate { name, html: form.html.clone(), txt, default, groups, images })
}

/// `POST /signatures`: creates or replaces a template. A refusal re-renders the form with
/// everything typed kept.
pub async fn upload(State(p): State<Arc<Portal>>, SignedIn(s): SignedIn, headers: HeaderMap, body: Bytes) -> Response {
    let f = Form::parse(&body);
    let field = |k: &str| f.get(k).unwrap_or_default().to_string();
    let mut form = UploadForm {
        name: field("name"),
        // Browsers send a text area's line breaks as CRLF; templates are stored as typed.
        html: field("html").replace("\r\n", "\n"),
        txt: field("txt").replace("\r\n", "\n"),
        default: field("default"),
        groups: field("groups"),
        error: None,
    };
    let refuse = |status: StatusCode, mut form: UploadForm, error: String| {
        form.error = Some(error);
        let (p, s) = (&p, &s);
        async move { list_page(p, s, status, form, None).await }
    };
    if !csrf_matches(s.raw_id(), presented_csrf(&f, &headers)) {
        return refuse(StatusCode::FORBIDDEN, form, CSRF_REFUSED.into()).await;
    }
    let existing = {
        let world = p.app.world.read().await;
        world.directory.signatures.iter().find(|t| t.name == form.name.trim()).cloned()
    };
    let t = match template_of(&form, existing.as_ref()) {
        Ok(t) => t,
        Err(why) => return refuse(StatusCode::UNPROCESSABLE_ENTITY, form, why).await,
    };
    form.name = t.name.clone();
    match p.app.put_signature(&s.actor, t).await {
        Ok(change) => {
            let q = url::form_urlencoded::Serializer::new(String::new())
                .append_pair("done", if change.created { "created" } else { "updated" })
                .append_pair("users", &change.users.to_string())
                .finish();
            Redirect::to(&format!("{}?{q}", signature_href(&change.name))).into_response()
        }
        Err(e @ (ApiError::BadRequest(_) | ApiError::Conflict(_) | ApiError::NotFound(_))) => {
            let status =
                if e.status() == StatusCode::BAD_REQUEST { StatusCode::UNPROCESSABLE_ENTITY } else { e.status() };
            refuse(status, form, format!("{e}. Nothing was changed.")).await
        }
        Err(e) => error_page(e),
    }
}

/// The directory user a query names, with a message when there is none.
async fn chosen_user(p: &Portal, upn: &str) -> Result<Option<(String, serde_json::Value, Vec<String>)>, String> {
    let upn = upn.trim();
    if upn.is_empty() {
        return Ok(None);
    }
    let parsed = Upn::parse(upn).map_err(|e| format!("{upn:?} is not a user principal name: {e}."))?;
    let world = p.app.world.read().await;
    let u = world
        .directory
        .users
        .get(&parsed)
        .ok_or_else(|| format!("There is no user {upn} in the directory; the users page lists them."))?;
    Ok(Some((parsed.to_string(), u.record.clone(), u.groups.iter().map(|g| g.to_string()).collect())))
}

/// The files the agent would write for `upn`: `.htm` (images linked to `BASE_files/`) and `.txt`.
fn render_for(t: &SignatureTemplate, record: &serde_json::Value, upn: &str) -> (String, String, Vec<String>) {
    let r = render(&t.html, t.txt.as_deref(), &directory_values(record));
    let base = file_base(&t.name, upn, false);
    (link_images(&r.htm, &base, t.images.keys()), r.txt, r.unknown)
}

async fn signature_page(
    p: &Portal,
    s: &Session,
    name: &str,
    user: &str,
    status: StatusCode,
    remove_error: Option<String>,
    done: Option<String>,
) -> Response {
    let all = match rows(p).await {
        Ok(r) => r,
        Err(e) => return error_page(e),
    };
    let Some(row) = all.into_iter().find(|r| r.name == name) else {
        return message(
            StatusCode::NOT_FOUND,
            Some(s),
            "No such signature",
            format!("There is no signature {name:?}. The signatures page lists the stored ones."),
            Some(("/signatures", "Go to the signatures")),
        );
    };
    let (template, users) = {
        let world = p.app.world.read().await;
        let mut users: Vec<String> = world.directory.users.keys().map(|u| u.to_string()).collect();
        users.sort();
        users.truncate(USER_SUGGESTIONS);
        (world.directory.signatures.iter().find(|t| t.name == name).cloned(), users)
    };
    let Some(t) = template else { return error_page(ApiError::NotFound(format!("no signature {name:?}"))) };
    let (preview, user_error) = match chosen_user(p, user).await {
        Ok(Some((upn, record, groups))) => {
            let (htm, txt, unknown) = render_for(&t, &record, &upn);
            let q = url::form_urlencoded::Serializer::new(String::new()).append_pair("user", &upn).finish();
            let not_assigned = !t.groups.iter().any(|g| g == GroupName::ALL_USERS || groups.iter().any(|ug| ug == g));
            let preview = PreviewView {
                user_href: user_href(&upn),
                frame_src: format!("{}/preview.html?{q}", signature_href(&t.name)),
                upn,
                html_source: htm,
                txt,
                unknown,
                not_assigned,
            };
            (Some(preview), None)
        }
        Ok(None) => (None, None),
        Err(why) => (None, Some(why)),
    };
    let status = if user_error.is_some() && status == StatusCode::OK { StatusCode::NOT_FOUND } else { status };
    let q = url::form_urlencoded::Serializer::new(String::new()).append_pair("edit", &t.name).finish();
    let mut resp = page(
        status,
        &SignaturePage {
            layout: Layout::new(format!("Signature {}", t.name), Some(s)),
            csrf: s.csrf(),
            edit_href: format!("/signatures?{q}#upload"),
            row,
            user: user.trim().to_string(),
            users,
            user_error,
            preview,
            remove_error,
            done,
        },
    );
    // This page frames its preview (`frame-src 'self'`); the security middleware keeps exactly
    // this policy and none other a handler might set.
    resp.headers_mut().insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(SIGNATURES_PAGE_CSP));
    resp
}

/// `GET /signatures/{name}[?user=UPN]`: the template, and its rendering for a user.
pub async fn signature(
    State(p): State<Arc<Portal>>,
    SignedIn(s): SignedIn,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
) -> Response {
    let pairs = query_pairs(q.as_deref());
    let get = |k: &str| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str()).unwrap_or_default();
    // After a save (post/redirect/get): say so once, warning like `tenonctl` when no user is reached.
    let done = match (get("done"), get("users").parse::<usize>()) {
        ("created" | "updated", Ok(0)) => Some(format!(
            "Saved ({}). No user is in its groups yet; check the group names on the groups page.",
            get("done")
        )),
        ("created" | "updated", Ok(n)) => {
            Some(format!("Saved ({}). It reaches {n} user(s); their devices get it at their next sync.", get("done")))
        }
        _ => None,
    };
    signature_page(&p, &s, &name, get("user"), StatusCode::OK, None, done).await
}

/// A `data:` URL for an image, typed by its extension.
fn data_url(name: &str, b64: &str) -> String {
    let ext = name.rsplit('.').next().unwrap_or_default().to_ascii_lowercase();
    let mime = match ext.as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "bmp" => "image/bmp",
        "webp" => "image/webp",
        // In an `<img>` an SVG runs no script; the preview's CSP forbids script anyway.
        "svg" => "image/svg+xml",
        _ => "application/octet-stream",
    };
    let compact: String = b64.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    format!("data:{mime};base64,{compact}")
}

/// `GET /signatures/{name}/preview.html?user=UPN`: the `.htm` the agent would write for the
/// user, as its own document, with the images inlined as `data:` URLs (on the device they sit in
/// `BASE_files/`). Framed by the signature page in `<iframe sandbox>`.
///
/// Why a separate document rather than `srcdoc`: the values come from the directory and are
/// hostile (HTML-escaped by the renderer, but the template itself is an administrator's HTML with
/// inline styles). A `srcdoc` frame inherits the portal's CSP, which forbids inline style, so the
/// preview would not look like the signature; relaxing the portal's own CSP for it would weaken
/// every page. This document instead carries its own policy: nothing but inline style and
/// `data:` images (`default-src 'none'`, so no script, no fetch, no form, no navigation of
/// anything), framable only by the portal (`frame-ancestors 'self'`, `X-Frame-Options:
/// SAMEORIGIN`). The frame's `sandbox` (without `allow-scripts` or `allow-same-origin`) adds an
/// opaque origin on top, so even a policy bypass could not reach the portal's cookies or DOM.
pub async fn preview_html(
    State(p): State<Arc<Portal>>,
    SignedIn(s): SignedIn,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
) -> Response {
    let pairs = query_pairs(q.as_deref());
    let user = pairs.iter().find(|(k, _)| k == "user").map(|(_, v)| v.as_str()).unwrap_or_default();
    let t = {
        let world = p.app.world.read().await;
        world.directory.signatures.iter().find(|t| t.name == name).cloned()
    };
    let Some(t) = t else {
        return message(
            StatusCode::NOT_FOUND,
            Some(&s),
            "No such signature",
            format!("There is no signature {name:?}."),
            None,
        );
    };
    let (upn, record) = match chosen_user(&p, user).await {
        Ok(Some((upn, record, _))) => (upn, record),
        Ok(None) => {
            return message(StatusCode::BAD_REQUEST, Some(&s), "No user", "Choose a user to preview for.".into(), None)
        }
        Err(why) => return message(StatusCode::NOT_FOUND, Some(&s), "No such user", why, None),
    };
    let (mut htm, _, _) = render_for(&t, &record, &upn);
    let base = file_base(&t.name, &upn, false);
    for (image, data) in &t.images {
        // Only standard base64 is stored (`validate` decodes it); check again before inlining.
        let compact: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        if base64::engine::general_purpose::STANDARD.decode(&compact).is_err() {
            continue;
        }
        htm = htm.replace(&image_href(&base, image), &data_url(image, data));
    }
    let mut resp = (StatusCode::OK, [(header::CONTENT_TYPE, "text/html; charset=utf-8")], htm).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(PREVIEW_CSP));
    resp
}

/// `POST /signatures/{name}/remove`: after a confirmation box, as `tenonctl signatures remove`.
pub async fn remove(
    State(p): State<Arc<Portal>>,
    SignedIn(s): SignedIn,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let f = Form::parse(&body);
    if !csrf_matches(s.raw_id(), presented_csrf(&f, &headers)) {
        return signature_page(&p, &s, &name, "", StatusCode::FORBIDDEN, Some(CSRF_REFUSED.into()), None).await;
    }
    if f.get("confirm") != Some("yes") {
        let why = "Tick the confirmation box to remove the signature; nothing was changed.".to_string();
        return signature_page(&p, &s, &name, "", StatusCode::UNPROCESSABLE_ENTITY, Some(why), None).await;
    }
    match p.app.remove_signature(&s.actor, &name).await {
        Ok(change) => {
            let q = url::form_urlencoded::Serializer::new(String::new())
                .append_pair("done", "removed")
                .append_pair("name", &change.name)
                .finish();
            Redirect::to(&format!("/signatures?{q}")).into_response()
        }
        Err(e @ ApiError::NotFound(_)) => message(
            StatusCode::NOT_FOUND,
            Some(&s),
            "No such signature",
            format!("{e}. Nothing was changed."),
            Some(("/signatures", "Go to the signatures")),
        ),
        Err(e) => error_page(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_form_becomes_a_template_as_tenonctl_builds_it() {
        let form = |html: &str, groups: &str, default: &str| UploadForm {
            name: " Corp ".into(),
            html: html.into(),
            groups: groups.into(),
            default: default.into(),
            ..Default::default()
        };
        let t = template_of(&form("<p>x</p>", "", "none"), None).unwrap();
        assert_eq!((t.name.as_str(), t.groups.clone(), t.default), ("Corp", vec!["All Users".to_string()], None));
        let t = template_of(&form("<p>x</p>", "Sales, Staff", "both"), None).unwrap();
        assert_eq!((t.groups.len(), t.default), (2, Some(DefaultUse::Both)));
        assert!(template_of(&form("<p>x</p>", "", "always"), None).unwrap_err().contains("none"));
        assert!(template_of(&form("<img src=\"logo.png\">", "", ""), None).unwrap_err().contains("logo.png"));
        let existing = SignatureTemplate {
            name: "Corp".into(),
            html: String::new(),
            txt: None,
            default: Some(DefaultUse::New),
            groups: vec!["Staff".into()],
            images: [("Logo.png".to_string(), "AAAA".to_string()), ("old.png".to_string(), "AAAA".to_string())].into(),
        };
        let t = template_of(&form("<img src=\"img/logo.png\">", "", ""), Some(&existing)).unwrap();
        assert_eq!(t.images.keys().collect::<Vec<_>>(), ["Logo.png"]);
        assert_eq!((t.groups, t.default), (vec!["Staff".to_string()], Some(DefaultUse::New)));
    }
}
