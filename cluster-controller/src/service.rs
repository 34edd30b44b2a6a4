//! The gRPC services: `ZoneAgent` for the NCs and `ClusterController` for the CLC. Each
//! handler converts the request, asks the pure [`ZoneState`](crate::zone::ZoneState), and
//! hands the resulting plan to the executor.

use std::sync::Arc;

use canopy_pki::Role;
use canopy_proto::v1 as pb;
use canopy_proto::v1::cloud_controller_client::CloudControllerClient;
use canopy_proto::v1::cluster_controller_server::ClusterController;
use canopy_proto::v1::enrollment_server::Enrollment;
use canopy_proto::v1::zone_agent_server::ZoneAgent;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::convert;
use crate::error::CcError;
use crate::model::Moment;
use crate::nodes;
use crate::runtime::Shared;
use crate::zone::ApplyOutcome;

#[derive(Clone)]
pub(crate) struct CcService {
    pub shared: Arc<Shared>,
    /// One client per CLC replica, for image bytes (tried in order until one holds them)
    /// and joining nodes (tried until one answers).
    pub clc: Vec<CloudControllerClient<Channel>>,
    /// The replica the next snapshot upload goes to; moves on when one refuses or fails.
    pub upload_next: Arc<std::sync::atomic::AtomicUsize>,
}

pub(crate) type ImageChunks =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::ImageChunk, Status>> + Send>>;

impl CcService {
    /// Pushes in the background: the caller's reply does not wait for slow nodes, and a
    /// failed push is retried by the resync loop anyway.
    fn spawn_pushes(&self, pushes: Vec<crate::zone::NodePush>) {
        if pushes.is_empty() {
            return;
        }
        let shared = Arc::clone(&self.shared);
        tokio::spawn(async move { nodes::push_all(&shared, pushes).await });
    }
}

#[tonic::async_trait]
impl ZoneAgent for CcService {
    async fn register_node(
        &self,
        request: Request<pb::RegisterNodeRequest>,
    ) -> Result<Response<pb::RegisterNodeResponse>, Status> {
        canopy_pki::require_name(&request, Role::Node, &request.get_ref().node_id)?;
        let reg = convert::registration_from_proto(request.into_inner())?;
        let (node, endpoint) = (reg.node.clone(), reg.endpoint.clone());
        let registered = self.shared.state().register_node(reg, Moment::now());
        tracing::info!(%node, %endpoint, instances = registered.reports.len(), "node registered");
        self.shared.forward(registered.reports);
        self.spawn_pushes(registered.push.into_iter().collect());
        Ok(Response::new(pb::RegisterNodeResponse {
            zone: self.shared.zone.to_string(),
        }))
    }

    async fn node_heartbeat(
        &self,
        request: Request<pb::NodeHeartbeatRequest>,
    ) -> Result<Response<pb::NodeHeartbeatResponse>, Status> {
        canopy_pki::require_name(&request, Role::Node, &request.get_ref().node_id)?;
        let req = request.into_inner();
        let node = convert::node_id(&req.node_id)?;
        let known = self
            .shared
            .state()
            .heartbeat(&node, req.applied_generation, Moment::now());
        if !known {
            tracing::debug!(%node, "heartbeat from an unregistered node");
        }
        Ok(Response::new(pb::NodeHeartbeatResponse {
            known,
            revoked_serials: self.shared.revoked_serials(),
        }))
    }

    async fn report_instances(
        &self,
        request: Request<pb::NodeInstanceReports>,
    ) -> Result<Response<pb::ReportAck>, Status> {
        canopy_pki::require_name(&request, Role::Node, &request.get_ref().node_id)?;
        let (node, reports) = convert::node_reports_from_proto(request.into_inner())?;
        let reports = self.shared.state().observe(&node, reports, Moment::now())?;
        self.shared.forward(reports);
        Ok(Response::new(pb::ReportAck {}))
    }

    type FetchImageStream = ImageChunks;

    /// Relays image bytes from the first CLC replica that holds them (the one that imported
    /// an image always does).
    async fn fetch_image(
        &self,
        request: Request<pb::FetchImageRequest>,
    ) -> Result<Response<ImageChunks>, Status> {
        let request = request.into_inner();
        let mut last = Status::unavailable("no cloud controller endpoint configured");
        for client in &self.clc {
            match client.clone().fetch_image(request.clone()).await {
                Ok(stream) => {
                    let stream: ImageChunks = Box::pin(stream.into_inner());
                    return Ok(Response::new(stream));
                }
                Err(status) => {
                    tracing::debug!(sha256 = %request.sha256, %status, "image not from this replica");
                    last = status;
                }
            }
        }
        Err(last)
    }

    /// Relays a node's snapshot upload to a CLC replica, naming the zone in its header. A
    /// stream cannot be replayed, so a replica that refuses or fails makes the next upload
    /// go to the next replica, and the node retries. A node's stream that breaks ends the
    /// relay short, and the replica refuses it by the header's size.
    async fn upload_snapshot(
        &self,
        request: Request<SnapshotUploads>,
    ) -> Result<Response<pb::SnapshotUploadAck>, Status> {
        use pb::snapshot_upload::Part;
        use std::sync::atomic::Ordering;
        use tokio_stream::StreamExt;
        let mut incoming = request.into_inner();
        let mut header = match incoming.message().await? {
            Some(pb::SnapshotUpload {
                part: Some(Part::Header(h)),
            }) => h,
            _ => return Err(Status::invalid_argument("an upload starts with its header")),
        };
        header.zone = self.shared.zone.to_string();
        if self.clc.is_empty() {
            return Err(Status::unavailable(
                "no cloud controller endpoint configured",
            ));
        }
        let i = self.upload_next.load(Ordering::Relaxed) % self.clc.len();
        let snapshot = header.snapshot_id.clone();
        let first = pb::SnapshotUpload {
            part: Some(Part::Header(header)),
        };
        let relayed = tokio_stream::once(first).chain(incoming.map_while(Result::ok));
        match self.clc[i].clone().upload_snapshot(relayed).await {
            Ok(ack) => Ok(ack),
            Err(status) => {
                tracing::debug!(%snapshot, replica = i, %status, "snapshot upload refused; the next goes elsewhere");
                self.upload_next.store(i + 1, Ordering::Relaxed);
                Err(status)
            }
        }
    }
}

/// Joining nodes: the only service a caller without a certificate may use. The CC relays
/// the request to the CLC, which checks and spends the token and signs the certificate.
#[tonic::async_trait]
impl Enrollment for CcService {
    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let join = request.into_inner();
        convert::node_id(&join.node_id)?;
        let request = pb::JoinNodeRequest {
            zone: self.shared.zone.to_string(),
            join: Some(join),
        };
        let mut last = Status::unavailable("no cloud controller endpoint configured");
        for client in &self.clc {
            match client.clone().join_node(request.clone()).await {
                Ok(reply) => {
                    let reply = reply.into_inner();
                    tracing::info!(node = %request.join.as_ref().map_or("", |j| &j.node_id), "a node joined the zone");
                    return Ok(Response::new(reply));
                }
                // Another replica may be reachable (each forwards to the leader).
                Err(status) if status.code() == tonic::Code::Unavailable => last = status,
                Err(status) => return Err(status),
            }
        }
        Err(last)
    }
}

type SnapshotUploads = tonic::Streaming<pb::SnapshotUpload>;

#[tonic::async_trait]
impl ClusterController for CcService {
    async fn put_zone_state(
        &self,
        request: Request<pb::ZoneDesiredState>,
    ) -> Result<Response<pb::PutStateResponse>, Status> {
        let doc = convert::zone_desired_from_proto(request.into_inner())?;
        if doc.zone != self.shared.zone {
            return Err(CcError::WrongZone {
                ours: self.shared.zone.clone(),
                got: doc.zone.to_string(),
            }
            .into());
        }
        let generation = doc.generation;
        let outcome = self.shared.state().apply_desired(doc, Moment::now());
        let reply = match outcome {
            ApplyOutcome::Stale { applied } => {
                tracing::info!(generation, applied, "refused a stale zone document");
                pb::PutStateResponse {
                    applied_generation: applied,
                    stale: true,
                }
            }
            ApplyOutcome::Unchanged { applied } => pb::PutStateResponse {
                applied_generation: applied,
                stale: false,
            },
            ApplyOutcome::Applied(plan) => {
                for (instance, node) in &plan.placed {
                    tracing::info!(%instance, %node, "instance placed");
                }
                for failure in &plan.capacity_failures {
                    tracing::warn!(instance = %failure.instance, "no node can take the instance");
                }
                self.shared.forward(plan.reports);
                self.spawn_pushes(plan.pushes);
                pb::PutStateResponse {
                    applied_generation: plan.generation,
                    stale: false,
                }
            }
        };
        Ok(Response::new(reply))
    }

    async fn get_console_output(
        &self,
        request: Request<pb::ConsoleRequest>,
    ) -> Result<Response<pb::ConsoleResponse>, Status> {
        let request = request.into_inner();
        let instance = convert::instance_id(&request.instance_id)?;
        let target = self.shared.state().console_target(&instance)?;
        let reply = nodes::console_output(&self.shared, target, request, instance).await?;
        Ok(Response::new(reply))
    }
}
