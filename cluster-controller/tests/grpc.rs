//! The cluster controller over real gRPC on 127.0.0.1, between a fake CLC (a
//! `CloudController` server that records what it is told) and fake NCs (`NodeController`
//! servers that record their documents and answer console requests).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use canopy_cluster_controller::{CcConfig, ClusterHandle, INSUFFICIENT_CAPACITY, start};
use canopy_common::ZoneName;
use canopy_proto::v1 as pb;
use canopy_proto::v1::cloud_controller_server::{CloudController, CloudControllerServer};
use canopy_proto::v1::cluster_controller_client::ClusterControllerClient;
use canopy_proto::v1::node_controller_server::{NodeController, NodeControllerServer};
use canopy_proto::v1::zone_agent_client::ZoneAgentClient;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

const ZONE: &str = "test-1a";

// ---------- fakes ----------

#[derive(Default)]
struct ClcLog {
    registrations: Vec<pb::RegisterZoneRequest>,
    heartbeats: Vec<pb::ZoneHeartbeatRequest>,
    reports: Vec<pb::InstanceReport>,
    /// Snapshot uploads relayed, each as its parts.
    uploads: Vec<Vec<pb::SnapshotUpload>>,
}

#[derive(Clone, Default)]
struct FakeClc {
    log: Arc<Mutex<ClcLog>>,
    /// When set, the CLC has "lost its state": heartbeats answer known=false until the zone
    /// registers again.
    amnesia: Arc<AtomicBool>,
    /// Whether this replica answers heartbeats as the leader.
    leader: Arc<AtomicBool>,
    /// Image bytes this replica holds, by sha256.
    images: Arc<Mutex<std::collections::HashMap<String, Vec<u8>>>>,
}

impl FakeClc {
    fn log(&self) -> std::sync::MutexGuard<'_, ClcLog> {
        self.log.lock().expect("clc log")
    }

    fn last_heartbeat(&self) -> Option<pb::ZoneHeartbeatRequest> {
        self.log().heartbeats.last().cloned()
    }

    fn report_for(&self, instance: &str) -> Option<pb::InstanceReport> {
        self.log()
            .reports
            .iter()
            .rev()
            .find(|r| r.instance_id == instance)
            .cloned()
    }
}

#[tonic::async_trait]
impl CloudController for FakeClc {
    async fn register_zone(
        &self,
        request: Request<pb::RegisterZoneRequest>,
    ) -> Result<Response<pb::RegisterZoneResponse>, Status> {
        self.amnesia.store(false, Ordering::SeqCst);
        self.log().registrations.push(request.into_inner());
        Ok(Response::new(pb::RegisterZoneResponse {
            region: "test-1".into(),
        }))
    }

    async fn zone_heartbeat(
        &self,
        request: Request<pb::ZoneHeartbeatRequest>,
    ) -> Result<Response<pb::ZoneHeartbeatResponse>, Status> {
        self.log().heartbeats.push(request.into_inner());
        Ok(Response::new(pb::ZoneHeartbeatResponse {
            known: !self.amnesia.load(Ordering::SeqCst),
            leader: self.leader.load(Ordering::SeqCst),
            revoked_serials: Vec::new(),
        }))
    }

    async fn report_instances(
        &self,
        request: Request<pb::ZoneInstanceReports>,
    ) -> Result<Response<pb::ReportAck>, Status> {
        let request = request.into_inner();
        assert_eq!(request.zone, ZONE);
        self.log().reports.extend(request.reports);
        Ok(Response::new(pb::ReportAck {}))
    }

    async fn join_node(
        &self,
        _: Request<pb::JoinNodeRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        Err(Status::unimplemented("this fake CLC signs no certificates"))
    }

    type FetchImageStream =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::ImageChunk, Status>> + Send>>;

    async fn fetch_image(
        &self,
        request: Request<pb::FetchImageRequest>,
    ) -> Result<Response<Self::FetchImageStream>, Status> {
        let sha = request.into_inner().sha256;
        let bytes = self
            .images
            .lock()
            .expect("images")
            .get(&sha)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("no image {sha} here")))?;
        // Three-byte chunks: the relay must pass every chunk on, in order.
        let chunks: Vec<Result<pb::ImageChunk, Status>> = bytes
            .chunks(3)
            .map(|c| Ok(pb::ImageChunk { data: c.to_vec() }))
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }

    async fn upload_snapshot(
        &self,
        request: Request<tonic::Streaming<pb::SnapshotUpload>>,
    ) -> Result<Response<pb::SnapshotUploadAck>, Status> {
        let mut parts = request.into_inner();
        let mut got = Vec::new();
        while let Some(part) = parts.message().await? {
            got.push(part);
        }
        self.log().uploads.push(got);
        Ok(Response::new(pb::SnapshotUploadAck {
            state: "completed".into(),
        }))
    }
}

#[derive(Clone)]
struct FakeNc {
    name: String,
    puts: Arc<Mutex<Vec<pb::NodeDesiredState>>>,
}

impl FakeNc {
    fn new(name: &str) -> Self {
        Self {
            name: name.into(),
            puts: Arc::default(),
        }
    }

    fn last_put(&self) -> Option<pb::NodeDesiredState> {
        self.puts.lock().expect("puts").last().cloned()
    }

    fn instance_ids(&self) -> Vec<String> {
        self.last_put()
            .map(|p| p.instances.into_iter().map(|i| i.instance_id).collect())
            .unwrap_or_default()
    }
}

#[tonic::async_trait]
impl NodeController for FakeNc {
    async fn put_node_state(
        &self,
        request: Request<pb::NodeDesiredState>,
    ) -> Result<Response<pb::PutStateResponse>, Status> {
        let doc = request.into_inner();
        assert_eq!(doc.node_id, self.name, "document sent to the wrong node");
        let generation = doc.generation;
        self.puts.lock().expect("puts").push(doc);
        Ok(Response::new(pb::PutStateResponse {
            applied_generation: generation,
            stale: false,
        }))
    }

    async fn get_console_output(
        &self,
        request: Request<pb::ConsoleRequest>,
    ) -> Result<Response<pb::ConsoleResponse>, Status> {
        let id = request.into_inner().instance_id;
        let output = format!("console of {id} on {}", self.name).into_bytes();
        Ok(Response::new(pb::ConsoleResponse {
            output,
            timestamp_ms: 1,
        }))
    }
}

/// A fake server; dropping it stops it gracefully (eventually), `stop` waits for it.
struct Served {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Served {
    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("fake server stops")
            .expect("fake server task")
            .expect("fake server");
    }
}

async fn serve_clc_on(clc: FakeClc, listener: TcpListener) -> Served {
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = oneshot::channel::<()>();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let task = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(CloudControllerServer::new(clc))
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            }),
    );
    Served { addr, stop, task }
}

async fn serve_clc(clc: FakeClc) -> Served {
    serve_clc_on(clc, TcpListener::bind("127.0.0.1:0").await.expect("bind")).await
}

async fn serve_nc_on(nc: FakeNc, listener: TcpListener) -> Served {
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = oneshot::channel::<()>();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let task = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(NodeControllerServer::new(nc))
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            }),
    );
    Served { addr, stop, task }
}

async fn serve_nc(nc: FakeNc) -> Served {
    serve_nc_on(nc, TcpListener::bind("127.0.0.1:0").await.expect("bind")).await
}

// ---------- helpers ----------

fn config(clc: &str) -> CcConfig {
    let mut c = CcConfig::new(
        ZoneName::parse(ZONE).expect("zone"),
        "127.0.0.1:0".parse().expect("addr"),
        vec![clc.to_owned()],
    );
    c.heartbeat_interval = Duration::from_millis(100);
    c.node_timeout = Duration::from_secs(5);
    c.resync_interval = Duration::from_millis(300);
    c
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn agent(cc: &ClusterHandle) -> ZoneAgentClient<Channel> {
    ZoneAgentClient::connect(format!("http://{}", cc.local_addr()))
        .await
        .expect("connect zone agent")
}

async fn controller(cc: &ClusterHandle) -> ClusterControllerClient<Channel> {
    ClusterControllerClient::connect(format!("http://{}", cc.local_addr()))
        .await
        .expect("connect controller")
}

async fn register(
    agent: &mut ZoneAgentClient<Channel>,
    node: &str,
    endpoint: &str,
    memory_mib: u64,
) {
    let reply = agent
        .register_node(pb::RegisterNodeRequest {
            node_id: node.into(),
            endpoint: endpoint.into(),
            capacity: Some(pb::Resources {
                vcpus: 8,
                memory_mib,
                disk_gib: 500,
            }),
            hypervisor: "sim".into(),
            hypervisor_detail: format!("{node} simulates its guests"),
            instances: Vec::new(),
        })
        .await
        .expect("register node");
    assert_eq!(reply.into_inner().zone, ZONE);
}

/// node-1 reports instance `n` running.
async fn report_running(mut nc_link: ZoneAgentClient<Channel>, n: u64) {
    nc_link
        .report_instances(pb::NodeInstanceReports {
            node_id: "node-1".into(),
            reports: vec![pb::InstanceReport {
                instance_id: iid(n),
                state: pb::ObservedState::Running.into(),
                ..Default::default()
            }],
        })
        .await
        .expect("report");
}

fn iid(n: u64) -> String {
    format!("i-{n:017x}")
}

fn spec(n: u64, memory_mib: u64) -> pb::InstanceSpec {
    pb::InstanceSpec {
        instance_id: iid(n),
        instance_type: "custom".into(),
        resources: Some(pb::Resources {
            vcpus: 1,
            memory_mib,
            disk_gib: 10,
        }),
        image_id: "ami-0123456789abcdef0".into(),
        desired: pb::PowerState::Running.into(),
        ..Default::default()
    }
}

fn zone_doc(generation: u64, instances: Vec<pb::InstanceSpec>) -> pb::ZoneDesiredState {
    pb::ZoneDesiredState {
        zone: ZONE.into(),
        generation,
        instances,
        deleted_volumes: Vec::new(),
        snapshots: Vec::new(),
    }
}

// ---------- tests ----------

#[tokio::test]
async fn registers_with_the_clc_heartbeats_and_registers_again_when_forgotten() {
    let clc = FakeClc::default();
    let clc_server = serve_clc(clc.clone()).await;
    let cc = start(config(&clc_server.endpoint())).await.expect("start");
    let advertised = format!("http://{}", cc.local_addr());

    eventually("the CC registers", || !clc.log().registrations.is_empty()).await;
    let reg = clc.log().registrations[0].clone();
    assert_eq!(
        (reg.zone.as_str(), reg.endpoint.as_str()),
        (ZONE, advertised.as_str())
    );
    eventually("heartbeats arrive", || clc.log().heartbeats.len() >= 2).await;
    let hb = clc.last_heartbeat().expect("heartbeat");
    assert_eq!((hb.zone.as_str(), hb.applied_generation), (ZONE, 0));

    clc.amnesia.store(true, Ordering::SeqCst);
    eventually("the CC registers again", || {
        clc.log().registrations.len() >= 2
    })
    .await;
    cc.shutdown().await;
}

#[tokio::test]
async fn registers_once_a_late_clc_comes_up() {
    // Reserve a port for the CLC, then leave it closed while the CC starts.
    let probe = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = probe.local_addr().expect("addr");
    drop(probe);
    let cc = start(config(&format!("http://{addr}")))
        .await
        .expect("start without a CLC");
    tokio::time::sleep(Duration::from_millis(500)).await;

    let clc = FakeClc::default();
    let _clc_server =
        serve_clc_on(clc.clone(), TcpListener::bind(addr).await.expect("rebind")).await;
    eventually("the CC registers with the late CLC", || {
        !clc.log().registrations.is_empty()
    })
    .await;
    eventually("heartbeats follow", || !clc.log().heartbeats.is_empty()).await;
    cc.shutdown().await;
}

#[tokio::test]
async fn put_zone_state_places_instances_and_fans_out_to_the_right_nodes() {
    let clc = FakeClc::default();
    let clc_server = serve_clc(clc.clone()).await;
    let cc = start(config(&clc_server.endpoint())).await.expect("start");
    let (small, big) = (FakeNc::new("node-small"), FakeNc::new("node-big"));
    let (small_srv, big_srv) = (serve_nc(small.clone()).await, serve_nc(big.clone()).await);
    let mut agent = agent(&cc).await;
    register(&mut agent, "node-small", &small_srv.endpoint(), 4096).await;
    // 7 GiB vs 4 GiB: the first two go to the big node, then the small one has more room.
    register(&mut agent, "node-big", &big_srv.endpoint(), 7168).await;

    let mut ctl = controller(&cc).await;
    let doc = zone_doc(
        1,
        vec![spec(1, 2048), spec(2, 2048), spec(3, 2048), spec(4, 65536)],
    );
    let reply = ctl.put_zone_state(doc).await.expect("put").into_inner();
    assert_eq!((reply.applied_generation, reply.stale), (1, false));

    eventually("both nodes get their documents", || {
        small.last_put().is_some() && big.last_put().is_some()
    })
    .await;
    assert_eq!(
        big.instance_ids(),
        vec![iid(1), iid(2)],
        "most free memory first"
    );
    assert_eq!(small.instance_ids(), vec![iid(3)]);
    let put = big.last_put().expect("put");
    assert_eq!(put.generation, 1);
    assert!(put.instances.iter().all(|i| i.node_id == "node-big"));

    // The instance that fits nowhere is reported terminated, with the reasons.
    eventually("the capacity failure reaches the CLC", || {
        clc.report_for(&iid(4)).is_some()
    })
    .await;
    let failure = clc.report_for(&iid(4)).expect("report");
    assert_eq!(failure.state, i32::from(pb::ObservedState::Terminated));
    assert_eq!(failure.reason_code, INSUFFICIENT_CAPACITY);
    assert!(
        failure
            .reason_message
            .contains("node-big: not enough memory"),
        "{}",
        failure.reason_message
    );
    assert!(
        failure
            .reason_message
            .contains("node-small: not enough memory"),
        "{}",
        failure.reason_message
    );

    // Stale and repeated generations.
    let stale = ctl
        .put_zone_state(zone_doc(0, Vec::new()))
        .await
        .expect("put")
        .into_inner();
    assert_eq!((stale.applied_generation, stale.stale), (1, true));
    let again = ctl
        .put_zone_state(zone_doc(1, Vec::new()))
        .await
        .expect("put")
        .into_inner();
    assert_eq!((again.applied_generation, again.stale), (1, false));
    assert_eq!(
        big.instance_ids().len(),
        2,
        "a repeated generation changes nothing"
    );

    // The heartbeat summaries show the allocations and the applied generation.
    eventually("summaries show both allocations", || {
        clc.last_heartbeat().is_some_and(|hb| {
            hb.applied_generation == 1
                && hb.nodes.iter().any(|n| {
                    n.node_id == "node-big"
                        && n.instance_count == 2
                        && n.allocated.is_some_and(|a| a.memory_mib == 4096)
                        && n.healthy
                })
        })
    })
    .await;

    // Malformed and misdirected documents are refused.
    let bad = zone_doc(
        2,
        vec![pb::InstanceSpec {
            instance_id: "nope".into(),
            ..spec(9, 1)
        }],
    );
    assert_eq!(
        ctl.put_zone_state(bad).await.expect_err("bad id").code(),
        tonic::Code::InvalidArgument
    );
    let other = pb::ZoneDesiredState {
        zone: "other-1b".into(),
        generation: 3,
        instances: Vec::new(),
        deleted_volumes: Vec::new(),
        snapshots: Vec::new(),
    };
    assert_eq!(
        ctl.put_zone_state(other)
            .await
            .expect_err("wrong zone")
            .code(),
        tonic::Code::FailedPrecondition
    );
    cc.shutdown().await;
}

#[tokio::test]
async fn node_reports_are_forwarded_with_the_node_id_and_re_reported() {
    let clc = FakeClc::default();
    let clc_server = serve_clc(clc.clone()).await;
    let cc = start(config(&clc_server.endpoint())).await.expect("start");
    let nc = FakeNc::new("node-1");
    let nc_srv = serve_nc(nc.clone()).await;
    let mut agent = agent(&cc).await;
    register(&mut agent, "node-1", &nc_srv.endpoint(), 4096).await;
    eventually("the CC registers", || !clc.log().registrations.is_empty()).await;

    let report = pb::InstanceReport {
        instance_id: iid(7),
        state: pb::ObservedState::Running.into(),
        ..Default::default()
    };
    agent
        .report_instances(pb::NodeInstanceReports {
            node_id: "node-1".into(),
            reports: vec![report],
        })
        .await
        .expect("report");
    eventually("the report is forwarded", || {
        clc.report_for(&iid(7)).is_some()
    })
    .await;
    let forwarded = clc.report_for(&iid(7)).expect("report");
    assert_eq!(forwarded.node_id, "node-1");
    assert_eq!(forwarded.state, i32::from(pb::ObservedState::Running));

    // The resync re-sends the full set, so a CLC that missed it still learns it.
    let seen = clc.log().reports.len();
    eventually("the full set is re-reported", || {
        clc.log().reports.len() > seen
    })
    .await;

    // Unregistered nodes are sent back to register.
    let hb = agent
        .node_heartbeat(pb::NodeHeartbeatRequest {
            node_id: "ghost".into(),
            applied_generation: 0,
        })
        .await
        .expect("heartbeat")
        .into_inner();
    assert!(!hb.known);
    let err = agent
        .report_instances(pb::NodeInstanceReports {
            node_id: "ghost".into(),
            reports: Vec::new(),
        })
        .await
        .expect_err("unknown node");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    cc.shutdown().await;
}

#[tokio::test]
async fn reports_go_to_the_replica_that_says_it_leads() {
    let (a, b) = (FakeClc::default(), FakeClc::default());
    let (a_srv, b_srv) = (serve_clc(a.clone()).await, serve_clc(b.clone()).await);
    let mut cfg = config(&a_srv.endpoint());
    cfg.clc_endpoints.push(b_srv.endpoint());
    let cc = start(cfg).await.expect("start");
    let mut nc_link = agent(&cc).await;
    let nc_srv = serve_nc(FakeNc::new("node-1")).await;
    register(&mut nc_link, "node-1", &nc_srv.endpoint(), 4096).await;
    let report = |n| report_running(nc_link.clone(), n);
    // Nobody claims to lead: the first endpoint gets them.
    report(1).await;
    eventually("the report reaches the first replica", || {
        a.report_for(&iid(1)).is_some()
    })
    .await;
    // The second says it leads; after its next heartbeat answer, reports go there.
    b.leader.store(true, Ordering::SeqCst);
    let beats = b.log().heartbeats.len();
    eventually("a heartbeat reaches the leader", || {
        b.log().heartbeats.len() > beats + 1
    })
    .await;
    report(2).await;
    eventually("the report reaches the leader", || {
        b.report_for(&iid(2)).is_some()
    })
    .await;
    assert!(a.report_for(&iid(2)).is_none(), "not sent to the follower");
    cc.shutdown().await;
}

#[tokio::test]
async fn a_replica_that_comes_back_hears_from_the_zone_before_the_next_round() {
    // Rounds are far apart here; a replica that was down for one must not wait for the
    // next (were it elected meanwhile, it would hold every launch until then).
    let up = FakeClc::default();
    up.leader.store(true, Ordering::SeqCst);
    let up_srv = serve_clc(up.clone()).await;
    let probe = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let back_addr = probe.local_addr().expect("addr");
    drop(probe);
    let mut cfg = config(&up_srv.endpoint());
    cfg.clc_endpoints.push(format!("http://{back_addr}"));
    cfg.heartbeat_interval = Duration::from_secs(60);
    let cc = start(cfg).await.expect("start");
    eventually("the first round reaches the replica that is up", || {
        !up.log().heartbeats.is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let back = FakeClc::default();
    let _back_srv = serve_clc_on(
        back.clone(),
        TcpListener::bind(back_addr).await.expect("rebind"),
    )
    .await;
    eventually("the replica that came back hears a heartbeat", || {
        !back.log().heartbeats.is_empty()
    })
    .await;
    // Only the replica that missed a round was tried again.
    assert_eq!(
        up.log().heartbeats.len(),
        1,
        "the replica that was up got one round"
    );
    cc.shutdown().await;
}

#[tokio::test]
async fn a_replica_that_never_answers_does_not_hold_up_reports() {
    // A "replica" cut off by a partition: it accepts connections and never answers.
    let black_hole = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let silent = format!("http://{}", black_hole.local_addr().expect("addr"));
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((conn, _)) = black_hole.accept().await {
            open.push(conn);
        }
    });
    let leader = FakeClc::default();
    leader.leader.store(true, Ordering::SeqCst);
    let leader_srv = serve_clc(leader.clone()).await;
    let mut cfg = config(&leader_srv.endpoint());
    cfg.clc_endpoints.push(silent);
    let cc = start(cfg).await.expect("start");
    let mut nc_link = agent(&cc).await;
    let nc_srv = serve_nc(FakeNc::new("node-1")).await;
    register(&mut nc_link, "node-1", &nc_srv.endpoint(), 4096).await;
    // Heartbeats run every 100 ms; each round would wait 5 s for the silent replica if it
    // waited for every answer, and reports share the uplink's task with them.
    let beats = leader.log().heartbeats.len();
    let started = std::time::Instant::now();
    for n in 1..=5 {
        report_running(nc_link.clone(), n).await;
        eventually("the report reaches the leader", || {
            leader.report_for(&iid(n)).is_some()
        })
        .await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "five reports took {:?} with a silent replica",
        started.elapsed()
    );
    assert!(leader.log().heartbeats.len() > beats, "heartbeats go on");
    cc.shutdown().await;
    held.abort();
}

#[tokio::test]
async fn image_bytes_are_relayed_from_the_replica_that_holds_them() {
    use tokio_stream::StreamExt;
    let (a, b) = (FakeClc::default(), FakeClc::default());
    let bytes: Vec<u8> = (0..100u8).collect();
    b.images
        .lock()
        .unwrap()
        .insert("ab".repeat(32), bytes.clone());
    let (a_srv, b_srv) = (serve_clc(a.clone()).await, serve_clc(b.clone()).await);
    let mut cfg = config(&a_srv.endpoint());
    cfg.clc_endpoints.push(b_srv.endpoint());
    let cc = start(cfg).await.expect("start");
    let mut nc_link = agent(&cc).await;
    let mut stream = nc_link
        .fetch_image(pb::FetchImageRequest {
            sha256: "ab".repeat(32),
        })
        .await
        .expect("the second replica has it")
        .into_inner();
    let mut got = Vec::new();
    while let Some(chunk) = stream.next().await {
        got.extend(chunk.expect("chunk").data);
    }
    assert_eq!(got, bytes);
    let missing = nc_link
        .fetch_image(pb::FetchImageRequest {
            sha256: "cd".repeat(32),
        })
        .await
        .expect_err("nobody has it");
    assert_eq!(missing.code(), tonic::Code::NotFound);
    cc.shutdown().await;
}

#[tokio::test]
async fn snapshot_uploads_are_relayed_with_the_zone_in_their_header() {
    use pb::snapshot_upload::Part;
    let clc = FakeClc::default();
    let clc_server = serve_clc(clc.clone()).await;
    let cc = start(config(&clc_server.endpoint())).await.expect("start");
    let mut nc_link = agent(&cc).await;
    let parts = vec![
        pb::SnapshotUpload {
            part: Some(Part::Header(pb::SnapshotUploadHeader {
                snapshot_id: "snap-0123456789abcdef0".into(),
                volume_id: "vol-0123456789abcdef0".into(),
                node_id: "node-a".into(),
                size: 6,
                ..Default::default()
            })),
        },
        pb::SnapshotUpload {
            part: Some(Part::Chunk(b"abc".to_vec())),
        },
        pb::SnapshotUpload {
            part: Some(Part::Chunk(b"def".to_vec())),
        },
    ];
    let ack = nc_link
        .upload_snapshot(tokio_stream::iter(parts))
        .await
        .expect("relayed")
        .into_inner();
    assert_eq!(ack.state, "completed");
    let uploads = clc.log().uploads.clone();
    assert_eq!(uploads.len(), 1);
    let Some(Part::Header(header)) = &uploads[0][0].part else {
        panic!("the header first: {:?}", uploads[0]);
    };
    assert_eq!((header.zone.as_str(), header.size), (ZONE, 6));
    let bytes: Vec<u8> = uploads[0][1..]
        .iter()
        .flat_map(|p| match &p.part {
            Some(Part::Chunk(c)) => c.clone(),
            _ => panic!("chunks after the header"),
        })
        .collect();
    assert_eq!(bytes, b"abcdef");
    cc.shutdown().await;
}

#[tokio::test]
async fn a_silent_node_shows_as_unhealthy_in_the_zone_heartbeat() {
    let clc = FakeClc::default();
    let clc_server = serve_clc(clc.clone()).await;
    let mut cfg = config(&clc_server.endpoint());
    cfg.node_timeout = Duration::from_millis(400);
    let cc = start(cfg).await.expect("start");
    let mut agent = agent(&cc).await;
    register(&mut agent, "node-alive", "http://127.0.0.1:1", 4096).await;
    register(&mut agent, "node-silent", "http://127.0.0.1:1", 4096).await;

    let mut beating = agent.clone();
    let heartbeats = tokio::spawn(async move {
        loop {
            let beat = pb::NodeHeartbeatRequest {
                node_id: "node-alive".into(),
                applied_generation: 0,
            };
            let known = beating
                .node_heartbeat(beat)
                .await
                .expect("heartbeat")
                .into_inner()
                .known;
            assert!(known);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let healthy = |hb: &pb::ZoneHeartbeatRequest, node: &str| {
        hb.nodes
            .iter()
            .find(|n| n.node_id == node)
            .map(|n| n.healthy)
    };
    eventually("the silent node is reported unhealthy", || {
        clc.last_heartbeat().is_some_and(|hb| {
            healthy(&hb, "node-silent") == Some(false) && healthy(&hb, "node-alive") == Some(true)
        })
    })
    .await;
    let hb = clc.last_heartbeat().expect("heartbeat");
    let silent = hb
        .nodes
        .iter()
        .find(|n| n.node_id == "node-silent")
        .expect("summary");
    let alive = hb
        .nodes
        .iter()
        .find(|n| n.node_id == "node-alive")
        .expect("summary");
    assert!(silent.last_heartbeat_ms < alive.last_heartbeat_ms);
    assert_eq!(silent.hypervisor, "sim");
    assert_eq!(
        silent.hypervisor_detail,
        format!("{} simulates its guests", silent.node_id)
    );
    heartbeats.abort();
    cc.shutdown().await;
}

#[tokio::test]
async fn console_output_is_routed_to_the_instances_node() {
    let clc = FakeClc::default();
    let clc_server = serve_clc(clc.clone()).await;
    let cc = start(config(&clc_server.endpoint())).await.expect("start");
    let (a, b) = (FakeNc::new("node-a"), FakeNc::new("node-b"));
    let (a_srv, b_srv) = (serve_nc(a.clone()).await, serve_nc(b.clone()).await);
    let mut agent = agent(&cc).await;
    register(&mut agent, "node-a", &a_srv.endpoint(), 8192).await;
    register(&mut agent, "node-b", &b_srv.endpoint(), 8192).await;
    let mut ctl = controller(&cc).await;
    // Two instances that each fill a node, so one lands on each.
    ctl.put_zone_state(zone_doc(1, vec![spec(1, 8192), spec(2, 8192)]))
        .await
        .expect("put");
    eventually("documents delivered", || {
        a.last_put().is_some() && b.last_put().is_some()
    })
    .await;
    let on_a = a.instance_ids();
    let on_b = b.instance_ids();
    assert_eq!((on_a.len(), on_b.len()), (1, 1));

    for (instance, node) in [(&on_a[0], "node-a"), (&on_b[0], "node-b")] {
        let out = ctl
            .get_console_output(pb::ConsoleRequest {
                instance_id: instance.clone(),
            })
            .await
            .expect("console")
            .into_inner();
        assert_eq!(
            String::from_utf8_lossy(&out.output),
            format!("console of {instance} on {node}")
        );
    }
    let unknown = ctl
        .get_console_output(pb::ConsoleRequest {
            instance_id: iid(99),
        })
        .await
        .expect_err("unknown");
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    let malformed = ctl
        .get_console_output(pb::ConsoleRequest {
            instance_id: "x".into(),
        })
        .await
        .expect_err("bad");
    assert_eq!(malformed.code(), tonic::Code::InvalidArgument);

    // The node goes away: its console is unavailable, not "not found".
    a_srv.stop().await;
    let gone = ctl
        .get_console_output(pb::ConsoleRequest {
            instance_id: on_a[0].clone(),
        })
        .await
        .expect_err("node down");
    assert_eq!(gone.code(), tonic::Code::Unavailable);
    cc.shutdown().await;
}

#[tokio::test]
async fn a_node_that_missed_its_push_gets_it_from_the_resync_loop() {
    let clc = FakeClc::default();
    let clc_server = serve_clc(clc.clone()).await;
    let cc = start(config(&clc_server.endpoint())).await.expect("start");
    // The node registers from an address where nothing listens yet.
    let probe = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = probe.local_addr().expect("addr");
    drop(probe);
    let mut agent = agent(&cc).await;
    register(&mut agent, "node-late", &format!("http://{addr}"), 4096).await;
    let mut ctl = controller(&cc).await;
    ctl.put_zone_state(zone_doc(4, vec![spec(1, 1024)]))
        .await
        .expect("put");
    tokio::time::sleep(Duration::from_millis(200)).await;

    let nc = FakeNc::new("node-late");
    let _srv = serve_nc_on(nc.clone(), TcpListener::bind(addr).await.expect("rebind")).await;
    eventually("the resync loop delivers the document", || {
        nc.last_put().is_some_and(|p| p.generation == 4)
    })
    .await;
    assert_eq!(nc.instance_ids(), vec![iid(1)]);
    cc.shutdown().await;
}

#[tokio::test]
async fn a_restarted_cc_keeps_instances_where_the_clc_says_they_live() {
    let clc = FakeClc::default();
    let clc_server = serve_clc(clc.clone()).await;
    let cc = start(config(&clc_server.endpoint())).await.expect("start");
    let (a, b) = (FakeNc::new("node-a"), FakeNc::new("node-b"));
    let (a_srv, b_srv) = (serve_nc(a.clone()).await, serve_nc(b.clone()).await);
    let mut agent = agent(&cc).await;
    register(&mut agent, "node-a", &a_srv.endpoint(), 2048).await;
    register(&mut agent, "node-b", &b_srv.endpoint(), 16384).await;
    // Instance 1 already lives on the small node (the CLC's hint); it must stay there.
    let hinted = pb::InstanceSpec {
        node_id: "node-a".into(),
        ..spec(1, 2048)
    };
    let mut ctl = controller(&cc).await;
    ctl.put_zone_state(zone_doc(9, vec![hinted, spec(2, 1024)]))
        .await
        .expect("put");
    eventually("documents delivered", || {
        a.last_put().is_some() && b.last_put().is_some()
    })
    .await;
    assert_eq!(a.instance_ids(), vec![iid(1)]);
    assert_eq!(b.instance_ids(), vec![iid(2)]);
    cc.shutdown().await;
}

#[tokio::test]
async fn bad_configuration_is_refused_at_start() {
    let mut cfg = config("http://127.0.0.1:1");
    cfg.clc_endpoints.clear();
    assert!(start(cfg).await.is_err());
    let mut cfg = config("http://127.0.0.1:1");
    cfg.resync_interval = Duration::ZERO;
    assert!(start(cfg).await.is_err());
}
