use canopy_common::{
    AccountId, ImageId, InstanceId, InstanceState, NodeId, PowerState, ReservationId, Resources,
    ZoneName,
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::types::{Image, StateReason, Tag};

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
        resource_ids: Vec<InstanceId>,
        tags: Vec<Tag>,
    },
    /// Removes each key; with a value, only when the stored value matches.
    DeleteTags {
        account_id: AccountId,
        resource_ids: Vec<InstanceId>,
        tags: Vec<(String, Option<String>)>,
    },
    /// Forgets instances terminated before `before` (AWS keeps them visible about an hour).
    PurgeTerminated {
        before: DateTime<Utc>,
    },
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
    pub user_data: Option<Vec<u8>>,
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
