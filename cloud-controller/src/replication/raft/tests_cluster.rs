//! Three in-process replicas talking Raft over gRPC on loopback: election, replication,
//! refusal on followers, failover, and rejections that match the single-replica log.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use canopy_common::{InstanceId, ZoneName};
use openraft::BasicNode;
use tempfile::TempDir;

use super::tests::{World, state_of, t};
use super::*;
use crate::replication::{CommandLog, LocalLog};
use crate::state::{Command, InstanceAction, InstanceFilter, StateError, Store};

const WAIT: Duration = Duration::from_secs(15);

async fn instance_count(store: &Store) -> usize {
    store
        .instances(&InstanceFilter::default())
        .await
        .unwrap()
        .len()
}

struct Replica {
    log: RaftLog,
    server: Option<RaftServerHandle>,
    _dir: TempDir,
}

struct Cluster {
    replicas: Vec<Replica>,
}

impl Cluster {
    /// Three replicas, ids 1..=3, on free loopback ports, initialized as one group.
    async fn start() -> Cluster {
        Cluster::start_with(|_| canopy_pki::Transport::Plaintext).await
    }

    /// The same, each replica's gRPC going through `transport(id)`.
    async fn start_with(transport: impl Fn(u64) -> canopy_pki::Transport) -> Cluster {
        let mut replicas = Vec::new();
        let mut members = BTreeMap::new();
        for id in 1..=3u64 {
            let dir = tempfile::tempdir().unwrap();
            let store = Arc::new(Store::open(&dir.path().join("clc.db")).await.unwrap());
            let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
            let (log, server) = start_replica(
                id,
                store.clone(),
                SqliteLogStore::new(&store),
                listen,
                RaftTimers::default(),
                transport(id),
            )
            .await
            .unwrap();
            members.insert(id, server.node());
            replicas.push(Replica {
                log,
                server: Some(server),
                _dir: dir,
            });
        }
        replicas[0].log.initialize(members).await.unwrap();
        Cluster { replicas }
    }

    fn replica(&self, id: u64) -> &Replica {
        &self.replicas[usize::try_from(id - 1).unwrap()]
    }

    fn live(&self) -> impl Iterator<Item = &Replica> {
        self.replicas.iter().filter(|r| r.server.is_some())
    }

    /// Waits until every live replica names the same live leader, and returns it.
    async fn leader(&self) -> u64 {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let leaders: Vec<Option<u64>> = self
                .live()
                .map(|r| r.log.metrics().current_leader)
                .collect();
            if let Some(Some(leader)) = leaders.first().copied()
                && leaders.iter().all(|l| *l == Some(leader))
                && self.live().any(|r| r.log.id() == leader)
                && self.replica(leader).log.metrics().state.is_leader()
            {
                return leader;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no agreed leader: {leaders:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until every live replica applied all of `id`'s log. (`id`'s own applied index
    /// in the metrics may lag behind what `submit` already returned.)
    async fn converge(&self, id: u64) -> u64 {
        let index = self
            .replica(id)
            .log
            .metrics()
            .last_log_index
            .expect("the leader has a log");
        for r in self.live() {
            r.log
                .raft()
                .wait(Some(WAIT))
                .applied_index_at_least(Some(index), "converge")
                .await
                .unwrap();
        }
        index
    }

    /// Stops replica `id`'s Raft and its RPC endpoint; its store stays readable.
    async fn stop(&mut self, id: u64) {
        let replica = &mut self.replicas[usize::try_from(id - 1).unwrap()];
        replica.log.shutdown().await;
        if let Some(server) = replica.server.take() {
            server.shutdown().await;
        }
    }

    async fn shutdown(mut self) {
        for id in 1..=3 {
            self.stop(id).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_elect_a_leader_and_apply_the_same_commands() {
    let cluster = Cluster::start().await;
    let leader = cluster.leader().await;
    let log = &cluster.replica(leader).log;

    let w = World::new();
    for command in w.setup() {
        log.submit(command).await.unwrap();
    }
    for n in 1..=3 {
        log.submit(w.launch(n, 2)).await.unwrap();
    }

    let index = cluster.converge(leader).await;
    let expected = state_of(log.store()).await;
    assert_eq!(instance_count(log.store()).await, 6);
    for r in &cluster.replicas {
        let metrics = r.log.metrics();
        assert_eq!(
            metrics.last_applied.map(|l| l.index),
            Some(index),
            "replica {}",
            r.log.id()
        );
        assert_eq!(
            state_of(r.log.store()).await,
            expected,
            "replica {}",
            r.log.id()
        );
        assert_eq!(
            r.log.store().last_applied().await.unwrap(),
            log.store().last_applied().await.unwrap()
        );
    }
    cluster.shutdown().await;
}

/// The state database commits without an fsync (`Store::open`), so a crash of the machine
/// may take its last commits; the log keeps them (it is fsynced) and the replica applies them
/// again when it restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_that_lost_its_last_commits_applies_them_again_from_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("clc.db");
    let older = dir.path().join("older.db");
    let start = || async {
        let store = Arc::new(Store::open(&state).await.unwrap());
        let log_store = SqliteLogStore::open(&dir.path().join("raft-log.db"))
            .await
            .unwrap();
        start_replica(
            1,
            store,
            log_store,
            "127.0.0.1:0".parse().unwrap(),
            RaftTimers::default(),
            canopy_pki::Transport::Plaintext,
        )
        .await
        .unwrap()
    };
    let w = World::new();
    let (log, server) = start().await;
    log.initialize(BTreeMap::from([(1, server.node())]))
        .await
        .unwrap();
    log.raft()
        .wait(Some(WAIT))
        .current_leader(1, "elected")
        .await
        .unwrap();
    for command in w.setup() {
        log.submit(command).await.unwrap();
    }
    log.submit(w.launch(2, 1)).await.unwrap();
    // The database as a crash could leave it: without the commits that follow.
    sqlx::query("VACUUM INTO ?")
        .bind(older.to_str().unwrap())
        .execute(log.store().pool())
        .await
        .unwrap();
    for n in 1..=3 {
        log.submit(w.launch(n, 0)).await.unwrap();
    }
    let expected = state_of(log.store()).await;
    let index = log.metrics().last_log_index;
    log.shutdown().await;
    server.shutdown().await;
    log.store().pool().close().await;
    drop(log);

    for suffix in ["-wal", "-shm"] {
        let mut file = state.clone().into_os_string();
        file.push(suffix);
        let _ = std::fs::remove_file(file);
    }
    std::fs::rename(&older, &state).unwrap();
    let (log, server) = start().await;
    assert_eq!(
        instance_count(log.store()).await,
        2,
        "the state starts as it was after the first launch"
    );
    log.raft()
        .wait(Some(WAIT))
        .applied_index_at_least(index, "re-applied")
        .await
        .unwrap();
    assert_eq!(state_of(log.store()).await, expected);
    log.shutdown().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_refuses_commands_and_names_the_leader() {
    let cluster = Cluster::start().await;
    let leader = cluster.leader().await;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let leader_addr = cluster.replica(leader).server.as_ref().unwrap().node().addr;

    let w = World::new();
    let err = cluster
        .replica(follower)
        .log
        .submit(w.setup().remove(0))
        .await
        .unwrap_err();
    match err {
        StateError::NotLeader { leader: Some(name) } => {
            assert_eq!(name, format!("node {leader} at {leader_addr}"));
        }
        other => panic!("expected NotLeader naming the leader, got {other:?}"),
    }
    let (id, node) = cluster.replica(follower).log.leader().unwrap();
    assert_eq!((id, node.addr), (leader, leader_addr));
    // Nothing was written anywhere.
    for r in &cluster.replicas {
        assert!(r.log.store().accounts().await.unwrap().is_empty());
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_leader_stops_the_others_elect_a_new_one_and_accept_writes() {
    let mut cluster = Cluster::start().await;
    let old = cluster.leader().await;
    let w = World::new();
    for command in w.setup() {
        cluster.replica(old).log.submit(command).await.unwrap();
    }
    cluster
        .replica(old)
        .log
        .submit(w.launch(2, 1))
        .await
        .unwrap();
    cluster.converge(old).await;
    let before = state_of(cluster.replica(old).log.store()).await;

    cluster.stop(old).await;
    let new = cluster.leader().await;
    assert_ne!(new, old);

    let log = &cluster.replica(new).log;
    log.submit(Command::RegisterZone {
        zone: ZoneName::parse("zone-b").unwrap(),
        endpoint: "http://cc-b".into(),
        at: t(5),
    })
    .await
    .unwrap();
    log.submit(w.launch(1, 0)).await.unwrap();
    cluster.converge(new).await;

    // The survivors agree, and hold the new writes.
    let after = state_of(log.store()).await;
    for r in cluster.live() {
        assert_eq!(state_of(r.log.store()).await, after);
    }
    assert_eq!(log.store().zones().await.unwrap().len(), 2);
    assert_eq!(instance_count(log.store()).await, 3);
    // The stopped leader kept everything committed before it stopped.
    assert_eq!(state_of(cluster.replica(old).log.store()).await, before);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejection_through_raft_is_the_same_as_through_the_local_log() {
    let cluster = Cluster::start().await;
    let leader = cluster.leader().await;
    let raft_log = &cluster.replica(leader).log;
    let local = LocalLog::new(Arc::new(Store::in_memory().await.unwrap()));

    let w = World::new();
    for command in w.setup() {
        raft_log.submit(command.clone()).await.unwrap();
        local.submit(command).await.unwrap();
    }
    let unknown = InstanceId::generate();
    let refused = [
        Command::RequestInstances {
            account_id: w.account.clone(),
            instance_ids: vec![unknown],
            action: InstanceAction::Stop,
            at: t(2),
        },
        // Over the tag limit: refused after writing, so the writes must be undone.
        w.launch(1, 51),
    ];
    for command in refused {
        let through_raft = raft_log.submit(command.clone()).await.unwrap_err();
        let through_local = local.submit(command).await.unwrap_err();
        assert_eq!(format!("{through_raft:?}"), format!("{through_local:?}"));
        assert!(
            !matches!(through_raft, StateError::NotLeader { .. }),
            "{through_raft:?}"
        );
    }
    // Rejections wrote nothing on any replica.
    cluster.converge(leader).await;
    for r in &cluster.replicas {
        assert_eq!(instance_count(r.log.store()).await, 0);
    }
    cluster.shutdown().await;
}

#[test]
fn not_leader_is_not_a_deterministic_rejection() {
    let err = StateError::NotLeader {
        leader: Some("node 2 at http://127.0.0.1:1".into()),
    };
    assert!(matches!(
        Rejection::try_from(err),
        Err(StateError::NotLeader { .. })
    ));
}

/// A replica named by an address that is not a URI is unreachable, not a panic.
#[tokio::test]
async fn a_bad_peer_address_is_unreachable() {
    use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
    let mut factory = GrpcNetworkFactory::new(Default::default());
    let mut client = factory.new_client(9, &BasicNode::new("not a uri")).await;
    let vote = openraft::raft::VoteRequest::new(openraft::Vote::new(1, 1), None);
    let err = client
        .vote(vote, RPCOption::new(Duration::from_millis(200)))
        .await
        .unwrap_err();
    assert!(
        matches!(err, openraft::error::RPCError::Unreachable(_)),
        "{err:?}"
    );
}

/// A replica that joins after the leader purged its log catches up by a snapshot sent over
/// `InstallSnapshot`, and ends with the same state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_replica_catches_up_from_a_snapshot_over_grpc() {
    let cluster = Cluster::start().await;
    let leader = cluster.leader().await;
    let log = &cluster.replica(leader).log;
    let w = World::new();
    for command in w.setup() {
        log.submit(command).await.unwrap();
    }
    log.submit(w.launch(2, 3)).await.unwrap();
    let index = cluster.converge(leader).await;

    log.raft().trigger().snapshot().await.unwrap();
    log.raft()
        .wait(Some(WAIT))
        .metrics(|m| m.snapshot.is_some_and(|s| s.index >= index), "snapshot")
        .await
        .unwrap();
    log.raft().trigger().purge_log(index).await.unwrap();
    log.raft()
        .wait(Some(WAIT))
        .metrics(|m| m.purged.is_some_and(|p| p.index >= index), "purge")
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("clc.db")).await.unwrap());
    let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let (learner, server) = start_replica(
        4,
        store.clone(),
        SqliteLogStore::new(&store),
        listen,
        RaftTimers::default(),
        Default::default(),
    )
    .await
    .unwrap();
    log.raft()
        .add_learner(4, server.node(), true)
        .await
        .unwrap();
    let last = log.metrics().last_log_index.unwrap();
    learner
        .raft()
        .wait(Some(WAIT))
        .applied_index_at_least(Some(last), "learner caught up")
        .await
        .unwrap();

    assert!(learner.metrics().snapshot.is_some(), "installed a snapshot");
    assert_eq!(state_of(learner.store()).await, state_of(log.store()).await);
    learner.shutdown().await;
    server.shutdown().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_commands_share_log_entries_and_keep_their_own_results() {
    let cluster = Cluster::start().await;
    let leader = cluster.leader().await;
    let log = cluster.replica(leader).log.clone();
    let w = World::new();
    for command in w.setup() {
        log.submit(command).await.unwrap();
    }
    let before = log.metrics().last_log_index.unwrap();

    // 200 launches at once, every fifth one a ClientToken repeat with other parameters,
    // which the state refuses: each caller must get its own command's result.
    const N: u32 = 200;
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..N {
        let log = log.clone();
        let mut command = w.launch(1, 0);
        if let Command::LaunchInstances {
            client_token,
            request_hash,
            ..
        } = &mut command
        {
            *client_token = Some(format!("t-{}", i - i % 5));
            if i % 5 == 4 {
                *request_hash = "other".into();
            }
        }
        calls.spawn(async move { (i, log.submit(command).await) });
    }
    let mut accepted = std::collections::BTreeMap::<u32, Vec<u32>>::new();
    while let Some(joined) = calls.join_next().await {
        let (i, result) = joined.unwrap();
        match result {
            Ok(_) => accepted.entry(i / 5).or_default().push(i % 5),
            Err(StateError::IdempotentParameterMismatch) => {}
            other => panic!("launch {i}: {other:?}"),
        }
    }
    // Calls 0..3 of each group of five share a token and parameters (one reservation); call
    // 4 conflicts with them, unless it ran first, in which case they conflict with it.
    assert_eq!(accepted.len(), usize::try_from(N / 5).unwrap());
    for (group, mut ok) in accepted {
        ok.sort_unstable();
        assert!(
            ok == [0, 1, 2, 3] || ok == [4],
            "group {group}: {ok:?} accepted"
        );
    }
    let entries = log.metrics().last_log_index.unwrap() - before;
    assert!(
        entries < u64::from(N) / 2,
        "{entries} log entries for {N} concurrent commands: no group commit"
    );

    let index = cluster.converge(leader).await;
    assert!(index > before);
    let expected = state_of(log.store()).await;
    for r in &cluster.replicas {
        assert_eq!(
            state_of(r.log.store()).await,
            expected,
            "replica {}",
            r.log.id()
        );
    }
    let reservations = log
        .store()
        .instances(&InstanceFilter::default())
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.reservation_id)
        .collect::<std::collections::BTreeSet<_>>();
    assert_eq!(reservations.len(), usize::try_from(N / 5).unwrap());
    cluster.shutdown().await;
}

/// Mutual TLS on the Raft port: three replicas with certificates from one CA elect and
/// replicate; a node's certificate is refused by role, a replica certificate from another CA
/// at the handshake, and only a replica of this cloud gets as far as Raft (which refuses the
/// garbage sent here on its own terms).
#[tokio::test]
async fn raft_rpcs_admit_only_this_clouds_replicas() {
    use canopy_pki::{CertificateAuthority, Identity, Role, Transport};
    use canopy_proto::v1::RaftBytes;
    use canopy_proto::v1::raft_transport_client::RaftTransportClient;

    let ca = CertificateAuthority::create("raft").unwrap();
    let tls = |ca: &CertificateAuthority, role: Role, name: &str| {
        let (files, _) = ca
            .issue_files(&Identity::new(role, name).unwrap(), &[])
            .unwrap();
        Transport::tls(&files, Default::default()).unwrap()
    };
    let cluster = Cluster::start_with(|id| tls(&ca, Role::Clc, &id.to_string())).await;
    let leader = cluster.leader().await;
    let w = World::new();
    cluster
        .replica(leader)
        .log
        .submit(w.setup().remove(0))
        .await
        .expect("a commit over TLS");

    let addr = cluster.replica(1).server.as_ref().unwrap().local_addr();
    let endpoint = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5));
    let vote = |transport: Transport| {
        let endpoint = endpoint.clone();
        async move {
            RaftTransportClient::new(transport.channel(endpoint, Role::Clc))
                .vote(RaftBytes {
                    payload: b"not a vote".to_vec(),
                })
                .await
                .expect_err("garbage is never a vote")
        }
    };
    let node = vote(tls(&ca, Role::Node, "hv-1")).await;
    assert_eq!(node.code(), tonic::Code::PermissionDenied, "{node:?}");
    let other = CertificateAuthority::create("other").unwrap();
    let foreign = vote(tls(&other, Role::Clc, "4")).await;
    assert!(
        !matches!(
            foreign.code(),
            tonic::Code::PermissionDenied | tonic::Code::InvalidArgument
        ),
        "a foreign replica got past the handshake: {foreign:?}"
    );
    let replica = vote(tls(&ca, Role::Clc, "9")).await;
    assert_eq!(
        replica.code(),
        tonic::Code::InvalidArgument,
        "a replica of this cloud reaches Raft: {replica:?}"
    );
}

/// Image bytes that one replica received reach the others once a committed image references
/// them; bytes that do not hash to their digest are not kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_copies_the_image_bytes_its_state_references() {
    use crate::images::ImageStore;
    use crate::replication::blobs::{self, BlobPeers};
    use canopy_common::{ImageId, Sha256Digest};
    use sha2::Digest;

    let cluster = Cluster::start().await;
    let leader = cluster.leader().await;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut stores = Vec::new();
    let mut peers = Vec::new();
    for r in &cluster.replicas {
        let images = Arc::new(ImageStore::open(r._dir.path().join("images")));
        r.server.as_ref().unwrap().serve_blobs(images.clone());
        let p = Arc::new(BlobPeers::new(
            r.log.clone(),
            canopy_pki::Transport::Plaintext,
        ));
        stores.push(images);
        peers.push(p);
    }
    // Replicas 2 and 3 run the copier; replica 1, where the bytes are, gets one pass later.
    for id in [2usize, 3] {
        tokio::spawn(blobs::run(
            peers[id - 1].clone(),
            stores[id - 1].clone(),
            stopped.clone(),
        ));
    }

    // A few MiB, so that the copy takes several chunks.
    let bytes: Vec<u8> = (0..(3 << 20) + 12345u32).map(|i| (i % 251) as u8).collect();
    let good = stores[0]
        .import_stream(tokio_stream::iter(
            bytes
                .chunks(100_000)
                .map(|c| Ok::<_, std::io::Error>(c.to_vec())),
        ))
        .await
        .unwrap()
        .sha256;
    // Replica 1 holds, under the digest of other bytes, bytes that do not match it (a
    // corrupted copy): no one may keep them.
    let claimed: [u8; 32] = sha2::Sha256::digest(b"the real bytes").into();
    let corrupt = Sha256Digest::from_bytes(&claimed);
    std::fs::write(stores[0].path(&corrupt), b"not the real bytes").unwrap();

    let w = World::new();
    let log = &cluster.replica(leader).log;
    for command in w.setup() {
        log.submit(command).await.unwrap();
    }
    for (digest, name) in [(&good, "good"), (&corrupt, "corrupt")] {
        let Command::RegisterImage { mut image } = w.setup().remove(1) else {
            unreachable!("setup's second command registers an image")
        };
        image.image_id = ImageId::generate();
        image.name = name.into();
        image.sha256 = Some(digest.clone());
        log.submit(Command::RegisterImage { image }).await.unwrap();
    }

    let deadline = tokio::time::Instant::now() + WAIT;
    while !stores[1..].iter().all(|s| s.contains(&good)) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the image bytes did not reach every replica"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for s in &stores[1..] {
        assert_eq!(std::fs::read(s.path(&good)).unwrap(), bytes);
        // A fresh copy is as young as a fresh import: the purger's age guard keeps it even
        // before the state that references it is seen.
        let purger_age = Duration::from_secs(600);
        assert!(
            s.remove_unreferenced(&Default::default(), purger_age)
                .is_empty()
        );
    }

    // A pass on a replica that lacks the corrupt digest tries every peer and keeps nothing:
    // replica 1's bytes do not hash to it, and the others do not have it.
    let done = blobs::pass(&peers[1], &stores[1]).await;
    assert_eq!(done.missing, 1);
    assert_eq!(done.failed, vec![corrupt.clone()]);
    for s in &stores[1..] {
        assert!(!s.contains(&corrupt));
        // Nothing left of the refused copies either.
        let names: Vec<String> = std::fs::read_dir(s.path(&good).parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec![good.to_string()]);
    }
    // Replica 1 has both: nothing to do.
    let done = blobs::pass(&peers[0], &stores[0]).await;
    assert_eq!(done, blobs::Pass::default());

    let _ = stop.send(true);
    cluster.shutdown().await;
}
