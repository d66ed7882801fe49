//! Software packages on the Windows platform against the real Win32 APIs: detection rules,
//! installers run through `Platform::run_installer` with the command lines tenon-core builds
//! (`install_command` / `uninstall_command`), and free disk space. Run under Wine by
//! `scripts/test-windows`, which builds the packages with `scripts/build-test-packages` and
//! passes them in `TENON_PKG_*` (Windows paths):
//!   TENON_PKG_MSI_V1, TENON_PKG_MSI_V1_PRODUCT_CODE, TENON_PKG_MSI_V2, TENON_PKG_MSI_V2_PRODUCT_CODE
//!   TENON_PKG_FAKE_INSTALLER, TENON_PKG_FAKE_INSTALLER_VERSION, TENON_PKG_SCRIPT_1641
//! Outside the harness (no `TENON_PKG_*`) the tests that need packages say so and pass.
//!
//! What Wine 8 (Debian 8.0) does, as these tests (and small C probes) found it:
//! - `MsiQueryProductStateW` answers as Windows does: INSTALLSTATE_UNKNOWN (-1) before
//!   `msiexec /i`, INSTALLSTATE_DEFAULT (5) after it, -1 again for 1.0.0's code once 2.0.0's major
//!   upgrade removed it and for 2.0.0's after `msiexec /x`; INSTALLSTATE_INVALIDARG (-2) for a
//!   malformed code. Wine's msiexec writes the Uninstall key of an x64 package in the 64-bit view
//!   only, and its `/l*v` log.
//! - Version resources (`GetFileVersionInfoSizeW` / `GetFileVersionInfoW` / `VerQueryValueW`)
//!   work, for the mingw-built EXE and Wine's own DLLs. A text file has none
//!   (ERROR_RESOURCE_DATA_NOT_FOUND, 1812); a folder gives ERROR_ACCESS_DENIED (5), which is why
//!   a folder is never asked.
//! - Exit codes keep all 32 bits (0xC0000005 reads back as 3221225477); `cmd /c x.cmd` returns
//!   the script's `exit /b` code.
//! - Job objects: see `timeout_kills_the_installer_and_the_child_it_started`.
#![cfg(windows)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tenon_agent::platform::windows::software::{file_version, resolve_program, system_directory};
use tenon_agent::platform::windows::WindowsPlatform;
use tenon_agent::platform::{InstallerRun, Platform, PlatformError, RegValue};
use tenon_core::packages::{
    install_command, uninstall_command, Command, DetectRule, Kind, Package, RegistryCheck, RunEnd,
};

/// Where the tests write logs and outputs: a path with spaces, so arguments are quoted for real.
const WORK_DIR: &str = r"C:\tenon sw tests";
const APP_FILE: &str = r"C:\Program Files\TenonTestApp\app.txt";
const UNINSTALL_KEY: &str = r"HKLM\SOFTWARE\Microsoft\Windows\CurrentVersion\Uninstall";
const DETECT_KEY: &str = r"HKLM\SOFTWARE\TenonTestDetect";
const EXE_KEY: &str = r"HKLM\SOFTWARE\TenonTestExe";

fn p() -> WindowsPlatform {
    WindowsPlatform::new()
}

fn under_wine() -> bool {
    std::env::var("TENON_UNDER_WINE").as_deref() == Ok("1")
}

/// A value the harness must provide; outside the harness `None` with a note.
fn harness_env(name: &str) -> Option<String> {
    let v = std::env::var(name).ok().filter(|v| !v.is_empty());
    if v.is_none() {
        assert!(!under_wine(), "the harness must set {name}");
        eprintln!("{name} not set: not run by scripts/test-windows, no test packages");
    }
    v
}

fn work(name: &str) -> PathBuf {
    std::fs::create_dir_all(WORK_DIR).unwrap();
    Path::new(WORK_DIR).join(name)
}

fn package(name: &str, version: &str, kind: Kind, file: &str, detect: DetectRule) -> Package {
    Package {
        self_update: false,
        name: name.into(),
        version: version.into(),
        kind,
        sha256: String::new(),
        size: 0,
        file_name: file.rsplit('\\').next().unwrap_or(file).into(),
        install_args: String::new(),
        uninstall_args: String::new(),
        detect,
        depends_on: vec![],
        order: 0,
        timeout_secs: 300,
    }
}

/// Runs `command` for `pkg` through the platform, output in `output`.
fn run(pkg: &Package, command: &Command, uninstall: bool, output: &Path, timeout: Duration) -> RunEnd {
    let run = InstallerRun {
        package: &pkg.name,
        version: &pkg.version,
        kind: pkg.kind,
        detect: &pkg.detect,
        uninstall,
        command,
        output,
        timeout,
        detached: false,
    };
    p().run_installer(&run).unwrap_or_else(|e| panic!("{}: {e}", command.display()))
}

fn msi_rule(code: &str) -> DetectRule {
    DetectRule::parse(&format!("msi:{code}")).unwrap()
}

fn detect(rule: &DetectRule) -> bool {
    p().detect(rule).unwrap_or_else(|e| panic!("{rule}: {e}"))
}

fn registry_rule(key: &str, name: &str, check: RegistryCheck, view32: bool) -> DetectRule {
    DetectRule::Registry { key: key.into(), name: name.into(), check, view32 }
}

fn uninstall_key_exists(code: &str) -> bool {
    use winreg::enums::{HKEY_LOCAL_MACHINE, KEY_READ, KEY_WOW64_64KEY};
    let path = format!(r"{}\{code}", UNINSTALL_KEY.trim_start_matches(r"HKLM\"));
    winreg::RegKey::predef(HKEY_LOCAL_MACHINE).open_subkey_with_flags(path, KEY_READ | KEY_WOW64_64KEY).is_ok()
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

#[test]
fn msi_install_upgrade_and_uninstall_through_msiexec() {
    let (Some(v1), Some(v1_code), Some(v2), Some(v2_code)) = (
        harness_env("TENON_PKG_MSI_V1"),
        harness_env("TENON_PKG_MSI_V1_PRODUCT_CODE"),
        harness_env("TENON_PKG_MSI_V2"),
        harness_env("TENON_PKG_MSI_V2_PRODUCT_CODE"),
    ) else {
        return;
    };
    let pkg1 = package("Tenon Test App", "1.0.0", Kind::Msi, &v1, msi_rule(&v1_code));
    let pkg2 = package("Tenon Test App", "2.0.0", Kind::Msi, &v2, msi_rule(&v2_code));
    let app = DetectRule::File { path: APP_FILE.into(), min_version: None };
    let arp_v1 = format!(r"{UNINSTALL_KEY}\{v1_code}");
    let arp_v2 = format!(r"{UNINSTALL_KEY}\{v2_code}");
    assert!(!detect(&pkg1.detect), "{v1_code} is not installed yet");
    assert!(!detect(&pkg2.detect), "{v2_code} is not installed yet");
    assert!(!detect(&app), "{APP_FILE} is not there yet");

    // 1.0.0: msiexec /i app-1.0.0.msi /qn /norestart /l*v LOG
    let log1 = work("install 1.0.0.log");
    let cmd = install_command(&pkg1, &v1, &log1.display().to_string());
    assert_eq!(cmd.program, "msiexec.exe");
    assert_eq!(run(&pkg1, &cmd, false, &work("install 1.0.0.out"), Duration::from_secs(300)), RunEnd::Exited(0));
    assert!(detect(&pkg1.detect), "MsiQueryProductStateW({v1_code}) says installed after msiexec /i");
    assert!(detect(&app), "{APP_FILE} installed");
    assert!(Path::new(APP_FILE).is_file());
    assert!(uninstall_key_exists(&v1_code), "{arp_v1} exists in the 64-bit view");
    let display_name = registry_rule(&arp_v1, "DisplayName", RegistryCheck::Equals("TENON TEST APP".into()), false);
    assert!(detect(&display_name), "{arp_v1}\\DisplayName is Tenon Test App (case-insensitive)");
    let display_version =
        |min: &str, view32| registry_rule(&arp_v1, "DisplayVersion", RegistryCheck::VersionAtLeast(min.into()), view32);
    assert!(detect(&display_version("1.0", false)), "{arp_v1}\\DisplayVersion >= 1.0");
    assert!(!detect(&display_version("1.0.1", false)), "{arp_v1}\\DisplayVersion < 1.0.1");
    assert!(!detect(&display_version("1.0", true)), "an x64 package is not in the 32-bit view");
    assert!(file_len(&log1) > 0, "msiexec wrote its log to {}", log1.display());
    // A text file has no version resource: a minimum version is never met.
    assert!(!detect(&DetectRule::File { path: APP_FILE.into(), min_version: Some("0.1".into()) }));

    // 2.0.0 replaces it (MajorUpgrade).
    let log2 = work("install 2.0.0.log");
    let cmd = install_command(&pkg2, &v2, &log2.display().to_string());
    assert_eq!(run(&pkg2, &cmd, false, &work("install 2.0.0.out"), Duration::from_secs(300)), RunEnd::Exited(0));
    assert!(detect(&pkg2.detect), "{v2_code} installed by the upgrade");
    assert!(!detect(&pkg1.detect), "{v1_code} removed by the upgrade");
    assert!(detect(&app), "{APP_FILE} is there after the upgrade");
    assert_eq!(std::fs::read_to_string(APP_FILE).unwrap().trim(), "Tenon Test App 2.0.0");
    assert!(uninstall_key_exists(&v2_code) && !uninstall_key_exists(&v1_code), "{arp_v2} replaced {arp_v1}");
    assert!(file_len(&log2) > 0);

    // msiexec /x {v2} /qn /norestart /l*v LOG
    let log3 = work("uninstall 2.0.0.log");
    let cmd = uninstall_command(&pkg2, &v2, &log3.display().to_string()).expect("an MSI can be uninstalled");
    assert_eq!(cmd.args[..2], ["/x".to_string(), v2_code.clone()]);
    assert_eq!(run(&pkg2, &cmd, true, &work("uninstall 2.0.0.out"), Duration::from_secs(300)), RunEnd::Exited(0));
    assert!(!detect(&pkg2.detect), "{v2_code} gone after msiexec /x");
    assert!(!detect(&app) && !Path::new(APP_FILE).exists(), "{APP_FILE} removed");
    assert!(!uninstall_key_exists(&v2_code), "{arp_v2} removed");
    assert!(file_len(&log3) > 0);
}

#[test]
fn msi_detection_of_unknown_and_malformed_product_codes() {
    assert!(!detect(&msi_rule("{00000000-1111-2222-3333-444444444444}")));
    // Lower case and without braces is the same code.
    let rule = DetectRule::Msi { product_code: "00000000-1111-2222-3333-444444444444".into() };
    assert!(!p().detect(&rule).unwrap());
    let bad = DetectRule::Msi { product_code: "not-a-guid".into() };
    assert!(matches!(p().detect(&bad), Err(PlatformError::Os { code: 87, .. })), "{:?}", p().detect(&bad));
}

#[test]
fn exe_installer_exit_codes_output_and_effects() {
    let Some(exe) = harness_env("TENON_PKG_FAKE_INSTALLER") else { return };
    let marker = work("exe marker.txt");
    let installed = registry_rule(EXE_KEY, "Installed", RegistryCheck::Equals("1.2.3.4".into()), false);
    let mut pkg = package("Fake Installer", "1.2.3.4", Kind::Exe, &exe, installed.clone());
    let _ = std::fs::remove_file(&marker);
    let _ = p().reg_delete(EXE_KEY, "Installed");
    assert!(!detect(&installed));

    // Success: the marker file and registry value are written, both output streams captured.
    pkg.install_args = format!(r#"/exit 0 /reg /marker "{}""#, marker.display());
    let out = work("exe install.out");
    let cmd = install_command(&pkg, &exe, "unused.log");
    assert_eq!((cmd.program.as_str(), cmd.args.len()), (exe.as_str(), 0));
    assert_eq!(run(&pkg, &cmd, false, &out, Duration::from_secs(120)), RunEnd::Exited(0));
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.contains("fake-installer: stdout, exit 0"), "stdout in {}: {text:?}", out.display());
    assert!(text.contains("fake-installer: stderr"), "stderr in {}: {text:?}", out.display());
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "installed 1.2.3.4\n");
    assert!(detect(&installed), "{EXE_KEY}\\Installed written by the installer");

    // Exit codes pass through untouched: reboot required, a failure, and one above i32::MAX.
    for code in [3010u32, 5, 1618, 0xC000_0005] {
        pkg.install_args = format!("/exit {code}");
        let end = run(&pkg, &install_command(&pkg, &exe, "unused.log"), false, &out, Duration::from_secs(120));
        assert_eq!(end, RunEnd::Exited(i64::from(code)), "/exit {code}");
    }

    // The uninstall command is the content with the uninstall arguments.
    pkg.uninstall_args = format!(r#"/uninstall /reg /marker "{}""#, marker.display());
    let cmd = uninstall_command(&pkg, &exe, "unused.log").unwrap();
    assert_eq!(run(&pkg, &cmd, true, &out, Duration::from_secs(120)), RunEnd::Exited(0));
    assert!(!marker.exists() && !detect(&installed), "uninstall removed the marker and the value");
    assert!(p().reg_get(EXE_KEY, "Installed").unwrap().is_none());
}

#[test]
fn file_detection_compares_the_version_resource() {
    let (Some(exe), Some(version), Some(script)) = (
        harness_env("TENON_PKG_FAKE_INSTALLER"),
        harness_env("TENON_PKG_FAKE_INSTALLER_VERSION"),
        harness_env("TENON_PKG_SCRIPT_1641"),
    ) else {
        return;
    };
    assert_eq!(file_version(Path::new(&exe)).unwrap().as_deref(), Some(version.as_str()));
    assert_eq!(version, "1.2.3.4", "the fixture's FILEVERSION");
    let rule = |min: Option<&str>| DetectRule::File { path: exe.clone(), min_version: min.map(str::to_string) };
    for (min, expected) in [
        (None, true),
        (Some("1.2.3.4"), true),
        (Some("1.2.3"), true),
        (Some("1.2"), true),
        (Some("0.9.99.99"), true),
        (Some("1.2.3.5"), false),
        (Some("1.10"), false),
        (Some("2.0"), false),
    ] {
        assert_eq!(detect(&rule(min)), expected, "{exe} >= {min:?}");
    }
    // No version resource (a script), a folder, and nothing there.
    assert_eq!(file_version(Path::new(&script)).unwrap(), None);
    assert!(detect(&DetectRule::File { path: script.clone(), min_version: None }));
    assert!(!detect(&DetectRule::File { path: script, min_version: Some("0.0.0.1".into()) }));
    let dir = system_directory().unwrap().display().to_string();
    assert!(detect(&DetectRule::File { path: dir.clone(), min_version: None }), "a folder exists");
    assert!(!detect(&DetectRule::File { path: dir, min_version: Some("1.0".into()) }), "a folder has no version");
    assert!(!detect(&DetectRule::File { path: r"C:\no such dir\app.exe".into(), min_version: None }));
    assert!(!detect(&DetectRule::File { path: r"C:\no such dir\app.exe".into(), min_version: Some("1".into()) }));
    // A system DLL has a version resource too (Wine's say 10.0 or 5.x; any version is fine).
    let kernel32 = system_directory().unwrap().join("kernel32.dll");
    let v = file_version(&kernel32).unwrap();
    assert!(v.is_some(), "{} has a version resource", kernel32.display());
    eprintln!("{}: {}", kernel32.display(), v.unwrap());
}

#[test]
fn script_exit_code_passes_through_cmd() {
    let Some(script) = harness_env("TENON_PKG_SCRIPT_1641") else { return };
    let rule = DetectRule::File { path: r"C:\no such dir\never.txt".into(), min_version: None };
    let pkg = package("Script 1641", "1", Kind::Script, &script, rule);
    let cmd = install_command(&pkg, &script, "unused.log");
    assert_eq!((cmd.program.as_str(), cmd.args[0].as_str()), ("cmd.exe", "/c"));
    let out = work("script.out");
    assert_eq!(run(&pkg, &cmd, false, &out, Duration::from_secs(120)), RunEnd::Exited(1641));
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.contains("tenon-test-script ran"), "the script's echo in {}: {text:?}", out.display());
    // It ran in its own folder (the content's directory).
    let folder = Path::new(&script).parent().unwrap().display().to_string();
    assert!(
        text.to_lowercase().contains(&format!("ran in {}", folder.trim_end_matches('\\')).to_lowercase()),
        "the script ran in {folder}: {text:?}"
    );
}

#[test]
fn registry_detection_in_both_views() {
    use winreg::enums::{HKEY_LOCAL_MACHINE, KEY_ALL_ACCESS, KEY_WOW64_32KEY, KEY_WOW64_64KEY};
    let hklm = winreg::RegKey::predef(HKEY_LOCAL_MACHINE);
    let path = DETECT_KEY.trim_start_matches(r"HKLM\");
    let (k32, _) = hklm.create_subkey_with_flags(path, KEY_ALL_ACCESS | KEY_WOW64_32KEY).unwrap();
    k32.set_value("Only32", &"thirty-two").unwrap();
    k32.set_value("Version", &"3.2.0").unwrap();
    let pf = p();
    pf.reg_set(DETECT_KEY, "Only64", &RegValue::Sz("Sixty-Four".into())).unwrap();
    pf.reg_set(DETECT_KEY, "Version", &RegValue::Sz("6.4.1".into())).unwrap();
    pf.reg_set(DETECT_KEY, "Dword", &RegValue::Dword(3010)).unwrap();
    let (k64, _) = hklm.create_subkey_with_flags(path, KEY_ALL_ACCESS | KEY_WOW64_64KEY).unwrap();
    k64.set_value("Qword", &5_000_000_000u64).unwrap();
    k64.set_raw_value(
        "Expand",
        &winreg::RegValue {
            vtype: winreg::enums::RegType::REG_EXPAND_SZ,
            bytes: "%SystemRoot%\\x\0".encode_utf16().flat_map(u16::to_le_bytes).collect::<Vec<u8>>().into(),
        },
    )
    .unwrap();
    k64.set_value("NotAVersion", &"beta").unwrap();
    // The 32-bit view really is WOW6432Node.
    assert!(pf.reg_get(r"HKLM\SOFTWARE\WOW6432Node\TenonTestDetect", "Only32").unwrap().is_some());

    let check = |name: &str, check: RegistryCheck, view32: bool, expected: bool| {
        let rule = registry_rule(DETECT_KEY, name, check, view32);
        assert_eq!(detect(&rule), expected, "{rule}");
    };
    use RegistryCheck::{Equals, Exists, VersionAtLeast};
    let s = |v: &str| v.to_string();
    check("Only32", Exists, true, true);
    check("Only32", Exists, false, false);
    check("Only64", Exists, false, true);
    check("Only64", Exists, true, false);
    check("Only64", Equals(s("sixty-four")), false, true);
    check("Only64", Equals(s("sixty")), false, false);
    check("Only32", Equals(s("THIRTY-TWO")), true, true);
    check("Version", VersionAtLeast(s("6.4")), false, true);
    check("Version", VersionAtLeast(s("6.4.2")), false, false);
    check("Version", VersionAtLeast(s("3.2")), true, true);
    check("Version", VersionAtLeast(s("6.4")), true, false);
    check("Dword", Equals(s("3010")), false, true);
    check("Dword", Equals(s("3011")), false, false);
    check("Dword", VersionAtLeast(s("1")), false, false);
    check("Qword", Equals(s("5000000000")), false, true);
    check("Expand", Equals(s("%systemroot%\\X")), false, true);
    check("NotAVersion", VersionAtLeast(s("1.0")), false, false);
    check("Missing", Exists, false, false);
    // The long hive name works; a missing key is not an error.
    let long = DETECT_KEY.replace("HKLM", "HKEY_LOCAL_MACHINE");
    assert!(detect(&registry_rule(&long, "Only64", Exists, false)));
    assert!(!detect(&registry_rule(r"HKLM\SOFTWARE\TenonNoSuchKey\Deeper", "x", Exists, false)));
    assert!(matches!(
        p().detect(&registry_rule(r"HKCU\SOFTWARE\X", "x", Exists, false)),
        Err(PlatformError::Invalid { .. })
    ));
    // The parsed form of a rule names the same thing.
    assert!(detect(&DetectRule::parse(r"registry:HKLM\SOFTWARE\TenonTestDetect:Only32=thirty-two@32").unwrap()));
    assert!(!detect(&DetectRule::parse(r"registry:HKLM\SOFTWARE\TenonTestDetect:Only32=thirty-two").unwrap()));

    hklm.delete_subkey_with_flags(path, KEY_WOW64_32KEY).unwrap();
    hklm.delete_subkey_with_flags(path, KEY_WOW64_64KEY).unwrap();
    check("Only32", Exists, true, false);
}

/// Whether a process id still names a running process.
fn process_running(pid: u32) -> bool {
    use windows::Win32::Foundation::{CloseHandle, WAIT_TIMEOUT};
    use windows::Win32::System::Threading::{
        OpenProcess, WaitForSingleObject, PROCESS_QUERY_LIMITED_INFORMATION, PROCESS_SYNCHRONIZE,
    };
    // SAFETY: no pointers; a handle we get is closed below.
    let Ok(h) = (unsafe { OpenProcess(PROCESS_SYNCHRONIZE | PROCESS_QUERY_LIMITED_INFORMATION, false, pid) }) else {
        return false; // no such process any more
    };
    // SAFETY: `h` is a live process handle with SYNCHRONIZE access.
    let running = unsafe { WaitForSingleObject(h, 0) } == WAIT_TIMEOUT;
    // SAFETY: `h` is ours, closed once.
    let _ = unsafe { CloseHandle(h) };
    running
}

/// What Wine 8 does: `CreateJobObjectW`, `SetInformationJobObject` (KILL_ON_JOB_CLOSE, and
/// clearing it again), `AssignProcessToJobObject` on the suspended installer, the ToolHelp
/// thread snapshot that finds its thread to resume, and `TerminateJobObject` all work as on
/// Windows. A process started by a process in the job is put in the job by wineserver (the job
/// counted 4 active processes here: the installer, its child and a conhost.exe for each, which
/// Wine starts for a console program run without a console), so the child dies with the
/// installer. Run without the job (tried by hand), the child outlives the timeout and this test
/// fails: it tests the job, not luck.
#[test]
fn timeout_kills_the_installer_and_the_child_it_started() {
    let Some(exe) = harness_env("TENON_PKG_FAKE_INSTALLER") else { return };
    let pidfile = work("child.pid");
    let beat = work("child.pid.beat");
    let _ = std::fs::remove_file(&pidfile);
    let _ = std::fs::remove_file(&beat);
    let rule = DetectRule::File { path: r"C:\no such dir\never.txt".into(), min_version: None };
    let mut pkg = package("Hangs", "1", Kind::Exe, &exe, rule);
    pkg.install_args = format!(r#"/sleep 60 /spawn-child "{}""#, pidfile.display());
    let cmd = install_command(&pkg, &exe, "unused.log");
    let t0 = Instant::now();
    let end = run(&pkg, &cmd, false, &work("timeout.out"), Duration::from_secs(3));
    let took = t0.elapsed();
    assert_eq!(end, RunEnd::TimedOut);
    assert!(took >= Duration::from_secs(3) && took < Duration::from_secs(10), "TimedOut after {took:?}");
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .unwrap_or_else(|e| panic!("the child wrote {}: {e}", pidfile.display()))
        .trim()
        .parse()
        .unwrap();
    // The child is gone: its process id names no running process and its heartbeat stopped.
    let deadline = Instant::now() + Duration::from_secs(5);
    while process_running(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!process_running(pid), "the installer's child {pid} was killed with it");
    let first = std::fs::read_to_string(&beat).unwrap_or_default();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(std::fs::read_to_string(&beat).unwrap_or_default(), first, "the child's heartbeat stopped");
}

/// An installer that exits by itself: what it left running (here a child that lives 4 s more)
/// is not killed when the job's handle closes (the kill-on-close limit is cleared first).
#[test]
fn an_installer_that_exits_lets_what_it_started_run_on() {
    let Some(exe) = harness_env("TENON_PKG_FAKE_INSTALLER") else { return };
    let pidfile = work("survivor.pid");
    let _ = std::fs::remove_file(&pidfile);
    let rule = DetectRule::File { path: r"C:\no such dir\never.txt".into(), min_version: None };
    let mut pkg = package("Leaves a child", "1", Kind::Exe, &exe, rule);
    pkg.install_args = format!(r#"/exit 0 /spawn-child "{}" /child-sleep 4"#, pidfile.display());
    let end =
        run(&pkg, &install_command(&pkg, &exe, "unused.log"), false, &work("survivor.out"), Duration::from_secs(60));
    assert_eq!(end, RunEnd::Exited(0));
    let deadline = Instant::now() + Duration::from_secs(5);
    let pid = loop {
        if let Some(pid) = std::fs::read_to_string(&pidfile).ok().and_then(|t| t.trim().parse::<u32>().ok()) {
            break pid;
        }
        assert!(Instant::now() < deadline, "the child wrote {}", pidfile.display());
        std::thread::sleep(Duration::from_millis(50));
    };
    std::thread::sleep(Duration::from_millis(500));
    assert!(process_running(pid), "the child {pid} the installer left still runs after run_installer returned");
    let deadline = Instant::now() + Duration::from_secs(15);
    while process_running(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!process_running(pid), "the child {pid} ended by itself");
}

#[test]
fn bare_program_names_resolve_to_system32_never_the_current_directory() {
    let system = system_directory().unwrap();
    assert!(system.join("cmd.exe").is_file(), "{}", system.display());
    assert_eq!(resolve_program("cmd.exe").unwrap(), system.join("cmd.exe"));
    assert_eq!(resolve_program("MSIEXEC.EXE").unwrap(), system.join("MSIEXEC.EXE"));
    assert_eq!(resolve_program("powershell.exe").unwrap(), system.join(r"WindowsPowerShell\v1.0\powershell.exe"));
    assert_eq!(resolve_program(r"C:\dir\setup.exe").unwrap(), PathBuf::from(r"C:\dir\setup.exe"));
    for bad in ["", r"dir\setup.exe", r"\dir\setup.exe", "C:setup.exe", ".."] {
        assert!(matches!(resolve_program(bad), Err(PlatformError::Invalid { .. })), "{bad:?}");
    }

    // A cmd.exe planted in the current directory is not the one that runs.
    let Some(exe) = harness_env("TENON_PKG_FAKE_INSTALLER") else { return };
    let plant = work("plant");
    std::fs::create_dir_all(&plant).unwrap();
    std::fs::copy(&exe, plant.join("cmd.exe")).unwrap();
    let before = std::env::current_dir().unwrap();
    std::env::set_current_dir(&plant).unwrap();
    let rule = DetectRule::File { path: r"C:\no such dir\never.txt".into(), min_version: None };
    let pkg = package("Exit 7", "1", Kind::Script, r"C:\x.cmd", rule);
    let cmd = Command { program: "cmd.exe".into(), args: vec!["/c".into()], raw_args: "exit 7".into(), log: None };
    let out = work("planted.out");
    let end = run(&pkg, &cmd, false, &out, Duration::from_secs(60));
    std::env::set_current_dir(before).unwrap();
    assert_eq!(end, RunEnd::Exited(7), "System32's cmd.exe ran `exit 7`");
    assert!(!std::fs::read_to_string(&out).unwrap().contains("fake-installer"), "the planted cmd.exe did not run");
}

#[test]
fn a_program_that_cannot_start_is_an_error_not_a_panic() {
    let rule = DetectRule::File { path: r"C:\no such dir\never.txt".into(), min_version: None };
    let pkg = package("Missing", "1", Kind::Exe, r"C:\no such dir\setup.exe", rule);
    let out = work("missing.out");
    let attempt = |program: &str, output: &Path| {
        let cmd = Command { program: program.into(), args: vec!["/s".into()], raw_args: String::new(), log: None };
        let run = InstallerRun {
            package: &pkg.name,
            version: &pkg.version,
            kind: pkg.kind,
            detect: &pkg.detect,
            uninstall: false,
            command: &cmd,
            output,
            timeout: Duration::from_secs(10),
            detached: false,
        };
        p().run_installer(&run)
    };
    for program in [r"C:\no such dir\setup.exe", r"C:\setup-that-is-not-there.exe", "tenon-no-such-tool.exe"] {
        match attempt(program, &out) {
            Err(PlatformError::Os { code, what, detail }) => {
                assert!(code == 2 || code == 3, "{program}: {what} {code} {detail}");
                eprintln!("{program}: {what}: {detail}");
            }
            other => panic!("{program}: expected an OS error, got {other:?}"),
        }
    }
    assert!(matches!(attempt(r"relative\setup.exe", &out), Err(PlatformError::Invalid { .. })));
    // An output file that cannot be created is an error too.
    let r = attempt("cmd.exe", Path::new(r"C:\no such dir\out.txt"));
    assert!(matches!(r, Err(PlatformError::Os { .. })), "{r:?}");
}

#[test]
fn free_disk_space_of_the_system_drive() {
    let pf = p();
    let free = pf.free_disk_bytes(Path::new(r"C:\")).unwrap().expect("known on Windows");
    assert!(free > 0, "C:\\ has free space");
    // A folder that does not exist yet counts on its volume's nearest existing folder.
    let later = pf.free_disk_bytes(Path::new(r"C:\ProgramData\Tenon\packages\not yet\setup.exe")).unwrap();
    assert!(later.is_some_and(|b| b > 0), "{later:?}");
    let r = pf.free_disk_bytes(Path::new(r"Q:\nothing\here"));
    assert!(matches!(r, Err(PlatformError::Os { .. })), "no Q: drive: {r:?}");
}
