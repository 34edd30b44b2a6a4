//! The crate's errors: [`HypervisorError`] from drivers, [`NcError`] for everything the
//! node agent does. Both are mapped to `tonic::Status` once, in `service.rs`.

use canopy_common::{InstanceId, Resources};

use crate::hypervisor::DomainState;

/// What a [`Hypervisor`](crate::Hypervisor) driver can fail with. The variants follow the
/// libvirt error classes the agent must tell apart; everything else is `Failed`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HypervisorError {
    /// No domain is defined for the instance (libvirt `VIR_ERR_NO_DOMAIN`).
    #[error("no domain for instance {0}")]
    NotFound(InstanceId),
    /// A domain for the instance is already defined.
    #[error("a domain for instance {0} is already defined")]
    AlreadyExists(InstanceId),
    /// Defining the domain would exceed what the host offers.
    #[error("insufficient capacity: need {needed:?}, {available:?} free")]
    InsufficientCapacity {
        needed: Resources,
        available: Resources,
    },
    /// The operation is not valid in the domain's current state, e.g. undefining a running
    /// domain (libvirt `VIR_ERR_OPERATION_INVALID`).
    #[error("cannot {operation} instance {instance_id} while it is {state}")]
    InvalidState {
        instance_id: InstanceId,
        state: DomainState,
        operation: &'static str,
    },
    /// Anything else the driver reports (a failed boot, a libvirt error…).
    #[error("hypervisor failure: {0}")]
    Failed(String),
}

/// The node controller's error type.
#[derive(Debug, thiserror::Error)]
pub enum NcError {
    /// The configuration is unusable; the message names the setting.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A request from the CC is malformed (bad id, missing field, unknown enum value).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A desired-state document addressed to another node.
    #[error("desired state is for node {got}, this is node {ours}")]
    WrongNode { ours: String, got: String },
    /// The gRPC listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    /// The hypervisor driver failed.
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
}
