//! The libvirt driver (cargo feature `libvirt`): real guests under QEMU, through the `virt`
//! crate. Every libvirt call blocks, so each runs on `spawn_blocking`.
//!
//! * A domain per instance, persistent, named by the instance id; its XML comes from
//!   [`domain_xml`](crate::domain_xml). Domains whose names are not instance ids are not
//!   Canopy's and are never listed or touched.
//! * Files: `instances_dir/<instance>/root.qcow2` (a qcow2 overlay on the machine image),
//!   `console.log` (the serial console, written by virtlogd) and `images` (the digests of
//!   the cached images the domain uses, which the cache must keep). Images come from the
//!   node's [`ImageCache`], filled through an [`ImageFetcher`] and verified by digest.
//! * Events: libvirt's event API needs an event loop thread and unsafe callbacks, so the
//!   driver polls the domain list every [`POLL`] and announces what changed; the agent uses
//!   events only as wake-ups anyway.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use canopy_common::{ImageRef, InstanceId, Resources, Sha256Digest, VolumeAttachment, VolumeId};
use tokio::sync::broadcast;
use virt::connect::Connect;
use virt::domain::{Domain, DomainState as VirState};
use virt::enumutil::Enum;
use virt::error::ErrorNumber;

use crate::domain_xml::{Accelerator, Boot, DomainDescription};
use crate::error::HypervisorError;
use crate::hypervisor::{
    DomainEvent, DomainInfo, DomainSpec, DomainState, Hypervisor, HypervisorKind, VolumeCopy,
};
use crate::image_cache::{ImageCache, ImageFetcher};

/// How often the domain list is polled for changes.
const POLL: Duration = Duration::from_secs(1);

/// Where and how the driver runs guests.
#[derive(Debug, Clone)]
pub struct LibvirtConfig {
    /// libvirt's connection URI, e.g. `qemu:///system`.
    pub uri: String,
    pub accelerator: Accelerator,
    /// Why that accelerator (the probe's finding, or "configured"), for the node's
    /// registration.
    pub accelerator_reason: String,
    /// Per-instance files (root overlay, console log).
    pub instances_dir: PathBuf,
    /// Volumes' bytes: `<volume>.qcow2`, made at the first attach.
    pub volumes_dir: PathBuf,
    /// Disk offered to instances (libvirt does not say how much a host has for them).
    pub disk_gib: u64,
}

/// Where a driver gets image files: the node's cache, and what fills it.
#[derive(Clone)]
pub struct ImageSource {
    pub cache: Arc<ImageCache>,
    pub fetcher: Arc<dyn ImageFetcher>,
}

pub struct LibvirtHypervisor {
    conn: Arc<Connect>,
    config: LibvirtConfig,
    images: ImageSource,
    capacity: Resources,
    events: broadcast::Sender<DomainEvent>,
    /// What each domain was at the last poll, to announce changes.
    seen: Mutex<HashMap<InstanceId, DomainState>>,
}

/// `qemu-img create`: a qcow2 file of `size_gib` (at least 1), empty or an overlay on a
/// backing file of the given format.
async fn qemu_img_create(
    file: &Path,
    size_gib: u64,
    backing: Option<(&Path, &str)>,
) -> Result<(), HypervisorError> {
    let mut cmd = tokio::process::Command::new("qemu-img");
    cmd.args(["create", "-q", "-f", "qcow2"]);
    if let Some((base, format)) = backing {
        cmd.args(["-F", format, "-b"]).arg(base);
    }
    let out = cmd
        .arg(file)
        .arg(format!("{}G", size_gib.max(1)))
        .output()
        .await
        .map_err(|e| failed(format!("qemu-img: {e}")))?;
    if !out.status.success() {
        return Err(failed(format!(
            "qemu-img create {}: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Runs `qemu-img` with `args`; its stderr is the error.
async fn qemu_img(args: &[&std::ffi::OsStr]) -> Result<(), HypervisorError> {
    let out = tokio::process::Command::new("qemu-img")
        .args(args)
        .output()
        .await
        .map_err(|e| failed(format!("qemu-img: {e}")))?;
    if !out.status.success() {
        return Err(failed(format!(
            "qemu-img {}: {}",
            args.first()
                .map(|a| a.to_string_lossy())
                .unwrap_or_default(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// A file removed when dropped (a snapshot's copy, once uploaded or abandoned).
struct Scratch(PathBuf);

/// How copies of root disks (CreateImage) in `instances_dir` begin; ones a crash left are
/// removed at connect.
const ROOT_COPY_PREFIX: &str = ".image-";

/// A finished copy's bytes, read in 1 MiB chunks as the upload takes them; the file goes
/// when the upload has read it (or gave up).
async fn streamed(copy: Scratch) -> Result<VolumeCopy, HypervisorError> {
    let size = tokio::fs::metadata(&copy.0).await.map_err(failed)?.len();
    let mut reader = tokio::fs::File::open(&copy.0).await.map_err(failed)?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, String>>(4);
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let _copy = copy;
        loop {
            let mut data = vec![0u8; 1 << 20];
            let chunk = match reader.read(&mut data).await {
                Ok(0) => return,
                Ok(n) => {
                    data.truncate(n);
                    Ok(data)
                }
                Err(e) => Err(e.to_string()),
            };
            let broken = chunk.is_err();
            if tx.send(chunk).await.is_err() || broken {
                return;
            }
        }
    });
    Ok(VolumeCopy {
        size,
        bytes: Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)),
    })
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn failed(e: impl std::fmt::Display) -> HypervisorError {
    HypervisorError::Failed(e.to_string())
}

fn is(e: &virt::error::Error, n: ErrorNumber) -> bool {
    matches!(e.code(), Enum::Known(code) if code == n)
}

/// The instance's domain; `NotFound` when libvirt has none of that name.
fn lookup(conn: &Connect, id: &InstanceId) -> Result<Domain, HypervisorError> {
    conn.lookup_domain_by_name(id.as_str()).map_err(|e| {
        if is(&e, ErrorNumber::NoDomain) {
            HypervisorError::NotFound(id.clone())
        } else {
            failed(e)
        }
    })
}

fn map_state(s: VirState) -> DomainState {
    match s {
        VirState::Running | VirState::Blocked | VirState::Paused | VirState::PMSuspended => {
            DomainState::Running
        }
        VirState::Shutdown => DomainState::ShuttingDown,
        VirState::Crashed => DomainState::Crashed,
        VirState::Shutoff | VirState::NoState => DomainState::ShutOff,
    }
}

/// The domain's state. A domain that is off because its QEMU died (libvirt's shut-off
/// reasons `crashed` and `failed`: a guest panic, a killed or crashed QEMU) counts as
/// crashed, so the instance is reported with `Server.InternalError` rather than as a guest
/// that shut itself down.
fn domain_state(d: &Domain) -> Result<DomainState, virt::error::Error> {
    use virt::domain::{DomainShutoffReason, DomainStateReason};
    let (state, reason) = d.state()?;
    let died = matches!(
        reason,
        Enum::Known(DomainStateReason::Shutoff(Enum::Known(
            DomainShutoffReason::Crashed | DomainShutoffReason::Failed
        )))
    );
    Ok(match state {
        Enum::Known(VirState::Shutoff) if died => DomainState::Crashed,
        Enum::Known(s) => map_state(s),
        Enum::Unknown(_) => DomainState::ShutOff,
    })
}

/// A file that holds a qcow2 image starts with `QFI\xfb`; anything else is taken as raw.
fn image_format(path: &Path) -> std::io::Result<&'static str> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let n = std::fs::File::open(path)?.read(&mut magic)?;
    Ok(if n == 4 && magic == *b"QFI\xfb" {
        "qcow2"
    } else {
        "raw"
    })
}

impl LibvirtHypervisor {
    /// Connects, reads the host's CPUs and memory, and starts watching domains.
    pub async fn connect(
        config: LibvirtConfig,
        images: ImageSource,
    ) -> Result<Arc<Self>, HypervisorError> {
        let uri = config.uri.clone();
        let (conn, info) = tokio::task::spawn_blocking(move || {
            // Without this libvirt also prints every error on stderr.
            virt::error::clear_error_callback();
            let conn = Connect::open(Some(&uri))?;
            let info = conn.node_info()?;
            Ok::<_, virt::error::Error>((conn, info))
        })
        .await
        .map_err(failed)?
        .map_err(|e| failed(format!("cannot connect to libvirt at {}: {e}", config.uri)))?;
        std::fs::create_dir_all(&config.instances_dir).map_err(|e| {
            failed(format!(
                "cannot create {}: {e}",
                config.instances_dir.display()
            ))
        })?;
        let capacity = Resources::new(info.cpus, info.memory / 1024, config.disk_gib);
        let (events, _) = broadcast::channel(1024);
        let driver = Arc::new(Self {
            conn: Arc::new(conn),
            config,
            images,
            capacity,
            events,
            seen: Mutex::new(HashMap::new()),
        });
        driver.remove_leftovers().await?;
        let weak = Arc::downgrade(&driver);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(POLL).await;
                let Some(driver) = weak.upgrade() else { return };
                driver.poll().await;
            }
        });
        Ok(driver)
    }

    /// Runs `f` on the connection on a blocking thread.
    async fn with_conn<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connect) -> Result<T, HypervisorError> + Send + 'static,
    ) -> Result<T, HypervisorError> {
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || f(&conn))
            .await
            .map_err(failed)?
    }

    /// Runs `f` (the `operation`) on the instance's domain; `NotFound` when there is none,
    /// `InvalidState` when libvirt says the domain's state does not allow it.
    async fn with_domain<T: Send + 'static>(
        &self,
        id: &InstanceId,
        operation: &'static str,
        f: impl FnOnce(&Domain) -> Result<T, virt::error::Error> + Send + 'static,
    ) -> Result<T, HypervisorError> {
        let id = id.clone();
        self.with_conn(move |conn| {
            let d = lookup(conn, &id)?;
            f(&d).map_err(|e| {
                if is(&e, ErrorNumber::OperationInvalid) {
                    HypervisorError::InvalidState {
                        instance_id: id.clone(),
                        state: domain_state(&d).unwrap_or(DomainState::ShutOff),
                        operation,
                    }
                } else {
                    failed(e)
                }
            })
        })
        .await
    }

    fn instance_dir(&self, id: &InstanceId) -> PathBuf {
        self.config.instances_dir.join(id.as_str())
    }

    /// The digests every defined domain's files depend on (from each instance's `images`
    /// file): the cache never evicts these.
    fn pinned(&self) -> HashSet<Sha256Digest> {
        let mut pinned = HashSet::new();
        let Ok(dirs) = std::fs::read_dir(&self.config.instances_dir) else {
            return pinned;
        };
        for dir in dirs.flatten() {
            if let Ok(list) = std::fs::read_to_string(dir.path().join("images")) {
                pinned.extend(list.lines().filter_map(|l| Sha256Digest::parse(l).ok()));
            }
        }
        pinned
    }

    /// The cached file of `image`, fetched (and verified) if the cache lacks it; `pinned`
    /// is [`Self::pinned`], read once per define or preparation.
    async fn image(
        &self,
        image: &ImageRef,
        pinned: &HashSet<Sha256Digest>,
    ) -> Result<PathBuf, HypervisorError> {
        self.images
            .cache
            .ensure(image, self.images.fetcher.as_ref(), pinned)
            .await
            .map_err(failed)
    }

    fn volume_file(&self, volume: &VolumeId) -> PathBuf {
        self.config
            .volumes_dir
            .join(format!("{}.qcow2", volume.as_str()))
    }

    /// Makes a volume's (empty) qcow2 file unless the host has it, atomically: a file of
    /// that name is always whole.
    async fn ensure_volume_file(
        &self,
        volume: &VolumeAttachment,
    ) -> Result<PathBuf, HypervisorError> {
        let file = self.volume_file(&volume.volume_id);
        if tokio::fs::try_exists(&file).await.map_err(failed)? {
            return Ok(file);
        }
        if volume.initialized {
            return Err(failed(format!(
                "the bytes of volume {} are not in {}: another node of the zone wrote them (share the volumes directory across the zone's nodes to move volumes between them)",
                volume.volume_id,
                self.config.volumes_dir.display()
            )));
        }
        tokio::fs::create_dir_all(&self.config.volumes_dir)
            .await
            .map_err(failed)?;
        let partial = Scratch(file.with_extension("qcow2.partial"));
        match &volume.source {
            None => qemu_img_create(&partial.0, volume.size_gib, None).await?,
            Some(source) => {
                // The snapshot's bytes (a standalone image), verified, become a standalone
                // qcow2 of the volume's size.
                let fetched = Scratch(file.with_extension("source.partial"));
                self.fetch_verified(&source.sha256, source.size, &fetched.0)
                    .await?;
                qemu_img(&[
                    "convert".as_ref(),
                    "-q".as_ref(),
                    "-O".as_ref(),
                    "qcow2".as_ref(),
                    fetched.0.as_os_str(),
                    partial.0.as_os_str(),
                ])
                .await?;
                qemu_img(&[
                    "resize".as_ref(),
                    "-q".as_ref(),
                    partial.0.as_os_str(),
                    format!("{}G", volume.size_gib.max(1)).as_ref(),
                ])
                .await?;
            }
        }
        tokio::fs::rename(&partial.0, &file).await.map_err(failed)?;
        Ok(file)
    }

    /// Fetches the bytes of `sha256` into `dest`, checking their size and digest.
    async fn fetch_verified(
        &self,
        sha256: &Sha256Digest,
        size: u64,
        dest: &Path,
    ) -> Result<(), HypervisorError> {
        use sha2::Digest;
        use tokio::io::AsyncWriteExt;
        use tokio_stream::StreamExt;
        let mut stream = self.images.fetcher.fetch(sha256).await.map_err(failed)?;
        let mut out = tokio::fs::File::create(dest).await.map_err(failed)?;
        let mut hasher = sha2::Sha256::new();
        let mut got = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(failed)?;
            got += chunk.len() as u64;
            if got > size {
                break;
            }
            hasher.update(&chunk);
            out.write_all(&chunk).await.map_err(failed)?;
        }
        out.sync_all().await.map_err(failed)?;
        let digest = Sha256Digest::from_bytes(&hasher.finalize().into());
        if got != size || &digest != sha256 {
            return Err(failed(format!(
                "snapshot bytes {sha256} failed verification: expected {size} bytes, got {got}"
            )));
        }
        Ok(())
    }

    /// The running domain that has `volume` attached, if any.
    async fn running_holder(
        &self,
        volume: &VolumeId,
    ) -> Result<Option<InstanceId>, HypervisorError> {
        Ok(self
            .list()
            .await?
            .into_iter()
            .find(|d| d.state.is_active() && d.volumes.contains(volume))
            .map(|d| d.instance_id))
    }

    /// The domain's description, creating its root overlay on the machine image. The
    /// images are pinned (the instance's `images` file) before they are fetched, so a
    /// concurrent eviction cannot take them.
    async fn build_domain(&self, spec: &DomainSpec) -> Result<DomainDescription, HypervisorError> {
        let dir = self.instance_dir(&spec.instance_id);
        let Some(disk) = &spec.boot.disk else {
            return Err(failed(format!(
                "image {} has no content: real nodes launch images registered with their bytes (RegisterImage with an ImageLocation)",
                spec.image_id
            )));
        };
        tokio::fs::create_dir_all(&dir).await.map_err(failed)?;
        let digests: String = spec
            .boot
            .iter()
            .map(|r| format!("{}\n", r.sha256))
            .collect();
        tokio::fs::write(dir.join("images"), digests)
            .await
            .map_err(failed)?;
        let pinned = self.pinned();
        let base = self.image(disk, &pinned).await?;
        let format = image_format(&base).map_err(failed)?;
        let boot = match &spec.boot.kernel {
            Some(kernel) => Boot::Kernel {
                kernel: self.image(kernel, &pinned).await?,
                initrd: match &spec.boot.ramdisk {
                    Some(ramdisk) => Some(self.image(ramdisk, &pinned).await?),
                    None => None,
                },
                cmdline: format!("console=ttyS0 {}", spec.kernel_cmdline_extra),
            },
            None => Boot::Disk,
        };
        let root_disk = dir.join("root.qcow2");
        qemu_img_create(&root_disk, spec.resources.disk_gib, Some((&base, format))).await?;
        Ok(DomainDescription {
            instance_id: spec.instance_id.clone(),
            accelerator: self.config.accelerator,
            vcpus: spec.resources.vcpus,
            memory_mib: spec.resources.memory_mib,
            boot,
            root_disk,
            nic: None,
            console_log: dir.join("console.log"),
        })
    }

    /// Removes instance directories that no defined domain owns (what a terminate or a
    /// failed define interrupted by a crash of the agent left behind) and root disk copies
    /// whose upload a crash cut short.
    async fn remove_leftovers(&self) -> Result<(), HypervisorError> {
        let defined: HashSet<InstanceId> = self
            .list()
            .await?
            .into_iter()
            .map(|d| d.instance_id)
            .collect();
        let Ok(dirs) = std::fs::read_dir(&self.config.instances_dir) else {
            return Ok(());
        };
        for dir in dirs.flatten() {
            let name = dir.file_name().to_string_lossy().into_owned();
            if name.starts_with(ROOT_COPY_PREFIX) {
                // A root disk's copy whose upload a crash cut short.
                let _ = tokio::fs::remove_file(dir.path()).await;
                continue;
            }
            if let Ok(id) = InstanceId::parse(&name)
                && !defined.contains(&id)
            {
                tracing::info!(instance = %id, "removing the files of an instance with no domain");
                let _ = tokio::fs::remove_dir_all(dir.path()).await;
            }
        }
        Ok(())
    }

    /// Announces every domain whose state changed since the last poll.
    async fn poll(&self) {
        let Ok(now) = self.list().await else { return };
        let now: HashMap<InstanceId, DomainState> =
            now.into_iter().map(|d| (d.instance_id, d.state)).collect();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        for (id, state) in &now {
            if seen.get(id) != Some(state) {
                let _ = self.events.send(DomainEvent {
                    instance_id: id.clone(),
                    state: Some(*state),
                    reason: None,
                });
            }
        }
        for id in seen.keys().filter(|id| !now.contains_key(*id)) {
            let _ = self.events.send(DomainEvent {
                instance_id: id.clone(),
                state: None,
                reason: Some("undefined".into()),
            });
        }
        *seen = now;
    }
}

#[async_trait]
impl Hypervisor for LibvirtHypervisor {
    fn kind(&self) -> HypervisorKind {
        match self.config.accelerator {
            Accelerator::Kvm => HypervisorKind::Kvm,
            Accelerator::Tcg => HypervisorKind::Qemu,
        }
    }

    fn capacity(&self) -> Resources {
        self.capacity
    }

    fn detail(&self) -> String {
        self.config.accelerator_reason.clone()
    }

    fn events(&self) -> broadcast::Receiver<DomainEvent> {
        self.events.subscribe()
    }

    fn is_prepared(&self, spec: &DomainSpec) -> bool {
        spec.boot
            .iter()
            .all(|image| self.images.cache.contains(&image.sha256))
    }

    async fn prepare(&self, spec: &DomainSpec) -> Result<(), HypervisorError> {
        let pinned = self.pinned();
        for image in spec.boot.iter() {
            self.image(image, &pinned).await?;
        }
        Ok(())
    }

    async fn define(&self, spec: &DomainSpec) -> Result<(), HypervisorError> {
        let defined = self.list().await?;
        if defined.iter().any(|d| d.instance_id == spec.instance_id) {
            return Err(HypervisorError::AlreadyExists(spec.instance_id.clone()));
        }
        let used: Resources = defined.iter().map(|d| d.resources).sum();
        let available = self.capacity.saturating_sub(&used);
        if !available.fits(&spec.resources) {
            return Err(HypervisorError::InsufficientCapacity {
                needed: spec.resources,
                available,
            });
        }
        let defined = match self.build_domain(spec).await {
            Ok(description) => match description.to_xml() {
                Ok(xml) => {
                    self.with_conn(move |conn| {
                        conn.define_domain_xml(&xml).map(|_| ()).map_err(failed)
                    })
                    .await
                }
                Err(e) => Err(failed(e)),
            },
            Err(e) => Err(e),
        };
        if defined.is_err() {
            // Nothing half-made stays behind.
            let _ = tokio::fs::remove_dir_all(self.instance_dir(&spec.instance_id)).await;
        }
        defined
    }

    async fn resize(&self, id: &InstanceId, resources: Resources) -> Result<(), HypervisorError> {
        let defined = self.list().await?;
        let Some(current) = defined.iter().find(|d| &d.instance_id == id) else {
            return Err(HypervisorError::NotFound(id.clone()));
        };
        if current.state != DomainState::ShutOff {
            return Err(HypervisorError::InvalidState {
                instance_id: id.clone(),
                state: current.state,
                operation: "resize",
            });
        }
        // Only vCPUs and memory are listed (and counted); the disk stays as it is.
        let used: Resources = defined
            .iter()
            .filter(|d| &d.instance_id != id)
            .map(|d| d.resources)
            .sum();
        let available = self.capacity.saturating_sub(&used);
        let needed = Resources::new(resources.vcpus, resources.memory_mib, 0);
        if !available.fits(&needed) {
            return Err(HypervisorError::InsufficientCapacity { needed, available });
        }
        let (vcpus, memory_mib) = (resources.vcpus, resources.memory_mib);
        let id = id.clone();
        // Redefining a shut-off domain under its name replaces its persistent
        // configuration; the XML read back keeps its disks (root overlay, volumes).
        self.with_conn(move |conn| {
            let d = lookup(conn, &id)?;
            if d.is_active().map_err(failed)? {
                return Err(HypervisorError::InvalidState {
                    instance_id: id.clone(),
                    state: domain_state(&d).unwrap_or(DomainState::Running),
                    operation: "resize",
                });
            }
            let xml = d
                .xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE)
                .map_err(failed)?;
            let xml = crate::domain_xml::resized_xml(&xml, vcpus, memory_mib).map_err(failed)?;
            conn.define_domain_xml(&xml).map(|_| ()).map_err(failed)
        })
        .await
    }

    async fn start(&self, id: &InstanceId) -> Result<(), HypervisorError> {
        self.with_domain(id, "start", |d| d.create().map(|_| ()))
            .await
    }

    async fn shutdown(&self, id: &InstanceId) -> Result<(), HypervisorError> {
        self.with_domain(id, "shut down", |d| {
            d.shutdown_flags(virt::sys::VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
                .map(|_| ())
        })
        .await
    }

    async fn destroy(&self, id: &InstanceId) -> Result<(), HypervisorError> {
        // A domain whose QEMU already died is off: nothing to force (libvirt would refuse).
        self.with_domain(id, "destroy", |d| {
            if d.is_active()? {
                d.destroy().map(|_| ())
            } else {
                Ok(())
            }
        })
        .await
    }

    async fn reboot(&self, id: &InstanceId) -> Result<(), HypervisorError> {
        self.with_domain(id, "reboot", |d| {
            d.reboot(virt::sys::VIR_DOMAIN_REBOOT_ACPI_POWER_BTN)
                .map(|_| ())
        })
        .await
    }

    async fn undefine(&self, id: &InstanceId) -> Result<(), HypervisorError> {
        // libvirt would undefine an active domain too (it goes on, transient): refuse it,
        // in the same call as the undefine.
        let active = self
            .with_domain(id, "undefine", |d| {
                if d.is_active()? {
                    Ok(Some(domain_state(d)?))
                } else {
                    d.undefine().map(|_| None)
                }
            })
            .await?;
        if let Some(state) = active {
            return Err(HypervisorError::InvalidState {
                instance_id: id.clone(),
                state,
                operation: "undefine",
            });
        }
        match tokio::fs::remove_dir_all(self.instance_dir(id)).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(failed(format!(
                "removing {}: {e}",
                self.instance_dir(id).display()
            ))),
        }
    }

    async fn state(&self, id: &InstanceId) -> Result<Option<DomainState>, HypervisorError> {
        match self
            .with_domain(id, "read the state of", domain_state)
            .await
        {
            Ok(s) => Ok(Some(s)),
            Err(HypervisorError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn list(&self) -> Result<Vec<DomainInfo>, HypervisorError> {
        self.with_conn(move |conn| {
            let domains = conn
                .list_all_domains(virt::sys::VIR_CONNECT_LIST_DOMAINS_PERSISTENT)
                .map_err(failed)?;
            let mut out = Vec::new();
            for d in domains {
                let Ok(name) = d.name() else { continue };
                let Ok(instance_id) = InstanceId::parse(&name) else {
                    continue; // not Canopy's
                };
                let info = d.info().map_err(failed)?;
                // The live definition while it runs, the persistent one otherwise.
                let xml = d.xml_desc(0).map_err(failed)?;
                out.push(DomainInfo {
                    volumes: crate::domain_xml::attached_volumes(&xml),
                    // libvirt knows vCPUs and memory; the root disk's size would cost a
                    // qemu-img call per domain per list, so disk is not counted here.
                    resources: Resources::new(info.nr_virt_cpu, info.max_mem / 1024, 0),
                    state: domain_state(&d).map_err(failed)?,
                    instance_id,
                });
            }
            out.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
            Ok(out)
        })
        .await
    }

    async fn attach_volume(
        &self,
        id: &InstanceId,
        volume: &VolumeAttachment,
    ) -> Result<(), HypervisorError> {
        let point = canopy_common::volumes::attachment_point(&volume.device).ok_or_else(|| {
            failed(format!(
                "{} is not a device a volume can take",
                volume.device
            ))
        })?;
        let file = self.ensure_volume_file(volume).await?;
        let xml = crate::domain_xml::volume_disk_xml(
            &volume.volume_id,
            &file,
            &canopy_common::volumes::guest_disk(&point),
        )
        .map_err(failed)?;
        self.with_domain(id, "attach a volume to", move |d| {
            let mut flags = virt::sys::VIR_DOMAIN_AFFECT_CONFIG;
            if d.is_active()? {
                flags |= virt::sys::VIR_DOMAIN_AFFECT_LIVE;
            }
            d.attach_device_flags(&xml, flags)
        })
        .await
    }

    async fn detach_volume(
        &self,
        id: &InstanceId,
        volume: &VolumeId,
    ) -> Result<(), HypervisorError> {
        let volume = volume.clone();
        let serial = crate::domain_xml::volume_serial(&volume);
        self.with_domain(id, "detach a volume from", move |d| {
            // The disk as each definition has it: the live one (a guest slow to let go keeps
            // it there a while) and the persistent one may differ.
            let disk_in = |xml: &str| -> Option<String> {
                let at = xml.find(&format!("<serial>{serial}</serial>"))?;
                let start = xml[..at].rfind("<disk ")?;
                let end = at + xml[at..].find("</disk>")? + "</disk>".len();
                Some(xml[start..end].to_owned())
            };
            if d.is_active()?
                && let Some(disk) = disk_in(&d.xml_desc(0)?)
            {
                d.detach_device_flags(&disk, virt::sys::VIR_DOMAIN_AFFECT_LIVE)?;
            }
            if let Some(disk) = disk_in(&d.xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE)?) {
                d.detach_device_flags(&disk, virt::sys::VIR_DOMAIN_AFFECT_CONFIG)?;
            }
            Ok(())
        })
        .await
    }

    async fn delete_volume(&self, volume: &VolumeId) -> Result<(), HypervisorError> {
        match tokio::fs::remove_file(self.volume_file(volume)).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(failed(e)),
        }
    }

    /// `qemu-img convert` of the volume's file into a standalone qcow2 beside it. A running
    /// guest that has the volume attached is paused for the copy: pausing drains QEMU's
    /// in-flight I/O and flushes its qcow2 metadata to the file, so the copy is a
    /// consistent image of the disk at one instant — crash-consistent for the guest (what
    /// its filesystem had written; its page cache is not flushed). `-U` (force-share) lets
    /// qemu-img read a file the paused QEMU holds locked. The pause lasts the copy.
    async fn snapshot_volume(
        &self,
        volume: &VolumeId,
    ) -> Result<Option<VolumeCopy>, HypervisorError> {
        let file = self.volume_file(volume);
        if !tokio::fs::try_exists(&file).await.map_err(failed)? {
            return Ok(None);
        }
        let copy = Scratch(self.config.volumes_dir.join(format!(
            ".snapshot-{}-{:016x}.qcow2",
            volume.as_str(),
            rand::random::<u64>()
        )));
        let holder = self.running_holder(volume).await?;
        if let Some(id) = &holder {
            self.with_domain(id, "pause", |d| d.suspend().map(|_| ()))
                .await?;
        }
        let converted = qemu_img(&[
            "convert".as_ref(),
            "-q".as_ref(),
            "-U".as_ref(),
            "-O".as_ref(),
            "qcow2".as_ref(),
            file.as_os_str(),
            copy.0.as_os_str(),
        ])
        .await;
        if let Some(id) = &holder {
            // Resumed whatever the copy's fate.
            if let Err(e) = self
                .with_domain(id, "resume", |d| d.resume().map(|_| ()))
                .await
            {
                tracing::warn!(instance = %id, error = %e, "cannot resume the guest after a snapshot copy");
            }
        }
        converted?;
        streamed(copy).await.map(Some)
    }

    /// `qemu-img convert` of the shut-off domain's root overlay into a standalone qcow2
    /// beside the instance directories: convert reads through the backing chain, so the copy
    /// is the cached machine image with what the guest wrote over it, and boots without it.
    /// No `-U`: qemu-img takes the disk's lock, so were a QEMU to hold it after all (a
    /// domain started behind the agent's back), the copy fails instead of reading a disk
    /// that is being written. The state is checked first for a clear refusal.
    async fn snapshot_root(&self, id: &InstanceId) -> Result<Option<VolumeCopy>, HypervisorError> {
        match self.state(id).await? {
            None => return Ok(None),
            Some(DomainState::ShutOff) => {}
            Some(state) => {
                return Err(HypervisorError::InvalidState {
                    instance_id: id.clone(),
                    state,
                    operation: "copy the root disk of",
                });
            }
        }
        let root = self.instance_dir(id).join("root.qcow2");
        let copy = Scratch(self.config.instances_dir.join(format!(
            "{ROOT_COPY_PREFIX}{id}-{:016x}.qcow2",
            rand::random::<u64>()
        )));
        qemu_img(&[
            "convert".as_ref(),
            "-q".as_ref(),
            "-O".as_ref(),
            "qcow2".as_ref(),
            root.as_os_str(),
            copy.0.as_os_str(),
        ])
        .await?;
        streamed(copy).await.map(Some)
    }

    async fn console(&self, id: &InstanceId) -> Result<Vec<u8>, HypervisorError> {
        if self.state(id).await?.is_none() {
            return Err(HypervisorError::NotFound(id.clone()));
        }
        match tokio::fs::read(self.instance_dir(id).join("console.log")).await {
            Ok(bytes) => Ok(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(failed(e)),
        }
    }
}
