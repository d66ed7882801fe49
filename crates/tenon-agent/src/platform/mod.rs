//! The platform layer: everything the agent does to or learns from the operating system goes
//! through [`Platform`]. Policies decide in pure code (tenon-core) and only execute through here.
//!
//! Two implementations: `windows` (real Win32, WMI and DPAPI; only built for Windows) and
//! [`simulated::SimulatedPlatform`] (a device described by one JSON file, for tests and demos).

pub mod simulated;
#[cfg(windows)]
pub mod windows;

use serde::{Deserialize, Serialize};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tenon_core::packages::{Command, DetectRule, Kind, RunEnd};

/// A failed platform call. "This machine has no TPM / no BitLocker provider" is
/// [`PlatformError::Unavailable`], a value policies reason about, never a panic.
#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    #[error("{what} is not available on this machine: {detail}")]
    Unavailable { what: &'static str, detail: String },
    #[error("{what} failed with OS error 0x{code:08x}: {detail}")]
    Os { what: &'static str, code: u32, detail: String },
    #[error("{what}: {detail}")]
    Invalid { what: &'static str, detail: String },
    #[error("simulated device file {path}: {detail}")]
    DeviceFile { path: String, detail: String },
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl PlatformError {
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }
}

pub type PResult<T> = Result<T, PlatformError>;

/// A registry value of the types Tenon writes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "value")]
pub enum RegValue {
    #[serde(rename = "REG_SZ")]
    Sz(String),
    #[serde(rename = "REG_DWORD")]
    Dword(u32),
    #[serde(rename = "REG_MULTI_SZ")]
    MultiSz(Vec<String>),
}

/// A route of the routing table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// Destination prefix such as `0.0.0.0/0`.
    pub destination: String,
    pub prefix_len: u8,
    pub gateway: IpAddr,
    /// Route metric plus interface metric, as Windows compares them.
    pub metric: u32,
    pub interface_index: u32,
}

impl Route {
    pub fn is_default(&self) -> bool {
        self.prefix_len == 0
    }
}

/// A neighbour-table (ARP/NDP) entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Neighbour {
    pub ip: IpAddr,
    pub mac: [u8; 6],
    pub interface_index: u32,
}

/// What `Win32_ComputerSystem` says about the hardware.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComputerSystem {
    pub manufacturer: String,
    pub model: String,
}

/// `Win32_Tpm` readiness.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TpmState {
    pub present: bool,
    pub ready: bool,
}

/// Entra ID (Azure AD) join state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntraJoin {
    pub joined: bool,
    pub tenant_id: Option<String>,
}

/// BitLocker encryption state of a volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VolumeEncryption {
    None,
    Encrypting,
    Encrypted,
    Decrypting,
}

/// A key protector on a volume. Recovery passwords never travel in this struct.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Protector {
    pub id: String,
    /// `recovery_password`, `tpm`, or another kind the OS reports.
    pub kind: String,
}

/// A BitLocker-capable volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub mount: String,
    pub encryption: VolumeEncryption,
    pub percent_encrypted: u8,
    pub protectors: Vec<Protector>,
    pub is_os_volume: bool,
}

/// A user signed in interactively.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionUser {
    pub upn: String,
    pub sid: Option<String>,
    pub session_id: Option<u32>,
}

/// An account to put in or take out of a local group: by SID where known, else by name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// Such as `AzureAD\anna@contoso.com`.
    pub name: String,
    pub sid: Option<String>,
}

/// One run of a package's installer or uninstaller.
#[derive(Clone, Debug)]
pub struct InstallerRun<'a> {
    pub package: &'a str,
    pub version: &'a str,
    pub kind: Kind,
    /// The package's detection rule (the simulated platform makes it hold after a success).
    pub detect: &'a DetectRule,
    pub uninstall: bool,
    /// What to run (`program` is a full path for content, a bare name for `msiexec.exe`,
    /// `cmd.exe` and `powershell.exe`, which Windows finds in System32).
    pub command: &'a Command,
    /// The process's standard output and error are written to this file (msiexec writes its own
    /// log to `command.log`).
    pub output: &'a Path,
    /// The whole process tree is killed once this passes.
    pub timeout: Duration,
    /// Start it outside the agent's job and do not wait ([`RunEnd::HandedOff`]): the agent's own
    /// upgrade, which stops the service running the agent.
    pub detached: bool,
}

/// Everything the agent needs from the operating system.
pub trait Platform: Send + Sync {
    fn hostname(&self) -> PResult<String>;

    // Registry, always the 64-bit view. Keys are written in full: `HKLM\SOFTWARE\...`.
    fn reg_get(&self, key: &str, name: &str) -> PResult<Option<RegValue>>;
    fn reg_set(&self, key: &str, name: &str, value: &RegValue) -> PResult<()>;
    /// Deletes a value; `Ok(false)` when there was none.
    fn reg_delete(&self, key: &str, name: &str) -> PResult<bool>;

    // Network.
    fn routes(&self) -> PResult<Vec<Route>>;
    fn neighbours(&self) -> PResult<Vec<Neighbour>>;
    /// Asks the network for `ip`'s MAC (ARP) when the neighbour table has no entry.
    fn resolve_mac(&self, ip: IpAddr, interface_index: u32) -> PResult<Option<[u8; 6]>>;

    // Machine facts.
    fn machine_env(&self, name: &str) -> PResult<Option<String>>;
    fn computer_system(&self) -> PResult<ComputerSystem>;
    fn tpm(&self) -> PResult<TpmState>;
    fn is_multi_session(&self) -> PResult<bool>;
    fn entra_join(&self) -> PResult<EntraJoin>;

    // BitLocker.
    fn volumes(&self) -> PResult<Vec<Volume>>;
    /// Adds a recovery-password protector; returns its id and the 48-digit password.
    fn add_recovery_password(&self, mount: &str) -> PResult<(String, String)>;
    fn add_tpm_protector(&self, mount: &str) -> PResult<String>;
    fn delete_protector(&self, mount: &str, protector_id: &str) -> PResult<()>;
    /// Starts XTS-AES-256, used-space-only encryption.
    fn encrypt(&self, mount: &str) -> PResult<()>;
    fn backup_to_entra(&self, mount: &str, protector_id: &str) -> PResult<()>;

    // Users and groups.
    fn signed_in_users(&self) -> PResult<Vec<SessionUser>>;
    fn local_group_members(&self, group: &str) -> PResult<Vec<Account>>;
    fn add_local_group_member(&self, group: &str, account: &Account) -> PResult<()>;
    fn remove_local_group_member(&self, group: &str, account: &Account) -> PResult<()>;
    /// The user's profile directory (`C:\Users\anna`).
    fn profile_dir(&self, user: &SessionUser) -> PResult<PathBuf>;
    /// Shows a message in the user's session.
    fn notify_user(&self, user: &SessionUser, title: &str, message: &str) -> PResult<()>;

    // Secrets: wraps the vault key so that only this machine's SYSTEM can unwrap it.
    fn wrap_secret(&self, plain: &[u8]) -> PResult<Vec<u8>>;
    fn unwrap_secret(&self, wrapped: &[u8]) -> PResult<Vec<u8>>;

    /// Blocks until the routing table or an interface changes, or `timeout` passes; `Ok(true)` when
    /// something changed. Windows: `NotifyRouteChange2`/`NotifyIpInterfaceChange`.
    fn wait_network_change(&self, timeout: Duration) -> PResult<bool>;

    // Software packages.
    /// Whether a package's detection rule holds now: Windows Installer knows the product
    /// (`MsiQueryProductStateW` says installed), a file exists (with a version resource of at
    /// least the version), a registry value exists / equals / is a version of at least (64- or
    /// 32-bit view).
    fn detect(&self, rule: &DetectRule) -> PResult<bool>;
    /// Runs an installer and waits for it; kills its whole process tree once `run.timeout`
    /// passes ([`RunEnd::TimedOut`]). An error means it could not be started.
    fn run_installer(&self, run: &InstallerRun<'_>) -> PResult<RunEnd>;
    /// Bytes free for `path`'s volume, `None` when unknown.
    fn free_disk_bytes(&self, path: &Path) -> PResult<Option<u64>> {
        let _ = path;
        Ok(None)
    }

    /// The numerical password of a recovery-password protector (Windows:
    /// `GetKeyProtectorNumericalPassword`). The BitLocker policy needs it to escrow a protector it
    /// did not create, or one whose escrow an agent restart interrupted. The result is a secret:
    /// it must never reach a log, error or status.
    fn recovery_password(&self, mount: &str, protector_id: &str) -> PResult<String> {
        let _ = (mount, protector_id);
        Err(PlatformError::Unavailable {
            what: "reading a recovery password",
            detail: "this platform does not implement it".into(),
        })
    }
}

/// The default gateway that identifies the device's network: its IPv4 address and MAC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayFingerprint {
    pub ip: Ipv4Addr,
    pub mac: [u8; 6],
}

/// The IPv4 default route with the lowest metric (ties: lowest interface index).
pub fn select_default_gateway(routes: &[Route]) -> Option<(Ipv4Addr, u32)> {
    routes
        .iter()
        .filter(|r| r.is_default())
        .filter_map(|r| match r.gateway {
            IpAddr::V4(gw) if !gw.is_unspecified() => Some((r.metric, r.interface_index, gw)),
            _ => None,
        })
        .min()
        .map(|(_, ifindex, gw)| (gw, ifindex))
}

/// The device's gateway fingerprint: lowest-metric IPv4 default gateway, its MAC from the neighbour
/// table, or from ARP when the table has no entry. `Ok(None)` when there is no IPv4 default gateway
/// or its MAC cannot be learnt.
pub fn default_gateway(p: &dyn Platform) -> PResult<Option<GatewayFingerprint>> {
    let Some((ip, ifindex)) = select_default_gateway(&p.routes()?) else { return Ok(None) };
    let from_table = p
        .neighbours()?
        .into_iter()
        .find(|n| n.ip == IpAddr::V4(ip) && n.mac != [0; 6] && (n.interface_index == ifindex || ifindex == 0))
        .map(|n| n.mac);
    let mac = match from_table {
        Some(mac) => Some(mac),
        None => p.resolve_mac(IpAddr::V4(ip), ifindex)?,
    };
    Ok(mac.map(|mac| GatewayFingerprint { ip, mac }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(dest_len: u8, gw: &str, metric: u32, ifindex: u32) -> Route {
        Route {
            destination: String::new(),
            prefix_len: dest_len,
            gateway: gw.parse().unwrap(),
            metric,
            interface_index: ifindex,
        }
    }

    #[test]
    fn picks_lowest_metric_ipv4_default_route() {
        let check = |routes: &[Route], expected: Option<(&str, u32)>| {
            assert_eq!(select_default_gateway(routes), expected.map(|(ip, i)| (ip.parse().unwrap(), i)));
        };
        check(&[], None);
        check(&[route(24, "192.0.2.1", 1, 1)], None);
        check(&[route(0, "192.0.2.1", 50, 1), route(0, "198.51.100.1", 10, 2)], Some(("198.51.100.1", 2)));
        check(&[route(0, "fe80::1", 1, 1), route(0, "192.0.2.1", 90, 3)], Some(("192.0.2.1", 3)));
        check(&[route(0, "0.0.0.0", 1, 1)], None);
        check(&[route(0, "192.0.2.9", 5, 7), route(0, "192.0.2.1", 5, 4)], Some(("192.0.2.1", 4)));
    }
}
