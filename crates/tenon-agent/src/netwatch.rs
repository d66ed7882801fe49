//! Watches the network so that policies that depend on it (Delivery Optimization) re-run within
//! seconds of a laptop moving between sites, instead of at the next sync.
//!
//! The run loop starts [`watch_network`] on its own thread and re-runs the policies from the
//! callback; the periodic sync stays the fallback. For example:
//!
//! ```no_run
//! # use std::sync::atomic::AtomicBool;
//! # fn run(platform: &dyn tenon_agent::platform::Platform, stop: &AtomicBool) {
//! std::thread::scope(|s| {
//!     s.spawn(|| tenon_agent::netwatch::watch_network(platform, stop, |gw| println!("now behind {gw:?}")));
//!     // ... the sync loop, which sets `stop` on shutdown ...
//! });
//! # }
//! ```

use crate::platform::{default_gateway, GatewayFingerprint, Platform};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How long one wait blocks, so that `stop` is noticed promptly.
const WAIT_SLICE: Duration = Duration::from_secs(2);
/// A move brings a burst of route and interface events: the fingerprint is read once the network
/// has been quiet this long, so the policy runs once per move and sees the settled network.
const DEBOUNCE: Duration = Duration::from_secs(2);
/// A link that keeps flapping must not hold the re-run back for ever.
const MAX_SETTLE: Duration = Duration::from_secs(15);
/// Without a notification the fingerprint is still re-read this often: notifications can be missed,
/// or not be available at all (the platform's wait then fails and we only poll).
const POLL: Duration = Duration::from_secs(30);

/// Calls `on_change` with the new gateway fingerprint (`None`: no default gateway) each time it
/// actually changes, until `stop` is set. Events that leave the fingerprint as it was (a DHCP
/// renewal, another interface coming up) do not call back.
pub fn watch_network(
    platform: &dyn Platform,
    stop: &AtomicBool,
    mut on_change: impl FnMut(Option<GatewayFingerprint>),
) {
    // `None`: not known (the read failed); `Some(None)`: known to have no gateway.
    let mut last = read(platform);
    let mut last_read = Instant::now();
    let mut wait_failed = false;
    while !stop.load(Ordering::Relaxed) {
        let notified = match platform.wait_network_change(WAIT_SLICE) {
            Ok(changed) => changed,
            Err(e) => {
                if !wait_failed {
                    tracing::warn!("network change notifications failed ({e}); polling every {}s", POLL.as_secs());
                    wait_failed = true;
                }
                sleep_unless_stopped(WAIT_SLICE, stop);
                false
            }
        };
        if !notified && last_read.elapsed() < POLL {
            continue;
        }
        if notified {
            settle(platform, stop);
        }
        last_read = Instant::now();
        let Some(now) = read(platform) else { continue };
        if last != Some(now) {
            tracing::info!("default gateway changed to {now:?}");
            last = Some(now);
            on_change(now);
        }
    }
}

fn read(platform: &dyn Platform) -> Option<Option<GatewayFingerprint>> {
    default_gateway(platform).map_err(|e| tracing::warn!("cannot read the default gateway: {e}")).ok()
}

/// Returns once no change came for [`DEBOUNCE`] (or after [`MAX_SETTLE`]).
fn settle(platform: &dyn Platform, stop: &AtomicBool) {
    let start = Instant::now();
    while !stop.load(Ordering::Relaxed) && start.elapsed() < MAX_SETTLE {
        if !matches!(platform.wait_network_change(DEBOUNCE), Ok(true)) {
            return;
        }
    }
}

fn sleep_unless_stopped(total: Duration, stop: &AtomicBool) {
    let end = Instant::now() + total;
    while !stop.load(Ordering::Relaxed) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(100).min(end.saturating_duration_since(Instant::now())));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::simulated::SimulatedPlatform;
    use serde_json::json;
    use std::path::Path;
    use std::sync::mpsc;

    fn write_device(path: &Path, network: serde_json::Value) {
        // Atomically, as a person editing the device would not leave it half-written for long either.
        let tmp = path.with_extension("edit");
        std::fs::write(&tmp, json!({"hostname": "LAPTOP", "network": network}).to_string()).unwrap();
        crate::platform::simulated::replace_file(&tmp, path).unwrap();
    }

    #[test]
    fn calls_back_when_the_gateway_changes_and_only_then() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("device.json");
        write_device(&path, json!({"gateway_ip": "10.1.0.1", "gateway_mac": "00:1a:2b:3c:4d:5e"}));
        let platform = SimulatedPlatform::open(&path).unwrap();
        let stop = AtomicBool::new(false);
        let (tx, rx) = mpsc::channel();

        std::thread::scope(|s| {
            let watcher = s.spawn(|| watch_network(&platform, &stop, move |gw| tx.send(gw).unwrap()));
            // A failed assertion must still stop the watcher, or the scope would wait for ever.
            struct StopOnDrop<'a>(&'a AtomicBool);
            impl Drop for StopOnDrop<'_> {
                fn drop(&mut self) {
                    self.0.store(true, Ordering::Relaxed);
                }
            }
            let _stop_on_drop = StopOnDrop(&stop);
            std::thread::sleep(Duration::from_millis(300));

            // The laptop moves to another site.
            let moved_at = Instant::now();
            write_device(&path, json!({"gateway_ip": "10.2.0.1", "gateway_mac": "f0:9f:c2:00:00:02"}));
            let gw = rx.recv_timeout(Duration::from_secs(10)).expect("a callback after the move");
            assert_eq!(gw.map(|g| (g.ip.to_string(), g.mac)), Some(("10.2.0.1".into(), [0xf0, 0x9f, 0xc2, 0, 0, 2])));
            assert!(moved_at.elapsed() < Duration::from_secs(8), "took {:?}", moved_at.elapsed());

            // The network section changes but the fingerprint does not: no callback.
            write_device(&path, json!({"gateway_ip": "10.2.0.1", "gateway_mac": "F0-9F-C2-00-00-02"}));
            assert!(rx.recv_timeout(Duration::from_secs(4)).is_err());

            // The link goes away.
            write_device(&path, json!({}));
            assert_eq!(rx.recv_timeout(Duration::from_secs(10)).expect("a callback for no gateway"), None);

            stop.store(true, Ordering::Relaxed);
            watcher.join().unwrap();
        });
    }
}
