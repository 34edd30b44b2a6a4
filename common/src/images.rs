//! What every tier knows about an image's bytes: its kind, its content address (SHA-256) and
//! size. The CLC keeps image bytes content-addressed; nodes fetch and verify them by digest.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ids::{IdError, ImageId};

/// The three kinds of image Eucalyptus has, and EC2's `imageType`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageKind {
    /// A disk (qcow2 or raw) an instance's root disk is made from (`ami-`).
    #[default]
    Machine,
    /// A kernel an instance boots directly (`eki-`).
    Kernel,
    /// An initial ramdisk that goes with a kernel (`eri-`).
    Ramdisk,
}

impl ImageKind {
    /// EC2's `imageType` value.
    pub fn name(self) -> &'static str {
        match self {
            ImageKind::Machine => "machine",
            ImageKind::Kernel => "kernel",
            ImageKind::Ramdisk => "ramdisk",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "machine" => Some(ImageKind::Machine),
            "kernel" => Some(ImageKind::Kernel),
            "ramdisk" => Some(ImageKind::Ramdisk),
            _ => None,
        }
    }

    /// The id prefix Canopy generates for this kind.
    pub fn id_prefix(self) -> &'static str {
        match self {
            ImageKind::Machine => "ami-",
            ImageKind::Kernel => "eki-",
            ImageKind::Ramdisk => "eri-",
        }
    }

    /// A new id of this kind.
    pub fn generate_id(self) -> ImageId {
        ImageId::generate_with_prefix(self.id_prefix())
    }
}

impl fmt::Display for ImageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A SHA-256 digest as 64 lowercase hex digits: the name of an image's bytes everywhere
/// (the CLC's store, the wire, every node's cache).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Sha256Digest(String);

impl Sha256Digest {
    pub fn parse(value: &str) -> Result<Self, IdError> {
        if value.len() == 64
            && value
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            Ok(Self(value.to_owned()))
        } else {
            Err(IdError {
                kind: "sha256 digest",
                value: value.to_owned(),
            })
        }
    }

    /// From the 32 raw bytes a hasher returns.
    pub fn from_bytes(bytes: &[u8; 32]) -> Self {
        let mut s = String::with_capacity(64);
        for b in bytes {
            s.push(char::from_digit(u32::from(b >> 4), 16).expect("nibble"));
            s.push(char::from_digit(u32::from(b & 0xf), 16).expect("nibble"));
        }
        Self(s)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for Sha256Digest {
    type Error = IdError;
    fn try_from(value: String) -> Result<Self, IdError> {
        Self::parse(&value)
    }
}

impl From<Sha256Digest> for String {
    fn from(d: Sha256Digest) -> String {
        d.0
    }
}

/// An image's bytes as an instance needs them: which image, and the digest and size a node
/// verifies what it fetched against.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ImageRef {
    pub image_id: ImageId,
    pub sha256: Sha256Digest,
    pub size: u64,
}

/// What an instance boots from: its root disk's base image, and the kernel and ramdisk it
/// boots directly when it has them. Each is `None` when the image has no bytes (simulated
/// nodes need none).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BootImages {
    pub disk: Option<ImageRef>,
    pub kernel: Option<ImageRef>,
    pub ramdisk: Option<ImageRef>,
}

impl BootImages {
    /// Every image with bytes, disk first.
    pub fn iter(&self) -> impl Iterator<Item = &ImageRef> {
        [&self.disk, &self.kernel, &self.ramdisk]
            .into_iter()
            .flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_64_lowercase_hex() {
        let d = Sha256Digest::from_bytes(&[0xab; 32]);
        assert_eq!(d.as_str(), "ab".repeat(32));
        assert_eq!(Sha256Digest::parse(d.as_str()).unwrap(), d);
        assert!(Sha256Digest::parse(&"AB".repeat(32)).is_err());
        assert!(Sha256Digest::parse(&"ab".repeat(31)).is_err());
        assert!(Sha256Digest::parse("../../etc/passwd").is_err());
    }

    #[test]
    fn kinds_generate_their_prefixes_and_parse_back() {
        for kind in [ImageKind::Machine, ImageKind::Kernel, ImageKind::Ramdisk] {
            let id = kind.generate_id();
            assert!(id.as_str().starts_with(kind.id_prefix()));
            assert_eq!(ImageId::parse(id.as_str()).unwrap(), id);
            assert_eq!(ImageKind::parse(kind.name()), Some(kind));
        }
        for ok in ["emi-0123abcd", "aki-0123abcd", "ari-0123456789abcdef0"] {
            assert!(ImageId::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["xmi-0123abcd", "eki-0123", "ami-0123ABCD"] {
            assert!(ImageId::parse(bad).is_err(), "{bad}");
        }
    }
}
