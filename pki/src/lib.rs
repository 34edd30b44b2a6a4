//! Canopy's public-key infrastructure: the cloud CA, the identities its certificates carry,
//! join tokens, and the mutual-TLS transport every tier's gRPC uses.

mod ca;
pub mod files;
mod identity;
mod token;
mod transport;

pub use ca::{CERT_VALIDITY, CertificateAuthority, Issued, fingerprint, new_key_and_request};
pub use files::TlsFiles;
pub use identity::{Identity, PeerCert, Role, inspect};
pub use token::{JoinToken, hash_secret, secret_matches};
pub use transport::{
    Authorize, Conn, Peer, PeerInfo, Revocations, TlsContext, Transport, pinned_channel,
    require_name,
};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Io(String),
}
