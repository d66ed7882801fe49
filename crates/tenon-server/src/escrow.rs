//! The recovery-key escrow vault: accepting sealed keys from devices (acknowledged only after the
//! row is committed), administrators' audited reads that trigger rotation, the devices' reports
//! that a rotated-out protector is gone (only that completes a rotation), the background check
//! that every stored key still opens, and the offline escrow-key rotation that re-wraps them.
//!
//! Conflicts: a protector's recovery password never changes on a real volume, so an upload of a
//! different password under a protector id the server already holds (a forged upload with a
//! stolen device credential, say) is kept beside the first and both are flagged: `recovery-keys
//! show` lists both with a warning, the audit log has a `recovery_key.escrow_conflict` row, and the
//! device hears of it with its rotation check. An identical re-upload (a receipt lost to a crash)
//! stores nothing new.
//!
//! Keys arrive sealed to the server's escrow public key (tenon-core `policy::escrow`); the server
//! opens them only to check an upload and to answer an authorised read. Neither the password nor
//! any part of it is ever logged, audited or put in an error: only protector ids and counts.
//!
//! Escrow key files in `DATA_DIR/keys/`: `escrow.x25519` (current: enrollment hands out its public
//! key, new seals go to it), `escrow.x25519.next` (exists only while a rotation is unfinished) and
//! `escrow.x25519.old-N` (earlier keys). All of them form the [`EscrowKeyring`]. Agents seal to
//! the key they pinned at enrollment until the server hands them a newer one, signed by the
//! envelope-signing key, with their next rotation check; meanwhile an upload sealed to an older key
//! is still accepted and re-sealed to the current key before it is stored.

use crate::datadir::{write_secret_file, DataDir};
use crate::error::{ApiError, ApiResult};
use crate::secrets::random_bytes;
use crate::state::{device_not_found, Actor, AppState, ROLE_RECOVERY_KEYS};
use crate::store::audit;
use crate::store::changes::Kind;
use anyhow::{bail, Context};
use serde_json::{json, Value};
use sqlx::{AnyPool, Row};
use std::path::Path;
use subtle::ConstantTimeEq;
use tenon_core::policy::escrow::{
    escrow_key_id, escrow_public_key, is_recovery_password, open, seal, EscrowReceipt, EscrowRetired, EscrowUpload,
    SealRandomness, SealedRecoveryKey, SEAL_ALG,
};
use zeroize::Zeroizing;

pub const CURRENT_FILE: &str = "escrow.x25519";
pub const NEXT_FILE: &str = "escrow.x25519.next";
const OLD_PREFIX: &str = "escrow.x25519.old-";

/// Every escrow secret the server holds: the current one and those it may still meet in sealed
/// keys (older keys agents pinned, or the new key of an unfinished rotation).
#[derive(Clone)]
pub struct EscrowKeyring {
    pub current: [u8; 32],
    pub others: Vec<[u8; 32]>,
}

impl EscrowKeyring {
    pub fn current_id(&self) -> String {
        escrow_key_id(&escrow_public_key(&self.current))
    }

    /// The secret whose public key has this id.
    pub fn secret_for(&self, key_id: &str) -> Option<&[u8; 32]> {
        std::iter::once(&self.current)
            .chain(self.others.iter())
            .find(|s| escrow_key_id(&escrow_public_key(s)) == key_id)
    }

    /// Opens a sealed key with the secret it names.
    pub fn open(&self, sealed: &SealedRecoveryKey) -> Result<Zeroizing<String>, &'static str> {
        let secret =
            self.secret_for(&sealed.escrow_key_id).ok_or("sealed to an escrow key this server does not hold")?;
        open(secret, sealed).map_err(|_| "does not open (wrong key or damaged)")
    }

    /// Loads the extra secrets (`.next`, `.old-N`) next to the current one in `dir`.
    pub fn load(dir: &Path, current: [u8; 32]) -> anyhow::Result<Self> {
        let mut others = Vec::new();
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .with_context(|| format!("cannot list {}", dir.display()))?
            .filter_map(|e| e.ok().and_then(|e| e.file_name().into_string().ok()))
            .filter(|n| n == NEXT_FILE || n.starts_with(OLD_PREFIX))
            .collect();
        names.sort();
        for name in names {
            let p = dir.join(&name);
            let bytes = std::fs::read(&p).with_context(|| format!("cannot read key {}", p.display()))?;
            let secret: [u8; 32] = bytes.try_into().map_err(|_| {
                anyhow::anyhow!("escrow key file {} is damaged (not 32 bytes); restore it from backup", p.display())
            })?;
            if name == NEXT_FILE {
                tracing::warn!(
                    "an escrow-key rotation was interrupted ({} exists); run `tenon-server rotate-escrow-key` again to finish it",
                    p.display()
                );
            }
            others.push(secret);
        }
        Ok(Self { current, others })
    }
}

/// Longest mount / protector id the server accepts (Windows: `C:` or a volume GUID path; `{GUID}`).
const MAX_LABEL: usize = 128;
/// Different passwords kept for one protector id; past this, uploads for it are refused (a
/// credential spamming forgeries cannot grow the archive without bound).
const MAX_PASSWORDS_PER_PROTECTOR: usize = 8;

/// What the server tells administrators about a protector with conflicting passwords.
pub const CONFLICT_WARNING: &str =
    "this protector has more than one different recovery password escrowed; a protector's \
     password never changes, so at least one was not uploaded by the volume (a forged upload with the device's \
     credential?). Try each, rotate the key, and check the audit log for recovery_key.escrow_conflict";

/// Devices whose rotation check must look in the database: open rotations or escrow conflicts
/// (loaded into `AppState::rotations_open` at start).
pub const DEVICES_TO_ASK_SQL: &str = "SELECT device_id FROM recovery_key_rotations WHERE completed_at IS NULL
     UNION SELECT device_id FROM recovery_keys WHERE conflict = 1 AND retired_at IS NULL";

/// Compares two passwords without an early exit (a timing side channel on a secret).
/// What decides whether a stored recovery-key row is a protector's current key.
pub struct KeyRowState {
    pub protector_id: String,
    pub superseded: bool,
    pub retired: bool,
    pub conflict: bool,
}

impl KeyRowState {
    fn of(r: &sqlx::any::AnyRow) -> Self {
        Self {
            protector_id: r.get("protector_id"),
            superseded: r.get::<Option<String>, _>("superseded_by").is_some(),
            retired: r.get::<Option<i64>, _>("retired_at").is_some(),
            conflict: r.get::<i64, _>("conflict") != 0,
        }
    }
}

/// For rows in id order: whether each is its protector's current key. That is its newest row
/// neither superseded nor retired (older servers stored a re-upload as another row); a protector
/// in conflict has several current keys, one per different password, and all of them count.
/// Every other row is archived.
pub fn current_rows(rows: impl Iterator<Item = KeyRowState>) -> Vec<bool> {
    let rows: Vec<KeyRowState> = rows.collect();
    let live = |r: &KeyRowState| !r.superseded && !r.retired;
    let mut newest: std::collections::HashMap<&str, usize> = Default::default();
    for (i, r) in rows.iter().enumerate().filter(|(_, r)| live(r)) {
        newest.insert(&r.protector_id, i);
    }
    rows.iter()
        .enumerate()
        .map(|(i, r)| live(r) && (r.conflict || newest.get(r.protector_id.as_str()) == Some(&i)))
        .collect()
}

/// One stored recovery key without its password: what the portal's device page lists to anyone
/// signed in (which protectors are escrowed, since when, current or archived).
pub struct KeyMeta {
    pub mount: String,
    pub protector_id: String,
    pub received_at: i64,
    pub superseded_at: Option<i64>,
    pub retired_at: Option<i64>,
    pub conflict: bool,
    pub read_count: i64,
    pub current: bool,
    /// A rotation of this key's protector was requested (a read) and the device has not done it yet.
    pub rotation_open: bool,
}

fn same_password(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

fn check_label(what: &str, v: &str) -> ApiResult<()> {
    if v.is_empty() || v.len() > MAX_LABEL || v.chars().any(char::is_control) {
        return Err(ApiError::BadRequest(format!("{what} must be 1 to {MAX_LABEL} printable characters")));
    }
    Ok(())
}

fn fresh_randomness() -> SealRandomness {
    let bytes = Zeroizing::new(random_bytes::<56>());
    SealRandomness::from_bytes(&bytes)
}

/// Re-seals an opened password to `secret`'s public key under the same labels.
fn reseal(secret: &[u8; 32], sealed: &SealedRecoveryKey, password: &str) -> anyhow::Result<SealedRecoveryKey> {
    seal(
        &escrow_public_key(secret),
        &sealed.device_id,
        &sealed.mount,
        &sealed.protector_id,
        password,
        &fresh_randomness(),
    )
    .map_err(|e| anyhow::anyhow!("cannot re-seal protector {}: {e}", sealed.protector_id))
}

impl AppState {
    /// `POST /api/v1/device/escrow`: checks the sealed key opens to a recovery password bound to
    /// this device, stores it in one transaction with its audit row (the database runs with
    /// `synchronous=FULL`, so a commit is durable), and only then returns the receipt.
    pub async fn escrow_upload(&self, device_id: &str, upload: &EscrowUpload) -> ApiResult<EscrowReceipt> {
        let sealed = &upload.sealed;
        if sealed.alg != SEAL_ALG {
            return Err(ApiError::BadRequest(format!("unknown sealing scheme {:?}; expected {SEAL_ALG}", sealed.alg)));
        }
        if sealed.device_id != device_id {
            return Err(ApiError::BadRequest(
                "the sealed key is bound to another device id; seal it to this device's id".into(),
            ));
        }
        check_label("mount", &sealed.mount)?;
        check_label("protector_id", &sealed.protector_id)?;
        if let Some(r) = &upload.replaces {
            check_label("replaces", r)?;
            if r == &sealed.protector_id {
                return Err(ApiError::BadRequest("a key cannot replace itself".into()));
            }
        }
        let password = self.keys.escrow.open(sealed).map_err(|why| {
            ApiError::BadRequest(format!(
                "the sealed key was refused: it {why}; seal it to the server's current escrow key"
            ))
        })?;
        if !is_recovery_password(&password) {
            return Err(ApiError::BadRequest("the sealed secret is not a BitLocker recovery password".into()));
        }
        // Stored keys are always sealed to the current escrow key, so a later rotation of an old
        // key cannot strand them.
        let stored = if sealed.escrow_key_id == self.keys.escrow.current_id() {
            sealed.clone()
        } else {
            reseal(&self.keys.escrow.current, sealed, &password)?
        };
        let now = self.now();
        let mut tx = crate::store::begin_write(&self.db).await?;
        // What the server already holds for this protector: the same password (a re-upload after
        // a lost receipt), or a different one (a conflict).
        let held = sqlx::query(
            "SELECT id, sealed, received_at, conflict FROM recovery_keys WHERE device_id = $1 AND protector_id = $2 ORDER BY id",
        )
        .bind(device_id)
        .bind(&sealed.protector_id)
        .fetch_all(&mut *tx)
        .await?;
        let mut identical: Option<i64> = None;
        let mut different = 0usize;
        let mut flagged = false;
        for row in &held {
            flagged |= row.get::<i64, _>("conflict") != 0;
            let opened = serde_json::from_str::<SealedRecoveryKey>(row.get::<&str, _>("sealed"))
                .ok()
                .and_then(|s| self.keys.escrow.open(&s).ok());
            match opened {
                Some(pw) if same_password(&pw, &password) => identical = identical.or(Some(row.get("received_at"))),
                Some(_) => different += 1,
                // A row this server cannot open (a lost escrow key) proves nothing either way.
                None => {}
            }
        }
        drop(password);
        if let Some(received_at) = identical {
            tx.rollback().await?;
            tracing::info!(device = %device_id, protector = %sealed.protector_id, "recovery key already escrowed");
            return Ok(EscrowReceipt {
                protector_id: sealed.protector_id.clone(),
                stored_at: received_at,
                conflict: flagged,
            });
        }
        if different >= MAX_PASSWORDS_PER_PROTECTOR {
            return Err(ApiError::Conflict(format!(
                "protector {} already has {different} different recovery passwords escrowed; refusing more. An administrator should rotate this key and check the audit log",
                sealed.protector_id
            )));
        }
        let conflict = different > 0;
        sqlx::query(
            "INSERT INTO recovery_keys (device_id, mount, protector_id, sealed, escrow_key_id, received_at, replaces, conflict)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(device_id)
        .bind(&stored.mount)
        .bind(&stored.protector_id)
        .bind(serde_json::to_string(&stored).map_err(|e| ApiError::Internal(e.into()))?)
        .bind(&stored.escrow_key_id)
        .bind(now)
        .bind(&upload.replaces)
        .bind(i64::from(conflict))
        .execute(&mut *tx)
        .await?;
        if conflict {
            sqlx::query("UPDATE recovery_keys SET conflict = 1 WHERE device_id = $1 AND protector_id = $2")
                .bind(device_id)
                .bind(&stored.protector_id)
                .execute(&mut *tx)
                .await?;
            audit(
                &mut tx,
                now,
                &format!("device {device_id}"),
                "recovery_key.escrow_conflict",
                Some(device_id),
                json!({"mount": stored.mount, "protector_id": stored.protector_id,
                       "different_passwords": different + 1}),
            )
            .await?;
        }
        // The rotation `replaces` names is not complete yet: the old protector is still on the
        // volume until the device reports it retired.
        audit(
            &mut tx,
            now,
            &format!("device {device_id}"),
            "recovery_key.escrow",
            Some(device_id),
            json!({"mount": stored.mount, "protector_id": stored.protector_id, "replaces": upload.replaces,
                   "conflict": conflict, "escrow_key_id": stored.escrow_key_id}),
        )
        .await?;
        if conflict {
            self.note(&mut tx, Kind::Rotation, [device_id]).await?;
        }
        tx.commit().await?;
        if conflict {
            // The device's next rotation check must look in the database, to hear of the conflict.
            self.rotations_open.lock().unwrap_or_else(|p| p.into_inner()).insert(device_id.to_string());
            tracing::warn!(device = %device_id, protector = %stored.protector_id, "conflicting recovery key escrowed");
        } else {
            tracing::info!(device = %device_id, protector = %stored.protector_id, "recovery key escrowed");
        }
        Ok(EscrowReceipt { protector_id: stored.protector_id, stored_at: now, conflict: conflict || flagged })
    }

    /// `POST /api/v1/device/escrow/retired`: the device reports a protector gone from its volume.
    /// Its keys stop being current (superseded by `replaced_by` when given) and an open rotation of
    /// it is completed, in one transaction with the audit row. Idempotent.
    pub async fn escrow_retired(&self, device_id: &str, retired: &EscrowRetired) -> ApiResult<bool> {
        check_label("protector_id", &retired.protector_id)?;
        if let Some(by) = &retired.replaced_by {
            check_label("replaced_by", by)?;
            if by == &retired.protector_id {
                return Err(ApiError::BadRequest("a protector cannot be replaced by itself".into()));
            }
        }
        let now = self.now();
        let mut tx = crate::store::begin_write(&self.db).await?;
        let keys = sqlx::query(
            "UPDATE recovery_keys SET retired_at = $1,
                 superseded_by = COALESCE(superseded_by, $2),
                 superseded_at = CASE WHEN superseded_by IS NULL AND $3 IS NOT NULL THEN $4 ELSE superseded_at END
             WHERE device_id = $5 AND protector_id = $6 AND retired_at IS NULL",
        )
        .bind(now)
        .bind(&retired.replaced_by)
        .bind(&retired.replaced_by)
        .bind(now)
        .bind(device_id)
        .bind(&retired.protector_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let rotation_completed = sqlx::query(
            "UPDATE recovery_key_rotations SET completed_at = $1, replaced_by = $2
             WHERE device_id = $3 AND protector_id = $4 AND completed_at IS NULL",
        )
        .bind(now)
        .bind(&retired.replaced_by)
        .bind(device_id)
        .bind(&retired.protector_id)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            > 0;
        if keys == 0 && !rotation_completed {
            // Already recorded (a report repeated after a lost answer), or never escrowed here.
            tx.rollback().await?;
            return Ok(false);
        }
        audit(
            &mut tx,
            now,
            &format!("device {device_id}"),
            "recovery_key.retired",
            Some(device_id),
            json!({"protector_id": retired.protector_id, "replaced_by": retired.replaced_by,
                   "rotation_completed": rotation_completed}),
        )
        .await?;
        tx.commit().await?;
        tracing::info!(device = %device_id, protector = %retired.protector_id, rotation_completed, "recovery key retired");
        Ok(rotation_completed)
    }

    /// Protector ids of this device whose keys an administrator read and that the device has not
    /// yet reported retired, and those with conflicting escrowed passwords (each sorted).
    pub async fn escrow_rotations(&self, device_id: &str) -> ApiResult<(Vec<String>, Vec<String>)> {
        if !self.rotations_open.lock().unwrap_or_else(|p| p.into_inner()).contains(device_id) {
            return Ok((Vec::new(), Vec::new()));
        }
        let rotations: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT protector_id FROM recovery_key_rotations
             WHERE device_id = $1 AND completed_at IS NULL ORDER BY protector_id",
        )
        .bind(device_id)
        .fetch_all(&self.db)
        .await?;
        let conflicts: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT protector_id FROM recovery_keys
             WHERE device_id = $1 AND conflict = 1 AND retired_at IS NULL ORDER BY protector_id",
        )
        .bind(device_id)
        .fetch_all(&self.db)
        .await?;
        if rotations.is_empty() && conflicts.is_empty() {
            self.rotations_open.lock().unwrap_or_else(|p| p.into_inner()).remove(device_id);
        }
        Ok((rotations, conflicts))
    }

    /// Records that `actor` was refused the recovery keys of a device (committed before the 403).
    pub async fn audit_recovery_denial(&self, actor: &Actor, device_id: &str) -> ApiResult<()> {
        let mut tx = crate::store::begin_write(&self.db).await?;
        audit(
            &mut tx,
            self.now(),
            &actor.label(),
            "recovery_key.read_denied",
            Some(device_id),
            json!({"reason": format!("the token lacks the {ROLE_RECOVERY_KEYS} role")}),
        )
        .await?;
        tx.commit().await?;
        tracing::warn!(actor = %actor.label(), device = %device_id, "recovery key read refused: missing role");
        Ok(())
    }

    /// The device's stored recovery keys without their passwords, in the order they were stored.
    /// Not a read of a key: nothing is opened, counted or rotated.
    pub async fn recovery_key_metadata(&self, device_id: &str) -> ApiResult<Vec<KeyMeta>> {
        let rows = sqlx::query(
            "SELECT mount, protector_id, received_at, superseded_by, superseded_at, read_count, conflict, retired_at
             FROM recovery_keys WHERE device_id = $1 ORDER BY id",
        )
        .bind(device_id)
        .fetch_all(&self.db)
        .await?;
        let open: std::collections::HashSet<String> = sqlx::query_scalar(
            "SELECT protector_id FROM recovery_key_rotations WHERE device_id = $1 AND completed_at IS NULL",
        )
        .bind(device_id)
        .fetch_all(&self.db)
        .await?
        .into_iter()
        .collect();
        let currents = current_rows(rows.iter().map(KeyRowState::of));
        Ok(rows
            .iter()
            .zip(currents)
            .map(|(r, current)| KeyMeta {
                rotation_open: current && open.contains(r.get::<&str, _>("protector_id")),
                mount: r.get("mount"),
                protector_id: r.get("protector_id"),
                received_at: r.get("received_at"),
                superseded_at: r.get("superseded_at"),
                retired_at: r.get("retired_at"),
                conflict: r.get::<i64, _>("conflict") != 0,
                read_count: r.get("read_count"),
                current,
            })
            .collect())
    }

    /// An administrator's read of a device's recovery keys: the current key of each protector
    /// (with `all`, every archived one too). In one transaction it counts the read, asks the device
    /// to rotate every current key it returns, and writes the audit row (who, when, which device
    /// and protectors; never a key); the keys leave only after that commit.
    pub async fn read_recovery_keys(&self, actor: &Actor, device_id: &str, all: bool) -> ApiResult<Vec<Value>> {
        self.read_recovery_keys_because(actor, device_id, all, None).await
    }

    /// [`Self::read_recovery_keys`] with the reason the administrator typed (the portal asks for
    /// one), recorded in the audit row.
    pub async fn read_recovery_keys_because(
        &self,
        actor: &Actor,
        device_id: &str,
        all: bool,
        reason: Option<&str>,
    ) -> ApiResult<Vec<Value>> {
        if !actor.has_role(ROLE_RECOVERY_KEYS) {
            self.audit_recovery_denial(actor, device_id).await?;
            return Err(ApiError::Forbidden(format!(
                "reading recovery keys needs an admin token with the {ROLE_RECOVERY_KEYS} role; this read was refused and audited"
            )));
        }
        let now = self.now();
        let mut tx = crate::store::begin_write(&self.db).await?;
        let known: Option<String> =
            sqlx::query_scalar("SELECT id FROM devices WHERE id = $1").bind(device_id).fetch_optional(&mut *tx).await?;
        if known.is_none() {
            // A read of a device that does not exist is audited like any other: probing for device
            // ids with a recovery-keys token must leave a trace.
            audit(
                &mut tx,
                now,
                &actor.label(),
                "recovery_key.read",
                Some(device_id),
                json!({"keys": [], "device_known": false, "include_superseded": all, "reason": reason}),
            )
            .await?;
            tx.commit().await?;
            return Err(device_not_found(device_id));
        }
        let rows = sqlx::query(
            "SELECT id, mount, protector_id, sealed, received_at, replaces, superseded_by, superseded_at, read_count,
                    conflict, retired_at
             FROM recovery_keys WHERE device_id = $1 ORDER BY id",
        )
        .bind(device_id)
        .fetch_all(&mut *tx)
        .await?;
        let currents = current_rows(rows.iter().map(KeyRowState::of));
        let mut out = Vec::new();
        let mut read_ids = Vec::new();
        let mut rotate = Vec::new();
        let mut conflicted = Vec::new();
        for (r, is_current) in rows.iter().zip(currents) {
            let protector: String = r.get("protector_id");
            let superseded: Option<String> = r.get("superseded_by");
            let conflict = r.get::<i64, _>("conflict") != 0;
            if !all && !is_current {
                continue;
            }
            let sealed: Result<SealedRecoveryKey, _> = serde_json::from_str(r.get::<&str, _>("sealed"));
            let (password, error) = match sealed
                .as_ref()
                .map_err(|_| "is not a readable sealed key")
                .and_then(|s| self.keys.escrow.open(s))
            {
                Ok(pw) => (Some(pw), None),
                Err(why) => (None, Some(format!("stored key {why}"))),
            };
            read_ids.push(r.get::<i64, _>("id"));
            if is_current && !rotate.contains(&protector) {
                rotate.push(protector.clone());
            }
            if conflict && !conflicted.contains(&protector) {
                conflicted.push(protector.clone());
            }
            out.push(json!({
                "device_id": device_id,
                "mount": r.get::<String, _>("mount"),
                "protector_id": protector,
                "recovery_password": password.as_ref().map(|p| p.as_str()),
                "error": error,
                "received_at": crate::api::rfc3339(r.get("received_at")),
                "replaces": r.get::<Option<String>, _>("replaces"),
                "superseded_by": superseded,
                "superseded_at": r.get::<Option<i64>, _>("superseded_at").map(crate::api::rfc3339),
                "retired_at": r.get::<Option<i64>, _>("retired_at").map(crate::api::rfc3339),
                "conflict": conflict,
                "current": is_current,
                "warning": conflict.then_some(CONFLICT_WARNING),
                "read_count": r.get::<i64, _>("read_count") + 1,
            }));
        }
        for id in &read_ids {
            sqlx::query("UPDATE recovery_keys SET read_count = read_count + 1, last_read_at = $1 WHERE id = $2")
                .bind(now)
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        for protector in &rotate {
            let pending: Option<i64> = sqlx::query_scalar(
                "SELECT id FROM recovery_key_rotations WHERE device_id = $1 AND protector_id = $2 AND completed_at IS NULL",
            )
            .bind(device_id)
            .bind(protector)
            .fetch_optional(&mut *tx)
            .await?;
            if pending.is_none() {
                sqlx::query(
                    "INSERT INTO recovery_key_rotations (device_id, protector_id, requested_at, requested_by) VALUES ($1, $2, $3, $4)",
                )
                .bind(device_id)
                .bind(protector)
                .bind(now)
                .bind(actor.label())
                .execute(&mut *tx)
                .await?;
            }
        }
        let protectors: Vec<Value> =
            out.iter().map(|k| json!({"mount": k["mount"], "protector_id": k["protector_id"]})).collect();
        audit(
            &mut tx,
            now,
            &actor.label(),
            "recovery_key.read",
            Some(device_id),
            json!({"keys": protectors, "rotation_requested": rotate, "include_superseded": all,
                   "conflicts": conflicted, "reason": reason}),
        )
        .await?;
        if !rotate.is_empty() {
            self.note(&mut tx, Kind::Rotation, [device_id]).await?;
        }
        tx.commit().await?;
        if !rotate.is_empty() {
            self.rotations_open.lock().unwrap_or_else(|p| p.into_inner()).insert(device_id.to_string());
        }
        tracing::info!(actor = %actor.label(), device = %device_id, keys = out.len(), "recovery keys read");
        Ok(out)
    }
}

/// What [`verify_stored_keys`] found (counts only: this goes to the log).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct VerifyCounts {
    pub total: usize,
    /// Open with the current escrow key.
    pub current: usize,
    /// Open, but with an older key (a rotation should re-wrap them).
    pub older_key: usize,
    /// Do not open with any key the server holds: these need attention.
    pub failed: usize,
}

/// Checks that every stored key opens, and with which key.
pub async fn verify_stored_keys(db: &AnyPool, ring: &EscrowKeyring) -> anyhow::Result<VerifyCounts> {
    let current = ring.current_id();
    let mut counts = VerifyCounts::default();
    for r in sqlx::query("SELECT sealed FROM recovery_keys").fetch_all(db).await? {
        counts.total += 1;
        let Ok(sealed) = serde_json::from_str::<SealedRecoveryKey>(r.get::<&str, _>(0)) else {
            counts.failed += 1;
            continue;
        };
        let valid = ring.open(&sealed).is_ok_and(|pw| is_recovery_password(pw.as_str()));
        match (valid, sealed.escrow_key_id == current) {
            (true, true) => counts.current += 1,
            (true, false) => counts.older_key += 1,
            (false, _) => counts.failed += 1,
        }
    }
    Ok(counts)
}

/// Runs [`verify_stored_keys`] and logs the counts.
pub async fn log_verification(db: &AnyPool, ring: &EscrowKeyring) {
    match verify_stored_keys(db, ring).await {
        Ok(c) if c.failed > 0 => tracing::error!(
            total = c.total,
            current = c.current,
            older_key = c.older_key,
            failed = c.failed,
            "escrowed recovery keys that do NOT open with any escrow key this server holds; restore the escrow key files from backup"
        ),
        Ok(c) => tracing::info!(
            total = c.total,
            current = c.current,
            older_key = c.older_key,
            "escrowed recovery keys verified"
        ),
        Err(e) => tracing::warn!(error = format!("{e:#}"), "cannot verify escrowed recovery keys; will retry"),
    }
}

/// What a rotation did.
#[derive(Debug)]
pub struct RotationSummary {
    pub resealed: usize,
    pub old_key_file: std::path::PathBuf,
    pub new_key_id: String,
}

/// `tenon-server rotate-escrow-key`: offline (the caller holds the data-dir lock), generates a
/// new escrow key and re-seals every stored key to it in one transaction.
///
/// Crash safety, step by step: (1) the new secret is written to `escrow.x25519.next` (reused if a
/// previous run died, so the database never holds keys sealed to a secret that was thrown away);
/// (2) the current secret is copied to `escrow.x25519.old-N`; (3) one transaction re-seals every
/// row and writes the audit row; a key that does not open aborts it and nothing changes;
/// (4) `.next` is renamed over `escrow.x25519`. The server loads all these files, so it can open
/// every row after a crash at any step; the old key file is kept because agents seal to the key
/// they hold until their next escrow check hands them the new one (the server re-seals such
/// uploads on receipt).
pub async fn rotate_escrow_key(data_dir: &DataDir, db: &AnyPool, now: i64) -> anyhow::Result<RotationSummary> {
    let dir = data_dir.keys_dir()?;
    let current_path = dir.join(CURRENT_FILE);
    let current: [u8; 32] = std::fs::read(&current_path)
        .with_context(|| format!("cannot read {}", current_path.display()))?
        .try_into()
        .map_err(|_| anyhow::anyhow!("{} is damaged (not 32 bytes); restore it from backup", current_path.display()))?;
    let next_path = dir.join(NEXT_FILE);
    let next: [u8; 32] = if next_path.exists() {
        std::fs::read(&next_path)?
            .try_into()
            .map_err(|_| anyhow::anyhow!("{} is damaged; restore it from backup", next_path.display()))?
    } else {
        let fresh = random_bytes::<32>();
        write_secret_file(&next_path, &fresh)?;
        fresh
    };
    if next == current {
        bail!("{} equals the current escrow key; remove it and run again", next_path.display());
    }
    let mut n = 1u32;
    let old_path = loop {
        let p = dir.join(format!("{OLD_PREFIX}{n}"));
        match std::fs::read(&p) {
            Ok(bytes) if bytes == current => break p,
            Ok(_) => n += 1,
            Err(_) => {
                write_secret_file(&p, &current)?;
                break p;
            }
        }
    };
    let ring = EscrowKeyring::load(&dir, current)?;
    let new_id = escrow_key_id(&escrow_public_key(&next));
    let mut tx = crate::store::begin_write(db).await?;
    let rows = sqlx::query("SELECT id, sealed FROM recovery_keys").fetch_all(&mut *tx).await?;
    let mut failed = Vec::new();
    let mut updates = Vec::new();
    for r in &rows {
        let id: i64 = r.get(0);
        let Ok(sealed) = serde_json::from_str::<SealedRecoveryKey>(r.get::<&str, _>(1)) else {
            failed.push(id);
            continue;
        };
        if sealed.escrow_key_id == new_id {
            continue;
        }
        match ring.open(&sealed) {
            Ok(pw) => updates.push((id, reseal(&next, &sealed, &pw)?)),
            Err(_) => failed.push(id),
        }
    }
    if !failed.is_empty() {
        bail!(
            "{} stored recovery keys (row ids {:?}) do not open with any escrow key in {}; nothing was changed. Restore the missing escrow key files, then run again",
            failed.len(),
            failed,
            dir.display()
        );
    }
    for (id, sealed) in &updates {
        sqlx::query("UPDATE recovery_keys SET sealed = $1, escrow_key_id = $2, resealed_at = $3 WHERE id = $4")
            .bind(serde_json::to_string(sealed)?)
            .bind(&sealed.escrow_key_id)
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?;
    }
    audit(
        &mut tx,
        now,
        "server (rotate-escrow-key)",
        "escrow_key.rotate",
        None,
        json!({"new_escrow_key_id": new_id, "old_escrow_key_id": ring.current_id(), "resealed": updates.len()}),
    )
    .await?;
    tx.commit().await?;
    std::fs::rename(&next_path, &current_path)
        .with_context(|| format!("cannot move {} to {}", next_path.display(), current_path.display()))?;
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(RotationSummary { resealed: updates.len(), old_key_file: old_path, new_key_id: new_id })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(protector: &str, superseded: bool, retired: bool, conflict: bool) -> KeyRowState {
        KeyRowState { protector_id: protector.into(), superseded, retired, conflict }
    }

    #[test]
    fn the_current_key_is_the_newest_live_row_of_its_protector() {
        let rows = vec![
            row("A", true, false, false),  // rotated away
            row("A", false, false, false), // an older server's duplicate upload
            row("B", false, true, false),  // protector removed
            row("A", false, false, false), // A's current key
            row("C", false, false, true),  // C in conflict: both passwords are current
            row("C", false, false, true),
            row("D", false, false, false),
        ];
        assert_eq!(current_rows(rows.into_iter()), vec![false, false, false, true, true, true, true]);
        assert!(current_rows(std::iter::empty()).is_empty());
    }
}
