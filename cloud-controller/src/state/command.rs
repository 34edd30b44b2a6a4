use canopy_common::{
    AccountId, AllocationId, AssociationId, ImageId, InstanceId, InstanceState, KeyPairId, NodeId,
    PowerState, ReservationId, ResourceId, Resources, SecurityGroupId, SecurityGroupRuleId,
    SnapshotId, VolumeId, ZoneName,
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::pki::{JoinTokenRow, RevokeTarget};
use super::types::{
    Address, Image, KeyPair, RuleSpec, SecurityGroup, SecurityGroupRule, SnapshotOutcome,
    StateReason, Tag, Volume,
};

/// Every change of cloud state. Serializable, because a replicated log stores them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Group commit: commands submitted concurrently, carried by one log entry (one append,
    /// one fsync) and applied in order, each all-or-nothing on its own. Only the replicated
    /// log builds and applies batches; they never nest.
    Batch(Vec<Command>),
    CreateAccount {
        account_id: AccountId,
        name: String,
        is_admin: bool,
        access_key_id: String,
        secret_access_key: String,
        at: DateTime<Utc>,
    },
    /// Another access key for an existing account.
    AddAccessKey {
        account_id: AccountId,
        access_key_id: String,
        secret_access_key: String,
        at: DateTime<Utc>,
    },
    RegisterImage {
        image: Image,
    },
    /// The image can no longer be launched. Its row (and bytes) stay while instances
    /// launched from it still need them.
    DeregisterImage {
        image_id: ImageId,
        account_id: AccountId,
    },
    /// The owner changes who may launch its image (`all` is public) and its description.
    /// Refused (`ImageNotFound`) for an image the account does not own.
    ModifyImage {
        account_id: AccountId,
        image_id: ImageId,
        add: Vec<LaunchPermission>,
        remove: Vec<LaunchPermission>,
        /// Removes every launch permission first (ResetImageAttribute).
        reset: bool,
        description: Option<String>,
    },
    /// A CC announced itself (or moved to a new endpoint).
    RegisterZone {
        zone: ZoneName,
        endpoint: String,
        at: DateTime<Utc>,
    },
    /// One RunInstances call, already scheduled to a zone. Idempotent on
    /// (account, client_token): a repeat with the same request returns the first
    /// reservation; with a different request it is refused.
    LaunchInstances {
        reservation_id: ReservationId,
        account_id: AccountId,
        client_token: Option<String>,
        request_hash: String,
        instances: Vec<NewInstance>,
        tags: Vec<Tag>,
        at: DateTime<Utc>,
    },
    /// Stop / Start / Reboot / Terminate on a set of instances: all or nothing.
    RequestInstances {
        account_id: AccountId,
        instance_ids: Vec<InstanceId>,
        action: InstanceAction,
        at: DateTime<Utc>,
    },
    /// What a zone's nodes report. Stale or reordered reports are ignored instance by
    /// instance (the lifecycle refuses them); they never fail the command.
    ObserveInstances {
        zone: ZoneName,
        observations: Vec<Observation>,
        at: DateTime<Utc>,
    },
    CreateTags {
        account_id: AccountId,
        resource_ids: Vec<ResourceId>,
        tags: Vec<Tag>,
    },
    /// Removes each key; with a value, only when the stored value matches.
    DeleteTags {
        account_id: AccountId,
        resource_ids: Vec<ResourceId>,
        tags: Vec<(String, Option<String>)>,
    },
    /// ModifyInstanceAttribute: one attribute of one instance.
    ModifyInstance {
        account_id: AccountId,
        instance_id: InstanceId,
        change: InstanceChange,
    },
    /// A new security group with its first rules (EC2 gives a new group an egress rule
    /// to everywhere). Refused when the account has a group of that name.
    CreateSecurityGroup {
        group: SecurityGroup,
        tags: Vec<Tag>,
    },
    /// Refused for the default group, and while an instance that is not terminated uses the
    /// group or another group's rule refers to it.
    DeleteSecurityGroup {
        account_id: AccountId,
        group_id: SecurityGroupId,
    },
    /// Adds rules, all or nothing: a rule the group already has refuses the command.
    AuthorizeSecurityGroupRules {
        account_id: AccountId,
        group_id: SecurityGroupId,
        rules: Vec<SecurityGroupRule>,
    },
    /// Removes the rules matching `specs` (those that match none are reported back, as EC2
    /// does) and the rules named by id (an unknown id refuses the command).
    RevokeSecurityGroupRules {
        account_id: AccountId,
        group_id: SecurityGroupId,
        specs: Vec<RuleSpec>,
        rule_ids: Vec<SecurityGroupRuleId>,
    },
    /// An Elastic IP from the pool, chosen by the edge; refused if another allocation holds
    /// that address (the edge then picks another).
    AllocateAddress {
        address: Address,
        tags: Vec<Tag>,
    },
    AssociateAddress {
        account_id: AccountId,
        allocation_id: AllocationId,
        instance_id: InstanceId,
        association_id: AssociationId,
        allow_reassociation: bool,
    },
    DisassociateAddress {
        account_id: AccountId,
        association_id: AssociationId,
    },
    /// Refused while the address is associated.
    ReleaseAddress {
        account_id: AccountId,
        allocation_id: AllocationId,
    },
    /// A new, available volume. Refused (`TokenTaken`) when the account already made a
    /// volume with its client token.
    CreateVolume {
        volume: Volume,
        tags: Vec<Tag>,
    },
    /// Refused while attached.
    DeleteVolume {
        account_id: AccountId,
        volume_id: VolumeId,
        at: DateTime<Utc>,
    },
    /// Attaches an available volume to a running or stopped instance of its zone, at a free
    /// device; the node confirms it (`ObserveVolumes`).
    AttachVolume {
        account_id: AccountId,
        volume_id: VolumeId,
        instance_id: InstanceId,
        device: String,
        at: DateTime<Utc>,
    },
    /// Starts detaching an attached volume (the node confirms it); `force` detaches it at
    /// once, without waiting for the node.
    DetachVolume {
        account_id: AccountId,
        volume_id: VolumeId,
        instance_id: Option<InstanceId>,
        device: Option<String>,
        force: bool,
    },
    /// What a zone's nodes report of attachments under way: volumes they now have attached,
    /// and volumes no longer attached to the instance they were being detached from.
    ObserveVolumes {
        zone: ZoneName,
        attached: Vec<(VolumeId, InstanceId)>,
        detached: Vec<(VolumeId, InstanceId)>,
    },
    /// A snapshot of a volume of the account: `pending` for a node of the volume's zone to
    /// take, or `completed` at once for a volume no node ever wrote.
    CreateSnapshot {
        account_id: AccountId,
        snapshot_id: SnapshotId,
        volume_id: VolumeId,
        description: String,
        at: DateTime<Utc>,
        tags: Vec<Tag>,
    },
    /// CreateImage: a machine image of a stopped instance of the account, whose root is a
    /// snapshot of the instance's root disk (`pending` for the instance's node to take;
    /// the image follows it, `available` or `failed`). Refused unless the instance is
    /// stopped, or when the account has an image of that name. An instance no node ever
    /// reported on has no disk of its own yet: both complete at once with its image's bytes.
    CreateImage {
        account_id: AccountId,
        image_id: ImageId,
        snapshot_id: SnapshotId,
        instance_id: InstanceId,
        name: String,
        description: String,
        at: DateTime<Utc>,
        image_tags: Vec<Tag>,
        snapshot_tags: Vec<Tag>,
    },
    /// A node's upload of a pending snapshot ended (skipped for a snapshot no longer
    /// pending). An image whose root it is follows it.
    CompleteSnapshot {
        snapshot_id: SnapshotId,
        outcome: SnapshotOutcome,
        at: DateTime<Utc>,
    },
    DeleteSnapshot {
        account_id: AccountId,
        snapshot_id: SnapshotId,
    },
    /// A created or imported key pair (its public half only). Refused when the account
    /// has a key pair of that name.
    CreateKeyPair {
        key_pair: KeyPair,
        tags: Vec<Tag>,
    },
    /// Deleting a name that is not there succeeds, as on EC2; an id that is not there is
    /// refused.
    DeleteKeyPair {
        account_id: AccountId,
        key: KeyPairRef,
    },
    /// Forgets instances terminated before `before` (AWS keeps them visible about an hour).
    PurgeTerminated {
        before: DateTime<Utc>,
    },
    CreateJoinToken {
        token: JoinTokenRow,
    },
    /// A node joined with a token: the token is spent, the certificate recorded.
    EnrollNode {
        token_id: String,
        node_id: NodeId,
        zone: ZoneName,
        serial: String,
        at: DateTime<Utc>,
    },
    RevokeCertificates {
        target: RevokeTarget,
        at: DateTime<Utc>,
    },
}

impl Command {
    /// Whether applying it can end in a rejection (a [`super::StateError`] for which
    /// `is_rejection` holds), so that what it wrote first must be rolled back.
    pub fn can_be_refused(&self) -> bool {
        match self {
            Command::Batch(_)
            | Command::CreateAccount { .. }
            | Command::AddAccessKey { .. }
            | Command::RegisterImage { .. }
            | Command::DeregisterImage { .. }
            | Command::ModifyImage { .. }
            | Command::LaunchInstances { .. }
            | Command::RequestInstances { .. }
            | Command::CreateTags { .. }
            | Command::DeleteTags { .. }
            | Command::CreateKeyPair { .. }
            | Command::DeleteKeyPair { .. }
            | Command::ModifyInstance { .. }
            | Command::CreateSecurityGroup { .. }
            | Command::DeleteSecurityGroup { .. }
            | Command::AuthorizeSecurityGroupRules { .. }
            | Command::RevokeSecurityGroupRules { .. }
            | Command::AllocateAddress { .. }
            | Command::AssociateAddress { .. }
            | Command::DisassociateAddress { .. }
            | Command::ReleaseAddress { .. }
            | Command::CreateVolume { .. }
            | Command::DeleteVolume { .. }
            | Command::AttachVolume { .. }
            | Command::DetachVolume { .. }
            | Command::CreateJoinToken { .. }
            | Command::EnrollNode { .. }
            | Command::RevokeCertificates { .. }
            | Command::CreateSnapshot { .. }
            | Command::DeleteSnapshot { .. }
            | Command::CreateImage { .. } => true,
            // Stale or unknown reports are skipped one by one, never refused.
            Command::ObserveInstances { .. }
            | Command::ObserveVolumes { .. }
            | Command::CompleteSnapshot { .. }
            | Command::RegisterZone { .. }
            | Command::PurgeTerminated { .. } => false,
        }
    }

    /// Whether applying it may leave an attachment waiting for a node's word (attaching or
    /// detaching): the report intake looks for those only after such a command.
    pub fn may_await_nodes_on_volumes(&self) -> bool {
        match self {
            Command::Batch(commands) => commands.iter().any(Command::may_await_nodes_on_volumes),
            Command::AttachVolume { .. } | Command::DetachVolume { .. } => true,
            Command::RequestInstances { action, .. } => *action == InstanceAction::Terminate,
            _ => false,
        }
    }

    /// Whether applying it may change the images or the zones (see [`super::Catalog`]).
    pub fn changes_catalog(&self) -> bool {
        match self {
            Command::Batch(commands) => commands.iter().any(Command::changes_catalog),
            // A completed snapshot may be a made image's root: the image becomes available.
            Command::RegisterImage { .. }
            | Command::DeregisterImage { .. }
            | Command::ModifyImage { .. }
            | Command::CreateImage { .. }
            | Command::CompleteSnapshot { .. }
            | Command::RegisterZone { .. } => true,
            Command::CreateAccount { .. }
            | Command::AddAccessKey { .. }
            | Command::LaunchInstances { .. }
            | Command::RequestInstances { .. }
            | Command::ObserveInstances { .. }
            | Command::CreateTags { .. }
            | Command::DeleteTags { .. }
            | Command::CreateKeyPair { .. }
            | Command::DeleteKeyPair { .. }
            | Command::ModifyInstance { .. }
            | Command::CreateSecurityGroup { .. }
            | Command::DeleteSecurityGroup { .. }
            | Command::AuthorizeSecurityGroupRules { .. }
            | Command::RevokeSecurityGroupRules { .. }
            | Command::AllocateAddress { .. }
            | Command::AssociateAddress { .. }
            | Command::DisassociateAddress { .. }
            | Command::ReleaseAddress { .. }
            | Command::CreateVolume { .. }
            | Command::DeleteVolume { .. }
            | Command::AttachVolume { .. }
            | Command::DetachVolume { .. }
            | Command::ObserveVolumes { .. }
            | Command::PurgeTerminated { .. }
            | Command::CreateJoinToken { .. }
            | Command::EnrollNode { .. }
            | Command::RevokeCertificates { .. }
            | Command::CreateSnapshot { .. }
            | Command::DeleteSnapshot { .. } => false,
        }
    }
}

/// Who may launch an image: every account, or one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LaunchPermission {
    All,
    Account(AccountId),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewInstance {
    pub instance_id: InstanceId,
    pub launch_index: u32,
    pub image_id: ImageId,
    pub instance_type: String,
    pub resources: Resources,
    pub zone: ZoneName,
    pub key_name: Option<String>,
    /// The key pair's public key line, resolved when the launch was accepted.
    #[serde(default)]
    pub public_key: Option<String>,
    /// Its security groups (id, name), checked at the edge and again when the launch is
    /// applied. Only the ids are stored: a group's name never changes.
    #[serde(default)]
    pub security_groups: Vec<(SecurityGroupId, String)>,
    #[serde(default)]
    pub metadata_options: super::types::MetadataOptions,
    pub user_data: Option<Vec<u8>>,
    /// The kernel and ramdisk it boots with (RunInstances' or its image's).
    #[serde(default)]
    pub kernel_id: Option<ImageId>,
    #[serde(default)]
    pub ramdisk_id: Option<ImageId>,
}

/// The image a launch of `instances` is checked against: its first instance's (all of a
/// launch's instances share one image). Empty when there is none.
pub(crate) fn launch_image(instances: &[NewInstance]) -> &str {
    instances
        .first()
        .map(|i| i.image_id.as_str())
        .unwrap_or_default()
}

impl NewInstance {
    /// The instance as applying its launch stores it, for answering the launch without
    /// reading it back. Only `seq` (the launch order, used for paging) is unknown: it is 0.
    pub fn launched(
        &self,
        reservation_id: &ReservationId,
        account_id: &AccountId,
        client_token: Option<&str>,
        tags: &[Tag],
        at: DateTime<Utc>,
    ) -> super::Instance {
        use chrono::SubsecRound;
        // Stored to the millisecond.
        let at = at.trunc_subsecs(3);
        // Later tags with the same key replace earlier ones, as the inserts do; the store
        // lists them by key.
        let tags: std::collections::BTreeMap<&str, &str> = tags
            .iter()
            .map(|t| (t.key.as_str(), t.value.as_str()))
            .collect();
        super::Instance {
            seq: 0,
            instance_id: self.instance_id.clone(),
            reservation_id: reservation_id.clone(),
            account_id: account_id.clone(),
            launch_index: self.launch_index,
            image_id: self.image_id.clone(),
            instance_type: self.instance_type.clone(),
            resources: self.resources,
            zone: self.zone.clone(),
            node_id: None,
            key_name: self.key_name.clone(),
            public_key: self.public_key.clone(),
            user_data: self.user_data.clone(),
            client_token: client_token.map(str::to_owned),
            state: InstanceState::Pending,
            desired: PowerState::Running,
            reboot_seq: 0,
            start_seq: 0,
            state_reason: None,
            transition_reason: String::new(),
            launch_time: at,
            state_changed_at: at,
            terminated_at: None,
            kernel_id: self.kernel_id.clone(),
            ramdisk_id: self.ramdisk_id.clone(),
            disable_api_termination: false,
            disable_api_stop: false,
            security_groups: self.security_groups.clone(),
            private_ip: None,
            metadata_options: self.metadata_options,
            public_ip: None,
            volumes: vec![],
            tags: tags
                .into_iter()
                .map(|(key, value)| Tag {
                    key: key.to_owned(),
                    value: value.to_owned(),
                })
                .collect(),
        }
    }
}

/// What ModifyInstanceAttribute changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum InstanceChange {
    DisableApiTermination(bool),
    DisableApiStop(bool),
    /// Only while the instance is stopped, as on EC2.
    UserData(Option<Vec<u8>>),
    /// ModifyInstanceMetadataOptions.
    MetadataOptions(super::types::MetadataOptions),
    /// The instance's security groups, replaced (ModifyInstanceAttribute `GroupId.N`): the
    /// account's, at least one; not once the instance is shutting down or terminated.
    SecurityGroups(Vec<SecurityGroupId>),
    /// Only while the instance is stopped, as on EC2. The resources are the catalogue's for
    /// the type when the edge accepted the request: the command carries them, so replaying
    /// the log gives the same rows whatever the catalogue says later.
    InstanceType {
        name: String,
        resources: canopy_common::Resources,
    },
}

/// A key pair named the way DeleteKeyPair names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyPairRef {
    Name(String),
    Id(KeyPairId),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InstanceAction {
    Stop,
    Start,
    Reboot,
    Terminate,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Observation {
    pub instance_id: InstanceId,
    pub node_id: Option<NodeId>,
    pub state: InstanceState,
    pub reason: Option<StateReason>,
    /// The address the zone's CC gave the instance.
    #[serde(default)]
    pub private_ip: Option<std::net::Ipv4Addr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateChange {
    pub instance_id: InstanceId,
    pub previous: InstanceState,
    pub current: InstanceState,
}

/// What applying a command produced, for the caller's reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Done,
    Launched {
        reservation_id: ReservationId,
        /// True when the client token matched an earlier launch and nothing new was made.
        replayed: bool,
    },
    InstancesChanged(Vec<StateChange>),
    Observed {
        changed: usize,
        /// Zones whose desired state changed (e.g. a guest shut itself down).
        desired_changed: bool,
    },
    Purged(u64),
    /// What a RevokeSecurityGroupRules removed, and the specs that matched no rule.
    Revoked {
        revoked: Vec<SecurityGroupRuleId>,
        unknown: Vec<RuleSpec>,
    },
    /// The key pair a DeleteKeyPair removed, if there was one.
    KeyPairDeleted(Option<KeyPairId>),
    /// The serials a RevokeCertificates revoked.
    CertificatesRevoked(Vec<String>),
}

impl InstanceAction {
    pub fn desired(self) -> Option<PowerState> {
        match self {
            InstanceAction::Stop => Some(PowerState::Stopped),
            InstanceAction::Start => Some(PowerState::Running),
            InstanceAction::Terminate => Some(PowerState::Terminated),
            InstanceAction::Reboot => None,
        }
    }
}
