//! Domain types shared by every Canopy tier.
//!
//! Nothing here does I/O: ids, resource arithmetic, the instance-type catalogue, the
//! instance lifecycle state machine and the pure placement function.

pub mod ids;
pub mod images;
pub mod instance_types;
pub mod lifecycle;
pub mod metadata;
pub mod net;
pub mod placement;
pub mod resources;
pub mod volumes;

pub use ids::{
    AccessKeyId, AccountId, AllocationId, AssociationId, IdError, ImageId, InstanceId, KeyPairId,
    NodeId, RegionName, ReservationId, ResourceId, SecurityGroupId, SecurityGroupRuleId,
    SnapshotId, VolumeId, ZoneName,
};
pub use images::{BootImages, ImageKind, ImageRef, Sha256Digest};
pub use instance_types::{INSTANCE_TYPES, InstanceType};
pub use lifecycle::{IllegalTransition, InstanceState, LifecycleEvent, PowerState};
pub use metadata::{HttpTokens, InstanceMetadata};
pub use net::Ipv4Subnet;
pub use resources::Resources;
pub use volumes::{SnapshotRef, SnapshotRequest, SnapshotSource, VolumeAttachment};
