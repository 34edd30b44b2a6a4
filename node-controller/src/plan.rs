//! The reconcile planner: pure functions from (desired document, observed domains, what the
//! agent remembers per instance) to the hypervisor actions to take and the reports to send.
//!
//! The agent's reconciler (`agent.rs`) lists the domains, calls [`observe`] and [`plan`],
//! applies the actions, and publishes [`reports`]. Nothing here does I/O or reads a clock,
//! so every decision is unit-tested below.
//!
//! Rules worth knowing:
//! * Domains that are not in the desired document are never touched: a control plane that
//!   lost its state must not kill workloads. They are returned as `unmanaged`.
//! * A guest that stops or crashes on its own while it should run is *not* restarted: EC2
//!   shows such an instance as stopped (`Client.InstanceInitiatedShutdown`, or
//!   `Server.InternalError` for a crash) until someone starts it again, which the node
//!   sees as the instance's desired state leaving `running` (stop) and coming back.
//! * A failed define or start is not retried while the instance stays desired `running`,
//!   for the same reason; a first launch that fails is cleaned up and reported terminated.
//! * While the document asks for a copy of an instance's root disk (CreateImage), its
//!   domain is neither started nor undefined: the copy is of the disk as it was stopped.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, btree_map};
use std::iter::Peekable;

use canopy_common::{
    InstanceId, InstanceState, NodeId, PowerState, Resources, SnapshotId, SnapshotRequest,
    SnapshotSource, VolumeAttachment, VolumeId,
};
use tokio::time::Instant;

use crate::hypervisor::{DomainSpec, DomainState};
use crate::model::{DesiredInstance, DesiredState, InstanceReport, StateReason, reason};

/// A failure the agent latched for an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub reason: StateReason,
    /// The domain was removed (a first launch failed): the instance is terminated. Otherwise
    /// the domain is kept and the instance is stopped.
    pub terminal: bool,
}

/// What the agent remembers about one instance of the desired document between passes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstanceMemory {
    /// The largest `reboot_seq` applied. Adopted from the spec when the node first sees the
    /// instance, so that a restarted agent does not replay old reboots.
    pub applied_reboot_seq: u64,
    /// The largest `start_seq` seen, adopted like `applied_reboot_seq`.
    pub seen_start_seq: u64,
    /// The domain state at the end of the previous pass (`None`: absent or not yet seen).
    pub last_seen: Option<DomainState>,
    /// This agent defined the domain and it has not reached `Running` yet: a start failure
    /// removes it again.
    pub launching: bool,
    /// A reboot this agent asked for is under way: EC2 keeps showing such an instance as
    /// running, so `Booting` is reported as `running` until the guest is up again.
    pub rebooting: bool,
    /// When a graceful stop gives way to a forced one.
    pub stop_deadline: Option<Instant>,
    /// The guest stopped or crashed on its own while desired running.
    pub guest_stopped: bool,
    pub failure: Option<Failure>,
}

impl InstanceMemory {
    /// Memory for an instance the agent has just learnt about.
    pub fn first_seen(spec: &DesiredInstance) -> Self {
        InstanceMemory {
            applied_reboot_seq: spec.reboot_seq,
            seen_start_seq: spec.start_seq,
            ..InstanceMemory::default()
        }
    }
}

/// One hypervisor operation. Actions of one instance are ordered; the executor stops an
/// instance's sequence at its first failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Define(Box<DomainSpec>),
    /// Start; a fresh boot satisfies every reboot requested up to `reboot_seq`.
    Start {
        instance_id: InstanceId,
        reboot_seq: u64,
    },
    Shutdown(InstanceId),
    Destroy(InstanceId),
    Reboot {
        instance_id: InstanceId,
        reboot_seq: u64,
    },
    Undefine(InstanceId),
    /// Gives a shut-off domain the spec's vCPUs and memory (its instance type changed while
    /// stopped), keeping its disks.
    Resize {
        instance_id: InstanceId,
        resources: Resources,
    },
    /// Attaches a volume (making its bytes on first use).
    AttachVolume {
        instance_id: InstanceId,
        volume: VolumeAttachment,
    },
    DetachVolume {
        instance_id: InstanceId,
        volume_id: VolumeId,
    },
}

impl Action {
    /// The instance the action applies to.
    pub fn instance_id(&self) -> &InstanceId {
        match self {
            Action::Define(spec) => &spec.instance_id,
            Action::Start { instance_id, .. }
            | Action::Reboot { instance_id, .. }
            | Action::Resize { instance_id, .. }
            | Action::AttachVolume { instance_id, .. }
            | Action::DetachVolume { instance_id, .. } => instance_id,
            Action::Shutdown(id) | Action::Destroy(id) | Action::Undefine(id) => id,
        }
    }
}

/// What one pass should do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub actions: Vec<Action>,
    /// Domains on the host that the desired document does not mention (left alone).
    pub unmanaged: Vec<InstanceId>,
}

/// Updates an instance's memory with what the hypervisor shows now. Called for every
/// desired instance before planning and after acting.
pub fn observe(memory: &mut InstanceMemory, spec: &DesiredInstance, observed: Option<DomainState>) {
    use DomainState::*;
    let desired = spec.desired;
    if spec.start_seq > memory.seen_start_seq {
        // A start the agent has not seen: whatever the guest did before no longer holds,
        // even if the stopped desired state in between never reached this node.
        memory.seen_start_seq = spec.start_seq;
        memory.guest_stopped = false;
        memory.failure = None;
    }
    if desired == PowerState::Running {
        let was_up = matches!(memory.last_seen, Some(Booting | Running));
        let went_down = matches!(observed, Some(ShuttingDown | ShutOff | Crashed));
        if was_up && went_down {
            memory.guest_stopped = true;
        }
    } else {
        // A stop or terminate supersedes what the guest did on its own.
        memory.guest_stopped = false;
    }
    if desired == PowerState::Stopped {
        // Stopping an instance that failed to start lets a later start try again.
        memory.failure = None;
    }
    if observed == Some(Running) {
        memory.launching = false;
    }
    if observed != Some(Booting) {
        memory.rebooting = false;
    }
    if desired != PowerState::Stopped || !observed.is_some_and(DomainState::is_active) {
        memory.stop_deadline = None;
    }
    memory.last_seen = observed;
}

/// The actions that move the host towards `desired`.
pub fn plan(
    desired: &DesiredState,
    observed: &BTreeMap<InstanceId, DomainState>,
    memory: &BTreeMap<InstanceId, InstanceMemory>,
    now: Instant,
) -> Plan {
    let mut actions = Vec::new();
    let copying = roots_being_copied(desired);
    let (mut memory, mut observed_at) = (Beside::new(memory), Beside::new(observed));
    for (id, spec) in &desired.instances {
        let fallback;
        let mem = match memory.get(id) {
            Some(m) => m,
            None => {
                fallback = InstanceMemory::first_seen(spec);
                &fallback
            }
        };
        let planned = plan_instance(spec, observed_at.get(id).copied(), mem, now);
        if copying.contains(id) {
            actions.extend(planned.into_iter().filter(keeps_the_disk));
        } else {
            actions.extend(planned);
        }
    }
    let mut desired_at = Beside::new(&desired.instances);
    let unmanaged = observed
        .keys()
        .filter(|id| desired_at.get(id).is_none())
        .cloned()
        .collect();
    Plan { actions, unmanaged }
}

fn plan_instance(
    spec: &DesiredInstance,
    observed: Option<DomainState>,
    mem: &InstanceMemory,
    now: Instant,
) -> Vec<Action> {
    use DomainState::*;
    let id = || spec.instance_id.clone();
    let start = || Action::Start {
        instance_id: id(),
        reboot_seq: spec.reboot_seq,
    };
    match spec.desired {
        PowerState::Running => {
            if mem.failure.is_some() {
                return vec![];
            }
            match observed {
                None => vec![Action::Define(Box::new(spec.domain_spec())), start()],
                Some(ShutOff) if !mem.guest_stopped => vec![start()],
                // libvirt keeps a crashed domain active: destroy before starting again.
                Some(Crashed) if !mem.guest_stopped => vec![Action::Destroy(id()), start()],
                Some(Running) if spec.reboot_seq > mem.applied_reboot_seq => {
                    vec![Action::Reboot {
                        instance_id: id(),
                        reboot_seq: spec.reboot_seq,
                    }]
                }
                // Booting and ShuttingDown settle by themselves; a guest that stopped on its
                // own stays stopped.
                Some(_) => vec![],
            }
        }
        PowerState::Stopped => match observed {
            None | Some(ShutOff) => vec![],
            Some(Crashed) => vec![Action::Destroy(id())],
            Some(Booting | Running | ShuttingDown) => match mem.stop_deadline {
                // Also re-sent for a shutdown the agent did not ask for (the guest's own, or
                // one from before an agent restart), which arms the deadline.
                None => vec![Action::Shutdown(id())],
                Some(deadline) if now >= deadline => vec![Action::Destroy(id())],
                Some(_) => vec![],
            },
        },
        PowerState::Terminated => match observed {
            None => vec![],
            Some(ShutOff) => vec![Action::Undefine(id())],
            Some(_) => vec![Action::Destroy(id()), Action::Undefine(id())],
        },
    }
}

/// The instances whose root disks a pending CreateImage asks this node to copy: listed
/// in the document until the CLC has the copy (or its failure).
pub fn roots_being_copied(desired: &DesiredState) -> BTreeSet<InstanceId> {
    desired
        .snapshots
        .iter()
        .filter_map(SnapshotRequest::root_of)
        .filter(|id| desired.instances.contains_key(*id))
        .cloned()
        .collect()
}

/// Whether an action may run while the instance's root disk is being copied (it was
/// stopped when CreateImage was asked): the disk must stay as it was, so the domain is
/// neither defined, started nor undefined until the copy is done and the CLC drops the
/// request. A start asked meanwhile waits (the instance shows `pending`), as does a
/// terminate (it shows `shutting-down`, and the image still completes); forcing off a
/// crashed domain, or one found running, is fine (the copy refuses an active domain).
fn keeps_the_disk(action: &Action) -> bool {
    !matches!(
        action,
        Action::Define(_) | Action::Start { .. } | Action::Undefine(_)
    )
}

/// Each domain's state, as the hypervisor lists it.
pub type States = BTreeMap<InstanceId, DomainState>;

/// The size (vCPUs and memory) each domain is defined with, as the hypervisor lists it.
pub type Sizes = BTreeMap<InstanceId, Resources>;

/// The resizes to apply before the lifecycle actions of [`plan`]: a shut-off domain that
/// is about to be started (the same condition as `plan`'s start) but is defined with
/// other vCPUs or memory than its spec asks for, because its instance type changed while
/// it was stopped. Only then, not as soon as the document changes: the domain's size is
/// what it boots with, and a resize that fails (no room on the host) must keep the
/// instance stopped with a reason rather than fail in the background. The disk size is not
/// compared: a domain's root disk keeps the size it was made with, as EBS root volumes do
/// when an EC2 instance changes type.
pub fn plan_resizes(
    desired: &DesiredState,
    observed: &BTreeMap<InstanceId, DomainState>,
    sizes: &Sizes,
    memory: &BTreeMap<InstanceId, InstanceMemory>,
) -> Vec<Action> {
    let mut actions = Vec::new();
    let copying = roots_being_copied(desired);
    let (mut memory, mut observed) = (Beside::new(memory), Beside::new(observed));
    let mut sizes = Beside::new(sizes);
    for (id, spec) in &desired.instances {
        // A cursor not asked about an id just skips it on the next lookup.
        let about_to_start = spec.desired == PowerState::Running
            && observed.get(id) == Some(&DomainState::ShutOff)
            && !copying.contains(id)
            && !memory
                .get(id)
                .is_some_and(|m| m.guest_stopped || m.failure.is_some());
        let Some(size) = sizes.get(id) else { continue };
        let want = spec.resources;
        if about_to_start && (size.vcpus != want.vcpus || size.memory_mib != want.memory_mib) {
            actions.push(Action::Resize {
                instance_id: id.clone(),
                resources: want,
            });
        }
    }
    actions
}

/// The volumes attached to each domain, as the hypervisor lists them.
pub type Attached = BTreeMap<InstanceId, Vec<VolumeId>>;

/// The attaches and detaches that bring each domain's volumes to its spec's. Only domains
/// that exist and are meant to: a domain not defined yet gets its volumes once it is (the
/// next pass), a terminated instance's domain loses them when it is undefined, and a
/// crashed one waits until it is destroyed and started again.
pub fn plan_volumes(
    desired: &DesiredState,
    observed: &BTreeMap<InstanceId, DomainState>,
    attached: &Attached,
) -> Vec<Action> {
    let mut actions = Vec::new();
    let (mut observed, mut attached) = (Beside::new(observed), Beside::new(attached));
    for (id, spec) in &desired.instances {
        if spec.desired == PowerState::Terminated
            || matches!(observed.get(id), None | Some(DomainState::Crashed))
        {
            continue;
        }
        let has = attached.get(id).map(Vec::as_slice).unwrap_or_default();
        for volume in &spec.volumes {
            if !has.contains(&volume.volume_id) {
                actions.push(Action::AttachVolume {
                    instance_id: id.clone(),
                    volume: volume.clone(),
                });
            }
        }
        for volume_id in has {
            if !spec.volumes.iter().any(|v| &v.volume_id == volume_id) {
                actions.push(Action::DetachVolume {
                    instance_id: id.clone(),
                    volume_id: volume_id.clone(),
                });
            }
        }
    }
    actions
}

/// Deleted volumes whose bytes the node may remove now: none of its domains has them
/// attached (a detach still under way finishes first), no pending snapshot still needs
/// them (a volume deleted right after its snapshot was asked for), and it has not removed
/// them yet.
pub fn volumes_to_remove(
    desired: &DesiredState,
    attached: &Attached,
    removed: &BTreeSet<VolumeId>,
) -> Vec<VolumeId> {
    desired
        .deleted_volumes
        .iter()
        .filter(|v| {
            !removed.contains(*v)
                && !attached.values().any(|a| a.contains(v))
                && !desired.snapshots.iter().any(|s| s.volume_id() == Some(*v))
        })
        .cloned()
        .collect()
}

/// Where this node stands with a snapshot its document asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotTask {
    /// Being copied or uploaded now.
    InFlight,
    /// Not to be tried again before then: uploaded (the document drops the request once the
    /// CLC commits it; if it still lists it later, the upload was lost and is made again),
    /// failed to upload, or the volume is not on this node (it may be attached here later).
    Wait(Instant),
}

/// The snapshot requests to start now: those of the document not in flight and not
/// waiting, in the document's order; of root disks, only those of this node's instances.
pub fn snapshots_due(
    desired: &DesiredState,
    tasks: &BTreeMap<SnapshotId, SnapshotTask>,
    node: &NodeId,
    now: Instant,
) -> Vec<SnapshotRequest> {
    desired
        .snapshots
        .iter()
        .filter(|r| match &r.source {
            SnapshotSource::Volume(_) => true,
            SnapshotSource::Root { node_id, .. } => node_id == node,
        })
        .filter(|r| match tasks.get(&r.snapshot_id) {
            None => true,
            Some(SnapshotTask::InFlight) => false,
            Some(SnapshotTask::Wait(until)) => *until <= now,
        })
        .cloned()
        .collect()
}

/// Sets each report's volumes to what its domain has attached.
pub fn with_volumes(reports: &mut BTreeMap<InstanceId, InstanceReport>, attached: &Attached) {
    for (id, report) in reports.iter_mut() {
        let mut volumes = attached.get(id).cloned().unwrap_or_default();
        volumes.sort();
        report.volumes = volumes;
    }
}

/// When the reconciler must look again even if nothing happens: the earliest stop deadline.
pub fn next_deadline<'a>(memory: impl IntoIterator<Item = &'a InstanceMemory>) -> Option<Instant> {
    memory.into_iter().filter_map(|m| m.stop_deadline).min()
}

/// The report for one instance, or `None` when there is nothing to say (neither desired
/// nor present).
pub fn report(
    instance_id: &InstanceId,
    desired: Option<&DesiredInstance>,
    observed: Option<DomainState>,
    memory: Option<&InstanceMemory>,
) -> Option<InstanceReport> {
    use DomainState::*;
    use InstanceState as S;
    let user = || {
        Some(StateReason::new(
            reason::USER_INITIATED_SHUTDOWN,
            "User initiated shutdown",
        ))
    };
    let guest = || {
        Some(StateReason::new(
            reason::INSTANCE_INITIATED_SHUTDOWN,
            "Instance initiated shutdown",
        ))
    };
    let crashed = || {
        Some(StateReason::new(
            reason::INTERNAL_ERROR,
            "The guest crashed",
        ))
    };
    let failure = memory.and_then(|m| m.failure.as_ref());
    let failed = || failure.map(|f| f.reason.clone());
    let guest_stopped = memory.is_some_and(|m| m.guest_stopped);
    let stop_requested = memory.is_some_and(|m| m.stop_deadline.is_some());
    let rebooting = memory.is_some_and(|m| m.rebooting);

    let (state, why) = match (desired.map(|d| d.desired), observed) {
        (None, None) => return None,
        // Not ours to manage: plain translation.
        (None, Some(Booting)) => (S::Pending, None),
        (None, Some(Running)) => (S::Running, None),
        (None, Some(ShuttingDown)) => (S::Stopping, None),
        (None, Some(ShutOff)) => (S::Stopped, None),
        (None, Some(Crashed)) => (S::Stopped, crashed()),

        (Some(PowerState::Running), None) => match failure {
            Some(f) if f.terminal => (S::Terminated, failed()),
            Some(_) => (S::Stopped, failed()),
            None => (S::Pending, None),
        },
        (Some(PowerState::Running), Some(Booting)) if rebooting => (S::Running, None),
        (Some(PowerState::Running), Some(Booting)) => (S::Pending, None),
        (Some(PowerState::Running), Some(Running)) => (S::Running, None),
        (Some(PowerState::Running), Some(ShuttingDown)) => (S::Stopping, guest()),
        (Some(PowerState::Running), Some(ShutOff)) => match failure {
            Some(_) => (S::Stopped, failed()),
            None if guest_stopped => (S::Stopped, guest()),
            // About to be started.
            None => (S::Pending, None),
        },
        (Some(PowerState::Running), Some(Crashed)) => {
            if guest_stopped || failure.is_some() {
                (S::Stopped, crashed())
            } else {
                // Found crashed (e.g. after an agent restart): about to be restarted.
                (S::Pending, None)
            }
        }

        (Some(PowerState::Stopped), None | Some(ShutOff)) => (S::Stopped, user()),
        (Some(PowerState::Stopped), Some(ShuttingDown)) => (S::Stopping, user()),
        (Some(PowerState::Stopped), Some(Booting | Running)) if stop_requested => {
            (S::Stopping, user())
        }
        (Some(PowerState::Stopped), Some(Booting)) => (S::Pending, None),
        (Some(PowerState::Stopped), Some(Running)) => (S::Running, None),
        (Some(PowerState::Stopped), Some(Crashed)) => (S::Stopped, crashed()),

        (Some(PowerState::Terminated), None) => (S::Terminated, failed().or_else(user)),
        (Some(PowerState::Terminated), Some(_)) => (S::ShuttingDown, failed().or_else(user)),
    };
    Some(InstanceReport {
        instance_id: instance_id.clone(),
        state,
        reason: why,
        reboot_seq: memory.map_or(0, |m| m.applied_reboot_seq),
        // Filled from the domains' disks by `with_volumes`.
        volumes: Vec::new(),
    })
}

/// Reports for every instance that is desired or present on the host.
pub fn reports(
    desired: Option<&DesiredState>,
    observed: &BTreeMap<InstanceId, DomainState>,
    memory: &BTreeMap<InstanceId, InstanceMemory>,
) -> BTreeMap<InstanceId, InstanceReport> {
    static NONE: BTreeMap<InstanceId, DesiredInstance> = BTreeMap::new();
    let specs = desired.map_or(&NONE, |d| &d.instances);
    // Both maps are sorted: merge them rather than collect the ids, sort them and look
    // each one up; the merge yields each id with its spec and its state.
    let (mut seen, mut specs) = (observed.iter().peekable(), specs.iter().peekable());
    let mut memory = Beside::new(memory);
    let mut out = BTreeMap::new();
    loop {
        let order = match (seen.peek(), specs.peek()) {
            (None, None) => break,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some((a, _)), Some((b, _))) => a.cmp(b),
        };
        // Each arm takes an entry that was just peeked, so none yields `None`.
        let Some((id, state, spec)) = (match order {
            Ordering::Less => seen.next().map(|(id, state)| (id, Some(*state), None)),
            Ordering::Greater => specs.next().map(|(id, spec)| (id, None, Some(spec))),
            Ordering::Equal => seen
                .next()
                .zip(specs.next())
                .map(|((id, state), (_, spec))| (id, Some(*state), Some(spec))),
        }) else {
            break;
        };
        if let Some(r) = report(id, spec, state, memory.get(id)) {
            out.insert(id.clone(), r);
        }
    }
    out
}

/// A cursor over a sorted map for keys asked in ascending order: each lookup costs a step
/// or two instead of a search from the root, so walking one map beside others is linear.
/// The reconcile pass walks every instance of the node through several maps keyed by
/// instance id, whose time-ordered ids share long prefixes: searches were most of its cost.
pub(crate) struct Beside<'a, K, V> {
    rest: Peekable<btree_map::Iter<'a, K, V>>,
}

impl<'a, K: Ord, V> Beside<'a, K, V> {
    pub(crate) fn new(map: &'a BTreeMap<K, V>) -> Self {
        Self {
            rest: map.iter().peekable(),
        }
    }

    /// The value of `key`. Keys must be asked in ascending order, each at most once: a
    /// key not above the last one asked is not found.
    pub(crate) fn get(&mut self, key: &K) -> Option<&'a V> {
        while let Some((k, _)) = self.rest.peek() {
            match (*k).cmp(key) {
                Ordering::Less => {
                    self.rest.next();
                }
                Ordering::Equal => return self.rest.next().map(|(_, v)| v),
                Ordering::Greater => return None,
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use canopy_common::{ImageId, Resources};

    use super::*;
    use DomainState::*;

    const STATES: [Option<DomainState>; 6] = [
        None,
        Some(ShutOff),
        Some(Booting),
        Some(Running),
        Some(ShuttingDown),
        Some(Crashed),
    ];

    fn id(n: u8) -> InstanceId {
        InstanceId::parse(&format!("i-0123456789abcdef{n}")).unwrap()
    }

    fn spec(desired: PowerState, reboot_seq: u64) -> DesiredInstance {
        DesiredInstance {
            instance_id: id(0),
            instance_type: "t2.micro".into(),
            resources: Resources::new(1, 1024, 8),
            image_id: ImageId::parse("ami-0123456789abcdef0").unwrap(),
            user_data: vec![],
            key_name: None,
            desired,
            reboot_seq,
            start_seq: 0,
            private_ip: None,
            metadata: Default::default(),
            boot: Default::default(),
            volumes: vec![],
        }
    }

    /// The reconcile pass walks its sorted maps side by side instead of looking each
    /// instance up; on a node where the desired, observed, remembered and sized instances
    /// overlap in every combination, the walks give exactly what the lookups give.
    #[test]
    fn walks_over_sorted_maps_agree_with_lookups_per_instance() {
        let many = |n: u32| {
            InstanceId::parse(&format!("i-{:017x}", 0x1_9000_0000_u64 + u64::from(n) * 7)).unwrap()
        };
        let wants = [
            None,
            Some(PowerState::Running),
            Some(PowerState::Stopped),
            Some(PowerState::Terminated),
        ];
        let mut desired = doc(spec(PowerState::Running, 0));
        desired.instances.clear();
        let (mut observed, mut memory, mut sizes) = (States::new(), BTreeMap::new(), Sizes::new());
        let mut n = 0;
        for want in wants {
            for seen in STATES {
                for remembered in [false, true] {
                    n += 1;
                    let id = many(n);
                    if let Some(want) = want {
                        let mut s = spec(want, u64::from(n % 3));
                        s.instance_id = id.clone();
                        desired.instances.insert(id.clone(), s);
                    }
                    if let Some(seen) = seen {
                        observed.insert(id.clone(), seen);
                        sizes.insert(id.clone(), Resources::new(1 + n % 2, 1024, 8));
                    }
                    if remembered {
                        let memo = InstanceMemory {
                            applied_reboot_seq: 1,
                            guest_stopped: n % 4 == 0,
                            ..InstanceMemory::default()
                        };
                        memory.insert(id, memo);
                    }
                }
            }
        }
        // Past every other id, a domain the document does not name: one map runs out first.
        observed.insert(many(n + 1), Running);
        let now = Instant::now();

        let lookups = |desired: &DesiredState, observed: &States| -> BTreeMap<_, _> {
            let ids: BTreeSet<&InstanceId> =
                desired.instances.keys().chain(observed.keys()).collect();
            ids.into_iter()
                .filter_map(|id| {
                    let r = report(
                        id,
                        desired.instances.get(id),
                        observed.get(id).copied(),
                        memory.get(id),
                    );
                    r.map(|r| (id.clone(), r))
                })
                .collect()
        };
        let expected = lookups(&desired, &observed);
        assert_eq!(
            expected.len(),
            4 * 2 * 6 - 2 + 1,
            "every id but the two neither desired nor seen, and the last domain"
        );
        assert_eq!(reports(Some(&desired), &observed, &memory), expected);

        let planned = plan(&desired, &observed, &memory, now);
        let actions: Vec<Action> = desired
            .instances
            .iter()
            .flat_map(|(id, spec)| {
                let fresh = InstanceMemory::first_seen(spec);
                plan_instance(
                    spec,
                    observed.get(id).copied(),
                    memory.get(id).unwrap_or(&fresh),
                    now,
                )
            })
            .collect();
        assert!(actions.len() > 10);
        assert_eq!(planned.actions, actions);
        let unmanaged: Vec<InstanceId> = observed
            .keys()
            .filter(|id| !desired.instances.contains_key(*id))
            .cloned()
            .collect();
        assert_eq!(unmanaged.len(), 2 * 5 + 1);
        assert_eq!(planned.unmanaged, unmanaged);

        let resizes: Vec<Action> = desired
            .instances
            .iter()
            .filter(|(id, spec)| {
                spec.desired == PowerState::Running
                    && observed.get(*id) == Some(&ShutOff)
                    && !memory
                        .get(*id)
                        .is_some_and(|m| m.guest_stopped || m.failure.is_some())
                    && sizes
                        .get(*id)
                        .is_some_and(|s| s.vcpus != spec.resources.vcpus)
            })
            .map(|(id, spec)| Action::Resize {
                instance_id: id.clone(),
                resources: spec.resources,
            })
            .collect();
        assert!(!resizes.is_empty());
        assert_eq!(plan_resizes(&desired, &observed, &sizes, &memory), resizes);

        // The other map running out first: past every other id, an instance the host does
        // not have yet.
        observed.remove(&many(n + 1));
        let mut last = spec(PowerState::Running, 0);
        last.instance_id = many(n + 2);
        desired.instances.insert(last.instance_id.clone(), last);
        let expected = lookups(&desired, &observed);
        assert_eq!(expected.len(), 4 * 2 * 6 - 2 + 1);
        assert_eq!(reports(Some(&desired), &observed, &memory), expected);
    }

    #[test]
    fn a_cursor_finds_keys_asked_in_order_and_skips_the_rest() {
        let map: BTreeMap<u32, &str> = [(2, "two"), (4, "four"), (6, "six")].into();
        let mut at = Beside::new(&map);
        assert_eq!(at.get(&1), None);
        assert_eq!(at.get(&2), Some(&"two"));
        assert_eq!(at.get(&5), None);
        assert_eq!(at.get(&6), Some(&"six"));
        assert_eq!(at.get(&7), None);
        let mut again = Beside::new(&map);
        assert_eq!(again.get(&4), Some(&"four"));
        assert_eq!(again.get(&4), None, "each key is found once");
    }

    fn doc(spec: DesiredInstance) -> DesiredState {
        DesiredState {
            generation: 1,
            instances: [(spec.instance_id.clone(), spec)].into(),
            deleted_volumes: vec![],
            snapshots: vec![],
        }
    }

    fn observed(state: Option<DomainState>) -> BTreeMap<InstanceId, DomainState> {
        state.map(|s| (id(0), s)).into_iter().collect()
    }

    fn snap(n: u8, volume: u8) -> SnapshotRequest {
        SnapshotRequest {
            snapshot_id: SnapshotId::parse(&format!("snap-0123456789abcdef{n}")).unwrap(),
            source: SnapshotSource::Volume(volume_ids(volume)),
        }
    }

    fn node(name: &str) -> NodeId {
        NodeId::parse(name).unwrap()
    }

    /// A request for a copy of instance `id(i)`'s root disk, on node `on`.
    fn root(n: u8, i: u8, on: &str) -> SnapshotRequest {
        SnapshotRequest {
            snapshot_id: SnapshotId::parse(&format!("snap-0123456789abcde0{n}")).unwrap(),
            source: SnapshotSource::Root {
                instance_id: id(i),
                node_id: node(on),
            },
        }
    }

    fn volume_ids(n: u8) -> VolumeId {
        VolumeId::parse(&format!("vol-0123456789abcdef{n}")).unwrap()
    }

    #[test]
    fn snapshots_start_once_and_again_only_after_their_wait() {
        let mut d = doc(spec(PowerState::Running, 0));
        d.snapshots = vec![snap(0, 0), snap(1, 1), snap(2, 2)];
        let now = Instant::now();
        let later = now + std::time::Duration::from_secs(5);
        let tasks: BTreeMap<SnapshotId, SnapshotTask> = [
            (snap(0, 0).snapshot_id, SnapshotTask::InFlight),
            (snap(1, 1).snapshot_id, SnapshotTask::Wait(later)),
        ]
        .into();
        let me = node("hv-1");
        assert_eq!(snapshots_due(&d, &tasks, &me, now), vec![snap(2, 2)]);
        assert_eq!(
            snapshots_due(&d, &tasks, &me, later),
            vec![snap(1, 1), snap(2, 2)]
        );
        d.snapshots.clear();
        assert!(snapshots_due(&d, &tasks, &me, later).is_empty());
    }

    #[test]
    fn root_disks_are_copied_by_their_node_only() {
        let mut d = doc(spec(PowerState::Stopped, 0));
        d.snapshots = vec![root(0, 0, "hv-1"), root(1, 5, "hv-2"), snap(2, 2)];
        let none = BTreeMap::new();
        let now = Instant::now();
        assert_eq!(
            snapshots_due(&d, &none, &node("hv-1"), now),
            vec![root(0, 0, "hv-1"), snap(2, 2)]
        );
        assert_eq!(
            snapshots_due(&d, &none, &node("hv-2"), now),
            vec![root(1, 5, "hv-2"), snap(2, 2)]
        );
        // Only the instances of this document count as being copied here.
        assert_eq!(roots_being_copied(&d), [id(0)].into());
    }

    #[test]
    fn a_domain_whose_root_disk_is_copied_is_neither_defined_started_nor_undefined() {
        let none = BTreeMap::new();
        let now = Instant::now();
        let with_copy = |desired: PowerState| {
            let mut d = doc(spec(desired, 0));
            d.snapshots = vec![root(0, 0, "hv-1")];
            d
        };
        // A start asked while the copy runs waits (the instance is reported pending)...
        for state in [None, Some(ShutOff)] {
            let d = with_copy(PowerState::Running);
            assert!(
                plan(&d, &observed(state), &none, now).actions.is_empty(),
                "{state:?}"
            );
            let r = report(&id(0), d.instances.get(&id(0)), state, None).unwrap();
            assert_eq!(r.state, InstanceState::Pending);
        }
        // ... and so does a terminate (shutting-down), but a crashed or running domain is
        // still forced off.
        let d = with_copy(PowerState::Terminated);
        assert!(
            plan(&d, &observed(Some(ShutOff)), &none, now)
                .actions
                .is_empty()
        );
        let r = report(&id(0), d.instances.get(&id(0)), Some(ShutOff), None).unwrap();
        assert_eq!(r.state, InstanceState::ShuttingDown);
        assert_eq!(
            plan(&d, &observed(Some(Running)), &none, now).actions,
            vec![Action::Destroy(id(0))]
        );
        let d = with_copy(PowerState::Running);
        assert_eq!(
            plan(&d, &observed(Some(Crashed)), &none, now).actions,
            vec![Action::Destroy(id(0))]
        );
        // No resize before the start that waits.
        let sizes: Sizes = [(id(0), Resources::new(4, 4096, 0))].into();
        assert!(plan_resizes(&d, &observed(Some(ShutOff)), &sizes, &none).is_empty());
        // Once the CLC drops the request, the start and the undefine go ahead.
        let mut d = with_copy(PowerState::Running);
        d.snapshots.clear();
        assert_eq!(
            plan(&d, &observed(Some(ShutOff)), &none, now).actions,
            vec![Action::Start {
                instance_id: id(0),
                reboot_seq: 0
            }]
        );
        let mut d = with_copy(PowerState::Terminated);
        d.snapshots.clear();
        assert_eq!(
            plan(&d, &observed(Some(ShutOff)), &none, now).actions,
            vec![Action::Undefine(id(0))]
        );
        // A copy of another node's instance holds nothing here.
        let mut d = doc(spec(PowerState::Running, 0));
        d.snapshots = vec![root(1, 5, "hv-2")];
        assert_eq!(
            plan(&d, &observed(Some(ShutOff)), &none, now).actions.len(),
            1
        );
    }

    #[test]
    fn a_deleted_volume_keeps_its_bytes_until_its_snapshots_are_taken() {
        let mut d = doc(spec(PowerState::Running, 0));
        d.deleted_volumes = vec![volume_ids(0), volume_ids(1)];
        d.snapshots = vec![snap(0, 0)];
        let none = BTreeSet::new();
        assert_eq!(
            volumes_to_remove(&d, &Attached::new(), &none),
            vec![volume_ids(1)]
        );
        d.snapshots.clear();
        assert_eq!(volumes_to_remove(&d, &Attached::new(), &none).len(), 2);
    }

    fn volume(n: u8) -> VolumeAttachment {
        VolumeAttachment {
            volume_id: VolumeId::parse(&format!("vol-0123456789abcdef{n}")).unwrap(),
            device: format!("/dev/sd{}", (b'f' + n) as char),
            size_gib: 1,
            initialized: false,
            source: None,
        }
    }

    #[test]
    fn volumes_follow_the_spec_on_existing_domains_only() {
        let mut s = spec(PowerState::Running, 0);
        s.volumes = vec![volume(0), volume(1)];
        let d = doc(s.clone());
        let attached: Attached = [(id(0), vec![volume(1).volume_id, volume(2).volume_id])].into();
        let actions = plan_volumes(&d, &observed(Some(Running)), &attached);
        assert_eq!(
            actions,
            vec![
                Action::AttachVolume {
                    instance_id: id(0),
                    volume: volume(0)
                },
                Action::DetachVolume {
                    instance_id: id(0),
                    volume_id: volume(2).volume_id
                },
            ]
        );
        // A stopped domain gets them too (to its definition).
        assert_eq!(
            plan_volumes(&d, &observed(Some(ShutOff)), &Attached::new()).len(),
            2
        );
        // Not defined yet, crashed, or being terminated: nothing.
        assert!(plan_volumes(&d, &observed(None), &Attached::new()).is_empty());
        assert!(plan_volumes(&d, &observed(Some(Crashed)), &Attached::new()).is_empty());
        s.desired = PowerState::Terminated;
        assert!(plan_volumes(&doc(s), &observed(Some(Running)), &attached).is_empty());
    }

    #[test]
    fn a_shut_off_domain_of_another_size_is_resized_before_it_starts() {
        let big = Resources::new(2, 8192, 30);
        let mut s = spec(PowerState::Running, 0);
        s.resources = big;
        let d = doc(s.clone());
        let old: Sizes = [(id(0), Resources::new(1, 1024, 0))].into();
        let resize = Action::Resize {
            instance_id: id(0),
            resources: big,
        };
        let none = BTreeMap::new();
        assert_eq!(
            plan_resizes(&d, &observed(Some(ShutOff)), &old, &none),
            vec![resize]
        );
        // The disk the driver lists is not compared (libvirt lists none).
        let same: Sizes = [(id(0), Resources::new(2, 8192, 0))].into();
        assert!(plan_resizes(&d, &observed(Some(ShutOff)), &same, &none).is_empty());
        // Not while the domain runs or is not defined, nor for one that is not to start:
        // a guest that stopped on its own, a latched failure, or a stopped instance.
        for state in [
            None,
            Some(Booting),
            Some(Running),
            Some(ShuttingDown),
            Some(Crashed),
        ] {
            assert!(
                plan_resizes(&d, &observed(state), &old, &none).is_empty(),
                "{state:?}"
            );
        }
        let guest = [(
            id(0),
            InstanceMemory {
                guest_stopped: true,
                ..InstanceMemory::default()
            },
        )]
        .into();
        assert!(plan_resizes(&d, &observed(Some(ShutOff)), &old, &guest).is_empty());
        let failed = [(
            id(0),
            InstanceMemory {
                failure: Some(Failure {
                    reason: StateReason::new(reason::INSUFFICIENT_CAPACITY, "no room"),
                    terminal: false,
                }),
                ..InstanceMemory::default()
            },
        )]
        .into();
        assert!(plan_resizes(&d, &observed(Some(ShutOff)), &old, &failed).is_empty());
        for desired in [PowerState::Stopped, PowerState::Terminated] {
            let mut other = s.clone();
            other.desired = desired;
            assert!(plan_resizes(&doc(other), &observed(Some(ShutOff)), &old, &none).is_empty());
        }
        // The start itself is the lifecycle plan's, after the resize.
        assert_eq!(
            plan_one(s, Some(ShutOff), InstanceMemory::default()),
            vec![start()]
        );
    }

    #[test]
    fn deleted_volumes_are_removed_once_and_never_while_attached() {
        let mut d = doc(spec(PowerState::Running, 0));
        d.deleted_volumes = vec![
            volume(0).volume_id,
            volume(1).volume_id,
            volume(2).volume_id,
        ];
        let attached: Attached = [(id(0), vec![volume(1).volume_id])].into();
        let removed: BTreeSet<VolumeId> = [volume(2).volume_id].into();
        assert_eq!(
            volumes_to_remove(&d, &attached, &removed),
            vec![volume(0).volume_id]
        );
    }

    #[test]
    fn reports_carry_the_attached_volumes_sorted() {
        let d = doc(spec(PowerState::Running, 0));
        let mut r = reports(Some(&d), &observed(Some(Running)), &BTreeMap::new());
        let attached: Attached = [(id(0), vec![volume(1).volume_id, volume(0).volume_id])].into();
        with_volumes(&mut r, &attached);
        assert_eq!(
            r[&id(0)].volumes,
            vec![volume(0).volume_id, volume(1).volume_id]
        );
        with_volumes(&mut r, &Attached::new());
        assert!(r[&id(0)].volumes.is_empty());
    }

    fn plan_one(
        spec: DesiredInstance,
        state: Option<DomainState>,
        mem: InstanceMemory,
    ) -> Vec<Action> {
        let memory = [(id(0), mem)].into();
        plan(&doc(spec), &observed(state), &memory, Instant::now()).actions
    }

    fn define() -> Action {
        Action::Define(Box::new(spec(PowerState::Running, 0).domain_spec()))
    }
    fn start() -> Action {
        Action::Start {
            instance_id: id(0),
            reboot_seq: 0,
        }
    }

    /// Every (desired, observed) pair with fresh memory.
    #[test]
    fn fresh_memory_table() {
        use PowerState as P;
        let table: Vec<(PowerState, Option<DomainState>, Vec<Action>)> = vec![
            (P::Running, None, vec![define(), start()]),
            (P::Running, Some(ShutOff), vec![start()]),
            (P::Running, Some(Booting), vec![]),
            (P::Running, Some(Running), vec![]),
            (P::Running, Some(ShuttingDown), vec![]),
            (
                P::Running,
                Some(Crashed),
                vec![Action::Destroy(id(0)), start()],
            ),
            (P::Stopped, None, vec![]),
            (P::Stopped, Some(ShutOff), vec![]),
            (P::Stopped, Some(Booting), vec![Action::Shutdown(id(0))]),
            (P::Stopped, Some(Running), vec![Action::Shutdown(id(0))]),
            (
                P::Stopped,
                Some(ShuttingDown),
                vec![Action::Shutdown(id(0))],
            ),
            (P::Stopped, Some(Crashed), vec![Action::Destroy(id(0))]),
            (P::Terminated, None, vec![]),
            (P::Terminated, Some(ShutOff), vec![Action::Undefine(id(0))]),
            (
                P::Terminated,
                Some(Booting),
                vec![Action::Destroy(id(0)), Action::Undefine(id(0))],
            ),
            (
                P::Terminated,
                Some(Running),
                vec![Action::Destroy(id(0)), Action::Undefine(id(0))],
            ),
            (
                P::Terminated,
                Some(ShuttingDown),
                vec![Action::Destroy(id(0)), Action::Undefine(id(0))],
            ),
            (
                P::Terminated,
                Some(Crashed),
                vec![Action::Destroy(id(0)), Action::Undefine(id(0))],
            ),
        ];
        assert_eq!(table.len(), 3 * STATES.len());
        for (desired, state, expected) in table {
            let got = plan_one(spec(desired, 0), state, InstanceMemory::default());
            assert_eq!(got, expected, "desired {desired:?}, observed {state:?}");
        }
    }

    #[test]
    fn a_guest_that_stopped_itself_is_not_restarted() {
        let mem = InstanceMemory {
            guest_stopped: true,
            ..Default::default()
        };
        for state in [Some(ShutOff), Some(Crashed), Some(ShuttingDown)] {
            assert_eq!(
                plan_one(spec(PowerState::Running, 0), state, mem.clone()),
                vec![]
            );
        }
    }

    #[test]
    fn a_failed_instance_is_not_retried_while_desired_running() {
        let failure = Failure {
            reason: StateReason::new(reason::INTERNAL_ERROR, "x"),
            terminal: true,
        };
        let mem = InstanceMemory {
            failure: Some(failure),
            ..Default::default()
        };
        for state in STATES {
            assert_eq!(
                plan_one(spec(PowerState::Running, 0), state, mem.clone()),
                vec![]
            );
        }
        // Termination still proceeds.
        assert_eq!(
            plan_one(spec(PowerState::Terminated, 0), Some(ShutOff), mem),
            vec![Action::Undefine(id(0))]
        );
    }

    #[test]
    fn reboots_only_a_running_domain_with_a_newer_sequence() {
        let mem = InstanceMemory::first_seen(&spec(PowerState::Running, 2));
        assert_eq!(
            plan_one(spec(PowerState::Running, 2), Some(Running), mem.clone()),
            vec![]
        );
        assert_eq!(
            plan_one(spec(PowerState::Running, 3), Some(Running), mem.clone()),
            vec![Action::Reboot {
                instance_id: id(0),
                reboot_seq: 3
            }]
        );
        assert_eq!(
            plan_one(spec(PowerState::Running, 3), Some(Booting), mem.clone()),
            vec![]
        );
        // A start covers the reboot.
        assert_eq!(
            plan_one(spec(PowerState::Running, 3), Some(ShutOff), mem),
            vec![Action::Start {
                instance_id: id(0),
                reboot_seq: 3
            }]
        );
    }

    #[test]
    fn a_stop_is_forced_after_its_deadline() {
        let now = Instant::now();
        let memory = |deadline| {
            [(
                id(0),
                InstanceMemory {
                    stop_deadline: Some(deadline),
                    ..Default::default()
                },
            )]
            .into()
        };
        let d = doc(spec(PowerState::Stopped, 0));
        for state in [Running, ShuttingDown, Booting] {
            let waiting = plan(
                &d,
                &observed(Some(state)),
                &memory(now + Duration::from_secs(1)),
                now,
            );
            assert_eq!(waiting.actions, vec![]);
            let late = plan(&d, &observed(Some(state)), &memory(now), now);
            assert_eq!(late.actions, vec![Action::Destroy(id(0))]);
        }
        let m: BTreeMap<_, _> = memory(now);
        assert_eq!(next_deadline(m.values()), Some(now));
    }

    #[test]
    fn domains_outside_the_document_are_left_alone() {
        let mut obs = observed(Some(Running));
        obs.insert(id(1), Running);
        obs.insert(id(2), ShutOff);
        let p = plan(
            &doc(spec(PowerState::Running, 0)),
            &obs,
            &BTreeMap::new(),
            Instant::now(),
        );
        assert_eq!(p.actions, vec![]);
        assert_eq!(p.unmanaged, vec![id(1), id(2)]);
        let empty = plan(
            &DesiredState::default(),
            &obs,
            &BTreeMap::new(),
            Instant::now(),
        );
        assert_eq!(empty.actions, vec![]);
        assert_eq!(empty.unmanaged.len(), 3);
    }

    #[test]
    fn observe_latches_guest_stops_only_while_desired_running() {
        for down in [ShuttingDown, ShutOff, Crashed] {
            for up in [Booting, Running] {
                let mut m = InstanceMemory {
                    last_seen: Some(up),
                    ..Default::default()
                };
                observe(&mut m, &spec(PowerState::Running, 0), Some(down));
                assert!(m.guest_stopped, "{up:?} -> {down:?}");
                assert_eq!(m.last_seen, Some(down));

                let mut m = InstanceMemory {
                    last_seen: Some(up),
                    ..Default::default()
                };
                observe(&mut m, &spec(PowerState::Stopped, 0), Some(down));
                assert!(!m.guest_stopped);
            }
        }
        // A domain found shut off (fresh define, agent restart) is not a guest stop.
        let mut m = InstanceMemory::default();
        observe(&mut m, &spec(PowerState::Running, 0), Some(ShutOff));
        assert!(!m.guest_stopped);
        // A stop clears the latch and a failure.
        let mut m = InstanceMemory {
            guest_stopped: true,
            failure: Some(Failure {
                reason: StateReason::new(reason::INTERNAL_ERROR, "x"),
                terminal: false,
            }),
            ..Default::default()
        };
        observe(&mut m, &spec(PowerState::Stopped, 0), Some(ShutOff));
        assert!(!m.guest_stopped);
        assert_eq!(m.failure, None);
    }

    #[test]
    fn a_new_start_restarts_a_guest_that_stopped_on_its_own_even_unseen_in_between() {
        // The guest shut itself down while desired running: it stays down...
        let mut m = InstanceMemory {
            last_seen: Some(Running),
            ..InstanceMemory::first_seen(&spec(PowerState::Running, 0))
        };
        observe(&mut m, &spec(PowerState::Running, 0), Some(ShutOff));
        assert!(m.guest_stopped);
        assert_eq!(
            plan_one(spec(PowerState::Running, 0), Some(ShutOff), m.clone()),
            vec![]
        );
        // ...until a StartInstances the node has not seen, even when the document that
        // said "stopped" in between never reached it.
        let started = DesiredInstance {
            start_seq: 1,
            ..spec(PowerState::Running, 0)
        };
        observe(&mut m, &started, Some(ShutOff));
        assert!(!m.guest_stopped);
        assert_eq!(m.seen_start_seq, 1);
        assert_eq!(
            plan_one(started.clone(), Some(ShutOff), m.clone()),
            vec![Action::Start {
                instance_id: id(0),
                reboot_seq: 0
            }]
        );
        // The same start seen again is no new start.
        m.guest_stopped = true;
        observe(&mut m, &started, Some(ShutOff));
        assert!(m.guest_stopped);
    }

    #[test]
    fn observe_clears_launching_and_stale_deadlines() {
        let mut m = InstanceMemory {
            launching: true,
            ..Default::default()
        };
        observe(&mut m, &spec(PowerState::Running, 0), Some(Booting));
        assert!(m.launching);
        observe(&mut m, &spec(PowerState::Running, 0), Some(Running));
        assert!(!m.launching);

        let mut m = InstanceMemory {
            stop_deadline: Some(Instant::now()),
            ..Default::default()
        };
        observe(&mut m, &spec(PowerState::Stopped, 0), Some(ShuttingDown));
        assert!(m.stop_deadline.is_some());
        observe(&mut m, &spec(PowerState::Stopped, 0), Some(ShutOff));
        assert_eq!(m.stop_deadline, None);
    }

    fn report_of(
        desired: Option<PowerState>,
        state: Option<DomainState>,
        mem: &InstanceMemory,
    ) -> Option<(InstanceState, Option<&'static str>)> {
        let s = desired.map(|d| spec(d, 0));
        report(&id(0), s.as_ref(), state, Some(mem)).map(|r| (r.state, r.reason.map(|r| r.code)))
    }

    #[test]
    fn report_table_with_fresh_memory() {
        use InstanceState as S;
        use PowerState as P;
        let user = Some(reason::USER_INITIATED_SHUTDOWN);
        let internal = Some(reason::INTERNAL_ERROR);
        type Row = (
            Option<PowerState>,
            Option<DomainState>,
            Option<(S, Option<&'static str>)>,
        );
        let table: Vec<Row> = vec![
            (None, None, None),
            (None, Some(ShutOff), Some((S::Stopped, None))),
            (None, Some(Booting), Some((S::Pending, None))),
            (None, Some(Running), Some((S::Running, None))),
            (None, Some(ShuttingDown), Some((S::Stopping, None))),
            (None, Some(Crashed), Some((S::Stopped, internal))),
            (Some(P::Running), None, Some((S::Pending, None))),
            (Some(P::Running), Some(ShutOff), Some((S::Pending, None))),
            (Some(P::Running), Some(Booting), Some((S::Pending, None))),
            (Some(P::Running), Some(Running), Some((S::Running, None))),
            (
                Some(P::Running),
                Some(ShuttingDown),
                Some((S::Stopping, Some(reason::INSTANCE_INITIATED_SHUTDOWN))),
            ),
            (Some(P::Running), Some(Crashed), Some((S::Pending, None))),
            (Some(P::Stopped), None, Some((S::Stopped, user))),
            (Some(P::Stopped), Some(ShutOff), Some((S::Stopped, user))),
            (Some(P::Stopped), Some(Booting), Some((S::Pending, None))),
            (Some(P::Stopped), Some(Running), Some((S::Running, None))),
            (
                Some(P::Stopped),
                Some(ShuttingDown),
                Some((S::Stopping, user)),
            ),
            (
                Some(P::Stopped),
                Some(Crashed),
                Some((S::Stopped, internal)),
            ),
            (Some(P::Terminated), None, Some((S::Terminated, user))),
            (
                Some(P::Terminated),
                Some(ShutOff),
                Some((S::ShuttingDown, user)),
            ),
            (
                Some(P::Terminated),
                Some(Booting),
                Some((S::ShuttingDown, user)),
            ),
            (
                Some(P::Terminated),
                Some(Running),
                Some((S::ShuttingDown, user)),
            ),
            (
                Some(P::Terminated),
                Some(ShuttingDown),
                Some((S::ShuttingDown, user)),
            ),
            (
                Some(P::Terminated),
                Some(Crashed),
                Some((S::ShuttingDown, user)),
            ),
        ];
        assert_eq!(table.len(), 4 * STATES.len());
        for (desired, state, expected) in table {
            assert_eq!(
                report_of(desired, state, &InstanceMemory::default()),
                expected,
                "desired {desired:?}, observed {state:?}"
            );
        }
    }

    #[test]
    fn reports_use_what_the_agent_remembers() {
        use InstanceState as S;
        let guest = InstanceMemory {
            guest_stopped: true,
            ..Default::default()
        };
        assert_eq!(
            report_of(Some(PowerState::Running), Some(ShutOff), &guest),
            Some((S::Stopped, Some(reason::INSTANCE_INITIATED_SHUTDOWN)))
        );
        assert_eq!(
            report_of(Some(PowerState::Running), Some(Crashed), &guest),
            Some((S::Stopped, Some(reason::INTERNAL_ERROR)))
        );
        let stopping = InstanceMemory {
            stop_deadline: Some(Instant::now()),
            ..Default::default()
        };
        assert_eq!(
            report_of(Some(PowerState::Stopped), Some(Running), &stopping),
            Some((S::Stopping, Some(reason::USER_INITIATED_SHUTDOWN)))
        );
        let failed = |terminal| InstanceMemory {
            failure: Some(Failure {
                reason: StateReason::new(reason::INSUFFICIENT_CAPACITY, "full"),
                terminal,
            }),
            ..Default::default()
        };
        assert_eq!(
            report_of(Some(PowerState::Running), None, &failed(true)),
            Some((S::Terminated, Some(reason::INSUFFICIENT_CAPACITY)))
        );
        assert_eq!(
            report_of(Some(PowerState::Running), Some(ShutOff), &failed(false)),
            Some((S::Stopped, Some(reason::INSUFFICIENT_CAPACITY)))
        );
        assert_eq!(
            report_of(Some(PowerState::Terminated), None, &failed(true)),
            Some((S::Terminated, Some(reason::INSUFFICIENT_CAPACITY)))
        );
        let rebooting = InstanceMemory {
            rebooting: true,
            ..Default::default()
        };
        assert_eq!(
            report_of(Some(PowerState::Running), Some(Booting), &rebooting),
            Some((S::Running, None))
        );
        let mut m = rebooting.clone();
        observe(&mut m, &spec(PowerState::Running, 0), Some(Booting));
        assert!(m.rebooting);
        observe(&mut m, &spec(PowerState::Running, 0), Some(Running));
        assert!(!m.rebooting);
        let r = report(
            &id(0),
            None,
            Some(Running),
            Some(&InstanceMemory::first_seen(&spec(PowerState::Running, 4))),
        )
        .unwrap();
        assert_eq!(r.reboot_seq, 4);
    }

    #[test]
    fn reports_cover_desired_and_present_instances() {
        let mut obs = observed(Some(Running));
        obs.insert(id(1), ShutOff);
        let mut d = doc(spec(PowerState::Running, 0));
        let mut gone = spec(PowerState::Terminated, 0);
        gone.instance_id = id(2);
        d.instances.insert(id(2), gone);
        let r = reports(Some(&d), &obs, &BTreeMap::new());
        let states: Vec<_> = r
            .values()
            .map(|r| (r.instance_id.clone(), r.state))
            .collect();
        assert_eq!(
            states,
            vec![
                (id(0), InstanceState::Running),
                (id(1), InstanceState::Stopped),
                (id(2), InstanceState::Terminated)
            ]
        );
    }
}
