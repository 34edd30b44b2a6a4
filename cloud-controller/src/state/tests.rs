//! Apply tests on an in-memory store: each command's effect and its all-or-nothing refusals.

use std::collections::HashMap;

use canopy_common::{
    AccountId, ImageId, InstanceId, InstanceState, KeyPairId, NodeId, PowerState, ReservationId,
    ResourceId, Resources, ZoneName,
};
use chrono::{TimeZone, Utc};

use super::*;

fn t(s: i64) -> chrono::DateTime<Utc> {
    Utc.timestamp_opt(1_700_000_000 + s, 0).unwrap()
}

struct Fixture {
    store: Store,
    account: AccountId,
    image: ImageId,
    zone: ZoneName,
}

async fn fixture() -> Fixture {
    let store = Store::in_memory().await.unwrap();
    let account = AccountId::parse("123456789012").unwrap();
    let image = ImageId::generate();
    let zone = ZoneName::parse("zone-a").unwrap();
    store
        .apply(&Command::CreateAccount {
            account_id: account.clone(),
            name: "admin".into(),
            is_admin: true,
            access_key_id: "AKIDTEST".into(),
            secret_access_key: "secret".into(),
            at: t(0),
        })
        .await
        .unwrap();
    store
        .apply(&Command::RegisterImage {
            image: Image {
                image_id: image.clone(),
                owner_id: account.clone(),
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
        })
        .await
        .unwrap();
    store
        .apply(&Command::RegisterZone {
            zone: zone.clone(),
            endpoint: "http://cc".into(),
            at: t(0),
        })
        .await
        .unwrap();
    Fixture {
        store,
        account,
        image,
        zone,
    }
}

impl Fixture {
    fn launch(&self, token: Option<&str>, hash: &str, n: u32) -> Command {
        Command::LaunchInstances {
            reservation_id: ReservationId::generate(),
            account_id: self.account.clone(),
            client_token: token.map(str::to_owned),
            request_hash: hash.into(),
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
                    user_data: None,
                    kernel_id: None,
                    ramdisk_id: None,
                })
                .collect(),
            tags: vec![Tag {
                key: "Name".into(),
                value: "web".into(),
            }],
            at: t(1),
        }
    }

    /// A launch of one instance of `image`.
    fn launch_of(&self, image: &ImageId) -> Command {
        let mut launch = self.launch(None, "h", 1);
        if let Command::LaunchInstances { instances, .. } = &mut launch {
            for i in instances {
                i.image_id = image.clone();
            }
        }
        launch
    }

    async fn all(&self) -> Vec<Instance> {
        self.store
            .instances(&InstanceFilter::default())
            .await
            .unwrap()
    }

    async fn generation(&self) -> u64 {
        self.store.zones().await.unwrap()[0].generation
    }

    async fn request(
        &self,
        ids: &[InstanceId],
        action: InstanceAction,
    ) -> Result<Outcome, StateError> {
        self.store
            .apply(&Command::RequestInstances {
                account_id: self.account.clone(),
                instance_ids: ids.to_vec(),
                action,
                at: t(5),
            })
            .await
    }

    async fn observe(&self, id: &InstanceId, state: InstanceState) -> Outcome {
        self.store
            .apply(&Command::ObserveInstances {
                zone: self.zone.clone(),
                observations: vec![Observation {
                    instance_id: id.clone(),
                    node_id: Some(NodeId::parse("node-1").unwrap()),
                    state,
                    reason: None,
                    private_ip: None,
                }],
                at: t(10),
            })
            .await
            .unwrap()
    }
}

#[tokio::test]
async fn launch_creates_pending_instances_with_tags_and_bumps_the_zone() {
    let f = fixture().await;
    let g0 = f.generation().await;
    let out = f.store.apply(&f.launch(None, "h", 2)).await.unwrap();
    assert!(matches!(
        out,
        Outcome::Launched {
            replayed: false,
            ..
        }
    ));
    let all = f.all().await;
    assert_eq!(all.len(), 2);
    assert!(
        all.iter()
            .all(|i| i.state == InstanceState::Pending && i.desired == PowerState::Running)
    );
    assert_eq!(
        all[0].tags,
        vec![Tag {
            key: "Name".into(),
            value: "web".into()
        }]
    );
    assert_eq!((all[0].launch_index, all[1].launch_index), (0, 1));
    assert_eq!(f.generation().await, g0 + 1);
    assert_eq!(f.store.last_applied().await.unwrap(), 4);
}

#[tokio::test]
async fn client_token_makes_launch_exactly_once() {
    let f = fixture().await;
    let Outcome::Launched {
        reservation_id: first,
        ..
    } = f.store.apply(&f.launch(Some("tok"), "h", 1)).await.unwrap()
    else {
        panic!()
    };
    let again = f.store.apply(&f.launch(Some("tok"), "h", 1)).await.unwrap();
    assert_eq!(
        again,
        Outcome::Launched {
            reservation_id: first,
            replayed: true
        }
    );
    assert_eq!(f.all().await.len(), 1);
    let err = f
        .store
        .apply(&f.launch(Some("tok"), "other", 1))
        .await
        .unwrap_err();
    assert!(matches!(err, StateError::IdempotentParameterMismatch));
    assert_eq!(f.all().await.len(), 1);
}

#[tokio::test]
async fn unknown_image_writes_nothing() {
    let f = fixture().await;
    let mut cmd = f.launch(None, "h", 1);
    if let Command::LaunchInstances { instances, .. } = &mut cmd {
        instances[0].image_id = ImageId::generate();
    }
    assert!(matches!(
        f.store.apply(&cmd).await,
        Err(StateError::ImageNotFound(_))
    ));
    assert!(f.all().await.is_empty());
    let n: (i64,) = sqlx::query_as("SELECT COUNT(*) FROM reservations")
        .fetch_one(f.store.pool())
        .await
        .unwrap();
    assert_eq!(n.0, 0);
}

#[tokio::test]
async fn requests_follow_the_lifecycle_and_are_all_or_nothing() {
    let f = fixture().await;
    f.store.apply(&f.launch(None, "h", 2)).await.unwrap();
    let ids: Vec<_> = f.all().await.into_iter().map(|i| i.instance_id).collect();
    f.observe(&ids[0], InstanceState::Running).await;
    f.observe(&ids[1], InstanceState::Running).await;
    // Reboot is legal only while running; stop both, then start of a stopping one fails
    // for both.
    f.request(&ids, InstanceAction::Reboot).await.unwrap();
    assert!(f.all().await.iter().all(|i| i.reboot_seq == 1));
    let out = f.request(&ids, InstanceAction::Stop).await.unwrap();
    let Outcome::InstancesChanged(changes) = out else {
        panic!()
    };
    assert!(
        changes
            .iter()
            .all(|c| c.previous == InstanceState::Running && c.current == InstanceState::Stopping)
    );
    f.observe(&ids[0], InstanceState::Stopped).await;
    let err = f.request(&ids, InstanceAction::Start).await.unwrap_err();
    assert!(
        matches!(err, StateError::IncorrectInstanceState { ref id, state: InstanceState::Stopping } if id == &ids[1])
    );
    let all = f.all().await;
    assert_eq!(
        all[0].state,
        InstanceState::Stopped,
        "nothing written by the refused request"
    );
    assert_eq!(
        all[0].state_reason.as_ref().unwrap().code,
        "Client.UserInitiatedShutdown"
    );
    let missing = InstanceId::generate();
    let err = f
        .request(
            &[ids[0].clone(), missing.clone()],
            InstanceAction::Terminate,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StateError::InstancesNotFound(ref m) if m == &vec![missing]));
}

#[tokio::test]
async fn stale_observations_are_ignored_and_guest_shutdown_stops_the_instance() {
    let f = fixture().await;
    f.store.apply(&f.launch(None, "h", 1)).await.unwrap();
    let id = f.all().await[0].instance_id.clone();
    f.observe(&id, InstanceState::Running).await;
    assert_eq!(
        f.all().await[0].node_id.as_ref().map(|n| n.as_str()),
        Some("node-1")
    );
    f.request(std::slice::from_ref(&id), InstanceAction::Stop)
        .await
        .unwrap();
    // A report from before the stop reached the node.
    assert_eq!(
        f.observe(&id, InstanceState::Running).await,
        Outcome::Observed {
            changed: 0,
            desired_changed: false
        }
    );
    assert_eq!(f.all().await[0].state, InstanceState::Stopping);
    f.observe(&id, InstanceState::Stopped).await;
    assert_eq!(f.all().await[0].start_seq, 0);
    f.request(std::slice::from_ref(&id), InstanceAction::Start)
        .await
        .unwrap();
    // Each start is counted, and the count reaches the zone's desired state.
    assert_eq!(f.all().await[0].start_seq, 1);
    assert_eq!(
        f.store.desired_specs(&f.zone).await.unwrap()[0].start_seq,
        1
    );
    f.observe(&id, InstanceState::Running).await;
    let g = f.generation().await;
    // The guest powers itself off: stopped, and desired follows so the node keeps it off.
    let out = f.observe(&id, InstanceState::Stopped).await;
    assert_eq!(
        out,
        Outcome::Observed {
            changed: 1,
            desired_changed: true
        }
    );
    let inst = &f.all().await[0];
    assert_eq!(
        (inst.state, inst.desired),
        (InstanceState::Stopped, PowerState::Stopped)
    );
    assert_eq!(
        inst.state_reason.as_ref().unwrap().code,
        "Client.InstanceInitiatedShutdown"
    );
    assert_eq!(f.generation().await, g + 1);
}

#[tokio::test]
async fn a_stopped_instance_changes_type_and_size_in_one_apply() {
    let f = fixture().await;
    f.store.apply(&f.launch(None, "h", 1)).await.unwrap();
    let id = f.all().await[0].instance_id.clone();
    f.observe(&id, InstanceState::Running).await;
    let change = Command::ModifyInstance {
        account_id: f.account.clone(),
        instance_id: id.clone(),
        change: InstanceChange::InstanceType {
            name: "t2.large".into(),
            resources: Resources::new(2, 8192, 30),
        },
    };
    // Only while stopped, as on EC2; the refusal writes nothing.
    let g = f.generation().await;
    let err = f.store.apply(&change).await.unwrap_err();
    assert!(
        matches!(err, StateError::IncorrectInstanceState { id: ref got, state: InstanceState::Running } if got == &id),
        "{err:?}"
    );
    assert_eq!(f.all().await[0].instance_type, "t2.micro");
    assert_eq!(f.generation().await, g);

    f.request(std::slice::from_ref(&id), InstanceAction::Stop)
        .await
        .unwrap();
    let err = f.store.apply(&change).await.unwrap_err();
    assert!(
        matches!(
            err,
            StateError::IncorrectInstanceState {
                state: InstanceState::Stopping,
                ..
            }
        ),
        "{err:?}"
    );
    f.observe(&id, InstanceState::Stopped).await;
    let g = f.generation().await;
    f.store.apply(&change).await.unwrap();
    let inst = &f.all().await[0];
    assert_eq!(
        (inst.instance_type.as_str(), inst.resources, inst.state),
        (
            "t2.large",
            Resources::new(2, 8192, 30),
            InstanceState::Stopped
        )
    );
    // The zone's document carries the new size to the node...
    assert_eq!(f.generation().await, g + 1);
    let spec = &f.store.desired_specs(&f.zone).await.unwrap()[0];
    assert_eq!(
        (spec.instance_type.as_str(), spec.resources),
        ("t2.large", Resources::new(2, 8192, 30))
    );
    // ...and the allocations the scheduler counts on the node follow.
    let allocations = f.store.allocations().await.unwrap();
    assert_eq!(allocations.len(), 1);
    assert_eq!(
        (
            allocations[0].node_id.as_ref().map(|n| n.as_str()),
            allocations[0].resources
        ),
        (Some("node-1"), Resources::new(2, 8192, 30))
    );
    // A start after the change starts the instance at its new size.
    f.request(std::slice::from_ref(&id), InstanceAction::Start)
        .await
        .unwrap();
    f.observe(&id, InstanceState::Running).await;
    let inst = &f.all().await[0];
    assert_eq!(
        (inst.instance_type.as_str(), inst.state),
        ("t2.large", InstanceState::Running)
    );
}

#[tokio::test]
async fn a_start_the_node_has_no_room_for_leaves_the_instance_stopped_with_the_reason() {
    let f = fixture().await;
    f.store.apply(&f.launch(None, "h", 1)).await.unwrap();
    let id = f.all().await[0].instance_id.clone();
    f.observe(&id, InstanceState::Running).await;
    f.request(std::slice::from_ref(&id), InstanceAction::Stop)
        .await
        .unwrap();
    f.observe(&id, InstanceState::Stopped).await;
    f.request(std::slice::from_ref(&id), InstanceAction::Start)
        .await
        .unwrap();
    let report = |code: &str| Command::ObserveInstances {
        zone: f.zone.clone(),
        observations: vec![Observation {
            instance_id: id.clone(),
            node_id: Some(NodeId::parse("node-1").unwrap()),
            state: InstanceState::Stopped,
            reason: Some(StateReason {
                code: code.into(),
                message: "Insufficient capacity on the node for the instance's new type".into(),
            }),
            private_ip: None,
        }],
        at: t(20),
    };
    // Any other stopped report is from before the start reached the node.
    f.store
        .apply(&report("Client.UserInitiatedShutdown"))
        .await
        .unwrap();
    assert_eq!(f.all().await[0].state, InstanceState::Pending);
    f.store
        .apply(&report("Server.InsufficientInstanceCapacity"))
        .await
        .unwrap();
    let inst = &f.all().await[0];
    assert_eq!(
        (inst.state, inst.desired),
        (InstanceState::Stopped, PowerState::Stopped)
    );
    assert_eq!(
        inst.state_reason.as_ref().unwrap().code,
        "Server.InsufficientInstanceCapacity"
    );
    assert!(
        inst.transition_reason.contains("insufficient capacity"),
        "{}",
        inst.transition_reason
    );
}

#[tokio::test]
async fn terminated_instances_stay_visible_until_purged() {
    let f = fixture().await;
    f.store
        .apply(&f.launch(Some("keep"), "h", 1))
        .await
        .unwrap();
    let id = f.all().await[0].instance_id.clone();
    f.request(std::slice::from_ref(&id), InstanceAction::Terminate)
        .await
        .unwrap();
    f.observe(&id, InstanceState::Terminated).await;
    let inst = &f.all().await[0];
    assert_eq!(inst.state, InstanceState::Terminated);
    assert_eq!(inst.terminated_at, Some(t(10)));
    // Terminated is final: a late report cannot revive it.
    f.observe(&id, InstanceState::Running).await;
    assert_eq!(f.all().await[0].state, InstanceState::Terminated);
    assert_eq!(
        f.store
            .apply(&Command::PurgeTerminated { before: t(10) })
            .await
            .unwrap(),
        Outcome::Purged(0)
    );
    assert_eq!(
        f.store
            .apply(&Command::PurgeTerminated { before: t(11) })
            .await
            .unwrap(),
        Outcome::Purged(1)
    );
    assert!(f.all().await.is_empty());
    // The client token still answers with the old reservation rather than launching again.
    let out = f
        .store
        .apply(&f.launch(Some("keep"), "h", 1))
        .await
        .unwrap();
    assert!(matches!(out, Outcome::Launched { replayed: true, .. }));
}

#[tokio::test]
async fn tags_can_be_replaced_and_deleted_by_key_or_value() {
    let f = fixture().await;
    f.store.apply(&f.launch(None, "h", 1)).await.unwrap();
    let id = f.all().await[0].instance_id.clone();
    let tag = |k: &str, v: &str| Tag {
        key: k.into(),
        value: v.into(),
    };
    f.store
        .apply(&Command::CreateTags {
            account_id: f.account.clone(),
            resource_ids: vec![ResourceId::Instance(id.clone())],
            tags: vec![tag("Name", "db"), tag("env", "prod")],
        })
        .await
        .unwrap();
    assert_eq!(
        f.all().await[0].tags,
        vec![tag("Name", "db"), tag("env", "prod")]
    );
    let del = |k: &str, v: Option<&str>| Command::DeleteTags {
        account_id: f.account.clone(),
        resource_ids: vec![ResourceId::Instance(id.clone())],
        tags: vec![(k.into(), v.map(str::to_owned))],
    };
    f.store.apply(&del("env", Some("dev"))).await.unwrap();
    assert_eq!(f.all().await[0].tags.len(), 2, "value must match");
    f.store.apply(&del("env", None)).await.unwrap();
    assert_eq!(f.all().await[0].tags, vec![tag("Name", "db")]);
    let err = f
        .store
        .apply(&Command::CreateTags {
            account_id: f.account.clone(),
            resource_ids: vec![ResourceId::Instance(InstanceId::generate())],
            tags: vec![tag("a", "b")],
        })
        .await
        .unwrap_err();
    assert!(matches!(err, StateError::InstancesNotFound(_)));
}

#[tokio::test]
async fn state_survives_reopening_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("clc.db");
    let store = Store::open(&path).await.unwrap();
    store
        .apply(&Command::RegisterZone {
            zone: ZoneName::parse("z").unwrap(),
            endpoint: "e".into(),
            at: t(0),
        })
        .await
        .unwrap();
    store.close().await;
    let store = Store::open(&path).await.unwrap();
    assert_eq!(store.zones().await.unwrap().len(), 1);
    assert_eq!(store.last_applied().await.unwrap(), 1);
}

#[tokio::test]
async fn the_reason_of_a_stop_survives_the_reports_that_finish_it() {
    let f = fixture().await;
    f.store.apply(&f.launch(None, "h", 1)).await.unwrap();
    let id = f.all().await[0].instance_id.clone();
    f.observe(&id, InstanceState::Running).await;
    f.observe(&id, InstanceState::Stopping).await;
    // The node, now told to keep it stopped, labels its report as a user stop.
    f.store
        .apply(&Command::ObserveInstances {
            zone: f.zone.clone(),
            observations: vec![Observation {
                instance_id: id.clone(),
                node_id: None,
                state: InstanceState::Stopped,
                reason: Some(StateReason {
                    code: "Client.UserInitiatedShutdown".into(),
                    message: "x".into(),
                }),
                private_ip: None,
            }],
            at: t(11),
        })
        .await
        .unwrap();
    let inst = &f.all().await[0];
    assert_eq!(inst.state, InstanceState::Stopped);
    assert_eq!(
        inst.state_reason.as_ref().unwrap().code,
        "Client.InstanceInitiatedShutdown"
    );
}

#[tokio::test]
async fn no_resource_gets_more_than_fifty_tags() {
    let f = fixture().await;
    f.store.apply(&f.launch(None, "h", 1)).await.unwrap(); // one tag: Name
    let id = f.all().await[0].instance_id.clone();
    let tags = |from: usize, n: usize| {
        (from..from + n)
            .map(|i| Tag {
                key: format!("k{i}"),
                value: "v".into(),
            })
            .collect()
    };
    let create = |tags| Command::CreateTags {
        account_id: f.account.clone(),
        resource_ids: vec![ResourceId::Instance(id.clone())],
        tags,
    };
    f.store.apply(&create(tags(0, 49))).await.unwrap();
    assert_eq!(f.all().await[0].tags.len(), 50);
    let err = f.store.apply(&create(tags(100, 1))).await.unwrap_err();
    assert!(matches!(err, StateError::TagLimitExceeded(_)));
    assert_eq!(
        f.all().await[0].tags.len(),
        50,
        "the refused command wrote nothing"
    );
    // Replacing an existing key does not count twice.
    f.store.apply(&create(tags(0, 1))).await.unwrap();
}

#[tokio::test]
async fn a_launched_instance_is_stored_as_new_instance_launched_describes_it() {
    let f = fixture().await;
    let reservation_id = ReservationId::generate();
    // Nanoseconds the store does not keep, and a tag key given twice (the last one wins).
    let at = t(5) + chrono::Duration::nanoseconds(123_456_789);
    let tags = vec![
        Tag {
            key: "b".into(),
            value: "1".into(),
        },
        Tag {
            key: "a".into(),
            value: "2".into(),
        },
        Tag {
            key: "b".into(),
            value: "3".into(),
        },
    ];
    let instances: Vec<NewInstance> = (0..2)
        .map(|i| NewInstance {
            instance_id: InstanceId::generate(),
            launch_index: i,
            image_id: f.image.clone(),
            instance_type: "t2.micro".into(),
            resources: Resources::new(1, 1024, 8),
            zone: f.zone.clone(),
            key_name: Some("key".into()),
            public_key: Some("ssh-ed25519 AAAA key".into()),
            metadata_options: Default::default(),
            security_groups: vec![],
            user_data: Some(vec![1, 2, 3]),
            kernel_id: None,
            ramdisk_id: None,
        })
        .collect();
    f.store
        .apply(&Command::LaunchInstances {
            reservation_id: reservation_id.clone(),
            account_id: f.account.clone(),
            client_token: Some("tok".into()),
            request_hash: "h".into(),
            instances: instances.clone(),
            tags: tags.clone(),
            at,
        })
        .await
        .unwrap();
    let stored: Vec<Instance> = f
        .all()
        .await
        .into_iter()
        .map(|i| Instance { seq: 0, ..i })
        .collect();
    let described: Vec<Instance> = instances
        .iter()
        .map(|i| i.launched(&reservation_id, &f.account, Some("tok"), &tags, at))
        .collect();
    assert_eq!(stored, described);
}

#[tokio::test]
async fn one_report_places_and_moves_many_instances_each_judged_as_the_report_found_it() {
    let f = fixture().await;
    f.store.apply(&f.launch(None, "h", 3)).await.unwrap();
    let ids: Vec<InstanceId> = f.all().await.into_iter().map(|i| i.instance_id).collect();
    let (a, b, c) = (&ids[0], &ids[1], &ids[2]);
    let node = |n: &str| Some(NodeId::parse(n).unwrap());
    let obs = |id: &InstanceId, node_id, state| Observation {
        instance_id: id.clone(),
        node_id,
        state,
        reason: Some(StateReason {
            code: "Node.Note".into(),
            message: "from the node".into(),
        }),
        private_ip: None,
    };
    let out = f
        .store
        .apply(&Command::ObserveInstances {
            zone: f.zone.clone(),
            observations: vec![
                // a: placed, then (a second report in the same batch) running.
                obs(a, node("n-1"), InstanceState::Pending),
                obs(a, None, InstanceState::Running),
                // b: placed and running at once.
                obs(b, node("n-2"), InstanceState::Running),
                // c: a report that skips the lifecycle is ignored, placement kept.
                obs(c, node("n-3"), InstanceState::Stopped),
                // Unknown: noise.
                obs(&InstanceId::generate(), node("n-4"), InstanceState::Running),
            ],
            at: t(10),
        })
        .await
        .unwrap();
    assert_eq!(
        out,
        Outcome::Observed {
            changed: 3,
            desired_changed: false
        }
    );
    let all: HashMap<InstanceId, Instance> = f
        .all()
        .await
        .into_iter()
        .map(|i| (i.instance_id.clone(), i))
        .collect();
    assert_eq!(all[a].node_id, node("n-1"));
    assert_eq!(all[a].state, InstanceState::Running);
    assert_eq!(all[a].state_changed_at, t(10));
    assert_eq!(all[a].state_reason, None, "running clears the reason");
    assert_eq!(all[b].node_id, node("n-2"));
    assert_eq!(all[b].state, InstanceState::Running);
    assert_eq!(all[c].node_id, node("n-3"));
    assert_eq!(all[c].state, InstanceState::Pending);
    assert_eq!(
        all[c].state_changed_at,
        t(1),
        "no state change, no new time"
    );
    assert_eq!(all[c].launch_time, t(1));
}

#[tokio::test]
async fn folded_reads_give_back_what_was_written() {
    let f = fixture().await;
    let mut cmd = f.launch(None, "h", 2);
    let Command::LaunchInstances { instances, .. } = &mut cmd else {
        unreachable!()
    };
    // Every byte value, so the hex round trip is exercised in full.
    instances[0].user_data = Some((0..=255u8).collect());
    let ids: Vec<InstanceId> = instances.iter().map(|i| i.instance_id.clone()).collect();
    f.store.apply(&cmd).await.unwrap();
    f.observe(&ids[1], InstanceState::Running).await;

    let specs = f.store.desired_specs(&f.zone).await.unwrap();
    assert_eq!(
        specs.iter().map(|s| &s.instance_id).collect::<Vec<_>>(),
        ids.iter().collect::<Vec<_>>(),
        "in launch order"
    );
    assert_eq!(specs[0].user_data, Some((0..=255u8).collect()));
    assert_eq!(specs[1].user_data, None);
    assert_eq!(specs[1].node_id, Some(NodeId::parse("node-1").unwrap()));

    let by_id = f.store.instances_by_id(None, &ids).await.unwrap();
    assert_eq!(by_id[&ids[0]].user_data, specs[0].user_data);
    assert_eq!(by_id[&ids[0]].tags.len(), 1);

    let unknown = InstanceId::generate();
    let seen = f
        .store
        .whereabouts(&[ids[0].clone(), ids[1].clone(), unknown.clone()])
        .await
        .unwrap();
    assert_eq!(seen.len(), 2, "unknown ids are absent");
    assert_eq!(
        seen[&ids[0]],
        Whereabouts {
            zone: f.zone.clone(),
            node_id: None,
            state: InstanceState::Pending,
            private_ip: None,
        }
    );
    assert_eq!(
        seen[&ids[1]],
        Whereabouts {
            zone: f.zone.clone(),
            node_id: Some(NodeId::parse("node-1").unwrap()),
            state: InstanceState::Running,
            private_ip: None,
        }
    );
    assert!(
        f.store
            .desired_specs(&ZoneName::parse("zone-b").unwrap())
            .await
            .unwrap()
            .is_empty()
    );
}

/// A machine image with bytes, booting with a kernel and a ramdisk: what RegisterImage
/// stores, what a launch records, what the zone's document carries, and deregistration.
#[tokio::test]
async fn images_with_content_reach_the_zone_document_and_outlive_deregistration() {
    use canopy_common::{ImageKind, ImageRef, Sha256Digest};
    let f = fixture().await;
    let image =
        |kind: ImageKind, byte: u8, kernel: Option<ImageId>, ramdisk: Option<ImageId>| Image {
            image_id: kind.generate_id(),
            owner_id: f.account.clone(),
            name: format!("{kind}"),
            description: String::new(),
            location: format!("/images/{kind}"),
            architecture: "x86_64".into(),
            is_public: false,
            state: "available".into(),
            created_at: t(0),
            kind,
            kernel_id: kernel,
            ramdisk_id: ramdisk,
            sha256: Some(Sha256Digest::from_bytes(&[byte; 32])),
            size_bytes: u64::from(byte) * 1000,
            disk_format: (kind == ImageKind::Machine).then(|| "qcow2".into()),
            launch_permissions: vec![],
            root_snapshot: None,
            source_instance_id: None,
            state_reason: None,
        };
    let eki = image(ImageKind::Kernel, 1, None, None);
    let eri = image(ImageKind::Ramdisk, 2, None, None);
    let emi = image(
        ImageKind::Machine,
        3,
        Some(eki.image_id.clone()),
        Some(eri.image_id.clone()),
    );
    for i in [&eki, &eri, &emi] {
        f.store
            .apply(&Command::RegisterImage { image: i.clone() })
            .await
            .unwrap();
    }
    let stored = f.store.images().await.unwrap();
    assert!(stored.contains(&emi) && stored.contains(&eki) && stored.contains(&eri));

    let mut cmd = f.launch(None, "h", 1);
    let Command::LaunchInstances { instances, .. } = &mut cmd else {
        unreachable!()
    };
    instances[0].image_id = emi.image_id.clone();
    instances[0].kernel_id = Some(eki.image_id.clone());
    instances[0].ramdisk_id = Some(eri.image_id.clone());
    let id = instances[0].instance_id.clone();
    f.store.apply(&cmd).await.unwrap();
    let spec = &f.store.desired_specs(&f.zone).await.unwrap()[0];
    let content = |i: &Image| {
        Some(ImageRef {
            image_id: i.image_id.clone(),
            sha256: i.sha256.clone().unwrap(),
            size: i.size_bytes,
        })
    };
    assert_eq!(spec.boot.disk, content(&emi));
    assert_eq!(spec.boot.kernel, content(&eki));
    assert_eq!(spec.boot.ramdisk, content(&eri));
    let all = f.all().await;
    assert_eq!(all[0].kernel_id.as_ref(), Some(&eki.image_id));

    // Only the owner deregisters; then nothing launches from it, but the running instance
    // keeps its image's bytes in the document.
    let other = AccountId::parse("999999999999").unwrap();
    assert!(matches!(
        f.store
            .apply(&Command::DeregisterImage {
                image_id: emi.image_id.clone(),
                account_id: other,
            })
            .await,
        Err(StateError::ImageNotFound(_))
    ));
    f.store
        .apply(&Command::DeregisterImage {
            image_id: emi.image_id.clone(),
            account_id: f.account.clone(),
        })
        .await
        .unwrap();
    let mut again = f.launch(None, "h2", 1);
    let Command::LaunchInstances { instances, .. } = &mut again else {
        unreachable!()
    };
    instances[0].image_id = emi.image_id.clone();
    assert!(matches!(
        f.store.apply(&again).await,
        Err(StateError::ImageNotFound(_))
    ));
    let spec = &f.store.desired_specs(&f.zone).await.unwrap()[0];
    assert_eq!(spec.instance_id, id);
    assert_eq!(spec.boot.disk, content(&emi));
    // Its bytes are still needed while the instance lives, and no longer once it is gone.
    let digests = |i: &[&Image]| -> std::collections::HashSet<Sha256Digest> {
        i.iter().map(|i| i.sha256.clone().unwrap()).collect()
    };
    assert_eq!(
        f.store.referenced_image_digests().await.unwrap(),
        digests(&[&emi, &eki, &eri])
    );
    f.observe(&id, InstanceState::Terminated).await;
    assert_eq!(
        f.store.referenced_image_digests().await.unwrap(),
        digests(&[&eki, &eri])
    );
}

#[tokio::test]
async fn key_pairs_are_unique_by_name_per_account_tagged_by_id_and_deleted_as_ec2_does() {
    let f = fixture().await;
    let key = |name: &str| KeyPair {
        key_pair_id: KeyPairId::generate(),
        account_id: f.account.clone(),
        key_name: name.into(),
        key_type: crate::key_material::KeyType::Ed25519,
        fingerprint: "fp".into(),
        public_key: "ssh-ed25519 AAAA".into(),
        created_at: Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap(),
        tags: vec![],
    };
    let tag = Tag {
        key: "team".into(),
        value: "a".into(),
    };
    let first = key("k1");
    f.store
        .apply(&Command::CreateKeyPair {
            key_pair: first.clone(),
            tags: vec![tag.clone()],
        })
        .await
        .unwrap();
    let err = f
        .store
        .apply(&Command::CreateKeyPair {
            key_pair: key("k1"),
            tags: vec![],
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err, StateError::KeyPairDuplicate(ref n) if n == "k1"),
        "{err}"
    );
    let listed = f.store.key_pairs(&f.account).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].tags, vec![tag.clone()]);
    assert_eq!(
        KeyPair {
            tags: vec![],
            ..listed[0].clone()
        },
        first
    );
    // Tags by id: the key pair is a taggable resource of type key-pair.
    f.store
        .apply(&Command::CreateTags {
            account_id: f.account.clone(),
            resource_ids: vec![ResourceId::KeyPair(first.key_pair_id.clone())],
            tags: vec![Tag {
                key: "Name".into(),
                value: "mine".into(),
            }],
        })
        .await
        .unwrap();
    let tags = f.store.tags(&f.account).await.unwrap();
    assert!(tags.iter().all(|t| t.1 == "key-pair"), "{tags:?}");
    assert_eq!(tags.len(), 2);
    // Another account does not see it and cannot tag it.
    let err = f
        .store
        .apply(&Command::CreateTags {
            account_id: AccountId::parse("999999999999").unwrap(),
            resource_ids: vec![ResourceId::KeyPair(first.key_pair_id.clone())],
            tags: vec![tag.clone()],
        })
        .await
        .unwrap_err();
    assert!(matches!(err, StateError::KeyPairNotFound(_)), "{err}");

    let deleted = f
        .store
        .apply(&Command::DeleteKeyPair {
            account_id: f.account.clone(),
            key: KeyPairRef::Name("k1".into()),
        })
        .await
        .unwrap();
    assert_eq!(
        deleted,
        Outcome::KeyPairDeleted(Some(first.key_pair_id.clone()))
    );
    assert!(f.store.key_pairs(&f.account).await.unwrap().is_empty());
    assert!(
        f.store
            .tags(&f.account)
            .await
            .unwrap()
            .iter()
            .all(|t| t.1 != "key-pair")
    );
    // A name that is not there: success, nothing deleted. An id that is not there: refused.
    let again = f
        .store
        .apply(&Command::DeleteKeyPair {
            account_id: f.account.clone(),
            key: KeyPairRef::Name("k1".into()),
        })
        .await
        .unwrap();
    assert_eq!(again, Outcome::KeyPairDeleted(None));
    let err = f
        .store
        .apply(&Command::DeleteKeyPair {
            account_id: f.account.clone(),
            key: KeyPairRef::Id(first.key_pair_id.clone()),
        })
        .await
        .unwrap_err();
    assert!(matches!(err, StateError::KeyPairNotFound(_)), "{err}");
    // The name is free again.
    f.store
        .apply(&Command::CreateKeyPair {
            key_pair: key("k1"),
            tags: vec![],
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn the_private_address_a_cc_reports_is_kept_shown_and_sent_back_to_the_zone() {
    let f = fixture().await;
    f.store.apply(&f.launch(None, "h", 1)).await.unwrap();
    let id = f.all().await[0].instance_id.clone();
    let ip: std::net::Ipv4Addr = "172.16.0.4".parse().unwrap();
    let observe = |state, private_ip| Command::ObserveInstances {
        zone: f.zone.clone(),
        observations: vec![Observation {
            instance_id: id.clone(),
            node_id: Some(NodeId::parse("node-1").unwrap()),
            state,
            reason: None,
            private_ip,
        }],
        at: t(10),
    };
    // A report that changes nothing but the address still counts as a change.
    f.store
        .apply(&observe(InstanceState::Pending, None))
        .await
        .unwrap();
    let out = f
        .store
        .apply(&observe(InstanceState::Pending, Some(ip)))
        .await
        .unwrap();
    assert!(
        matches!(out, Outcome::Observed { changed: 1, .. }),
        "{out:?}"
    );
    assert_eq!(f.all().await[0].private_ip, Some(ip));
    // A later report without one keeps it.
    f.store
        .apply(&observe(InstanceState::Running, None))
        .await
        .unwrap();
    let inst = &f.all().await[0];
    assert_eq!(
        (inst.state, inst.private_ip),
        (InstanceState::Running, Some(ip))
    );
    assert_eq!(
        f.store
            .whereabouts(std::slice::from_ref(&id))
            .await
            .unwrap()[&id]
            .private_ip,
        Some(ip)
    );
    assert_eq!(
        f.store.desired_specs(&f.zone).await.unwrap()[0].private_ip,
        Some(ip)
    );
}

#[tokio::test]
async fn volumes_attach_detach_and_delete_as_ec2_and_the_nodes_say() {
    use canopy_common::VolumeId;
    let f = fixture().await;
    f.store.apply(&f.launch(None, "h", 2)).await.unwrap();
    let ids: Vec<InstanceId> = f
        .all()
        .await
        .iter()
        .map(|i| i.instance_id.clone())
        .collect();
    let (a, b) = (&ids[0], &ids[1]);
    let volume = |n: u8, token: Option<&str>| Volume {
        seq: 0,
        volume_id: VolumeId::parse(&format!("vol-0123456789abcdef{n}")).unwrap(),
        account_id: f.account.clone(),
        zone: f.zone.clone(),
        size_gib: 8,
        volume_type: "gp2".into(),
        iops: None,
        throughput: None,
        client_token: token.map(str::to_owned),
        state: VolumeState::Available,
        created_at: t(2),
        attachment: None,
        snapshot_id: None,
        tags: vec![],
    };
    let v = volume(0, Some("tok")).volume_id;
    let fault = |r: Result<Outcome, StateError>| match r {
        Err(StateError::VolumeRefused { fault, .. }) => fault,
        other => panic!("expected a refusal, got {other:?}"),
    };
    f.store
        .apply(&Command::CreateVolume {
            volume: volume(0, Some("tok")),
            tags: vec![Tag {
                key: "Name".into(),
                value: "data".into(),
            }],
        })
        .await
        .unwrap();
    // The token is the account's: a second volume with it is refused.
    assert_eq!(
        fault(
            f.store
                .apply(&Command::CreateVolume {
                    volume: volume(1, Some("tok")),
                    tags: vec![],
                })
                .await
        ),
        VolumeFault::TokenTaken
    );
    let found = f.store.volume_by_token(&f.account, "tok").await.unwrap();
    assert_eq!(found.map(|v| v.volume_id), Some(v.clone()));

    let attach = |instance: &InstanceId, device: &str| Command::AttachVolume {
        account_id: f.account.clone(),
        volume_id: v.clone(),
        instance_id: instance.clone(),
        device: device.into(),
        at: t(6),
    };
    // Only running or stopped instances take volumes.
    assert_eq!(
        fault(f.store.apply(&attach(a, "/dev/sdf")).await),
        VolumeFault::IncorrectState
    );
    f.observe(a, InstanceState::Running).await;
    f.observe(b, InstanceState::Running).await;
    let g = f.generation().await;
    f.store.apply(&attach(a, "/dev/sdf")).await.unwrap();
    assert!(f.generation().await > g, "the zone's document changes");
    assert_eq!(
        fault(f.store.apply(&attach(b, "/dev/sdg")).await),
        VolumeFault::InUse
    );
    let shown = &f.store.volumes(&f.account).await.unwrap()[0];
    assert_eq!(shown.state, VolumeState::InUse);
    assert_eq!(
        shown.attachment.as_ref().map(|a| a.status),
        Some(AttachStatus::Attaching)
    );
    assert_eq!(shown.tags.len(), 1);
    let spec = f.store.desired_specs(&f.zone).await.unwrap();
    let sent = spec.iter().find(|s| &s.instance_id == a).unwrap();
    assert_eq!(sent.volumes.len(), 1, "the node is told to attach it");
    assert_eq!(sent.volumes[0].device, "/dev/sdf");
    assert!(!sent.volumes[0].initialized);
    // A report of the other instance, or a detach, settles nothing; the node's word does.
    let observe = |attached: Vec<(VolumeId, InstanceId)>, detached| Command::ObserveVolumes {
        zone: f.zone.clone(),
        attached,
        detached,
    };
    f.store
        .apply(&observe(vec![(v.clone(), b.clone())], vec![]))
        .await
        .unwrap();
    let pending = f.store.pending_attachments(&f.zone).await.unwrap();
    assert_eq!(pending.len(), 1);
    f.store
        .apply(&observe(vec![(v.clone(), a.clone())], vec![]))
        .await
        .unwrap();
    assert!(
        f.store
            .pending_attachments(&f.zone)
            .await
            .unwrap()
            .is_empty()
    );
    let spec = f.store.desired_specs(&f.zone).await.unwrap();
    let sent = spec.iter().find(|s| &s.instance_id == a).unwrap();
    assert!(
        sent.volumes[0].initialized,
        "once a node has had it, its bytes exist and are never made anew"
    );
    let inst = f
        .all()
        .await
        .into_iter()
        .find(|i| &i.instance_id == a)
        .unwrap();
    assert_eq!(inst.volumes.len(), 1);
    assert_eq!(inst.volumes[0].status, AttachStatus::Attached);
    // Another volume may not take the same attachment point, even spelled otherwise.
    f.store
        .apply(&Command::CreateVolume {
            volume: volume(1, None),
            tags: vec![],
        })
        .await
        .unwrap();
    let other = Command::AttachVolume {
        account_id: f.account.clone(),
        volume_id: volume(1, None).volume_id,
        instance_id: a.clone(),
        device: "/dev/xvdf".into(),
        at: t(7),
    };
    assert_eq!(fault(f.store.apply(&other).await), VolumeFault::DeviceInUse);

    // Deleting an attached volume is refused; detaching waits for the node.
    let delete = Command::DeleteVolume {
        account_id: f.account.clone(),
        volume_id: v.clone(),
        at: t(8),
    };
    assert_eq!(fault(f.store.apply(&delete).await), VolumeFault::InUse);
    let detach = |instance: Option<&InstanceId>| Command::DetachVolume {
        account_id: f.account.clone(),
        volume_id: v.clone(),
        instance_id: instance.cloned(),
        device: None,
        force: false,
    };
    assert_eq!(
        fault(f.store.apply(&detach(Some(b))).await),
        VolumeFault::AttachmentNotFound
    );
    f.store.apply(&detach(Some(a))).await.unwrap();
    let spec = f.store.desired_specs(&f.zone).await.unwrap();
    assert!(
        spec.iter().all(|s| s.volumes.is_empty()),
        "a detaching volume leaves the document"
    );
    f.store
        .apply(&observe(vec![], vec![(v.clone(), a.clone())]))
        .await
        .unwrap();
    let shown = &f.store.volumes(&f.account).await.unwrap()[0];
    assert_eq!(
        (shown.state, shown.attachment.is_none()),
        (VolumeState::Available, true)
    );
    assert_eq!(
        fault(f.store.apply(&detach(None)).await),
        VolumeFault::IncorrectState
    );
    f.store.apply(&delete).await.unwrap();
    assert_eq!(f.store.volumes(&f.account).await.unwrap().len(), 1);
    assert_eq!(
        f.store.deleted_volumes(&f.zone, t(0)).await.unwrap(),
        vec![v.clone()],
        "the zone's nodes are told to remove its bytes"
    );
    assert!(
        f.store
            .deleted_volumes(&f.zone, t(9))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(fault(f.store.apply(&delete).await), VolumeFault::NotFound);

    // Terminating an instance detaches its volumes once the node reports it terminated.
    let v1 = volume(1, None).volume_id;
    f.store
        .apply(&Command::AttachVolume {
            account_id: f.account.clone(),
            volume_id: v1.clone(),
            instance_id: b.clone(),
            device: "/dev/sdh".into(),
            at: t(9),
        })
        .await
        .unwrap();
    f.request(std::slice::from_ref(b), InstanceAction::Terminate)
        .await
        .unwrap();
    let shown = f.store.volumes(&f.account).await.unwrap();
    assert_eq!(
        shown[0].attachment.as_ref().map(|a| a.status),
        Some(AttachStatus::Detaching)
    );
    f.observe(b, InstanceState::Terminated).await;
    let shown = f.store.volumes(&f.account).await.unwrap();
    assert_eq!(shown[0].state, VolumeState::Available);
}

#[tokio::test]
async fn the_state_digest_follows_the_rows() {
    let f = fixture().await;
    let before = f.store.digest().await.unwrap();
    assert_eq!(
        before,
        f.store.digest().await.unwrap(),
        "reading changes nothing"
    );
    assert_eq!(before.rows["instances"], 0);
    f.store.apply(&f.launch(None, "h", 2)).await.unwrap();
    let after = f.store.digest().await.unwrap();
    assert_ne!(before.sha256, after.sha256);
    assert_eq!(after.rows["instances"], 2);
    assert!(!after.rows.contains_key("raft_log"), "the log is not state");
}

#[tokio::test]
async fn only_an_images_owner_shares_it_and_a_reset_makes_it_private() {
    let f = fixture().await;
    let friend = AccountId::parse("210987654321").unwrap();
    let image = |images: Vec<Image>| images.into_iter().find(|i| i.image_id == f.image).unwrap();
    let modify =
        |account: &AccountId, add: Vec<LaunchPermission>, remove, reset| Command::ModifyImage {
            account_id: account.clone(),
            image_id: f.image.clone(),
            add,
            remove,
            reset,
            description: None,
        };
    // The fixture's image is public: make it private, then share it with one account.
    f.store
        .apply(&modify(
            &f.account,
            vec![],
            vec![LaunchPermission::All],
            false,
        ))
        .await
        .unwrap();
    let img = image(f.store.images().await.unwrap());
    assert!(!img.is_public && !img.visible_to(&friend));
    f.store
        .apply(&modify(
            &f.account,
            vec![LaunchPermission::Account(friend.clone())],
            vec![],
            false,
        ))
        .await
        .unwrap();
    let img = image(f.store.images().await.unwrap());
    assert_eq!(img.launch_permissions, vec![friend.clone()]);
    assert!(img.visible_to(&friend) && !img.is_public);
    // Another account cannot change it.
    assert!(matches!(
        f.store
            .apply(&modify(&friend, vec![LaunchPermission::All], vec![], false))
            .await,
        Err(StateError::ImageNotFound(_))
    ));
    f.store
        .apply(&modify(
            &f.account,
            vec![LaunchPermission::All],
            vec![],
            false,
        ))
        .await
        .unwrap();
    assert!(image(f.store.images().await.unwrap()).is_public);
    f.store
        .apply(&modify(&f.account, vec![], vec![], true))
        .await
        .unwrap();
    let img = image(f.store.images().await.unwrap());
    assert!(!img.is_public && img.launch_permissions.is_empty());
}

#[tokio::test]
async fn the_digest_does_not_depend_on_the_order_rows_were_inserted_in() {
    let a = fixture().await;
    let b = fixture().await;
    // The same two rows of `meta`, inserted in opposite orders (as a replica that installed
    // a snapshot holds them).
    for (store, keys) in [(&a.store, ["k1", "k2"]), (&b.store, ["k2", "k1"])] {
        for key in keys {
            sqlx::query("INSERT INTO meta(key, value) VALUES (?, 'v')")
                .bind(key)
                .execute(store.pool())
                .await
                .unwrap();
        }
    }
    let (da, db) = (
        a.store.digest().await.unwrap(),
        b.store.digest().await.unwrap(),
    );
    assert_eq!(da.tables["meta"], db.tables["meta"]);
}

fn join_token(id: &str, zone: Option<&str>, expires: i64) -> JoinTokenRow {
    JoinTokenRow {
        token_id: id.into(),
        secret_hash: "hash".into(),
        zone: zone.map(|z| ZoneName::parse(z).unwrap()),
        description: String::new(),
        created_at: t(0),
        expires_at: t(expires),
        used_at: None,
        used_by: None,
    }
}

/// The refusal of a join, which must be refused.
async fn join_refusal(store: &Store, join: Command) -> String {
    match store.apply(&join).await {
        Err(StateError::JoinRefused(m)) => m,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn enroll(token: &str, node: &str, zone: &str, serial: &str, at: i64) -> Command {
    Command::EnrollNode {
        token_id: token.into(),
        node_id: NodeId::parse(node).unwrap(),
        zone: ZoneName::parse(zone).unwrap(),
        serial: serial.into(),
        at: t(at),
    }
}

#[tokio::test]
async fn a_join_token_is_spent_once_within_its_zone_and_time() {
    let f = fixture().await;
    for token in [
        join_token("aaaa", None, 100),
        join_token("bbbb", Some("zone-a"), 100),
    ] {
        f.store
            .apply(&Command::CreateJoinToken { token })
            .await
            .unwrap();
    }
    let dup = f
        .store
        .apply(&Command::CreateJoinToken {
            token: join_token("aaaa", None, 100),
        })
        .await;
    assert!(matches!(dup, Err(StateError::AlreadyExists(_))), "{dup:?}");

    let m = join_refusal(&f.store, enroll("cccc", "hv-1", "zone-a", "01", 1)).await;
    assert!(m.contains("unknown"), "{m}");
    let m = join_refusal(&f.store, enroll("bbbb", "hv-1", "zone-b", "01", 1)).await;
    assert!(m.contains("for zone zone-a"), "{m}");
    let m = join_refusal(&f.store, enroll("aaaa", "hv-1", "zone-b", "01", 100)).await;
    assert!(m.contains("expired"), "{m}");

    f.store
        .apply(&enroll("aaaa", "hv-1", "zone-b", "01", 50))
        .await
        .unwrap();
    let m = join_refusal(&f.store, enroll("aaaa", "hv-2", "zone-b", "02", 51)).await;
    assert!(m.contains("already used"), "{m}");
    // hv-1 holds a live certificate: it cannot join again until that one is revoked.
    let m = join_refusal(&f.store, enroll("bbbb", "hv-1", "zone-a", "03", 52)).await;
    assert!(m.contains("revoke it"), "{m}");
    // The refused join spent nothing.
    let tokens = f.store.join_tokens().await.unwrap();
    let b = tokens.iter().find(|t| t.token_id == "bbbb").unwrap();
    assert_eq!(b.used_at, None);
    let a = tokens.iter().find(|t| t.token_id == "aaaa").unwrap();
    assert_eq!(
        (a.used_at, a.used_by.as_deref()),
        (Some(t(50)), Some("hv-1"))
    );

    let certs = f.store.certificates().await.unwrap();
    assert_eq!(certs.len(), 1);
    assert_eq!(
        (
            certs[0].serial.as_str(),
            certs[0].role.as_str(),
            certs[0].name.as_str()
        ),
        ("01", "node", "hv-1")
    );
    assert_eq!(certs[0].zone.as_deref(), Some("zone-b"));
}

#[tokio::test]
async fn revoking_a_node_lists_its_serials_and_lets_it_join_again() {
    let f = fixture().await;
    for id in ["aaaa", "bbbb"] {
        f.store
            .apply(&Command::CreateJoinToken {
                token: join_token(id, None, 100),
            })
            .await
            .unwrap();
    }
    f.store
        .apply(&enroll("aaaa", "hv-1", "zone-a", "0a", 1))
        .await
        .unwrap();
    let revoke = |target| Command::RevokeCertificates { target, at: t(2) };
    let out = f
        .store
        .apply(&revoke(RevokeTarget::Node(NodeId::parse("hv-1").unwrap())))
        .await
        .unwrap();
    assert_eq!(out, Outcome::CertificatesRevoked(vec!["0a".into()]));
    // Twice: nothing left to revoke.
    let again = f
        .store
        .apply(&revoke(RevokeTarget::Node(NodeId::parse("hv-1").unwrap())))
        .await;
    assert!(
        matches!(again, Err(StateError::NothingToRevoke(_))),
        "{again:?}"
    );
    // A serial the cloud never issued (`canopy ca issue`) is recorded as revoked.
    let out = f
        .store
        .apply(&revoke(RevokeTarget::Serial("ff".into())))
        .await
        .unwrap();
    assert_eq!(out, Outcome::CertificatesRevoked(vec!["ff".into()]));
    assert_eq!(
        f.store.revoked_serials().await.unwrap(),
        vec!["0a".to_owned(), "ff".to_owned()]
    );
    // With its old certificate revoked, the host joins again.
    f.store
        .apply(&enroll("bbbb", "hv-1", "zone-a", "0b", 3))
        .await
        .unwrap();
    assert_eq!(f.store.revoked_serials().await.unwrap().len(), 2);
}

#[tokio::test]
async fn snapshots_wait_for_a_node_complete_once_and_seed_volumes() {
    use crate::state::{SnapshotFault, SnapshotOutcome, SnapshotState};
    use canopy_common::{Sha256Digest, SnapshotId, VolumeId};
    let f = fixture().await;
    f.store.apply(&f.launch(None, "h", 1)).await.unwrap();
    let a = f.all().await[0].instance_id.clone();
    f.observe(&a, InstanceState::Running).await;
    let volume = |n: u8, size: u64, snapshot: Option<&SnapshotId>| Volume {
        seq: 0,
        volume_id: VolumeId::parse(&format!("vol-0123456789abcdef{n}")).unwrap(),
        account_id: f.account.clone(),
        zone: f.zone.clone(),
        size_gib: size,
        volume_type: "gp2".into(),
        iops: None,
        throughput: None,
        client_token: None,
        state: VolumeState::Available,
        created_at: t(2),
        attachment: None,
        snapshot_id: snapshot.cloned(),
        tags: vec![],
    };
    let snap = |n: u8| SnapshotId::parse(&format!("snap-0123456789abcdef{n}")).unwrap();
    let create = |n: u8, v: &VolumeId| Command::CreateSnapshot {
        account_id: f.account.clone(),
        snapshot_id: snap(n),
        volume_id: v.clone(),
        description: format!("copy {n}"),
        at: t(10 + i64::from(n)),
        tags: vec![Tag {
            key: "n".into(),
            value: n.to_string(),
        }],
    };
    let state_of = async |id: &SnapshotId| f.store.snapshot_state(id).await.unwrap();
    let v0 = volume(0, 4, None);
    f.store
        .apply(&Command::CreateVolume {
            volume: v0.clone(),
            tags: vec![],
        })
        .await
        .unwrap();

    // Never attached: nothing on any node, complete at once with no bytes (all zeros).
    let g = f.generation().await;
    f.store.apply(&create(0, &v0.volume_id)).await.unwrap();
    assert_eq!(state_of(&snap(0)).await, Some(SnapshotState::Completed));
    assert_eq!(f.generation().await, g, "no node has anything to do");
    assert!(f.store.pending_snapshots(&f.zone).await.unwrap().is_empty());

    // Attached: pending, in the zone's document, until a node's upload completes it.
    f.store
        .apply(&Command::AttachVolume {
            account_id: f.account.clone(),
            volume_id: v0.volume_id.clone(),
            instance_id: a.clone(),
            device: "/dev/sdf".into(),
            at: t(5),
        })
        .await
        .unwrap();
    let g = f.generation().await;
    f.store.apply(&create(1, &v0.volume_id)).await.unwrap();
    assert!(f.generation().await > g);
    assert_eq!(state_of(&snap(1)).await, Some(SnapshotState::Pending));
    let pending = f.store.pending_snapshots(&f.zone).await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(
        (&pending[0].snapshot_id, pending[0].volume_id()),
        (&snap(1), Some(&v0.volume_id))
    );
    // A volume cannot come from a pending snapshot.
    let refused = f
        .store
        .apply(&Command::CreateVolume {
            volume: volume(1, 4, Some(&snap(1))),
            tags: vec![],
        })
        .await;
    assert!(
        matches!(
            refused,
            Err(StateError::SnapshotRefused {
                fault: SnapshotFault::IncorrectState,
                ..
            })
        ),
        "{refused:?}"
    );
    let digest = Sha256Digest::from_bytes(&[7u8; 32]);
    let complete = |outcome: SnapshotOutcome| Command::CompleteSnapshot {
        snapshot_id: snap(1),
        outcome,
        at: t(30),
    };
    f.store
        .apply(&complete(SnapshotOutcome::Completed {
            sha256: digest.clone(),
            size: 1234,
            disk_format: None,
        }))
        .await
        .unwrap();
    // A second upload's outcome (a node that retried) changes nothing.
    f.store
        .apply(&complete(SnapshotOutcome::Failed {
            message: "late".into(),
        }))
        .await
        .unwrap();
    let shown = f.store.snapshots(&f.account).await.unwrap();
    let s1 = shown.iter().find(|s| s.snapshot_id == snap(1)).unwrap();
    assert_eq!(s1.state, SnapshotState::Completed);
    assert_eq!(s1.completed_at, Some(t(30)));
    assert_eq!(s1.volume_size_gib, 4);
    assert_eq!(s1.description, "copy 1");
    assert_eq!(s1.tags[0].value, "1");
    assert_eq!(
        s1.content.as_ref().map(|c| (&c.sha256, c.size)),
        Some((&digest, 1234))
    );
    assert!(f.store.pending_snapshots(&f.zone).await.unwrap().is_empty());
    assert!(
        f.store
            .referenced_image_digests()
            .await
            .unwrap()
            .contains(&digest)
    );

    // Volumes from it: at least its size; they carry its bytes to the node.
    let small = f
        .store
        .apply(&Command::CreateVolume {
            volume: volume(2, 2, Some(&snap(1))),
            tags: vec![],
        })
        .await;
    assert!(
        matches!(
            small,
            Err(StateError::VolumeRefused {
                fault: VolumeFault::TooSmall,
                ..
            })
        ),
        "{small:?}"
    );
    let v3 = volume(3, 6, Some(&snap(1)));
    f.store
        .apply(&Command::CreateVolume {
            volume: v3.clone(),
            tags: vec![],
        })
        .await
        .unwrap();
    let listed = f.store.volumes(&f.account).await.unwrap();
    let shown3 = listed.iter().find(|v| v.volume_id == v3.volume_id).unwrap();
    assert_eq!(shown3.snapshot_id, Some(snap(1)));
    // Its snapshot before any node wrote it is the source's bytes, at once.
    f.store.apply(&create(4, &v3.volume_id)).await.unwrap();
    let s4 = f
        .store
        .snapshots(&f.account)
        .await
        .unwrap()
        .into_iter()
        .find(|s| s.snapshot_id == snap(4))
        .unwrap();
    assert_eq!(s4.state, SnapshotState::Completed);
    assert_eq!(s4.content.map(|c| c.sha256), Some(digest.clone()));
    // Attached, the node gets the source with the volume.
    f.store
        .apply(&Command::DetachVolume {
            account_id: f.account.clone(),
            volume_id: v0.volume_id.clone(),
            instance_id: None,
            device: None,
            force: true,
        })
        .await
        .unwrap();
    f.store
        .apply(&Command::AttachVolume {
            account_id: f.account.clone(),
            volume_id: v3.volume_id.clone(),
            instance_id: a.clone(),
            device: "/dev/sdg".into(),
            at: t(40),
        })
        .await
        .unwrap();
    let specs = f.store.desired_specs(&f.zone).await.unwrap();
    let sent = &specs[0].volumes[0];
    assert_eq!(sent.volume_id, v3.volume_id);
    assert_eq!(
        sent.source
            .as_ref()
            .map(|s| (&s.snapshot_id, &s.sha256, s.size)),
        Some((&snap(1), &digest, 1234))
    );

    // A failed copy ends in error; deleting removes the row, its tags, and the request.
    f.store.apply(&create(5, &v3.volume_id)).await.unwrap();
    f.store
        .apply(&Command::CompleteSnapshot {
            snapshot_id: snap(5),
            outcome: SnapshotOutcome::Failed {
                message: "copying the volume failed".into(),
            },
            at: t(50),
        })
        .await
        .unwrap();
    assert_eq!(state_of(&snap(5)).await, Some(SnapshotState::Error));
    let delete = |n: u8| Command::DeleteSnapshot {
        account_id: f.account.clone(),
        snapshot_id: snap(n),
    };
    f.store.apply(&delete(1)).await.unwrap();
    assert_eq!(state_of(&snap(1)).await, None);
    assert!(matches!(
        f.store.apply(&delete(1)).await,
        Err(StateError::SnapshotRefused {
            fault: SnapshotFault::NotFound,
            ..
        })
    ));
    // The volume made from it still needs the bytes until a node wrote it.
    assert!(
        f.store
            .referenced_image_digests()
            .await
            .unwrap()
            .contains(&digest)
    );
}

#[tokio::test]
async fn create_image_of_a_stopped_instance_follows_its_root_snapshot() {
    use crate::state::{ImageFault, SnapshotFault, SnapshotOutcome, SnapshotState};
    use canopy_common::{Sha256Digest, SnapshotId, SnapshotSource};
    let f = fixture().await;
    f.store.apply(&f.launch(None, "h", 1)).await.unwrap();
    let a = f.all().await[0].instance_id.clone();
    f.observe(&a, InstanceState::Running).await;
    let snap = |n: u8| SnapshotId::parse(&format!("snap-0123456789abcdef{n}")).unwrap();
    let ami = |n: u8| ImageId::parse(&format!("ami-0123456789abcdef{n}")).unwrap();
    let tag = |k: &str| Tag {
        key: k.into(),
        value: "v".into(),
    };
    let create = |n: u8, instance: &InstanceId, name: &str| Command::CreateImage {
        account_id: f.account.clone(),
        image_id: ami(n),
        snapshot_id: snap(n),
        instance_id: instance.clone(),
        name: name.into(),
        description: format!("image {n}"),
        at: t(20 + i64::from(n)),
        image_tags: vec![tag("image-tag")],
        snapshot_tags: vec![tag("snapshot-tag")],
    };
    let image = async |id: &ImageId| {
        f.store
            .images()
            .await
            .unwrap()
            .into_iter()
            .find(|i| &i.image_id == id)
    };
    let snapshot = async |id: &SnapshotId| {
        f.store
            .snapshots(&f.account)
            .await
            .unwrap()
            .into_iter()
            .find(|s| &s.snapshot_id == id)
    };

    // A running instance is refused, and nothing is written.
    let running = f.store.apply(&create(0, &a, "web")).await;
    assert!(
        matches!(
            running,
            Err(StateError::ImageRefused {
                fault: ImageFault::InstanceNotStopped,
                ref message
            }) if message.contains("running") && message.contains("Stop it first")
        ),
        "{running:?}"
    );
    assert!(image(&ami(0)).await.is_none());
    assert!(snapshot(&snap(0)).await.is_none());
    let unknown = f
        .store
        .apply(&create(0, &InstanceId::generate(), "web"))
        .await;
    assert!(matches!(unknown, Err(StateError::InstancesNotFound(_))));

    f.request(std::slice::from_ref(&a), InstanceAction::Stop)
        .await
        .unwrap();
    f.observe(&a, InstanceState::Stopped).await;
    let g = f.generation().await;
    f.store.apply(&create(0, &a, "web")).await.unwrap();
    assert!(f.generation().await > g, "the node learns of the request");
    let made = image(&ami(0)).await.unwrap();
    assert_eq!(made.state, "pending");
    assert_eq!(made.owner_id, f.account);
    assert!(!made.is_public);
    assert_eq!(made.location, format!("{}/web", f.account));
    assert_eq!(made.architecture, "x86_64");
    assert_eq!(made.kind, canopy_common::ImageKind::Machine);
    assert_eq!(made.sha256, None);
    assert_eq!(made.source_instance_id, Some(a.clone()));
    assert_eq!(
        made.root_snapshot,
        Some(RootSnapshot {
            snapshot_id: snap(0),
            volume_size_gib: 8
        })
    );
    let root = snapshot(&snap(0)).await.unwrap();
    assert_eq!(root.state, SnapshotState::Pending);
    assert_eq!(root.volume_id.as_str(), NO_VOLUME);
    assert_eq!(root.volume_size_gib, 8);
    assert_eq!(root.instance_id, Some(a.clone()));
    assert_eq!(
        root.description,
        format!("Created by CreateImage({a}) for {}", ami(0))
    );
    assert_eq!(root.tags, vec![tag("snapshot-tag")]);
    let tags = f
        .store
        .tags_of(&f.account, &[ami(0).as_str()])
        .await
        .unwrap();
    assert_eq!(tags[ami(0).as_str()], vec![tag("image-tag")]);
    assert_eq!(
        f.store.pending_snapshots(&f.zone).await.unwrap(),
        vec![canopy_common::SnapshotRequest {
            snapshot_id: snap(0),
            source: SnapshotSource::Root {
                instance_id: a.clone(),
                node_id: NodeId::parse("node-1").unwrap(),
            },
        }]
    );
    // Not launchable yet; the cached catalogue sees it pending.
    let catalog = f.store.catalog().await.unwrap();
    assert_eq!(
        catalog.visible_image(&ami(0), &f.account).unwrap().state,
        "pending"
    );
    let early = f.store.apply(&f.launch_of(&ami(0))).await;
    assert!(
        matches!(early, Err(StateError::ImageNotFound(_))),
        "{early:?}"
    );

    // A name the account uses is refused, for made and registered images alike.
    for name in ["web", "img"] {
        let dup = f.store.apply(&create(1, &a, name)).await;
        assert!(
            matches!(
                dup,
                Err(StateError::ImageRefused {
                    fault: ImageFault::DuplicateName,
                    ..
                })
            ),
            "{name}: {dup:?}"
        );
    }
    // The image's root cannot be deleted from under it.
    let in_use = f
        .store
        .apply(&Command::DeleteSnapshot {
            account_id: f.account.clone(),
            snapshot_id: snap(0),
        })
        .await;
    assert!(
        matches!(
            in_use,
            Err(StateError::SnapshotRefused {
                fault: SnapshotFault::InUse,
                ref message
            }) if message.contains(ami(0).as_str())
        ),
        "{in_use:?}"
    );

    // The node's upload completes the snapshot and the image with the same bytes; the
    // request leaves the document. A retried upload changes nothing.
    let digest = Sha256Digest::from_bytes(&[9u8; 32]);
    let complete = |n: u8, outcome: SnapshotOutcome| Command::CompleteSnapshot {
        snapshot_id: snap(n),
        outcome,
        at: t(40),
    };
    let g = f.generation().await;
    f.store
        .apply(&complete(
            0,
            SnapshotOutcome::Completed {
                sha256: digest.clone(),
                size: 4096,
                disk_format: Some("qcow2".into()),
            },
        ))
        .await
        .unwrap();
    f.store
        .apply(&complete(
            0,
            SnapshotOutcome::Failed {
                message: "late".into(),
            },
        ))
        .await
        .unwrap();
    assert!(f.generation().await > g);
    assert!(f.store.pending_snapshots(&f.zone).await.unwrap().is_empty());
    let made = image(&ami(0)).await.unwrap();
    assert_eq!(made.state, "available");
    assert_eq!(made.sha256, Some(digest.clone()));
    assert_eq!(made.size_bytes, 4096);
    assert_eq!(made.disk_format.as_deref(), Some("qcow2"));
    assert_eq!(made.state_reason, None);
    assert_eq!(
        snapshot(&snap(0)).await.unwrap().state,
        SnapshotState::Completed
    );
    let catalog = f.store.catalog().await.unwrap();
    assert_eq!(
        catalog.visible_image(&ami(0), &f.account).unwrap().state,
        "available"
    );
    // Launches from it get its bytes.
    f.store.apply(&f.launch_of(&ami(0))).await.unwrap();
    let specs = f.store.desired_specs(&f.zone).await.unwrap();
    let launched = specs.iter().find(|s| s.image_id == ami(0)).unwrap();
    assert_eq!(
        launched.boot.disk.as_ref().map(|d| (&d.sha256, d.size)),
        Some((&digest, 4096))
    );
    assert!(
        f.store
            .referenced_image_digests()
            .await
            .unwrap()
            .contains(&digest)
    );

    // A copy the node could not make fails the image, with the node's reason.
    f.store.apply(&create(1, &a, "web-2")).await.unwrap();
    f.store
        .apply(&complete(
            1,
            SnapshotOutcome::Failed {
                message: "copying the root disk failed: disk on fire".into(),
            },
        ))
        .await
        .unwrap();
    let failed = image(&ami(1)).await.unwrap();
    assert_eq!(failed.state, "failed");
    let reason = failed.state_reason.unwrap();
    assert_eq!(reason.code, "Server.InternalError");
    assert!(
        reason.message.contains("disk on fire"),
        "{}",
        reason.message
    );
    assert_eq!(
        snapshot(&snap(1)).await.unwrap().state,
        SnapshotState::Error
    );

    // Deregistered while pending: the image stays deregistered when the copy arrives, and
    // its snapshot, no longer in use, may be deleted (which drops the request).
    f.store.apply(&create(2, &a, "web-3")).await.unwrap();
    f.store
        .apply(&Command::DeregisterImage {
            image_id: ami(2),
            account_id: f.account.clone(),
        })
        .await
        .unwrap();
    assert!(
        f.store
            .tags_of(&f.account, &[ami(2).as_str()])
            .await
            .unwrap()
            .is_empty(),
        "a deregistered image's tags go with it"
    );
    f.store
        .apply(&Command::DeleteSnapshot {
            account_id: f.account.clone(),
            snapshot_id: snap(2),
        })
        .await
        .unwrap();
    assert!(f.store.pending_snapshots(&f.zone).await.unwrap().is_empty());
    f.store
        .apply(&complete(
            2,
            SnapshotOutcome::Completed {
                sha256: digest.clone(),
                size: 1,
                disk_format: None,
            },
        ))
        .await
        .unwrap();
    assert_eq!(image(&ami(2)).await.unwrap().state, "deregistered");
    // Its name is free again.
    f.store.apply(&create(3, &a, "web-3")).await.unwrap();

    // Terminated: refused like running.
    f.request(std::slice::from_ref(&a), InstanceAction::Terminate)
        .await
        .unwrap();
    f.observe(&a, InstanceState::Terminated).await;
    let gone = f.store.apply(&create(4, &a, "web-4")).await;
    assert!(
        matches!(
            gone,
            Err(StateError::ImageRefused {
                fault: ImageFault::InstanceNotStopped,
                ..
            })
        ),
        "{gone:?}"
    );
}

#[tokio::test]
async fn create_image_of_an_instance_no_node_ever_ran_completes_at_once() {
    use crate::state::SnapshotState;
    use canopy_common::SnapshotId;
    let f = fixture().await;
    f.store.apply(&f.launch(None, "h", 1)).await.unwrap();
    let a = f.all().await[0].instance_id.clone();
    // Stopped before any node reported on it: no node id, no disk anywhere.
    f.request(std::slice::from_ref(&a), InstanceAction::Stop)
        .await
        .unwrap();
    f.store
        .apply(&Command::ObserveInstances {
            zone: f.zone.clone(),
            observations: vec![Observation {
                instance_id: a.clone(),
                node_id: None,
                state: InstanceState::Stopped,
                reason: None,
                private_ip: None,
            }],
            at: t(10),
        })
        .await
        .unwrap();
    assert_eq!(f.all().await[0].node_id, None);
    let g = f.generation().await;
    let ami = ImageId::generate();
    let snap = SnapshotId::generate();
    f.store
        .apply(&Command::CreateImage {
            account_id: f.account.clone(),
            image_id: ami.clone(),
            snapshot_id: snap.clone(),
            instance_id: a.clone(),
            name: "never-ran".into(),
            description: String::new(),
            at: t(20),
            image_tags: vec![],
            snapshot_tags: vec![],
        })
        .await
        .unwrap();
    assert_eq!(f.generation().await, g, "no node has anything to do");
    let made = f
        .store
        .images()
        .await
        .unwrap()
        .into_iter()
        .find(|i| i.image_id == ami)
        .unwrap();
    // The image it was launched from has no content: neither has the copy.
    assert_eq!((made.state.as_str(), made.sha256), ("available", None));
    let root = f.store.snapshots(&f.account).await.unwrap();
    assert_eq!(root[0].state, SnapshotState::Completed);
    assert!(f.store.pending_snapshots(&f.zone).await.unwrap().is_empty());
}

#[tokio::test]
async fn only_the_owner_tags_an_image() {
    let f = fixture().await;
    let other = AccountId::parse("210987654321").unwrap();
    f.store
        .apply(&Command::CreateAccount {
            account_id: other.clone(),
            name: "other".into(),
            is_admin: false,
            access_key_id: "AKIDOTHER".into(),
            secret_access_key: "secret".into(),
            at: t(0),
        })
        .await
        .unwrap();
    let tag = |account: &AccountId| Command::CreateTags {
        account_id: account.clone(),
        resource_ids: vec![ResourceId::Image(f.image.clone())],
        tags: vec![Tag {
            key: "team".into(),
            value: "os".into(),
        }],
    };
    // The fixture's image is public: others see it, but may not tag it.
    assert!(matches!(
        f.store.apply(&tag(&other)).await,
        Err(StateError::ImageNotFound(_))
    ));
    f.store.apply(&tag(&f.account)).await.unwrap();
    let rows = f.store.tags(&f.account).await.unwrap();
    assert_eq!(
        rows,
        vec![(
            f.image.to_string(),
            "image".to_owned(),
            "team".to_owned(),
            "os".to_owned()
        )]
    );
}
