//! The `NodeController` gRPC service: the only place that sees `tonic::Status`.

use std::sync::Arc;

use canopy_proto::v1 as pb;
use canopy_proto::v1::node_controller_server::{NodeController, NodeControllerServer};
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tracing::{error, warn};

use crate::agent::{Agent, stopped};
use crate::convert;
use crate::error::{HypervisorError, NcError};

/// EC2's GetConsoleOutput returns at most the last 64 KiB of output.
const CONSOLE_OUTPUT_LIMIT: usize = 64 * 1024;

/// Maps the crate's error to a gRPC status. Internal detail goes to the log; the CC gets a
/// code it can act on.
impl From<NcError> for Status {
    fn from(error: NcError) -> Status {
        match &error {
            NcError::InvalidArgument(message) => Status::invalid_argument(message.clone()),
            NcError::WrongNode { .. } => Status::failed_precondition(error.to_string()),
            NcError::Hypervisor(HypervisorError::NotFound(id)) => {
                Status::not_found(format!("instance {id} is not on this node"))
            }
            NcError::Hypervisor(HypervisorError::InvalidState { .. }) => {
                Status::failed_precondition(error.to_string())
            }
            NcError::Hypervisor(_) | NcError::Config(_) | NcError::Bind { .. } => {
                error!(%error, "request failed");
                Status::internal("internal error on the node controller")
            }
        }
    }
}

struct NodeService {
    agent: Arc<Agent>,
}

#[tonic::async_trait]
impl NodeController for NodeService {
    async fn put_node_state(
        &self,
        request: Request<pb::NodeDesiredState>,
    ) -> Result<Response<pb::PutStateResponse>, Status> {
        let (node, doc) = convert::desired_state_from_proto(request.into_inner())?;
        // An empty node id is accepted: the document reached this node's endpoint.
        if let Some(node) = node
            && &node != self.agent.node_id()
        {
            warn!(%node, "desired state for another node refused");
            return Err(NcError::WrongNode {
                ours: self.agent.node_id().to_string(),
                got: node.to_string(),
            }
            .into());
        }
        let outcome = self.agent.put_desired(doc);
        Ok(Response::new(pb::PutStateResponse {
            applied_generation: outcome.applied_generation,
            stale: outcome.stale,
        }))
    }

    async fn get_console_output(
        &self,
        request: Request<pb::ConsoleRequest>,
    ) -> Result<Response<pb::ConsoleResponse>, Status> {
        let id = convert::instance_id(&request.get_ref().instance_id)?;
        let mut output = self.agent.console(&id).await?;
        if output.len() > CONSOLE_OUTPUT_LIMIT {
            output.drain(..output.len() - CONSOLE_OUTPUT_LIMIT);
        }
        Ok(Response::new(pb::ConsoleResponse {
            output,
            timestamp_ms: chrono::Utc::now().timestamp_millis(),
        }))
    }
}

/// Serves `NodeController` on `listener` until shutdown is requested.
pub(crate) async fn serve(
    agent: Arc<Agent>,
    incoming: tokio_stream::wrappers::ReceiverStream<std::io::Result<canopy_pki::Conn>>,
    authorize: canopy_pki::Authorize,
    mut shutdown: watch::Receiver<bool>,
) {
    let service = NodeControllerServer::with_interceptor(NodeService { agent }, authorize);
    let result = tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, async move {
            stopped(&mut shutdown).await;
        })
        .await;
    if let Err(e) = result {
        error!(error = %e, "node controller gRPC server failed");
    }
}
