//! The Raft storage against openraft's own suite, plus what the suite cannot know about:
//! rejected commands, and snapshots of real state.

use std::collections::BTreeMap;
use std::sync::Arc;

use canopy_common::{
    AccountId, ImageId, InstanceId, ReservationId, ResourceId, Resources, SecurityGroupId, ZoneName,
};
use chrono::{TimeZone, Utc};
use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{CommittedLeaderId, EntryPayload, Membership};
use tempfile::TempDir;

use super::*;
use crate::state::{
    Command, Image, InstanceAction, InstanceFilter, NewInstance, StateError, Store, Tag,
};

pub(super) fn t(s: i64) -> chrono::DateTime<Utc> {
    Utc.timestamp_opt(1_700_000_000 + s, 0).unwrap()
}

pub(super) async fn temp_store() -> (TempDir, Arc<Store>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("clc.db")).await.unwrap();
    (dir, Arc::new(store))
}

/// Each suite test gets a fresh database file; the directory lives as long as the test.
struct TempStores;

impl StoreBuilder<TypeConfig, SqliteLogStore, SqliteStateMachine, TempDir> for TempStores {
    async fn build(&self) -> Result<(TempDir, SqliteLogStore, SqliteStateMachine), StorageError> {
        let (dir, store) = temp_store().await;
        Ok((
            dir,
            SqliteLogStore::new(&store),
            SqliteStateMachine::new(store),
        ))
    }
}

#[test]
fn openraft_storage_suite() {
    // The suite runs each test on a runtime of its own, so this is a plain #[test].
    Suite::test_all(TempStores).unwrap();
}

fn log_id(term: u64, index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

fn entry(index: u64, command: Command) -> Entry {
    Entry {
        log_id: log_id(1, index),
        payload: EntryPayload::Normal(command.into()),
    }
}

pub(super) struct World {
    pub(super) account: AccountId,
    pub(super) image: ImageId,
    pub(super) zone: ZoneName,
}

impl World {
    pub(super) fn new() -> World {
        World {
            account: AccountId::parse("123456789012").unwrap(),
            image: ImageId::generate(),
            zone: ZoneName::parse("zone-a").unwrap(),
        }
    }

    /// Account, image, zone: what a launch needs.
    pub(super) fn setup(&self) -> Vec<Command> {
        vec![
            Command::CreateAccount {
                account_id: self.account.clone(),
                name: "admin".into(),
                is_admin: true,
                access_key_id: "AKIDTEST".into(),
                secret_access_key: "secret".into(),
                at: t(0),
            },
            Command::RegisterImage {
                image: Image {
                    image_id: self.image.clone(),
                    owner_id: self.account.clone(),
                    name: "img".into(),
                    description: String::new(),
                    location: "sim://img".into(),
                    architecture: "x86_64".into(),
                    is_public: true,
                    state: "available".into(),
                    created_at: t(0),
                    kind: canopy_common::ImageKind::Machine,
                    kernel_id: None,
                    ramdisk_id: None,
                    sha256: None,
                    size_bytes: 0,
                    disk_format: None,
                    launch_permissions: vec![],
                    root_snapshot: None,
                    source_instance_id: None,
                    state_reason: None,
                },
            },
            Command::RegisterZone {
                zone: self.zone.clone(),
                endpoint: "http://cc".into(),
                at: t(0),
            },
        ]
    }

    pub(super) fn launch(&self, n: u32, tags: usize) -> Command {
        Command::LaunchInstances {
            reservation_id: ReservationId::generate(),
            account_id: self.account.clone(),
            client_token: Some(format!("token-{n}-{tags}")),
            request_hash: "h".into(),
            instances: (0..n)
                .map(|i| NewInstance {
                    instance_id: InstanceId::generate(),
                    launch_index: i,
                    image_id: self.image.clone(),
                    instance_type: "t2.micro".into(),
                    resources: Resources::new(1, 1024, 8),
                    zone: self.zone.clone(),
                    key_name: None,
                    public_key: None,
                    metadata_options: Default::default(),
                    security_groups: vec![],
                    user_data: Some(vec![0, 1, 2, 255]),
                    kernel_id: None,
                    ramdisk_id: None,
                })
                .collect(),
            tags: (0..tags)
                .map(|i| Tag {
                    key: format!("k{i}"),
                    value: "v".into(),
                })
                .collect(),
            at: t(1),
        }
    }
}

/// Every row of every table but the Raft log's, as text (`quote()` keeps types apart),
/// including AUTOINCREMENT counters.
async fn dump(store: &Store) -> BTreeMap<String, Vec<String>> {
    let tables: Vec<(String,)> = sqlx::query_as(
        r"SELECT name FROM sqlite_master WHERE type = 'table'
          AND name NOT LIKE 'raft\_%' ESCAPE '\' AND name NOT LIKE '\_%' ESCAPE '\'",
    )
    .fetch_all(store.pool())
    .await
    .unwrap();
    let mut out = BTreeMap::new();
    for (table,) in tables {
        let columns: Vec<(String,)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT name FROM pragma_table_info('{table}')"
        )))
        .fetch_all(store.pool())
        .await
        .unwrap();
        let expr = columns
            .iter()
            .map(|(c,)| format!("quote(\"{c}\")"))
            .collect::<Vec<_>>()
            .join(" || '|' || ");
        let rows: Vec<(String,)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {expr} FROM \"{table}\" ORDER BY 1"
        )))
        .fetch_all(store.pool())
        .await
        .unwrap();
        out.insert(table, rows.into_iter().map(|(r,)| r).collect());
    }
    out
}

/// `dump` without the state machine's own progress, which every applied entry moves.
pub(super) async fn dump_state(store: &Store) -> BTreeMap<String, Vec<String>> {
    let mut d = dump(store).await;
    for row in d.get_mut("meta").unwrap().iter_mut() {
        if row.starts_with("'raft_last_applied_log_id'") {
            row.clear();
        }
    }
    d
}

async fn apply_all(
    sm: &mut SqliteStateMachine,
    first: u64,
    commands: Vec<Command>,
) -> Vec<RaftResponse> {
    let entries: Vec<Entry> = commands
        .into_iter()
        .zip(first..)
        .map(|(c, i)| entry(i, c))
        .collect();
    sm.apply(entries).await.unwrap()
}

#[tokio::test]
async fn a_rejected_command_advances_last_applied_and_writes_nothing_else() {
    let (_dir, store) = temp_store().await;
    let mut sm = SqliteStateMachine::new(store.clone());
    let w = World::new();
    apply_all(&mut sm, 1, w.setup()).await;
    apply_all(&mut sm, 4, vec![w.launch(1, 1)]).await;
    let before = dump_state(&store).await;
    let counter = store.last_applied().await.unwrap();

    let unknown = InstanceId::generate();
    let responses = apply_all(
        &mut sm,
        5,
        vec![
            Command::RequestInstances {
                account_id: w.account.clone(),
                instance_ids: vec![unknown.clone()],
                action: InstanceAction::Stop,
                at: t(2),
            },
            // Refused only after the reservation, the instance and 50 tags were written:
            // the savepoint must take all of them back.
            w.launch(1, 51),
        ],
    )
    .await;

    assert_eq!(
        responses[0],
        RaftResponse::Rejected(Rejection::InstancesNotFound(vec![unknown.clone()]))
    );
    assert!(matches!(
        responses[0].clone().into_result(),
        Err(StateError::InstancesNotFound(ids)) if ids == vec![unknown]
    ));
    assert!(matches!(
        responses[1],
        RaftResponse::Rejected(Rejection::TagLimitExceeded(_))
    ));
    assert_eq!(sm.applied_state().await.unwrap().0, Some(log_id(1, 6)));
    assert_eq!(dump_state(&store).await, before);
    assert_eq!(store.last_applied().await.unwrap(), counter);
}

#[tokio::test]
async fn a_batch_that_fails_writes_nothing_and_the_next_batch_applies() {
    let (_dir, store) = temp_store().await;
    let mut sm = SqliteStateMachine::new(store.clone());
    let w = World::new();
    apply_all(&mut sm, 1, w.setup()).await;
    let first = w.launch(1, 0);
    apply_all(&mut sm, 4, vec![first.clone()]).await;
    let before = dump_state(&store).await;
    let counter = store.last_applied().await.unwrap();

    // Entry 5 applies; entry 6 reuses entry 4's reservation id (another client token), which
    // no check refuses and the reservations table's key fails: the whole batch goes.
    let second = w.launch(2, 0);
    let mut clash = w.launch(3, 0);
    if let (
        Command::LaunchInstances { reservation_id, .. },
        Command::LaunchInstances {
            reservation_id: taken,
            ..
        },
    ) = (&mut clash, &first)
    {
        *reservation_id = taken.clone();
    }
    let failed = sm.apply([entry(5, second.clone()), entry(6, clash)]).await;
    assert!(failed.is_err(), "{failed:?}");
    assert_eq!(dump_state(&store).await, before);
    assert_eq!(store.last_applied().await.unwrap(), counter);
    assert_eq!(sm.applied_state().await.unwrap().0, Some(log_id(1, 4)));

    // Nothing holds the write lock or an open transaction: the next batch applies (on a
    // connection left inside the failed transaction, its BEGIN would fail; on another, it
    // would wait out the busy timeout and fail).
    let responses = apply_all(&mut sm, 5, vec![second]).await;
    assert!(matches!(
        responses[0],
        RaftResponse::Applied(crate::state::Outcome::Launched {
            replayed: false,
            ..
        })
    ));
    assert_eq!(sm.applied_state().await.unwrap().0, Some(log_id(1, 5)));
    assert_eq!(store.last_applied().await.unwrap(), counter + 1);
}

#[tokio::test]
async fn blank_and_membership_entries_answer_no_command() {
    let (_dir, store) = temp_store().await;
    let mut sm = SqliteStateMachine::new(store);
    let membership = Membership::new(vec![[1, 2, 3].into()], None);
    let responses = sm
        .apply([
            Entry {
                log_id: log_id(1, 1),
                payload: EntryPayload::Blank,
            },
            Entry {
                log_id: log_id(1, 2),
                payload: EntryPayload::Membership(membership.clone()),
            },
        ])
        .await
        .unwrap();
    assert_eq!(
        responses,
        vec![RaftResponse::NoCommand, RaftResponse::NoCommand]
    );
    let (applied, stored) = sm.applied_state().await.unwrap();
    assert_eq!(applied, Some(log_id(1, 2)));
    assert_eq!(
        stored,
        StoredMembership::new(Some(log_id(1, 2)), membership)
    );
}

#[tokio::test]
async fn the_raft_path_leaves_the_same_rows_as_the_local_path() {
    let w = World::new();
    let mut commands = w.setup();
    commands.push(w.launch(2, 3));
    commands.push(w.launch(1, 51)); // rejected on both paths

    let (_d1, local) = temp_store().await;
    for c in &commands {
        let _ = local.apply(c).await;
    }
    let (_d2, replicated) = temp_store().await;
    apply_all(
        &mut SqliteStateMachine::new(replicated.clone()),
        1,
        commands,
    )
    .await;

    let mut raft_rows = dump_state(&replicated).await;
    raft_rows
        .get_mut("meta")
        .unwrap()
        .retain(|r| !r.is_empty() && !r.starts_with("'raft_"));
    assert_eq!(raft_rows, dump(&local).await);
}

/// A random batch as group commit builds it: launches that replay, mismatch or repeat a
/// client token (also within the batch), name an unknown image, carry too many or repeated
/// tag keys, span zones (one of them unregistered), mixed with other commands.
fn random_batch(w: &World, rng: &mut impl rand::Rng, known: &mut Vec<InstanceId>) -> Vec<Command> {
    let zones = [
        w.zone.clone(),
        ZoneName::parse("zone-b").unwrap(),
        ZoneName::parse("zone-gone").unwrap(),
    ];
    let mut batch = Vec::new();
    for _ in 0..rng.random_range(1..40) {
        if rng.random_bool(0.15) && !known.is_empty() {
            let id = known[rng.random_range(0..known.len())].clone();
            batch.push(if rng.random_bool(0.5) {
                Command::CreateTags {
                    account_id: w.account.clone(),
                    resource_ids: vec![ResourceId::Instance(id)],
                    tags: vec![Tag {
                        key: "extra".into(),
                        value: "x".into(),
                    }],
                }
            } else {
                Command::RequestInstances {
                    account_id: w.account.clone(),
                    instance_ids: vec![id],
                    action: InstanceAction::Terminate,
                    at: t(3),
                }
            });
            continue;
        }
        let image = if rng.random_bool(0.1) {
            ImageId::generate()
        } else {
            w.image.clone()
        };
        let tags = match rng.random_range(0..10) {
            0 => 51,
            1 => 50,
            n => n,
        };
        let user_data = match rng.random_range(0..3) {
            0 => None,
            1 => Some(Vec::new()),
            _ => Some(vec![0, 10, 255]),
        };
        let instances: Vec<NewInstance> = (0..rng.random_range(1..4))
            .map(|i| NewInstance {
                instance_id: InstanceId::generate(),
                launch_index: i,
                image_id: image.clone(),
                instance_type: "t2.micro".into(),
                resources: Resources::new(1, 1024, 8),
                zone: zones[rng.random_range(0..zones.len())].clone(),
                key_name: rng.random_bool(0.5).then(|| "key".to_owned()),
                public_key: rng
                    .random_bool(0.5)
                    .then(|| "ssh-ed25519 AAAA key".to_owned()),
                // Groups that do not exist: the launch is refused alike on every replica.
                metadata_options: Default::default(),
                security_groups: if rng.random_bool(0.1) {
                    vec![(SecurityGroupId::generate(), "nope".to_owned())]
                } else {
                    vec![]
                },
                user_data: user_data.clone(),
                kernel_id: None,
                ramdisk_id: None,
            })
            .collect();
        known.extend(instances.iter().map(|i| i.instance_id.clone()));
        batch.push(Command::LaunchInstances {
            reservation_id: ReservationId::generate(),
            account_id: w.account.clone(),
            client_token: rng
                .random_bool(0.8)
                .then(|| format!("token-{}", rng.random_range(0..30))),
            request_hash: format!("h{}", rng.random_range(0..2)),
            instances,
            tags: (0..tags)
                .map(|i| Tag {
                    key: format!("k{}", i % 52),
                    value: format!("v{i}"),
                })
                .chain(rng.random_bool(0.3).then(|| Tag {
                    key: "k0".into(),
                    value: "again".into(),
                }))
                .collect(),
            at: t(rng.random_range(1..100)),
        });
    }
    batch
}

#[tokio::test]
async fn a_batch_applies_as_its_commands_one_by_one() {
    use rand::SeedableRng;
    for seed in 0..12 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let w = World::new();
        let mut setup = w.setup();
        setup.push(Command::RegisterZone {
            zone: ZoneName::parse("zone-b").unwrap(),
            endpoint: "http://cc-b".into(),
            at: t(0),
        });
        let (_d1, local) = temp_store().await;
        let (_d2, replicated) = temp_store().await;
        let mut sm = SqliteStateMachine::new(replicated.clone());
        for c in &setup {
            local.apply(c).await.unwrap();
        }
        let mut index = 1;
        apply_all(&mut sm, index, setup.clone()).await;
        index += setup.len() as u64;

        let mut known = Vec::new();
        for _ in 0..4 {
            let batch = random_batch(&w, &mut rng, &mut known);
            let mut one_by_one = Vec::new();
            for c in &batch {
                one_by_one.push(match local.apply(c).await {
                    Ok(outcome) => RaftResponse::Applied(outcome),
                    Err(e) => RaftResponse::Rejected(Rejection::try_from(e).unwrap()),
                });
            }
            let together = apply_all(&mut sm, index, vec![Command::Batch(batch)]).await;
            index += 1;
            assert_eq!(
                together,
                vec![RaftResponse::Batch(one_by_one)],
                "seed {seed}"
            );
        }
        let mut raft_rows = dump_state(&replicated).await;
        raft_rows
            .get_mut("meta")
            .unwrap()
            .retain(|r| !r.is_empty() && !r.starts_with("'raft_"));
        assert_eq!(raft_rows, dump(&local).await, "seed {seed}");
    }
}

#[tokio::test]
async fn a_snapshot_installed_on_a_fresh_store_reproduces_the_state() {
    let w = World::new();
    let (_d1, leader) = temp_store().await;
    let mut sm = SqliteStateMachine::new(leader.clone());
    let membership = Membership::new(vec![[1, 2, 3].into()], None);
    sm.apply([Entry {
        log_id: log_id(1, 1),
        payload: EntryPayload::Membership(membership.clone()),
    }])
    .await
    .unwrap();
    let mut commands = w.setup();
    commands.push(w.launch(2, 2));
    commands.push(w.launch(1, 0));
    apply_all(&mut sm, 2, commands).await;

    let built = sm
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    assert_eq!(built.meta.last_log_id, Some(log_id(1, 6)));
    assert_eq!(
        built.meta.last_membership,
        StoredMembership::new(Some(log_id(1, 1)), membership)
    );
    let current = sm.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta, built.meta);

    let (_d2, follower) = temp_store().await;
    let mut fsm = SqliteStateMachine::new(follower.clone());
    // Something the snapshot must replace, not merge with.
    apply_all(&mut fsm, 1, vec![World::new().setup().remove(2)]).await;
    let mut received = fsm.begin_receiving_snapshot().await.unwrap();
    received
        .get_mut()
        .extend_from_slice(current.snapshot.get_ref());
    fsm.install_snapshot(&current.meta, received).await.unwrap();

    let all = InstanceFilter::default();
    assert_eq!(
        follower.instances(&all).await.unwrap(),
        leader.instances(&all).await.unwrap()
    );
    assert_eq!(
        follower.zones().await.unwrap(),
        leader.zones().await.unwrap()
    );
    assert_eq!(
        follower.accounts().await.unwrap(),
        leader.accounts().await.unwrap()
    );
    assert_eq!(
        follower.images().await.unwrap(),
        leader.images().await.unwrap()
    );
    assert_eq!(dump(&follower).await, dump(&leader).await);
    assert_eq!(
        fsm.applied_state().await.unwrap(),
        sm.applied_state().await.unwrap()
    );
    assert_eq!(
        fsm.get_current_snapshot().await.unwrap().unwrap().meta,
        built.meta
    );

    // Both go on identically, AUTOINCREMENT counters included.
    let next = w.launch(1, 1);
    apply_all(&mut sm, 7, vec![next.clone()]).await;
    apply_all(&mut fsm, 7, vec![next]).await;
    assert_eq!(dump(&follower).await, dump(&leader).await);
}

#[tokio::test]
async fn a_snapshot_from_another_schema_is_refused() {
    let (_d1, leader) = temp_store().await;
    let mut sm = SqliteStateMachine::new(leader.clone());
    apply_all(&mut sm, 1, World::new().setup()).await;
    let snap = sm
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    // Pretend the follower runs a newer migration.
    let (_d2, follower) = temp_store().await;
    sqlx::query(
        "INSERT INTO _sqlx_migrations(version, description, success, checksum, execution_time)
         VALUES (9999, 'future', 1, x'00', 0)",
    )
    .execute(follower.pool())
    .await
    .unwrap();
    let before = dump(&follower).await;
    let mut fsm = SqliteStateMachine::new(follower.clone());
    let err = fsm
        .install_snapshot(&snap.meta, snap.snapshot)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("schema version"), "{err}");
    assert_eq!(dump(&follower).await, before);
    assert!(fsm.get_current_snapshot().await.unwrap().is_none());
}

#[tokio::test]
async fn the_log_survives_reopening_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("clc.db");
    let store = Store::open(&path).await.unwrap();
    let mut log = SqliteLogStore::new(&store);
    let w = World::new();
    // A few entries (one statement), then more than one statement holds (one transaction).
    let entries: Vec<Entry> = w
        .setup()
        .into_iter()
        .chain((0..150).map(|n| w.launch(1 + n % 3, 0)))
        .zip(1..)
        .map(|(c, i)| entry(i, c))
        .collect();
    let (few, many) = entries.split_at(3);
    for part in [few, many] {
        openraft::storage::RaftLogStorageExt::blocking_append(&mut log, part.to_vec())
            .await
            .unwrap();
    }
    store.close().await;

    let store = Store::open(&path).await.unwrap();
    let mut log = SqliteLogStore::new(&store);
    let read = openraft::RaftLogReader::try_get_log_entries(&mut log, 1..)
        .await
        .unwrap();
    assert_eq!(read, entries);
}

#[tokio::test]
async fn snapshots_work_on_in_memory_stores_too() {
    // One pooled connection: building and installing must never hold two at once.
    let leader = Arc::new(Store::in_memory().await.unwrap());
    let mut sm = SqliteStateMachine::new(leader.clone());
    // A Raft log starts with a membership entry.
    sm.apply([Entry {
        log_id: log_id(1, 1),
        payload: EntryPayload::Membership(Membership::new(vec![[1].into()], None)),
    }])
    .await
    .unwrap();
    let w = World::new();
    let mut commands = w.setup();
    commands.push(w.launch(1, 1));
    apply_all(&mut sm, 2, commands).await;
    let snap = sm
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();

    let follower = Arc::new(Store::in_memory().await.unwrap());
    let mut fsm = SqliteStateMachine::new(follower.clone());
    fsm.install_snapshot(&snap.meta, snap.snapshot)
        .await
        .unwrap();
    assert_eq!(dump(&follower).await, dump(&leader).await);
    assert_eq!(
        fsm.applied_state().await.unwrap(),
        sm.applied_state().await.unwrap()
    );
}

#[test]
fn rejections_convert_back_to_the_same_state_error() {
    let id = InstanceId::generate();
    let rejections = [
        StateError::IdempotentParameterMismatch,
        StateError::InstancesNotFound(vec![id.clone()]),
        StateError::IncorrectInstanceState {
            id,
            state: canopy_common::InstanceState::Stopped,
        },
        StateError::ImageNotFound("ami-1".into()),
        StateError::AccountNotFound("1".into()),
        StateError::ZoneNotFound("z".into()),
        StateError::TagLimitExceeded("i-1".into()),
        StateError::AlreadyExists("x".into()),
    ];
    for error in rejections {
        let text = error.to_string();
        let rejection = Rejection::try_from(error).unwrap();
        let json = serde_json::to_string(&RaftResponse::Rejected(rejection)).unwrap();
        let back: RaftResponse = serde_json::from_str(&json).unwrap();
        assert_eq!(back.into_result().unwrap_err().to_string(), text);
    }
    let store_failure = StateError::Corrupt("bad row".into());
    assert!(matches!(
        Rejection::try_from(store_failure),
        Err(StateError::Corrupt(_))
    ));
}

/// What the tests compare between replicas: the typed views and every state row.
pub(super) async fn state_of(store: &Store) -> String {
    let instances = store
        .instances(&crate::state::InstanceFilter::default())
        .await
        .unwrap();
    let zones = store.zones().await.unwrap();
    let accounts = store.accounts().await.unwrap();
    let rows = dump_state(store).await;
    format!("{instances:?}\n{zones:?}\n{accounts:?}\n{rows:?}")
}
