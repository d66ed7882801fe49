//! `tenon-server backup` and `restore`: one archive with everything a server needs to come back as
//! itself — the database (an online snapshot, taken while the server serves), the root, signing and
//! escrow keys, the bootstrap admin token, when present the TLS directory, and the software packages'
//! content (`packages/content/SHA256`, unless `--without-packages`), without which a restored server
//! would hold packages its devices cannot download.
//!
//! The archive is a tar file (mode 0600) with a manifest first (`tenon-backup.json`: format, schema
//! version, and the SHA-256 and size of every member). With `--passphrase-file`, the secret members
//! (keys, token, TLS) travel inside one `secrets.tar.sealed` member: XChaCha20-Poly1305 under a key
//! derived from the passphrase with Argon2id, so the archive can sit on a backup share without
//! handing out the signing and escrow keys. The database snapshot holds credential hashes and
//! recovery keys sealed to the escrow key, never a recovery password in the clear.
//!
//! Restore checks the whole archive (manifest, every hash, the schema version against this binary,
//! the passphrase) before it writes anything, unpacks into a temporary directory beside the target,
//! and renames it into place, so a truncated or foreign archive leaves the target untouched.

use anyhow::{bail, Context};
use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// Archive format this binary writes and reads.
const FORMAT: u32 = 1;
const MANIFEST: &str = "tenon-backup.json";
const DATABASE: &str = "tenon.db";
const SEALED: &str = "secrets.tar.sealed";
/// Directories and files of the data dir that hold secrets.
const SECRET_DIRS: [&str; 2] = ["keys", "tls"];
const SECRET_FILES: [&str; 1] = ["admin.token"];
/// Where package content goes in the archive and in a restored data dir (the server's default
/// package directory is DATA_DIR/packages).
const CONTENT_PREFIX: &str = "packages/content/";
/// Argon2id cost (OWASP's second recommended setting: 19 MiB, 2 passes).
const KDF_MEMORY_KIB: u32 = 19 * 1024;
const KDF_PASSES: u32 = 2;

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    format: u32,
    created_at: i64,
    server_version: String,
    /// The highest migration applied to the snapshot.
    schema_version: i64,
    /// Member name -> SHA-256 (hex) and size of its bytes as stored in the archive.
    members: BTreeMap<String, Member>,
    /// Present when the secrets are sealed with a passphrase.
    #[serde(default)]
    sealed: Option<SealParams>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Member {
    sha256: String,
    size: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct SealParams {
    kdf: String,
    memory_kib: u32,
    passes: u32,
    salt: String,
    nonce: String,
}

/// What a backup wrote.
#[derive(Debug)]
pub struct BackupSummary {
    pub path: PathBuf,
    pub bytes: u64,
    pub files: usize,
    pub sealed: bool,
    /// Package content files archived and their bytes; `None` with `--without-packages`.
    pub packages: Option<(usize, u64)>,
}

/// The package content to archive: every `DIR/content/SHA256` file, named as in the archive.
fn package_content(dir: &Path) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let content = dir.join("content");
    let entries = match std::fs::read_dir(&content) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", content.display())),
    };
    let mut out = Vec::new();
    for e in entries {
        let e = e.with_context(|| format!("cannot read {}", content.display()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if crate::packages::content::is_sha256(&name) && e.file_type()?.is_file() {
            out.push((format!("{CONTENT_PREFIX}{name}"), e.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Streams the file at `path` into the archive as `name` (mode 0600).
fn tar_append_file(builder: &mut tar::Builder<impl Write>, name: &str, path: &Path, now: i64) -> anyhow::Result<()> {
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut header = tar::Header::new_gnu();
    header.set_size(f.metadata()?.len());
    header.set_mode(0o600);
    header.set_mtime(now.max(0) as u64);
    header.set_cksum();
    builder.append_data(&mut header, name, &mut f).with_context(|| format!("cannot write {name} into the archive"))
}

/// The newest migration this binary knows.
fn binary_schema_version() -> i64 {
    crate::store::newest_schema_version()
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn read_passphrase(path: &Path) -> anyhow::Result<Zeroizing<String>> {
    let raw = Zeroizing::new(
        std::fs::read_to_string(path).with_context(|| format!("cannot read the passphrase file {}", path.display()))?,
    );
    let pass = Zeroizing::new(raw.trim_end_matches(['\n', '\r']).to_string());
    if pass.chars().count() < 12 {
        bail!("the passphrase in {} is shorter than 12 characters; use a longer one", path.display());
    }
    Ok(pass)
}

fn derive_key(pass: &str, salt: &[u8], memory_kib: u32, passes: u32) -> anyhow::Result<Zeroizing<[u8; 32]>> {
    let params = argon2::Params::new(memory_kib, passes, 1, Some(32))
        .map_err(|e| anyhow::anyhow!("backup key derivation parameters are not valid: {e}"))?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut key = Zeroizing::new([0u8; 32]);
    argon
        .hash_password_into(pass.as_bytes(), salt, &mut key[..])
        .map_err(|e| anyhow::anyhow!("cannot derive the backup key: {e}"))?;
    Ok(key)
}

/// Files of the data dir that hold secrets, as (name in the archive, path).
fn secret_files(data_dir: &Path) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for dir in SECRET_DIRS {
        let d = data_dir.join(dir);
        if !d.is_dir() {
            continue;
        }
        let mut names: Vec<String> = std::fs::read_dir(&d)
            .with_context(|| format!("cannot list {}", d.display()))?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .filter_map(|e| e.file_name().into_string().ok())
            // Half-written files of an interrupted write are not part of the state.
            .filter(|n| !n.ends_with(".tmp"))
            .collect();
        names.sort();
        out.extend(names.into_iter().map(|n| (format!("{dir}/{n}"), d.join(n))));
    }
    for f in SECRET_FILES {
        let p = data_dir.join(f);
        if p.is_file() {
            out.push((f.to_string(), p));
        }
    }
    Ok(out)
}

fn tar_append(builder: &mut tar::Builder<impl Write>, name: &str, bytes: &[u8], now: i64) -> anyhow::Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_size(bytes.len() as u64);
    header.set_mode(0o600);
    header.set_mtime(now.max(0) as u64);
    header.set_cksum();
    builder.append_data(&mut header, name, bytes).with_context(|| format!("cannot write {name} into the archive"))
}

/// `tenon-server backup`: works while the server serves (it takes no lock; the database snapshot is
/// SQLite's `VACUUM INTO`, one consistent read transaction).
/// `tenon-server backup`. `packages`: the server's package directory (its content is archived), or
/// `None` to leave the content out.
pub async fn backup(
    data_dir: &Path,
    database: Option<&str>,
    to: &Path,
    passphrase_file: Option<&Path>,
    packages: Option<&Path>,
    now: i64,
) -> anyhow::Result<BackupSummary> {
    if database.is_some_and(|d| !d.starts_with("sqlite:")) {
        bail!(
            "tenon-server backup archives the embedded SQLite database only; on PostgreSQL back up the database \
             with `pg_dump -Fc` and copy DATA_DIR/keys/ and DATA_DIR/tls/ of one server (the keys are the same on all)"
        );
    }
    if !data_dir.join("keys").is_dir() {
        bail!("{} holds no server keys; pass the --data-dir of a server that has started once", data_dir.display());
    }
    if to.exists() {
        bail!("{} already exists; choose a new file name (a backup never overwrites one)", to.display());
    }
    let pass = passphrase_file.map(read_passphrase).transpose()?;
    let db_path = match database {
        Some(url) => <SqliteConnectOptions as std::str::FromStr>::from_str(url)?.get_filename().to_path_buf(),
        None => data_dir.join(DATABASE),
    };
    if !db_path.is_file() {
        bail!("no database at {}; pass --database if the server uses another one", db_path.display());
    }

    // 1. The database snapshot, into a private temp dir beside the target.
    let parent = to.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".tenon-backup-")
        .tempdir_in(parent)
        .with_context(|| format!("cannot create a temporary directory in {}", parent.display()))?;
    let snapshot = tmp.path().join(DATABASE);
    let mut conn = SqliteConnectOptions::new()
        .filename(&db_path)
        .read_only(true)
        .busy_timeout(std::time::Duration::from_secs(30))
        .connect()
        .await
        .with_context(|| format!("cannot open {}", db_path.display()))?;
    let target = snapshot.to_str().context("the backup path must be valid UTF-8")?;
    sqlx::query("VACUUM INTO ?").bind(target).execute(&mut conn).await.context("cannot snapshot the database")?;
    let schema_version: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM _sqlx_migrations")
        .fetch_one(&mut conn)
        .await
        .context("the database has no migration table; is this a Tenon database?")?;
    conn.close().await?;
    let db_member = hash_file(&snapshot)?;
    // Listed after the snapshot, so content uploaded meanwhile is in (content is written whole under
    // its hash before the database names it, and never changes). Hashed here, streamed below.
    let content = packages.map(package_content).transpose()?.unwrap_or_default();
    let mut content_members = Vec::with_capacity(content.len());
    for (name, path) in &content {
        let m = hash_file(path).with_context(|| {
            format!(
                "package content {} went away during the backup (a package removed?); run the backup again",
                path.display()
            )
        })?;
        content_members.push((name.clone(), m));
    }
    let content_bytes: u64 = content_members.iter().map(|(_, m)| m.size).sum();

    // 2. The secrets, plain or sealed.
    let secrets = secret_files(data_dir)?;
    let mut members: Vec<(String, Zeroizing<Vec<u8>>)> = Vec::new();
    let mut sealed_params = None;
    match &pass {
        None => {
            for (name, path) in &secrets {
                let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
                members.push((name.clone(), Zeroizing::new(bytes)));
            }
        }
        Some(pass) => {
            let mut inner = tar::Builder::new(Vec::new());
            for (name, path) in &secrets {
                let bytes =
                    Zeroizing::new(std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?);
                tar_append(&mut inner, name, &bytes, now)?;
            }
            let plain = Zeroizing::new(inner.into_inner()?);
            let salt = crate::secrets::random_bytes::<16>();
            let nonce = crate::secrets::random_bytes::<24>();
            let key = derive_key(pass, &salt, KDF_MEMORY_KIB, KDF_PASSES)?;
            let cipher = XChaCha20Poly1305::new(key.as_ref().into());
            let sealed = cipher
                .encrypt(XNonce::from_slice(&nonce), plain.as_slice())
                .map_err(|_| anyhow::anyhow!("cannot seal the backup secrets"))?;
            members.push((SEALED.into(), Zeroizing::new(sealed)));
            sealed_params = Some(SealParams {
                kdf: "argon2id".into(),
                memory_kib: KDF_MEMORY_KIB,
                passes: KDF_PASSES,
                salt: hex::encode(salt),
                nonce: hex::encode(nonce),
            });
        }
    }
    let manifest = Manifest {
        format: FORMAT,
        created_at: now,
        server_version: env!("CARGO_PKG_VERSION").into(),
        schema_version,
        members: std::iter::once((DATABASE.to_string(), db_member))
            .chain(members.iter().map(|(n, b)| (n.clone(), Member { sha256: sha256_hex(b), size: b.len() as u64 })))
            .chain(content_members)
            .collect(),
        sealed: sealed_params,
    };

    // 3. The archive: written to a 0600 temp file, synced, then renamed to its name.
    let part = tmp.path().join("archive.part");
    {
        let mut opts = std::fs::OpenOptions::new();
        opts.create_new(true).write(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let file = opts.open(&part).with_context(|| format!("cannot create {}", part.display()))?;
        let mut builder = tar::Builder::new(std::io::BufWriter::new(file));
        tar_append(&mut builder, MANIFEST, &serde_json::to_vec_pretty(&manifest)?, now)?;
        // The database and package content are streamed from disk: they can be large, the rest is small.
        tar_append_file(&mut builder, DATABASE, &snapshot, now)?;
        for (name, bytes) in &members {
            tar_append(&mut builder, name, bytes, now)?;
        }
        for (name, path) in &content {
            tar_append_file(&mut builder, name, path, now)?;
        }
        let file = builder.into_inner()?.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
    }
    std::fs::rename(&part, to).with_context(|| format!("cannot write {}", to.display()))?;
    let bytes = std::fs::metadata(to)?.len();
    Ok(BackupSummary {
        path: to.to_path_buf(),
        bytes,
        files: 1 + secrets.len() + content.len(),
        sealed: pass.is_some(),
        packages: packages.map(|_| (content.len(), content_bytes)),
    })
}

/// SHA-256 and size of a file, read in chunks.
fn hash_file(path: &Path) -> anyhow::Result<Member> {
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut hasher = Sha256::new();
    let size = std::io::copy(&mut f, &mut hasher)?;
    Ok(Member { sha256: hex::encode(hasher.finalize()), size })
}

/// Copies `reader` into a new 0600 file at `path`, hashing on the way.
fn write_hashed(path: &Path, reader: &mut impl Read) -> anyhow::Result<Member> {
    struct Tee<'a, W: Write> {
        file: W,
        hasher: &'a mut Sha256,
    }
    impl<W: Write> Write for Tee<'_, W> {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let n = self.file.write(buf)?;
            self.hasher.update(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.file.flush()
        }
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.create_new(true).write(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let file = opts.open(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut tee = Tee { file: std::io::BufWriter::new(file), hasher: &mut hasher };
    let size = std::io::copy(reader, &mut tee)?;
    let file = tee.file.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    Ok(Member { sha256: hex::encode(hasher.finalize()), size })
}

/// Whether `name` is a file a data dir may hold (no paths that leave it).
fn allowed_name(name: &str) -> bool {
    name == DATABASE
        || name.strip_prefix(CONTENT_PREFIX).is_some_and(crate::packages::content::is_sha256)
        || SECRET_FILES.contains(&name)
        || SECRET_DIRS.iter().any(|d| {
            name.strip_prefix(d)
                .and_then(|r| r.strip_prefix('/'))
                .is_some_and(|rest| !rest.is_empty() && rest != "." && rest != ".." && !rest.contains(['/', '\\']))
        })
}

/// `tenon-server restore`: into an empty or missing data dir only. The archive is unpacked into a
/// staging directory beside the target and checked whole there (every member against the manifest,
/// the schema version against this binary, the passphrase); only then is the staging directory
/// renamed to the target. Any failure removes the staging directory and leaves the target alone.
pub fn restore(from: &Path, data_dir: &Path, passphrase_file: Option<&Path>) -> anyhow::Result<usize> {
    if data_dir.exists() {
        let mut entries = std::fs::read_dir(data_dir).with_context(|| format!("cannot read {}", data_dir.display()))?;
        if entries.next().is_some() {
            bail!(
                "{} is not empty; restore only into an empty or new directory (nothing was changed)",
                data_dir.display()
            );
        }
    }
    let parent = data_dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    let staging = tempfile::Builder::new().prefix(".tenon-restore-").tempdir_in(parent)?;
    crate::datadir::restrict_dir(staging.path())?;

    let damaged =
        || format!("{} is not a complete Tenon backup (truncated or damaged); nothing was restored", from.display());
    let file = std::fs::File::open(from).with_context(|| format!("cannot open {}", from.display()))?;
    let mut archive = tar::Archive::new(std::io::BufReader::new(file));
    let mut manifest: Option<Manifest> = None;
    let mut found: BTreeMap<String, Member> = BTreeMap::new();
    let mut sealed: Option<Zeroizing<Vec<u8>>> = None;
    let mut written = Vec::new();
    for entry in archive.entries().with_context(damaged)? {
        let mut entry = entry.with_context(damaged)?;
        let name = entry.path().with_context(damaged)?.to_string_lossy().into_owned();
        if name == MANIFEST {
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).with_context(damaged)?;
            manifest = Some(serde_json::from_slice(&bytes).with_context(damaged)?);
            continue;
        }
        let Some(m) = &manifest else {
            bail!("{} does not start with {MANIFEST}: it is not a Tenon backup", from.display())
        };
        if !m.members.contains_key(&name) {
            bail!("{} carries {name:?}, which its manifest does not list; refusing it", from.display());
        }
        if name == SEALED {
            let mut bytes = Zeroizing::new(Vec::new());
            entry.read_to_end(&mut bytes).with_context(damaged)?;
            found.insert(name, Member { sha256: sha256_hex(&bytes), size: bytes.len() as u64 });
            sealed = Some(bytes);
            continue;
        }
        if !allowed_name(&name) {
            bail!("{} carries a file named {name:?}, which is not part of a data dir; refusing it", from.display());
        }
        let path = staging.path().join(&name);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
            crate::datadir::restrict_dir(dir)?;
        }
        let member = write_hashed(&path, &mut entry).with_context(damaged)?;
        found.insert(name.clone(), member);
        written.push(name);
    }
    let manifest =
        manifest.with_context(|| format!("{} has no {MANIFEST}: it is not a Tenon backup", from.display()))?;
    if manifest.format > FORMAT {
        bail!(
            "{} was written by a newer tenon-server (backup format {}, this one reads {FORMAT}); restore it with that version",
            from.display(),
            manifest.format
        );
    }
    let known = binary_schema_version();
    if manifest.schema_version > known {
        bail!(
            "{} holds a database of schema version {} but this tenon-server knows up to {known} (written by version {}); restore it with that version or newer",
            from.display(),
            manifest.schema_version,
            manifest.server_version
        );
    }
    for (name, m) in &manifest.members {
        let got = found.get(name).with_context(|| {
            format!("{} lacks {name}: the backup is incomplete; nothing was restored", from.display())
        })?;
        if got.size != m.size || got.sha256 != m.sha256 {
            bail!(
                "{name} in {} does not match its recorded hash: the backup is damaged; nothing was restored",
                from.display()
            );
        }
    }

    if let Some(p) = &manifest.sealed {
        let pass_path = passphrase_file.with_context(|| {
            format!("the keys in {} are sealed with a passphrase; pass --passphrase-file FILE", from.display())
        })?;
        let pass = read_passphrase(pass_path)?;
        if p.kdf != "argon2id" || p.memory_kib > 4 * 1024 * 1024 || p.passes > 100 {
            bail!(
                "the backup's key derivation ({} {} KiB x{}) is not one this version uses",
                p.kdf,
                p.memory_kib,
                p.passes
            );
        }
        let salt = hex::decode(&p.salt).context("the backup's salt is damaged")?;
        let nonce: [u8; 24] =
            hex::decode(&p.nonce).ok().and_then(|n| n.try_into().ok()).context("the backup's nonce is damaged")?;
        let key = derive_key(&pass, &salt, p.memory_kib, p.passes)?;
        let sealed = sealed.with_context(|| format!("{} is sealed but has no {SEALED}", from.display()))?;
        let plain = Zeroizing::new(
            XChaCha20Poly1305::new(key.as_ref().into())
                .decrypt(XNonce::from_slice(&nonce), sealed.as_slice())
                .map_err(|_| {
                    anyhow::anyhow!("the passphrase does not open the keys in {}; nothing was restored", from.display())
                })?,
        );
        let mut inner = tar::Archive::new(plain.as_slice());
        for entry in inner.entries()? {
            let mut entry = entry?;
            let name = entry.path()?.to_string_lossy().into_owned();
            if !allowed_name(&name) || name == DATABASE || name.starts_with(CONTENT_PREFIX) {
                bail!("the sealed keys in {} carry {name:?}, which is not a key file; refusing them", from.display());
            }
            let path = staging.path().join(&name);
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
                crate::datadir::restrict_dir(dir)?;
            }
            write_hashed(&path, &mut entry)?;
            written.push(name);
        }
    }

    let staged = staging.keep();
    if data_dir.exists() {
        std::fs::remove_dir(data_dir).with_context(|| format!("cannot replace the empty {}", data_dir.display()))?;
    }
    std::fs::rename(&staged, data_dir)
        .with_context(|| format!("cannot move the restored files to {}", data_dir.display()))?;
    Ok(written.len())
}
