//! The simulated hypervisor: libvirt's state machine without guests.
//!
//! Domains boot for `boot_delay` and power down for `shutdown_delay` on tokio timers, so
//! tests can run on paused time. A [`SimControl`] lets a test step and break the
//! simulation: hold a boot in `Booting`, make the next start fail, crash or power off a
//! guest. Every delayed transition carries the domain's generation, bumped by each state
//! change, so a timer armed by an earlier boot never fires into a later one.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use async_trait::async_trait;
use canopy_common::{InstanceId, Resources, Sha256Digest, VolumeAttachment, VolumeId};
use tokio::sync::broadcast;

use crate::error::HypervisorError;
use crate::hypervisor::{
    DomainEvent, DomainInfo, DomainSpec, DomainState, Hypervisor, HypervisorKind, VolumeCopy,
};

/// The console keeps at most this much (the tail), like a serial log that rotates.
const CONSOLE_LIMIT: usize = 256 * 1024;
/// Enough for bursts of lifecycle events; lagging receivers re-read `list` anyway.
const EVENT_CAPACITY: usize = 1024;
/// How long a simulated volume copy takes, so a snapshot is seen `pending` for a moment.
const SNAPSHOT_DELAY: Duration = Duration::from_millis(200);
/// The size of a simulated volume's copy: a little over one upload chunk, so uploads from
/// simulated nodes go through the chunking too.
const SIM_COPY_BYTES: usize = (1 << 20) + 4096;

/// How the simulated host behaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimConfig {
    /// What the host offers; `define` fails beyond it.
    pub capacity: Resources,
    /// How long a domain stays `Booting` after start or reboot.
    pub boot_delay: Duration,
    /// How long an ACPI shutdown takes.
    pub shutdown_delay: Duration,
    /// The kind reported to the CC; `Sim` unless a test wants to look like another host.
    pub kind: HypervisorKind,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            capacity: Resources::new(16, 65536, 1000),
            boot_delay: Duration::from_millis(500),
            shutdown_delay: Duration::from_millis(300),
            kind: HypervisorKind::Sim,
        }
    }
}

/// The simulated driver. Cheap to share: hold it in an `Arc` and coerce to
/// `Arc<dyn Hypervisor>`; keep the `Arc<SimHypervisor>` (or a [`SimControl`]) to steer it.
#[derive(Debug)]
pub struct SimHypervisor {
    inner: Arc<SimInner>,
}

/// Test handle on a [`SimHypervisor`]: steps and failures. Cloneable, usable from sync code.
#[derive(Debug, Clone)]
pub struct SimControl {
    inner: Arc<SimInner>,
}

#[derive(Debug)]
struct SimInner {
    config: SimConfig,
    state: Mutex<SimState>,
    events: broadcast::Sender<DomainEvent>,
}

#[derive(Debug, Default)]
struct SimState {
    domains: BTreeMap<InstanceId, SimDomain>,
    /// What the defined domains take, kept as they are defined and undefined (summing
    /// them on every define made defining O(domains)).
    used: Resources,
    /// Instances whose boots stay in `Booting` until released. Kept apart from the domains
    /// so a test can hold an instance before the agent defines it.
    held: HashSet<InstanceId>,
    fail_next_start: Option<String>,
    /// Instances whose preparation (an image download on a real host) waits until released.
    held_prepares: HashSet<InstanceId>,
    /// How many preparations ran, per instance.
    prepares: BTreeMap<InstanceId, u32>,
    /// The volumes whose (simulated) bytes the host holds: attached here once. Each with
    /// the digest of the snapshot it was made from, if any, which its copies carry.
    volumes: BTreeMap<VolumeId, Option<Sha256Digest>>,
    /// The next volume copy fails with this message.
    fail_next_snapshot: Option<String>,
    /// How many copies (of volumes and of root disks) were made.
    snapshots: u32,
    /// The instances whose root disks were copied, in order.
    root_copies: Vec<InstanceId>,
}

#[derive(Debug)]
struct SimDomain {
    spec: DomainSpec,
    state: DomainState,
    /// Bumped by every state change; delayed transitions check it.
    generation: u64,
    /// The boot delay has passed but the boot is held.
    boot_elapsed: bool,
    boots: u64,
    console: Vec<u8>,
    /// Attached volumes, in attach order.
    volumes: Vec<VolumeId>,
}

impl SimDomain {
    fn write_console(&mut self, text: &str) {
        self.console.extend_from_slice(text.as_bytes());
        if self.console.len() > CONSOLE_LIMIT {
            let excess = self.console.len() - CONSOLE_LIMIT;
            self.console.drain(..excess);
        }
    }

    fn boot_banner(&mut self) {
        self.boots += 1;
        let spec = &self.spec;
        let text = format!(
            "[    0.000000] Linux version 6.1.0-canopy-sim (canopy@sim) #{boot} SMP\n\
             [    0.000000] Command line: console=ttyS0 root=/dev/vda1 {cmdline}\n\
             [    0.010000] Memory: {mem}MiB available, {vcpus} vCPU(s)\n\
             [    0.520000] virtio_blk virtio1: [vda] {disk} GiB\n\
             canopy-sim: booting instance {id} from {image}\n\
             canopy-sim: root disk from {disk_bytes}\n",
            boot = self.boots,
            disk_bytes = spec
                .boot
                .disk
                .as_ref()
                .map_or_else(|| "no bytes".to_owned(), |d| d.sha256.to_string()),
            cmdline = spec.kernel_cmdline_extra,
            mem = spec.resources.memory_mib,
            vcpus = spec.resources.vcpus,
            disk = spec.resources.disk_gib,
            id = spec.instance_id,
            image = spec.image_id,
        );
        self.write_console(&text);
    }

    fn ready_banner(&mut self) {
        let text = format!(
            "cloud-init: user-data {} bytes\n\n{} login: \n",
            self.spec.user_data.len(),
            self.spec.instance_id
        );
        self.write_console(&text);
    }
}

impl SimHypervisor {
    /// A host with no domains.
    pub fn new(config: SimConfig) -> Self {
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        SimHypervisor {
            inner: Arc::new(SimInner {
                config,
                state: Mutex::new(SimState::default()),
                events,
            }),
        }
    }

    /// The handle tests use to step and break the simulation.
    pub fn control(&self) -> SimControl {
        SimControl {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl SimInner {
    fn lock(&self) -> MutexGuard<'_, SimState> {
        // The state stays consistent across a panic in a test thread: every mutation is
        // a few assignments with no early exit in between.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn emit(&self, id: &InstanceId, state: Option<DomainState>, reason: Option<&str>) {
        // No receivers is fine: nobody is listening yet.
        let _ = self.events.send(DomainEvent {
            instance_id: id.clone(),
            state,
            reason: reason.map(str::to_owned),
        });
    }

    /// Moves a domain to `state`, bumping its generation and announcing it.
    fn set_state(&self, domain: &mut SimDomain, state: DomainState, reason: Option<&str>) -> u64 {
        domain.state = state;
        domain.generation += 1;
        domain.boot_elapsed = false;
        self.emit(&domain.spec.instance_id, Some(state), reason);
        domain.generation
    }

    /// Enters `Booting` and arms the timer that finishes the boot.
    fn begin_boot(self: &Arc<Self>, domain: &mut SimDomain, reason: &str) {
        domain.boot_banner();
        let generation = self.set_state(domain, DomainState::Booting, Some(reason));
        let id = domain.spec.instance_id.clone();
        self.after(self.config.boot_delay, move |inner, state| {
            let held = state.held.contains(&id);
            let Some(domain) = state.domains.get_mut(&id) else {
                return;
            };
            if domain.generation != generation || domain.state != DomainState::Booting {
                return;
            }
            if held {
                domain.boot_elapsed = true;
            } else {
                domain.ready_banner();
                inner.set_state(domain, DomainState::Running, Some("booted"));
            }
        });
    }

    /// Enters `ShuttingDown` and arms the timer that powers the domain off.
    fn begin_shutdown(self: &Arc<Self>, domain: &mut SimDomain, reason: &str) {
        let generation = self.set_state(domain, DomainState::ShuttingDown, Some(reason));
        let id = domain.spec.instance_id.clone();
        self.after(self.config.shutdown_delay, move |inner, state| {
            let Some(domain) = state.domains.get_mut(&id) else {
                return;
            };
            if domain.generation != generation || domain.state != DomainState::ShuttingDown {
                return;
            }
            domain.write_console("reboot: Power down\n");
            inner.set_state(domain, DomainState::ShutOff, Some("shut down"));
        });
    }

    /// Runs `f` under the lock after `delay`, unless the simulator is gone by then.
    fn after(
        self: &Arc<Self>,
        delay: Duration,
        f: impl FnOnce(&SimInner, &mut SimState) + Send + 'static,
    ) {
        let weak: Weak<SimInner> = Arc::downgrade(self);
        // The deadline is taken now, not when the task first runs.
        let deadline = tokio::time::Instant::now() + delay;
        tokio::spawn(async move {
            tokio::time::sleep_until(deadline).await;
            if let Some(inner) = weak.upgrade() {
                let mut state = inner.lock();
                f(&inner, &mut state);
            }
        });
    }
}

fn invalid(id: &InstanceId, state: DomainState, operation: &'static str) -> HypervisorError {
    HypervisorError::InvalidState {
        instance_id: id.clone(),
        state,
        operation,
    }
}

fn domain_mut<'a>(
    state: &'a mut SimState,
    id: &InstanceId,
) -> Result<&'a mut SimDomain, HypervisorError> {
    state
        .domains
        .get_mut(id)
        .ok_or_else(|| HypervisorError::NotFound(id.clone()))
}

#[async_trait]
impl Hypervisor for SimHypervisor {
    fn kind(&self) -> HypervisorKind {
        self.inner.config.kind
    }

    fn capacity(&self) -> Resources {
        self.inner.config.capacity
    }

    fn events(&self) -> broadcast::Receiver<DomainEvent> {
        self.inner.events.subscribe()
    }

    fn is_prepared(&self, spec: &DomainSpec) -> bool {
        !self.inner.lock().held_prepares.contains(&spec.instance_id)
    }

    async fn prepare(&self, spec: &DomainSpec) -> Result<(), HypervisorError> {
        loop {
            {
                let mut state = self.inner.lock();
                if !state.held_prepares.contains(&spec.instance_id) {
                    *state.prepares.entry(spec.instance_id.clone()).or_default() += 1;
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn define(&self, spec: &DomainSpec) -> Result<(), HypervisorError> {
        let mut state = self.inner.lock();
        if state.domains.contains_key(&spec.instance_id) {
            return Err(HypervisorError::AlreadyExists(spec.instance_id.clone()));
        }
        let available = self.inner.config.capacity.saturating_sub(&state.used);
        if !available.fits(&spec.resources) {
            return Err(HypervisorError::InsufficientCapacity {
                needed: spec.resources,
                available,
            });
        }
        state.used = state.used.saturating_add(&spec.resources);
        state.domains.insert(
            spec.instance_id.clone(),
            SimDomain {
                spec: spec.clone(),
                state: DomainState::ShutOff,
                generation: 0,
                boot_elapsed: false,
                boots: 0,
                console: Vec::new(),
                volumes: Vec::new(),
            },
        );
        self.inner.emit(
            &spec.instance_id,
            Some(DomainState::ShutOff),
            Some("defined"),
        );
        Ok(())
    }

    async fn resize(&self, id: &InstanceId, resources: Resources) -> Result<(), HypervisorError> {
        let mut state = self.inner.lock();
        let domain = domain_mut(&mut state, id)?;
        if domain.state != DomainState::ShutOff {
            return Err(invalid(id, domain.state, "resize"));
        }
        let old = domain.spec.resources;
        let others = state.used.saturating_sub(&old);
        let available = self.inner.config.capacity.saturating_sub(&others);
        if !available.fits(&resources) {
            return Err(HypervisorError::InsufficientCapacity {
                needed: resources,
                available,
            });
        }
        state.used = others.saturating_add(&resources);
        domain_mut(&mut state, id)?.spec.resources = resources;
        Ok(())
    }

    async fn start(&self, id: &InstanceId) -> Result<(), HypervisorError> {
        let mut state = self.inner.lock();
        let current = domain_mut(&mut state, id)?.state;
        if current != DomainState::ShutOff {
            return Err(invalid(id, current, "start"));
        }
        if let Some(reason) = state.fail_next_start.take() {
            return Err(HypervisorError::Failed(reason));
        }
        let domain = domain_mut(&mut state, id)?;
        self.inner.begin_boot(domain, "started");
        Ok(())
    }

    async fn shutdown(&self, id: &InstanceId) -> Result<(), HypervisorError> {
        let mut state = self.inner.lock();
        let domain = domain_mut(&mut state, id)?;
        match domain.state {
            DomainState::Booting | DomainState::Running => {
                self.inner.begin_shutdown(domain, "shutdown requested");
                Ok(())
            }
            // libvirt re-sends the ACPI event; the shutdown already under way continues.
            DomainState::ShuttingDown => Ok(()),
            other => Err(invalid(id, other, "shut down")),
        }
    }

    async fn destroy(&self, id: &InstanceId) -> Result<(), HypervisorError> {
        let mut state = self.inner.lock();
        let domain = domain_mut(&mut state, id)?;
        if domain.state == DomainState::ShutOff {
            return Err(invalid(id, domain.state, "destroy"));
        }
        self.inner
            .set_state(domain, DomainState::ShutOff, Some("destroyed"));
        Ok(())
    }

    async fn reboot(&self, id: &InstanceId) -> Result<(), HypervisorError> {
        let mut state = self.inner.lock();
        let domain = domain_mut(&mut state, id)?;
        match domain.state {
            DomainState::Booting | DomainState::Running => {
                domain.write_console("reboot: Restarting system\n");
                self.inner.begin_boot(domain, "rebooted");
                Ok(())
            }
            other => Err(invalid(id, other, "reboot")),
        }
    }

    async fn undefine(&self, id: &InstanceId) -> Result<(), HypervisorError> {
        let mut state = self.inner.lock();
        let current = domain_mut(&mut state, id)?.state;
        if current != DomainState::ShutOff {
            return Err(invalid(id, current, "undefine"));
        }
        if let Some(gone) = state.domains.remove(id) {
            state.used = state.used.saturating_sub(&gone.spec.resources);
        }
        self.inner.emit(id, None, Some("undefined"));
        Ok(())
    }

    async fn state(&self, id: &InstanceId) -> Result<Option<DomainState>, HypervisorError> {
        Ok(self.inner.lock().domains.get(id).map(|d| d.state))
    }

    async fn list(&self) -> Result<Vec<DomainInfo>, HypervisorError> {
        Ok(self
            .inner
            .lock()
            .domains
            .values()
            .map(|d| DomainInfo {
                instance_id: d.spec.instance_id.clone(),
                state: d.state,
                resources: d.spec.resources,
                volumes: d.volumes.clone(),
            })
            .collect())
    }

    async fn console(&self, id: &InstanceId) -> Result<Vec<u8>, HypervisorError> {
        let state = self.inner.lock();
        let domain = state
            .domains
            .get(id)
            .ok_or_else(|| HypervisorError::NotFound(id.clone()))?;
        Ok(domain.console.clone())
    }

    async fn attach_volume(
        &self,
        id: &InstanceId,
        volume: &VolumeAttachment,
    ) -> Result<(), HypervisorError> {
        let mut state = self.inner.lock();
        // A volume is in one place at a time: the simulated host refuses a second holder,
        // as QEMU's image locking does.
        if let Some(holder) = state
            .domains
            .values()
            .find(|d| d.volumes.contains(&volume.volume_id))
        {
            return Err(HypervisorError::AlreadyExists(
                holder.spec.instance_id.clone(),
            ));
        }
        let domain = domain_mut(&mut state, id)?;
        if domain.state == DomainState::Crashed {
            return Err(invalid(id, domain.state, "attach a volume to"));
        }
        domain.volumes.push(volume.volume_id.clone());
        state
            .volumes
            .entry(volume.volume_id.clone())
            .or_insert_with(|| volume.source.as_ref().map(|s| s.sha256.clone()));
        Ok(())
    }

    async fn detach_volume(
        &self,
        id: &InstanceId,
        volume: &VolumeId,
    ) -> Result<(), HypervisorError> {
        let mut state = self.inner.lock();
        let domain = domain_mut(&mut state, id)?;
        let before = domain.volumes.len();
        domain.volumes.retain(|v| v != volume);
        if domain.volumes.len() == before {
            return Err(HypervisorError::Failed(format!(
                "volume {volume} is not attached to {id}"
            )));
        }
        Ok(())
    }

    async fn delete_volume(&self, volume: &VolumeId) -> Result<(), HypervisorError> {
        self.inner.lock().volumes.remove(volume);
        Ok(())
    }

    /// A copy of simulated bytes: a text naming the volume and the snapshot it came from,
    /// padded to [`SIM_COPY_BYTES`], after [`SNAPSHOT_DELAY`].
    async fn snapshot_volume(
        &self,
        volume: &VolumeId,
    ) -> Result<Option<VolumeCopy>, HypervisorError> {
        let source = {
            let mut state = self.inner.lock();
            let Some(source) = state.volumes.get(volume).cloned() else {
                return Ok(None);
            };
            if let Some(reason) = state.fail_next_snapshot.take() {
                return Err(HypervisorError::Failed(reason));
            }
            state.snapshots += 1;
            source
        };
        tokio::time::sleep(SNAPSHOT_DELAY).await;
        Ok(Some(sim_copy(format!(
            "canopy-sim volume {volume}\nsource {}\n",
            source.map_or_else(|| "none".to_owned(), |s| s.to_string())
        ))))
    }

    /// A copy of a shut-off domain's simulated root disk: a text naming the instance, the
    /// image and bytes it was made from and how often it booted (what its guest "wrote"),
    /// padded to [`SIM_COPY_BYTES`], after [`SNAPSHOT_DELAY`].
    async fn snapshot_root(&self, id: &InstanceId) -> Result<Option<VolumeCopy>, HypervisorError> {
        let text = {
            let mut state = self.inner.lock();
            let Some(domain) = state.domains.get(id) else {
                return Ok(None);
            };
            if domain.state != DomainState::ShutOff {
                return Err(invalid(id, domain.state, "copy the root disk of"));
            }
            let text = format!(
                "canopy-sim root disk of {id}\nimage {}\nbase {}\nboots {}\n",
                domain.spec.image_id,
                domain
                    .spec
                    .boot
                    .disk
                    .as_ref()
                    .map_or_else(|| "none".to_owned(), |d| d.sha256.to_string()),
                domain.boots
            );
            if let Some(reason) = state.fail_next_snapshot.take() {
                return Err(HypervisorError::Failed(reason));
            }
            state.snapshots += 1;
            state.root_copies.push(id.clone());
            text
        };
        tokio::time::sleep(SNAPSHOT_DELAY).await;
        Ok(Some(sim_copy(text)))
    }
}

/// Simulated disk bytes: `text`, padded to [`SIM_COPY_BYTES`], in 1 MiB chunks.
fn sim_copy(text: String) -> VolumeCopy {
    let mut bytes = text.into_bytes();
    bytes.resize(SIM_COPY_BYTES, b'.');
    let size = bytes.len() as u64;
    let chunks: Vec<Result<Vec<u8>, String>> =
        bytes.chunks(1 << 20).map(|c| Ok(c.to_vec())).collect();
    VolumeCopy {
        size,
        bytes: Box::pin(tokio_stream::iter(chunks)),
    }
}

impl SimControl {
    /// Makes `id` unprepared (as an instance whose image is still downloading) until
    /// [`release_prepare`](Self::release_prepare).
    pub fn hold_prepare(&self, id: &InstanceId) {
        self.inner.lock().held_prepares.insert(id.clone());
    }

    pub fn release_prepare(&self, id: &InstanceId) {
        self.inner.lock().held_prepares.remove(id);
    }

    /// How many times the agent prepared `id`.
    pub fn prepares(&self, id: &InstanceId) -> u32 {
        self.inner.lock().prepares.get(id).copied().unwrap_or(0)
    }

    /// Keeps every boot of `id` (including ones that start later) in `Booting` until
    /// [`release_boot`](Self::release_boot).
    pub fn hold_boot(&self, id: &InstanceId) {
        self.inner.lock().held.insert(id.clone());
    }

    /// Lets held boots of `id` finish: at once if the boot delay has already passed.
    pub fn release_boot(&self, id: &InstanceId) {
        let mut state = self.inner.lock();
        state.held.remove(id);
        if let Some(domain) = state.domains.get_mut(id)
            && domain.state == DomainState::Booting
            && domain.boot_elapsed
        {
            domain.ready_banner();
            self.inner
                .set_state(domain, DomainState::Running, Some("booted"));
        }
    }

    /// Makes the next copy (a snapshot of a volume or of a root disk) fail with `reason`.
    pub fn fail_next_snapshot(&self, reason: impl Into<String>) {
        self.inner.lock().fail_next_snapshot = Some(reason.into());
    }

    /// How many copies (snapshots of volumes and of root disks) the host made.
    pub fn snapshots(&self) -> u32 {
        self.inner.lock().snapshots
    }

    /// The instances whose root disks the host copied (CreateImage), in order.
    pub fn root_copies(&self) -> Vec<InstanceId> {
        self.inner.lock().root_copies.clone()
    }

    /// Whether the host holds the volume's bytes.
    pub fn holds_volume(&self, volume: &VolumeId) -> bool {
        self.inner.lock().volumes.contains_key(volume)
    }

    /// Makes the next `start` (of any domain) fail with `Failed(reason)`.
    pub fn fail_next_start(&self, reason: impl Into<String>) {
        self.inner.lock().fail_next_start = Some(reason.into());
    }

    /// Kills the guest as an unexpected death would: an active domain becomes `Crashed`.
    /// Returns false (and changes nothing) when the domain is absent or not active.
    pub fn crash(&self, id: &InstanceId) -> bool {
        let mut state = self.inner.lock();
        match state.domains.get_mut(id) {
            Some(domain) if domain.state.is_active() => {
                domain.write_console("Kernel panic - not syncing: simulated guest crash\n");
                self.inner
                    .set_state(domain, DomainState::Crashed, Some("guest crashed"));
                true
            }
            _ => false,
        }
    }

    /// Powers the guest off from inside (`poweroff` in the guest): a running or booting
    /// domain goes through `ShuttingDown` to `ShutOff`. Returns false when there was
    /// nothing to power off.
    pub fn guest_poweroff(&self, id: &InstanceId) -> bool {
        let mut state = self.inner.lock();
        match state.domains.get_mut(id) {
            Some(domain) if matches!(domain.state, DomainState::Booting | DomainState::Running) => {
                self.inner
                    .begin_shutdown(domain, "guest initiated shutdown");
                true
            }
            _ => false,
        }
    }

    /// How many times `id` has booted (starts plus reboots) since it was defined.
    pub fn boots(&self, id: &InstanceId) -> u64 {
        self.inner.lock().domains.get(id).map_or(0, |d| d.boots)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use canopy_common::ImageId;

    const BOOT: Duration = Duration::from_secs(10);
    const SHUTDOWN: Duration = Duration::from_secs(5);

    fn sim() -> SimHypervisor {
        SimHypervisor::new(SimConfig {
            capacity: Resources::new(4, 4096, 100),
            boot_delay: BOOT,
            shutdown_delay: SHUTDOWN,
            kind: HypervisorKind::Sim,
        })
    }

    fn id(n: u8) -> InstanceId {
        InstanceId::parse(&format!("i-0123456789abcdef{n}")).unwrap()
    }

    fn spec(n: u8, resources: Resources) -> DomainSpec {
        DomainSpec::new(
            id(n),
            resources,
            ImageId::parse("ami-0123456789abcdef0").unwrap(),
            b"hello".to_vec(),
        )
    }

    async fn state(sim: &SimHypervisor, n: u8) -> Option<DomainState> {
        sim.state(&id(n)).await.unwrap()
    }

    /// Lets spawned timers that are due run.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    async fn advance(d: Duration) {
        tokio::time::advance(d).await;
        settle().await;
    }

    async fn console(sim: &SimHypervisor, n: u8) -> String {
        String::from_utf8(sim.console(&id(n)).await.unwrap()).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn start_boots_for_the_boot_delay_then_runs() {
        let sim = sim();
        let mut events = sim.events();
        sim.define(&spec(0, Resources::new(1, 512, 10)))
            .await
            .unwrap();
        assert_eq!(state(&sim, 0).await, Some(DomainState::ShutOff));
        sim.start(&id(0)).await.unwrap();
        assert_eq!(state(&sim, 0).await, Some(DomainState::Booting));
        advance(BOOT - Duration::from_millis(1)).await;
        assert_eq!(state(&sim, 0).await, Some(DomainState::Booting));
        advance(Duration::from_millis(1)).await;
        assert_eq!(state(&sim, 0).await, Some(DomainState::Running));

        let seen: Vec<_> = std::iter::from_fn(|| events.try_recv().ok())
            .map(|e| e.state)
            .collect();
        assert_eq!(
            seen,
            vec![
                Some(DomainState::ShutOff),
                Some(DomainState::Booting),
                Some(DomainState::Running)
            ]
        );
        let log = console(&sim, 0).await;
        assert!(
            log.contains("canopy-sim: booting instance i-0123456789abcdef0"),
            "{log}"
        );
        assert!(
            log.contains("canopy.instance_id=i-0123456789abcdef0"),
            "{log}"
        );
        assert!(log.contains("i-0123456789abcdef0 login:"), "{log}");
    }

    #[tokio::test(start_paused = true)]
    async fn held_boots_wait_for_release() {
        let sim = sim();
        let control = sim.control();
        control.hold_boot(&id(0));
        sim.define(&spec(0, Resources::new(1, 512, 10)))
            .await
            .unwrap();
        sim.start(&id(0)).await.unwrap();
        advance(BOOT * 3).await;
        assert_eq!(state(&sim, 0).await, Some(DomainState::Booting));
        control.release_boot(&id(0));
        assert_eq!(state(&sim, 0).await, Some(DomainState::Running));

        // Released before the delay: the boot finishes when the delay is over.
        sim.define(&spec(1, Resources::new(1, 512, 10)))
            .await
            .unwrap();
        control.hold_boot(&id(1));
        sim.start(&id(1)).await.unwrap();
        control.release_boot(&id(1));
        assert_eq!(state(&sim, 1).await, Some(DomainState::Booting));
        advance(BOOT).await;
        assert_eq!(state(&sim, 1).await, Some(DomainState::Running));
    }

    #[tokio::test(start_paused = true)]
    async fn fail_next_start_fails_once() {
        let sim = sim();
        sim.define(&spec(0, Resources::new(1, 512, 10)))
            .await
            .unwrap();
        sim.control().fail_next_start("no kvm");
        assert_eq!(
            sim.start(&id(0)).await,
            Err(HypervisorError::Failed("no kvm".into()))
        );
        assert_eq!(state(&sim, 0).await, Some(DomainState::ShutOff));
        sim.start(&id(0)).await.unwrap();
        assert_eq!(state(&sim, 0).await, Some(DomainState::Booting));
    }

    #[tokio::test(start_paused = true)]
    async fn crash_kills_the_guest_with_an_event() {
        let sim = sim();
        let control = sim.control();
        sim.define(&spec(0, Resources::new(1, 512, 10)))
            .await
            .unwrap();
        assert!(!control.crash(&id(0)), "a shut-off domain cannot crash");
        sim.start(&id(0)).await.unwrap();
        advance(BOOT).await;
        let mut events = sim.events();
        assert!(control.crash(&id(0)));
        assert_eq!(state(&sim, 0).await, Some(DomainState::Crashed));
        let event = events.try_recv().unwrap();
        assert_eq!(event.state, Some(DomainState::Crashed));
        assert_eq!(event.reason.as_deref(), Some("guest crashed"));
        assert!(console(&sim, 0).await.contains("Kernel panic"));
        // Like libvirt: a crashed domain must be destroyed before it starts or goes away.
        assert!(matches!(
            sim.start(&id(0)).await,
            Err(HypervisorError::InvalidState { .. })
        ));
        assert!(matches!(
            sim.undefine(&id(0)).await,
            Err(HypervisorError::InvalidState { .. })
        ));
        sim.destroy(&id(0)).await.unwrap();
        sim.undefine(&id(0)).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn capacity_is_accounted_for_defined_domains() {
        let sim = sim();
        assert_eq!(sim.capacity(), Resources::new(4, 4096, 100));
        sim.define(&spec(0, Resources::new(2, 2048, 50)))
            .await
            .unwrap();
        sim.define(&spec(1, Resources::new(2, 2048, 50)))
            .await
            .unwrap();
        match sim.define(&spec(2, Resources::new(1, 1, 1))).await {
            Err(HypervisorError::InsufficientCapacity { needed, available }) => {
                assert_eq!(needed, Resources::new(1, 1, 1));
                assert_eq!(available, Resources::ZERO);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            sim.define(&spec(0, Resources::new(1, 1, 1))).await,
            Err(HypervisorError::AlreadyExists(id(0)))
        );
        sim.undefine(&id(1)).await.unwrap();
        sim.define(&spec(2, Resources::new(1, 1, 1))).await.unwrap();
        let listed: Vec<_> = sim
            .list()
            .await
            .unwrap()
            .into_iter()
            .map(|d| d.instance_id)
            .collect();
        assert_eq!(listed, vec![id(0), id(2)]);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_takes_the_shutdown_delay_and_destroy_is_immediate() {
        let sim = sim();
        sim.define(&spec(0, Resources::new(1, 512, 10)))
            .await
            .unwrap();
        assert!(matches!(
            sim.shutdown(&id(0)).await,
            Err(HypervisorError::InvalidState { .. })
        ));
        sim.start(&id(0)).await.unwrap();
        advance(BOOT).await;
        sim.shutdown(&id(0)).await.unwrap();
        assert_eq!(state(&sim, 0).await, Some(DomainState::ShuttingDown));
        sim.shutdown(&id(0)).await.unwrap();
        advance(SHUTDOWN).await;
        assert_eq!(state(&sim, 0).await, Some(DomainState::ShutOff));
        assert!(console(&sim, 0).await.contains("reboot: Power down"));

        sim.start(&id(0)).await.unwrap();
        sim.destroy(&id(0)).await.unwrap();
        assert_eq!(state(&sim, 0).await, Some(DomainState::ShutOff));
        assert!(matches!(
            sim.destroy(&id(0)).await,
            Err(HypervisorError::InvalidState { .. })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn timers_of_an_old_boot_do_not_fire_into_a_new_one() {
        let sim = sim();
        sim.define(&spec(0, Resources::new(1, 512, 10)))
            .await
            .unwrap();
        sim.start(&id(0)).await.unwrap();
        advance(BOOT / 2).await;
        sim.destroy(&id(0)).await.unwrap();
        sim.start(&id(0)).await.unwrap();
        // The first boot's timer is due now; the second boot must not finish early.
        advance(BOOT / 2).await;
        assert_eq!(state(&sim, 0).await, Some(DomainState::Booting));
        advance(BOOT / 2).await;
        assert_eq!(state(&sim, 0).await, Some(DomainState::Running));

        // A shutdown cut short by destroy and a restart does not power the new boot off.
        sim.shutdown(&id(0)).await.unwrap();
        sim.destroy(&id(0)).await.unwrap();
        sim.start(&id(0)).await.unwrap();
        advance(SHUTDOWN).await;
        assert_eq!(state(&sim, 0).await, Some(DomainState::Booting));
    }

    #[tokio::test(start_paused = true)]
    async fn reboot_boots_again_and_the_console_accumulates() {
        let sim = sim();
        sim.define(&spec(0, Resources::new(1, 512, 10)))
            .await
            .unwrap();
        assert!(matches!(
            sim.reboot(&id(0)).await,
            Err(HypervisorError::InvalidState { .. })
        ));
        sim.start(&id(0)).await.unwrap();
        advance(BOOT).await;
        sim.reboot(&id(0)).await.unwrap();
        assert_eq!(state(&sim, 0).await, Some(DomainState::Booting));
        advance(BOOT).await;
        assert_eq!(state(&sim, 0).await, Some(DomainState::Running));
        assert_eq!(sim.control().boots(&id(0)), 2);
        let log = console(&sim, 0).await;
        assert_eq!(
            log.matches("canopy-sim: booting instance").count(),
            2,
            "{log}"
        );
        assert_eq!(log.matches("login:").count(), 2, "{log}");
        assert!(log.contains("reboot: Restarting system"));
    }

    #[tokio::test(start_paused = true)]
    async fn undefine_only_when_shut_off() {
        let sim = sim();
        let mut events = sim.events();
        assert_eq!(
            sim.undefine(&id(0)).await,
            Err(HypervisorError::NotFound(id(0)))
        );
        sim.define(&spec(0, Resources::new(1, 512, 10)))
            .await
            .unwrap();
        sim.start(&id(0)).await.unwrap();
        for s in [DomainState::Booting, DomainState::Running] {
            assert_eq!(state(&sim, 0).await, Some(s));
            assert!(matches!(
                sim.undefine(&id(0)).await,
                Err(HypervisorError::InvalidState {
                    operation: "undefine",
                    ..
                })
            ));
            advance(BOOT).await;
        }
        sim.destroy(&id(0)).await.unwrap();
        sim.undefine(&id(0)).await.unwrap();
        assert_eq!(state(&sim, 0).await, None);
        assert_eq!(
            sim.console(&id(0)).await,
            Err(HypervisorError::NotFound(id(0)))
        );
        let last = std::iter::from_fn(|| events.try_recv().ok())
            .last()
            .unwrap();
        assert_eq!(last.state, None);
    }

    #[tokio::test(start_paused = true)]
    async fn guest_poweroff_shuts_down_from_inside() {
        let sim = sim();
        let control = sim.control();
        sim.define(&spec(0, Resources::new(1, 512, 10)))
            .await
            .unwrap();
        assert!(!control.guest_poweroff(&id(0)));
        sim.start(&id(0)).await.unwrap();
        advance(BOOT).await;
        assert!(control.guest_poweroff(&id(0)));
        assert_eq!(state(&sim, 0).await, Some(DomainState::ShuttingDown));
        advance(SHUTDOWN).await;
        assert_eq!(state(&sim, 0).await, Some(DomainState::ShutOff));
    }

    #[test]
    fn kinds_have_names() {
        for kind in [
            HypervisorKind::Sim,
            HypervisorKind::Qemu,
            HypervisorKind::Kvm,
        ] {
            assert_eq!(kind.name().parse::<HypervisorKind>(), Ok(kind));
        }
        assert!("xen".parse::<HypervisorKind>().is_err());
    }
}
