//! The server's state and its domain operations. Handlers call these; each write runs in one
//! database transaction together with its audit row, then updates the in-memory directory and
//! re-signs the envelopes of exactly the devices whose payload changed.
//!
//! One writer at a time: [`AppState::world`] is a mutex around the in-memory directory and device
//! metadata. Check-ins never take it; they read the lock-free-ish [`CheckinIndex`].

use crate::datadir::ServerKeys;
use crate::error::ApiError;
use crate::index::{CheckinIndex, CurrentEnvelope};
use crate::resign::Ticket;
use crate::secrets;
use crate::store::devices::DeviceRow;
use crate::store::Db;
use anyhow::Context;
use axum::http::HeaderValue;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use tenon_core::api::{envelope_etag, SettingScope};
use tenon_core::directory::Directory;
use tenon_core::envelope::{issue_canonical, next_version, CanonicalPayload, EnvelopeFields};
use tenon_core::ids::{GroupName, Upn};

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
    /// As enrolled, then as the last report said: the portal lists and searches devices from
    /// memory (a table scan per page view would not stay fast at 100,000 devices).
    pub hostname: String,
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
    /// Install requests (`tenonctl devices install ID NAME`): package name -> request number,
    /// compiled into the device's package plan.
    pub package_requests: BTreeMap<String, u64>,
    /// What the last report said about BitLocker, Delivery Optimization and failures, for the
    /// portal's overview (see `device_health`).
    pub health: crate::device_health::DeviceHealth,
    /// The user signed in most often, with their sightings (see `store::devices::note_sightings`).
    pub top_user: Option<(i64, Upn)>,
    /// The device's slot in the check-in index (the same `Arc`): the portal reads every device's
    /// last-seen time from here rather than looking each up in the index.
    pub slot: Arc<crate::index::DeviceSlot>,
    /// What the portal searches and sorts by; derived from `hostname`, `primary` and `users`:
    /// whoever changes those calls [`DeviceMeta::refresh_key`].
    pub key: crate::device_key::SearchKey,
}

impl DeviceMeta {
    /// Derives [`DeviceMeta::key`] again, after `hostname`, `primary` or `users` changed.
    pub fn refresh_key(&mut self) {
        self.key = crate::device_key::SearchKey::of(&self.hostname, self.primary.as_ref(), &self.users);
    }

    /// Whether [`DeviceMeta::key`] is what `refresh_key` would derive now (checked in debug builds).
    pub fn key_is_fresh(&self) -> bool {
        self.key == crate::device_key::SearchKey::of(&self.hostname, self.primary.as_ref(), &self.users)
    }
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
    /// Package content by SHA-256 (`with_content`; `DATA_DIR/packages` by default).
    pub content: Option<Arc<crate::packages::content::ContentStore>>,
    /// One directory sync at a time on this server (`directory::sync`).
    pub directory_sync: tokio::sync::Mutex<()>,
    /// Wakes the directory scheduler (a source was added or changed).
    pub directory_wake: tokio::sync::Notify,
    /// Graph readers by source, kept between syncs for their cached access token.
    pub graph_readers: crate::directory::GraphReaders,
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
            content: None,
            directory_sync: Default::default(),
            directory_wake: Default::default(),
            graph_readers: Default::default(),
        };
        Ok(state)
    }

    /// Puts a device as loaded into memory and the check-in index: new, or replacing what this
    /// server knew (never with an older envelope).
    pub(crate) fn apply_device_row(index: &CheckinIndex, world: &mut World, d: DeviceRow, dir_gen: u64) {
        let signed_by = envelope_signer(&d.envelope);
        match world.devices.get_mut(&d.id) {
            None => {
                let slot = index.insert(
                    &d.id,
                    d.credential_sha256,
                    current_envelope(d.version, &d.sha256, d.envelope),
                    !d.active,
                );
                let key = crate::device_key::SearchKey::of(&d.hostname, d.primary.as_ref(), &d.users);
                world.devices.insert(
                    d.id,
                    DeviceMeta {
                        hostname: d.hostname,
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
                        package_requests: d.package_requests,
                        health: d.health,
                        top_user: d.top_user,
                        slot,
                        key,
                    },
                );
            }
            Some(meta) => {
                meta.hostname = d.hostname;
                meta.primary = d.primary;
                meta.users = d.users;
                meta.refresh_key();
                meta.signed_in = d.signed_in;
                meta.has_reported = d.has_reported;
                meta.package_requests = d.package_requests;
                meta.health = d.health;
                meta.top_user = d.top_user;
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

    pub fn with_content(mut self, content: crate::packages::content::ContentStore) -> Self {
        self.content = Some(Arc::new(content));
        self
    }

    /// Re-signs the envelopes of `ids` whose payload changed or whose expiry is near, at once and
    /// under the caller's write lock: for one device (a report, a primary user set). Changes that
    /// reach many devices are queued for the re-signer instead (`self.resign.enqueue`).
    pub async fn recompile(&self, world: &mut World, ids: Vec<String>) -> anyhow::Result<usize> {
        let now = self.now();
        // A device is recompiled after its primary user or users changed: the portal's search key
        // must have followed (checked in debug builds, so in every test that changes them).
        debug_assert!(ids.iter().filter_map(|id| world.devices.get(id)).all(DeviceMeta::key_is_fresh));
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
            let compiled = directory.device_payload_with(meta.primary.as_ref(), &meta.users, &meta.package_requests);
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
pub(crate) fn envelope_signer(envelope: &str) -> String {
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
