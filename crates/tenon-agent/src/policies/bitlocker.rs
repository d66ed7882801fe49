//! The BitLocker policy (`bitlocker`): decides with tenon-core whether to enforce, then walks the OS
//! volume towards "encrypted, every recovery password escrowed" one planned step at a time, keeping
//! the escrow record, the Entra retry queue and rotation requests in its persisted state.
//!
//! Each step is planned from freshly read facts (the volume, the registry, the state), executed,
//! and the facts are read again before the next: a step that failed is never assumed done. A
//! failed Entra escrow does not stop the run (the next attempt is scheduled with backoff); any
//! other failure does, and the status says which step failed and why.
//!
//! Crash safety: the state is a persisted state machine. It is written durably
//! ([`PolicyContext::persist`]) before every step that must be remembered and after every step,
//! so a kill at any point resumes where it stopped: before adding a recovery password the agent
//! records the intent (with the protectors already there), so a key added just before a kill is
//! recognised as Tenon's and adopted, never left as an orphan; a rotation is requested -> new
//! protector added -> new key escrowed (receipt) -> old protector deleted -> retirement reported
//! to the server, which completes the rotation only then. Surplus keys Tenon added are removed
//! once the keeper is escrowed. The platform stays the source of truth for protectors: a recovery
//! password found on the volume without a Tenon receipt is read back (`recovery_password`) and
//! escrowed, never silently trusted. An Entra attempt is counted (durably) before it is made, so a
//! restart cannot turn the backoff into a retry storm.
//!
//! Secrets: the recovery password lives only in a `Zeroizing` buffer between the platform call and
//! sealing; statuses, errors and logs name protectors by id, never by password.
//!
//! Settings (machine config): `Policies.RequireSecurityFeatures.BitlockerEnabled` (`true` turns it
//! on) and `Policies.RequireSecurityFeatures.EntraEscrowMaxAttempts` (Entra attempts per key before
//! the rollout is marked failed; 1..=1000, default 5; backoff 5 min doubling, at most 6 h apart).
//!
//! Reported status (`policies.bitlocker`): `state` is one of `not_applicable`, `skipped` (with
//! `reason` `tpm_not_ready` | `tpm_unavailable` | `virtual_machine` | `multi_session` |
//! `no_os_volume` and a `message`), `enforcing`, `encrypted`, `escrow_pending` (`reason`
//! `tenon_escrow_pending` | `entra_escrow_pending`), `escrow_failed` (`entra_escrow_failed`),
//! `action_required` (`step_failed` | `volume_decrypting` | `volume_unreadable` |
//! `facts_unavailable`). When enforcing, the details also carry `mount`, `encryption`, `percent`,
//! `protectors` (`[{id, kind, tenon_escrowed, tenon_escrow_conflict?, entra:
//! escrowed|pending|failed|not_joined, entra_attempts, entra_next_attempt_at?, entra_last_error?}]`),
//! `entra_joined`,
//! `entra_max_attempts`, `warning` ("recovery key not secured in Entra ..." when not joined),
//! `rotations_pending`, `escrow_conflicts` (protectors for which the server holds a different
//! password too) with `escrow_warning`, `actions` (steps done this run) and `errors`.

use super::{config_get, Policy, PolicyContext};
use crate::platform::{PResult, PlatformError, RegValue, Volume, VolumeEncryption};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use tenon_core::api::PolicyStatus;
use tenon_core::policy::bitlocker::{
    decide, entra_progress, plan_steps, setting_enabled, summarize, BitlockerInput, Decision, Encryption, EntraEscrow,
    EntraProgress, PlanInput, ProtectorEscrow, ProtectorFacts, ProtectorKind, SkipReason, State, Step, TpmFacts,
    VolumeFacts, BITLOCKER_CONTROL_KEY, PREVENT_DEVICE_ENCRYPTION, SETTING_ENABLED, SETTING_ENTRA_MAX_ATTEMPTS,
    VM_DETECTION_OVERRIDE_ENV,
};
use tenon_core::policy::escrow::{entra_max_attempts, is_recovery_password, seal, EscrowError, SealRandomness};
use zeroize::Zeroizing;

/// The BitLocker policy.
pub struct Bitlocker;

/// A run executes at most this many steps; the full path from a fresh volume takes six or seven,
/// a rotation four.
const MAX_STEPS_PER_RUN: usize = 24;
/// At most this many retirements are remembered; the server lists the rest again next sync.
const MAX_RETIREMENTS: usize = 64;
/// Longest protector id taken from the server (a `{GUID}` is 38).
const MAX_PROTECTOR_ID: usize = 128;

const NOT_IN_ENTRA: &str =
    "recovery key not secured in Entra: the device is not Entra-joined (the Tenon escrow holds it)";

/// What the policy remembers between runs (in the agent's encrypted vault).
#[derive(Debug, Default, Serialize, Deserialize)]
struct BitlockerState {
    /// Recovery-password protectors Tenon knows about, by protector id.
    #[serde(default)]
    protectors: BTreeMap<String, ProtectorRecord>,
    /// Protectors to retire (rotations the server asked for, surplus keys Tenon added), by id,
    /// until the server has been told they are gone.
    #[serde(default)]
    rotations: BTreeMap<String, RotationRecord>,
    /// Written just before a recovery password is added, cleared once its id is recorded.
    #[serde(default)]
    adding: Option<AddIntent>,
}

/// A recovery password being added: if the agent dies before it learns the new id, the next run
/// adopts the recovery password that is on the volume but not in `before` as Tenon's.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct AddIntent {
    mount: String,
    /// Every protector id on the volume before the add.
    before: Vec<String>,
    replaces: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct ProtectorRecord {
    mount: String,
    #[serde(default)]
    added_by_tenon: bool,
    #[serde(default)]
    added_at: Option<i64>,
    /// The server's receipt arrived: the key is durably in the Tenon escrow.
    #[serde(default)]
    tenon_escrowed: bool,
    #[serde(default)]
    tenon_stored_at: Option<i64>,
    /// The protector this key was added to replace (sent with its escrow upload).
    #[serde(default)]
    replaces: Option<String>,
    /// The server holds a different password for this protector as well.
    #[serde(default)]
    tenon_conflict: bool,
    /// The Entra retry queue entry of this key.
    #[serde(default)]
    entra: EntraRecord,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct EntraRecord {
    /// Attempts made (counted before each is made).
    #[serde(default)]
    attempts: u32,
    #[serde(default)]
    last_attempt_at: Option<i64>,
    #[serde(default)]
    escrowed_at: Option<i64>,
    #[serde(default)]
    last_error: Option<String>,
}

impl EntraRecord {
    fn as_core(&self) -> EntraEscrow {
        match (self.escrowed_at, self.attempts) {
            (Some(_), _) => EntraEscrow::Escrowed,
            (None, 0) => EntraEscrow::NotTried,
            (None, attempts) => EntraEscrow::Retrying { attempts, last_attempt_at: self.last_attempt_at.unwrap_or(0) },
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct RotationRecord {
    requested_at: i64,
    /// `false`: the server asked (a read); `true`: a surplus key Tenon added.
    #[serde(default)]
    surplus: bool,
}

/// Why a step failed. No variant carries a recovery password.
#[derive(Debug, thiserror::Error)]
enum StepError {
    #[error(transparent)]
    Platform(#[from] PlatformError),
    #[error("server escrow not configured (no escrow key from the server, or the device is not enrolled)")]
    NoEscrowTarget,
    #[error("the Tenon server did not confirm storing the key: {0}")]
    Upload(String),
    #[error("the server's receipt names protector {got}, not {expected}")]
    WrongReceipt { expected: String, got: String },
    #[error(transparent)]
    Seal(#[from] EscrowError),
    #[error("the platform returned a recovery password that is not in BitLocker's format")]
    MalformedPassword,
    #[error("no random bytes for sealing: {0}")]
    Random(String),
    #[error("the Tenon server did not record the retirement: {0}")]
    Retire(String),
    #[error("cannot persist the policy state before going on (the vault could not be written): {0}")]
    Persist(String),
    #[error("attempt {attempt} of {max}: {source}")]
    Entra {
        attempt: u32,
        max: u32,
        #[source]
        source: PlatformError,
    },
}

impl Policy for Bitlocker {
    fn name(&self) -> &'static str {
        "bitlocker"
    }

    fn apply(&self, ctx: &mut PolicyContext<'_>) -> PolicyStatus {
        // A value of the wrong type is reported, not guessed at ("yes" is not `true`, and a bad
        // attempt count is not silently the default): nothing is done until it is fixed.
        for key in [SETTING_ENABLED, SETTING_ENTRA_MAX_ATTEMPTS] {
            if let Err(e) = tenon_core::schema::read(ctx.machine, key) {
                return PolicyStatus::new(State::ActionRequired.name())
                    .with_reason("invalid_setting")
                    .with("error", format!("{e}; nothing changed"));
            }
        }
        if !setting_enabled(config_get(ctx.machine, SETTING_ENABLED)) {
            return PolicyStatus::new(State::NotApplicable.name());
        }
        let facts = match DeviceFacts::gather(ctx) {
            Ok(f) => f,
            Err(e) => {
                return PolicyStatus::new(State::ActionRequired.name())
                    .with_reason("facts_unavailable")
                    .with("error", e.to_string())
            }
        };
        match (decide(&facts.input), facts.os_volume.clone()) {
            (Decision::NotApplicable, _) => PolicyStatus::new(State::NotApplicable.name()),
            (Decision::Skip(reason), _) => facts.skipped(reason),
            (Decision::Enforce, None) => facts.skipped(SkipReason::NoOsVolume),
            (Decision::Enforce, Some(volume)) => Run::new(ctx).enforce(volume),
        }
    }
}

/// `Ok(None)` for a provider that is not there (a fact we cannot learn), other errors as they are.
fn available<T>(r: PResult<T>) -> PResult<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.is_unavailable() => Ok(None),
        Err(e) => Err(e),
    }
}

struct DeviceFacts {
    input: BitlockerInput,
    os_volume: Option<Volume>,
}

impl DeviceFacts {
    fn gather(ctx: &PolicyContext<'_>) -> PResult<Self> {
        let p = ctx.platform;
        let tpm = match available(p.tpm())? {
            Some(t) => TpmFacts::from_state(t.present, t.ready),
            None => TpmFacts::Unavailable,
        };
        let cs = available(p.computer_system())?.unwrap_or_default();
        let vm_detection_override = available(p.machine_env(VM_DETECTION_OVERRIDE_ENV))?.flatten();
        let multi_session = available(p.is_multi_session())?.unwrap_or(false);
        let os_volume = available(p.volumes())?.and_then(|vols| vols.into_iter().find(|v| v.is_os_volume));
        Ok(Self {
            input: BitlockerInput {
                enabled: true,
                tpm,
                manufacturer: cs.manufacturer,
                model: cs.model,
                vm_detection_override,
                multi_session,
                os_volume: os_volume.is_some(),
            },
            os_volume,
        })
    }

    fn skipped(&self, reason: SkipReason) -> PolicyStatus {
        let tpm = match self.input.tpm {
            TpmFacts::Ready => "ready",
            TpmFacts::NotReady => "not_ready",
            TpmFacts::Absent => "absent",
            TpmFacts::Unavailable => "unavailable",
        };
        PolicyStatus::new(State::Skipped(reason).name())
            .with_reason(reason.code())
            .with("message", reason.message())
            .with("tpm", tpm)
            .with("manufacturer", self.input.manufacturer.clone())
            .with("model", self.input.model.clone())
            .with("multi_session", self.input.multi_session)
    }
}

fn volume_facts(v: &Volume) -> VolumeFacts {
    VolumeFacts {
        mount: v.mount.clone(),
        encryption: match v.encryption {
            VolumeEncryption::None => Encryption::None,
            VolumeEncryption::Encrypting => Encryption::Encrypting,
            VolumeEncryption::Encrypted => Encryption::Encrypted,
            VolumeEncryption::Decrypting => Encryption::Decrypting,
        },
        percent: v.percent_encrypted,
        protectors: v
            .protectors
            .iter()
            .map(|p| ProtectorFacts { id: p.id.clone(), kind: protector_kind(&p.kind) })
            .collect(),
    }
}

/// Protector kinds as the platforms name them (`recovery_password`, `tpm`, `tpm_pin`, ...).
fn protector_kind(kind: &str) -> ProtectorKind {
    let k = kind.to_ascii_lowercase();
    if k == "recovery_password" || k == "numerical_password" {
        ProtectorKind::RecoveryPassword
    } else if k.starts_with("tpm") {
        ProtectorKind::Tpm
    } else {
        ProtectorKind::Other
    }
}

fn encryption_name(e: VolumeEncryption) -> &'static str {
    match e {
        VolumeEncryption::None => "none",
        VolumeEncryption::Encrypting => "encrypting",
        VolumeEncryption::Encrypted => "encrypted",
        VolumeEncryption::Decrypting => "decrypting",
    }
}

/// One enforcement run.
struct Run<'c, 'a> {
    ctx: &'c mut PolicyContext<'a>,
    state: BitlockerState,
    entra_joined: bool,
    entra_max_attempts: u32,
    /// Passwords of protectors added in this run, so they need not be read back to escrow them.
    fresh: HashMap<String, Zeroizing<String>>,
    errors: Vec<String>,
    done: Vec<String>,
}

impl<'c, 'a> Run<'c, 'a> {
    fn new(ctx: &'c mut PolicyContext<'a>) -> Self {
        let state = match &*ctx.state {
            Value::Null => BitlockerState::default(),
            v => serde_json::from_value(v.clone()).unwrap_or_else(|e| {
                // The platform and the server hold the truth; a lost record costs a re-escrow, not a key.
                tracing::warn!("bitlocker: discarding unreadable policy state: {e}");
                BitlockerState::default()
            }),
        };
        let entra_max_attempts = entra_max_attempts(config_get(ctx.machine, SETTING_ENTRA_MAX_ATTEMPTS));
        Self {
            ctx,
            state,
            entra_joined: false,
            entra_max_attempts,
            fresh: HashMap::new(),
            errors: Vec::new(),
            done: Vec::new(),
        }
    }

    /// Writes the state back to the context (the agent persists it after the run in any case).
    fn save(&mut self) {
        if let Ok(v) = serde_json::to_value(&self.state) {
            *self.ctx.state = v;
        }
    }

    /// Writes the state back and makes it durable now: what a step did, or is about to do, must
    /// survive a kill.
    fn checkpoint(&mut self) -> Result<(), StepError> {
        self.save();
        self.ctx.persist().map_err(StepError::Persist)
    }

    fn read_volume(&self, mount: &str) -> PResult<Volume> {
        self.ctx.platform.volumes()?.into_iter().find(|v| v.mount.eq_ignore_ascii_case(mount)).ok_or(
            PlatformError::Invalid {
                what: "BitLocker volume",
                detail: format!("volume {mount} is no longer reported"),
            },
        )
    }

    fn prevent_device_encryption(&self) -> Option<u32> {
        match self.ctx.platform.reg_get(BITLOCKER_CONTROL_KEY, PREVENT_DEVICE_ENCRYPTION) {
            Ok(Some(RegValue::Dword(v))) => Some(v),
            _ => None,
        }
    }

    /// Forgets protectors that are gone from the volume. Retirements stay until reported.
    fn prune(&mut self, vol: &Volume) {
        let present = |id: &str| vol.protectors.iter().any(|p| p.id == id);
        self.state.protectors.retain(|id, r| !r.mount.eq_ignore_ascii_case(&vol.mount) || present(id));
    }

    /// A run that died between adding a recovery password and recording it left its intent: the
    /// recovery password that appeared since is Tenon's (it is escrowed, or removed as surplus).
    fn adopt_interrupted_add(&mut self, vol: &Volume) -> Result<(), StepError> {
        let Some(intent) = self.state.adding.take() else { return Ok(()) };
        if intent.mount.eq_ignore_ascii_case(&vol.mount) {
            for p in vol.protectors.iter().filter(|p| protector_kind(&p.kind) == ProtectorKind::RecoveryPassword) {
                if !intent.before.contains(&p.id) && !self.state.protectors.contains_key(&p.id) {
                    tracing::info!("bitlocker: adopting recovery password {} added before an interruption", p.id);
                    self.state.protectors.insert(
                        p.id.clone(),
                        ProtectorRecord {
                            mount: vol.mount.clone(),
                            added_by_tenon: true,
                            added_at: Some(self.ctx.now),
                            replaces: intent.replaces.clone(),
                            ..ProtectorRecord::default()
                        },
                    );
                }
            }
        }
        self.checkpoint()
    }

    /// Takes in the server's rotation requests and conflict flags (bounded: the lists come over
    /// the network), and records the requests durably before anything acts on them.
    fn learn_from_server(&mut self) -> Result<(), StepError> {
        let sane = |id: &String| !id.is_empty() && id.len() <= MAX_PROTECTOR_ID && !id.chars().any(char::is_control);
        let now = self.ctx.now;
        let mut changed = false;
        for id in self.ctx.escrow.pending_rotations().into_iter().filter(sane) {
            if self.state.rotations.len() >= MAX_RETIREMENTS {
                break;
            }
            if let std::collections::btree_map::Entry::Vacant(e) = self.state.rotations.entry(id) {
                e.insert(RotationRecord { requested_at: now, surplus: false });
                changed = true;
            }
        }
        for id in self.ctx.escrow.escrow_conflicts().into_iter().filter(sane).take(MAX_RETIREMENTS) {
            if let Some(rec) = self.state.protectors.get_mut(&id).filter(|r| !r.tenon_conflict) {
                rec.tenon_conflict = true;
                changed = true;
            }
        }
        if changed {
            self.checkpoint()?;
        }
        Ok(())
    }

    fn escrow_facts(&self) -> BTreeMap<String, ProtectorEscrow> {
        self.state
            .protectors
            .iter()
            .map(|(id, r)| (id.clone(), ProtectorEscrow { tenon: r.tenon_escrowed, entra: r.entra.as_core() }))
            .collect()
    }

    fn retirement_facts(&self) -> BTreeSet<String> {
        self.state.rotations.keys().cloned().collect()
    }

    fn tenon_added_facts(&self) -> BTreeSet<String> {
        self.state.protectors.iter().filter(|(_, r)| r.added_by_tenon).map(|(id, _)| id.clone()).collect()
    }

    fn with_plan_input<T>(&self, vol: &Volume, prevent: Option<u32>, f: impl FnOnce(&PlanInput<'_>) -> T) -> T {
        let volume = volume_facts(vol);
        let escrow = self.escrow_facts();
        let retirements = self.retirement_facts();
        let tenon_added = self.tenon_added_facts();
        f(&PlanInput {
            volume: &volume,
            prevent_device_encryption: prevent,
            escrow: &escrow,
            entra_joined: self.entra_joined,
            entra_max_attempts: self.entra_max_attempts,
            retirements: &retirements,
            tenon_added: &tenon_added,
            now: self.ctx.now,
        })
    }

    fn enforce(mut self, first: Volume) -> PolicyStatus {
        let mount = first.mount.clone();
        self.entra_joined = match available(self.ctx.platform.entra_join()) {
            Ok(join) => join.is_some_and(|j| j.joined),
            Err(e) => {
                self.errors.push(format!("reading the Entra join state: {e}"));
                false
            }
        };
        if let Err(e) = self.adopt_interrupted_add(&first).and_then(|()| self.learn_from_server()) {
            self.errors.push(e.to_string());
            return self.status(&first, true);
        }

        let mut current = Some(first);
        let mut failed: HashSet<Step> = HashSet::new();
        let mut step_failed = false;
        for _ in 0..MAX_STEPS_PER_RUN {
            let vol = match current.take() {
                Some(v) => v,
                None => match self.read_volume(&mount) {
                    Ok(v) => v,
                    Err(e) => return self.failed_read(e),
                },
            };
            self.prune(&vol);
            self.save();
            let prevent = self.prevent_device_encryption();
            let next = self.with_plan_input(&vol, prevent, plan_steps).into_iter().find(|s| !failed.contains(s));
            let Some(step) = next else {
                current = Some(vol);
                break;
            };
            tracing::info!("bitlocker: {}", step.describe());
            match self.execute(&mount, &step).and_then(|()| self.checkpoint()) {
                Ok(()) => self.done.push(step.describe()),
                Err(e) => {
                    tracing::warn!("bitlocker: {} failed: {e}", step.describe());
                    self.errors.push(format!("{}: {e}", step.describe()));
                    // Entra escrow and the retirement report depend on a service, and nothing
                    // after them depends on them: the run goes on.
                    let goes_on = matches!(step, Step::EscrowToEntra { .. } | Step::ReportRetired { .. });
                    step_failed |= !goes_on && !matches!(step, Step::EscrowToTenon { .. });
                    failed.insert(step);
                    if !goes_on {
                        // Nothing after a failed step may run: each depends on the ones before. The
                        // failed step is taken to have changed nothing, so the facts stand.
                        current = Some(vol);
                        self.save();
                        break;
                    }
                }
            }
            self.save();
        }
        let vol = match current {
            Some(v) => v,
            None => match self.read_volume(&mount) {
                Ok(v) => v,
                Err(e) => return self.failed_read(e),
            },
        };
        self.prune(&vol);
        self.save();
        self.status(&vol, step_failed)
    }

    fn failed_read(mut self, e: PlatformError) -> PolicyStatus {
        self.save();
        self.errors.push(format!("reading the volume: {e}"));
        PolicyStatus::new(State::ActionRequired.name())
            .with_reason("volume_unreadable")
            .with("errors", self.errors)
            .with("actions", self.done)
    }

    fn execute(&mut self, mount: &str, step: &Step) -> Result<(), StepError> {
        let p = self.ctx.platform;
        let now = self.ctx.now;
        match step {
            Step::SetPreventDeviceEncryption => {
                p.reg_set(BITLOCKER_CONTROL_KEY, PREVENT_DEVICE_ENCRYPTION, &RegValue::Dword(0))?;
            }
            Step::AddRecoveryPassword { replaces } => {
                // The intent first, durably: a kill after the add but before its id is recorded
                // must not leave a key nobody knows is Tenon's.
                let before = self.read_volume(mount)?.protectors.into_iter().map(|p| p.id).collect();
                self.state.adding = Some(AddIntent { mount: mount.to_string(), before, replaces: replaces.clone() });
                self.checkpoint()?;
                let (id, password) = p.add_recovery_password(mount)?;
                let password = Zeroizing::new(password);
                // Record the protector before anything else can fail: the next run then escrows
                // this one rather than adding yet another.
                self.state.adding = None;
                self.state.protectors.insert(
                    id.clone(),
                    ProtectorRecord {
                        mount: mount.to_string(),
                        added_by_tenon: true,
                        added_at: Some(now),
                        replaces: replaces.clone(),
                        ..ProtectorRecord::default()
                    },
                );
                self.checkpoint()?;
                if !is_recovery_password(&password) {
                    return Err(StepError::MalformedPassword);
                }
                self.fresh.insert(id, password);
            }
            Step::EscrowToTenon { protector_id } => self.escrow_to_tenon(mount, protector_id)?,
            Step::EscrowToEntra { protector_id } => self.escrow_to_entra(mount, protector_id)?,
            Step::DeleteProtector { protector_id } => {
                // A surplus key is remembered as a retirement before it goes, so the server hears
                // of it even if the agent dies right after the delete.
                if !self.state.rotations.contains_key(protector_id) {
                    self.state
                        .rotations
                        .insert(protector_id.clone(), RotationRecord { requested_at: now, surplus: true });
                    self.checkpoint()?;
                }
                p.delete_protector(mount, protector_id)?;
                self.state.protectors.remove(protector_id);
            }
            Step::ReportRetired { protector_id, replaced_by } => {
                self.ctx.escrow.report_retired(protector_id, replaced_by.as_deref()).map_err(StepError::Retire)?;
                self.state.rotations.remove(protector_id);
            }
            Step::AddTpmProtector => {
                p.add_tpm_protector(mount)?;
            }
            Step::Encrypt => p.encrypt(mount)?,
        }
        Ok(())
    }

    fn escrow_to_tenon(&mut self, mount: &str, id: &str) -> Result<(), StepError> {
        let target = self.ctx.escrow.escrow_target().ok_or(StepError::NoEscrowTarget)?;
        let password = match self.fresh.get(id) {
            Some(pw) => pw.clone(),
            None => Zeroizing::new(self.ctx.platform.recovery_password(mount, id)?),
        };
        let mut random = Zeroizing::new([0u8; 56]);
        getrandom::fill(&mut random[..]).map_err(|e| StepError::Random(e.to_string()))?;
        let sealed =
            seal(&target.public_key, &target.device_id, mount, id, &password, &SealRandomness::from_bytes(&random))?;
        drop(password);
        let replaces = self.state.protectors.get(id).and_then(|r| r.replaces.clone());
        let receipt = self.ctx.escrow.upload(&sealed, replaces.as_deref()).map_err(StepError::Upload)?;
        if receipt.protector_id != id {
            return Err(StepError::WrongReceipt { expected: id.to_string(), got: receipt.protector_id });
        }
        let rec = self
            .state
            .protectors
            .entry(id.to_string())
            .or_insert_with(|| ProtectorRecord { mount: mount.to_string(), ..ProtectorRecord::default() });
        rec.tenon_escrowed = true;
        rec.tenon_stored_at = Some(receipt.stored_at);
        rec.tenon_conflict |= receipt.conflict;
        self.fresh.remove(id);
        Ok(())
    }

    fn escrow_to_entra(&mut self, mount: &str, id: &str) -> Result<(), StepError> {
        let now = self.ctx.now;
        let max = self.entra_max_attempts;
        let rec = self
            .state
            .protectors
            .entry(id.to_string())
            .or_insert_with(|| ProtectorRecord { mount: mount.to_string(), ..ProtectorRecord::default() });
        rec.entra.attempts = rec.entra.attempts.saturating_add(1);
        rec.entra.last_attempt_at = Some(now);
        let attempt = rec.entra.attempts;
        // Count the attempt before making it: an agent killed during the call must not get a free retry.
        self.checkpoint()?;
        let result = self.ctx.platform.backup_to_entra(mount, id);
        let rec = self.state.protectors.entry(id.to_string()).or_default();
        match result {
            Ok(()) => {
                rec.entra.escrowed_at = Some(now);
                rec.entra.last_error = None;
                Ok(())
            }
            Err(e) => {
                rec.entra.last_error = Some(e.to_string());
                Err(StepError::Entra { attempt, max, source: e })
            }
        }
    }

    fn status(self, vol: &Volume, step_failed: bool) -> PolicyStatus {
        let prevent = self.prevent_device_encryption();
        let (state, reason) = self.with_plan_input(vol, prevent, |input| summarize(input, step_failed));
        let now = self.ctx.now;
        let protectors: Vec<Value> = vol
            .protectors
            .iter()
            .map(|p| {
                let kind = protector_kind(&p.kind);
                if kind != ProtectorKind::RecoveryPassword {
                    return json!({"id": p.id, "kind": p.kind});
                }
                let rec = self.state.protectors.get(&p.id).cloned().unwrap_or_default();
                let mut entry = json!({
                    "id": p.id,
                    "kind": p.kind,
                    "tenon_escrowed": rec.tenon_escrowed,
                    "entra_attempts": rec.entra.attempts,
                });
                if rec.tenon_conflict {
                    entry["tenon_escrow_conflict"] = json!(true);
                }
                let entra = match entra_progress(self.entra_joined, rec.entra.as_core(), self.entra_max_attempts, now) {
                    EntraProgress::NotJoined => json!("not_joined"),
                    EntraProgress::Escrowed => json!("escrowed"),
                    EntraProgress::Due { .. } => json!("pending"),
                    EntraProgress::Waiting { next_at, .. } => {
                        entry["entra_next_attempt_at"] = json!(next_at);
                        json!("pending")
                    }
                    EntraProgress::Failed { .. } => json!("failed"),
                };
                entry["entra"] = entra;
                if let Some(err) = rec.entra.last_error.filter(|_| rec.entra.escrowed_at.is_none()) {
                    entry["entra_last_error"] = json!(err);
                }
                entry
            })
            .collect();
        let percent = if vol.encryption == VolumeEncryption::Encrypted { 100 } else { vol.percent_encrypted.min(100) };
        let mut st = PolicyStatus::new(state.name())
            .with("mount", vol.mount.clone())
            .with("encryption", encryption_name(vol.encryption))
            .with("percent", percent)
            .with("protectors", protectors)
            .with("entra_joined", self.entra_joined)
            .with("entra_max_attempts", self.entra_max_attempts);
        if let Some(reason) = reason {
            st = st.with_reason(reason);
        }
        if !self.entra_joined {
            st = st.with("warning", NOT_IN_ENTRA);
        }
        let rotating: Vec<&String> = self.state.rotations.keys().collect();
        if !rotating.is_empty() {
            st = st.with("rotations_pending", json!(rotating));
        }
        let conflicts: Vec<&String> = vol
            .protectors
            .iter()
            .map(|p| &p.id)
            .filter(|id| self.state.protectors.get(*id).is_some_and(|r| r.tenon_conflict))
            .collect();
        if !conflicts.is_empty() {
            st = st.with(
                "escrow_warning",
                format!(
                    "the Tenon server holds more than one different recovery password for protector {}; a protector's \
                     password never changes, so one was not uploaded by this volume: check `tenonctl recovery-keys show` \
                     and the audit log",
                    conflicts.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                ),
            );
            st = st.with("escrow_conflicts", json!(conflicts));
        }
        if !self.done.is_empty() {
            st = st.with("actions", self.done);
        }
        if !self.errors.is_empty() {
            st = st.with("errors", self.errors);
        }
        st
    }
}

#[cfg(test)]
mod tests;
