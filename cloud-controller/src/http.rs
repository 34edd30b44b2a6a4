//! HTTP clients (reqwest) with TLS. Canopy uses rustls with *ring* as its crypto provider
//! (a plain `cc` build: no cmake, no OpenSSL headers), installed once per process before the
//! first client is built; reqwest refuses to build a client without one. Build every
//! reqwest client through here.

use std::sync::Once;

static PROVIDER: Once = Once::new();

/// A client builder, the TLS provider installed.
pub fn builder() -> reqwest::ClientBuilder {
    PROVIDER.call_once(|| {
        // Fails only when another provider was installed first, which serves as well.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
    reqwest::Client::builder()
}

/// A client with reqwest's defaults.
pub fn client() -> reqwest::Client {
    builder()
        .build()
        .expect("a default reqwest client builds once a TLS provider is installed")
}
