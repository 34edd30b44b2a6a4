//! The Raft RPCs between replicas, over gRPC (`canopy.v1.RaftTransport`).
//!
//! openraft 0.9 has no protobuf types, so each call carries one serde_json-encoded openraft
//! value in a `RaftBytes`: the request, and in the reply the receiving replica's
//! `Result<response, RaftError>`. A refusal by Raft itself therefore reaches the sender as
//! openraft's `RemoteError`, exactly as the receiver produced it; only a failure to reach the
//! receiver or to decode a message is a gRPC status.

use std::collections::HashMap;
use std::error::Error as StdError;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use canopy_proto::v1::raft_transport_client::RaftTransportClient;
use canopy_proto::v1::raft_transport_server::RaftTransport;
use canopy_proto::v1::{
    FetchImageRequest, ForwardedRequest, ForwardedResponse, ForwardedZoneCall, ForwardedZoneReply,
    RaftBytes,
};
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, Raft};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::transport::{Channel, Endpoint};

use super::types::{RaftNodeId, TypeConfig};

/// The largest gRPC message either side accepts: a JSON-encoded snapshot chunk of 1 MiB is
/// at most about 4 MiB, and a batch of log entries stays far below.
pub(super) const MAX_MESSAGE: usize = 16 * 1024 * 1024;

/// How long a client waits for a TCP connection to a peer before calling it unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// Makes a [`GrpcNetwork`] per target replica. Channels are lazy (nothing connects until the
/// first RPC) and kept per target and address, so a replica reconnects on its own after a
/// peer restarts.
#[derive(Debug, Clone)]
pub struct GrpcNetworkFactory {
    channels: HashMap<(RaftNodeId, String), Channel>,
    transport: canopy_pki::Transport,
}

impl GrpcNetworkFactory {
    pub fn new(transport: canopy_pki::Transport) -> Self {
        Self {
            channels: HashMap::new(),
            transport,
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for GrpcNetworkFactory {
    type Network = GrpcNetwork;

    async fn new_client(&mut self, target: RaftNodeId, node: &BasicNode) -> GrpcNetwork {
        let key = (target, node.addr.clone());
        let channel = match self.channels.get(&key) {
            Some(channel) => Ok(channel.clone()),
            None => match Endpoint::from_shared(node.addr.clone()) {
                Ok(endpoint) => {
                    let channel = self.transport.channel(
                        endpoint.connect_timeout(CONNECT_TIMEOUT).tcp_nodelay(true),
                        canopy_pki::Role::Clc,
                    );
                    self.channels.insert(key, channel.clone());
                    Ok(channel)
                }
                Err(e) => Err(e.to_string()),
            },
        };
        GrpcNetwork {
            target,
            node: node.clone(),
            client: channel.map(|channel| {
                RaftTransportClient::new(channel)
                    .max_decoding_message_size(MAX_MESSAGE)
                    .max_encoding_message_size(MAX_MESSAGE)
            }),
        }
    }
}

/// The client side of the Raft RPCs to one replica.
#[derive(Debug, Clone)]
pub struct GrpcNetwork {
    target: RaftNodeId,
    node: BasicNode,
    /// `Err` when the node's address is not a valid URI: every RPC is then unreachable.
    client: Result<RaftTransportClient<Channel>, String>,
}

/// Why an RPC did not produce the receiver's answer.
#[derive(Debug, thiserror::Error)]
enum TransportError {
    #[error("invalid address of replica: {0}")]
    BadAddress(String),
    #[error("cannot encode or decode a raft message: {0}")]
    Codec(#[from] serde_json::Error),
    #[error("gRPC: {0}")]
    Status(#[from] tonic::Status),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

impl TransportError {
    /// Unreachable makes openraft back off before retrying this peer; a network error makes it
    /// retry at once. A peer that is down, or an address that cannot work, is unreachable.
    fn into_rpc_error<E: StdError>(self) -> RPCError<RaftNodeId, BasicNode, E> {
        let unreachable = match &self {
            TransportError::BadAddress(_) => true,
            TransportError::Status(status) => status.code() == tonic::Code::Unavailable,
            TransportError::Codec(_) | TransportError::Timeout(_) => false,
        };
        if unreachable {
            RPCError::Unreachable(Unreachable::new(&self))
        } else {
            RPCError::Network(NetworkError::new(&self))
        }
    }
}

#[derive(Clone, Copy)]
enum Rpc {
    AppendEntries,
    Vote,
    InstallSnapshot,
}

impl GrpcNetwork {
    /// Sends `request`, returns the receiver's `Result<Resp, E>`, or why there is none.
    async fn call<Req, Resp, E>(
        &mut self,
        rpc: Rpc,
        request: &Req,
        option: &RPCOption,
    ) -> Result<Result<Resp, E>, TransportError>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: DeserializeOwned,
    {
        let client = match &mut self.client {
            Ok(client) => client,
            Err(e) => return Err(TransportError::BadAddress(e.clone())),
        };
        let ttl = option.hard_ttl();
        let mut message = tonic::Request::new(RaftBytes {
            payload: serde_json::to_vec(request)?,
        });
        message.set_timeout(ttl);
        let call = async {
            match rpc {
                Rpc::AppendEntries => client.append_entries(message).await,
                Rpc::Vote => client.vote(message).await,
                Rpc::InstallSnapshot => client.install_snapshot(message).await,
            }
        };
        let reply = tokio::time::timeout(ttl, call)
            .await
            .map_err(|_| TransportError::Timeout(ttl))??;
        Ok(serde_json::from_slice(&reply.into_inner().payload)?)
    }

    fn remote<E: StdError>(&self, error: E) -> RPCError<RaftNodeId, BasicNode, E> {
        RPCError::RemoteError(RemoteError::new_with_node(
            self.target,
            self.node.clone(),
            error,
        ))
    }
}

type RpcResult<T, E = openraft::error::Infallible> =
    Result<T, RPCError<RaftNodeId, BasicNode, RaftError<RaftNodeId, E>>>;

impl RaftNetwork<TypeConfig> for GrpcNetwork {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<RaftNodeId>> {
        match self.call(Rpc::AppendEntries, &rpc, &option).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => Err(self.remote(e)),
            Err(e) => Err(e.into_rpc_error()),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<RaftNodeId>, InstallSnapshotError> {
        match self.call(Rpc::InstallSnapshot, &rpc, &option).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => Err(self.remote(e)),
            Err(e) => Err(e.into_rpc_error()),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<RaftNodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<RaftNodeId>> {
        match self.call(Rpc::Vote, &rpc, &option).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => Err(self.remote(e)),
            Err(e) => Err(e.into_rpc_error()),
        }
    }

    /// Retry an unreachable peer soon: fast failover matters more than a few refused
    /// connections to a replica that is down.
    fn backoff(&self) -> Backoff {
        Backoff::new(std::iter::repeat(Duration::from_millis(200)))
    }
}

/// Serves client requests other replicas forward to this one (see [`crate::forward`]).
#[tonic::async_trait]
pub trait ForwardHandler: Send + Sync + 'static {
    async fn forward(&self, request: ForwardedRequest) -> Result<ForwardedResponse, tonic::Status>;

    async fn forward_zone(
        &self,
        call: ForwardedZoneCall,
    ) -> Result<ForwardedZoneReply, tonic::Status>;
}

/// Where the [`ForwardHandler`] goes once the replica's APIs exist (they are built after
/// Raft, which they use). Until then forwarded requests are refused as `Unavailable`.
pub type ForwardSlot = Arc<OnceLock<Arc<dyn ForwardHandler>>>;

/// Where the image store goes once the replica's context opens it. Until then `FetchBlob` is
/// refused as `Unavailable` (the asking replica tries another).
pub type BlobSlot = Arc<OnceLock<Arc<crate::images::ImageStore>>>;

/// The server side: a `RaftTransport` gRPC service handing each request to the local
/// [`Raft`]. Its answer, success or `RaftError`, is encoded into the reply; a request that does
/// not decode is `InvalidArgument`.
#[derive(Clone)]
pub struct RaftTransportService {
    raft: Raft<TypeConfig>,
    forward: ForwardSlot,
    blobs: BlobSlot,
}

impl RaftTransportService {
    pub fn new(raft: Raft<TypeConfig>, forward: ForwardSlot, blobs: BlobSlot) -> Self {
        Self {
            raft,
            forward,
            blobs,
        }
    }
}

fn decode<T: DeserializeOwned>(request: tonic::Request<RaftBytes>) -> Result<T, tonic::Status> {
    serde_json::from_slice(&request.into_inner().payload)
        .map_err(|e| tonic::Status::invalid_argument(format!("undecodable raft request: {e}")))
}

fn encode<T: Serialize>(value: &T) -> Result<tonic::Response<RaftBytes>, tonic::Status> {
    let payload = serde_json::to_vec(value)
        .map_err(|e| tonic::Status::internal(format!("cannot encode raft reply: {e}")))?;
    Ok(tonic::Response::new(RaftBytes { payload }))
}

#[tonic::async_trait]
impl RaftTransport for RaftTransportService {
    async fn append_entries(
        &self,
        request: tonic::Request<RaftBytes>,
    ) -> Result<tonic::Response<RaftBytes>, tonic::Status> {
        let rpc: AppendEntriesRequest<TypeConfig> = decode(request)?;
        encode(&self.raft.append_entries(rpc).await)
    }

    async fn vote(
        &self,
        request: tonic::Request<RaftBytes>,
    ) -> Result<tonic::Response<RaftBytes>, tonic::Status> {
        let rpc: VoteRequest<RaftNodeId> = decode(request)?;
        encode(&self.raft.vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        request: tonic::Request<RaftBytes>,
    ) -> Result<tonic::Response<RaftBytes>, tonic::Status> {
        let rpc: InstallSnapshotRequest<TypeConfig> = decode(request)?;
        encode(&self.raft.install_snapshot(rpc).await)
    }

    async fn forward(
        &self,
        request: tonic::Request<ForwardedRequest>,
    ) -> Result<tonic::Response<ForwardedResponse>, tonic::Status> {
        let Some(handler) = self.forward.get() else {
            return Err(tonic::Status::unavailable("this replica is still starting"));
        };
        Ok(tonic::Response::new(
            handler.forward(request.into_inner()).await?,
        ))
    }

    async fn forward_zone(
        &self,
        request: tonic::Request<ForwardedZoneCall>,
    ) -> Result<tonic::Response<ForwardedZoneReply>, tonic::Status> {
        let Some(handler) = self.forward.get() else {
            return Err(tonic::Status::unavailable("this replica is still starting"));
        };
        Ok(tonic::Response::new(
            handler.forward_zone(request.into_inner()).await?,
        ))
    }

    type FetchBlobStream = crate::images::ImageChunks;

    /// Only from this replica's own store, never relayed: a replica that lacks the bytes
    /// says NOT_FOUND and the asking one tries the next peer.
    async fn fetch_blob(
        &self,
        request: tonic::Request<FetchImageRequest>,
    ) -> Result<tonic::Response<Self::FetchBlobStream>, tonic::Status> {
        let Some(images) = self.blobs.get() else {
            return Err(tonic::Status::unavailable("this replica is still starting"));
        };
        Ok(tonic::Response::new(
            images.chunks(&request.get_ref().sha256).await?,
        ))
    }
}
