//! The `Hypervisor` trait: what the node agent needs from a virtualisation driver.
//!
//! The shape follows libvirt, because the production driver is a thin layer over it: a
//! domain is *defined* from a [`DomainSpec`], then started, shut down (ACPI, graceful),
//! destroyed (forced off), rebooted and finally undefined. The simulated driver
//! ([`SimHypervisor`](crate::SimHypervisor)) implements the same trait, so the whole agent
//! runs in tests without a host.
//!
//! Operations are not idempotent by themselves — like libvirt, starting a running domain
//! or undefining a running one is an error ([`HypervisorError::InvalidState`]). The
//! reconciler provides idempotency by looking at [`Hypervisor::list`] before acting.

use std::fmt;
use std::str::FromStr;

use async_trait::async_trait;
use canopy_common::{BootImages, ImageId, InstanceId, Resources, VolumeAttachment, VolumeId};
use tokio::sync::broadcast;

use crate::error::HypervisorError;

/// Which virtualisation the driver uses; reported to the CC as the node's hypervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HypervisorKind {
    /// The simulated driver: no guests, only their state machine and console.
    Sim,
    /// QEMU through libvirt, without hardware acceleration (TCG).
    Qemu,
    /// QEMU/KVM through libvirt.
    Kvm,
}

impl HypervisorKind {
    /// The name the CC and `DescribeInstances` (`hypervisor`) see.
    pub fn name(self) -> &'static str {
        match self {
            HypervisorKind::Sim => "sim",
            HypervisorKind::Qemu => "qemu",
            HypervisorKind::Kvm => "kvm",
        }
    }
}

impl fmt::Display for HypervisorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Error for an unknown hypervisor name in configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown hypervisor {0:?} (expected sim, qemu or kvm)")]
pub struct UnknownHypervisorKind(pub String);

impl FromStr for HypervisorKind {
    type Err = UnknownHypervisorKind;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "sim" => Ok(HypervisorKind::Sim),
            "qemu" => Ok(HypervisorKind::Qemu),
            "kvm" => Ok(HypervisorKind::Kvm),
            other => Err(UnknownHypervisorKind(other.to_owned())),
        }
    }
}

/// Everything a driver needs to define a domain for an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainSpec {
    pub instance_id: InstanceId,
    /// vCPUs, memory and root disk size the domain gets (and takes from the host).
    pub resources: Resources,
    /// The machine image the root disk is made from.
    pub image_id: ImageId,
    /// The bytes it boots from: the machine image's, and a kernel (with its ramdisk) to
    /// boot directly instead of the image's boot loader. Images without content have none;
    /// drivers of real guests refuse those.
    pub boot: BootImages,
    /// EC2 user data, handed to the guest by the metadata service / config drive.
    pub user_data: Vec<u8>,
    /// Appended to the kernel command line, e.g. `canopy.instance_id=i-…`, so a guest (and
    /// its console) can tell which instance it is before the metadata service answers.
    pub kernel_cmdline_extra: String,
}

impl DomainSpec {
    /// A spec with the kernel command line the agent always adds.
    pub fn new(
        instance_id: InstanceId,
        resources: Resources,
        image_id: ImageId,
        user_data: Vec<u8>,
    ) -> Self {
        let kernel_cmdline_extra = format!("canopy.instance_id={instance_id}");
        DomainSpec {
            instance_id,
            resources,
            image_id,
            boot: BootImages::default(),
            user_data,
            kernel_cmdline_extra,
        }
    }
}

/// A domain's power state, after libvirt's `virDomainState`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DomainState {
    /// Defined but not running (libvirt `SHUTOFF`).
    ShutOff,
    /// Started, guest not up yet. libvirt cannot see this (it says `RUNNING` from the first
    /// instruction), so the libvirt driver never reports it; the simulator does, so that
    /// EC2's `pending` can be exercised.
    Booting,
    /// Running (libvirt `RUNNING`, also `BLOCKED`/`PAUSED` for our purposes).
    Running,
    /// An ACPI shutdown is under way (libvirt `SHUTDOWN`).
    ShuttingDown,
    /// The guest died and the domain was preserved (libvirt `CRASHED`). It must be
    /// destroyed before it can be started again.
    Crashed,
}

impl DomainState {
    /// The lower-case name used in logs and errors.
    pub fn name(self) -> &'static str {
        match self {
            DomainState::ShutOff => "shut off",
            DomainState::Booting => "booting",
            DomainState::Running => "running",
            DomainState::ShuttingDown => "shutting down",
            DomainState::Crashed => "crashed",
        }
    }

    /// True while the guest executes (or is about to): the states in which a stop or a
    /// destroy has something to do.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            DomainState::Booting | DomainState::Running | DomainState::ShuttingDown
        )
    }
}

impl fmt::Display for DomainState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One domain as [`Hypervisor::list`] sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainInfo {
    pub instance_id: InstanceId,
    pub state: DomainState,
    pub resources: Resources,
    /// The volumes attached to the domain (to the running guest, or to its definition
    /// while shut off).
    pub volumes: Vec<VolumeId>,
}

/// A change of a domain's state, as libvirt's lifecycle events announce it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainEvent {
    pub instance_id: InstanceId,
    /// What [`Hypervisor::state`] now returns: `None` once the domain was undefined.
    pub state: Option<DomainState>,
    /// Why, when the driver knows (e.g. "guest crashed", "destroyed").
    pub reason: Option<String>,
}

/// A disk's bytes (a volume's, or an instance's root disk's) as they were at one moment, as
/// a standalone image (qcow2 for the libvirt driver), to upload as a snapshot.
pub struct VolumeCopy {
    /// The copy's length in bytes.
    pub size: u64,
    /// The bytes, in chunks of at most 1 MiB.
    pub bytes: std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<Vec<u8>, String>> + Send>>,
}

impl fmt::Debug for VolumeCopy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VolumeCopy")
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

/// A virtualisation driver. Object safe: the agent holds an `Arc<dyn Hypervisor>`.
///
/// Drivers whose calls block (libvirt) run them on `spawn_blocking`; callers may assume
/// every method returns promptly.
#[async_trait]
pub trait Hypervisor: Send + Sync + 'static {
    /// Which virtualisation this is.
    fn kind(&self) -> HypervisorKind;

    /// How this driver runs guests, in a sentence for operators (e.g. why KVM or software
    /// emulation); shown with the node in the admin views.
    fn detail(&self) -> String {
        String::new()
    }

    /// What the host offers to instances. Drivers read it once when they connect.
    fn capacity(&self) -> Resources;

    /// Lifecycle events of every domain. Receivers that lag lose events
    /// (`RecvError::Lagged`); the agent only uses them as wake-ups and re-reads `list`.
    fn events(&self) -> broadcast::Receiver<DomainEvent>;

    /// Whether `define` of `spec` would find everything it needs on the host (its images
    /// cached). The agent defines only prepared specs, and prepares the others in the
    /// background, so a long image download never holds up the node's other instances.
    fn is_prepared(&self, spec: &DomainSpec) -> bool {
        let _ = spec;
        true
    }

    /// Gets what `define` of `spec` needs onto the host (fetches its images). May take
    /// long; runs beside the reconciler.
    async fn prepare(&self, spec: &DomainSpec) -> Result<(), HypervisorError> {
        let _ = spec;
        Ok(())
    }

    /// Defines a (shut off) domain. Fails with `AlreadyExists` or `InsufficientCapacity`.
    async fn define(&self, spec: &DomainSpec) -> Result<(), HypervisorError>;

    /// Gives a shut-off domain other vCPUs and memory (and, for the host's accounting,
    /// `resources` as a whole), keeping the rest of its definition: its root disk and its
    /// attached volumes. Fails with `InvalidState` while the domain is active, and with
    /// `InsufficientCapacity` when the host has no room for the growth.
    async fn resize(&self, id: &InstanceId, resources: Resources) -> Result<(), HypervisorError>;

    /// Powers a shut-off domain on.
    async fn start(&self, id: &InstanceId) -> Result<(), HypervisorError>;

    /// Asks the guest to power off (ACPI). Returns once the request is delivered; the
    /// domain reaches `ShutOff` later, or never if the guest ignores it.
    async fn shutdown(&self, id: &InstanceId) -> Result<(), HypervisorError>;

    /// Forces an active or crashed domain off at once.
    async fn destroy(&self, id: &InstanceId) -> Result<(), HypervisorError>;

    /// Asks the guest to reboot.
    async fn reboot(&self, id: &InstanceId) -> Result<(), HypervisorError>;

    /// Removes a shut-off domain and frees its resources.
    async fn undefine(&self, id: &InstanceId) -> Result<(), HypervisorError>;

    /// The domain's state, or `None` when no domain is defined for the instance.
    async fn state(&self, id: &InstanceId) -> Result<Option<DomainState>, HypervisorError>;

    /// Every domain defined on the host.
    async fn list(&self) -> Result<Vec<DomainInfo>, HypervisorError>;

    /// The console log the domain has written so far (across reboots).
    async fn console(&self, id: &InstanceId) -> Result<Vec<u8>, HypervisorError>;

    /// Attaches a volume to the domain, making its (empty) bytes first if the host has none
    /// yet: to the running guest and to the definition, or to the definition alone while
    /// the domain is shut off. Attaching an attached volume is an `AlreadyExists` error.
    async fn attach_volume(
        &self,
        id: &InstanceId,
        volume: &VolumeAttachment,
    ) -> Result<(), HypervisorError>;

    /// Detaches a volume from the domain (the guest may take a moment to let go of it; the
    /// volume stays listed until it has). The bytes stay.
    async fn detach_volume(
        &self,
        id: &InstanceId,
        volume: &VolumeId,
    ) -> Result<(), HypervisorError>;

    /// Removes a deleted volume's bytes from the host, if it holds them. Succeeds when
    /// there is nothing to remove.
    async fn delete_volume(&self, volume: &VolumeId) -> Result<(), HypervisorError>;

    /// Copies a volume's bytes as they are now (a snapshot), if the host holds them;
    /// `None` when it does not (another node of the zone does). The copy of a volume
    /// attached to a running guest is crash-consistent: what a sudden power loss would have
    /// left on the disk.
    async fn snapshot_volume(
        &self,
        volume: &VolumeId,
    ) -> Result<Option<VolumeCopy>, HypervisorError>;

    /// Copies a shut-off domain's root disk (CreateImage) flattened into one standalone
    /// image: what the guest wrote together with the machine image under it, so the copy
    /// needs nothing else to boot. `None` when no domain of that instance is defined here.
    /// Fails with `InvalidState` unless the domain is shut off: a running guest's disk is
    /// never copied. The agent neither starts nor undefines the domain while it copies.
    async fn snapshot_root(&self, id: &InstanceId) -> Result<Option<VolumeCopy>, HypervisorError>;
}
