//! An in-memory Tenon escrow server for tests and demos: it stores every sealed key it receives
//! (an archive, never an overwrite), can open them with its escrow secret, answers rotation
//! requests (until a retirement is reported), and can be told to fail uploads.

use super::{EscrowSink, EscrowTarget};
use std::sync::{Arc, Mutex, MutexGuard};
use tenon_core::policy::escrow::{escrow_public_key, open, EscrowReceipt, SealedRecoveryKey};
use zeroize::Zeroizing;

/// One stored upload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredKey {
    pub sealed: SealedRecoveryKey,
    pub replaces: Option<String>,
}

/// One retirement the device reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retired {
    pub protector_id: String,
    pub replaced_by: Option<String>,
}

#[derive(Default)]
struct Inner {
    stored: Vec<StoredKey>,
    rotations: Vec<String>,
    retired: Vec<Retired>,
    conflicts: Vec<String>,
    failures_left: u32,
    now: i64,
}

/// A recording in-memory escrow server.
pub struct MemoryEscrow {
    secret: [u8; 32],
    device_id: String,
    inner: Mutex<Inner>,
    journal: Option<Arc<Mutex<Vec<String>>>>,
}

impl MemoryEscrow {
    pub fn new(device_id: &str, escrow_secret: [u8; 32]) -> Self {
        Self { secret: escrow_secret, device_id: device_id.to_string(), inner: Mutex::default(), journal: None }
    }

    /// Also appends `escrow upload <protector id>` to `journal` on each successful upload, so a
    /// test can check the order of escrow and platform calls in one list.
    pub fn with_journal(mut self, journal: Arc<Mutex<Vec<String>>>) -> Self {
        self.journal = Some(journal);
        self
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock only happens in a failing test; keep going with the data.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every upload stored so far, oldest first.
    pub fn stored(&self) -> Vec<StoredKey> {
        self.inner().stored.clone()
    }

    /// Opens the newest stored key of a protector with the escrow secret.
    pub fn open_latest(&self, protector_id: &str) -> Option<Zeroizing<String>> {
        let inner = self.inner();
        let key = inner.stored.iter().rev().find(|k| k.sealed.protector_id == protector_id)?;
        open(&self.secret, &key.sealed).ok()
    }

    /// Marks a protector's key for rotation, as an administrator's read does.
    pub fn request_rotation(&self, protector_id: &str) {
        self.inner().rotations.push(protector_id.to_string());
    }

    /// Every retirement reported so far, oldest first.
    pub fn retired(&self) -> Vec<Retired> {
        self.inner().retired.clone()
    }

    /// Makes the server report a conflict for a protector, as a second, different upload does.
    pub fn flag_conflict(&self, protector_id: &str) {
        self.inner().conflicts.push(protector_id.to_string());
    }

    /// Makes the next `n` uploads fail.
    pub fn fail_uploads(&self, n: u32) {
        self.inner().failures_left = n;
    }

    /// The time stamped on receipts.
    pub fn set_now(&self, now: i64) {
        self.inner().now = now;
    }
}

impl EscrowSink for MemoryEscrow {
    fn escrow_target(&self) -> Option<EscrowTarget> {
        Some(EscrowTarget { device_id: self.device_id.clone(), public_key: escrow_public_key(&self.secret) })
    }

    fn upload(&self, sealed: &SealedRecoveryKey, replaces: Option<&str>) -> Result<EscrowReceipt, String> {
        let mut inner = self.inner();
        if inner.failures_left > 0 {
            inner.failures_left -= 1;
            return Err("escrow server unavailable (simulated)".into());
        }
        // Like the real server: refuse what it could not open later, rather than store junk.
        if sealed.device_id != self.device_id || open(&self.secret, sealed).is_err() {
            return Err("sealed key rejected: it does not open with the escrow key".into());
        }
        // Like the real server: an identical re-upload is idempotent, a different password for a
        // protector already held is kept too and flagged.
        let same_protector: Vec<Zeroizing<String>> = inner
            .stored
            .iter()
            .filter(|k| k.sealed.protector_id == sealed.protector_id)
            .filter_map(|k| open(&self.secret, &k.sealed).ok())
            .collect();
        let password = open(&self.secret, sealed).map_err(|_| "sealed key rejected".to_string())?;
        let identical = same_protector.iter().any(|p| p.as_str() == password.as_str());
        if !identical {
            if !same_protector.is_empty() {
                inner.conflicts.push(sealed.protector_id.clone());
            }
            inner.stored.push(StoredKey { sealed: sealed.clone(), replaces: replaces.map(str::to_string) });
        }
        if let Some(journal) = &self.journal {
            journal.lock().unwrap_or_else(|e| e.into_inner()).push(format!("escrow upload {}", sealed.protector_id));
        }
        let conflict = inner.conflicts.contains(&sealed.protector_id);
        Ok(EscrowReceipt { protector_id: sealed.protector_id.clone(), stored_at: inner.now, conflict })
    }

    fn pending_rotations(&self) -> Vec<String> {
        self.inner().rotations.clone()
    }

    fn report_retired(&self, protector_id: &str, replaced_by: Option<&str>) -> Result<(), String> {
        let mut inner = self.inner();
        if inner.failures_left > 0 {
            inner.failures_left -= 1;
            return Err("escrow server unavailable (simulated)".into());
        }
        inner.rotations.retain(|r| r != protector_id);
        inner.conflicts.retain(|r| r != protector_id);
        inner
            .retired
            .push(Retired { protector_id: protector_id.to_string(), replaced_by: replaced_by.map(str::to_string) });
        if let Some(journal) = &self.journal {
            journal.lock().unwrap_or_else(|e| e.into_inner()).push(format!("escrow retired {protector_id}"));
        }
        Ok(())
    }

    fn escrow_conflicts(&self) -> Vec<String> {
        let mut c = self.inner().conflicts.clone();
        c.dedup();
        c
    }
}
