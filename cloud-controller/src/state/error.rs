use canopy_common::{InstanceId, InstanceState};
use serde::{Deserialize, Serialize};

/// Which refusal of a volume command, each one of EC2's error codes at the edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VolumeFault {
    /// `InvalidVolume.NotFound`.
    NotFound,
    /// `VolumeInUse`: attached, so it cannot be deleted or attached again.
    InUse,
    /// `IncorrectState`: e.g. detaching a volume that is not attached.
    IncorrectState,
    /// `InvalidVolume.ZoneMismatch`: the volume and the instance are in different zones.
    ZoneMismatch,
    /// `InvalidParameterValue`: the instance already has a volume at that device.
    DeviceInUse,
    /// `InvalidAttachment.NotFound`: not attached to the instance or device named.
    AttachmentNotFound,
    /// `InvalidParameterValue`: a volume smaller than the snapshot it is made from.
    TooSmall,
    /// `IdempotentParameterMismatch`-free replay: the client token names another volume (the
    /// edge answers with that one).
    TokenTaken,
}

/// Which refusal of a snapshot command, each one of EC2's error codes at the edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotFault {
    /// `InvalidSnapshot.NotFound`.
    NotFound,
    /// `IncorrectState`: e.g. a volume made from a snapshot that is not completed.
    IncorrectState,
    /// `InvalidSnapshot.InUse`: an image's root (its block device mapping) names it.
    InUse,
}

/// Which refusal of CreateImage, each one of EC2's error codes at the edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ImageFault {
    /// `InvalidAMIName.Duplicate`: the account has an image of that name.
    DuplicateName,
    /// `IncorrectInstanceState`: the instance is not stopped.
    InstanceNotStopped,
}

/// Why a command or query failed. The first group are deterministic rejections of a
/// command given the current state (every replica rejects it the same way, and nothing is
/// written); `NotLeader` means this replica cannot commit commands now; the last three are
/// failures of the store itself.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("the client token was already used with different parameters")]
    IdempotentParameterMismatch,
    #[error("no such instances: {0:?}")]
    InstancesNotFound(Vec<InstanceId>),
    #[error("instance {id} is {state}, which does not allow this")]
    IncorrectInstanceState {
        id: InstanceId,
        state: InstanceState,
    },
    #[error("no such image: {0}")]
    ImageNotFound(String),
    #[error("no such account: {0}")]
    AccountNotFound(String),
    #[error("no such zone: {0}")]
    ZoneNotFound(String),
    #[error("resource {0} would have more than {max} tags", max = crate::state::MAX_TAGS_PER_RESOURCE)]
    TagLimitExceeded(String),
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// The instance's protection (`disableApiTermination`, `disableApiStop`) refuses it.
    #[error("instance {id} may not be {verb}: its {attribute} attribute is set")]
    OperationNotPermitted {
        id: InstanceId,
        verb: String,
        attribute: String,
    },
    /// A security group id or name.
    #[error("the security group '{0}' does not exist")]
    SecurityGroupNotFound(String),
    #[error("the security group '{0}' already exists")]
    SecurityGroupDuplicate(String),
    /// A rule the group already has, described.
    #[error("the rule {0} already exists")]
    RuleDuplicate(String),
    #[error("the security group rule '{0}' does not exist")]
    RuleNotFound(String),
    #[error("a security group may have at most {max} rules each way", max = crate::state::MAX_RULES_PER_DIRECTION)]
    RulesLimitExceeded,
    /// Something still depends on the resource (EC2's `DependencyViolation`).
    #[error("{0}")]
    DependencyViolation(String),
    /// EC2's `CannotDelete` (the default security group).
    #[error("{0}")]
    CannotDelete(String),
    /// Another allocation holds the public address (an edge race; it picks another).
    #[error("the address {0} is already allocated")]
    AddressTaken(String),
    #[error("the allocation '{0}' does not exist")]
    AllocationNotFound(String),
    #[error("the association '{0}' does not exist")]
    AssociationNotFound(String),
    #[error("the address {0} is already associated")]
    AddressAlreadyAssociated(String),
    /// Release of an associated address.
    #[error("the address {0} is in use")]
    AddressInUse(String),
    /// A volume command the volume's (or its instance's) state refuses; `fault` is which of
    /// EC2's refusals it is.
    #[error("{message}")]
    VolumeRefused { fault: VolumeFault, message: String },
    /// A snapshot command refused; `fault` is which of EC2's refusals it is.
    #[error("{message}")]
    SnapshotRefused {
        fault: SnapshotFault,
        message: String,
    },
    /// CreateImage refused; `fault` is which of EC2's refusals it is.
    #[error("{message}")]
    ImageRefused { fault: ImageFault, message: String },
    #[error("the key pair '{0}' already exists")]
    KeyPairDuplicate(String),
    /// A key pair name or id.
    #[error("the key pair '{0}' does not exist")]
    KeyPairNotFound(String),
    /// A join the token (or the node's certificates) refuses.
    #[error("{0}")]
    JoinRefused(String),
    #[error("{0}")]
    NothingToRevoke(String),
    /// This replica is not the Raft leader (or its Raft has stopped), so it cannot commit the
    /// command. `leader` names the leader it knows of, as "node ID at ADDRESS". Never produced
    /// by applying a command: only by the replicated log, before anything is appended.
    #[error("this replica is not the leader; leader: {}", leader.as_deref().unwrap_or("unknown"))]
    NotLeader { leader: Option<String> },
    /// The replicated log could not confirm a command or a read within the wait bound (no
    /// leader, or no quorum). A command may still take effect later: retrying it with the
    /// same idempotency token is safe. Never produced by applying a command.
    #[error("the cloud controller cannot serve this now: {0}")]
    Unavailable(String),
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("migration error: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

impl StateError {
    /// Whether this is a deterministic refusal of a command (the first group above): every
    /// replica refuses it the same way and it wrote nothing. The rest are not the state's
    /// verdict, and a replicated state machine must stop on them rather than skip the entry.
    pub fn is_rejection(&self) -> bool {
        // No wildcard arm: a new variant must be classified here.
        match self {
            StateError::IdempotentParameterMismatch
            | StateError::InstancesNotFound(_)
            | StateError::IncorrectInstanceState { .. }
            | StateError::ImageNotFound(_)
            | StateError::AccountNotFound(_)
            | StateError::ZoneNotFound(_)
            | StateError::TagLimitExceeded(_)
            | StateError::AlreadyExists(_)
            | StateError::KeyPairDuplicate(_)
            | StateError::KeyPairNotFound(_)
            | StateError::OperationNotPermitted { .. }
            | StateError::SecurityGroupNotFound(_)
            | StateError::SecurityGroupDuplicate(_)
            | StateError::RuleDuplicate(_)
            | StateError::RuleNotFound(_)
            | StateError::RulesLimitExceeded
            | StateError::DependencyViolation(_)
            | StateError::CannotDelete(_)
            | StateError::AddressTaken(_)
            | StateError::AllocationNotFound(_)
            | StateError::AssociationNotFound(_)
            | StateError::AddressAlreadyAssociated(_)
            | StateError::AddressInUse(_)
            | StateError::VolumeRefused { .. }
            | StateError::JoinRefused(_)
            | StateError::NothingToRevoke(_)
            | StateError::SnapshotRefused { .. }
            | StateError::ImageRefused { .. } => true,
            StateError::NotLeader { .. }
            | StateError::Unavailable(_)
            | StateError::Db(_)
            | StateError::Migrate(_)
            | StateError::Corrupt(_) => false,
        }
    }
}
