//! Accounts: who is signed in (WTS), local group membership (NetAPI), profiles and messages to a
//! session, and the SID conversions they need.

use super::ffi::{from_wide_buf, os_err, pwstr_to_string, wide, win_err, LocalStr};
use super::registry::{expand_env, reg_get};
use crate::platform::{Account, PResult, PlatformError, RegValue, SessionUser};
use std::ffi::c_void;
use std::path::PathBuf;

use ::windows::core::{PCWSTR, PWSTR};
use ::windows::Win32::Foundation::{
    CloseHandle, LocalFree, ERROR_MEMBER_IN_ALIAS, ERROR_MEMBER_NOT_IN_ALIAS, HANDLE, HLOCAL,
};
use ::windows::Win32::NetworkManagement::NetManagement::{
    NetApiBufferFree, NetLocalGroupAddMembers, NetLocalGroupDelMembers, NetLocalGroupGetMembers,
    LOCALGROUP_MEMBERS_INFO_0, LOCALGROUP_MEMBERS_INFO_2, LOCALGROUP_MEMBERS_INFO_3, MAX_PREFERRED_LENGTH,
};
use ::windows::Win32::Security::Authentication::Identity::{NameSamCompatible, NameUserPrincipal, TranslateNameW};
use ::windows::Win32::Security::Authorization::{ConvertSidToStringSidW, ConvertStringSidToSidW};
use ::windows::Win32::Security::{
    GetTokenInformation, LookupAccountNameW, LookupAccountSidW, TokenUser, PSID, SID_NAME_USE, TOKEN_USER,
};
use ::windows::Win32::System::RemoteDesktop::{
    WTSActive, WTSDisconnected, WTSDomainName, WTSEnumerateSessionsW, WTSFreeMemory, WTSQuerySessionInformationW,
    WTSQueryUserToken, WTSSendMessageW, WTSUserName, WTS_INFO_CLASS, WTS_SESSION_INFOW,
};
use ::windows::Win32::UI::WindowsAndMessaging::{MB_ICONINFORMATION, MB_OK, MESSAGEBOX_RESULT};

const PROFILE_LIST_KEY: &str = r"HKLM\SOFTWARE\Microsoft\Windows NT\CurrentVersion\ProfileList";
const IDENTITY_CACHE_KEY: &str = r"HKLM\SOFTWARE\Microsoft\IdentityStore\Cache";

pub(super) fn signed_in_users() -> PResult<Vec<SessionUser>> {
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
        let sid = session_sid(s.SessionId, &domain, &user);
        let upn = session_upn(sid.as_deref(), &domain, &user);
        users.push(SessionUser { upn, sid, session_id: Some(s.SessionId) });
    }
    Ok(users)
}

pub(super) fn local_group_members(group: &str) -> PResult<Vec<Account>> {
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

pub(super) fn add_local_group_member(group: &str, account: &Account) -> PResult<()> {
    let group = local_group_name(group)?;
    let rc = change_group_member(&group, account, true)?;
    // Already a member: the desired state holds.
    if rc == ERROR_MEMBER_IN_ALIAS.0 {
        return Ok(());
    }
    check_netapi("NetLocalGroupAddMembers", &group, rc)
}

pub(super) fn remove_local_group_member(group: &str, account: &Account) -> PResult<()> {
    let group = local_group_name(group)?;
    let rc = change_group_member(&group, account, false)?;
    if rc == ERROR_MEMBER_NOT_IN_ALIAS.0 {
        return Ok(());
    }
    check_netapi("NetLocalGroupDelMembers", &group, rc)
}

pub(super) fn profile_dir(user: &SessionUser) -> PResult<PathBuf> {
    let sid = match &user.sid {
        Some(sid) => sid.clone(),
        None => lookup_account_sid(&user.upn)?,
    };
    let key = format!(r"{PROFILE_LIST_KEY}\{sid}");
    match reg_get(&key, "ProfileImagePath")? {
        Some(RegValue::Sz(path)) if !path.is_empty() => Ok(PathBuf::from(expand_env(&path))),
        _ => Err(PlatformError::Invalid { what: "user profile", detail: format!("no profile for SID {sid}") }),
    }
}

pub(super) fn notify_user(user: &SessionUser, title: &str, message: &str) -> PResult<()> {
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

/// The SID of a session's user from its token (needs SeTcbPrivilege, which the service has as
/// SYSTEM), else by name lookup.
fn session_sid(session_id: u32, domain: &str, user: &str) -> Option<String> {
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
fn session_upn(sid: Option<&str>, domain: &str, user: &str) -> String {
    if let Some(sid) = sid {
        let key = format!(r"{IDENTITY_CACHE_KEY}\{sid}\IdentityCache\{sid}");
        if let Ok(Some(RegValue::Sz(upn))) = reg_get(&key, "UserName") {
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
