//! Directory sources as server configuration: what each one reads (kind and settings), its
//! secret sealed at rest, and its status. Adding, listing and removing sources.

use crate::error::{ApiError, ApiResult};
use crate::state::{Actor, AppState};
use crate::store::audit;
use crate::store::changes::Kind;
use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sqlx::Row;
use std::collections::BTreeSet;
use zeroize::Zeroizing;

/// The name `tenonctl users import` files go under (not a stored source).
pub const FILE_SOURCE: &str = "file";
/// Default interval between reads of a source.
pub const DEFAULT_INTERVAL_SECS: i64 = 15 * 60;
/// Shortest interval accepted: a directory is not a message queue.
pub const MIN_INTERVAL_SECS: i64 = 60;
/// LDAP cannot see deletions incrementally: a full read at least this often.
pub const LDAP_FULL_EVERY_SECS: i64 = 24 * 3600;
/// A CA file, a URL, a DN: none of them is long.
const MAX_FIELD: usize = 2048;
const MAX_CA_PEM: usize = 256 * 1024;
const MAX_SECRET: usize = 8 * 1024;

/// What a source reads, without its secret (stored as JSON in `directory_sources.config`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SourceConfig {
    Graph {
        tenant_id: String,
        client_id: String,
        authority: String,
        graph_url: String,
    },
    Ldap {
        url: String,
        #[serde(default)]
        bind_dn: Option<String>,
        base_dn: String,
        /// PEM of the CA that signed the domain controllers' certificates (from `--ca-file`).
        #[serde(default)]
        ca_pem: Option<String>,
        #[serde(default)]
        allow_plain_ldap: bool,
    },
}

impl SourceConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            SourceConfig::Graph { .. } => "graph",
            SourceConfig::Ldap { .. } => "ldap",
        }
    }

    /// What `directory list` shows (no secret, no CA body).
    pub fn summary(&self) -> Value {
        match self {
            SourceConfig::Graph { tenant_id, client_id, authority, graph_url } => json!({
                "tenant_id": tenant_id, "client_id": client_id, "authority": authority, "graph_url": graph_url,
            }),
            SourceConfig::Ldap { url, bind_dn, base_dn, ca_pem, allow_plain_ldap } => json!({
                "url": url, "bind_dn": bind_dn, "base_dn": base_dn, "ca_file": ca_pem.is_some(),
                "allow_plain_ldap": allow_plain_ldap,
            }),
        }
    }
}

/// `POST /admin/directory/sources`. (Unknown fields cannot be refused: serde does not combine
/// `deny_unknown_fields` with the flattened, tagged config.)
#[derive(Deserialize)]
pub struct AddSource {
    pub name: String,
    #[serde(flatten)]
    pub config: SourceConfig,
    /// The client secret (Graph) or bind password (LDAP), read by tenonctl from a file.
    #[serde(default)]
    pub secret: Option<String>,
    #[serde(default)]
    pub interval_secs: Option<i64>,
}

/// A source as stored.
#[derive(Clone, Debug)]
pub struct SourceRow {
    pub name: String,
    pub config: SourceConfig,
    pub sealed_secret: Option<String>,
    pub interval_secs: i64,
    pub created_seq: i64,
    pub cursor: Option<String>,
    pub last_full_at: Option<i64>,
    pub last_run_at: Option<i64>,
    pub last_success_at: Option<i64>,
    pub last_error: Option<String>,
    pub users: i64,
    pub groups: i64,
    pub skipped: i64,
    pub held_deletions: BTreeSet<String>,
    pub collisions: Vec<Value>,
}

impl SourceRow {
    /// When the scheduler reads it next: at start (never run), then every interval after the
    /// last attempt.
    pub fn next_run(&self) -> i64 {
        self.last_run_at.map_or(0, |t| t + self.interval_secs)
    }
}

const SOURCE_COLUMNS: &str = "name, config, secret, interval_secs, created_seq, cursor, last_full_at, \
     last_run_at, last_success_at, last_error, users, groups, skipped, held_deletions, collisions";

fn source_from_row(row: &sqlx::any::AnyRow) -> anyhow::Result<SourceRow> {
    let name: String = row.get(0);
    let parse = |col: usize, what: &str| -> anyhow::Result<Value> {
        serde_json::from_str(row.get::<&str, _>(col))
            .map_err(|e| anyhow::anyhow!("stored {what} of directory source {name:?}: {e}"))
    };
    let config: SourceConfig = serde_json::from_value(parse(1, "config")?)?;
    let held: BTreeSet<String> = serde_json::from_value(parse(13, "held deletions")?)?;
    let collisions: Vec<Value> = serde_json::from_value(parse(14, "collisions")?)?;
    Ok(SourceRow {
        config,
        sealed_secret: row.get(2),
        interval_secs: row.get(3),
        created_seq: row.get(4),
        cursor: row.get(5),
        last_full_at: row.get(6),
        last_run_at: row.get(7),
        last_success_at: row.get(8),
        last_error: row.get(9),
        users: row.get(10),
        groups: row.get(11),
        skipped: row.get(12),
        held_deletions: held,
        collisions,
        name,
    })
}

/// Checks a source name: it names the source in commands, logs and the users' `source`.
pub fn check_name(name: &str) -> ApiResult<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !ok {
        return Err(ApiError::BadRequest(format!(
            "{:?} is not a usable source name: use 1 to 64 letters, digits, '-', '_' or '.'",
            name.chars().take(64).collect::<String>()
        )));
    }
    if name == FILE_SOURCE {
        return Err(ApiError::BadRequest(
            "\"file\" names the users imported with `tenonctl users import`; choose another name".into(),
        ));
    }
    Ok(())
}

fn bounded(what: &str, v: &str, max: usize) -> ApiResult<()> {
    if v.len() > max || v.chars().any(char::is_control) {
        return Err(ApiError::BadRequest(format!("{what} is longer than {max} bytes or holds control characters")));
    }
    Ok(())
}

fn check_url(what: &str, url: &str, schemes: &[&str]) -> ApiResult<()> {
    bounded(what, url, MAX_FIELD)?;
    let ok =
        schemes.iter().any(|s| url.strip_prefix(s).and_then(|r| r.strip_prefix("://")).is_some_and(|r| !r.is_empty()));
    if !ok {
        return Err(ApiError::BadRequest(format!(
            "{what} {url:?} must start with {}",
            schemes.iter().map(|s| format!("{s}://")).collect::<Vec<_>>().join(" or ")
        )));
    }
    Ok(())
}

/// Checks what `directory add` sends before anything is stored.
pub fn check_config(config: &SourceConfig, secret: Option<&str>) -> ApiResult<()> {
    if let Some(s) = secret {
        if s.is_empty() || s.len() > MAX_SECRET {
            return Err(ApiError::BadRequest(format!(
                "the secret file must hold 1 to {MAX_SECRET} bytes (a trailing newline is dropped)"
            )));
        }
    }
    match config {
        SourceConfig::Graph { tenant_id, client_id, authority, graph_url } => {
            for (what, v) in [("--tenant-id", tenant_id), ("--client-id", client_id)] {
                bounded(what, v, 256)?;
                if v.trim().is_empty() {
                    return Err(ApiError::BadRequest(format!(
                        "{what} is empty: copy it from the app registration in Entra"
                    )));
                }
            }
            check_url("--authority", authority, &["https", "http"])?;
            check_url("--graph-url", graph_url, &["https", "http"])?;
            if secret.is_none() {
                return Err(ApiError::BadRequest(
                    "a Graph source needs --client-secret-file: a file holding the app registration's client secret"
                        .into(),
                ));
            }
        }
        SourceConfig::Ldap { url, bind_dn, base_dn, ca_pem, allow_plain_ldap } => {
            check_url("--url", url, &["ldaps", "ldap"])?;
            if url.starts_with("ldap://") && !allow_plain_ldap {
                return Err(ApiError::BadRequest(format!(
                    "{url} is plain LDAP: the bind password would cross the network readable. Use ldaps://, or pass \
                     --allow-plain-ldap to use StartTLS when the server offers it and plain LDAP otherwise"
                )));
            }
            bounded("--base-dn", base_dn, MAX_FIELD)?;
            if !base_dn.contains('=') {
                return Err(ApiError::BadRequest(format!(
                    "--base-dn {base_dn:?} is not a DN; write it like DC=contoso,DC=com"
                )));
            }
            if let Some(dn) = bind_dn {
                bounded("--bind-dn", dn, MAX_FIELD)?;
            }
            match (bind_dn.is_some(), secret.is_some()) {
                (true, false) => {
                    return Err(ApiError::BadRequest(
                        "--bind-dn needs --password-file (the bind account's password)".into(),
                    ))
                }
                (false, true) => {
                    return Err(ApiError::BadRequest(
                        "--password-file needs --bind-dn (the account it belongs to)".into(),
                    ))
                }
                _ => {}
            }
            if let Some(pem) = ca_pem {
                if pem.len() > MAX_CA_PEM || !pem.contains("-----BEGIN CERTIFICATE-----") {
                    return Err(ApiError::BadRequest(
                        "--ca-file must be a PEM file of CA certificates (-----BEGIN CERTIFICATE-----), at most 256 KiB"
                            .into(),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// The key that seals source secrets: derived from the escrow key, so every server of a
/// database (which share `keys/`) can open them, a backup carries it, and a database dump alone
/// reveals nothing.
fn sealing_key(escrow_secret: &[u8; 32]) -> Zeroizing<[u8; 32]> {
    let hk = hkdf::Hkdf::<sha2::Sha256>::new(Some(b"tenon directory source secret"), escrow_secret);
    let mut key = Zeroizing::new([0u8; 32]);
    // 32 bytes is always a valid HKDF-SHA256 output length.
    hk.expand(b"v1", &mut *key).expect("32 bytes from HKDF-SHA256");
    key
}

/// `v1.<escrow key id>.<base64 of nonce || ciphertext>`, bound to the source's name.
pub fn seal_secret(keys: &crate::escrow::EscrowKeyring, source: &str, secret: &str) -> String {
    let key = sealing_key(&keys.current);
    let cipher = XChaCha20Poly1305::new((&*key).into());
    let nonce: [u8; 24] = crate::secrets::random_bytes();
    let ct = cipher
        .encrypt(XNonce::from_slice(&nonce), Payload { msg: secret.as_bytes(), aad: source.as_bytes() })
        .expect("XChaCha20-Poly1305 encryption of a short secret");
    let mut blob = nonce.to_vec();
    blob.extend_from_slice(&ct);
    format!("v1.{}.{}", keys.current_id(), base64::engine::general_purpose::STANDARD.encode(blob))
}

/// Opens a sealed secret; the error says what to do, never what the secret was.
pub fn open_secret(
    keys: &crate::escrow::EscrowKeyring,
    source: &str,
    sealed: &str,
) -> Result<Zeroizing<String>, String> {
    let fail = || {
        format!(
            "the stored secret of source {source} cannot be opened with this server's keys (were keys/ copied from \
             another server?); give it again with `tenonctl directory add ... --replace`"
        )
    };
    let mut parts = sealed.splitn(3, '.');
    let (Some("v1"), Some(key_id), Some(b64)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(fail());
    };
    let secret = keys.secret_for(key_id).ok_or_else(fail)?;
    let blob = base64::engine::general_purpose::STANDARD.decode(b64).map_err(|_| fail())?;
    if blob.len() < 24 {
        return Err(fail());
    }
    let key = sealing_key(secret);
    let cipher = XChaCha20Poly1305::new((&*key).into());
    let plain = cipher
        .decrypt(XNonce::from_slice(&blob[..24]), Payload { msg: &blob[24..], aad: source.as_bytes() })
        .map_err(|_| fail())?;
    let plain = Zeroizing::new(plain);
    String::from_utf8(plain.to_vec()).map(Zeroizing::new).map_err(|_| fail())
}

impl AppState {
    pub async fn load_source(&self, name: &str) -> ApiResult<SourceRow> {
        let row = sqlx::query(&format!("SELECT {SOURCE_COLUMNS} FROM directory_sources WHERE name = $1"))
            .bind(name)
            .fetch_optional(&self.db)
            .await?
            .ok_or_else(|| {
                ApiError::NotFound(format!("no directory source {name:?}; `tenonctl directory list` shows them"))
            })?;
        source_from_row(&row).map_err(ApiError::Internal)
    }

    pub async fn list_sources(&self) -> ApiResult<Vec<SourceRow>> {
        let rows = sqlx::query(&format!("SELECT {SOURCE_COLUMNS} FROM directory_sources ORDER BY created_seq"))
            .fetch_all(&self.db)
            .await?;
        rows.iter().map(source_from_row).collect::<anyhow::Result<_>>().map_err(ApiError::Internal)
    }

    /// Adds a source (or replaces its configuration with `replace`, keeping what it read).
    pub async fn add_source(&self, actor: &Actor, req: AddSource, replace: bool) -> ApiResult<Value> {
        check_name(&req.name)?;
        let mut secret = req.secret.map(Zeroizing::new);
        if let Some(s) = secret.as_mut() {
            let trimmed = s.trim_end_matches(['\r', '\n']).to_string();
            **s = trimmed;
        }
        check_config(&req.config, secret.as_deref().map(String::as_str))?;
        let interval = req.interval_secs.unwrap_or(DEFAULT_INTERVAL_SECS);
        if interval < MIN_INTERVAL_SECS {
            return Err(ApiError::BadRequest(format!(
                "--interval must be at least {MIN_INTERVAL_SECS}s; a directory read is not cheap for the directory"
            )));
        }
        let sealed = secret.as_deref().map(|s| seal_secret(&self.keys.escrow, &req.name, s));
        let config = serde_json::to_string(&req.config).map_err(|e| ApiError::Internal(e.into()))?;
        let mut world = self.world.write().await;
        let now = self.now();
        let mut tx = self.begin_write(&mut world).await?;
        let existing: Option<String> = sqlx::query_scalar("SELECT kind FROM directory_sources WHERE name = $1")
            .bind(&req.name)
            .fetch_optional(&mut *tx)
            .await?;
        match (existing, replace) {
            (Some(kind), false) => {
                return Err(ApiError::Conflict(format!(
                    "a {kind} source named {} exists; pass --replace to change its settings, or choose another name",
                    req.name
                )))
            }
            (Some(kind), true) if kind != req.config.kind() => {
                return Err(ApiError::Conflict(format!(
                    "{} is a {kind} source; remove it first (`tenonctl directory remove {}`) to add a {} source \
                     under that name",
                    req.name,
                    req.name,
                    req.config.kind()
                )))
            }
            (Some(_), true) => {
                sqlx::query(
                    "UPDATE directory_sources SET config = $1, secret = $2, interval_secs = $3, last_run_at = NULL
                     WHERE name = $4",
                )
                .bind(&config)
                .bind(&sealed)
                .bind(interval)
                .bind(&req.name)
                .execute(&mut *tx)
                .await?;
            }
            (None, _) => {
                let seq: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(created_seq), 0) + 1 FROM directory_sources")
                    .fetch_one(&mut *tx)
                    .await?;
                sqlx::query(
                    "INSERT INTO directory_sources (name, kind, config, secret, interval_secs, created_seq, created_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)",
                )
                .bind(&req.name)
                .bind(req.config.kind())
                .bind(&config)
                .bind(&sealed)
                .bind(interval)
                .bind(seq)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
        }
        audit(
            &mut tx,
            now,
            &actor.label(),
            if replace { "directory.replace" } else { "directory.add" },
            Some(&req.name),
            json!({"kind": req.config.kind(), "config": req.config.summary(), "interval_secs": interval}),
        )
        .await?;
        tx.commit().await?;
        drop(world);
        self.directory_wake.notify_one();
        Ok(json!({"name": req.name, "kind": req.config.kind(), "interval_secs": interval}))
    }

    /// Removes a source and the users it owned (their settings stay; devices are re-signed
    /// without their directory data).
    pub async fn remove_source(&self, actor: &Actor, name: &str) -> ApiResult<Value> {
        let _sync = self.directory_sync.lock().await;
        self.load_source(name).await?;
        let mut world = self.world.write().await;
        let now = self.now();
        let mut tx = self.begin_write(&mut world).await?;
        let owned: Vec<tenon_core::ids::Upn> = world
            .directory
            .users
            .iter()
            .filter(|(_, u)| u.source.as_deref() == Some(name))
            .map(|(upn, _)| upn.clone())
            .collect();
        for upn in &owned {
            sqlx::query("DELETE FROM user_groups WHERE upn = $1").bind(upn.as_str()).execute(&mut *tx).await?;
            sqlx::query("DELETE FROM users WHERE upn = $1").bind(upn.as_str()).execute(&mut *tx).await?;
        }
        sqlx::query("DELETE FROM directory_objects WHERE source = $1").bind(name).execute(&mut *tx).await?;
        sqlx::query("DELETE FROM directory_sources WHERE name = $1").bind(name).execute(&mut *tx).await?;
        audit(&mut tx, now, &actor.label(), "directory.remove", Some(name), json!({"users_removed": owned.len()}))
            .await?;
        self.note(&mut tx, Kind::Directory, [""]).await?;
        tx.commit().await?;
        let dir = world.directory_mut();
        for upn in &owned {
            super::sync::forget_directory_data(dir, upn);
        }
        let touched: BTreeSet<_> = owned.into_iter().collect();
        let ids = Self::devices_of_users(&world, &touched);
        let ticket = self.resign.enqueue(ids);
        Ok(json!({"name": name, "users_removed": touched.len(), "devices": ticket.devices}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_secret_opens_only_for_its_source_and_key() {
        let keys = crate::escrow::EscrowKeyring { current: [7; 32], others: vec![] };
        let sealed = seal_secret(&keys, "entra", "s3cret~value");
        assert!(!sealed.contains("s3cret"));
        assert_eq!(open_secret(&keys, "entra", &sealed).unwrap().as_str(), "s3cret~value");
        // Bound to the name: a row copied under another name does not open.
        let err = open_secret(&keys, "other", &sealed).unwrap_err();
        assert!(err.contains("cannot be opened") && !err.contains("s3cret"));
        let other_keys = crate::escrow::EscrowKeyring { current: [8; 32], others: vec![] };
        assert!(open_secret(&other_keys, "entra", &sealed).is_err());
        // After an escrow key rotation the old key still opens it.
        let rotated = crate::escrow::EscrowKeyring { current: [8; 32], others: vec![[7; 32]] };
        assert!(open_secret(&rotated, "entra", &sealed).is_ok());
    }

    #[test]
    fn configs_are_checked_before_anything_is_stored() {
        let graph = |authority: &str| SourceConfig::Graph {
            tenant_id: "t".into(),
            client_id: "c".into(),
            authority: authority.into(),
            graph_url: "https://graph.microsoft.com".into(),
        };
        let ldap = |url: &str, bind: Option<&str>, plain: bool| SourceConfig::Ldap {
            url: url.into(),
            bind_dn: bind.map(Into::into),
            base_dn: "DC=x,DC=com".into(),
            ca_pem: None,
            allow_plain_ldap: plain,
        };
        for (config, secret, ok) in [
            (graph("https://login.microsoftonline.com"), Some("s"), true),
            (graph("https://login.microsoftonline.com"), None, false),
            (graph("ftp://x"), Some("s"), false),
            (ldap("ldaps://dc1", Some("CN=a"), false), Some("p"), true),
            (ldap("ldaps://dc1", None, false), None, true),
            (ldap("ldap://dc1", None, false), None, false),
            (ldap("ldap://dc1", None, true), None, true),
            (ldap("ldaps://dc1", Some("CN=a"), false), None, false),
            (ldap("ldaps://dc1", None, false), Some("p"), false),
        ] {
            assert_eq!(check_config(&config, secret).is_ok(), ok, "{config:?} {secret:?}");
        }
        for (name, ok) in [("entra", true), ("ad-1.x", true), ("file", false), ("", false), ("a b", false)] {
            assert_eq!(check_name(name).is_ok(), ok, "{name}");
        }
    }
}
