//! The TPM and BitLocker through WMI (`Win32_Tpm`, `Win32_EncryptableVolume`), and the WMI
//! connection and error mapping the other WMI users share.

use super::ffi::os_err;
use crate::platform::{PResult, PlatformError, Protector, TpmState, Volume, VolumeEncryption};
use serde::Deserialize;

const TPM_NAMESPACE: &str = r"ROOT\CIMV2\Security\MicrosoftTpm";
const BITLOCKER_NAMESPACE: &str = r"ROOT\CIMV2\Security\MicrosoftVolumeEncryption";

pub(super) fn tpm() -> PResult<TpmState> {
    #[derive(Deserialize)]
    #[serde(rename = "Win32_Tpm")]
    struct Tpm {
        #[serde(rename = "__Path")]
        path: String,
    }
    #[derive(Deserialize)]
    struct IsReadyOut {
        #[serde(rename = "ReturnValue")]
        return_value: u32,
        #[serde(rename = "IsReady")]
        is_ready: Option<bool>,
    }
    let wmi = wmi_connect(TPM_NAMESPACE, "Win32_Tpm")?;
    let tpms: Vec<Tpm> = wmi.raw_query("SELECT __Path FROM Win32_Tpm").map_err(|e| wmi_err("Win32_Tpm", e))?;
    // The provider is there but the machine has no TPM (or it is disabled in firmware).
    let Some(tpm) = tpms.into_iter().next() else { return Ok(TpmState { present: false, ready: false }) };
    let out: IsReadyOut = wmi
        .exec_instance_method::<Tpm, IsReadyOut>(&tpm.path, "IsReady", ())
        .map_err(|e| wmi_err("Win32_Tpm.IsReady", e))?;
    if out.return_value != 0 {
        return Err(os_err("Win32_Tpm.IsReady", out.return_value));
    }
    Ok(TpmState { present: true, ready: out.is_ready.unwrap_or(false) })
}

pub(super) fn volumes() -> PResult<Vec<Volume>> {
    #[derive(Deserialize)]
    struct ConversionOut {
        #[serde(rename = "ReturnValue")]
        return_value: u32,
        #[serde(rename = "ConversionStatus")]
        conversion_status: Option<u32>,
        #[serde(rename = "EncryptionPercentage")]
        encryption_percentage: Option<u32>,
    }
    impl HasReturnValue for ConversionOut {
        fn return_value(&self) -> u32 {
            self.return_value
        }
    }
    let wmi = bitlocker_connect()?;
    let vols: Vec<EncryptableVolume> =
        wmi.raw_query("SELECT * FROM Win32_EncryptableVolume").map_err(|e| wmi_err("Win32_EncryptableVolume", e))?;
    let mut out = Vec::new();
    for v in vols {
        // Volumes without a drive letter (recovery partitions) are not Tenon's business.
        let Some(mount) = v.drive_letter.clone().filter(|d| !d.is_empty()) else { continue };
        let status: ConversionOut =
            volume_method(&wmi, &v, "GetConversionStatus", PrecisionIn { precision_factor: 0 })?;
        let encryption = match status.conversion_status.unwrap_or(0) {
            0 => VolumeEncryption::None,
            1 => VolumeEncryption::Encrypted,
            2 | 4 => VolumeEncryption::Encrypting,
            _ => VolumeEncryption::Decrypting,
        };
        let protectors = protectors(&wmi, &v)?;
        out.push(Volume {
            mount,
            encryption,
            percent_encrypted: status.encryption_percentage.unwrap_or(0).min(100) as u8,
            protectors,
            // VolumeType 0 is the operating-system volume.
            is_os_volume: v.volume_type == Some(0),
        });
    }
    Ok(out)
}

pub(super) fn add_recovery_password(mount: &str) -> PResult<(String, String)> {
    #[derive(serde::Serialize)]
    struct In {
        #[serde(rename = "FriendlyName")]
        friendly_name: &'static str,
    }
    let wmi = bitlocker_connect()?;
    let v = volume_by_mount(&wmi, mount)?;
    let added: ProtectorIdOut =
        volume_method(&wmi, &v, "ProtectKeyWithNumericalPassword", In { friendly_name: "Tenon" })?;
    let id = added.id()?;
    let pw: PasswordOut =
        volume_method(&wmi, &v, "GetKeyProtectorNumericalPassword", ProtectorIdIn { id: id.clone() })?;
    let password = pw.numerical_password.filter(|p| !p.is_empty()).ok_or(PlatformError::Invalid {
        what: "GetKeyProtectorNumericalPassword",
        detail: "returned no password".into(),
    })?;
    Ok((id, password))
}

pub(super) fn add_tpm_protector(mount: &str) -> PResult<String> {
    #[derive(serde::Serialize)]
    struct In {
        #[serde(rename = "FriendlyName")]
        friendly_name: &'static str,
    }
    let wmi = bitlocker_connect()?;
    let v = volume_by_mount(&wmi, mount)?;
    match volume_method::<_, ProtectorIdOut>(&wmi, &v, "ProtectKeyWithTPM", In { friendly_name: "Tenon" }) {
        Ok(added) => added.id(),
        // A TPM protector is already there (ours from an interrupted run, or the OS's own):
        // that is the state we want, so hand back its id.
        Err(e) if is_fve(&e, ::windows::Win32::Foundation::FVE_E_PROTECTOR_EXISTS) => {
            protectors(&wmi, &v)?.into_iter().find(|p| p.kind == "tpm").map(|p| p.id).ok_or(e)
        }
        Err(e) => Err(e),
    }
}

pub(super) fn delete_protector(mount: &str, protector_id: &str) -> PResult<()> {
    let wmi = bitlocker_connect()?;
    let v = volume_by_mount(&wmi, mount)?;
    match volume_method::<_, ReturnOnly>(&wmi, &v, "DeleteKeyProtector", ProtectorIdIn { id: protector_id.to_owned() })
    {
        // Already gone: deleting is idempotent.
        Err(e) if is_fve(&e, ::windows::Win32::Foundation::FVE_E_PROTECTOR_NOT_FOUND) => Ok(()),
        other => other.map(|_| ()),
    }
}

pub(super) fn encrypt(mount: &str) -> PResult<()> {
    #[derive(serde::Serialize)]
    struct In {
        /// 7 = XTS-AES-256.
        #[serde(rename = "EncryptionMethod")]
        method: u32,
        /// 1 = encrypt used space only: fast on new machines, and free space never held data.
        #[serde(rename = "EncryptionFlags")]
        flags: u32,
    }
    let wmi = bitlocker_connect()?;
    let v = volume_by_mount(&wmi, mount)?;
    match volume_method::<_, ReturnOnly>(&wmi, &v, "Encrypt", In { method: 7, flags: 1 }) {
        // Already encrypted or encrypting: nothing to start, and never a reason to decrypt.
        Err(e) if is_fve(&e, ::windows::Win32::Foundation::FVE_E_NOT_DECRYPTED) => Ok(()),
        other => other.map(|_| ()),
    }
}

pub(super) fn backup_to_entra(mount: &str, protector_id: &str) -> PResult<()> {
    let wmi = bitlocker_connect()?;
    let v = volume_by_mount(&wmi, mount)?;
    let _: ReturnOnly = volume_method(
        &wmi,
        &v,
        "BackupRecoveryInformationToCloudDomain",
        ProtectorIdIn { id: protector_id.to_owned() },
    )?;
    Ok(())
}

fn volume_by_mount(wmi: &wmi::WMIConnection, mount: &str) -> PResult<EncryptableVolume> {
    let letter = valid_mount(mount)?;
    let query =
        format!("SELECT * FROM Win32_EncryptableVolume WHERE DriveLetter = {}", wmi::quote_and_escape_wql_str(&letter));
    let mut rows: Vec<EncryptableVolume> = wmi.raw_query(&query).map_err(|e| wmi_err("BitLocker volumes", e))?;
    match rows.pop() {
        Some(v) => Ok(v),
        None => Err(PlatformError::Invalid { what: "BitLocker volume", detail: format!("no volume {letter}") }),
    }
}

fn volume_method<In: serde::Serialize, Out: serde::de::DeserializeOwned + HasReturnValue>(
    wmi: &wmi::WMIConnection,
    volume: &EncryptableVolume,
    method: &'static str,
    input: In,
) -> PResult<Out> {
    let out: Out = wmi
        .exec_instance_method::<EncryptableVolume, Out>(&volume.path, method, input)
        .map_err(|e| wmi_err(method, e))?;
    match out.return_value() {
        0 => Ok(out),
        code => Err(PlatformError::Os { what: method, code, detail: fve_message(code).to_owned() }),
    }
}

/// `C:` from `C:`, `c:\` or `C`.
fn valid_mount(mount: &str) -> PResult<String> {
    let m = mount.trim_end_matches('\\');
    let mut chars = m.chars();
    match (chars.next(), chars.next(), chars.next()) {
        (Some(l), Some(':'), None) | (Some(l), None, None) if l.is_ascii_alphabetic() => {
            Ok(format!("{}:", l.to_ascii_uppercase()))
        }
        _ => Err(PlatformError::Invalid { what: "BitLocker volume", detail: format!("not a drive letter: {mount:?}") }),
    }
}

// ---- WMI helpers ----

#[derive(Deserialize)]
#[serde(rename = "Win32_EncryptableVolume")]
struct EncryptableVolume {
    #[serde(rename = "__Path")]
    path: String,
    #[serde(rename = "DriveLetter")]
    drive_letter: Option<String>,
    #[serde(rename = "VolumeType")]
    volume_type: Option<u32>,
}

trait HasReturnValue {
    fn return_value(&self) -> u32;
}

#[derive(serde::Serialize)]
struct PrecisionIn {
    /// A CIM uint8: WMI wants it as VT_UI1, which `u8` serialises to.
    #[serde(rename = "PrecisionFactor")]
    precision_factor: u8,
}

#[derive(serde::Serialize)]
struct ProtectorIdIn {
    #[serde(rename = "VolumeKeyProtectorID")]
    id: String,
}

#[derive(Deserialize)]
struct ReturnOnly {
    #[serde(rename = "ReturnValue")]
    return_value: u32,
}

#[derive(Deserialize)]
struct ProtectorIdOut {
    #[serde(rename = "ReturnValue")]
    return_value: u32,
    #[serde(rename = "VolumeKeyProtectorID")]
    id: Option<String>,
}

impl ProtectorIdOut {
    fn id(self) -> PResult<String> {
        self.id.filter(|i| !i.is_empty()).ok_or(PlatformError::Invalid {
            what: "BitLocker protector",
            detail: "WMI returned no protector id".into(),
        })
    }
}

/// Never `Debug`: it holds a recovery password.
#[derive(Deserialize)]
struct PasswordOut {
    #[serde(rename = "ReturnValue")]
    return_value: u32,
    #[serde(rename = "NumericalPassword")]
    numerical_password: Option<String>,
}

#[derive(Deserialize)]
struct ProtectorsOut {
    #[serde(rename = "ReturnValue")]
    return_value: u32,
    #[serde(rename = "VolumeKeyProtectorID")]
    ids: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct ProtectorTypeOut {
    #[serde(rename = "ReturnValue")]
    return_value: u32,
    #[serde(rename = "KeyProtectorType")]
    kind: Option<u32>,
}

macro_rules! return_value {
    ($($t:ty),*) => {$(impl HasReturnValue for $t { fn return_value(&self) -> u32 { self.return_value } })*};
}
return_value!(ReturnOnly, ProtectorIdOut, PasswordOut, ProtectorsOut, ProtectorTypeOut);

fn protectors(wmi: &wmi::WMIConnection, v: &EncryptableVolume) -> PResult<Vec<Protector>> {
    #[derive(serde::Serialize)]
    struct KindIn {
        #[serde(rename = "KeyProtectorType")]
        kind: u32,
    }
    let list: ProtectorsOut = volume_method(wmi, v, "GetKeyProtectors", KindIn { kind: 0 })?;
    let mut out = Vec::new();
    for id in list.ids.unwrap_or_default() {
        let t: ProtectorTypeOut = volume_method(wmi, v, "GetKeyProtectorType", ProtectorIdIn { id: id.clone() })?;
        out.push(Protector { id, kind: protector_kind(t.kind.unwrap_or(0)).to_owned() });
    }
    Ok(out)
}

/// `Win32_EncryptableVolume.GetKeyProtectorType` codes as names policies compare against.
fn protector_kind(code: u32) -> &'static str {
    match code {
        1 => "tpm",
        2 => "external_key",
        3 => "recovery_password",
        4 => "tpm_pin",
        5 => "tpm_startup_key",
        6 => "tpm_pin_startup_key",
        7 => "public_key",
        8 => "passphrase",
        9 => "tpm_certificate",
        10 => "sid",
        _ => "unknown",
    }
}

/// `true` when a failed BitLocker method returned `code`.
fn is_fve(e: &PlatformError, code: ::windows::core::HRESULT) -> bool {
    matches!(e, PlatformError::Os { code: c, .. } if *c == code.0 as u32)
}

/// The common BitLocker (FVE) method failures, for people reading statuses.
fn fve_message(code: u32) -> &'static str {
    use ::windows::Win32::Foundation as F;
    let table: [(::windows::core::HRESULT, &str); 14] = [
        (F::FVE_E_LOCKED_VOLUME, "the volume is locked"),
        (F::FVE_E_NOT_ENCRYPTED, "the volume is not encrypted"),
        (F::FVE_E_NOT_ACTIVATED, "BitLocker is not enabled on the volume"),
        (F::FVE_E_NO_TPM_BIOS, "the firmware does not support the TPM"),
        (F::FVE_E_TPM_NOT_OWNED, "the TPM is not owned (initialise it in tpm.msc)"),
        (F::FVE_E_TPM_DISABLED, "the TPM is disabled in the firmware"),
        (F::FVE_E_PROTECTOR_EXISTS, "a protector of this kind already exists"),
        (F::FVE_E_PROTECTOR_NOT_FOUND, "no such key protector"),
        (F::FVE_E_NOT_DECRYPTED, "the volume is already encrypted or being encrypted"),
        (F::FVE_E_RECOVERY_KEY_REQUIRED, "a recovery key is required"),
        (F::FVE_E_POLICY_RECOVERY_PASSWORD_NOT_ALLOWED, "Group Policy does not allow recovery passwords"),
        (
            F::FVE_E_AD_BACKUP_REQUIRED_POLICY_NOT_SET_OS_DRIVE,
            "Group Policy requires directory backup that is not set up",
        ),
        (F::TBS_E_SERVICE_NOT_RUNNING, "the TPM Base Services are not running"),
        (F::E_ACCESSDENIED, "access denied: the agent must run as SYSTEM"),
    ];
    table.iter().find(|(h, _)| h.0 as u32 == code).map(|(_, m)| *m).unwrap_or("BitLocker WMI method failed")
}

pub(super) fn wmi_connect(namespace: &str, what: &'static str) -> PResult<wmi::WMIConnection> {
    wmi::WMIConnection::with_namespace_path(namespace).map_err(|e| wmi_err(what, e))
}

fn bitlocker_connect() -> PResult<wmi::WMIConnection> {
    let wmi = wmi_connect(BITLOCKER_NAMESPACE, "BitLocker (Win32_EncryptableVolume)")?;
    // The BitLocker provider refuses calls that are not encrypted on the wire.
    wmi.set_proxy_blanket(wmi::AuthLevel::PktPrivacy).map_err(|e| wmi_err("BitLocker (Win32_EncryptableVolume)", e))?;
    Ok(wmi)
}

/// Maps WMI failures: a namespace, class or provider the machine lacks is `Unavailable`.
pub(super) fn wmi_err(what: &'static str, e: wmi::WMIError) -> PlatformError {
    const UNAVAILABLE: [u32; 7] = [
        0x8004_100E, // WBEM_E_INVALID_NAMESPACE
        0x8004_1010, // WBEM_E_INVALID_CLASS
        0x8004_1011, // WBEM_E_PROVIDER_NOT_FOUND
        0x8004_1013, // WBEM_E_PROVIDER_LOAD_FAILURE
        0x8004_1014, // WBEM_E_INITIALIZATION_FAILURE
        0x8004_100C, // WBEM_E_NOT_SUPPORTED
        0x8004_0154, // REGDB_E_CLASSNOTREG: no WMI at all
    ];
    match e {
        wmi::WMIError::HResultError { hres } if UNAVAILABLE.contains(&(hres as u32)) => {
            PlatformError::Unavailable { what, detail: format!("WMI error 0x{:08x}", hres as u32) }
        }
        wmi::WMIError::HResultError { hres } => {
            PlatformError::Os { what, code: hres as u32, detail: ::windows::core::HRESULT(hres).message() }
        }
        other => PlatformError::Invalid { what, detail: other.to_string() },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounts() {
        assert_eq!(valid_mount("c:").unwrap(), "C:");
        assert_eq!(valid_mount("D:\\").unwrap(), "D:");
        assert_eq!(valid_mount("E").unwrap(), "E:");
        assert!(valid_mount("C:\\Windows").is_err());
        assert!(valid_mount("1:").is_err());
        assert!(valid_mount("").is_err());
    }
}
