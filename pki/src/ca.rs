//! The cloud CA: created once per cloud, it signs every component's certificate.

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use sha2::{Digest, Sha256};
use time::{Duration, OffsetDateTime};

use crate::{Identity, PkiError};

/// How long the CA is valid.
const CA_VALIDITY: Duration = Duration::days(3650);
/// How long a component certificate is valid. There is no rotation yet: a component whose
/// certificate nears its end is given a new one (`canopy ca issue`, or a new join).
pub const CERT_VALIDITY: Duration = Duration::days(5 * 365);
/// Tolerated clock difference between the issuer and the component.
const BACKDATE: Duration = Duration::hours(1);

/// A certificate just issued. `key_pem` is set when the CA generated the key too.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: Option<String>,
    pub serial: String,
}

pub struct CertificateAuthority {
    cert_pem: String,
    cert_der: Vec<u8>,
    key: KeyPair,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// A new CA (ECDSA P-256), named after the cloud.
    pub fn create(cloud_name: &str) -> Result<Self, PkiError> {
        let key = KeyPair::generate().map_err(rcgen_err)?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(
            DnType::CommonName,
            format!("Canopy cloud CA ({cloud_name})"),
        );
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Canopy");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + CA_VALIDITY;
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key).map_err(rcgen_err)?;
        Ok(Self {
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            key,
        })
    }

    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key =
            KeyPair::from_pem(key_pem).map_err(|e| PkiError::Invalid(format!("CA key: {e}")))?;
        let cert_der = crate::files::pem_certificates(cert_pem)?
            .into_iter()
            .next()
            .ok_or_else(|| {
                PkiError::Invalid("CA certificate: no certificate in the file".into())
            })?;
        // The key must be the certificate's.
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert_der)
            .map_err(|e| PkiError::Invalid(format!("CA certificate: {e}")))?;
        if *parsed.public_key().subject_public_key.data != *key.public_key_raw() {
            return Err(PkiError::Invalid(
                "the CA key does not belong to the CA certificate".into(),
            ));
        }
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            cert_der,
            key,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// SHA-256 of the CA certificate (DER), lowercase hex: what a join token pins.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.cert_der)
    }

    /// A certificate and a fresh key for `identity`, with extra DNS names or IP addresses.
    pub fn issue(&self, identity: &Identity, sans: &[String]) -> Result<Issued, PkiError> {
        let (files, serial) = self.issue_files(identity, sans)?;
        Ok(Issued {
            cert_pem: files.cert_pem,
            key_pem: Some(files.key_pem),
            serial,
        })
    }

    /// A component's TLS directory contents (this CA, a new certificate and its key) for
    /// `identity`, and the certificate's serial.
    pub fn issue_files(
        &self,
        identity: &Identity,
        sans: &[String],
    ) -> Result<(crate::TlsFiles, String), PkiError> {
        let key = KeyPair::generate().map_err(rcgen_err)?;
        let (cert_pem, serial) = self.sign(identity, sans, &key)?;
        let files = crate::TlsFiles {
            ca_pem: self.cert_pem.clone(),
            cert_pem,
            key_pem: key.serialize_pem(),
        };
        Ok((files, serial))
    }

    /// A certificate for the key of a PKCS#10 request (its signature proves the requester
    /// holds the key). Only the key is taken from the request: the identity and names are
    /// the CA's decision.
    pub fn sign_request(
        &self,
        csr_pem: &str,
        identity: &Identity,
        sans: &[String],
    ) -> Result<Issued, PkiError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| PkiError::Invalid(format!("certificate request: {e}")))?;
        let (cert_pem, serial) = self.sign(identity, sans, &csr.public_key)?;
        Ok(Issued {
            cert_pem,
            key_pem: None,
            serial,
        })
    }

    fn sign(
        &self,
        identity: &Identity,
        sans: &[String],
        public_key: &impl rcgen::PublicKeyData,
    ) -> Result<(String, String), PkiError> {
        let mut params = CertificateParams::new(sans.to_vec())
            .map_err(|e| PkiError::Invalid(format!("subject alternative names: {e}")))?;
        params
            .subject_alt_names
            .push(SanType::URI(identity.uri().try_into().map_err(rcgen_err)?));
        params
            .distinguished_name
            .push(DnType::CommonName, identity.to_string());
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Canopy");
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + CERT_VALIDITY;
        let serial = random_serial();
        let serial_hex = hex::encode(serial.to_bytes());
        params.serial_number = Some(serial);
        let issuer = Issuer::from_ca_cert_der(&self.cert_der.clone().into(), &self.key)
            .map_err(rcgen_err)?;
        let cert = params.signed_by(public_key, &issuer).map_err(rcgen_err)?;
        Ok((cert.pem(), serial_hex))
    }
}

/// A key and a PKCS#10 request for it, as a joining node makes them.
pub fn new_key_and_request() -> Result<(String, String), PkiError> {
    let key = KeyPair::generate().map_err(rcgen_err)?;
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .map_err(rcgen_err)?
        .pem()
        .map_err(rcgen_err)?;
    Ok((key.serialize_pem(), csr))
}

pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// 16 random bytes, the top bit clear so the DER integer stays positive at that length.
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f;
    bytes[0] |= 0x40;
    SerialNumber::from_slice(&bytes)
}

fn rcgen_err(e: rcgen::Error) -> PkiError {
    PkiError::Invalid(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Role, inspect};

    #[test]
    fn issued_certificates_carry_identity_and_serial() {
        let ca = CertificateAuthority::create("test").unwrap();
        let id = Identity::new(Role::Zone, "eu-1a").unwrap();
        let issued = ca.issue(&id, &["127.0.0.1".into(), "cc-a".into()]).unwrap();
        let der = crate::files::pem_certificates(&issued.cert_pem).unwrap();
        let peer = inspect(&der[0]).unwrap();
        assert_eq!(peer.identity, id);
        assert_eq!(peer.serial, issued.serial);
        assert_eq!(issued.serial.len(), 32);
        let other = ca.issue(&id, &[]).unwrap();
        assert_ne!(other.serial, issued.serial, "serials are random");
    }

    #[test]
    fn a_request_keeps_its_key_but_not_its_names() {
        let ca = CertificateAuthority::create("test").unwrap();
        let (key_pem, csr) = new_key_and_request().unwrap();
        let id = Identity::new(Role::Node, "hv-1").unwrap();
        let issued = ca.sign_request(&csr, &id, &[]).unwrap();
        assert!(issued.key_pem.is_none());
        let der = crate::files::pem_certificates(&issued.cert_pem).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der[0]).unwrap();
        let key = KeyPair::from_pem(&key_pem).unwrap();
        assert_eq!(
            *cert.public_key().subject_public_key.data,
            *key.public_key_raw()
        );
        assert_eq!(inspect(&der[0]).unwrap().identity, id);
        assert!(ca.sign_request("garbage", &id, &[]).is_err());
    }

    #[test]
    fn a_ca_reloads_and_refuses_a_foreign_key() {
        let ca = CertificateAuthority::create("test").unwrap();
        let again = CertificateAuthority::load(ca.cert_pem(), &ca.key_pem()).unwrap();
        assert_eq!(again.fingerprint(), ca.fingerprint());
        let other = CertificateAuthority::create("other").unwrap();
        let err = CertificateAuthority::load(ca.cert_pem(), &other.key_pem()).unwrap_err();
        assert!(err.to_string().contains("does not belong"), "{err}");
    }
}
