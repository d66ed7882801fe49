//! Software packages on real Windows: detection rules (Windows Installer, file version
//! resources, HKLM values in either registry view), running an installer inside a job object,
//! and free disk space. [`super::WindowsPlatform`] delegates its `detect`, `run_installer` and
//! `free_disk_bytes` here.
//!
//! Like the other files of `platform/windows/` this module calls Win32 directly; every `unsafe`
//! block says why it is sound. Registry reads here choose the view the rule names
//! (`KEY_WOW64_32KEY` or `KEY_WOW64_64KEY`), unlike registry.rs, whose values always live in the
//! 64-bit view.
//!
//! What Wine 8 does with these calls is written down in tests/windows_software.rs, which runs
//! them under Wine.

use crate::platform::{InstallerRun, PResult, PlatformError};
use std::ffi::{c_void, OsStr};
use std::fs::File;
use std::io::ErrorKind;
use std::os::windows::ffi::OsStrExt;
use std::os::windows::io::AsRawHandle;
use std::os::windows::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};
use tenon_core::packages::{compare_versions, normalise_product_code, DetectRule, RegistryCheck, RunEnd};

use ::windows::core::PCWSTR;
use ::windows::Win32::Foundation::{CloseHandle, HANDLE, WAIT_OBJECT_0, WAIT_TIMEOUT};
use ::windows::Win32::Storage::FileSystem::{
    GetDiskFreeSpaceExW, GetFileVersionInfoSizeW, GetFileVersionInfoW, VerQueryValueW, VS_FIXEDFILEINFO,
};
use ::windows::Win32::System::ApplicationInstallationAndServicing::{
    MsiQueryProductStateW, INSTALLSTATE_DEFAULT, INSTALLSTATE_INVALIDARG,
};
use ::windows::Win32::System::Diagnostics::ToolHelp::{
    CreateToolhelp32Snapshot, Thread32First, Thread32Next, TH32CS_SNAPTHREAD, THREADENTRY32,
};
use ::windows::Win32::System::JobObjects::{
    AssignProcessToJobObject, CreateJobObjectW, JobObjectBasicAccountingInformation, JobObjectExtendedLimitInformation,
    QueryInformationJobObject, SetInformationJobObject, TerminateJobObject, JOBOBJECT_BASIC_ACCOUNTING_INFORMATION,
    JOBOBJECT_EXTENDED_LIMIT_INFORMATION, JOB_OBJECT_LIMIT, JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE,
};
use ::windows::Win32::System::SystemInformation::GetSystemDirectoryW;
use ::windows::Win32::System::Threading::{
    OpenThread, ResumeThread, WaitForSingleObject, CREATE_BREAKAWAY_FROM_JOB, CREATE_NO_WINDOW, CREATE_SUSPENDED,
    DETACHED_PROCESS, THREAD_SUSPEND_RESUME,
};
use winreg::enums::{RegType, HKEY_LOCAL_MACHINE, KEY_QUERY_VALUE, KEY_WOW64_32KEY, KEY_WOW64_64KEY};
use winreg::types::FromRegValue;
use winreg::RegKey;

const ERROR_FILE_NOT_FOUND: u32 = 2;
const ERROR_PATH_NOT_FOUND: u32 = 3;
const ERROR_BAD_FORMAT: u32 = 11;
const ERROR_INVALID_DRIVE: u32 = 15;
const ERROR_NOT_READY: u32 = 21;
const ERROR_INVALID_PARAMETER: u32 = 87;
const ERROR_BAD_EXE_FORMAT: u32 = 193;
const ERROR_DIRECTORY: u32 = 267;
const ERROR_NOT_FOUND: u32 = 1168;
const ERROR_TIMEOUT: u32 = 1460;
const ERROR_RESOURCE_DATA_NOT_FOUND: u32 = 1812;
const ERROR_RESOURCE_TYPE_NOT_FOUND: u32 = 1813;
const ERROR_RESOURCE_NAME_NOT_FOUND: u32 = 1814;
const ERROR_RESOURCE_LANG_NOT_FOUND: u32 = 1815;
/// `VS_FIXEDFILEINFO::dwSignature`.
const VS_FFI_SIGNATURE: u32 = 0xFEEF_04BD;
/// How long a timed-out tree may take to die after `TerminateJobObject`.
const KILL_GRACE: Duration = Duration::from_secs(30);

// ---- Detection ----

/// Whether a package's detection rule holds now. "Not there" (no such product, file, key or
/// value) is `Ok(false)`; anything else that stops the check (access denied, a broken volume) is
/// an error, so a package is never reinstalled or reported missing on a read that failed.
pub fn detect(rule: &DetectRule) -> PResult<bool> {
    match rule {
        DetectRule::Msi { product_code } => msi_product_installed(product_code),
        DetectRule::File { path, min_version } => file_detected(path, min_version.as_deref()),
        DetectRule::Registry { key, name, check, view32 } => registry_detected(key, name, check, *view32),
    }
}

/// Windows Installer says the product is installed (`MsiQueryProductStateW` is
/// `INSTALLSTATE_DEFAULT`). Advertised, absent (installed for another user only) and unknown
/// products are not installed.
pub fn msi_product_installed(product_code: &str) -> PResult<bool> {
    const WHAT: &str = "MsiQueryProductStateW";
    let code = normalise_product_code(product_code).map_err(|e| PlatformError::Os {
        what: WHAT,
        code: ERROR_INVALID_PARAMETER,
        detail: e.to_string(),
    })?;
    let wcode = wide(&code);
    // SAFETY: `wcode` is a NUL-terminated UTF-16 string that lives across the call; the function
    // only reads it.
    let state = unsafe { MsiQueryProductStateW(PCWSTR(wcode.as_ptr())) };
    match state {
        INSTALLSTATE_DEFAULT => Ok(true),
        INSTALLSTATE_INVALIDARG => Err(PlatformError::Os {
            what: WHAT,
            code: ERROR_INVALID_PARAMETER,
            detail: format!("Windows Installer refused the product code {code}"),
        }),
        _ => Ok(false),
    }
}

/// A file (or folder) exists; with `min_version`, a file whose version resource is at least it.
fn file_detected(path: &str, min_version: Option<&str>) -> PResult<bool> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if io_not_there(&e) => return Ok(false),
        Err(e) => return Err(io_err("reading a detection rule's file", path, e)),
    };
    let Some(min) = min_version else { return Ok(true) };
    if !meta.is_file() {
        return Ok(false);
    }
    Ok(file_version(Path::new(path))?.and_then(|v| compare_versions(&v, min)).is_some_and(|o| o.is_ge()))
}

/// The file version of `path`'s version resource (`VS_FIXEDFILEINFO` `dwFileVersionMS/LS`) as
/// `a.b.c.d`; `None` when the file has no version resource (a text file, an unversioned EXE) or
/// is gone.
pub fn file_version(path: &Path) -> PResult<Option<String>> {
    const WHAT: &str = "reading a file's version resource";
    let wpath = wide_os(path.as_os_str());
    // SAFETY: `wpath` is NUL-terminated and lives across the call; the handle out-parameter is
    // optional and not asked for.
    let size = unsafe { GetFileVersionInfoSizeW(PCWSTR(wpath.as_ptr()), None) };
    if size == 0 {
        let code = last_error();
        return match code {
            0
            | ERROR_FILE_NOT_FOUND
            | ERROR_PATH_NOT_FOUND
            | ERROR_BAD_FORMAT
            | ERROR_BAD_EXE_FORMAT
            | ERROR_RESOURCE_DATA_NOT_FOUND
            | ERROR_RESOURCE_TYPE_NOT_FOUND
            | ERROR_RESOURCE_NAME_NOT_FOUND
            | ERROR_RESOURCE_LANG_NOT_FOUND => Ok(None),
            code => Err(os_err(WHAT, code, path.display())),
        };
    }
    let mut block = vec![0u8; size as usize];
    // SAFETY: `block` has exactly `size` writable bytes, the length passed; `wpath` as above.
    unsafe { GetFileVersionInfoW(PCWSTR(wpath.as_ptr()), None, size, block.as_mut_ptr().cast()) }
        .map_err(|e| win_err(WHAT, path.display(), e))?;
    let root = wide("\\");
    let mut value: *mut c_void = std::ptr::null_mut();
    let mut len = 0u32;
    // SAFETY: `block` holds the version resource GetFileVersionInfoW filled in and outlives every use
    // of `value`, which VerQueryValueW points into it; `root` is NUL-terminated.
    let found = unsafe { VerQueryValueW(block.as_ptr().cast(), PCWSTR(root.as_ptr()), &mut value, &mut len) };
    let want = std::mem::size_of::<VS_FIXEDFILEINFO>();
    let start = block.as_ptr() as usize;
    let inside = !value.is_null()
        && (value as usize) >= start
        && (value as usize).saturating_add(want) <= start + block.len()
        && len as usize >= want;
    if !found.as_bool() || !inside {
        return Ok(None);
    }
    // SAFETY: just checked: `value` points at `want` initialised bytes inside `block`; the read is
    // unaligned-safe and VS_FIXEDFILEINFO is plain integers (any bit pattern is valid).
    let info = unsafe { std::ptr::read_unaligned(value.cast::<VS_FIXEDFILEINFO>()) };
    if info.dwSignature != VS_FFI_SIGNATURE {
        return Ok(None);
    }
    let (ms, ls) = (info.dwFileVersionMS, info.dwFileVersionLS);
    Ok(Some(format!("{}.{}.{}.{}", ms >> 16, ms & 0xFFFF, ls >> 16, ls & 0xFFFF)))
}

/// The path under HKLM of a rule's key (`HKLM\SOFTWARE\X` or `HKEY_LOCAL_MACHINE\SOFTWARE\X`).
fn hklm_path(key: &str) -> PResult<&str> {
    let (hive, path) = key.split_once('\\').unwrap_or((key, ""));
    let path = path.trim_end_matches('\\');
    if !(hive.eq_ignore_ascii_case("HKLM") || hive.eq_ignore_ascii_case("HKEY_LOCAL_MACHINE")) || path.is_empty() {
        return Err(PlatformError::Invalid {
            what: "registry detection rule",
            detail: format!("{key:?} is not a key under HKLM\\ such as HKLM\\SOFTWARE\\Vendor\\App"),
        });
    }
    Ok(path)
}

/// An HKLM value in the 32-bit (`view32`) or 64-bit view exists / equals / is at least a version.
fn registry_detected(key: &str, name: &str, check: &RegistryCheck, view32: bool) -> PResult<bool> {
    let path = hklm_path(key)?;
    let view = if view32 { KEY_WOW64_32KEY } else { KEY_WOW64_64KEY };
    let k = match RegKey::predef(HKEY_LOCAL_MACHINE).open_subkey_with_flags(path, KEY_QUERY_VALUE | view) {
        Ok(k) => k,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io_err("opening a detection rule's registry key", key, e)),
    };
    let raw = match k.get_raw_value(name) {
        Ok(raw) => raw,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io_err("reading a detection rule's registry value", format!("{key}\\{name}"), e)),
    };
    // A REG_SZ ends at its first NUL, as Windows programs read it.
    let text = || match raw.vtype {
        RegType::REG_SZ | RegType::REG_EXPAND_SZ => {
            String::from_reg_value(&raw).ok().map(|s| s.split('\0').next().unwrap_or_default().to_string())
        }
        _ => None,
    };
    let number = || match raw.vtype {
        RegType::REG_DWORD => u32::from_reg_value(&raw).ok().map(u64::from),
        RegType::REG_QWORD => u64::from_reg_value(&raw).ok(),
        _ => None,
    };
    Ok(match check {
        RegistryCheck::Exists => true,
        RegistryCheck::Equals(want) => match (text(), number()) {
            (Some(s), _) => s.to_lowercase() == want.to_lowercase(),
            (None, Some(n)) => n.to_string() == want.trim(),
            (None, None) => false,
        },
        RegistryCheck::VersionAtLeast(min) => text().and_then(|s| compare_versions(&s, min)).is_some_and(|o| o.is_ge()),
    })
}

// ---- Running an installer ----

/// `%SystemRoot%\System32` as Windows reports it (`GetSystemDirectoryW`), never from the
/// environment.
pub fn system_directory() -> PResult<PathBuf> {
    let mut buf = vec![0u16; 260];
    loop {
        // SAFETY: `buf` is a live, writable slice; the function writes at most its length.
        let n = unsafe { GetSystemDirectoryW(Some(&mut buf)) } as usize;
        if n == 0 {
            return Err(os_err("GetSystemDirectoryW", last_error(), "the System32 directory"));
        }
        if n < buf.len() {
            use std::os::windows::ffi::OsStringExt;
            return Ok(PathBuf::from(std::ffi::OsString::from_wide(&buf[..n])));
        }
        // Too small: `n` is the size needed, terminating NUL included.
        buf.resize(n + 1, 0);
    }
}

/// The executable a command names: a bare name (`msiexec.exe`, `cmd.exe`, `powershell.exe`) is
/// the one in System32 (PowerShell's lives in `System32\WindowsPowerShell\v1.0`), never one found
/// through `PATH` or the current directory; anything else must be an absolute path.
pub fn resolve_program(program: &str) -> PResult<PathBuf> {
    let p = program.trim();
    let invalid = |why: &str| PlatformError::Invalid { what: "installer command", detail: format!("{p:?} {why}") };
    if p.is_empty() {
        return Err(invalid("is empty"));
    }
    if !p.contains(['\\', '/', ':']) {
        if p == "." || p == ".." {
            return Err(invalid("is not a program name"));
        }
        let system = system_directory()?;
        if p.eq_ignore_ascii_case("powershell.exe") || p.eq_ignore_ascii_case("powershell") {
            return Ok(system.join(r"WindowsPowerShell\v1.0\powershell.exe"));
        }
        return Ok(system.join(p));
    }
    let path = Path::new(p);
    if !path.is_absolute() {
        return Err(invalid("is neither a program in System32 nor an absolute path such as C:\\dir\\setup.exe"));
    }
    Ok(path.to_path_buf())
}

/// Where an installer runs: the content's directory, as Intune does, so a script or setup that
/// opens files beside itself finds them. That is the program's directory for content run
/// directly, else the directory of the first argument naming an existing file (the `.msi` of
/// `msiexec /i`, the script of `cmd /c` or `powershell -File`), else System32.
fn working_directory(program: &Path, bare: bool, args: &[String]) -> PResult<PathBuf> {
    if !bare {
        if let Some(dir) = program.parent().filter(|d| d.is_dir()) {
            return Ok(dir.to_path_buf());
        }
    }
    let content = args.iter().map(Path::new).find(|a| a.is_absolute() && a.is_file());
    match content.and_then(Path::parent) {
        Some(dir) => Ok(dir.to_path_buf()),
        None => system_directory(),
    }
}

/// Runs `run.command` with its output in `run.output`, inside a job object, and waits at most
/// `run.timeout`; then the whole process tree is killed and the run is [`RunEnd::TimedOut`].
///
/// The process starts suspended (`CREATE_SUSPENDED`), is put into a new job object with
/// `JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE`, and only then resumed: nothing it starts can escape the
/// job (no breakaway is allowed), and if the agent dies mid-run the job handle closes and the
/// tree dies with it. On a timeout `TerminateJobObject` kills every process in the job.
///
/// When the installer exits by itself, what it left running (an installed application it
/// started, a bootstrapper's real setup still finishing) is let go: the kill-on-close limit is
/// cleared before the handle is closed, as Intune leaves such processes alone. The exit code is
/// the installer's own, as the unsigned 32-bit value Windows gives (0xC0000005 is 3221225477).
pub fn run_installer(run: &InstallerRun<'_>) -> PResult<RunEnd> {
    let command = run.command;
    let bare = !command.program.trim().contains(['\\', '/', ':']);
    let program = resolve_program(&command.program)?;
    let cwd = working_directory(&program, bare, &command.args)?;
    let output = run.output.display().to_string();
    let out = File::create(run.output).map_err(|e| io_err("creating the installer's output file", &output, e))?;
    let err = out.try_clone().map_err(|e| io_err("creating the installer's output file", &output, e))?;

    let mut cmd = std::process::Command::new(&program);
    cmd.args(&command.args);
    if !command.raw_args.is_empty() {
        cmd.raw_arg(&command.raw_args);
    }
    cmd.current_dir(&cwd)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .creation_flags((CREATE_NO_WINDOW | CREATE_SUSPENDED).0);

    if run.detached {
        // The agent's own upgrade: outside the agent's job (which dies with the service msiexec
        // stops) and not awaited; detection by the new agent tells how it went.
        cmd.creation_flags((CREATE_NO_WINDOW | DETACHED_PROCESS | CREATE_BREAKAWAY_FROM_JOB).0);
        cmd.spawn().map_err(|e| spawn_err(&program, e))?;
        return Ok(RunEnd::HandedOff);
    }
    let job = Job::new()?;
    // The arguments may carry secrets (license keys): errors name the program only.
    let mut child = cmd.spawn().map_err(|e| spawn_err(&program, e))?;
    let process = HANDLE(child.as_raw_handle());
    if let Err(e) = job.assign(process).and_then(|()| resume_process(child.id())) {
        // Still suspended (or only just resumed): nothing ran that needs more than this.
        let _ = job.terminate(ERROR_INVALID_PARAMETER);
        let _ = child.kill();
        let _ = child.wait();
        return Err(e);
    }

    let deadline = Instant::now() + run.timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        // At most an hour per wait, so a 24 h timeout never comes near INFINITE (u32::MAX ms).
        let ms = left.as_millis().min(3_600_000) as u32;
        // SAFETY: `process` is the child's process handle, owned by `child`, which outlives the wait.
        let rc = unsafe { WaitForSingleObject(process, ms) };
        if rc == WAIT_OBJECT_0 {
            break;
        }
        if rc == WAIT_TIMEOUT {
            if Instant::now() >= deadline {
                stop_tree(&job, &mut child, process);
                return Ok(RunEnd::TimedOut);
            }
            continue;
        }
        let code = last_error();
        stop_tree(&job, &mut child, process);
        return Err(os_err("waiting for the installer", code, program.display()));
    }
    let status = child.wait().map_err(|e| io_err("reading the installer's exit code", program.display(), e))?;
    let code = status.code().map(|c| c as u32).unwrap_or(0);
    let left = job.active_processes().unwrap_or(0);
    if left > 0 {
        // Under Wine (and for a moment on Windows) the console host of a console installer counts.
        tracing::debug!(
            package = run.package,
            processes = left,
            "the installer exited and left processes running; they are not stopped"
        );
    }
    job.release();
    Ok(RunEnd::Exited(i64::from(code)))
}

/// Kills the whole job (the installer and everything it started) and waits for the installer to
/// be gone, a bounded time.
fn stop_tree(job: &Job, child: &mut Child, process: HANDLE) {
    if job.terminate(ERROR_TIMEOUT).is_err() {
        // Only the installer itself, then; closing the job handle (kill on close) does the rest.
        let _ = child.kill();
    }
    // SAFETY: `process` is owned by `child`, alive for this call.
    let rc = unsafe { WaitForSingleObject(process, KILL_GRACE.as_millis() as u32) };
    if rc == WAIT_OBJECT_0 {
        let _ = child.wait();
    } else {
        tracing::warn!("an installer that timed out did not exit within {} s of being killed", KILL_GRACE.as_secs());
    }
}

/// Resumes the (one) thread of a process created suspended. `std` keeps the main thread handle
/// CreateProcessW returned to itself, so the thread is found by a ToolHelp snapshot; the
/// process handle `std` holds keeps the id from being reused meanwhile.
fn resume_process(pid: u32) -> PResult<()> {
    const WHAT: &str = "resuming the installer's thread";
    // SAFETY: no pointers; the snapshot handle is owned by `Owned`, which closes it.
    let snapshot = Owned(unsafe { CreateToolhelp32Snapshot(TH32CS_SNAPTHREAD, 0) }.map_err(|e| win_err(WHAT, pid, e))?);
    let mut entry = THREADENTRY32 { dwSize: std::mem::size_of::<THREADENTRY32>() as u32, ..Default::default() };
    let mut resumed = 0;
    // SAFETY: `snapshot.0` is a live snapshot handle; `entry` is a live THREADENTRY32 whose dwSize
    // says its size.
    let mut more = unsafe { Thread32First(snapshot.0, &mut entry) }.is_ok();
    while more {
        if entry.th32OwnerProcessID == pid {
            // SAFETY: no pointers; the thread handle is owned by `Owned`, which closes it.
            let thread = Owned(
                unsafe { OpenThread(THREAD_SUSPEND_RESUME, false, entry.th32ThreadID) }
                    .map_err(|e| win_err(WHAT, pid, e))?,
            );
            // SAFETY: `thread.0` is a live thread handle with THREAD_SUSPEND_RESUME access.
            if unsafe { ResumeThread(thread.0) } == u32::MAX {
                return Err(os_err(WHAT, last_error(), pid));
            }
            resumed += 1;
        }
        entry.dwSize = std::mem::size_of::<THREADENTRY32>() as u32;
        // SAFETY: as for Thread32First.
        more = unsafe { Thread32Next(snapshot.0, &mut entry) }.is_ok();
    }
    if resumed == 0 {
        return Err(PlatformError::Os {
            what: WHAT,
            code: ERROR_NOT_FOUND,
            detail: format!("no thread of process {pid} in the ToolHelp snapshot"),
        });
    }
    Ok(())
}

/// A job object for one installer run.
struct Job(Owned);

impl Job {
    fn new() -> PResult<Self> {
        // SAFETY: no security attributes (the handle is not inheritable) and no name.
        let handle = unsafe { CreateJobObjectW(None, PCWSTR::null()) }
            .map_err(|e| win_err("CreateJobObjectW", "the installer's job object", e))?;
        let job = Job(Owned(handle));
        job.set_limits(JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE)?;
        Ok(job)
    }

    fn set_limits(&self, flags: JOB_OBJECT_LIMIT) -> PResult<()> {
        let mut limits = JOBOBJECT_EXTENDED_LIMIT_INFORMATION::default();
        limits.BasicLimitInformation.LimitFlags = flags;
        // SAFETY: the job handle is live; `limits` is a live struct of the size passed, read only.
        unsafe {
            SetInformationJobObject(
                self.0 .0,
                JobObjectExtendedLimitInformation,
                (&limits as *const JOBOBJECT_EXTENDED_LIMIT_INFORMATION).cast(),
                std::mem::size_of::<JOBOBJECT_EXTENDED_LIMIT_INFORMATION>() as u32,
            )
        }
        .map_err(|e| win_err("SetInformationJobObject", "the installer's job object", e))
    }

    fn assign(&self, process: HANDLE) -> PResult<()> {
        // SAFETY: both handles are live: the job's and the child's (owned by its `Child`).
        unsafe { AssignProcessToJobObject(self.0 .0, process) }
            .map_err(|e| win_err("AssignProcessToJobObject", "the installer's job object", e))
    }

    fn terminate(&self, exit_code: u32) -> PResult<()> {
        // SAFETY: the job handle is live.
        unsafe { TerminateJobObject(self.0 .0, exit_code) }
            .map_err(|e| win_err("TerminateJobObject", "the installer's job object", e))
    }

    /// Processes still running in the job.
    fn active_processes(&self) -> Option<u32> {
        let mut info = JOBOBJECT_BASIC_ACCOUNTING_INFORMATION::default();
        // SAFETY: the job handle is live; `info` is a live, writable struct of the size passed.
        unsafe {
            QueryInformationJobObject(
                Some(self.0 .0),
                JobObjectBasicAccountingInformation,
                (&mut info as *mut JOBOBJECT_BASIC_ACCOUNTING_INFORMATION).cast(),
                std::mem::size_of::<JOBOBJECT_BASIC_ACCOUNTING_INFORMATION>() as u32,
                None,
            )
        }
        .ok()
        .map(|()| info.ActiveProcesses)
    }

    /// Lets what is left in the job run on once the handle closes.
    fn release(self) {
        if let Err(e) = self.set_limits(JOB_OBJECT_LIMIT(0)) {
            tracing::warn!(error = %e, "could not clear kill-on-close; processes the installer left are stopped");
        }
    }
}

/// A handle closed on drop.
struct Owned(HANDLE);

impl Drop for Owned {
    fn drop(&mut self) {
        // SAFETY: the handle is owned by this value and closed exactly once, here.
        let _ = unsafe { CloseHandle(self.0) };
    }
}

// ---- Disk space ----

/// Bytes free to this process (quotas counted) on the volume of `path`, or of its nearest
/// existing ancestor directory (the content's folder need not exist yet).
pub fn free_disk_bytes(path: &Path) -> PResult<Option<u64>> {
    let dir = path.ancestors().find(|a| a.is_dir()).unwrap_or(path);
    // A trailing backslash: required for a UNC share root, harmless elsewhere.
    let mut text: Vec<u16> = dir.as_os_str().encode_wide().collect();
    if text.last() != Some(&u16::from(b'\\')) {
        text.push(u16::from(b'\\'));
    }
    text.push(0);
    let mut free = 0u64;
    // SAFETY: `text` is NUL-terminated and lives across the call; `free` is a live u64 out-param;
    // the two totals are not asked for.
    unsafe { GetDiskFreeSpaceExW(PCWSTR(text.as_ptr()), Some(&mut free), None, None) }
        .map_err(|e| win_err("GetDiskFreeSpaceExW", dir.display(), e))?;
    Ok(Some(free))
}

// ---- Helpers ----

fn wide(s: &str) -> Vec<u16> {
    s.encode_utf16().chain(std::iter::once(0)).collect()
}

fn wide_os(s: &OsStr) -> Vec<u16> {
    s.encode_wide().chain(std::iter::once(0)).collect()
}

fn last_error() -> u32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0) as u32
}

/// "Not there": a missing file, directory, drive or medium.
fn io_not_there(e: &std::io::Error) -> bool {
    e.kind() == ErrorKind::NotFound
        || matches!(
            e.raw_os_error().map(|c| c as u32),
            Some(ERROR_FILE_NOT_FOUND | ERROR_PATH_NOT_FOUND | ERROR_INVALID_DRIVE | ERROR_NOT_READY | ERROR_DIRECTORY)
        )
}

fn os_err(what: &'static str, code: u32, subject: impl std::fmt::Display) -> PlatformError {
    PlatformError::Os { what, code, detail: format!("{subject}: {}", std::io::Error::from_raw_os_error(code as i32)) }
}

fn win_err(what: &'static str, subject: impl std::fmt::Display, e: ::windows::core::Error) -> PlatformError {
    PlatformError::Os { what, code: e.code().0 as u32, detail: format!("{subject}: {}", e.message()) }
}

fn io_err(what: &'static str, subject: impl std::fmt::Display, e: std::io::Error) -> PlatformError {
    match e.raw_os_error() {
        Some(code) => PlatformError::Os { what, code: code as u32, detail: format!("{subject}: {e}") },
        None => PlatformError::Io { what, source: e },
    }
}

/// A process that could not start is an OS error, with the code CreateProcessW gave.
fn spawn_err(program: &Path, e: std::io::Error) -> PlatformError {
    let code = match e.raw_os_error() {
        Some(c) => c as u32,
        None if e.kind() == ErrorKind::NotFound => ERROR_FILE_NOT_FOUND,
        None => ERROR_INVALID_PARAMETER,
    };
    PlatformError::Os { what: "starting the installer", code, detail: format!("{}: {e}", program.display()) }
}
