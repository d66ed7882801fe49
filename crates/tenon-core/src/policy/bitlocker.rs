//! BitLocker policy decisions: whether to enforce encryption on this device ([`decide`]), the next
//! steps towards an encrypted OS volume whose recovery keys are escrowed ([`plan_steps`]), and the
//! state reported for it ([`summarize`]). Pure: the agent gathers the facts and executes the steps.
//!
//! The mandated order (DESIGN.md section 3): `PreventDeviceEncryption`=0 -> recovery-password
//! protector -> escrow (Tenon always, Entra ID when joined) -> TPM protector -> `Encrypt`
//! (XTS-AES-256, used space only) -> track progress. The planner lists only the steps whose
//! preconditions hold in the facts it is given; the agent executes the first, gathers the facts
//! again and plans again, so a step that did not happen is never assumed to have happened.

use crate::policy::escrow::next_attempt_at;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

/// Machine setting that turns the policy on (`true`).
pub const SETTING_ENABLED: &str = "Policies.RequireSecurityFeatures.BitlockerEnabled";
/// Machine setting: Entra escrow attempts per key before the rollout is marked failed.
pub const SETTING_ENTRA_MAX_ATTEMPTS: &str = "Policies.RequireSecurityFeatures.EntraEscrowMaxAttempts";
/// Machine environment variable that allows enforcement on a virtual machine when it is exactly `1`.
pub const VM_DETECTION_OVERRIDE_ENV: &str = "RjDisableVmDetection";
/// Registry key and value that stop Windows' automatic device encryption from taking over the
/// volume (its recovery key would be escrowed somewhere Tenon does not control).
pub const BITLOCKER_CONTROL_KEY: &str = r"HKLM\SYSTEM\CurrentControlSet\Control\BitLocker";
pub const PREVENT_DEVICE_ENCRYPTION: &str = "PreventDeviceEncryption";

/// Whether the setting turns enforcement on: only the JSON value `true` does.
pub fn setting_enabled(value: Option<&Value>) -> bool {
    matches!(value, Some(Value::Bool(true)))
}

/// Whether `Win32_ComputerSystem`'s manufacturer and model describe a virtual machine. Only the
/// virtual hardware counts: a physical machine running a hypervisor (a Surface with Hyper-V on,
/// reported as "Microsoft Corporation"/"Surface Pro 7") is not a VM.
pub fn is_virtual_machine(manufacturer: &str, model: &str) -> bool {
    let maker = manufacturer.trim().to_ascii_lowercase();
    let model = model.trim().to_ascii_lowercase();
    maker.contains("vmware")
        || model.contains("vmware")
        || maker == "xen"
        || model.contains("hvm domu")
        || maker.contains("qemu")
        || maker.contains("innotek")
        || model.contains("virtualbox")
        || maker.contains("parallels")
        || maker.starts_with("red hat")
        // Hyper-V guests: the manufacturer alone also covers Surface hardware, so the model decides.
        || (maker.starts_with("microsoft") && model.contains("virtual machine"))
}

/// What `Win32_Tpm` says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TpmFacts {
    Ready,
    /// Present but not ready (not owned, disabled, or lacking provisioning).
    NotReady,
    /// No TPM in the machine.
    Absent,
    /// The TPM provider could not be asked (such as under Wine).
    Unavailable,
}

impl TpmFacts {
    pub fn from_state(present: bool, ready: bool) -> Self {
        match (present, ready) {
            (true, true) => Self::Ready,
            (true, false) => Self::NotReady,
            (false, _) => Self::Absent,
        }
    }
}

/// The device facts the decision needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitlockerInput {
    /// [`SETTING_ENABLED`] of the machine config, through [`setting_enabled`].
    pub enabled: bool,
    pub tpm: TpmFacts,
    pub manufacturer: String,
    pub model: String,
    /// The machine environment variable [`VM_DETECTION_OVERRIDE_ENV`], if set.
    pub vm_detection_override: Option<String>,
    pub multi_session: bool,
    /// Whether the BitLocker provider reports an OS volume.
    pub os_volume: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SkipReason {
    TpmNotReady,
    TpmUnavailable,
    VirtualMachine,
    MultiSession,
    NoOsVolume,
}

impl SkipReason {
    /// The stable code reported as the status `reason`.
    pub fn code(self) -> &'static str {
        match self {
            Self::TpmNotReady => "tpm_not_ready",
            Self::TpmUnavailable => "tpm_unavailable",
            Self::VirtualMachine => "virtual_machine",
            Self::MultiSession => "multi_session",
            Self::NoOsVolume => "no_os_volume",
        }
    }

    /// What it means and what to do, for a person reading the report.
    pub fn message(self) -> &'static str {
        match self {
            Self::TpmNotReady => {
                "the TPM is present but not ready; initialise it in the firmware or with Initialize-Tpm"
            }
            Self::TpmUnavailable => "no usable TPM was found (absent, or its provider is unavailable)",
            Self::VirtualMachine => {
                "this is a virtual machine; set the machine environment variable RjDisableVmDetection=1 to enforce here"
            }
            Self::MultiSession => "multi-session hosts are never encrypted by this policy",
            Self::NoOsVolume => "the BitLocker provider reports no OS volume",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The setting is off: Tenon does nothing with BitLocker.
    NotApplicable,
    Skip(SkipReason),
    Enforce,
}

/// Whether to enforce BitLocker. The checks run from the most to the least deliberate reason, so
/// a VM without a virtual TPM reports "virtual machine", not "no TPM".
pub fn decide(input: &BitlockerInput) -> Decision {
    if !input.enabled {
        return Decision::NotApplicable;
    }
    if input.multi_session {
        return Decision::Skip(SkipReason::MultiSession);
    }
    let vm_allowed = input.vm_detection_override.as_deref() == Some("1");
    if !vm_allowed && is_virtual_machine(&input.manufacturer, &input.model) {
        return Decision::Skip(SkipReason::VirtualMachine);
    }
    match input.tpm {
        TpmFacts::Ready => {}
        TpmFacts::NotReady => return Decision::Skip(SkipReason::TpmNotReady),
        TpmFacts::Absent | TpmFacts::Unavailable => return Decision::Skip(SkipReason::TpmUnavailable),
    }
    if !input.os_volume {
        return Decision::Skip(SkipReason::NoOsVolume);
    }
    Decision::Enforce
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encryption {
    None,
    Encrypting,
    Encrypted,
    Decrypting,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProtectorKind {
    RecoveryPassword,
    /// Any TPM-based protector (TPM, TPM+PIN, TPM+startup key).
    Tpm,
    Other,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProtectorFacts {
    pub id: String,
    pub kind: ProtectorKind,
}

/// The OS volume as the BitLocker provider reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeFacts {
    pub mount: String,
    pub encryption: Encryption,
    pub percent: u8,
    pub protectors: Vec<ProtectorFacts>,
}

impl VolumeFacts {
    fn has(&self, id: &str, kind: ProtectorKind) -> bool {
        self.protectors.iter().any(|p| p.id == id && p.kind == kind)
    }

    fn recovery_passwords(&self) -> impl Iterator<Item = &ProtectorFacts> {
        self.protectors.iter().filter(|p| p.kind == ProtectorKind::RecoveryPassword)
    }
}

/// Entra ID escrow of one recovery password, as the agent's persisted queue remembers it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EntraEscrow {
    #[default]
    NotTried,
    /// `attempts` attempts failed (or were interrupted), the last at `last_attempt_at`.
    Retrying {
        attempts: u32,
        last_attempt_at: i64,
    },
    Escrowed,
}

/// Where one recovery password is escrowed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProtectorEscrow {
    /// The Tenon server acknowledged durable storage (a receipt).
    pub tenon: bool,
    pub entra: EntraEscrow,
}

/// Where Entra escrow of one key stands at a moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntraProgress {
    NotJoined,
    Escrowed,
    /// An attempt is due now.
    Due {
        attempts: u32,
    },
    /// The next attempt is due at `next_at`.
    Waiting {
        attempts: u32,
        next_at: i64,
    },
    /// `attempts` reached the configured maximum: the rollout failed for this key.
    Failed {
        attempts: u32,
    },
}

/// Entra escrow progress of a key. "Failed" is computed from the count, not stored, so raising
/// [`SETTING_ENTRA_MAX_ATTEMPTS`] re-arms a failed key.
pub fn entra_progress(joined: bool, escrow: EntraEscrow, max_attempts: u32, now: i64) -> EntraProgress {
    match escrow {
        _ if !joined => EntraProgress::NotJoined,
        EntraEscrow::Escrowed => EntraProgress::Escrowed,
        EntraEscrow::NotTried => EntraProgress::Due { attempts: 0 },
        EntraEscrow::Retrying { attempts, .. } if attempts >= max_attempts => EntraProgress::Failed { attempts },
        EntraEscrow::Retrying { attempts, last_attempt_at } => {
            let next_at = next_attempt_at(attempts, last_attempt_at);
            if next_at <= now {
                EntraProgress::Due { attempts }
            } else {
                EntraProgress::Waiting { attempts, next_at }
            }
        }
    }
}

/// Everything the step planner looks at.
#[derive(Clone, Debug)]
pub struct PlanInput<'a> {
    pub volume: &'a VolumeFacts,
    /// The current `PreventDeviceEncryption` DWORD, if the value exists and is a DWORD.
    pub prevent_device_encryption: Option<u32>,
    /// Escrow state by protector id; a protector missing here is escrowed nowhere.
    pub escrow: &'a BTreeMap<String, ProtectorEscrow>,
    pub entra_joined: bool,
    pub entra_max_attempts: u32,
    /// Recovery protectors to retire until the server has heard they are gone: rotations the
    /// server asked for (an administrator read the key) and Tenon's own surplus keys.
    pub retirements: &'a BTreeSet<String>,
    /// Recovery protectors Tenon itself added (its record of them); only these are ever removed
    /// without a retirement request.
    pub tenon_added: &'a BTreeSet<String>,
    pub now: i64,
}

impl PlanInput<'_> {
    fn escrow_of(&self, id: &str) -> ProtectorEscrow {
        self.escrow.get(id).copied().unwrap_or_default()
    }

    fn tenon_escrowed(&self, id: &str) -> bool {
        self.escrow_of(id).tenon
    }

    /// A recovery password on the volume that is to be retired.
    fn retiring(&self, id: &str) -> bool {
        self.retirements.contains(id) && self.volume.has(id, ProtectorKind::RecoveryPassword)
    }

    /// Recovery passwords on the volume that are not being retired.
    fn staying(&self) -> impl Iterator<Item = &ProtectorFacts> {
        self.volume.recovery_passwords().filter(|p| !self.retiring(&p.id))
    }

    /// The recovery password the volume keeps: one that stays and is in the Tenon escrow, one
    /// Tenon added before a person's own (which stays anyway: Tenon never removes those unasked),
    /// then by id so every run picks the same one. Nothing is ever removed while there is none.
    pub fn keeper(&self) -> Option<&str> {
        self.staying()
            .filter(|p| self.tenon_escrowed(&p.id))
            .min_by_key(|p| (!self.tenon_added.contains(&p.id), &p.id))
            .map(|p| p.id.as_str())
    }

    /// A key Tenon added that is neither the keeper nor being retired: left over by an
    /// interrupted run, it is removed once the keeper is escrowed.
    fn surplus(&self, id: &str) -> bool {
        self.tenon_added.contains(id)
            && !self.retiring(id)
            && self.keeper().is_some_and(|k| k != id)
            && self.volume.has(id, ProtectorKind::RecoveryPassword)
    }

    /// A key that is on its way out (retired or surplus) once a keeper exists.
    fn leaving(&self, id: &str) -> bool {
        self.surplus(id) || (self.retiring(id) && self.keeper().is_some())
    }

    /// There is a recovery password, and every one not on its way out is in the Tenon escrow
    /// (while a rotation waits for its replacement, the retiring key still counts).
    fn escrow_complete(&self) -> bool {
        let mut rps = self.volume.recovery_passwords().filter(|p| !self.leaving(&p.id)).peekable();
        rps.peek().is_some() && rps.all(|p| self.tenon_escrowed(&p.id))
    }

    /// A keeper exists and every recovery password that stays is in the Tenon escrow: the
    /// precondition for the TPM protector and for encrypting.
    fn recovery_secured(&self) -> bool {
        self.keeper().is_some() && self.staying().filter(|p| !self.surplus(&p.id)).all(|p| self.tenon_escrowed(&p.id))
    }
}

/// One thing for the agent to do.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Step {
    /// Write REG_DWORD [`PREVENT_DEVICE_ENCRYPTION`] = 0 under [`BITLOCKER_CONTROL_KEY`].
    SetPreventDeviceEncryption,
    /// Add a recovery-password protector; `replaces` names a protector it rotates out.
    AddRecoveryPassword {
        replaces: Option<String>,
    },
    EscrowToTenon {
        protector_id: String,
    },
    EscrowToEntra {
        protector_id: String,
    },
    /// Remove a retiring or surplus recovery password; the keeper is in the Tenon escrow.
    DeleteProtector {
        protector_id: String,
    },
    /// Tell the Tenon server that a protector to retire is gone from the volume, and which key
    /// stays (the server completes the rotation only then).
    ReportRetired {
        protector_id: String,
        replaced_by: Option<String>,
    },
    AddTpmProtector,
    /// XTS-AES-256, used space only.
    Encrypt,
}

impl Step {
    /// A short name for logs and reports (protector ids are not secret; passwords never appear).
    pub fn describe(&self) -> String {
        match self {
            Self::SetPreventDeviceEncryption => "set PreventDeviceEncryption=0".into(),
            Self::AddRecoveryPassword { replaces: None } => "add recovery password".into(),
            Self::AddRecoveryPassword { replaces: Some(old) } => format!("add recovery password replacing {old}"),
            Self::EscrowToTenon { protector_id } => format!("escrow {protector_id} to Tenon"),
            Self::EscrowToEntra { protector_id } => format!("escrow {protector_id} to Entra ID"),
            Self::DeleteProtector { protector_id } => format!("delete rotated protector {protector_id}"),
            Self::ReportRetired { protector_id, .. } => format!("report {protector_id} retired to Tenon"),
            Self::AddTpmProtector => "add TPM protector".into(),
            Self::Encrypt => "encrypt (XTS-AES-256, used space)".into(),
        }
    }
}

/// The steps whose preconditions hold now, in the mandated order. Nothing here ever decrypts or
/// removes a TPM protector; the only removals are recovery passwords being retired (or surplus
/// ones Tenon added) while a keeper the Tenon server acknowledged stays on the volume.
///
/// Rotation is a state machine the facts drive, so it resumes from any step after a crash:
/// requested -> replacement added -> replacement escrowed (receipt) -> old protector deleted ->
/// retirement reported. One replacement serves every key being retired at the same time.
pub fn plan_steps(input: &PlanInput<'_>) -> Vec<Step> {
    let vol = input.volume;
    let mut steps = Vec::new();
    if input.prevent_device_encryption != Some(0) {
        steps.push(Step::SetPreventDeviceEncryption);
    }
    // A volume being decrypted by someone else is left alone: adding protectors or encrypting
    // would fight an administrator's deliberate action; the status asks a person to look.
    if vol.encryption == Encryption::Decrypting {
        return steps;
    }

    // 1. A recovery password that stays: one if there is none (a fresh volume, or every key on it
    //    is being retired).
    if input.staying().next().is_none() {
        let replaces = vol.recovery_passwords().find(|p| input.retiring(&p.id)).map(|p| p.id.clone());
        steps.push(Step::AddRecoveryPassword { replaces });
    }

    // 2. Escrow, Tenon first: it is the escrow Tenon answers for. Entra when joined and due. A key
    //    on its way out is not worth another copy.
    for p in vol.recovery_passwords() {
        if !input.tenon_escrowed(&p.id) && !input.leaving(&p.id) {
            steps.push(Step::EscrowToTenon { protector_id: p.id.clone() });
        }
    }
    for p in vol.recovery_passwords() {
        let progress =
            entra_progress(input.entra_joined, input.escrow_of(&p.id).entra, input.entra_max_attempts, input.now);
        if matches!(progress, EntraProgress::Due { .. }) && !input.retiring(&p.id) && !input.surplus(&p.id) {
            steps.push(Step::EscrowToEntra { protector_id: p.id.clone() });
        }
    }

    // 3. Retire keys once the keeper is safely in the Tenon escrow, then tell the server.
    let keeper = input.keeper();
    if keeper.is_some() {
        for p in vol.recovery_passwords() {
            if input.leaving(&p.id) {
                steps.push(Step::DeleteProtector { protector_id: p.id.clone() });
            }
        }
    }
    for id in input.retirements {
        if !vol.has(id, ProtectorKind::RecoveryPassword) {
            steps.push(Step::ReportRetired { protector_id: id.clone(), replaced_by: keeper.map(str::to_string) });
        }
    }

    // 4. TPM protector and encryption only once every recovery password that stays is escrowed
    //    to Tenon: a volume must never become locked behind a key nobody holds.
    if input.recovery_secured() {
        let has_tpm = vol.protectors.iter().any(|p| p.kind == ProtectorKind::Tpm);
        if !has_tpm {
            steps.push(Step::AddTpmProtector);
        } else if vol.encryption == Encryption::None {
            steps.push(Step::Encrypt);
        }
    }
    steps
}

/// The reported state of the policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    NotApplicable,
    Skipped(SkipReason),
    Enforcing { percent: u8 },
    Encrypted,
    EscrowPending,
    EscrowFailed,
    ActionRequired,
}

impl State {
    /// The `state` string of the status.
    pub fn name(self) -> &'static str {
        match self {
            Self::NotApplicable => "not_applicable",
            Self::Skipped(_) => "skipped",
            Self::Enforcing { .. } => "enforcing",
            Self::Encrypted => "encrypted",
            Self::EscrowPending => "escrow_pending",
            Self::EscrowFailed => "escrow_failed",
            Self::ActionRequired => "action_required",
        }
    }
}

/// The state after a run, with its reason code. `step_failed` says a platform step other than an
/// escrow failed this run (which needs a person more than any escrow question does).
///
/// Precedence, most urgent first: action required, Tenon escrow pending, Entra escrow failed, Entra
/// escrow pending, enforcing, encrypted; the details carry the rest (percent, per-key escrow).
pub fn summarize(input: &PlanInput<'_>, step_failed: bool) -> (State, Option<&'static str>) {
    let vol = input.volume;
    if step_failed {
        return (State::ActionRequired, Some("step_failed"));
    }
    if vol.encryption == Encryption::Decrypting {
        return (State::ActionRequired, Some("volume_decrypting"));
    }
    if !input.escrow_complete() {
        return (State::EscrowPending, Some("tenon_escrow_pending"));
    }
    let entra: Vec<EntraProgress> = vol
        .recovery_passwords()
        .filter(|p| !input.retiring(&p.id) && !input.surplus(&p.id))
        .map(|p| entra_progress(input.entra_joined, input.escrow_of(&p.id).entra, input.entra_max_attempts, input.now))
        .collect();
    if entra.iter().any(|e| matches!(e, EntraProgress::Failed { .. })) {
        return (State::EscrowFailed, Some("entra_escrow_failed"));
    }
    if entra.iter().any(|e| matches!(e, EntraProgress::Due { .. } | EntraProgress::Waiting { .. })) {
        return (State::EscrowPending, Some("entra_escrow_pending"));
    }
    let done = vol.encryption == Encryption::Encrypted && plan_steps(input).is_empty();
    if done {
        (State::Encrypted, None)
    } else {
        let percent = if vol.encryption == Encryption::Encrypted { 100 } else { vol.percent.min(100) };
        (State::Enforcing { percent }, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn input() -> BitlockerInput {
        BitlockerInput {
            enabled: true,
            tpm: TpmFacts::Ready,
            manufacturer: "Dell Inc.".into(),
            model: "Latitude 7440".into(),
            vm_detection_override: None,
            multi_session: false,
            os_volume: true,
        }
    }

    #[test]
    fn setting() {
        let check = |v: Option<Value>, expected: bool| assert_eq!(setting_enabled(v.as_ref()), expected, "{v:?}");
        check(None, false);
        check(Some(json!(true)), true);
        check(Some(json!(false)), false);
        check(Some(json!("true")), false);
        check(Some(json!(1)), false);
        check(Some(Value::Null), false);
    }

    #[test]
    fn vm_detection() {
        let check = |maker: &str, model: &str, expected: bool| {
            assert_eq!(is_virtual_machine(maker, model), expected, "{maker} / {model}")
        };
        check("VMware, Inc.", "VMware Virtual Platform", true);
        check("VMware, Inc.", "VMware7,1", true);
        check("Xen", "HVM domU", true);
        check("QEMU", "Standard PC (Q35 + ICH9, 2009)", true);
        check("innotek GmbH", "VirtualBox", true);
        check("Oracle Corporation", "VirtualBox", true);
        check("Parallels Software International Inc.", "Parallels Virtual Platform", true);
        check("Parallels International GmbH.", "Parallels ARM Virtual Machine", true);
        check("Red Hat", "KVM", true);
        check("Microsoft Corporation", "Virtual Machine", true);
        check("microsoft corporation", "VIRTUAL MACHINE", true);
        // Physical hardware, also with a hypervisor running on it.
        check("Microsoft Corporation", "Surface Pro 7", false);
        check("Microsoft Corporation", "Surface Laptop Studio", false);
        check("Dell Inc.", "Latitude 7440", false);
        check("LENOVO", "20XW004GGE", false);
        check("HP", "HP EliteBook 840 G8 Notebook PC", false);
        check("", "", false);
    }

    /// The decision table of the issue.
    #[test]
    fn decision_table() {
        let check = |f: &dyn Fn(&mut BitlockerInput), expected: Decision| {
            let mut i = input();
            f(&mut i);
            assert_eq!(decide(&i), expected, "{i:?}");
        };
        use Decision::*;
        use SkipReason::*;
        check(&|_| {}, Enforce);
        check(&|i| i.enabled = false, NotApplicable);
        // Off wins over every skip reason: nothing to report but "not applicable".
        check(
            &|i| {
                i.enabled = false;
                i.multi_session = true;
                i.tpm = TpmFacts::Unavailable;
            },
            NotApplicable,
        );
        check(&|i| i.tpm = TpmFacts::NotReady, Skip(TpmNotReady));
        check(&|i| i.tpm = TpmFacts::Absent, Skip(TpmUnavailable));
        check(&|i| i.tpm = TpmFacts::Unavailable, Skip(TpmUnavailable));
        check(&|i| i.multi_session = true, Skip(MultiSession));
        check(&|i| i.os_volume = false, Skip(NoOsVolume));
        // Virtual machines: only with RjDisableVmDetection exactly "1".
        let vm = |i: &mut BitlockerInput| {
            i.manufacturer = "VMware, Inc.".into();
            i.model = "VMware Virtual Platform".into();
        };
        check(&vm, Skip(VirtualMachine));
        check(
            &|i| {
                vm(i);
                i.vm_detection_override = Some("1".into());
            },
            Enforce,
        );
        for other in ["0", "true", " 1", "1 ", "yes", ""] {
            check(
                &|i| {
                    vm(i);
                    i.vm_detection_override = Some(other.into());
                },
                Skip(VirtualMachine),
            );
        }
        // A VM allowed by the variable still needs a ready (virtual) TPM.
        check(
            &|i| {
                vm(i);
                i.vm_detection_override = Some("1".into());
                i.tpm = TpmFacts::Absent;
            },
            Skip(TpmUnavailable),
        );
        // The variable does not matter on physical hardware.
        check(&|i| i.vm_detection_override = Some("0".into()), Enforce);
        // Hyper-V on a Surface is not a VM.
        check(
            &|i| {
                i.manufacturer = "Microsoft Corporation".into();
                i.model = "Surface Pro 9".into();
            },
            Enforce,
        );
        // Precedence: multi-session > VM > TPM > volume.
        check(
            &|i| {
                i.multi_session = true;
                vm(i);
                i.tpm = TpmFacts::NotReady;
            },
            Skip(MultiSession),
        );
        check(
            &|i| {
                vm(i);
                i.tpm = TpmFacts::Absent;
            },
            Skip(VirtualMachine),
        );
        check(
            &|i| {
                i.tpm = TpmFacts::NotReady;
                i.os_volume = false;
            },
            Skip(TpmNotReady),
        );
    }

    #[test]
    fn tpm_facts() {
        assert_eq!(TpmFacts::from_state(true, true), TpmFacts::Ready);
        assert_eq!(TpmFacts::from_state(true, false), TpmFacts::NotReady);
        assert_eq!(TpmFacts::from_state(false, false), TpmFacts::Absent);
        assert_eq!(TpmFacts::from_state(false, true), TpmFacts::Absent);
    }

    /// A compact description of a planning situation.
    struct Case {
        encryption: Encryption,
        percent: u8,
        /// `(id, kind)`: kind `r` recovery password, `t` TPM, `o` other.
        protectors: &'static [(&'static str, char)],
        prevent: Option<u32>,
        /// `(id, tenon escrowed, entra)`.
        escrow: Vec<(&'static str, bool, EntraEscrow)>,
        joined: bool,
        /// Protectors to retire.
        rotations: &'static [&'static str],
        /// Protectors Tenon added.
        tenon: &'static [&'static str],
        now: i64,
    }

    fn case() -> Case {
        Case {
            encryption: Encryption::None,
            percent: 0,
            protectors: &[],
            prevent: Some(0),
            escrow: vec![],
            joined: false,
            rotations: &[],
            tenon: &[],
            now: 10_000,
        }
    }

    fn with_input<T>(c: &Case, f: impl FnOnce(&PlanInput<'_>) -> T) -> T {
        let volume = VolumeFacts {
            mount: "C:".into(),
            encryption: c.encryption,
            percent: c.percent,
            protectors: c
                .protectors
                .iter()
                .map(|(id, k)| ProtectorFacts {
                    id: id.to_string(),
                    kind: match k {
                        'r' => ProtectorKind::RecoveryPassword,
                        't' => ProtectorKind::Tpm,
                        _ => ProtectorKind::Other,
                    },
                })
                .collect(),
        };
        let escrow = c
            .escrow
            .iter()
            .map(|(id, tenon, entra)| (id.to_string(), ProtectorEscrow { tenon: *tenon, entra: *entra }))
            .collect();
        let retirements = c.rotations.iter().map(|o| o.to_string()).collect();
        let tenon_added = c.tenon.iter().map(|o| o.to_string()).collect();
        let input = PlanInput {
            volume: &volume,
            prevent_device_encryption: c.prevent,
            escrow: &escrow,
            entra_joined: c.joined,
            entra_max_attempts: 3,
            retirements: &retirements,
            tenon_added: &tenon_added,
            now: c.now,
        };
        f(&input)
    }

    fn add(replaces: Option<&str>) -> Step {
        Step::AddRecoveryPassword { replaces: replaces.map(str::to_string) }
    }
    fn tenon(id: &str) -> Step {
        Step::EscrowToTenon { protector_id: id.into() }
    }
    fn entra(id: &str) -> Step {
        Step::EscrowToEntra { protector_id: id.into() }
    }
    fn delete(id: &str) -> Step {
        Step::DeleteProtector { protector_id: id.into() }
    }
    fn retired(id: &str, by: Option<&str>) -> Step {
        Step::ReportRetired { protector_id: id.into(), replaced_by: by.map(str::to_string) }
    }

    fn retrying(attempts: u32, last_attempt_at: i64) -> EntraEscrow {
        EntraEscrow::Retrying { attempts, last_attempt_at }
    }

    #[test]
    fn step_table() {
        let check = |c: Case, expected: Vec<Step>| {
            let got = with_input(&c, plan_steps);
            assert_eq!(got, expected, "protectors {:?} escrow {:?}", c.protectors, c.escrow);
        };
        use EntraEscrow::*;
        use Step::*;
        // A fresh machine: the registry value first, then a recovery password.
        check(Case { prevent: None, ..case() }, vec![SetPreventDeviceEncryption, add(None)]);
        check(Case { prevent: Some(1), ..case() }, vec![SetPreventDeviceEncryption, add(None)]);
        check(case(), vec![add(None)]);
        // The new password goes to Tenon before anything else happens to the volume.
        check(Case { protectors: &[("p1", 'r')], ..case() }, vec![tenon("p1")]);
        // ...and to Entra as well when the device is joined, Tenon first.
        check(Case { protectors: &[("p1", 'r')], joined: true, ..case() }, vec![tenon("p1"), entra("p1")]);
        // Escrowed to Tenon: TPM protector next, then encryption.
        check(
            Case { protectors: &[("p1", 'r')], escrow: vec![("p1", true, NotTried)], ..case() },
            vec![Step::AddTpmProtector],
        );
        check(
            Case { protectors: &[("p1", 'r'), ("t1", 't')], escrow: vec![("p1", true, NotTried)], ..case() },
            vec![Encrypt],
        );
        // A pending Entra escrow does not hold encryption back (the Tenon escrow has the key).
        check(
            Case {
                protectors: &[("p1", 'r'), ("t1", 't')],
                escrow: vec![("p1", true, retrying(1, 9_900))],
                joined: true,
                ..case()
            },
            vec![Encrypt],
        );
        // Entra retry due (backoff of 300 s after 1 failure has passed) and not yet due.
        check(
            Case {
                protectors: &[("p1", 'r'), ("t1", 't')],
                escrow: vec![("p1", true, retrying(1, 9_700))],
                joined: true,
                encryption: Encryption::Encrypting,
                ..case()
            },
            vec![entra("p1")],
        );
        check(
            Case {
                protectors: &[("p1", 'r'), ("t1", 't')],
                escrow: vec![("p1", true, retrying(1, 9_701))],
                joined: true,
                encryption: Encryption::Encrypting,
                ..case()
            },
            vec![],
        );
        // Entra given up after the maximum attempts: no further attempt.
        check(
            Case {
                protectors: &[("p1", 'r'), ("t1", 't')],
                escrow: vec![("p1", true, retrying(3, 0))],
                joined: true,
                encryption: Encryption::Encrypted,
                ..case()
            },
            vec![],
        );
        // Not joined: Entra is never attempted.
        check(
            Case { protectors: &[("p1", 'r'), ("t1", 't')], escrow: vec![("p1", true, NotTried)], ..case() },
            vec![Encrypt],
        );
        // Tenon escrow missing: no TPM protector, no encryption (a key nobody holds).
        check(Case { protectors: &[("p1", 'r'), ("t1", 't')], ..case() }, vec![tenon("p1")]);
        // Encrypting: only tracking.
        check(
            Case {
                protectors: &[("p1", 'r'), ("t1", 't')],
                escrow: vec![("p1", true, NotTried)],
                encryption: Encryption::Encrypting,
                percent: 40,
                ..case()
            },
            vec![],
        );
        // Already encrypted: never Encrypt again, never decrypt; just ensure protectors and escrow.
        check(
            Case { protectors: &[("t1", 't')], encryption: Encryption::Encrypted, prevent: None, ..case() },
            vec![SetPreventDeviceEncryption, add(None)],
        );
        check(
            Case { protectors: &[("user", 'r'), ("t1", 't')], encryption: Encryption::Encrypted, ..case() },
            vec![tenon("user")],
        );
        check(
            Case {
                protectors: &[("p1", 'r')],
                escrow: vec![("p1", true, NotTried)],
                encryption: Encryption::Encrypted,
                ..case()
            },
            vec![Step::AddTpmProtector],
        );
        check(
            Case {
                protectors: &[("p1", 'r'), ("t1", 't')],
                escrow: vec![("p1", true, NotTried)],
                encryption: Encryption::Encrypted,
                ..case()
            },
            vec![],
        );
        // Every recovery password is escrowed, also ones Tenon did not create; other kinds are left be.
        check(
            Case {
                protectors: &[("p1", 'r'), ("p2", 'r'), ("k", 'o'), ("t1", 't')],
                escrow: vec![("p1", true, NotTried)],
                encryption: Encryption::Encrypted,
                ..case()
            },
            vec![tenon("p2")],
        );
        // Decrypting (someone else's doing): hands off, only the registry value.
        check(
            Case { protectors: &[("t1", 't')], encryption: Encryption::Decrypting, prevent: None, ..case() },
            vec![SetPreventDeviceEncryption],
        );
        // Rotation: add the replacement, escrow it, delete the old one, then tell the server.
        let enc = || Case {
            protectors: &[("old", 'r'), ("t1", 't')],
            escrow: vec![("old", true, Escrowed)],
            encryption: Encryption::Encrypted,
            joined: true,
            tenon: &["old"],
            ..case()
        };
        check(Case { rotations: &["old"], ..enc() }, vec![add(Some("old"))]);
        let both: &[(&str, char)] = &[("old", 'r'), ("new", 'r'), ("t1", 't')];
        check(
            Case { protectors: both, rotations: &["old"], tenon: &["old", "new"], ..enc() },
            vec![tenon("new"), entra("new")],
        );
        check(
            Case {
                protectors: both,
                escrow: vec![("old", true, Escrowed), ("new", true, NotTried)],
                rotations: &["old"],
                tenon: &["old", "new"],
                ..enc()
            },
            vec![entra("new"), delete("old")],
        );
        // Entra escrow of the new key is not waited for; Tenon's receipt is enough to retire the old.
        check(
            Case {
                protectors: both,
                escrow: vec![("old", true, Escrowed), ("new", true, retrying(1, 9_999))],
                rotations: &["old"],
                ..enc()
            },
            vec![delete("old")],
        );
        // A retiring key that never reached Entra is not sent there any more.
        check(
            Case {
                protectors: both,
                escrow: vec![("old", true, NotTried), ("new", true, Escrowed)],
                rotations: &["old"],
                ..enc()
            },
            vec![delete("old")],
        );
        // Old key gone: the server hears it, with the key that stays; only then is it done.
        check(
            Case {
                protectors: &[("new", 'r'), ("t1", 't')],
                escrow: vec![("new", true, Escrowed)],
                rotations: &["old"],
                ..enc()
            },
            vec![retired("old", Some("new"))],
        );
        // The replacement vanished (deleted by someone): add another.
        check(Case { rotations: &["old"], ..enc() }, vec![add(Some("old"))]);
        // Asked for a protector that is not (or no longer) a recovery password here: only reported.
        check(Case { rotations: &["gone"], ..enc() }, vec![retired("gone", Some("old"))]);
        check(Case { rotations: &["t1"], ..enc() }, vec![retired("t1", Some("old"))]);
        // Two keys read at once: one replacement retires both.
        let two: &[(&str, char)] = &[("a", 'r'), ("b", 'r'), ("t1", 't')];
        let two_escrowed = || vec![("a", true, Escrowed), ("b", true, Escrowed)];
        check(Case { protectors: two, escrow: two_escrowed(), rotations: &["a", "b"], ..enc() }, vec![add(Some("a"))]);
        check(
            Case {
                protectors: &[("a", 'r'), ("b", 'r'), ("n", 'r'), ("t1", 't')],
                escrow: vec![("a", true, Escrowed), ("b", true, Escrowed), ("n", true, Escrowed)],
                rotations: &["a", "b"],
                ..enc()
            },
            vec![delete("a"), delete("b")],
        );
        // Surplus keys Tenon added (an interrupted run) go once the keeper is escrowed, unescrowed
        // ones without a pointless upload; a person's own key is the keeper and is never removed.
        check(
            Case {
                protectors: &[("k", 'r'), ("x", 'r'), ("t1", 't')],
                escrow: vec![("k", true, Escrowed)],
                tenon: &["k", "x"],
                ..enc()
            },
            vec![delete("x")],
        );
        check(
            Case {
                protectors: &[("k", 'r'), ("x", 'r'), ("t1", 't')],
                escrow: vec![("k", true, Escrowed), ("x", true, Escrowed)],
                tenon: &["k", "x"],
                ..enc()
            },
            vec![delete("x")],
        );
        check(
            Case {
                protectors: &[("user", 'r'), ("a", 'r'), ("b", 'r'), ("t1", 't')],
                escrow: vec![("user", true, Escrowed), ("a", true, Escrowed), ("b", true, Escrowed)],
                tenon: &["a", "b"],
                ..enc()
            },
            vec![delete("b")],
        );
        // Two unescrowed keys, none escrowed yet: escrow first; nothing is removed without a keeper.
        check(
            Case { protectors: &[("k", 'r'), ("x", 'r'), ("t1", 't')], escrow: vec![], tenon: &["k", "x"], ..enc() },
            vec![tenon("k"), tenon("x"), entra("k"), entra("x")],
        );
        // Keys that are not Tenon's and not asked for are kept and escrowed, never removed.
        check(
            Case {
                protectors: &[("k", 'r'), ("y", 'r'), ("z", 'r'), ("t1", 't')],
                escrow: vec![("k", true, Escrowed), ("y", true, Escrowed), ("z", true, Escrowed)],
                tenon: &["k"],
                ..enc()
            },
            vec![],
        );
        check(
            Case {
                protectors: &[("y", 'r'), ("z", 'r'), ("t1", 't')],
                escrow: vec![("y", true, Escrowed), ("z", true, Escrowed)],
                tenon: &[],
                ..enc()
            },
            vec![],
        );
    }

    #[test]
    fn entra_progress_table() {
        let check = |joined: bool, e: EntraEscrow, now: i64, expected: EntraProgress| {
            assert_eq!(entra_progress(joined, e, 3, now), expected, "{e:?} at {now}");
        };
        use EntraProgress::*;
        check(false, EntraEscrow::NotTried, 0, NotJoined);
        check(false, EntraEscrow::Escrowed, 0, NotJoined);
        check(true, EntraEscrow::NotTried, 0, Due { attempts: 0 });
        check(true, EntraEscrow::Escrowed, 0, Escrowed);
        check(true, retrying(1, 1000), 1299, Waiting { attempts: 1, next_at: 1300 });
        check(true, retrying(1, 1000), 1300, Due { attempts: 1 });
        check(true, retrying(2, 1000), 1300, Waiting { attempts: 2, next_at: 1600 });
        check(true, retrying(3, 1000), 99_999, Failed { attempts: 3 });
        check(true, retrying(4, 1000), 99_999, Failed { attempts: 4 });
    }

    #[test]
    fn status_table() {
        let check = |c: Case, step_failed: bool, expected: (State, Option<&str>)| {
            let got = with_input(&c, |i| summarize(i, step_failed));
            assert_eq!(got, expected, "protectors {:?} escrow {:?}", c.protectors, c.escrow);
        };
        use EntraEscrow::*;
        let ready = |encryption, percent| Case {
            protectors: &[("p1", 'r'), ("t1", 't')],
            escrow: vec![("p1", true, NotTried)],
            encryption,
            percent,
            ..case()
        };
        check(ready(Encryption::Encrypted, 100), false, (State::Encrypted, None));
        check(ready(Encryption::Encrypting, 40), false, (State::Enforcing { percent: 40 }, None));
        check(ready(Encryption::None, 0), false, (State::Enforcing { percent: 0 }, None));
        check(ready(Encryption::Encrypting, 40), true, (State::ActionRequired, Some("step_failed")));
        check(ready(Encryption::Decrypting, 40), false, (State::ActionRequired, Some("volume_decrypting")));
        check(case(), false, (State::EscrowPending, Some("tenon_escrow_pending")));
        check(
            Case { protectors: &[("p1", 'r')], ..case() },
            false,
            (State::EscrowPending, Some("tenon_escrow_pending")),
        );
        // Joined: Entra pending / failed / done.
        let joined = |entra| Case {
            protectors: &[("p1", 'r'), ("t1", 't')],
            escrow: vec![("p1", true, entra)],
            encryption: Encryption::Encrypted,
            joined: true,
            ..case()
        };
        check(joined(retrying(1, 9_999)), false, (State::EscrowPending, Some("entra_escrow_pending")));
        check(joined(NotTried), false, (State::EscrowPending, Some("entra_escrow_pending")));
        check(joined(retrying(3, 0)), false, (State::EscrowFailed, Some("entra_escrow_failed")));
        check(joined(Escrowed), false, (State::Encrypted, None));
        // An encrypted volume still missing its TPM protector is not "encrypted" yet.
        check(
            Case {
                protectors: &[("p1", 'r')],
                escrow: vec![("p1", true, NotTried)],
                encryption: Encryption::Encrypted,
                ..case()
            },
            false,
            (State::Enforcing { percent: 100 }, None),
        );
        // A pending rotation keeps it from "encrypted" until the old key is gone.
        check(
            Case {
                protectors: &[("old", 'r'), ("t1", 't')],
                escrow: vec![("old", true, NotTried)],
                encryption: Encryption::Encrypted,
                rotations: &["old"],
                ..case()
            },
            false,
            (State::Enforcing { percent: 100 }, None),
        );
    }
}
