//! RFC 8785 (JSON Canonicalization Scheme) serialisation and the SHA-256 digest Tenon takes of it.
//!
//! Everything that is hashed or signed goes through [`to_canonical`]: object members sorted by their
//! UTF-16 code units, no insignificant white space, numbers in ECMAScript `Number.toString` form, and
//! strings escaped exactly as `JSON.stringify` does.

use serde_json::Value;
use sha2::{Digest, Sha256};

/// Numbers that JCS cannot represent (they are not finite IEEE 754 doubles).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("number {0} cannot be represented in canonical JSON; use a value within IEEE 754 double range")]
pub struct NotCanonicalizable(pub String);

/// The canonical bytes of `value`.
pub fn to_canonical(value: &Value) -> Result<Vec<u8>, NotCanonicalizable> {
    let mut out = Vec::with_capacity(256);
    write_value(value, &mut out)?;
    Ok(out)
}

/// Lower-case hex SHA-256 of the canonical bytes of `value`.
pub fn canonical_sha256(value: &Value) -> Result<String, NotCanonicalizable> {
    Ok(sha256_hex(&to_canonical(value)?))
}

/// Lower-case hex SHA-256 of raw bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn write_value(value: &Value, out: &mut Vec<u8>) -> Result<(), NotCanonicalizable> {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => write_number(n, out)?,
        Value::String(s) => write_string(s, out),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(item, out)?;
            }
            out.push(b']');
        }
        Value::Object(map) => {
            let mut members: Vec<(&String, &Value)> = map.iter().collect();
            // JCS orders members by the UTF-16 code units of their names, which differs from
            // byte order for characters outside the Basic Multilingual Plane.
            members.sort_by(|(a, _), (b, _)| a.encode_utf16().cmp(b.encode_utf16()));
            out.push(b'{');
            for (i, (k, v)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_string(k, out);
                out.push(b':');
                write_value(v, out)?;
            }
            out.push(b'}');
        }
    }
    Ok(())
}

fn write_number(n: &serde_json::Number, out: &mut Vec<u8>) -> Result<(), NotCanonicalizable> {
    // Integers that a double holds exactly print as themselves; everything else is printed through
    // the double, as ECMAScript does.
    if let Some(i) = n.as_i64() {
        if i.unsigned_abs() <= (1u64 << 53) {
            out.extend_from_slice(i.to_string().as_bytes());
            return Ok(());
        }
    } else if let Some(u) = n.as_u64() {
        if u <= (1u64 << 53) {
            out.extend_from_slice(u.to_string().as_bytes());
            return Ok(());
        }
    }
    let f = n.as_f64().filter(|f| f.is_finite()).ok_or_else(|| NotCanonicalizable(n.to_string()))?;
    if f == 0.0 {
        // -0 serialises as 0.
        out.push(b'0');
        return Ok(());
    }
    let mut buf = ryu_js::Buffer::new();
    out.extend_from_slice(buf.format_finite(f).as_bytes());
    Ok(())
}

fn write_string(s: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: Option<&[u8]> = match b {
            b'"' => Some(b"\\\""),
            b'\\' => Some(b"\\\\"),
            0x08 => Some(b"\\b"),
            0x09 => Some(b"\\t"),
            0x0a => Some(b"\\n"),
            0x0c => Some(b"\\f"),
            0x0d => Some(b"\\r"),
            0x00..=0x1f => None,
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        match escape {
            Some(e) => out.extend_from_slice(e),
            None => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[(b >> 4) as usize]);
                out.push(HEX[(b & 0xf) as usize]);
            }
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(input: &str, expected: &str) {
        let v: Value = serde_json::from_str(input).unwrap();
        assert_eq!(String::from_utf8(to_canonical(&v).unwrap()).unwrap(), expected, "input {input}");
    }

    #[test]
    fn canonical_forms() {
        check(r#"{ "b": 1, "a": [true, false, null] }"#, r#"{"a":[true,false,null],"b":1}"#);
        check(r#"{"z":{"y":2,"x":1},"a":"s"}"#, r#"{"a":"s","z":{"x":1,"y":2}}"#);
        check(r#""\u0001\n\t\"\\/é€""#, "\"\\u0001\\n\\t\\\"\\\\/é€\"");
        check("1.0", "1");
        check("-0.0", "0");
        check("1e21", "1e+21");
        check("1e-7", "1e-7");
        check("0.000001", "0.000001");
        check("123456789012", "123456789012");
        check("4.5", "4.5");
        check("9007199254740993", "9007199254740992");
        check(r#"{"\u20ac":1,"\r":2,"\ud83d\ude00":3,"\ufb33":4}"#, "{\"\\r\":2,\"€\":1,\"😀\":3,\"\u{fb33}\":4}");
    }

    #[test]
    fn rfc8785_sample_numbers() {
        // Values from RFC 8785 appendix B.
        check("333333333.33333329", "333333333.3333333");
        check("1E30", "1e+30");
        check("4.50", "4.5");
        check("2e-3", "0.002");
        check("0.000000000000000000000000001", "1e-27");
    }

    #[test]
    fn hash_is_over_canonical_bytes() {
        let a = json!({"b": 2, "a": 1});
        let b: Value = serde_json::from_str(r#"{ "a" : 1 , "b" : 2 }"#).unwrap();
        assert_eq!(canonical_sha256(&a).unwrap(), canonical_sha256(&b).unwrap());
        assert_eq!(canonical_sha256(&a).unwrap(), sha256_hex(br#"{"a":1,"b":2}"#));
    }
}
