//! Credentials: generation, wire format, hashing and constant-time checks.
//!
//! Every credential is `<prefix>.<id>.<secret>`: the id finds the record, the secret proves
//! possession. The server stores only SHA-256 of the secret. Secrets are 32 random bytes, so a
//! fast hash is enough (no password stretching needed), and comparisons are constant-time.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub const ADMIN_PREFIX: &str = "tadm";
pub const DEVICE_PREFIX: &str = "tdev";
pub const ENROLL_PREFIX: &str = "tenr";

/// `N` bytes from the operating system's CSPRNG.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    // A machine without an entropy source cannot run a security product at all.
    getrandom::fill(&mut b).expect("the operating system's random number generator failed");
    b
}

/// A fresh credential: the full token to hand out once, and the hash to store.
pub struct NewCredential {
    pub token: String,
    pub secret_sha256: String,
}

pub fn new_credential(prefix: &str, id: &str) -> NewCredential {
    let secret = B64URL.encode(random_bytes::<32>());
    let secret_sha256 = hash_secret(&secret);
    NewCredential { token: format!("{prefix}.{id}.{secret}"), secret_sha256 }
}

pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Raw digest of a secret, for the hot check-in path (no allocation).
pub fn digest_secret(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Splits `<prefix>.<id>.<secret>[.<more>]`; `None` when the prefix or shape is wrong.
pub fn split_token<'a>(token: &'a str, prefix: &str) -> Option<(&'a str, &'a str, Option<&'a str>)> {
    let mut parts = token.trim().splitn(4, '.');
    if parts.next()? != prefix {
        return None;
    }
    let id = parts.next().filter(|s| !s.is_empty())?;
    let secret = parts.next().filter(|s| !s.is_empty())?;
    Some((id, secret, parts.next()))
}

/// Constant-time check of a presented secret against a stored hex hash.
pub fn secret_matches(secret: &str, stored_sha256_hex: &str) -> bool {
    let Ok(stored) = hex::decode(stored_sha256_hex) else { return false };
    digest_secret(secret).ct_eq(stored.as_slice()).into()
}

/// A short random id (16 hex characters).
pub fn short_id() -> String {
    hex::encode(random_bytes::<8>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_round_trip() {
        let c = new_credential(ADMIN_PREFIX, "abc");
        let (id, secret, rest) = split_token(&c.token, ADMIN_PREFIX).unwrap();
        assert_eq!(id, "abc");
        assert!(rest.is_none());
        assert!(secret_matches(secret, &c.secret_sha256));
        assert!(!secret_matches("x", &c.secret_sha256));
        assert!(!secret_matches(secret, "zz"));
        assert!(split_token(&c.token, DEVICE_PREFIX).is_none());
        assert!(split_token("tadm..x", ADMIN_PREFIX).is_none());
        assert_eq!(split_token("tenr.i.s.fpr", ENROLL_PREFIX), Some(("i", "s", Some("fpr"))));
    }
}
