//! Identifiers checked once at the edge ("parse, don't validate"): device ids, user principal names,
//! group names and dotted setting keys.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Why a value given as an identifier was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdError {
    #[error(
        "device id {0:?} is not a UUID like 3f2b0c1e-8d4a-4b7e-9c61-2a5d0e7f1b3c; copy it from `tenonctl devices list`"
    )]
    DeviceId(String),
    #[error("user principal name {0:?} is not of the form name@domain")]
    Upn(String),
    #[error("group name {0:?} must be 1 to 256 characters without control characters")]
    Group(String),
    #[error("host name {0:?} must be 1 to 253 letters, digits, '-', '_' or '.'")]
    Hostname(String),
    #[error("setting key {0:?} must be dotted names such as Policies.SetNetworkOptimizationID (no empty parts, spaces or control characters)")]
    SettingKey(String),
}

macro_rules! string_newtype {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::parse(s)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::parse(&s).map_err(serde::de::Error::custom)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

string_newtype!(
    /// A device's id: a lower-case hyphenated UUID, assigned by the server at enrollment.
    DeviceId
);
string_newtype!(
    /// A user principal name, kept in lower case (Entra ID and AD compare UPNs case-insensitively).
    Upn
);
string_newtype!(
    /// The name of a directory group.
    GroupName
);
string_newtype!(
    /// A device's host name as it reports it: a DNS or NetBIOS name (letters, digits, `-`, `_`,
    /// `.`), at most 253 bytes. Devices report it, so it is hostile input until parsed: it ends up on
    /// administrators' terminals and pages.
    Hostname
);
string_newtype!(
    /// A dotted setting key such as `Policies.RequireSecurityFeatures.BitlockerEnabled`.
    SettingKey
);

impl DeviceId {
    pub fn parse(s: &str) -> Result<Self, IdError> {
        let ok = s.len() == 36
            && s.char_indices().all(|(i, c)| match i {
                8 | 13 | 18 | 23 => c == '-',
                _ => c.is_ascii_hexdigit(),
            });
        if ok {
            Ok(Self(s.to_ascii_lowercase()))
        } else {
            Err(IdError::DeviceId(s.to_string()))
        }
    }

    /// A new random (version 4) id from 16 random bytes, which the caller supplies.
    pub fn from_random(mut b: [u8; 16]) -> Self {
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        let h = hex::encode(b);
        Self(format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32]))
    }
}

impl Upn {
    pub fn parse(s: &str) -> Result<Self, IdError> {
        let t = s.trim();
        let ok = match t.split_once('@') {
            Some((name, domain)) => {
                !name.is_empty()
                    && !domain.is_empty()
                    && !domain.contains('@')
                    && t.len() <= 320
                    && !t.chars().any(|c| c.is_whitespace() || c.is_control())
            }
            None => false,
        };
        if ok {
            Ok(Self(t.to_lowercase()))
        } else {
            Err(IdError::Upn(s.to_string()))
        }
    }
}

impl GroupName {
    /// The built-in group every user belongs to.
    pub const ALL_USERS: &'static str = "All Users";

    pub fn parse(s: &str) -> Result<Self, IdError> {
        let t = s.trim();
        if t.is_empty() || t.chars().count() > 256 || t.chars().any(char::is_control) {
            return Err(IdError::Group(s.to_string()));
        }
        Ok(Self(t.to_string()))
    }

    pub fn all_users() -> Self {
        Self(Self::ALL_USERS.to_string())
    }

    pub fn is_all_users(&self) -> bool {
        self.0 == Self::ALL_USERS
    }
}

impl Hostname {
    pub const MAX_LEN: usize = 253;

    pub fn parse(s: &str) -> Result<Self, IdError> {
        let t = s.trim();
        let ok = !t.is_empty()
            && t.len() <= Self::MAX_LEN
            && t.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if ok {
            Ok(Self(t.to_string()))
        } else {
            // The refused value may be long or hold control characters: quote a bounded prefix.
            Err(IdError::Hostname(t.chars().take(64).collect()))
        }
    }
}

impl SettingKey {
    pub fn parse(s: &str) -> Result<Self, IdError> {
        let ok = !s.is_empty()
            && s.len() <= 512
            && s.split('.').all(|part| !part.is_empty() && !part.chars().any(|c| c.is_whitespace() || c.is_control()));
        if ok {
            Ok(Self(s.to_string()))
        } else {
            Err(IdError::SettingKey(s.to_string()))
        }
    }

    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.0.split('.')
    }

    /// The first dotted part, such as `Policies` or `Allow`.
    pub fn root(&self) -> &str {
        self.0.split('.').next().unwrap_or("")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsing() {
        assert!(DeviceId::parse("3F2B0C1E-8D4A-4B7E-9C61-2A5D0E7F1B3C").is_ok());
        assert_eq!(
            DeviceId::parse("3F2B0C1E-8D4A-4B7E-9C61-2A5D0E7F1B3C").unwrap().as_str(),
            "3f2b0c1e-8d4a-4b7e-9c61-2a5d0e7f1b3c"
        );
        assert!(DeviceId::parse("nope").is_err());
        assert!(DeviceId::parse("3f2b0c1e-8d4a-4b7e-9c61-2a5d0e7f1b3").is_err());
        assert_eq!(Upn::parse(" Anna@Contoso.COM ").unwrap().as_str(), "anna@contoso.com");
        for bad in ["anna", "@x", "a@", "a b@x", "a@b@c"] {
            assert!(Upn::parse(bad).is_err(), "{bad}");
        }
        assert!(SettingKey::parse("Policies.SetNetworkOptimizationID").is_ok());
        for bad in ["", "a..b", ".a", "a.", "a b", "a.\n"] {
            assert!(SettingKey::parse(bad).is_err(), "{bad:?}");
        }
        assert!(GroupName::parse("  ").is_err());
        for good in ["PC-1", "pc_7.contoso.local", &"a".repeat(253)] {
            assert_eq!(Hostname::parse(good).unwrap().as_str(), good);
        }
        for bad in ["", " ", "PC 1", "PC\u{1b}[2J", "<img src=x>", "pc\u{202e}1", "ünï", &"a".repeat(254)] {
            assert!(matches!(Hostname::parse(bad), Err(IdError::Hostname(_))), "{bad:?}");
        }
        let id = DeviceId::from_random([0xff; 16]);
        assert!(DeviceId::parse(id.as_str()).is_ok());
        assert_eq!(&id.as_str()[14..15], "4");
    }
}
