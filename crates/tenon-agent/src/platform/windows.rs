//! The Windows platform: real registry, IP Helper, WMI, NetAPI, WTS and DPAPI calls behind [`Platform`].
//!
//! Architecture invariant: this is the only module of Tenon with `unsafe`; every block says why it is
//! sound. Rules followed throughout:
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

use super::*;
use serde::Deserialize;
use std::collections::HashMap;
use std::ffi::{c_void, CStr};
use std::net::Ipv6Addr;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Instant;

use ::windows::core::{PCSTR, PCWSTR, PWSTR};
use ::windows::Win32::Foundation::{
    CloseHandle, LocalFree, ERROR_BAD_NET_NAME, ERROR_GEN_FAILURE, ERROR_HOST_UNREACHABLE, ERROR_MEMBER_IN_ALIAS,
    ERROR_MEMBER_NOT_IN_ALIAS, ERROR_NETWORK_UNREACHABLE, ERROR_NOT_FOUND, ERROR_NOT_SUPPORTED, HANDLE, HLOCAL,
    HMODULE, NO_ERROR, WIN32_ERROR,
};
use ::windows::Win32::NetworkManagement::IpHelper::{
    CancelMibChangeNotify2, FreeMibTable, GetIpForwardTable2, GetIpNetTable2, NotifyIpInterfaceChange,
    NotifyRouteChange2, SendARP, MIB_IPFORWARD_ROW2, MIB_IPFORWARD_TABLE2, MIB_IPINTERFACE_ROW, MIB_IPNET_ROW2,
    MIB_IPNET_TABLE2, MIB_NOTIFICATION_TYPE,
};
use ::windows::Win32::NetworkManagement::NetManagement::{
    NetApiBufferFree, NetLocalGroupAddMembers, NetLocalGroupDelMembers, NetLocalGroupGetMembers, DSREG_DEVICE_JOIN,
    DSREG_JOIN_INFO, LOCALGROUP_MEMBERS_INFO_0, LOCALGROUP_MEMBERS_INFO_2, LOCALGROUP_MEMBERS_INFO_3,
    MAX_PREFERRED_LENGTH,
};
use ::windows::Win32::Networking::WinSock::{
    NlnsIncomplete, NlnsUnreachable, ADDRESS_FAMILY, AF_INET, AF_INET6, AF_UNSPEC, SOCKADDR_INET,
};
use ::windows::Win32::Security::Authentication::Identity::{NameSamCompatible, NameUserPrincipal, TranslateNameW};
use ::windows::Win32::Security::Authorization::{
    ConvertSecurityDescriptorToStringSecurityDescriptorW, ConvertSidToStringSidW, ConvertStringSidToSidW,
    GetNamedSecurityInfoW, SetNamedSecurityInfoW, SDDL_REVISION_1, SE_FILE_OBJECT,
};
use ::windows::Win32::Security::Cryptography::{
    CryptProtectData, CryptUnprotectData, CRYPTPROTECT_LOCAL_MACHINE, CRYPTPROTECT_UI_FORBIDDEN, CRYPT_INTEGER_BLOB,
};
use ::windows::Win32::Security::{
    GetTokenInformation, LookupAccountNameW, LookupAccountSidW, TokenUser, ACL, DACL_SECURITY_INFORMATION,
    PROTECTED_DACL_SECURITY_INFORMATION, PSECURITY_DESCRIPTOR, PSID, SID_NAME_USE, TOKEN_USER,
};
use ::windows::Win32::System::LibraryLoader::{GetProcAddress, LoadLibraryExW, LOAD_LIBRARY_SEARCH_SYSTEM32};
use ::windows::Win32::System::RemoteDesktop::{
    WTSActive, WTSDisconnected, WTSDomainName, WTSEnumerateSessionsW, WTSFreeMemory, WTSQuerySessionInformationW,
    WTSQueryUserToken, WTSSendMessageW, WTSUserName, WTS_INFO_CLASS, WTS_SESSION_INFOW,
};
use ::windows::Win32::System::SystemInformation::{ComputerNamePhysicalDnsHostname, GetComputerNameExW};
use ::windows::Win32::UI::WindowsAndMessaging::{MB_ICONINFORMATION, MB_OK, MESSAGEBOX_RESULT};
use winreg::enums::{
    RegType, HKEY_CLASSES_ROOT, HKEY_CURRENT_USER, HKEY_LOCAL_MACHINE, HKEY_USERS, KEY_READ, KEY_SET_VALUE,
    KEY_WOW64_64KEY, KEY_WRITE,
};
use winreg::types::FromRegValue;
use winreg::RegKey;

const ENVIRONMENT_KEY: &str = r"HKLM\SYSTEM\CurrentControlSet\Control\Session Manager\Environment";
const CURRENT_VERSION_KEY: &str = r"HKLM\SOFTWARE\Microsoft\Windows NT\CurrentVersion";
const PROFILE_LIST_KEY: &str = r"HKLM\SOFTWARE\Microsoft\Windows NT\CurrentVersion\ProfileList";
const JOIN_INFO_KEY: &str = r"HKLM\SYSTEM\CurrentControlSet\Control\CloudDomainJoin\JoinInfo";
const IDENTITY_CACHE_KEY: &str = r"HKLM\SOFTWARE\Microsoft\IdentityStore\Cache";
const TPM_NAMESPACE: &str = r"ROOT\CIMV2\Security\MicrosoftTpm";
const BITLOCKER_NAMESPACE: &str = r"ROOT\CIMV2\Security\MicrosoftVolumeEncryption";

/// DPAPI "optional entropy": domain-separates Tenon's blobs from other machine-scope DPAPI users, so a
/// blob cut out of another program's store cannot be fed to us as a vault key (and vice versa).
const DPAPI_ENTROPY: &[u8] = b"tenon-agent vault key v1";

/// `%ProgramData%` (normally `C:\ProgramData`), where the agent keeps its state.
pub fn program_data_dir() -> PathBuf {
    match std::env::var_os("ProgramData") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(r"C:\ProgramData"),
    }
}

/// Replaces `path`'s DACL with one granting full control to SYSTEM and BUILTIN\Administrators only,
/// inherited by everything created inside, and protected from the parent's inheritable entries (so
/// `Users: read` from `C:\ProgramData` does not flow in). Used for `%ProgramData%\Tenon`, which holds
/// the vault and its wrapped key.
pub fn restrict_dir_to_system_and_admins(path: &Path) -> PResult<()> {
    const WHAT: &str = "restricting the state directory";
    // P = protected (no inheritance from the parent); OICI = objects and containers inherit; FA = full
    // access; SY = LocalSystem, BA = BUILTIN\Administrators.
    let sddl = wide("D:P(A;OICI;FA;;;SY)(A;OICI;FA;;;BA)");
    let sd = LocalSd::from_sddl(&sddl).map_err(|e| win_err(WHAT, e))?;
    let mut present = ::windows::core::BOOL(0);
    let mut defaulted = ::windows::core::BOOL(0);
    let mut dacl: *mut ACL = std::ptr::null_mut();
    // SAFETY: `sd.0` is a valid self-relative security descriptor owned by `sd` for this whole function;
    // the out pointers point at live locals. The DACL pointer points into `sd`, which outlives its use.
    unsafe { ::windows::Win32::Security::GetSecurityDescriptorDacl(sd.0, &mut present, &mut dacl, &mut defaulted) }
        .map_err(|e| win_err(WHAT, e))?;
    let wpath = wide_os(path.as_os_str());
    // SAFETY: `wpath` is NUL-terminated and lives across the call; `dacl` points into `sd` (alive).
    let rc = unsafe {
        SetNamedSecurityInfoW(
            PCWSTR(wpath.as_ptr()),
            SE_FILE_OBJECT,
            DACL_SECURITY_INFORMATION | PROTECTED_DACL_SECURITY_INFORMATION,
            None,
            None,
            Some(dacl),
            None,
        )
    };
    check_win32(WHAT, rc)
}

/// The DACL of `path` in SDDL form, such as `D:P(A;OICI;FA;;;SY)(A;OICI;FA;;;BA)`: lets an
/// administrator (and the Wine tests) see what [`restrict_dir_to_system_and_admins`] left.
pub fn dir_dacl_sddl(path: &Path) -> PResult<String> {
    const WHAT: &str = "reading a directory's DACL";
    let wpath = wide_os(path.as_os_str());
    let mut sd = PSECURITY_DESCRIPTOR::default();
    // SAFETY: `wpath` is NUL-terminated; on success `sd` receives a LocalAlloc'd descriptor that we
    // hand to `LocalSd`, which frees it. The DACL out-pointer is not requested separately.
    let rc = unsafe {
        GetNamedSecurityInfoW(
            PCWSTR(wpath.as_ptr()),
            SE_FILE_OBJECT,
            DACL_SECURITY_INFORMATION,
            None,
            None,
            None,
            None,
            &mut sd,
        )
    };
    check_win32(WHAT, rc)?;
    let sd = LocalSd(sd);
    let mut text = PWSTR::null();
    // SAFETY: `sd.0` is a valid descriptor; `text` receives a LocalAlloc'd string freed by `LocalStr`.
    unsafe {
        ConvertSecurityDescriptorToStringSecurityDescriptorW(
            sd.0,
            SDDL_REVISION_1,
            DACL_SECURITY_INFORMATION,
            &mut text,
            None,
        )
    }
    .map_err(|e| win_err(WHAT, e))?;
    let text = LocalStr(text);
    Ok(text.to_string_lossy())
}

/// This process's memory as Windows accounts it: (working set, peak working set) in bytes. Lets
/// `sync --once` report its resident memory, also under Wine (which fills it from /proc).
pub fn process_memory() -> PResult<(u64, u64)> {
    use ::windows::Win32::System::ProcessStatus::{K32GetProcessMemoryInfo, PROCESS_MEMORY_COUNTERS};
    use ::windows::Win32::System::Threading::GetCurrentProcess;
    let mut counters =
        PROCESS_MEMORY_COUNTERS { cb: std::mem::size_of::<PROCESS_MEMORY_COUNTERS>() as u32, ..Default::default() };
    // SAFETY: the pseudo-handle of the current process needs no closing; `counters` is a live,
    // correctly sized out-struct whose `cb` says its size.
    let ok = unsafe { K32GetProcessMemoryInfo(GetCurrentProcess(), &mut counters, counters.cb) };
    if !ok.as_bool() {
        return Err(os_err(
            "K32GetProcessMemoryInfo",
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0) as u32,
        ));
    }
    Ok((counters.WorkingSetSize as u64, counters.PeakWorkingSetSize as u64))
}

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
        let Some(join_info) = open_key(JOIN_INFO_KEY, KEY_READ)? else { return Ok(EntraJoin::default()) };
        for sub in join_info.enum_keys() {
            let sub = sub.map_err(|e| io_err("reading CloudDomainJoin\\JoinInfo", e))?;
            let Ok(entry) = join_info.open_subkey_with_flags(&sub, KEY_READ | KEY_WOW64_64KEY) else { continue };
            let tenant = entry.get_value::<String, _>("TenantId").ok().filter(|t| !t.is_empty());
            return Ok(EntraJoin { joined: true, tenant_id: tenant });
        }
        Ok(EntraJoin::default())
    }

    fn entra_join_from_api(&self) -> Option<PResult<EntraJoin>> {
        type GetJoin = unsafe extern "system" fn(PCWSTR, *mut *mut DSREG_JOIN_INFO) -> ::windows::core::HRESULT;
        type FreeJoin = unsafe extern "system" fn(*const DSREG_JOIN_INFO);
        static GET: OnceLock<Option<usize>> = OnceLock::new();
        static FREE: OnceLock<Option<usize>> = OnceLock::new();
        let get = *GET.get_or_init(|| system_proc("netapi32.dll", c"NetGetAadJoinInformation"));
        let free = *FREE.get_or_init(|| system_proc("netapi32.dll", c"NetFreeAadJoinInformation"));
        let (Some(get), Some(free)) = (get, free) else { return None };
        // SAFETY: the addresses come from GetProcAddress for these exact exports, whose documented
        // signatures are `GetJoin`/`FreeJoin` (netapi32, lmjoin.h); fn pointers and usize have one size.
        let (get, free): (GetJoin, FreeJoin) =
            unsafe { (std::mem::transmute::<usize, GetJoin>(get), std::mem::transmute::<usize, FreeJoin>(free)) };
        let mut info: *mut DSREG_JOIN_INFO = std::ptr::null_mut();
        // SAFETY: a null tenant id asks about the device; `info` is a live out-pointer.
        let hr = unsafe { get(PCWSTR::null(), &mut info) };
        if hr.is_err() {
            return Some(Err(PlatformError::Os {
                what: "NetGetAadJoinInformation",
                code: hr.0 as u32,
                detail: hr.message(),
            }));
        }
        if info.is_null() {
            return Some(Ok(EntraJoin::default()));
        }
        // SAFETY: `info` is non-null and was allocated by NetGetAadJoinInformation; we read it before
        // freeing it with the matching NetFreeAadJoinInformation, exactly once.
        let join = unsafe {
            let row = &*info;
            let tenant = pwstr_to_string(row.pszTenantId).filter(|t| !t.is_empty());
            let joined = row.joinType == DSREG_DEVICE_JOIN;
            free(info);
            EntraJoin { joined, tenant_id: if joined { tenant } else { None } }
        };
        Some(Ok(join))
    }

    /// The SID of a session's user from its token (needs SeTcbPrivilege, which the service has as
    /// SYSTEM), else by name lookup.
    fn session_sid(&self, session_id: u32, domain: &str, user: &str) -> Option<String> {
        let mut token = HANDLE::default();
        // SAFETY: `token` is a live out-pointer; on success we own the handle and close it below.
        if unsafe { WTSQueryUserToken(session_id, &mut token) }.is_ok() {
            let sid = token_user_sid(token);
            // SAFETY: `token` is a handle we own and have not closed yet.
            let _ = unsafe { CloseHandle(token) };
            if sid.is_some() {
                return sid;
            }
        }
        lookup_account_sid(&format!("{domain}\\{user}")).ok()
    }

    /// Best-effort UPN of a signed-in user:
    /// 1. Entra accounts: the IdentityStore cache (`IdentityStore\Cache\<SID>\IdentityCache\<SID>`,
    ///    value `UserName`) holds the UPN; WTS only knows the truncated `AzureAD\AnnaSmith` name.
    /// 2. Domain accounts: `TranslateNameW(DOMAIN\user -> UserPrincipalName)`, which asks a DC.
    /// 3. Otherwise `DOMAIN\user` as it stands: it matches no UPN in the configuration, so no user
    ///    policy is wrongly applied to a local account.
    fn session_upn(&self, sid: Option<&str>, domain: &str, user: &str) -> String {
        if let Some(sid) = sid {
            let key = format!(r"{IDENTITY_CACHE_KEY}\{sid}\IdentityCache\{sid}");
            if let Ok(Some(RegValue::Sz(upn))) = self.reg_get(&key, "UserName") {
                if upn.contains('@') {
                    return upn;
                }
            }
        }
        let sam = format!("{domain}\\{user}");
        if let Some(upn) = translate_name_to_upn(&sam) {
            return upn;
        }
        sam
    }

    fn interface_metric(&self, family: ADDRESS_FAMILY, ifindex: u32) -> u32 {
        type Init = unsafe extern "system" fn(*mut MIB_IPINTERFACE_ROW);
        type Get = unsafe extern "system" fn(*mut MIB_IPINTERFACE_ROW) -> WIN32_ERROR;
        static INIT: OnceLock<Option<usize>> = OnceLock::new();
        static GET: OnceLock<Option<usize>> = OnceLock::new();
        let init = *INIT.get_or_init(|| system_proc("iphlpapi.dll", c"InitializeIpInterfaceEntry"));
        let get = *GET.get_or_init(|| system_proc("iphlpapi.dll", c"GetIpInterfaceEntry"));
        // Without GetIpInterfaceEntry (Wine) the interface metric is unknown; 0 keeps the route
        // metric alone, which still orders routes on one interface correctly.
        let (Some(init), Some(get)) = (init, get) else { return 0 };
        // SAFETY: addresses from GetProcAddress for these exports, whose signatures (netioapi.h) are
        // `Init`/`Get`; the row is a zeroed POD struct we own, initialised as the API requires.
        unsafe {
            let (init, get): (Init, Get) =
                (std::mem::transmute::<usize, Init>(init), std::mem::transmute::<usize, Get>(get));
            let mut row: MIB_IPINTERFACE_ROW = std::mem::zeroed();
            init(&mut row);
            row.Family = family;
            row.InterfaceIndex = ifindex;
            if get(&mut row) == NO_ERROR {
                row.Metric
            } else {
                0
            }
        }
    }

    fn volume_by_mount(&self, wmi: &wmi::WMIConnection, mount: &str) -> PResult<EncryptableVolume> {
        let letter = valid_mount(mount)?;
        let query = format!(
            "SELECT * FROM Win32_EncryptableVolume WHERE DriveLetter = {}",
            wmi::quote_and_escape_wql_str(&letter)
        );
        let mut rows: Vec<EncryptableVolume> = wmi.raw_query(&query).map_err(|e| wmi_err("BitLocker volumes", e))?;
        match rows.pop() {
            Some(v) => Ok(v),
            None => Err(PlatformError::Invalid { what: "BitLocker volume", detail: format!("no volume {letter}") }),
        }
    }

    fn volume_method<In: serde::Serialize, Out: serde::de::DeserializeOwned + HasReturnValue>(
        &self,
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
}

impl Platform for WindowsPlatform {
    fn hostname(&self) -> PResult<String> {
        let mut len = 0u32;
        // SAFETY: a size query: no buffer, `len` receives the needed length in characters (incl. NUL).
        let _ = unsafe { GetComputerNameExW(ComputerNamePhysicalDnsHostname, None, &mut len) };
        let mut buf = vec![0u16; len.max(1) as usize];
        let mut len = buf.len() as u32;
        // SAFETY: `buf` has `len` writable u16s; on success `len` holds the characters written.
        unsafe { GetComputerNameExW(ComputerNamePhysicalDnsHostname, Some(PWSTR(buf.as_mut_ptr())), &mut len) }
            .map_err(|e| win_err("GetComputerNameExW", e))?;
        Ok(String::from_utf16_lossy(&buf[..(len as usize).min(buf.len())]))
    }

    fn reg_get(&self, key: &str, name: &str) -> PResult<Option<RegValue>> {
        let Some(k) = open_key(key, KEY_READ)? else { return Ok(None) };
        let raw = match k.get_raw_value(name) {
            Ok(raw) => raw,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("reading a registry value", e)),
        };
        let bad = |e: std::io::Error| PlatformError::Invalid {
            what: "registry value",
            detail: format!("{key}\\{name}: {e}"),
        };
        let value = match raw.vtype {
            // REG_EXPAND_SZ is returned as stored (unexpanded), like `reg query` shows it.
            RegType::REG_SZ | RegType::REG_EXPAND_SZ => RegValue::Sz(String::from_reg_value(&raw).map_err(bad)?),
            RegType::REG_DWORD => RegValue::Dword(u32::from_reg_value(&raw).map_err(bad)?),
            RegType::REG_MULTI_SZ => RegValue::MultiSz(Vec::<String>::from_reg_value(&raw).map_err(bad)?),
            other => {
                return Err(PlatformError::Invalid {
                    what: "registry value",
                    detail: format!("{key}\\{name} has type {other:?}, not REG_SZ, REG_DWORD or REG_MULTI_SZ"),
                })
            }
        };
        Ok(Some(value))
    }

    fn reg_set(&self, key: &str, name: &str, value: &RegValue) -> PResult<()> {
        let (root, path) = split_hive(key)?;
        let (k, _) = root
            .create_subkey_with_flags(path, KEY_WRITE | KEY_WOW64_64KEY)
            .map_err(|e| io_err("creating a registry key", e))?;
        let written = match value {
            RegValue::Sz(s) => k.set_value(name, s),
            RegValue::Dword(d) => k.set_value(name, d),
            RegValue::MultiSz(items) => {
                // An empty string would end the REG_MULTI_SZ list early: Windows cannot store it.
                if items.iter().any(|s| s.is_empty()) {
                    return Err(PlatformError::Invalid {
                        what: "registry value",
                        detail: format!("{key}\\{name}: REG_MULTI_SZ cannot hold empty strings"),
                    });
                }
                k.set_value(name, items)
            }
        };
        written.map_err(|e| io_err("writing a registry value", e))
    }

    fn reg_delete(&self, key: &str, name: &str) -> PResult<bool> {
        let Some(k) = open_key(key, KEY_SET_VALUE)? else { return Ok(false) };
        match k.delete_value(name) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err("deleting a registry value", e)),
        }
    }

    fn routes(&self) -> PResult<Vec<Route>> {
        let mut if_metrics: HashMap<(u16, u32), u32> = HashMap::new();
        let mut routes = Vec::new();
        for family in [AF_INET, AF_INET6] {
            let mut table: *mut MIB_IPFORWARD_TABLE2 = std::ptr::null_mut();
            // SAFETY: `table` is a live out-pointer; on success it is a MIB table freed by `MibTable`.
            let rc = unsafe { GetIpForwardTable2(family, &mut table) };
            let table = MibTable(table as *const c_void);
            if !family_ok("GetIpForwardTable2", family, rc)? {
                continue;
            }
            // SAFETY: the table holds `NumEntries` rows laid out contiguously from `Table`, and stays
            // alive (owned by `table`) while the slice is used.
            let rows: &[MIB_IPFORWARD_ROW2] = unsafe {
                let t = table.0 as *const MIB_IPFORWARD_TABLE2;
                std::slice::from_raw_parts((*t).Table.as_ptr(), (*t).NumEntries as usize)
            };
            for row in rows {
                let (Some(dest), Some(gateway)) =
                    (sockaddr_ip(&row.DestinationPrefix.Prefix), sockaddr_ip(&row.NextHop))
                else {
                    continue;
                };
                let if_metric = *if_metrics
                    .entry((family.0, row.InterfaceIndex))
                    .or_insert_with(|| self.interface_metric(family, row.InterfaceIndex));
                let prefix_len = row.DestinationPrefix.PrefixLength;
                routes.push(Route {
                    destination: format!("{dest}/{prefix_len}"),
                    prefix_len,
                    gateway,
                    metric: row.Metric.saturating_add(if_metric),
                    interface_index: row.InterfaceIndex,
                });
            }
        }
        Ok(routes)
    }

    fn neighbours(&self) -> PResult<Vec<Neighbour>> {
        let mut out = Vec::new();
        for family in [AF_INET, AF_INET6] {
            let mut table: *mut MIB_IPNET_TABLE2 = std::ptr::null_mut();
            // SAFETY: as in `routes`: live out-pointer, table freed by `MibTable`.
            let rc = unsafe { GetIpNetTable2(family, &mut table) };
            let table = MibTable(table as *const c_void);
            if !family_ok("GetIpNetTable2", family, rc)? {
                continue;
            }
            // SAFETY: `NumEntries` contiguous rows from `Table`, alive while `table` is.
            let rows: &[MIB_IPNET_ROW2] = unsafe {
                let t = table.0 as *const MIB_IPNET_TABLE2;
                std::slice::from_raw_parts((*t).Table.as_ptr(), (*t).NumEntries as usize)
            };
            out.extend(
                rows.iter()
                    // Unreachable and incomplete entries carry no (or a stale zero) MAC.
                    .filter(|r| r.State != NlnsUnreachable && r.State != NlnsIncomplete && r.PhysicalAddressLength == 6)
                    .filter_map(|r| {
                        let ip = sockaddr_ip(&r.Address)?;
                        let mut mac = [0u8; 6];
                        mac.copy_from_slice(&r.PhysicalAddress[..6]);
                        Some(Neighbour { ip, mac, interface_index: r.InterfaceIndex })
                    }),
            );
        }
        Ok(out)
    }

    fn resolve_mac(&self, ip: IpAddr, interface_index: u32) -> PResult<Option<[u8; 6]>> {
        type Resolve = unsafe extern "system" fn(*mut MIB_IPNET_ROW2, *const SOCKADDR_INET) -> WIN32_ERROR;
        static RESOLVE: OnceLock<Option<usize>> = OnceLock::new();
        let not_found = |code: WIN32_ERROR| {
            [ERROR_BAD_NET_NAME, ERROR_NOT_FOUND, ERROR_GEN_FAILURE, ERROR_HOST_UNREACHABLE, ERROR_NETWORK_UNREACHABLE]
                .contains(&code)
        };
        if let Some(resolve) = *RESOLVE.get_or_init(|| system_proc("iphlpapi.dll", c"ResolveIpNetEntry2")) {
            // SAFETY: address from GetProcAddress for ResolveIpNetEntry2 (netioapi.h signature
            // `Resolve`); the row is zeroed POD we own, with the address and interface filled in.
            let (rc, row) = unsafe {
                let resolve = std::mem::transmute::<usize, Resolve>(resolve);
                let mut row: MIB_IPNET_ROW2 = std::mem::zeroed();
                row.Address = ip_sockaddr(ip);
                row.InterfaceIndex = interface_index;
                (resolve(&mut row, std::ptr::null()), row)
            };
            return match rc {
                NO_ERROR if row.PhysicalAddressLength == 6 => {
                    let mut mac = [0u8; 6];
                    mac.copy_from_slice(&row.PhysicalAddress[..6]);
                    Ok(Some(mac).filter(|m| *m != [0; 6]))
                }
                NO_ERROR => Ok(None),
                code if not_found(code) => Ok(None),
                code => Err(os_err("ResolveIpNetEntry2", code.0)),
            };
        }
        // Fallback for systems without ResolveIpNetEntry2: SendARP, IPv4 only.
        let IpAddr::V4(v4) = ip else {
            return Err(PlatformError::Unavailable {
                what: "neighbour resolution",
                detail: "ResolveIpNetEntry2 is missing and SendARP only handles IPv4".into(),
            });
        };
        let mut mac = [0u8; 8];
        let mut len = mac.len() as u32;
        // SAFETY: `mac` has `len` writable bytes; the address is in network byte order as SendARP wants.
        let rc = unsafe { SendARP(u32::from_ne_bytes(v4.octets()), 0, mac.as_mut_ptr().cast(), &mut len) };
        match WIN32_ERROR(rc) {
            NO_ERROR if len == 6 => Ok(Some([mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]]).filter(|m| *m != [0; 6])),
            NO_ERROR => Ok(None),
            ERROR_NOT_SUPPORTED => Err(PlatformError::Unavailable {
                what: "ARP resolution",
                detail: "SendARP is not supported here".into(),
            }),
            code if not_found(code) => Ok(None),
            code => Err(os_err("SendARP", code.0)),
        }
    }

    fn machine_env(&self, name: &str) -> PResult<Option<String>> {
        // The machine scope as stored, not this process's environment (which a service gets at start
        // and does not refresh). REG_EXPAND_SZ values are returned unexpanded.
        match self.reg_get(ENVIRONMENT_KEY, name)? {
            None => Ok(None),
            Some(RegValue::Sz(s)) => Ok(Some(s)),
            Some(_) => Err(PlatformError::Invalid {
                what: "machine environment variable",
                detail: format!("{name} is not a string value"),
            }),
        }
    }

    fn computer_system(&self) -> PResult<ComputerSystem> {
        #[derive(Deserialize)]
        #[serde(rename = "Win32_ComputerSystem", rename_all = "PascalCase")]
        struct Row {
            manufacturer: Option<String>,
            model: Option<String>,
        }
        let wmi = wmi_connect(r"ROOT\CIMV2", "Win32_ComputerSystem")?;
        let rows: Vec<Row> = wmi
            .raw_query("SELECT Manufacturer, Model FROM Win32_ComputerSystem")
            .map_err(|e| wmi_err("Win32_ComputerSystem", e))?;
        let row = rows.into_iter().next().ok_or_else(|| PlatformError::Unavailable {
            what: "Win32_ComputerSystem",
            detail: "WMI returned no instance".into(),
        })?;
        Ok(ComputerSystem {
            manufacturer: row.manufacturer.unwrap_or_default().trim().to_owned(),
            model: row.model.unwrap_or_default().trim().to_owned(),
        })
    }

    fn tpm(&self) -> PResult<TpmState> {
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

    fn is_multi_session(&self) -> PResult<bool> {
        // Windows 10/11 Enterprise multi-session reports EditionID "ServerRdsh" and a ProductName
        // containing "multi-session"; either is enough.
        let text = |name| match self.reg_get(CURRENT_VERSION_KEY, name) {
            Ok(Some(RegValue::Sz(s))) => Ok(s),
            Ok(_) => Ok(String::new()),
            Err(e) => Err(e),
        };
        Ok(looks_multi_session(&text("ProductName")?, &text("EditionID")?))
    }

    fn entra_join(&self) -> PResult<EntraJoin> {
        match self.entra_join_from_api() {
            Some(Ok(join)) => Ok(join),
            Some(Err(e)) => {
                tracing::debug!(error = %e, "NetGetAadJoinInformation failed; reading the registry instead");
                self.entra_join_from_registry()
            }
            None => self.entra_join_from_registry(),
        }
    }

    fn volumes(&self) -> PResult<Vec<Volume>> {
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
        let vols: Vec<EncryptableVolume> = wmi
            .raw_query("SELECT * FROM Win32_EncryptableVolume")
            .map_err(|e| wmi_err("Win32_EncryptableVolume", e))?;
        let mut out = Vec::new();
        for v in vols {
            // Volumes without a drive letter (recovery partitions) are not Tenon's business.
            let Some(mount) = v.drive_letter.clone().filter(|d| !d.is_empty()) else { continue };
            let status: ConversionOut =
                self.volume_method(&wmi, &v, "GetConversionStatus", PrecisionIn { precision_factor: 0 })?;
            let encryption = match status.conversion_status.unwrap_or(0) {
                0 => VolumeEncryption::None,
                1 => VolumeEncryption::Encrypted,
                2 | 4 => VolumeEncryption::Encrypting,
                _ => VolumeEncryption::Decrypting,
            };
            let protectors = self.protectors(&wmi, &v)?;
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

    fn add_recovery_password(&self, mount: &str) -> PResult<(String, String)> {
        #[derive(serde::Serialize)]
        struct In {
            #[serde(rename = "FriendlyName")]
            friendly_name: &'static str,
        }
        let wmi = bitlocker_connect()?;
        let v = self.volume_by_mount(&wmi, mount)?;
        let added: ProtectorIdOut =
            self.volume_method(&wmi, &v, "ProtectKeyWithNumericalPassword", In { friendly_name: "Tenon" })?;
        let id = added.id()?;
        let pw: PasswordOut =
            self.volume_method(&wmi, &v, "GetKeyProtectorNumericalPassword", ProtectorIdIn { id: id.clone() })?;
        let password = pw.numerical_password.filter(|p| !p.is_empty()).ok_or(PlatformError::Invalid {
            what: "GetKeyProtectorNumericalPassword",
            detail: "returned no password".into(),
        })?;
        Ok((id, password))
    }

    fn add_tpm_protector(&self, mount: &str) -> PResult<String> {
        #[derive(serde::Serialize)]
        struct In {
            #[serde(rename = "FriendlyName")]
            friendly_name: &'static str,
        }
        let wmi = bitlocker_connect()?;
        let v = self.volume_by_mount(&wmi, mount)?;
        match self.volume_method::<_, ProtectorIdOut>(&wmi, &v, "ProtectKeyWithTPM", In { friendly_name: "Tenon" }) {
            Ok(added) => added.id(),
            // A TPM protector is already there (ours from an interrupted run, or the OS's own):
            // that is the state we want, so hand back its id.
            Err(e) if is_fve(&e, ::windows::Win32::Foundation::FVE_E_PROTECTOR_EXISTS) => {
                self.protectors(&wmi, &v)?.into_iter().find(|p| p.kind == "tpm").map(|p| p.id).ok_or(e)
            }
            Err(e) => Err(e),
        }
    }

    fn delete_protector(&self, mount: &str, protector_id: &str) -> PResult<()> {
        let wmi = bitlocker_connect()?;
        let v = self.volume_by_mount(&wmi, mount)?;
        match self.volume_method::<_, ReturnOnly>(
            &wmi,
            &v,
            "DeleteKeyProtector",
            ProtectorIdIn { id: protector_id.to_owned() },
        ) {
            // Already gone: deleting is idempotent.
            Err(e) if is_fve(&e, ::windows::Win32::Foundation::FVE_E_PROTECTOR_NOT_FOUND) => Ok(()),
            other => other.map(|_| ()),
        }
    }

    fn encrypt(&self, mount: &str) -> PResult<()> {
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
        let v = self.volume_by_mount(&wmi, mount)?;
        match self.volume_method::<_, ReturnOnly>(&wmi, &v, "Encrypt", In { method: 7, flags: 1 }) {
            // Already encrypted or encrypting: nothing to start, and never a reason to decrypt.
            Err(e) if is_fve(&e, ::windows::Win32::Foundation::FVE_E_NOT_DECRYPTED) => Ok(()),
            other => other.map(|_| ()),
        }
    }

    fn backup_to_entra(&self, mount: &str, protector_id: &str) -> PResult<()> {
        let wmi = bitlocker_connect()?;
        let v = self.volume_by_mount(&wmi, mount)?;
        let _: ReturnOnly = self.volume_method(
            &wmi,
            &v,
            "BackupRecoveryInformationToCloudDomain",
            ProtectorIdIn { id: protector_id.to_owned() },
        )?;
        Ok(())
    }

    fn signed_in_users(&self) -> PResult<Vec<SessionUser>> {
        let mut sessions: *mut WTS_SESSION_INFOW = std::ptr::null_mut();
        let mut count = 0u32;
        // SAFETY: out-pointers are live locals; on success `sessions` is freed by `WtsMem`.
        unsafe { WTSEnumerateSessionsW(None, 0, 1, &mut sessions, &mut count) }
            .map_err(|e| win_err("WTSEnumerateSessionsW", e))?;
        let sessions = WtsMem(sessions.cast());
        let rows: &[WTS_SESSION_INFOW] = if sessions.0.is_null() {
            &[]
        } else {
            // SAFETY: WTS returned `count` contiguous entries, alive until `sessions` drops.
            unsafe { std::slice::from_raw_parts(sessions.0 as *const WTS_SESSION_INFOW, count as usize) }
        };
        let mut users = Vec::new();
        for s in rows {
            // Session 0 is services; listening/idle sessions have nobody in them. A disconnected
            // session still has its user signed in.
            if s.SessionId == 0 || (s.State != WTSActive && s.State != WTSDisconnected) {
                continue;
            }
            let user = wts_string(s.SessionId, WTSUserName).unwrap_or_default();
            if user.is_empty() {
                continue;
            }
            let domain = wts_string(s.SessionId, WTSDomainName).unwrap_or_default();
            let sid = self.session_sid(s.SessionId, &domain, &user);
            let upn = self.session_upn(sid.as_deref(), &domain, &user);
            users.push(SessionUser { upn, sid, session_id: Some(s.SessionId) });
        }
        Ok(users)
    }

    fn local_group_members(&self, group: &str) -> PResult<Vec<Account>> {
        let group = local_group_name(group)?;
        let wgroup = wide(&group);
        let mut buf: *mut u8 = std::ptr::null_mut();
        let (mut read, mut total) = (0u32, 0u32);
        // SAFETY: NUL-terminated group name; out-pointers are live; the buffer is freed by `NetBuf`.
        let rc = unsafe {
            NetLocalGroupGetMembers(
                PCWSTR::null(),
                PCWSTR(wgroup.as_ptr()),
                2,
                &mut buf,
                MAX_PREFERRED_LENGTH,
                &mut read,
                &mut total,
                None,
            )
        };
        let buf = NetBuf(buf);
        check_netapi("NetLocalGroupGetMembers", &group, rc)?;
        if buf.0.is_null() {
            return Ok(Vec::new());
        }
        // SAFETY: level 2 returns `read` contiguous LOCALGROUP_MEMBERS_INFO_2 entries in `buf`.
        let rows = unsafe { std::slice::from_raw_parts(buf.0 as *const LOCALGROUP_MEMBERS_INFO_2, read as usize) };
        Ok(rows
            .iter()
            .map(|r| Account {
                // SAFETY: strings and SIDs point into `buf`, alive for this closure.
                name: unsafe { pwstr_to_string(r.lgrmi2_domainandname) }.unwrap_or_default(),
                sid: sid_to_string(r.lgrmi2_sid),
            })
            .collect())
    }

    fn add_local_group_member(&self, group: &str, account: &Account) -> PResult<()> {
        let group = local_group_name(group)?;
        let rc = change_group_member(&group, account, true)?;
        // Already a member: the desired state holds.
        if rc == ERROR_MEMBER_IN_ALIAS.0 {
            return Ok(());
        }
        check_netapi("NetLocalGroupAddMembers", &group, rc)
    }

    fn remove_local_group_member(&self, group: &str, account: &Account) -> PResult<()> {
        let group = local_group_name(group)?;
        let rc = change_group_member(&group, account, false)?;
        if rc == ERROR_MEMBER_NOT_IN_ALIAS.0 {
            return Ok(());
        }
        check_netapi("NetLocalGroupDelMembers", &group, rc)
    }

    fn profile_dir(&self, user: &SessionUser) -> PResult<PathBuf> {
        let sid = match &user.sid {
            Some(sid) => sid.clone(),
            None => lookup_account_sid(&user.upn)?,
        };
        let key = format!(r"{PROFILE_LIST_KEY}\{sid}");
        match self.reg_get(&key, "ProfileImagePath")? {
            Some(RegValue::Sz(path)) if !path.is_empty() => Ok(PathBuf::from(expand_env(&path))),
            _ => Err(PlatformError::Invalid { what: "user profile", detail: format!("no profile for SID {sid}") }),
        }
    }

    fn notify_user(&self, user: &SessionUser, title: &str, message: &str) -> PResult<()> {
        let Some(session) = user.session_id else {
            return Err(PlatformError::Invalid { what: "notify_user", detail: "the user has no session".into() });
        };
        let (wtitle, wmsg) = (wide(title), wide(message));
        let mut response = MESSAGEBOX_RESULT(0);
        // SAFETY: both strings are NUL-terminated and alive across the call; lengths are in bytes
        // without the NUL, as WTSSendMessageW wants; bWait=false so the call does not block.
        unsafe {
            WTSSendMessageW(
                None,
                session,
                PCWSTR(wtitle.as_ptr()),
                ((wtitle.len() - 1) * 2) as u32,
                PCWSTR(wmsg.as_ptr()),
                ((wmsg.len() - 1) * 2) as u32,
                MB_OK | MB_ICONINFORMATION,
                0,
                &mut response,
                false,
            )
        }
        .map_err(|e| win_err("WTSSendMessageW", e))
    }

    fn wrap_secret(&self, plain: &[u8]) -> PResult<Vec<u8>> {
        // Machine scope (CRYPTPROTECT_LOCAL_MACHINE): the blob only opens on this machine, so a copied
        // vault is useless elsewhere. Any local process could unprotect it, so confidentiality on the
        // machine rests on the DACL of %ProgramData%\Tenon (SYSTEM and Administrators only); user
        // scope would instead tie the key to SYSTEM's profile and lock out an elevated admin's
        // `tenon-agent status`.
        dpapi(plain, true)
    }

    fn unwrap_secret(&self, wrapped: &[u8]) -> PResult<Vec<u8>> {
        dpapi(wrapped, false)
    }

    fn wait_network_change(&self, timeout: Duration) -> PResult<bool> {
        // The callbacks run on an OS thread pool; they only flip the flag and wake us.
        unsafe extern "system" fn on_route(ctx: *const c_void, _: *const MIB_IPFORWARD_ROW2, _: MIB_NOTIFICATION_TYPE) {
            // SAFETY: `ctx` is the `ChangeSignal` registered below, which outlives the registration.
            unsafe { (*(ctx as *const ChangeSignal)).signal() }
        }
        unsafe extern "system" fn on_interface(
            ctx: *const c_void,
            _: *const MIB_IPINTERFACE_ROW,
            _: MIB_NOTIFICATION_TYPE,
        ) {
            // SAFETY: as in `on_route`.
            unsafe { (*(ctx as *const ChangeSignal)).signal() }
        }
        let signal = Arc::new(ChangeSignal::default());
        let ctx = Arc::as_ptr(&signal) as *const c_void;
        let mut route_handle = HANDLE::default();
        let mut if_handle = HANDLE::default();
        // SAFETY: `ctx` stays valid until both registrations are cancelled below (we hold `signal`);
        // CancelMibChangeNotify2 waits for running callbacks, so none runs after `signal` drops.
        unsafe {
            check_win32(
                "NotifyRouteChange2",
                NotifyRouteChange2(AF_UNSPEC, Some(on_route), ctx, false, &mut route_handle),
            )?;
            let rc = NotifyIpInterfaceChange(AF_UNSPEC, Some(on_interface), Some(ctx), false, &mut if_handle);
            if rc != NO_ERROR {
                let _ = CancelMibChangeNotify2(route_handle);
                return Err(os_err("NotifyIpInterfaceChange", rc.0));
            }
        }
        let changed = signal.wait(timeout);
        // SAFETY: both handles came from successful registrations and are cancelled exactly once.
        unsafe {
            let _ = CancelMibChangeNotify2(route_handle);
            let _ = CancelMibChangeNotify2(if_handle);
        }
        Ok(changed)
    }

    // Software packages: in windows_software.rs.
    fn detect(&self, rule: &DetectRule) -> PResult<bool> {
        super::windows_software::detect(rule)
    }

    fn run_installer(&self, run: &InstallerRun<'_>) -> PResult<RunEnd> {
        super::windows_software::run_installer(run)
    }

    fn free_disk_bytes(&self, path: &Path) -> PResult<Option<u64>> {
        super::windows_software::free_disk_bytes(path)
    }
}

/// Set by the IP Helper callbacks, waited on by `wait_network_change`.
#[derive(Default)]
struct ChangeSignal {
    changed: Mutex<bool>,
    cond: Condvar,
}

impl ChangeSignal {
    fn signal(&self) {
        if let Ok(mut c) = self.changed.lock() {
            *c = true;
        }
        self.cond.notify_all();
    }

    fn wait(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let Ok(mut changed) = self.changed.lock() else { return false };
        while !*changed {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            changed = match self.cond.wait_timeout(changed, left) {
                Ok((guard, _)) => guard,
                Err(_) => return false,
            };
        }
        *changed
    }
}

/// Pure: does this edition host several interactive users at once?
fn looks_multi_session(product_name: &str, edition_id: &str) -> bool {
    product_name.to_ascii_lowercase().contains("multi-session")
        || product_name.to_ascii_lowercase().contains("virtual desktops")
        || edition_id.eq_ignore_ascii_case("ServerRdsh")
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

/// Expands `%NAME%` from this process's environment (the service's, which has `SystemDrive` and
/// `SystemRoot`); unknown names stay as written.
fn expand_env(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(start) = rest.find('%') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        match after.find('%') {
            Some(end) => {
                let name = &after[..end];
                match std::env::var(name) {
                    Ok(v) if !name.is_empty() => out.push_str(&v),
                    _ => {
                        out.push('%');
                        out.push_str(name);
                        out.push('%');
                    }
                }
                rest = &after[end + 1..];
            }
            None => {
                out.push_str(&rest[start..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

// ---- Registry helpers ----

fn split_hive(key: &str) -> PResult<(RegKey, &str)> {
    let (hive, path) = key.split_once('\\').unwrap_or((key, ""));
    let root = match hive.to_ascii_uppercase().as_str() {
        "HKLM" | "HKEY_LOCAL_MACHINE" => HKEY_LOCAL_MACHINE,
        "HKU" | "HKEY_USERS" => HKEY_USERS,
        "HKCU" | "HKEY_CURRENT_USER" => HKEY_CURRENT_USER,
        "HKCR" | "HKEY_CLASSES_ROOT" => HKEY_CLASSES_ROOT,
        _ => {
            return Err(PlatformError::Invalid {
                what: "registry key",
                detail: format!("{key:?} must start with HKLM\\, HKU\\, HKCU\\ or HKCR\\"),
            })
        }
    };
    Ok((RegKey::predef(root), path))
}

/// Opens a key in the 64-bit view; `Ok(None)` when it does not exist.
fn open_key(key: &str, access: u32) -> PResult<Option<RegKey>> {
    let (root, path) = split_hive(key)?;
    match root.open_subkey_with_flags(path, access | KEY_WOW64_64KEY) {
        Ok(k) => Ok(Some(k)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("opening a registry key", e)),
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

impl WindowsPlatform {
    fn protectors(&self, wmi: &wmi::WMIConnection, v: &EncryptableVolume) -> PResult<Vec<Protector>> {
        #[derive(serde::Serialize)]
        struct KindIn {
            #[serde(rename = "KeyProtectorType")]
            kind: u32,
        }
        let list: ProtectorsOut = self.volume_method(wmi, v, "GetKeyProtectors", KindIn { kind: 0 })?;
        let mut out = Vec::new();
        for id in list.ids.unwrap_or_default() {
            let t: ProtectorTypeOut =
                self.volume_method(wmi, v, "GetKeyProtectorType", ProtectorIdIn { id: id.clone() })?;
            out.push(Protector { id, kind: protector_kind(t.kind.unwrap_or(0)).to_owned() });
        }
        Ok(out)
    }
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

fn wmi_connect(namespace: &str, what: &'static str) -> PResult<wmi::WMIConnection> {
    wmi::WMIConnection::with_namespace_path(namespace).map_err(|e| wmi_err(what, e))
}

fn bitlocker_connect() -> PResult<wmi::WMIConnection> {
    let wmi = wmi_connect(BITLOCKER_NAMESPACE, "BitLocker (Win32_EncryptableVolume)")?;
    // The BitLocker provider refuses calls that are not encrypted on the wire.
    wmi.set_proxy_blanket(wmi::AuthLevel::PktPrivacy).map_err(|e| wmi_err("BitLocker (Win32_EncryptableVolume)", e))?;
    Ok(wmi)
}

/// Maps WMI failures: a namespace, class or provider the machine lacks is `Unavailable`.
fn wmi_err(what: &'static str, e: wmi::WMIError) -> PlatformError {
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

// ---- Accounts and groups ----

/// Accepts a group name (`Administrators`) or a well-known SID (`S-1-5-32-544`), which is the
/// robust form: group names are localised (`Administratoren` on German Windows).
fn local_group_name(group: &str) -> PResult<String> {
    if group.starts_with("S-1-") {
        let sid = OwnedSid::parse(group)?;
        let (_, name) = lookup_sid_name(sid.0)?;
        Ok(name)
    } else if group.is_empty() {
        Err(PlatformError::Invalid { what: "local group", detail: "empty name".into() })
    } else {
        Ok(group.to_owned())
    }
}

fn change_group_member(group: &str, account: &Account, add: bool) -> PResult<u32> {
    let wgroup = wide(group);
    let what = if add { "NetLocalGroupAddMembers" } else { "NetLocalGroupDelMembers" };
    let call = |level: u32, buf: *const u8| {
        // SAFETY: `buf` points at one LOCALGROUP_MEMBERS_INFO_{0,3} whose pointers stay alive across
        // the call (owned by the caller's locals); the group name is NUL-terminated.
        unsafe {
            if add {
                NetLocalGroupAddMembers(PCWSTR::null(), PCWSTR(wgroup.as_ptr()), level, buf, 1)
            } else {
                NetLocalGroupDelMembers(PCWSTR::null(), PCWSTR(wgroup.as_ptr()), level, buf, 1)
            }
        }
    };
    // By SID where known: it survives renames and needs no name resolution.
    if let Some(sid) = &account.sid {
        let sid = OwnedSid::parse(sid)?;
        let info = LOCALGROUP_MEMBERS_INFO_0 { lgrmi0_sid: sid.0 };
        return Ok(call(0, (&info as *const LOCALGROUP_MEMBERS_INFO_0).cast()));
    }
    if account.name.is_empty() {
        return Err(PlatformError::Invalid { what, detail: "the account has neither SID nor name".into() });
    }
    let mut wname = wide(&account.name);
    let info = LOCALGROUP_MEMBERS_INFO_3 { lgrmi3_domainandname: PWSTR(wname.as_mut_ptr()) };
    Ok(call(3, (&info as *const LOCALGROUP_MEMBERS_INFO_3).cast()))
}

fn check_netapi(what: &'static str, group: &str, rc: u32) -> PResult<()> {
    const NERR_GROUP_NOT_FOUND: u32 = 2220;
    const ERROR_NO_SUCH_ALIAS: u32 = 1376;
    match rc {
        0 => Ok(()),
        NERR_GROUP_NOT_FOUND | ERROR_NO_SUCH_ALIAS => {
            Err(PlatformError::Invalid { what, detail: format!("no local group {group:?}") })
        }
        code => Err(os_err(what, code)),
    }
}

/// A SID from `ConvertStringSidToSidW`, freed with LocalFree.
struct OwnedSid(PSID);

impl OwnedSid {
    fn parse(text: &str) -> PResult<Self> {
        let w = wide(text);
        let mut sid = PSID::default();
        // SAFETY: NUL-terminated input; on success `sid` is LocalAlloc'd and owned by the result.
        unsafe { ConvertStringSidToSidW(PCWSTR(w.as_ptr()), &mut sid) }
            .map_err(|_| PlatformError::Invalid { what: "SID", detail: format!("{text:?} is not a SID") })?;
        Ok(Self(sid))
    }
}

impl Drop for OwnedSid {
    fn drop(&mut self) {
        // SAFETY: the SID was LocalAlloc'd by ConvertStringSidToSidW and is freed once.
        unsafe { LocalFree(Some(HLOCAL(self.0 .0))) };
    }
}

fn sid_to_string(sid: PSID) -> Option<String> {
    if sid.0.is_null() {
        return None;
    }
    let mut text = PWSTR::null();
    // SAFETY: `sid` is a valid SID owned by the caller; `text` is LocalAlloc'd and freed by `LocalStr`.
    unsafe { ConvertSidToStringSidW(sid, &mut text) }.ok()?;
    Some(LocalStr(text).to_string_lossy())
}

/// (domain, name) of a SID.
fn lookup_sid_name(sid: PSID) -> PResult<(String, String)> {
    let (mut name_len, mut dom_len) = (0u32, 0u32);
    let mut use_ = SID_NAME_USE::default();
    // SAFETY: a size query with null buffers; lengths are live out-params.
    let _ = unsafe { LookupAccountSidW(PCWSTR::null(), sid, None, &mut name_len, None, &mut dom_len, &mut use_) };
    let mut name = vec![0u16; name_len.max(1) as usize];
    let mut dom = vec![0u16; dom_len.max(1) as usize];
    let (mut name_len, mut dom_len) = (name.len() as u32, dom.len() as u32);
    // SAFETY: buffers of the stated lengths, alive across the call.
    unsafe {
        LookupAccountSidW(
            PCWSTR::null(),
            sid,
            Some(PWSTR(name.as_mut_ptr())),
            &mut name_len,
            Some(PWSTR(dom.as_mut_ptr())),
            &mut dom_len,
            &mut use_,
        )
    }
    .map_err(|e| win_err("LookupAccountSidW", e))?;
    Ok((from_wide_buf(&dom), from_wide_buf(&name)))
}

/// The SID (as text) of an account name such as `CONTOSO\anna` or `AzureAD\anna@contoso.com`.
fn lookup_account_sid(account: &str) -> PResult<String> {
    let wname = wide(account);
    let (mut sid_len, mut dom_len) = (0u32, 0u32);
    let mut use_ = SID_NAME_USE::default();
    // SAFETY: a size query with null buffers.
    let _ = unsafe {
        LookupAccountNameW(PCWSTR::null(), PCWSTR(wname.as_ptr()), None, &mut sid_len, None, &mut dom_len, &mut use_)
    };
    if sid_len == 0 {
        return Err(PlatformError::Invalid { what: "account", detail: format!("unknown account {account:?}") });
    }
    let mut sid = vec![0u8; sid_len as usize];
    let mut dom = vec![0u16; dom_len.max(1) as usize];
    let mut dom_len = dom.len() as u32;
    // SAFETY: buffers of the stated sizes, alive across the call and while `sid` is converted.
    unsafe {
        LookupAccountNameW(
            PCWSTR::null(),
            PCWSTR(wname.as_ptr()),
            Some(PSID(sid.as_mut_ptr().cast())),
            &mut sid_len,
            Some(PWSTR(dom.as_mut_ptr())),
            &mut dom_len,
            &mut use_,
        )
    }
    .map_err(|e| win_err("LookupAccountNameW", e))?;
    sid_to_string(PSID(sid.as_mut_ptr().cast()))
        .ok_or(PlatformError::Invalid { what: "account", detail: format!("no SID for {account:?}") })
}

fn token_user_sid(token: HANDLE) -> Option<String> {
    let mut len = 0u32;
    // SAFETY: a size query.
    let _ = unsafe { GetTokenInformation(token, TokenUser, None, 0, &mut len) };
    if len == 0 {
        return None;
    }
    // u64 storage keeps the TOKEN_USER header suitably aligned.
    let mut buf = vec![0u64; (len as usize).div_ceil(8)];
    // SAFETY: `buf` has at least `len` bytes; on success it holds a TOKEN_USER whose SID points
    // inside `buf`, which stays alive while the SID is converted.
    unsafe {
        GetTokenInformation(token, TokenUser, Some(buf.as_mut_ptr().cast()), len, &mut len).ok()?;
        let user = &*(buf.as_ptr() as *const TOKEN_USER);
        sid_to_string(user.User.Sid)
    }
}

fn translate_name_to_upn(sam: &str) -> Option<String> {
    let w = wide(sam);
    let mut len = 0u32;
    // SAFETY: a size query with no buffer.
    let _ = unsafe { TranslateNameW(PCWSTR(w.as_ptr()), NameSamCompatible, NameUserPrincipal, None, &mut len) };
    if len == 0 {
        return None;
    }
    let mut buf = vec![0u16; len as usize];
    // SAFETY: `buf` has `len` u16s.
    let ok = unsafe {
        TranslateNameW(
            PCWSTR(w.as_ptr()),
            NameSamCompatible,
            NameUserPrincipal,
            Some(PWSTR(buf.as_mut_ptr())),
            &mut len,
        )
    };
    let upn = from_wide_buf(&buf);
    (ok && upn.contains('@')).then_some(upn)
}

fn wts_string(session: u32, class: WTS_INFO_CLASS) -> Option<String> {
    let mut p = PWSTR::null();
    let mut bytes = 0u32;
    // SAFETY: out-pointers are live; the buffer is freed by `WtsMem`.
    unsafe { WTSQuerySessionInformationW(None, session, class, &mut p, &mut bytes) }.ok()?;
    let mem = WtsMem(p.0.cast());
    // SAFETY: WTS returned a NUL-terminated string, alive until `mem` drops (after this line).
    let s = unsafe { pwstr_to_string(p) };
    drop(mem);
    s
}

// ---- DPAPI ----

fn dpapi(data: &[u8], protect: bool) -> PResult<Vec<u8>> {
    let what = if protect { "CryptProtectData" } else { "CryptUnprotectData" };
    let len = u32::try_from(data.len())
        .map_err(|_| PlatformError::Invalid { what, detail: "secret larger than 4 GiB".into() })?;
    let input = CRYPT_INTEGER_BLOB { cbData: len, pbData: data.as_ptr() as *mut u8 };
    let entropy = CRYPT_INTEGER_BLOB { cbData: DPAPI_ENTROPY.len() as u32, pbData: DPAPI_ENTROPY.as_ptr() as *mut u8 };
    let mut out = CRYPT_INTEGER_BLOB::default();
    // The scope is recorded in the blob; unprotecting takes only the no-UI flag.
    let flags =
        if protect { CRYPTPROTECT_LOCAL_MACHINE | CRYPTPROTECT_UI_FORBIDDEN } else { CRYPTPROTECT_UI_FORBIDDEN };
    // SAFETY: `input` and `entropy` point at live byte slices that DPAPI only reads (the `*mut` is an
    // API artefact); on success `out` is LocalAlloc'd and freed below after copying.
    let result = unsafe {
        if protect {
            CryptProtectData(&input, PCWSTR::null(), Some(&entropy), None, None, flags, &mut out)
        } else {
            CryptUnprotectData(&input, None, Some(&entropy), None, None, flags, &mut out)
        }
    };
    // The error is the OS code only: the data (a key) never goes into an error.
    result.map_err(|e| win_err(what, e))?;
    // SAFETY: on success `out` describes `cbData` bytes that DPAPI allocated with LocalAlloc.
    let bytes = unsafe {
        let v = std::slice::from_raw_parts(out.pbData, out.cbData as usize).to_vec();
        // Wipe the plaintext copy DPAPI made before handing it back to the heap.
        if !protect {
            std::ptr::write_bytes(out.pbData, 0, out.cbData as usize);
        }
        LocalFree(Some(HLOCAL(out.pbData.cast())));
        v
    };
    Ok(bytes)
}

// ---- Small RAII owners and conversions ----

/// A table from GetIpForwardTable2/GetIpNetTable2.
struct MibTable(*const c_void);
impl Drop for MibTable {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: the table came from an IP Helper *Table2 call and is freed once.
            unsafe { FreeMibTable(self.0) };
        }
    }
}

struct NetBuf(*mut u8);
impl Drop for NetBuf {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: the buffer came from a NetApi call and is freed once.
            unsafe { NetApiBufferFree(Some(self.0 as *const c_void)) };
        }
    }
}

struct WtsMem(*mut c_void);
impl Drop for WtsMem {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: the memory came from a WTS call and is freed once.
            unsafe { WTSFreeMemory(self.0) };
        }
    }
}

/// A security descriptor allocated by the system with LocalAlloc.
struct LocalSd(PSECURITY_DESCRIPTOR);
impl LocalSd {
    fn from_sddl(sddl: &[u16]) -> ::windows::core::Result<Self> {
        let mut sd = PSECURITY_DESCRIPTOR::default();
        // SAFETY: NUL-terminated SDDL; on success `sd` is LocalAlloc'd and owned by the result.
        unsafe {
            ::windows::Win32::Security::Authorization::ConvertStringSecurityDescriptorToSecurityDescriptorW(
                PCWSTR(sddl.as_ptr()),
                SDDL_REVISION_1,
                &mut sd,
                None,
            )
        }?;
        Ok(Self(sd))
    }
}
impl Drop for LocalSd {
    fn drop(&mut self) {
        if !self.0 .0.is_null() {
            // SAFETY: LocalAlloc'd by the system, freed once.
            unsafe { LocalFree(Some(HLOCAL(self.0 .0))) };
        }
    }
}

/// A string allocated by the system with LocalAlloc.
struct LocalStr(PWSTR);
impl LocalStr {
    fn to_string_lossy(&self) -> String {
        // SAFETY: the system returned a NUL-terminated string, alive while `self` is.
        unsafe { pwstr_to_string(self.0) }.unwrap_or_default()
    }
}
impl Drop for LocalStr {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: LocalAlloc'd by the system, freed once.
            unsafe { LocalFree(Some(HLOCAL(self.0 .0.cast()))) };
        }
    }
}

/// Looks up an export of a System32 DLL; `None` when the DLL or the function is missing. The
/// module stays loaded for the life of the process (the address is cached by the callers).
fn system_proc(dll: &str, name: &CStr) -> Option<usize> {
    let wdll = wide(dll);
    // SAFETY: NUL-terminated DLL name; loading from System32 only avoids DLL planting.
    let module: HMODULE = unsafe { LoadLibraryExW(PCWSTR(wdll.as_ptr()), None, LOAD_LIBRARY_SEARCH_SYSTEM32) }.ok()?;
    // SAFETY: `module` is loaded; `name` is NUL-terminated.
    let f = unsafe { GetProcAddress(module, PCSTR(name.as_ptr().cast())) }?;
    Some(f as usize)
}

/// # Safety
/// `p` is null or points at a NUL-terminated UTF-16 string.
unsafe fn pwstr_to_string(p: PWSTR) -> Option<String> {
    if p.is_null() {
        return None;
    }
    // SAFETY: guaranteed by the caller.
    Some(String::from_utf16_lossy(unsafe { p.as_wide() }))
}

fn sockaddr_ip(a: &SOCKADDR_INET) -> Option<IpAddr> {
    // SAFETY: every variant of the union starts with the address family, which says which variant
    // is valid; we read only that one.
    unsafe {
        match a.si_family {
            AF_INET => Some(IpAddr::V4(Ipv4Addr::from(a.Ipv4.sin_addr.S_un.S_addr.to_ne_bytes()))),
            AF_INET6 => Some(IpAddr::V6(Ipv6Addr::from(a.Ipv6.sin6_addr.u.Byte))),
            _ => None,
        }
    }
}

fn ip_sockaddr(ip: IpAddr) -> SOCKADDR_INET {
    let mut a = SOCKADDR_INET::default();
    match ip {
        IpAddr::V4(v4) => {
            a.Ipv4.sin_family = AF_INET;
            a.Ipv4.sin_addr.S_un.S_addr = u32::from_ne_bytes(v4.octets());
        }
        IpAddr::V6(v6) => {
            a.Ipv6.sin6_family = AF_INET6;
            a.Ipv6.sin6_addr.u.Byte = v6.octets();
        }
    }
    a
}

fn wide(s: &str) -> Vec<u16> {
    s.encode_utf16().chain(std::iter::once(0)).collect()
}

fn wide_os(s: &std::ffi::OsStr) -> Vec<u16> {
    use std::os::windows::ffi::OsStrExt;
    s.encode_wide().chain(std::iter::once(0)).collect()
}

fn from_wide_buf(buf: &[u16]) -> String {
    let end = buf.iter().position(|&c| c == 0).unwrap_or(buf.len());
    String::from_utf16_lossy(&buf[..end])
}

/// Whether a per-family IP Helper table call succeeded. A family the stack does not serve (IPv6
/// disabled, or Wine, which has no IPv6 neighbour table) is skipped rather than failing the whole
/// query; IPv4 failing is an error, since the gateway fingerprint depends on it.
fn family_ok(what: &'static str, family: ADDRESS_FAMILY, rc: WIN32_ERROR) -> PResult<bool> {
    const ERROR_INVALID_FUNCTION: WIN32_ERROR = WIN32_ERROR(1);
    match rc {
        NO_ERROR => Ok(true),
        ERROR_NOT_FOUND => Ok(false), // an empty table
        ERROR_INVALID_FUNCTION | ERROR_NOT_SUPPORTED if family == AF_INET6 => Ok(false),
        code => Err(os_err(what, code.0)),
    }
}

fn check_win32(what: &'static str, rc: WIN32_ERROR) -> PResult<()> {
    if rc == NO_ERROR {
        Ok(())
    } else {
        Err(os_err(what, rc.0))
    }
}

fn os_err(what: &'static str, code: u32) -> PlatformError {
    PlatformError::Os { what, code, detail: std::io::Error::from_raw_os_error(code as i32).to_string() }
}

fn win_err(what: &'static str, e: ::windows::core::Error) -> PlatformError {
    PlatformError::Os { what, code: e.code().0 as u32, detail: e.message() }
}

fn io_err(what: &'static str, e: std::io::Error) -> PlatformError {
    match e.raw_os_error() {
        Some(code) => PlatformError::Os { what, code: code as u32, detail: e.to_string() },
        None => PlatformError::Io { what, source: e },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_session_editions() {
        let check = |product: &str, edition: &str, expected: bool| {
            assert_eq!(looks_multi_session(product, edition), expected, "{product} / {edition}");
        };
        check("Windows 10 Enterprise multi-session", "ServerRdsh", true);
        check("Windows 11 Enterprise Multi-Session", "", true);
        check("Windows 10 Enterprise for Virtual Desktops", "ServerRdsh", true);
        check("", "ServerRdsh", true);
        check("Windows 11 Pro", "Professional", false);
        check("Windows 11 Enterprise", "Enterprise", false);
    }

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
