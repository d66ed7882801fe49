//! The Tenon server's recovery-key escrow over HTTP: the [`EscrowSink`] the agent hands to its
//! policies. It seals to the escrow public key pinned at enrollment (kept in the vault) and binds
//! keys to the enrolled device id; uploads go to `POST /api/v1/device/escrow` and count only with
//! the receipt; rotation requests come from `GET /api/v1/device/escrow/rotations`, asked at most
//! once per policy run and only when a policy wants them (never on the check-in path).

use crate::client::ServerClient;
use crate::policies::{EscrowSink, EscrowTarget};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use std::cell::OnceCell;
use tenon_core::policy::escrow::{EscrowReceipt, EscrowUpload, SealedRecoveryKey};

pub struct ServerEscrow<'c> {
    client: &'c ServerClient,
    credential: &'c str,
    target: Option<EscrowTarget>,
    rotations: OnceCell<Vec<String>>,
}

impl<'c> ServerEscrow<'c> {
    /// `escrow_public_key` is the base64 key from the enrollment answer; a missing or malformed
    /// one leaves no target, so the policy reports the escrow as pending rather than sealing to junk.
    pub fn new(
        client: &'c ServerClient,
        credential: &'c str,
        device_id: &str,
        escrow_public_key: Option<&str>,
    ) -> Self {
        let public_key =
            escrow_public_key.and_then(|k| B64.decode(k.trim()).ok()).and_then(|b| <[u8; 32]>::try_from(b).ok());
        if escrow_public_key.is_some() && public_key.is_none() {
            tracing::warn!("the escrow public key in the vault is malformed; recovery keys cannot be escrowed");
        }
        let target = public_key.map(|public_key| EscrowTarget { device_id: device_id.to_string(), public_key });
        Self { client, credential, target, rotations: OnceCell::new() }
    }
}

impl EscrowSink for ServerEscrow<'_> {
    fn escrow_target(&self) -> Option<EscrowTarget> {
        self.target.clone()
    }

    fn upload(&self, sealed: &SealedRecoveryKey, replaces: Option<&str>) -> Result<EscrowReceipt, String> {
        let upload = EscrowUpload { sealed: sealed.clone(), replaces: replaces.map(str::to_string) };
        // The body holds only the sealed form, so neither the request nor the error can carry the key.
        self.client.escrow_upload(self.credential, &upload).map_err(|e| e.to_string())
    }

    fn pending_rotations(&self) -> Vec<String> {
        self.rotations
            .get_or_init(|| match self.client.escrow_rotations(self.credential) {
                Ok(list) => list,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot ask the server for recovery-key rotations; will ask next sync");
                    Vec::new()
                }
            })
            .clone()
    }
}
