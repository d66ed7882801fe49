//! Directory sources: the organisation's users and groups read from Microsoft Graph (Entra ID),
//! Active Directory over LDAP, or an imported file, kept in sync on an interval. Each reader
//! (`graph`, `ldap`) turns one read of its directory into a `tenon_core::dirsync::SourceBatch`;
//! applying a batch (deletion guard, UPN ownership, the projection the compiler sees) is pure and
//! lives in tenon-core.

pub mod graph;
pub mod ldap;

use tenon_core::dirsync::SyncProgress;

/// Called by a reader after every page it read, with the running totals.
pub type Progress<'a> = &'a (dyn Fn(SyncProgress) + Send + Sync);

pub mod sources;
pub mod sync;

use crate::state::AppState;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tenon_core::dirsync::SourceError;

/// Graph readers kept between syncs (each caches its access token until shortly before it
/// expires), by source name, with a fingerprint of what they were built from.
#[derive(Default)]
pub struct GraphReaders(std::sync::Mutex<HashMap<String, KeptReader>>);

/// A reader and the SHA-256 of the settings and secret it was built from.
type KeptReader = ([u8; 32], Arc<graph::GraphReader>);

impl AppState {
    /// The Graph reader of a source: the one kept from its last sync while its settings and
    /// secret are unchanged, else a new one.
    pub(crate) fn graph_reader(
        &self,
        source: &sources::SourceRow,
        secret: &str,
    ) -> Result<Arc<graph::GraphReader>, SourceError> {
        use sha2::Digest;
        let sources::SourceConfig::Graph { tenant_id, client_id, authority, graph_url } = &source.config else {
            unreachable!("graph_reader is called for Graph sources only");
        };
        let mut h = sha2::Sha256::new();
        for part in [tenant_id, client_id, authority, graph_url] {
            h.update(part.as_bytes());
            h.update([0]);
        }
        h.update(secret.as_bytes());
        let fingerprint: [u8; 32] = h.finalize().into();
        let mut readers = self.graph_readers.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((fp, reader)) = readers.get(&source.name) {
            if *fp == fingerprint {
                return Ok(reader.clone());
            }
        }
        let reader = Arc::new(graph::GraphReader::new(
            graph::GraphConfig {
                tenant_id: tenant_id.clone(),
                client_id: client_id.clone(),
                authority: authority.clone(),
                graph_url: graph_url.clone(),
            },
            secret.to_string(),
        )?);
        readers.insert(source.name.clone(), (fingerprint, reader.clone()));
        Ok(reader)
    }

    /// The scheduler: every source at start and then on its interval, on the server that holds
    /// the jobs lease (one server reads the directory for all of them).
    pub async fn run_directory_sync(self: Arc<Self>) {
        loop {
            let wake = self.directory_wake.notified();
            if self.holds_jobs() {
                match self.list_sources().await {
                    Ok(sources) => {
                        let now = self.now();
                        for source in sources.into_iter().filter(|s| s.next_run() <= now) {
                            let quiet = |_: tenon_core::dirsync::SyncProgress| {};
                            // A failure is recorded in the source's status and logged by sync_source.
                            let _ = self.sync_source("schedule", &source.name, false, &quiet).await;
                        }
                    }
                    Err(e) => tracing::warn!(error = ?e, "cannot read the directory sources; will retry"),
                }
            }
            tokio::select! {
                _ = wake => {}
                _ = tokio::time::sleep(Duration::from_secs(10)) => {}
            }
        }
    }
}
