//! A component's TLS directory (`--tls-dir`):
//!
//! | file | what |
//! |---|---|
//! | `ca.crt` | the cloud CA's certificate |
//! | `tls.crt` | this component's certificate |
//! | `tls.key` | its private key (mode 0600) |
//! | `ca.key` | the CA's key: cloud controller replicas only, to sign joining nodes' certificates |

use std::io::Write;
use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::{CertificateAuthority, PkiError};

pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
pub const CERT: &str = "tls.crt";
pub const KEY: &str = "tls.key";

/// The DER certificates of a PEM text, in order.
pub fn pem_certificates(pem: &str) -> Result<Vec<Vec<u8>>, PkiError> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::Invalid(format!("PEM certificates: {e}")))
}

pub(crate) fn pem_private_key(pem: &str) -> Result<PrivateKeyDer<'static>, PkiError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| PkiError::Invalid(format!("PEM private key: {e}")))
}

/// The PEM texts of a component's TLS directory.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl TlsFiles {
    /// Whether the directory holds a component certificate (a node that joined before).
    pub fn present(dir: &Path) -> bool {
        dir.join(CERT).is_file()
    }

    pub fn load(dir: &Path) -> Result<TlsFiles, PkiError> {
        Ok(TlsFiles {
            ca_pem: read(&dir.join(CA_CERT))?,
            cert_pem: read(&dir.join(CERT))?,
            key_pem: read(&dir.join(KEY))?,
        })
    }

    /// Writes the three files (the key 0600), each to a temporary file renamed into place.
    pub fn write(&self, dir: &Path) -> Result<(), PkiError> {
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        write_file(&dir.join(CA_CERT), &self.ca_pem, 0o644)?;
        write_file(&dir.join(KEY), &self.key_pem, 0o600)?;
        write_file(&dir.join(CERT), &self.cert_pem, 0o644)
    }
}

/// The CA of a directory, when it holds the CA's key too.
pub fn load_ca(dir: &Path) -> Result<Option<CertificateAuthority>, PkiError> {
    let key = dir.join(CA_KEY);
    if !key.exists() {
        return Ok(None);
    }
    CertificateAuthority::load(&read(&dir.join(CA_CERT))?, &read(&key)?).map(Some)
}

/// Writes a new CA into `dir`; refuses to overwrite one.
pub fn write_ca(dir: &Path, ca: &CertificateAuthority) -> Result<(), PkiError> {
    if dir.join(CA_KEY).exists() || dir.join(CA_CERT).exists() {
        return Err(PkiError::Invalid(format!(
            "{} already holds a CA; remove it first to make a new one",
            dir.display()
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    write_file(&dir.join(CA_KEY), &ca.key_pem(), 0o600)?;
    write_file(&dir.join(CA_CERT), ca.cert_pem(), 0o644)
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|e| io_err(path, e))
}

fn write_file(path: &Path, text: &str, mode: u32) -> Result<(), PkiError> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = PathBuf::from(format!("{}.tmp", path.display()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| io_err(&tmp, e))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| io_err(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io_err(path, e))
}

fn io_err(path: &Path, e: std::io::Error) -> PkiError {
    PkiError::Io(format!("{}: {e}", path.display()))
}
