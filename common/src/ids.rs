//! Typed identifiers. Every id crossing a module boundary is one of these, never a bare
//! `String`; parsing is the only way in, so a value of one of these types is well formed.

use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {kind} id {value:?}")]
pub struct IdError {
    pub kind: &'static str,
    pub value: String,
}

/// The conversions every id type shares: `as_str`, `Display`, and parsing from strings
/// (so serde and `str::parse` go through the type's own validation).
macro_rules! string_id_impls {
    ($name:ident) => {
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

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(value: String) -> Result<Self, IdError> {
                Self::parse(&value)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::parse(s)
            }
        }
    };
}

/// Generates a hex-suffixed resource id type in the AWS style (`i-0123456789abcdef0`).
macro_rules! hex_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal, $kind:literal, $len:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub const PREFIX: &'static str = $prefix;
            pub const KIND: &'static str = $kind;

            /// A new random id: the prefix and `$len` lowercase hex digits.
            pub fn generate() -> Self {
                use rand::Rng;
                let mut rng = rand::rng();
                let mut s = String::with_capacity($prefix.len() + $len);
                s.push_str($prefix);
                for _ in 0..$len {
                    let d: u32 = rng.random_range(0..16);
                    s.push(char::from_digit(d, 16).expect("digit below 16"));
                }
                Self(s)
            }

            /// Accepts the prefix followed by 8 or 17 lowercase hex digits, the two lengths
            /// AWS has used.
            pub fn parse(value: &str) -> Result<Self, IdError> {
                let ok = value.strip_prefix($prefix).is_some_and(|rest| {
                    (rest.len() == 8 || rest.len() == 17)
                        && rest.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                });
                if ok {
                    Ok(Self(value.to_owned()))
                } else {
                    Err(IdError { kind: $kind, value: value.to_owned() })
                }
            }
        }

        string_id_impls!($name);
    };
}

hex_id!(
    /// An instance, `i-` and 17 hex digits.
    InstanceId, "i-", "instance", 17
);
hex_id!(
    /// A reservation (one RunInstances call), `r-` and 17 hex digits.
    ReservationId, "r-", "reservation", 17
);
hex_id!(
    /// A machine image, `ami-` and 17 hex digits.
    ImageId, "ami-", "image", 17
);

/// Generates a free-form name type: non-empty, at most 255 bytes of `[A-Za-z0-9._-]`.
macro_rules! name_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub const KIND: &'static str = $kind;

            pub fn parse(value: &str) -> Result<Self, IdError> {
                let ok = !value.is_empty()
                    && value.len() <= 255
                    && value
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
                if ok {
                    Ok(Self(value.to_owned()))
                } else {
                    Err(IdError { kind: $kind, value: value.to_owned() })
                }
            }
        }

        string_id_impls!($name);
    };
}

name_id!(
    /// A node (hypervisor host) within a zone, e.g. `node-1` or a host name.
    NodeId, "node"
);
name_id!(
    /// An availability zone, e.g. `canopy-1a`.
    ZoneName, "availability zone"
);
name_id!(
    /// A region, e.g. `canopy-1`.
    RegionName, "region"
);
name_id!(
    /// An access key id (`AKIA…`-style, but any safe string is accepted).
    AccessKeyId, "access key"
);

/// An account: 12 decimal digits, as AWS account ids are.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AccountId(String);

impl AccountId {
    pub fn parse(value: &str) -> Result<Self, IdError> {
        if value.len() == 12 && value.bytes().all(|b| b.is_ascii_digit()) {
            Ok(Self(value.to_owned()))
        } else {
            Err(IdError {
                kind: "account",
                value: value.to_owned(),
            })
        }
    }

    pub fn generate() -> Self {
        use rand::Rng;
        let mut rng = rand::rng();
        // Leading digit non-zero, as AWS account ids look.
        let first: u8 = rng.random_range(1..10);
        let mut s = first.to_string();
        for _ in 0..11 {
            s.push(char::from(b'0' + rng.random_range(0..10u8)));
        }
        Self(s)
    }
}

string_id_impls!(AccountId);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_instance_ids_look_like_aws() {
        let id = InstanceId::generate();
        assert_eq!(id.as_str().len(), 2 + 17);
        assert_eq!(InstanceId::parse(id.as_str()), Ok(id));
    }

    #[test]
    fn instance_id_parse_accepts_short_and_long_forms_only() {
        assert!(InstanceId::parse("i-0123abcd").is_ok());
        assert!(InstanceId::parse("i-0123456789abcdef0").is_ok());
        for bad in [
            "",
            "i-",
            "i-123",
            "i-0123456789ABCDEF0",
            "ami-0123abcd",
            "i-0123abcg",
            " i-0123abcd",
        ] {
            assert!(InstanceId::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn names_reject_unsafe_characters() {
        assert!(ZoneName::parse("canopy-1a").is_ok());
        assert!(ZoneName::parse("").is_err());
        assert!(ZoneName::parse("a b").is_err());
        assert!(NodeId::parse("node/1").is_err());
    }

    #[test]
    fn account_ids_are_twelve_digits() {
        let a = AccountId::generate();
        assert_eq!(AccountId::parse(a.as_str()), Ok(a));
        assert!(AccountId::parse("12345").is_err());
    }

    #[test]
    fn serde_rejects_malformed_ids() {
        let ok: Result<InstanceId, _> = serde_json::from_str("\"i-0123abcd\"");
        assert!(ok.is_ok());
        let bad: Result<InstanceId, _> = serde_json::from_str("\"x-0123abcd\"");
        assert!(bad.is_err());
    }
}
