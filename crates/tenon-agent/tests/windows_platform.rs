//! The Windows platform against the real Win32 APIs. Run under Wine by `scripts/test-windows`, which
//! sets the environment these tests compare against (values it wrote with `wine reg add`, the
//! hostname, the namespace's gateway) and checks from outside what they leave behind
//! (`wine reg query` of the marker values). Under Wine (`TENON_UNDER_WINE=1`) the operations Wine
//! lacks (TPM, BitLocker, ARP) must fail with `PlatformError::Unavailable`.
#![cfg(windows)]

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;
use tenon_agent::platform::windows::{
    dir_dacl_sddl, process_memory, program_data_dir, restrict_dir_to_system_and_admins, WindowsPlatform,
};
use tenon_agent::platform::{default_gateway, Account, Platform, PlatformError, RegValue, SessionUser};

const TEST_KEY: &str = r"HKLM\SOFTWARE\TenonTest\RoundTrip";
/// Left behind for the harness to read with `wine reg query`.
const MARKER_KEY: &str = r"HKLM\SOFTWARE\TenonHarness\FromAgent";
/// Written by the harness with `wine reg add` before the tests run.
const PRESET_KEY: &str = r"HKLM\SOFTWARE\TenonHarness\FromRegExe";

fn p() -> WindowsPlatform {
    WindowsPlatform::new()
}

fn under_wine() -> bool {
    std::env::var("TENON_UNDER_WINE").as_deref() == Ok("1")
}

/// A value the harness must provide; outside the harness the test is a no-op with a note.
fn harness_env(name: &str) -> Option<String> {
    let v = std::env::var(name).ok().filter(|v| !v.is_empty());
    if v.is_none() {
        assert!(!under_wine(), "the harness must set {name}");
        eprintln!("{name} not set: not run by scripts/test-windows, nothing to compare against");
    }
    v
}

fn assert_unavailable<T: std::fmt::Debug>(what: &str, r: Result<T, PlatformError>) {
    match r {
        Err(PlatformError::Unavailable { .. }) => {}
        Err(e) if !under_wine() => eprintln!("{what}: {e} (acceptable outside Wine)"),
        Ok(v) if !under_wine() => eprintln!("{what}: {v:?} (acceptable outside Wine)"),
        other => panic!("{what}: expected Unavailable under Wine, got {other:?}"),
    }
}

#[test]
fn registry_round_trip_of_the_three_types_in_the_64_bit_view() {
    let p = p();
    let values = [
        ("Sz", RegValue::Sz("héllo wörld".into())),
        ("Dword", RegValue::Dword(0xDEAD_BEEF)),
        ("Multi", RegValue::MultiSz(vec!["one".into(), "two words".into(), "three".into()])),
    ];
    for (name, value) in &values {
        p.reg_set(TEST_KEY, name, value).unwrap();
        assert_eq!(p.reg_get(TEST_KEY, name).unwrap().as_ref(), Some(value), "{name}");
        // Keys compare case-insensitively on Windows, and the long hive name works too.
        let long = TEST_KEY.replace("HKLM", "HKEY_LOCAL_MACHINE").to_lowercase();
        assert_eq!(p.reg_get(&long, name).unwrap().as_ref(), Some(value), "{name} via {long}");
    }
    // Overwrite changes the type too.
    p.reg_set(TEST_KEY, "Sz", &RegValue::Dword(7)).unwrap();
    assert_eq!(p.reg_get(TEST_KEY, "Sz").unwrap(), Some(RegValue::Dword(7)));
    for (name, _) in &values {
        assert!(p.reg_delete(TEST_KEY, name).unwrap(), "{name} existed");
        assert!(!p.reg_delete(TEST_KEY, name).unwrap(), "{name} is gone");
        assert_eq!(p.reg_get(TEST_KEY, name).unwrap(), None);
    }
    assert_eq!(p.reg_get(r"HKLM\SOFTWARE\TenonTest\NoSuchKey", "x").unwrap(), None);
    assert!(!p.reg_delete(r"HKLM\SOFTWARE\TenonTest\NoSuchKey", "x").unwrap());
    assert!(matches!(p.reg_get(r"HKXX\SOFTWARE", "x"), Err(PlatformError::Invalid { .. })));
    assert!(matches!(
        p.reg_set(TEST_KEY, "Bad", &RegValue::MultiSz(vec!["a".into(), String::new()])),
        Err(PlatformError::Invalid { .. })
    ));
}

#[test]
fn registry_leaves_markers_for_the_harness() {
    let p = p();
    p.reg_set(MARKER_KEY, "MarkerSz", &RegValue::Sz("tenon-marker".into())).unwrap();
    p.reg_set(MARKER_KEY, "MarkerDword", &RegValue::Dword(42)).unwrap();
    p.reg_set(MARKER_KEY, "MarkerMulti", &RegValue::MultiSz(vec!["alpha".into(), "beta".into()])).unwrap();
    assert_eq!(p.reg_get(MARKER_KEY, "MarkerDword").unwrap(), Some(RegValue::Dword(42)));
}

#[test]
fn registry_reads_what_reg_exe_wrote() {
    let Some(expected) = harness_env("TENON_PRESET_SZ") else { return };
    let p = p();
    assert_eq!(p.reg_get(PRESET_KEY, "PresetSz").unwrap(), Some(RegValue::Sz(expected)));
    assert_eq!(p.reg_get(PRESET_KEY, "PresetDword").unwrap(), Some(RegValue::Dword(0x1234)));
    assert_eq!(p.reg_get(PRESET_KEY, "PresetMulti").unwrap(), Some(RegValue::MultiSz(vec!["x".into(), "y z".into()])));
    // A REG_BINARY value is not one of the types Tenon handles: a typed error, not garbage.
    assert!(matches!(p.reg_get(PRESET_KEY, "PresetBinary"), Err(PlatformError::Invalid { .. })));
}

#[test]
fn machine_environment_comes_from_the_registry() {
    let p = p();
    // Every Windows (and Wine) machine environment has these.
    let os = p.machine_env("OS").unwrap();
    assert_eq!(os.as_deref(), Some("Windows_NT"));
    assert!(p.machine_env("PATH").unwrap().is_some_and(|v| !v.is_empty()));
    assert_eq!(p.machine_env("TENON_SURELY_UNSET_VARIABLE").unwrap(), None);
    if let Some(expected) = harness_env("TENON_PRESET_ENV") {
        assert_eq!(p.machine_env("TENON_HARNESS_VAR").unwrap(), Some(expected));
    }
}

#[test]
fn hostname_is_the_machine_name() {
    let name = p().hostname().unwrap();
    assert!(!name.is_empty());
    if let Some(expected) = harness_env("TENON_EXPECT_HOSTNAME") {
        let short = expected.split('.').next().unwrap_or_default();
        assert!(name.eq_ignore_ascii_case(short) || name.eq_ignore_ascii_case(&expected), "{name} vs {expected}");
    }
}

#[test]
fn routes_and_neighbours_from_ip_helper() {
    let p = p();
    let routes = p.routes().unwrap();
    println!("routes: {routes:?}");
    for r in &routes {
        assert!(r.prefix_len <= 128, "{r:?}");
        assert!(r.destination.ends_with(&format!("/{}", r.prefix_len)), "{r:?}");
    }
    // The table always has at least the loopback or on-link routes.
    assert!(!routes.is_empty(), "GetIpForwardTable2 returned no routes");
    let neighbours = p.neighbours().unwrap();
    println!("neighbours: {neighbours:?}");
}

/// Run by the harness inside a network namespace whose default gateway it set up; prints and
/// checks the gateway fingerprint. Ignored in the normal run (it needs that namespace).
#[test]
#[ignore = "needs the network namespace that scripts/test-windows creates"]
fn gateway_fingerprint_in_namespace() {
    let expected_ip: Ipv4Addr = std::env::var("TENON_EXPECT_GW_IP").expect("TENON_EXPECT_GW_IP").parse().unwrap();
    let expected_mac = std::env::var("TENON_EXPECT_GW_MAC").expect("TENON_EXPECT_GW_MAC").to_lowercase();
    let fp = default_gateway(&p()).unwrap().expect("a default gateway with a MAC");
    let mac = fp.mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
    println!("TENON_GATEWAY_FINGERPRINT ip={} mac={mac}", fp.ip);
    assert_eq!(fp.ip, expected_ip);
    assert_eq!(mac, expected_mac);
}

#[test]
fn computer_system_from_wmi() {
    let cs = p().computer_system().unwrap();
    println!("Win32_ComputerSystem: {cs:?}");
    if let Some(expected) = harness_env("TENON_EXPECT_MANUFACTURER") {
        assert_eq!(cs.manufacturer, expected);
    }
}

#[test]
fn dpapi_wraps_and_unwraps_a_secret() {
    let p = p();
    let key: Vec<u8> = (0u8..32).map(|i| i.wrapping_mul(37).wrapping_add(11)).collect();
    let wrapped = p.wrap_secret(&key).unwrap();
    assert_ne!(wrapped, key);
    assert!(!wrapped.windows(key.len()).any(|w| w == key.as_slice()), "the plain key must not be inside the blob");
    assert_eq!(p.unwrap_secret(&wrapped).unwrap(), key);
    // Two wraps differ (fresh salt) but both open.
    let again = p.wrap_secret(&key).unwrap();
    assert_eq!(p.unwrap_secret(&again).unwrap(), key);
    // A damaged blob is an error, never wrong plaintext.
    let mut bad = wrapped.clone();
    let last = bad.len() - 1;
    bad[last] ^= 0x55;
    assert!(matches!(p.unwrap_secret(&bad), Err(PlatformError::Os { .. })), "tampered blob must fail");
    assert!(p.unwrap_secret(b"not a dpapi blob").is_err());
}

#[test]
fn state_directory_is_restricted_to_system_and_admins() {
    let dir = match std::env::var_os("TENON_ACL_DIR") {
        Some(d) => std::path::PathBuf::from(d),
        None => std::env::temp_dir().join(format!("tenon-acl-test-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).unwrap();
    restrict_dir_to_system_and_admins(&dir).unwrap();
    let sddl = dir_dacl_sddl(&dir).unwrap();
    println!("DACL: {sddl}");
    if std::env::var_os("TENON_ACL_DIR").is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    if under_wine() {
        // Wine accepts the DACL but does not keep it (it maps it to Unix mode bits and reads back a
        // synthesised DACL), so only real Windows can check the effect.
        assert!(sddl.starts_with("D:"), "{sddl}");
    } else {
        assert!(sddl.starts_with("D:P"), "protected DACL: {sddl}");
        assert!(sddl.contains("(A;OICI;FA;;;SY)"), "{sddl}");
        assert!(sddl.contains("(A;OICI;FA;;;BA)"), "{sddl}");
        assert_eq!(sddl.matches("(A;").count(), 2, "no other allow entries: {sddl}");
    }
    assert!(program_data_dir().is_absolute());
}

#[test]
fn editions_and_join_state() {
    let p = p();
    let multi = p.is_multi_session().unwrap();
    let join = p.entra_join().unwrap();
    println!("multi-session: {multi}, entra: {join:?}");
    if under_wine() {
        assert!(!multi);
        assert!(!join.joined);
    }
}

#[test]
fn entra_join_registry_fallback() {
    if !under_wine() {
        // Writing CloudDomainJoin on a real machine would lie about its join state.
        eprintln!("only under Wine, whose throwaway registry may be changed");
        return;
    }
    let p = p();
    let key = r"HKLM\SYSTEM\CurrentControlSet\Control\CloudDomainJoin\JoinInfo\0123456789ABCDEF";
    let tenant = "11111111-2222-3333-4444-555555555555";
    p.reg_set(key, "TenantId", &RegValue::Sz(tenant.into())).unwrap();
    let from_registry = p.entra_join_from_registry().unwrap();
    // Wine has no NetGetAadJoinInformation: `entra_join` must fall back to the registry.
    let via_trait = p.entra_join().unwrap();
    let hklm = winreg::RegKey::predef(winreg::enums::HKEY_LOCAL_MACHINE);
    hklm.delete_subkey_all(r"SYSTEM\CurrentControlSet\Control\CloudDomainJoin").unwrap();
    assert!(from_registry.joined && from_registry.tenant_id.as_deref() == Some(tenant), "{from_registry:?}");
    assert_eq!(via_trait, from_registry);
    assert!(!p.entra_join().unwrap().joined, "after removing the key");
}

#[test]
fn users_groups_and_profiles() {
    let p = p();
    let users = p.signed_in_users().unwrap();
    println!("signed-in users: {users:?}");
    for u in &users {
        assert!(!u.upn.is_empty() && u.session_id.is_some(), "{u:?}");
    }
    match p.local_group_members("S-1-5-32-544") {
        Ok(members) => println!("Administrators: {members:?}"),
        Err(e) => panic!("listing BUILTIN\\Administrators by SID: {e}"),
    }
    // The account running the tests has a profile in ProfileList.
    let me = std::env::var("USERNAME").unwrap_or_default();
    match p.profile_dir(&SessionUser { upn: me.clone(), sid: None, session_id: None }) {
        Ok(dir) => {
            println!("profile of {me}: {}", dir.display());
            assert!(dir.is_absolute(), "{}", dir.display());
        }
        Err(e) => panic!("profile of {me}: {e}"),
    }
    assert!(matches!(
        p.notify_user(&SessionUser { upn: "a@b".into(), sid: None, session_id: None }, "t", "m"),
        Err(PlatformError::Invalid { .. })
    ));
    assert!(matches!(
        p.add_local_group_member("Administrators", &Account { name: String::new(), sid: None }),
        Err(PlatformError::Invalid { .. })
    ));
}

#[test]
fn network_change_wait_times_out_quietly() {
    // Nothing changes the network during the test: the wait ends at the timeout with `false`.
    let started = std::time::Instant::now();
    let changed = p().wait_network_change(Duration::from_millis(300)).unwrap();
    assert!(!changed);
    assert!(started.elapsed() >= Duration::from_millis(250));
}

#[test]
fn tpm_is_unavailable_under_wine() {
    assert_unavailable("tpm", p().tpm());
}

#[test]
fn bitlocker_is_unavailable_under_wine() {
    let p = p();
    assert_unavailable("volumes", p.volumes());
    assert_unavailable("add_recovery_password", p.add_recovery_password("C:").map(|(id, _)| id));
    assert_unavailable("add_tpm_protector", p.add_tpm_protector("C:"));
    assert_unavailable("delete_protector", p.delete_protector("C:", "{00000000-0000-0000-0000-000000000000}"));
    assert_unavailable("encrypt", p.encrypt("C:"));
    assert_unavailable("backup_to_entra", p.backup_to_entra("C:", "{00000000-0000-0000-0000-000000000000}"));
}

#[test]
fn arp_resolution_is_unavailable_under_wine() {
    // Loopback: even where ARP works, this sends nothing on the wire.
    assert_unavailable("resolve_mac", p().resolve_mac(IpAddr::V4(Ipv4Addr::LOCALHOST), 1));
}

#[test]
fn service_install_and_uninstall_through_the_scm() {
    use tenon_agent::service::{self, ServiceError};
    if !under_wine() {
        // Needs administrator rights and would replace a real installation.
        eprintln!("only under Wine, whose throwaway service database may be changed");
        return;
    }
    let p = p();
    let key = r"HKLM\SYSTEM\CurrentControlSet\Services\tenon-agent";
    let exe = std::env::current_exe().unwrap();
    let state = std::path::Path::new(r"C:\ProgramData\Tenon");
    assert!(matches!(service::start(), Err(ServiceError::NotInstalled)), "start before install");
    service::install(&exe, state, &["--platform".into(), "native".into()]).unwrap();
    assert!(matches!(service::install(&exe, state, &[]), Err(ServiceError::AlreadyInstalled)));
    // The SCM keeps its configuration in the registry: read it back from there.
    let image = p.reg_get(key, "ImagePath").unwrap();
    let start = p.reg_get(key, "Start").unwrap();
    let account = p.reg_get(key, "ObjectName").unwrap();
    service::uninstall().unwrap();
    let Some(RegValue::Sz(image)) = image else { panic!("ImagePath: {image:?}") };
    assert!(image.contains(&*exe.to_string_lossy()), "{image}");
    assert!(image.ends_with(r#"--state-dir C:\ProgramData\Tenon --platform native service run"#), "{image}");
    assert_eq!(start, Some(RegValue::Dword(2)), "automatic start");
    assert_eq!(account, Some(RegValue::Sz("LocalSystem".into())));
    assert!(matches!(service::uninstall(), Err(ServiceError::NotInstalled)), "uninstalled");
}

/// The service entry point under the real SCM: `TENON_SERVICE_PROBE` is the `service_probe` example
/// (a `run_dispatcher` caller), which the harness puts beside this exe.
#[test]
fn service_runs_the_loop_and_stops_gracefully() {
    use tenon_agent::service;
    let Some(probe) = harness_env("TENON_SERVICE_PROBE") else { return };
    if !under_wine() {
        return;
    }
    let state = std::env::temp_dir().join(format!("tenon-service-probe-{}", std::process::id()));
    std::fs::create_dir_all(&state).unwrap();
    service::install(std::path::Path::new(&probe), &state, &[]).unwrap();
    let outcome = (|| -> Result<(), String> {
        service::start().map_err(|e| format!("start: {e}"))?;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !state.join("started").exists() {
            if std::time::Instant::now() > deadline {
                return Err("the service loop never started".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // `stop` returns once the SCM reports Stopped, which the service only does after its loop
        // returned: the marker must already be there.
        service::stop().map_err(|e| format!("stop: {e}"))?;
        match std::fs::read_to_string(state.join("stopped")) {
            Ok(s) if s == "graceful" => Ok(()),
            other => Err(format!("the loop did not finish before Stopped: {other:?}")),
        }
    })();
    let uninstalled = service::uninstall();
    let _ = std::fs::remove_dir_all(&state);
    outcome.unwrap();
    uninstalled.unwrap();
}

#[test]
fn service_log_goes_to_program_data() {
    use std::io::Write;
    let log = tenon_agent::service::open_log(&program_data_dir().join("Tenon")).unwrap();
    let expected = program_data_dir().join("Tenon").join("logs").join("tenon-agent.log");
    assert_eq!(log.path(), expected.as_path());
    let line = format!("windows test line {}\n", std::process::id());
    (&log).write_all(line.as_bytes()).unwrap();
    let text = std::fs::read_to_string(&expected).unwrap();
    assert!(text.contains(line.trim_end()), "{text}");
}

#[test]
fn process_memory_is_reported() {
    let (now, peak) = process_memory().unwrap();
    println!("working set {now} bytes, peak {peak} bytes");
    // A running test process has touched at least a megabyte, and the peak bounds the current.
    assert!(now > 1 << 20, "{now}");
    assert!(peak >= now, "{peak} < {now}");
}
