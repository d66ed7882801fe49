//! Recovery-key escrow: sealing a BitLocker recovery password to the server's escrow public key on
//! the device (so neither the wire nor a database dump reveals it), opening it on the server, the
//! recovery-password format, and the Entra escrow retry schedule.
//!
//! Sealing scheme (version 1), for a password of protector `protector_id` on volume `mount` of
//! device `device_id`:
//! 1. `shared = X25519(ephemeral_secret, escrow_public)`; a non-contributory (all-zero) result, which
//!    a low-order escrow "public key" would cause, is refused.
//! 2. `key = HKDF-SHA256(salt = ephemeral_public || escrow_public, ikm = shared,
//!    info = "tenon/escrow/v1" || binding)`, 32 bytes.
//! 3. `ciphertext = XChaCha20-Poly1305(key, nonce, plaintext = password, aad = binding)`.
//!
//! `binding` is device id, mount and protector id, each as a 4-byte big-endian length and its UTF-8
//! bytes: the unambiguous form of "device id | mount | protector id" (a `|` inside a field cannot
//! shift the boundaries). Binding both the key and the AAD means a sealed key cannot be replayed as
//! the key of another device, volume or protector: opening it under other labels fails.
//!
//! Escrow-key rotation: the server hands out its current escrow public key signed by an
//! envelope-signing key ([`SignedEscrowKey`]); an agent adopts it only when a key of its trusted,
//! root-signed key list signed it ([`verify_escrow_key`]).
//!
//! The caller provides the randomness (the ephemeral secret and the nonce), because tenon-core does
//! no I/O. The ephemeral key is fresh per seal, so the AEAD key is unique per message as well.

use crate::trust::{KeyList, SignatureEntry};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use ed25519_dalek::SigningKey;
use hkdf::Hkdf;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

/// Name of the sealing scheme, carried on the wire so the server can refuse what it does not know.
pub const SEAL_ALG: &str = "X25519-HKDF-SHA256-XChaCha20Poly1305/v1";
const HKDF_INFO_PREFIX: &[u8] = b"tenon/escrow/v1";

/// A recovery password sealed to the server's escrow key: what the agent uploads and what the server
/// stores. All byte fields are standard base64. The password itself is only inside `ciphertext`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedRecoveryKey {
    #[serde(default = "default_alg")]
    pub alg: String,
    /// SHA-256 (hex) of the escrow public key this was sealed to, so that after an escrow-key
    /// rotation the server knows which secret opens it.
    pub escrow_key_id: String,
    /// X25519 public key of the ephemeral key pair (32 bytes).
    pub ephemeral_public: String,
    /// XChaCha20-Poly1305 nonce (24 bytes).
    pub nonce: String,
    /// Sealed password plus the 16-byte tag.
    pub ciphertext: String,
    pub device_id: String,
    /// Volume mount point, such as `C:`.
    pub mount: String,
    /// BitLocker key-protector id (`{GUID}`), the "recovery key ID" shown on the recovery screen.
    pub protector_id: String,
}

fn default_alg() -> String {
    SEAL_ALG.to_string()
}

/// The body of `POST /api/v1/device/escrow`: a sealed key, and the protector it replaces when it
/// is the new key of a rotation (advisory metadata, outside the seal).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EscrowUpload {
    #[serde(flatten)]
    pub sealed: SealedRecoveryKey,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaces: Option<String>,
}

/// The server's acknowledgement of an upload. The server sends it only after the sealed key is
/// durably stored; until the agent holds one, the key counts as not escrowed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EscrowReceipt {
    pub protector_id: String,
    /// Unix seconds at which the server stored it.
    pub stored_at: i64,
    /// The server holds a different recovery password for this protector too (a protector's
    /// password never changes on a real volume, so one of them was not uploaded by this volume).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub conflict: bool,
}

/// The body of `POST /api/v1/device/escrow/retired`: a recovery protector the server asked to
/// retire (or a surplus one Tenon added) is gone from the volume; `replaced_by` is the escrowed
/// key that stays. Only this completes a rotation on the server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EscrowRetired {
    pub protector_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaced_by: Option<String>,
}

/// The random bytes one seal consumes; the caller fills them from the OS generator.
pub struct SealRandomness {
    pub ephemeral_secret: Zeroizing<[u8; 32]>,
    pub nonce: [u8; 24],
}

impl SealRandomness {
    /// Splits 56 random bytes into an ephemeral secret and a nonce.
    pub fn from_bytes(bytes: &[u8; 56]) -> Self {
        let mut secret = Zeroizing::new([0u8; 32]);
        secret.copy_from_slice(&bytes[..32]);
        let mut nonce = [0u8; 24];
        nonce.copy_from_slice(&bytes[32..]);
        Self { ephemeral_secret: secret, nonce }
    }
}

/// Why sealing or opening failed. No variant carries the password or key material.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EscrowError {
    #[error("the secret to seal is not a BitLocker recovery password (48 digits in 8 groups of 6)")]
    NotARecoveryPassword,
    #[error("the escrow public key is a low-order point; refusing to seal to it")]
    WeakEscrowKey,
    #[error("sealed key field {0} is not valid base64 of the expected length")]
    BadField(&'static str),
    #[error("sealed key uses scheme {0:?}, which this version does not know")]
    UnknownAlgorithm(String),
    #[error("the sealed key does not open with this escrow key and these labels (wrong key or tampered)")]
    DoesNotOpen,
}

/// The X25519 public key of an escrow secret; the server publishes it to agents.
pub fn escrow_public_key(escrow_secret: &[u8; 32]) -> [u8; 32] {
    PublicKey::from(&StaticSecret::from(*escrow_secret)).to_bytes()
}

/// The id of an escrow public key: SHA-256 of its 32 bytes, hex.
pub fn escrow_key_id(escrow_public: &[u8; 32]) -> String {
    hex::encode(Sha256::digest(escrow_public))
}

fn binding(device_id: &str, mount: &str, protector_id: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(12 + device_id.len() + mount.len() + protector_id.len());
    for field in [device_id, mount, protector_id] {
        // Labels are short identifiers; a length above u32::MAX cannot reach here from a real caller,
        // and saturating keeps the encoding total without a panic path.
        let len = u32::try_from(field.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(field.as_bytes());
    }
    out
}

fn derive_key(
    shared: &[u8; 32],
    ephemeral_public: &[u8; 32],
    escrow_public: &[u8; 32],
    binding: &[u8],
) -> Zeroizing<[u8; 32]> {
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(ephemeral_public);
    salt[32..].copy_from_slice(escrow_public);
    let hk = Hkdf::<Sha256>::new(Some(&salt), shared);
    let mut info = Vec::with_capacity(HKDF_INFO_PREFIX.len() + binding.len());
    info.extend_from_slice(HKDF_INFO_PREFIX);
    info.extend_from_slice(binding);
    let mut key = Zeroizing::new([0u8; 32]);
    // 32 bytes is far below HKDF-SHA256's 255 * 32 limit, so expand cannot fail.
    hk.expand(&info, &mut key[..]).expect("32 bytes is a valid HKDF-SHA256 output length");
    key
}

/// Seals `password` to `escrow_public` for (device, mount, protector).
pub fn seal(
    escrow_public: &[u8; 32],
    device_id: &str,
    mount: &str,
    protector_id: &str,
    password: &str,
    random: &SealRandomness,
) -> Result<SealedRecoveryKey, EscrowError> {
    if !is_recovery_password(password) {
        return Err(EscrowError::NotARecoveryPassword);
    }
    let ephemeral = StaticSecret::from(*random.ephemeral_secret);
    let ephemeral_public = PublicKey::from(&ephemeral).to_bytes();
    let shared = ephemeral.diffie_hellman(&PublicKey::from(*escrow_public));
    if !shared.was_contributory() {
        return Err(EscrowError::WeakEscrowKey);
    }
    let binding = binding(device_id, mount, protector_id);
    let key = derive_key(shared.as_bytes(), &ephemeral_public, escrow_public, &binding);
    let cipher = XChaCha20Poly1305::new(Key::from_slice(&key[..]));
    let ciphertext = cipher
        .encrypt(XNonce::from_slice(&random.nonce), Payload { msg: password.as_bytes(), aad: &binding })
        // Encryption only fails for messages beyond 256 GiB.
        .expect("XChaCha20-Poly1305 encrypts a short message");
    Ok(SealedRecoveryKey {
        alg: SEAL_ALG.to_string(),
        escrow_key_id: escrow_key_id(escrow_public),
        ephemeral_public: B64.encode(ephemeral_public),
        nonce: B64.encode(random.nonce),
        ciphertext: B64.encode(ciphertext),
        device_id: device_id.to_string(),
        mount: mount.to_string(),
        protector_id: protector_id.to_string(),
    })
}

fn decode_array<const N: usize>(field: &'static str, text: &str) -> Result<[u8; N], EscrowError> {
    let bytes = B64.decode(text).map_err(|_| EscrowError::BadField(field))?;
    bytes.try_into().map_err(|_| EscrowError::BadField(field))
}

/// Opens a sealed key with the escrow secret. Fails when the secret is not the one it was sealed
/// to, or when any byte or label was changed.
pub fn open(escrow_secret: &[u8; 32], sealed: &SealedRecoveryKey) -> Result<Zeroizing<String>, EscrowError> {
    if sealed.alg != SEAL_ALG {
        return Err(EscrowError::UnknownAlgorithm(sealed.alg.clone()));
    }
    let ephemeral_public: [u8; 32] = decode_array("ephemeral_public", &sealed.ephemeral_public)?;
    let nonce: [u8; 24] = decode_array("nonce", &sealed.nonce)?;
    let ciphertext = B64.decode(&sealed.ciphertext).map_err(|_| EscrowError::BadField("ciphertext"))?;
    let secret = StaticSecret::from(*escrow_secret);
    let escrow_public = PublicKey::from(&secret).to_bytes();
    let shared = secret.diffie_hellman(&PublicKey::from(ephemeral_public));
    if !shared.was_contributory() {
        return Err(EscrowError::DoesNotOpen);
    }
    let binding = binding(&sealed.device_id, &sealed.mount, &sealed.protector_id);
    let key = derive_key(shared.as_bytes(), &ephemeral_public, &escrow_public, &binding);
    let cipher = XChaCha20Poly1305::new(Key::from_slice(&key[..]));
    let plain = Zeroizing::new(
        cipher
            .decrypt(XNonce::from_slice(&nonce), Payload { msg: &ciphertext, aad: &binding })
            .map_err(|_| EscrowError::DoesNotOpen)?,
    );
    // The tag verified, so these are the bytes the device sealed; they were a valid password then.
    let text = std::str::from_utf8(&plain).map_err(|_| EscrowError::DoesNotOpen)?;
    Ok(Zeroizing::new(text.to_string()))
}

/// Domain separation for the statement by which the server hands out its current escrow key.
const ESCROW_KEY_STATEMENT: &[u8] = b"tenon/escrow-key/v1\n";

/// The server's current escrow public key, signed by an envelope-signing key, so that an agent
/// can move to a rotated escrow key with the same trust it gives its configuration (the key it
/// pinned at enrollment came unsigned, in the enrollment answer).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedEscrowKey {
    /// X25519 public key, standard base64.
    pub public_key: String,
    pub signature: SignatureEntry,
}

/// Why a signed escrow key was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EscrowKeyError {
    #[error("the escrow key is not 32 bytes of base64")]
    Malformed,
    #[error("the escrow key is a low-order point")]
    Weak,
    #[error("the escrow key is not signed by a key in the trusted key list")]
    Untrusted,
}

fn escrow_key_message(public: &[u8; 32]) -> Vec<u8> {
    let mut m = ESCROW_KEY_STATEMENT.to_vec();
    m.extend_from_slice(public);
    m
}

/// Signs `escrow_public` with an envelope-signing key (server side).
pub fn sign_escrow_key(signing: &SigningKey, escrow_public: &[u8; 32]) -> SignedEscrowKey {
    SignedEscrowKey {
        public_key: B64.encode(escrow_public),
        signature: SignatureEntry::sign(signing, &escrow_key_message(escrow_public)),
    }
}

/// Checks a signed escrow key against the agent's trusted key list; returns the key.
pub fn verify_escrow_key(signed: &SignedEscrowKey, trusted: &KeyList) -> Result<[u8; 32], EscrowKeyError> {
    let public: [u8; 32] =
        B64.decode(&signed.public_key).ok().and_then(|b| b.try_into().ok()).ok_or(EscrowKeyError::Malformed)?;
    let message = escrow_key_message(&public);
    let trusted_signer = trusted
        .body
        .keys
        .iter()
        .filter(|k| k.keyid == signed.signature.keyid)
        .filter_map(|k| k.key().ok())
        .any(|k| signed.signature.verifies(&k, &message));
    if !trusted_signer {
        return Err(EscrowKeyError::Untrusted);
    }
    // A low-order point would make every seal to it readable; seal() refuses it too.
    let probe = StaticSecret::from([1u8; 32]).diffie_hellman(&PublicKey::from(public));
    if !probe.was_contributory() {
        return Err(EscrowKeyError::Weak);
    }
    Ok(public)
}

/// The largest value of one group: BitLocker writes 16 bits of key per group as `value * 11`.
const MAX_GROUP: u32 = 65_535 * 11;

/// Whether `s` is a BitLocker recovery password as Windows shows it: 48 digits in 8 groups of 6,
/// separated by `-`, each group divisible by 11 and at most 720885 (`11 * (2^16 - 1)`), per the
/// `Win32_EncryptableVolume` documentation (divisibility by 11 is the per-group check digit).
pub fn is_recovery_password(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 8
        && groups.iter().all(|g| {
            g.len() == 6
                && g.bytes().all(|b| b.is_ascii_digit())
                && g.parse::<u32>().is_ok_and(|v| v % 11 == 0 && v <= MAX_GROUP)
        })
}

/// Formats 128 bits of key as a recovery password (each 16-bit little-endian word times 11), the
/// way BitLocker derives the password from its random key.
pub fn recovery_password_from_key(key: &[u8; 16]) -> Zeroizing<String> {
    let mut out = Zeroizing::new(String::with_capacity(55));
    for (i, pair) in key.chunks_exact(2).enumerate() {
        if i > 0 {
            out.push('-');
        }
        let word = u32::from(u16::from_le_bytes([pair[0], pair[1]]));
        // Writing into a String cannot fail.
        let _ = std::fmt::Write::write_fmt(&mut *out, format_args!("{:06}", word * 11));
    }
    out
}

/// Default for `Policies.RequireSecurityFeatures.EntraEscrowMaxAttempts`.
pub const DEFAULT_ENTRA_MAX_ATTEMPTS: u32 = 5;
/// The wait after the first failed Entra escrow attempt; it doubles with each further failure.
pub const ENTRA_BACKOFF_BASE_SECS: i64 = 5 * 60;
/// The longest wait between two Entra escrow attempts.
pub const ENTRA_BACKOFF_CAP_SECS: i64 = 6 * 60 * 60;

/// How many Entra escrow attempts a recovery key gets before its rollout is marked failed:
/// `Policies.RequireSecurityFeatures.EntraEscrowMaxAttempts`, a whole number from 1 to 1000;
/// anything else (unset, 0, negative, not a number) means the default of 5.
pub fn entra_max_attempts(setting: Option<&Value>) -> u32 {
    setting
        .and_then(Value::as_u64)
        .filter(|n| (1..=1000).contains(n))
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(DEFAULT_ENTRA_MAX_ATTEMPTS)
}

/// When the next Entra escrow attempt is due, after `attempts` failed attempts, the last at
/// `last_at` (Unix seconds): immediately when none failed yet, else `last_at + 5 min * 2^(attempts-1)`,
/// at most 6 hours after the last attempt (5, 10, 20, 40, 80, 160, 320, 360, 360 ... minutes).
pub fn next_attempt_at(attempts: u32, last_at: i64) -> i64 {
    if attempts == 0 {
        return last_at;
    }
    let doublings = (attempts - 1).min(32);
    let wait = ENTRA_BACKOFF_BASE_SECS.saturating_mul(1i64 << doublings).min(ENTRA_BACKOFF_CAP_SECS);
    last_at.saturating_add(wait)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const PW: &str = "123453-654324-000000-720885-111111-222222-333333-444444";

    fn random(seed: u8) -> SealRandomness {
        let mut b = [0u8; 56];
        for (i, x) in b.iter_mut().enumerate() {
            *x = seed.wrapping_mul(31).wrapping_add(i as u8);
        }
        SealRandomness::from_bytes(&b)
    }

    fn server_secret(seed: u8) -> [u8; 32] {
        [seed; 32]
    }

    fn sealed() -> SealedRecoveryKey {
        seal(&escrow_public_key(&server_secret(7)), "dev-1", "C:", "{P-1}", PW, &random(1)).unwrap()
    }

    #[test]
    fn round_trip() {
        let s = sealed();
        assert_eq!(open(&server_secret(7), &s).unwrap().as_str(), PW);
        assert_eq!(s.escrow_key_id, escrow_key_id(&escrow_public_key(&server_secret(7))));
        // The wire form does not hold the password, and survives JSON.
        let wire = serde_json::to_string(&s).unwrap();
        assert!(!wire.contains(PW) && !wire.contains("654324"));
        let back: SealedRecoveryKey = serde_json::from_str(&wire).unwrap();
        assert_eq!(open(&server_secret(7), &back).unwrap().as_str(), PW);
    }

    #[test]
    fn fresh_randomness_gives_different_ciphertexts() {
        let pk = escrow_public_key(&server_secret(7));
        let a = seal(&pk, "d", "C:", "p", PW, &random(1)).unwrap();
        let b = seal(&pk, "d", "C:", "p", PW, &random(2)).unwrap();
        assert_ne!(a.ciphertext, b.ciphertext);
        assert_ne!(a.ephemeral_public, b.ephemeral_public);
    }

    #[test]
    fn wrong_key_fails() {
        assert_eq!(open(&server_secret(8), &sealed()), Err(EscrowError::DoesNotOpen));
    }

    #[test]
    fn tampering_fails() {
        let check = |f: &dyn Fn(&mut SealedRecoveryKey), expected: EscrowError| {
            let mut s = sealed();
            f(&mut s);
            assert_eq!(open(&server_secret(7), &s).map(|p| p.to_string()), Err(expected));
        };
        let flip = |text: &str, at: usize| {
            let mut b = B64.decode(text).unwrap();
            b[at] ^= 1;
            B64.encode(b)
        };
        check(&|s| s.ciphertext = flip(&s.ciphertext, 0), EscrowError::DoesNotOpen);
        check(&|s| s.ciphertext = flip(&s.ciphertext, 60), EscrowError::DoesNotOpen);
        check(&|s| s.nonce = flip(&s.nonce, 3), EscrowError::DoesNotOpen);
        check(&|s| s.ephemeral_public = flip(&s.ephemeral_public, 5), EscrowError::DoesNotOpen);
        check(&|s| s.device_id = "dev-2".into(), EscrowError::DoesNotOpen);
        check(&|s| s.mount = "D:".into(), EscrowError::DoesNotOpen);
        check(&|s| s.protector_id = "{P-2}".into(), EscrowError::DoesNotOpen);
        // Moving a boundary between labels is a different binding, not the same concatenation.
        check(
            &|s| {
                s.device_id = "dev-1C".into();
                s.mount = ":".into();
            },
            EscrowError::DoesNotOpen,
        );
        check(&|s| s.nonce = "AAAA".into(), EscrowError::BadField("nonce"));
        check(&|s| s.ciphertext = "!!".into(), EscrowError::BadField("ciphertext"));
        check(&|s| s.alg = "rot13".into(), EscrowError::UnknownAlgorithm("rot13".into()));
        // A low-order ephemeral point gives an all-zero shared secret.
        check(&|s| s.ephemeral_public = B64.encode([0u8; 32]), EscrowError::DoesNotOpen);
    }

    #[test]
    fn refuses_to_seal_non_passwords_and_weak_keys() {
        let pk = escrow_public_key(&server_secret(7));
        assert_eq!(seal(&pk, "d", "C:", "p", "hunter2", &random(1)), Err(EscrowError::NotARecoveryPassword));
        assert_eq!(seal(&[0u8; 32], "d", "C:", "p", PW, &random(1)), Err(EscrowError::WeakEscrowKey));
    }

    #[test]
    fn recovery_password_format() {
        let check = |s: &str, expected: bool| assert_eq!(is_recovery_password(s), expected, "{s}");
        check(PW, true);
        check("000000-000000-000000-000000-000000-000000-000000-000000", true);
        // From the Microsoft example of a password Add-BitLockerKeyProtector accepts.
        check("531058-303050-716078-383614-460922-106975-083446-139161", true);
        check("123456-123456-123456-123456-123456-123456-123456-123456", false); // not divisible by 11
        check("720896-000000-000000-000000-000000-000000-000000-000000", false); // 11 * 2^16: too large
        check("999999-000000-000000-000000-000000-000000-000000-000000", false); // divisible, too large
        check("123453-654324-000000-720885-111111-222222-333333", false); // 7 groups
        check("123453-654324-000000-720885-111111-222222-333333-444444-000000", false); // 9 groups
        check("123453 654324 000000 720885 111111 222222 333333 444444", false); // Windows shows dashes
        check("12345-654324-000000-720885-111111-222222-333333-4444440", false);
        check("+12345-654324-000000-720885-111111-222222-333333-444444", false);
        check("", false);
    }

    #[test]
    fn passwords_from_keys_are_valid() {
        let check = |key: [u8; 16], expected: &str| {
            let pw = recovery_password_from_key(&key);
            assert_eq!(pw.as_str(), expected);
            assert!(is_recovery_password(&pw));
        };
        check([0; 16], "000000-000000-000000-000000-000000-000000-000000-000000");
        check([0xff; 16], "720885-720885-720885-720885-720885-720885-720885-720885");
        check(
            [1, 0, 0, 1, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            "000011-002816-002805-000000-000000-000000-000000-000000",
        );
    }

    #[test]
    fn signed_escrow_keys() {
        use crate::trust::{sign_key_list, verify_key_list};
        let root = SigningKey::from_bytes(&[1; 32]);
        let signer = SigningKey::from_bytes(&[2; 32]);
        let other = SigningKey::from_bytes(&[3; 32]);
        let trusted =
            verify_key_list(&sign_key_list(&root, 1, 0, &[signer.verifying_key()]), &root.verifying_key()).unwrap();
        let pk = escrow_public_key(&server_secret(7));
        let check = |signed: &SignedEscrowKey, expected: Result<[u8; 32], EscrowKeyError>| {
            assert_eq!(verify_escrow_key(signed, &trusted), expected)
        };
        check(&sign_escrow_key(&signer, &pk), Ok(pk));
        check(&sign_escrow_key(&other, &pk), Err(EscrowKeyError::Untrusted));
        check(&sign_escrow_key(&root, &pk), Err(EscrowKeyError::Untrusted));
        let mut swapped = sign_escrow_key(&signer, &pk);
        swapped.public_key = B64.encode(escrow_public_key(&server_secret(8)));
        check(&swapped, Err(EscrowKeyError::Untrusted));
        let mut claimed = sign_escrow_key(&other, &pk);
        claimed.signature.keyid = sign_escrow_key(&signer, &pk).signature.keyid;
        check(&claimed, Err(EscrowKeyError::Untrusted));
        let mut short = sign_escrow_key(&signer, &pk);
        short.public_key = "AAAA".into();
        check(&short, Err(EscrowKeyError::Malformed));
        check(&sign_escrow_key(&signer, &[0; 32]), Err(EscrowKeyError::Weak));
    }

    #[test]
    fn entra_schedule() {
        let check =
            |attempts: u32, expected_wait: i64| assert_eq!(next_attempt_at(attempts, 1000) - 1000, expected_wait);
        check(0, 0);
        check(1, 300);
        check(2, 600);
        check(3, 1200);
        check(4, 2400);
        check(7, 19_200);
        check(8, 21_600);
        check(40, 21_600);
        check(u32::MAX, 21_600);
        assert_eq!(next_attempt_at(3, i64::MAX), i64::MAX);
    }

    #[test]
    fn entra_max_attempts_setting() {
        let check = |v: Option<Value>, expected: u32| assert_eq!(entra_max_attempts(v.as_ref()), expected, "{v:?}");
        check(None, 5);
        check(Some(json!(3)), 3);
        check(Some(json!(1)), 1);
        check(Some(json!(0)), 5);
        check(Some(json!(-2)), 5);
        check(Some(json!(1001)), 5);
        check(Some(json!("3")), 5);
        check(Some(json!(2.5)), 5);
    }
}
