//! Keys and the trust chain: Ed25519 key ids, and the root-signed list of signing keys.
//!
//! The agent pins the server's root key at enrollment (the enrollment token carries its key id).
//! The root key signs only key lists; key lists name the keys that may sign envelopes. A list
//! replaces its predecessor only as version N -> N+1, each step signed by the pinned root.

use crate::canonical::{sha256_hex, to_canonical};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use serde_json::json;
use serde_json::value::RawValue;

/// SHA-256 of the raw 32-byte public key, lower-case hex.
pub fn key_id(key: &VerifyingKey) -> String {
    sha256_hex(key.as_bytes())
}

/// A public key as it travels: key id and base64 of the 32 raw bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicKeyEntry {
    pub keyid: String,
    pub public: String,
}

impl PublicKeyEntry {
    pub fn new(key: &VerifyingKey) -> Self {
        Self { keyid: key_id(key), public: B64.encode(key.as_bytes()) }
    }

    /// The key, after checking that the id really is its hash.
    pub fn key(&self) -> Result<VerifyingKey, TrustError> {
        let bytes = B64.decode(&self.public).map_err(|_| TrustError::MalformedKey)?;
        let arr: [u8; 32] = bytes.try_into().map_err(|_| TrustError::MalformedKey)?;
        let key = VerifyingKey::from_bytes(&arr).map_err(|_| TrustError::MalformedKey)?;
        if key_id(&key) != self.keyid {
            return Err(TrustError::MalformedKey);
        }
        Ok(key)
    }
}

/// One signature over canonical bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignatureEntry {
    pub keyid: String,
    pub sig: String,
}

impl SignatureEntry {
    pub fn sign(key: &SigningKey, message: &[u8]) -> Self {
        Self { keyid: key_id(&key.verifying_key()), sig: B64.encode(key.sign(message).to_bytes()) }
    }

    /// Verifies with `key`; false on any malformation.
    pub fn verifies(&self, key: &VerifyingKey, message: &[u8]) -> bool {
        let Ok(bytes) = B64.decode(&self.sig) else {
            return false;
        };
        let Ok(arr) = <[u8; 64]>::try_from(bytes.as_slice()) else {
            return false;
        };
        key.verify(message, &Signature::from_bytes(&arr)).is_ok()
    }
}

/// Why a key list or a key was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TrustError {
    #[error("a public key is malformed or its key id does not match it")]
    MalformedKey,
    #[error("the key list is not valid JSON of the expected shape")]
    MalformedList,
    #[error("the key list is not signed by the pinned root key")]
    NotSignedByRoot,
    #[error("key list version {got} cannot follow version {have}: lists advance one version at a time")]
    VersionGap { have: u64, got: u64 },
    #[error("the root key's id {got} does not match the fingerprint {expected} in the enrollment token")]
    RootMismatch { expected: String, got: String },
}

/// The content of a key list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyListBody {
    pub version: u64,
    pub issued_at: i64,
    pub keys: Vec<PublicKeyEntry>,
}

/// A verified key list with the exact bytes it arrived as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyList {
    pub body: KeyListBody,
    pub raw: String,
}

#[derive(Deserialize)]
struct SignedDoc<'a> {
    #[serde(borrow)]
    signed: &'a RawValue,
    signatures: Vec<SignatureEntry>,
}

/// Signs a key list with the root key; the result is what the server hands out.
pub fn sign_key_list(root: &SigningKey, version: u64, issued_at: i64, keys: &[VerifyingKey]) -> String {
    let body = KeyListBody { version, issued_at, keys: keys.iter().map(PublicKeyEntry::new).collect() };
    let signed =
        to_canonical(&serde_json::to_value(&body).expect("key list serialises")).expect("key list is canonicalizable");
    let sig = SignatureEntry::sign(root, &signed);
    assemble(&signed, &[sig])
}

/// `{"signatures":[...],"signed":<bytes>}` around the exact signed bytes.
pub(crate) fn assemble(signed: &[u8], sigs: &[SignatureEntry]) -> String {
    let sigs = serde_json::to_string(&json!(sigs)).expect("signatures serialise");
    let mut out = String::with_capacity(signed.len() + sigs.len() + 32);
    out.push_str("{\"signatures\":");
    out.push_str(&sigs);
    out.push_str(",\"signed\":");
    out.push_str(std::str::from_utf8(signed).expect("canonical JSON is UTF-8"));
    out.push('}');
    out
}

/// Verifies one key list against the pinned root.
pub fn verify_key_list(raw: &str, root: &VerifyingKey) -> Result<KeyList, TrustError> {
    let doc: SignedDoc<'_> = serde_json::from_str(raw).map_err(|_| TrustError::MalformedList)?;
    let root_id = key_id(root);
    let signed = doc.signed.get().as_bytes();
    if !doc.signatures.iter().any(|s| s.keyid == root_id && s.verifies(root, signed)) {
        return Err(TrustError::NotSignedByRoot);
    }
    let body: KeyListBody = serde_json::from_str(doc.signed.get()).map_err(|_| TrustError::MalformedList)?;
    for k in &body.keys {
        k.key()?;
    }
    Ok(KeyList { body, raw: raw.to_string() })
}

/// Walks a chain of key lists from `current` (None: nothing trusted yet) to the newest,
/// one version at a time. Lists at or below the current version are passed over.
pub fn advance_key_list(
    root: &VerifyingKey,
    current: Option<&KeyList>,
    chain: &[String],
) -> Result<Option<KeyList>, TrustError> {
    let mut cur = current.cloned();
    let mut lists = chain.iter().map(|raw| verify_key_list(raw, root)).collect::<Result<Vec<_>, _>>()?;
    lists.sort_by_key(|l| l.body.version);
    for list in lists {
        match &cur {
            Some(c) if list.body.version <= c.body.version => continue,
            Some(c) if list.body.version != c.body.version + 1 => {
                return Err(TrustError::VersionGap { have: c.body.version, got: list.body.version })
            }
            _ => cur = Some(list),
        }
    }
    Ok(cur)
}

/// Checks the root key the server presented against the fingerprint from the enrollment token.
pub fn pin_root(root_public_b64: &str, expected_keyid: &str) -> Result<VerifyingKey, TrustError> {
    let bytes = B64.decode(root_public_b64).map_err(|_| TrustError::MalformedKey)?;
    let arr: [u8; 32] = bytes.try_into().map_err(|_| TrustError::MalformedKey)?;
    let key = VerifyingKey::from_bytes(&arr).map_err(|_| TrustError::MalformedKey)?;
    let got = key_id(&key);
    // Fingerprints are public; a plain comparison is fine here.
    if !got.eq_ignore_ascii_case(expected_keyid) {
        return Err(TrustError::RootMismatch { expected: expected_keyid.to_string(), got });
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> SigningKey {
        SigningKey::from_bytes(&[n; 32])
    }

    #[test]
    fn key_list_chain() {
        let root = key(1);
        let rv = root.verifying_key();
        let l1 = sign_key_list(&root, 1, 0, &[key(2).verifying_key()]);
        let l2 = sign_key_list(&root, 2, 0, &[key(2).verifying_key(), key(3).verifying_key()]);
        let l3 = sign_key_list(&root, 3, 0, &[key(3).verifying_key()]);
        let start = advance_key_list(&rv, None, std::slice::from_ref(&l1)).unwrap().unwrap();
        assert_eq!(start.body.version, 1);
        let end = advance_key_list(&rv, Some(&start), &[l3.clone(), l2.clone(), l1.clone()]).unwrap().unwrap();
        assert_eq!(end.body.version, 3);
        assert_eq!(
            advance_key_list(&rv, Some(&start), std::slice::from_ref(&l3)),
            Err(TrustError::VersionGap { have: 1, got: 3 })
        );
        let forged = sign_key_list(&key(9), 2, 0, &[key(9).verifying_key()]);
        assert_eq!(advance_key_list(&rv, Some(&start), &[forged]), Err(TrustError::NotSignedByRoot));
    }

    #[test]
    fn root_pinning() {
        let root = key(1).verifying_key();
        let entry = PublicKeyEntry::new(&root);
        assert!(pin_root(&entry.public, &entry.keyid).is_ok());
        assert!(matches!(
            pin_root(&entry.public, &key_id(&key(2).verifying_key())),
            Err(TrustError::RootMismatch { .. })
        ));
    }
}
