//! The cluster controller's one error type, and its one mapping to `tonic::Status`.

use canopy_common::{IdError, InstanceId, NodeId, ZoneName};

/// Everything that can go wrong in the cluster controller.
#[derive(Debug, thiserror::Error)]
pub enum CcError {
    /// A request carried an id that does not parse.
    #[error(transparent)]
    MalformedId(#[from] IdError),
    /// A request is malformed in some other way (missing field, unknown enum value…).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The CLC sent a zone document meant for another zone.
    #[error("desired state for zone {got:?} was sent to the cluster controller of {ours}")]
    WrongZone { ours: ZoneName, got: String },
    /// An NC talked to us before registering (or after we forgot it).
    #[error("node {0} is not registered")]
    UnknownNode(NodeId),
    /// The instance is not placed on any node of this zone (or its node does not know it).
    #[error("instance {0} is not on any node of this zone")]
    InstanceNotFound(InstanceId),
    /// The node an instance lives on could not be reached.
    #[error("node {node} is unreachable: {detail}")]
    NodeUnreachable { node: NodeId, detail: String },
    /// The configuration given to `start` is unusable.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The gRPC listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

impl From<CcError> for tonic::Status {
    fn from(err: CcError) -> Self {
        use tonic::Status;
        match &err {
            CcError::MalformedId(_) | CcError::InvalidArgument(_) => {
                Status::invalid_argument(err.to_string())
            }
            CcError::WrongZone { .. } | CcError::UnknownNode(_) => {
                Status::failed_precondition(err.to_string())
            }
            CcError::InstanceNotFound(_) => Status::not_found(err.to_string()),
            // The transport detail is for our log, not for the caller.
            CcError::NodeUnreachable { node, detail } => {
                tracing::warn!(%node, %detail, "node unreachable");
                Status::unavailable(format!("node {node} is unreachable"))
            }
            CcError::Config(_) | CcError::Bind { .. } => {
                tracing::error!(error = %err, "internal error");
                Status::internal("internal error")
            }
        }
    }
}
