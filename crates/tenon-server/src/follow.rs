//! Several servers, one database: following what the others write.
//!
//! Every server keeps the directory and the devices in memory and answers check-ins from there.
//! A write appends what it touched to `changes` (`store::changes::note`) in its transaction; the
//! others apply those rows to their memory:
//!
//! - within milliseconds of the commit, woken by PostgreSQL `NOTIFY` ([`AppState::run_follower`]);
//! - every few seconds anyway, and at once after the listening connection was re-established
//!   (a notification may have been lost);
//! - and before each of their own writes ([`AppState::begin_write`]): with the database's one
//!   write lock held, nobody else is writing, so after catching up the server writes from
//!   current state. A device's version is therefore always computed from the newest version, and
//!   no two servers issue the same version with different payloads.
//!
//! On SQLite there is one server: nothing is noted, nothing followed.

use crate::error::ApiResult;
use crate::state::{AppState, World};
use crate::store::changes::{self, Kind};
use crate::store::{Conn, Tx};
use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Rows applied per read.
const BATCH: i64 = 10_000;

/// Reads the database even without a notification this often.
const POLL: Duration = Duration::from_secs(5);

impl AppState {
    /// Opens a write transaction with the database's write lock and, on a shared database,
    /// first applies what other servers wrote, so this write starts from current state. The
    /// caller holds the world's write lock.
    pub async fn begin_write(&self, world: &mut World) -> ApiResult<Tx> {
        let mut tx = crate::store::begin_write(&self.db).await?;
        if self.shared {
            self.catch_up(&mut tx, world).await?;
        }
        Ok(tx)
    }

    /// Notes a change for the other servers, inside the write's transaction.
    pub async fn note<'t>(
        &self,
        conn: &mut Conn,
        kind: Kind,
        targets: impl IntoIterator<Item = &'t str>,
    ) -> sqlx::Result<()> {
        if !self.shared {
            return Ok(());
        }
        changes::note(conn, &self.origin, self.now(), kind, targets).await
    }

    /// Applies every change above the last one applied. The caller holds the world's write lock.
    pub(crate) async fn catch_up(&self, conn: &mut Conn, world: &mut World) -> anyhow::Result<usize> {
        let mut applied = 0;
        loop {
            let after = self.applied_seq.load(Ordering::Acquire);
            let (newest, pruned_through) = changes::bounds(conn).await?;
            if newest <= after {
                return Ok(applied);
            }
            if after < pruned_through {
                // Rows this server never saw were pruned: start again from the database.
                tracing::warn!(
                    after,
                    pruned_through,
                    "changes were pruned before this server applied them; reloading everything"
                );
                self.reload_all(conn, world).await?;
                self.applied_seq.store(newest, Ordering::Release);
                return Ok(applied + 1);
            }
            let rows = changes::since(conn, after, &self.origin, BATCH).await?;
            let Some(last) = rows.last().map(|c| c.seq) else {
                self.applied_seq.store(newest, Ordering::Release);
                return Ok(applied);
            };
            applied += self.apply(conn, world, &rows).await?;
            self.applied_seq.store(last, Ordering::Release);
        }
    }

    async fn apply(&self, conn: &mut Conn, world: &mut World, rows: &[changes::Change]) -> anyhow::Result<usize> {
        let mut directory = false;
        let mut devices = BTreeSet::new();
        let mut rotations = Vec::new();
        for c in rows.iter().filter(|c| !c.own) {
            match c.kind {
                Kind::Directory => directory = true,
                Kind::Device => {
                    devices.insert(c.target.clone());
                }
                Kind::Rotation => rotations.push(c.target.clone()),
            }
        }
        if directory {
            world.directory = Arc::new(crate::store::directory::load(conn).await?);
            world.dir_gen += 1;
            world.foreign_gen = world.dir_gen;
        }
        let ids: Vec<String> = devices.into_iter().collect();
        if !ids.is_empty() {
            let dir_gen = world.dir_gen;
            for d in crate::store::devices::load(conn, Some(&ids)).await? {
                Self::apply_device_row(&self.index, world, d, dir_gen);
            }
        }
        if !rotations.is_empty() {
            self.rotations_open.lock().unwrap_or_else(|e| e.into_inner()).extend(rotations);
        }
        Ok(ids.len() + usize::from(directory))
    }

    /// Everything again from the database (this server was away longer than changes are kept).
    async fn reload_all(&self, conn: &mut Conn, world: &mut World) -> anyhow::Result<()> {
        world.directory = Arc::new(crate::store::directory::load(conn).await?);
        world.dir_gen += 1;
        world.foreign_gen = world.dir_gen;
        let dir_gen = world.dir_gen;
        for d in crate::store::devices::load(conn, None).await? {
            Self::apply_device_row(&self.index, world, d, dir_gen);
        }
        let open: Vec<String> = sqlx::query_scalar(crate::escrow::DEVICES_TO_ASK_SQL).fetch_all(&mut *conn).await?;
        self.rotations_open.lock().unwrap_or_else(|e| e.into_inner()).extend(open);
        Ok(())
    }

    /// One catch-up with its own connection (woken by a notification or the poll).
    async fn follow_once(&self) -> anyhow::Result<usize> {
        let mut conn = self.db.acquire().await?;
        let mut world = self.world.write().await;
        self.catch_up(&mut conn, &mut world).await
    }

    /// Follows the other servers' writes for the life of the server (PostgreSQL only).
    pub async fn run_follower(self: Arc<Self>, url: String) {
        if !self.shared {
            return;
        }
        loop {
            let mut listener = match sqlx::postgres::PgListener::connect(&url).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %crate::store::redact(&e.to_string()), "cannot listen for other servers' changes; polling until the database answers");
                    let _ = self.follow_once().await;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            if let Err(e) = listener.listen(changes::CHANNEL).await {
                tracing::warn!(error = %crate::store::redact(&e.to_string()), "cannot listen for other servers' changes; will retry");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            // Whatever was written before the listener was in place.
            self.log_follow(self.follow_once().await);
            loop {
                match tokio::time::timeout(POLL, listener.try_recv()).await {
                    // A notification: read what it announces.
                    Ok(Ok(Some(_))) => {}
                    // The connection was lost and re-established: notifications may be lost.
                    Ok(Ok(None)) => tracing::info!("the connection for other servers' changes was re-established"),
                    Ok(Err(e)) => {
                        tracing::warn!(error = %crate::store::redact(&e.to_string()), "lost the connection for other servers' changes; reconnecting");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    // Quiet: read anyway.
                    Err(_) => {}
                }
                self.log_follow(self.follow_once().await);
            }
        }
    }

    fn log_follow(&self, r: anyhow::Result<usize>) {
        match r {
            Ok(0) => {}
            Ok(n) => tracing::debug!(applied = n, "applied other servers' changes"),
            Err(e) => tracing::warn!(error = format!("{e:#}"), "cannot apply other servers' changes; will retry"),
        }
    }
}
