//! First-start enrollment of an installed agent: the MSI leaves the server URL and a one-time
//! enrollment token in the registry (`HKLM\SOFTWARE\Tenon`, values `EnrollServer` and
//! `EnrollToken`); the service enrolls with them before its first sync and deletes the token once
//! it is used.
//!
//! Why the registry and not the service's command line: the command line (ImagePath) is logged by
//! the SCM tools and stays until the service is reconfigured, while a registry value can be deleted
//! by the service the moment it is used. The trade-off: `HKLM\SOFTWARE` is readable by local users,
//! so the token is readable from the install until the service's first start consumes it (seconds,
//! since the install starts the service). A token is bounded in uses and time by
//! `tenonctl enroll-token create --uses N --ttl D`; give installers single-use, short-lived ones.
//!
//! A token that does not work (wrong, used up, expired, another server's) leaves the service
//! running: it retries with exponential backoff, re-reading the registry each time (so a corrected
//! value or a manual `tenon-agent enroll` takes effect without a restart), and says why in its log
//! and in `status.json` (`enrollment_error`). Without a server it waits, saying how to enroll. The
//! token itself never appears in a log line, a status or an error.

use crate::agent::{jitter, sleep_until, Agent, AgentError};
use crate::platform::{Platform, PlatformError, RegValue};
use crate::status::Status;
use crate::vault::Vault;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use zeroize::Zeroizing;

/// Where the installer leaves what the first start needs.
pub const INSTALL_KEY: &str = r"HKLM\SOFTWARE\Tenon";
pub const SERVER_VALUE: &str = "EnrollServer";
pub const TOKEN_VALUE: &str = "EnrollToken";
/// How an administrator enrolls a device installed without a server.
pub const HOW_TO_ENROLL: &str =
    "enroll it as an administrator with `tenon-agent enroll --server URL --token-file FILE`, \
     or reinstall with `msiexec /i tenon-agent.msi TENON_SERVER=URL TENON_ENROLL_TOKEN=TOKEN`";
/// Longer values are refused, not read (the registry is written by the installer, but bound it).
const MAX_VALUE_LEN: usize = 2048;
/// How often a waiting agent (no server given) looks again for a server or a manual enrollment.
pub const WAIT_POLL: Duration = Duration::from_secs(10);
const FIRST_BACKOFF: Duration = Duration::from_secs(5);
const MAX_BACKOFF: Duration = Duration::from_secs(15 * 60);

/// What the installer left.
#[derive(Debug)]
pub enum Pending {
    /// No server: the agent waits for one (or for a manual enrollment).
    NoServer,
    /// A server but no token: enrollment needs a token.
    NoToken {
        server: String,
    },
    Ready {
        server: String,
        token: Zeroizing<String>,
    },
    /// A value that cannot be used (wrong type, too long); the reason names the value, never its content.
    Unusable(String),
}

impl Pending {
    /// Why the agent is not enrolled yet and what to do, for the log and `enrollment_error`.
    pub fn waiting_reason(&self) -> Option<String> {
        match self {
            Pending::NoServer => Some(format!(
                "not enrolled: no server was given at install (TENON_SERVER); the service is waiting: {HOW_TO_ENROLL}"
            )),
            Pending::NoToken { server } => Some(format!(
                "not enrolled: a server ({server}) but no enrollment token was given at install (TENON_ENROLL_TOKEN); \
                 the service is waiting: {HOW_TO_ENROLL}"
            )),
            Pending::Unusable(why) => Some(format!("not enrolled: {why}; the service is waiting: {HOW_TO_ENROLL}")),
            Pending::Ready { .. } => None,
        }
    }
}

/// Reads what the installer left; empty values count as absent.
pub fn read_pending(platform: &dyn Platform) -> Result<Pending, PlatformError> {
    let server = match read_text(platform, SERVER_VALUE)? {
        Ok(s) => s,
        Err(why) => return Ok(Pending::Unusable(why)),
    };
    let Some(server) = server else { return Ok(Pending::NoServer) };
    match read_text(platform, TOKEN_VALUE)? {
        Err(why) => Ok(Pending::Unusable(why)),
        Ok(None) => Ok(Pending::NoToken { server }),
        Ok(Some(token)) => Ok(Pending::Ready { server, token: Zeroizing::new(token) }),
    }
}

fn read_text(platform: &dyn Platform, name: &str) -> Result<Result<Option<String>, String>, PlatformError> {
    Ok(match platform.reg_get(INSTALL_KEY, name)? {
        None => Ok(None),
        Some(RegValue::Sz(s)) if s.len() > MAX_VALUE_LEN => {
            Err(format!("{INSTALL_KEY}\\{name} is longer than {MAX_VALUE_LEN} bytes"))
        }
        Some(RegValue::Sz(s)) => {
            let t = s.trim();
            Ok((!t.is_empty()).then(|| t.to_string()))
        }
        Some(_) => Err(format!("{INSTALL_KEY}\\{name} is not a string (REG_SZ)")),
    })
}

/// Deletes the token (used, or made pointless by an enrollment done by hand). Looks first, so an
/// enrolled agent's every start writes nothing.
fn consume_token(platform: &dyn Platform) {
    if matches!(platform.reg_get(INSTALL_KEY, TOKEN_VALUE), Ok(None)) {
        return;
    }
    match platform.reg_delete(INSTALL_KEY, TOKEN_VALUE) {
        Ok(true) => tracing::info!("deleted the enrollment token the installer left ({INSTALL_KEY}\\{TOKEN_VALUE})"),
        Ok(false) => {}
        Err(e) => tracing::warn!(error = %e, "could not delete {INSTALL_KEY}\\{TOKEN_VALUE}; delete it by hand"),
    }
}

fn record(agent: &Agent<'_>, reason: Option<&str>) {
    let mut status = Status::load(&agent.state_dir);
    if status.enrollment_error.as_deref() == reason {
        return;
    }
    status.enrollment_error = reason.map(str::to_string);
    if let Err(e) = status.save(&agent.state_dir) {
        tracing::warn!(error = %e, "cannot write status.json");
    }
}

impl Agent<'_> {
    /// The loop of an installed agent (the service, and `tenon-agent run`): enroll first if the
    /// device is not enrolled yet (see the module docs), then [`Agent::run`]. Returns `Ok` when
    /// `stop` is set while waiting.
    pub fn run_installed(&self, interval: Duration, stop: &AtomicBool) -> Result<(), AgentError> {
        if self.enroll_at_first_start(stop) {
            self.run(interval, stop)
        } else {
            Ok(())
        }
    }

    /// Waits until the device is enrolled (from the installer's values, or by hand); `false` when
    /// `stop` was set first.
    pub fn enroll_at_first_start(&self, stop: &AtomicBool) -> bool {
        let never = AtomicBool::new(false);
        let mut backoff = FIRST_BACKOFF;
        let mut logged: Option<String> = None;
        while !stop.load(Ordering::SeqCst) {
            if Vault::new(&self.state_dir, self.platform).exists() {
                // Enrolled (before, or by hand while waiting): a token left behind is of no use.
                consume_token(self.platform);
                record(self, None);
                return true;
            }
            let pending = match read_pending(self.platform) {
                Ok(p) => p,
                Err(e) => Pending::Unusable(format!("cannot read {INSTALL_KEY}: {e}")),
            };
            let (reason, wait) = match pending {
                Pending::Ready { server, token } => match self.enroll(&server, &token, false) {
                    Ok(device_id) => {
                        tracing::info!(device_id = %device_id, server = %server, "enrolled at first start");
                        consume_token(self.platform);
                        record(self, None);
                        return true;
                    }
                    Err(AgentError::AlreadyEnrolled(_)) => continue,
                    Err(e) => {
                        let wait = jitter(backoff, 0.3);
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        // The error names the server and what it said, never the token.
                        (format!("enrollment with {server} failed: {e}; retrying with backoff"), wait)
                    }
                },
                other => (other.waiting_reason().unwrap_or_else(|| "not enrolled".into()), WAIT_POLL),
            };
            record(self, Some(&reason));
            if logged.as_deref() != Some(reason.as_str()) {
                tracing::warn!("{reason}");
                logged = Some(reason);
            } else {
                tracing::debug!(retry_in = ?wait, "still not enrolled");
            }
            sleep_until(stop, &never, wait);
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::simulated::SimulatedPlatform;

    fn platform(registry: serde_json::Value) -> (tempfile::TempDir, SimulatedPlatform) {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("device.json");
        let device = serde_json::json!({"hostname": "pc-1", "registry": {INSTALL_KEY: registry}});
        std::fs::write(&file, device.to_string()).unwrap();
        let p = SimulatedPlatform::open(&file).unwrap();
        (dir, p)
    }

    #[test]
    fn what_the_installer_left() {
        let sz = |s: &str| serde_json::json!({"type": "REG_SZ", "value": s});
        let long = "x".repeat(MAX_VALUE_LEN + 1);
        let cases: Vec<(serde_json::Value, &str)> = vec![
            (serde_json::json!({}), "no_server"),
            (serde_json::json!({SERVER_VALUE: sz("  ")}), "no_server"),
            (serde_json::json!({SERVER_VALUE: sz("http://s"), TOKEN_VALUE: sz("")}), "no_token"),
            (serde_json::json!({SERVER_VALUE: sz("http://s")}), "no_token"),
            (serde_json::json!({SERVER_VALUE: sz("http://s"), TOKEN_VALUE: sz(" tenr.a.b.c ")}), "ready"),
            (serde_json::json!({SERVER_VALUE: {"type": "REG_DWORD", "value": 1}}), "unusable"),
            (serde_json::json!({SERVER_VALUE: sz("http://s"), TOKEN_VALUE: sz(&long)}), "unusable"),
        ];
        for (registry, want) in cases {
            let (_d, p) = platform(registry.clone());
            let got = read_pending(&p).unwrap();
            let kind = match &got {
                Pending::NoServer => "no_server",
                Pending::NoToken { .. } => "no_token",
                Pending::Ready { server, token } => {
                    assert_eq!((server.as_str(), token.as_str()), ("http://s", "tenr.a.b.c"));
                    "ready"
                }
                Pending::Unusable(why) => {
                    assert!(!why.contains(&long), "the reason never carries the value");
                    "unusable"
                }
            };
            assert_eq!(kind, want, "{registry}");
            assert_eq!(got.waiting_reason().is_none(), want == "ready");
        }
    }

    #[test]
    fn waiting_says_how_to_enroll() {
        let reason = Pending::NoServer.waiting_reason().unwrap();
        assert!(reason.contains("tenon-agent enroll --server URL --token-file FILE"), "{reason}");
    }
}
