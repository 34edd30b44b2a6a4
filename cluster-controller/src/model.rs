//! The cluster controller's domain types: what the zone is asked to run, what nodes report,
//! and what the CC reports upward. No prost type appears here; `convert` translates at the
//! gRPC edge.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use canopy_common::{
    BootImages, ImageId, InstanceId, InstanceState, NodeId, PowerState, Resources, ZoneName,
};

/// EC2's reason code for an instance that no node could take.
pub const INSUFFICIENT_CAPACITY: &str = "Server.InsufficientInstanceCapacity";
/// EC2's reason code for a termination the user asked for.
pub const USER_INITIATED_SHUTDOWN: &str = "Client.UserInitiatedShutdown";

/// A point in time as both clocks see it. Health is decided on the monotonic clock (so a
/// wall-clock jump cannot mark every node dead); summaries carry the wall clock because the
/// CLC compares it with its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Moment {
    /// The monotonic reading.
    pub mono: Instant,
    /// Unix milliseconds at the same moment.
    pub unix_ms: i64,
}

impl Moment {
    /// The current moment.
    pub fn now() -> Self {
        let unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        Self {
            mono: Instant::now(),
            unix_ms,
        }
    }

    /// The moment `d` later, on both clocks; lets tests step time without sleeping.
    pub fn after(self, d: Duration) -> Self {
        let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        Self {
            mono: self.mono + d,
            unix_ms: self.unix_ms.saturating_add(ms),
        }
    }
}

/// One instance as the CLC wants it, passed on to the node it is assigned to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceSpec {
    pub id: InstanceId,
    /// The EC2 instance type name; informational here, `resources` is what placement uses.
    pub instance_type: String,
    pub resources: Resources,
    pub image: Option<ImageId>,
    pub user_data: Vec<u8>,
    pub key_name: Option<String>,
    pub desired: PowerState,
    /// Bumped by every RebootInstances; the node reboots when it sees a larger value.
    pub reboot_seq: u64,
    /// Bumped by every StartInstances; passed on to the node.
    pub start_seq: u64,
    /// Towards the CC: the private address the CLC last heard of (kept after a CC restart).
    /// Towards a node: the address the CC gave the instance.
    pub private_ip: Option<std::net::Ipv4Addr>,
    /// For the node's metadata service; the CC passes it on untouched.
    pub metadata: canopy_common::InstanceMetadata,
    /// Towards the CC: the node the CLC last saw the instance on (a hint). Towards a node:
    /// the node it is assigned to.
    pub node: Option<NodeId>,
    /// What it boots from, passed on to the node as the CLC sent it.
    pub boot: BootImages,
    /// The volumes it should have attached, passed on to the node.
    pub volumes: Vec<canopy_common::VolumeAttachment>,
}

/// The whole desired state of the zone, stamped with the CLC's generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZoneDesired {
    pub zone: ZoneName,
    pub generation: u64,
    pub instances: Vec<InstanceSpec>,
    /// Volumes deleted lately; passed on to every node (any may hold the bytes).
    pub deleted_volumes: Vec<canopy_common::VolumeId>,
    /// Snapshots pending; passed on to every node (the one holding the volume takes it).
    pub snapshots: Vec<canopy_common::SnapshotRequest>,
}

/// The desired state of one node: the zone's instances assigned to it, same generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeDesired {
    pub node: NodeId,
    pub generation: u64,
    pub instances: Vec<InstanceSpec>,
    pub deleted_volumes: Vec<canopy_common::VolumeId>,
    pub snapshots: Vec<canopy_common::SnapshotRequest>,
}

/// Why an instance is in its state, in EC2's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateReason {
    pub code: String,
    pub message: String,
}

/// What is observed about one instance, by its node or (for instances never placed) by
/// the CC itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceReport {
    pub instance: InstanceId,
    /// The node that runs it; `None` for instances that never reached a node.
    pub node: Option<NodeId>,
    pub state: InstanceState,
    pub reason: Option<StateReason>,
    pub reboot_seq: u64,
    /// Set by the CC from its assignment: the instance's private address.
    pub private_ip: Option<std::net::Ipv4Addr>,
    /// The volumes its node has attached to it.
    pub volumes: Vec<canopy_common::VolumeId>,
}

/// An NC announcing itself (at start, or again after the CC forgot it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRegistration {
    pub node: NodeId,
    /// Where the CC reaches the NC's `NodeController` service.
    pub endpoint: String,
    pub capacity: Resources,
    pub hypervisor: String,
    pub hypervisor_detail: String,
    /// What the node already runs, so a restarted CC rebuilds its assignments.
    pub instances: Vec<InstanceReport>,
}

/// One node as the zone heartbeat describes it to the CLC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSummary {
    pub node: NodeId,
    pub hypervisor: String,
    pub hypervisor_detail: String,
    pub capacity: Resources,
    /// Resources of the instances assigned to the node that are not terminated.
    pub allocated: Resources,
    pub healthy: bool,
    pub last_heartbeat_unix_ms: i64,
    /// Instances assigned to the node that are not terminated.
    pub instance_count: u32,
}
