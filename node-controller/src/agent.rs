//! The node agent: serves `NodeController`, keeps the node registered with its CC, and
//! runs the reconciler that converges the hypervisor on the desired state.
//!
//! Four tasks share one [`Agent`]:
//! * the gRPC server (`service.rs`), which stores desired-state documents and wakes the
//!   reconciler;
//! * the reconciler: one pass = list domains → [`plan`] → apply → publish reports. Woken
//!   by new documents, hypervisor events, stop deadlines and every `resync_interval`;
//! * the reporter: sends changed reports at once and the full set every
//!   `resync_interval`, which also retries whatever failed before;
//! * the session: registers with the CC (retrying with backoff), heartbeats, and
//!   registers again when the CC no longer knows the node.
//!
//! Nothing is persisted: after a restart the agent registers with what the hypervisor
//! runs, touches nothing until the CC sends a desired state, and adopts the `reboot_seq`
//! values of that first document as already applied.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use canopy_common::{InstanceId, NodeId, SnapshotId, SnapshotRequest, SnapshotSource, VolumeId};
use canopy_proto::v1 as pb;
use canopy_proto::v1::zone_agent_client::ZoneAgentClient;
use rand::Rng;
use tokio::net::TcpListener;
use tokio::sync::{Notify, broadcast, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, info, warn};

use crate::config::NcConfig;
use crate::convert;
use crate::error::{HypervisorError, NcError};
use crate::hypervisor::{DomainEvent, DomainSpec, DomainState, Hypervisor};
use crate::model::{
    DesiredInstance, DesiredState, InstanceReport, PutOutcome, StateReason, reason,
};
use crate::plan::{self, Action, Failure, InstanceMemory};

/// How long one call to the CC may take, connection included.
const RPC_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Registration backoff: starts small so a CC that comes up a moment later is found fast.
const REGISTER_BACKOFF_MIN: Duration = Duration::from_millis(100);
const REGISTER_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// The shortest pause between two reconcile passes.
const RECONCILE_GAP: Duration = Duration::from_millis(2);
/// The pause after a pass is at least this many times the pass's own duration, so passes
/// take at most a ninth of a core however many instances the node holds (the same bound as
/// the CLC's pushes): the agent shares its host with the guests. A pass is linear in the
/// node's instances (`plan::Beside`).
const RECONCILE_GAP_FACTOR: u32 = 8;
/// How long `NodeHandle::shutdown` waits for a task before aborting it.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// A snapshot uploaded is taken again if the document still asks for it this much later
/// (the upload's outcome was lost on its way to the CLC's log).
const SNAPSHOT_RECHECK: Duration = Duration::from_secs(60);
/// A snapshot whose upload failed is tried again after this.
const SNAPSHOT_RETRY: Duration = Duration::from_secs(5);
/// A snapshot of a volume this node does not hold is looked at again after this (the
/// volume may be being attached here).
const SNAPSHOT_NOT_HERE: Duration = Duration::from_secs(2);

/// The parts of a snapshot upload, as the client streams them.
type UploadParts =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = pb::SnapshotUpload> + Send + 'static>>;

/// A running node controller.
#[derive(Debug)]
pub struct NodeHandle {
    local_addr: SocketAddr,
    advertise: String,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl NodeHandle {
    /// The address the `NodeController` service is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The endpoint the node registered with the CC.
    pub fn advertised_endpoint(&self) -> &str {
        &self.advertise
    }

    /// Stops serving, reconciling, reporting and heartbeating. Domains keep running: a
    /// node controller restart must not touch workloads. (Dropping the handle stops the
    /// tasks too, without waiting for them.)
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for mut task in self.tasks {
            if tokio::time::timeout(SHUTDOWN_GRACE, &mut task)
                .await
                .is_err()
            {
                warn!("node controller task did not stop in time; aborting it");
                task.abort();
            }
        }
    }
}

/// Starts a node controller: binds the gRPC service, then registers with the CC in the
/// background (the CC may come up later), heartbeats, reconciles and reports.
pub async fn start(
    config: NcConfig,
    hypervisor: Arc<dyn Hypervisor>,
) -> Result<NodeHandle, NcError> {
    config.validate()?;
    let endpoint = Endpoint::from_shared(config.cc_endpoint.clone())
        .map_err(|e| NcError::Config(format!("cc_endpoint {:?}: {e}", config.cc_endpoint)))?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(RPC_TIMEOUT);
    let channel = config.transport.channel(endpoint, canopy_pki::Role::Zone);
    // Uploads of snapshots last as long as their bytes take: no overall deadline.
    let uploads = config.transport.channel(
        Endpoint::from_shared(config.cc_endpoint.clone())
            .map_err(|e| NcError::Config(format!("cc_endpoint {:?}: {e}", config.cc_endpoint)))?
            .connect_timeout(CONNECT_TIMEOUT),
        canopy_pki::Role::Zone,
    );
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| NcError::Bind {
            addr: config.listen,
            source,
        })?;
    let local_addr = listener.local_addr().map_err(|source| NcError::Bind {
        addr: config.listen,
        source,
    })?;
    let advertise = config
        .advertise
        .clone()
        .unwrap_or_else(|| format!("http://{local_addr}"));
    if config.advertise.is_none() && local_addr.ip().is_unspecified() {
        warn!(%advertise, "listening on a wildcard address without `advertise`: the CC cannot reach this endpoint");
    }

    // Subscribe before the first pass so that no event is lost between the two.
    let events = hypervisor.events();
    let agent = Arc::new(Agent::new(
        config.node_id.clone(),
        config.stop_timeout,
        hypervisor,
        ZoneAgentClient::new(uploads),
    ));
    let (shutdown, shutdown_rx) = watch::channel(false);

    let metadata = match config.metadata_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| NcError::Bind { addr, source })?,
        ),
        None => None,
    };
    let incoming = config
        .transport
        .incoming(listener, false)
        .map_err(|e| NcError::Config(format!("tls: {e}")))?;
    let server = crate::service::serve(
        Arc::clone(&agent),
        incoming,
        config.transport.authorize(&[canopy_pki::Role::Zone]),
        shutdown_rx.clone(),
    );
    let reconciler =
        Arc::clone(&agent).run_reconciler(config.resync_interval, events, shutdown_rx.clone());
    let reporter = Arc::clone(&agent).run_reporter(
        ZoneAgentClient::new(channel.clone()),
        config.resync_interval,
        shutdown_rx.clone(),
    );
    let session = Arc::clone(&agent).run_session(
        ZoneAgentClient::new(channel),
        advertise.clone(),
        config.heartbeat_interval,
        config.transport.revocations(),
        shutdown_rx,
    );
    let mut tasks = vec![
        tokio::spawn(server),
        tokio::spawn(reconciler),
        tokio::spawn(reporter),
    ];
    if let Some(listener) = metadata {
        tasks.push(tokio::spawn(crate::metadata::serve(
            listener,
            Arc::clone(&agent) as Arc<dyn crate::metadata::InstanceByAddress>,
            shutdown.subscribe(),
        )));
    }
    tasks.push(tokio::spawn(session));
    info!(node = %config.node_id, %local_addr, %advertise, cc = %config.cc_endpoint, "node controller started");
    Ok(NodeHandle {
        local_addr,
        advertise,
        shutdown,
        tasks,
    })
}

/// Resolves once shutdown is requested or the handle is gone.
pub(crate) async fn stopped(rx: &mut watch::Receiver<bool>) {
    // `wait_for` fails only when the sender is dropped, which also means stop.
    let _ = rx.wait_for(|stop| *stop).await;
}

/// The state shared by the agent's tasks and its gRPC service.
pub(crate) struct Agent {
    node_id: NodeId,
    stop_timeout: Duration,
    hypervisor: Arc<dyn Hypervisor>,
    /// Snapshot uploads to the CC (a channel without a call deadline).
    uploads: ZoneAgentClient<Channel>,
    state: Mutex<AgentState>,
    /// Wakes the reconciler; `notify_one` keeps a permit, so wake-ups during a pass
    /// coalesce into one more pass.
    reconcile: Notify,
    /// Wakes the reporter when the published reports changed.
    report: Notify,
    registered: AtomicBool,
}

#[derive(Default)]
struct AgentState {
    desired: Option<DesiredState>,
    /// One entry per instance of `desired`.
    memory: BTreeMap<InstanceId, InstanceMemory>,
    /// The reports of the last pass: what the reporter sends.
    reports: BTreeMap<InstanceId, InstanceReport>,
    /// Unmanaged domains already logged, so each is logged once.
    unmanaged: BTreeSet<InstanceId>,
    /// Instances whose preparation (image downloads) runs in the background.
    preparing: BTreeSet<InstanceId>,
    /// Deleted volumes whose bytes this agent has removed (or found absent).
    removed_volumes: BTreeSet<VolumeId>,
    /// The snapshots of the document this agent is taking or took.
    snapshots: BTreeMap<SnapshotId, plan::SnapshotTask>,
}

impl Agent {
    fn new(
        node_id: NodeId,
        stop_timeout: Duration,
        hypervisor: Arc<dyn Hypervisor>,
        uploads: ZoneAgentClient<Channel>,
    ) -> Self {
        Agent {
            node_id,
            stop_timeout,
            hypervisor,
            uploads,
            state: Mutex::new(AgentState::default()),
            reconcile: Notify::new(),
            report: Notify::new(),
            registered: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, AgentState> {
        // Every critical section is plain bookkeeping; a panic inside one leaves the state
        // usable, and the next pass re-reads the hypervisor anyway.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn node_id(&self) -> &NodeId {
        &self.node_id
    }

    fn applied_generation(&self) -> u64 {
        self.lock().desired.as_ref().map_or(0, |d| d.generation)
    }

    /// Accepts a desired-state document unless it is older than the applied one.
    pub(crate) fn put_desired(&self, doc: DesiredState) -> PutOutcome {
        let mut state = self.lock();
        if let Some(current) = &state.desired {
            if doc.generation < current.generation {
                debug!(
                    offered = doc.generation,
                    applied = current.generation,
                    "stale desired state refused"
                );
                return PutOutcome {
                    applied_generation: current.generation,
                    stale: true,
                };
            }
            if doc.generation == current.generation {
                // A re-send: same generation, same content by contract. Converge again in
                // case the sender suspects we missed something.
                let applied_generation = current.generation;
                drop(state);
                self.reconcile.notify_one();
                return PutOutcome {
                    applied_generation,
                    stale: false,
                };
            }
        }
        let state = &mut *state;
        state.memory.retain(|id, _| doc.instances.contains_key(id));
        state
            .removed_volumes
            .retain(|v| doc.deleted_volumes.contains(v));
        state
            .snapshots
            .retain(|id, _| doc.snapshots.iter().any(|r| &r.snapshot_id == id));
        for (id, spec) in &doc.instances {
            state
                .memory
                .entry(id.clone())
                .or_insert_with(|| InstanceMemory::first_seen(spec));
        }
        let applied_generation = doc.generation;
        info!(
            generation = applied_generation,
            instances = doc.instances.len(),
            "desired state applied"
        );
        state.desired = Some(doc);
        self.reconcile.notify_one();
        PutOutcome {
            applied_generation,
            stale: false,
        }
    }

    /// The instance's console log.
    pub(crate) async fn console(&self, id: &InstanceId) -> Result<Vec<u8>, NcError> {
        Ok(self.hypervisor.console(id).await?)
    }

    /// Every domain's state, and the volumes attached to each.
    async fn observe_domains(
        &self,
    ) -> Result<(BTreeMap<InstanceId, DomainState>, plan::Attached), HypervisorError> {
        let (states, attached, _) = self.observe_domains_sized().await?;
        Ok((states, attached))
    }

    /// [`Self::observe_domains`], with the size each domain is defined with.
    async fn observe_domains_sized(
        &self,
    ) -> Result<(plan::States, plan::Attached, plan::Sizes), HypervisorError> {
        let domains = self.hypervisor.list().await?;
        let mut states = BTreeMap::new();
        let mut attached = plan::Attached::new();
        let mut sizes = plan::Sizes::new();
        for d in domains {
            if !d.volumes.is_empty() {
                attached.insert(d.instance_id.clone(), d.volumes);
            }
            sizes.insert(d.instance_id.clone(), d.resources);
            states.insert(d.instance_id, d.state);
        }
        Ok((states, attached, sizes))
    }

    /// Feeds the observation into every desired instance's memory.
    fn absorb(state: &mut AgentState, observed: &BTreeMap<InstanceId, DomainState>) {
        let AgentState {
            desired: Some(doc),
            memory,
            ..
        } = state
        else {
            return;
        };
        let (mut specs, mut seen) = (
            plan::Beside::new(&doc.instances),
            plan::Beside::new(observed),
        );
        for (id, memory) in memory.iter_mut() {
            let (spec, found) = (specs.get(id), seen.get(id).copied());
            if let Some(spec) = spec {
                plan::observe(memory, spec, found);
            }
        }
    }

    /// The current reports, from a fresh look at the hypervisor.
    async fn current_reports(
        &self,
    ) -> Result<BTreeMap<InstanceId, InstanceReport>, HypervisorError> {
        let (observed, attached) = self.observe_domains().await?;
        let state = self.lock();
        let mut reports = plan::reports(state.desired.as_ref(), &observed, &state.memory);
        plan::with_volumes(&mut reports, &attached);
        Ok(reports)
    }

    // ---------- reconciler ----------

    async fn run_reconciler(
        self: Arc<Self>,
        resync: Duration,
        mut events: broadcast::Receiver<DomainEvent>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut events_open = true;
        loop {
            let started = Instant::now();
            let deadline = self.reconcile_once().await;
            // A pass looks at every instance; events arriving one by one (a burst of boots)
            // must not each cost a pass. Pausing in proportion to what the pass cost lets a
            // burst ride on one pass and keeps reconciling a bounded share of the CPU.
            let gap = RECONCILE_GAP.max(started.elapsed() * RECONCILE_GAP_FACTOR);
            tokio::select! {
                _ = stopped(&mut shutdown) => return,
                _ = tokio::time::sleep(gap) => {}
            }
            let wake_at =
                deadline.map_or(Instant::now() + resync, |d| d.min(Instant::now() + resync));
            tokio::select! {
                _ = stopped(&mut shutdown) => return,
                _ = self.reconcile.notified() => {}
                _ = tokio::time::sleep_until(wake_at) => {}
                event = events.recv(), if events_open => match event {
                    Ok(event) => debug!(instance = %event.instance_id, state = ?event.state, reason = ?event.reason, "domain event"),
                    Err(broadcast::error::RecvError::Lagged(n)) => debug!(missed = n, "domain events lagged"),
                    Err(broadcast::error::RecvError::Closed) => {
                        warn!("hypervisor event stream closed; relying on periodic resync");
                        events_open = false;
                    }
                },
            }
        }
    }

    /// One reconcile pass. Returns the earliest stop deadline, when one is pending.
    async fn reconcile_once(self: &Arc<Self>) -> Option<Instant> {
        let (observed, attached, sizes) = match self.observe_domains_sized().await {
            Ok(observed) => observed,
            Err(e) => {
                warn!(error = %e, "cannot list domains; will retry");
                return None;
            }
        };
        let (plan, remove, snapshots) = {
            let mut state = self.lock();
            Self::absorb(&mut state, &observed);
            let remove = state.desired.as_ref().map_or_else(Vec::new, |doc| {
                plan::volumes_to_remove(doc, &attached, &state.removed_volumes)
            });
            let plan = match &state.desired {
                Some(doc) => {
                    // A domain whose type changed while stopped gets its new size before
                    // the start that follows (a failed resize skips that start).
                    let mut plan = plan::plan(doc, &observed, &state.memory, Instant::now());
                    let mut actions = plan::plan_resizes(doc, &observed, &sizes, &state.memory);
                    actions.append(&mut plan.actions);
                    plan.actions = actions;
                    // After the lifecycle actions: a domain defined in this pass gets its
                    // volumes in the next one, once it is listed.
                    plan.actions
                        .extend(plan::plan_volumes(doc, &observed, &attached));
                    plan
                }
                None => plan::Plan {
                    actions: vec![],
                    unmanaged: observed.keys().cloned().collect(),
                },
            };
            let unmanaged: BTreeSet<InstanceId> = plan.unmanaged.iter().cloned().collect();
            for id in unmanaged.difference(&state.unmanaged) {
                info!(instance = %id, "domain not in the desired state; leaving it alone");
            }
            state.unmanaged = unmanaged;
            let snapshots = state.desired.as_ref().map_or_else(Vec::new, |doc| {
                plan::snapshots_due(doc, &state.snapshots, &self.node_id, Instant::now())
            });
            for request in &snapshots {
                state
                    .snapshots
                    .insert(request.snapshot_id.clone(), plan::SnapshotTask::InFlight);
            }
            (plan, remove, snapshots)
        };
        self.remove_volumes(remove).await;
        for request in snapshots {
            self.snapshot_in_background(request);
        }

        let actions = self.defer_unprepared(plan.actions);
        let (observed, attached) = if actions.is_empty() {
            (observed, attached)
        } else {
            self.execute(actions).await;
            match self.observe_domains().await {
                Ok(observed) => observed,
                Err(e) => {
                    warn!(error = %e, "cannot list domains after acting; will retry");
                    return None;
                }
            }
        };

        let mut state = self.lock();
        Self::absorb(&mut state, &observed);
        let mut reports = plan::reports(state.desired.as_ref(), &observed, &state.memory);
        plan::with_volumes(&mut reports, &attached);
        if reports != state.reports {
            state.reports = reports;
            self.report.notify_one();
        }
        plan::next_deadline(state.memory.values())
    }

    /// Takes a snapshot the document asks for, if this node holds the disk: copies the
    /// volume, or the instance's root disk (the driver), and uploads the copy through the
    /// CC, or, when the copy fails, uploads the failure (the snapshot ends in `error`, an
    /// image made from it in `failed`). Waits before the snapshot is looked at again, then
    /// wakes the reconciler.
    fn snapshot_in_background(self: &Arc<Self>, request: SnapshotRequest) {
        let agent = Arc::clone(self);
        tokio::spawn(async move {
            let snapshot = request.snapshot_id.clone();
            let node = agent.node_id.to_string();
            let (volume, instance) = match &request.source {
                SnapshotSource::Volume(v) => (v.to_string(), String::new()),
                SnapshotSource::Root { instance_id, .. } => {
                    (String::new(), instance_id.to_string())
                }
            };
            let disk = match &request.source {
                SnapshotSource::Volume(v) => format!("volume {v}"),
                SnapshotSource::Root { instance_id, .. } => {
                    format!("the root disk of {instance_id}")
                }
            };
            let header = {
                let (volume, instance) = (volume.clone(), instance.clone());
                move |failure: String, size: u64| pb::SnapshotUploadHeader {
                    snapshot_id: request.snapshot_id.to_string(),
                    volume_id: volume.clone(),
                    instance_id: instance.clone(),
                    zone: String::new(),
                    node_id: node.clone(),
                    failure,
                    size,
                }
            };
            let copied = match &request.source {
                SnapshotSource::Volume(v) => agent.hypervisor.snapshot_volume(v).await,
                // The request names this node: a domain it does not have was never defined
                // here (the instance stopped before it first started), so there is nothing
                // to wait for.
                SnapshotSource::Root { instance_id, .. } => {
                    match agent.hypervisor.snapshot_root(instance_id).await {
                        Ok(None) => Err(HypervisorError::Failed(format!(
                            "{instance_id} has no disk on node {}: it was stopped before it ever started",
                            agent.node_id
                        ))),
                        other => other,
                    }
                }
            };
            let wait = match copied {
                Ok(None) => SNAPSHOT_NOT_HERE,
                Ok(Some(copy)) => {
                    info!(%snapshot, %disk, size = copy.size, "disk copied; uploading the snapshot");
                    let first = pb::SnapshotUpload {
                        part: Some(pb::snapshot_upload::Part::Header(header(
                            String::new(),
                            copy.size,
                        ))),
                    };
                    // A read error ends the stream short; the CLC refuses it by its size.
                    let chunks = copy
                        .bytes
                        .map_while(Result::ok)
                        .map(|data| pb::SnapshotUpload {
                            part: Some(pb::snapshot_upload::Part::Chunk(data)),
                        });
                    upload(
                        agent.uploads.clone(),
                        snapshot.clone(),
                        Box::pin(tokio_stream::once(first).chain(chunks)),
                    )
                    .await
                }
                Err(error) => {
                    warn!(%snapshot, %disk, %error, "copying the disk failed");
                    let only = pb::SnapshotUpload {
                        part: Some(pb::snapshot_upload::Part::Header(header(
                            format!("copying {disk} failed: {error}"),
                            0,
                        ))),
                    };
                    upload(
                        agent.uploads.clone(),
                        snapshot.clone(),
                        Box::pin(tokio_stream::once(only)),
                    )
                    .await
                }
            };
            let until = Instant::now() + wait;
            if let Some(task) = agent.lock().snapshots.get_mut(&snapshot) {
                *task = plan::SnapshotTask::Wait(until);
            }
            tokio::time::sleep_until(until).await;
            agent.reconcile.notify_one();
        });
    }
}

/// Sends one upload; how long to wait before the snapshot is looked at again.
fn upload(
    mut client: ZoneAgentClient<Channel>,
    snapshot: SnapshotId,
    mut parts: UploadParts,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Duration> + Send>> {
    // The client wants a stream it can hold across threads: a channel's receiving end,
    // fed from the copy.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        while let Some(part) = parts.next().await {
            if tx.send(part).await.is_err() {
                break;
            }
        }
    });
    Box::pin(async move {
        match client
            .upload_snapshot(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
        {
            Ok(ack) => {
                info!(%snapshot, state = %ack.get_ref().state, "snapshot uploaded");
                SNAPSHOT_RECHECK
            }
            Err(status) => {
                warn!(%snapshot, %status, "uploading the snapshot failed; will retry");
                SNAPSHOT_RETRY
            }
        }
    })
}

impl Agent {
    /// Removes deleted volumes' bytes, remembering which are gone so each is removed once.
    async fn remove_volumes(&self, volumes: Vec<VolumeId>) {
        for volume in volumes {
            match self.hypervisor.delete_volume(&volume).await {
                Ok(()) => {
                    debug!(%volume, "deleted volume's bytes removed (if held)");
                    self.lock().removed_volumes.insert(volume);
                }
                Err(e) => {
                    warn!(%volume, error = %e, "cannot remove a deleted volume's bytes; will retry")
                }
            }
        }
    }

    /// Takes out the defines of instances whose images are not on the host yet (and the
    /// actions that follow them), and prepares those instances in the background: a long
    /// download must not hold up the node's other instances. They are defined by a later
    /// pass, once prepared.
    fn defer_unprepared(self: &Arc<Self>, actions: Vec<Action>) -> Vec<Action> {
        let mut deferred: BTreeSet<InstanceId> = BTreeSet::new();
        let mut kept = Vec::with_capacity(actions.len());
        for action in actions {
            if let Action::Define(spec) = &action
                && !self.hypervisor.is_prepared(spec)
            {
                deferred.insert(spec.instance_id.clone());
                self.prepare_in_background(spec);
                continue;
            }
            if !deferred.contains(action.instance_id()) {
                kept.push(action);
            }
        }
        kept
    }

    fn prepare_in_background(self: &Arc<Self>, spec: &DomainSpec) {
        if !self.lock().preparing.insert(spec.instance_id.clone()) {
            return; // already under way
        }
        let agent = Arc::clone(self);
        let spec = spec.clone();
        tokio::spawn(async move {
            let id = &spec.instance_id;
            info!(instance = %id, "preparing the instance (fetching its images)");
            let result = agent.hypervisor.prepare(&spec).await;
            agent.lock().preparing.remove(id);
            match result {
                Ok(()) => info!(instance = %id, "instance prepared"),
                Err(error) => {
                    warn!(instance = %id, %error, "preparing the instance failed");
                    agent.latch_failure(
                        id,
                        Failure {
                            reason: StateReason::new(
                                reason::INTERNAL_ERROR,
                                format!("preparing the instance failed: {error}"),
                            ),
                            terminal: true,
                        },
                    );
                }
            }
            agent.reconcile.notify_one();
        });
    }

    /// Applies the plan's actions in order. After an action of an instance fails, the
    /// rest of that instance's actions are skipped; other instances go on.
    async fn execute(&self, actions: Vec<Action>) {
        let mut failed: BTreeSet<InstanceId> = BTreeSet::new();
        for action in actions {
            let id = action.instance_id().clone();
            if failed.contains(&id) {
                continue;
            }
            debug!(instance = %id, ?action, "applying");
            let result = match &action {
                Action::Define(spec) => self.hypervisor.define(spec).await,
                Action::Start { .. } => self.hypervisor.start(&id).await,
                Action::Shutdown(_) => self.hypervisor.shutdown(&id).await,
                Action::Destroy(_) => self.hypervisor.destroy(&id).await,
                Action::Reboot { .. } => self.hypervisor.reboot(&id).await,
                Action::Undefine(_) => self.hypervisor.undefine(&id).await,
                Action::Resize { resources, .. } => self.hypervisor.resize(&id, *resources).await,
                Action::AttachVolume { volume, .. } => {
                    self.hypervisor.attach_volume(&id, volume).await
                }
                Action::DetachVolume { volume_id, .. } => {
                    self.hypervisor.detach_volume(&id, volume_id).await
                }
            };
            match result {
                Ok(()) => self.succeeded(&action),
                Err(error) => {
                    failed.insert(id);
                    self.failed(&action, error).await;
                }
            }
        }
    }

    fn succeeded(&self, action: &Action) {
        let mut state = self.lock();
        let Some(memory) = state.memory.get_mut(action.instance_id()) else {
            return;
        };
        match action {
            Action::Define(spec) => {
                info!(instance = %spec.instance_id, "domain defined");
                memory.launching = true;
                memory.last_seen = Some(DomainState::ShutOff);
            }
            Action::Start {
                instance_id,
                reboot_seq,
            } => {
                info!(instance = %instance_id, "domain started");
                memory.applied_reboot_seq = memory.applied_reboot_seq.max(*reboot_seq);
                memory.last_seen = Some(DomainState::Booting);
            }
            Action::Reboot {
                instance_id,
                reboot_seq,
            } => {
                info!(instance = %instance_id, reboot_seq, "domain rebooted");
                memory.applied_reboot_seq = memory.applied_reboot_seq.max(*reboot_seq);
                memory.rebooting = true;
            }
            Action::Shutdown(id) => {
                if memory.stop_deadline.is_none() {
                    info!(instance = %id, timeout = ?self.stop_timeout, "graceful shutdown requested");
                    memory.stop_deadline = Some(Instant::now() + self.stop_timeout);
                }
            }
            Action::Destroy(id) => info!(instance = %id, "domain destroyed"),
            Action::Undefine(id) => info!(instance = %id, "domain undefined"),
            Action::Resize {
                instance_id,
                resources,
            } => {
                info!(instance = %instance_id, vcpus = resources.vcpus, memory_mib = resources.memory_mib, "domain resized")
            }
            Action::AttachVolume {
                instance_id,
                volume,
            } => {
                info!(instance = %instance_id, volume = %volume.volume_id, device = %volume.device, "volume attached");
            }
            Action::DetachVolume {
                instance_id,
                volume_id,
            } => info!(instance = %instance_id, volume = %volume_id, "volume detach requested"),
        }
    }

    async fn failed(&self, action: &Action, error: HypervisorError) {
        let id = action.instance_id();
        match (action, &error) {
            // The domain changed under us between the look and the act; the next pass
            // sees the new state and decides again.
            (_, HypervisorError::InvalidState { .. })
            | (Action::Define(_), HypervisorError::AlreadyExists(_)) => {
                // No immediate re-pass: the change that raced us comes with an event.
                debug!(instance = %id, %error, "raced with the domain's state; replanning");
            }
            (Action::Define(_), _) => {
                warn!(instance = %id, %error, "define failed");
                let reason = match error {
                    HypervisorError::InsufficientCapacity { .. } => StateReason::new(
                        reason::INSUFFICIENT_CAPACITY,
                        "Insufficient capacity on the node",
                    ),
                    other => {
                        StateReason::new(reason::INTERNAL_ERROR, format!("define failed: {other}"))
                    }
                };
                self.latch_failure(
                    id,
                    Failure {
                        reason,
                        terminal: true,
                    },
                );
            }
            (Action::Resize { .. }, _) => {
                // The instance keeps its domain and disks, and stays stopped (its start is
                // skipped) with the reason, until it is stopped and started again.
                warn!(instance = %id, %error, "resize failed; the instance stays stopped");
                let reason = match error {
                    HypervisorError::InsufficientCapacity { .. } => StateReason::new(
                        reason::INSUFFICIENT_CAPACITY,
                        "Insufficient capacity on the node for the instance's new type",
                    ),
                    other => StateReason::new(
                        reason::INTERNAL_ERROR,
                        format!("resizing the domain failed: {other}"),
                    ),
                };
                self.latch_failure(
                    id,
                    Failure {
                        reason,
                        terminal: false,
                    },
                );
            }
            (Action::Start { .. }, _) => {
                let launching = self.lock().memory.get(id).is_some_and(|m| m.launching);
                let reason =
                    StateReason::new(reason::INTERNAL_ERROR, format!("start failed: {error}"));
                if launching {
                    warn!(instance = %id, %error, "first start failed; removing the domain");
                    self.clean_up(id).await;
                } else {
                    // An existing (stopped) instance keeps its domain and disk.
                    warn!(instance = %id, %error, "start failed; the instance stays stopped");
                }
                self.latch_failure(
                    id,
                    Failure {
                        reason,
                        terminal: launching,
                    },
                );
            }
            _ => warn!(instance = %id, ?action, %error, "hypervisor operation failed; will retry"),
        }
    }

    fn latch_failure(&self, id: &InstanceId, failure: Failure) {
        if let Some(memory) = self.lock().memory.get_mut(id) {
            memory.launching = false;
            memory.failure = Some(failure);
        }
    }

    /// Removes a domain whose launch failed. Best effort: a domain that cannot be removed
    /// stays visible in `list` and in the reports.
    async fn clean_up(&self, id: &InstanceId) {
        if let Ok(Some(state)) = self.hypervisor.state(id).await
            && state != DomainState::ShutOff
            && let Err(e) = self.hypervisor.destroy(id).await
        {
            warn!(instance = %id, error = %e, "cannot destroy the failed domain");
        }
        if let Err(e) = self.hypervisor.undefine(id).await {
            warn!(instance = %id, error = %e, "cannot undefine the failed domain");
        }
    }

    // ---------- reporter ----------

    async fn run_reporter(
        self: Arc<Self>,
        mut client: ZoneAgentClient<Channel>,
        resync: Duration,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut sent: BTreeMap<InstanceId, InstanceReport> = BTreeMap::new();
        let mut full = tokio::time::interval_at(Instant::now() + resync, resync);
        full.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let everything = tokio::select! {
                _ = stopped(&mut shutdown) => return,
                _ = self.report.notified() => false,
                _ = full.tick() => true,
            };
            // Before registration the CC would not know the node; the registration itself
            // carries the reports, and the session wakes us once it succeeded.
            if !self.registered.load(Ordering::SeqCst) {
                continue;
            }
            let current = self.lock().reports.clone();
            let mut was = plan::Beside::new(&sent);
            let batch: Vec<&InstanceReport> = current
                .iter()
                .filter(|(id, r)| everything || was.get(id) != Some(*r))
                .map(|(_, r)| r)
                .collect();
            if batch.is_empty() {
                continue;
            }
            let request = pb::NodeInstanceReports {
                node_id: self.node_id.to_string(),
                reports: batch
                    .iter()
                    .map(|r| convert::report_to_proto(r, &self.node_id))
                    .collect(),
            };
            match client.report_instances(request).await {
                Ok(_) => {
                    debug!(count = batch.len(), full = everything, "reports sent");
                    for r in batch {
                        sent.insert(r.instance_id.clone(), r.clone());
                    }
                    let mut still = plan::Beside::new(&current);
                    sent.retain(|id, _| still.get(id).is_some());
                }
                // The next full report carries them again.
                Err(status) => warn!(%status, "sending reports failed"),
            }
        }
    }

    // ---------- session: registration and heartbeats ----------

    async fn run_session(
        self: Arc<Self>,
        mut client: ZoneAgentClient<Channel>,
        advertise: String,
        heartbeat: Duration,
        revocations: canopy_pki::Revocations,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            let mut backoff = REGISTER_BACKOFF_MIN;
            loop {
                match self.register(&mut client, &advertise).await {
                    Ok(zone) => {
                        info!(%zone, "registered with the cluster controller");
                        self.registered.store(true, Ordering::SeqCst);
                        // Anything that changed while the registration was in flight.
                        self.report.notify_one();
                        break;
                    }
                    // Refusals (a revoked or foreign certificate) show at once.
                    Err(error)
                        if backoff >= REGISTER_BACKOFF_MAX
                            || error.contains("PermissionDenied")
                            || error.contains("Unauthenticated") =>
                    {
                        warn!(%error, ?backoff, "registration failed; retrying")
                    }
                    Err(error) => debug!(%error, ?backoff, "registration failed; retrying"),
                }
                // Jitter keeps a rack of nodes from hammering a CC that just came back.
                let jitter = rand::rng().random_range(0..=backoff.as_millis() as u64 / 4);
                tokio::select! {
                    _ = stopped(&mut shutdown) => return,
                    _ = tokio::time::sleep(backoff + Duration::from_millis(jitter)) => {}
                }
                backoff = (backoff * 2).min(REGISTER_BACKOFF_MAX);
            }
            loop {
                tokio::select! {
                    _ = stopped(&mut shutdown) => return,
                    _ = tokio::time::sleep(heartbeat) => {}
                }
                let request = pb::NodeHeartbeatRequest {
                    node_id: self.node_id.to_string(),
                    applied_generation: self.applied_generation(),
                };
                match client.node_heartbeat(request).await {
                    Ok(response) if response.get_ref().known => {
                        // The cloud's revoked certificates, which this node's server
                        // refuses from then on.
                        revocations.replace(response.into_inner().revoked_serials);
                    }
                    Ok(_) => {
                        info!("the cluster controller does not know this node; registering again");
                        self.registered.store(false, Ordering::SeqCst);
                        break;
                    }
                    // A CC that restarted answers `known = false` once it is back; until
                    // then keep the registration and keep trying.
                    Err(status) => debug!(%status, "heartbeat failed"),
                }
            }
        }
    }

    async fn register(
        &self,
        client: &mut ZoneAgentClient<Channel>,
        advertise: &str,
    ) -> Result<String, String> {
        // Without a view of the domains, registering would tell the CC the node is empty.
        let reports = self.current_reports().await.map_err(|e| e.to_string())?;
        let request = pb::RegisterNodeRequest {
            node_id: self.node_id.to_string(),
            endpoint: advertise.to_owned(),
            capacity: Some(convert::resources_to_proto(self.hypervisor.capacity())),
            hypervisor: self.hypervisor.kind().name().to_owned(),
            hypervisor_detail: self.hypervisor.detail(),
            instances: reports
                .values()
                .map(|r| convert::report_to_proto(r, &self.node_id))
                .collect(),
        };
        let response = client
            .register_node(request)
            .await
            .map_err(|s| s.to_string())?;
        Ok(response.into_inner().zone)
    }
}

impl crate::metadata::InstanceByAddress for Agent {
    /// The desired instance of this node whose private address is `ip`.
    fn instance_at(&self, ip: std::net::IpAddr) -> Option<DesiredInstance> {
        let state = self.lock();
        state
            .desired
            .as_ref()?
            .instances
            .values()
            .find(|i| i.private_ip.map(std::net::IpAddr::V4) == Some(ip))
            .cloned()
    }
}
