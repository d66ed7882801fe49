//! Outlook signature templates: the domain operations behind `/api/v1/admin/signatures`.
//! Like every write in `state`, each runs in one transaction with its audit row, then updates the
//! in-memory directory and re-signs the devices of the users the template reaches (before and
//! after the change).

use crate::api::rfc3339;
use crate::error::{ApiError, ApiResult};
use crate::state::{Actor, AppState, World};
use crate::store::audit;
use crate::store::changes::Kind;
use serde::Serialize;
use serde_json::json;
use sqlx::Row;
use std::collections::{BTreeMap, BTreeSet};
use tenon_core::api::SettingScope;
use tenon_core::envelope::MAX_ENVELOPE_BYTES;
use tenon_core::ids::GroupName;
use tenon_core::policy::signatures::{DefaultUse, SignatureTemplate};

/// The most one template may weigh (HTML, text and base64 images together). It travels in the
/// config of every user it is assigned to, and a device's whole signed config must stay below
/// the agent's envelope limit; a signature logo is a few kilobytes.
pub const MAX_TEMPLATE_BYTES: usize = 1024 * 1024;

/// Room the envelope needs around the payload (signatures, versions, times).
const ENVELOPE_OVERHEAD: usize = 64 * 1024;

/// What `GET /admin/signatures` shows of one template.
#[derive(Debug, Serialize)]
pub struct SignatureSummary {
    pub name: String,
    pub groups: Vec<String>,
    pub default: Option<String>,
    /// Image file name -> decoded size in bytes.
    pub images: BTreeMap<String, usize>,
    pub html_bytes: usize,
    pub has_txt: bool,
    /// RFC 3339.
    pub updated_at: String,
    /// Only with `full`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub html: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub txt: Option<String>,
}

/// What a write did, for the answer.
#[derive(Debug, Serialize)]
pub struct SignatureChange {
    pub name: String,
    pub created: bool,
    /// Directory users the template reaches now (0 after a removal).
    pub users: usize,
    /// The devices to re-sign (in the background).
    #[serde(skip)]
    pub resign: crate::resign::Ticket,
}

fn template_bytes(t: &SignatureTemplate) -> usize {
    t.html.len()
        + t.txt.as_ref().map_or(0, String::len)
        + t.images.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
}

fn decoded_len(b64: &str) -> usize {
    let n = b64.chars().filter(|c| !c.is_ascii_whitespace()).count();
    let pad = b64.trim_end().chars().rev().take_while(|c| *c == '=').count();
    (n / 4 * 3).saturating_sub(pad)
}

/// Devices whose payload a template assigned to `groups` can reach.
fn devices_for_groups<'a>(world: &World, groups: impl IntoIterator<Item = &'a String>) -> BTreeSet<String> {
    groups.into_iter().flat_map(|g| AppState::devices_for_scope(world, &SettingScope::Group(g.clone()))).collect()
}

fn users_reached(world: &World, t: &SignatureTemplate) -> usize {
    let all = t.groups.iter().any(|g| g == GroupName::ALL_USERS);
    world
        .directory
        .users
        .values()
        .filter(|u| u.id.is_some() || !u.record.is_null())
        .filter(|u| all || u.groups.iter().any(|ug| t.groups.iter().any(|g| g == ug.as_str())))
        .count()
}

/// Group names as the directory spells them (trimmed), without duplicates, in the given order.
fn normalise_groups(groups: &[String]) -> ApiResult<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for g in groups {
        let g = GroupName::parse(g).map_err(|e| ApiError::BadRequest(format!("groups: {e}")))?.to_string();
        if !out.contains(&g) {
            out.push(g);
        }
    }
    Ok(out)
}

impl AppState {
    /// Creates or replaces the template `t` (its name is the file name stem on the devices).
    pub async fn put_signature(&self, actor: &Actor, mut t: SignatureTemplate) -> ApiResult<SignatureChange> {
        t.groups = normalise_groups(&t.groups)?;
        t.validate().map_err(|e| ApiError::BadRequest(e.to_string()))?;
        let size = template_bytes(&t);
        if size > MAX_TEMPLATE_BYTES {
            return Err(ApiError::BadRequest(format!(
                "signature {:?} is {} KiB with its images; the limit is {} KiB because it travels in the config of every user it is assigned to; use smaller images (a signature logo needs a few KiB)",
                t.name,
                size / 1024,
                MAX_TEMPLATE_BYTES / 1024
            )));
        }
        let mut world = self.world.write().await;
        let existing = world.directory.signatures.iter().position(|s| s.name.eq_ignore_ascii_case(&t.name));
        if let Some(i) = existing {
            let other = &world.directory.signatures[i].name;
            if *other != t.name {
                return Err(ApiError::Conflict(format!(
                    "a signature named {other:?} exists; Windows file names ignore case, so use {other:?} to change it or remove it first"
                )));
            }
        }
        let mut ids = devices_for_groups(&world, &t.groups);
        if let Some(i) = existing {
            ids.extend(devices_for_groups(&world, &world.directory.signatures[i].groups));
        }
        let old = install(&mut world, t.clone());
        // Check before anything is stored that every affected device's config still fits an
        // envelope the agent accepts; otherwise those devices would stop getting any config.
        let too_big = oversized_device(&world, &ids);
        let new = restore(&mut world, &t.name, old);
        if let Some((id, bytes)) = too_big {
            return Err(ApiError::BadRequest(format!(
                "with signature {:?} the config of device {id} would be {} KiB, over the {} KiB a device accepts; use smaller images or fewer templates per user",
                t.name,
                bytes / 1024,
                (MAX_ENVELOPE_BYTES - ENVELOPE_OVERHEAD) / 1024
            )));
        }
        let now = self.now();
        let mut tx = self.begin_write(&mut world).await?;
        sqlx::query(
            "INSERT INTO signatures (name, html, txt, default_use, groups, images, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (name) DO UPDATE SET html = excluded.html, txt = excluded.txt, default_use = excluded.default_use,
                 groups = excluded.groups, images = excluded.images, updated_at = excluded.updated_at",
        )
        .bind(&t.name)
        .bind(&t.html)
        .bind(&t.txt)
        .bind(t.default.map(default_text))
        .bind(json!(t.groups).to_string())
        .bind(json!(t.images).to_string())
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let images: BTreeMap<&String, usize> = t.images.iter().map(|(k, v)| (k, decoded_len(v))).collect();
        audit(
            &mut tx,
            now,
            &actor.label(),
            if new { "signatures.create" } else { "signatures.update" },
            Some(&t.name),
            json!({"groups": t.groups, "default": t.default, "images": images, "html_bytes": t.html.len(),
                   "has_txt": t.txt.is_some()}),
        )
        .await?;
        self.note(&mut tx, Kind::Directory, [""]).await?;
        tx.commit().await?;
        let users = users_reached(&world, &t);
        let name = t.name.clone();
        install(&mut world, t);
        let resign = self.resign.enqueue(ids);
        Ok(SignatureChange { name, created: new, users, resign })
    }

    /// Removes a template; the agents delete the files Tenon wrote for it at their next sync.
    pub async fn remove_signature(&self, actor: &Actor, name: &str) -> ApiResult<SignatureChange> {
        let mut world = self.world.write().await;
        let Some(i) = world.directory.signatures.iter().position(|s| s.name.eq_ignore_ascii_case(name.trim())) else {
            return Err(ApiError::NotFound(format!(
                "no signature {name:?}; `tenonctl signatures list` shows the stored ones"
            )));
        };
        let t = world.directory.signatures[i].clone();
        let now = self.now();
        let mut tx = self.begin_write(&mut world).await?;
        sqlx::query("DELETE FROM signatures WHERE name = $1").bind(&t.name).execute(&mut *tx).await?;
        audit(&mut tx, now, &actor.label(), "signatures.remove", Some(&t.name), json!({"groups": t.groups})).await?;
        self.note(&mut tx, Kind::Directory, [""]).await?;
        tx.commit().await?;
        let ids = devices_for_groups(&world, &t.groups);
        world.directory_mut().signatures.remove(i);
        let resign = self.resign.enqueue(ids);
        Ok(SignatureChange { name: t.name, created: false, users: 0, resign })
    }

    /// The stored templates, by name; `full` adds HTML and text.
    pub async fn list_signatures(&self, full: bool) -> ApiResult<Vec<SignatureSummary>> {
        let updated: BTreeMap<String, i64> = sqlx::query("SELECT name, updated_at FROM signatures")
            .fetch_all(&self.db)
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let world = self.world.read().await;
        Ok(world
            .directory
            .signatures
            .iter()
            .map(|t| SignatureSummary {
                name: t.name.clone(),
                groups: t.groups.clone(),
                default: t.default.map(|d| default_text(d).to_string()),
                images: t.images.iter().map(|(k, v)| (k.clone(), decoded_len(v))).collect(),
                html_bytes: t.html.len(),
                has_txt: t.txt.is_some(),
                updated_at: rfc3339(updated.get(&t.name).copied().unwrap_or(0)),
                html: full.then(|| t.html.clone()),
                txt: if full { t.txt.clone() } else { None },
            })
            .collect())
    }
}

fn default_text(d: DefaultUse) -> &'static str {
    match d {
        DefaultUse::New => "new",
        DefaultUse::Reply => "reply",
        DefaultUse::Both => "both",
    }
}

/// Puts `t` into the directory (kept sorted by name); returns the template it replaced.
fn install(world: &mut World, t: SignatureTemplate) -> Option<SignatureTemplate> {
    let list = &mut world.directory_mut().signatures;
    match list.binary_search_by(|s| s.name.cmp(&t.name)) {
        Ok(i) => Some(std::mem::replace(&mut list[i], t)),
        Err(i) => {
            list.insert(i, t);
            None
        }
    }
}

/// Undoes [`install`]; true when there was no template of that name before.
fn restore(world: &mut World, name: &str, old: Option<SignatureTemplate>) -> bool {
    let list = &mut world.directory_mut().signatures;
    let Ok(i) = list.binary_search_by(|s| s.name.as_str().cmp(name)) else { return old.is_none() };
    match old {
        Some(o) => {
            list[i] = o;
            false
        }
        None => {
            list.remove(i);
            true
        }
    }
}

/// The first of `ids` whose compiled payload would not fit an envelope, with its size.
fn oversized_device(world: &World, ids: &BTreeSet<String>) -> Option<(String, usize)> {
    let limit = MAX_ENVELOPE_BYTES - ENVELOPE_OVERHEAD;
    ids.iter().find_map(|id| {
        let meta = world.devices.get(id).filter(|m| m.active)?;
        let payload =
            world.directory.device_payload_with(meta.primary.as_ref(), &meta.users, &meta.package_requests).payload;
        let bytes = serde_json::to_vec(&payload).map(|v| v.len()).unwrap_or(usize::MAX);
        (bytes > limit).then(|| (id.clone(), bytes))
    })
}
