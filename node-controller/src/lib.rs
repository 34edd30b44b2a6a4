//! Canopy's node controller: the [`Hypervisor`] trait, its drivers, and the node agent.
//!
//! * [`hypervisor`]: the driver trait, shaped after libvirt, and its types.
//! * [`sim`]: [`SimHypervisor`], a simulated host that tests can step and break.
//! * [`domain_xml`]: libvirt domain XML from a typed, validated description (for the
//!   libvirt driver).
//! * [`image_cache`]: the node's verified, size-bounded LRU cache of image bytes.
//! * [`host`]: the checks a node host passes before it runs guests, and the libvirt
//!   driver put together from the node's configuration.
//! * [`accel`]: whether guests get KVM or software emulation, by a bounded firmware boot.
//! * `libvirt` (cargo feature `libvirt`): the libvirt driver.
//! * [`plan`]: the pure reconcile planner (desired + observed → actions, reports).
//! * [`start`]: runs the agent — the `NodeController` gRPC service, registration and
//!   heartbeats to the CC, the reconciler and the reporter.
//!
//! Prost types stay at the edge (`convert`, `service`); the rest works with the typed
//! values of `canopy-common` and [`model`].

pub mod accel;
mod agent;
pub mod config;
mod convert;
pub mod domain_xml;
pub mod error;
pub mod host;
pub mod hypervisor;
pub mod image_cache;
pub mod image_fetch;
#[cfg(feature = "libvirt")]
pub mod libvirt;
pub mod metadata;
pub mod model;
pub mod plan;
mod service;
pub mod sim;

pub use agent::{NodeHandle, start};
pub use config::NcConfig;
pub use error::{HypervisorError, NcError};
pub use hypervisor::{
    DomainEvent, DomainInfo, DomainSpec, DomainState, Hypervisor, HypervisorKind,
    UnknownHypervisorKind, VolumeCopy,
};
pub use model::{DesiredInstance, DesiredState, InstanceReport, PutOutcome, StateReason, reason};
pub use sim::{SimConfig, SimControl, SimHypervisor};
