//! gRPC between Canopy's components: mutual TLS with certificates from the cloud CA, or
//! plaintext (the all-in-one `canopy dev` on loopback only).
//!
//! - **Servers** accept connections through [`Transport::incoming`]: the TLS handshake
//!   checks the client's certificate chain against the cloud CA and refuses a revoked
//!   serial. Each service is wrapped in [`Transport::authorize`], which admits the roles the
//!   service is for, checks the revocation list again on every request (connections
//!   outlive revocations), and leaves a [`Peer`] in the request for handlers that must match
//!   the caller's name (a node may only speak for itself).
//! - **Clients** connect through [`Transport::channel`]: they present their own certificate
//!   and accept a server only with a certificate from the cloud CA for the role they expect
//!   (a cluster controller accepts only `node/…` certificates from its nodes' addresses).
//!   Certificates name components, not hosts: addresses change, identities do not.

use std::collections::HashSet;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Request, Status};

use crate::files::{TlsFiles, pem_certificates, pem_private_key};
use crate::{PeerCert, PkiError, Role, inspect};

/// A TLS handshake that takes longer than this is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Serials the cloud revoked. Shared by a process's servers and clients, and replaced as the
/// cloud's list changes (the CLC reads it from its state, CCs and NCs get it in heartbeat
/// answers).
#[derive(Debug, Clone, Default)]
pub struct Revocations(Arc<RwLock<Arc<HashSet<String>>>>);

impl Revocations {
    pub fn contains(&self, serial: &str) -> bool {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(serial)
    }

    /// Replaces the list; returns whether it changed.
    pub fn replace(&self, serials: impl IntoIterator<Item = String>) -> bool {
        let new: HashSet<String> = serials.into_iter().collect();
        let mut current = self.0.write().unwrap_or_else(|e| e.into_inner());
        if **current == new {
            return false;
        }
        *current = Arc::new(new);
        true
    }

    pub fn list(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect();
        v.sort();
        v
    }
}

/// How a process's gRPC servers and clients talk.
#[derive(Clone, Debug, Default)]
pub enum Transport {
    /// No TLS, no authentication: `canopy dev` and in-process tests on loopback.
    #[default]
    Plaintext,
    Tls(Arc<TlsContext>),
}

/// Two transports are equal when both are plaintext or both share one TLS context (a
/// configuration compared with itself or its clone).
impl PartialEq for Transport {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Transport::Plaintext, Transport::Plaintext) => true,
            (Transport::Tls(a), Transport::Tls(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl Eq for Transport {}

/// A component's certificate, key and trust, and the configurations built from them.
pub struct TlsContext {
    /// What this process's own certificate says.
    pub own: PeerCert,
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    revocations: Revocations,
    clients: [Arc<rustls::ClientConfig>; 3],
}

impl std::fmt::Debug for TlsContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsContext")
            .field("own", &self.own)
            .finish_non_exhaustive()
    }
}

impl TlsContext {
    pub fn revocations(&self) -> &Revocations {
        &self.revocations
    }
}

impl Transport {
    /// Mutual TLS with a component's files. Its own certificate must come from the CA in
    /// `ca.crt` and carry a Canopy identity; the key must be the certificate's.
    pub fn tls(files: &TlsFiles, revocations: Revocations) -> Result<Transport, PkiError> {
        let ca = pem_certificates(&files.ca_pem)?
            .into_iter()
            .next()
            .ok_or_else(|| PkiError::Invalid("ca.crt holds no certificate".into()))?;
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from(ca.clone()))
            .map_err(|e| PkiError::Invalid(format!("ca.crt: {e}")))?;
        let roots = Arc::new(roots);
        let leaf = pem_certificates(&files.cert_pem)?
            .into_iter()
            .next()
            .ok_or_else(|| PkiError::Invalid("tls.crt holds no certificate".into()))?;
        let own = inspect(&leaf)?;
        // The served chain ends with the CA, so a joining node can find the CA its token pins.
        let chain = vec![CertificateDer::from(leaf), CertificateDer::from(ca)];
        let key = pem_private_key(&files.key_pem)?;
        // Check the certificate chains to the CA and the key matches, now rather than at the
        // first handshake.
        let end_entity = ParsedCertificate::try_from(&chain[0])
            .map_err(|e| PkiError::Invalid(format!("tls.crt: {e}")))?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &end_entity,
            &roots,
            &[],
            UnixTime::now(),
            provider().signature_verification_algorithms.all,
        )
        .map_err(|e| PkiError::Invalid(format!("tls.crt is not valid under ca.crt: {e}")))?;
        let client = |expect: Role| -> Result<Arc<rustls::ClientConfig>, PkiError> {
            client_config(
                Arc::new(RoleVerifier {
                    trust: Trust::Roots(roots.clone()),
                    expect,
                    revocations: revocations.clone(),
                    algs: provider().signature_verification_algorithms,
                }),
                Some((chain.clone(), key.clone_key())),
            )
        };
        let clients = [client(Role::Clc)?, client(Role::Zone)?, client(Role::Node)?];
        Ok(Transport::Tls(Arc::new(TlsContext {
            own,
            roots,
            chain,
            key,
            revocations,
            clients,
        })))
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Transport::Tls(_))
    }

    /// The revocation list this transport enforces (an empty, unused one for plaintext).
    pub fn revocations(&self) -> Revocations {
        match self {
            Transport::Plaintext => Revocations::default(),
            Transport::Tls(ctx) => ctx.revocations.clone(),
        }
    }

    /// A lazily connected channel to a component of role `peer`.
    pub fn channel(&self, endpoint: Endpoint, peer: Role) -> Channel {
        match self {
            Transport::Plaintext => endpoint.connect_lazy(),
            Transport::Tls(ctx) => {
                let config = ctx.clients[peer as usize].clone();
                endpoint.connect_with_connector_lazy(TlsConnector { config })
            }
        }
    }

    /// Connections for a gRPC server on `listener`. `anonymous` admits clients without a
    /// certificate to the handshake (the services then decide: only enrollment serves them).
    pub fn incoming(
        &self,
        listener: TcpListener,
        anonymous: bool,
    ) -> Result<tokio_stream::wrappers::ReceiverStream<std::io::Result<Conn>>, PkiError> {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let acceptor = match self {
            Transport::Plaintext => None,
            Transport::Tls(ctx) => Some(tokio_rustls::TlsAcceptor::from(Arc::new(server_config(
                ctx, anonymous,
            )?))),
        };
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    () = tx.closed() => return,
                };
                let (stream, remote) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: pause, do not spin.
                        tracing::warn!(error = %e, "accepting a gRPC connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                match &acceptor {
                    None => {
                        if tx.send(Ok(Conn::Plain(stream))).await.is_err() {
                            return;
                        }
                    }
                    Some(acceptor) => {
                        let acceptor = acceptor.clone();
                        let tx = tx.clone();
                        tokio::spawn(async move {
                            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream))
                                .await
                            {
                                Ok(Ok(tls)) => {
                                    let _ = tx.send(Ok(Conn::Tls(Box::new(tls)))).await;
                                }
                                Ok(Err(e)) => {
                                    tracing::warn!(%remote, error = %e, "refused a gRPC connection: TLS handshake failed");
                                }
                                Err(_) => {
                                    tracing::warn!(%remote, "refused a gRPC connection: TLS handshake timed out");
                                }
                            }
                        });
                    }
                }
            }
        });
        Ok(tokio_stream::wrappers::ReceiverStream::new(rx))
    }

    /// The interceptor for a service that `allowed` roles may call.
    pub fn authorize(&self, allowed: &'static [Role]) -> Authorize {
        Authorize {
            transport: self.clone(),
            allowed,
        }
    }
}

fn server_config(ctx: &TlsContext, anonymous: bool) -> Result<rustls::ServerConfig, PkiError> {
    let builder = WebPkiClientVerifier::builder_with_provider(ctx.roots.clone(), provider());
    let builder = if anonymous {
        builder.allow_unauthenticated()
    } else {
        builder
    };
    let inner = builder
        .build()
        .map_err(|e| PkiError::Invalid(format!("client verifier: {e}")))?;
    let verifier = Arc::new(RevokingClientVerifier {
        inner,
        revocations: ctx.revocations.clone(),
    });
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| PkiError::Invalid(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(ctx.chain.clone(), ctx.key.clone_key())
        .map_err(|e| PkiError::Invalid(format!("tls.key does not fit tls.crt: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

fn client_config(
    verifier: Arc<RoleVerifier>,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<Arc<rustls::ClientConfig>, PkiError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| PkiError::Invalid(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match identity {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| PkiError::Invalid(format!("tls.key does not fit tls.crt: {e}")))?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// A channel for a component that has no certificate yet (a node joining): it trusts the
/// server when its chain includes the CA whose SHA-256 is `ca_fingerprint` and the server's
/// certificate is a valid `peer` certificate under it.
pub fn pinned_channel(
    endpoint: Endpoint,
    ca_fingerprint: &str,
    peer: Role,
) -> Result<Channel, PkiError> {
    let config = client_config(
        Arc::new(RoleVerifier {
            trust: Trust::Pinned(ca_fingerprint.to_ascii_lowercase()),
            expect: peer,
            revocations: Revocations::default(),
            algs: provider().signature_verification_algorithms,
        }),
        None,
    )?;
    Ok(endpoint.connect_with_connector_lazy(TlsConnector { config }))
}

/// Checks a client's chain (the webpki verifier) and then its serial against the revocation
/// list, so a revoked component cannot even finish a handshake.
#[derive(Debug)]
struct RevokingClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    revocations: Revocations,
}

impl ClientCertVerifier for RevokingClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let peer = inspect(end_entity).map_err(|e| rustls::Error::General(e.to_string()))?;
        if self.revocations.contains(&peer.serial) {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Revoked,
            ));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[derive(Debug)]
enum Trust {
    Roots(Arc<RootCertStore>),
    /// Trust the CA in the presented chain whose SHA-256 is this.
    Pinned(String),
}

/// Accepts a server certificate from the cloud CA for the expected role (not for a host
/// name), not revoked.
#[derive(Debug)]
struct RoleVerifier {
    trust: Trust,
    expect: Role,
    revocations: Revocations,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for RoleVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let pinned_roots;
        let roots: &RootCertStore = match &self.trust {
            Trust::Roots(roots) => roots,
            Trust::Pinned(fingerprint) => {
                let ca = intermediates
                    .iter()
                    .find(|c| crate::ca::fingerprint(c) == *fingerprint)
                    .ok_or_else(|| {
                        rustls::Error::General(
                            "the server's certificate is not from the CA the join token names"
                                .into(),
                        )
                    })?;
                let mut roots = RootCertStore::empty();
                roots
                    .add(ca.clone().into_owned())
                    .map_err(|e| rustls::Error::General(e.to_string()))?;
                pinned_roots = roots;
                &pinned_roots
            }
        };
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            roots,
            &[],
            now,
            self.algs.all,
        )?;
        let peer = inspect(end_entity).map_err(|e| rustls::Error::General(e.to_string()))?;
        if peer.identity.role != self.expect {
            return Err(rustls::Error::General(format!(
                "expected a {} certificate, the server presented {}",
                self.expect, peer.identity
            )));
        }
        if self.revocations.contains(&peer.serial) {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Revoked,
            ));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Connects TCP, then TLS, for tonic's channel.
#[derive(Clone)]
struct TlsConnector {
    config: Arc<rustls::ClientConfig>,
}

type ConnectFuture = Pin<
    Box<
        dyn Future<
                Output = std::io::Result<
                    hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
                >,
            > + Send,
    >,
>;

impl tower::Service<Uri> for TlsConnector {
    type Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let config = self.config.clone();
        Box::pin(async move {
            let invalid =
                |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, m.to_owned());
            let host = uri
                .host()
                .ok_or_else(|| invalid("endpoint has no host"))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let port = uri
                .port_u16()
                .unwrap_or(if uri.scheme_str() == Some("https") {
                    443
                } else {
                    80
                });
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            // The name is not what is checked (the role is): any valid name will do.
            let name = ServerName::try_from(host.clone())
                .unwrap_or_else(|_| ServerName::try_from("canopy.invalid").expect("valid name"));
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name.to_owned(), tcp)
                .await?;
            Ok(hyper_util::rt::TokioIo::new(tls))
        })
    }
}

/// A server-side connection: plaintext or TLS.
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// What a server knows of a connection's client.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub remote: Option<SocketAddr>,
    /// The client's verified certificate; `None` in plaintext or for an anonymous client.
    pub cert: Option<Arc<PeerCert>>,
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        match self {
            Conn::Plain(s) => PeerInfo {
                remote: s.peer_addr().ok(),
                cert: None,
            },
            Conn::Tls(s) => {
                let (tcp, session) = s.get_ref();
                let cert = session
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| inspect(c).ok())
                    .map(Arc::new);
                PeerInfo {
                    remote: tcp.peer_addr().ok(),
                    cert,
                }
            }
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// Who called, as the authorizing interceptor established it.
#[derive(Debug, Clone)]
pub enum Peer {
    /// A plaintext transport: nobody is authenticated (the dev cloud).
    Plaintext,
    Verified(Arc<PeerCert>),
}

/// The interceptor [`Transport::authorize`] makes.
#[derive(Clone)]
pub struct Authorize {
    transport: Transport,
    allowed: &'static [Role],
}

impl tonic::service::Interceptor for Authorize {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let peer = match &self.transport {
            Transport::Plaintext => Peer::Plaintext,
            Transport::Tls(ctx) => {
                let cert = req
                    .extensions()
                    .get::<PeerInfo>()
                    .and_then(|i| i.cert.clone())
                    .ok_or_else(|| {
                        Status::unauthenticated(
                            "this service needs a client certificate from the cloud CA",
                        )
                    })?;
                if ctx.revocations.contains(&cert.serial) {
                    return Err(Status::permission_denied(format!(
                        "the certificate of {} (serial {}) is revoked",
                        cert.identity, cert.serial
                    )));
                }
                if !self.allowed.contains(&cert.identity.role) {
                    return Err(Status::permission_denied(format!(
                        "{} may not call this service",
                        cert.identity
                    )));
                }
                Peer::Verified(cert)
            }
        };
        req.extensions_mut().insert(peer);
        Ok(req)
    }
}

/// Checks that the caller speaks for `name` in `role` (a node for its own node id, a
/// cluster controller for its own zone). Plaintext callers pass; a request that did not go
/// through [`Authorize`] does not.
pub fn require_name<T>(req: &Request<T>, role: Role, name: &str) -> Result<(), Status> {
    match req.extensions().get::<Peer>() {
        Some(Peer::Plaintext) => Ok(()),
        Some(Peer::Verified(cert)) if cert.identity.role == role && cert.identity.name == name => {
            Ok(())
        }
        Some(Peer::Verified(cert)) => Err(Status::permission_denied(format!(
            "{} may not speak for {role}/{name}",
            cert.identity
        ))),
        None => Err(Status::unauthenticated("the caller was not authenticated")),
    }
}
