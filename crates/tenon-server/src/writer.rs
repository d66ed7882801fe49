//! The device write path: reports and enrollments, committed many to one transaction.
//!
//! Group commit: handlers put a [`Job`] on a bounded queue ([`WriteQueue`]) and wait. One task
//! ([`AppState::run_writer`]) takes what is queued (up to [`MAX_BATCH`]), holds the world's write
//! lock for that batch only, runs each job in a savepoint of one `BEGIN IMMEDIATE` transaction,
//! commits once, then updates the world and the check-in index and answers every job. Nothing is
//! acknowledged before its commit; a failed commit answers 503 with `Retry-After` and keeps
//! nothing. A full queue answers 503 with `Retry-After` at once: the server sheds load instead of
//! letting latency grow without bound. One fsync then carries hundreds of writes.
//!
//! A job that fails on its own (an unknown token, a decommissioned device) rolls back only its
//! savepoint. Two reports of one device never share a batch (the second waits for the next), so
//! each job sees what the one before it stored.

use crate::error::{ApiError, ApiResult};
use crate::secrets;
use crate::state::{current_envelope, AppState, DeviceMeta, World};
use crate::store::audit;
use crate::store::changes::Kind;
use anyhow::Context;
use serde_json::{json, Value};
use sqlx::{AnyConnection, Row};
use std::collections::{BTreeSet, HashSet, VecDeque};
use std::sync::Arc;
use tenon_core::api::{envelope_etag, valid_agent_version, CheckedReport, DeviceReport, ReportError};
use tenon_core::envelope::{issue, EnvelopeFields, IssuedEnvelope};
use tenon_core::ids::{DeviceId, Hostname, Upn};
use tokio::sync::{mpsc, oneshot};

/// Jobs waiting for the writer. At about 3,000 commits per second this is about a second and a
/// half of work; beyond it a client is told to come back rather than wait longer.
pub const QUEUE_CAPACITY: usize = 4_096;
/// Jobs per transaction.
pub const MAX_BATCH: usize = 512;

pub enum Job {
    Report {
        device_id: String,
        report: Box<DeviceReport>,
        checked: CheckedReport,
        reply: oneshot::Sender<ApiResult<String>>,
    },
    Enroll {
        token: String,
        hostname: Hostname,
        agent_version: String,
        reply: oneshot::Sender<ApiResult<(DeviceId, String)>>,
    },
}

impl Job {
    fn fail(self, e: ApiError) {
        match self {
            Job::Report { reply, .. } => {
                let _ = reply.send(Err(e));
            }
            Job::Enroll { reply, .. } => {
                let _ = reply.send(Err(e));
            }
        }
    }
}

pub struct WriteQueue {
    tx: mpsc::Sender<Job>,
    rx: std::sync::Mutex<Option<mpsc::Receiver<Job>>>,
}

impl Default for WriteQueue {
    fn default() -> Self {
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        Self { tx, rx: std::sync::Mutex::new(Some(rx)) }
    }
}

fn busy() -> ApiError {
    ApiError::Busy {
        detail: "the server has more writes queued than it commits in a second; retry after the Retry-After seconds"
            .into(),
        retry_after_secs: 1,
    }
}

fn not_committed() -> ApiError {
    ApiError::Busy {
        detail: "the database did not commit this write (nothing was stored); retry after the Retry-After seconds"
            .into(),
        retry_after_secs: 1,
    }
}

impl WriteQueue {
    async fn submit<T>(&self, make: impl FnOnce(oneshot::Sender<ApiResult<T>>) -> Job) -> ApiResult<T> {
        let (reply, answer) = oneshot::channel();
        self.tx.try_send(make(reply)).map_err(|_| busy())?;
        answer.await.map_err(|_| not_committed())?
    }
}

/// What a stored report changes in memory once committed.
struct ReportChange {
    hostname: String,
    report_sha: [u8; 32],
    signed_in: BTreeSet<Upn>,
    new_primary: Option<Upn>,
    ignored_claim: Option<u64>,
    audit_claim: bool,
    health: crate::device_health::DeviceHealth,
    /// Each signed-in user's sightings after this report.
    sightings: Vec<(Upn, i64)>,
}

/// What a stored enrollment adds to memory once committed.
struct Enrolled {
    device_id: DeviceId,
    hostname: String,
    credential: String,
    cred_digest: [u8; 32],
    issued: IssuedEnvelope,
}

/// A job stored in the batch's transaction, waiting for its commit.
enum Done {
    Report { device_id: String, change: ReportChange, reply: oneshot::Sender<ApiResult<String>> },
    Enroll { enrolled: Enrolled, reply: oneshot::Sender<ApiResult<(DeviceId, String)>> },
}

impl Done {
    fn fail(self, e: ApiError) {
        match self {
            Done::Report { reply, .. } => {
                let _ = reply.send(Err(e));
            }
            Done::Enroll { reply, .. } => {
                let _ = reply.send(Err(e));
            }
        }
    }
}

/// Logs a batch's timing at debug level when it is dropped (whichever way the batch ends).
struct BatchTiming {
    t0: std::time::Instant,
    lock_wait: std::time::Duration,
    jobs: usize,
}

impl Drop for BatchTiming {
    fn drop(&mut self) {
        tracing::debug!(
            jobs = self.jobs,
            lock_wait_ms = self.lock_wait.as_millis() as u64,
            total_ms = self.t0.elapsed().as_millis() as u64,
            "committed a write batch"
        );
    }
}

impl AppState {
    /// Enrolls a device; returns its id and credential once it is committed.
    pub async fn enroll(&self, token: &str, hostname: &str, agent_version: &str) -> ApiResult<(DeviceId, String)> {
        let hostname = Hostname::parse(hostname).map_err(|e| ApiError::BadRequest(e.to_string()))?;
        if !valid_agent_version(agent_version) {
            return Err(ApiError::BadRequest(ReportError::AgentVersion.to_string()));
        }
        self.writes
            .submit(|reply| Job::Enroll {
                token: token.to_string(),
                hostname,
                agent_version: agent_version.to_string(),
                reply,
            })
            .await
    }

    /// Stores a device report; detects the primary user at first contact; re-signs the device's
    /// envelope when its set of users changed. Returns the ETag the device should hold, once the
    /// report is committed.
    pub async fn record_report(
        &self,
        device_id: &str,
        report: DeviceReport,
        checked: CheckedReport,
    ) -> ApiResult<String> {
        self.writes
            .submit(|reply| Job::Report { device_id: device_id.to_string(), report: Box::new(report), checked, reply })
            .await
    }

    /// The writer task: runs for the life of the server.
    pub async fn run_writer(self: Arc<Self>) {
        let Some(mut rx) = self.writes.rx.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            tracing::error!("the writer was started twice; the second one does nothing");
            return;
        };
        let mut carry: VecDeque<Job> = VecDeque::new();
        loop {
            let first = match carry.pop_front() {
                Some(j) => j,
                None => match rx.recv().await {
                    Some(j) => j,
                    None => return,
                },
            };
            // The lock first, then the batch: what arrived while waiting for it rides along,
            // instead of waiting for the next batch.
            let t0 = std::time::Instant::now();
            let world = self.world.write().await;
            let lock_wait = t0.elapsed();
            let mut batch = Vec::with_capacity(64);
            let mut devices: HashSet<String> = HashSet::new();
            let mut deferred = VecDeque::new();
            let mut next = Some(first);
            while let Some(job) = next.take() {
                match &job {
                    Job::Report { device_id, .. } if !devices.insert(device_id.clone()) => deferred.push_back(job),
                    _ => batch.push(job),
                }
                if batch.len() >= MAX_BATCH {
                    break;
                }
                next = carry.pop_front().or_else(|| rx.try_recv().ok());
            }
            deferred.extend(carry.drain(..));
            carry = deferred;
            let _timing = BatchTiming { t0, lock_wait, jobs: batch.len() };
            self.commit_batch(world, batch).await;
        }
    }

    async fn commit_batch(&self, mut world: tokio::sync::RwLockWriteGuard<'_, World>, batch: Vec<Job>) {
        let now = self.now();
        let mut tx = match self.begin_write(&mut world).await {
            Ok(tx) => tx,
            Err(e) => {
                tracing::warn!(error = %e, jobs = batch.len(), "cannot start a write transaction; clients retry");
                let unreachable = matches!(e, ApiError::DatabaseUnavailable);
                batch
                    .into_iter()
                    .for_each(|j| j.fail(if unreachable { ApiError::DatabaseUnavailable } else { not_committed() }));
                return;
            }
        };
        // Every enrollment in a batch starts from the same payload: compile it once.
        let mut fresh_payload: Option<Value> = None;
        let mut done = Vec::with_capacity(batch.len());
        for job in batch {
            match job {
                Job::Report { device_id, report, checked, reply } => {
                    let r = async {
                        let mut sp = sqlx::Acquire::begin(&mut *tx).await?;
                        let d = self.report_write(&mut sp, &world, &device_id, &report, checked, now).await?;
                        sp.commit().await?;
                        Ok::<_, ApiError>(d)
                    }
                    .await;
                    match r {
                        Ok(change) => done.push(Done::Report { device_id, change, reply }),
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
                    }
                }
                Job::Enroll { token, hostname, agent_version, reply } => {
                    let payload = fresh_payload
                        .get_or_insert_with(|| world.directory.device_payload(None, &BTreeSet::new()).payload)
                        .clone();
                    let r = async {
                        let mut sp = sqlx::Acquire::begin(&mut *tx).await?;
                        let d = self.enroll_write(&mut sp, &token, &hostname, &agent_version, payload, now).await?;
                        sp.commit().await?;
                        Ok::<_, ApiError>(d)
                    }
                    .await;
                    match r {
                        Ok(enrolled) => done.push(Done::Enroll { enrolled, reply }),
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
                    }
                }
            }
        }
        if done.is_empty() {
            let _ = tx.rollback().await;
            return;
        }
        // The other servers (PostgreSQL) reload these devices from what this batch wrote.
        let ids: Vec<String> = done
            .iter()
            .map(|d| match d {
                Done::Report { device_id, .. } => device_id.clone(),
                Done::Enroll { enrolled, .. } => enrolled.device_id.to_string(),
            })
            .collect();
        if let Err(e) = self.note(&mut tx, Kind::Device, ids.iter().map(String::as_str)).await {
            tracing::warn!(error = %e, jobs = done.len(), "a write batch did not commit; nothing of it is stored and clients retry");
            done.into_iter().for_each(|d| d.fail(not_committed()));
            return;
        }
        let started = std::time::Instant::now();
        if let Err(e) = tx.commit().await {
            tracing::warn!(error = %e, jobs = done.len(), "a write batch did not commit; nothing of it is stored and clients retry");
            done.into_iter().for_each(|d| d.fail(not_committed()));
            return;
        }
        crate::metrics::commit_took("device_writes", started);
        let mut reports = Vec::new();
        let mut recompile = Vec::new();
        let dir_gen = world.dir_gen;
        for d in done {
            match d {
                Done::Enroll { enrolled: e, reply } => {
                    let slot = self.index.insert(
                        e.device_id.as_str(),
                        e.cred_digest,
                        current_envelope(e.issued.version, &e.issued.payload_sha256, e.issued.bytes),
                        false,
                    );
                    let key = crate::device_key::SearchKey::of(&e.hostname, None, &BTreeSet::new());
                    world.devices.insert(
                        e.device_id.to_string(),
                        DeviceMeta {
                            hostname: e.hostname,
                            primary: None,
                            users: BTreeSet::new(),
                            signed_in: BTreeSet::new(),
                            version: e.issued.version,
                            sha256: e.issued.payload_sha256,
                            expires_at: e.issued.expires_at,
                            active: true,
                            enrolled_at: now,
                            has_reported: false,
                            signed_by: self.keys.signing_key_id(),
                            ignored_claim: None,
                            last_report_sha: None,
                            dir_gen,
                            package_requests: Default::default(),
                            health: Default::default(),
                            top_user: None,
                            slot,
                            key,
                        },
                    );
                    let _ = reply.send(Ok((e.device_id, e.credential)));
                }
                Done::Report { device_id, change: r, reply } => {
                    if let Some(slot) = self.index.get(&device_id) {
                        slot.touch(now);
                    }
                    if let Some(meta) = world.devices.get_mut(&device_id) {
                        let host_changed = meta.hostname != r.hostname;
                        meta.hostname = r.hostname;
                        meta.has_reported = true;
                        meta.last_report_sha = Some(r.report_sha);
                        meta.health = r.health;
                        for (upn, n) in &r.sightings {
                            crate::store::devices::note_sightings(&mut meta.top_user, upn, *n);
                        }
                        let before = meta.users.len();
                        meta.users.extend(r.signed_in.iter().cloned());
                        meta.signed_in = r.signed_in;
                        let users_changed = meta.users.len() != before;
                        let primary_changed = r.new_primary.is_some();
                        if primary_changed {
                            meta.primary = r.new_primary;
                        }
                        if r.audit_claim {
                            meta.ignored_claim = r.ignored_claim;
                        }
                        if host_changed || users_changed || primary_changed {
                            meta.refresh_key();
                        }
                        if users_changed || primary_changed {
                            recompile.push(device_id.clone());
                        }
                    }
                    reports.push((device_id, reply));
                }
            }
        }
        if !recompile.is_empty() {
            if let Err(e) = self.recompile(&mut world, recompile).await {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "cannot re-sign devices whose users changed; the next report retries"
                );
            }
        }
        for (id, reply) in reports {
            let etag = world.devices.get(&id).map(|m| envelope_etag(m.version, &m.sha256));
            let _ = reply.send(etag.ok_or_else(|| crate::state::device_not_found(&id)));
        }
    }

    /// One report's rows, inside the batch's transaction. Returns what to change in memory.
    async fn report_write(
        &self,
        tx: &mut AnyConnection,
        world: &World,
        device_id: &str,
        report: &DeviceReport,
        checked: CheckedReport,
        now: i64,
    ) -> ApiResult<ReportChange> {
        let CheckedReport { hostname, signed_in_users: signed_in } = checked;
        let detection_window = world
            .directory
            .effective_for(None)
            .get("Devices.PrimaryUserDetectionWindowHours")
            .and_then(Value::as_i64)
            .unwrap_or(0)
            .max(0);
        let meta = world.devices.get(device_id).ok_or_else(|| ApiError::NotFound("device not found".into()))?;
        let first_contact = !meta.has_reported;
        // A window of 0 (the default) means the first contact only; without the `> 0` a report in the
        // same second as the enrollment would still count as inside the window.
        let in_window =
            first_contact || (detection_window > 0 && now - meta.enrolled_at <= detection_window.saturating_mul(3600));
        let new_primary = match (&meta.primary, signed_in.iter().next()) {
            (None, Some(first)) if in_window => Some(first.clone()),
            _ => None,
        };
        let report_json = serde_json::to_string(report).map_err(|e| ApiError::Internal(e.into()))?;
        let report_sha: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(report_json.as_bytes()).into();
        // The history keeps what changed; a repeat of the last report (the agent's daily full
        // report, a retry) only refreshes the device row below.
        if meta.last_report_sha != Some(report_sha) {
            sqlx::query("INSERT INTO reports (device_id, received_at, report) VALUES ($1, $2, $3)")
                .bind(device_id)
                .bind(now)
                .bind(&report_json)
                .execute(&mut *tx)
                .await?;
            self.client.history.prune(&mut *tx, device_id, now).await?;
        }
        sqlx::query(
            "UPDATE devices SET hostname = $1, agent_version = $2, reported_version = $3, reported_sha256 = $4,
                    last_error = $5, last_report_at = $6, signed_in_users = $7, policies = $8, packages = $9
             WHERE id = $10",
        )
        .bind(hostname.as_str())
        .bind(&report.agent_version)
        // Only a version the server issued is recorded as held; a claim above it is ignored below.
        .bind(report.config_version.filter(|v| *v <= meta.version).map(|v| v as i64))
        .bind(&report.config_sha256)
        .bind(&report.last_error)
        .bind(now)
        .bind(serde_json::to_string(&signed_in).unwrap_or_default())
        .bind(serde_json::to_string(&report.policies).unwrap_or_default())
        .bind(serde_json::to_string(&report.packages).unwrap_or_default())
        .bind(device_id)
        .execute(&mut *tx)
        .await?;
        // A sighting is a sign-in session (the user was not signed in at the previous report) or
        // a day the user was seen signed in: how often the agent reports does not change it.
        let mut sightings = Vec::with_capacity(signed_in.len());
        for upn in &signed_in {
            let new_session = !meta.signed_in.contains(upn);
            let n: i64 = sqlx::query_scalar(
                "INSERT INTO device_users (device_id, upn, first_seen, last_seen, sightings) VALUES ($1, $2, $3, $4, 1)
                 ON CONFLICT (device_id, upn) DO UPDATE SET
                     sightings = device_users.sightings + (CASE WHEN $5 OR device_users.last_seen / 86400 < excluded.last_seen / 86400 THEN 1 ELSE 0 END),
                     last_seen = excluded.last_seen
                 RETURNING sightings",
            )
            .bind(device_id)
            .bind(upn.as_str())
            .bind(now)
            .bind(now)
            .bind(new_session)
            .fetch_one(&mut *tx)
            .await?;
            sightings.push((upn.clone(), n));
        }
        // The server never believes a version it did not issue: a report claiming more (a forged
        // or broken report) would otherwise make the server re-issue above it and could push the
        // device out of the safe integer range. A device that really holds a newer envelope (the
        // database was restored from a backup) proves it with the envelope itself
        // (`prove_held_envelope`). The claim is audited once per distinct value.
        let ignored_claim = report.config_version.filter(|v| *v > meta.version);
        let audit_claim = ignored_claim.is_some() && ignored_claim != meta.ignored_claim;
        if let (Some(claimed), true) = (ignored_claim, audit_claim) {
            tracing::warn!(
                device = device_id,
                claimed,
                issued = meta.version,
                "a report claims a configuration version the server never issued; ignored"
            );
            audit(
                &mut *tx,
                now,
                &format!("device {device_id}"),
                "device.suspicious_report",
                Some(device_id),
                json!({"reason": "config_version above the highest version issued to this device; ignored",
                       "claimed_version": claimed, "issued_version": meta.version}),
            )
            .await?;
        }
        if let Some(p) = &new_primary {
            sqlx::query("UPDATE devices SET primary_user = $1 WHERE id = $2")
                .bind(p.as_str())
                .bind(device_id)
                .execute(&mut *tx)
                .await?;
            audit(
                &mut *tx,
                now,
                &format!("device {device_id}"),
                "device.primary_detected",
                Some(device_id),
                json!({"primary_user": p}),
            )
            .await?;
        }
        Ok(ReportChange {
            hostname: hostname.as_str().to_string(),
            report_sha,
            signed_in,
            new_primary,
            ignored_claim,
            audit_claim,
            health: crate::device_health::DeviceHealth::from_report(&report.policies, report.last_error.as_deref()),
            sightings,
        })
    }

    /// One enrollment's rows, inside the batch's transaction.
    async fn enroll_write(
        &self,
        tx: &mut AnyConnection,
        token: &str,
        hostname: &Hostname,
        agent_version: &str,
        payload: Value,
        now: i64,
    ) -> ApiResult<Enrolled> {
        let bad = || {
            ApiError::Unauthorized(
                "enrollment token is not valid; create one with `tenonctl enroll-token create`".into(),
            )
        };
        let (token_id, secret, fingerprint) = secrets::split_token(token, secrets::ENROLL_PREFIX).ok_or_else(bad)?;
        let hostname = hostname.as_str();
        let row =
            sqlx::query("SELECT secret_sha256, uses_left, expires_at, revoked_at FROM enroll_tokens WHERE id = $1")
                .bind(token_id)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or_else(bad)?;
        if !secrets::secret_matches(secret, row.get::<&str, _>(0)) {
            return Err(bad());
        }
        if row.get::<Option<i64>, _>(3).is_some() {
            return Err(ApiError::Unauthorized(
                "enrollment token was revoked; create a new one with `tenonctl enroll-token create`".into(),
            ));
        }
        if row.get::<i64, _>(2) <= now {
            return Err(ApiError::Unauthorized(
                "enrollment token has expired; create a new one with `tenonctl enroll-token create`".into(),
            ));
        }
        if row.get::<i64, _>(1) <= 0 {
            return Err(ApiError::Unauthorized(
                "enrollment token has no uses left; create a new one with `tenonctl enroll-token create --uses N`"
                    .into(),
            ));
        }
        // The token names the root key the agent will pin. One that names another key (a damaged
        // token, or one edited to point elsewhere) would enroll a device that then refuses this
        // server: refuse it before an enrollment is used up (after the secret check, so a guessed
        // token is still a counted authentication failure).
        let root_part = fingerprint.map(|rest| rest.split('.').next().unwrap_or(rest));
        if root_part != Some(self.keys.root_fingerprint().as_str()) {
            return Err(ApiError::BadRequest(
                "the enrollment token names another server's root key (its last part is not this server's fingerprint); \
                 check --server, or create a token on this server with `tenonctl enroll-token create`"
                    .into(),
            ));
        }
        sqlx::query("UPDATE enroll_tokens SET uses_left = uses_left - 1 WHERE id = $1")
            .bind(token_id)
            .execute(&mut *tx)
            .await?;
        let device_id = DeviceId::from_random(secrets::random_bytes::<16>());
        let cred = secrets::new_credential(secrets::DEVICE_PREFIX, device_id.as_str());
        let issued = issue(
            &EnvelopeFields {
                device_id: device_id.as_str(),
                user_id: None,
                version: 1,
                issued_at: now,
                expires_at: now + self.envelope_ttl,
            },
            payload,
            &self.keys.signing,
        )
        .map_err(|e| ApiError::Internal(e.into()))?;
        sqlx::query(
            "INSERT INTO devices (id, hostname, credential_sha256, enrolled_at, enroll_token_id, agent_version)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(device_id.as_str())
        .bind(hostname)
        .bind(&cred.secret_sha256)
        .bind(now)
        .bind(token_id)
        .bind(agent_version)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO device_envelopes (device_id, config_version, config_sha256, envelope, envelope_expires_at)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(device_id.as_str())
        .bind(issued.version as i64)
        .bind(&issued.payload_sha256)
        .bind(&issued.bytes)
        .bind(issued.expires_at)
        .execute(&mut *tx)
        .await?;
        audit(
            &mut *tx,
            now,
            &format!("device {device_id}"),
            "device.enroll",
            Some(device_id.as_str()),
            json!({"hostname": hostname, "enroll_token": token_id}),
        )
        .await?;
        let cred_digest: [u8; 32] =
            hex::decode(&cred.secret_sha256).ok().and_then(|b| b.try_into().ok()).context("hash")?;
        Ok(Enrolled { device_id, hostname: hostname.to_string(), credential: cred.token, cred_digest, issued })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::response::IntoResponse;

    fn enroll_job() -> (Job, oneshot::Receiver<ApiResult<(DeviceId, String)>>) {
        let (reply, rx) = oneshot::channel();
        let job = Job::Enroll {
            token: "t".into(),
            hostname: Hostname::parse("PC-1").unwrap(),
            agent_version: "1".into(),
            reply,
        };
        (job, rx)
    }

    #[tokio::test]
    async fn a_full_queue_answers_503_with_retry_after_at_once() {
        let q = WriteQueue::default();
        let mut waiting = Vec::new();
        for _ in 0..QUEUE_CAPACITY {
            let (job, rx) = enroll_job();
            assert!(q.tx.try_send(job).is_ok(), "room in the queue");
            waiting.push(rx);
        }
        let answer = q.submit::<(DeviceId, String)>(|reply| Job::Enroll {
            token: "t".into(),
            hostname: Hostname::parse("PC-2").unwrap(),
            agent_version: "1".into(),
            reply,
        });
        let err = tokio::time::timeout(std::time::Duration::from_secs(1), answer)
            .await
            .expect("answered at once, not after the queue drains")
            .expect_err("refused");
        let resp = err.into_response();
        assert_eq!(resp.status(), 503);
        assert_eq!(resp.headers()["retry-after"], "1");
    }

    #[tokio::test]
    async fn a_job_the_writer_drops_is_not_acknowledged() {
        let q = WriteQueue::default();
        let answer = q.submit::<(DeviceId, String)>(|reply| {
            drop(reply);
            enroll_job().0
        });
        let err = answer.await.expect_err("not acknowledged");
        assert!(matches!(err, ApiError::Busy { .. }), "{err:?}");
    }
}
