//! The signed configuration envelope (TUF/Uptane "director" model) and its verification.
//!
//! Wire form: `{"signatures":[{"keyid","sig"}],"signed":{device_id, user_id, version, issued_at,
//! expires_at, payload_sha256, payload}}`, where `signed` is RFC 8785 canonical JSON and the
//! signatures are over exactly those bytes. The agent verifies the bytes it received and persists
//! those same bytes; nothing is re-serialised before verification.

use crate::canonical::{sha256_hex, to_canonical, NotCanonicalizable};
use crate::trust::{assemble, KeyList, SignatureEntry};
use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

/// The largest envelope an agent accepts (step 1 of verification).
pub const MAX_ENVELOPE_BYTES: usize = 4 * 1024 * 1024;

/// The highest envelope version: 2^53 - 1, JSON's safe integer range. Canonical JSON (RFC 8785)
/// writes numbers as IEEE 754 doubles, so a larger version could not round-trip exactly and two
/// different versions could compare equal; both sides refuse anything above it.
pub const MAX_VERSION: u64 = (1 << 53) - 1;

/// The version after `current`, or `None` when it would leave `1..=MAX_VERSION`. Version arithmetic
/// is checked everywhere: a wrapped version would freeze the device forever (rollback).
pub fn next_version(current: u64) -> Option<u64> {
    current.checked_add(1).filter(|v| *v <= MAX_VERSION)
}

/// Whether `v` is a version an envelope may carry.
pub fn version_in_range(v: u64) -> bool {
    (1..=MAX_VERSION).contains(&v)
}

/// Why an envelope could not be issued.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IssueError {
    #[error(transparent)]
    NotCanonicalizable(#[from] NotCanonicalizable),
    #[error("envelope version {0} is outside 1..={MAX_VERSION}")]
    VersionOutOfRange(u64),
}

/// The signed part, as issued by the server.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EnvelopeBody {
    pub device_id: String,
    /// Directory id of the device's primary user, if it has one.
    pub user_id: Option<String>,
    pub version: u64,
    pub issued_at: i64,
    pub expires_at: i64,
    pub payload_sha256: String,
    pub payload: Value,
}

/// What the server produced: the wire bytes and the facts it indexes them by.
#[derive(Clone, Debug, PartialEq)]
pub struct IssuedEnvelope {
    pub bytes: String,
    pub version: u64,
    pub payload_sha256: String,
    pub expires_at: i64,
}

/// The payload's hash without issuing anything: the server compares it to decide whether the
/// device needs a new version.
pub fn payload_digest(payload: &Value) -> Result<String, NotCanonicalizable> {
    Ok(sha256_hex(&to_canonical(payload)?))
}

/// Issues an envelope signed by `key`.
pub struct EnvelopeFields<'a> {
    pub device_id: &'a str,
    pub user_id: Option<&'a str>,
    pub version: u64,
    pub issued_at: i64,
    pub expires_at: i64,
}

pub fn issue(fields: &EnvelopeFields<'_>, payload: Value, key: &SigningKey) -> Result<IssuedEnvelope, IssueError> {
    issue_canonical(fields, &CanonicalPayload::of(&payload)?, key)
}

/// A payload in canonical form with its hash: the server computes it once per device to compare
/// with what the device holds, and signs from it only when it changed.
pub struct CanonicalPayload {
    bytes: Vec<u8>,
    pub sha256: String,
}

impl CanonicalPayload {
    pub fn of(payload: &Value) -> Result<Self, NotCanonicalizable> {
        let bytes = to_canonical(payload)?;
        let sha256 = sha256_hex(&bytes);
        Ok(Self { bytes, sha256 })
    }
}

/// Issues an envelope from a payload already in canonical form. The signed body is the RFC 8785
/// form of [`EnvelopeBody`] (keys in code-unit order: device_id, expires_at, issued_at, payload,
/// payload_sha256, user_id, version), assembled around the payload's canonical bytes instead of
/// canonicalizing the payload again; a test checks it equals the generic canonicalization.
pub fn issue_canonical(
    fields: &EnvelopeFields<'_>,
    payload: &CanonicalPayload,
    key: &SigningKey,
) -> Result<IssuedEnvelope, IssueError> {
    if !version_in_range(fields.version) {
        return Err(IssueError::VersionOutOfRange(fields.version));
    }
    let string = |s: &str| to_canonical(&Value::String(s.to_string()));
    let mut signed = Vec::with_capacity(payload.bytes.len() + 256);
    signed.extend_from_slice(b"{\"device_id\":");
    signed.extend_from_slice(&string(fields.device_id)?);
    signed.extend_from_slice(b",\"expires_at\":");
    signed.extend_from_slice(&to_canonical(&Value::from(fields.expires_at))?);
    signed.extend_from_slice(b",\"issued_at\":");
    signed.extend_from_slice(&to_canonical(&Value::from(fields.issued_at))?);
    signed.extend_from_slice(b",\"payload\":");
    signed.extend_from_slice(&payload.bytes);
    signed.extend_from_slice(b",\"payload_sha256\":");
    signed.extend_from_slice(&string(&payload.sha256)?);
    signed.extend_from_slice(b",\"user_id\":");
    match fields.user_id {
        Some(u) => signed.extend_from_slice(&string(u)?),
        None => signed.extend_from_slice(b"null"),
    }
    signed.extend_from_slice(b",\"version\":");
    signed.extend_from_slice(&to_canonical(&Value::from(fields.version))?);
    signed.push(b'}');
    let sig = SignatureEntry::sign(key, &signed);
    Ok(IssuedEnvelope {
        bytes: assemble(&signed, &[sig]),
        version: fields.version,
        payload_sha256: payload.sha256.clone(),
        expires_at: fields.expires_at,
    })
}

/// Why an envelope was refused. The agent reports the variant and keeps its last known good config.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum VerifyError {
    #[error("envelope is {size} bytes, over the {max}-byte limit")]
    TooLarge { size: usize, max: usize },
    #[error("envelope is not valid JSON of the expected shape")]
    Malformed,
    #[error("envelope is signed by key {keyid}, which the trusted key list does not name")]
    UnknownKey { keyid: String },
    #[error("envelope carries no valid signature by a trusted key")]
    BadSignature,
    #[error("envelope is for device {got}, not this device ({expected})")]
    WrongDevice { expected: String, got: String },
    #[error("envelope version {got} is older than the stored version {stored} (rollback)")]
    Rollback { stored: u64, got: u64 },
    #[error("envelope version {version} reuses the stored version number with a different payload")]
    VersionReuse { version: u64 },
    #[error("envelope version {version} is outside 1..={MAX_VERSION} (JSON's safe integer range)")]
    VersionOutOfRange { version: u64 },
    #[error("envelope expired at {expires_at} (now {now}); the server must re-issue it (freeze)")]
    Expired { expires_at: i64, now: i64 },
    #[error("payload hash does not match payload_sha256")]
    HashMismatch,
}

impl VerifyError {
    /// A stable, machine-readable code for reports.
    pub fn code(&self) -> &'static str {
        match self {
            Self::TooLarge { .. } => "too_large",
            Self::Malformed => "malformed",
            Self::UnknownKey { .. } => "unknown_key",
            Self::BadSignature => "bad_signature",
            Self::WrongDevice { .. } => "wrong_device",
            Self::Rollback { .. } => "rollback",
            Self::VersionReuse { .. } => "version_reuse",
            Self::VersionOutOfRange { .. } => "version_out_of_range",
            Self::Expired { .. } => "expired",
            Self::HashMismatch => "hash_mismatch",
        }
    }
}

/// What the agent knows when it verifies.
pub struct VerifyContext<'a> {
    pub device_id: &'a str,
    pub trusted: &'a KeyList,
    /// Version and payload hash of the stored (last known good) envelope.
    pub stored: Option<(u64, &'a str)>,
    /// The later of the clock and the latest time the agent has seen; never goes back.
    pub now: i64,
}

/// An envelope that passed every step, with the bytes that were verified.
#[derive(Clone, Debug, PartialEq)]
pub struct VerifiedEnvelope {
    pub body: EnvelopeBody,
    pub bytes: String,
}

#[derive(Deserialize)]
struct WireEnvelope<'a> {
    #[serde(borrow)]
    signed: &'a RawValue,
    signatures: Vec<SignatureEntry>,
}

#[derive(Deserialize)]
struct WireBody<'a> {
    #[serde(borrow)]
    payload: &'a RawValue,
}

/// Verifies an envelope in a fixed order.
pub fn verify(bytes: &str, ctx: &VerifyContext<'_>) -> Result<VerifiedEnvelope, VerifyError> {
    // 1. Size limit, before parsing anything.
    if bytes.len() > MAX_ENVELOPE_BYTES {
        return Err(VerifyError::TooLarge { size: bytes.len(), max: MAX_ENVELOPE_BYTES });
    }
    let wire: WireEnvelope<'_> = serde_json::from_str(bytes).map_err(|_| VerifyError::Malformed)?;
    let signed = wire.signed.get().as_bytes();

    // 2. A valid signature by a key the trusted key list names. Signatures by unknown keys are
    //    passed over; if nothing trusted signed, say which key was unknown so the agent can
    //    refresh its key list.
    let mut unknown = None;
    let mut valid = false;
    for sig in &wire.signatures {
        match ctx.trusted.body.keys.iter().find(|k| k.keyid == sig.keyid) {
            Some(entry) => {
                let Ok(key) = entry.key() else { continue };
                if sig.verifies(&key, signed) {
                    valid = true;
                    break;
                }
            }
            None => unknown = Some(sig.keyid.clone()),
        }
    }
    if !valid {
        return Err(match unknown {
            Some(keyid)
                if !wire.signatures.iter().any(|s| ctx.trusted.body.keys.iter().any(|k| k.keyid == s.keyid)) =>
            {
                VerifyError::UnknownKey { keyid }
            }
            _ => VerifyError::BadSignature,
        });
    }
    let body: EnvelopeBody = serde_json::from_str(wire.signed.get()).map_err(|_| VerifyError::Malformed)?;

    // 3. Device binding (mix-and-match).
    if body.device_id != ctx.device_id {
        return Err(VerifyError::WrongDevice { expected: ctx.device_id.to_string(), got: body.device_id });
    }

    // 4. Version (rollback); an equal version must carry the same payload. A version outside the
    //    safe range is refused outright: accepting one would make every later envelope a rollback.
    if !version_in_range(body.version) {
        return Err(VerifyError::VersionOutOfRange { version: body.version });
    }
    if let Some((stored_version, stored_sha)) = ctx.stored {
        if body.version < stored_version {
            return Err(VerifyError::Rollback { stored: stored_version, got: body.version });
        }
        if body.version == stored_version && body.payload_sha256 != stored_sha {
            return Err(VerifyError::VersionReuse { version: body.version });
        }
    }

    // 5. Expiry (freeze), against a time that never goes back.
    if body.expires_at <= ctx.now {
        return Err(VerifyError::Expired { expires_at: body.expires_at, now: ctx.now });
    }

    // 6. Payload hash, over the exact payload bytes inside the signed part.
    let raw: WireBody<'_> = serde_json::from_str(wire.signed.get()).map_err(|_| VerifyError::Malformed)?;
    if sha256_hex(raw.payload.get().as_bytes()) != body.payload_sha256 {
        return Err(VerifyError::HashMismatch);
    }

    Ok(VerifiedEnvelope { body, bytes: bytes.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trust::{sign_key_list, verify_key_list};
    use serde_json::json;

    const DEV: &str = "11111111-2222-4333-8444-555555555555";

    fn signer() -> SigningKey {
        SigningKey::from_bytes(&[7; 32])
    }

    fn trusted() -> KeyList {
        let root = SigningKey::from_bytes(&[1; 32]);
        verify_key_list(&sign_key_list(&root, 1, 0, &[signer().verifying_key()]), &root.verifying_key()).unwrap()
    }

    fn issue_v(version: u64, payload: Value, key: &SigningKey) -> IssuedEnvelope {
        issue(
            &EnvelopeFields { device_id: DEV, user_id: None, version, issued_at: 100, expires_at: 1000 },
            payload,
            key,
        )
        .unwrap()
    }

    fn ctx<'a>(trusted: &'a KeyList, stored: Option<(u64, &'a str)>) -> VerifyContext<'a> {
        VerifyContext { device_id: DEV, trusted, stored, now: 500 }
    }

    /// The assembled body is exactly the RFC 8785 form of the serialised `EnvelopeBody`.
    #[test]
    fn the_assembled_body_is_the_generic_canonical_form() {
        let cases = [
            (None, json!({"machine": {}, "users": {}})),
            (Some("id-\u{e9}\"q\\"), json!({"machine": {"b": [1, 2.5, "x\n"], "a": null}, "users": {"z@x": {}}})),
        ];
        for (user_id, payload) in cases {
            for (version, issued_at, expires_at) in [(1, 0, 1), (MAX_VERSION, -5, 1_800_000_000)] {
                let fields = EnvelopeFields { device_id: DEV, user_id, version, issued_at, expires_at };
                let e = issue(&fields, payload.clone(), &signer()).unwrap();
                let body = EnvelopeBody {
                    device_id: DEV.into(),
                    user_id: user_id.map(str::to_string),
                    version,
                    issued_at,
                    expires_at,
                    payload_sha256: payload_digest(&payload).unwrap(),
                    payload: payload.clone(),
                };
                let generic = to_canonical(&serde_json::to_value(&body).unwrap()).unwrap();
                let sig = SignatureEntry::sign(&signer(), &generic);
                assert_eq!(e.bytes, assemble(&generic, &[sig]), "{user_id:?} {version}");
            }
        }
    }

    #[test]
    fn accepts_a_good_envelope() {
        let t = trusted();
        let e = issue_v(3, json!({"machine": {"a": 1}}), &signer());
        let v = verify(&e.bytes, &ctx(&t, Some((2, "x")))).unwrap();
        assert_eq!(v.body.version, 3);
        assert_eq!(v.body.payload, json!({"machine": {"a": 1}}));
        assert_eq!(v.bytes, e.bytes);
        // Re-delivery of the same version and payload is fine.
        assert!(verify(&e.bytes, &ctx(&t, Some((3, &e.payload_sha256)))).is_ok());
    }

    #[test]
    fn attacks_are_refused_in_order() {
        let t = trusted();
        let good = issue_v(5, json!({"machine": {}}), &signer());
        let other_key = issue_v(5, json!({"machine": {}}), &SigningKey::from_bytes(&[9; 32]));
        assert!(matches!(verify(&other_key.bytes, &ctx(&t, None)), Err(VerifyError::UnknownKey { .. })));

        let flipped = good.bytes.replacen("\"sig\":\"", "\"sig\":\"A", 1).replacen("\"sig\":\"AA", "\"sig\":\"B", 1);
        assert_eq!(verify(&flipped, &ctx(&t, None)), Err(VerifyError::BadSignature));

        let tampered = good.bytes.replace("\"machine\":{}", "\"machine\":{\"x\":1}");
        assert_eq!(verify(&tampered, &ctx(&t, None)), Err(VerifyError::BadSignature));

        let wrong_dev = issue(
            &EnvelopeFields {
                device_id: "99999999-2222-4333-8444-555555555555",
                user_id: None,
                version: 5,
                issued_at: 0,
                expires_at: 1000,
            },
            json!({}),
            &signer(),
        )
        .unwrap();
        assert!(matches!(verify(&wrong_dev.bytes, &ctx(&t, None)), Err(VerifyError::WrongDevice { .. })));

        assert_eq!(verify(&good.bytes, &ctx(&t, Some((6, "s")))), Err(VerifyError::Rollback { stored: 6, got: 5 }));
        assert_eq!(verify(&good.bytes, &ctx(&t, Some((5, "other")))), Err(VerifyError::VersionReuse { version: 5 }));

        let mut c = ctx(&t, None);
        c.now = 1000;
        assert_eq!(verify(&good.bytes, &c), Err(VerifyError::Expired { expires_at: 1000, now: 1000 }));

        // A signer that lies about the hash (the signature is valid, the hash is not).
        let body = json!({"device_id": DEV, "user_id": null, "version": 5, "issued_at": 0, "expires_at": 1000,
            "payload_sha256": "00", "payload": {"machine": {}}});
        let signed = to_canonical(&body).unwrap();
        let lie = assemble(&signed, &[SignatureEntry::sign(&signer(), &signed)]);
        assert_eq!(verify(&lie, &ctx(&t, None)), Err(VerifyError::HashMismatch));

        // A version past JSON's safe range, validly signed: refused before it can become the
        // stored version (every later envelope would be a rollback).
        let body = json!({"device_id": DEV, "user_id": null, "version": MAX_VERSION + 1, "issued_at": 0,
            "expires_at": 1000, "payload_sha256": good.payload_sha256, "payload": {"machine": {}}});
        let signed = to_canonical(&body).unwrap();
        let beyond = assemble(&signed, &[SignatureEntry::sign(&signer(), &signed)]);
        assert_eq!(verify(&beyond, &ctx(&t, None)), Err(VerifyError::VersionOutOfRange { version: MAX_VERSION + 1 }));

        let huge = " ".repeat(MAX_ENVELOPE_BYTES + 1);
        assert!(matches!(verify(&huge, &ctx(&t, None)), Err(VerifyError::TooLarge { .. })));
        assert_eq!(verify("{", &ctx(&t, None)), Err(VerifyError::Malformed));
    }

    #[test]
    fn versions_stay_in_the_safe_integer_range() {
        for (current, next) in
            [(0, Some(1)), (41, Some(42)), (MAX_VERSION - 1, Some(MAX_VERSION)), (MAX_VERSION, None), (u64::MAX, None)]
        {
            assert_eq!(next_version(current), next, "after {current}");
        }
        for v in [0, MAX_VERSION + 1, 1 << 63, u64::MAX] {
            let fields = EnvelopeFields { device_id: DEV, user_id: None, version: v, issued_at: 0, expires_at: 1 };
            assert_eq!(issue(&fields, json!({}), &signer()), Err(IssueError::VersionOutOfRange(v)), "version {v}");
        }
        assert_eq!(issue_v(MAX_VERSION, json!({}), &signer()).version, MAX_VERSION);
    }
}
