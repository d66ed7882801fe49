//! Which keys a database is served with. Every server of one database must sign with the same
//! keys, or devices would reject envelopes from some of them, and recovery keys sealed on one
//! could not be opened on another. The operator gives each server the same data dir keys
//! (`keys/`); the private keys never go into the database, only their public ids do.

use super::{begin_write, Db};
use crate::datadir::ServerKeys;
use anyhow::bail;
use sqlx::Row;
use tenon_core::policy::escrow::{escrow_key_id, escrow_public_key};
use tenon_core::trust::verify_key_list;

/// Records this server's key ids in an empty database, or checks them against the recorded
/// ones. A data dir whose keys are a rotation of the recorded ones (its key lists name the
/// recorded signing key; its escrow keyring holds the recorded escrow key) moves the record on.
///
/// On SQLite the database has one server (the data dir is locked) and its keys sit beside it, so
/// another escrow key there is a damaged or replaced key file, not a second server: the server
/// starts (check-ins do not need the escrow key), keeps the record, and the start-up check of the
/// escrowed keys reports which do not open. Root and signing keys must match on both stores.
pub async fn check_or_record(db: &Db, keys: &ServerKeys) -> anyhow::Result<()> {
    let shared = super::backend(db) == super::Backend::Postgres;
    let ours = [
        ("root_key", keys.root_fingerprint()),
        ("signing_key", keys.signing_key_id()),
        ("escrow_key", keys.escrow.current_id()),
    ];
    let mut tx = begin_write(db).await?;
    let stored: Vec<(String, String)> = sqlx::query("SELECT name, value FROM store_identity")
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let recorded = |name: &str| stored.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
    const COPY: &str = "give every server of one database the same keys: copy DATA_DIR/keys/ from a server that \
                        serves it (after a key rotation, copy the new keys to every server before starting them)";
    let mut keep_recorded = None;
    for (name, mine) in &ours {
        let Some(theirs) = recorded(name) else { continue };
        if theirs == mine {
            continue;
        }
        let rotated_from_theirs = match *name {
            "signing_key" => signing_ids(keys).iter().any(|id| id == theirs),
            "escrow_key" => keys.escrow.others.iter().any(|s| escrow_key_id(&escrow_public_key(s)) == theirs),
            _ => false,
        };
        if !rotated_from_theirs && !shared && *name == "escrow_key" {
            tracing::warn!(
                recorded = theirs,
                data_dir = %mine,
                "the escrow key in DATA_DIR/keys is not the one this database's recovery keys were sealed to; \
                 restore the key file from a backup (the start-up check lists the keys that do not open)"
            );
            keep_recorded = Some(*name);
            continue;
        }
        if !rotated_from_theirs {
            bail!(
                "this database is served with another {} ({theirs}) than this data dir's ({mine}): {COPY}",
                name.replace('_', " ")
            );
        }
        tracing::info!(key = name, from = theirs, to = %mine, "this data dir holds a rotation of the database's key; recording it");
    }
    for (name, mine) in ours.iter().filter(|(n, _)| Some(*n) != keep_recorded) {
        sqlx::query(
            "INSERT INTO store_identity (name, value) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        )
        .bind(name)
        .bind(mine)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Ids of every signing key the data dir's key lists name.
fn signing_ids(keys: &ServerKeys) -> Vec<String> {
    let root = keys.root.verifying_key();
    keys.key_lists
        .iter()
        .filter_map(|doc| verify_key_list(doc, &root).ok())
        .flat_map(|list| list.body.keys.into_iter().map(|k| k.keyid))
        .collect()
}
