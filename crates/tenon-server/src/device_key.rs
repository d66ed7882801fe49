//! What the portal's device list searches and sorts by, kept beside each device's metadata
//! ([`crate::state::DeviceMeta::key`]) so that a search over 100,000 devices reads one short
//! lower-cased string per device, and sorting by host name or user compares integers.
//!
//! A key is derived from the host name, the primary user and the users seen, and from nothing
//! else: whoever changes one of those calls [`crate::state::DeviceMeta::refresh_key`]. The device
//! list checks that every key is fresh in debug builds (every test run), so a write path that
//! forgets cannot pass the tests.

use std::cmp::Ordering;
use std::collections::BTreeSet;
use tenon_core::ids::Upn;

/// Separates the fields of [`SearchKey::text`]: a control character, which the list's search
/// text never holds, so a search cannot match across two fields.
pub const FIELD_SEPARATOR: char = '\u{1f}';

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SearchKey {
    /// The host name, the primary user and each user seen, lower-cased (Unicode), separated by
    /// [`FIELD_SEPARATOR`].
    text: Box<str>,
    /// The first 16 bytes of the host name, ASCII-lower-cased, big-endian: comparing two of them
    /// orders host names as [`cmp_ci`] does, unless they are equal (then compare the names).
    host_rank: u128,
    /// The same of the primary user's name, compared as is (user names are stored lower-case);
    /// 0 without one, which sorts first as `None` does.
    user_rank: u128,
}

impl SearchKey {
    pub fn of(hostname: &str, primary: Option<&Upn>, users: &BTreeSet<Upn>) -> Self {
        let mut text = String::with_capacity(
            hostname.len()
                + primary.map_or(0, |p| p.as_str().len() + 1)
                + users.iter().map(|u| u.as_str().len() + 1).sum::<usize>(),
        );
        push_clean(&mut text, hostname);
        for u in primary.into_iter().chain(users.iter().filter(|u| Some(*u) != primary)) {
            text.push(FIELD_SEPARATOR);
            push_clean(&mut text, u.as_str());
        }
        Self {
            text: text.into_boxed_str(),
            host_rank: rank(hostname.bytes().map(|b| b.to_ascii_lowercase())),
            user_rank: primary.map_or(0, |p| rank(p.as_str().bytes())),
        }
    }

    /// The lower-cased fields, for a substring search.
    pub fn text(&self) -> &[u8] {
        self.text.as_bytes()
    }

    pub fn host_rank(&self) -> u128 {
        self.host_rank
    }

    pub fn user_rank(&self) -> u128 {
        self.user_rank
    }
}

/// `s` lower-cased into `out`, without the separator (a host name that held one would otherwise
/// join two fields).
pub fn push_clean(out: &mut String, s: &str) {
    if s.is_ascii() {
        out.extend(s.bytes().filter(|b| *b != FIELD_SEPARATOR as u8).map(|b| char::from(b.to_ascii_lowercase())));
    } else {
        out.extend(s.to_lowercase().chars().filter(|c| *c != FIELD_SEPARATOR));
    }
}

/// The first 16 bytes, big-endian, zero-padded: a non-zero rank never ties with a shorter name's
/// prefix unless the bytes after it are zero, which `cmp` then settles.
fn rank(bytes: impl Iterator<Item = u8>) -> u128 {
    let mut buf = [0u8; 16];
    for (slot, b) in buf.iter_mut().zip(bytes) {
        *slot = b;
    }
    u128::from_be_bytes(buf)
}

/// ASCII-case-insensitive order of two names: the order [`SearchKey::host_rank`] agrees with.
pub fn cmp_ci(a: &str, b: &str) -> Ordering {
    a.bytes().map(|c| c.to_ascii_lowercase()).cmp(b.bytes().map(|c| c.to_ascii_lowercase()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upn(s: &str) -> Upn {
        Upn::parse(s).unwrap()
    }

    #[test]
    fn text_holds_every_field_lower_cased_and_the_primary_once() {
        let users: BTreeSet<Upn> = [upn("b@contoso.com"), upn("a@contoso.com")].into();
        let k = SearchKey::of("PC-Ärger\u{1f}X", Some(&upn("b@contoso.com")), &users);
        assert_eq!(std::str::from_utf8(k.text()).unwrap(), "pc-ärgerx\u{1f}b@contoso.com\u{1f}a@contoso.com");
        let k = SearchKey::of("PC", None, &BTreeSet::new());
        assert_eq!(k.text(), b"pc");
        assert_eq!(k.user_rank(), 0);
    }

    #[test]
    fn ranks_order_as_the_names_do_up_to_ties() {
        let names = [
            "",
            "a",
            "A-1",
            "a-10",
            "a-2",
            "pc",
            "PC-0001",
            "pc-00010",
            "SIM-50000",
            "sim-5000",
            "zzzzzzzzzzzzzzzzzz",
            "zzzzzzzzzzzzzzzzz",
        ];
        let none = BTreeSet::new();
        for a in names {
            for b in names {
                let (ka, kb) = (SearchKey::of(a, None, &none), SearchKey::of(b, None, &none));
                let by_rank = ka.host_rank().cmp(&kb.host_rank());
                if by_rank != Ordering::Equal {
                    assert_eq!(by_rank, cmp_ci(a, b), "{a:?} {b:?}");
                }
                if cmp_ci(a, b) == Ordering::Equal {
                    assert_eq!(by_rank, Ordering::Equal, "{a:?} {b:?}");
                }
            }
        }
        let (a, b) = (upn("a@contoso.com"), upn("b@contoso.com"));
        assert!(SearchKey::of("x", Some(&a), &none).user_rank() < SearchKey::of("x", Some(&b), &none).user_rank());
        assert!(SearchKey::of("x", None, &none).user_rank() < SearchKey::of("x", Some(&a), &none).user_rank());
    }
}
