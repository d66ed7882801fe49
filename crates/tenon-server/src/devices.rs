//! One device's lifecycle beside enrollment and reports (those are `writer.rs`): the envelope a
//! device proves it holds, its primary user, decommissioning, and the last-seen flush.

use crate::error::{ApiError, ApiResult};
use crate::state::*;
use crate::store::audit;
use crate::store::changes::Kind;
use serde_json::json;
use tenon_core::api::envelope_etag;
use tenon_core::ids::Upn;

impl AppState {
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
            m.refresh_key();
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
            m.refresh_key();
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
}
