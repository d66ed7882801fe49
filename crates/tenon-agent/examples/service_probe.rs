//! A stand-in service for the Wine harness: runs `tenon_agent::service::run_dispatcher` with a loop
//! that records when it starts and when it saw the stop request, so a test can drive the SCM
//! (install, start, stop) and check the graceful-stop path without the real agent loop.
//! The SCM launches it as `service_probe.exe --state-dir DIR service run`.

#[cfg(windows)]
mod probe {
    use anyhow::Context;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, OnceLock};
    use std::time::Duration;

    static STATE_DIR: OnceLock<PathBuf> = OnceLock::new();

    fn run_loop(stop: Arc<AtomicBool>) -> anyhow::Result<()> {
        let dir = STATE_DIR.get().context("no state dir")?;
        std::fs::write(dir.join("started"), std::process::id().to_string())?;
        while !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(100));
        }
        std::fs::write(dir.join("stopped"), "graceful")?;
        Ok(())
    }

    pub fn main() -> anyhow::Result<()> {
        let args: Vec<String> = std::env::args().collect();
        let dir = args
            .iter()
            .position(|a| a == "--state-dir")
            .and_then(|i| args.get(i + 1))
            .context("usage: service_probe --state-dir DIR service run")?;
        let _ = STATE_DIR.set(PathBuf::from(dir));
        tenon_agent::service::run_dispatcher(run_loop)?;
        Ok(())
    }
}

#[cfg(windows)]
fn main() -> anyhow::Result<()> {
    probe::main()
}

#[cfg(not(windows))]
fn main() {
    eprintln!("service_probe is a Windows service stand-in for scripts/test-windows");
}
