//! Software packages: the domain operations behind `/api/v1/admin/packages` and the device's
//! content download. A package is a name with one current version (a new upload of the name
//! replaces it; devices upgrade at their next check-in), its content stored by SHA-256
//! ([`content`]), and assignments to the tenant, a group or a user. The plan each device gets is
//! compiled by `tenon_core::directory::Directory::package_plan` into its signed payload; like
//! every directory write, each operation here runs in one transaction with its audit row, then
//! updates the in-memory directory and re-signs the devices it reaches.

pub mod content;

use crate::api::rfc3339;
use crate::error::{ApiError, ApiResult};
use crate::state::{Actor, AppState, World};
use crate::store::audit;
use crate::store::changes::Kind as ChangeKind;
use content::{MsiFacts, MAX_CONTENT_BYTES};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sqlx::Row;
use std::collections::{BTreeMap, BTreeSet};
use tenon_core::api::SettingScope;
use tenon_core::ids::{GroupName, Upn};
use tenon_core::packages::{
    check_args, check_dependencies, check_name, check_version_label, Assignment, DetectRule, Intent, Kind, Package,
    PackageReport, PlanEntry, State, Target, Users, DEFAULT_TIMEOUT_SECS, MAX_DEPENDENCIES, MAX_TIMEOUT_SECS,
};

/// What `tenonctl packages upload` sends beside the content (the `meta` query parameter, JSON).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UploadMeta {
    pub name: String,
    pub version: String,
    /// The uploaded file's name (its extension tells the kind when `kind` is absent).
    pub file_name: String,
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub install_args: String,
    #[serde(default)]
    pub uninstall_args: String,
    #[serde(default)]
    pub detect: Option<String>,
    #[serde(default)]
    pub depends_on: Vec<String>,
    #[serde(default)]
    pub order: i64,
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

/// One package as `packages list` and `packages show` give it.
#[derive(Debug, Serialize)]
pub struct PackageView {
    pub name: String,
    pub version: String,
    pub kind: Kind,
    pub sha256: String,
    pub size: u64,
    pub file_name: String,
    pub install_args: String,
    pub uninstall_args: String,
    pub detect: String,
    pub depends_on: Vec<String>,
    pub order: i64,
    pub timeout_secs: u64,
    /// What the MSI says about itself (MSI packages only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub msi: Option<MsiFacts>,
    pub uploaded_at: String,
    pub uploaded_by: String,
    pub assignments: Vec<AssignmentView>,
    /// The content is on this server's disk.
    pub content_present: bool,
    /// The Tenon agent's own MSI: installed through a detached msiexec.
    pub self_update: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AssignmentView {
    pub target: Target,
    pub intent: Intent,
    pub users: Users,
}

/// The answer of a package write.
#[derive(Debug)]
pub struct PackageChange {
    pub body: Value,
    pub resign: crate::resign::Ticket,
}

/// A file name as the device stores it: a base name of letters, digits and `.-_ ()`.
fn check_file_name(name: &str) -> ApiResult<String> {
    let base = name.rsplit(['/', '\\']).next().unwrap_or("").trim();
    let ok = !base.is_empty()
        && base.len() <= 128
        && !base.starts_with('.')
        && base.chars().all(|c| c.is_ascii_alphanumeric() || " .-_()+".contains(c));
    if !ok {
        return Err(ApiError::BadRequest(format!(
            "file name {name:?}: rename the file to at most 128 letters, digits, spaces and . - _ ( ) +"
        )));
    }
    Ok(base.to_string())
}

fn bad(e: tenon_core::packages::PackageError) -> ApiError {
    ApiError::BadRequest(e.to_string())
}

/// The package an upload describes (content hash and size still empty), its kind checked against
/// the file's extension.
fn package_of(meta: &UploadMeta) -> ApiResult<Package> {
    let file_name = check_file_name(&meta.file_name)?;
    let from_ext = Kind::from_file_name(&file_name);
    let kind = match &meta.kind {
        Some(k) => Kind::parse(k).map_err(bad)?,
        None => from_ext.ok_or_else(|| {
            ApiError::BadRequest(format!(
                "cannot tell the kind of {file_name:?} from its extension; pass --kind msi|exe|script"
            ))
        })?,
    };
    let ext_ok = match kind {
        Kind::Msi => file_name.to_ascii_lowercase().ends_with(".msi"),
        Kind::Exe => file_name.to_ascii_lowercase().ends_with(".exe"),
        Kind::Script => [".ps1", ".cmd", ".bat"].iter().any(|e| file_name.to_ascii_lowercase().ends_with(e)),
    };
    if !ext_ok {
        return Err(ApiError::BadRequest(format!(
            "{file_name:?} does not end as a package of kind {} must (msi: .msi; exe: .exe; script: .ps1, .cmd or .bat); rename it or pass the right --kind",
            kind.as_str()
        )));
    }
    let detect = match meta.detect.as_deref().map(str::trim).filter(|d| !d.is_empty()) {
        Some(d) => Some(DetectRule::parse(d).map_err(bad)?),
        None if kind == Kind::Msi => None,
        None => {
            return Err(ApiError::BadRequest(format!(
                "a {} package needs --detect RULE (msi:{{PRODUCT-CODE}}, file:C:\\path[>=VERSION] or registry:HKLM\\PATH:NAME[=VALUE|>=VERSION]) so the agent can tell whether it is installed",
                kind.as_str()
            )))
        }
    };
    if meta.depends_on.len() > MAX_DEPENDENCIES {
        return Err(ApiError::BadRequest(format!("a package may depend on at most {MAX_DEPENDENCIES} others")));
    }
    let mut depends_on = Vec::new();
    for d in &meta.depends_on {
        let d = check_name(d).map_err(bad)?;
        if !depends_on.contains(&d) {
            depends_on.push(d);
        }
    }
    let timeout_secs = meta.timeout_secs.unwrap_or(DEFAULT_TIMEOUT_SECS);
    if !(1..=MAX_TIMEOUT_SECS).contains(&timeout_secs) {
        return Err(ApiError::BadRequest(format!("--timeout must be between 1 s and {} h", MAX_TIMEOUT_SECS / 3600)));
    }
    let name = check_name(&meta.name).map_err(bad)?;
    if depends_on.contains(&name) {
        return Err(ApiError::BadRequest(format!("package {name:?} cannot depend on itself")));
    }
    Ok(Package {
        name,
        version: check_version_label(&meta.version).map_err(bad)?,
        kind,
        sha256: String::new(),
        size: 0,
        file_name,
        install_args: check_args("--install-args", &meta.install_args).map_err(bad)?,
        uninstall_args: check_args("--uninstall-args", &meta.uninstall_args).map_err(bad)?,
        // Filled in from the MSI below when absent.
        detect: detect.unwrap_or(DetectRule::Msi { product_code: String::new() }),
        depends_on,
        order: meta.order,
        timeout_secs,
        self_update: false,
    })
}

/// Refuses `p` if, with it in the catalog, a dependency is missing or forms a cycle.
fn check_catalog(world: &World, p: &Package) -> ApiResult<()> {
    let mut catalog = world.directory.packages.clone();
    catalog.insert(p.name.clone(), p.clone());
    check_dependencies(&catalog).map_err(bad)
}

/// `name` and every package that depends on it, directly or not.
fn with_dependents(world: &World, name: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::from([name.to_string()]);
    loop {
        let more: Vec<String> = world
            .directory
            .packages
            .values()
            .filter(|p| !out.contains(&p.name) && p.depends_on.iter().any(|d| out.contains(d)))
            .map(|p| p.name.clone())
            .collect();
        if more.is_empty() {
            return out;
        }
        out.extend(more);
    }
}

fn scope_of(t: &Target) -> SettingScope {
    match t {
        Target::Tenant => SettingScope::Tenant,
        Target::Group(g) => SettingScope::Group(g.clone()),
        Target::User(u) => SettingScope::User(u.clone()),
    }
}

/// The devices whose plan a change to these packages (or these extra targets) can change.
fn devices_reached(world: &World, names: &BTreeSet<String>, extra: &[Target]) -> BTreeSet<String> {
    let targets: BTreeSet<Target> = world
        .directory
        .package_assignments
        .iter()
        .filter(|a| names.contains(&a.package))
        .map(|a| a.target.clone())
        .chain(extra.iter().cloned())
        .collect();
    let mut ids = BTreeSet::new();
    for t in targets {
        ids.extend(AppState::devices_for_scope(world, &scope_of(&t)));
        if t == Target::Tenant {
            break;
        }
    }
    ids
}

fn target_text(t: &Target) -> String {
    match t {
        Target::Tenant => "--tenant".into(),
        Target::Group(g) => format!("--group {g:?}"),
        Target::User(u) => format!("--user {u}"),
    }
}

fn target_parts(t: &Target) -> (&'static str, &str) {
    match t {
        Target::Tenant => ("tenant", ""),
        Target::Group(g) => ("group", g),
        Target::User(u) => ("user", u),
    }
}

/// Checks and normalises an assignment target: the group or user must be known.
fn check_target(world: &World, t: Target) -> ApiResult<Target> {
    Ok(match t {
        Target::Tenant => Target::Tenant,
        Target::Group(g) => {
            let g = GroupName::parse(&g).map_err(|e| ApiError::BadRequest(format!("group: {e}")))?;
            let known = g.is_all_users()
                || world.directory.groups.contains_key(&g)
                || world.directory.users.values().any(|u| u.groups.contains(&g));
            if !known {
                return Err(ApiError::NotFound(format!(
                    "no group {g:?} in the directory; `tenonctl users list` shows the groups users are in"
                )));
            }
            Target::Group(g.to_string())
        }
        Target::User(u) => {
            let u = Upn::parse(&u).map_err(|e| ApiError::BadRequest(format!("user: {e}")))?;
            if !world.directory.users.contains_key(&u) {
                return Err(ApiError::NotFound(format!(
                    "no user {u} in the directory; import it first with `tenonctl users import FILE`"
                )));
            }
            Target::User(u.to_string())
        }
    })
}

fn not_found(name: &str) -> ApiError {
    ApiError::NotFound(format!("no package {name:?}; `tenonctl packages list` shows the uploaded ones"))
}

impl AppState {
    fn content(&self) -> ApiResult<&content::ContentStore> {
        self.content
            .as_deref()
            .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("this server was started without a package directory")))
    }

    /// Checks an upload's description as [`AppState::upload_package`] will, before any content is
    /// sent (`tenonctl` asks first, so a refusal never arrives while the body is still sending).
    pub async fn check_upload(&self, meta: &UploadMeta) -> ApiResult<()> {
        let p = package_of(meta)?;
        check_catalog(&*self.world.read().await, &p)?;
        self.content()?;
        Ok(())
    }

    /// Receives an upload: checks the description before reading the body, streams the content
    /// to disk, reads an MSI's own properties, then stores the package (replacing the name's
    /// previous version) and re-signs the devices it reaches.
    pub async fn upload_package(
        &self,
        actor: &Actor,
        meta: UploadMeta,
        body: axum::body::Body,
    ) -> ApiResult<PackageChange> {
        let mut p = package_of(&meta)?;
        check_catalog(&*self.world.read().await, &p)?;
        let store = self.content()?;
        let received = store.receive(body, MAX_CONTENT_BYTES).await?;
        let path = received.file.path().to_path_buf();
        let mut msi = None;
        match p.kind {
            Kind::Msi => {
                let facts = tokio::task::spawn_blocking(move || content::read_msi(&path))
                    .await
                    .map_err(|e| ApiError::Internal(anyhow::anyhow!("reading the MSI failed: {e}")))?
                    .map_err(|why| {
                        ApiError::BadRequest(format!(
                            "{:?} was refused: {why}; upload the .msi file itself (a truncated or corrupt file is refused), or pass --kind exe",
                            p.file_name
                        ))
                    })?;
                p.self_update = facts.upgrade_code.eq_ignore_ascii_case(tenon_core::packages::AGENT_UPGRADE_CODE);
                if matches!(&p.detect, DetectRule::Msi { product_code } if product_code.is_empty()) {
                    p.detect = DetectRule::Msi { product_code: facts.product_code.clone() };
                }
                msi = Some(facts);
            }
            Kind::Exe => {
                use std::io::Read;
                let mut head = [0u8; 2];
                let ok = std::fs::File::open(&path).and_then(|mut f| f.read_exact(&mut head)).is_ok() && head == *b"MZ";
                if !ok {
                    return Err(ApiError::BadRequest(format!(
                        "{:?} is not a Windows program (it does not start with MZ); upload the installer .exe itself",
                        p.file_name
                    )));
                }
            }
            Kind::Script => {}
        }
        p.sha256 = received.sha256.clone();
        p.size = received.size;
        store.keep(received)?;

        let mut world = self.world.write().await;
        check_catalog(&world, &p)?;
        let previous = world.directory.packages.get(&p.name).cloned();
        let now = self.now();
        let mut tx = self.begin_write(&mut world).await?;
        sqlx::query(
            "INSERT INTO packages (name, version, kind, sha256, size, file_name, install_args, uninstall_args, detect,
                                   depends_on, sort_order, timeout_secs, msi_product_name, msi_product_version,
                                   uploaded_at, uploaded_by, self_update)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)
             ON CONFLICT (name) DO UPDATE SET version = excluded.version, kind = excluded.kind, sha256 = excluded.sha256,
                 size = excluded.size, file_name = excluded.file_name, install_args = excluded.install_args,
                 uninstall_args = excluded.uninstall_args, detect = excluded.detect, depends_on = excluded.depends_on,
                 sort_order = excluded.sort_order, timeout_secs = excluded.timeout_secs,
                 msi_product_name = excluded.msi_product_name, msi_product_version = excluded.msi_product_version,
                 uploaded_at = excluded.uploaded_at, uploaded_by = excluded.uploaded_by, self_update = excluded.self_update",
        )
        .bind(&p.name)
        .bind(&p.version)
        .bind(p.kind.as_str())
        .bind(&p.sha256)
        .bind(p.size as i64)
        .bind(&p.file_name)
        .bind(&p.install_args)
        .bind(&p.uninstall_args)
        .bind(p.detect.to_string())
        .bind(json!(p.depends_on).to_string())
        .bind(p.order)
        .bind(p.timeout_secs as i64)
        .bind(msi.as_ref().map(|m| m.product_name.clone()))
        .bind(msi.as_ref().map(|m| m.product_version.clone()))
        .bind(now)
        .bind(actor.label())
        .bind(i64::from(p.self_update))
        .execute(&mut *tx)
        .await?;
        audit(
            &mut tx,
            now,
            &actor.label(),
            if previous.is_some() { "packages.update" } else { "packages.upload" },
            Some(&p.name),
            json!({"version": p.version, "previous_version": previous.as_ref().map(|o| &o.version), "kind": p.kind,
                   "sha256": p.sha256, "size": p.size, "file_name": p.file_name, "detect": p.detect.to_string(),
                   "depends_on": p.depends_on, "order": p.order, "timeout_secs": p.timeout_secs,
                   "install_args": p.install_args, "uninstall_args": p.uninstall_args}),
        )
        .await?;
        self.note(&mut tx, ChangeKind::Directory, [""]).await?;
        tx.commit().await?;
        world.directory_mut().packages.insert(p.name.clone(), p.clone());
        if let Some(old) = &previous {
            if old.sha256 != p.sha256 && !world.directory.packages.values().any(|q| q.sha256 == old.sha256) {
                store.remove(&old.sha256);
            }
        }
        let ids = devices_reached(&world, &with_dependents(&world, &p.name), &[]);
        let resign = self.resign.enqueue(ids);
        let body = json!({"name": p.name, "version": p.version, "kind": p.kind, "sha256": p.sha256, "size": p.size,
                          "detect": p.detect.to_string(), "created": previous.is_none(), "self_update": p.self_update,
                          "previous_version": previous.map(|o| o.version), "msi": msi});
        Ok(PackageChange { body, resign })
    }

    /// Removes a package and its content; refused while it is assigned or another package
    /// depends on it, naming them.
    pub async fn remove_package(&self, actor: &Actor, name: &str) -> ApiResult<PackageChange> {
        let mut world = self.world.write().await;
        let p = world.directory.packages.get(name.trim()).cloned().ok_or_else(|| not_found(name))?;
        let assigned: Vec<String> = world
            .directory
            .package_assignments
            .iter()
            .filter(|a| a.package == p.name)
            .map(|a| format!("{} ({})", target_text(&a.target), a.intent.as_str()))
            .collect();
        if !assigned.is_empty() {
            return Err(ApiError::Conflict(format!(
                "package {:?} is assigned: {}; unassign it first (`tenonctl packages unassign {:?} ...`)",
                p.name,
                assigned.join(", "),
                p.name
            )));
        }
        let dependents: Vec<&str> = world
            .directory
            .packages
            .values()
            .filter(|q| q.depends_on.contains(&p.name))
            .map(|q| q.name.as_str())
            .collect();
        if !dependents.is_empty() {
            return Err(ApiError::Conflict(format!(
                "package {:?} is a dependency of {}; remove those or their dependency first",
                p.name,
                dependents.join(", ")
            )));
        }
        let now = self.now();
        let mut tx = self.begin_write(&mut world).await?;
        sqlx::query("DELETE FROM packages WHERE name = $1").bind(&p.name).execute(&mut *tx).await?;
        audit(
            &mut tx,
            now,
            &actor.label(),
            "packages.remove",
            Some(&p.name),
            json!({"version": p.version, "sha256": p.sha256}),
        )
        .await?;
        self.note(&mut tx, ChangeKind::Directory, [""]).await?;
        tx.commit().await?;
        world.directory_mut().packages.remove(&p.name);
        if !world.directory.packages.values().any(|q| q.sha256 == p.sha256) {
            if let Ok(store) = self.content() {
                store.remove(&p.sha256);
            }
        }
        Ok(PackageChange {
            body: json!({"name": p.name, "removed": true}),
            resign: self.resign.enqueue(BTreeSet::new()),
        })
    }

    /// Assigns a package (replacing its assignment to the same target), checking that its
    /// dependencies exist and form no cycle.
    pub async fn assign_package(
        &self,
        actor: &Actor,
        name: &str,
        target: Target,
        intent: Intent,
        users: Users,
    ) -> ApiResult<PackageChange> {
        let mut world = self.world.write().await;
        let p = world.directory.packages.get(name.trim()).cloned().ok_or_else(|| not_found(name))?;
        let target = check_target(&world, target)?;
        check_dependencies(&world.directory.packages)
            .map_err(|e| ApiError::BadRequest(format!("package {:?} cannot be assigned: {e}", p.name)))?;
        let previous =
            world.directory.package_assignments.iter().find(|a| a.package == p.name && a.target == target).cloned();
        let now = self.now();
        let (kind, tname) = target_parts(&target);
        let mut tx = self.begin_write(&mut world).await?;
        sqlx::query(
            "INSERT INTO package_assignments (package, target_kind, target_name, intent, users, created_at)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (package, target_kind, target_name) DO UPDATE SET intent = excluded.intent, users = excluded.users",
        )
        .bind(&p.name)
        .bind(kind)
        .bind(tname)
        .bind(intent.as_str())
        .bind(users.as_str())
        .bind(now)
        .execute(&mut *tx)
        .await?;
        audit(
            &mut tx,
            now,
            &actor.label(),
            "packages.assign",
            Some(&p.name),
            json!({"target": target, "intent": intent, "users": users, "version": p.version,
                   "previous": previous.as_ref().map(|a| json!({"intent": a.intent, "users": a.users}))}),
        )
        .await?;
        self.note(&mut tx, ChangeKind::Directory, [""]).await?;
        tx.commit().await?;
        let a = Assignment { package: p.name.clone(), target: target.clone(), intent, users };
        let list = &mut world.directory_mut().package_assignments;
        list.retain(|x| !(x.package == a.package && x.target == a.target));
        list.push(a);
        let ids = devices_reached(&world, &BTreeSet::new(), std::slice::from_ref(&target));
        let devices = ids.len();
        let resign = self.resign.enqueue(ids);
        Ok(PackageChange {
            body: json!({"name": p.name, "target": target, "intent": intent, "users": users, "devices": devices,
                         "replaced": previous.is_some()}),
            resign,
        })
    }

    pub async fn unassign_package(&self, actor: &Actor, name: &str, target: Target) -> ApiResult<PackageChange> {
        let mut world = self.world.write().await;
        let p = world.directory.packages.get(name.trim()).cloned().ok_or_else(|| not_found(name))?;
        let target = match target {
            Target::Group(g) => Target::Group(GroupName::parse(&g).map(|g| g.to_string()).unwrap_or(g)),
            Target::User(u) => Target::User(Upn::parse(&u).map(|u| u.to_string()).unwrap_or(u)),
            t => t,
        };
        let Some(existing) =
            world.directory.package_assignments.iter().find(|a| a.package == p.name && a.target == target).cloned()
        else {
            let have: Vec<String> = world
                .directory
                .package_assignments
                .iter()
                .filter(|a| a.package == p.name)
                .map(|a| target_text(&a.target))
                .collect();
            return Err(ApiError::NotFound(format!(
                "package {:?} is not assigned to {}; its assignments: {}",
                p.name,
                target_text(&target),
                if have.is_empty() { "none".to_string() } else { have.join(", ") }
            )));
        };
        let (kind, tname) = target_parts(&target);
        let now = self.now();
        let mut tx = self.begin_write(&mut world).await?;
        sqlx::query("DELETE FROM package_assignments WHERE package = $1 AND target_kind = $2 AND target_name = $3")
            .bind(&p.name)
            .bind(kind)
            .bind(tname)
            .execute(&mut *tx)
            .await?;
        audit(
            &mut tx,
            now,
            &actor.label(),
            "packages.unassign",
            Some(&p.name),
            json!({"target": target, "intent": existing.intent, "users": existing.users}),
        )
        .await?;
        self.note(&mut tx, ChangeKind::Directory, [""]).await?;
        tx.commit().await?;
        let ids = devices_reached(&world, &BTreeSet::new(), std::slice::from_ref(&target));
        world.directory_mut().package_assignments.retain(|x| !(x.package == p.name && x.target == target));
        let devices = ids.len();
        let resign = self.resign.enqueue(ids);
        Ok(PackageChange { body: json!({"name": p.name, "target": target, "devices": devices}), resign })
    }

    /// `tenonctl devices install ID NAME`: asks the device to install an available package now,
    /// or to try a failed one again (a new request number in its plan).
    pub async fn request_install(&self, actor: &Actor, device_id: &str, name: &str) -> ApiResult<Value> {
        let mut world = self.world.write().await;
        let meta = world.devices.get(device_id).ok_or_else(|| crate::state::device_not_found(device_id))?;
        if !meta.active {
            return Err(ApiError::Conflict("device is decommissioned; re-enroll it to install software".into()));
        }
        let p = world.directory.packages.get(name.trim()).cloned().ok_or_else(|| not_found(name))?;
        let plan = world.directory.package_plan(meta.primary.as_ref(), &meta.package_requests);
        let Some(entry) = plan.get(&p.name) else {
            return Err(ApiError::Conflict(format!(
                "package {:?} is not assigned to this device (nor to its primary user or their groups); assign it first, e.g. `tenonctl packages assign {:?} --user UPN --intent available`",
                p.name, p.name
            )));
        };
        if entry.intent == Intent::Uninstall {
            return Err(ApiError::Conflict(format!(
                "package {:?} is assigned to this device with intent uninstall; change that assignment first",
                p.name
            )));
        }
        let mut requests = meta.package_requests.clone();
        let n = requests.get(&p.name).copied().unwrap_or(0) + 1;
        requests.insert(p.name.clone(), n);
        let now = self.now();
        let mut tx = self.begin_write(&mut world).await?;
        sqlx::query("UPDATE devices SET package_requests = $1 WHERE id = $2")
            .bind(json!(requests).to_string())
            .bind(device_id)
            .execute(&mut *tx)
            .await?;
        audit(
            &mut tx,
            now,
            &actor.label(),
            "device.install",
            Some(device_id),
            json!({"package": p.name, "version": p.version, "request": n}),
        )
        .await?;
        self.note(&mut tx, ChangeKind::Device, [device_id]).await?;
        tx.commit().await?;
        if let Some(m) = world.devices.get_mut(device_id) {
            m.package_requests = requests;
        }
        self.recompile(&mut world, vec![device_id.to_string()]).await?;
        let version = world.devices.get(device_id).map(|m| m.version).unwrap_or(0);
        Ok(json!({"device_id": device_id, "package": p.name, "version": p.version, "request": n,
                  "config_version": version}))
    }

    /// The uploaded packages with their assignments.
    pub async fn list_packages(&self) -> ApiResult<Vec<PackageView>> {
        let rows = sqlx::query(
            "SELECT name, msi_product_name, msi_product_version, uploaded_at, uploaded_by FROM packages ORDER BY name",
        )
        .fetch_all(&self.db)
        .await?;
        let world = self.world.read().await;
        let store = self.content.as_deref();
        let mut out = Vec::new();
        for r in rows {
            let name: String = r.get(0);
            let Some(p) = world.directory.packages.get(&name) else { continue };
            let msi = match (&p.detect, p.kind) {
                (_, Kind::Msi) => Some(MsiFacts {
                    product_code: p.detect.product_code().unwrap_or_default().to_string(),
                    product_name: r.get::<Option<String>, _>(1).unwrap_or_default(),
                    product_version: r.get::<Option<String>, _>(2).unwrap_or_default(),
                    ..Default::default()
                }),
                _ => None,
            };
            out.push(PackageView {
                name: p.name.clone(),
                version: p.version.clone(),
                kind: p.kind,
                sha256: p.sha256.clone(),
                size: p.size,
                file_name: p.file_name.clone(),
                install_args: p.install_args.clone(),
                uninstall_args: p.uninstall_args.clone(),
                detect: p.detect.to_string(),
                depends_on: p.depends_on.clone(),
                order: p.order,
                timeout_secs: p.timeout_secs,
                msi,
                uploaded_at: rfc3339(r.get(3)),
                uploaded_by: r.get(4),
                assignments: world
                    .directory
                    .package_assignments
                    .iter()
                    .filter(|a| a.package == p.name)
                    .map(|a| AssignmentView { target: a.target.clone(), intent: a.intent, users: a.users })
                    .collect(),
                content_present: store.is_some_and(|s| s.has(&p.sha256)),
                self_update: p.self_update,
            });
        }
        Ok(out)
    }

    pub async fn show_package(&self, name: &str) -> ApiResult<PackageView> {
        self.list_packages().await?.into_iter().find(|p| p.name == name.trim()).ok_or_else(|| not_found(name))
    }

    /// `packages status NAME`: per device whose plan holds the package, its state (what it
    /// reported for the current version, else `pending`), with counts by state.
    pub async fn package_status(&self, name: &str) -> ApiResult<Value> {
        let (p, planned) = {
            let world = self.world.read().await;
            let p = world.directory.packages.get(name.trim()).cloned().ok_or_else(|| not_found(name))?;
            let planned: BTreeMap<String, PlanEntry> = world
                .devices
                .iter()
                .filter(|(_, m)| m.active)
                .filter_map(|(id, m)| {
                    let mut plan = world.directory.package_plan(m.primary.as_ref(), &m.package_requests);
                    plan.remove(&p.name).map(|e| (id.clone(), e))
                })
                .collect();
            (p, planned)
        };
        let mut reported: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
        for r in sqlx::query("SELECT id, packages FROM devices WHERE status = 'active' AND packages IS NOT NULL")
            .fetch_all(&self.db)
            .await?
        {
            let id: String = r.get(0);
            if planned.contains_key(&id) {
                if let Ok(m) = serde_json::from_str::<Map<String, Value>>(r.get::<&str, _>(1)) {
                    reported.insert(id, m);
                }
            }
        }
        let mut counts: BTreeMap<&'static str, u64> = BTreeMap::new();
        let mut devices = Vec::new();
        for (id, entry) in &planned {
            let r = effective(entry, reported.get(id).and_then(|m| m.get(&p.name)));
            *counts.entry(r.state.as_str()).or_default() += 1;
            devices.push(json!({"device_id": id, "state": r.state, "version": r.version, "detail": r.detail,
                                "exit_code": r.exit_code, "intent": entry.intent}));
        }
        Ok(json!({"name": p.name, "version": p.version, "counts": counts, "devices": devices}))
    }

    /// The `packages` of `devices show`: what the device reported for each package of its plan
    /// (`pending` until it reports the current version).
    pub async fn device_packages(&self, device_id: &str, reported: &Map<String, Value>) -> Map<String, Value> {
        let world = self.world.read().await;
        let Some(meta) = world.devices.get(device_id) else { return Map::new() };
        let plan = world.directory.package_plan(meta.primary.as_ref(), &meta.package_requests);
        plan.iter()
            .map(|(name, e)| {
                let r = effective(e, reported.get(name));
                let mut v = json!({"state": r.state, "version": r.version, "detail": r.detail, "exit_code": r.exit_code,
                                   "intent": e.intent});
                if let Some(t) = r.log_tail {
                    v["log_tail"] = Value::String(t);
                }
                (name.clone(), v)
            })
            .collect()
    }
}

/// A device's state for a package of its plan: its report for the plan's version, else pending.
fn effective(e: &PlanEntry, reported: Option<&Value>) -> PackageReport {
    let r = reported.and_then(|v| serde_json::from_value::<PackageReport>(v.clone()).ok());
    match r {
        Some(r) if r.version == e.package.version => r,
        Some(r) => PackageReport::new(
            State::Pending,
            &e.package.version,
            Some(format!(
                "the device reported version {} {}; version {} is on its way",
                r.version,
                r.state.as_str(),
                e.package.version
            )),
        ),
        None => PackageReport::new(
            State::Pending,
            &e.package.version,
            Some("the device has not reported this package yet".to_string()),
        ),
    }
}

/// The plan entry of `sha256` for a device (download allowed), if its plan holds it.
pub fn planned_content(world: &World, device_id: &str, sha256: &str) -> Option<PlanEntry> {
    let meta = world.devices.get(device_id).filter(|m| m.active)?;
    world
        .directory
        .package_plan(meta.primary.as_ref(), &meta.package_requests)
        .into_values()
        .find(|e| e.package.sha256 == sha256)
}
