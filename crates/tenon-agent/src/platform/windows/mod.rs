//! The Windows platform: real registry, IP Helper, WMI, NetAPI, WTS and DPAPI calls behind [`Platform`].
//!
//! Architecture invariant: this module (its files below) is the only place in the agent with `unsafe`;
//! every block says why it is sound. Rules followed throughout:
//! - Registry access always uses the 64-bit view (`KEY_WOW64_64KEY`), so a 32-bit build would still
//!   write where 64-bit Windows components read.
//! - Functions that older Windows builds or Wine do not export (`GetIpInterfaceEntry`,
//!   `ResolveIpNetEntry2`, `NetGetAadJoinInformation`) are looked up at run time with `GetProcAddress`:
//!   a static import of a missing function would stop the whole agent from loading, not just one call.
//! - A WMI namespace or provider that the machine lacks (no TPM, no BitLocker) is
//!   [`PlatformError::Unavailable`], never a panic; other failures carry the OS/WMI error code.
//! - Secrets (recovery passwords, the vault key) never appear in errors.
//!
//! WMI connections are per call: `wmi::WMIConnection` is bound to the thread that made it, and
//! [`Platform`] is `Send + Sync`; the agent makes few WMI calls per sync, so the cost does not matter.
//!
//! This file holds [`WindowsPlatform`] and its [`Platform`] impl, each method a delegation to the
//! file of its domain:
//! - `registry.rs`: registry values (`reg_get`/`reg_set`/`reg_delete`) and the machine environment.
//! - `network.rs`: routes, neighbours, MAC resolution, waiting for a network change (IP Helper).
//! - `bitlocker.rs`: the TPM and BitLocker volumes and protectors (WMI), and the WMI helpers.
//! - `device.rs`: machine identity: host name, make and model, multi-session edition, Entra join,
//!   [`process_memory`], [`program_data_dir`].
//! - `accounts.rs`: signed-in users (WTS), local group members (NetAPI), profiles, messages to a
//!   session, SIDs.
//! - `protection.rs`: DPAPI wrapping of secrets, [`restrict_dir_to_system_and_admins`] and
//!   [`dir_dacl_sddl`].
//! - `software.rs`: software packages (detection rules, installers in a job object, free disk space).
//! - `ffi.rs`: helpers the others share (UTF-16 strings, run-time exports, OS error mapping).

mod accounts;
mod bitlocker;
mod device;
mod ffi;
mod network;
mod protection;
mod registry;
pub mod software;

pub use device::{process_memory, program_data_dir};
pub use protection::{dir_dacl_sddl, restrict_dir_to_system_and_admins};

use super::{
    Account, ComputerSystem, EntraJoin, InstallerRun, Neighbour, PResult, Platform, RegValue, Route, SessionUser,
    TpmState, Volume,
};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tenon_core::packages::{DetectRule, RunEnd};

/// The real Windows implementation of [`Platform`]. Stateless: every call asks the OS afresh.
#[derive(Debug, Default, Clone, Copy)]
pub struct WindowsPlatform;

impl WindowsPlatform {
    pub fn new() -> Self {
        Self
    }

    /// Entra join state as the registry records it (`CloudDomainJoin\JoinInfo\<thumbprint>` with a
    /// `TenantId` value). The fallback when `NetGetAadJoinInformation` is missing (Wine, old builds)
    /// or fails.
    pub fn entra_join_from_registry(&self) -> PResult<EntraJoin> {
        device::entra_join_from_registry()
    }
}

impl Platform for WindowsPlatform {
    fn hostname(&self) -> PResult<String> {
        device::hostname()
    }

    fn reg_get(&self, key: &str, name: &str) -> PResult<Option<RegValue>> {
        registry::reg_get(key, name)
    }

    fn reg_set(&self, key: &str, name: &str, value: &RegValue) -> PResult<()> {
        registry::reg_set(key, name, value)
    }

    fn reg_delete(&self, key: &str, name: &str) -> PResult<bool> {
        registry::reg_delete(key, name)
    }

    fn routes(&self) -> PResult<Vec<Route>> {
        network::routes()
    }

    fn neighbours(&self) -> PResult<Vec<Neighbour>> {
        network::neighbours()
    }

    fn resolve_mac(&self, ip: IpAddr, interface_index: u32) -> PResult<Option<[u8; 6]>> {
        network::resolve_mac(ip, interface_index)
    }

    fn machine_env(&self, name: &str) -> PResult<Option<String>> {
        registry::machine_env(name)
    }

    fn computer_system(&self) -> PResult<ComputerSystem> {
        device::computer_system()
    }

    fn tpm(&self) -> PResult<TpmState> {
        bitlocker::tpm()
    }

    fn is_multi_session(&self) -> PResult<bool> {
        device::is_multi_session()
    }

    fn entra_join(&self) -> PResult<EntraJoin> {
        device::entra_join()
    }

    fn volumes(&self) -> PResult<Vec<Volume>> {
        bitlocker::volumes()
    }

    fn add_recovery_password(&self, mount: &str) -> PResult<(String, String)> {
        bitlocker::add_recovery_password(mount)
    }

    fn add_tpm_protector(&self, mount: &str) -> PResult<String> {
        bitlocker::add_tpm_protector(mount)
    }

    fn delete_protector(&self, mount: &str, protector_id: &str) -> PResult<()> {
        bitlocker::delete_protector(mount, protector_id)
    }

    fn encrypt(&self, mount: &str) -> PResult<()> {
        bitlocker::encrypt(mount)
    }

    fn backup_to_entra(&self, mount: &str, protector_id: &str) -> PResult<()> {
        bitlocker::backup_to_entra(mount, protector_id)
    }

    fn signed_in_users(&self) -> PResult<Vec<SessionUser>> {
        accounts::signed_in_users()
    }

    fn local_group_members(&self, group: &str) -> PResult<Vec<Account>> {
        accounts::local_group_members(group)
    }

    fn add_local_group_member(&self, group: &str, account: &Account) -> PResult<()> {
        accounts::add_local_group_member(group, account)
    }

    fn remove_local_group_member(&self, group: &str, account: &Account) -> PResult<()> {
        accounts::remove_local_group_member(group, account)
    }

    fn profile_dir(&self, user: &SessionUser) -> PResult<PathBuf> {
        accounts::profile_dir(user)
    }

    fn notify_user(&self, user: &SessionUser, title: &str, message: &str) -> PResult<()> {
        accounts::notify_user(user, title, message)
    }

    fn wrap_secret(&self, plain: &[u8]) -> PResult<Vec<u8>> {
        protection::wrap_secret(plain)
    }

    fn unwrap_secret(&self, wrapped: &[u8]) -> PResult<Vec<u8>> {
        protection::unwrap_secret(wrapped)
    }

    fn wait_network_change(&self, timeout: Duration) -> PResult<bool> {
        network::wait_network_change(timeout)
    }

    fn detect(&self, rule: &DetectRule) -> PResult<bool> {
        software::detect(rule)
    }

    fn run_installer(&self, run: &InstallerRun<'_>) -> PResult<RunEnd> {
        software::run_installer(run)
    }

    fn free_disk_bytes(&self, path: &Path) -> PResult<Option<u64>> {
        software::free_disk_bytes(path)
    }
}
