//! The cloud controller's configuration, validated once at start.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use canopy_common::RegionName;

/// The Elastic IP pool unless configured: TEST-NET-2, addresses that route nowhere, so
/// that a cloud without a configured pool still allocates (they are labels until
/// networking routes them).
pub const DEFAULT_PUBLIC_POOL: &str = "198.51.100.0/24";

#[derive(Debug, Clone)]
pub struct ClcConfig {
    pub region: RegionName,
    /// Holds `clc.db` (the state) and the admin token.
    pub data_dir: PathBuf,
    /// EC2 Query API (HTTP).
    pub ec2_listen: SocketAddr,
    /// Admin API (HTTP/JSON).
    pub admin_listen: SocketAddr,
    /// gRPC service the cluster controllers call.
    pub grpc_listen: SocketAddr,
    /// How far a request's signing time may be from ours (AWS: 15 minutes).
    pub max_clock_skew: Duration,
    /// A zone whose CC has not heartbeated for this long is unavailable.
    pub zone_timeout: Duration,
    /// Desired state is re-pushed to every zone at least this often.
    pub resync_interval: Duration,
    /// Terminated instances stay visible this long (AWS: about an hour).
    pub terminated_retention: Duration,
    /// Bearer token accepted by the admin API, besides SigV4 with an admin account's key.
    pub admin_token: Option<String>,
    /// This replica's place in the replicated CLC.
    pub replica: ReplicaConfig,
    /// Where Elastic IPs come from (every replica must have the same).
    pub public_pool: Vec<canopy_common::Ipv4Subnet>,
    /// How its gRPC (Raft, the CCs) talks: mutual TLS with the replica's certificate, or
    /// plaintext (dev only).
    pub transport: canopy_pki::Transport,
    /// The cloud CA, when this replica holds its key: it signs joining nodes' certificates.
    pub ca: Option<Arc<canopy_pki::CertificateAuthority>>,
}

/// A CLC replica's identity and peers. One replica alone is a valid group.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    /// This replica's id, unique in the group (1 for a single replica).
    pub id: u64,
    /// Where Raft RPCs (and requests forwarded by other replicas) are served.
    pub raft_listen: SocketAddr,
    /// The URL other replicas reach this one at; `None`: `http://` + the bound address.
    pub raft_advertise: Option<String>,
    /// The group's first members, id → Raft URL. Empty: a group of this replica alone.
    /// Used once, when the replica's log is empty; later changes go through the admin API.
    pub initial_members: BTreeMap<u64, String>,
    /// Start with an empty log and wait to be added through the admin API, instead of
    /// forming a group.
    pub join: bool,
    /// Raft timing and the request wait bound.
    pub timers: crate::replication::raft::RaftTimers,
}

impl Default for ReplicaConfig {
    fn default() -> Self {
        Self {
            id: 1,
            raft_listen: SocketAddr::from(([127, 0, 0, 1], 8778)),
            raft_advertise: None,
            initial_members: BTreeMap::new(),
            join: false,
            timers: Default::default(),
        }
    }
}

impl ClcConfig {
    /// Defaults for everything but where the state lives.
    pub fn new(data_dir: PathBuf) -> Self {
        Self {
            region: RegionName::parse("canopy-1").expect("valid default region"),
            data_dir,
            ec2_listen: SocketAddr::from(([127, 0, 0, 1], 8773)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 8774)),
            grpc_listen: SocketAddr::from(([127, 0, 0, 1], 8776)),
            max_clock_skew: Duration::from_secs(15 * 60),
            zone_timeout: Duration::from_secs(10),
            resync_interval: Duration::from_secs(5),
            terminated_retention: Duration::from_secs(3600),
            admin_token: None,
            replica: ReplicaConfig::default(),
            public_pool: vec![
                canopy_common::Ipv4Subnet::parse(DEFAULT_PUBLIC_POOL)
                    .expect("the default pool is valid"),
            ],
            transport: canopy_pki::Transport::Plaintext,
            ca: None,
        }
    }
}
