//! The bounded report history: per device the last `last` reports, plus the latest report of each
//! UTC day for the last `days` days. Pruned in the transaction that stores a report (so a device
//! can never hold more than `last + days` rows) and swept daily for devices that stopped reporting.

use sqlx::AnyConnection;

const DAY: i64 = 24 * 3600;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReportHistory {
    /// The most recent reports kept, whatever their age.
    pub last: u32,
    /// Days for which the day's latest report is kept.
    pub days: u32,
}

impl Default for ReportHistory {
    fn default() -> Self {
        Self { last: 20, days: 30 }
    }
}

impl ReportHistory {
    /// Oldest `received_at` whose day still keeps a report at `now`.
    fn day_cutoff(&self, now: i64) -> i64 {
        (now.div_euclid(DAY) - i64::from(self.days) + 1) * DAY
    }

    /// Deletes `device_id`'s reports outside the history; returns how many.
    pub async fn prune(&self, conn: &mut AnyConnection, device_id: &str, now: i64) -> sqlx::Result<u64> {
        let done = sqlx::query(
            "DELETE FROM reports WHERE device_id = $1
               AND id NOT IN (SELECT id FROM reports WHERE device_id = $1 ORDER BY id DESC LIMIT $2)
               AND id NOT IN (SELECT MAX(id) FROM reports WHERE device_id = $1 AND received_at >= $3
                              GROUP BY received_at / 86400)",
        )
        .bind(device_id)
        .bind(i64::from(self.last))
        .bind(self.day_cutoff(now))
        .execute(conn)
        .await?;
        Ok(done.rows_affected())
    }

    /// Prunes every device's history (the daily sweep); returns the rows deleted.
    pub async fn sweep(&self, db: &sqlx::AnyPool, now: i64) -> sqlx::Result<u64> {
        let devices: Vec<String> = sqlx::query_scalar("SELECT DISTINCT device_id FROM reports").fetch_all(db).await?;
        let mut deleted = 0;
        for chunk in devices.chunks(500) {
            let mut tx = crate::store::begin_write(db).await?;
            for id in chunk {
                deleted += self.prune(&mut tx, id, now).await?;
            }
            tx.commit().await?;
        }
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn db() -> sqlx::AnyPool {
        crate::store::memory_for_tests().await
    }

    async fn add(pool: &sqlx::AnyPool, device: &str, at: i64) {
        sqlx::query("INSERT INTO reports (device_id, received_at, report) VALUES ($1, $2, '{}')")
            .bind(device)
            .bind(at)
            .execute(pool)
            .await
            .unwrap();
    }

    async fn kept(pool: &sqlx::AnyPool, device: &str) -> Vec<i64> {
        sqlx::query_scalar("SELECT received_at FROM reports WHERE device_id = $1 ORDER BY id")
            .bind(device)
            .fetch_all(pool)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn keeps_the_last_n_and_one_per_day() {
        let pool = db().await;
        let h = ReportHistory { last: 3, days: 2 };
        let day0 = 100 * DAY;
        // Four reports a day for four days, on two devices.
        for d in 0..4 {
            for k in 0..4 {
                add(&pool, "a", day0 + d * DAY + k * 3600).await;
                add(&pool, "b", day0 + d * DAY + k * 3600).await;
            }
        }
        let now = day0 + 3 * DAY + 4 * 3600;
        let mut conn = pool.acquire().await.unwrap();
        h.prune(&mut conn, "a", now).await.unwrap();
        drop(conn);
        // The last three (day 3, 1h..3h) and the latest of day 2; days 0 and 1 are past the window.
        let d = |day: i64, hour: i64| day0 + day * DAY + hour * 3600;
        assert_eq!(kept(&pool, "a").await, vec![d(2, 3), d(3, 1), d(3, 2), d(3, 3)]);
        assert_eq!(kept(&pool, "b").await.len(), 16, "other devices untouched");
        assert_eq!(h.sweep(&pool, now).await.unwrap(), 12);
        assert_eq!(kept(&pool, "b").await, vec![d(2, 3), d(3, 1), d(3, 2), d(3, 3)]);
    }
}
