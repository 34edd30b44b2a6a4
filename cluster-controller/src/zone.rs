//! The zone's state and its pure planner: which node runs which instance, what each node
//! must be told, and what must be reported upward. No I/O and no clock reads happen here;
//! the caller passes the current [`Moment`] and executes the [`Plan`]s this returns.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::Duration;

use canopy_common::placement::{HostSnapshot, Placement, Rejection, place_all};
use canopy_common::{
    InstanceId, InstanceState, Ipv4Subnet, NodeId, PowerState, Resources, ZoneName,
};

use crate::error::CcError;
use crate::model::{
    INSUFFICIENT_CAPACITY, InstanceReport, InstanceSpec, Moment, NodeDesired, NodeRegistration,
    NodeSummary, StateReason, USER_INITIATED_SHUTDOWN, ZoneDesired,
};

/// A node document to deliver, with the address to deliver it to (so the executor needs no
/// second look at the state).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePush {
    pub endpoint: String,
    pub doc: NodeDesired,
}

/// An instance no node could take, with every node's reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapacityFailure {
    pub instance: InstanceId,
    pub rejections: Vec<Rejection<NodeId>>,
}

/// What applying a new zone document decided; the executor reports and pushes it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    pub generation: u64,
    /// Instances newly placed by this plan.
    pub placed: Vec<(InstanceId, NodeId)>,
    /// Instances assigned to the node the CLC's hint named (after a CC restart).
    pub adopted: Vec<(InstanceId, NodeId)>,
    /// Instances that fit on no node; each also has a TERMINATED report in `reports`.
    pub capacity_failures: Vec<CapacityFailure>,
    /// Reports the CC makes itself (capacity failures, instances terminated before placement),
    /// to forward to the CLC.
    pub reports: Vec<InstanceReport>,
    /// One document for every registered node, including nodes left with nothing to run
    /// (they must learn that their instances went away).
    pub pushes: Vec<NodePush>,
}

/// The outcome of offering a zone document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// A newer generation, now applied.
    Applied(Plan),
    /// The generation already applied: nothing changes (documents may be repeated).
    Unchanged { applied: u64 },
    /// An older generation than the one applied: refused.
    Stale { applied: u64 },
}

/// What a node registration changed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Registered {
    /// The instances the node said it runs, with the node filled in, to forward upward.
    pub reports: Vec<InstanceReport>,
    /// The node's document, when the CLC has sent one yet (never push an empty document
    /// before that: it would tell a node that outlived a CC restart to destroy everything).
    pub push: Option<NodePush>,
}

/// Where to reach the node an instance lives on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeTarget {
    pub node: NodeId,
    pub endpoint: String,
}

#[derive(Debug, Clone)]
struct NodeEntry {
    endpoint: String,
    capacity: Resources,
    hypervisor: String,
    hypervisor_detail: String,
    last_seen: Moment,
    /// The newest generation the node is known to hold (from push replies and heartbeats);
    /// below the applied one means the resync loop pushes again.
    generation: u64,
}

#[derive(Debug, Clone)]
struct Assignment {
    node: NodeId,
    /// From the instance's spec; zero for instances a node reported that the CLC has not
    /// (yet) described — registrations carry no sizes.
    resources: Resources,
    /// Its private address in the zone's subnet (see [`ZoneState::address`]).
    private_ip: Option<Ipv4Addr>,
}

#[derive(Debug, Clone)]
struct Desired {
    generation: u64,
    specs: BTreeMap<InstanceId, InstanceSpec>,
    deleted_volumes: Vec<canopy_common::VolumeId>,
    snapshots: Vec<canopy_common::SnapshotRequest>,
}

/// Everything the cluster controller knows about its zone.
#[derive(Debug, Clone)]
pub struct ZoneState {
    zone: ZoneName,
    node_timeout: Duration,
    /// The last document applied; `None` until the CLC sends one (e.g. after a restart).
    desired: Option<Desired>,
    nodes: BTreeMap<NodeId, NodeEntry>,
    /// Which node holds each instance. An assignment is only dropped when the instance is
    /// gone for good (terminated and no longer desired, or vanished from its node): the
    /// instance's disks live on that node, so it is never moved, not even off a node that
    /// stopped answering.
    assignments: BTreeMap<InstanceId, Assignment>,
    /// The last report per instance, re-sent in full to the CLC periodically.
    reports: BTreeMap<InstanceId, InstanceReport>,
    /// Where instances' private addresses come from.
    subnet: Ipv4Subnet,
    /// The addresses the assignments hold.
    used_ips: BTreeSet<Ipv4Addr>,
    /// The address handed out last: the next search starts after it.
    last_ip: Option<Ipv4Addr>,
}

impl ZoneState {
    /// An empty zone. `node_timeout` is how long a node may stay silent and still be healthy.
    pub fn new(zone: ZoneName, node_timeout: Duration, subnet: Ipv4Subnet) -> Self {
        Self {
            zone,
            node_timeout,
            desired: None,
            nodes: BTreeMap::new(),
            assignments: BTreeMap::new(),
            reports: BTreeMap::new(),
            subnet,
            used_ips: BTreeSet::new(),
            last_ip: None,
        }
    }

    /// Records that `instance` lives on `node` (keeping the address it has), and gives it
    /// a private address if it has none: the one the CLC remembers for it when that is
    /// still free and in the subnet, else the next free one. `None` when the subnet is full.
    fn assign(
        &mut self,
        instance: &InstanceId,
        node: NodeId,
        resources: Resources,
        hint: Option<Ipv4Addr>,
    ) -> Option<Ipv4Addr> {
        let kept = self.assignments.get(instance).and_then(|a| a.private_ip);
        let private_ip = kept.or_else(|| {
            let ip = hint
                .filter(|ip| self.subnet.is_assignable(*ip) && !self.used_ips.contains(ip))
                .or_else(|| self.subnet.next_free(&self.used_ips, self.last_ip))?;
            self.used_ips.insert(ip);
            self.last_ip = Some(ip);
            Some(ip)
        });
        self.assignments.insert(
            instance.clone(),
            Assignment {
                node,
                resources,
                private_ip,
            },
        );
        private_ip
    }

    /// Records (and returns, for the CLC) that `spec` could not be placed: terminated with
    /// `Server.InsufficientInstanceCapacity`. Final: it is not tried again.
    fn refuse_for_capacity(&mut self, spec: &InstanceSpec, message: String) -> InstanceReport {
        let report = InstanceReport {
            instance: spec.id.clone(),
            node: None,
            state: InstanceState::Terminated,
            reason: Some(StateReason {
                code: INSUFFICIENT_CAPACITY.into(),
                message,
            }),
            reboot_seq: spec.reboot_seq,
            private_ip: None,
            volumes: vec![],
        };
        self.reports.insert(spec.id.clone(), report.clone());
        report
    }

    /// Forgets an assignment and frees its address.
    fn unassign(&mut self, instance: &InstanceId) {
        if let Some(ip) = self.assignments.remove(instance).and_then(|a| a.private_ip) {
            self.used_ips.remove(&ip);
        }
    }

    /// The private address the CLC's spec remembers for `instance`.
    fn address_hint(&self, instance: &InstanceId) -> Option<Ipv4Addr> {
        self.desired
            .as_ref()
            .and_then(|d| d.specs.get(instance))
            .and_then(|s| s.private_ip)
    }

    /// The instance's private address, if it has one.
    pub fn address(&self, instance: &InstanceId) -> Option<Ipv4Addr> {
        self.assignments.get(instance).and_then(|a| a.private_ip)
    }

    /// The zone this state describes.
    pub fn zone(&self) -> &ZoneName {
        &self.zone
    }

    /// The generation of the last document applied; 0 if none.
    pub fn applied_generation(&self) -> u64 {
        self.desired.as_ref().map_or(0, |d| d.generation)
    }

    /// The node an instance is assigned to, if any.
    pub fn assignment(&self, instance: &InstanceId) -> Option<&NodeId> {
        self.assignments.get(instance).map(|a| &a.node)
    }

    /// Applies a zone document: refuses older generations, keeps existing assignments,
    /// adopts the CLC's node hints, places the rest, and returns what to report and push.
    pub fn apply_desired(&mut self, doc: ZoneDesired, now: Moment) -> ApplyOutcome {
        if let Some(cur) = &self.desired {
            if doc.generation < cur.generation {
                return ApplyOutcome::Stale {
                    applied: cur.generation,
                };
            }
            if doc.generation == cur.generation {
                return ApplyOutcome::Unchanged {
                    applied: cur.generation,
                };
            }
        }
        let mut plan = Plan {
            generation: doc.generation,
            ..Plan::default()
        };
        let mut to_place: Vec<&InstanceSpec> = Vec::new();
        for spec in &doc.instances {
            if let Some(a) = self.assignments.get_mut(&spec.id) {
                // Memory wins over the hint: it comes from the nodes themselves, the hint from
                // what we reported earlier. The spec is the authority on size.
                a.resources = spec.resources;
                continue;
            }
            if let Some(hint) = &spec.node {
                if self.nodes.contains_key(hint) {
                    self.assign(&spec.id, hint.clone(), spec.resources, spec.private_ip);
                    plan.adopted.push((spec.id.clone(), hint.clone()));
                }
                // A hint naming a node that has not registered (yet) means the instance lives
                // there: it waits for that node rather than being placed a second time.
                continue;
            }
            if self.is_terminated(&spec.id) {
                // Terminated is final; an instance that failed placement is not retried.
                continue;
            }
            if spec.desired == PowerState::Terminated {
                let report = InstanceReport {
                    instance: spec.id.clone(),
                    node: None,
                    state: InstanceState::Terminated,
                    reason: Some(StateReason {
                        code: USER_INITIATED_SHUTDOWN.into(),
                        message: "terminated before it was placed on a node".into(),
                    }),
                    reboot_seq: spec.reboot_seq,
                    private_ip: None,
                    volumes: vec![],
                };
                self.reports.insert(spec.id.clone(), report.clone());
                plan.reports.push(report);
                continue;
            }
            to_place.push(spec);
        }

        let mut hosts = self.host_snapshots(now);
        let needs: Vec<Resources> = to_place.iter().map(|s| s.resources).collect();
        for (spec, placement) in to_place.iter().zip(place_all(&mut hosts, &needs)) {
            match placement {
                Placement::Placed(node) => {
                    if self
                        .assign(&spec.id, node.clone(), spec.resources, spec.private_ip)
                        .is_some()
                    {
                        plan.placed.push((spec.id.clone(), node));
                        continue;
                    }
                    // Room on a node, but no address left in the subnet.
                    self.unassign(&spec.id);
                    let message = format!(
                        "Insufficient capacity: no free address left in the zone's subnet {}",
                        self.subnet
                    );
                    plan.reports.push(self.refuse_for_capacity(spec, message));
                }
                Placement::NoCapacity(rejections) => {
                    let message = self.capacity_message(spec, &rejections);
                    plan.reports.push(self.refuse_for_capacity(spec, message));
                    plan.capacity_failures.push(CapacityFailure {
                        instance: spec.id.clone(),
                        rejections,
                    });
                }
            }
        }

        let specs: BTreeMap<InstanceId, InstanceSpec> = doc
            .instances
            .into_iter()
            .map(|s| (s.id.clone(), s))
            .collect();
        self.desired = Some(Desired {
            generation: doc.generation,
            specs,
            deleted_volumes: doc.deleted_volumes,
            snapshots: doc.snapshots,
        });
        self.forget_finished();
        plan.pushes = self.nodes.keys().filter_map(|n| self.push_for(n)).collect();
        ApplyOutcome::Applied(plan)
    }

    /// Records a node (or its re-registration, which replaces endpoint, capacity and
    /// hypervisor). The instances it runs become its assignments.
    pub fn register_node(&mut self, reg: NodeRegistration, now: Moment) -> Registered {
        let node = reg.node.clone();
        self.nodes.insert(
            node.clone(),
            NodeEntry {
                endpoint: reg.endpoint,
                capacity: reg.capacity,
                hypervisor: reg.hypervisor,
                hypervisor_detail: reg.hypervisor_detail,
                last_seen: now,
                // Whatever it held before, a (re)registering node may have restarted empty.
                generation: 0,
            },
        );
        let reported: BTreeSet<InstanceId> =
            reg.instances.iter().map(|r| r.instance.clone()).collect();
        // Instances that were here, that the node no longer runs and nobody wants, are gone.
        let desired = self.desired.as_ref();
        let gone: Vec<InstanceId> = self
            .assignments
            .iter()
            .filter(|(id, a)| {
                a.node == node
                    && !reported.contains(*id)
                    && !desired.is_some_and(|d| d.specs.contains_key(*id))
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in &gone {
            self.unassign(id);
        }
        let reports = self.record_reports(&node, reg.instances);
        // Instances the CLC placed on this node before we (re)started wait for it; adopt them.
        let waiting: Vec<(InstanceId, Resources, Option<Ipv4Addr>)> = self
            .desired
            .iter()
            .flat_map(|d| d.specs.values())
            .filter(|s| s.node.as_ref() == Some(&node) && !self.assignments.contains_key(&s.id))
            .map(|s| (s.id.clone(), s.resources, s.private_ip))
            .collect();
        for (id, resources, hint) in waiting {
            self.assign(&id, node.clone(), resources, hint);
        }
        Registered {
            reports,
            push: self.push_for(&node),
        }
    }

    /// A node's heartbeat. Returns false for a node we do not know, so it registers again.
    pub fn heartbeat(&mut self, node: &NodeId, applied_generation: u64, now: Moment) -> bool {
        match self.nodes.get_mut(node) {
            Some(entry) => {
                entry.last_seen = now;
                // The node's own word, even when lower than a push reply: lower means it lost
                // state (restarted) and needs the document again.
                entry.generation = applied_generation;
                true
            }
            None => false,
        }
    }

    /// Records reports from a node; returns them with the node filled in, to forward upward.
    /// An instance reported TERMINATED frees its allocation.
    pub fn observe(
        &mut self,
        node: &NodeId,
        reports: Vec<InstanceReport>,
        now: Moment,
    ) -> Result<Vec<InstanceReport>, CcError> {
        let entry = self
            .nodes
            .get_mut(node)
            .ok_or_else(|| CcError::UnknownNode(node.clone()))?;
        entry.last_seen = now;
        let out = self.record_reports(node, reports);
        self.forget_finished();
        Ok(out)
    }

    /// A node acknowledged a document; `generation` is what it now holds.
    pub fn push_acked(&mut self, node: &NodeId, generation: u64) {
        if let Some(entry) = self.nodes.get_mut(node) {
            // Replies to concurrent pushes may arrive out of order; keep the newest.
            entry.generation = entry.generation.max(generation);
        }
    }

    /// Documents for every node that is not known to hold the applied generation (its push
    /// failed, or its heartbeat says it is behind).
    pub fn resync_pushes(&self) -> Vec<NodePush> {
        let applied = self.applied_generation();
        self.nodes
            .iter()
            .filter(|(_, e)| e.generation < applied)
            .filter_map(|(n, _)| self.push_for(n))
            .collect()
    }

    /// One summary per registered node, for the zone heartbeat.
    pub fn summaries(&self, now: Moment) -> Vec<NodeSummary> {
        self.nodes
            .iter()
            .map(|(node, e)| NodeSummary {
                node: node.clone(),
                hypervisor: e.hypervisor.clone(),
                hypervisor_detail: e.hypervisor_detail.clone(),
                capacity: e.capacity,
                allocated: self.allocated(node),
                healthy: self.is_healthy(e, now),
                last_heartbeat_unix_ms: e.last_seen.unix_ms,
                instance_count: u32::try_from(self.live_on(node).count()).unwrap_or(u32::MAX),
            })
            .collect()
    }

    /// The nodes that have been silent longer than the node timeout.
    pub fn unhealthy_nodes(&self, now: Moment) -> BTreeSet<NodeId> {
        self.nodes
            .iter()
            .filter(|(_, e)| !self.is_healthy(e, now))
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// The last report of every instance, for the periodic full re-report.
    pub fn all_reports(&self) -> Vec<InstanceReport> {
        self.reports.values().cloned().collect()
    }

    /// Where to ask for an instance's console.
    pub fn console_target(&self, instance: &InstanceId) -> Result<NodeTarget, CcError> {
        let a = self
            .assignments
            .get(instance)
            .ok_or_else(|| CcError::InstanceNotFound(instance.clone()))?;
        let entry = self
            .nodes
            .get(&a.node)
            .ok_or_else(|| CcError::InstanceNotFound(instance.clone()))?;
        Ok(NodeTarget {
            node: a.node.clone(),
            endpoint: entry.endpoint.clone(),
        })
    }

    fn is_healthy(&self, entry: &NodeEntry, now: Moment) -> bool {
        now.mono.saturating_duration_since(entry.last_seen.mono) <= self.node_timeout
    }

    fn is_terminated(&self, instance: &InstanceId) -> bool {
        self.reports
            .get(instance)
            .is_some_and(|r| r.state == InstanceState::Terminated)
    }

    /// The instances assigned to `node` that still hold resources there.
    fn live_on<'a>(
        &'a self,
        node: &'a NodeId,
    ) -> impl Iterator<Item = (&'a InstanceId, &'a Assignment)> + 'a {
        self.assignments
            .iter()
            .filter(move |(id, a)| &a.node == node && !self.is_terminated(id))
    }

    fn allocated(&self, node: &NodeId) -> Resources {
        self.live_on(node).map(|(_, a)| a.resources).sum()
    }

    /// Every registered node as placement sees it, unhealthy ones included so that the
    /// "no capacity" message can say why they were passed over.
    fn host_snapshots(&self, now: Moment) -> Vec<HostSnapshot<NodeId>> {
        self.nodes
            .iter()
            .map(|(node, e)| HostSnapshot {
                key: node.clone(),
                capacity: e.capacity,
                allocated: self.allocated(node),
                healthy: self.is_healthy(e, now),
            })
            .collect()
    }

    fn capacity_message(&self, spec: &InstanceSpec, rejections: &[Rejection<NodeId>]) -> String {
        let need = spec.resources;
        let head = format!(
            "no node in zone {} can take {} ({} vCPUs, {} MiB memory, {} GiB disk)",
            self.zone, spec.id, need.vcpus, need.memory_mib, need.disk_gib
        );
        if rejections.is_empty() {
            return format!("{head}: no nodes are registered");
        }
        let why: Vec<String> = rejections
            .iter()
            .map(|r| format!("{}: {}", r.key, r.reason))
            .collect();
        format!("{head}: {}", why.join("; "))
    }

    /// Records reports as coming from `node` and keeps assignments in line with them: the
    /// node that reports an instance running is where it lives.
    fn record_reports(
        &mut self,
        node: &NodeId,
        reports: Vec<InstanceReport>,
    ) -> Vec<InstanceReport> {
        let mut out = Vec::with_capacity(reports.len());
        for mut report in reports {
            report.node = Some(node.clone());
            let id = report.instance.clone();
            if report.state != InstanceState::Terminated {
                let resources = self
                    .desired
                    .as_ref()
                    .and_then(|d| d.specs.get(&id))
                    .map(|s| s.resources)
                    .or_else(|| self.assignments.get(&id).map(|a| a.resources))
                    .unwrap_or(Resources::ZERO);
                if let Some(prev) = self.assignments.get(&id).filter(|a| &a.node != node) {
                    tracing::warn!(instance = %id, from = %prev.node, to = %node, "instance reported by another node; following the node");
                }
                let hint = self.address_hint(&id);
                self.assign(&id, node.clone(), resources, hint);
            }
            report.private_ip = self.address(&id);
            self.reports.insert(id, report.clone());
            out.push(report);
        }
        out
    }

    /// Drops what no longer matters: instances terminated and no longer desired. Only once a
    /// document has arrived; before that we cannot tell what the CLC still wants to hear of.
    fn forget_finished(&mut self) {
        let Some(d) = &self.desired else { return };
        let reports = &self.reports;
        let gone = |id: &InstanceId| {
            !d.specs.contains_key(id)
                && reports
                    .get(id)
                    .is_some_and(|r| r.state == InstanceState::Terminated)
        };
        let finished: Vec<InstanceId> = reports.keys().filter(|id| gone(id)).cloned().collect();
        for id in finished {
            self.reports.remove(&id);
            self.unassign(&id);
        }
    }

    /// The document for `node`: the desired instances assigned to it. `None` before the first
    /// zone document, or for an unknown node.
    fn push_for(&self, node: &NodeId) -> Option<NodePush> {
        let d = self.desired.as_ref()?;
        let entry = self.nodes.get(node)?;
        let instances = d
            .specs
            .values()
            .filter_map(|s| {
                let a = self.assignments.get(&s.id).filter(|a| &a.node == node)?;
                Some(InstanceSpec {
                    node: Some(node.clone()),
                    private_ip: a.private_ip,
                    ..s.clone()
                })
            })
            .collect();
        Some(NodePush {
            endpoint: entry.endpoint.clone(),
            doc: NodeDesired {
                node: node.clone(),
                generation: d.generation,
                instances,
                deleted_volumes: d.deleted_volumes.clone(),
                snapshots: d.snapshots.clone(),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(10);

    fn node(name: &str) -> NodeId {
        NodeId::parse(name).expect("node id")
    }

    fn iid(n: u64) -> InstanceId {
        InstanceId::parse(&format!("i-{n:017x}")).expect("instance id")
    }

    fn spec(n: u64, memory_mib: u64) -> InstanceSpec {
        InstanceSpec {
            id: iid(n),
            instance_type: "test".into(),
            resources: Resources::new(1, memory_mib, 10),
            image: None,
            user_data: Vec::new(),
            key_name: None,
            desired: PowerState::Running,
            reboot_seq: 0,
            start_seq: 0,
            private_ip: None,
            metadata: Default::default(),
            node: None,
            boot: Default::default(),
            volumes: Vec::new(),
        }
    }

    fn doc(generation: u64, instances: Vec<InstanceSpec>) -> ZoneDesired {
        ZoneDesired {
            zone: ZoneName::parse("z-1").expect("zone"),
            generation,
            instances,
            deleted_volumes: Vec::new(),
            snapshots: Vec::new(),
        }
    }

    fn registration(
        name: &str,
        memory_mib: u64,
        instances: Vec<InstanceReport>,
    ) -> NodeRegistration {
        NodeRegistration {
            node: node(name),
            endpoint: format!("http://{name}:1"),
            capacity: Resources::new(8, memory_mib, 1000),
            hypervisor: "sim".into(),
            hypervisor_detail: String::new(),
            instances,
        }
    }

    fn report(n: u64, state: InstanceState) -> InstanceReport {
        InstanceReport {
            instance: iid(n),
            node: None,
            state,
            reason: None,
            reboot_seq: 0,
            private_ip: None,
            volumes: Vec::new(),
        }
    }

    /// A zone with the given nodes (name, memory), all heartbeating at `now`.
    fn zone_with(nodes: &[(&str, u64)], now: Moment) -> ZoneState {
        let mut z = ZoneState::new(
            ZoneName::parse("z-1").expect("zone"),
            TIMEOUT,
            Ipv4Subnet::parse("10.9.0.0/28").expect("subnet"),
        );
        for (name, mem) in nodes {
            z.register_node(registration(name, *mem, Vec::new()), now);
        }
        z
    }

    fn applied(outcome: ApplyOutcome) -> Plan {
        match outcome {
            ApplyOutcome::Applied(plan) => plan,
            other => panic!("not applied: {other:?}"),
        }
    }

    fn push_for<'a>(plan: &'a Plan, name: &str) -> &'a NodeDesired {
        &plan
            .pushes
            .iter()
            .find(|p| p.doc.node.as_str() == name)
            .expect("push for node")
            .doc
    }

    fn allocated(z: &ZoneState, name: &str, now: Moment) -> Resources {
        z.summaries(now)
            .into_iter()
            .find(|s| s.node.as_str() == name)
            .expect("summary")
            .allocated
    }

    #[test]
    fn placement_spreads_by_free_memory_and_pushes_each_node_its_share() {
        let now = Moment::now();
        let mut z = zone_with(&[("a", 4096), ("b", 8192)], now);
        let plan = applied(z.apply_desired(
            doc(1, vec![spec(1, 2048), spec(2, 2048), spec(3, 2048)]),
            now,
        ));
        assert_eq!(
            plan.placed,
            vec![
                (iid(1), node("b")),
                (iid(2), node("b")),
                (iid(3), node("a"))
            ]
        );
        assert_eq!(plan.pushes.len(), 2);
        let b = push_for(&plan, "b");
        assert_eq!(b.generation, 1);
        assert_eq!(
            b.instances.iter().map(|s| s.id.clone()).collect::<Vec<_>>(),
            vec![iid(1), iid(2)]
        );
        assert!(
            b.instances.iter().all(|s| s.node == Some(node("b"))),
            "node docs name their node"
        );
        assert_eq!(push_for(&plan, "a").instances.len(), 1);
        assert_eq!(allocated(&z, "b", now), Resources::new(2, 4096, 20));
    }

    #[test]
    fn volumes_go_to_the_instances_node_and_deleted_ones_to_every_node() {
        let now = Moment::now();
        let mut z = zone_with(&[("a", 4096), ("b", 4096)], now);
        let vol = |n: u64| canopy_common::VolumeId::parse(&format!("vol-{n:017x}")).expect("id");
        let mut with_volume = spec(1, 2048);
        with_volume.volumes = vec![canopy_common::VolumeAttachment {
            volume_id: vol(1),
            device: "/dev/sdf".into(),
            size_gib: 8,
            initialized: false,
            source: None,
        }];
        let mut d = doc(1, vec![with_volume.clone(), spec(2, 2048)]);
        d.deleted_volumes = vec![vol(2)];
        let snap = canopy_common::SnapshotRequest {
            snapshot_id: canopy_common::SnapshotId::parse("snap-0123456789abcdef0").unwrap(),
            source: canopy_common::SnapshotSource::Volume(vol(2)),
        };
        d.snapshots = vec![snap.clone()];
        let plan = applied(z.apply_desired(d, now));
        let holder = &plan
            .placed
            .iter()
            .find(|(i, _)| *i == iid(1))
            .expect("placed")
            .1;
        let doc_of_holder = push_for(&plan, holder.as_str());
        let sent = doc_of_holder
            .instances
            .iter()
            .find(|s| s.id == iid(1))
            .expect("instance in its node's document");
        assert_eq!(sent.volumes, with_volume.volumes);
        for name in ["a", "b"] {
            assert_eq!(push_for(&plan, name).deleted_volumes, vec![vol(2)]);
            assert_eq!(push_for(&plan, name).snapshots, vec![snap.clone()]);
        }
    }

    #[test]
    fn instances_get_unique_addresses_kept_across_a_cc_restart_until_the_subnet_is_full() {
        let now = Moment::now();
        let ip = |n: u8| std::net::Ipv4Addr::new(10, 9, 0, n);
        let mut z = zone_with(&[("a", 1 << 20), ("b", 1 << 20)], now);
        let plan = applied(z.apply_desired(doc(1, (1..=3).map(|n| spec(n, 1)).collect()), now));
        let given: Vec<_> = (1..=3).map(|n| z.address(&iid(n))).collect();
        // The subnet's first hosts are the router's and reserved, as on AWS.
        assert_eq!(given, vec![Some(ip(4)), Some(ip(5)), Some(ip(6))]);
        // Each node's document carries its instances' addresses.
        for push in &plan.pushes {
            assert!(
                push.doc
                    .instances
                    .iter()
                    .all(|s| s.private_ip == z.address(&s.id))
            );
        }
        // Reports go up with the address.
        let placed_on = z.assignment(&iid(2)).cloned().expect("placed");
        let fwd = z
            .observe(&placed_on, vec![report(2, InstanceState::Running)], now)
            .expect("known node");
        assert_eq!(fwd[0].private_ip, Some(ip(5)));

        // A restarted CC gets the CLC's hints (node and address) and keeps both, whatever
        // order they come in.
        let mut restarted = zone_with(&[("a", 1 << 20), ("b", 1 << 20)], now);
        let hinted: Vec<InstanceSpec> = (1..=3u64)
            .rev()
            .map(|n| InstanceSpec {
                node: z.assignment(&iid(n)).cloned(),
                private_ip: z.address(&iid(n)),
                ..spec(n, 1)
            })
            .collect();
        applied(restarted.apply_desired(doc(7, hinted), now));
        for n in 1..=3 {
            assert_eq!(
                restarted.address(&iid(n)),
                z.address(&iid(n)),
                "instance {n}"
            );
        }

        // A /28 has 11 addresses: 3 taken, 8 more placed, the ninth refused for want of one.
        let plan = applied(z.apply_desired(doc(2, (1..=12).map(|n| spec(n, 1)).collect()), now));
        assert_eq!(plan.placed.len(), 8);
        let refused: Vec<&InstanceReport> = plan
            .reports
            .iter()
            .filter(|r| r.state == InstanceState::Terminated)
            .collect();
        assert_eq!(refused.len(), 1);
        let why = &refused[0].reason.as_ref().expect("a reason").message;
        assert!(why.contains("no free address"), "{why}");
        let addresses: BTreeSet<_> = (1..=12).filter_map(|n| z.address(&iid(n))).collect();
        assert_eq!(addresses.len(), 11, "unique");

        // A terminated instance the CLC no longer lists frees its address for the next.
        let freed = z.address(&iid(1)).expect("has one");
        z.observe(
            &z.assignment(&iid(1)).cloned().expect("placed"),
            vec![report(1, InstanceState::Terminated)],
            now,
        )
        .expect("known node");
        applied(z.apply_desired(doc(3, (2..=11).map(|n| spec(n, 1)).collect()), now));
        assert_eq!(z.address(&iid(1)), None);
        applied(z.apply_desired(doc(4, (2..=12).map(|n| spec(n, 1)).collect()), now));
        assert_eq!(z.address(&iid(12)), Some(freed));
    }

    #[test]
    fn existing_assignments_count_against_capacity_and_are_kept() {
        let now = Moment::now();
        let mut z = zone_with(&[("a", 4096), ("b", 4096)], now);
        applied(z.apply_desired(doc(1, vec![spec(1, 3072)]), now));
        let first = z.assignment(&iid(1)).cloned().expect("placed");
        // The next generation keeps instance 1 where it is and must route the newcomer
        // around it.
        let plan = applied(z.apply_desired(doc(2, vec![spec(1, 3072), spec(2, 3072)]), now));
        assert_eq!(z.assignment(&iid(1)), Some(&first));
        assert_eq!(plan.placed.len(), 1);
        assert_ne!(plan.placed[0].1, first);
        // Both nodes now hold 3 GiB; a third 3 GiB instance fits nowhere.
        let plan = applied(z.apply_desired(
            doc(3, vec![spec(1, 3072), spec(2, 3072), spec(3, 3072)]),
            now,
        ));
        assert!(plan.placed.is_empty());
        assert_eq!(plan.capacity_failures.len(), 1);
    }

    #[test]
    fn node_hints_are_honoured_even_beyond_capacity_and_wait_for_their_node() {
        let now = Moment::now();
        let mut z = zone_with(&[("a", 1024), ("b", 8192)], now);
        // Instance 1 already lives on `a` (as a restarted CC learns from the CLC): it stays
        // there although `b` has more room and `a` is too small on paper.
        let on_a = InstanceSpec {
            node: Some(node("a")),
            ..spec(1, 2048)
        };
        // Instance 2 lives on `c`, which has not re-registered yet: it must not be placed again.
        let on_c = InstanceSpec {
            node: Some(node("c")),
            ..spec(2, 1024)
        };
        let plan = applied(z.apply_desired(doc(1, vec![on_a, on_c]), now));
        assert_eq!(plan.adopted, vec![(iid(1), node("a"))]);
        assert!(plan.placed.is_empty() && plan.reports.is_empty());
        assert_eq!(z.assignment(&iid(2)), None);
        // When `c` registers, the instance is adopted and `c` is told about it at once.
        let registered = z.register_node(registration("c", 4096, Vec::new()), now);
        assert_eq!(z.assignment(&iid(2)), Some(&node("c")));
        let push = registered
            .push
            .expect("a document exists, so the node gets it");
        assert_eq!(push.doc.instances.len(), 1);
        assert_eq!(push.doc.instances[0].id, iid(2));
    }

    #[test]
    fn capacity_failure_is_reported_terminated_with_every_reason_and_not_retried() {
        let now = Moment::now();
        let mut z = zone_with(&[("big", 16384), ("small", 1024)], now);
        // `big` goes silent past the timeout; `small` keeps heartbeating.
        let later = now.after(TIMEOUT * 2);
        assert!(z.heartbeat(&node("small"), 0, later));
        let plan = applied(z.apply_desired(doc(1, vec![spec(1, 4096)]), later));
        assert!(plan.placed.is_empty());
        let failure = &plan.capacity_failures[0];
        assert_eq!(failure.rejections.len(), 2);
        let report = &plan.reports[0];
        assert_eq!(report.state, InstanceState::Terminated);
        assert_eq!(report.node, None);
        let reason = report.reason.as_ref().expect("reason");
        assert_eq!(reason.code, INSUFFICIENT_CAPACITY);
        assert!(
            reason.message.contains("big: host is not healthy"),
            "{}",
            reason.message
        );
        assert!(
            reason.message.contains("small: not enough memory"),
            "{}",
            reason.message
        );
        assert!(
            z.all_reports().contains(report),
            "re-reported on every resync"
        );
        // Terminated is final: the next generation does not try again even though `big` is back.
        z.heartbeat(&node("big"), 0, later);
        let plan = applied(z.apply_desired(doc(2, vec![spec(1, 4096)]), later));
        assert!(plan.placed.is_empty() && plan.reports.is_empty());
    }

    #[test]
    fn no_nodes_means_a_capacity_failure_that_says_so() {
        let now = Moment::now();
        let mut z = zone_with(&[], now);
        let plan = applied(z.apply_desired(doc(1, vec![spec(1, 512)]), now));
        let reason = plan.reports[0].reason.as_ref().expect("reason");
        assert!(
            reason.message.ends_with("no nodes are registered"),
            "{}",
            reason.message
        );
    }

    #[test]
    fn stale_generations_are_refused_and_equal_ones_change_nothing() {
        let now = Moment::now();
        let mut z = zone_with(&[("a", 4096)], now);
        applied(z.apply_desired(doc(5, vec![spec(1, 512)]), now));
        assert_eq!(
            z.apply_desired(doc(4, Vec::new()), now),
            ApplyOutcome::Stale { applied: 5 }
        );
        assert_eq!(
            z.apply_desired(doc(5, Vec::new()), now),
            ApplyOutcome::Unchanged { applied: 5 }
        );
        assert_eq!(z.applied_generation(), 5);
        assert_eq!(
            z.assignment(&iid(1)),
            Some(&node("a")),
            "the refused documents changed nothing"
        );
    }

    #[test]
    fn a_terminated_report_frees_the_allocation() {
        let now = Moment::now();
        let mut z = zone_with(&[("a", 4096)], now);
        applied(z.apply_desired(doc(1, vec![spec(1, 4096)]), now));
        assert_eq!(allocated(&z, "a", now).memory_mib, 4096);
        let fwd = z
            .observe(&node("a"), vec![report(1, InstanceState::Terminated)], now)
            .expect("known node");
        assert_eq!(
            fwd[0].node,
            Some(node("a")),
            "forwarded with the node filled in"
        );
        assert_eq!(allocated(&z, "a", now), Resources::ZERO);
        let summary = &z.summaries(now)[0];
        assert_eq!(summary.instance_count, 0);
        // The room is usable again.
        let terminated = InstanceSpec {
            desired: PowerState::Terminated,
            ..spec(1, 4096)
        };
        let plan = applied(z.apply_desired(doc(2, vec![terminated, spec(2, 4096)]), now));
        assert_eq!(plan.placed, vec![(iid(2), node("a"))]);
        // Once the CLC drops it from the document, the terminated instance is forgotten.
        applied(z.apply_desired(doc(3, vec![spec(2, 4096)]), now));
        assert!(z.all_reports().iter().all(|r| r.instance != iid(1)));
        assert_eq!(z.assignment(&iid(1)), None);
    }

    #[test]
    fn an_unhealthy_node_gets_nothing_new_but_keeps_its_instances() {
        let now = Moment::now();
        let mut z = zone_with(&[("a", 8192), ("b", 4096)], now);
        applied(z.apply_desired(doc(1, vec![spec(1, 1024)]), now));
        assert_eq!(z.assignment(&iid(1)), Some(&node("a")));
        let later = now.after(TIMEOUT + Duration::from_secs(1));
        z.heartbeat(&node("b"), 1, later);
        assert_eq!(z.unhealthy_nodes(later), BTreeSet::from([node("a")]));
        let plan = applied(z.apply_desired(
            doc(2, vec![spec(1, 1024), spec(2, 1024), spec(3, 1024)]),
            later,
        ));
        assert!(
            plan.placed.iter().all(|(_, n)| n == &node("b")),
            "{:?}",
            plan.placed
        );
        assert_eq!(
            z.assignment(&iid(1)),
            Some(&node("a")),
            "disks live there: never re-placed"
        );
        let summaries = z.summaries(later);
        assert!(!summaries[0].healthy && summaries[1].healthy);
        assert_eq!(summaries[0].last_heartbeat_unix_ms, now.unix_ms);
    }

    #[test]
    fn an_unplaced_instance_desired_terminated_is_reported_terminated_directly() {
        let now = Moment::now();
        let mut z = zone_with(&[("a", 8192)], now);
        let gone = InstanceSpec {
            desired: PowerState::Terminated,
            ..spec(1, 1024)
        };
        let plan = applied(z.apply_desired(doc(1, vec![gone]), now));
        assert!(plan.placed.is_empty());
        assert_eq!(plan.reports[0].state, InstanceState::Terminated);
        assert_eq!(
            plan.reports[0].reason.as_ref().map(|r| r.code.as_str()),
            Some(crate::model::USER_INITIATED_SHUTDOWN)
        );
        assert!(push_for(&plan, "a").instances.is_empty());
    }

    #[test]
    fn registration_before_any_document_pushes_nothing_and_adopts_running_instances() {
        let now = Moment::now();
        let mut z = zone_with(&[], now);
        // A node that outlived a CC restart: it must not be sent an empty document.
        let running = vec![
            report(1, InstanceState::Running),
            report(2, InstanceState::Terminated),
        ];
        let registered = z.register_node(registration("a", 4096, running), now);
        assert_eq!(registered.push, None);
        assert_eq!(registered.reports.len(), 2);
        assert!(registered.reports.iter().all(|r| r.node == Some(node("a"))));
        assert_eq!(z.assignment(&iid(1)), Some(&node("a")));
        assert_eq!(z.assignment(&iid(2)), None);
        // The CLC's document then keeps instance 1 there (from memory; no hint given) and
        // sizes it.
        let plan = applied(z.apply_desired(doc(1, vec![spec(1, 2048)]), now));
        assert!(plan.placed.is_empty());
        assert_eq!(push_for(&plan, "a").instances.len(), 1);
        assert_eq!(allocated(&z, "a", now).memory_mib, 2048);
    }

    #[test]
    fn re_registration_replaces_the_endpoint_and_keeps_desired_instances() {
        let now = Moment::now();
        let mut z = zone_with(&[("a", 4096)], now);
        applied(z.apply_desired(doc(1, vec![spec(1, 1024)]), now));
        let moved = NodeRegistration {
            endpoint: "http://elsewhere:2".into(),
            ..registration("a", 8192, Vec::new())
        };
        let registered = z.register_node(moved, now);
        let push = registered.push.expect("pushed at once");
        assert_eq!(push.endpoint, "http://elsewhere:2");
        assert_eq!(
            push.doc.instances.len(),
            1,
            "the node restarted empty; it is told to run it again"
        );
        assert_eq!(z.summaries(now)[0].capacity.memory_mib, 8192);
        assert_eq!(
            z.console_target(&iid(1)).expect("assigned").endpoint,
            "http://elsewhere:2"
        );
    }

    #[test]
    fn nodes_behind_the_applied_generation_are_re_pushed() {
        let now = Moment::now();
        let mut z = zone_with(&[("a", 4096), ("b", 4096)], now);
        assert!(
            z.resync_pushes().is_empty(),
            "nothing to push before the first document"
        );
        applied(z.apply_desired(doc(3, vec![spec(1, 1024)]), now));
        assert_eq!(z.resync_pushes().len(), 2, "no node has acknowledged yet");
        z.push_acked(&node("a"), 3);
        z.push_acked(&node("b"), 3);
        assert!(z.resync_pushes().is_empty());
        // `b` restarted and lost its document: its heartbeat says so.
        assert!(z.heartbeat(&node("b"), 0, now));
        let again = z.resync_pushes();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].doc.node, node("b"));
    }

    #[test]
    fn unknown_nodes_are_told_so() {
        let now = Moment::now();
        let mut z = zone_with(&[], now);
        assert!(!z.heartbeat(&node("ghost"), 0, now));
        let err = z
            .observe(&node("ghost"), vec![report(1, InstanceState::Running)], now)
            .expect_err("unknown");
        assert!(matches!(err, CcError::UnknownNode(_)));
        assert!(matches!(
            z.console_target(&iid(1)),
            Err(CcError::InstanceNotFound(_))
        ));
    }

    #[test]
    fn a_report_from_another_node_moves_the_assignment() {
        let now = Moment::now();
        let mut z = zone_with(&[("a", 4096), ("b", 2048)], now);
        applied(z.apply_desired(doc(1, vec![spec(1, 1024)]), now));
        assert_eq!(z.assignment(&iid(1)), Some(&node("a")));
        z.observe(&node("b"), vec![report(1, InstanceState::Running)], now)
            .expect("known");
        assert_eq!(z.assignment(&iid(1)), Some(&node("b")));
        assert_eq!(allocated(&z, "b", now).memory_mib, 1024);
        assert_eq!(allocated(&z, "a", now), Resources::ZERO);
    }
}
