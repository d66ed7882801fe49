//! The agent as a Windows service: install/uninstall/start/stop through the Service Control Manager,
//! the service entry point (runs the agent loop until the SCM says stop), and the service's log file.
//!
//! How `main.rs` wires it (signatures):
//! - `tenon-agent service install` -> [`install`]`(exe_path: &Path, state_dir: &Path, extra_args: &[OsString])
//!   -> Result<(), ServiceError>`: registers service [`SERVICE_NAME`] (LocalSystem, automatic start,
//!   restart on failure) whose command line is `"<exe>" --state-dir "<state_dir>" <extra_args...> service run`.
//!   `extra_args` are global options to keep (for example `--platform native`); the server URL and
//!   credentials come from the enrolled state directory, not the command line.
//! - `tenon-agent service uninstall|start|stop` -> [`uninstall`]`()`, [`start`]`()`, [`stop`]`()`, each
//!   `-> Result<(), ServiceError>`; `stop` waits up to [`STOP_WAIT`] for the service to stop.
//! - `tenon-agent service run` (what the SCM launches) -> [`run_dispatcher`]`(run_loop: fn(Arc<AtomicBool>)
//!   -> anyhow::Result<()>) -> Result<(), ServiceError>`: connects to the SCM and calls `run_loop` on the
//!   service thread. The flag turns true on Stop or Shutdown; the loop must check it at least every
//!   few seconds (for example by waiting for network changes with a short timeout) and return. Run
//!   from a console instead of by the SCM, it fails with [`ServiceError::NotUnderScm`].
//! - Logging: [`open_log`]`(state_dir) -> io::Result<RotatingLog>` gives the rotating file under
//!   `<state_dir>\logs` (`C:\ProgramData\Tenon\logs`); pass it to `tracing_subscriber::fmt().with_writer(log)`.

use crate::platform::windows::restrict_dir_to_system_and_admins;
use crate::rotating_log::{RotatingLog, DEFAULT_KEEP, DEFAULT_MAX_BYTES};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use windows_service::service::{
    ServiceAccess, ServiceAction, ServiceActionType, ServiceControl, ServiceControlAccept, ServiceErrorControl,
    ServiceExitCode, ServiceFailureActions, ServiceFailureResetPeriod, ServiceInfo, ServiceStartType, ServiceState,
    ServiceStatus, ServiceType,
};
use windows_service::service_control_handler::{self, ServiceControlHandlerResult};
use windows_service::service_manager::{ServiceManager, ServiceManagerAccess};
use windows_service::{define_windows_service, service_dispatcher};

/// The service's name (DESIGN.md 7.1); the MSI registers the same one.
pub const SERVICE_NAME: &str = "tenon-agent";
const DISPLAY_NAME: &str = "Tenon Agent";
const DESCRIPTION: &str = "Applies this device's Tenon configuration and reports its state to the Tenon server.";
/// How long `stop` (and `uninstall` of a running service) waits for the service to stop.
pub const STOP_WAIT: Duration = Duration::from_secs(30);
/// What the service tells the SCM it may need to stop: the loop checks the flag at least this often.
const STOP_HINT: Duration = Duration::from_secs(20);
/// ERROR_FAILED_SERVICE_CONTROLLER_CONNECT: the process was not started by the SCM.
const NOT_UNDER_SCM: i32 = 1063;
const SERVICE_DOES_NOT_EXIST: i32 = 1060;
const SERVICE_NOT_ACTIVE: i32 = 1062;
const SERVICE_EXISTS: i32 = 1073;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("service {SERVICE_NAME} is not installed")]
    NotInstalled,
    #[error("service {SERVICE_NAME} is already installed (uninstall it first)")]
    AlreadyInstalled,
    #[error("not started by the Service Control Manager (use `tenon-agent run` in a console)")]
    NotUnderScm,
    #[error("service {SERVICE_NAME} did not stop within {0:?}")]
    StopTimeout(Duration),
    #[error("{what}: {source}")]
    Scm {
        what: &'static str,
        #[source]
        source: windows_service::Error,
    },
}

fn scm(what: &'static str) -> impl FnOnce(windows_service::Error) -> ServiceError {
    move |source| {
        let code = match &source {
            windows_service::Error::Winapi(e) => e.raw_os_error(),
            _ => None,
        };
        match code {
            Some(SERVICE_DOES_NOT_EXIST) => ServiceError::NotInstalled,
            Some(SERVICE_EXISTS) => ServiceError::AlreadyInstalled,
            Some(NOT_UNDER_SCM) => ServiceError::NotUnderScm,
            _ => ServiceError::Scm { what, source },
        }
    }
}

/// The service's command line after the executable (see the module docs).
pub fn launch_arguments(state_dir: &Path, extra_args: &[OsString]) -> Vec<OsString> {
    let mut args = vec![OsString::from("--state-dir"), state_dir.as_os_str().to_owned()];
    args.extend(extra_args.iter().cloned());
    args.extend([OsString::from("service"), OsString::from("run")]);
    args
}

/// Registers the service: LocalSystem (it writes HKLM, manages BitLocker and local groups),
/// automatic start, restarted by the SCM 10 s / 60 s / 5 min after a failure.
pub fn install(exe_path: &Path, state_dir: &Path, extra_args: &[OsString]) -> Result<(), ServiceError> {
    let manager = ServiceManager::local_computer(
        None::<&str>,
        ServiceManagerAccess::CONNECT | ServiceManagerAccess::CREATE_SERVICE,
    )
    .map_err(scm("connecting to the Service Control Manager"))?;
    let info = ServiceInfo {
        name: SERVICE_NAME.into(),
        display_name: DISPLAY_NAME.into(),
        service_type: ServiceType::OWN_PROCESS,
        start_type: ServiceStartType::AutoStart,
        error_control: ServiceErrorControl::Normal,
        executable_path: exe_path.to_path_buf(),
        launch_arguments: launch_arguments(state_dir, extra_args),
        dependencies: vec![],
        account_name: None, // LocalSystem
        account_password: None,
    };
    let service = manager
        .create_service(&info, ServiceAccess::CHANGE_CONFIG | ServiceAccess::START)
        .map_err(scm("creating the service"))?;
    service.set_description(DESCRIPTION).map_err(scm("setting the service description"))?;
    set_recovery_actions(&service);
    Ok(())
}

/// Restart on failure, 10 s / 60 s / 5 min. Recovery actions are a convenience on top of a working
/// installation: where the SCM does not support them (Wine lacks the non-crash flag), warn and go on.
fn set_recovery_actions(service: &windows_service::service::Service) {
    let restart = |secs| ServiceAction { action_type: ServiceActionType::Restart, delay: Duration::from_secs(secs) };
    if let Err(e) = service.update_failure_actions(ServiceFailureActions {
        reset_period: ServiceFailureResetPeriod::After(Duration::from_secs(24 * 3600)),
        reboot_msg: None,
        command: None,
        actions: Some(vec![restart(10), restart(60), restart(300)]),
    }) {
        tracing::warn!(error = %e, "could not set the service's restart-on-failure actions");
    }
    // Also restart when the loop returns an error (non-zero exit code), not only on a crash.
    if let Err(e) = service.set_failure_actions_on_non_crash_failures(true) {
        tracing::warn!(error = %e, "could not make the service restart after an error exit");
    }
}

/// What the running service makes sure of at every start, whoever installed it (the MSI's
/// ServiceInstall cannot set recovery actions or ACLs): its restart-on-failure actions, and its
/// state directory restricted to SYSTEM and Administrators. Failures are logged, not fatal.
pub fn prepare_at_start(state_dir: &Path) {
    match ServiceManager::local_computer(None::<&str>, ServiceManagerAccess::CONNECT)
        .and_then(|m| m.open_service(SERVICE_NAME, ServiceAccess::CHANGE_CONFIG))
    {
        Ok(service) => set_recovery_actions(&service),
        Err(e) => tracing::warn!(error = %e, "could not open the service to set its recovery actions"),
    }
    if let Err(e) = std::fs::create_dir_all(state_dir) {
        tracing::warn!(error = %e, dir = %state_dir.display(), "cannot create the state directory");
    } else if let Err(e) = restrict_dir_to_system_and_admins(state_dir) {
        tracing::warn!(error = %e, dir = %state_dir.display(), "could not restrict the state directory");
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PurgeError {
    #[error("refusing to delete {0}: only a state directory named Tenon is purged (such as C:\\ProgramData\\Tenon)")]
    NotAStateDir(PathBuf),
    #[error("cannot delete {dir}: {source}; stop the service and delete it by hand")]
    Io {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// How long `purge_state` keeps trying: the SCM reports Stopped a moment before the service's
/// process has exited and closed its log, and Windows keeps a deleted file that is still open in
/// its directory until then, so the directory cannot be removed yet.
const PURGE_WAIT: Duration = Duration::from_secs(10);

/// Deletes the state directory (the device's identity, vault and logs): what the MSI runs on
/// uninstall with `TENON_PURGE=1`. Only a directory named `Tenon` is deleted; a missing one is fine.
pub fn purge_state(state_dir: &Path) -> Result<(), PurgeError> {
    if !state_dir.file_name().is_some_and(|n| n.eq_ignore_ascii_case("Tenon")) {
        return Err(PurgeError::NotAStateDir(state_dir.to_path_buf()));
    }
    let deadline = Instant::now() + PURGE_WAIT;
    loop {
        match std::fs::remove_dir_all(state_dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(250)),
            Err(source) => return Err(PurgeError::Io { dir: state_dir.to_path_buf(), source }),
        }
    }
}

/// Stops the service if it runs, then deletes it.
pub fn uninstall() -> Result<(), ServiceError> {
    let manager = ServiceManager::local_computer(None::<&str>, ServiceManagerAccess::CONNECT)
        .map_err(scm("connecting to the Service Control Manager"))?;
    let service = manager
        .open_service(SERVICE_NAME, ServiceAccess::QUERY_STATUS | ServiceAccess::STOP | ServiceAccess::DELETE)
        .map_err(scm("opening the service"))?;
    stop_and_wait(&service)?;
    service.delete().map_err(scm("deleting the service"))
}

pub fn start() -> Result<(), ServiceError> {
    let manager = ServiceManager::local_computer(None::<&str>, ServiceManagerAccess::CONNECT)
        .map_err(scm("connecting to the Service Control Manager"))?;
    let service = manager
        .open_service(SERVICE_NAME, ServiceAccess::START | ServiceAccess::QUERY_STATUS)
        .map_err(scm("opening the service"))?;
    let status = service.query_status().map_err(scm("querying the service"))?;
    if status.current_state == ServiceState::Running || status.current_state == ServiceState::StartPending {
        return Ok(());
    }
    service.start(&[] as &[&OsStr]).map_err(scm("starting the service"))
}

pub fn stop() -> Result<(), ServiceError> {
    let manager = ServiceManager::local_computer(None::<&str>, ServiceManagerAccess::CONNECT)
        .map_err(scm("connecting to the Service Control Manager"))?;
    let service = manager
        .open_service(SERVICE_NAME, ServiceAccess::STOP | ServiceAccess::QUERY_STATUS)
        .map_err(scm("opening the service"))?;
    stop_and_wait(&service)
}

fn stop_and_wait(service: &windows_service::service::Service) -> Result<(), ServiceError> {
    match service.stop() {
        Ok(_) => {}
        Err(windows_service::Error::Winapi(e)) if e.raw_os_error() == Some(SERVICE_NOT_ACTIVE) => return Ok(()),
        Err(e) => return Err(scm("stopping the service")(e)),
    }
    let deadline = Instant::now() + STOP_WAIT;
    loop {
        let status = service.query_status().map_err(scm("querying the service"))?;
        if status.current_state == ServiceState::Stopped {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(ServiceError::StopTimeout(STOP_WAIT));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// `<state dir>\logs` (`C:\ProgramData\Tenon\logs` as the MSI installs the service). Derived from
/// the service's `--state-dir`, not from `%ProgramData%`: a service's environment need not name the
/// same directory (under Wine it points at `C:\users\Public`).
pub fn log_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("logs")
}

/// The service's log: `<state dir>\logs\tenon-agent.log`, 5 MiB per file, 5 rotated files kept. The
/// first time, the state directory is restricted to SYSTEM and Administrators (logs can name users
/// and devices); failing that is logged by the caller's first event, not fatal.
pub fn open_log(state_dir: &Path) -> std::io::Result<RotatingLog> {
    let dir = log_dir(state_dir);
    let fresh = !dir.exists();
    std::fs::create_dir_all(&dir)?;
    if fresh {
        if let Some(tenon) = dir.parent() {
            if let Err(e) = restrict_dir_to_system_and_admins(tenon) {
                eprintln!("warning: could not restrict {}: {e}", tenon.display());
            }
        }
    }
    RotatingLog::open(&dir, "tenon-agent.log", DEFAULT_MAX_BYTES, DEFAULT_KEEP)
}

type RunLoop = fn(Arc<AtomicBool>) -> anyhow::Result<()>;

/// The loop handed to `run_dispatcher`; the SCM calls `service_main` on its own thread, with no way
/// to pass it data but a static.
static RUN_LOOP: OnceLock<RunLoop> = OnceLock::new();

define_windows_service!(ffi_service_main, service_main);

/// Runs `run_loop` as the service (blocks until the service stops). See the module docs.
pub fn run_dispatcher(run_loop: RunLoop) -> Result<(), ServiceError> {
    let _ = RUN_LOOP.set(run_loop);
    service_dispatcher::start(SERVICE_NAME, ffi_service_main).map_err(scm("starting the service dispatcher"))
}

fn service_main(_args: Vec<OsString>) {
    if let Err(e) = run_service() {
        tracing::error!(error = %e, "the service failed");
    }
}

fn status(
    state: ServiceState,
    exit_code: ServiceExitCode,
    accept: ServiceControlAccept,
    wait: Duration,
) -> ServiceStatus {
    ServiceStatus {
        service_type: ServiceType::OWN_PROCESS,
        current_state: state,
        controls_accepted: accept,
        exit_code,
        checkpoint: 0,
        wait_hint: wait,
        process_id: None,
    }
}

fn run_service() -> Result<(), ServiceError> {
    let stop = Arc::new(AtomicBool::new(false));
    let stop_for_handler = stop.clone();
    let handle = service_control_handler::register(SERVICE_NAME, move |control| match control {
        ServiceControl::Stop | ServiceControl::Shutdown => {
            stop_for_handler.store(true, Ordering::SeqCst);
            ServiceControlHandlerResult::NoError
        }
        ServiceControl::Interrogate => ServiceControlHandlerResult::NoError,
        _ => ServiceControlHandlerResult::NotImplemented,
    })
    .map_err(scm("registering the service control handler"))?;

    let none = ServiceControlAccept::empty();
    let ok = ServiceExitCode::Win32(0);
    handle
        .set_service_status(status(
            ServiceState::Running,
            ok,
            ServiceControlAccept::STOP | ServiceControlAccept::SHUTDOWN,
            Duration::ZERO,
        ))
        .map_err(scm("reporting Running"))?;
    tracing::info!("service started");

    let result = match RUN_LOOP.get() {
        Some(run_loop) => run_loop(stop.clone()),
        None => Err(anyhow::anyhow!("run_dispatcher was not given a loop")),
    };
    let _ = handle.set_service_status(status(ServiceState::StopPending, ok, none, STOP_HINT));
    // A loop that ends with an error gets a non-zero exit code, so the SCM's recovery actions
    // restart it; a requested stop ends cleanly.
    let exit = match &result {
        Ok(()) => ok,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "the agent loop failed");
            ServiceExitCode::ServiceSpecific(1)
        }
    };
    tracing::info!(requested = stop.load(Ordering::SeqCst), "service stopped");
    handle
        .set_service_status(status(ServiceState::Stopped, exit, none, Duration::ZERO))
        .map_err(scm("reporting Stopped"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purge_deletes_only_a_tenon_directory() {
        let base = std::env::temp_dir().join(format!("tenon-purge-{}", std::process::id()));
        let other = base.join("NotTenon");
        let state = base.join("Tenon");
        std::fs::create_dir_all(other.join("logs")).unwrap();
        std::fs::create_dir_all(state.join("logs")).unwrap();
        std::fs::write(state.join("logs").join("tenon-agent.log"), "x").unwrap();
        assert!(matches!(purge_state(&other), Err(PurgeError::NotAStateDir(_))));
        assert!(other.exists());
        purge_state(&state).unwrap();
        assert!(!state.exists());
        purge_state(&state).unwrap(); // already gone
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn command_line_puts_options_before_the_subcommand() {
        let args = launch_arguments(Path::new(r"C:\ProgramData\Tenon"), &["--platform".into(), "native".into()]);
        let args: Vec<_> = args.iter().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(args, ["--state-dir", r"C:\ProgramData\Tenon", "--platform", "native", "service", "run"]);
    }
}
