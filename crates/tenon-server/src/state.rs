//! The server's state and its domain operations. Handlers call these; each write runs in one
//! database transaction together with its audit row, then updates the in-memory directory and
//! re-signs the envelopes of exactly the devices whose payload changed.
//!
//! One writer at a time: [`AppState::world`] is a mutex around the in-memory directory and device
//! metadata. Check-ins never take it; they read the lock-free-ish [`CheckinIndex`].

use crate::datadir::ServerKeys;
use crate::error::{ApiError, ApiResult};
use crate::index::{CheckinIndex, CurrentEnvelope};
use crate::resign::Ticket;
use crate::secrets;
use crate::store::changes::Kind;
use crate::store::devices::DeviceRow;
use crate::store::{audit, Db};
use anyhow::Context;
use axum::http::HeaderValue;
use serde_json::{json, Value};
use sqlx::Row;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use tenon_core::api::{envelope_etag, SettingScope};
use tenon_core::directory::{Directory, Group, User};
use tenon_core::envelope::{issue_canonical, next_version, CanonicalPayload, EnvelopeFields};
use tenon_core::ids::{GroupName, SettingKey, Upn};
use tenon_core::settings::{ScopeSettings, SettingValue};

/// Unix seconds. Passed in so tests and tools can control time.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

pub fn system_clock() -> Clock {
    Arc::new(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
    })
}

/// Who is calling an admin endpoint.
#[derive(Clone, Debug)]
pub struct Actor {
    pub token_id: String,
    pub name: String,
    pub roles: Vec<String>,
}

impl Actor {
    pub fn label(&self) -> String {
        format!("{} ({})", self.name, self.token_id)
    }

    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }
}

/// What the server remembers about a device between compiles.
#[derive(Clone, Debug)]
pub struct DeviceMeta {
    pub primary: Option<Upn>,
    pub users: BTreeSet<Upn>,
    /// Who the last report said is signed in (a user not in it who appears next starts a session).
    pub signed_in: BTreeSet<Upn>,
    pub version: u64,
    pub sha256: String,
    pub expires_at: i64,
    pub active: bool,
    pub enrolled_at: i64,
    pub has_reported: bool,
    /// Key id that signed the current envelope; a rotated signing key re-issues it.
    pub signed_by: String,
    /// The last configuration version a report claimed above what the server issued (ignored and
    /// audited once per distinct claim, so a device repeating it does not flood the audit log).
    pub ignored_claim: Option<u64>,
    /// SHA-256 of the last report stored for this device since start: an identical report
    /// updates the device row but adds no history row.
    pub last_report_sha: Option<[u8; 32]>,
    /// The directory generation ([`World::dir_gen`]) the current envelope was compiled from:
    /// the re-signer never replaces it with one compiled from an older snapshot.
    pub dir_gen: u64,
}

/// The in-memory world: directory, settings and device metadata.
#[derive(Default)]
pub struct World {
    /// Shared with the re-signer's snapshot; written through [`World::directory_mut`].
    pub directory: Arc<Directory>,
    /// Bumped by every directory write.
    pub dir_gen: u64,
    pub devices: HashMap<String, DeviceMeta>,
    /// The `dir_gen` of the last directory another server changed: an envelope compiled from
    /// an older snapshot misses that change and is compiled again (`store_prepared`).
    pub foreign_gen: u64,
}

pub struct AppState {
    pub db: Db,
    /// The database may be shared with other servers (PostgreSQL): writes note what they
    /// changed for the others, and this server follows theirs (`follow.rs`).
    pub shared: bool,
    /// This server's id in `changes.origin` and `leases.holder` (new at each start).
    pub origin: String,
    /// The last row of `changes` applied to memory (under the world's write lock).
    pub applied_seq: std::sync::atomic::AtomicI64,
    /// This server holds the lease of the database-wide jobs (`jobs.rs`).
    pub jobs_lease: std::sync::atomic::AtomicBool,
    /// The database answered the last probe (`jobs::probe_database`).
    pub database_ok: std::sync::atomic::AtomicBool,
    pub keys: ServerKeys,
    pub index: CheckinIndex,
    /// Writers (every change, a batch of reports, a re-signing chunk's commit) take it
    /// exclusively; the re-signer copies device metadata under a short read.
    pub world: tokio::sync::RwLock<World>,
    /// Re-signing of many devices in the background (`resign.rs`).
    pub resign: crate::resign::Resigner,
    /// Reports and enrollments, group-committed (`writer.rs`).
    pub writes: crate::writer::WriteQueue,
    pub clock: Clock,
    /// How long an envelope is valid.
    pub envelope_ttl: i64,
    /// Devices that may have open recovery-key rotation requests (a superset: an entry is dropped
    /// once the database shows none open). Every BitLocker-enforced agent asks each sync; the
    /// others are answered from memory.
    pub rotations_open: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Rate limits, failed-authentication tally, report history (`with_client_policy`).
    pub client: crate::client_policy::ClientPolicy,
    /// The TLS certificate being served (`with_tls`): enrollment tokens carry its trust.
    pub tls: Option<Arc<crate::tls::Tls>>,
}

/// Roles an admin token may hold.
pub const ROLE_ADMIN: &str = "admin";
pub const ROLE_RECOVERY_KEYS: &str = "recovery-keys";

impl AppState {
    pub fn now(&self) -> i64 {
        (self.clock)()
    }

    /// Loads the world from the database and fills the check-in index.
    pub async fn load(db: Db, keys: ServerKeys, clock: Clock, envelope_ttl: i64) -> anyhow::Result<Self> {
        let mut conn = db.acquire().await?;
        // Read first: a change committed while the rest loads is applied again by the follower
        // (applying is idempotent), never missed.
        let (applied, _) = crate::store::changes::bounds(&mut conn).await?;
        let mut world =
            World { directory: Arc::new(crate::store::directory::load(&mut conn).await?), ..World::default() };
        let index = CheckinIndex::default();
        for d in crate::store::devices::load(&mut conn, None).await? {
            Self::apply_device_row(&index, &mut world, d, 0);
        }
        for (id, seen) in crate::store::devices::last_seen(&mut conn).await? {
            if let Some(slot) = index.get(&id) {
                slot.seed_last_seen(seen);
            }
        }
        let open: Vec<String> = sqlx::query_scalar(crate::escrow::DEVICES_TO_ASK_SQL).fetch_all(&mut *conn).await?;
        drop(conn);
        let shared = crate::store::backend(&db) == crate::store::Backend::Postgres;
        let state = Self {
            db,
            shared,
            origin: secrets::short_id(),
            applied_seq: std::sync::atomic::AtomicI64::new(applied),
            jobs_lease: Default::default(),
            database_ok: std::sync::atomic::AtomicBool::new(true),
            keys,
            index,
            world: tokio::sync::RwLock::new(world),
            resign: Default::default(),
            writes: Default::default(),
            clock,
            envelope_ttl,
            rotations_open: std::sync::Mutex::new(open.into_iter().collect()),
            client: Default::default(),
            tls: None,
        };
        Ok(state)
    }

    /// Puts a device as loaded into memory and the check-in index: new, or replacing what this
    /// server knew (never with an older envelope).
    pub(crate) fn apply_device_row(index: &CheckinIndex, world: &mut World, d: DeviceRow, dir_gen: u64) {
        let signed_by = envelope_signer(&d.envelope);
        match world.devices.get_mut(&d.id) {
            None => {
                index.insert(&d.id, d.credential_sha256, current_envelope(d.version, &d.sha256, d.envelope), !d.active);
                world.devices.insert(
                    d.id,
                    DeviceMeta {
                        primary: d.primary,
                        users: d.users,
                        signed_in: d.signed_in,
                        version: d.version,
                        sha256: d.sha256,
                        expires_at: d.expires_at,
                        active: d.active,
                        enrolled_at: d.enrolled_at,
                        has_reported: d.has_reported,
                        signed_by,
                        ignored_claim: None,
                        last_report_sha: None,
                        dir_gen,
                    },
                );
            }
            Some(meta) => {
                meta.primary = d.primary;
                meta.users = d.users;
                meta.signed_in = d.signed_in;
                meta.has_reported = d.has_reported;
                if d.version > meta.version {
                    meta.version = d.version;
                    meta.sha256 = d.sha256.clone();
                    meta.expires_at = d.expires_at;
                    meta.signed_by = signed_by;
                    meta.dir_gen = dir_gen;
                    if let Some(slot) = index.get(&d.id) {
                        slot.set_current(current_envelope(d.version, &d.sha256, d.envelope));
                    }
                }
                if meta.active && !d.active {
                    meta.active = false;
                    if let Some(slot) = index.get(&d.id) {
                        slot.revoke();
                    }
                }
            }
        }
    }

    /// Replaces the default rate limits and report history with the serve options'.
    pub fn with_client_policy(mut self, client: crate::client_policy::ClientPolicy) -> Self {
        self.client = client;
        self
    }

    pub fn with_tls(mut self, tls: Option<Arc<crate::tls::Tls>>) -> Self {
        self.tls = tls;
        self
    }

    /// Re-signs the envelopes of `ids` whose payload changed or whose expiry is near, at once and
    /// under the caller's write lock: for one device (a report, a primary user set). Changes that
    /// reach many devices are queued for the re-signer instead (`self.resign.enqueue`).
    pub async fn recompile(&self, world: &mut World, ids: Vec<String>) -> anyhow::Result<usize> {
        let now = self.now();
        let prepared = self.prepare(
            &world.directory,
            ids.iter().filter_map(|id| world.devices.get(id).map(|m| (id.as_str(), m))),
            now,
        )?;
        let dir_gen = world.dir_gen;
        self.store_prepared(world, prepared, dir_gen).await
    }

    /// Compiles each device's payload and signs a new envelope for those whose payload changed,
    /// whose expiry is near or whose signing key was rotated. Pure computation: no lock, no I/O.
    pub(crate) fn prepare<'m>(
        &self,
        directory: &Directory,
        devices: impl Iterator<Item = (&'m str, &'m DeviceMeta)>,
        now: i64,
    ) -> anyhow::Result<Vec<crate::resign::Prepared>> {
        let signer = self.keys.signing_key_id();
        let mut changed = Vec::new();
        for (id, meta) in devices {
            if !meta.active {
                continue;
            }
            let compiled = directory.device_payload(meta.primary.as_ref(), &meta.users);
            // Canonicalized once: hashed to compare, and signed from if it changed.
            let canonical = CanonicalPayload::of(&compiled.payload).context("payload is not canonicalizable")?;
            let refresh_due = meta.expires_at - now < self.envelope_ttl / 2;
            if canonical.sha256 == meta.sha256 && !refresh_due && meta.signed_by == signer {
                continue;
            }
            let Some(version) = next_version(meta.version) else {
                tracing::error!(
                    device = %id,
                    version = meta.version,
                    "the device's configuration version is at the highest JSON-safe value; it cannot be re-issued: decommission and re-enroll it"
                );
                continue;
            };
            let issued = issue_canonical(
                &EnvelopeFields {
                    device_id: id,
                    user_id: compiled.user_id.as_deref(),
                    version,
                    issued_at: now,
                    expires_at: now + self.envelope_ttl,
                },
                &canonical,
                &self.keys.signing,
            )
            .context("cannot sign envelope")?;
            changed.push(crate::resign::Prepared { id: id.to_string(), base_version: meta.version, issued });
        }
        Ok(changed)
    }

    /// Commits prepared envelopes in one transaction and swaps them into the check-in index.
    /// One whose device moved on since it was compiled (another version issued, compiled from a
    /// newer directory than `dir_gen`, or decommissioned) is dropped: the device holds newer.
    /// Compiled before another server changed the directory, they are queued again instead: they
    /// miss that change, and that server re-signs only the devices its change reached.
    pub(crate) async fn store_prepared(
        &self,
        world: &mut World,
        prepared: Vec<crate::resign::Prepared>,
        dir_gen: u64,
    ) -> anyhow::Result<usize> {
        let signer = self.keys.signing_key_id();
        let mut tx = self.begin_write(world).await?;
        if dir_gen < world.foreign_gen {
            drop(tx);
            self.resign.requeue(prepared.into_iter().map(|p| p.id));
            return Ok(0);
        }
        let current: Vec<_> = prepared
            .into_iter()
            .filter(|p| {
                world
                    .devices
                    .get(&p.id)
                    .is_some_and(|m| m.active && m.version == p.base_version && m.dir_gen <= dir_gen)
            })
            .collect();
        if current.is_empty() {
            return Ok(0);
        }
        let mut stored = Vec::with_capacity(current.len());
        for p in current {
            let e = &p.issued;
            // Only over the version it was compiled from: the version never goes down, and never
            // carries two payloads, whoever else writes.
            let updated = sqlx::query(
                "UPDATE device_envelopes SET config_version = $1, config_sha256 = $2, envelope = $3, envelope_expires_at = $4
                 WHERE device_id = $5 AND config_version = $6",
            )
            .bind(e.version as i64)
            .bind(&e.payload_sha256)
            .bind(&e.bytes)
            .bind(e.expires_at)
            .bind(&p.id)
            .bind(p.base_version as i64)
            .execute(&mut *tx)
            .await?;
            if updated.rows_affected() == 1 {
                stored.push(p);
            }
        }
        self.note(&mut tx, crate::store::changes::Kind::Device, stored.iter().map(|p| p.id.as_str())).await?;
        let started = std::time::Instant::now();
        tx.commit().await?;
        crate::metrics::commit_took("resign", started);
        let n = stored.len();
        for p in stored {
            let e = p.issued;
            if let Some(meta) = world.devices.get_mut(&p.id) {
                meta.version = e.version;
                meta.sha256 = e.payload_sha256.clone();
                meta.expires_at = e.expires_at;
                meta.signed_by = signer.clone();
                meta.dir_gen = dir_gen;
            }
            if let Some(slot) = self.index.get(&p.id) {
                slot.set_current(current_envelope(e.version, &e.payload_sha256, e.bytes));
            }
        }
        Ok(n)
    }

    /// Active devices on which any of `upns` is the primary user or signs in.
    pub fn devices_of_users(world: &World, upns: &BTreeSet<Upn>) -> Vec<String> {
        world
            .devices
            .iter()
            .filter(|(_, m)| {
                m.primary.as_ref().is_some_and(|p| upns.contains(p)) || m.users.iter().any(|u| upns.contains(u))
            })
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Devices whose payload a change at `scope` can affect.
    pub(crate) fn devices_for_scope(world: &World, scope: &SettingScope) -> Vec<String> {
        match scope {
            SettingScope::Tenant => world.devices.keys().cloned().collect(),
            SettingScope::Group(g) if g == GroupName::ALL_USERS => world.devices.keys().cloned().collect(),
            SettingScope::Group(g) => {
                let members: BTreeSet<Upn> = world
                    .directory
                    .users
                    .iter()
                    .filter(|(_, u)| u.groups.iter().any(|ug| ug.as_str() == g))
                    .map(|(upn, _)| upn.clone())
                    .collect();
                Self::devices_of_users(world, &members)
            }
            SettingScope::User(u) => match Upn::parse(u) {
                Ok(u) => Self::devices_of_users(world, &[u].into()),
                Err(_) => Vec::new(),
            },
        }
    }

    // ---- admin tokens ------------------------------------------------------------------------

    /// Creates the bootstrap admin token when there is none; returns the token to write out.
    pub async fn bootstrap_admin_token(&self) -> anyhow::Result<Option<String>> {
        let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM admin_tokens WHERE revoked_at IS NULL")
            .fetch_one(&self.db)
            .await?;
        if count > 0 {
            return Ok(None);
        }
        let (token, _) = self.create_admin_token("bootstrap", &[ROLE_ADMIN, ROLE_RECOVERY_KEYS], None).await?;
        Ok(Some(token))
    }

    pub async fn create_admin_token(
        &self,
        name: &str,
        roles: &[&str],
        actor: Option<&Actor>,
    ) -> anyhow::Result<(String, String)> {
        let id = secrets::short_id();
        let cred = secrets::new_credential(secrets::ADMIN_PREFIX, &id);
        let mut tx = crate::store::begin_write(&self.db).await?;
        sqlx::query(
            "INSERT INTO admin_tokens (id, name, secret_sha256, roles, created_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&id)
        .bind(name)
        .bind(&cred.secret_sha256)
        .bind(serde_json::to_string(roles)?)
        .bind(self.now())
        .execute(&mut *tx)
        .await?;
        let who = actor.map(Actor::label).unwrap_or_else(|| "server".into());
        audit(&mut tx, self.now(), &who, "admin_token.create", Some(&id), json!({"name": name, "roles": roles}))
            .await?;
        tx.commit().await?;
        Ok((cred.token, id))
    }

    /// Records a refused attempt to create a token with roles the caller does not hold.
    pub async fn audit_token_grant_denied(
        &self,
        actor: &Actor,
        name: &str,
        roles: &[&str],
        missing: &[&str],
    ) -> ApiResult<()> {
        let mut tx = crate::store::begin_write(&self.db).await?;
        audit(
            &mut tx,
            self.now(),
            &actor.label(),
            "admin_token.create_denied",
            None,
            json!({"name": name, "roles": roles, "missing_roles": missing}),
        )
        .await?;
        tx.commit().await?;
        tracing::warn!(actor = %actor.label(), missing = ?missing, "admin token creation refused: roles the caller does not hold");
        Ok(())
    }

    /// Every admin token (never its secret), oldest first.
    pub async fn list_admin_tokens(&self) -> ApiResult<Vec<Value>> {
        let rows =
            sqlx::query("SELECT id, name, roles, created_at, revoked_at FROM admin_tokens ORDER BY created_at, id")
                .fetch_all(&self.db)
                .await?;
        Ok(rows
            .iter()
            .map(|r| {
                json!({
                    "id": r.get::<String, _>(0),
                    "name": r.get::<String, _>(1),
                    "roles": serde_json::from_str::<Value>(r.get::<&str, _>(2)).unwrap_or(Value::Null),
                    "created_at": crate::api::rfc3339(r.get(3)),
                    "revoked_at": r.get::<Option<i64>, _>(4).map(crate::api::rfc3339),
                })
            })
            .collect())
    }

    /// Revokes an admin token. The last active token with the admin role cannot be revoked: nobody
    /// could administer the server afterwards.
    pub async fn revoke_admin_token(&self, actor: &Actor, id: &str) -> ApiResult<()> {
        let now = self.now();
        let mut tx = crate::store::begin_write(&self.db).await?;
        let row = sqlx::query("SELECT name, roles, revoked_at FROM admin_tokens WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| {
                ApiError::NotFound(format!("no admin token {id}; `tenonctl admin-tokens list` shows them"))
            })?;
        if row.get::<Option<i64>, _>(2).is_some() {
            return Err(ApiError::Conflict(format!("admin token {id} is already revoked")));
        }
        let is_admin = serde_json::from_str::<Vec<String>>(row.get::<&str, _>(1))
            .unwrap_or_default()
            .iter()
            .any(|r| r == ROLE_ADMIN);
        if is_admin {
            let admins: Vec<String> = sqlx::query_scalar("SELECT roles FROM admin_tokens WHERE revoked_at IS NULL")
                .fetch_all(&mut *tx)
                .await?;
            let active_admins = admins
                .iter()
                .filter(|r| serde_json::from_str::<Vec<String>>(r).unwrap_or_default().iter().any(|r| r == ROLE_ADMIN))
                .count();
            if active_admins <= 1 {
                return Err(ApiError::Conflict(format!(
                    "admin token {id} is the last one with the {ROLE_ADMIN} role; create another before revoking it"
                )));
            }
        }
        sqlx::query("UPDATE admin_tokens SET revoked_at = $1 WHERE id = $2")
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        audit(&mut tx, now, &actor.label(), "admin_token.revoke", Some(id), json!({"name": row.get::<String, _>(0)}))
            .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn authenticate_admin(&self, token: &str) -> ApiResult<Actor> {
        let unauthorized = || {
            ApiError::Unauthorized(
                "admin token is missing or not valid; pass --token (or TENON_TOKEN) with a token such as the one in DATA_DIR/admin.token".into(),
            )
        };
        let (id, secret, rest) = secrets::split_token(token, secrets::ADMIN_PREFIX).ok_or_else(unauthorized)?;
        if rest.is_some() {
            return Err(unauthorized());
        }
        let row =
            sqlx::query("SELECT name, secret_sha256, roles FROM admin_tokens WHERE id = $1 AND revoked_at IS NULL")
                .bind(id)
                .fetch_optional(&self.db)
                .await?
                .ok_or_else(unauthorized)?;
        if !secrets::secret_matches(secret, row.get::<&str, _>(1)) {
            return Err(unauthorized());
        }
        let roles: Vec<String> = serde_json::from_str(row.get::<&str, _>(2)).unwrap_or_default();
        Ok(Actor { token_id: id.to_string(), name: row.get(0), roles })
    }

    // ---- enrollment --------------------------------------------------------------------------

    pub async fn create_enroll_token(
        &self,
        actor: &Actor,
        uses: u32,
        ttl_seconds: u64,
        pin_ca: bool,
    ) -> ApiResult<(String, i64)> {
        if uses == 0 || uses > 100_000 {
            return Err(ApiError::BadRequest("uses must be between 1 and 100000".into()));
        }
        if ttl_seconds == 0 || ttl_seconds > 366 * 24 * 3600 {
            return Err(ApiError::BadRequest("ttl must be between 1 second and 366 days".into()));
        }
        // The token tells the agent how to trust this server's TLS certificate.
        let tls_part =
            match &self.tls {
                Some(tls) => Some(tls.token_trust(pin_ca).map_err(ApiError::BadRequest)?),
                None if pin_ca => return Err(ApiError::BadRequest(
                    "--pin-ca needs a server that serves TLS; start it with --tls-cert/--tls-key or --tls-self-signed"
                        .into(),
                )),
                None => None,
            };
        let id = secrets::short_id();
        let cred = secrets::new_credential(secrets::ENROLL_PREFIX, &id);
        let now = self.now();
        let expires_at = now + ttl_seconds as i64;
        let mut tx = crate::store::begin_write(&self.db).await?;
        sqlx::query(
            "INSERT INTO enroll_tokens (id, secret_sha256, uses_total, uses_left, expires_at, created_at, created_by)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&id)
        .bind(&cred.secret_sha256)
        .bind(uses as i64)
        .bind(uses as i64)
        .bind(expires_at)
        .bind(now)
        .bind(actor.label())
        .execute(&mut *tx)
        .await?;
        audit(
            &mut tx,
            now,
            &actor.label(),
            "enroll_token.create",
            Some(&id),
            json!({"uses": uses, "expires_at": expires_at}),
        )
        .await?;
        tx.commit().await?;
        // The token carries the root key's fingerprint so the agent can pin it, and the TLS trust.
        let mut token = format!("{}.{}", cred.token, self.keys.root_fingerprint());
        if let Some(trust) = tls_part {
            token.push('.');
            token.push_str(trust.token_part());
        }
        Ok((token, expires_at))
    }

    /// A device shows the envelope it holds because the server's looked older (a rollback or a
    /// reused version: the database was restored from a backup). The envelope counts only if this
    /// server signed it for this device (any of its signing keys, past or present); then numbering
    /// continues above it, so the device accepts what the server signs next. Returns the ETag the
    /// device should fetch.
    pub async fn prove_held_envelope(&self, device_id: &str, envelope: &str) -> ApiResult<String> {
        let body = self.keys.verify_issued(device_id, envelope).map_err(|why| {
            ApiError::BadRequest(format!(
                "the envelope was not accepted as proof of the version this device holds: {why}"
            ))
        })?;
        let mut world = self.world.write().await;
        let mut tx = self.begin_write(&mut world).await?;
        let server_version = world.devices.get(device_id).ok_or_else(|| device_not_found(device_id))?.version;
        if body.version > server_version {
            let now = self.now();
            audit(
                &mut tx,
                now,
                &format!("device {device_id}"),
                "device.version_proven",
                Some(device_id),
                json!({"held_version": body.version, "server_version": server_version,
                       "reason": "the device holds an envelope this server signed with a higher version (database restored from a backup?); numbering continues above it"}),
            )
            .await?;
            // Numbering continues above the held version, in the database too: the re-sign
            // below replaces only the version it was compiled from.
            sqlx::query("UPDATE device_envelopes SET config_version = $1, config_sha256 = '' WHERE device_id = $2")
                .bind(body.version as i64)
                .bind(device_id)
                .execute(&mut *tx)
                .await?;
            self.note(&mut tx, Kind::Device, [device_id]).await?;
            tx.commit().await?;
            tracing::warn!(
                device = device_id,
                held = body.version,
                server = server_version,
                "device proved it holds a newer configuration version than the database; re-issuing above it"
            );
            if let Some(m) = world.devices.get_mut(device_id) {
                m.version = body.version;
                m.sha256.clear();
            }
            self.recompile(&mut world, vec![device_id.to_string()]).await?;
        }
        let meta = &world.devices[device_id];
        Ok(envelope_etag(meta.version, &meta.sha256))
    }

    // ---- settings and directory ----------------------------------------------------------------

    pub async fn set_setting(
        &self,
        actor: &Actor,
        scope: &SettingScope,
        key: &str,
        value: SettingValue,
    ) -> ApiResult<Ticket> {
        self.write_setting(actor, scope, key, Some(value)).await
    }

    pub async fn unset_setting(&self, actor: &Actor, scope: &SettingScope, key: &str) -> ApiResult<Ticket> {
        self.write_setting(actor, scope, key, None).await
    }

    /// Sets (`Some`) or removes (`None`) one key at one scope, audited, then re-signs the devices
    /// the scope reaches.
    async fn write_setting(
        &self,
        actor: &Actor,
        scope: &SettingScope,
        key: &str,
        value: Option<SettingValue>,
    ) -> ApiResult<Ticket> {
        let key = SettingKey::parse(key).map_err(|e| ApiError::BadRequest(e.to_string()))?;
        // Removing needs no schema check: a key an older version stored must stay removable.
        if let Some(v) = &value {
            let tenant_wide = match scope {
                SettingScope::Tenant => true,
                SettingScope::Group(g) => GroupName::parse(g).is_ok_and(|g| g.is_all_users()),
                SettingScope::User(_) => false,
            };
            tenon_core::schema::validate_at(&key, v, tenant_wide)?;
        }
        let mut world = self.world.write().await;
        let (kind, name) = self.check_scope(&world, scope)?;
        let now = self.now();
        let mut tx = self.begin_write(&mut world).await?;
        match &value {
            Some(value) => {
                if let SettingScope::Group(g) = scope {
                    sqlx::query("INSERT INTO groups (name) VALUES ($1) ON CONFLICT (name) DO NOTHING")
                        .bind(g)
                        .execute(&mut *tx)
                        .await?;
                }
                sqlx::query(
                    "INSERT INTO settings (scope_kind, scope_name, key, value, updated_at) VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (scope_kind, scope_name, key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                )
                .bind(kind)
                .bind(&name)
                .bind(key.as_str())
                .bind(value.to_text())
                .bind(now)
                .execute(&mut *tx)
                .await?;
                let details = json!({"key": key, "value": value.to_text()});
                audit(&mut tx, now, &actor.label(), "settings.set", Some(&scope_label(scope)), details).await?;
            }
            None => {
                let done = sqlx::query("DELETE FROM settings WHERE scope_kind = $1 AND scope_name = $2 AND key = $3")
                    .bind(kind)
                    .bind(&name)
                    .bind(key.as_str())
                    .execute(&mut *tx)
                    .await?;
                if done.rows_affected() == 0 {
                    return Err(ApiError::NotFound(format!(
                        "{} has no setting {key}; `tenonctl settings list` shows what is set",
                        scope_label(scope)
                    )));
                }
                let details = json!({"key": key});
                audit(&mut tx, now, &actor.label(), "settings.unset", Some(&scope_label(scope)), details).await?;
            }
        }
        self.note(&mut tx, Kind::Directory, [""]).await?;
        tx.commit().await?;
        let settings = scope_settings_mut(world.directory_mut(), scope)?;
        match value {
            Some(v) => settings.insert(key, v),
            None => settings.remove(&key),
        };
        let ids = Self::devices_for_scope(&world, scope);
        Ok(self.resign.enqueue(ids))
    }

    fn check_scope(&self, world: &World, scope: &SettingScope) -> ApiResult<(&'static str, String)> {
        Ok(match scope {
            SettingScope::Tenant => ("tenant", String::new()),
            SettingScope::Group(g) => {
                ("group", GroupName::parse(g).map_err(|e| ApiError::BadRequest(e.to_string()))?.to_string())
            }
            SettingScope::User(u) => {
                let upn = Upn::parse(u).map_err(|e| ApiError::BadRequest(e.to_string()))?;
                if !world.directory.users.contains_key(&upn) {
                    return Err(ApiError::NotFound(format!(
                        "no user {upn} in the directory; import it first with `tenonctl users import FILE`"
                    )));
                }
                ("user", upn.to_string())
            }
        })
    }

    pub async fn list_settings(&self, scope: Option<&SettingScope>) -> ApiResult<Vec<Value>> {
        let world = self.world.read().await;
        let mut out = Vec::new();
        let mut push = |scope: SettingScope, settings: &ScopeSettings| {
            for (k, v) in settings {
                out.push(json!({"scope": scope, "key": k, "value": v.to_text()}));
            }
        };
        let wanted = |s: &SettingScope| scope.is_none_or(|w| w == s);
        if wanted(&SettingScope::Tenant) {
            push(SettingScope::Tenant, &world.directory.tenant);
        }
        for (g, grp) in &world.directory.groups {
            let s = SettingScope::Group(g.to_string());
            if wanted(&s) {
                push(s, &grp.settings);
            }
        }
        let mut users: Vec<_> = world.directory.users.iter().collect();
        users.sort_by(|a, b| a.0.cmp(b.0));
        for (u, user) in users {
            let s = SettingScope::User(u.to_string());
            if wanted(&s) {
                push(s, &user.settings);
            }
        }
        Ok(out)
    }

    pub async fn set_group_priority(&self, actor: &Actor, group: &str, priority: i64) -> ApiResult<Ticket> {
        let g = GroupName::parse(group).map_err(|e| ApiError::BadRequest(e.to_string()))?;
        let mut world = self.world.write().await;
        let now = self.now();
        let mut tx = self.begin_write(&mut world).await?;
        sqlx::query("INSERT INTO groups (name, priority) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET priority = excluded.priority")
            .bind(g.as_str())
            .bind(priority)
            .execute(&mut *tx)
            .await?;
        audit(&mut tx, now, &actor.label(), "groups.set_priority", Some(g.as_str()), json!({"priority": priority}))
            .await?;
        self.note(&mut tx, Kind::Directory, [""]).await?;
        tx.commit().await?;
        world.directory_mut().groups.entry(g.clone()).or_default().priority = priority;
        let ids = Self::devices_for_scope(&world, &SettingScope::Group(g.to_string()));
        Ok(self.resign.enqueue(ids))
    }

    /// Imports Graph-shaped users; each needs `userPrincipalName`, may carry `groups: [names]`.
    /// Takes the request's users by value: each record moves into the directory instead of being
    /// copied, so an import of N users holds one copy of them, not two.
    pub async fn import_users(&self, actor: &Actor, users: Vec<Value>) -> ApiResult<(usize, usize, Ticket)> {
        let mut parsed = Vec::with_capacity(users.len());
        for (i, u) in users.into_iter().enumerate() {
            let Value::Object(mut obj) = u else {
                return Err(ApiError::BadRequest(format!("user #{i} is not a JSON object")));
            };
            let upn_raw = obj.get("userPrincipalName").and_then(Value::as_str).ok_or_else(|| {
                ApiError::BadRequest(format!("user #{i} has no \"userPrincipalName\" string; every user needs one"))
            })?;
            let upn = Upn::parse(upn_raw).map_err(|e| ApiError::BadRequest(format!("user #{i}: {e}")))?;
            let groups = match obj.get("groups") {
                None | Some(Value::Null) => BTreeSet::new(),
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|g| {
                        g.as_str()
                            .ok_or_else(|| {
                                ApiError::BadRequest(format!("user {upn}: groups must be an array of names"))
                            })
                            .and_then(|g| {
                                GroupName::parse(g).map_err(|e| ApiError::BadRequest(format!("user {upn}: {e}")))
                            })
                    })
                    .collect::<ApiResult<BTreeSet<_>>>()?,
                Some(_) => return Err(ApiError::BadRequest(format!("user {upn}: groups must be an array of names"))),
            };
            let id = match obj.get("id") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(_) => return Err(ApiError::BadRequest(format!("user {upn}: id must be a string"))),
            };
            obj.remove("groups");
            parsed.push((upn, id, Value::Object(obj), groups));
        }
        let mut world = self.world.write().await;
        let now = self.now();
        let mut tx = self.begin_write(&mut world).await?;
        let (mut created, mut updated) = (0, 0);
        let mut touched = BTreeSet::new();
        for (upn, id, record, groups) in &parsed {
            if world.directory.users.get(upn).is_some_and(|u| u.id.is_some() || !u.record.is_null()) {
                updated += 1;
            } else {
                created += 1;
            }
            sqlx::query(
                "INSERT INTO users (upn, id, record, updated_at) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (upn) DO UPDATE SET id = excluded.id, record = excluded.record, updated_at = excluded.updated_at",
            )
            .bind(upn.as_str())
            .bind(id)
            .bind(record.to_string())
            .bind(now)
            .execute(&mut *tx)
            .await?;
            sqlx::query("DELETE FROM user_groups WHERE upn = $1").bind(upn.as_str()).execute(&mut *tx).await?;
            for g in groups {
                sqlx::query("INSERT INTO groups (name) VALUES ($1) ON CONFLICT (name) DO NOTHING")
                    .bind(g.as_str())
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("INSERT INTO user_groups (upn, group_name) VALUES ($1, $2)")
                    .bind(upn.as_str())
                    .bind(g.as_str())
                    .execute(&mut *tx)
                    .await?;
            }
            touched.insert(upn.clone());
        }
        audit(&mut tx, now, &actor.label(), "users.import", None, json!({"created": created, "updated": updated}))
            .await?;
        self.note(&mut tx, Kind::Directory, [""]).await?;
        tx.commit().await?;
        let directory = world.directory_mut();
        for (upn, id, record, groups) in parsed {
            for g in &groups {
                directory.groups.entry(g.clone()).or_insert_with(Group::default);
            }
            let entry = directory.users.entry(upn).or_insert_with(User::default);
            entry.id = id;
            entry.record = record;
            entry.groups = groups;
        }
        let ids = Self::devices_of_users(&world, &touched);
        Ok((created, updated, self.resign.enqueue(ids)))
    }

    // ---- devices -------------------------------------------------------------------------------

    pub async fn set_primary(&self, actor: &Actor, device_id: &str, upn: Option<&str>) -> ApiResult<()> {
        let upn = upn.map(Upn::parse).transpose().map_err(|e| ApiError::BadRequest(e.to_string()))?;
        let mut world = self.world.write().await;
        let mut tx = self.begin_write(&mut world).await?;
        let meta = world.devices.get(device_id).ok_or_else(|| device_not_found(device_id))?;
        if !meta.active {
            return Err(ApiError::Conflict("device is decommissioned; re-enroll it to assign a user".into()));
        }
        let previous = meta.primary.clone();
        if let Some(u) = &upn {
            if !world.directory.users.contains_key(u) {
                return Err(ApiError::NotFound(format!(
                    "no user {u} in the directory; import it first with `tenonctl users import FILE`"
                )));
            }
        }
        let now = self.now();
        sqlx::query("UPDATE devices SET primary_user = $1 WHERE id = $2")
            .bind(upn.as_ref().map(Upn::as_str))
            .bind(device_id)
            .execute(&mut *tx)
            .await?;
        audit(
            &mut tx,
            now,
            &actor.label(),
            "device.set_primary",
            Some(device_id),
            json!({"primary_user": upn, "previous": previous}),
        )
        .await?;
        self.note(&mut tx, Kind::Device, [device_id]).await?;
        tx.commit().await?;
        if let Some(m) = world.devices.get_mut(device_id) {
            m.primary = upn;
        }
        self.recompile(&mut world, vec![device_id.to_string()]).await?;
        Ok(())
    }

    pub async fn decommission(&self, actor: &Actor, device_id: &str) -> ApiResult<()> {
        let mut world = self.world.write().await;
        let mut tx = self.begin_write(&mut world).await?;
        let meta = world.devices.get(device_id).ok_or_else(|| device_not_found(device_id))?;
        if !meta.active {
            return Err(ApiError::Conflict("device is already decommissioned".into()));
        }
        let now = self.now();
        sqlx::query(
            "UPDATE devices SET status = 'decommissioned', decommissioned_at = $1, primary_user = NULL WHERE id = $2",
        )
        .bind(now)
        .bind(device_id)
        .execute(&mut *tx)
        .await?;
        audit(
            &mut tx,
            now,
            &actor.label(),
            "device.decommission",
            Some(device_id),
            json!({"previous_primary": meta.primary}),
        )
        .await?;
        self.note(&mut tx, Kind::Device, [device_id]).await?;
        tx.commit().await?;
        if let Some(slot) = self.index.get(device_id) {
            slot.revoke();
        }
        if let Some(m) = world.devices.get_mut(device_id) {
            m.active = false;
            m.primary = None;
        }
        Ok(())
    }

    /// Writes the last-seen times the index collected, in transactions of a thousand, each
    /// under the world's write lock like every other write (so it never meets another writer in
    /// SQLite's lock). A batch that fails is marked dirty again: the next flush retries it.
    pub async fn flush_last_seen(&self) -> anyhow::Result<usize> {
        const PER_TRANSACTION: usize = 1_000;
        let dirty = self.index.take_dirty_last_seen();
        let mut written = 0;
        for (i, batch) in dirty.chunks(PER_TRANSACTION).enumerate() {
            let _world = self.world.write().await;
            let write = async {
                let mut tx = crate::store::begin_write(&self.db).await?;
                for (id, t) in batch {
                    sqlx::query(
                        "INSERT INTO device_last_seen (device_id, last_seen) VALUES ($1, $2)
                         ON CONFLICT (device_id) DO UPDATE SET last_seen = CASE WHEN excluded.last_seen > device_last_seen.last_seen
                             THEN excluded.last_seen ELSE device_last_seen.last_seen END",
                    )
                    .bind(id)
                    .bind(t)
                    .execute(&mut *tx)
                    .await?;
                }
                let started = std::time::Instant::now();
                tx.commit().await?;
                crate::metrics::commit_took("last_seen", started);
                Ok::<_, sqlx::Error>(())
            };
            if let Err(e) = write.await {
                // Nothing of this batch or the ones after it is stored: mark them dirty again.
                self.index.mark_last_seen_dirty(&dirty[i * PER_TRANSACTION..]);
                return Err(e.into());
            }
            written += batch.len();
        }
        Ok(written)
    }

    /// Queues the envelopes that expire within half their lifetime for re-issue.
    pub async fn refresh_expiring(&self) -> Ticket {
        let world = self.world.read().await;
        let now = self.now();
        let due: Vec<String> = world
            .devices
            .iter()
            .filter(|(_, m)| m.active && m.expires_at - now < self.envelope_ttl / 2)
            .map(|(id, _)| id.clone())
            .collect();
        drop(world);
        self.resign.enqueue(due)
    }

    /// Queues every device: at start, anything changed since the envelopes were signed (or a
    /// crash between a write and its re-sign) is re-issued in the background while the stored
    /// envelopes are served.
    pub async fn converge(&self) -> Ticket {
        let all: Vec<String> = self.world.read().await.devices.keys().cloned().collect();
        self.resign.enqueue(all)
    }
}

pub fn device_not_found(id: &str) -> ApiError {
    ApiError::NotFound(format!("no device {id}; `tenonctl devices list` shows the enrolled devices"))
}

/// The key id of an envelope's first signature.
fn envelope_signer(envelope: &str) -> String {
    serde_json::from_str::<Value>(envelope)
        .ok()
        .and_then(|v| v["signatures"][0]["keyid"].as_str().map(str::to_string))
        .unwrap_or_default()
}

pub fn current_envelope(version: u64, sha: &str, bytes: String) -> CurrentEnvelope {
    let etag = envelope_etag(version, sha);
    CurrentEnvelope {
        etag: HeaderValue::from_str(&etag).expect("an ETag of digits and hex is a valid header"),
        bytes: axum::body::Bytes::from(bytes),
        version,
        payload_sha256: sha.to_string(),
    }
}

fn scope_label(scope: &SettingScope) -> String {
    match scope {
        SettingScope::Tenant => "tenant".into(),
        SettingScope::Group(g) => format!("group {g}"),
        SettingScope::User(u) => format!("user {u}"),
    }
}

fn scope_settings_mut<'d>(dir: &'d mut Directory, scope: &SettingScope) -> ApiResult<&'d mut ScopeSettings> {
    Ok(match scope {
        SettingScope::Tenant => &mut dir.tenant,
        SettingScope::Group(g) => {
            &mut dir
                .groups
                .entry(GroupName::parse(g).map_err(|e| ApiError::BadRequest(e.to_string()))?)
                .or_default()
                .settings
        }
        SettingScope::User(u) => {
            &mut dir.users.entry(Upn::parse(u).map_err(|e| ApiError::BadRequest(e.to_string()))?).or_default().settings
        }
    })
}
