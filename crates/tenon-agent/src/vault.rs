//! The local vault: the device's identity, trust state, last known good envelope and policy state,
//! encrypted with XChaCha20-Poly1305 under a 32-byte key that the platform wraps (DPAPI on Windows;
//! a 0600 key file elsewhere).
//!
//! Files in the state directory: `vault.key` (the wrapped key), `vault.bin` and its mirror
//! `vault.bin.mirror` (the same sealed state, each written atomically: temp file, fsync, rename).
//! A copy that fails to decrypt is discarded and the other one used; when neither decrypts the
//! vault is refused, never guessed at. A missing key is never silently replaced by a new one, since
//! that would also drop the rollback floor: the device must be re-enrolled.

use crate::platform::Platform;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 4] = b"TNV1";
const NONCE_LEN: usize = 24;
/// Binds ciphertexts to their purpose.
const AAD: &[u8] = b"tenon-agent vault v1";

/// Everything the agent keeps secret and tamper-evident.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct VaultState {
    /// Increases with every write; the newer of the two copies wins.
    pub generation: u64,
    pub server_url: String,
    pub device_id: String,
    pub credential: String,
    /// The pinned root key (base64).
    pub root_public_key: String,
    /// The newest verified root-signed key list, as received.
    pub key_list: String,
    pub escrow_public_key: Option<String>,
    /// The last known good envelope, exactly the bytes that were verified.
    pub envelope: Option<String>,
    /// The latest time the agent has seen (clock or envelope issue time); expiry is checked
    /// against this so that turning the clock back does not revive an expired envelope.
    pub latest_time_seen: i64,
    /// Per-policy persisted state.
    #[serde(default)]
    pub policy_state: Map<String, Value>,
    /// Which TLS certificates the server may present, from the enrollment token.
    #[serde(default)]
    pub transport: crate::transport::Transport,
    /// The last report the server acknowledged; a sync sends a report only when it differs from
    /// this one or this one is old (`agent::FULL_REPORT_INTERVAL`). None in a new enrollment and
    /// in a vault written before the field existed: the next sync reports.
    #[serde(default)]
    pub last_report: Option<LastReport>,
}

/// What is kept of the last acknowledged report.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LastReport {
    /// Lower-case hex SHA-256 of the report's canonical JSON (`tenon_core::canonical`).
    pub sha256: String,
    /// When the server acknowledged it (the agent's clock, Unix seconds).
    pub sent_at: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("this device is not enrolled (no vault in {0}); run `tenon-agent enroll --server URL --token TOKEN`")]
    NotEnrolled(String),
    #[error("vault key {0} is missing while the vault exists; the vault cannot be opened and nothing was applied. Re-enroll the device (`tenon-agent enroll --force ...`)")]
    KeyMissing(String),
    #[error(
        "vault key cannot be unwrapped on this machine ({0}); re-enroll the device (`tenon-agent enroll --force ...`)"
    )]
    KeyUnusable(String),
    #[error("both vault copies fail verification ({primary}; mirror: {mirror}); nothing was applied. Re-enroll the device (`tenon-agent enroll --force ...`)")]
    Corrupt { primary: String, mirror: String },
    #[error("cannot write the vault in {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("platform: {0}")]
    Platform(#[from] crate::platform::PlatformError),
}

/// The vault in a state directory.
pub struct Vault<'p> {
    dir: PathBuf,
    platform: &'p dyn Platform,
}

/// A loaded vault and what went wrong on the way, if anything was repaired.
pub struct Loaded {
    pub state: VaultState,
    /// Set when one copy was discarded; the reason is reported.
    pub repaired: Option<String>,
}

impl<'p> Vault<'p> {
    pub fn new(dir: &Path, platform: &'p dyn Platform) -> Self {
        Self { dir: dir.to_path_buf(), platform }
    }

    pub fn key_path(&self) -> PathBuf {
        self.dir.join("vault.key")
    }

    pub fn primary_path(&self) -> PathBuf {
        self.dir.join("vault.bin")
    }

    pub fn mirror_path(&self) -> PathBuf {
        self.dir.join("vault.bin.mirror")
    }

    pub fn exists(&self) -> bool {
        self.primary_path().exists() || self.mirror_path().exists()
    }

    /// Creates a new key (for enrollment), replacing any old vault.
    pub fn create(&self, random_key: [u8; 32], state: &VaultState) -> Result<(), VaultError> {
        std::fs::create_dir_all(&self.dir).map_err(|e| self.write_err(&self.dir, e))?;
        restrict_dir(&self.dir).map_err(|e| self.write_err(&self.dir, e))?;
        let wrapped = self.platform.wrap_secret(&random_key)?;
        write_atomic(&self.key_path(), &wrapped).map_err(|e| self.write_err(&self.key_path(), e))?;
        self.save_with_key(&random_key, state)
    }

    fn key(&self) -> Result<[u8; 32], VaultError> {
        let path = self.key_path();
        let wrapped = match std::fs::read(&path) {
            Ok(w) => w,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(if self.exists() {
                    VaultError::KeyMissing(path.display().to_string())
                } else {
                    VaultError::NotEnrolled(self.dir.display().to_string())
                })
            }
            Err(e) => return Err(VaultError::KeyUnusable(e.to_string())),
        };
        let key = self.platform.unwrap_secret(&wrapped).map_err(|e| VaultError::KeyUnusable(e.to_string()))?;
        key.try_into().map_err(|_| VaultError::KeyUnusable("the key has the wrong length".into()))
    }

    /// Loads the newest copy that decrypts; repairs the other one.
    pub fn load(&self) -> Result<Loaded, VaultError> {
        if !self.exists() {
            return Err(VaultError::NotEnrolled(self.dir.display().to_string()));
        }
        let key = self.key()?;
        let primary = open_copy(&key, &self.primary_path());
        let mirror = open_copy(&key, &self.mirror_path());
        let (state, repaired) = match (primary, mirror) {
            (Ok(p), Ok(m)) => {
                if p.generation >= m.generation {
                    let repair =
                        (p.generation != m.generation).then(|| "vault mirror was behind; rewritten".to_string());
                    (p, repair)
                } else {
                    (m, Some("vault.bin was older than its mirror; restored from the mirror".to_string()))
                }
            }
            (Ok(p), Err(e)) => (p, Some(format!("vault.bin.mirror discarded: {e}"))),
            (Err(e), Ok(m)) => (m, Some(format!("vault.bin discarded: {e}; restored from the mirror"))),
            (Err(p), Err(m)) => return Err(VaultError::Corrupt { primary: p, mirror: m }),
        };
        if repaired.is_some() {
            self.save_with_key(&key, &state)?;
        }
        Ok(Loaded { state, repaired })
    }

    /// Writes both copies.
    pub fn save(&self, state: &VaultState) -> Result<(), VaultError> {
        let key = self.key()?;
        self.save_with_key(&key, state)
    }

    fn save_with_key(&self, key: &[u8; 32], state: &VaultState) -> Result<(), VaultError> {
        let plain = serde_json::to_vec(state).expect("vault state serialises");
        for path in [self.primary_path(), self.mirror_path()] {
            let mut nonce = [0u8; NONCE_LEN];
            getrandom::fill(&mut nonce).map_err(|e| self.write_err(&path, std::io::Error::other(e.to_string())))?;
            let cipher = XChaCha20Poly1305::new(key.into());
            let sealed = cipher
                .encrypt(XNonce::from_slice(&nonce), Payload { msg: &plain, aad: AAD })
                .expect("XChaCha20-Poly1305 encryption does not fail for in-memory buffers");
            let mut out = Vec::with_capacity(MAGIC.len() + NONCE_LEN + sealed.len());
            out.extend_from_slice(MAGIC);
            out.extend_from_slice(&nonce);
            out.extend_from_slice(&sealed);
            write_atomic(&path, &out).map_err(|e| self.write_err(&path, e))?;
        }
        Ok(())
    }

    fn write_err(&self, path: &Path, source: std::io::Error) -> VaultError {
        VaultError::Write { path: path.display().to_string(), source }
    }
}

fn open_copy(key: &[u8; 32], path: &Path) -> Result<VaultState, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read it ({e})"))?;
    if bytes.len() < MAGIC.len() + NONCE_LEN + 16 || &bytes[..4] != MAGIC {
        return Err("it is truncated or not a Tenon vault".into());
    }
    let cipher = XChaCha20Poly1305::new(key.into());
    let plain = cipher
        .decrypt(XNonce::from_slice(&bytes[4..4 + NONCE_LEN]), Payload { msg: &bytes[4 + NONCE_LEN..], aad: AAD })
        .map_err(|_| "it failed authentication (tampered or damaged)".to_string())?;
    serde_json::from_slice(&plain).map_err(|_| "its content is not a vault state".to_string())
}

/// Temp file, fsync, rename: a crash leaves either the old or the new file, never a torn one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut opts = OpenOptions::new();
    opts.create(true).truncate(true).write(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    #[cfg(unix)]
    if let Some(parent) = path.parent() {
        // Make the rename itself durable.
        if let Ok(d) = std::fs::File::open(parent) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Only the owner (root; on Windows SYSTEM and Administrators) may enter the state directory.
pub fn restrict_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    #[cfg(windows)]
    crate::platform::windows::restrict_dir_to_system_and_admins(dir)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::simulated::SimulatedPlatform;

    fn setup() -> (tempfile::TempDir, SimulatedPlatform) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("device.json"), "{}").unwrap();
        let p = SimulatedPlatform::open(&dir.path().join("device.json")).unwrap();
        (dir, p)
    }

    fn state() -> VaultState {
        VaultState { device_id: "d".into(), credential: "secret-cred".into(), generation: 1, ..Default::default() }
    }

    #[test]
    fn round_trip_and_secrecy() {
        let (dir, p) = setup();
        let v = Vault::new(&dir.path().join("s"), &p);
        v.create([7; 32], &state()).unwrap();
        let loaded = v.load().unwrap();
        assert_eq!(loaded.state, state());
        assert!(loaded.repaired.is_none());
        let raw = std::fs::read(v.primary_path()).unwrap();
        assert!(!raw.windows(11).any(|w| w == b"secret-cred"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(v.key_path()).unwrap().permissions().mode() & 0o777, 0o600);
            assert_eq!(std::fs::metadata(v.primary_path()).unwrap().permissions().mode() & 0o777, 0o600);
        }
    }

    #[test]
    fn a_vault_written_before_last_report_existed_still_loads() {
        let mut old = serde_json::to_value(state()).unwrap();
        old.as_object_mut().unwrap().remove("last_report").expect("the field is serialised");
        let loaded: VaultState = serde_json::from_value(old).unwrap();
        assert_eq!(loaded.last_report, None);
        assert_eq!(loaded, state());
    }

    #[test]
    fn damaged_copies() {
        let (dir, p) = setup();
        let v = Vault::new(&dir.path().join("s"), &p);
        v.create([7; 32], &state()).unwrap();
        // Bit flip in the primary: the mirror is used and the primary repaired.
        let mut raw = std::fs::read(v.primary_path()).unwrap();
        let n = raw.len();
        raw[n - 5] ^= 0x01;
        std::fs::write(v.primary_path(), &raw).unwrap();
        let l = v.load().unwrap();
        assert_eq!(l.state, state());
        assert!(l.repaired.unwrap().contains("failed authentication"));
        assert!(v.load().unwrap().repaired.is_none());
        // Both truncated: refused.
        std::fs::write(v.primary_path(), &raw[..10]).unwrap();
        std::fs::write(v.mirror_path(), &raw[..10]).unwrap();
        assert!(matches!(v.load(), Err(VaultError::Corrupt { .. })));
    }

    #[test]
    fn missing_key_is_refused() {
        let (dir, p) = setup();
        let v = Vault::new(&dir.path().join("s"), &p);
        v.create([7; 32], &state()).unwrap();
        std::fs::remove_file(v.key_path()).unwrap();
        assert!(matches!(v.load(), Err(VaultError::KeyMissing(_))));
        let empty = Vault::new(&dir.path().join("none"), &p);
        assert!(matches!(empty.load(), Err(VaultError::NotEnrolled(_))));
    }
}
