//! The CLC's side of the zones: the gRPC service CCs call (registration, heartbeats,
//! reports), the live view of each zone built from heartbeats, and the reconciler that
//! pushes each zone's desired state to its CC.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use canopy_common::placement::HostSnapshot;
use canopy_common::{
    InstanceState, NodeId, PowerState, Resources, Sha256Digest, SnapshotId, ZoneName,
};
use canopy_proto::v1 as pb;
use canopy_proto::v1::cloud_controller_server::CloudController;
use canopy_proto::v1::cluster_controller_client::ClusterControllerClient;
use chrono::Utc;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::clc::Clc;
use crate::images::ImageChunks;
use crate::scheduler::ZoneSnapshot;
use crate::state::{
    AllocationGroup, Command, DesiredSpec, Observation, SnapshotOutcome, SnapshotState, StateError,
    StateReason,
};

/// What the CLC knows of a zone from its CC's heartbeats (soft state, not replicated).
#[derive(Debug, Clone)]
pub struct ZoneLive {
    pub endpoint: String,
    pub last_heartbeat: Instant,
    pub last_heartbeat_ms: i64,
    pub nodes: Vec<NodeLive>,
    pub applied_generation: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct NodeLive {
    pub node_id: NodeId,
    pub hypervisor: String,
    pub hypervisor_detail: String,
    pub capacity: Resources,
    pub allocated: Resources,
    pub healthy: bool,
    pub last_heartbeat_ms: i64,
    pub instance_count: u32,
}

#[derive(Debug, Default)]
pub struct ZoneRegistry {
    zones: std::sync::RwLock<HashMap<ZoneName, ZoneLive>>,
    /// Grows with every update, so a view built from the registry knows when it is stale.
    version: std::sync::atomic::AtomicU64,
}

impl ZoneRegistry {
    pub fn get(&self, zone: &ZoneName) -> Option<ZoneLive> {
        self.zones
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(zone)
            .cloned()
    }

    /// Changes whenever any zone's live state does.
    pub fn version(&self) -> u64 {
        self.version.load(std::sync::atomic::Ordering::Acquire)
    }

    fn update(&self, zone: &ZoneName, f: impl FnOnce(&mut ZoneLive)) {
        let mut zones = self.zones.write().unwrap_or_else(|e| e.into_inner());
        let live = zones.entry(zone.clone()).or_insert_with(|| ZoneLive {
            endpoint: String::new(),
            last_heartbeat: Instant::now(),
            last_heartbeat_ms: Utc::now().timestamp_millis(),
            nodes: Vec::new(),
            applied_generation: 0,
        });
        f(live);
        self.version
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// True when the zone's CC heartbeated within `timeout`.
    pub fn is_available(&self, zone: &ZoneName, timeout: Duration) -> bool {
        self.zones
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(zone)
            .is_some_and(|z| z.last_heartbeat.elapsed() <= timeout)
    }
}

/// A new leader knows the zones from the log but hears their CCs only once they find it
/// (within a heartbeat or two). Until every zone has reported, or `settle` has passed since
/// the leadership began, scheduling waits rather than calling the zones unavailable.
pub async fn await_zones(clc: &Clc) -> Result<(), StateError> {
    let settle = clc.config.zone_timeout.min(Duration::from_secs(3));
    loop {
        let Some(leading) = clc.leading_for() else {
            // Stepped down (or never led): its zone view is not the one that schedules.
            return Err(StateError::NotLeader { leader: None });
        };
        if leading >= settle {
            return Ok(());
        }
        let catalog = clc.store.catalog().await?;
        if catalog
            .zones
            .iter()
            .all(|z| clc.zones.is_available(z, clc.config.zone_timeout))
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Snapshots of every registered zone for the scheduler: node capacities from the CCs,
/// allocations from the CLC's own records (which include launches not yet placed).
pub fn zone_snapshots(
    clc: &Clc,
    zones: &[ZoneName],
    allocations: &[AllocationGroup],
) -> Vec<ZoneSnapshot> {
    let mut out = Vec::new();
    for zone in zones {
        let live = clc.zones.get(zone);
        let available = clc.zones.is_available(zone, clc.config.zone_timeout);
        let in_zone: Vec<&AllocationGroup> =
            allocations.iter().filter(|a| &a.zone == zone).collect();
        let hosts = live
            .map(|l| l.nodes)
            .unwrap_or_default()
            .into_iter()
            .map(|n| HostSnapshot {
                allocated: in_zone
                    .iter()
                    .filter(|a| a.node_id.as_ref() == Some(&n.node_id))
                    .map(|a| a.resources.saturating_times(a.count))
                    .sum(),
                key: n.node_id,
                capacity: n.capacity,
                healthy: n.healthy,
            })
            .collect();
        let unplaced = in_zone
            .iter()
            .filter(|a| a.node_id.is_none())
            .flat_map(|a| std::iter::repeat_n(a.resources, a.count as usize))
            .collect();
        out.push(ZoneSnapshot {
            zone: zone.clone(),
            available,
            hosts,
            unplaced,
        });
    }
    out
}

// ---------- gRPC service ----------

pub struct ZoneService {
    clc: Arc<Clc>,
    /// Serving calls another replica forwarded: never forward them again.
    forwarded: bool,
}

impl ZoneService {
    pub fn new(clc: Arc<Clc>) -> Self {
        Self {
            clc,
            forwarded: false,
        }
    }

    /// The service as the leader runs it for calls other replicas forward.
    pub fn forwarded(clc: Arc<Clc>) -> Self {
        Self {
            clc,
            forwarded: true,
        }
    }

    /// Confirms the zone's attachments under way that the reports settle: a volume being
    /// attached that its instance now has, one being detached that it no longer has.
    /// Instances the reports do not mention are left as they are.
    async fn observe_volumes(
        &self,
        zone: ZoneName,
        reported: &HashMap<canopy_common::InstanceId, Vec<canopy_common::VolumeId>>,
    ) -> Result<(), Status> {
        use crate::state::AttachStatus;
        let (may_wait, epoch) = self.clc.store.volumes_may_await_nodes();
        if !may_wait {
            return Ok(());
        }
        let pending = self
            .clc
            .store
            .pending_attachments_anywhere(&zone)
            .await
            .map_err(internal)?;
        let Some(pending) = pending else {
            // Nothing waits in any zone: skip the query until a command could change that.
            self.clc.store.volumes_settled(epoch);
            return Ok(());
        };
        let mut attached = Vec::new();
        let mut detached = Vec::new();
        for p in pending {
            let Some(has) = reported.get(&p.instance_id) else {
                continue;
            };
            let now_attached = has.contains(&p.volume_id);
            match p.status {
                AttachStatus::Attaching if now_attached => {
                    attached.push((p.volume_id, p.instance_id));
                }
                AttachStatus::Detaching if !now_attached => {
                    detached.push((p.volume_id, p.instance_id));
                }
                _ => {}
            }
        }
        if attached.is_empty() && detached.is_empty() {
            return Ok(());
        }
        self.clc
            .submit(Command::ObserveVolumes {
                zone,
                attached,
                detached,
            })
            .await
            .map_err(internal)?;
        Ok(())
    }

    /// Commits what a node's upload made of a snapshot (on the leader), and answers the
    /// snapshot's state.
    async fn complete_snapshot(
        &self,
        o: pb::SnapshotOutcome,
    ) -> Result<pb::SnapshotUploadAck, Status> {
        let snapshot_id: SnapshotId = o
            .snapshot_id
            .parse()
            .map_err(|e: canopy_common::IdError| Status::invalid_argument(e.to_string()))?;
        let outcome = if o.failure.is_empty() {
            SnapshotOutcome::Completed {
                sha256: Sha256Digest::parse(&o.sha256)
                    .map_err(|e| Status::invalid_argument(e.to_string()))?,
                size: o.size,
                disk_format: Some(o.disk_format).filter(|f| !f.is_empty()),
            }
        } else {
            SnapshotOutcome::Failed { message: o.failure }
        };
        self.clc
            .submit(Command::CompleteSnapshot {
                snapshot_id: snapshot_id.clone(),
                outcome,
                at: Utc::now(),
            })
            .await
            .map_err(internal)?;
        let state = self
            .clc
            .store
            .snapshot_state(&snapshot_id)
            .await
            .map_err(internal)?;
        Ok(pb::SnapshotUploadAck {
            state: state.map_or("deleted", SnapshotState::name).to_owned(),
        })
    }

    /// Serves a forwarded call here (see [`ZoneService::forwarded`]).
    pub async fn serve(
        &self,
        call: pb::ForwardedZoneCall,
    ) -> Result<pb::ForwardedZoneReply, Status> {
        use pb::forwarded_zone_call::Call;
        use pb::forwarded_zone_reply::Reply;
        let reply = match call.call {
            Some(Call::Register(r)) => {
                Reply::Register(self.register_zone(Request::new(r)).await?.into_inner())
            }
            Some(Call::Reports(r)) => {
                Reply::Reports(self.report_instances(Request::new(r)).await?.into_inner())
            }
            Some(Call::Snapshot(o)) => Reply::Snapshot(self.complete_snapshot(o).await?),
            Some(Call::Join(r)) => Reply::Join(self.join_node(Request::new(r)).await?.into_inner()),
            None => return Err(Status::invalid_argument("empty forwarded zone call")),
        };
        Ok(pb::ForwardedZoneReply { reply: Some(reply) })
    }

    /// Whether the caller may speak for `zone`: its certificate must be the zone's. The
    /// replica that forwarded a call checked its caller already.
    fn speaks_for_zone<T>(&self, req: &Request<T>, zone: &str) -> Result<(), Status> {
        if self.forwarded {
            return Ok(());
        }
        canopy_pki::require_name(req, canopy_pki::Role::Zone, zone)
    }

    /// On a replica that does not lead, hands the call to the leader (waiting, within the
    /// replica's bound, for one to be elected) and returns its reply; `None` when this replica
    /// should serve the call itself.
    async fn via_leader(
        &self,
        call: pb::forwarded_zone_call::Call,
    ) -> Result<Option<pb::forwarded_zone_reply::Reply>, Status> {
        if self.forwarded {
            leader_only(&self.clc)?;
            return Ok(None);
        }
        use crate::forward::Routed;
        let call = pb::ForwardedZoneCall { call: Some(call) };
        let clients = &self.clc.forward_clients;
        let routed = crate::forward::via_leader(&self.clc, |addr| {
            let call = call.clone();
            async move { clients.call_zone(&addr, call).await }
        })
        .await
        // The CC retries, or moves on to its next CLC endpoint.
        .map_err(|e| Status::unavailable(e.to_string()))?;
        match routed {
            Routed::Here => Ok(None),
            Routed::Leader(reply) => reply
                .reply
                .map(Some)
                .ok_or_else(|| Status::internal("the leader sent an empty reply")),
        }
    }
}

/// The reply of the kind the call asked for.
fn expect_reply<T>(
    reply: pb::forwarded_zone_reply::Reply,
    pick: impl FnOnce(pb::forwarded_zone_reply::Reply) -> Option<T>,
) -> Result<T, Status> {
    pick(reply).ok_or_else(|| Status::internal("the leader answered another call"))
}

fn internal(e: StateError) -> Status {
    match e {
        // The CC moves on to the next CLC endpoint on UNAVAILABLE.
        StateError::NotLeader { .. } | StateError::Unavailable(_) => {
            Status::unavailable(e.to_string())
        }
        e => {
            tracing::error!(error = %e, "state error in zone service");
            Status::internal("internal error")
        }
    }
}

/// Only the leader serves the CCs: its view of the zones is the one that schedules, and it
/// alone can commit what they report. Others forward the CC's calls to it.
fn leader_only(clc: &Clc) -> Result<(), Status> {
    if clc.replica.is_leader() {
        return Ok(());
    }
    let leader = clc
        .replica
        .leader()
        .map(|(id, node)| format!("replica {id} at {}", node.addr))
        .unwrap_or_else(|| "unknown".into());
    Err(Status::unavailable(format!(
        "this cloud controller replica is not the leader (leader: {leader})"
    )))
}

fn parse_zone(s: &str) -> Result<ZoneName, Status> {
    ZoneName::parse(s).map_err(|e| Status::invalid_argument(e.to_string()))
}

#[tonic::async_trait]
impl CloudController for ZoneService {
    async fn register_zone(
        &self,
        req: Request<pb::RegisterZoneRequest>,
    ) -> Result<Response<pb::RegisterZoneResponse>, Status> {
        use pb::forwarded_zone_reply::Reply;
        self.speaks_for_zone(&req, &req.get_ref().zone)?;
        if let Some(reply) = self
            .via_leader(pb::forwarded_zone_call::Call::Register(
                req.get_ref().clone(),
            ))
            .await?
        {
            let r = expect_reply(reply, |r| match r {
                Reply::Register(r) => Some(r),
                _ => None,
            })?;
            return Ok(Response::new(r));
        }
        let req = req.into_inner();
        let zone = parse_zone(&req.zone)?;
        if !(req.endpoint.starts_with("http://") || req.endpoint.starts_with("https://")) {
            return Err(Status::invalid_argument("endpoint must be an http(s) URL"));
        }
        let known = self.clc.store.zones().await.map_err(internal)?;
        if !known
            .iter()
            .any(|z| z.zone == zone && z.endpoint == req.endpoint)
        {
            self.clc
                .submit(Command::RegisterZone {
                    zone: zone.clone(),
                    endpoint: req.endpoint.clone(),
                    at: Utc::now(),
                })
                .await
                .map_err(internal)?;
        }
        self.clc.zones.update(&zone, |z| {
            z.endpoint = req.endpoint;
            z.last_heartbeat = Instant::now();
            z.last_heartbeat_ms = Utc::now().timestamp_millis();
            z.applied_generation = 0;
        });
        tracing::info!(%zone, "zone registered");
        self.clc.changed.notify_one();
        Ok(Response::new(pb::RegisterZoneResponse {
            region: self.clc.config.region.to_string(),
        }))
    }

    async fn zone_heartbeat(
        &self,
        req: Request<pb::ZoneHeartbeatRequest>,
    ) -> Result<Response<pb::ZoneHeartbeatResponse>, Status> {
        // Heartbeats are not forwarded: CCs send them to every replica, so each keeps its own
        // view of the zones, and a new leader schedules at once instead of waiting for the
        // CCs to find it. Only the leader's answer can say the zone is unknown (a follower
        // may simply not have applied the registration yet).
        self.speaks_for_zone(&req, &req.get_ref().zone)?;
        let leader = self.clc.replica.is_leader();
        let req = req.into_inner();
        let zone = parse_zone(&req.zone)?;
        let stored = self.clc.store.zones().await.map_err(internal)?;
        let Some(stored) = stored.into_iter().find(|z| z.zone == zone) else {
            return Ok(Response::new(pb::ZoneHeartbeatResponse {
                known: !leader,
                leader,
                revoked_serials: self.clc.config.transport.revocations().list(),
            }));
        };
        let nodes = req.nodes.into_iter().filter_map(node_from_proto).collect();
        self.clc.zones.update(&zone, |z| {
            z.endpoint = req.endpoint;
            z.last_heartbeat = Instant::now();
            z.last_heartbeat_ms = Utc::now().timestamp_millis();
            z.nodes = nodes;
            z.applied_generation = req.applied_generation;
        });
        if leader && req.applied_generation < stored.generation {
            self.clc.changed.notify_one();
        }
        Ok(Response::new(pb::ZoneHeartbeatResponse {
            known: true,
            leader,
            revoked_serials: self.clc.config.transport.revocations().list(),
        }))
    }

    async fn report_instances(
        &self,
        req: Request<pb::ZoneInstanceReports>,
    ) -> Result<Response<pb::ReportAck>, Status> {
        use pb::forwarded_zone_reply::Reply;
        self.speaks_for_zone(&req, &req.get_ref().zone)?;
        if let Some(reply) = self
            .via_leader(pb::forwarded_zone_call::Call::Reports(
                req.get_ref().clone(),
            ))
            .await?
        {
            let r = expect_reply(reply, |r| match r {
                Reply::Reports(r) => Some(r),
                _ => None,
            })?;
            return Ok(Response::new(r));
        }
        let req = req.into_inner();
        let zone = parse_zone(&req.zone)?;
        let mut observations = Vec::new();
        // What each reported instance has attached, by instance.
        let mut attached: HashMap<canopy_common::InstanceId, Vec<canopy_common::VolumeId>> =
            HashMap::new();
        for r in req.reports {
            let Some(state) = state_from_proto(r.state()) else {
                continue;
            };
            let Ok(instance_id) = r.instance_id.parse::<canopy_common::InstanceId>() else {
                return Err(Status::invalid_argument(format!(
                    "malformed instance id {:?}",
                    r.instance_id
                )));
            };
            let node_id = if r.node_id.is_empty() {
                None
            } else {
                Some(
                    NodeId::parse(&r.node_id)
                        .map_err(|e| Status::invalid_argument(e.to_string()))?,
                )
            };
            let reason = (!r.reason_code.is_empty()).then(|| StateReason {
                message: if r.reason_message.is_empty() {
                    r.reason_code.clone()
                } else {
                    format!("{}: {}", r.reason_code, r.reason_message)
                },
                code: r.reason_code,
            });
            let private_ip = if r.private_ip.is_empty() {
                None
            } else {
                Some(r.private_ip.parse().map_err(|_| {
                    Status::invalid_argument(format!("malformed private_ip {:?}", r.private_ip))
                })?)
            };
            let volumes = canopy_proto::convert::volume_ids_from_proto(r.volumes)
                .map_err(Status::invalid_argument)?;
            attached.insert(instance_id.clone(), volumes);
            observations.push(Observation {
                instance_id,
                node_id,
                state,
                reason,
                private_ip,
            });
        }
        // Periodic full reports repeat what we know: only what differs goes to the log.
        let ids: Vec<_> = observations.iter().map(|o| o.instance_id.clone()).collect();
        let known = self.clc.store.whereabouts(&ids).await.map_err(internal)?;
        observations.retain(|o| {
            known.get(&o.instance_id).is_some_and(|i| {
                i.zone == zone
                    && (i.state != o.state
                        || (o.node_id.is_some() && o.node_id != i.node_id)
                        || (o.private_ip.is_some() && o.private_ip != i.private_ip))
            })
        });
        if !observations.is_empty() {
            self.clc
                .submit(Command::ObserveInstances {
                    zone: zone.clone(),
                    observations,
                    at: Utc::now(),
                })
                .await
                .map_err(internal)?;
        }
        self.observe_volumes(zone, &attached).await?;
        Ok(Response::new(pb::ReportAck {}))
    }

    /// A snapshot's bytes from a node: stored in this replica's image store (hashed while
    /// written, fsynced, renamed into place), then the leader commits the snapshot completed
    /// (a follower forwards the outcome). A node that failed to copy the volume sends only a
    /// header with the failure: the snapshot ends in `error`. Anything that breaks the
    /// upload itself is an error for the node to retry; the snapshot stays pending.
    async fn upload_snapshot(
        &self,
        req: Request<Uploads>,
    ) -> Result<Response<pb::SnapshotUploadAck>, Status> {
        use pb::snapshot_upload::Part;
        use tokio_stream::StreamExt;
        let mut uploads = req.into_inner();
        let header = match uploads.message().await? {
            Some(pb::SnapshotUpload {
                part: Some(Part::Header(h)),
            }) => h,
            _ => return Err(Status::invalid_argument("an upload starts with its header")),
        };
        let snapshot_id: SnapshotId = header
            .snapshot_id
            .parse()
            .map_err(|e: canopy_common::IdError| Status::invalid_argument(e.to_string()))?;
        match self
            .clc
            .store
            .snapshot_state(&snapshot_id)
            .await
            .map_err(internal)?
        {
            Some(SnapshotState::Pending) => {}
            Some(state) => {
                // Completed by an earlier upload: the bytes are not needed again.
                return Ok(Response::new(pb::SnapshotUploadAck {
                    state: state.name().to_owned(),
                }));
            }
            // Deleted, or not yet applied on this replica: the node tries again while its
            // document lists the snapshot.
            None => {
                return Err(Status::unavailable(format!(
                    "snapshot {snapshot_id} is not known here"
                )));
            }
        }
        let mut outcome = pb::SnapshotOutcome {
            snapshot_id: snapshot_id.to_string(),
            failure: header.failure.clone(),
            ..Default::default()
        };
        if header.failure.is_empty() {
            let bytes = uploads.map(|m| match m {
                Ok(pb::SnapshotUpload {
                    part: Some(Part::Chunk(data)),
                }) => Ok(data),
                Ok(_) => Err("a second header in the upload".to_owned()),
                Err(status) => Err(status.message().to_owned()),
            });
            let imported = self
                .clc
                .images
                .import_stream(Box::pin(bytes))
                .await
                .map_err(|e| Status::aborted(format!("snapshot {snapshot_id}: {e}")))?;
            if imported.size != header.size {
                // Cut off mid-stream (a relay that broke): the bytes are not the copy.
                return Err(Status::aborted(format!(
                    "snapshot {snapshot_id}: the upload ended after {} of {} bytes",
                    imported.size, header.size
                )));
            }
            tracing::info!(snapshot = %snapshot_id, volume = %header.volume_id, instance = %header.instance_id, node = %header.node_id, sha256 = %imported.sha256, size = imported.size, "snapshot bytes stored");
            outcome.sha256 = imported.sha256.to_string();
            outcome.size = imported.size;
            outcome.disk_format = imported.disk_format.unwrap_or_default().to_owned();
        } else {
            tracing::warn!(snapshot = %snapshot_id, volume = %header.volume_id, instance = %header.instance_id, node = %header.node_id, failure = %header.failure, "a node could not take the snapshot");
        }
        use pb::forwarded_zone_reply::Reply;
        if let Some(reply) = self
            .via_leader(pb::forwarded_zone_call::Call::Snapshot(outcome.clone()))
            .await?
        {
            let r = expect_reply(reply, |r| match r {
                Reply::Snapshot(r) => Some(r),
                _ => None,
            })?;
            return Ok(Response::new(r));
        }
        Ok(Response::new(self.complete_snapshot(outcome).await?))
    }

    /// A node joining through its zone's CC: the token is checked here (its secret against
    /// the stored hash), the certificate signed with the cloud CA, and the token spent in
    /// the same commit that records the certificate; a token raced by two nodes is spent
    /// by one, and the other's certificate is never handed out.
    async fn join_node(
        &self,
        req: Request<pb::JoinNodeRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        use pb::forwarded_zone_reply::Reply;
        self.speaks_for_zone(&req, &req.get_ref().zone)?;
        if let Some(reply) = self
            .via_leader(pb::forwarded_zone_call::Call::Join(req.get_ref().clone()))
            .await?
        {
            let r = expect_reply(reply, |r| match r {
                Reply::Join(r) => Some(r),
                _ => None,
            })?;
            return Ok(Response::new(r));
        }
        let req = req.into_inner();
        let zone = parse_zone(&req.zone)?;
        let join = req
            .join
            .ok_or_else(|| Status::invalid_argument("join: missing"))?;
        let node =
            NodeId::parse(&join.node_id).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let ca = self.clc.config.ca.as_ref().ok_or_else(|| {
            Status::failed_precondition(
                "this cloud controller holds no CA key (ca.key in its TLS directory), so it cannot sign certificates for joining nodes",
            )
        })?;
        // An unknown id and a wrong secret get the same answer.
        let token = self
            .clc
            .store
            .join_token(&join.token_id)
            .await
            .map_err(internal)?;
        if !token.is_some_and(|t| canopy_pki::secret_matches(&join.token_secret, &t.secret_hash)) {
            return Err(Status::permission_denied("invalid join token"));
        }
        let identity = canopy_pki::Identity::new(canopy_pki::Role::Node, node.as_str())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let issued = ca
            .sign_request(&join.csr_pem, &identity, &[])
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.clc
            .submit(Command::EnrollNode {
                token_id: join.token_id,
                node_id: node.clone(),
                zone: zone.clone(),
                serial: issued.serial.clone(),
                at: Utc::now(),
            })
            .await
            .map_err(|e| match e {
                StateError::JoinRefused(m) => Status::permission_denied(m),
                e => internal(e),
            })?;
        tracing::info!(%node, %zone, serial = %issued.serial, "a node joined");
        Ok(Response::new(pb::JoinResponse {
            certificate_pem: issued.cert_pem,
            ca_pem: ca.cert_pem().to_owned(),
            zone: zone.to_string(),
        }))
    }

    type FetchImageStream = ImageChunks;

    /// Image bytes in 1 MiB chunks: this replica's copy, or, while it has none yet (its copy
    /// from a peer still to come), a peer's, relayed. NOT_FOUND when no replica it reaches
    /// holds them (the CC asks the next replica).
    async fn fetch_image(
        &self,
        req: Request<pb::FetchImageRequest>,
    ) -> Result<Response<ImageChunks>, Status> {
        let status = match self.clc.images.chunks(&req.get_ref().sha256).await {
            Ok(chunks) => return Ok(Response::new(chunks)),
            Err(status) => status,
        };
        if status.code() != tonic::Code::NotFound {
            return Err(status);
        }
        let digest = canopy_common::Sha256Digest::parse(&req.get_ref().sha256)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        match self.clc.blob_peers.open(&digest).await {
            Some(chunks) => Ok(Response::new(chunks)),
            None => Err(status),
        }
    }
}

type Uploads = tonic::Streaming<pb::SnapshotUpload>;

fn node_from_proto(n: pb::NodeSummary) -> Option<NodeLive> {
    let res = |r: Option<pb::Resources>| {
        r.map(|r| Resources::new(r.vcpus, r.memory_mib, r.disk_gib))
            .unwrap_or_default()
    };
    Some(NodeLive {
        node_id: NodeId::parse(&n.node_id).ok()?,
        hypervisor: n.hypervisor,
        hypervisor_detail: n.hypervisor_detail,
        capacity: res(n.capacity),
        allocated: res(n.allocated),
        healthy: n.healthy,
        last_heartbeat_ms: n.last_heartbeat_ms,
        instance_count: n.instance_count,
    })
}

fn state_from_proto(s: pb::ObservedState) -> Option<InstanceState> {
    Some(match s {
        pb::ObservedState::Unspecified => return None,
        pb::ObservedState::Pending => InstanceState::Pending,
        pb::ObservedState::Running => InstanceState::Running,
        pb::ObservedState::Stopping => InstanceState::Stopping,
        pb::ObservedState::Stopped => InstanceState::Stopped,
        pb::ObservedState::ShuttingDown => InstanceState::ShuttingDown,
        pb::ObservedState::Terminated => InstanceState::Terminated,
    })
}

fn spec_to_proto(i: &DesiredSpec, region: &str) -> pb::InstanceSpec {
    let mut spec = pb::InstanceSpec {
        instance_id: i.instance_id.to_string(),
        instance_type: i.instance_type.clone(),
        resources: Some(pb::Resources {
            vcpus: i.resources.vcpus,
            memory_mib: i.resources.memory_mib,
            disk_gib: i.resources.disk_gib,
        }),
        image_id: i.image_id.to_string(),
        user_data: i.user_data.clone().unwrap_or_default(),
        key_name: i.key_name.clone().unwrap_or_default(),
        desired: match i.desired {
            PowerState::Running => pb::PowerState::Running,
            PowerState::Stopped => pb::PowerState::Stopped,
            PowerState::Terminated => pb::PowerState::Terminated,
        } as i32,
        reboot_seq: i.reboot_seq,
        start_seq: i.start_seq,
        private_ip: i.private_ip.map(|ip| ip.to_string()).unwrap_or_default(),
        metadata: Some(canopy_proto::convert::metadata_to_proto(
            &canopy_common::InstanceMetadata {
                region: region.to_owned(),
                ..i.metadata.clone()
            },
        )),
        node_id: i
            .node_id
            .as_ref()
            .map(|n| n.to_string())
            .unwrap_or_default(),
        volumes: canopy_proto::convert::volumes_to_proto(&i.volumes),
        ..Default::default()
    };
    canopy_proto::convert::boot_to_proto(&i.boot, &mut spec);
    spec
}

// ---------- clients to the CCs ----------

/// Lazily connected clients, one per CC endpoint.
pub struct CcClients {
    clients: std::sync::Mutex<HashMap<String, ClusterControllerClient<Channel>>>,
    transport: canopy_pki::Transport,
}

impl CcClients {
    pub fn new(transport: canopy_pki::Transport) -> Self {
        Self {
            clients: Default::default(),
            transport,
        }
    }

    pub fn get(&self, endpoint: &str) -> Result<ClusterControllerClient<Channel>, String> {
        let mut map = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = map.get(endpoint) {
            return Ok(c.clone());
        }
        let channel = self.transport.channel(
            Channel::from_shared(endpoint.to_owned())
                .map_err(|e| e.to_string())?
                .connect_timeout(Duration::from_secs(2))
                .timeout(Duration::from_secs(5)),
            canopy_pki::Role::Zone,
        );
        let client = ClusterControllerClient::new(channel);
        map.insert(endpoint.to_owned(), client.clone());
        Ok(client)
    }
}

/// The shortest pause between two pushes of a zone's desired state.
/// How long the zone's documents name a deleted volume, for nodes to remove its bytes. A
/// node away for longer keeps the file (it is never attached again).
const DELETED_VOLUMES_KEPT: chrono::TimeDelta = chrono::TimeDelta::hours(24);

const MIN_PUSH_INTERVAL: Duration = Duration::from_millis(50);
/// The pause after a round of pushes is at least this many times the round's own duration:
/// a document costs O(instances) to read, build, send and apply (the CC answers once it has
/// applied it), so big zones are pushed less often and the cost stays a bounded share of the
/// CPU until documents become deltas.
const PUSH_PAUSE_FACTOR: u32 = 8;

/// Pushes each zone's desired state when it changes (at most every `MIN_PUSH_INTERVAL`),
/// and every `resync_interval` anyway.
pub async fn run_reconciler(clc: Arc<Clc>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let mut pushed: HashMap<ZoneName, u64> = HashMap::new();
    let mut last_full = Instant::now();
    loop {
        let full = last_full.elapsed() >= clc.config.resync_interval;
        if full {
            last_full = Instant::now();
        }
        // Only the leader pushes, and only what is committed (the state machine holds
        // nothing else), so no node starts an instance for an entry that could be lost.
        let mut pause = MIN_PUSH_INTERVAL;
        if clc.replica.is_leader() {
            let started = Instant::now();
            if let Err(e) = reconcile_once(&clc, &mut pushed, full).await {
                tracing::warn!(error = %e, "zone reconcile failed");
            }
            pause = pause
                .max(started.elapsed() * PUSH_PAUSE_FACTOR)
                .min(clc.config.resync_interval);
        } else {
            // A leader again later pushes everything afresh.
            pushed.clear();
        }
        // A document is the zone's whole desired state, so pushing it on every applied
        // command would cost O(instances) per command in all three tiers. Pausing lets a
        // burst of commands ride on one push; the Notify permit keeps the wake-up.
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.changed() => return,
        }
        tokio::select! {
            _ = clc.changed.notified() => {}
            _ = tokio::time::sleep(clc.config.resync_interval) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Pushes what changed (everything when `full`).
async fn reconcile_once(
    clc: &Clc,
    pushed: &mut HashMap<ZoneName, u64>,
    full: bool,
) -> Result<(), StateError> {
    for zone in clc.store.zones().await? {
        let live = clc.zones.get(&zone.zone);
        let behind = live
            .as_ref()
            .is_some_and(|l| l.applied_generation < zone.generation);
        if !full && !behind && pushed.get(&zone.zone) == Some(&zone.generation) {
            continue;
        }
        let endpoint = live
            .map(|l| l.endpoint)
            .filter(|e| !e.is_empty())
            .unwrap_or(zone.endpoint.clone());
        let instances = clc.store.desired_specs(&zone.zone).await?;
        let deleted = clc
            .store
            .deleted_volumes(&zone.zone, Utc::now() - DELETED_VOLUMES_KEPT)
            .await?;
        let snapshots = clc.store.pending_snapshots(&zone.zone).await?;
        let doc = pb::ZoneDesiredState {
            zone: zone.zone.to_string(),
            generation: zone.generation,
            instances: instances
                .iter()
                .map(|i| spec_to_proto(i, clc.config.region.as_str()))
                .collect(),
            deleted_volumes: canopy_proto::convert::volume_ids_to_proto(&deleted),
            snapshots: canopy_proto::convert::snapshot_requests_to_proto(&snapshots),
        };
        let mut client = match clc.cc_clients.get(&endpoint) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(zone = %zone.zone, %endpoint, error = %e, "bad CC endpoint");
                continue;
            }
        };
        match client.put_zone_state(doc).await {
            Ok(resp) => {
                let resp = resp.into_inner();
                if resp.stale {
                    tracing::warn!(zone = %zone.zone, ours = zone.generation, theirs = resp.applied_generation, "CC holds a newer generation than the CLC");
                }
                pushed.insert(zone.zone.clone(), zone.generation);
            }
            Err(status) => {
                tracing::debug!(zone = %zone.zone, %status, "push to CC failed; will retry");
                pushed.remove(&zone.zone);
            }
        }
    }
    Ok(())
}

/// Forgets terminated instances past their retention, once a minute.
pub async fn run_purger(clc: Arc<Clc>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
            _ = shutdown.changed() => return,
        }
        // Every replica drops the image bytes its committed state no longer needs. Files
        // younger than an import's commit could take are kept: their row may be on its way.
        match clc.store.referenced_image_digests().await {
            Ok(keep) => {
                clc.images
                    .remove_unreferenced(&keep, Duration::from_secs(600));
            }
            Err(e) => tracing::warn!(error = %e, "cannot list the image bytes in use"),
        }
        if !clc.replica.is_leader() {
            continue;
        }
        let retention = chrono::Duration::from_std(clc.config.terminated_retention)
            .unwrap_or(chrono::Duration::hours(1));
        if let Err(e) = clc
            .submit(Command::PurgeTerminated {
                before: Utc::now() - retention,
            })
            .await
        {
            tracing::warn!(error = %e, "purging terminated instances failed");
        }
    }
}
