//! The openraft type configuration of the cloud controller, and what applying an entry returns.

// `declare_raft_types!` names `Cursor` unqualified for the default `SnapshotData`.
use std::io::Cursor;
use std::ops::Deref;
use std::sync::{Arc, OnceLock};

use canopy_common::{InstanceId, InstanceState};
use openraft::BasicNode;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

use crate::state::{Command, Outcome, StateError};

openraft::declare_raft_types!(
    /// The cloud controller's Raft types: the log carries [`Command`]s (as [`LogCommand`]s),
    /// applying one yields a [`RaftResponse`], replicas are numbered by `u64` and addressed by
    /// a [`BasicNode`]. Snapshots are whole SQLite files held in memory (`Cursor<Vec<u8>>`):
    /// the state is small.
    pub TypeConfig:
        D = LogCommand,
        R = RaftResponse,
        NodeId = u64,
        Node = BasicNode,
        SnapshotData = Cursor<Vec<u8>>,
);

/// A replica's id in the Raft group.
pub type RaftNodeId = u64;
/// A log entry of [`TypeConfig`].
pub type Entry = openraft::Entry<TypeConfig>;
/// A log id of [`TypeConfig`].
pub type LogId = openraft::LogId<RaftNodeId>;
/// A membership with the log id that set it.
pub type StoredMembership = openraft::StoredMembership<RaftNodeId, BasicNode>;
/// What a snapshot covers.
pub type SnapshotMeta = openraft::SnapshotMeta<RaftNodeId, BasicNode>;
/// A snapshot with its data.
pub type Snapshot = openraft::Snapshot<TypeConfig>;
/// The storage error openraft expects from the log store and the state machine.
pub type StorageError = openraft::StorageError<RaftNodeId>;

/// The payload of a log entry: a [`Command`], shared and JSON-encoded at most once.
///
/// openraft clones an entry for every follower's replication stream and the log store keeps
/// the recent ones in memory, and each copy is serialized: into the log on every replica and
/// into each follower's AppendEntries on the leader. Shared, a clone is a reference count;
/// the first serialization keeps its JSON text and the later ones copy it. An entry read
/// back (a follower's AppendEntries, the log on disk) keeps the text it was read from, so a
/// follower appends to its log the bytes it received. The text is serde_json's: every
/// encoding of entries (the log, the Raft RPCs) is JSON.
#[derive(Clone)]
pub struct LogCommand {
    command: Arc<Command>,
    json: Arc<OnceLock<Box<RawValue>>>,
}

impl LogCommand {
    /// The command, shared.
    pub fn command(&self) -> &Command {
        &self.command
    }
}

impl From<Command> for LogCommand {
    fn from(command: Command) -> Self {
        LogCommand {
            command: Arc::new(command),
            json: Arc::default(),
        }
    }
}

impl Deref for LogCommand {
    type Target = Command;

    fn deref(&self) -> &Command {
        &self.command
    }
}

impl std::fmt::Debug for LogCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.command.fmt(f)
    }
}

impl PartialEq for LogCommand {
    fn eq(&self, other: &Self) -> bool {
        self.command == other.command
    }
}

impl Eq for LogCommand {}

impl Serialize for LogCommand {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let json = match self.json.get() {
            Some(json) => json,
            None => {
                let json = serde_json::value::to_raw_value(&*self.command)
                    .map_err(serde::ser::Error::custom)?;
                // Another clone may have encoded it meanwhile: the same text either way.
                self.json.get_or_init(|| json)
            }
        };
        json.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for LogCommand {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let json = Box::<RawValue>::deserialize(deserializer)?;
        let command = serde_json::from_str(json.get()).map_err(serde::de::Error::custom)?;
        Ok(LogCommand {
            command: Arc::new(command),
            json: Arc::new(OnceLock::from(json)),
        })
    }
}

/// What applying one committed entry produced. Every replica computes the same value; the
/// leader hands it back to the caller of `submit`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RaftResponse {
    /// The entry's command was applied.
    Applied(Outcome),
    /// The entry's command was refused given the state at that point of the log. Nothing it
    /// would have written was kept, but the entry still counts as applied.
    Rejected(Rejection),
    /// A blank entry (each new leader appends one) or a membership change: no command ran.
    NoCommand,
    /// A [`Command::Batch`](crate::state::Command::Batch): one response per command, in order.
    Batch(Vec<RaftResponse>),
}

impl RaftResponse {
    /// The result `CommandLog::submit` returns, the same as applying locally would have
    /// produced: a rejection turns back into its [`StateError`].
    pub fn into_result(self) -> Result<Outcome, StateError> {
        match self {
            RaftResponse::Applied(outcome) => Ok(outcome),
            RaftResponse::Rejected(rejection) => Err(rejection.into()),
            RaftResponse::NoCommand => Ok(Outcome::Done),
            RaftResponse::Batch(_) => Err(StateError::Corrupt(
                "a batch response where one command's was expected".into(),
            )),
        }
    }
}

/// A deterministic refusal of a command: the [`StateError`] variants that depend only on the
/// state and the command, so every replica refuses the same entry the same way. Unlike
/// `StateError` it is serializable, because it travels in a [`RaftResponse`].
///
/// Store failures (`Db`, `Migrate`, `Corrupt`) are not rejections: they stop the state
/// machine instead, since a replica that skipped the entry would diverge from the others.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Rejection {
    /// See [`StateError::IdempotentParameterMismatch`].
    IdempotentParameterMismatch,
    /// See [`StateError::InstancesNotFound`].
    InstancesNotFound(Vec<InstanceId>),
    /// See [`StateError::IncorrectInstanceState`].
    IncorrectInstanceState {
        /// The instance whose state refused the request.
        id: InstanceId,
        /// Its state at that point of the log.
        state: InstanceState,
    },
    /// See [`StateError::ImageNotFound`].
    ImageNotFound(String),
    /// See [`StateError::AccountNotFound`].
    AccountNotFound(String),
    /// See [`StateError::ZoneNotFound`].
    ZoneNotFound(String),
    /// See [`StateError::TagLimitExceeded`].
    TagLimitExceeded(String),
    /// See [`StateError::AlreadyExists`].
    AlreadyExists(String),
    /// See [`StateError::KeyPairDuplicate`].
    KeyPairDuplicate(String),
    /// See [`StateError::KeyPairNotFound`].
    KeyPairNotFound(String),
    /// See [`StateError::SecurityGroupNotFound`].
    SecurityGroupNotFound(String),
    /// See [`StateError::SecurityGroupDuplicate`].
    SecurityGroupDuplicate(String),
    /// See [`StateError::RuleDuplicate`].
    RuleDuplicate(String),
    /// See [`StateError::RuleNotFound`].
    RuleNotFound(String),
    /// See [`StateError::RulesLimitExceeded`].
    RulesLimitExceeded,
    /// See [`StateError::DependencyViolation`].
    DependencyViolation(String),
    /// See [`StateError::CannotDelete`].
    CannotDelete(String),
    /// See [`StateError::AddressTaken`].
    AddressTaken(String),
    /// See [`StateError::AllocationNotFound`].
    AllocationNotFound(String),
    /// See [`StateError::AssociationNotFound`].
    AssociationNotFound(String),
    /// See [`StateError::AddressAlreadyAssociated`].
    AddressAlreadyAssociated(String),
    /// See [`StateError::AddressInUse`].
    AddressInUse(String),
    /// See [`StateError::JoinRefused`].
    JoinRefused(String),
    /// See [`StateError::NothingToRevoke`].
    NothingToRevoke(String),
    /// See [`StateError::SnapshotRefused`].
    SnapshotRefused {
        fault: crate::state::SnapshotFault,
        message: String,
    },
    /// See [`StateError::VolumeRefused`].
    VolumeRefused {
        fault: crate::state::VolumeFault,
        message: String,
    },
    /// See [`StateError::ImageRefused`].
    ImageRefused {
        fault: crate::state::ImageFault,
        message: String,
    },
    /// See [`StateError::OperationNotPermitted`].
    OperationNotPermitted {
        /// The protected instance.
        id: InstanceId,
        /// What was refused ("terminated", "stopped").
        verb: String,
        /// The attribute that refused it.
        attribute: String,
    },
}

impl TryFrom<StateError> for Rejection {
    /// A store failure, which is not a rejection, comes back unchanged.
    type Error = StateError;

    fn try_from(error: StateError) -> Result<Self, StateError> {
        // No wildcard arm: a new `StateError` variant must be classified here.
        Ok(match error {
            StateError::IdempotentParameterMismatch => Rejection::IdempotentParameterMismatch,
            StateError::InstancesNotFound(ids) => Rejection::InstancesNotFound(ids),
            StateError::IncorrectInstanceState { id, state } => {
                Rejection::IncorrectInstanceState { id, state }
            }
            StateError::ImageNotFound(s) => Rejection::ImageNotFound(s),
            StateError::AccountNotFound(s) => Rejection::AccountNotFound(s),
            StateError::ZoneNotFound(s) => Rejection::ZoneNotFound(s),
            StateError::TagLimitExceeded(s) => Rejection::TagLimitExceeded(s),
            StateError::AlreadyExists(s) => Rejection::AlreadyExists(s),
            StateError::KeyPairDuplicate(s) => Rejection::KeyPairDuplicate(s),
            StateError::KeyPairNotFound(s) => Rejection::KeyPairNotFound(s),
            StateError::SecurityGroupNotFound(s) => Rejection::SecurityGroupNotFound(s),
            StateError::SecurityGroupDuplicate(s) => Rejection::SecurityGroupDuplicate(s),
            StateError::RuleDuplicate(s) => Rejection::RuleDuplicate(s),
            StateError::RuleNotFound(s) => Rejection::RuleNotFound(s),
            StateError::RulesLimitExceeded => Rejection::RulesLimitExceeded,
            StateError::DependencyViolation(s) => Rejection::DependencyViolation(s),
            StateError::CannotDelete(s) => Rejection::CannotDelete(s),
            StateError::AddressTaken(s) => Rejection::AddressTaken(s),
            StateError::AllocationNotFound(s) => Rejection::AllocationNotFound(s),
            StateError::AssociationNotFound(s) => Rejection::AssociationNotFound(s),
            StateError::AddressAlreadyAssociated(s) => Rejection::AddressAlreadyAssociated(s),
            StateError::AddressInUse(s) => Rejection::AddressInUse(s),
            StateError::JoinRefused(s) => Rejection::JoinRefused(s),
            StateError::NothingToRevoke(s) => Rejection::NothingToRevoke(s),
            StateError::SnapshotRefused { fault, message } => {
                Rejection::SnapshotRefused { fault, message }
            }
            StateError::VolumeRefused { fault, message } => {
                Rejection::VolumeRefused { fault, message }
            }
            StateError::ImageRefused { fault, message } => {
                Rejection::ImageRefused { fault, message }
            }
            StateError::OperationNotPermitted {
                id,
                verb,
                attribute,
            } => Rejection::OperationNotPermitted {
                id,
                verb,
                attribute,
            },
            // `NotLeader` never comes from applying; it is not the state's verdict either.
            e @ (StateError::NotLeader { .. }
            | StateError::Unavailable(_)
            | StateError::Db(_)
            | StateError::Migrate(_)
            | StateError::Corrupt(_)) => {
                return Err(e);
            }
        })
    }
}

impl From<Rejection> for StateError {
    fn from(rejection: Rejection) -> Self {
        match rejection {
            Rejection::IdempotentParameterMismatch => StateError::IdempotentParameterMismatch,
            Rejection::InstancesNotFound(ids) => StateError::InstancesNotFound(ids),
            Rejection::IncorrectInstanceState { id, state } => {
                StateError::IncorrectInstanceState { id, state }
            }
            Rejection::ImageNotFound(s) => StateError::ImageNotFound(s),
            Rejection::AccountNotFound(s) => StateError::AccountNotFound(s),
            Rejection::ZoneNotFound(s) => StateError::ZoneNotFound(s),
            Rejection::TagLimitExceeded(s) => StateError::TagLimitExceeded(s),
            Rejection::AlreadyExists(s) => StateError::AlreadyExists(s),
            Rejection::KeyPairDuplicate(s) => StateError::KeyPairDuplicate(s),
            Rejection::KeyPairNotFound(s) => StateError::KeyPairNotFound(s),
            Rejection::SecurityGroupNotFound(s) => StateError::SecurityGroupNotFound(s),
            Rejection::SecurityGroupDuplicate(s) => StateError::SecurityGroupDuplicate(s),
            Rejection::RuleDuplicate(s) => StateError::RuleDuplicate(s),
            Rejection::RuleNotFound(s) => StateError::RuleNotFound(s),
            Rejection::RulesLimitExceeded => StateError::RulesLimitExceeded,
            Rejection::DependencyViolation(s) => StateError::DependencyViolation(s),
            Rejection::CannotDelete(s) => StateError::CannotDelete(s),
            Rejection::AddressTaken(s) => StateError::AddressTaken(s),
            Rejection::AllocationNotFound(s) => StateError::AllocationNotFound(s),
            Rejection::AssociationNotFound(s) => StateError::AssociationNotFound(s),
            Rejection::AddressAlreadyAssociated(s) => StateError::AddressAlreadyAssociated(s),
            Rejection::AddressInUse(s) => StateError::AddressInUse(s),
            Rejection::JoinRefused(s) => StateError::JoinRefused(s),
            Rejection::NothingToRevoke(s) => StateError::NothingToRevoke(s),
            Rejection::SnapshotRefused { fault, message } => {
                StateError::SnapshotRefused { fault, message }
            }
            Rejection::VolumeRefused { fault, message } => {
                StateError::VolumeRefused { fault, message }
            }
            Rejection::ImageRefused { fault, message } => {
                StateError::ImageRefused { fault, message }
            }
            Rejection::OperationNotPermitted {
                id,
                verb,
                attribute,
            } => StateError::OperationNotPermitted {
                id,
                verb,
                attribute,
            },
        }
    }
}
