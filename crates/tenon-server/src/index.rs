//! The check-in index: what an unchanged check-in needs, in memory, so it never touches the
//! database. One slot per device holds its credential hash, its current envelope and ETag, and its
//! last-seen time (flushed to the database in batches).

use axum::http::HeaderValue;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, RwLock};
use subtle::ConstantTimeEq;

/// The envelope a device should hold now.
pub struct CurrentEnvelope {
    pub etag: HeaderValue,
    pub bytes: axum::body::Bytes,
    pub version: u64,
    pub payload_sha256: String,
}

pub struct DeviceSlot {
    credential_sha256: [u8; 32],
    current: RwLock<Arc<CurrentEnvelope>>,
    revoked: AtomicBool,
    last_seen: AtomicI64,
    last_seen_dirty: AtomicBool,
}

/// Never the credential's hash: device metadata that holds a slot is logged in debug output.
impl std::fmt::Debug for DeviceSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceSlot").field("last_seen", &self.last_seen()).finish_non_exhaustive()
    }
}

/// Result of authenticating a device credential.
pub enum DeviceAuth {
    Ok(Arc<DeviceSlot>),
    Unknown,
    Revoked,
}

impl DeviceSlot {
    pub fn current(&self) -> Arc<CurrentEnvelope> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set_current(&self, env: CurrentEnvelope) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(env);
    }

    /// When the device last checked in, as this server knows it (`None`: not since it started,
    /// and not loaded from the database).
    pub fn last_seen(&self) -> Option<i64> {
        Some(self.last_seen.load(Ordering::Relaxed)).filter(|t| *t > 0)
    }

    pub fn touch(&self, now: i64) {
        self.last_seen.store(now, Ordering::Relaxed);
        self.last_seen_dirty.store(true, Ordering::Relaxed);
    }

    /// The last-seen time the database had at start (not dirty: it is already stored).
    pub fn seed_last_seen(&self, t: i64) {
        self.last_seen.fetch_max(t, Ordering::Relaxed);
    }

    pub fn revoke(&self) {
        self.revoked.store(true, Ordering::SeqCst);
    }
}

#[derive(Default)]
pub struct CheckinIndex {
    slots: RwLock<HashMap<String, Arc<DeviceSlot>>>,
}

impl CheckinIndex {
    /// A new device's slot (replacing any under that id); the world keeps the same `Arc` in the
    /// device's metadata.
    pub fn insert(
        &self,
        device_id: &str,
        credential_sha256: [u8; 32],
        env: CurrentEnvelope,
        revoked: bool,
    ) -> Arc<DeviceSlot> {
        let slot = Arc::new(DeviceSlot {
            credential_sha256,
            current: RwLock::new(Arc::new(env)),
            revoked: AtomicBool::new(revoked),
            last_seen: AtomicI64::new(0),
            last_seen_dirty: AtomicBool::new(false),
        });
        self.slots.write().unwrap_or_else(|p| p.into_inner()).insert(device_id.to_string(), slot.clone());
        slot
    }

    pub fn get(&self, device_id: &str) -> Option<Arc<DeviceSlot>> {
        self.slots.read().unwrap_or_else(|p| p.into_inner()).get(device_id).cloned()
    }

    /// Checks `secret_digest` (SHA-256 of the presented secret) in constant time.
    pub fn authenticate(&self, device_id: &str, secret_digest: &[u8; 32]) -> DeviceAuth {
        let Some(slot) = self.get(device_id) else { return DeviceAuth::Unknown };
        if !bool::from(slot.credential_sha256.ct_eq(secret_digest)) {
            return DeviceAuth::Unknown;
        }
        if slot.revoked.load(Ordering::SeqCst) {
            return DeviceAuth::Revoked;
        }
        DeviceAuth::Ok(slot)
    }

    /// Last-seen times changed since the previous call, to write to the database.
    pub fn take_dirty_last_seen(&self) -> Vec<(String, i64)> {
        let slots = self.slots.read().unwrap_or_else(|p| p.into_inner());
        slots
            .iter()
            .filter(|(_, s)| s.last_seen_dirty.swap(false, Ordering::Relaxed))
            .map(|(id, s)| (id.clone(), s.last_seen.load(Ordering::Relaxed)))
            .collect()
    }

    /// Marks these devices' last-seen times as still to be written (a flush that failed): the
    /// next flush writes them again, with whatever newer time has arrived since.
    pub fn mark_last_seen_dirty(&self, ids: &[(String, i64)]) {
        let slots = self.slots.read().unwrap_or_else(|p| p.into_inner());
        for (id, _) in ids {
            if let Some(s) = slots.get(id) {
                s.last_seen_dirty.store(true, Ordering::Relaxed);
            }
        }
    }

    /// A device's last-seen time as the index knows it (newer than the database's).
    pub fn last_seen(&self, device_id: &str) -> Option<i64> {
        self.get(device_id).and_then(|s| s.last_seen())
    }

    /// How many devices were last seen within each bucket (for the metrics): `1h`, `24h`, `7d`,
    /// `older`, and `never` (not seen since this server started and not loaded from the database).
    pub fn last_seen_buckets(&self, now: i64) -> [(&'static str, usize); 5] {
        let mut out = [("1h", 0), ("24h", 0), ("7d", 0), ("older", 0), ("never", 0)];
        for slot in self.slots.read().unwrap_or_else(|p| p.into_inner()).values() {
            let t = slot.last_seen.load(Ordering::Relaxed);
            let i = match now - t {
                _ if t <= 0 => 4,
                age if age <= 3600 => 0,
                age if age <= 86_400 => 1,
                age if age <= 7 * 86_400 => 2,
                _ => 3,
            };
            out[i].1 += 1;
        }
        out
    }

    pub fn len(&self) -> usize {
        self.slots.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope() -> CurrentEnvelope {
        CurrentEnvelope {
            etag: HeaderValue::from_static("\"1-x\""),
            bytes: axum::body::Bytes::new(),
            version: 1,
            payload_sha256: "x".into(),
        }
    }

    #[test]
    fn a_failed_flush_leaves_its_last_seen_times_to_write() {
        let index = CheckinIndex::default();
        for id in ["a", "b"] {
            index.insert(id, [0; 32], envelope(), false);
        }
        index.get("a").unwrap().touch(100);
        index.get("b").unwrap().touch(200);
        let mut batch = index.take_dirty_last_seen();
        batch.sort();
        assert_eq!(batch, [("a".to_string(), 100), ("b".to_string(), 200)]);
        assert!(index.take_dirty_last_seen().is_empty(), "taken once");
        // The write failed; meanwhile a newer check-in arrived for a.
        index.get("a").unwrap().touch(150);
        index.mark_last_seen_dirty(&batch);
        let mut again = index.take_dirty_last_seen();
        again.sort();
        assert_eq!(again, [("a".to_string(), 150), ("b".to_string(), 200)]);
    }

    #[test]
    fn last_seen_buckets() {
        let index = CheckinIndex::default();
        let now = 10 * 86_400;
        for (id, seen) in
            [("a", now - 10), ("b", now - 7200), ("c", now - 3 * 86_400), ("d", now - 9 * 86_400), ("e", 0)]
        {
            index.insert(id, [0; 32], envelope(), false);
            index.get(id).unwrap().seed_last_seen(seen);
        }
        assert_eq!(index.last_seen_buckets(now), [("1h", 1), ("24h", 1), ("7d", 1), ("older", 1), ("never", 1)]);
    }
}
