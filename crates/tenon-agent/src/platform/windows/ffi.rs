//! Generic Win32 plumbing shared by the domain files: UTF-16 strings, run-time export lookup,
//! system-allocated strings, and the mapping of OS errors to [`PlatformError`].

use crate::platform::{PResult, PlatformError};
use std::ffi::CStr;

use ::windows::core::{PCSTR, PCWSTR, PWSTR};
use ::windows::Win32::Foundation::{LocalFree, HLOCAL, HMODULE, NO_ERROR, WIN32_ERROR};
use ::windows::Win32::System::LibraryLoader::{GetProcAddress, LoadLibraryExW, LOAD_LIBRARY_SEARCH_SYSTEM32};

/// A string allocated by the system with LocalAlloc.
pub(super) struct LocalStr(pub(super) PWSTR);
impl LocalStr {
    pub(super) fn to_string_lossy(&self) -> String {
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
pub(super) fn system_proc(dll: &str, name: &CStr) -> Option<usize> {
    let wdll = wide(dll);
    // SAFETY: NUL-terminated DLL name; loading from System32 only avoids DLL planting.
    let module: HMODULE = unsafe { LoadLibraryExW(PCWSTR(wdll.as_ptr()), None, LOAD_LIBRARY_SEARCH_SYSTEM32) }.ok()?;
    // SAFETY: `module` is loaded; `name` is NUL-terminated.
    let f = unsafe { GetProcAddress(module, PCSTR(name.as_ptr().cast())) }?;
    Some(f as usize)
}

/// # Safety
/// `p` is null or points at a NUL-terminated UTF-16 string.
pub(super) unsafe fn pwstr_to_string(p: PWSTR) -> Option<String> {
    if p.is_null() {
        return None;
    }
    // SAFETY: guaranteed by the caller.
    Some(String::from_utf16_lossy(unsafe { p.as_wide() }))
}

pub(super) fn wide(s: &str) -> Vec<u16> {
    s.encode_utf16().chain(std::iter::once(0)).collect()
}

pub(super) fn wide_os(s: &std::ffi::OsStr) -> Vec<u16> {
    use std::os::windows::ffi::OsStrExt;
    s.encode_wide().chain(std::iter::once(0)).collect()
}

pub(super) fn from_wide_buf(buf: &[u16]) -> String {
    let end = buf.iter().position(|&c| c == 0).unwrap_or(buf.len());
    String::from_utf16_lossy(&buf[..end])
}

pub(super) fn check_win32(what: &'static str, rc: WIN32_ERROR) -> PResult<()> {
    if rc == NO_ERROR {
        Ok(())
    } else {
        Err(os_err(what, rc.0))
    }
}

pub(super) fn os_err(what: &'static str, code: u32) -> PlatformError {
    PlatformError::Os { what, code, detail: std::io::Error::from_raw_os_error(code as i32).to_string() }
}

pub(super) fn win_err(what: &'static str, e: ::windows::core::Error) -> PlatformError {
    PlatformError::Os { what, code: e.code().0 as u32, detail: e.message() }
}

pub(super) fn io_err(what: &'static str, e: std::io::Error) -> PlatformError {
    match e.raw_os_error() {
        Some(code) => PlatformError::Os { what, code: code as u32, detail: e.to_string() },
        None => PlatformError::Io { what, source: e },
    }
}
