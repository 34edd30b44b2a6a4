//! Three in-process replicas joined by a network that loses, delays and partitions messages:
//! a minority cannot commit, a majority elects and goes on, and once the faults are lifted
//! every replica converges to the same state.
//!
//! The replicas are the real ones (SQLite log store and state machine, the production timers);
//! only the transport is replaced by [`Router`], which hands each RPC straight to the target's
//! `Raft` unless the fault table says otherwise. Losses are drawn from a seeded generator, so a
//! failing run can be replayed with the seed it prints (`CANOPY_FAULT_SEED`), as far as the
//! scheduling of the tasks allows.

use std::collections::{BTreeMap, BTreeSet};
use std::error::Error as StdError;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use canopy_common::{InstanceId, ZoneName};
use openraft::error::{
    ClientWriteError, InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError,
    Unreachable,
};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, ClientWriteResponse, InstallSnapshotRequest,
    InstallSnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{BasicNode, Raft, RaftMetrics};
use tempfile::TempDir;
use tokio::task::JoinHandle;

use super::tests::{World, state_of, t};
use super::*;
use crate::state::{Command, InstanceFilter, Outcome, Store};

/// The bound on every wait for something that must happen (an election, a catch-up).
const WAIT: Duration = Duration::from_secs(20);

/// How long a write that must not commit is given to prove it wrong. Several election
/// timeouts and heartbeats: a write that could commit would have.
const NO_COMMIT_WINDOW: Duration = Duration::from_secs(2);

/// The replicas' ids.
const IDS: [RaftNodeId; 3] = [1, 2, 3];

// ---------------------------------------------------------------------------------------------
// The faulty network
// ---------------------------------------------------------------------------------------------

/// Why a message did not arrive, or its answer did not come back.
#[derive(Debug, thiserror::Error)]
enum Fault {
    #[error("link {from} -> {to} is cut")]
    Cut { from: RaftNodeId, to: RaftNodeId },
    #[error("message {from} -> {to} lost")]
    Lost { from: RaftNodeId, to: RaftNodeId },
    #[error("no replica {0} in the router")]
    Absent(RaftNodeId),
}

impl Fault {
    /// A cut link is a peer that cannot be reached (openraft backs off); a lost message is a
    /// network error (retried with the next heartbeat or entry).
    fn into_rpc_error<E: StdError>(self) -> RPCError<RaftNodeId, BasicNode, E> {
        match self {
            Fault::Cut { .. } | Fault::Absent(_) => RPCError::Unreachable(Unreachable::new(&self)),
            Fault::Lost { .. } => RPCError::Network(NetworkError::new(&self)),
        }
    }
}

/// What the router did with the messages it was given, to check that a fault was in effect.
#[derive(Debug, Clone, Copy, Default)]
struct Stats {
    delivered: u64,
    lost: u64,
    refused: u64,
}

/// The fault table. Links are directed: `(from, to)`.
#[derive(Debug)]
struct Faults {
    cut: BTreeSet<(RaftNodeId, RaftNodeId)>,
    /// Chance, in percent, that a message (request or answer) is lost.
    loss_percent: u64,
    /// Each request waits a time drawn from this inclusive range (milliseconds) before it
    /// is delivered.
    delay_ms: (u64, u64),
    /// xorshift64 state: never zero.
    rng: u64,
    stats: Stats,
}

impl Faults {
    fn next(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }

    fn lose(&mut self) -> bool {
        self.loss_percent > 0 && self.next() % 100 < self.loss_percent
    }

    /// Whether a message from `from` to `to` gets through a cut and the loss draw.
    fn pass(&mut self, from: RaftNodeId, to: RaftNodeId) -> Result<(), Fault> {
        if self.cut.contains(&(from, to)) {
            self.stats.refused += 1;
            return Err(Fault::Cut { from, to });
        }
        if self.lose() {
            self.stats.lost += 1;
            return Err(Fault::Lost { from, to });
        }
        Ok(())
    }

    fn delay(&mut self) -> Duration {
        let (min, max) = self.delay_ms;
        if max == 0 {
            return Duration::ZERO;
        }
        Duration::from_millis(min + self.next() % (max - min + 1))
    }
}

/// Every replica's `Raft` by id, and the faults between them.
struct Router {
    rafts: Mutex<BTreeMap<RaftNodeId, Raft<TypeConfig>>>,
    faults: Mutex<Faults>,
}

impl Router {
    fn new(seed: u64) -> Arc<Router> {
        Arc::new(Router {
            rafts: Mutex::new(BTreeMap::new()),
            faults: Mutex::new(Faults {
                cut: BTreeSet::new(),
                loss_percent: 0,
                delay_ms: (0, 0),
                rng: seed.max(1),
                stats: Stats::default(),
            }),
        })
    }

    fn add(&self, id: RaftNodeId, raft: Raft<TypeConfig>) {
        self.rafts.lock().unwrap().insert(id, raft);
    }

    fn faults(&self) -> std::sync::MutexGuard<'_, Faults> {
        self.faults.lock().unwrap()
    }

    /// Cuts every link between replicas of different groups, both ways.
    fn partition(&self, groups: &[&[RaftNodeId]]) {
        let mut faults = self.faults();
        for (i, a) in groups.iter().enumerate() {
            for (j, b) in groups.iter().enumerate() {
                if i != j {
                    for &from in *a {
                        for &to in *b {
                            faults.cut.insert((from, to));
                        }
                    }
                }
            }
        }
    }

    /// Cuts `id` off from every other replica, both ways.
    fn isolate(&self, id: RaftNodeId) {
        let rest: Vec<RaftNodeId> = IDS.into_iter().filter(|&x| x != id).collect();
        self.partition(&[&[id], &rest]);
    }

    /// Reconnects every link.
    fn heal(&self) {
        self.faults().cut.clear();
    }

    /// Loses `loss_percent` of all messages and delays each request by `delay_ms`.
    fn degrade(&self, loss_percent: u64, delay_ms: (u64, u64)) {
        assert!(loss_percent < 100 && delay_ms.0 <= delay_ms.1);
        let mut faults = self.faults();
        faults.loss_percent = loss_percent;
        faults.delay_ms = delay_ms;
    }

    /// No more losses or delays.
    fn calm(&self) {
        self.degrade(0, (0, 0));
    }

    fn stats(&self) -> Stats {
        self.faults().stats
    }

    /// A request leaves `from` for `to`: the target, and how long the request travels.
    fn send(
        &self,
        from: RaftNodeId,
        to: RaftNodeId,
    ) -> Result<(Raft<TypeConfig>, Duration), Fault> {
        let delay = {
            let mut faults = self.faults();
            faults.pass(from, to)?;
            faults.delay()
        };
        let raft = self.rafts.lock().unwrap().get(&to).cloned();
        Ok((raft.ok_or(Fault::Absent(to))?, delay))
    }

    /// The request reaches `to`, unless the link was cut while it travelled.
    fn arrive(&self, from: RaftNodeId, to: RaftNodeId) -> Result<(), Fault> {
        let mut faults = self.faults();
        if faults.cut.contains(&(from, to)) {
            faults.stats.refused += 1;
            return Err(Fault::Cut { from, to });
        }
        faults.stats.delivered += 1;
        Ok(())
    }

    /// The answer travels back from `from` (the target) to `to`: it may be lost although the
    /// target acted on the request.
    fn answer(&self, from: RaftNodeId, to: RaftNodeId) -> Result<(), Fault> {
        self.faults().pass(from, to)
    }
}

/// Makes a [`MemNetwork`] from one replica to each target.
struct MemNetworkFactory {
    from: RaftNodeId,
    router: Arc<Router>,
}

impl RaftNetworkFactory<TypeConfig> for MemNetworkFactory {
    type Network = MemNetwork;

    async fn new_client(&mut self, target: RaftNodeId, _node: &BasicNode) -> MemNetwork {
        MemNetwork {
            from: self.from,
            to: target,
            router: self.router.clone(),
        }
    }
}

/// The Raft RPCs from one replica to another, through the [`Router`].
struct MemNetwork {
    from: RaftNodeId,
    to: RaftNodeId,
    router: Arc<Router>,
}

type RpcResult<T, E = openraft::error::Infallible> =
    Result<T, RPCError<RaftNodeId, BasicNode, RaftError<RaftNodeId, E>>>;

impl MemNetwork {
    /// Carries one request to the target's `Raft` and its answer back, through the faults.
    async fn deliver<Resp, E, F, Fut>(&self, call: F) -> RpcResult<Resp, E>
    where
        E: StdError,
        F: FnOnce(Raft<TypeConfig>) -> Fut,
        Fut: Future<Output = Result<Resp, RaftError<RaftNodeId, E>>>,
    {
        let (raft, delay) = self
            .router
            .send(self.from, self.to)
            .map_err(Fault::into_rpc_error)?;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        self.router
            .arrive(self.from, self.to)
            .map_err(Fault::into_rpc_error)?;
        let reply = call(raft).await;
        self.router
            .answer(self.to, self.from)
            .map_err(Fault::into_rpc_error)?;
        reply.map_err(|e| RPCError::RemoteError(RemoteError::new(self.to, e)))
    }
}

impl RaftNetwork<TypeConfig> for MemNetwork {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<RaftNodeId>> {
        self.deliver(|raft| async move { raft.append_entries(rpc).await })
            .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<RaftNodeId>, InstallSnapshotError> {
        self.deliver(|raft| async move { raft.install_snapshot(rpc).await })
            .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<RaftNodeId>,
        _option: RPCOption,
    ) -> RpcResult<VoteResponse<RaftNodeId>> {
        self.deliver(|raft| async move { raft.vote(rpc).await })
            .await
    }

    /// A healed link is used again soon, so convergence is not paced by the default 500 ms.
    fn backoff(&self) -> Backoff {
        Backoff::new(std::iter::repeat(Duration::from_millis(100)))
    }
}

// ---------------------------------------------------------------------------------------------
// The cluster
// ---------------------------------------------------------------------------------------------

struct Replica {
    raft: Raft<TypeConfig>,
    store: Arc<Store>,
    _dir: TempDir,
}

struct Cluster {
    router: Arc<Router>,
    replicas: BTreeMap<RaftNodeId, Replica>,
}

type WriteResult = Result<
    ClientWriteResponse<TypeConfig>,
    RaftError<RaftNodeId, ClientWriteError<RaftNodeId, BasicNode>>,
>;

impl Cluster {
    /// Replicas 1..=3 with the production timers, each over its own database file,
    /// initialized as one group. The seed is `CANOPY_FAULT_SEED` if set, else `seed`.
    async fn start(seed: u64) -> Cluster {
        let seed = std::env::var("CANOPY_FAULT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(seed);
        eprintln!("fault seed: {seed} (set CANOPY_FAULT_SEED to replay)");
        let router = Router::new(seed);
        let config = Arc::new(RaftTimers::default().config().unwrap());
        let mut replicas = BTreeMap::new();
        let mut members = BTreeMap::new();
        for id in IDS {
            let dir = tempfile::tempdir().unwrap();
            let store = Arc::new(Store::open(&dir.path().join("clc.db")).await.unwrap());
            let raft = Raft::new(
                id,
                config.clone(),
                MemNetworkFactory {
                    from: id,
                    router: router.clone(),
                },
                SqliteLogStore::new(&store),
                SqliteStateMachine::new(store.clone()),
            )
            .await
            .unwrap();
            router.add(id, raft.clone());
            members.insert(id, BasicNode::new(format!("mem://{id}")));
            replicas.insert(
                id,
                Replica {
                    raft,
                    store,
                    _dir: dir,
                },
            );
        }
        replicas[&1].raft.initialize(members).await.unwrap();
        Cluster { router, replicas }
    }

    fn raft(&self, id: RaftNodeId) -> &Raft<TypeConfig> {
        &self.replicas[&id].raft
    }

    fn store(&self, id: RaftNodeId) -> &Store {
        &self.replicas[&id].store
    }

    fn metrics(&self, id: RaftNodeId) -> RaftMetrics<RaftNodeId, BasicNode> {
        self.raft(id).metrics().borrow().clone()
    }

    fn applied(&self, id: RaftNodeId) -> Option<u64> {
        self.metrics(id).last_applied.map(|l| l.index)
    }

    /// Waits until every replica of `ids` names the same leader, one of `ids`, that knows it
    /// leads, and returns it.
    async fn leader_among(&self, ids: &[RaftNodeId]) -> RaftNodeId {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let named: Vec<Option<RaftNodeId>> = ids
                .iter()
                .map(|&id| self.metrics(id).current_leader)
                .collect();
            if let Some(Some(leader)) = named.first().copied()
                && named.iter().all(|l| *l == Some(leader))
                && ids.contains(&leader)
                && self.metrics(leader).state.is_leader()
            {
                return leader;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "replicas {ids:?} agree on no leader within {WAIT:?}: they name {named:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until all replicas name the same leader and have applied all of its log, and
    /// returns the leader and that log index.
    async fn converge(&self) -> (RaftNodeId, u64) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let all: Vec<_> = IDS.iter().map(|&id| self.metrics(id)).collect();
            let leader = all[0].current_leader;
            if let Some(leader) = leader
                && all.iter().all(|m| m.current_leader == Some(leader))
                && let Some(lm) = all.iter().find(|m| m.id == leader)
                && lm.state.is_leader()
                && let Some(index) = lm.last_log_index
                && all.iter().all(|m| {
                    m.last_log_index == Some(index)
                        && m.last_applied.map(|l| l.index) == Some(index)
                })
            {
                return (leader, index);
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "replicas did not converge within {WAIT:?}: {}",
                summary(&all)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Asserts every replica holds the same state, and returns it.
    async fn same_state(&self) -> String {
        let expected = state_of(self.store(1)).await;
        let digest = self.store(1).digest().await.unwrap();
        for id in [2, 3] {
            let got = state_of(self.store(id)).await;
            assert!(
                got == expected,
                "replica {id} differs from replica 1:\n{got}\n---\n{expected}"
            );
            // The admin API's digest (what the lab's drill compares) agrees.
            assert_eq!(
                self.store(id).digest().await.unwrap(),
                digest,
                "replica {id}'s state digest"
            );
        }
        expected
    }

    /// A replica that believes it leads: the one with the highest term, if any.
    fn some_leader(&self) -> Option<RaftNodeId> {
        IDS.iter()
            .map(|&id| self.metrics(id))
            .filter(|m| m.state.is_leader())
            .max_by_key(|m| m.current_term)
            .map(|m| m.id)
    }

    /// Submits `command` to whichever replica leads, again on a refusal or when no answer
    /// comes within a few seconds, until it is acknowledged. A retry after a timeout may put
    /// the command in the log twice; the client token makes the second one a replay.
    async fn write_retrying(&self, command: &Command) -> (RaftResponse, u32) {
        let deadline = tokio::time::Instant::now() + 3 * WAIT;
        let mut attempts = 0;
        loop {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{command:?} not acknowledged after {attempts} attempts"
            );
            let Some(leader) = self.some_leader() else {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            attempts += 1;
            let write = self.raft(leader).client_write(command.clone().into());
            match tokio::time::timeout(Duration::from_secs(3), write).await {
                Ok(Ok(response)) => return (response.data, attempts),
                Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) | Err(_) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Ok(Err(e)) => panic!("writing {command:?} on {leader} failed: {e}"),
            }
        }
    }

    /// [`Cluster::write_retrying`] for a command not retried after a timeout in practice
    /// (the network is healthy): what applying it produced.
    async fn submit(&self, command: Command) -> RaftResponse {
        self.write_retrying(&command).await.0
    }

    /// Snapshots replica `id` and purges its log up to the snapshot, so that a replica
    /// lagging behind that point can only catch up from a snapshot. Returns the purge point.
    async fn snapshot_and_purge(&self, id: RaftNodeId) -> u64 {
        let raft = self.raft(id);
        let index = self.applied(id).expect("the replica applied entries");
        raft.trigger().snapshot().await.unwrap();
        raft.wait(Some(WAIT))
            .metrics(
                |m| m.snapshot.is_some_and(|s| s.index >= index),
                format!("replica {id} builds a snapshot at {index}"),
            )
            .await
            .unwrap();
        raft.trigger().purge_log(index).await.unwrap();
        raft.wait(Some(WAIT))
            .metrics(
                |m| m.purged.is_some_and(|p| p.index >= index),
                format!("replica {id} purges its log up to {index}"),
            )
            .await
            .unwrap();
        index
    }

    async fn shutdown(self) {
        for replica in self.replicas.values() {
            let _ = replica.raft.shutdown().await;
        }
    }
}

fn summary(all: &[RaftMetrics<RaftNodeId, BasicNode>]) -> String {
    all.iter()
        .map(|m| {
            format!(
                "[{} {:?} term {} leader {:?} log {:?} applied {:?}]",
                m.id,
                m.state,
                m.current_term,
                m.current_leader,
                m.last_log_index,
                m.last_applied.map(|l| l.index)
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Starts writing `command` on `raft` without waiting for the answer.
fn write_in_background(raft: &Raft<TypeConfig>, command: Command) -> JoinHandle<WriteResult> {
    let raft = raft.clone();
    tokio::spawn(async move { raft.client_write(command.into()).await })
}

/// Waits for a background write's answer.
async fn answer_of(pending: JoinHandle<WriteResult>) -> WriteResult {
    tokio::time::timeout(WAIT, pending)
        .await
        .unwrap_or_else(|_| panic!("the write got no answer within {WAIT:?}"))
        .unwrap()
}

fn zone(name: &str) -> ZoneName {
    ZoneName::parse(name).unwrap()
}

fn register_zone(name: &str) -> Command {
    Command::RegisterZone {
        zone: zone(name),
        endpoint: format!("http://{name}"),
        at: t(5),
    }
}

/// A launch of one instance with its own client token.
fn launch(w: &World, token: &str) -> Command {
    let mut command = w.launch(1, 1);
    if let Command::LaunchInstances { client_token, .. } = &mut command {
        *client_token = Some(token.to_owned());
    }
    command
}

async fn zones_of(store: &Store) -> Vec<ZoneName> {
    store
        .zones()
        .await
        .unwrap()
        .into_iter()
        .map(|z| z.zone)
        .collect()
}

/// Starts the cluster and applies the account, image and zone every launch needs.
async fn start_with_world(seed: u64) -> (Cluster, World) {
    let cluster = Cluster::start(seed).await;
    cluster.leader_among(&IDS).await;
    let w = World::new();
    for command in w.setup() {
        cluster.submit(command).await;
    }
    cluster.converge().await;
    (cluster, w)
}

// ---------------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_minority_cannot_commit_majority_goes_on() {
    let (cluster, w) = start_with_world(0x5eed_0001).await;
    let (old, index) = cluster.converge().await;
    let majority: Vec<RaftNodeId> = IDS.into_iter().filter(|&id| id != old).collect();

    cluster.router.isolate(old);
    assert!(
        cluster.metrics(old).state.is_leader(),
        "replica {old} lost the lead before the test could isolate it"
    );

    // The isolated leader still takes the write into its log, but cannot commit it.
    let mut pending = write_in_background(cluster.raft(old), register_zone("zone-minority"));
    cluster
        .raft(old)
        .wait(Some(WAIT))
        .log_index(
            Some(index + 1),
            "the minority write reaches the old leader's log",
        )
        .await
        .unwrap();
    if let Ok(result) = tokio::time::timeout(NO_COMMIT_WINDOW, &mut pending).await {
        panic!("the minority side acknowledged a write: {result:?}");
    }
    // Meanwhile the majority may already have a new leader, whose first (blank) entry it
    // applies; the minority write is applied nowhere.
    assert_eq!(cluster.applied(old), Some(index), "the old leader applied");
    for id in IDS {
        assert!(
            !zones_of(cluster.store(id))
                .await
                .contains(&zone("zone-minority")),
            "replica {id} applied the minority write"
        );
    }

    // The majority elects one of its own and commits.
    let new = cluster.leader_among(&majority).await;
    assert!(cluster.metrics(new).current_term > cluster.metrics(old).current_term);
    // (`submit` picks the leader of the highest term: the majority's, not the old one.)
    cluster.submit(register_zone("zone-majority")).await;
    let launched = cluster.submit(launch(&w, "after-partition")).await;
    assert!(
        matches!(
            launched,
            RaftResponse::Applied(Outcome::Launched {
                replayed: false,
                ..
            })
        ),
        "{launched:?}"
    );
    let new = cluster.leader_among(&majority).await;
    let committed = cluster.metrics(new).last_log_index.unwrap();
    for &id in &majority {
        cluster
            .raft(id)
            .wait(Some(WAIT))
            .applied_index_at_least(Some(committed), "the majority applies its writes")
            .await
            .unwrap();
    }
    // Two replicas think they lead, and the old one still has nothing committed.
    assert!(cluster.metrics(old).state.is_leader());
    assert_eq!(cluster.applied(old), Some(index));
    assert!(!pending.is_finished(), "the minority write was answered");
    assert!(cluster.router.stats().refused > 0);

    cluster.router.heal();
    // The old leader's entry is overwritten by the new leader's log: its writer learns the
    // write did not happen.
    match answer_of(pending).await {
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {}
        other => panic!("the unacknowledged write should be refused, got {other:?}"),
    }
    cluster
        .raft(old)
        .wait(Some(WAIT))
        .metrics(
            |m| !m.state.is_leader() && m.current_leader.is_some_and(|l| l != old),
            "the old leader steps down and follows the new one",
        )
        .await
        .unwrap();
    cluster.converge().await;

    let state = cluster.same_state().await;
    let zones = zones_of(cluster.store(old)).await;
    assert!(zones.contains(&zone("zone-majority")), "{state}");
    assert!(!zones.contains(&zone("zone-minority")), "{state}");
    assert_eq!(
        cluster
            .store(old)
            .instances(&InstanceFilter::default())
            .await
            .unwrap()
            .len(),
        1
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_cut_off_catches_up_after_healing() {
    let (cluster, w) = start_with_world(0x5eed_0002).await;
    let (leader, index) = cluster.converge().await;
    let cut = IDS.into_iter().find(|&id| id != leader).unwrap();
    let connected: Vec<RaftNodeId> = IDS.into_iter().filter(|&id| id != cut).collect();

    cluster.router.isolate(cut);
    for n in 0..20 {
        cluster.submit(launch(&w, &format!("cut-off-{n}"))).await;
    }
    let leader = cluster.leader_among(&connected).await;
    let last = cluster.metrics(leader).last_log_index.unwrap();
    for &id in &connected {
        cluster
            .raft(id)
            .wait(Some(WAIT))
            .applied_index_at_least(Some(last), "the connected replicas apply the writes")
            .await
            .unwrap();
    }
    assert_eq!(
        cluster.applied(cut),
        Some(index),
        "the cut-off follower saw writes"
    );

    // Both replicas that could lead after healing drop the entries the cut-off one misses,
    // so it can only catch up by installing a snapshot.
    let mut purged = u64::MAX;
    for &id in &connected {
        purged = purged.min(cluster.snapshot_and_purge(id).await);
    }
    assert!(purged > index);
    assert!(cluster.metrics(cut).snapshot.is_none());

    cluster.router.heal();
    cluster.converge().await;
    let installed = cluster.metrics(cut).snapshot;
    assert!(
        installed.is_some_and(|s| s.index >= purged),
        "replica {cut} caught up without installing a snapshot at or past {purged}: {installed:?}"
    );
    cluster.same_state().await;
    assert_eq!(
        cluster
            .store(cut)
            .instances(&InstanceFilter::default())
            .await
            .unwrap()
            .len(),
        20
    );

    // And it follows the log again from there.
    cluster.submit(launch(&w, "after-healing")).await;
    cluster.converge().await;
    cluster.same_state().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lossy_and_slow_links_still_converge() {
    let (cluster, w) = start_with_world(0x5eed_0003).await;
    cluster.router.degrade(20, (5, 20));

    let commands: Vec<Command> = (0..50).map(|n| launch(&w, &format!("lossy-{n}"))).collect();
    let mut retried = 0;
    for (n, command) in commands.iter().enumerate() {
        let Command::LaunchInstances { reservation_id, .. } = command else {
            unreachable!()
        };
        let (response, attempts) = cluster.write_retrying(command).await;
        retried += attempts - 1;
        match response {
            RaftResponse::Applied(Outcome::Launched {
                reservation_id: got,
                ..
            }) => assert_eq!(&got, reservation_id),
            other => panic!("{command:?} gave {other:?}"),
        }
        // A client that did not hear the answer sends the same request again: it is in the
        // log twice, and the second is a replay of the first.
        if n % 10 == 0 {
            let (again, _) = cluster.write_retrying(command).await;
            assert_eq!(
                again,
                RaftResponse::Applied(Outcome::Launched {
                    reservation_id: reservation_id.clone(),
                    replayed: true,
                })
            );
        }
    }
    let stats = cluster.router.stats();
    eprintln!("lossy links: {stats:?}, {retried} writes retried after a timeout or refusal");
    assert!(stats.lost > 0, "no message was lost: {stats:?}");

    cluster.router.calm();
    cluster.converge().await;
    cluster.same_state().await;
    // Every acknowledged launch is there exactly once, on every replica.
    let mut expected: Vec<(String, InstanceId)> = commands
        .iter()
        .map(|c| match c {
            Command::LaunchInstances {
                client_token,
                instances,
                ..
            } => (
                client_token.clone().unwrap(),
                instances[0].instance_id.clone(),
            ),
            _ => unreachable!(),
        })
        .collect();
    expected.sort();
    for id in IDS {
        let mut launched: Vec<(String, InstanceId)> = cluster
            .store(id)
            .instances(&InstanceFilter::default())
            .await
            .unwrap()
            .into_iter()
            .map(|i| (i.client_token.unwrap(), i.instance_id))
            .collect();
        launched.sort();
        assert_eq!(launched, expected, "replica {id}");
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_majority_anywhere_nothing_commits_until_healed() {
    let (cluster, w) = start_with_world(0x5eed_0004).await;
    let (old, index) = cluster.converge().await;
    let old_term = cluster.metrics(old).current_term;

    cluster.router.partition(&[&[1], &[2], &[3]]);
    assert!(cluster.metrics(old).state.is_leader());
    let mut pending = write_in_background(cluster.raft(old), register_zone("zone-split"));

    // The others campaign and fail: their terms rise, nobody wins.
    let deadline = tokio::time::Instant::now() + WAIT;
    while IDS
        .iter()
        .all(|&id| cluster.metrics(id).current_term <= old_term + 1)
    {
        assert!(tokio::time::Instant::now() < deadline, "nobody campaigned");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for id in IDS.into_iter().filter(|&id| id != old) {
        match tokio::time::timeout(
            WAIT,
            cluster
                .raft(id)
                .client_write(register_zone("zone-x").into()),
        )
        .await
        {
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => {}
            other => panic!("replica {id} without a majority took a write: {other:?}"),
        }
    }
    if let Ok(result) = tokio::time::timeout(NO_COMMIT_WINDOW, &mut pending).await {
        panic!("a write committed without a majority: {result:?}");
    }
    for id in IDS {
        assert_eq!(cluster.applied(id), Some(index), "replica {id} applied");
        if id != old {
            assert!(
                !cluster.metrics(id).state.is_leader(),
                "replica {id} leads alone"
            );
        }
    }

    cluster.router.heal();
    // Whoever wins decides the old leader's pending entry: kept if the old leader wins again
    // (its log is the longest), dropped otherwise. Its writer is told which, and the state
    // agrees with what it was told.
    let acknowledged = match answer_of(pending).await {
        Ok(response) => {
            assert_eq!(response.data, RaftResponse::Applied(Outcome::Done));
            true
        }
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => false,
        Err(e) => panic!("the pending write failed: {e}"),
    };
    cluster.converge().await;
    cluster.submit(launch(&w, "after-split")).await;
    cluster.converge().await;
    let state = cluster.same_state().await;
    let zones = zones_of(cluster.store(1)).await;
    assert_eq!(zones.contains(&zone("zone-split")), acknowledged, "{state}");
    assert!(!zones.contains(&zone("zone-x")), "{state}");
    assert_eq!(
        cluster
            .store(1)
            .instances(&InstanceFilter::default())
            .await
            .unwrap()
            .len(),
        1
    );
    cluster.shutdown().await;
}
