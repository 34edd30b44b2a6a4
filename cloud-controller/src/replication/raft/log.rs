//! The replicated command log: a [`CommandLog`] over openraft, and starting a replica with its
//! gRPC endpoint.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use canopy_proto::v1::raft_transport_server::RaftTransportServer;
use openraft::error::{ClientWriteError, InitializeError, RaftError};
use openraft::{BasicNode, Config, Raft, RaftMetrics, SnapshotPolicy};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::network::{GrpcNetworkFactory, RaftTransportService};
use super::types::{RaftNodeId, TypeConfig};
use super::{SqliteLogStore, SqliteStateMachine};
use crate::replication::CommandLog;
use crate::state::{Command, Outcome, StateError, Store};

/// Raft's timing. The defaults aim at fast failover on a LAN: a leader that stops is replaced
/// within about a second.
#[derive(Debug, Clone)]
pub struct RaftTimers {
    /// How often the leader sends heartbeats.
    pub heartbeat: Duration,
    /// A follower that hears no leader for a random time in `election_min..election_max`
    /// starts an election.
    pub election_min: Duration,
    pub election_max: Duration,
    /// A snapshot is built after this many entries since the last one.
    pub snapshot_every: u64,
}

impl Default for RaftTimers {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_millis(100),
            election_min: Duration::from_millis(300),
            election_max: Duration::from_millis(600),
            snapshot_every: 5_000,
        }
    }
}

impl RaftTimers {
    pub(crate) fn config(&self) -> Result<Config, ReplicaError> {
        let millis = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let config = Config {
            cluster_name: "canopy-clc".into(),
            heartbeat_interval: millis(self.heartbeat),
            election_timeout_min: millis(self.election_min),
            election_timeout_max: millis(self.election_max),
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_every),
            // Keep enough log behind a snapshot that a briefly lagging follower catches up
            // from the log rather than by a whole snapshot.
            max_in_snapshot_log_to_keep: 1_000,
            // Snapshots are whole SQLite files, sent in chunks whose JSON encoding (a number
            // per byte, up to 4 characters each) stays well under the gRPC message limit.
            snapshot_max_chunk_size: 1024 * 1024,
            install_snapshot_timeout: 5_000,
            ..Config::default()
        };
        Ok(config.validate()?)
    }
}

/// Why a replica could not start or be initialized.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("invalid raft configuration: {0}")]
    Config(Box<openraft::ConfigError>),
    #[error("cannot listen for raft RPCs: {0}")]
    Listen(#[from] std::io::Error),
    #[error("raft stopped: {0}")]
    Fatal(Box<openraft::error::Fatal<RaftNodeId>>),
    #[error("cannot initialize the raft group: {0}")]
    Initialize(Box<RaftError<RaftNodeId, InitializeError<RaftNodeId, BasicNode>>>),
}

// openraft's errors are large; boxed, a `Result<_, ReplicaError>` stays small.
impl From<openraft::ConfigError> for ReplicaError {
    fn from(e: openraft::ConfigError) -> Self {
        ReplicaError::Config(Box::new(e))
    }
}

impl From<openraft::error::Fatal<RaftNodeId>> for ReplicaError {
    fn from(e: openraft::error::Fatal<RaftNodeId>) -> Self {
        ReplicaError::Fatal(Box::new(e))
    }
}

impl From<RaftError<RaftNodeId, InitializeError<RaftNodeId, BasicNode>>> for ReplicaError {
    fn from(e: RaftError<RaftNodeId, InitializeError<RaftNodeId, BasicNode>>) -> Self {
        ReplicaError::Initialize(Box::new(e))
    }
}

/// The replicated [`CommandLog`]: `submit` appends the command to the Raft log, and returns
/// once a quorum holds it and this replica applied it. Only the leader accepts commands; the
/// others answer [`StateError::NotLeader`] naming the leader they know of.
#[derive(Clone)]
pub struct RaftLog {
    id: RaftNodeId,
    raft: Raft<TypeConfig>,
    store: Arc<Store>,
}

impl RaftLog {
    /// This replica's id.
    pub fn id(&self) -> RaftNodeId {
        self.id
    }

    /// The openraft handle, for metrics, waiting and membership changes.
    pub fn raft(&self) -> &Raft<TypeConfig> {
        &self.raft
    }

    /// The store this replica applies to, for reads (which may be stale on a follower).
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// A copy of the replica's current Raft metrics.
    pub fn metrics(&self) -> RaftMetrics<RaftNodeId, BasicNode> {
        self.raft.metrics().borrow().clone()
    }

    /// The leader this replica knows of, with its address.
    pub fn leader(&self) -> Option<(RaftNodeId, BasicNode)> {
        let metrics = self.raft.metrics().borrow().clone();
        let id = metrics.current_leader?;
        let node = metrics
            .membership_config
            .membership()
            .get_node(&id)?
            .clone();
        Some((id, node))
    }

    /// Makes `members` the group's first membership. Call it on one replica of a new group;
    /// calling it on a group that already has a log is refused (`NotAllowed`).
    pub async fn initialize(
        &self,
        members: BTreeMap<RaftNodeId, BasicNode>,
    ) -> Result<(), ReplicaError> {
        self.raft.initialize(members).await?;
        Ok(())
    }

    /// Stops Raft on this replica. Its store stays open and readable.
    pub async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, id = self.id, "raft did not shut down cleanly");
        }
    }
}

fn leader_name(id: RaftNodeId, node: Option<&BasicNode>) -> String {
    match node {
        Some(node) => format!("node {id} at {}", node.addr),
        None => format!("node {id}"),
    }
}

#[async_trait]
impl CommandLog for RaftLog {
    async fn submit(&self, command: Command) -> Result<Outcome, StateError> {
        match self.raft.client_write(command).await {
            Ok(response) => response.data.into_result(),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward))) => {
                Err(StateError::NotLeader {
                    leader: forward
                        .leader_id
                        .map(|id| leader_name(id, forward.leader_node.as_ref())),
                })
            }
            // Only a membership change can fail this way, and `submit` does not change it.
            Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e))) => Err(
                StateError::Corrupt(format!("unexpected membership error: {e}")),
            ),
            Err(RaftError::Fatal(fatal)) => {
                tracing::error!(error = %fatal, id = self.id, "raft stopped");
                Err(StateError::NotLeader { leader: None })
            }
        }
    }
}

/// A replica's gRPC endpoint for Raft RPCs.
pub struct RaftServerHandle {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl RaftServerHandle {
    /// Where the endpoint listens (the real port when started on port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address peers use for this replica, as a [`BasicNode`].
    pub fn node(&self) -> BasicNode {
        BasicNode::new(format!("http://{}", self.addr))
    }

    /// Stops accepting RPCs and waits for the server to finish.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

impl Drop for RaftServerHandle {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Starts replica `id` over `store`: its Raft, and a gRPC endpoint for Raft RPCs on `listen`
/// (port 0 picks a free port; see [`RaftServerHandle::local_addr`]). A new group still needs
/// [`RaftLog::initialize`] on one replica.
///
/// From here on the store belongs to Raft: nothing else may apply commands to it.
pub async fn start_replica(
    id: RaftNodeId,
    store: Arc<Store>,
    listen: SocketAddr,
    timers: RaftTimers,
) -> Result<(RaftLog, RaftServerHandle), ReplicaError> {
    let config = Arc::new(timers.config()?);
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let raft = Raft::new(
        id,
        config,
        GrpcNetworkFactory::new(),
        SqliteLogStore::new(&store),
        SqliteStateMachine::new(store.clone()),
    )
    .await?;

    let (stop, stopped) = oneshot::channel::<()>();
    let service = RaftTransportServer::new(RaftTransportService::new(raft.clone()))
        .max_decoding_message_size(super::network::MAX_MESSAGE)
        .max_encoding_message_size(super::network::MAX_MESSAGE);
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let task = tokio::spawn(async move {
        let served = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, id, "raft gRPC server failed");
        }
    });

    Ok((
        RaftLog { id, raft, store },
        RaftServerHandle {
            addr,
            stop: Some(stop),
            task,
        },
    ))
}
