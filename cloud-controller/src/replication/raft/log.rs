//! The replicated command log: a [`CommandLog`] over openraft, and starting a replica with its
//! gRPC endpoint.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use canopy_proto::v1::raft_transport_server::RaftTransportServer;
use openraft::error::{CheckIsLeaderError, ClientWriteError, InitializeError, RaftError};
use openraft::{BasicNode, Config, Raft, RaftMetrics, SnapshotPolicy};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::network::{
    BlobSlot, ForwardHandler, ForwardSlot, GrpcNetworkFactory, RaftTransportService,
};
use super::types::{LogId, RaftNodeId, RaftResponse, TypeConfig};
use super::{SqliteLogStore, SqliteStateMachine};
use crate::replication::CommandLog;
use crate::state::{Command, Outcome, StateError, Store};

/// Raft's timing. The defaults aim at fast failover on a LAN: a leader that stops is replaced
/// within about a second.
#[derive(Debug, Clone)]
pub struct RaftTimers {
    /// How often the leader sends heartbeats.
    pub heartbeat: Duration,
    /// A follower that hears no leader for `election_max` (openraft's leader lease) plus a
    /// random time in `election_min..election_max` starts an election.
    pub election_min: Duration,
    pub election_max: Duration,
    /// A snapshot is built after this many entries since the last one.
    pub snapshot_every: u64,
    /// How long a command or a linearizable read waits for a leader and a quorum before the
    /// client is told to retry. Longer than an election, so failovers are waited out.
    pub request_wait: Duration,
}

impl Default for RaftTimers {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_millis(100),
            election_min: Duration::from_millis(200),
            election_max: Duration::from_millis(300),
            snapshot_every: 5_000,
            request_wait: Duration::from_secs(5),
        }
    }
}

impl RaftTimers {
    pub(crate) fn config(&self) -> Result<Config, ReplicaError> {
        let millis = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let config = Config {
            cluster_name: "canopy-clc".into(),
            heartbeat_interval: millis(self.heartbeat),
            election_timeout_min: millis(self.election_min),
            election_timeout_max: millis(self.election_max),
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_every),
            // Keep enough log behind a snapshot that a briefly lagging follower catches up
            // from the log rather than by a whole snapshot.
            max_in_snapshot_log_to_keep: 1_000,
            // Snapshots are whole SQLite files, sent in chunks whose JSON encoding (a number
            // per byte, up to 4 characters each) stays well under the gRPC message limit.
            snapshot_max_chunk_size: 1024 * 1024,
            install_snapshot_timeout: 5_000,
            ..Config::default()
        };
        Ok(config.validate()?)
    }
}

/// Why a replica could not start or be initialized.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("invalid raft configuration: {0}")]
    Config(Box<openraft::ConfigError>),
    #[error("cannot listen for raft RPCs: {0}")]
    Listen(#[from] std::io::Error),
    #[error("raft stopped: {0}")]
    Fatal(Box<openraft::error::Fatal<RaftNodeId>>),
    #[error("raft transport: {0}")]
    Tls(String),
    #[error("cannot initialize the raft group: {0}")]
    Initialize(Box<RaftError<RaftNodeId, InitializeError<RaftNodeId, BasicNode>>>),
}

// openraft's errors are large; boxed, a `Result<_, ReplicaError>` stays small.
impl From<openraft::ConfigError> for ReplicaError {
    fn from(e: openraft::ConfigError) -> Self {
        ReplicaError::Config(Box::new(e))
    }
}

impl From<openraft::error::Fatal<RaftNodeId>> for ReplicaError {
    fn from(e: openraft::error::Fatal<RaftNodeId>) -> Self {
        ReplicaError::Fatal(Box::new(e))
    }
}

impl From<RaftError<RaftNodeId, InitializeError<RaftNodeId, BasicNode>>> for ReplicaError {
    fn from(e: RaftError<RaftNodeId, InitializeError<RaftNodeId, BasicNode>>) -> Self {
        ReplicaError::Initialize(Box::new(e))
    }
}

/// The replicated [`CommandLog`]: `submit` appends the command to the Raft log, and returns
/// once a quorum holds it and this replica applied it. Only the leader accepts commands; the
/// others answer [`StateError::NotLeader`] naming the leader they know of.
#[derive(Clone)]
pub struct RaftLog {
    id: RaftNodeId,
    raft: Raft<TypeConfig>,
    store: Arc<Store>,
    /// How long a command or a read waits for a leader and a quorum before giving up.
    wait: Duration,
    barrier: Arc<ReadBarrier>,
    /// Commands waiting for the group-commit task (see [`run_batcher`]).
    queue: tokio::sync::mpsc::UnboundedSender<Pending>,
}

/// A submitted command and where its result goes.
type Pending = (Command, oneshot::Sender<Result<Outcome, StateError>>);

/// The most commands one log entry carries.
const MAX_BATCH: usize = 512;

/// The longest the batcher waits for the answered clients' first command (counted from the
/// answer), and then gathers their commands (counted from the first of them).
const MAX_GATHER: Duration = Duration::from_millis(5);
/// Once the answered clients' commands arrive, the longest wait for the next one before the
/// entry leaves with what it has.
const GATHER_GAP: Duration = Duration::from_millis(1);

/// How many commands the next entry should gather before it leaves: the previous entry's
/// clients were just answered and, under concurrent load, send their next commands at once,
/// so the entry waits for as many as the previous one carried plus those that queued while
/// it was in flight. A lone client (the previous entry carried one command), or a previous
/// entry answered longer ago than [`MAX_GATHER`], gathers nothing: the command goes at once.
fn gather_target(last: usize, waiting: usize, since_answered: Duration) -> usize {
    if last > 1 && since_answered < MAX_GATHER {
        (waiting + last).min(MAX_BATCH)
    } else {
        1
    }
}

/// Until when the batcher waits for the next command of an entry it gathers. Commands that
/// queued while the previous entry was in flight are there at once, but the clients that
/// entry answered send their next ones only after a round trip (their answer, their next
/// request, its checks), which on two busy cores takes milliseconds. So until the first of
/// those (`fresh_since`) arrives, the wait lasts up to [`MAX_GATHER`] after the answer; from
/// then on, [`GATHER_GAP`] between two commands and [`MAX_GATHER`] after the first. (A gap
/// counted from the answer sent the one command that had queued on its own, and the whole
/// cohort an entry later: a commit for one launch every other entry.)
fn gather_until(answered: Instant, fresh_since: Option<Instant>, now: Instant) -> Instant {
    match fresh_since {
        None => answered + MAX_GATHER,
        Some(since) => (since + MAX_GATHER).min(now + GATHER_GAP),
    }
}

/// Group commit with one log entry in flight: while it is, new commands queue up, and leave
/// together as the next entry, so a burst of concurrent submissions costs one append and one
/// fsync on each replica instead of one per command. Before the next entry leaves, the
/// batcher gathers up to [`gather_target`] commands, waiting for each as long as
/// [`gather_until`] says.
///
/// One entry in flight, and gathering: on two cores shared by three replicas every entry's
/// fixed cost (an append and an fsync on each replica, an apply and its commit on each, the
/// RPCs) is paid in CPU and in latency, so fewer, larger entries acknowledge more launches,
/// and sooner. Measured (docs/performance.md, 2026-12-02, a slow machine of the kind):
/// against the fixed 1 ms linger it replaces, 64 clients 1,800 -> 1,970/s (median of 6
/// interleaved runs), 8 clients 550 -> 620/s, one client the same; a fixed 5 ms linger
/// helped 64 clients as much but cost 8 clients a quarter; two or three entries in flight
/// were slower than one.
async fn run_batcher(
    id: RaftNodeId,
    raft: Raft<TypeConfig>,
    mut queue: tokio::sync::mpsc::UnboundedReceiver<Pending>,
) {
    // Commands in the previous entry, and when it was answered.
    let mut last = 0usize;
    let mut answered = Instant::now();
    loop {
        // What queued while the previous entry was in flight.
        let waiting = queue.len();
        let Some(first) = queue.recv().await else {
            return;
        };
        let first_after = answered.elapsed();
        let gather = gather_target(last, waiting, first_after);
        let mut batch = vec![first];
        drain(&mut queue, &mut batch);
        // More than had queued: the answered clients' commands have begun to arrive.
        let mut fresh_since = (batch.len() > waiting).then(Instant::now);
        while batch.len() < gather {
            let until = gather_until(answered, fresh_since, Instant::now());
            match tokio::time::timeout_at(until.into(), queue.recv()).await {
                Ok(Some(next)) => {
                    batch.push(next);
                    drain(&mut queue, &mut batch);
                    if fresh_since.is_none() && batch.len() > waiting {
                        fresh_since = Some(Instant::now());
                    }
                }
                Ok(None) | Err(_) => break,
            }
        }
        last = batch.len();
        tracing::trace!(
            size = last,
            waiting,
            first_ms = first_after.as_secs_f64() * 1e3,
            gathered_ms = answered.elapsed().as_secs_f64() * 1e3,
            "batch gathered"
        );
        write_batch(id, &raft, batch).await;
        answered = Instant::now();
    }
}

/// Moves whatever is queued into `batch`, up to [`MAX_BATCH`].
fn drain(queue: &mut tokio::sync::mpsc::UnboundedReceiver<Pending>, batch: &mut Vec<Pending>) {
    while batch.len() < MAX_BATCH {
        match queue.try_recv() {
            Ok(next) => batch.push(next),
            Err(_) => break,
        }
    }
}

async fn write_batch(id: RaftNodeId, raft: &Raft<TypeConfig>, mut batch: Vec<Pending>) {
    if batch.len() == 1 {
        let (command, reply) = batch.remove(0);
        let result = match raft.client_write(command.into()).await {
            Ok(response) => response.data.into_result(),
            Err(e) => Err(write_error(id, e)),
        };
        let _ = reply.send(result);
        return;
    }
    let (commands, replies): (Vec<Command>, Vec<_>) = batch.into_iter().unzip();
    let started = Instant::now();
    let size = commands.len();
    let written = raft.client_write(Command::Batch(commands).into()).await;
    tracing::trace!(
        size,
        took_ms = started.elapsed().as_secs_f64() * 1e3,
        "batch committed"
    );
    match written {
        Ok(response) => match response.data {
            RaftResponse::Batch(each) if each.len() == replies.len() => {
                for (reply, response) in replies.into_iter().zip(each) {
                    let _ = reply.send(response.into_result());
                }
            }
            other => {
                tracing::error!(
                    ?other,
                    "a batch entry did not produce one response per command"
                );
                for reply in replies {
                    let _ = reply.send(Err(StateError::Corrupt(
                        "a batch entry did not produce one response per command".into(),
                    )));
                }
            }
        },
        Err(e) => {
            let message = e.to_string();
            let first = write_error(id, e);
            // Every command of the batch shares the fate of its entry.
            let same = |e: &StateError| match e {
                StateError::NotLeader { leader } => StateError::NotLeader {
                    leader: leader.clone(),
                },
                StateError::Unavailable(why) => StateError::Unavailable(why.clone()),
                _ => StateError::Corrupt(message.clone()),
            };
            for reply in replies {
                let _ = reply.send(Err(same(&first)));
            }
        }
    }
}

fn write_error(
    id: RaftNodeId,
    e: RaftError<RaftNodeId, ClientWriteError<RaftNodeId, BasicNode>>,
) -> StateError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(forward)) => StateError::NotLeader {
            leader: forwarded_leader(&forward),
        },
        // Only a membership change can fail this way, and commands do not change it.
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
            StateError::Corrupt(format!("unexpected membership error: {e}"))
        }
        RaftError::Fatal(fatal) => {
            tracing::error!(error = %fatal, id, "raft stopped");
            StateError::NotLeader { leader: None }
        }
    }
}

/// Coalesces leadership checks for linearizable reads (the read-index of the Raft paper):
/// a read needs a check that *started after it arrived*; every read waiting while one check
/// runs shares the next one, so a burst of reads costs two heartbeat rounds, not one each.
#[derive(Default)]
struct ReadBarrier {
    /// Held while a check runs; holds the start time and result of the last completed check.
    last: tokio::sync::Mutex<Option<(Instant, Option<LogId>)>>,
}

/// What the admin API shows of the Raft group, as one replica sees it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClusterStatus {
    pub replica_id: RaftNodeId,
    /// leader, follower, candidate, learner or shutdown.
    pub role: String,
    pub term: u64,
    pub leader: Option<RaftNodeId>,
    pub last_log_index: Option<u64>,
    pub last_applied_index: Option<u64>,
    pub snapshot_index: Option<u64>,
    pub members: Vec<MemberStatus>,
}

/// One member of the group. Lag is known only on the leader.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MemberStatus {
    pub id: RaftNodeId,
    pub address: String,
    /// False for a learner (receives the log, does not vote).
    pub voter: bool,
    /// The last log index the leader knows this member holds.
    pub matched_index: Option<u64>,
    /// Entries this member is behind the leader's log.
    pub lag: Option<u64>,
}

/// Why a membership change was not made.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error("this replica is not the leader; leader: {}", leader.as_deref().unwrap_or("unknown"))]
    NotLeader { leader: Option<String> },
    #[error("{0}")]
    Refused(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

impl RaftLog {
    /// This replica's id.
    pub fn id(&self) -> RaftNodeId {
        self.id
    }

    /// The openraft handle, for metrics, waiting and membership changes.
    pub fn raft(&self) -> &Raft<TypeConfig> {
        &self.raft
    }

    /// The store this replica applies to, for reads (which may be stale on a follower).
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// A copy of the replica's current Raft metrics.
    pub fn metrics(&self) -> RaftMetrics<RaftNodeId, BasicNode> {
        self.raft.metrics().borrow().clone()
    }

    /// The leader this replica knows of, with its address.
    pub fn leader(&self) -> Option<(RaftNodeId, BasicNode)> {
        let metrics = self.raft.metrics().borrow().clone();
        let id = metrics.current_leader?;
        let node = metrics
            .membership_config
            .membership()
            .get_node(&id)?
            .clone();
        Some((id, node))
    }

    /// Makes `members` the group's first membership. Call it on one replica of a new group;
    /// calling it on a group that already has a log is refused (`NotAllowed`).
    pub async fn initialize(
        &self,
        members: BTreeMap<RaftNodeId, BasicNode>,
    ) -> Result<(), ReplicaError> {
        self.raft.initialize(members).await?;
        Ok(())
    }

    /// True while this replica is the leader it knows of.
    pub fn is_leader(&self) -> bool {
        leads(self.id, &self.raft.metrics().borrow())
    }

    /// How long requests wait for a leader or a quorum.
    pub fn wait_bound(&self) -> Duration {
        self.wait
    }

    /// Waits (until `deadline`) for a leader other than `not`, and returns it with its
    /// address; `None` when none appeared in time.
    pub async fn await_leader(
        &self,
        not: Option<RaftNodeId>,
        deadline: Instant,
    ) -> Option<(RaftNodeId, BasicNode)> {
        let timeout = deadline.saturating_duration_since(Instant::now());
        let _ = self
            .raft
            .wait(Some(timeout))
            .metrics(
                // A leader that just removed itself is no member: its address is unknown,
                // so wait for the next one.
                |m| {
                    m.current_leader.is_some_and(|l| {
                        Some(l) != not && m.membership_config.membership().get_node(&l).is_some()
                    })
                },
                "a leader",
            )
            .await;
        self.leader().filter(|(id, _)| Some(*id) != not)
    }

    /// Makes the local state at least as new as every write acknowledged anywhere before this
    /// call (a linearizable read): confirms leadership with a quorum, then waits until the
    /// state machine applied up to the commit index. Only the leader can do it.
    pub async fn read_barrier(&self) -> Result<(), StateError> {
        let arrived = Instant::now();
        let deadline = arrived + self.wait;
        let read_log_id = {
            let mut last = tokio::time::timeout_at(deadline.into(), self.barrier.last.lock())
                .await
                .map_err(|_| unavailable("leadership check timed out"))?;
            match *last {
                // A check that started after we arrived covers us.
                Some((started, read_log_id)) if started >= arrived => read_log_id,
                _ => {
                    let started = Instant::now();
                    let checked =
                        tokio::time::timeout_at(deadline.into(), self.raft.get_read_log_id())
                            .await
                            .map_err(|_| unavailable("no quorum confirmed the leader"))?;
                    let (read_log_id, _) = checked.map_err(|e| match e {
                        RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)) => {
                            StateError::NotLeader {
                                leader: forwarded_leader(&f),
                            }
                        }
                        RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_)) => {
                            unavailable("no quorum confirmed the leader")
                        }
                        RaftError::Fatal(f) => unavailable(&format!("raft stopped: {f}")),
                    })?;
                    *last = Some((started, read_log_id));
                    read_log_id
                }
            }
        };
        if let Some(log_id) = read_log_id {
            self.raft
                .wait(Some(deadline.saturating_duration_since(Instant::now())))
                .applied_index_at_least(Some(log_id.index), "linearizable read")
                .await
                .map_err(|_| unavailable("the state machine is behind the commit index"))?;
        }
        Ok(())
    }

    /// The group as this replica sees it.
    pub fn status(&self) -> ClusterStatus {
        let m = self.metrics();
        let membership = m.membership_config.membership();
        let voters: std::collections::BTreeSet<RaftNodeId> = membership.voter_ids().collect();
        let last = m.last_log_index;
        let replication = m.replication.clone().unwrap_or_default();
        let members = membership
            .nodes()
            .map(|(id, node)| {
                let matched = if *id == self.id && m.state.is_leader() {
                    last
                } else {
                    replication.get(id).and_then(|l| l.map(|l| l.index))
                };
                let lag = m
                    .state
                    .is_leader()
                    .then(|| last.unwrap_or(0).saturating_sub(matched.unwrap_or(0)));
                MemberStatus {
                    id: *id,
                    address: node.addr.clone(),
                    voter: voters.contains(id),
                    matched_index: matched,
                    lag,
                }
            })
            .collect();
        ClusterStatus {
            replica_id: self.id,
            role: format!("{:?}", m.state).to_lowercase(),
            term: m.current_term,
            leader: m.current_leader,
            last_log_index: m.last_log_index,
            last_applied_index: m.last_applied.map(|l| l.index),
            snapshot_index: m.snapshot.map(|l| l.index),
            members,
        }
    }

    /// Adds replica `id` at `address`: first as a learner, which receives the log (or a
    /// snapshot) until it has caught up, then, if `voter`, as a voting member.
    pub async fn add_member(
        &self,
        id: RaftNodeId,
        address: String,
        voter: bool,
        timeout: Duration,
    ) -> Result<(), MembershipError> {
        let started = Instant::now();
        let fut = async {
            let added = self
                .raft
                .add_learner(id, BasicNode::new(address.clone()), true)
                .await
                .map_err(membership_error)?;
            if voter {
                // Only a replica that holds the log may vote: one that is unreachable, or far
                // behind, would count towards the quorum without being able to ack. openraft
                // calls a learner caught up within `replication_lag_threshold`, which a fresh
                // replica of a young log passes at once; wait for the real thing.
                let target = added.log_id.index;
                let bound = timeout.saturating_sub(started.elapsed()) * 3 / 4;
                let caught_up = self
                    .raft
                    .wait(Some(bound))
                    .metrics(
                        |m| {
                            m.replication.as_ref().is_some_and(|r| {
                                r.get(&id)
                                    .copied()
                                    .flatten()
                                    .is_some_and(|matched| matched.index >= target)
                            })
                        },
                        "the new replica to catch up",
                    )
                    .await;
                if caught_up.is_err() {
                    return Err(MembershipError::Refused(format!(
                        "replica {id} at {address} did not catch up within {bound:?}; it stays a \
                         learner. Check that it runs (canopy clc --join) and that this replica \
                         reaches it, then add it again"
                    )));
                }
                self.raft
                    .change_membership(
                        openraft::ChangeMembers::AddVoterIds([id].into_iter().collect()),
                        false,
                    )
                    .await
                    .map_err(membership_error)?;
            }
            Ok(())
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| MembershipError::Timeout(timeout))?
    }

    /// Removes replica `id` from the group (voter or learner).
    pub async fn remove_member(
        &self,
        id: RaftNodeId,
        timeout: Duration,
    ) -> Result<(), MembershipError> {
        let membership = self.metrics().membership_config.membership().clone();
        if membership.get_node(&id).is_none() {
            return Err(MembershipError::Refused(format!(
                "replica {id} is not a member"
            )));
        }
        let ids: std::collections::BTreeSet<RaftNodeId> = [id].into_iter().collect();
        let is_voter = membership.voter_ids().any(|v| v == id);
        let change = if is_voter {
            openraft::ChangeMembers::RemoveVoters(ids)
        } else {
            openraft::ChangeMembers::RemoveNodes(ids)
        };
        tokio::time::timeout(timeout, self.raft.change_membership(change, false))
            .await
            .map_err(|_| MembershipError::Timeout(timeout))?
            .map_err(membership_error)?;
        Ok(())
    }

    /// Stops Raft on this replica. Its store stays open and readable.
    pub async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, id = self.id, "raft did not shut down cleanly");
        }
    }
}

/// True when `metrics` show replica `id` leading with a quorum behind it. A replica restarted
/// after leading resumes its old (committed) vote as leader until it hears of the newer term;
/// it has no quorum ack in that leadership yet, so it does not count.
pub fn leads(id: RaftNodeId, m: &RaftMetrics<RaftNodeId, BasicNode>) -> bool {
    m.state.is_leader() && m.current_leader == Some(id) && m.millis_since_quorum_ack.is_some()
}

fn unavailable(why: &str) -> StateError {
    StateError::Unavailable(why.to_owned())
}

fn membership_error(
    e: RaftError<RaftNodeId, ClientWriteError<RaftNodeId, BasicNode>>,
) -> MembershipError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => MembershipError::NotLeader {
            leader: forwarded_leader(&f),
        },
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
            MembershipError::Refused(e.to_string())
        }
        RaftError::Fatal(f) => MembershipError::Refused(format!("raft stopped: {f}")),
    }
}

/// The leader a refusal names, as text.
fn forwarded_leader(f: &openraft::error::ForwardToLeader<RaftNodeId, BasicNode>) -> Option<String> {
    f.leader_id
        .map(|id| leader_name(id, f.leader_node.as_ref()))
}

fn leader_name(id: RaftNodeId, node: Option<&BasicNode>) -> String {
    match node {
        Some(node) => format!("node {id} at {}", node.addr),
        None => format!("node {id}"),
    }
}

#[async_trait]
impl CommandLog for RaftLog {
    async fn submit(&self, command: Command) -> Result<Outcome, StateError> {
        // A follower refuses at once rather than queue behind commands that will fail the
        // same way. (A leader not yet acked by a quorum may still append: the commit decides.)
        if !self.raft.metrics().borrow().state.is_leader() {
            return Err(StateError::NotLeader {
                leader: self.leader().map(|(id, node)| leader_name(id, Some(&node))),
            });
        }
        let (reply, result) = oneshot::channel();
        self.queue
            .send((command, reply))
            .map_err(|_| unavailable("raft stopped"))?;
        // A leader cut off from its quorum never commits; give up after the bound rather than
        // hold the client forever. The entry may still commit later (when the partition heals
        // before another leader overwrites it), which a retry with the same token handles.
        match tokio::time::timeout(self.wait, result).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(unavailable("raft stopped")),
            Err(_) => Err(unavailable("the command was not committed in time")),
        }
    }
}

/// A replica's gRPC endpoint for Raft RPCs.
pub struct RaftServerHandle {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
    forward: ForwardSlot,
    blobs: BlobSlot,
}

impl RaftServerHandle {
    /// Starts serving requests other replicas forward to this one. Only the first call counts.
    pub fn serve_forwarded(&self, handler: Arc<dyn ForwardHandler>) {
        let _ = self.forward.set(handler);
    }

    /// Starts serving this replica's image bytes to its peers (`FetchBlob`). Only the first
    /// call counts.
    pub fn serve_blobs(&self, images: Arc<crate::images::ImageStore>) {
        let _ = self.blobs.set(images);
    }

    /// Where the endpoint listens (the real port when started on port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address peers use for this replica, as a [`BasicNode`].
    pub fn node(&self) -> BasicNode {
        BasicNode::new(format!("http://{}", self.addr))
    }

    /// Stops accepting RPCs and waits for the server to finish.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

impl Drop for RaftServerHandle {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Starts replica `id` over `store`: its Raft, and a gRPC endpoint for Raft RPCs on `listen`
/// (port 0 picks a free port; see [`RaftServerHandle::local_addr`]). A new group still needs
/// [`RaftLog::initialize`] on one replica.
///
/// From here on the store belongs to Raft: nothing else may apply commands to it.
pub async fn start_replica(
    id: RaftNodeId,
    store: Arc<Store>,
    log_store: SqliteLogStore,
    listen: SocketAddr,
    timers: RaftTimers,
    transport: canopy_pki::Transport,
) -> Result<(RaftLog, RaftServerHandle), ReplicaError> {
    let config = Arc::new(timers.config()?);
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let raft = Raft::new(
        id,
        config,
        GrpcNetworkFactory::new(transport.clone()),
        log_store,
        SqliteStateMachine::new(store.clone()),
    )
    .await?;

    let (stop, stopped) = oneshot::channel::<()>();
    let forward = ForwardSlot::default();
    let blobs = BlobSlot::default();
    let service = RaftTransportServer::new(RaftTransportService::new(
        raft.clone(),
        forward.clone(),
        blobs.clone(),
    ))
    .max_decoding_message_size(super::network::MAX_MESSAGE)
    // Forwarded answers (the same service) may be larger than Raft's messages.
    .max_encoding_message_size(
        super::network::MAX_MESSAGE.max(crate::forward::MAX_RESPONSE_BODY + (1 << 20)),
    );
    // Only other replicas may call: Raft RPCs and the requests they forward.
    let service = tonic::service::interceptor::InterceptedService::new(
        service,
        transport.authorize(&[canopy_pki::Role::Clc]),
    );
    let incoming = transport
        .incoming(listener, false)
        .map_err(|e| ReplicaError::Tls(e.to_string()))?;
    let task = tokio::spawn(async move {
        let served = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, id, "raft gRPC server failed");
        }
    });

    let (queue, queued) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(run_batcher(id, raft.clone(), queued));
    Ok((
        RaftLog {
            id,
            raft,
            store,
            wait: timers.request_wait,
            barrier: Arc::default(),
            queue,
        },
        RaftServerHandle {
            addr,
            stop: Some(stop),
            task,
            forward,
            blobs,
        },
    ))
}

#[cfg(test)]
mod batcher_tests {
    use super::*;

    #[test]
    fn a_lone_client_never_waits() {
        assert_eq!(gather_target(0, 0, Duration::ZERO), 1);
        assert_eq!(gather_target(1, 0, Duration::ZERO), 1);
        assert_eq!(gather_target(1, 5, Duration::ZERO), 1);
    }

    #[test]
    fn under_load_the_next_entry_waits_for_the_answered_clients_and_the_queued_ones() {
        assert_eq!(gather_target(8, 0, Duration::from_micros(200)), 8);
        assert_eq!(gather_target(32, 32, Duration::from_millis(1)), 64);
        assert_eq!(gather_target(400, 300, Duration::ZERO), MAX_BATCH);
    }

    #[test]
    fn the_answered_clients_get_a_round_trip_before_the_gap_counts() {
        let answered = Instant::now();
        let ms = Duration::from_millis;
        // Only queued commands so far: wait for the answered clients up to the bound, even
        // though more than a gap has passed since the answer.
        assert_eq!(
            gather_until(answered, None, answered + ms(3)),
            answered + MAX_GATHER
        );
        // Theirs began 4 ms after the answer: a gap between two, the bound counted from the
        // first of them.
        let first = answered + ms(4);
        assert_eq!(
            gather_until(answered, Some(first), first + ms(1)),
            first + ms(1) + GATHER_GAP
        );
        assert_eq!(
            gather_until(answered, Some(first), first + Duration::from_micros(4_500)),
            first + MAX_GATHER
        );
    }

    #[test]
    fn an_entry_answered_long_ago_says_nothing_of_the_load_now() {
        assert_eq!(gather_target(32, 0, MAX_GATHER), 1);
        assert_eq!(gather_target(32, 4, Duration::from_secs(3)), 1);
    }
}
