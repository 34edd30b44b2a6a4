//! The cluster controller over mutual TLS on 127.0.0.1: nodes with a certificate from the
//! cloud CA are served; rogue nodes (no TLS, no certificate, another CA's certificate, a
//! revoked one, another node's name, another role) are refused, and the zone keeps
//! serving the good ones. A fake CLC (also on TLS) hands out the revocation list and signs
//! certificates for joins relayed by the CC.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use canopy_cluster_controller::{CcConfig, ClusterHandle, start};
use canopy_common::ZoneName;
use canopy_pki::{CertificateAuthority, Identity, Revocations, Role, TlsFiles, Transport};
use canopy_proto::v1 as pb;
use canopy_proto::v1::cloud_controller_server::{CloudController, CloudControllerServer};
use canopy_proto::v1::enrollment_client::EnrollmentClient;
use canopy_proto::v1::zone_agent_client::ZoneAgentClient;
use tokio::net::TcpListener;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status};

const ZONE: &str = "tls-1a";
const TOKEN_SECRET: &str = "the-secret";

fn transport(ca: &CertificateAuthority, role: Role, name: &str) -> (Transport, String) {
    let (files, serial) = ca
        .issue_files(&Identity::new(role, name).unwrap(), &[])
        .unwrap();
    (
        Transport::tls(&files, Revocations::default()).unwrap(),
        serial,
    )
}

/// A CLC that knows the zone, leads, and answers heartbeats with `revoked`.
#[derive(Clone)]
struct FakeClc {
    ca: Arc<CertificateAuthority>,
    revoked: Arc<Mutex<Vec<String>>>,
}

#[tonic::async_trait]
impl CloudController for FakeClc {
    async fn register_zone(
        &self,
        _: Request<pb::RegisterZoneRequest>,
    ) -> Result<Response<pb::RegisterZoneResponse>, Status> {
        Ok(Response::new(pb::RegisterZoneResponse {
            region: "tls-1".into(),
        }))
    }

    async fn zone_heartbeat(
        &self,
        _: Request<pb::ZoneHeartbeatRequest>,
    ) -> Result<Response<pb::ZoneHeartbeatResponse>, Status> {
        Ok(Response::new(pb::ZoneHeartbeatResponse {
            known: true,
            leader: true,
            revoked_serials: self.revoked.lock().unwrap().clone(),
        }))
    }

    async fn report_instances(
        &self,
        _: Request<pb::ZoneInstanceReports>,
    ) -> Result<Response<pb::ReportAck>, Status> {
        Ok(Response::new(pb::ReportAck {}))
    }

    type FetchImageStream =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::ImageChunk, Status>> + Send>>;

    async fn fetch_image(
        &self,
        _: Request<pb::FetchImageRequest>,
    ) -> Result<Response<Self::FetchImageStream>, Status> {
        Err(Status::not_found("no images here"))
    }

    async fn upload_snapshot(
        &self,
        _: Request<tonic::Streaming<pb::SnapshotUpload>>,
    ) -> Result<Response<pb::SnapshotUploadAck>, Status> {
        Err(Status::unimplemented("no snapshots here"))
    }

    async fn join_node(
        &self,
        req: Request<pb::JoinNodeRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        // The CC speaks for its own zone only.
        canopy_pki::require_name(&req, Role::Zone, &req.get_ref().zone)?;
        let req = req.into_inner();
        let join = req.join.unwrap();
        if join.token_secret != TOKEN_SECRET {
            return Err(Status::permission_denied("invalid join token"));
        }
        let id = Identity::new(Role::Node, &join.node_id).unwrap();
        let issued = self
            .ca
            .sign_request(&join.csr_pem, &id, &[])
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(pb::JoinResponse {
            certificate_pem: issued.cert_pem,
            ca_pem: self.ca.cert_pem().to_owned(),
            zone: req.zone,
        }))
    }
}

struct Cloud {
    ca: Arc<CertificateAuthority>,
    clc: FakeClc,
    cc: ClusterHandle,
}

impl Cloud {
    async fn start() -> Cloud {
        let ca = Arc::new(CertificateAuthority::create("test").unwrap());
        let clc = FakeClc {
            ca: ca.clone(),
            revoked: Arc::default(),
        };
        let (clc_transport, _) = transport(&ca, Role::Clc, "1");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let clc_addr = listener.local_addr().unwrap();
        let incoming = clc_transport.incoming(listener, false).unwrap();
        let service = CloudControllerServer::with_interceptor(
            clc.clone(),
            clc_transport.authorize(&[Role::Zone]),
        );
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming),
        );
        let mut config = CcConfig::new(
            ZoneName::parse(ZONE).unwrap(),
            "127.0.0.1:0".parse().unwrap(),
            vec![format!("https://{clc_addr}")],
        );
        config.heartbeat_interval = Duration::from_millis(100);
        config.transport = transport(&ca, Role::Zone, ZONE).0;
        let cc = start(config).await.unwrap();
        Cloud { ca, clc, cc }
    }

    fn endpoint(&self) -> Endpoint {
        Endpoint::from_shared(format!("https://{}", self.cc.local_addr()))
            .unwrap()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(5))
    }

    /// A node's client with `transport`.
    fn agent(&self, transport: &Transport) -> ZoneAgentClient<Channel> {
        ZoneAgentClient::new(transport.channel(self.endpoint(), Role::Zone))
    }
}

fn registration(node: &str) -> pb::RegisterNodeRequest {
    pb::RegisterNodeRequest {
        node_id: node.into(),
        endpoint: "http://127.0.0.1:1".into(),
        capacity: Some(pb::Resources {
            vcpus: 4,
            memory_mib: 4096,
            disk_gib: 100,
        }),
        hypervisor: "sim".into(),
        instances: Vec::new(),
        hypervisor_detail: String::new(),
    }
}

fn heartbeat(node: &str) -> pb::NodeHeartbeatRequest {
    pb::NodeHeartbeatRequest {
        node_id: node.into(),
        applied_generation: 0,
    }
}

#[tokio::test]
async fn rogue_nodes_are_refused_and_the_zone_keeps_serving_good_ones() {
    let cloud = Cloud::start().await;
    let (good, _) = transport(&cloud.ca, Role::Node, "hv-1");
    let zone = cloud
        .agent(&good)
        .register_node(registration("hv-1"))
        .await
        .expect("a node with a certificate from the cloud CA registers")
        .into_inner()
        .zone;
    assert_eq!(zone, ZONE);

    // No TLS at all.
    let plain = cloud
        .agent(&Transport::Plaintext)
        .register_node(registration("hv-9"))
        .await;
    assert!(plain.is_err(), "a plaintext node registered: {plain:?}");

    // TLS, but no certificate: only enrollment serves it.
    let fingerprint = canopy_pki::fingerprint(
        &canopy_pki::files::pem_certificates(cloud.ca.cert_pem()).unwrap()[0],
    );
    let anonymous = canopy_pki::pinned_channel(cloud.endpoint(), &fingerprint, Role::Zone).unwrap();
    let refused = ZoneAgentClient::new(anonymous)
        .register_node(registration("hv-9"))
        .await
        .expect_err("a node without a certificate registered");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");

    // A certificate from another CA: the handshake fails.
    let other = CertificateAuthority::create("other").unwrap();
    let (foreign, _) = transport(&other, Role::Node, "hv-9");
    let refused = cloud
        .agent(&foreign)
        .register_node(registration("hv-9"))
        .await;
    assert!(
        refused.is_err(),
        "a foreign CA's node registered: {refused:?}"
    );

    // A good certificate speaking for another node.
    let refused = cloud
        .agent(&good)
        .register_node(registration("hv-2"))
        .await
        .expect_err("hv-1 registered as hv-2");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let refused = cloud
        .agent(&good)
        .node_heartbeat(heartbeat("hv-2"))
        .await
        .expect_err("hv-1 heartbeated as hv-2");
    assert_eq!(refused.code(), Code::PermissionDenied);

    // Another role's certificate (a zone's) on the nodes' service.
    let (zone_cert, _) = transport(&cloud.ca, Role::Zone, "hv-9");
    let refused = cloud
        .agent(&zone_cert)
        .register_node(registration("hv-9"))
        .await
        .expect_err("a zone certificate registered a node");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");

    // The good node still works.
    let answer = cloud
        .agent(&good)
        .node_heartbeat(heartbeat("hv-1"))
        .await
        .expect("the good node heartbeats")
        .into_inner();
    assert!(answer.known);
}

#[tokio::test]
async fn a_revoked_node_is_cut_off_even_on_an_open_connection() {
    let cloud = Cloud::start().await;
    let (good, _) = transport(&cloud.ca, Role::Node, "hv-1");
    let (doomed, doomed_serial) = transport(&cloud.ca, Role::Node, "hv-2");
    let mut good_client = cloud.agent(&good);
    let mut doomed_client = cloud.agent(&doomed);
    good_client
        .register_node(registration("hv-1"))
        .await
        .unwrap();
    doomed_client
        .register_node(registration("hv-2"))
        .await
        .unwrap();
    assert!(
        doomed_client
            .node_heartbeat(heartbeat("hv-2"))
            .await
            .unwrap()
            .into_inner()
            .known
    );

    cloud
        .clc
        .revoked
        .lock()
        .unwrap()
        .push(doomed_serial.clone());
    // The CC learns the list from its next heartbeat to the CLC (every 100 ms here); the
    // open connection is refused at its next request.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let refused = loop {
        match doomed_client.node_heartbeat(heartbeat("hv-2")).await {
            Err(status) => break status,
            Ok(_) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the revoked node is still served"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("revoked"), "{refused:?}");
    // A new connection does not get past the handshake.
    let fresh = cloud.agent(&doomed).node_heartbeat(heartbeat("hv-2")).await;
    assert!(
        fresh.is_err(),
        "a new connection of a revoked node: {fresh:?}"
    );

    // The others go on, and learn the list (their servers refuse the serial too).
    let answer = good_client
        .node_heartbeat(heartbeat("hv-1"))
        .await
        .expect("the good node heartbeats")
        .into_inner();
    assert!(answer.known);
    assert_eq!(answer.revoked_serials, vec![doomed_serial]);
}

#[tokio::test]
async fn a_node_joins_through_the_cc_when_the_token_pins_its_ca() {
    let cloud = Cloud::start().await;
    let fingerprint = canopy_pki::fingerprint(
        &canopy_pki::files::pem_certificates(cloud.ca.cert_pem()).unwrap()[0],
    );
    let (key_pem, csr_pem) = canopy_pki::new_key_and_request().unwrap();
    let request = |secret: &str| pb::JoinRequest {
        token_id: "0123456789abcdef".into(),
        token_secret: secret.into(),
        node_id: "hv-new".into(),
        csr_pem: csr_pem.clone(),
    };

    // A token naming another CA: the node does not even send its secret.
    let other = CertificateAuthority::create("other").unwrap();
    let wrong =
        canopy_pki::fingerprint(&canopy_pki::files::pem_certificates(other.cert_pem()).unwrap()[0]);
    let channel = canopy_pki::pinned_channel(cloud.endpoint(), &wrong, Role::Zone).unwrap();
    let refused = EnrollmentClient::new(channel)
        .join(request(TOKEN_SECRET))
        .await;
    assert!(
        refused.is_err(),
        "joined through a CC of another CA: {refused:?}"
    );

    let channel = canopy_pki::pinned_channel(cloud.endpoint(), &fingerprint, Role::Zone).unwrap();
    let mut enrollment = EnrollmentClient::new(channel);
    let refused = enrollment
        .join(request("wrong"))
        .await
        .expect_err("a wrong secret joined");
    assert_eq!(refused.code(), Code::PermissionDenied);

    let joined = enrollment
        .join(request(TOKEN_SECRET))
        .await
        .expect("the join is relayed to the CLC")
        .into_inner();
    assert_eq!(joined.zone, ZONE);
    let files = TlsFiles {
        ca_pem: joined.ca_pem,
        cert_pem: joined.certificate_pem,
        key_pem,
    };
    let node = Transport::tls(&files, Revocations::default()).expect("the issued files load");
    let zone = cloud
        .agent(&node)
        .register_node(registration("hv-new"))
        .await
        .expect("the joined node registers with its new certificate")
        .into_inner()
        .zone;
    assert_eq!(zone, ZONE);
}
