//! HTTP clients (reqwest) with TLS. Canopy uses rustls with *ring* as its crypto provider
//! (a plain `cc` build: no cmake, no OpenSSL headers), installed once per process before the
//! first client is built; reqwest refuses to build a client without one. Build every
//! reqwest client through here.
//!
//! Server certificates are checked against the host's CA certificates. A host without any
//! (a minimal container) still gets working clients: plain http works, and an https request
//! fails with a certificate error rather than the process failing to start.

use std::sync::OnceLock;

/// Whether the host's CA certificates load (decided once, with the provider installed).
static SYSTEM_ROOTS: OnceLock<bool> = OnceLock::new();

/// A client builder, the TLS provider installed.
pub fn builder() -> reqwest::ClientBuilder {
    let roots = *SYSTEM_ROOTS.get_or_init(|| {
        // Fails only when another provider was installed first, which serves as well.
        let _ = rustls::crypto::ring::default_provider().install_default();
        match reqwest::Client::builder().build() {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(error = %e, "no CA certificates on this host: https requests (image locations) will fail their certificate check");
                false
            }
        }
    });
    if roots {
        reqwest::Client::builder()
    } else {
        reqwest::Client::builder().tls_certs_only(std::iter::empty())
    }
}

/// A client with reqwest's defaults.
pub fn client() -> reqwest::Client {
    builder()
        .build()
        .expect("a client builds once a TLS provider is installed and the roots are settled")
}
