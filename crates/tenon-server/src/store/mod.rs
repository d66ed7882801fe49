//! The database behind the server: SQLite in the data dir (one server, the default) or
//! PostgreSQL (any number of servers sharing it). One pool type (`sqlx::Any`) carries both, so
//! every query is written once; what differs between the two lives here: how a database is
//! opened and migrated (one migrations folder per backend, `migrations/sqlite` and
//! `migrations/postgres`, with the same versions, tables and columns) and how a write takes the
//! one write lock.
//!
//! Queries use `$1`-style parameters (both backends read them), `BIGINT`-compatible integers,
//! and no backend's own functions outside this module and the few places that ask [`backend`].

pub mod changes;
pub mod devices;
pub mod directory;
pub mod identity;
pub mod leases;

use anyhow::{bail, Context};
use serde_json::Value;
use sqlx::any::AnyPoolOptions;
use sqlx::migrate::{MigrateError, Migrator};
use sqlx::Executor;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

pub type Db = sqlx::AnyPool;
pub type Conn = sqlx::AnyConnection;
pub type Tx = sqlx::Transaction<'static, sqlx::Any>;

static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/postgres");

/// The newest schema version this binary knows (both backends have the same versions).
pub fn newest_schema_version() -> i64 {
    SQLITE_MIGRATIONS.iter().map(|m| m.version).max().unwrap_or(0)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Which database a pool talks to.
pub fn backend(db: &Db) -> Backend {
    match db.connect_options().database_url.scheme() {
        "sqlite" => Backend::Sqlite,
        _ => Backend::Postgres,
    }
}

/// Where the data lives, from `--database` (none: `DATA_DIR/tenon.db`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    SqliteFile(PathBuf),
    Postgres(String),
}

impl Location {
    pub fn parse(database: Option<&str>, default_path: PathBuf) -> anyhow::Result<Location> {
        Ok(match database {
            None => Location::SqliteFile(default_path),
            Some(url) if url.starts_with("sqlite:") => {
                let opts = sqlx::sqlite::SqliteConnectOptions::from_str(url).map_err(|_| {
                    anyhow::anyhow!("--database {url:?} is not a valid SQLite URL; use sqlite:///path/to/tenon.db")
                })?;
                Location::SqliteFile(opts.get_filename().to_path_buf())
            }
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                if let Err(e) = sqlx::postgres::PgConnectOptions::from_str(url) {
                    bail!(
                        "--database {} is not a valid PostgreSQL URL ({}); use postgres://USER[:PASSWORD]@HOST:PORT/DATABASE \
                         (or postgres://USER@/DATABASE?host=/socket/dir)",
                        redact(url),
                        redact(&e.to_string())
                    );
                }
                Location::Postgres(url.to_string())
            }
            Some(url) => bail!(
                "--database {} is not a database URL; use postgres://USER[:PASSWORD]@HOST:PORT/DATABASE, \
                 sqlite:///path/to/tenon.db, or omit it for DATA_DIR/tenon.db",
                redact(url)
            ),
        })
    }

    /// For messages: the URL without its password.
    pub fn describe(&self) -> String {
        match self {
            Location::SqliteFile(p) => p.display().to_string(),
            Location::Postgres(url) => redact(url),
        }
    }
}

/// A database URL with any password replaced by `***`: URLs end up in errors and logs.
pub fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else { return url.to_string() };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else { return url.to_string() };
    let userinfo = &rest[..at];
    match userinfo.find(':') {
        Some(colon) => format!("{}{}:***{}", &url[..scheme_end + 3], &userinfo[..colon], &rest[at..]),
        None => url.to_string(),
    }
}

/// How SQLite's write-ahead log is checkpointed: by SQLite in the committing connection
/// (short-lived commands), or by the server's own task beside the writers (`serve`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Checkpoints {
    OnCommit,
    Background,
}

/// Opens (creating a SQLite file if missing) and migrates the database. Refuses, with one line
/// that says what to do, a database of a newer schema than this binary (nothing is migrated) and
/// a PostgreSQL user who may not create tables.
pub async fn open(location: &Location, checkpoints: Checkpoints) -> anyhow::Result<Db> {
    sqlx::any::install_default_drivers();
    let db = match location {
        Location::SqliteFile(path) => {
            restrict_database_files(path)?;
            let url = format!("sqlite://{}?mode=rwc", path.display());
            AnyPoolOptions::new()
                .max_connections(8)
                .after_connect(move |conn, _| {
                    Box::pin(async move {
                        // FULL: a write the server acknowledged (an escrowed key above all) survives
                        // power loss.
                        for pragma in [
                            "PRAGMA journal_mode = WAL",
                            "PRAGMA synchronous = FULL",
                            "PRAGMA foreign_keys = ON",
                            "PRAGMA busy_timeout = 10000",
                        ] {
                            conn.execute(pragma).await?;
                        }
                        // SQLite's automatic checkpoint runs inside the commit that crosses 1,000
                        // WAL pages: that writer then also copies the pages back and fsyncs,
                        // under the write lock. The server checkpoints from another connection
                        // instead (`checkpoint_wal`), which never blocks a writer.
                        if checkpoints == Checkpoints::Background {
                            conn.execute("PRAGMA wal_autocheckpoint = 0").await?;
                        }
                        Ok(())
                    })
                })
                .connect(&url)
                .await
                .with_context(|| format!("cannot open the database {}", path.display()))?
        }
        Location::Postgres(url) => AnyPoolOptions::new()
            .max_connections(16)
            // A write while the database is away fails within seconds (503, retried by the
            // client) instead of holding its request open.
            .acquire_timeout(Duration::from_secs(3))
            .connect(url)
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot connect to PostgreSQL at {}: {}; check that it runs, that the URL's host, port, user and \
                     database are right, and that the user may log in",
                    redact(url),
                    redact(&e.to_string())
                )
            })?,
    };
    migrate(&db, location).await?;
    Ok(db)
}

async fn migrate(db: &Db, location: &Location) -> anyhow::Result<()> {
    let migrator = match location {
        Location::SqliteFile(_) => &SQLITE_MIGRATIONS,
        Location::Postgres(_) => &POSTGRES_MIGRATIONS,
    };
    let newest = migrator.iter().map(|m| m.version).max().unwrap_or(0);
    match migrator.run(db).await {
        Ok(()) => Ok(()),
        Err(MigrateError::VersionMissing(v)) => bail!(
            "the database {} has schema version {v}, which this tenon-server does not know (it knows up to {newest}): \
             it was written by a newer release. Run that release (or newer), or restore a backup taken before the \
             upgrade; nothing was changed",
            location.describe()
        ),
        Err(MigrateError::VersionMismatch(v)) => bail!(
            "the database {}'s migration {v} differs from this tenon-server's: it was written by another build. \
             Run the release that created it; nothing was changed",
            location.describe()
        ),
        Err(MigrateError::Execute(sqlx::Error::Database(e)))
        | Err(MigrateError::ExecuteMigration(sqlx::Error::Database(e), _))
            if e.code().as_deref() == Some("42501") =>
        {
            bail!(
                "the PostgreSQL user of {} may not create the tables this server needs ({}): start it once (and after \
                 each upgrade) as the database's owner, or grant the user `CREATE ON SCHEMA public` (or make it the \
                 owner: ALTER DATABASE ... OWNER TO ...); nothing was changed",
                location.describe(),
                e.message()
            )
        }
        Err(e) => {
            Err(anyhow::Error::new(e).context(format!("cannot apply database migrations to {}", location.describe())))
        }
    }
}

/// Copies committed WAL pages back into the SQLite database every second (`PASSIVE`: it takes no
/// lock a writer needs and stops where a reader still needs old pages, to continue at the next
/// tick). Once everything is copied, SQLite starts the WAL from its beginning again at the next
/// commit, so the file stays as large as about a second of writes. PostgreSQL checkpoints itself.
pub async fn checkpoint_wal(db: Db) {
    if backend(&db) != Backend::Sqlite {
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)").execute(&db).await {
            tracing::warn!(error = %e, "cannot checkpoint the database's write-ahead log; will retry");
        }
    }
}

/// The key of the one PostgreSQL advisory lock every write holds (any fixed number; this one
/// spells "tenon" in ASCII).
const WRITE_LOCK: i64 = 0x74_65_6e_6f_6e;

/// Opens a write transaction holding the database's one write lock, so writes from every server
/// are serialised: versions are computed from state no other writer is changing, and the rows of
/// `changes` become visible in order.
///
/// SQLite: `BEGIN IMMEDIATE`, which takes the write lock at once (waiting up to the busy timeout):
/// a deferred transaction that reads first cannot upgrade to a write after another connection
/// committed, and SQLite then fails it with "database is locked" instead of waiting.
/// PostgreSQL: a transaction-scoped advisory lock, released by commit or rollback.
pub async fn begin_write(db: &Db) -> sqlx::Result<Tx> {
    match backend(db) {
        Backend::Sqlite => db.begin_with("BEGIN IMMEDIATE").await,
        Backend::Postgres => {
            let mut tx = db.begin().await?;
            // Wrapped: the function returns `void`, a type the Any driver cannot carry.
            sqlx::query("SELECT COUNT(*) FROM (SELECT pg_advisory_xact_lock($1)) l")
                .bind(WRITE_LOCK)
                .execute(&mut *tx)
                .await?;
            Ok(tx)
        }
    }
}

/// Appends an audit row inside the caller's transaction.
pub async fn audit(
    conn: &mut Conn,
    at: i64,
    actor: &str,
    action: &str,
    target: Option<&str>,
    details: Value,
) -> sqlx::Result<()> {
    sqlx::query("INSERT INTO audit (at, actor, action, target, details) VALUES ($1, $2, $3, $4, $5)")
        .bind(at)
        .bind(actor)
        .bind(action)
        .bind(target)
        .bind(details.to_string())
        .execute(conn)
        .await?;
    Ok(())
}

/// Whether an error means the database cannot be reached now (down, restarting, network, pool
/// exhausted while it is away), as opposed to a query that is wrong: such a write answers 503
/// with `Retry-After` and succeeds once the database is back.
pub fn is_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Tls(_) => true,
        sqlx::Error::Protocol(_) | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => {
            // PostgreSQL: class 08 (connection exception), 57P01..57P03 (admin shutdown, crash
            // shutdown, cannot connect now), 53300 (too many connections).
            db.code().is_some_and(|c| c.starts_with("08") || c.starts_with("57P") || c == "53300")
        }
        _ => false,
    }
}

/// The database holds credential hashes, sealed recovery keys and the audit log: it and its WAL
/// and shared-memory files are readable by their owner alone. The file is created 0600 before
/// SQLite opens it (SQLite gives the -wal and -shm files the database file's mode), and an existing
/// database from an older version is tightened.
fn restrict_database_files(db: &Path) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        if db.as_os_str().is_empty() || db.as_os_str() == ":memory:" {
            return Ok(());
        }
        if !db.exists() {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(db)
                .with_context(|| format!("cannot create the database file {}", db.display()))?;
        }
        let mut wal = db.as_os_str().to_owned();
        wal.push("-wal");
        let mut shm = db.as_os_str().to_owned();
        shm.push("-shm");
        for f in [db.to_path_buf(), PathBuf::from(wal), PathBuf::from(shm)] {
            if f.exists() {
                std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600))
                    .with_context(|| format!("cannot restrict permissions of {}", f.display()))?;
            }
        }
    }
    let _ = db;
    Ok(())
}

/// An in-memory SQLite database with every migration applied, for unit tests.
#[cfg(test)]
pub async fn memory_for_tests() -> Db {
    sqlx::any::install_default_drivers();
    let db = AnyPoolOptions::new().max_connections(1).connect("sqlite::memory:").await.unwrap();
    SQLITE_MIGRATIONS.run(&db).await.unwrap();
    db
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both backends carry the same migrations: same versions, same names, none missing. The
    /// schemas they produce are compared column by column in tests/schema_parity.rs (the
    /// postgres stage of scripts/test).
    #[test]
    fn both_backends_have_the_same_migrations() {
        let list = |m: &Migrator| m.iter().map(|m| (m.version, m.description.to_string())).collect::<Vec<_>>();
        assert_eq!(list(&SQLITE_MIGRATIONS), list(&POSTGRES_MIGRATIONS));
        assert_eq!(newest_schema_version(), POSTGRES_MIGRATIONS.iter().map(|m| m.version).max().unwrap());
    }

    #[test]
    fn urls_lose_their_password_in_messages() {
        for (url, shown) in [
            ("postgres://tenon:s3cret@db:5432/tenon", "postgres://tenon:***@db:5432/tenon"),
            ("postgres://tenon@db/tenon", "postgres://tenon@db/tenon"),
            ("postgres://tenon:p%40ss@db/tenon?sslmode=require", "postgres://tenon:***@db/tenon?sslmode=require"),
            ("postgres://db/tenon", "postgres://db/tenon"),
            ("not a url", "not a url"),
        ] {
            assert_eq!(redact(url), shown, "{url}");
        }
    }

    #[test]
    fn locations_parse_or_say_what_to_write() {
        let default = PathBuf::from("/data/tenon.db");
        assert_eq!(Location::parse(None, default.clone()).unwrap(), Location::SqliteFile(default.clone()));
        assert_eq!(
            Location::parse(Some("sqlite:///srv/t.db"), default.clone()).unwrap(),
            Location::SqliteFile("/srv/t.db".into())
        );
        assert!(matches!(
            Location::parse(Some("postgres://u@127.0.0.1:5432/tenon"), default.clone()).unwrap(),
            Location::Postgres(_)
        ));
        for bad in ["mysql://u@h/db", "tenon.db", "postgres://u:pw@h:notaport/db"] {
            let e = Location::parse(Some(bad), default.clone()).unwrap_err().to_string();
            assert!(e.contains("postgres://USER"), "{bad}: {e}");
            assert!(!e.contains("pw@"), "the password is not shown: {e}");
        }
    }
}
