//! Join tokens: `canopy1.<CA fingerprint>.<id>.<secret>`.
//!
//! The fingerprint (SHA-256 of the CA certificate) lets a node that has nothing yet check
//! that the cluster controller it joins through belongs to this cloud before it sends the
//! secret; the id names the token in the cloud's records; only a hash of the secret is
//! stored.

use std::fmt;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::PkiError;

const PREFIX: &str = "canopy1";

#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub ca_fingerprint: String,
    pub id: String,
    pub secret: String,
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("ca_fingerprint", &self.ca_fingerprint)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl JoinToken {
    /// A new token for the CA with this fingerprint.
    pub fn generate(ca_fingerprint: &str) -> JoinToken {
        JoinToken {
            ca_fingerprint: ca_fingerprint.to_owned(),
            id: hex::encode(rand::random::<[u8; 8]>()),
            secret: hex::encode(rand::random::<[u8; 24]>()),
        }
    }

    pub fn parse(s: &str) -> Result<JoinToken, PkiError> {
        let bad = || {
            PkiError::Invalid(
                "not a Canopy join token (expected canopy1.<ca-sha256>.<id>.<secret>)".into(),
            )
        };
        let mut parts = s.trim().split('.');
        let (Some(PREFIX), Some(fp), Some(id), Some(secret), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(bad());
        };
        let hex_of =
            |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
        if !(hex_of(fp, 64) && hex_of(id, 16) && hex_of(secret, 48)) {
            return Err(bad());
        }
        Ok(JoinToken {
            ca_fingerprint: fp.to_ascii_lowercase(),
            id: id.to_ascii_lowercase(),
            secret: secret.to_ascii_lowercase(),
        })
    }

    /// What the cloud stores instead of the secret.
    pub fn secret_hash(&self) -> String {
        hash_secret(&self.secret)
    }
}

pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Whether `secret` hashes to `stored` (constant time).
pub fn secret_matches(secret: &str, stored: &str) -> bool {
    hash_secret(secret)
        .as_bytes()
        .ct_eq(stored.as_bytes())
        .into()
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{PREFIX}.{}.{}.{}",
            self.ca_fingerprint, self.id, self.secret
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_hide_their_secret() {
        let t = JoinToken::generate(&"ab".repeat(32));
        let s = t.to_string();
        assert_eq!(JoinToken::parse(&s).unwrap(), t);
        assert!(!format!("{t:?}").contains(&t.secret));
        assert!(secret_matches(&t.secret, &t.secret_hash()));
        assert!(!secret_matches("nope", &t.secret_hash()));
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let t = JoinToken::generate(&"ab".repeat(32)).to_string();
        for bad in [
            "",
            "canopy1",
            &t.replacen("canopy1", "canopy2", 1),
            &format!("{t}.x"),
            &t[..t.len() - 1],
        ] {
            assert!(JoinToken::parse(bad).is_err(), "{bad:?}");
        }
    }
}
