//! What one server wrote that the others must apply to their memory (the `changes` table,
//! migration 0008). A write appends rows in its own transaction and notifies channel
//! [`CHANNEL`]; PostgreSQL delivers the notification at commit. Followers read the rows above the
//! last they applied (`state::follow`). On SQLite there is one server and nothing is appended.

use super::Conn;
use sqlx::Row;

/// The PostgreSQL `LISTEN`/`NOTIFY` channel.
pub const CHANNEL: &str = "tenon_changes";

/// Rows are kept this long; a server away for longer reloads everything.
pub const KEEP_SECONDS: i64 = 24 * 3600;

/// What a change touched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Settings, users, groups or signatures: the directory is reloaded.
    Directory,
    /// One device's rows (enrollment, report, envelope, primary user, decommission).
    Device,
    /// A device may have a recovery-key rotation open.
    Rotation,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Directory => "directory",
            Kind::Device => "device",
            Kind::Rotation => "rotation",
        }
    }

    fn parse(s: &str) -> Option<Kind> {
        Some(match s {
            "directory" => Kind::Directory,
            "device" => Kind::Device,
            "rotation" => Kind::Rotation,
            _ => return None,
        })
    }
}

/// Whether this connection's database may be shared by several servers (PostgreSQL).
pub fn shared(conn: &Conn) -> bool {
    conn.backend_name() != "SQLite"
}

/// Rows per INSERT: four parameters each, well below PostgreSQL's 65,535.
const ROWS_PER_INSERT: usize = 250;

/// Appends one row per target (`""` for the directory) and notifies, inside the caller's
/// transaction. Does nothing on SQLite.
pub async fn note<'t>(
    conn: &mut Conn,
    origin: &str,
    at: i64,
    kind: Kind,
    targets: impl IntoIterator<Item = &'t str>,
) -> sqlx::Result<()> {
    if !shared(conn) {
        return Ok(());
    }
    let targets: Vec<&str> = targets.into_iter().collect();
    for part in targets.chunks(ROWS_PER_INSERT) {
        let mut sql = String::from("INSERT INTO changes (at, origin, kind, target) VALUES ");
        for i in 0..part.len() {
            if i > 0 {
                sql.push_str(", ");
            }
            let p = i * 4;
            sql.push_str(&format!("(${}, ${}, ${}, ${})", p + 1, p + 2, p + 3, p + 4));
        }
        let mut q = sqlx::query(&sql);
        for t in part {
            q = q.bind(at).bind(origin).bind(kind.as_str()).bind(*t);
        }
        q.execute(&mut *conn).await?;
    }
    // Identical notifications in one transaction are delivered once, at commit.
    sqlx::query("SELECT COUNT(*) FROM (SELECT pg_notify($1, '')) n").bind(CHANNEL).execute(&mut *conn).await?;
    Ok(())
}

/// One row of `changes`.
#[derive(Debug)]
pub struct Change {
    pub seq: i64,
    pub kind: Kind,
    pub target: String,
    /// Written by this server (which applied it already).
    pub own: bool,
}

/// The rows above `after`, oldest first, at most `limit`.
pub async fn since(conn: &mut Conn, after: i64, origin: &str, limit: i64) -> sqlx::Result<Vec<Change>> {
    let rows = sqlx::query("SELECT seq, origin, kind, target FROM changes WHERE seq > $1 ORDER BY seq LIMIT $2")
        .bind(after)
        .bind(limit)
        .fetch_all(&mut *conn)
        .await?;
    Ok(rows
        .iter()
        .filter_map(|r| {
            let kind = Kind::parse(r.get::<&str, _>(2))?;
            Some(Change { seq: r.get(0), own: r.get::<&str, _>(1) == origin, kind, target: r.get(3) })
        })
        .collect())
}

/// The newest row's number (0: none), and the highest pruned one: a server whose last applied
/// row is below that missed rows and reloads everything.
pub async fn bounds(conn: &mut Conn) -> sqlx::Result<(i64, i64)> {
    let row = sqlx::query(
        "SELECT (SELECT COALESCE(MAX(seq), 0) FROM changes), (SELECT pruned_through FROM changes_horizon WHERE id = 1)",
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok((row.get(0), row.get(1)))
}

/// Drops rows older than [`KEEP_SECONDS`] (a leased job, in a write transaction).
pub async fn prune(conn: &mut Conn, now: i64) -> sqlx::Result<u64> {
    let before = now - KEEP_SECONDS;
    sqlx::query(
        "UPDATE changes_horizon SET pruned_through = COALESCE((SELECT MAX(seq) FROM changes WHERE at < $1), pruned_through)
         WHERE id = 1",
    )
    .bind(before)
    .execute(&mut *conn)
    .await?;
    Ok(sqlx::query("DELETE FROM changes WHERE at < $1").bind(before).execute(&mut *conn).await?.rows_affected())
}
