//! Clients never need to know the leader: every replica serves the EC2 and admin APIs, and a
//! replica that does not lead hands each request, whole, to the leader over the Raft port
//! (`RaftTransport.Forward`) and relays the answer.
//!
//! - While no leader is known (an election), a request waits, up to the replica's wait
//!   bound, for one to emerge; past the bound the client gets 503 `ServiceUnavailable`, which
//!   the AWS SDKs retry.
//! - A request the leader never received (its port refused the connection: it just died) is
//!   sent again to the next leader. A request whose fate is unknown (the connection broke
//!   mid-call) is not replayed here: the client gets 503 and retries, and a retried
//!   RunInstances carries the same ClientToken, so it cannot launch twice.
//! - The leader serves a forwarded request as its own, with one difference: admin credentials
//!   were already checked by the replica the client called (`authenticated`). EC2 requests are
//!   verified again by the leader, which needs the caller's account anyway; the signature holds
//!   because the request travels with its original Host header and bytes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use canopy_proto::v1 as pb;
use canopy_proto::v1::raft_transport_client::RaftTransportClient;
use tonic::transport::{Channel, Endpoint};
use tower::ServiceExt;

use crate::clc::Clc;
use crate::replication::raft::ForwardHandler;

/// The largest request body relayed (EC2 and admin requests are far smaller).
const MAX_REQUEST_BODY: usize = 4 << 20;
/// The largest response relayed: a whole account's DescribeInstances without MaxResults
/// (what the AWS CLI sends) is about 3 KiB an instance, so this allows some 80,000.
pub(crate) const MAX_RESPONSE_BODY: usize = 256 << 20;
/// How long a replica waits for a TCP connection to the leader.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a forwarded call may take. A leader cut off by a partition drops packets
/// rather than refusing them; without a bound the client would wait out its own read
/// timeout (a minute for the SDKs) instead of getting a 503 it retries elsewhere at once.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(15);

/// Which API a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Ec2,
    Admin,
}

impl Api {
    fn to_proto(self) -> pb::ForwardedApi {
        match self {
            Api::Ec2 => pb::ForwardedApi::Ec2,
            Api::Admin => pb::ForwardedApi::Admin,
        }
    }

    /// The answer when no leader could serve the request in time, in the API's own format.
    fn unavailable(self, why: &str) -> Response {
        match self {
            Api::Ec2 => crate::ec2::error_response(
                503,
                "ServiceUnavailable",
                &format!("The service is unavailable right now ({why}). Please try again."),
            ),
            Api::Admin => {
                crate::admin::error(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable", why)
            }
        }
    }
}

/// Marks a request that another replica forwarded to this one: it is served here, never
/// forwarded again.
#[derive(Debug, Clone, Copy)]
pub struct Forwarded {
    /// The forwarding replica checked the caller's admin credentials.
    pub authenticated: bool,
}

/// Middleware on both HTTP APIs: serve here when this replica leads (or the request was
/// forwarded to it), otherwise relay to the leader. Admin requests reach it authenticated.
pub async fn to_leader(
    State((clc, api)): State<(Arc<Clc>, Api)>,
    request: Request,
    next: Next,
) -> Response {
    if request.extensions().get::<Forwarded>().is_some() || serve_here_anyway(api, request.uri()) {
        return next.run(request).await;
    }
    let replica = &clc.replica;
    if replica.is_leader() {
        return next.run(request).await;
    }
    if api == Api::Admin && crate::admin::is_upload(request.method(), request.uri()) {
        // An image is too big to carry in one forwarded message.
        return api.unavailable(
            "image uploads are served by the leader replica only: send it there (`canopy admin cluster` names it)",
        );
    }
    let (parts, body) = request.into_parts();
    let Ok(body) = axum::body::to_bytes(body, MAX_REQUEST_BODY).await else {
        return api.unavailable("request body too large to forward");
    };
    let forwarded = pb::ForwardedRequest {
        api: api.to_proto() as i32,
        method: parts.method.to_string(),
        uri: parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/".into()),
        headers: headers_to_proto(&parts.headers),
        body: body.to_vec(),
        authenticated: api == Api::Admin,
    };
    let clients = &clc.forward_clients;
    let routed = via_leader(&clc, |addr| {
        let forwarded = forwarded.clone();
        async move { clients.call(&addr, forwarded).await }
    })
    .await;
    match routed {
        Ok(Routed::Here) => next.run(Request::from_parts(parts, Body::from(body))).await,
        Ok(Routed::Leader(reply)) => response_from_proto(reply),
        Err(no_leader) => api.unavailable(&no_leader.to_string()),
    }
}

/// Where a request was served.
pub enum Routed<T> {
    /// This replica leads: serve it here.
    Here,
    /// The leader's answer.
    Leader(T),
}

/// Why no leader served a request.
#[derive(Debug, thiserror::Error)]
pub enum NoLeader {
    #[error("no cloud controller leader was elected in time")]
    NotElected,
    #[error("the cloud controller leader is unreachable")]
    Unreachable,
    /// The request may or may not have been served: it is not sent again.
    #[error("the cloud controller leader did not answer: {}", .0.message())]
    NoAnswer(tonic::Status),
}

/// Routes a request from a replica that may not lead: `Here` while this replica leads,
/// otherwise what `send` (given the leader's Raft URL) brings back from the leader. While no
/// leader is known it waits, up to the replica's bound; a leader that never got the request
/// (connection refused: it just died) is replaced by the next one.
pub async fn via_leader<T, F, Fut>(clc: &Clc, mut send: F) -> Result<Routed<T>, NoLeader>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<T, Failure>>,
{
    let replica = &clc.replica;
    let deadline = Instant::now() + replica.wait_bound();
    let mut refused: Option<u64> = None;
    loop {
        if replica.is_leader() {
            return Ok(Routed::Here);
        }
        let Some((leader, node)) = replica.await_leader(refused, deadline).await else {
            return Err(NoLeader::NotElected);
        };
        if leader == replica.id() {
            // Elected meanwhile; the next turn serves it here once the role shows it.
            tokio::time::sleep(Duration::from_millis(10)).await;
            if Instant::now() >= deadline {
                return Err(NoLeader::NotElected);
            }
            continue;
        }
        match send(node.addr).await {
            Ok(reply) => return Ok(Routed::Leader(reply)),
            Err(Failure::NotSent(why)) => {
                tracing::debug!(leader, %why, "leader unreachable; waiting for the next one");
                refused = Some(leader);
                if Instant::now() >= deadline {
                    return Err(NoLeader::Unreachable);
                }
                // The dead leader stays "known" until an election replaces it; do not spin.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(Failure::Unknown(status)) => {
                tracing::warn!(leader, %status, "forwarding to the leader failed");
                return Err(NoLeader::NoAnswer(status));
            }
        }
    }
}

/// Requests about this replica itself are never forwarded.
fn serve_here_anyway(api: Api, uri: &Uri) -> bool {
    api == Api::Admin && matches!(uri.path(), "/v1/replica" | "/v1/replica/digest")
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) stay on their own connection.
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
    )
}

fn headers_to_proto(headers: &HeaderMap) -> Vec<pb::HttpHeader> {
    headers
        .iter()
        .filter(|(name, _)| !hop_by_hop(name))
        .map(|(name, value)| pb::HttpHeader {
            name: name.as_str().to_owned(),
            value: value.as_bytes().to_vec(),
        })
        .collect()
}

fn headers_from_proto(headers: Vec<pb::HttpHeader>) -> Result<HeaderMap, String> {
    let mut map = HeaderMap::with_capacity(headers.len());
    for h in headers {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|e| e.to_string())?;
        let value = HeaderValue::from_bytes(&h.value).map_err(|e| e.to_string())?;
        if !hop_by_hop(&name) {
            map.append(name, value);
        }
    }
    Ok(map)
}

fn response_from_proto(reply: pb::ForwardedResponse) -> Response {
    let status = u16::try_from(reply.status)
        .ok()
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::BAD_GATEWAY);
    let headers = headers_from_proto(reply.headers).unwrap_or_default();
    let mut response = (status, Bytes::from(reply.body)).into_response();
    for (name, value) in &headers {
        if name != header::CONTENT_LENGTH {
            response.headers_mut().insert(name, value.clone());
        }
    }
    response
}

/// Why a forward did not produce the leader's answer.
#[derive(Debug)]
pub enum Failure {
    /// The leader never got the request (bad address, connection refused).
    NotSent(String),
    /// The request may or may not have been served.
    Unknown(tonic::Status),
}

/// gRPC clients to the other replicas' Raft ports, by address.
pub struct ForwardClients {
    clients: std::sync::Mutex<HashMap<String, RaftTransportClient<Channel>>>,
    transport: canopy_pki::Transport,
}

impl ForwardClients {
    pub fn new(transport: canopy_pki::Transport) -> Self {
        Self {
            clients: Default::default(),
            transport,
        }
    }

    fn client(&self, addr: &str) -> Result<RaftTransportClient<Channel>, String> {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = clients.get(addr) {
            return Ok(c.clone());
        }
        let channel = self.transport.channel(
            Endpoint::from_shared(addr.to_owned())
                .map_err(|e| format!("bad replica address {addr:?}: {e}"))?
                .connect_timeout(CONNECT_TIMEOUT)
                .tcp_nodelay(true),
            canopy_pki::Role::Clc,
        );
        let client = RaftTransportClient::new(channel)
            .max_decoding_message_size(MAX_RESPONSE_BODY + (1 << 20))
            .max_encoding_message_size(2 * MAX_REQUEST_BODY);
        clients.insert(addr.to_owned(), client.clone());
        Ok(client)
    }

    /// Hands a CC's call to the replica at `addr`.
    pub async fn call_zone(
        &self,
        addr: &str,
        call: pb::ForwardedZoneCall,
    ) -> Result<pb::ForwardedZoneReply, Failure> {
        self.send(addr, |mut c| async move { c.forward_zone(call).await })
            .await
    }

    /// Hands an HTTP request to the replica at `addr`.
    pub async fn call(
        &self,
        addr: &str,
        request: pb::ForwardedRequest,
    ) -> Result<pb::ForwardedResponse, Failure> {
        self.send(addr, |mut c| async move { c.forward(request).await })
            .await
    }

    async fn send<T, F, Fut>(&self, addr: &str, rpc: F) -> Result<T, Failure>
    where
        F: FnOnce(RaftTransportClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let client = self.client(addr).map_err(Failure::NotSent)?;
        let Ok(answer) = tokio::time::timeout(FORWARD_TIMEOUT, rpc(client)).await else {
            return Err(Failure::Unknown(tonic::Status::deadline_exceeded(format!(
                "the leader at {addr} did not answer within {FORWARD_TIMEOUT:?}"
            ))));
        };
        match answer {
            Ok(reply) => Ok(reply.into_inner()),
            Err(status) if never_sent(&status) => Err(Failure::NotSent(status.to_string())),
            Err(status) => Err(Failure::Unknown(status)),
        }
    }
}

/// True when the status is a failure to connect at all, so the request never left.
fn never_sent(status: &tonic::Status) -> bool {
    if status.code() != tonic::Code::Unavailable {
        return false;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::AddrNotAvailable
                    | std::io::ErrorKind::HostUnreachable
                    | std::io::ErrorKind::NetworkUnreachable
            )
        {
            return true;
        }
        if e.to_string().contains("tcp connect error") {
            return true;
        }
        source = e.source();
    }
    false
}

/// The leader's side: serves a forwarded request through this replica's own routers.
pub struct ForwardServer {
    ec2: axum::Router,
    admin: axum::Router,
    zones: crate::zones::ZoneService,
}

impl ForwardServer {
    pub fn new(clc: Arc<Clc>) -> Self {
        Self {
            ec2: crate::ec2::router(clc.clone()),
            admin: crate::admin::router(clc.clone()),
            zones: crate::zones::ZoneService::forwarded(clc),
        }
    }
}

#[tonic::async_trait]
impl ForwardHandler for ForwardServer {
    async fn forward_zone(
        &self,
        call: pb::ForwardedZoneCall,
    ) -> Result<pb::ForwardedZoneReply, tonic::Status> {
        self.zones.serve(call).await
    }

    async fn forward(
        &self,
        request: pb::ForwardedRequest,
    ) -> Result<pb::ForwardedResponse, tonic::Status> {
        let bad = |what: &str| tonic::Status::invalid_argument(what.to_owned());
        let router = match request.api() {
            pb::ForwardedApi::Ec2 => self.ec2.clone(),
            pb::ForwardedApi::Admin => self.admin.clone(),
            pb::ForwardedApi::Unspecified => return Err(bad("unknown API")),
        };
        let method =
            Method::from_bytes(request.method.as_bytes()).map_err(|_| bad("bad method"))?;
        let uri: Uri = request.uri.parse().map_err(|_| bad("bad URI"))?;
        let headers = headers_from_proto(request.headers).map_err(|e| bad(&e))?;
        let mut http = Request::new(Body::from(request.body));
        *http.method_mut() = method;
        *http.uri_mut() = uri;
        *http.headers_mut() = headers;
        http.extensions_mut().insert(Forwarded {
            authenticated: request.authenticated,
        });
        let response = router
            .oneshot(http)
            .await
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
        let (parts, body) = response.into_parts();
        let body = axum::body::to_bytes(body, MAX_RESPONSE_BODY)
            .await
            .map_err(|e| tonic::Status::internal(format!("response body: {e}")))?;
        Ok(pb::ForwardedResponse {
            status: u32::from(parts.status.as_u16()),
            headers: headers_to_proto(&parts.headers),
            body: body.to_vec(),
        })
    }
}
