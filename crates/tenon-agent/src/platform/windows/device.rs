//! Machine identity: host name, make and model, edition (multi-session), Entra join, and the
//! process's own memory and state directory.

use super::bitlocker::{wmi_connect, wmi_err};
use super::ffi::{io_err, os_err, pwstr_to_string, system_proc, win_err};
use super::registry::{open_key, reg_get};
use crate::platform::{ComputerSystem, EntraJoin, PResult, PlatformError, RegValue};
use serde::Deserialize;
use std::path::PathBuf;
use std::sync::OnceLock;

use ::windows::core::{PCWSTR, PWSTR};
use ::windows::Win32::NetworkManagement::NetManagement::{DSREG_DEVICE_JOIN, DSREG_JOIN_INFO};
use ::windows::Win32::System::SystemInformation::{ComputerNamePhysicalDnsHostname, GetComputerNameExW};
use winreg::enums::{KEY_READ, KEY_WOW64_64KEY};

const CURRENT_VERSION_KEY: &str = r"HKLM\SOFTWARE\Microsoft\Windows NT\CurrentVersion";
const JOIN_INFO_KEY: &str = r"HKLM\SYSTEM\CurrentControlSet\Control\CloudDomainJoin\JoinInfo";

/// `%ProgramData%` (normally `C:\ProgramData`), where the agent keeps its state.
pub fn program_data_dir() -> PathBuf {
    match std::env::var_os("ProgramData") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(r"C:\ProgramData"),
    }
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

pub(super) fn hostname() -> PResult<String> {
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

pub(super) fn computer_system() -> PResult<ComputerSystem> {
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

pub(super) fn is_multi_session() -> PResult<bool> {
    // Windows 10/11 Enterprise multi-session reports EditionID "ServerRdsh" and a ProductName
    // containing "multi-session"; either is enough.
    let text = |name| match reg_get(CURRENT_VERSION_KEY, name) {
        Ok(Some(RegValue::Sz(s))) => Ok(s),
        Ok(_) => Ok(String::new()),
        Err(e) => Err(e),
    };
    Ok(looks_multi_session(&text("ProductName")?, &text("EditionID")?))
}

pub(super) fn entra_join() -> PResult<EntraJoin> {
    match entra_join_from_api() {
        Some(Ok(join)) => Ok(join),
        Some(Err(e)) => {
            tracing::debug!(error = %e, "NetGetAadJoinInformation failed; reading the registry instead");
            entra_join_from_registry()
        }
        None => entra_join_from_registry(),
    }
}

/// The body of [`super::WindowsPlatform::entra_join_from_registry`] (public for the Wine tests, and
/// documented there); also the fallback of [`entra_join`].
pub(super) fn entra_join_from_registry() -> PResult<EntraJoin> {
    let Some(join_info) = open_key(JOIN_INFO_KEY, KEY_READ)? else { return Ok(EntraJoin::default()) };
    for sub in join_info.enum_keys() {
        let sub = sub.map_err(|e| io_err("reading CloudDomainJoin\\JoinInfo", e))?;
        let Ok(entry) = join_info.open_subkey_with_flags(&sub, KEY_READ | KEY_WOW64_64KEY) else { continue };
        let tenant = entry.get_value::<String, _>("TenantId").ok().filter(|t| !t.is_empty());
        return Ok(EntraJoin { joined: true, tenant_id: tenant });
    }
    Ok(EntraJoin::default())
}

fn entra_join_from_api() -> Option<PResult<EntraJoin>> {
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

/// Pure: does this edition host several interactive users at once?
fn looks_multi_session(product_name: &str, edition_id: &str) -> bool {
    product_name.to_ascii_lowercase().contains("multi-session")
        || product_name.to_ascii_lowercase().contains("virtual desktops")
        || edition_id.eq_ignore_ascii_case("ServerRdsh")
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
}
