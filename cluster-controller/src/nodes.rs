//! The executor towards the nodes: delivers node documents (concurrently, each with a
//! timeout), asks a node for a console, and the resync loop that re-pushes to nodes that
//! are behind.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use canopy_common::NodeId;
use canopy_proto::v1 as pb;
use canopy_proto::v1::node_controller_client::NodeControllerClient;
use tokio::task::JoinSet;
use tonic::transport::{Channel, Endpoint};

use crate::convert;
use crate::error::CcError;
use crate::model::Moment;
use crate::runtime::Shared;
use crate::zone::{NodePush, NodeTarget};

/// How long one call to a node may take, connection included. A node slower than this is
/// treated as unreachable; the resync loop tries again.
pub const NODE_RPC_TIMEOUT: Duration = Duration::from_secs(5);
const NODE_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// One lazily connected channel per node, rebuilt when the node re-registers elsewhere.
/// Channels reconnect by themselves, so a node that restarts at the same address needs
/// nothing from us.
pub(crate) struct NodeClients {
    clients: Mutex<HashMap<NodeId, (String, NodeControllerClient<Channel>)>>,
    transport: canopy_pki::Transport,
}

impl NodeClients {
    pub(crate) fn new(transport: canopy_pki::Transport) -> Self {
        Self {
            clients: Mutex::default(),
            transport,
        }
    }

    pub(crate) fn transport(&self) -> &canopy_pki::Transport {
        &self.transport
    }

    /// Drops every client (and, once in-flight calls end, their connections).
    pub(crate) fn forget_all(&self) {
        self.clients
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
    }

    fn client(
        &self,
        node: &NodeId,
        endpoint: &str,
    ) -> Result<NodeControllerClient<Channel>, CcError> {
        let mut clients = self
            .clients
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((known, client)) = clients.get(node)
            && known == endpoint
        {
            return Ok(client.clone());
        }
        let channel = Endpoint::from_shared(endpoint.to_owned())
            .map_err(|e| CcError::NodeUnreachable {
                node: node.clone(),
                detail: e.to_string(),
            })?
            .connect_timeout(NODE_CONNECT_TIMEOUT)
            .timeout(NODE_RPC_TIMEOUT);
        let client =
            NodeControllerClient::new(self.transport.channel(channel, canopy_pki::Role::Node));
        clients.insert(node.clone(), (endpoint.to_owned(), client.clone()));
        Ok(client)
    }
}

/// Delivers `pushes` concurrently and records each node's reply. Failures are only logged:
/// the node's generation stays behind, so the resync loop pushes again.
pub(crate) async fn push_all(shared: &Arc<Shared>, pushes: Vec<NodePush>) {
    let mut tasks = JoinSet::new();
    for push in pushes {
        let shared = Arc::clone(shared);
        tasks.spawn(async move {
            let node = push.doc.node.clone();
            let result = push_one(&shared, &push).await;
            (node, push.doc.generation, result)
        });
    }
    while let Some(joined) = tasks.join_next().await {
        let Ok((node, generation, result)) = joined else {
            continue;
        };
        match result {
            Ok(reply) => {
                if reply.stale {
                    tracing::debug!(%node, generation, held = reply.applied_generation, "node already holds a newer document");
                }
                shared.state().push_acked(&node, reply.applied_generation);
            }
            Err(err) => {
                tracing::warn!(%node, generation, error = %err, "pushing desired state failed; will retry")
            }
        }
    }
}

async fn push_one(shared: &Shared, push: &NodePush) -> Result<pb::PutStateResponse, CcError> {
    let node = &push.doc.node;
    let mut client = shared.nodes.client(node, &push.endpoint)?;
    let request = convert::node_desired_to_proto(&push.doc);
    let unreachable = |detail: String| CcError::NodeUnreachable {
        node: node.clone(),
        detail,
    };
    match tokio::time::timeout(NODE_RPC_TIMEOUT, client.put_node_state(request)).await {
        Ok(Ok(reply)) => Ok(reply.into_inner()),
        Ok(Err(status)) => Err(unreachable(status.to_string())),
        Err(_) => Err(unreachable("timed out".into())),
    }
}

/// Asks the node that runs the instance for its console.
pub(crate) async fn console_output(
    shared: &Shared,
    target: NodeTarget,
    request: pb::ConsoleRequest,
    instance: canopy_common::InstanceId,
) -> Result<pb::ConsoleResponse, CcError> {
    let mut client = shared.nodes.client(&target.node, &target.endpoint)?;
    let unreachable = |detail: String| CcError::NodeUnreachable {
        node: target.node.clone(),
        detail,
    };
    match tokio::time::timeout(NODE_RPC_TIMEOUT, client.get_console_output(request)).await {
        Ok(Ok(reply)) => Ok(reply.into_inner()),
        // The node answered but does not know the instance (e.g. not created yet).
        Ok(Err(status)) if status.code() == tonic::Code::NotFound => {
            Err(CcError::InstanceNotFound(instance))
        }
        Ok(Err(status)) => Err(unreachable(status.to_string())),
        Err(_) => Err(unreachable("timed out".into())),
    }
}

/// Every `interval`: re-pushes to nodes not known to hold the applied generation, and logs
/// nodes going silent or coming back.
pub(crate) async fn resync_loop(shared: Arc<Shared>, interval: Duration) {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut unhealthy = BTreeSet::new();
    loop {
        ticks.tick().await;
        let (pushes, now_unhealthy) = {
            let state = shared.state();
            (state.resync_pushes(), state.unhealthy_nodes(Moment::now()))
        };
        for node in now_unhealthy.difference(&unhealthy) {
            tracing::warn!(%node, "node missed its heartbeats; marked unhealthy");
        }
        for node in unhealthy.difference(&now_unhealthy) {
            tracing::info!(%node, "node is healthy again");
        }
        unhealthy = now_unhealthy;
        if !pushes.is_empty() {
            tracing::debug!(nodes = pushes.len(), "re-pushing desired state");
            push_all(&shared, pushes).await;
        }
    }
}
