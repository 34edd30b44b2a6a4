//! The EC2 edge's one error type, and the single place where every lower error becomes
//! an AWS error code and HTTP status.

use canopy_common::InstanceId;
use canopy_ec2_wire::params::ParamError;
use canopy_ec2_wire::sigv4::AuthError;

use crate::state::StateError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub code: String,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            code: code.to_owned(),
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(400, "InvalidParameterValue", message)
    }

    pub fn missing(name: &str) -> Self {
        Self::new(
            400,
            "MissingParameter",
            format!("The request must contain the parameter {name}"),
        )
    }

    pub fn combination(message: impl Into<String>) -> Self {
        Self::new(400, "InvalidParameterCombination", message)
    }

    pub fn dry_run() -> Self {
        Self::new(
            412,
            "DryRunOperation",
            "Request would have succeeded, but DryRun flag is set.",
        )
    }

    pub fn internal() -> Self {
        Self::new(500, "InternalError", "An internal error has occurred")
    }

    pub fn instance_malformed(id: &str) -> Self {
        Self::new(
            400,
            "InvalidInstanceID.Malformed",
            format!("Invalid id: \"{id}\" (expecting \"i-...\")"),
        )
    }

    pub fn instances_not_found(ids: &[InstanceId]) -> Self {
        let list = ids
            .iter()
            .map(|i| i.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let message = if ids.len() == 1 {
            format!("The instance ID '{list}' does not exist")
        } else {
            format!("The instance IDs '{list}' do not exist")
        };
        Self::new(400, "InvalidInstanceID.NotFound", message)
    }
}

impl From<ParamError> for ApiError {
    fn from(e: ParamError) -> Self {
        Self::new(400, e.code(), e.to_string())
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        Self::new(e.http_status(), e.code(), e.to_string())
    }
}

impl From<crate::images::ImageStoreError> for ApiError {
    fn from(e: crate::images::ImageStoreError) -> Self {
        match e {
            crate::images::ImageStoreError::Location(why) => {
                Self::invalid(format!("ImageLocation: {why}"))
            }
            e @ crate::images::ImageStoreError::Io { .. } => {
                tracing::error!(error = %e, "image store error");
                Self::internal()
            }
        }
    }
}

impl From<crate::image_registry::RegistrationError> for ApiError {
    fn from(e: crate::image_registry::RegistrationError) -> Self {
        use crate::image_registry::RegistrationError as R;
        match e {
            R::InvalidName(_) => Self::new(400, "InvalidAMIName.Malformed", e.to_string()),
            R::DuplicateName(_) => Self::new(400, "InvalidAMIName.Duplicate", e.to_string()),
            R::ImageNotFound(_) => Self::new(400, "InvalidAMIID.NotFound", e.to_string()),
            R::Invalid(_) | R::WrongKind { .. } => Self::invalid(e.to_string()),
            R::BootImagesOnNonMachine(_) => Self::combination(e.to_string()),
            R::Store(e) => e.into(),
            R::State(e) => e.into(),
        }
    }
}

impl From<StateError> for ApiError {
    fn from(e: StateError) -> Self {
        match e {
            StateError::IdempotentParameterMismatch => Self::new(
                400,
                "IdempotentParameterMismatch",
                "The client token you have provided is associated with a resource that has different parameters.",
            ),
            StateError::InstancesNotFound(ids) => Self::instances_not_found(&ids),
            StateError::IncorrectInstanceState { id, state } => Self::new(
                400,
                "IncorrectInstanceState",
                format!(
                    "The instance '{id}' is not in a state from which the requested operation can be performed (it is {state})."
                ),
            ),
            StateError::ImageNotFound(id) => Self::new(
                400,
                "InvalidAMIID.NotFound",
                format!("The image id '[{id}]' does not exist"),
            ),
            StateError::AccountNotFound(_) => Self::new(
                401,
                "AuthFailure",
                "AWS was not able to validate the provided access credentials",
            ),
            StateError::ZoneNotFound(z) => {
                Self::invalid(format!("Invalid availability zone: [{z}]"))
            }
            StateError::TagLimitExceeded(_) => Self::new(
                400,
                "TagLimitExceeded",
                format!(
                    "The maximum number of tags per resource is {}",
                    crate::state::MAX_TAGS_PER_RESOURCE
                ),
            ),
            StateError::OperationNotPermitted {
                id,
                verb,
                attribute,
            } => Self::new(
                400,
                "OperationNotPermitted",
                format!(
                    "The instance '{id}' may not be {verb}. Modify its '{attribute}' instance attribute and try again."
                ),
            ),
            StateError::SecurityGroupNotFound(what) => {
                super::security_groups::group_not_found(&what)
            }
            StateError::SecurityGroupDuplicate(name) => Self::new(
                400,
                "InvalidGroup.Duplicate",
                format!("The security group '{name}' already exists"),
            ),
            StateError::RuleDuplicate(rule) => Self::new(
                400,
                "InvalidPermission.Duplicate",
                format!("the specified rule \"{rule}\" already exists"),
            ),
            StateError::RuleNotFound(id) => Self::new(
                400,
                "InvalidSecurityGroupRuleId.NotFound",
                format!("The security group rule ID '{id}' does not exist"),
            ),
            e @ StateError::RulesLimitExceeded => {
                Self::new(400, "RulesPerSecurityGroupLimitExceeded", e.to_string())
            }
            StateError::DependencyViolation(why) => Self::new(400, "DependencyViolation", why),
            StateError::CannotDelete(why) => Self::new(400, "CannotDelete", why),
            StateError::AddressTaken(ip) => Self::new(
                400,
                "InvalidAddress.InUse",
                format!("Address '{ip}' is already allocated."),
            ),
            StateError::AllocationNotFound(id) => super::addresses::allocation_not_found(&id),
            StateError::AssociationNotFound(id) => super::addresses::association_not_found(&id),
            StateError::AddressAlreadyAssociated(ip) => Self::new(
                400,
                "Resource.AlreadyAssociated",
                format!(
                    "The address {ip} is already associated with an instance; set AllowReassociation to move it."
                ),
            ),
            StateError::AddressInUse(ip) => Self::new(
                400,
                "InvalidIPAddress.InUse",
                format!("The address {ip} is associated with an instance; disassociate it first."),
            ),
            StateError::VolumeRefused { fault, message } => {
                use crate::state::VolumeFault as F;
                let code = match fault {
                    F::NotFound => "InvalidVolume.NotFound",
                    F::InUse => "VolumeInUse",
                    F::IncorrectState => "IncorrectState",
                    F::ZoneMismatch => "InvalidVolume.ZoneMismatch",
                    F::DeviceInUse | F::TooSmall => "InvalidParameterValue",
                    F::AttachmentNotFound => "InvalidAttachment.NotFound",
                    // The edge answers a replayed token with the volume it made.
                    F::TokenTaken => "IdempotentParameterMismatch",
                };
                Self::new(400, code, message)
            }
            StateError::SnapshotRefused { fault, message } => {
                use crate::state::SnapshotFault as F;
                let code = match fault {
                    F::NotFound => "InvalidSnapshot.NotFound",
                    F::IncorrectState => "IncorrectState",
                    F::InUse => "InvalidSnapshot.InUse",
                };
                Self::new(400, code, message)
            }
            StateError::ImageRefused { fault, message } => {
                use crate::state::ImageFault as F;
                let code = match fault {
                    F::DuplicateName => "InvalidAMIName.Duplicate",
                    F::InstanceNotStopped => "IncorrectInstanceState",
                };
                Self::new(400, code, message)
            }
            StateError::KeyPairDuplicate(name) => Self::new(
                400,
                "InvalidKeyPair.Duplicate",
                format!("The keypair '{name}' already exists."),
            ),
            StateError::KeyPairNotFound(name) => super::key_pairs::key_pair_not_found(&name),
            // Not reachable from EC2 actions; mapped for completeness.
            StateError::JoinRefused(m) | StateError::NothingToRevoke(m) => {
                Self::new(400, "InvalidParameterValue", m)
            }
            StateError::AlreadyExists(what) => Self::new(
                400,
                "InvalidParameterValue",
                format!("{what} already exists"),
            ),
            // A replica that is not the Raft leader: the client (or a load balancer) retries.
            StateError::NotLeader { .. } => Self::new(
                503,
                "ServiceUnavailable",
                "The service is unavailable on this endpoint. Please try again.",
            ),
            // No leader or no quorum within the wait bound. The SDKs retry a 503; a retried
            // RunInstances carries the same ClientToken, so it cannot launch twice.
            StateError::Unavailable(why) => Self::new(
                503,
                "ServiceUnavailable",
                format!("The service is unavailable right now ({why}). Please try again."),
            ),
            // Internal detail goes to the log, not to the client.
            e @ (StateError::Db(_) | StateError::Migrate(_) | StateError::Corrupt(_)) => {
                tracing::error!(error = %e, "state error");
                Self::internal()
            }
        }
    }
}
