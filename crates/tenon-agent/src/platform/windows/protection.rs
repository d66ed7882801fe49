//! Protecting the agent's state: DPAPI (machine scope) for the vault key, and the DACL of the
//! state directory.

use super::ffi::{check_win32, wide, wide_os, win_err, LocalStr};
use crate::platform::{PResult, PlatformError};
use std::path::Path;

use ::windows::core::{PCWSTR, PWSTR};
use ::windows::Win32::Foundation::{LocalFree, HLOCAL};
use ::windows::Win32::Security::Authorization::{
    ConvertSecurityDescriptorToStringSecurityDescriptorW, GetNamedSecurityInfoW, SetNamedSecurityInfoW,
    SDDL_REVISION_1, SE_FILE_OBJECT,
};
use ::windows::Win32::Security::Cryptography::{
    CryptProtectData, CryptUnprotectData, CRYPTPROTECT_LOCAL_MACHINE, CRYPTPROTECT_UI_FORBIDDEN, CRYPT_INTEGER_BLOB,
};
use ::windows::Win32::Security::{
    ACL, DACL_SECURITY_INFORMATION, PROTECTED_DACL_SECURITY_INFORMATION, PSECURITY_DESCRIPTOR,
};

/// DPAPI "optional entropy": domain-separates Tenon's blobs from other machine-scope DPAPI users, so a
/// blob cut out of another program's store cannot be fed to us as a vault key (and vice versa).
const DPAPI_ENTROPY: &[u8] = b"tenon-agent vault key v1";

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

pub(super) fn wrap_secret(plain: &[u8]) -> PResult<Vec<u8>> {
    // Machine scope (CRYPTPROTECT_LOCAL_MACHINE): the blob only opens on this machine, so a copied
    // vault is useless elsewhere. Any local process could unprotect it, so confidentiality on the
    // machine rests on the DACL of %ProgramData%\Tenon (SYSTEM and Administrators only); user
    // scope would instead tie the key to SYSTEM's profile and lock out an elevated admin's
    // `tenon-agent status`.
    dpapi(plain, true)
}

pub(super) fn unwrap_secret(wrapped: &[u8]) -> PResult<Vec<u8>> {
    dpapi(wrapped, false)
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
