//! The Tenon server's recovery-key escrow over HTTP: the [`EscrowSink`] the agent hands to its
//! policies. Keys are sealed to the server's escrow public key and bound to the enrolled device
//! id; uploads go to `POST /api/v1/device/escrow` and count only with the receipt. Rotation
//! requests, escrow conflicts and the server's current escrow key come from
//! `GET /api/v1/device/escrow/rotations`,
//! asked at most once per policy run and only when a policy escrows or asks for rotations (never
//! on the check-in path).
//!
//! Which escrow key: the one pinned at enrollment (in the vault), unless the server hands out a
//! different one signed by a key of the trusted key list (after `tenon-server rotate-escrow-key`);
//! then that one, and the agent stores it in the vault ([`ServerEscrow::adopted_key`]). An unsigned
//! or badly signed key is ignored, so a man in the middle cannot make the agent seal to his key.

use crate::client::{EscrowInfo, ServerClient};
use crate::policies::{EscrowSink, EscrowTarget};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use std::cell::OnceCell;
use tenon_core::policy::escrow::{verify_escrow_key, EscrowReceipt, EscrowRetired, EscrowUpload, SealedRecoveryKey};
use tenon_core::trust::KeyList;

/// What the rotation check answered.
#[derive(Default)]
struct Info {
    rotations: Vec<String>,
    current: Option<[u8; 32]>,
    conflicts: Vec<String>,
}

pub struct ServerEscrow<'c> {
    client: &'c ServerClient,
    credential: &'c str,
    trusted: &'c KeyList,
    device_id: String,
    pinned: Option<[u8; 32]>,
    /// Fetched on first need: rotation requests, the verified current escrow key, if any, and
    /// escrow conflicts.
    info: OnceCell<Info>,
}

impl<'c> ServerEscrow<'c> {
    /// `escrow_public_key` is the base64 key from the vault; a missing or malformed one (and no
    /// signed key from the server) leaves no target, so the policy reports the escrow as pending
    /// rather than sealing to junk.
    pub fn new(
        client: &'c ServerClient,
        credential: &'c str,
        trusted: &'c KeyList,
        device_id: &str,
        escrow_public_key: Option<&str>,
    ) -> Self {
        let pinned =
            escrow_public_key.and_then(|k| B64.decode(k.trim()).ok()).and_then(|b| <[u8; 32]>::try_from(b).ok());
        if escrow_public_key.is_some() && pinned.is_none() {
            tracing::warn!("the escrow public key in the vault is malformed; recovery keys cannot be escrowed");
        }
        Self { client, credential, trusted, device_id: device_id.to_string(), pinned, info: OnceCell::new() }
    }

    fn info(&self) -> &Info {
        self.info.get_or_init(|| match self.client.escrow_rotations(self.credential) {
            Ok(EscrowInfo { rotations, escrow_key, conflicts }) => {
                let current = escrow_key.and_then(|signed| match verify_escrow_key(&signed, self.trusted) {
                    Ok(k) => Some(k),
                    Err(e) => {
                        tracing::warn!(error = %e, "ignoring the escrow key the server sent");
                        None
                    }
                });
                Info { rotations, current, conflicts }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot ask the server for recovery-key rotations; will ask next sync");
                Info::default()
            }
        })
    }

    /// The server's current escrow key (base64) when it is verified and differs from the pinned
    /// one: the agent stores it in the vault after the run.
    pub fn adopted_key(&self) -> Option<String> {
        let current = self.info.get()?.current;
        current.filter(|k| Some(*k) != self.pinned).map(|k| B64.encode(k))
    }
}

impl EscrowSink for ServerEscrow<'_> {
    fn escrow_target(&self) -> Option<EscrowTarget> {
        let public_key = self.info().current.or(self.pinned)?;
        Some(EscrowTarget { device_id: self.device_id.clone(), public_key })
    }

    fn upload(&self, sealed: &SealedRecoveryKey, replaces: Option<&str>) -> Result<EscrowReceipt, String> {
        let upload = EscrowUpload { sealed: sealed.clone(), replaces: replaces.map(str::to_string) };
        // The body holds only the sealed form, so neither the request nor the error can carry the key.
        self.client.escrow_upload(self.credential, &upload).map_err(|e| e.stable_text())
    }

    fn pending_rotations(&self) -> Vec<String> {
        self.info().rotations.clone()
    }

    fn report_retired(&self, protector_id: &str, replaced_by: Option<&str>) -> Result<(), String> {
        let body =
            EscrowRetired { protector_id: protector_id.to_string(), replaced_by: replaced_by.map(str::to_string) };
        self.client.escrow_retired(self.credential, &body).map_err(|e| e.stable_text())
    }

    fn escrow_conflicts(&self) -> Vec<String> {
        self.info().conflicts.clone()
    }
}
