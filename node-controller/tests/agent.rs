//! The node agent against a fake cluster controller: a `ZoneAgent` gRPC server in this
//! test that records registrations, heartbeats and reports. Everything binds port 0.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use canopy_common::{InstanceId, NodeId, Resources};
use canopy_node_controller::{
    DomainSpec, Hypervisor, HypervisorKind, NcConfig, NodeHandle, SimConfig, SimHypervisor,
};
use canopy_proto::v1 as pb;
use canopy_proto::v1::node_controller_client::NodeControllerClient;
use canopy_proto::v1::zone_agent_server::{ZoneAgent, ZoneAgentServer};
use pb::ObservedState as O;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

const NODE: &str = "node-1";
const AMI: &str = "ami-0123456789abcdef0";
const WAIT: Duration = Duration::from_secs(10);

// ---------- the fake CC ----------

#[derive(Default)]
struct CcState {
    registrations: Vec<pb::RegisterNodeRequest>,
    heartbeats: usize,
    /// Every report received, in order.
    reports: Vec<pb::InstanceReport>,
    known: HashSet<String>,
    /// Image bytes it relays, by sha256.
    images: std::collections::HashMap<String, Vec<u8>>,
    /// Snapshot uploads received: the header and the bytes.
    uploads: Vec<(pb::SnapshotUploadHeader, Vec<u8>)>,
}

#[derive(Clone, Default)]
struct FakeCc {
    state: Arc<Mutex<CcState>>,
}

#[tonic::async_trait]
impl ZoneAgent for FakeCc {
    async fn register_node(
        &self,
        request: Request<pb::RegisterNodeRequest>,
    ) -> Result<Response<pb::RegisterNodeResponse>, Status> {
        let mut state = self.state.lock().unwrap();
        let request = request.into_inner();
        state.known.insert(request.node_id.clone());
        state.registrations.push(request);
        Ok(Response::new(pb::RegisterNodeResponse {
            zone: "canopy-1a".into(),
        }))
    }

    async fn node_heartbeat(
        &self,
        request: Request<pb::NodeHeartbeatRequest>,
    ) -> Result<Response<pb::NodeHeartbeatResponse>, Status> {
        let mut state = self.state.lock().unwrap();
        state.heartbeats += 1;
        let known = state.known.contains(&request.get_ref().node_id);
        Ok(Response::new(pb::NodeHeartbeatResponse {
            known,
            revoked_serials: Vec::new(),
        }))
    }

    async fn report_instances(
        &self,
        request: Request<pb::NodeInstanceReports>,
    ) -> Result<Response<pb::ReportAck>, Status> {
        let request = request.into_inner();
        assert_eq!(request.node_id, NODE);
        self.state.lock().unwrap().reports.extend(request.reports);
        Ok(Response::new(pb::ReportAck {}))
    }

    type FetchImageStream =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::ImageChunk, Status>> + Send>>;

    async fn fetch_image(
        &self,
        request: Request<pb::FetchImageRequest>,
    ) -> Result<Response<Self::FetchImageStream>, Status> {
        let sha = request.into_inner().sha256;
        let bytes = self.state.lock().unwrap().images.get(&sha).cloned();
        let bytes = bytes.ok_or_else(|| Status::not_found(format!("no image {sha}")))?;
        let chunks: Vec<Result<pb::ImageChunk, Status>> = bytes
            .chunks(5)
            .map(|c| Ok(pb::ImageChunk { data: c.to_vec() }))
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }

    async fn upload_snapshot(
        &self,
        request: Request<tonic::Streaming<pb::SnapshotUpload>>,
    ) -> Result<Response<pb::SnapshotUploadAck>, Status> {
        use pb::snapshot_upload::Part;
        let mut parts = request.into_inner();
        let Some(pb::SnapshotUpload {
            part: Some(Part::Header(header)),
        }) = parts.message().await?
        else {
            return Err(Status::invalid_argument("no header"));
        };
        let mut bytes = Vec::new();
        while let Some(part) = parts.message().await? {
            match part.part {
                Some(Part::Chunk(data)) => {
                    assert!(data.len() <= 1 << 20, "chunks of at most 1 MiB");
                    bytes.extend(data);
                }
                _ => return Err(Status::invalid_argument("a second header")),
            }
        }
        let state = if header.failure.is_empty() {
            "completed"
        } else {
            "error"
        };
        self.state.lock().unwrap().uploads.push((header, bytes));
        Ok(Response::new(pb::SnapshotUploadAck {
            state: state.into(),
        }))
    }
}

impl FakeCc {
    async fn serve(listener: TcpListener) -> FakeCc {
        let cc = FakeCc::default();
        let service = ZoneAgentServer::new(cc.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        cc
    }

    async fn start() -> (FakeCc, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        (FakeCc::serve(listener).await, addr)
    }

    /// Polls until `f` finds what it looks for.
    async fn wait_for<T>(&self, what: &str, mut f: impl FnMut(&CcState) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(found) = f(&self.state.lock().unwrap()) {
                return found;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn wait_registrations(&self, n: usize) -> pb::RegisterNodeRequest {
        self.wait_for(&format!("{n} registrations"), |s| {
            s.registrations.get(n - 1).cloned()
        })
        .await
    }

    async fn wait_report(&self, id: &InstanceId, state: O) -> pb::InstanceReport {
        self.wait_for(&format!("{id} {state:?}"), |s| {
            s.reports
                .iter()
                .find(|r| r.instance_id == id.as_str() && r.state == state as i32)
                .cloned()
        })
        .await
    }

    /// The states reported for `id`, repeats collapsed.
    fn states(&self, id: &InstanceId) -> Vec<O> {
        let mut states: Vec<O> = self
            .state
            .lock()
            .unwrap()
            .reports
            .iter()
            .filter(|r| r.instance_id == id.as_str())
            .map(|r| O::try_from(r.state).unwrap())
            .collect();
        states.dedup();
        states
    }

    fn forget(&self, node: &str) {
        self.state.lock().unwrap().known.remove(node);
    }
}

// ---------- the node under test ----------

fn sim() -> Arc<SimHypervisor> {
    Arc::new(SimHypervisor::new(SimConfig {
        capacity: Resources::new(8, 16384, 200),
        boot_delay: Duration::from_millis(100),
        shutdown_delay: Duration::from_millis(100),
        kind: HypervisorKind::Sim,
    }))
}

fn config(cc: SocketAddr) -> NcConfig {
    let mut config = NcConfig::new(
        NodeId::parse(NODE).unwrap(),
        "127.0.0.1:0".parse().unwrap(),
        format!("http://{cc}"),
    );
    config.heartbeat_interval = Duration::from_millis(50);
    config.resync_interval = Duration::from_millis(200);
    config.stop_timeout = Duration::from_secs(5);
    config
}

async fn start_nc(
    config: NcConfig,
    sim: &Arc<SimHypervisor>,
) -> (NodeHandle, NodeControllerClient<Channel>) {
    let nc = canopy_node_controller::start(config, sim.clone() as Arc<dyn Hypervisor>)
        .await
        .unwrap();
    let client = NodeControllerClient::connect(format!("http://{}", nc.local_addr()))
        .await
        .unwrap();
    (nc, client)
}

struct Harness {
    cc: FakeCc,
    cc_addr: SocketAddr,
    sim: Arc<SimHypervisor>,
    nc: NodeHandle,
    client: NodeControllerClient<Channel>,
}

impl Harness {
    async fn start() -> Harness {
        Self::with(sim(), |_| {}).await
    }

    async fn with(sim: Arc<SimHypervisor>, tweak: impl FnOnce(&mut NcConfig)) -> Harness {
        let (cc, cc_addr) = FakeCc::start().await;
        let mut config = config(cc_addr);
        tweak(&mut config);
        let (nc, client) = start_nc(config, &sim).await;
        cc.wait_registrations(1).await;
        Harness {
            cc,
            cc_addr,
            sim,
            nc,
            client,
        }
    }

    async fn put(
        &mut self,
        generation: u64,
        instances: Vec<pb::InstanceSpec>,
    ) -> pb::PutStateResponse {
        put(&mut self.client, generation, instances).await
    }

    async fn domain(&self, id: &InstanceId) -> Option<canopy_node_controller::DomainState> {
        self.sim.state(id).await.unwrap()
    }

    async fn console(&self, id: &InstanceId) -> String {
        String::from_utf8(self.sim.console(id).await.unwrap()).unwrap()
    }
}

async fn put(
    client: &mut NodeControllerClient<Channel>,
    generation: u64,
    instances: Vec<pb::InstanceSpec>,
) -> pb::PutStateResponse {
    client
        .put_node_state(pb::NodeDesiredState {
            node_id: NODE.into(),
            generation,
            instances,
            deleted_volumes: vec![],
            snapshots: vec![],
        })
        .await
        .unwrap()
        .into_inner()
}

fn spec(id: &InstanceId, desired: pb::PowerState, reboot_seq: u64) -> pb::InstanceSpec {
    pb::InstanceSpec {
        instance_id: id.to_string(),
        instance_type: "t2.micro".into(),
        resources: Some(pb::Resources {
            vcpus: 1,
            memory_mib: 1024,
            disk_gib: 8,
        }),
        image_id: AMI.into(),
        user_data: b"#cloud-config\n".to_vec(),
        key_name: "k".into(),
        desired: desired as i32,
        reboot_seq,
        node_id: NODE.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn images_are_fetched_through_the_cc_into_the_verified_cache() {
    use canopy_common::{ImageKind, ImageRef, Sha256Digest};
    use canopy_node_controller::image_cache::ImageCache;
    use canopy_node_controller::image_fetch::CcImageFetcher;
    use sha2::Digest;
    let (cc, addr) = FakeCc::start().await;
    let bytes: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
    let digest: [u8; 32] = sha2::Sha256::digest(&bytes).into();
    let image = ImageRef {
        image_id: ImageKind::Kernel.generate_id(),
        sha256: Sha256Digest::from_bytes(&digest),
        size: bytes.len() as u64,
    };
    cc.state
        .lock()
        .unwrap()
        .images
        .insert(image.sha256.to_string(), bytes.clone());
    let dir = tempfile::tempdir().unwrap();
    let cache = ImageCache::open(dir.path(), 1 << 20).unwrap();
    let fetcher = CcImageFetcher::new(&format!("http://{addr}"), &Default::default()).unwrap();
    let path = cache
        .ensure(&image, &fetcher, &Default::default())
        .await
        .expect("fetched through the CC");
    assert_eq!(std::fs::read(path).unwrap(), bytes);
    // Bytes the CC does not have: the CC's NOT_FOUND, named.
    let missing = ImageRef {
        sha256: Sha256Digest::from_bytes(&[1; 32]),
        ..image
    };
    let err = cache
        .ensure(&missing, &fetcher, &Default::default())
        .await
        .expect_err("not there");
    assert!(err.to_string().contains("NotFound"), "{err}");
}

fn running(id: &InstanceId) -> pb::InstanceSpec {
    spec(id, pb::PowerState::Running, 0)
}

/// Runs an instance to RUNNING through the agent.
async fn launch(h: &mut Harness, generation: u64, id: &InstanceId) {
    let r = h.put(generation, vec![running(id)]).await;
    assert_eq!((r.applied_generation, r.stale), (generation, false));
    h.cc.wait_report(id, O::Running).await;
}

/// Defines and boots a domain behind the agent's back.
async fn boot_directly(sim: &SimHypervisor, id: &InstanceId) {
    let spec = DomainSpec::new(
        id.clone(),
        Resources::new(2, 2048, 20),
        AMI.parse().unwrap(),
        vec![],
    );
    sim.define(&spec).await.unwrap();
    sim.start(id).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while sim.state(id).await.unwrap() != Some(canopy_node_controller::DomainState::Running) {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Enough time for several reconcile passes and full reports (resync is 200 ms).
async fn let_it_settle() {
    tokio::time::sleep(Duration::from_millis(500)).await;
}

// ---------- tests ----------

#[tokio::test]
async fn registers_with_capacity_and_existing_domains() {
    let sim = sim();
    let existing = InstanceId::generate();
    boot_directly(&sim, &existing).await;
    let h = Harness::with(sim, |_| {}).await;

    let reg = h.cc.wait_registrations(1).await;
    assert_eq!(reg.node_id, NODE);
    assert_eq!(reg.endpoint, format!("http://{}", h.nc.local_addr()));
    assert_eq!(reg.endpoint, h.nc.advertised_endpoint());
    assert_eq!(reg.hypervisor, "sim");
    assert_eq!(
        reg.capacity,
        Some(pb::Resources {
            vcpus: 8,
            memory_mib: 16384,
            disk_gib: 200
        })
    );
    assert_eq!(reg.instances.len(), 1);
    assert_eq!(reg.instances[0].instance_id, existing.as_str());
    assert_eq!(reg.instances[0].state, O::Running as i32);
    assert_eq!(reg.instances[0].node_id, NODE);
    h.cc.wait_for("heartbeats", |s| (s.heartbeats >= 2).then_some(()))
        .await;
    h.nc.shutdown().await;
}

#[tokio::test]
async fn advertise_overrides_the_endpoint() {
    let (cc, cc_addr) = FakeCc::start().await;
    let mut config = config(cc_addr);
    config.advertise = Some("http://nc-1.example:8776".into());
    let (nc, _client) = start_nc(config, &sim()).await;
    assert_eq!(
        cc.wait_registrations(1).await.endpoint,
        "http://nc-1.example:8776"
    );
    nc.shutdown().await;
}

#[tokio::test]
async fn running_reports_pending_then_running() {
    let mut h = Harness::start().await;
    let id = InstanceId::generate();
    h.sim.control().hold_boot(&id);
    let r = h.put(1, vec![running(&id)]).await;
    assert_eq!((r.applied_generation, r.stale), (1, false));

    let pending = h.cc.wait_report(&id, O::Pending).await;
    assert_eq!(pending.node_id, NODE);
    assert_eq!(
        h.domain(&id).await,
        Some(canopy_node_controller::DomainState::Booting)
    );
    h.sim.control().release_boot(&id);
    h.cc.wait_report(&id, O::Running).await;
    assert_eq!(h.cc.states(&id), vec![O::Pending, O::Running]);

    let console = h.console(&id).await;
    assert!(
        console.contains(&format!("canopy-sim: booting instance {id}")),
        "{console}"
    );
    assert!(
        console.contains(&format!("canopy.instance_id={id}")),
        "{console}"
    );
    // Converged: further passes change nothing.
    let_it_settle().await;
    assert_eq!(h.sim.control().boots(&id), 1);
    assert_eq!(h.cc.states(&id), vec![O::Pending, O::Running]);
    h.nc.shutdown().await;
}

#[tokio::test]
async fn stop_reports_stopping_then_stopped_and_start_again() {
    let mut h = Harness::start().await;
    let id = InstanceId::generate();
    launch(&mut h, 1, &id).await;

    h.put(2, vec![spec(&id, pb::PowerState::Stopped, 0)]).await;
    let stopping = h.cc.wait_report(&id, O::Stopping).await;
    assert_eq!(stopping.reason_code, "Client.UserInitiatedShutdown");
    let stopped = h.cc.wait_report(&id, O::Stopped).await;
    assert_eq!(stopped.reason_code, "Client.UserInitiatedShutdown");
    assert_eq!(
        h.domain(&id).await,
        Some(canopy_node_controller::DomainState::ShutOff)
    );
    assert_eq!(
        h.cc.states(&id),
        vec![O::Pending, O::Running, O::Stopping, O::Stopped]
    );
    assert!(h.console(&id).await.contains("reboot: Power down"));

    // StartInstances: the same domain boots again.
    h.put(3, vec![running(&id)]).await;
    h.cc.wait_for("running again", |s| {
        let last = s
            .reports
            .iter()
            .rev()
            .find(|r| r.instance_id == id.as_str())?;
        (last.state == O::Running as i32).then_some(())
    })
    .await;
    assert_eq!(h.sim.control().boots(&id), 2);
    h.nc.shutdown().await;
}

/// The instance's size as the hypervisor lists its domain.
async fn domain_size(sim: &SimHypervisor, id: &InstanceId) -> Resources {
    sim.list()
        .await
        .unwrap()
        .into_iter()
        .find(|d| &d.instance_id == id)
        .unwrap()
        .resources
}

/// Stops a running instance through the agent, then asks for a start at `resources`, as
/// the document after ModifyInstanceAttribute `instanceType` and StartInstances does.
async fn stop_then_start_resized(h: &mut Harness, id: &InstanceId, resources: pb::Resources) {
    h.put(2, vec![spec(id, pb::PowerState::Stopped, 0)]).await;
    h.cc.wait_report(id, O::Stopped).await;
    let mut bigger = running(id);
    bigger.resources = Some(resources);
    bigger.instance_type = "t2.large".into();
    bigger.start_seq = 1;
    h.put(3, vec![bigger]).await;
}

#[tokio::test]
async fn a_stopped_instance_whose_type_changed_starts_at_its_new_size() {
    let mut h = Harness::start().await;
    let id = InstanceId::generate();
    launch(&mut h, 1, &id).await;
    assert_eq!(domain_size(&h.sim, &id).await, Resources::new(1, 1024, 8));

    stop_then_start_resized(
        &mut h,
        &id,
        pb::Resources {
            vcpus: 2,
            memory_mib: 8192,
            disk_gib: 30,
        },
    )
    .await;
    h.cc.wait_for("running again", |s| {
        let last = s
            .reports
            .iter()
            .rev()
            .find(|r| r.instance_id == id.as_str())?;
        (last.state == O::Running as i32).then_some(())
    })
    .await;
    // The same domain (its console goes on), booted a second time with the new size.
    assert_eq!(h.sim.control().boots(&id), 2);
    assert_eq!(domain_size(&h.sim, &id).await, Resources::new(2, 8192, 30));
    assert!(h.console(&id).await.contains("reboot: Power down"));
    h.nc.shutdown().await;
}

#[tokio::test]
async fn a_new_type_the_node_has_no_room_for_keeps_the_instance_stopped() {
    let mut h = Harness::start().await;
    let id = InstanceId::generate();
    launch(&mut h, 1, &id).await;
    stop_then_start_resized(
        &mut h,
        &id,
        pb::Resources {
            vcpus: 64,
            memory_mib: 8192,
            disk_gib: 30,
        },
    )
    .await;
    let_it_settle().await;
    // Not started, not terminated: stopped with the reason, its domain (and disk) kept
    // at the old size.
    let last =
        h.cc.wait_for("a report with a reason", |s| {
            s.reports
                .iter()
                .rev()
                .find(|r| r.instance_id == id.as_str())
                .filter(|r| r.reason_code == "Server.InsufficientInstanceCapacity")
                .cloned()
        })
        .await;
    assert_eq!(last.state, O::Stopped as i32);
    assert!(!h.cc.states(&id).contains(&O::Terminated));
    assert_eq!(
        h.domain(&id).await,
        Some(canopy_node_controller::DomainState::ShutOff)
    );
    assert_eq!(h.sim.control().boots(&id), 1);
    assert_eq!(domain_size(&h.sim, &id).await, Resources::new(1, 1024, 8));
    h.nc.shutdown().await;
}

#[tokio::test]
async fn a_stop_the_guest_ignores_is_forced_after_the_timeout() {
    let sim = Arc::new(SimHypervisor::new(SimConfig {
        boot_delay: Duration::from_millis(50),
        // The guest ignores ACPI for an hour.
        shutdown_delay: Duration::from_secs(3600),
        ..SimConfig::default()
    }));
    let mut h = Harness::with(sim, |c| c.stop_timeout = Duration::from_millis(300)).await;
    let id = InstanceId::generate();
    launch(&mut h, 1, &id).await;
    h.put(2, vec![spec(&id, pb::PowerState::Stopped, 0)]).await;
    h.cc.wait_report(&id, O::Stopping).await;
    h.cc.wait_report(&id, O::Stopped).await;
    assert_eq!(
        h.domain(&id).await,
        Some(canopy_node_controller::DomainState::ShutOff)
    );
    h.nc.shutdown().await;
}

#[tokio::test]
async fn terminate_reports_terminated_and_undefines() {
    let mut h = Harness::start().await;
    let id = InstanceId::generate();
    launch(&mut h, 1, &id).await;

    h.put(2, vec![spec(&id, pb::PowerState::Terminated, 0)])
        .await;
    let terminated = h.cc.wait_report(&id, O::Terminated).await;
    assert_eq!(terminated.reason_code, "Client.UserInitiatedShutdown");
    assert_eq!(h.domain(&id).await, None);
    assert!(h.sim.list().await.unwrap().is_empty());
    h.nc.shutdown().await;
}

#[tokio::test]
async fn volumes_are_attached_reported_detached_and_their_deletion_passed_on() {
    let mut h = Harness::start().await;
    let id = InstanceId::generate();
    launch(&mut h, 1, &id).await;
    let vol = "vol-0123456789abcdef0";
    let mut with_volume = running(&id);
    with_volume.volumes = vec![pb::VolumeAttachment {
        volume_id: vol.into(),
        device: "/dev/sdf".into(),
        size_gib: 4,
        initialized: false,
        source: None,
    }];
    h.put(2, vec![with_volume]).await;
    h.cc.wait_for("the volume reported attached", |s| {
        s.reports
            .iter()
            .find(|r| r.instance_id == id.as_str() && r.volumes == [vol])
            .map(|_| ())
    })
    .await;
    let listed = h.sim.list().await.unwrap();
    assert_eq!(listed[0].volumes.len(), 1, "attached in the hypervisor");

    // Taken out of the spec: detached, and the reports say so.
    h.put(3, vec![running(&id)]).await;
    h.cc.wait_for("the volume reported detached", |s| {
        s.reports
            .iter()
            .rev()
            .find(|r| r.instance_id == id.as_str())
            .filter(|r| r.volumes.is_empty())
            .map(|_| ())
    })
    .await;
    assert!(h.sim.list().await.unwrap()[0].volumes.is_empty());
    h.nc.shutdown().await;
}

#[tokio::test]
async fn snapshots_are_taken_by_the_node_holding_the_volume_and_uploaded_once() {
    let mut h = Harness::start().await;
    let id = InstanceId::generate();
    launch(&mut h, 1, &id).await;
    let vol = "vol-0123456789abcdef0";
    let mut with_volume = running(&id);
    with_volume.volumes = vec![pb::VolumeAttachment {
        volume_id: vol.into(),
        device: "/dev/sdf".into(),
        size_gib: 4,
        initialized: false,
        source: None,
    }];
    h.put(2, vec![with_volume.clone()]).await;
    h.cc.wait_for("the volume attached", |s| {
        s.reports
            .iter()
            .find(|r| r.instance_id == id.as_str() && r.volumes == [vol])
            .map(|_| ())
    })
    .await;
    let request = |snapshot: &str, volume: &str| pb::SnapshotRequest {
        snapshot_id: snapshot.into(),
        volume_id: volume.into(),
        ..Default::default()
    };
    let put_snapshots = async |h: &mut Harness, generation, snapshots| {
        h.client
            .put_node_state(pb::NodeDesiredState {
                node_id: NODE.into(),
                generation,
                instances: vec![with_volume.clone()],
                deleted_volumes: vec![],
                snapshots,
            })
            .await
            .unwrap();
    };
    // One of a volume held here, one of a volume that is not (another node's).
    put_snapshots(
        &mut h,
        3,
        vec![
            request("snap-0123456789abcdef0", vol),
            request("snap-0123456789abcdef1", "vol-0123456789abcdef9"),
        ],
    )
    .await;
    let (header, bytes) =
        h.cc.wait_for("the snapshot uploaded", |s| s.uploads.first().cloned())
            .await;
    assert_eq!(
        (header.snapshot_id.as_str(), header.volume_id.as_str()),
        ("snap-0123456789abcdef0", vol)
    );
    assert_eq!(
        (header.node_id.as_str(), header.failure.as_str()),
        (NODE, "")
    );
    assert_eq!(header.size, bytes.len() as u64);
    assert!(bytes.len() > 1 << 20, "more than one chunk");
    assert!(String::from_utf8_lossy(&bytes[..64]).contains(vol));
    // Re-sent documents do not take it again (it waits for the CLC to drop it).
    put_snapshots(&mut h, 4, vec![request("snap-0123456789abcdef0", vol)]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(h.cc.state.lock().unwrap().uploads.len(), 1);
    assert_eq!(h.sim.control().snapshots(), 1);

    // A copy that fails is uploaded as a failure.
    h.sim.control().fail_next_snapshot("disk on fire");
    put_snapshots(&mut h, 5, vec![request("snap-0123456789abcdef2", vol)]).await;
    let (header, bytes) =
        h.cc.wait_for("the failure uploaded", |s| s.uploads.get(1).cloned())
            .await;
    assert_eq!(header.snapshot_id, "snap-0123456789abcdef2");
    assert!(
        header.failure.contains("disk on fire"),
        "{}",
        header.failure
    );
    assert!(bytes.is_empty());
    h.nc.shutdown().await;
}

#[tokio::test]
async fn a_stopped_instances_root_disk_is_copied_by_its_node_before_it_starts_or_goes() {
    use canopy_node_controller::DomainState as D;
    let mut h = Harness::start().await;
    let id = InstanceId::generate();
    launch(&mut h, 1, &id).await;
    let stopped = spec(&id, pb::PowerState::Stopped, 0);
    h.put(2, vec![stopped.clone()]).await;
    h.cc.wait_report(&id, O::Stopped).await;
    let root = |snapshot: &str, node: &str| pb::SnapshotRequest {
        snapshot_id: snapshot.into(),
        instance_id: id.to_string(),
        node_id: node.into(),
        ..Default::default()
    };
    let put_doc = async |h: &mut Harness, generation, instance: pb::InstanceSpec, snapshots| {
        h.client
            .put_node_state(pb::NodeDesiredState {
                node_id: NODE.into(),
                generation,
                instances: vec![instance],
                deleted_volumes: vec![],
                snapshots,
            })
            .await
            .unwrap();
    };
    // Asked of another node: not taken here.
    put_doc(
        &mut h,
        3,
        stopped.clone(),
        vec![root("snap-0123456789abcdef9", "node-2")],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(h.cc.state.lock().unwrap().uploads.is_empty());
    assert!(h.sim.control().root_copies().is_empty());

    // Asked of this node, together with a start: the copy comes first, and the domain
    // stays shut off (reported pending) while the document lists the request, even once
    // the copy is uploaded.
    let mut start = running(&id);
    start.start_seq = 1;
    let request = root("snap-0123456789abcdef0", NODE);
    put_doc(&mut h, 4, start.clone(), vec![request.clone()]).await;
    let (header, bytes) =
        h.cc.wait_for("the root disk uploaded", |s| s.uploads.first().cloned())
            .await;
    assert_eq!(
        (
            header.snapshot_id.as_str(),
            header.instance_id.as_str(),
            header.volume_id.as_str(),
            header.node_id.as_str(),
            header.failure.as_str()
        ),
        ("snap-0123456789abcdef0", id.as_str(), "", NODE, "")
    );
    assert_eq!(header.size, bytes.len() as u64);
    let text = String::from_utf8_lossy(&bytes[..128]).into_owned();
    assert!(
        text.contains(&format!("canopy-sim root disk of {id}")) && text.contains(AMI),
        "{text}"
    );
    assert!(text.contains("boots 1"), "what the guest wrote: {text}");
    assert_eq!(h.sim.control().root_copies(), vec![id.clone()]);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(h.domain(&id).await, Some(D::ShutOff));
    h.cc.wait_report(&id, O::Pending).await;
    assert_eq!(h.console(&id).await.matches("booting instance").count(), 1);
    // The CLC has it: the request leaves the document and the start goes ahead.
    put_doc(&mut h, 5, start.clone(), vec![]).await;
    h.cc.wait_for("the second boot", |s| {
        s.reports
            .iter()
            .filter(|r| r.instance_id == id.as_str() && r.state == O::Running as i32)
            .nth(1)
            .cloned()
    })
    .await;
    assert_eq!(h.domain(&id).await, Some(D::Running));

    // A copy asked of a running domain (which the CLC never asks) is refused, not made.
    put_doc(
        &mut h,
        6,
        start.clone(),
        vec![root("snap-0123456789abcdef1", NODE)],
    )
    .await;
    let (header, bytes) =
        h.cc.wait_for("the refusal uploaded", |s| s.uploads.get(1).cloned())
            .await;
    assert!(
        header.failure.contains("while it is running"),
        "{}",
        header.failure
    );
    assert!(bytes.is_empty());

    // Stopped again and terminated while a copy is asked for: the domain stays (shutting
    // down) until the copy is uploaded and the request dropped.
    h.put(7, vec![spec(&id, pb::PowerState::Stopped, 0)]).await;
    h.cc.wait_for("stopped again", |s| {
        s.reports
            .iter()
            .filter(|r| r.instance_id == id.as_str() && r.state == O::Stopped as i32)
            .nth(1)
            .cloned()
    })
    .await;
    let terminated = spec(&id, pb::PowerState::Terminated, 0);
    h.sim.control().fail_next_snapshot("disk on fire");
    put_doc(
        &mut h,
        8,
        terminated.clone(),
        vec![root("snap-0123456789abcdef2", NODE)],
    )
    .await;
    let (header, _) =
        h.cc.wait_for("the failed copy uploaded", |s| s.uploads.get(2).cloned())
            .await;
    assert!(
        header.failure.contains("disk on fire"),
        "{}",
        header.failure
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        h.domain(&id).await,
        Some(D::ShutOff),
        "not undefined while listed"
    );
    h.cc.wait_report(&id, O::ShuttingDown).await;
    put_doc(&mut h, 9, terminated, vec![]).await;
    h.cc.wait_report(&id, O::Terminated).await;
    assert_eq!(h.domain(&id).await, None);

    // An instance this node never defined has no disk here: the copy fails at once.
    let never = InstanceId::generate();
    let never_request = pb::SnapshotRequest {
        snapshot_id: "snap-0123456789abcdef3".into(),
        instance_id: never.to_string(),
        node_id: NODE.into(),
        ..Default::default()
    };
    put_doc(
        &mut h,
        10,
        spec(&never, pb::PowerState::Stopped, 0),
        vec![never_request],
    )
    .await;
    let (header, _) =
        h.cc.wait_for("the missing disk reported", |s| s.uploads.get(3).cloned())
            .await;
    assert!(
        header.failure.contains("stopped before it ever started"),
        "{}",
        header.failure
    );
    h.nc.shutdown().await;
}

#[tokio::test]
async fn stale_generations_are_refused() {
    let mut h = Harness::start().await;
    let id = InstanceId::generate();
    launch(&mut h, 5, &id).await;

    // An older document that would terminate the instance changes nothing.
    let r = h
        .put(4, vec![spec(&id, pb::PowerState::Terminated, 0)])
        .await;
    assert_eq!((r.applied_generation, r.stale), (5, true));
    // The same generation again is an idempotent re-send.
    let r = h.put(5, vec![running(&id)]).await;
    assert_eq!((r.applied_generation, r.stale), (5, false));
    let_it_settle().await;
    assert_eq!(
        h.domain(&id).await,
        Some(canopy_node_controller::DomainState::Running)
    );
    assert_eq!(h.sim.control().boots(&id), 1);
    h.cc.wait_for("heartbeat", |s| (s.heartbeats > 0).then_some(()))
        .await;
    h.nc.shutdown().await;
}

#[tokio::test]
async fn malformed_or_misaddressed_documents_are_rejected() {
    let mut h = Harness::start().await;
    let mut bad = running(&InstanceId::generate());
    bad.instance_id = "i-nothex".into();
    let err = h
        .client
        .put_node_state(pb::NodeDesiredState {
            node_id: NODE.into(),
            generation: 1,
            instances: vec![bad],
            deleted_volumes: vec![],
            snapshots: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    let err = h
        .client
        .put_node_state(pb::NodeDesiredState {
            node_id: "node-2".into(),
            generation: 1,
            instances: vec![],
            deleted_volumes: vec![],
            snapshots: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);

    // Neither was applied.
    let r = h.put(1, vec![]).await;
    assert_eq!((r.applied_generation, r.stale), (1, false));
    h.nc.shutdown().await;
}

#[tokio::test]
async fn a_larger_reboot_seq_reboots_once() {
    let mut h = Harness::start().await;
    let id = InstanceId::generate();
    launch(&mut h, 1, &id).await;

    h.put(2, vec![spec(&id, pb::PowerState::Running, 1)]).await;
    let report =
        h.cc.wait_for("reboot_seq 1 running", |s| {
            s.reports
                .iter()
                .find(|r| {
                    r.instance_id == id.as_str()
                        && r.reboot_seq == 1
                        && r.state == O::Running as i32
                })
                .cloned()
        })
        .await;
    assert_eq!(report.reboot_seq, 1);
    // A re-sent document with the same sequence does not reboot again.
    h.put(3, vec![spec(&id, pb::PowerState::Running, 1)]).await;
    let_it_settle().await;
    assert_eq!(h.sim.control().boots(&id), 2);
    // EC2 keeps a rebooting instance running: no pending in between.
    assert_eq!(h.cc.states(&id), vec![O::Pending, O::Running]);
    let console = h.console(&id).await;
    assert_eq!(
        console.matches("canopy-sim: booting instance").count(),
        2,
        "{console}"
    );
    h.nc.shutdown().await;
}

#[tokio::test]
async fn a_failed_start_terminates_with_a_reason() {
    let mut h = Harness::start().await;
    let id = InstanceId::generate();
    h.sim.control().fail_next_start("no bootable device");
    h.put(1, vec![running(&id)]).await;

    let report = h.cc.wait_report(&id, O::Terminated).await;
    assert_eq!(report.reason_code, "Server.InternalError");
    assert!(
        report.reason_message.contains("no bootable device"),
        "{}",
        report.reason_message
    );
    assert_eq!(h.domain(&id).await, None, "the failed domain is cleaned up");
    // Not retried while the document still says running.
    let_it_settle().await;
    assert_eq!(h.domain(&id).await, None);
    h.nc.shutdown().await;
}

#[tokio::test]
async fn no_capacity_terminates_with_insufficient_capacity() {
    let mut h = Harness::start().await;
    let id = InstanceId::generate();
    let mut huge = running(&id);
    huge.resources = Some(pb::Resources {
        vcpus: 64,
        memory_mib: 1024,
        disk_gib: 8,
    });
    h.put(1, vec![huge]).await;
    let report = h.cc.wait_report(&id, O::Terminated).await;
    assert_eq!(report.reason_code, "Server.InsufficientInstanceCapacity");
    h.nc.shutdown().await;
}

#[tokio::test]
async fn a_crashed_guest_is_reported_stopped_and_not_restarted() {
    let mut h = Harness::start().await;
    let id = InstanceId::generate();
    launch(&mut h, 1, &id).await;
    assert!(h.sim.control().crash(&id));
    let report = h.cc.wait_report(&id, O::Stopped).await;
    assert_eq!(report.reason_code, "Server.InternalError");
    let_it_settle().await;
    assert_eq!(
        h.domain(&id).await,
        Some(canopy_node_controller::DomainState::Crashed)
    );
    assert_eq!(h.sim.control().boots(&id), 1);
    h.nc.shutdown().await;
}

#[tokio::test]
async fn a_guest_poweroff_is_an_instance_initiated_shutdown() {
    let mut h = Harness::start().await;
    let id = InstanceId::generate();
    launch(&mut h, 1, &id).await;
    assert!(h.sim.control().guest_poweroff(&id));
    let report = h.cc.wait_report(&id, O::Stopped).await;
    assert_eq!(report.reason_code, "Client.InstanceInitiatedShutdown");
    let_it_settle().await;
    assert_eq!(h.sim.control().boots(&id), 1, "not restarted");

    // The control plane records the stop, then the user starts it again.
    h.put(2, vec![spec(&id, pb::PowerState::Stopped, 0)]).await;
    let_it_settle().await;
    h.put(3, vec![running(&id)]).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while h.sim.control().boots(&id) < 2 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    h.nc.shutdown().await;
}

#[tokio::test]
async fn domains_missing_from_the_document_are_left_alone() {
    let sim = sim();
    let stray = InstanceId::generate();
    boot_directly(&sim, &stray).await;
    let mut h = Harness::with(sim, |_| {}).await;
    let id = InstanceId::generate();
    launch(&mut h, 1, &id).await;
    // Even an empty document does not stop anything.
    h.put(2, vec![]).await;
    let_it_settle().await;
    for i in [&stray, &id] {
        assert_eq!(
            h.domain(i).await,
            Some(canopy_node_controller::DomainState::Running)
        );
    }
    h.nc.shutdown().await;
}

#[tokio::test]
async fn a_restarted_agent_adopts_running_domains_without_touching_them() {
    let mut h = Harness::start().await;
    let id = InstanceId::generate();
    // Launched with an old reboot already counted.
    let doc = vec![spec(&id, pb::PowerState::Running, 3)];
    h.put(1, doc.clone()).await;
    h.cc.wait_report(&id, O::Running).await;
    h.nc.shutdown().await;

    let (nc, mut client) = start_nc(config(h.cc_addr), &h.sim).await;
    let reg = h.cc.wait_registrations(2).await;
    assert_eq!(reg.instances.len(), 1);
    assert_eq!(reg.instances[0].instance_id, id.as_str());
    assert_eq!(reg.instances[0].state, O::Running as i32);

    // The CC re-sends the same document to the new agent.
    let r = put(&mut client, 1, doc).await;
    assert_eq!((r.applied_generation, r.stale), (1, false));
    let_it_settle().await;
    assert_eq!(h.sim.control().boots(&id), 1);
    let console = String::from_utf8(h.sim.console(&id).await.unwrap()).unwrap();
    assert_eq!(
        console.matches("canopy-sim: booting instance").count(),
        1,
        "{console}"
    );
    let last =
        h.cc.wait_for("a report from the new agent", |s| s.reports.last().cloned())
            .await;
    assert_eq!((last.state, last.reboot_seq), (O::Running as i32, 3));
    nc.shutdown().await;
}

#[tokio::test]
async fn a_cc_that_forgot_the_node_gets_a_new_registration() {
    let h = Harness::start().await;
    h.cc.forget(NODE);
    let reg = h.cc.wait_registrations(2).await;
    assert_eq!(reg.node_id, NODE);
    h.nc.shutdown().await;
}

#[tokio::test]
async fn registration_is_retried_until_the_cc_is_up() {
    let reserved = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cc_addr = reserved.local_addr().unwrap();
    drop(reserved);
    let (nc, _client) = start_nc(config(cc_addr), &sim()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let cc = FakeCc::serve(TcpListener::bind(cc_addr).await.unwrap()).await;
    cc.wait_registrations(1).await;
    nc.shutdown().await;
}

#[tokio::test]
async fn console_output_over_grpc() {
    let mut h = Harness::start().await;
    let id = InstanceId::generate();
    launch(&mut h, 1, &id).await;
    let out = h
        .client
        .get_console_output(pb::ConsoleRequest {
            instance_id: id.to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    let text = String::from_utf8(out.output).unwrap();
    assert!(
        text.contains(&format!("canopy-sim: booting instance {id}")),
        "{text}"
    );
    assert!(text.contains("login:"), "{text}");
    assert!(out.timestamp_ms > 0);

    let unknown = h
        .client
        .get_console_output(pb::ConsoleRequest {
            instance_id: InstanceId::generate().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    let malformed = h
        .client
        .get_console_output(pb::ConsoleRequest {
            instance_id: "bogus".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(malformed.code(), tonic::Code::InvalidArgument);
    h.nc.shutdown().await;
}

#[tokio::test]
async fn bad_configuration_is_refused_at_start() {
    let mut config = config("127.0.0.1:1".parse().unwrap());
    config.resync_interval = Duration::ZERO;
    let err = canopy_node_controller::start(config, sim() as Arc<dyn Hypervisor>)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("resync_interval"), "{err}");
}

#[tokio::test]
async fn a_slow_preparation_holds_up_only_its_own_instance() {
    let mut h = Harness::start().await;
    let (slow, other) = (InstanceId::generate(), InstanceId::generate());
    launch(&mut h, 1, &other).await;

    // The new instance's images are still "downloading": it stays pending and undefined,
    // while the node goes on driving the other one (a stop, then a terminate).
    let control = h.sim.control();
    control.hold_prepare(&slow);
    h.put(2, vec![running(&other), running(&slow)]).await;
    h.cc.wait_report(&slow, O::Pending).await;
    h.put(
        3,
        vec![spec(&other, pb::PowerState::Stopped, 0), running(&slow)],
    )
    .await;
    h.cc.wait_report(&other, O::Stopped).await;
    h.put(
        4,
        vec![spec(&other, pb::PowerState::Terminated, 0), running(&slow)],
    )
    .await;
    h.cc.wait_report(&other, O::Terminated).await;
    assert_eq!(
        h.domain(&slow).await,
        None,
        "not defined before it is prepared"
    );

    // Prepared: defined, started, running; prepared once however many passes looked.
    control.release_prepare(&slow);
    h.cc.wait_report(&slow, O::Running).await;
    assert_eq!(control.prepares(&slow), 1);
    h.nc.shutdown().await;
}
