//! Key pairs' cryptography, without I/O: generating RSA and Ed25519 keys in the formats
//! CreateKeyPair returns (PEM or PuTTY's PPK), reading the public keys ImportKeyPair
//! accepts, and fingerprints exactly as EC2 computes them, so that a user's
//! `openssl`/`ssh-keygen` check against the console's documentation holds here too:
//!
//! | key | made by | fingerprint |
//! |---|---|---|
//! | RSA | CreateKeyPair | SHA-1 of the private key's PKCS#8 DER, colon-separated hex |
//! | RSA | ImportKeyPair | MD5 of the public key's DER (SubjectPublicKeyInfo), colon-separated hex |
//! | Ed25519 | either | SHA-256 of the OpenSSH public key blob, base64 with padding |
//!
//! The private key leaves this module once, in the CreateKeyPair answer: only the public
//! key and the fingerprint are stored.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rsa::pkcs1::{DecodeRsaPublicKey, EncodeRsaPrivateKey};
use rsa::pkcs8::{DecodePublicKey, EncodePrivateKey, EncodePublicKey, LineEnding};
use ssh_key::private::{Ed25519Keypair, KeypairData, RsaKeypair};
use ssh_key::public::KeyData;
use ssh_key::{PrivateKey, PublicKey};

/// The key types EC2 offers (`KeyType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyType {
    Rsa,
    Ed25519,
}

impl KeyType {
    pub fn name(self) -> &'static str {
        match self {
            KeyType::Rsa => "rsa",
            KeyType::Ed25519 => "ed25519",
        }
    }

    pub fn parse(s: &str) -> Option<KeyType> {
        match s {
            "rsa" => Some(KeyType::Rsa),
            "ed25519" => Some(KeyType::Ed25519),
            _ => None,
        }
    }
}

/// How CreateKeyPair returns the private key (`KeyFormat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyFormat {
    /// RSA: PKCS#1 (`BEGIN RSA PRIVATE KEY`); Ed25519: OpenSSH (`BEGIN OPENSSH PRIVATE KEY`).
    Pem,
    /// PuTTY's private key file, version 2, unencrypted.
    Ppk,
}

impl KeyFormat {
    pub fn parse(s: &str) -> Option<KeyFormat> {
        match s {
            "pem" => Some(KeyFormat::Pem),
            "ppk" => Some(KeyFormat::Ppk),
            _ => None,
        }
    }
}

/// The size of the RSA keys CreateKeyPair makes (EC2's).
pub const RSA_BITS: usize = 2048;

/// RSA key sizes ImportKeyPair accepts (EC2: 1024 to 4096 bits).
const RSA_IMPORT_BITS: std::ops::RangeInclusive<usize> = 1024..=4096;

/// A new key pair: what is stored, and the private key for the one answer.
pub struct Created {
    pub key_type: KeyType,
    /// The OpenSSH public key line, `ssh-… AAAA…`, without comment.
    pub public_key: String,
    pub fingerprint: String,
    pub private_key: String,
}

impl std::fmt::Debug for Created {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Created")
            .field("key_type", &self.key_type)
            .field("public_key", &self.public_key)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// An imported public key, as it is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Imported {
    pub key_type: KeyType,
    pub public_key: String,
    pub fingerprint: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The material is no public key Canopy can read (EC2's `InvalidKey.Format`).
    #[error("{0}")]
    Format(String),
    /// Generating or encoding a key failed (never expected).
    #[error("key generation failed: {0}")]
    Internal(String),
}

fn internal(e: impl std::fmt::Display) -> KeyError {
    KeyError::Internal(e.to_string())
}

/// Makes a key pair. `comment` (the key name) goes into the formats that carry one.
pub fn create(key_type: KeyType, format: KeyFormat, comment: &str) -> Result<Created, KeyError> {
    match key_type {
        KeyType::Ed25519 => {
            use rand::Rng;
            let seed: [u8; 32] = rand::rng().random();
            let keypair = Ed25519Keypair::from_seed(&seed);
            let private =
                PrivateKey::new(KeypairData::Ed25519(keypair), comment).map_err(internal)?;
            let public = private.public_key();
            let private_key = match format {
                KeyFormat::Pem => private
                    .to_openssh(ssh_key::LineEnding::LF)
                    .map_err(internal)?
                    .to_string(),
                KeyFormat::Ppk => ppk(&private, comment)?,
            };
            Ok(Created {
                key_type,
                public_key: openssh_line(public)?,
                fingerprint: sha256_fingerprint(public),
                private_key,
            })
        }
        KeyType::Rsa => {
            let rsa_key =
                rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, RSA_BITS).map_err(internal)?;
            let pkcs8 = rsa_key.to_pkcs8_der().map_err(internal)?;
            let fingerprint = colon_hex(&sha1_digest(pkcs8.as_bytes()));
            let keypair = RsaKeypair::try_from(&rsa_key).map_err(internal)?;
            let private = PrivateKey::new(KeypairData::Rsa(keypair), comment).map_err(internal)?;
            let private_key = match format {
                KeyFormat::Pem => rsa_key
                    .to_pkcs1_pem(LineEnding::LF)
                    .map_err(internal)?
                    .to_string(),
                KeyFormat::Ppk => ppk(&private, comment)?,
            };
            Ok(Created {
                key_type,
                public_key: openssh_line(private.public_key())?,
                fingerprint,
                private_key,
            })
        }
    }
}

/// Reads ImportKeyPair's `PublicKeyMaterial` (already base64-decoded): an OpenSSH public
/// key line, an RFC 4716 (`---- BEGIN SSH2 PUBLIC KEY ----`) block, or an RSA public key
/// as PEM or base64 DER (SubjectPublicKeyInfo or PKCS#1). RSA and Ed25519 only, as on EC2.
pub fn import(material: &[u8]) -> Result<Imported, KeyError> {
    let bad = || KeyError::Format("Key is not in valid OpenSSH public key format".into());
    let text = std::str::from_utf8(material).map_err(|_| bad())?.trim();
    let public = if text.starts_with("---- BEGIN SSH2 PUBLIC KEY ----") {
        PublicKey::from_bytes(&rfc4716_blob(text).ok_or_else(bad)?).map_err(|_| bad())?
    } else if text.starts_with("-----BEGIN") {
        let rsa_key = rsa::RsaPublicKey::from_public_key_pem(text)
            .or_else(|_| rsa::RsaPublicKey::from_pkcs1_pem(text))
            .map_err(|_| bad())?;
        rsa_public(&rsa_key)?
    } else if let Ok(der) = STANDARD.decode(text.split_whitespace().collect::<String>())
        && let Ok(rsa_key) = rsa::RsaPublicKey::from_public_key_der(&der)
            .or_else(|_| rsa::RsaPublicKey::from_pkcs1_der(&der))
    {
        rsa_public(&rsa_key)?
    } else {
        // One line; `from_openssh` takes the comment, which EC2 drops.
        let line = text.lines().next().unwrap_or_default();
        PublicKey::from_openssh(line).map_err(|_| bad())?
    };
    match public.key_data() {
        KeyData::Ed25519(_) => Ok(Imported {
            key_type: KeyType::Ed25519,
            public_key: openssh_line(&public)?,
            fingerprint: sha256_fingerprint(&public),
        }),
        KeyData::Rsa(ssh_rsa) => {
            let rsa_key = rsa::RsaPublicKey::try_from(ssh_rsa).map_err(|_| bad())?;
            let bits = rsa::traits::PublicKeyParts::size(&rsa_key) * 8;
            if !RSA_IMPORT_BITS.contains(&bits) {
                return Err(KeyError::Format(format!(
                    "RSA keys of {bits} bits are not supported (from {} to {} bits)",
                    RSA_IMPORT_BITS.start(),
                    RSA_IMPORT_BITS.end()
                )));
            }
            let spki = rsa_key.to_public_key_der().map_err(internal)?;
            Ok(Imported {
                key_type: KeyType::Rsa,
                public_key: openssh_line(&public)?,
                fingerprint: colon_hex(&md5_digest(spki.as_bytes())),
            })
        }
        _ => Err(KeyError::Format(format!(
            "Key type {} is not supported: use an RSA or ED25519 key",
            public.algorithm()
        ))),
    }
}

fn rsa_public(key: &rsa::RsaPublicKey) -> Result<PublicKey, KeyError> {
    let data = ssh_key::public::RsaPublicKey::try_from(key)
        .map_err(|_| KeyError::Format("Key is not a valid RSA public key".into()))?;
    Ok(PublicKey::from(KeyData::Rsa(data)))
}

/// The base64 body of an RFC 4716 public key: every line between the markers that is not
/// a header (`Name: value`, continued with a trailing backslash).
fn rfc4716_blob(text: &str) -> Option<Vec<u8>> {
    let mut body = String::new();
    let mut continued = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with("---- ") {
            continue;
        }
        if continued || line.contains(':') {
            continued = line.ends_with('\\');
            continue;
        }
        body.push_str(line);
    }
    STANDARD.decode(body).ok()
}

/// `ssh-… AAAA…` without the comment.
fn openssh_line(key: &PublicKey) -> Result<String, KeyError> {
    let mut key = key.clone();
    key.set_comment("");
    Ok(key.to_openssh().map_err(internal)?.trim_end().to_owned())
}

fn sha256_fingerprint(key: &PublicKey) -> String {
    let fp = key.fingerprint(ssh_key::HashAlg::Sha256);
    STANDARD.encode(fp.as_bytes())
}

fn sha1_digest(data: &[u8]) -> Vec<u8> {
    use sha1::Digest;
    sha1::Sha1::digest(data).to_vec()
}

fn md5_digest(data: &[u8]) -> Vec<u8> {
    use md5::Digest;
    md5::Md5::digest(data).to_vec()
}

fn colon_hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// PuTTY's key file, version 2 (what PuTTY and WinSCP read), unencrypted: the public and
/// private blobs in base64, and an HMAC-SHA-1 over both under the empty passphrase's key.
fn ppk(private: &PrivateKey, comment: &str) -> Result<String, KeyError> {
    let algorithm = private.algorithm().to_string();
    let public_blob = private.public_key().to_bytes().map_err(internal)?;
    let mut private_blob = Vec::new();
    match private.key_data() {
        KeypairData::Rsa(k) => {
            for part in [&k.private.d, &k.private.p, &k.private.q, &k.private.iqmp] {
                put_string(&mut private_blob, part.as_bytes());
            }
        }
        KeypairData::Ed25519(k) => put_string(&mut private_blob, k.private.as_ref()),
        _ => return Err(internal("only RSA and Ed25519 keys are made")),
    }
    let encryption = "none";
    let mut mac_data = Vec::new();
    for part in [
        algorithm.as_bytes(),
        encryption.as_bytes(),
        comment.as_bytes(),
        &public_blob,
        &private_blob,
    ] {
        put_string(&mut mac_data, part);
    }
    let mac = {
        use hmac::{KeyInit, Mac};
        use sha1::Digest;
        let key = sha1::Sha1::digest(b"putty-private-key-file-mac-key");
        let mut m = hmac::Hmac::<sha1::Sha1>::new_from_slice(&key).map_err(internal)?;
        m.update(&mac_data);
        hex::encode(m.finalize().into_bytes())
    };
    let lines = |blob: &[u8]| {
        let b64 = STANDARD.encode(blob);
        b64.as_bytes()
            .chunks(64)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect::<Vec<_>>()
    };
    let (public_lines, private_lines) = (lines(&public_blob), lines(&private_blob));
    let mut out = format!(
        "PuTTY-User-Key-File-2: {algorithm}\nEncryption: {encryption}\nComment: {comment}\nPublic-Lines: {}\n",
        public_lines.len()
    );
    for l in &public_lines {
        out.push_str(l);
        out.push('\n');
    }
    out.push_str(&format!("Private-Lines: {}\n", private_lines.len()));
    for l in &private_lines {
        out.push_str(l);
        out.push('\n');
    }
    out.push_str(&format!("Private-MAC: {mac}\n"));
    Ok(out)
}

fn put_string(out: &mut Vec<u8>, data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ed25519_created_key_matches_its_public_key_and_fingerprint() {
        let c = create(KeyType::Ed25519, KeyFormat::Pem, "k1").unwrap();
        assert!(
            c.private_key
                .starts_with("-----BEGIN OPENSSH PRIVATE KEY-----")
        );
        let private = PrivateKey::from_openssh(&c.private_key).unwrap();
        assert_eq!(openssh_line(private.public_key()).unwrap(), c.public_key);
        assert!(c.public_key.starts_with("ssh-ed25519 AAAA"));
        // Base64 of 32 bytes, padded: what EC2 shows for Ed25519 keys.
        assert_eq!(c.fingerprint.len(), 44);
        assert!(c.fingerprint.ends_with('='));
        // Importing the same public key gives the same fingerprint.
        let imported = import(format!("{} me@host\n", c.public_key).as_bytes()).unwrap();
        assert_eq!(imported.fingerprint, c.fingerprint);
        assert_eq!(imported.public_key, c.public_key);
        assert_eq!(imported.key_type, KeyType::Ed25519);
    }

    #[test]
    fn rsa_created_key_is_pkcs1_pem_with_sha1_of_pkcs8_fingerprint() {
        use rsa::pkcs1::DecodeRsaPrivateKey;
        let c = create(KeyType::Rsa, KeyFormat::Pem, "k2").unwrap();
        assert!(c.private_key.starts_with("-----BEGIN RSA PRIVATE KEY-----"));
        let key = rsa::RsaPrivateKey::from_pkcs1_pem(&c.private_key).unwrap();
        assert_eq!(rsa::traits::PublicKeyParts::size(&key) * 8, RSA_BITS);
        let der = key.to_pkcs8_der().unwrap();
        assert_eq!(c.fingerprint, colon_hex(&sha1_digest(der.as_bytes())));
        assert_eq!(c.fingerprint.len(), 20 * 3 - 1);
        assert!(c.public_key.starts_with("ssh-rsa AAAA"));
        // The same key imported is fingerprinted the import way (MD5 of the public DER).
        let imported = import(c.public_key.as_bytes()).unwrap();
        assert_eq!(imported.key_type, KeyType::Rsa);
        assert_eq!(imported.fingerprint.len(), 16 * 3 - 1);
        let spki = key.to_public_key().to_public_key_der().unwrap();
        assert_eq!(
            imported.fingerprint,
            colon_hex(&md5_digest(spki.as_bytes()))
        );
        // Every encoding of that public key reads back to the same key.
        let pem = key
            .to_public_key()
            .to_public_key_pem(LineEnding::LF)
            .unwrap();
        assert_eq!(import(pem.as_bytes()).unwrap(), imported);
        let der_b64 = STANDARD.encode(spki.as_bytes());
        assert_eq!(import(der_b64.as_bytes()).unwrap(), imported);
        let blob = PublicKey::from_openssh(&c.public_key)
            .unwrap()
            .to_bytes()
            .unwrap();
        let rfc4716 = format!(
            "---- BEGIN SSH2 PUBLIC KEY ----\nComment: \"2048-bit RSA, converted \\\nby me\"\n{}\n---- END SSH2 PUBLIC KEY ----\n",
            STANDARD
                .encode(&blob)
                .as_bytes()
                .chunks(70)
                .map(|c| std::str::from_utf8(c).unwrap())
                .collect::<Vec<_>>()
                .join("\n")
        );
        assert_eq!(import(rfc4716.as_bytes()).unwrap(), imported);
    }

    #[test]
    fn ppk_carries_the_key_and_a_valid_mac() {
        let c = create(KeyType::Ed25519, KeyFormat::Ppk, "my key").unwrap();
        let lines: Vec<&str> = c.private_key.lines().collect();
        assert_eq!(lines[0], "PuTTY-User-Key-File-2: ssh-ed25519");
        assert_eq!(lines[1], "Encryption: none");
        assert_eq!(lines[2], "Comment: my key");
        let n: usize = lines[3]
            .strip_prefix("Public-Lines: ")
            .unwrap()
            .parse()
            .unwrap();
        let public_blob = STANDARD.decode(lines[4..4 + n].concat()).unwrap();
        assert_eq!(
            PublicKey::from_bytes(&public_blob)
                .unwrap()
                .to_openssh()
                .unwrap(),
            c.public_key
        );
        // The MAC covers the blobs as written.
        let m: usize = lines[4 + n]
            .strip_prefix("Private-Lines: ")
            .unwrap()
            .parse()
            .unwrap();
        let private_blob = STANDARD.decode(lines[5 + n..5 + n + m].concat()).unwrap();
        let mut mac_data = Vec::new();
        for part in [
            &b"ssh-ed25519"[..],
            b"none",
            b"my key",
            &public_blob,
            &private_blob,
        ] {
            put_string(&mut mac_data, part);
        }
        let mac = {
            use hmac::{KeyInit, Mac};
            use sha1::Digest;
            let key = sha1::Sha1::digest(b"putty-private-key-file-mac-key");
            let mut m = hmac::Hmac::<sha1::Sha1>::new_from_slice(&key).unwrap();
            m.update(&mac_data);
            hex::encode(m.finalize().into_bytes())
        };
        assert_eq!(lines[5 + n + m], format!("Private-MAC: {mac}"));
        let rsa = create(KeyType::Rsa, KeyFormat::Ppk, "r").unwrap();
        assert!(
            rsa.private_key
                .starts_with("PuTTY-User-Key-File-2: ssh-rsa\n")
        );
        assert!(rsa.private_key.contains("\nPrivate-MAC: "));
    }

    #[test]
    fn unusable_material_is_refused() {
        for bad in [
            &b"hello"[..],
            b"ssh-ed25519 !!!",
            b"\xff\xfe",
            b"ssh-dss AAAAB3NzaC1kc3MAAACBAP",
        ] {
            assert!(matches!(import(bad), Err(KeyError::Format(_))), "{bad:?}");
        }
        // ECDSA keys are well formed but not one of EC2's types.
        let ecdsa = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBEi1DBKUX8rrVG2Hya8NG8RDH6q5JUgkpdYCc2NNYbfvuCa3n29Fd3mNvv8ZiG6OrpRhyXJ6mt2rzmjhQkW0TCo= x";
        assert!(matches!(import(ecdsa.as_bytes()), Err(KeyError::Format(_))));
    }
}
