//! The cloud controller's state: domain types, the commands that change them, the one
//! `apply` function that executes a command against the SQLite store, and read queries.
//!
//! Commands carry every non-deterministic input (generated ids, timestamps), so applying
//! the same sequence of commands to two empty stores yields the same rows. That is what
//! lets a replicated log (openraft, issue 3) feed `apply` unchanged.

mod addresses;
mod apply;
mod bulk;
mod command;
mod error;
mod images;
mod pki;
mod query;
mod security_groups;
mod snapshots;
mod store;
mod types;
mod volumes;

pub use apply::{MAX_TAGS_PER_RESOURCE, apply};
pub use bulk::{Tx, apply_each, begin_if_pending};
pub use command::{
    Command, InstanceAction, InstanceChange, KeyPairRef, LaunchPermission, NewInstance,
    Observation, Outcome, StateChange,
};
pub use error::{ImageFault, SnapshotFault, StateError, VolumeFault};
pub use pki::{CertificateRow, JoinTokenRow, RevokeTarget};
pub use query::{AllocationGroup, InstanceFilter};
pub use security_groups::MAX_RULES_PER_DIRECTION;
pub(crate) use store::count_applied_and_commit;
pub use store::{BootImageError, Catalog, StateDigest, Store};
pub use types::{
    Account, Address, AttachStatus, Attachment, DEFAULT_SECURITY_GROUP, DesiredSpec, Image,
    Instance, InstanceVolume, KeyPair, MetadataOptions, NO_VOLUME, RESOURCE_TYPE_INSTANCE,
    ROOT_DEVICE_NAME, Reservation, RootSnapshot, RulePeer, RuleSpec, SecurityGroup,
    SecurityGroupRule, Snapshot, SnapshotOutcome, SnapshotState, StateReason, Tag, Volume,
    VolumeState, Whereabouts, Zone,
};

#[cfg(test)]
mod tests;
