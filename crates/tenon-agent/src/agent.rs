//! The agent's work: enroll, and the sync that checks in, verifies, stores, applies and reports.
//!
//! Path of a sync: [`Agent::sync_once`] -> vault load (and repair) -> re-verify the stored envelope
//! -> check-in with `If-None-Match` -> on 200 verify (tenon-core `envelope::verify`, refreshing the
//! key list once on an unknown key) -> persist the exact bytes -> apply every policy to the last known
//! good payload -> report, if it changed since the last one the server acknowledged (or that one is
//! [`FULL_REPORT_INTERVAL`] old) -> fetch once more if the report changed what the server wants us
//! to hold. An unchanged sync is one check-in: the check-in is the device's sign of life.

use crate::client::{ClientError, Fetch, ServerClient};
use crate::platform::Platform;
use crate::policies::{self, PolicyContext, StateStore};
use crate::server_escrow::ServerEscrow;
use crate::status::{rfc3339, Status};
use crate::transport::Transport;
use crate::vault::{LastReport, Vault, VaultError, VaultState};
use serde_json::{Map, Value};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tenon_core::api::{envelope_etag, report_text, DeviceReport, EnrollRequest};
use tenon_core::canonical::canonical_sha256;
use tenon_core::envelope::{verify, VerifiedEnvelope, VerifyContext, VerifyError};
use tenon_core::ids::Hostname;
use tenon_core::packages::PackageReport;
use tenon_core::trust::{advance_key_list, pin_root, verify_key_list, KeyList, TrustError};

/// The crate's version, or `TENON_AGENT_VERSION` at build time (scripts/build-msi sets it with
/// `TENON_MSI_VERSION`, so an upgrade test can tell the new executable from the old one).
pub const AGENT_VERSION: &str = match option_env!("TENON_AGENT_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};

/// How old the last acknowledged report may get before a sync sends the report again although
/// nothing in it changed (24 hours). Between changes the check-in alone says the device is alive;
/// this full report keeps the server's copy honest (a report it lost, a database restored from a
/// backup) at the cost of one report per device and day.
pub const FULL_REPORT_INTERVAL: i64 = 24 * 3600;

/// Unix seconds; passed in so tests control time.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

pub fn system_clock() -> Clock {
    Arc::new(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
    })
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Vault(#[from] VaultError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("this device was decommissioned by an administrator; it must be re-enrolled (`tenon-agent enroll --server URL --token TOKEN`): {0}")]
    Decommissioned(String),
    #[error("enrollment token is malformed: expected tenr.<id>.<secret>.<fingerprint>[.<tls>] as printed by `tenonctl enroll-token create`")]
    BadToken,
    #[error("the server's root key does not match the enrollment token: {0}. Check that --server points at the server that created the token")]
    Trust(#[from] TrustError),
    #[error("already enrolled as device {0}; pass --force to discard that identity and enroll again")]
    AlreadyEnrolled(String),
    #[error("platform: {0}")]
    Platform(#[from] crate::platform::PlatformError),
    #[error("the configuration was refused: {0}; the agent keeps applying its last known good configuration")]
    Rejected(String),
    #[error("{0}")]
    Install(String),
    #[error("the sync lock: {0}")]
    Lock(String),
}

/// How `enroll` treats an existing enrollment and plain HTTP.
#[derive(Clone, Copy, Debug, Default)]
pub struct EnrollOptions {
    /// Discard an existing enrollment.
    pub force: bool,
    /// Accept plain HTTP to a non-loopback server (stored: later syncs accept it too).
    pub allow_insecure_http: bool,
}

pub struct Agent<'p> {
    pub state_dir: PathBuf,
    pub platform: &'p dyn Platform,
    pub clock: Clock,
}

/// What one sync did.
#[derive(Debug, Clone, PartialEq)]
pub struct SyncSummary {
    pub result: &'static str,
    pub config_version: Option<u64>,
    pub problems: Vec<String>,
    /// Whether a report was sent and acknowledged (false: nothing changed since the last one).
    pub reported: bool,
}

/// How one sync runs.
#[derive(Clone, Copy, Debug, Default)]
pub struct SyncOptions {
    /// Send the report even if it did not change (`sync --once --report`: support, tests).
    pub force_report: bool,
}

impl<'p> Agent<'p> {
    pub fn new(state_dir: &Path, platform: &'p dyn Platform, clock: Clock) -> Self {
        Self { state_dir: state_dir.to_path_buf(), platform, clock }
    }

    fn vault(&self) -> Vault<'_> {
        Vault::new(&self.state_dir, self.platform)
    }

    fn now(&self) -> i64 {
        (self.clock)()
    }

    /// Enrolls with a token from `tenonctl enroll-token create`; pins the root key it names.
    pub fn enroll(&self, server: &str, token: &str, force: bool) -> Result<String, AgentError> {
        self.enroll_with(server, token, EnrollOptions { force, allow_insecure_http: false })
    }

    /// [`Agent::enroll`] with every option.
    pub fn enroll_with(&self, server: &str, token: &str, opts: EnrollOptions) -> Result<String, AgentError> {
        let force = opts.force;
        let trust = tenon_core::api::token_trust(token).ok_or(AgentError::BadToken)?;
        let fingerprint = trust.root_fingerprint;
        let transport = Transport { tls: trust.tls.clone(), allow_insecure_http: opts.allow_insecure_http };
        let vault = self.vault();
        let status = Status::load(&self.state_dir);
        if vault.exists() && !force && !status.decommissioned {
            let id = vault.load().map(|l| l.state.device_id).unwrap_or_else(|_| "(unreadable vault)".into());
            return Err(AgentError::AlreadyEnrolled(id));
        }
        // What Tenon changed on this machine (the memberships it added, the values it wrote) belongs
        // to the machine, not to the enrollment: carry it over, so that the next apply can withdraw
        // what was done for the previous user (a laptop handed on must not keep its old owner an
        // administrator). A vault that cannot be read leaves nothing to carry.
        let carried =
            if vault.exists() { vault.load().map(|l| l.state.policy_state).unwrap_or_default() } else { Map::new() };
        let client = ServerClient::new(server, &transport)?;
        // Check the server's root key against the token before the token leaves this machine: a
        // token for another server is refused here, without using up one of its enrollments.
        let before = client.public_trust()?;
        pin_root(&before.root_public_key, fingerprint)?;
        let resp = client.enroll(&EnrollRequest {
            token: token.trim().to_string(),
            hostname: self.platform.hostname()?,
            agent_version: AGENT_VERSION.to_string(),
        })?;
        let root = pin_root(&resp.trust.root_public_key, fingerprint)?;
        let key_list = advance_key_list(&root, None, &resp.trust.key_lists)?.ok_or(TrustError::MalformedList)?;
        let state = VaultState {
            generation: 1,
            server_url: server.trim_end_matches('/').to_string(),
            device_id: resp.device_id.clone(),
            credential: resp.credential,
            root_public_key: resp.trust.root_public_key,
            key_list: key_list.raw,
            escrow_public_key: resp.escrow_public_key,
            envelope: None,
            latest_time_seen: self.now().max(resp.server_time),
            policy_state: carried,
            transport,
            // A new identity has reported nothing: its first sync reports.
            last_report: None,
        };
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).map_err(|e| VaultError::KeyUnusable(e.to_string()))?;
        vault.create(key, &state)?;
        let status = Status {
            device_id: Some(resp.device_id.clone()),
            server_url: Some(state.server_url.clone()),
            ..Default::default()
        };
        let _ = status.save(&self.state_dir);
        Ok(resp.device_id)
    }

    /// One sync. Errors that stop the sync are also recorded in `status.json`.
    pub fn sync_once(&self) -> Result<SyncSummary, AgentError> {
        self.sync_once_with(SyncOptions::default())
    }

    /// [`Agent::sync_once`] with options.
    pub fn sync_once_with(&self, opts: SyncOptions) -> Result<SyncSummary, AgentError> {
        // One sync at a time per state dir (the service and `tenon-agent install` or `sync` run by
        // an administrator): never two installers at once, never two writers of the vault.
        let _lock = self.sync_lock()?;
        let mut status = Status::load(&self.state_dir);
        let now = self.now();
        status.last_attempt = Some(rfc3339(now));
        status.last_sync_reported = false;
        let result = self.sync_inner(&mut status, opts);
        match &result {
            Ok(summary) => {
                status.last_sync_result = Some(summary.result.to_string());
                status.last_error = (!summary.problems.is_empty()).then(|| summary.problems.join("; "));
                status.last_sync_reported = summary.reported;
            }
            Err(e) => {
                status.last_sync_result = Some("failed".into());
                status.last_error = Some(e.to_string());
                if matches!(e, AgentError::Decommissioned(_)) {
                    status.decommissioned = true;
                }
            }
        }
        if let Err(e) = status.save(&self.state_dir) {
            tracing::warn!(error = %e, "cannot write status.json");
        }
        match result {
            Ok(s) if s.result == "rejected" => Err(AgentError::Rejected(s.problems.join("; "))),
            other => other,
        }
    }

    fn sync_inner(&self, status: &mut Status, opts: SyncOptions) -> Result<SyncSummary, AgentError> {
        let vault = self.vault();
        let loaded = vault.load()?;
        let mut st = loaded.state;
        // What is on disk: an unchanged sync writes nothing (the agent checks in every minute).
        let mut persisted = st.clone();
        let mut problems: Vec<String> = loaded.repaired.into_iter().map(|r| format!("vault: {r}")).collect();
        status.device_id = Some(st.device_id.clone());
        status.server_url = Some(st.server_url.clone());
        st.latest_time_seen = st.latest_time_seen.max(self.now());

        // The root key was pinned at enrollment against the token's fingerprint.
        let root = decode_root(&st.root_public_key)?;
        let mut trusted = verify_key_list(&st.key_list, &root)?;

        // The stored envelope is re-verified (signature, device, hash; not expiry) before use.
        let mut lkg: Option<VerifiedEnvelope> = match &st.envelope {
            None => None,
            Some(bytes) => {
                let ctx = VerifyContext { device_id: &st.device_id, trusted: &trusted, stored: None, now: i64::MIN };
                match verify(bytes, &ctx) {
                    Ok(v) => Some(v),
                    Err(e) => {
                        problems.push(format!("stored configuration no longer verifies ({e}); discarded"));
                        None
                    }
                }
            }
        };

        let client = ServerClient::new(&st.server_url, &st.transport)?;
        // Read once per sync: a problem pushed in each round would make the second round's report
        // differ from the first one's.
        let hostname = match self.platform.hostname() {
            Ok(h) if Hostname::parse(&h).is_ok() => h,
            Ok(h) => {
                problems.push(report_text(&format!("the host name {h:?} is not a valid DNS or NetBIOS name")));
                "unknown".to_string()
            }
            Err(e) => {
                problems.push(format!("cannot read the host name: {e}"));
                "unknown".to_string()
            }
        };
        let mut result = "unchanged";
        let mut rejected = false;
        let mut checked_in = false;
        let mut reported = false;
        let mut fetch_error: Option<AgentError> = None;
        for round in 0..2 {
            let etag = lkg.as_ref().map(|e| envelope_etag(e.body.version, &e.body.payload_sha256));
            match client.fetch_config(&st.credential, etag.as_deref()) {
                Ok(Fetch::NotModified) => checked_in = true,
                Ok(Fetch::Envelope(bytes)) => {
                    checked_in = true;
                    match self.verify_new(&client, &mut st, &mut trusted, &root, &bytes, lkg.as_ref()) {
                        Ok(v) => {
                            st.latest_time_seen = st.latest_time_seen.max(v.body.issued_at);
                            st.envelope = Some(v.bytes.clone());
                            if lkg.as_ref().map(|l| l.body.version) != Some(v.body.version) {
                                result = "updated";
                            }
                            lkg = Some(v);
                        }
                        Err(reason) => {
                            rejected = true;
                            // The server sent an older envelope than the one held (its database was
                            // restored from a backup): show it the held one, which it signed, so it
                            // continues numbering above it. It believes no bare version number.
                            if let (VerifyError::Rollback { .. } | VerifyError::VersionReuse { .. }, Some(held)) =
                                (&reason, lkg.as_ref())
                            {
                                if let Err(e) = client.prove_held(&st.credential, &held.bytes) {
                                    problems.push(format!(
                                        "could not show the server the configuration held: {}",
                                        e.stable_text()
                                    ));
                                }
                            }
                            let keep =
                                lkg.as_ref().map(|l| l.body.version.to_string()).unwrap_or_else(|| "none".into());
                            problems.push(format!(
                                "refused the configuration from the server ({}: {}); keeping version {keep}",
                                reason.code(),
                                refusal_text(&reason)
                            ));
                        }
                    }
                }
                Err(ClientError::Decommissioned(d)) => return Err(AgentError::Decommissioned(d)),
                Err(e) => {
                    problems.push(e.to_string());
                    fetch_error = Some(e.into());
                }
            }
            persist_if_changed(&vault, &mut st, &mut persisted)?;

            let (statuses, packages) = self.apply(&client, &trusted, &vault, &mut st, &mut persisted, lkg.as_ref());
            persist_if_changed(&vault, &mut st, &mut persisted)?;
            status.policies = statuses.clone();
            status.config_version = lkg.as_ref().map(|l| l.body.version);
            status.config_sha256 = lkg.as_ref().map(|l| l.body.payload_sha256.clone());
            if fetch_error.is_some() {
                break;
            }
            status.last_sync = Some(rfc3339(self.now()));
            let mut signed_in_users: Vec<String> = self
                .platform
                .signed_in_users()
                .map(|u| u.into_iter().map(|u| u.upn.to_lowercase()).collect())
                .unwrap_or_default();
            // A set, as the server reads it: the same users listed in another order (or one user in
            // two sessions) are no change.
            signed_in_users.sort();
            signed_in_users.dedup();
            let report = DeviceReport {
                agent_version: AGENT_VERSION.to_string(),
                hostname: hostname.clone(),
                signed_in_users,
                config_version: status.config_version,
                config_sha256: status.config_sha256.clone(),
                // Bounded and free of control characters, so the server never refuses the report.
                // Nothing in it may change from sync to sync by itself (a clock reading, a wait
                // time), or every sync would report.
                last_error: (!problems.is_empty()).then(|| report_text(&problems.join("; "))),
                policies: statuses,
                packages,
            };
            let sha256 = report_sha256(&report);
            let now = self.now();
            // Only the first round is forced: the second one reports only what changed since.
            if !report_due(st.last_report.as_ref(), sha256.as_deref(), now, opts.force_report && round == 0) {
                // The server has this report already; the check-in above said the device is alive.
                break;
            }
            let wanted = match client.report(&st.credential, &report) {
                Ok(w) => {
                    // Acknowledged: only now does it count as the last report. A failed delivery
                    // leaves the stored one as it was (other content, or a day old), so the next
                    // sync sends it again.
                    reported = true;
                    status.last_report_at = Some(rfc3339(now));
                    if let Some(sha256) = sha256 {
                        st.last_report = Some(LastReport { sha256, sent_at: now });
                    }
                    persist_if_changed(&vault, &mut st, &mut persisted)?;
                    w
                }
                Err(ClientError::Decommissioned(d)) => return Err(AgentError::Decommissioned(d)),
                Err(e) => {
                    problems.push(format!("report not delivered: {e}"));
                    None
                }
            };
            let holding = lkg.as_ref().map(|e| envelope_etag(e.body.version, &e.body.payload_sha256));
            // The report can change what the server compiles for us (a new user signed in):
            // fetch again at once rather than at the next interval.
            if round == 0 && !rejected && wanted.is_some() && wanted != holding {
                continue;
            }
            break;
        }
        if let Some(e) = fetch_error {
            if !checked_in {
                return Err(e);
            }
        }
        Ok(SyncSummary {
            result: if rejected { "rejected" } else { result },
            config_version: lkg.as_ref().map(|l| l.body.version),
            problems,
            reported,
        })
    }

    /// Verifies a fetched envelope; on an unknown signing key, refreshes the key list once.
    fn verify_new(
        &self,
        client: &ServerClient,
        st: &mut VaultState,
        trusted: &mut KeyList,
        root: &ed25519_dalek::VerifyingKey,
        bytes: &str,
        lkg: Option<&VerifiedEnvelope>,
    ) -> Result<VerifiedEnvelope, VerifyError> {
        let stored = lkg.map(|l| (l.body.version, l.body.payload_sha256.as_str()));
        let first =
            verify(bytes, &VerifyContext { device_id: &st.device_id, trusted, stored, now: st.latest_time_seen });
        match first {
            Err(VerifyError::UnknownKey { .. }) => {
                let Ok(bundle) = client.trust(&st.credential) else { return first };
                match advance_key_list(root, Some(trusted), &bundle.key_lists) {
                    Ok(Some(newer)) if newer.body.version > trusted.body.version => {
                        st.key_list = newer.raw.clone();
                        *trusted = newer;
                        verify(
                            bytes,
                            &VerifyContext { device_id: &st.device_id, trusted, stored, now: st.latest_time_seen },
                        )
                    }
                    _ => first,
                }
            }
            other => other,
        }
    }

    /// Applies every policy to the last known good payload. A policy may persist its state in the
    /// middle of its run ([`PolicyContext::persist`]): that writes the vault at once, so a kill
    /// between two steps loses nothing the first step did.
    fn apply(
        &self,
        client: &ServerClient,
        trusted: &KeyList,
        vault: &Vault<'_>,
        st: &mut VaultState,
        persisted: &mut VaultState,
        lkg: Option<&VerifiedEnvelope>,
    ) -> (Map<String, Value>, BTreeMap<String, PackageReport>) {
        let mut statuses = Map::new();
        let mut packages = BTreeMap::new();
        let Some(env) = lkg else { return (statuses, packages) };
        let credential = st.credential.clone();
        let escrow = ServerEscrow::new(client, &credential, trusted, &st.device_id, st.escrow_public_key.as_deref());
        let empty = Map::new();
        let machine = env.body.payload.get("machine").and_then(Value::as_object).unwrap_or(&empty);
        let users = env.body.payload.get("users").and_then(Value::as_object).unwrap_or(&empty);
        for policy in policies::all() {
            let mut state = st.policy_state.remove(policy.name()).unwrap_or(Value::Null);
            let s = {
                let store = VaultStore { vault, policy: policy.name(), st: RefCell::new((&mut *st, &mut *persisted)) };
                let mut ctx = PolicyContext {
                    platform: self.platform,
                    machine,
                    users,
                    now: self.now(),
                    state: &mut state,
                    escrow: &escrow,
                    store: &store,
                };
                policy.apply(&mut ctx)
            };
            statuses.insert(policy.name().to_string(), serde_json::to_value(s).unwrap_or(Value::Null));
            if !state.is_null() {
                st.policy_state.insert(policy.name().to_string(), state);
            }
        }
        {
            let mut state = st.policy_state.remove(policies::packages::NAME).unwrap_or(Value::Null);
            let (status, reports) = {
                let store = VaultStore {
                    vault,
                    policy: policies::packages::NAME,
                    st: RefCell::new((&mut *st, &mut *persisted)),
                };
                let content = ServerContent { client, credential: &credential };
                let dir = self.state_dir.join("packages");
                let mut run = policies::packages::PackagesRun {
                    platform: self.platform,
                    machine,
                    now: self.now(),
                    state: &mut state,
                    store: &store,
                    content: &content,
                    dir: &dir,
                };
                policies::packages::run(&mut run)
            };
            statuses.insert(policies::packages::NAME.to_string(), serde_json::to_value(status).unwrap_or(Value::Null));
            packages = reports;
            if !state.is_null() {
                st.policy_state.insert(policies::packages::NAME.to_string(), state);
            }
        }
        // The server rotated its escrow key and signed the new one: seal to it from now on.
        if let Some(key) = escrow.adopted_key() {
            tracing::info!("the server's escrow key changed (signed by a trusted key); using the new one");
            st.escrow_public_key = Some(key);
        }
        (statuses, packages)
    }

    /// Waits for (up to 30 min: an installer may be running) and takes the state dir's sync lock.
    fn sync_lock(&self) -> Result<std::fs::File, AgentError> {
        let path = self.state_dir.join("sync.lock");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| AgentError::Lock(format!("cannot open {}: {e}", path.display())))?;
        let deadline = std::time::Instant::now() + Duration::from_secs(30 * 60);
        let mut told = false;
        loop {
            match f.try_lock() {
                Ok(()) => return Ok(f),
                Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                    if !told {
                        eprintln!("waiting for the sync in progress (the service, or an installer it runs) to finish");
                        told = true;
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(AgentError::Lock(format!(
                        "another sync has held {} for 30 minutes; try again later",
                        path.display()
                    )))
                }
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(AgentError::Lock(format!("cannot lock {}: {e}", path.display())))
                }
            }
        }
    }

    /// `tenon-agent install NAME`: asks for an available package of the plan now (or a failed one
    /// again), then syncs, which installs it.
    pub fn request_install(&self, name: &str) -> Result<SyncSummary, AgentError> {
        {
            let _lock = self.sync_lock()?;
            let vault = self.vault();
            let mut st = vault.load()?.state;
            let root = decode_root(&st.root_public_key)?;
            let trusted = verify_key_list(&st.key_list, &root)?;
            let env = st
                .envelope
                .as_deref()
                .and_then(|b| {
                    verify(
                        b,
                        &VerifyContext { device_id: &st.device_id, trusted: &trusted, stored: None, now: i64::MIN },
                    )
                    .ok()
                })
                .ok_or_else(|| {
                    AgentError::Rejected("no verified configuration yet; run `tenon-agent sync --once` first".into())
                })?;
            let empty = Map::new();
            let machine = env.body.payload.get("machine").and_then(Value::as_object).unwrap_or(&empty);
            let mut state = st.policy_state.remove(policies::packages::NAME).unwrap_or(Value::Null);
            policies::packages::request_locally(&mut state, machine, name).map_err(AgentError::Install)?;
            st.policy_state.insert(policies::packages::NAME.to_string(), state);
            vault.save(&st)?;
        }
        self.sync_once()
    }

    /// The service loop: sync at a jittered interval, back off exponentially while the server is
    /// unreachable, sync at once when the network changes, stop when `stop` is set or the device
    /// was decommissioned.
    pub fn run(&self, interval: Duration, stop: &AtomicBool) -> Result<(), AgentError> {
        let network_changed = AtomicBool::new(false);
        std::thread::scope(|scope| {
            // A gateway change (a laptop moving between sites) triggers a sync at once, which
            // re-runs the network-dependent policies; the interval stays the fallback.
            scope.spawn(|| {
                crate::netwatch::watch_network(self.platform, stop, |gw| {
                    let gateway = match gw {
                        Some(g) => format!(
                            "{} ({})",
                            g.ip,
                            g.mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
                        ),
                        None => "none".into(),
                    };
                    tracing::info!(gateway = %gateway, "network changed; syncing now");
                    network_changed.store(true, Ordering::SeqCst);
                })
            });
            let result = self.run_loop(interval, stop, &network_changed);
            stop.store(true, Ordering::SeqCst);
            result
        })
    }

    fn run_loop(&self, interval: Duration, stop: &AtomicBool, network_changed: &AtomicBool) -> Result<(), AgentError> {
        let mut backoff = Duration::from_secs(5);
        const MAX_BACKOFF: Duration = Duration::from_secs(15 * 60);
        while !stop.load(Ordering::SeqCst) {
            network_changed.store(false, Ordering::SeqCst);
            let wait = match self.sync_once() {
                Ok(s) => {
                    let version = s.config_version.map(|v| v.to_string()).unwrap_or_else(|| "none".into());
                    tracing::info!(result = s.result, version = %version, reported = s.reported, "sync done");
                    backoff = Duration::from_secs(5);
                    jitter(interval, 0.2)
                }
                Err(AgentError::Decommissioned(d)) => {
                    tracing::error!("device decommissioned; stopping: {d}");
                    return Err(AgentError::Decommissioned(d));
                }
                Err(AgentError::Client(ClientError::RateLimited { retry_after, detail })) => {
                    // Wait at least as long as the server asked; never retry sooner.
                    tracing::warn!(retry_in = ?retry_after, "server is rate limiting this device: {detail}");
                    retry_after.max(jitter(backoff, 0.3))
                }
                Err(AgentError::Client(ClientError::Unavailable { retry_after, detail })) => {
                    tracing::info!(retry_in = ?retry_after, "{detail}");
                    retry_after.max(jitter(Duration::from_secs(1), 0.5))
                }
                Err(e @ AgentError::Client(ClientError::Unreachable { .. })) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "server unreachable");
                    let w = jitter(backoff, 0.3);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    w
                }
                Err(e) => {
                    tracing::warn!(error = %e, "sync failed");
                    let w = jitter(backoff.max(interval.min(MAX_BACKOFF)), 0.3);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    w
                }
            };
            sleep_until(stop, network_changed, wait);
        }
        Ok(())
    }
}

/// How far the latest time seen may run ahead of its persisted value before it is written: the
/// freeze check only needs it roughly current, and writing it every minute would wear the disk.
const TIME_SEEN_PERSIST_STEP: i64 = 3600;

/// Package content from the server, with the device credential.
struct ServerContent<'a> {
    client: &'a ServerClient,
    credential: &'a str,
}

impl policies::packages::ContentSource for ServerContent<'_> {
    fn fetch(
        &self,
        sha256: &str,
        offset: u64,
        out: &mut dyn std::io::Write,
    ) -> Result<u64, crate::client::DownloadError> {
        self.client.download(self.credential, sha256, offset, out)
    }
}

/// A policy's [`StateStore`]: writes the vault with that policy's state as it stands now.
struct VaultStore<'a, 'v> {
    vault: &'a Vault<'v>,
    policy: &'static str,
    /// The state being built by this sync, and what was last written.
    st: RefCell<(&'a mut VaultState, &'a mut VaultState)>,
}

impl StateStore for VaultStore<'_, '_> {
    fn persist(&self, state: &Value) -> Result<(), String> {
        let mut guard = self.st.borrow_mut();
        let (st, persisted) = &mut *guard;
        // The policy's state is out of `st` while it runs (the loop puts it back afterwards).
        st.policy_state.insert(self.policy.to_string(), state.clone());
        let written = persist_if_changed(self.vault, st, persisted);
        st.policy_state.remove(self.policy);
        written.map_err(|e| e.to_string())
    }
}

/// Writes the vault (both copies) when its content changed since it was last written.
fn persist_if_changed(vault: &Vault<'_>, st: &mut VaultState, persisted: &mut VaultState) -> Result<(), VaultError> {
    let mut unchanged = st.clone();
    if st.latest_time_seen - persisted.latest_time_seen < TIME_SEEN_PERSIST_STEP {
        unchanged.latest_time_seen = persisted.latest_time_seen;
    }
    unchanged.generation = persisted.generation;
    if unchanged == *persisted {
        return Ok(());
    }
    st.generation = persisted.generation + 1;
    vault.save(st)?;
    *persisted = st.clone();
    Ok(())
}

/// Lower-case hex SHA-256 of the report's canonical JSON; None if it cannot be canonicalised
/// (then it is always sent).
fn report_sha256(report: &DeviceReport) -> Option<String> {
    let value = serde_json::to_value(report).ok()?;
    canonical_sha256(&value).ok()
}

/// Whether a report whose hash is `sha256` is sent at `now`: when forced, when none was
/// acknowledged yet (a new enrollment), when it differs from the last acknowledged one, when that
/// one is [`FULL_REPORT_INTERVAL`] old, or when it lies in the future (the clock was set back, so
/// its age says nothing).
fn report_due(last: Option<&LastReport>, sha256: Option<&str>, now: i64, force: bool) -> bool {
    let Some(last) = last else { return true };
    force
        || sha256 != Some(last.sha256.as_str())
        || now < last.sent_at
        || now.saturating_sub(last.sent_at) >= FULL_REPORT_INTERVAL
}

/// A refusal's reason as the report carries it: an expired envelope's message names the clock
/// reading, which moves every sync and would make every sync report while the freeze lasts.
fn refusal_text(reason: &VerifyError) -> String {
    match reason {
        VerifyError::Expired { expires_at, .. } => {
            format!("envelope expired at {}; the server must re-issue it (freeze)", rfc3339(*expires_at))
        }
        other => other.to_string(),
    }
}

fn decode_root(b64: &str) -> Result<ed25519_dalek::VerifyingKey, TrustError> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64).map_err(|_| TrustError::MalformedKey)?;
    let arr: [u8; 32] = bytes.try_into().map_err(|_| TrustError::MalformedKey)?;
    ed25519_dalek::VerifyingKey::from_bytes(&arr).map_err(|_| TrustError::MalformedKey)
}

/// `base` scaled by a random factor in [1 - spread, 1 + spread], so a fleet does not check in
/// in lock-step.
pub fn jitter(base: Duration, spread: f64) -> Duration {
    let mut b = [0u8; 2];
    let r = if getrandom::fill(&mut b).is_ok() { u16::from_le_bytes(b) as f64 / u16::MAX as f64 } else { 0.5 };
    base.mul_f64(1.0 - spread + 2.0 * spread * r)
}

pub(crate) fn sleep_until(stop: &AtomicBool, wake: &AtomicBool, total: Duration) {
    let deadline = std::time::Instant::now() + total;
    while !stop.load(Ordering::SeqCst) && !wake.load(Ordering::SeqCst) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::sleep(left.min(Duration::from_millis(250)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn when_a_report_is_due() {
        const T: i64 = 1_800_000_000;
        let last = LastReport { sha256: "aa".into(), sent_at: T };
        let day = FULL_REPORT_INTERVAL;
        type Case<'a> = (Option<&'a LastReport>, Option<&'a str>, i64, bool, bool);
        // (last, hash, now, forced, due)
        let cases: [Case; 9] = [
            (None, Some("aa"), T, false, true),
            (Some(&last), Some("aa"), T, false, false),
            (Some(&last), Some("aa"), T + day - 1, false, false),
            (Some(&last), Some("aa"), T + day, false, true),
            (Some(&last), Some("bb"), T + 1, false, true),
            (Some(&last), Some("aa"), T + 1, true, true),
            (Some(&last), None, T + 1, false, true),
            // The clock went back: the stored time says nothing about the age.
            (Some(&last), Some("aa"), T - 1, false, true),
            (Some(&last), Some("aa"), i64::MAX, false, true),
        ];
        for (i, (last, sha, now, force, due)) in cases.into_iter().enumerate() {
            assert_eq!(report_due(last, sha, now, force), due, "case {i}");
        }
    }

    #[test]
    fn the_report_hash_is_of_its_content() {
        let report = DeviceReport { agent_version: "1.0.0".into(), hostname: "PC".into(), ..Default::default() };
        let same = report_sha256(&report).unwrap();
        assert_eq!(same.len(), 64);
        assert_eq!(report_sha256(&report.clone()), Some(same.clone()));
        let users = DeviceReport { signed_in_users: vec!["anna@contoso.com".into()], ..report.clone() };
        assert_ne!(report_sha256(&users), Some(same.clone()));
        let error = DeviceReport { last_error: Some("x".into()), ..report };
        assert_ne!(report_sha256(&error), Some(same));
    }

    #[test]
    fn an_expired_envelope_is_reported_without_the_clock() {
        let at = |now| refusal_text(&VerifyError::Expired { expires_at: 1_800_000_000, now });
        assert_eq!(at(1_800_000_100), at(1_800_000_160));
        assert!(at(1).contains("2027-01-15T08:00:00Z"), "{}", at(1));
        assert_eq!(refusal_text(&VerifyError::BadSignature), VerifyError::BadSignature.to_string());
    }
}
