use super::*;

const PC: &str = "{12345678-1234-1234-1234-123456789ABC}";

fn pkg(name: &str, deps: &[&str], order: i64) -> Package {
    Package {
        self_update: false,
        name: name.into(),
        version: "1.0".into(),
        kind: Kind::Msi,
        sha256: "ab".repeat(32),
        size: 10,
        file_name: format!("{name}.msi"),
        install_args: String::new(),
        uninstall_args: String::new(),
        detect: DetectRule::Msi { product_code: PC.into() },
        depends_on: deps.iter().map(|d| d.to_string()).collect(),
        order,
        timeout_secs: DEFAULT_TIMEOUT_SECS,
    }
}

fn catalog(ps: Vec<Package>) -> BTreeMap<String, Package> {
    ps.into_iter().map(|p| (p.name.clone(), p)).collect()
}

fn assign(package: &str, target: Target, intent: Intent, users: Users) -> Assignment {
    Assignment { package: package.into(), target, intent, users }
}

#[test]
fn detection_rules_parse_and_print_back() {
    for (input, shown) in [
        ("msi:{12345678-1234-1234-1234-123456789abc}", "msi:{12345678-1234-1234-1234-123456789ABC}"),
        ("msi:12345678-1234-1234-1234-123456789abc", "msi:{12345678-1234-1234-1234-123456789ABC}"),
        ("file:C:\\Program Files\\App\\app.exe", "file:C:\\Program Files\\App\\app.exe"),
        ("file:C:\\App\\app.exe>=1.2.3", "file:C:\\App\\app.exe>=1.2.3"),
        ("registry:HKLM\\SOFTWARE\\App:Version>=2.0", "registry:HKLM\\SOFTWARE\\App:Version>=2.0"),
        ("registry:HKEY_LOCAL_MACHINE\\SOFTWARE\\App:Installed=1@32", "registry:HKLM\\SOFTWARE\\App:Installed=1@32"),
        ("registry:HKLM\\SOFTWARE\\App:Present", "registry:HKLM\\SOFTWARE\\App:Present"),
    ] {
        let rule = DetectRule::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
        assert_eq!(rule.to_string(), shown);
        assert_eq!(DetectRule::parse(&rule.to_string()).unwrap(), rule);
    }
    let r = DetectRule::parse("registry:HKLM\\SOFTWARE\\App:Installed=1@32").unwrap();
    assert_eq!(
        r,
        DetectRule::Registry {
            key: "HKLM\\SOFTWARE\\App".into(),
            name: "Installed".into(),
            check: RegistryCheck::Equals("1".into()),
            view32: true
        }
    );
}

#[test]
fn bad_detection_rules_say_what_to_write() {
    for (input, says) in [
        ("msi:{1234}", "not an MSI product code"),
        ("file:app.exe", "absolute Windows path"),
        ("file:C:\\a.exe>=one", "not a dotted version"),
        ("registry:HKCU\\Software\\App:X", "under HKLM"),
        ("registry:HKLM\\SOFTWARE\\App", "no value name"),
        ("wmi:Win32_Product", "is unknown"),
        ("C:\\app.exe", "is unknown"),
        ("nothing", "has no kind"),
        ("file:C:\\a\nb", "control characters"),
    ] {
        let e = DetectRule::parse(input).expect_err(input).to_string();
        assert!(e.contains(says), "{input}: {e}");
    }
}

#[test]
fn versions_compare_numerically() {
    use std::cmp::Ordering::*;
    assert_eq!(compare_versions("1.10", "1.9"), Some(Greater));
    assert_eq!(compare_versions("1.2", "1.2.0.0"), Some(Equal));
    assert_eq!(compare_versions("2.0.1", "10"), Some(Less));
    assert_eq!(compare_versions("1.x", "1"), None);
}

#[test]
fn names_args_and_versions_are_checked() {
    assert!(check_name("7-Zip (x64)").is_ok());
    assert!(check_name("a/b").is_err());
    assert!(check_name("").is_err());
    assert!(check_args("--install-args", "/S /D=C:\\x").is_ok());
    assert!(check_args("--install-args", "a\0b").is_err());
    assert!(check_args("--install-args", "a\nb").is_err());
    assert!(check_version_label("1.0 beta").is_err());
    assert_eq!(Kind::from_file_name("Setup.PS1"), Some(Kind::Script));
    assert!(Kind::parse("appx").unwrap_err().to_string().contains("msi, exe or script"));
}

#[test]
fn the_strongest_intent_wins_and_reaches_only_the_primary_users_scopes() {
    let cat = catalog(vec![pkg("A", &[], 0), pkg("B", &[], 0), pkg("C", &[], 0)]);
    let anna = Upn::parse("anna@contoso.com").unwrap();
    let groups: BTreeSet<GroupName> = [GroupName::parse("Sales").unwrap()].into();
    let assignments = vec![
        assign("A", Target::Tenant, Intent::Available, Users::Primary),
        assign("A", Target::Group("Sales".into()), Intent::Required, Users::Both),
        assign("B", Target::Group("Sales".into()), Intent::Required, Users::Primary),
        assign("B", Target::User("anna@contoso.com".into()), Intent::Uninstall, Users::Primary),
        assign("C", Target::Group("Finance".into()), Intent::Required, Users::Primary),
    ];
    let plan = device_plan(&cat, &assignments, Some((&anna, &groups)), &BTreeMap::new());
    assert_eq!(plan.keys().collect::<Vec<_>>(), ["A", "B"]);
    assert_eq!((plan["A"].intent, plan["A"].users), (Intent::Required, Users::Both));
    assert_eq!(plan["B"].intent, Intent::Uninstall);
    // Without a primary user: the tenant (and "All Users") only.
    let plan = device_plan(&cat, &assignments, None, &[("A".to_string(), 3)].into());
    assert_eq!(plan.keys().collect::<Vec<_>>(), ["A"]);
    assert_eq!((plan["A"].intent, plan["A"].request), (Intent::Available, 3));
}

#[test]
fn dependencies_come_along_and_install_first() {
    let cat = catalog(vec![
        pkg("App", &["Runtime"], 0),
        pkg("Runtime", &["Base"], 5),
        pkg("Base", &[], 9),
        pkg("Early", &[], -1),
    ]);
    check_dependencies(&cat).unwrap();
    let assignments = vec![
        assign("App", Target::Tenant, Intent::Required, Users::Primary),
        assign("Early", Target::Tenant, Intent::Available, Users::Primary),
    ];
    let plan = device_plan(&cat, &assignments, None, &BTreeMap::new());
    assert_eq!(plan["Base"].intent, Intent::Required);
    let order: Vec<&str> = install_order(&plan).iter().map(|e| e.package.name.as_str()).collect();
    assert_eq!(order, ["Early", "Base", "Runtime", "App"]);
}

#[test]
fn missing_dependencies_and_cycles_are_named() {
    let e = check_dependencies(&catalog(vec![pkg("App", &["Gone"], 0)])).unwrap_err().to_string();
    assert!(e.contains("\"Gone\", which is not uploaded"), "{e}");
    let e = check_dependencies(&catalog(vec![pkg("A", &["B"], 0), pkg("B", &["C"], 0), pkg("C", &["A"], 0)]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("A -> B -> C -> A"), "{e}");
}

fn session(signed_in: &[&str], primary: Option<&str>) -> Session {
    Session {
        signed_in: signed_in.iter().map(|s| s.to_string()).collect(),
        primary: primary.map(str::to_string),
        ignore_user_restrictions: false,
    }
}

#[test]
fn user_restrictions() {
    let anna = Some("anna@contoso.com");
    assert!(restriction_holds(Users::Primary, &session(&["anna@contoso.com"], anna)).is_ok());
    let e = restriction_holds(Users::Primary, &session(&["bob@contoso.com"], anna)).unwrap_err();
    assert_eq!(e, "primary user anna@contoso.com is not signed in");
    assert!(restriction_holds(Users::Primary, &session(&["anna@contoso.com"], None)).is_err());
    assert!(restriction_holds(Users::Secondary, &session(&["bob@contoso.com"], anna)).is_ok());
    assert!(restriction_holds(Users::Secondary, &session(&["anna@contoso.com"], anna)).is_err());
    assert!(restriction_holds(Users::Both, &session(&["anna@contoso.com"], anna)).is_ok());
    assert!(restriction_holds(Users::Both, &session(&[], anna)).is_err());
    let mut s = session(&[], anna);
    s.ignore_user_restrictions = true;
    assert!(restriction_holds(Users::Primary, &s).is_ok());
}

fn entry(intent: Intent) -> PlanEntry {
    PlanEntry { package: pkg("App", &[], 0), intent, users: Users::Primary, request: 0 }
}

fn facts<'a>(detected: bool, s: &'a Session) -> StepFacts<'a> {
    StepFacts { detected, session: s, dependencies: Ok(()), now: 1000 }
}

#[test]
fn detection_first_then_the_gate() {
    let anna = session(&["anna@contoso.com"], Some("anna@contoso.com"));
    let away = session(&[], Some("anna@contoso.com"));
    let mut mem = Remembered::default();
    let e = entry(Intent::Required);
    assert!(matches!(next_step(&e, &mut mem, &facts(true, &away)), Step::Report(r) if r.state == State::Installed));
    match next_step(&e, &mut mem, &facts(false, &away)) {
        Step::Report(r) => {
            assert_eq!(r.state, State::Waiting);
            assert_eq!(r.detail.as_deref(), Some("primary user anna@contoso.com is not signed in"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(next_step(&e, &mut mem, &facts(false, &anna)), Step::Install);
    let mut f = facts(false, &anna);
    f.dependencies = Err("\"Runtime\"".into());
    assert!(
        matches!(next_step(&e, &mut mem, &f), Step::Report(r) if r.detail.as_deref() == Some("dependency \"Runtime\" is not installed"))
    );
    // Available: only on request, then without the gate.
    let mut a = entry(Intent::Available);
    assert!(matches!(next_step(&a, &mut mem, &facts(false, &anna)), Step::Report(r) if r.state == State::Waiting));
    a.request = 1;
    assert_eq!(next_step(&a, &mut mem, &facts(false, &away)), Step::Install);
    // Uninstall: only while detected.
    let u = entry(Intent::Uninstall);
    assert_eq!(next_step(&u, &mut mem, &facts(true, &away)), Step::Uninstall);
    assert!(matches!(next_step(&u, &mut mem, &facts(false, &away)), Step::Report(r) if r.state == State::Uninstalled));
}

#[test]
fn exit_codes_follow_intunes_defaults() {
    let e = entry(Intent::Required);
    let run = |code: i64, detected: bool| {
        let mut mem = Remembered::default();
        (run_outcome(&e, false, &RunEnd::Exited(code), detected, Some("tail".into()), &mut mem, 1000), mem)
    };
    assert_eq!(run(0, true).0.state, State::Installed);
    assert_eq!(run(1707, true).0.state, State::Installed);
    assert_eq!(run(3010, true).0.state, State::RebootPending);
    assert_eq!(run(1641, true).0.state, State::RebootPending);
    let (r, mem) = run(1618, false);
    assert_eq!(r.state, State::Waiting);
    assert!(r.detail.unwrap().contains("retry after 1970-01-01T00:26:40Z"));
    assert_eq!((mem.attempts, mem.not_before), (0, 1600));
    let (r, mem) = run(1603, false);
    assert_eq!((r.state, r.exit_code, r.log_tail.as_deref()), (State::Failed, Some(1603), Some("tail")));
    assert_eq!((mem.attempts, mem.not_before), (1, 1300));
    // Fleet #19039: "succeeded" but nothing is there.
    let (r, _) = run(0, false);
    assert_eq!((r.state, r.detail.as_deref()), (State::Failed, Some("not detected after install")));
    let mut mem = Remembered::default();
    let r = run_outcome(&e, false, &RunEnd::TimedOut, false, None, &mut mem, 0);
    assert_eq!(r.state, State::TimedOut);
    let r = run_outcome(&entry(Intent::Uninstall), true, &RunEnd::Exited(0), true, None, &mut mem, 0);
    assert_eq!((r.state, r.detail.as_deref()), (State::Failed, Some("still detected after uninstall")));
}

#[test]
fn three_failures_then_failed_until_asked_again_or_a_new_version() {
    let anna = session(&["anna@contoso.com"], Some("anna@contoso.com"));
    let mut e = entry(Intent::Required);
    let mut mem = Remembered::default();
    let mut now = 1000;
    for attempt in 1..=MAX_ATTEMPTS {
        let f = StepFacts { now, ..facts(false, &anna) };
        assert_eq!(next_step(&e, &mut mem, &f), Step::Install, "attempt {attempt}");
        mem.report = Some(run_outcome(&e, false, &RunEnd::Exited(1603), false, None, &mut mem, now));
        // Backing off: the failure stays reported, nothing runs.
        let f = StepFacts { now: now + 1, ..facts(false, &anna) };
        assert!(matches!(next_step(&e, &mut mem, &f), Step::Report(r) if r.state == State::Failed));
        now += backoff_secs(attempt) + 1;
    }
    let f = StepFacts { now: now + 100_000, ..facts(false, &anna) };
    match next_step(&e, &mut mem, &f) {
        Step::Report(r) => {
            assert_eq!(r.state, State::Failed);
            assert!(r.detail.unwrap().contains("gave up after 3 attempts"));
        }
        other => panic!("{other:?}"),
    }
    e.request = 1;
    assert_eq!(next_step(&e, &mut mem, &f), Step::Install);
    let mut mem2 = mem.clone();
    mem2.attempts = MAX_ATTEMPTS;
    e.package.version = "2.0".into();
    assert_eq!(next_step(&e, &mut mem2, &f), Step::Install);
}

#[test]
fn commands_as_windows_runs_them() {
    let p = pkg("App", &[], 0);
    let c = install_command(&p, "C:\\x\\App.msi", "C:\\x\\App.log");
    assert_eq!(c.display(), "msiexec.exe /i C:\\x\\App.msi /qn /norestart /l*v C:\\x\\App.log");
    let u = uninstall_command(&p, "C:\\x\\App.msi", "C:\\x\\u.log").unwrap();
    assert_eq!(u.display(), format!("msiexec.exe /x {PC} /qn /norestart /l*v C:\\x\\u.log"));
    let mut s = pkg("S", &[], 0);
    s.kind = Kind::Script;
    s.install_args = "-Mode Full".into();
    assert_eq!(
        install_command(&s, "C:\\x\\s.ps1", "").display(),
        "powershell.exe -NoProfile -NonInteractive -ExecutionPolicy Bypass -File C:\\x\\s.ps1 -Mode Full"
    );
    assert_eq!(install_command(&s, "C:\\x\\s.cmd", "").display(), "cmd.exe /c C:\\x\\s.cmd -Mode Full");
    assert_eq!(uninstall_command(&s, "C:\\x\\s.cmd", ""), None);
}

#[test]
fn log_tail_keeps_the_last_fifty_lines() {
    let log: String = (1..=80).map(|i| format!("line {i}\u{7}\n")).collect();
    let t = log_tail(&log);
    assert!(t.starts_with("line 31\n") && t.ends_with("line 80"), "{t}");
}

#[test]
fn plan_entries_round_trip_as_the_wire_form() {
    let e = PlanEntry { request: 2, ..entry(Intent::Required) };
    let v = serde_json::to_value(&e).unwrap();
    assert_eq!(v["detect"], format!("msi:{PC}"));
    assert_eq!(v["intent"], "required");
    assert_eq!(v["kind"], "msi");
    assert_eq!(serde_json::from_value::<PlanEntry>(v).unwrap(), e);
}
