//! The SQLite and PostgreSQL migrations build the same schema: every table has the same columns
//! on both, so code written against one store works on the other. Runs in the postgres stage of
//! scripts/test; on SQLite alone it says why it skips.
mod common;

use common::*;
use std::collections::BTreeSet;
use tenon_server::store::{self, Checkpoints, Location};

type Columns = BTreeSet<(String, String)>;

async fn columns(db: &store::Db, sql: &str) -> Columns {
    sqlx::query_as::<_, (String, String)>(sql)
        .fetch_all(db)
        .await
        .unwrap()
        .into_iter()
        .map(|(t, c)| (t.to_lowercase(), c.to_lowercase()))
        .collect()
}

#[tokio::test]
async fn both_stores_migrate_to_the_same_tables_and_columns() {
    let Some(_) = pg_base() else {
        eprintln!("SKIPPED on SQLite: the schema comparison needs PostgreSQL (the postgres stage of scripts/test)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let url = database_url_for(dir.path()).expect("a PostgreSQL stage has a database per data dir");

    let sqlite = store::open(&Location::SqliteFile(dir.path().join("tenon.db")), Checkpoints::OnCommit).await.unwrap();
    let postgres = store::open(&Location::Postgres(url), Checkpoints::OnCommit).await.unwrap();

    let on_sqlite = columns(
        &sqlite,
        "SELECT m.name, p.name FROM sqlite_master m, pragma_table_info(m.name) p \
         WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite_%'",
    )
    .await;
    let on_postgres = columns(
        &postgres,
        "SELECT table_name::text, column_name::text FROM information_schema.columns WHERE table_schema = 'public'",
    )
    .await;
    assert!(on_sqlite.len() > 50, "the SQLite schema was read: {on_sqlite:?}");
    let only_sqlite: Vec<_> = on_sqlite.difference(&on_postgres).collect();
    let only_postgres: Vec<_> = on_postgres.difference(&on_sqlite).collect();
    assert!(
        only_sqlite.is_empty() && only_postgres.is_empty(),
        "the migrations differ: only on SQLite {only_sqlite:?}, only on PostgreSQL {only_postgres:?}"
    );

    let versions = "SELECT CAST(version AS TEXT), description FROM _sqlx_migrations WHERE success ORDER BY version";
    assert_eq!(columns(&sqlite, versions).await, columns(&postgres, versions).await);
    sqlite.close().await;
    postgres.close().await;
}
