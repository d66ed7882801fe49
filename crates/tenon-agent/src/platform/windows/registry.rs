//! The registry (always the 64-bit view) and the machine-scope environment stored in it.

use super::ffi::io_err;
use crate::platform::{PResult, PlatformError, RegValue};
use winreg::enums::{
    RegType, HKEY_CLASSES_ROOT, HKEY_CURRENT_USER, HKEY_LOCAL_MACHINE, HKEY_USERS, KEY_READ, KEY_SET_VALUE,
    KEY_WOW64_64KEY, KEY_WRITE,
};
use winreg::types::FromRegValue;
use winreg::RegKey;

const ENVIRONMENT_KEY: &str = r"HKLM\SYSTEM\CurrentControlSet\Control\Session Manager\Environment";

pub(super) fn reg_get(key: &str, name: &str) -> PResult<Option<RegValue>> {
    let Some(k) = open_key(key, KEY_READ)? else { return Ok(None) };
    let raw = match k.get_raw_value(name) {
        Ok(raw) => raw,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("reading a registry value", e)),
    };
    let bad =
        |e: std::io::Error| PlatformError::Invalid { what: "registry value", detail: format!("{key}\\{name}: {e}") };
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

pub(super) fn reg_set(key: &str, name: &str, value: &RegValue) -> PResult<()> {
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

pub(super) fn reg_delete(key: &str, name: &str) -> PResult<bool> {
    let Some(k) = open_key(key, KEY_SET_VALUE)? else { return Ok(false) };
    match k.delete_value(name) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err("deleting a registry value", e)),
    }
}

pub(super) fn machine_env(name: &str) -> PResult<Option<String>> {
    // The machine scope as stored, not this process's environment (which a service gets at start
    // and does not refresh). REG_EXPAND_SZ values are returned unexpanded.
    match reg_get(ENVIRONMENT_KEY, name)? {
        None => Ok(None),
        Some(RegValue::Sz(s)) => Ok(Some(s)),
        Some(_) => Err(PlatformError::Invalid {
            what: "machine environment variable",
            detail: format!("{name} is not a string value"),
        }),
    }
}

/// Expands `%NAME%` from this process's environment (the service's, which has `SystemDrive` and
/// `SystemRoot`); unknown names stay as written.
pub(super) fn expand_env(s: &str) -> String {
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
pub(super) fn open_key(key: &str, access: u32) -> PResult<Option<RegKey>> {
    let (root, path) = split_hive(key)?;
    match root.open_subkey_with_flags(path, access | KEY_WOW64_64KEY) {
        Ok(k) => Ok(Some(k)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("opening a registry key", e)),
    }
}
