//! The node agent's domain types: the desired state the CC pushes and the reports the node
//! sends back, free of prost types (see `convert.rs` for the edge).

use std::collections::BTreeMap;

use canopy_common::{BootImages, ImageId, InstanceId, InstanceState, PowerState, Resources};

use crate::hypervisor::DomainSpec;

/// EC2 state-reason codes the node reports. They are AWS's own codes, so the CLC can show
/// them in `DescribeInstances` (`stateReason`) unchanged.
pub mod reason {
    /// StopInstances or TerminateInstances: the control plane asked for it.
    pub const USER_INITIATED_SHUTDOWN: &str = "Client.UserInitiatedShutdown";
    /// The guest powered itself off (`poweroff`, `shutdown -h`) while it should run.
    pub const INSTANCE_INITIATED_SHUTDOWN: &str = "Client.InstanceInitiatedShutdown";
    /// The node failed the instance: a define or start failed, or the guest crashed.
    pub const INTERNAL_ERROR: &str = "Server.InternalError";
    /// The host had no room left for the instance when it tried to define it.
    pub const INSUFFICIENT_CAPACITY: &str = "Server.InsufficientInstanceCapacity";
}

/// One instance of the desired-state document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredInstance {
    pub instance_id: InstanceId,
    /// The EC2 type name, kept for logs and metadata; `resources` is what counts.
    pub instance_type: String,
    pub resources: Resources,
    pub image_id: ImageId,
    pub user_data: Vec<u8>,
    pub key_name: Option<String>,
    pub desired: PowerState,
    /// Bumped by every RebootInstances; the node reboots when it sees a larger value.
    pub reboot_seq: u64,
    /// Bumped by every StartInstances: a larger value than the agent has seen is a new
    /// start, which restarts a guest that had stopped on its own.
    pub start_seq: u64,
    /// Its private address, given by the zone's CC: the metadata service knows the
    /// instance by it.
    pub private_ip: Option<std::net::Ipv4Addr>,
    /// The rest of what the metadata service serves.
    pub metadata: canopy_common::InstanceMetadata,
    /// The image bytes it boots from.
    pub boot: BootImages,
    /// The volumes it should have attached.
    pub volumes: Vec<canopy_common::VolumeAttachment>,
}

impl DesiredInstance {
    /// The domain the hypervisor defines for this instance.
    pub fn domain_spec(&self) -> DomainSpec {
        let mut spec = DomainSpec::new(
            self.instance_id.clone(),
            self.resources,
            self.image_id.clone(),
            self.user_data.clone(),
        );
        spec.boot = self.boot.clone();
        spec
    }
}

/// The full desired state of the node, stamped with the CC's generation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub generation: u64,
    pub instances: BTreeMap<InstanceId, DesiredInstance>,
    /// Volumes deleted lately, whose bytes the node removes if it holds them.
    pub deleted_volumes: Vec<canopy_common::VolumeId>,
    /// Snapshots pending in the zone: the node takes those of volumes it holds.
    pub snapshots: Vec<canopy_common::SnapshotRequest>,
}

/// Why an instance is in its state, in EC2 terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateReason {
    /// One of the [`reason`] codes.
    pub code: &'static str,
    pub message: String,
}

impl StateReason {
    /// A reason with one of the [`reason`] codes.
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        StateReason {
            code,
            message: message.into(),
        }
    }
}

/// What the node reports about one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceReport {
    pub instance_id: InstanceId,
    pub state: InstanceState,
    pub reason: Option<StateReason>,
    /// The last `reboot_seq` this node applied (or adopted) for the instance.
    pub reboot_seq: u64,
    /// The volumes attached to its domain now, sorted.
    pub volumes: Vec<canopy_common::VolumeId>,
}

/// The result of offering a desired-state document to the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PutOutcome {
    /// The generation the node now holds.
    pub applied_generation: u64,
    /// True when the offered generation was older than the applied one and was ignored.
    pub stale: bool,
}
