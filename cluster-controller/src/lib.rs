//! Canopy's cluster controller (CC): one per availability zone, between the cloud
//! controller (CLC) and the node controllers (NCs) of the zone.
//!
//! - Towards the CLC it registers the zone, heartbeats node summaries, and forwards
//!   instance reports (promptly, and in full every resync interval).
//! - From the CLC it takes the zone's desired state (`PutZoneState`), assigns instances to
//!   nodes and pushes each node its share; it routes console requests to the right node.
//! - From the NCs it takes registrations, heartbeats and instance reports.
//!
//! The decisions live in the pure [`ZoneState`] (no I/O, no clock reads; unit-tested);
//! the gRPC services and background loops around it only convert, lock, and execute.

pub mod convert;
pub mod error;
pub mod model;
mod nodes;
mod runtime;
mod service;
mod uplink;
pub mod zone;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use canopy_common::{Ipv4Subnet, ZoneName};
use canopy_proto::v1::cloud_controller_client::CloudControllerClient;
use canopy_proto::v1::cluster_controller_server::ClusterControllerServer;
use canopy_proto::v1::enrollment_server::EnrollmentServer;
use canopy_proto::v1::zone_agent_server::ZoneAgentServer;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tonic::transport::Endpoint;

pub use error::CcError;
pub use model::{
    INSUFFICIENT_CAPACITY, InstanceReport, InstanceSpec, Moment, NodeDesired, NodeRegistration,
    NodeSummary, StateReason, ZoneDesired,
};
pub use nodes::NODE_RPC_TIMEOUT;
pub use zone::{ApplyOutcome, CapacityFailure, NodePush, NodeTarget, Plan, Registered, ZoneState};

/// The subnet a zone's instances get addresses from unless configured: 65,531 addresses.
/// Zones that should not overlap need their own (`canopy dev` gives each zone one).
pub const DEFAULT_SUBNET: &str = "172.31.0.0/16";

/// How long `shutdown` waits for in-flight requests before cutting them off.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Configuration of one cluster controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CcConfig {
    /// The availability zone this CC runs.
    pub zone: ZoneName,
    /// Where the one gRPC server listens: `ZoneAgent` for NCs and `ClusterController` for
    /// the CLC. Port 0 picks a free port (see [`ClusterHandle::local_addr`]).
    pub listen: SocketAddr,
    /// The endpoint the CLC uses to reach us; default `http://{bound address}`.
    pub advertise: Option<String>,
    /// CLC endpoints, e.g. `["http://127.0.0.1:8776"]`; on failure the next is tried.
    pub clc_endpoints: Vec<String>,
    /// How often the zone heartbeats to the CLC.
    pub heartbeat_interval: Duration,
    /// A node silent this long is unhealthy: it gets no new instances.
    pub node_timeout: Duration,
    /// How often documents are re-pushed to nodes that are behind and all reports are
    /// re-sent to the CLC.
    pub resync_interval: Duration,
    /// The zone's subnet: every instance gets a private address from it, unique in the zone.
    pub subnet: Ipv4Subnet,
    /// How its gRPC talks: mutual TLS with the zone's certificate, or plaintext (dev only).
    pub transport: canopy_pki::Transport,
}

impl CcConfig {
    /// A configuration with the default intervals (heartbeat 2 s, node timeout 10 s,
    /// resync 5 s) and the advertised endpoint derived from the bound address.
    pub fn new(zone: ZoneName, listen: SocketAddr, clc_endpoints: Vec<String>) -> Self {
        Self {
            zone,
            listen,
            advertise: None,
            clc_endpoints,
            heartbeat_interval: Duration::from_secs(2),
            node_timeout: Duration::from_secs(10),
            resync_interval: Duration::from_secs(5),
            subnet: Ipv4Subnet::parse(DEFAULT_SUBNET).expect("the default subnet is valid"),
            transport: canopy_pki::Transport::Plaintext,
        }
    }

    /// Checks what `start` cannot work without; returns the parsed CLC endpoints.
    fn validate(&self) -> Result<Vec<Endpoint>, CcError> {
        if self.clc_endpoints.is_empty() {
            return Err(CcError::Config(
                "clc_endpoints: at least one cloud controller endpoint is needed".into(),
            ));
        }
        for (key, d) in [
            ("heartbeat_interval", self.heartbeat_interval),
            ("node_timeout", self.node_timeout),
            ("resync_interval", self.resync_interval),
        ] {
            if d.is_zero() {
                return Err(CcError::Config(format!("{key}: must be longer than zero")));
            }
        }
        self.clc_endpoints
            .iter()
            .map(|e| {
                Endpoint::from_shared(e.clone()).map_err(|err| {
                    CcError::Config(format!("clc_endpoints: {e:?} is not a URI: {err}"))
                })
            })
            .collect()
    }
}

/// A running cluster controller. Dropping it stops the background loops and the server;
/// [`ClusterHandle::shutdown`] does so and waits.
#[derive(Debug)]
pub struct ClusterHandle {
    local_addr: SocketAddr,
    stop_server: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<()>>,
    loops: Vec<JoinHandle<()>>,
}

impl ClusterHandle {
    /// The address the gRPC server is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops the loops, lets in-flight requests finish (for a few seconds at most) and
    /// waits for the server to stop.
    pub async fn shutdown(mut self) {
        for task in self.loops.drain(..) {
            task.abort();
            // The only error left is the cancellation just asked for.
            let _ = task.await;
        }
        if let Some(stop) = self.stop_server.take() {
            let _ = stop.send(());
        }
        if let Some(mut server) = self.server.take()
            && tokio::time::timeout(SHUTDOWN_GRACE, &mut server)
                .await
                .is_err()
        {
            server.abort();
        }
    }
}

impl Drop for ClusterHandle {
    fn drop(&mut self) {
        for task in &self.loops {
            task.abort();
        }
        // Dropping `stop_server` stops the server gracefully on its own.
    }
}

/// Starts a cluster controller: binds the gRPC server, then registers with the CLC (in the
/// background, retrying until it answers) and starts the heartbeat and resync loops.
///
/// Fails only on an unusable configuration or when the address cannot be bound.
pub async fn start(config: CcConfig) -> Result<ClusterHandle, CcError> {
    let clc = config.validate()?;
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| CcError::Bind {
            addr: config.listen,
            source,
        })?;
    let local_addr = listener.local_addr().map_err(|source| CcError::Bind {
        addr: config.listen,
        source,
    })?;
    let advertise = config
        .advertise
        .clone()
        .unwrap_or_else(|| format!("http://{local_addr}"));
    if Endpoint::from_shared(advertise.clone()).is_err() {
        return Err(CcError::Config(format!(
            "advertise: {advertise:?} is not a URI"
        )));
    }

    let (reports_tx, reports_rx) = mpsc::channel(runtime::REPORT_QUEUE);
    let shared = Arc::new(runtime::Shared::new(
        ZoneState::new(config.zone.clone(), config.node_timeout, config.subnet),
        reports_tx,
        config.transport.clone(),
    ));
    let transport = &config.transport;
    if let canopy_pki::Transport::Tls(tls) = transport
        && (tls.own.identity.role != canopy_pki::Role::Zone
            || tls.own.identity.name != config.zone.to_string())
    {
        return Err(CcError::Config(format!(
            "tls: the certificate is for {}, not zone/{}",
            tls.own.identity, config.zone
        )));
    }
    let svc = service::CcService {
        shared: Arc::clone(&shared),
        clc: clc
            .iter()
            .map(|e| {
                CloudControllerClient::new(transport.channel(
                    e.clone().connect_timeout(Duration::from_secs(2)),
                    canopy_pki::Role::Clc,
                ))
            })
            .collect(),
        upload_next: Default::default(),
    };

    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    // Anonymous clients finish the handshake: enrollment serves them, nothing else does.
    let incoming = transport
        .incoming(listener, true)
        .map_err(|e| CcError::Config(format!("tls: {e}")))?;
    use canopy_pki::Role;
    let server = tonic::transport::Server::builder()
        .add_service(ZoneAgentServer::with_interceptor(
            svc.clone(),
            transport.authorize(&[Role::Node]),
        ))
        .add_service(EnrollmentServer::new(svc.clone()))
        .add_service(ClusterControllerServer::with_interceptor(
            svc,
            transport.authorize(&[Role::Clc]),
        ));
    let server = tokio::spawn(async move {
        // Either an explicit stop or a dropped handle ends the server.
        let stopped = async {
            let _ = stop_rx.await;
        };
        if let Err(err) = server.serve_with_incoming_shutdown(incoming, stopped).await {
            tracing::error!(error = %err, "cluster controller gRPC server failed");
        }
    });

    let uplink = tokio::spawn(uplink::uplink_loop(
        Arc::clone(&shared),
        uplink::ClcLink::new(clc, config.transport.clone()),
        reports_rx,
        advertise.clone(),
        uplink::UplinkTiming {
            heartbeat: config.heartbeat_interval,
            resync: config.resync_interval,
        },
    ));
    let resync = tokio::spawn(nodes::resync_loop(shared, config.resync_interval));
    tracing::info!(zone = %config.zone, %local_addr, %advertise, "cluster controller started");
    Ok(ClusterHandle {
        local_addr,
        stop_server: Some(stop_tx),
        server: Some(server),
        loops: vec![uplink, resync],
    })
}
