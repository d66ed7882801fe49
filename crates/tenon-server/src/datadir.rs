//! The server's data directory: an exclusive lock, the key files, and the bootstrap admin token.
//!
//! Layout: `.lock` (held while serving), `keys/root.ed25519` (root key seed), `keys/signing-N.ed25519`,
//! `keys/keylist-N.json` (root-signed key lists), `keys/escrow.x25519` (and `.old-N`, `.next`: see
//! `escrow`), `admin.token`, `tenon.db`.
//! Every secret file is created with mode 0600.

use anyhow::{bail, Context};
use ed25519_dalek::SigningKey;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use tenon_core::api::TrustBundle;
use tenon_core::envelope::{verify, EnvelopeBody, VerifyContext, VerifyError};
use tenon_core::trust::{key_id, sign_key_list, verify_key_list, PublicKeyEntry};

use crate::secrets::random_bytes;

/// The data directory, locked for this process.
pub struct DataDir {
    pub path: PathBuf,
    _lock: File,
}

impl DataDir {
    /// Creates the directory if needed and takes its lock, or says who holds it.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(path)
            .with_context(|| format!("cannot create data dir {}; check the path and permissions", path.display()))?;
        restrict_dir(path)?;
        let lock_path = path.join(".lock");
        let mut lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("cannot open {}", lock_path.display()))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&lock_path).unwrap_or_default();
                bail!(
                    "data dir {} is in use by another tenon-server (pid {}); stop that server or pass another --data-dir",
                    path.display(),
                    holder.trim()
                );
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", lock_path.display()))
            }
        }
        lock.set_len(0)?;
        write!(lock, "{}", std::process::id())?;
        Ok(Self { path: path.to_path_buf(), _lock: lock })
    }

    pub fn db_path(&self) -> PathBuf {
        self.path.join("tenon.db")
    }

    pub fn admin_token_path(&self) -> PathBuf {
        self.path.join("admin.token")
    }

    pub fn keys_dir(&self) -> anyhow::Result<PathBuf> {
        let dir = self.path.join("keys");
        std::fs::create_dir_all(&dir)?;
        restrict_dir(&dir)?;
        Ok(dir)
    }

    /// Loads the server's keys, creating them on first start.
    pub fn load_or_create_keys(&self, now: i64) -> anyhow::Result<ServerKeys> {
        let dir = self.keys_dir()?;
        let root = SigningKey::from_bytes(&load_or_create_secret(&dir.join("root.ed25519"))?);
        // The newest signing key is the one with the highest N.
        let mut n = 1u64;
        while dir.join(format!("signing-{}.ed25519", n + 1)).exists() {
            n += 1;
        }
        let signing = SigningKey::from_bytes(&load_or_create_secret(&dir.join(format!("signing-{n}.ed25519")))?);
        let list_path = dir.join(format!("keylist-{n}.json"));
        if !list_path.exists() {
            let doc = sign_key_list(&root, n, now, &[signing.verifying_key()]);
            write_secret_file(&list_path, doc.as_bytes())?;
        }
        let mut key_lists = Vec::new();
        for v in 1..=n {
            let p = dir.join(format!("keylist-{v}.json"));
            let doc = std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
            verify_key_list(&doc, &root.verifying_key())
                .with_context(|| format!("{} is not signed by this server's root key", p.display()))?;
            key_lists.push(doc);
        }
        let escrow_secret = load_or_create_secret(&dir.join(crate::escrow::CURRENT_FILE))?;
        let escrow = crate::escrow::EscrowKeyring::load(&dir, escrow_secret)?;
        Ok(ServerKeys { root, signing, key_lists, escrow })
    }

    /// Creates signing key N+1 and the root-signed key list N+1 naming it beside key N, so that
    /// envelopes signed by either verify while devices move over. The server signs with the newest
    /// key from its next start and re-issues every envelope then.
    pub fn rotate_signing_key(&self, now: i64) -> anyhow::Result<u64> {
        let keys = self.load_or_create_keys(now)?;
        let dir = self.keys_dir()?;
        let next = keys.key_lists.len() as u64 + 1;
        let new_key = SigningKey::from_bytes(&random_bytes::<32>());
        let doc = sign_key_list(&keys.root, next, now, &[keys.signing.verifying_key(), new_key.verifying_key()]);
        // The list first: a key file without its list would be picked up with a list naming only it.
        write_secret_file(&dir.join(format!("keylist-{next}.json")), doc.as_bytes())?;
        write_secret_file(&dir.join(format!("signing-{next}.ed25519")), &new_key.to_bytes())?;
        Ok(next)
    }

    /// Writes the bootstrap admin token (mode 0600).
    pub fn write_admin_token(&self, token: &str) -> anyhow::Result<PathBuf> {
        let p = self.admin_token_path();
        write_secret_file(&p, format!("{token}\n").as_bytes())?;
        Ok(p)
    }
}

/// The server's keys.
pub struct ServerKeys {
    pub root: SigningKey,
    pub signing: SigningKey,
    /// Root-signed key lists, oldest first.
    pub key_lists: Vec<String>,
    /// X25519 secrets recovery keys are sealed to: the current one, and older ones still met.
    pub escrow: crate::escrow::EscrowKeyring,
}

impl ServerKeys {
    /// Key id of the key that signs envelopes now.
    pub fn signing_key_id(&self) -> String {
        key_id(&self.signing.verifying_key())
    }

    pub fn root_fingerprint(&self) -> String {
        key_id(&self.root.verifying_key())
    }

    /// The body of `envelope` if one of this server's signing keys (any key list, past or present)
    /// signed it for `device_id`; expiry does not matter here. Otherwise why not.
    pub fn verify_issued(&self, device_id: &str, envelope: &str) -> Result<EnvelopeBody, VerifyError> {
        let root = self.root.verifying_key();
        let mut last = VerifyError::BadSignature;
        for doc in self.key_lists.iter().rev() {
            let Ok(list) = verify_key_list(doc, &root) else { continue };
            let ctx = VerifyContext { device_id, trusted: &list, stored: None, now: i64::MIN };
            match verify(envelope, &ctx) {
                Ok(v) => return Ok(v.body),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    pub fn trust_bundle(&self) -> TrustBundle {
        TrustBundle {
            root_public_key: PublicKeyEntry::new(&self.root.verifying_key()).public,
            key_lists: self.key_lists.clone(),
        }
    }
}

fn load_or_create_secret(path: &Path) -> anyhow::Result<[u8; 32]> {
    if path.exists() {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read key {}", path.display()))?;
        return bytes.try_into().map_err(|_| {
            anyhow::anyhow!("key file {} is damaged (not 32 bytes); restore it from backup", path.display())
        });
    }
    let secret = random_bytes::<32>();
    write_secret_file(path, &secret)?;
    Ok(secret)
}

/// Writes a file readable by its owner alone, atomically.
pub fn write_secret_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut opts = OpenOptions::new();
    opts.create(true).truncate(true).write(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Makes a directory readable by its owner alone (0700).
pub(crate) fn restrict_dir(path: &Path) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot restrict permissions of {}", path.display()))?;
    }
    let _ = path;
    Ok(())
}
