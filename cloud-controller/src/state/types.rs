use canopy_common::{
    AccountId, BootImages, ImageId, ImageKind, ImageRef, InstanceId, InstanceState, KeyPairId,
    NodeId, PowerState, ReservationId, Resources, SecurityGroupId, SecurityGroupRuleId,
    Sha256Digest, ZoneName,
};
use std::net::Ipv4Addr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub const RESOURCE_TYPE_INSTANCE: &str = "instance";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub account_id: AccountId,
    pub name: String,
    pub is_admin: bool,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    pub image_id: ImageId,
    pub owner_id: AccountId,
    pub name: String,
    pub description: String,
    pub location: String,
    pub architecture: String,
    pub is_public: bool,
    /// EC2's `imageState`: `available`; `pending` or `failed` for one CreateImage is
    /// making; `deregistered` (kept while instances need it).
    pub state: String,
    pub created_at: DateTime<Utc>,
    /// Machine, kernel or ramdisk. Images logged before issue 4 are machine images.
    #[serde(default)]
    pub kind: ImageKind,
    /// The kernel and ramdisk a machine image boots with unless RunInstances names others.
    #[serde(default)]
    pub kernel_id: Option<ImageId>,
    #[serde(default)]
    pub ramdisk_id: Option<ImageId>,
    /// The bytes in the CLC's image store; `None` for an image without content (simulated
    /// nodes only).
    #[serde(default)]
    pub sha256: Option<Sha256Digest>,
    #[serde(default)]
    pub size_bytes: u64,
    /// `qcow2` or `raw` for a machine image with content.
    #[serde(default)]
    pub disk_format: Option<String>,
    /// The other accounts its owner lets launch it (ModifyImageAttribute); read from the
    /// state, never carried by a command.
    #[serde(default)]
    pub launch_permissions: Vec<AccountId>,
    /// The snapshot of the root disk of an image made by CreateImage (its block device
    /// mapping, as an EBS-backed AMI has); `None` for registered images.
    #[serde(default)]
    pub root_snapshot: Option<RootSnapshot>,
    /// The instance CreateImage made it from.
    #[serde(default)]
    pub source_instance_id: Option<InstanceId>,
    /// Why a made image `failed`.
    #[serde(default)]
    pub state_reason: Option<StateReason>,
}

/// The root disk of an image made from an instance: a snapshot of it and its size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootSnapshot {
    pub snapshot_id: canopy_common::SnapshotId,
    pub volume_size_gib: u64,
}

/// The device an image's root disk is, as EC2 names it for every Canopy image.
pub const ROOT_DEVICE_NAME: &str = "/dev/sda1";

impl Image {
    /// Whether `account` may see and launch it: its own, a public one, or one its owner
    /// shared with the account.
    pub fn visible_to(&self, account: &AccountId) -> bool {
        self.is_public || &self.owner_id == account || self.launch_permissions.contains(account)
    }

    /// An image whose bytes nodes can fetch, or `None` for one without content.
    pub fn content(&self) -> Option<ImageRef> {
        self.sha256.clone().map(|sha256| ImageRef {
            image_id: self.image_id.clone(),
            sha256,
            size: self.size_bytes,
        })
    }
}

/// An Elastic IP: allocated to an account, associated with at most one of its instances.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Address {
    pub allocation_id: canopy_common::AllocationId,
    pub public_ip: Ipv4Addr,
    pub account_id: AccountId,
    #[serde(default)]
    pub instance_id: Option<InstanceId>,
    #[serde(default)]
    pub association_id: Option<canopy_common::AssociationId>,
    pub allocated_at: DateTime<Utc>,
    /// Filled by reads; a command allocating it carries its tags apart.
    #[serde(default)]
    pub tags: Vec<Tag>,
}

/// A key pair: its public half and EC2's fingerprint of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyPair {
    pub key_pair_id: KeyPairId,
    pub account_id: AccountId,
    pub key_name: String,
    pub key_type: crate::key_material::KeyType,
    pub fingerprint: String,
    /// The OpenSSH public key line, `ssh-… AAAA…`, without comment.
    pub public_key: String,
    pub created_at: DateTime<Utc>,
    /// Filled by reads; a command creating the pair carries its tags apart.
    #[serde(default)]
    pub tags: Vec<Tag>,
}

impl KeyPair {
    /// The public key as EC2 shows it (DescribeKeyPairs, the metadata service): the
    /// OpenSSH line with the key's name as comment.
    pub fn public_key_line(&self) -> String {
        format!("{} {}", self.public_key, self.key_name)
    }
}

/// A security group with its rules (ingress and egress, in the order they were added).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecurityGroup {
    pub group_id: SecurityGroupId,
    pub account_id: AccountId,
    pub group_name: String,
    pub description: String,
    pub created_at: DateTime<Utc>,
    #[serde(default)]
    pub rules: Vec<SecurityGroupRule>,
    /// Filled by reads; a command creating the group carries its tags apart.
    #[serde(default)]
    pub tags: Vec<Tag>,
}

/// The name every account's default group has.
pub const DEFAULT_SECURITY_GROUP: &str = "default";

/// One rule: a protocol and port range, and one peer (a CIDR block or a group).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecurityGroupRule {
    pub rule_id: SecurityGroupRuleId,
    pub group_id: SecurityGroupId,
    #[serde(flatten)]
    pub spec: RuleSpec,
    pub description: String,
}

/// What makes a rule the rule it is (what Authorize refuses twice and Revoke matches).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RuleSpec {
    pub is_egress: bool,
    /// `tcp`, `udp`, `icmp`, `icmpv6`, `-1` (all) or another protocol's number.
    pub protocol: String,
    /// Ports (tcp, udp) or ICMP type and code; `None` where the protocol has none.
    pub from_port: Option<i32>,
    pub to_port: Option<i32>,
    pub peer: RulePeer,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RulePeer {
    Ipv4(String),
    Ipv6(String),
    Group(SecurityGroupId),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Zone {
    pub zone: ZoneName,
    pub endpoint: String,
    pub generation: u64,
    pub registered_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    pub reservation_id: ReservationId,
    pub account_id: AccountId,
    pub client_token: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// EC2's `stateReason`: a code such as `Client.UserInitiatedShutdown` and a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateReason {
    pub code: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tag {
    pub key: String,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// Launch order across the cloud; the pagination key.
    pub seq: i64,
    pub instance_id: InstanceId,
    pub reservation_id: ReservationId,
    pub account_id: AccountId,
    pub launch_index: u32,
    pub image_id: ImageId,
    pub instance_type: String,
    pub resources: Resources,
    pub zone: ZoneName,
    pub node_id: Option<NodeId>,
    pub key_name: Option<String>,
    /// The key pair's public key line as it was at launch (see [`KeyPair::public_key_line`]).
    pub public_key: Option<String>,
    pub user_data: Option<Vec<u8>>,
    pub client_token: Option<String>,
    pub state: InstanceState,
    pub desired: PowerState,
    pub reboot_seq: u64,
    /// Bumped by every StartInstances (see [`DesiredSpec::start_seq`]).
    pub start_seq: u64,
    pub state_reason: Option<StateReason>,
    /// EC2's `reason` (stateTransitionReason), e.g. "User initiated (2026-01-01 00:00:00 GMT)".
    pub transition_reason: String,
    pub launch_time: DateTime<Utc>,
    pub state_changed_at: DateTime<Utc>,
    pub terminated_at: Option<DateTime<Utc>>,
    pub tags: Vec<Tag>,
    pub kernel_id: Option<ImageId>,
    pub ramdisk_id: Option<ImageId>,
    /// TerminateInstances refuses the instance while set (ModifyInstanceAttribute).
    pub disable_api_termination: bool,
    /// StopInstances refuses the instance while set.
    pub disable_api_stop: bool,
    /// The security groups it was launched with: (id, name), in launch order.
    pub security_groups: Vec<(SecurityGroupId, String)>,
    /// Its address in the zone's subnet, once its CC has placed it.
    pub private_ip: Option<Ipv4Addr>,
    pub metadata_options: MetadataOptions,
    /// The Elastic IP associated with it.
    pub public_ip: Option<Ipv4Addr>,
    /// The volumes attached to it (or being attached or detached), by device.
    pub volumes: Vec<InstanceVolume>,
}

/// A volume as its instance shows it (`blockDeviceMapping`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceVolume {
    pub volume_id: canopy_common::VolumeId,
    pub device: String,
    pub status: AttachStatus,
    pub attach_time: DateTime<Utc>,
    pub delete_on_termination: bool,
}

/// A volume's life as EC2 shows it (`deleted` rows are tombstones the API never shows).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VolumeState {
    Available,
    InUse,
}

impl VolumeState {
    pub fn name(self) -> &'static str {
        match self {
            VolumeState::Available => "available",
            VolumeState::InUse => "in-use",
        }
    }
}

/// Where an attachment stands: asked for, confirmed by the node, or being undone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AttachStatus {
    Attaching,
    Attached,
    Detaching,
}

impl AttachStatus {
    pub fn name(self) -> &'static str {
        match self {
            AttachStatus::Attaching => "attaching",
            AttachStatus::Attached => "attached",
            AttachStatus::Detaching => "detaching",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "attaching" => Some(AttachStatus::Attaching),
            "attached" => Some(AttachStatus::Attached),
            "detaching" => Some(AttachStatus::Detaching),
            _ => None,
        }
    }
}

/// A volume's attachment to an instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub instance_id: InstanceId,
    pub device: String,
    pub status: AttachStatus,
    pub attach_time: DateTime<Utc>,
    pub delete_on_termination: bool,
}

/// A volume of an account, in one zone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    /// The row's position in creation order (reads only; for paging).
    #[serde(skip)]
    pub seq: i64,
    pub volume_id: canopy_common::VolumeId,
    pub account_id: AccountId,
    pub zone: ZoneName,
    pub size_gib: u64,
    /// EC2's volume type (`gp2`, `gp3`, `io1`, ...): recorded and shown; every type is a
    /// qcow2 file on the node.
    pub volume_type: String,
    pub iops: Option<u32>,
    pub throughput: Option<u32>,
    pub client_token: Option<String>,
    pub state: VolumeState,
    pub created_at: DateTime<Utc>,
    pub attachment: Option<Attachment>,
    /// The snapshot it was made from.
    #[serde(default)]
    pub snapshot_id: Option<canopy_common::SnapshotId>,
    /// Filled by reads; a command creating it carries its tags apart.
    #[serde(default)]
    pub tags: Vec<Tag>,
}

/// Where a snapshot stands, as EC2 names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotState {
    Pending,
    Completed,
    Error,
}

impl SnapshotState {
    pub fn name(self) -> &'static str {
        match self {
            SnapshotState::Pending => "pending",
            SnapshotState::Completed => "completed",
            SnapshotState::Error => "error",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "pending" => Some(SnapshotState::Pending),
            "completed" => Some(SnapshotState::Completed),
            "error" => Some(SnapshotState::Error),
            _ => None,
        }
    }
}

/// A snapshot of a volume, as reads return it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The row's position in creation order (for paging).
    pub seq: i64,
    pub snapshot_id: canopy_common::SnapshotId,
    pub account_id: AccountId,
    pub volume_id: canopy_common::VolumeId,
    /// The volume's zone (internal: whose nodes take it).
    pub zone: ZoneName,
    pub volume_size_gib: u64,
    pub description: String,
    pub state: SnapshotState,
    pub status_message: Option<String>,
    pub started_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
    /// The bytes, once completed; `None` for a volume no node ever wrote (all zeros).
    pub content: Option<canopy_common::SnapshotRef>,
    /// The instance whose root disk it copies (CreateImage); its `volume_id` is then
    /// [`NO_VOLUME`].
    pub instance_id: Option<InstanceId>,
    pub tags: Vec<Tag>,
}

/// The volume id a snapshot that does not come from one of the account's volumes shows,
/// as AWS shows it.
pub const NO_VOLUME: &str = "vol-ffffffff";

/// What a node's upload made of a pending snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotOutcome {
    /// The bytes are in the image store of the replica that took the upload.
    Completed {
        sha256: canopy_common::Sha256Digest,
        size: u64,
        /// `qcow2` or `raw`, read from the bytes; an image made from the snapshot records
        /// it. `None` in outcomes logged before CreateImage.
        #[serde(default)]
        disk_format: Option<String>,
    },
    /// The node could not copy the volume, or the upload was unusable.
    Failed { message: String },
}

/// RunInstances' `MetadataOptions`: how the metadata service treats the instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct MetadataOptions {
    /// IMDSv2 session tokens required (EC2's `HttpTokens` `required`).
    #[serde(default)]
    pub tokens_required: bool,
    /// The service does not answer the instance (EC2's `HttpEndpoint` `disabled`).
    #[serde(default)]
    pub endpoint_disabled: bool,
}

impl MetadataOptions {
    pub fn http_tokens(self) -> &'static str {
        if self.tokens_required {
            "required"
        } else {
            "optional"
        }
    }

    pub fn http_endpoint(self) -> &'static str {
        if self.endpoint_disabled {
            "disabled"
        } else {
            "enabled"
        }
    }
}

/// Where an instance runs and in which state, as the CLC last recorded it: what a node's
/// report is compared with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Whereabouts {
    pub zone: ZoneName,
    pub node_id: Option<NodeId>,
    pub state: InstanceState,
    pub private_ip: Option<Ipv4Addr>,
}

/// What a zone's cluster controller is told about one instance: its desired state, in the
/// order the instances were launched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredSpec {
    pub instance_id: InstanceId,
    pub instance_type: String,
    pub resources: Resources,
    pub image_id: ImageId,
    pub user_data: Option<Vec<u8>>,
    pub key_name: Option<String>,
    pub desired: PowerState,
    pub reboot_seq: u64,
    /// Bumped by every StartInstances: a node that saw the guest stop on its own restarts it
    /// only for a start it has not seen yet.
    pub start_seq: u64,
    pub node_id: Option<NodeId>,
    /// The address its CC gave it (sent back so that a restarted CC keeps it).
    pub private_ip: Option<Ipv4Addr>,
    /// What the node's metadata service serves (the region left empty: the CLC's own
    /// configuration fills it in).
    pub metadata: canopy_common::InstanceMetadata,
    /// The bytes the instance boots from, where the images have content.
    pub boot: BootImages,
    /// The volumes it should have attached.
    pub volumes: Vec<canopy_common::VolumeAttachment>,
}
