//! Who a certificate speaks for: a role and a name, carried as a URI subject alternative name
//! (`spiffe://canopy/<role>/<name>`), and the certificate's serial for revocation.

use std::fmt;

use crate::PkiError;

const URI_PREFIX: &str = "spiffe://canopy/";

/// The kind of component a certificate belongs to. Each gRPC service admits some roles only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// A cloud controller replica.
    Clc,
    /// A zone's cluster controller; the name is the zone.
    Zone,
    /// A node controller; the name is the node id.
    Node,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Clc => "clc",
            Role::Zone => "zone",
            Role::Node => "node",
        }
    }

    pub fn parse(s: &str) -> Result<Role, PkiError> {
        match s {
            "clc" => Ok(Role::Clc),
            "zone" | "cc" => Ok(Role::Zone),
            "node" | "nc" => Ok(Role::Node),
            other => Err(PkiError::Invalid(format!(
                "unknown role {other:?} (expected clc, zone or node)"
            ))),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role and a name: `zone/eu-1a`, `node/hv-17`, `clc/2`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    pub role: Role,
    pub name: String,
}

impl Identity {
    /// Names are what Canopy's ids allow: 1 to 128 ASCII letters, digits, `.`, `_`, `-`.
    pub fn new(role: Role, name: &str) -> Result<Identity, PkiError> {
        let ok = !name.is_empty()
            && name.len() <= 128
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !ok {
            return Err(PkiError::Invalid(format!(
                "{name:?} is not a valid {role} name (1-128 letters, digits, '.', '_', '-')"
            )));
        }
        Ok(Identity {
            role,
            name: name.to_owned(),
        })
    }

    pub fn uri(&self) -> String {
        format!("{URI_PREFIX}{}/{}", self.role, self.name)
    }

    pub fn from_uri(uri: &str) -> Option<Identity> {
        let rest = uri.strip_prefix(URI_PREFIX)?;
        let (role, name) = rest.split_once('/')?;
        Identity::new(Role::parse(role).ok()?, name).ok()
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.role, self.name)
    }
}

/// What Canopy reads from a verified peer certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCert {
    pub identity: Identity,
    /// The serial number, lowercase hex: the handle revocation uses.
    pub serial: String,
    /// Unix seconds.
    pub not_after: i64,
}

/// Reads the Canopy identity and serial of a DER certificate. The signature is not checked
/// here: the TLS handshake did that (or the caller issued the certificate itself).
pub fn inspect(der: &[u8]) -> Result<PeerCert, PkiError> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| PkiError::Invalid(format!("not an X.509 certificate: {e}")))?;
    let identity = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .and_then(|san| {
            san.value.general_names.iter().find_map(|n| match n {
                GeneralName::URI(uri) => Identity::from_uri(uri),
                _ => None,
            })
        })
        .ok_or_else(|| {
            PkiError::Invalid(
                "the certificate carries no Canopy identity (spiffe://canopy/…)".into(),
            )
        })?;
    Ok(PeerCert {
        identity,
        serial: hex::encode(cert.raw_serial()),
        not_after: cert.validity().not_after.timestamp(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_round_trip_through_their_uri() {
        let id = Identity::new(Role::Node, "hv-17").unwrap();
        assert_eq!(id.uri(), "spiffe://canopy/node/hv-17");
        assert_eq!(Identity::from_uri(&id.uri()), Some(id));
        assert_eq!(Identity::from_uri("spiffe://other/node/x"), None);
        assert_eq!(Identity::from_uri("spiffe://canopy/admin/x"), None);
        assert_eq!(Identity::from_uri("spiffe://canopy/node/a/b"), None);
    }

    #[test]
    fn names_are_checked() {
        assert!(Identity::new(Role::Zone, "eu-1a").is_ok());
        assert!(Identity::new(Role::Zone, "").is_err());
        assert!(Identity::new(Role::Zone, "a b").is_err());
        assert!(Identity::new(Role::Zone, &"x".repeat(129)).is_err());
    }
}
