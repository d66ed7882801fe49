//! The server's background work. Some of it belongs to every server (flushing its last-seen
//! times, its rate limiters, its log of failed authentications); the rest is done for the whole
//! database and must run on one server at a time: it runs on the holder of the lease
//! [`LEASE`] (`store::leases`), which moves to another server when its holder stops renewing it.

use crate::state::AppState;
use crate::store::leases;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// The lease of the database-wide jobs.
pub const LEASE: &str = "jobs";

/// How often the lease is renewed (well within `leases::LEASE_SECONDS`).
const RENEW: Duration = Duration::from_secs(5);

impl AppState {
    /// Whether this server runs the database-wide jobs now.
    pub fn holds_jobs(&self) -> bool {
        self.jobs_lease.load(Ordering::Relaxed)
    }

    /// Runs for the life of the server.
    pub async fn run_jobs(self: Arc<Self>, auth_interval: Duration) {
        let mut lease = tokio::time::interval(RENEW);
        let mut flush = tokio::time::interval(Duration::from_secs(15));
        let mut auth_log = tokio::time::interval(auth_interval);
        let mut limiter_sweep = tokio::time::interval(Duration::from_secs(60));
        // Leased. Each runs when this server takes the lease, then at its interval.
        let mut refresh = tokio::time::interval(Duration::from_secs(600));
        // Do all escrowed keys still open?
        let mut verify = tokio::time::interval(Duration::from_secs(24 * 3600));
        // Devices that stopped reporting still age out of the daily history.
        let mut history_sweep = tokio::time::interval(Duration::from_secs(24 * 3600));
        let mut prune_changes = tokio::time::interval(Duration::from_secs(3600));
        for i in [
            &mut lease,
            &mut flush,
            &mut auth_log,
            &mut limiter_sweep,
            &mut refresh,
            &mut verify,
            &mut history_sweep,
            &mut prune_changes,
        ] {
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        loop {
            let held = self.holds_jobs();
            tokio::select! {
                _ = lease.tick() => {
                    let now_held = match leases::acquire(&self.db, LEASE, &self.origin, self.now()).await {
                        Ok(h) => h,
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot renew the jobs lease; the jobs pause until the database answers");
                            false
                        }
                    };
                    if now_held && !held {
                        tracing::info!(server = %self.origin, "this server runs the database-wide jobs now");
                        for i in [&mut refresh, &mut verify, &mut history_sweep, &mut prune_changes] {
                            i.reset_immediately();
                        }
                    } else if held && !now_held {
                        tracing::info!(server = %self.origin, "another server runs the database-wide jobs now");
                    }
                    self.jobs_lease.store(now_held, Ordering::Relaxed);
                }
                _ = auth_log.tick() => self.client.auth_failures.log(auth_interval),
                _ = limiter_sweep.tick() => self.client.limiters.sweep(),
                _ = flush.tick() => if let Err(e) = self.flush_last_seen().await {
                    tracing::warn!(error = format!("{e:#}"), "cannot record last-seen times; will retry");
                },
                _ = history_sweep.tick(), if held => match self.client.history.sweep(&self.db, self.now()).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(reports = n, "pruned the report history"),
                    Err(e) => tracing::warn!(error = format!("{e:#}"), "cannot prune the report history; will retry"),
                },
                _ = verify.tick(), if held => crate::escrow::log_verification(&self.db, &self.keys.escrow).await,
                _ = refresh.tick(), if held => {
                    let due = self.refresh_expiring().await;
                    if due.devices > 0 {
                        tracing::info!(devices = due.devices, "re-issuing envelopes nearing expiry");
                    }
                },
                _ = prune_changes.tick(), if held && self.shared => {
                    let pruned = async {
                        let mut tx = crate::store::begin_write(&self.db).await?;
                        let n = crate::store::changes::prune(&mut tx, self.now()).await?;
                        tx.commit().await?;
                        Ok::<_, sqlx::Error>(n)
                    };
                    if let Err(e) = pruned.await {
                        tracing::warn!(error = %e, "cannot prune old rows of the change log; will retry");
                    }
                },
            }
        }
    }

    /// Asks the database every second whether it answers (`/healthz`, `/readyz`).
    pub async fn probe_database(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let ok = matches!(
                tokio::time::timeout(Duration::from_secs(2), sqlx::query("SELECT 1").execute(&self.db)).await,
                Ok(Ok(_))
            );
            let was = self.database_ok.swap(ok, Ordering::Relaxed);
            if was != ok {
                if ok {
                    tracing::info!("the database answers again");
                } else {
                    tracing::warn!("the database does not answer: check-ins are served from memory, writes answer 503 until it returns");
                }
            }
        }
    }
}
