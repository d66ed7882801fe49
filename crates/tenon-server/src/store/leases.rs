//! Jobs that must run on one server at a time (escrow verification, report pruning, envelope
//! refresh). The holder renews its lease every few seconds; a lease not renewed within
//! [`LEASE_SECONDS`] is free, so when its server dies another takes the jobs over.

use super::{begin_write, Db};

/// How long a lease lasts without renewal.
pub const LEASE_SECONDS: i64 = 15;

/// Takes or renews the lease `name` for `holder`; true while `holder` has it. On SQLite there is
/// one server and it always gets it.
pub async fn acquire(db: &Db, name: &str, holder: &str, now: i64) -> sqlx::Result<bool> {
    let mut tx = begin_write(db).await?;
    sqlx::query(
        "INSERT INTO leases (name, holder, expires_at) VALUES ($1, $2, $3)
         ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at
         WHERE leases.holder = excluded.holder OR leases.expires_at < $4",
    )
    .bind(name)
    .bind(holder)
    .bind(now + LEASE_SECONDS)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    let current: String =
        sqlx::query_scalar("SELECT holder FROM leases WHERE name = $1").bind(name).fetch_one(&mut *tx).await?;
    tx.commit().await?;
    Ok(current == holder)
}

/// Gives the lease up (a server stopping), so another takes over at once.
pub async fn release(db: &Db, name: &str, holder: &str) -> sqlx::Result<()> {
    let mut tx = begin_write(db).await?;
    sqlx::query("DELETE FROM leases WHERE name = $1 AND holder = $2").bind(name).bind(holder).execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_lease_has_one_holder_until_it_expires() {
        let db = crate::store::memory_for_tests().await;
        assert!(acquire(&db, "jobs", "a", 100).await.unwrap());
        assert!(!acquire(&db, "jobs", "b", 101).await.unwrap(), "a holds it");
        assert!(acquire(&db, "jobs", "a", 110).await.unwrap(), "a renews it");
        assert!(!acquire(&db, "jobs", "b", 110 + LEASE_SECONDS).await.unwrap(), "not expired yet");
        assert!(acquire(&db, "jobs", "b", 111 + LEASE_SECONDS).await.unwrap(), "a stopped renewing");
        assert!(!acquire(&db, "jobs", "a", 112 + LEASE_SECONDS).await.unwrap());
        release(&db, "jobs", "b").await.unwrap();
        assert!(acquire(&db, "jobs", "a", 113 + LEASE_SECONDS).await.unwrap(), "released: free at once");
    }
}
