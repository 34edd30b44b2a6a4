//! The one function that changes cloud state.

use std::collections::{BTreeSet, HashMap};

use canopy_common::lifecycle::transition;
use canopy_common::{
    AccountId, InstanceId, InstanceState, LifecycleEvent, PowerState, ResourceId, ZoneName,
};
use chrono::{DateTime, Utc};
use sqlx::SqliteConnection;

use super::StateError;
use super::addresses;
use super::command::{
    Command, InstanceAction, InstanceChange, KeyPairRef, LaunchPermission, Observation, Outcome,
    StateChange, launch_image,
};
use super::images;
use super::pki;
use super::query::{Lifecycle, fmt_time, load_lifecycles, require_instances};
use super::security_groups;
use super::snapshots;
use super::types::{Instance, StateReason, Tag};
use super::volumes;

/// The state-reason code of a node that had no room for an instance (its launch, or the
/// new size of a stopped instance about to start).
const NO_ROOM: &str = "Server.InsufficientInstanceCapacity";

/// EC2's limit of tags on one resource.
pub const MAX_TAGS_PER_RESOURCE: i64 = 50;

/// Applies `command` to the store inside the caller's transaction. Deterministic: the
/// result depends only on the command and the rows already there.
pub async fn apply(conn: &mut SqliteConnection, command: &Command) -> Result<Outcome, StateError> {
    match command {
        // One outcome per command: the replicated log's state machine unpacks batches.
        Command::Batch(_) => Err(StateError::Corrupt(
            "a command batch can only be applied by the replicated log".into(),
        )),
        Command::CreateAccount {
            account_id,
            name,
            is_admin,
            access_key_id,
            secret_access_key,
            at,
        } => {
            let exists: Option<(String,)> =
                sqlx::query_as("SELECT account_id FROM accounts WHERE account_id = ? OR name = ?")
                    .bind(account_id.as_str())
                    .bind(name)
                    .fetch_optional(&mut *conn)
                    .await?;
            if exists.is_some() {
                return Err(StateError::AlreadyExists(format!("account {name}")));
            }
            sqlx::query(
                "INSERT INTO accounts(account_id, name, is_admin, created_at) VALUES (?, ?, ?, ?)",
            )
            .bind(account_id.as_str())
            .bind(name)
            .bind(*is_admin)
            .bind(fmt_time(*at))
            .execute(&mut *conn)
            .await?;
            insert_access_key(conn, account_id, access_key_id, secret_access_key, *at).await?;
            security_groups::create_default_group(conn, account_id).await?;
            Ok(Outcome::Done)
        }
        Command::AddAccessKey {
            account_id,
            access_key_id,
            secret_access_key,
            at,
        } => {
            let account: Option<(String,)> =
                sqlx::query_as("SELECT account_id FROM accounts WHERE account_id = ?")
                    .bind(account_id.as_str())
                    .fetch_optional(&mut *conn)
                    .await?;
            if account.is_none() {
                return Err(StateError::AccountNotFound(account_id.to_string()));
            }
            insert_access_key(conn, account_id, access_key_id, secret_access_key, *at).await?;
            Ok(Outcome::Done)
        }
        Command::RegisterImage { image } => {
            let done = sqlx::query(
                "INSERT INTO images(image_id, owner_id, name, description, location, architecture, is_public, state,
                    created_at, image_type, kernel_id, ramdisk_id, sha256, size_bytes, disk_format)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(image_id) DO NOTHING",
            )
            .bind(image.image_id.as_str())
            .bind(image.owner_id.as_str())
            .bind(&image.name)
            .bind(&image.description)
            .bind(&image.location)
            .bind(&image.architecture)
            .bind(image.is_public)
            .bind(&image.state)
            .bind(fmt_time(image.created_at))
            .bind(image.kind.name())
            .bind(image.kernel_id.as_ref().map(|i| i.as_str()))
            .bind(image.ramdisk_id.as_ref().map(|i| i.as_str()))
            .bind(image.sha256.as_ref().map(|d| d.as_str()))
            .bind(image.size_bytes as i64)
            .bind(&image.disk_format)
            .execute(&mut *conn)
            .await?;
            if done.rows_affected() == 0 {
                return Err(StateError::AlreadyExists(format!(
                    "image {}",
                    image.image_id
                )));
            }
            Ok(Outcome::Done)
        }
        Command::DeregisterImage {
            image_id,
            account_id,
        } => {
            // Only the owner deregisters; to anyone else the image is not there to remove.
            let done = sqlx::query(
                "UPDATE images SET state = 'deregistered'
                 WHERE image_id = ? AND owner_id = ? AND state != 'deregistered'",
            )
            .bind(image_id.as_str())
            .bind(account_id.as_str())
            .execute(&mut *conn)
            .await?;
            if done.rows_affected() == 0 {
                return Err(StateError::ImageNotFound(image_id.to_string()));
            }
            // Gone from DescribeImages, so from DescribeTags too.
            sqlx::query("DELETE FROM tags WHERE resource_id = ?")
                .bind(image_id.as_str())
                .execute(&mut *conn)
                .await?;
            Ok(Outcome::Done)
        }
        Command::ModifyImage {
            account_id,
            image_id,
            add,
            remove,
            reset,
            description,
        } => {
            images::require_owned(conn, account_id, image_id).await?;
            let accounts = |list: &[LaunchPermission]| {
                let ids: Vec<&str> = list
                    .iter()
                    .filter_map(|p| match p {
                        LaunchPermission::Account(a) => Some(a.as_str()),
                        LaunchPermission::All => None,
                    })
                    .collect();
                serde_json::to_string(&ids).map_err(|e| StateError::Corrupt(e.to_string()))
            };
            let all = |list: &[LaunchPermission]| list.contains(&LaunchPermission::All);
            // Plain `?` in order: see the note in `bulk` on numbered parameters.
            sqlx::query(
                "DELETE FROM image_launch_permissions WHERE ? AND image_id = ?;
                 UPDATE images SET is_public = 0 WHERE ? AND image_id = ?;
                 INSERT INTO image_launch_permissions(image_id, account_id)
                   SELECT ?, value FROM json_each(?) WHERE true ON CONFLICT DO NOTHING;
                 DELETE FROM image_launch_permissions
                   WHERE image_id = ? AND account_id IN (SELECT value FROM json_each(?));
                 UPDATE images SET is_public = 1 WHERE ? AND image_id = ?;
                 UPDATE images SET is_public = 0 WHERE ? AND image_id = ?;
                 UPDATE images SET description = coalesce(?, description) WHERE image_id = ?;",
            )
            .bind(*reset)
            .bind(image_id.as_str())
            .bind(*reset)
            .bind(image_id.as_str())
            .bind(image_id.as_str())
            .bind(accounts(add)?)
            .bind(image_id.as_str())
            .bind(accounts(remove)?)
            .bind(all(add))
            .bind(image_id.as_str())
            .bind(all(remove))
            .bind(image_id.as_str())
            .bind(description.as_deref())
            .bind(image_id.as_str())
            .execute(&mut *conn)
            .await?;
            Ok(Outcome::Done)
        }
        Command::RegisterZone { zone, endpoint, at } => {
            sqlx::query(
                "INSERT INTO zones(zone, endpoint, generation, registered_at) VALUES (?, ?, 1, ?)
                 ON CONFLICT(zone) DO UPDATE SET endpoint = excluded.endpoint, generation = generation + 1",
            )
            .bind(zone.as_str())
            .bind(endpoint)
            .bind(fmt_time(*at))
            .execute(&mut *conn)
            .await?;
            Ok(Outcome::Done)
        }
        Command::LaunchInstances {
            reservation_id,
            account_id,
            client_token,
            request_hash,
            instances,
            tags,
            at,
        } => {
            if let Some(token) = client_token {
                let prior: Option<(String, String)> = sqlx::query_as(
                    "SELECT reservation_id, request_hash FROM reservations WHERE account_id = ? AND client_token = ?",
                )
                .bind(account_id.as_str())
                .bind(token)
                .fetch_optional(&mut *conn)
                .await?;
                if let Some((prior_id, prior_hash)) = prior {
                    if &prior_hash != request_hash {
                        return Err(StateError::IdempotentParameterMismatch);
                    }
                    let reservation_id = prior_id
                        .parse()
                        .map_err(|e| StateError::Corrupt(format!("{e}")))?;
                    return Ok(Outcome::Launched {
                        reservation_id,
                        replayed: true,
                    });
                }
            }
            let image_ok: Option<(String,)> = sqlx::query_as(
                "SELECT image_id FROM images WHERE image_id = ? AND state = 'available'",
            )
            .bind(launch_image(instances))
            .fetch_optional(&mut *conn)
            .await?;
            if image_ok.is_none() {
                return Err(StateError::ImageNotFound(
                    launch_image(instances).to_owned(),
                ));
            }
            // Every instance of a launch has the same groups.
            let groups = instances
                .first()
                .map(|i| i.security_groups.as_slice())
                .unwrap_or_default();
            for (group, _) in groups {
                security_groups::require_group(conn, account_id, group).await?;
            }
            sqlx::query("INSERT INTO reservations(reservation_id, account_id, client_token, request_hash, created_at) VALUES (?, ?, ?, ?, ?)")
                .bind(reservation_id.as_str())
                .bind(account_id.as_str())
                .bind(client_token)
                .bind(request_hash)
                .bind(fmt_time(*at))
                .execute(&mut *conn)
                .await?;
            let mut zones = BTreeSet::new();
            for inst in instances {
                sqlx::query(
                    "INSERT INTO instances(instance_id, reservation_id, account_id, launch_index, image_id, instance_type,
                        vcpus, memory_mib, disk_gib, zone, key_name, user_data, client_token, state, desired,
                        launch_time, state_changed_at, kernel_id, ramdisk_id, public_key,
                        metadata_http_tokens, metadata_http_endpoint)
                     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', 'running', ?, ?, ?, ?, ?, ?, ?)",
                )
                .bind(inst.instance_id.as_str())
                .bind(reservation_id.as_str())
                .bind(account_id.as_str())
                .bind(inst.launch_index)
                .bind(inst.image_id.as_str())
                .bind(&inst.instance_type)
                .bind(inst.resources.vcpus)
                .bind(inst.resources.memory_mib as i64)
                .bind(inst.resources.disk_gib as i64)
                .bind(inst.zone.as_str())
                .bind(&inst.key_name)
                .bind(&inst.user_data)
                .bind(client_token)
                .bind(fmt_time(*at))
                .bind(fmt_time(*at))
                .bind(inst.kernel_id.as_ref().map(|i| i.as_str()))
                .bind(inst.ramdisk_id.as_ref().map(|i| i.as_str()))
                .bind(&inst.public_key)
                .bind(inst.metadata_options.http_tokens())
                .bind(inst.metadata_options.http_endpoint())
                .execute(&mut *conn)
                .await?;
                for (position, (group, _)) in inst.security_groups.iter().enumerate() {
                    sqlx::query(
                        "INSERT INTO instance_security_groups(instance_id, group_id, position) VALUES (?, ?, ?)
                         ON CONFLICT DO NOTHING",
                    )
                    .bind(inst.instance_id.as_str())
                    .bind(group.as_str())
                    .bind(position as i64)
                    .execute(&mut *conn)
                    .await?;
                }
                let resource = ResourceId::Instance(inst.instance_id.clone());
                tag_resource(conn, &resource, account_id.as_str(), tags).await?;
                zones.insert(inst.zone.clone());
            }
            for zone in &zones {
                bump_generation(conn, zone).await?;
            }
            Ok(Outcome::Launched {
                reservation_id: reservation_id.clone(),
                replayed: false,
            })
        }
        Command::RequestInstances {
            account_id,
            instance_ids,
            action,
            at,
        } => {
            let found = require_instances(conn, account_id, instance_ids).await?;
            let event = match action {
                InstanceAction::Stop => LifecycleEvent::StopRequested,
                InstanceAction::Start => LifecycleEvent::StartRequested,
                InstanceAction::Reboot => LifecycleEvent::RebootRequested,
                InstanceAction::Terminate => LifecycleEvent::TerminateRequested,
            };
            // Check every instance first: the request is all or nothing.
            let mut plan = Vec::new();
            let mut seen = BTreeSet::new();
            for id in instance_ids {
                if !seen.insert(id.clone()) {
                    continue;
                }
                let inst = &found[id];
                let protected = match action {
                    InstanceAction::Terminate if inst.disable_api_termination => {
                        Some(("terminated", "disableApiTermination"))
                    }
                    InstanceAction::Stop if inst.disable_api_stop => {
                        Some(("stopped", "disableApiStop"))
                    }
                    _ => None,
                };
                if let Some((verb, attribute)) = protected {
                    return Err(StateError::OperationNotPermitted {
                        id: id.clone(),
                        verb: verb.into(),
                        attribute: attribute.into(),
                    });
                }
                let next = transition(inst.state, event).map_err(|_| {
                    StateError::IncorrectInstanceState {
                        id: id.clone(),
                        state: inst.state,
                    }
                })?;
                plan.push((inst, next));
            }
            let mut changes = Vec::new();
            let mut zones = BTreeSet::new();
            for (inst, next) in plan {
                let desired = action.desired().unwrap_or(inst.desired);
                let reboot_seq = inst.reboot_seq + u64::from(*action == InstanceAction::Reboot);
                let start_seq = inst.start_seq
                    + u64::from(*action == InstanceAction::Start && next != inst.state);
                let (reason, transition_reason) = match action {
                    InstanceAction::Stop | InstanceAction::Terminate if next != inst.state => (
                        Some(StateReason {
                            code: "Client.UserInitiatedShutdown".into(),
                            message: "Client.UserInitiatedShutdown: User initiated shutdown".into(),
                        }),
                        format!("User initiated ({})", at.format("%Y-%m-%d %H:%M:%S GMT")),
                    ),
                    InstanceAction::Start if next != inst.state => (None, String::new()),
                    _ => (inst.state_reason.clone(), inst.transition_reason.clone()),
                };
                update_instance(
                    conn,
                    StateUpdate {
                        inst: &Lifecycle::of(inst),
                        state: next,
                        desired,
                        reboot_seq,
                        start_seq,
                        reason: reason.as_ref(),
                        transition_reason: &transition_reason,
                        at: *at,
                    },
                )
                .await?;
                if desired != inst.desired
                    || reboot_seq != inst.reboot_seq
                    || start_seq != inst.start_seq
                    || next != inst.state
                {
                    zones.insert(inst.zone.clone());
                }
                changes.push(StateChange {
                    instance_id: inst.instance_id.clone(),
                    previous: inst.state,
                    current: next,
                });
            }
            if *action == InstanceAction::Terminate {
                let ids: Vec<InstanceId> = changes.iter().map(|c| c.instance_id.clone()).collect();
                addresses::release_from(conn, &ids).await?;
                volumes::detach_from(conn, &ids).await?;
            }
            for zone in &zones {
                bump_generation(conn, zone).await?;
            }
            Ok(Outcome::InstancesChanged(changes))
        }
        Command::ObserveInstances {
            zone,
            observations,
            at,
        } => observe(conn, zone, observations, *at).await,
        Command::CreateTags {
            account_id,
            resource_ids,
            tags,
        } => {
            require_resources(conn, account_id, resource_ids).await?;
            for id in resource_ids {
                tag_resource(conn, id, account_id.as_str(), tags).await?;
            }
            Ok(Outcome::Done)
        }
        Command::DeleteTags {
            account_id,
            resource_ids,
            tags,
        } => {
            require_resources(conn, account_id, resource_ids).await?;
            for id in resource_ids {
                if tags.is_empty() {
                    // No Tag.N: AWS deletes every tag of the resource.
                    sqlx::query("DELETE FROM tags WHERE resource_id = ? AND account_id = ?")
                        .bind(id.as_str())
                        .bind(account_id.as_str())
                        .execute(&mut *conn)
                        .await?;
                }
                for (key, value) in tags {
                    sqlx::query(
                        "DELETE FROM tags WHERE resource_id = ? AND account_id = ? AND key = ? AND (? IS NULL OR value = ?)",
                    )
                    .bind(id.as_str())
                    .bind(account_id.as_str())
                    .bind(key)
                    .bind(value)
                    .bind(value)
                    .execute(&mut *conn)
                    .await?;
                }
            }
            Ok(Outcome::Done)
        }
        Command::ModifyInstance {
            account_id,
            instance_id,
            change,
        } => {
            let found =
                require_instances(conn, account_id, std::slice::from_ref(instance_id)).await?;
            let inst = &found[instance_id];
            let query = match change {
                InstanceChange::DisableApiTermination(on) => sqlx::query(
                    "UPDATE instances SET disable_api_termination = ? WHERE instance_id = ?",
                )
                .bind(*on),
                InstanceChange::DisableApiStop(on) => {
                    sqlx::query("UPDATE instances SET disable_api_stop = ? WHERE instance_id = ?")
                        .bind(*on)
                }
                InstanceChange::MetadataOptions(o) => sqlx::query(
                    "UPDATE instances SET metadata_http_tokens = ?, metadata_http_endpoint = ? WHERE instance_id = ?",
                )
                .bind(o.http_tokens())
                .bind(o.http_endpoint()),
                InstanceChange::UserData(data) => {
                    if inst.state != InstanceState::Stopped {
                        return Err(StateError::IncorrectInstanceState {
                            id: instance_id.clone(),
                            state: inst.state,
                        });
                    }
                    sqlx::query("UPDATE instances SET user_data = ? WHERE instance_id = ?")
                        .bind(data.clone())
                }
                InstanceChange::SecurityGroups(groups) => {
                    return replace_groups(conn, account_id, inst, groups).await;
                }
                InstanceChange::InstanceType { name, resources } => {
                    if inst.state != InstanceState::Stopped {
                        return Err(StateError::IncorrectInstanceState {
                            id: instance_id.clone(),
                            state: inst.state,
                        });
                    }
                    // The size is the desired document's (the node redefines the domain
                    // before its next start) and what the allocations count on the node.
                    sqlx::query(
                        "UPDATE instances SET instance_type = ?, vcpus = ?, memory_mib = ?, disk_gib = ? WHERE instance_id = ?",
                    )
                    .bind(name)
                    .bind(i64::from(resources.vcpus))
                    .bind(i64::try_from(resources.memory_mib).unwrap_or(i64::MAX))
                    .bind(i64::try_from(resources.disk_gib).unwrap_or(i64::MAX))
                }
            };
            query.bind(instance_id.as_str()).execute(&mut *conn).await?;
            // Part of the zone's desired state (the node's metadata service, the domain's size).
            if matches!(
                change,
                InstanceChange::UserData(_)
                    | InstanceChange::MetadataOptions(_)
                    | InstanceChange::InstanceType { .. }
            ) {
                bump_generation(conn, &inst.zone).await?;
            }
            Ok(Outcome::Done)
        }
        Command::CreateSecurityGroup { group, tags } => {
            security_groups::create(conn, group, tags).await
        }
        Command::DeleteSecurityGroup {
            account_id,
            group_id,
        } => security_groups::delete(conn, account_id, group_id).await,
        Command::AuthorizeSecurityGroupRules {
            account_id,
            group_id,
            rules,
        } => security_groups::authorize(conn, account_id, group_id, rules).await,
        Command::RevokeSecurityGroupRules {
            account_id,
            group_id,
            specs,
            rule_ids,
        } => security_groups::revoke(conn, account_id, group_id, specs, rule_ids).await,
        Command::AllocateAddress { address, tags } => {
            addresses::allocate(conn, address, tags).await
        }
        Command::AssociateAddress {
            account_id,
            allocation_id,
            instance_id,
            association_id,
            allow_reassociation,
        } => {
            addresses::associate(
                conn,
                account_id,
                allocation_id,
                instance_id,
                association_id,
                *allow_reassociation,
            )
            .await
        }
        Command::DisassociateAddress {
            account_id,
            association_id,
        } => addresses::disassociate(conn, account_id, association_id).await,
        Command::ReleaseAddress {
            account_id,
            allocation_id,
        } => addresses::release(conn, account_id, allocation_id).await,
        Command::CreateVolume { volume, tags } => volumes::create(conn, volume, tags).await,
        Command::DeleteVolume {
            account_id,
            volume_id,
            at,
        } => volumes::delete(conn, account_id, volume_id, *at).await,
        Command::AttachVolume {
            account_id,
            volume_id,
            instance_id,
            device,
            at,
        } => volumes::attach(conn, account_id, volume_id, instance_id, device, *at).await,
        Command::DetachVolume {
            account_id,
            volume_id,
            instance_id,
            device,
            force,
        } => {
            volumes::detach(
                conn,
                account_id,
                volume_id,
                instance_id.as_ref(),
                device.as_deref(),
                *force,
            )
            .await
        }
        Command::ObserveVolumes {
            zone,
            attached,
            detached,
        } => volumes::observe(conn, zone, attached, detached).await,
        Command::CreateSnapshot {
            account_id,
            snapshot_id,
            volume_id,
            description,
            at,
            tags,
        } => {
            snapshots::create(
                conn,
                account_id,
                snapshot_id,
                volume_id,
                description,
                *at,
                tags,
            )
            .await
        }
        Command::CompleteSnapshot {
            snapshot_id,
            outcome,
            at,
        } => snapshots::complete(conn, snapshot_id, outcome, *at).await,
        Command::CreateImage {
            account_id,
            image_id,
            snapshot_id,
            instance_id,
            name,
            description,
            at,
            image_tags,
            snapshot_tags,
        } => {
            images::create(
                conn,
                images::NewImage {
                    account: account_id,
                    image_id,
                    snapshot_id,
                    instance_id,
                    name,
                    description,
                    at: *at,
                    image_tags,
                    snapshot_tags,
                },
            )
            .await
        }
        Command::DeleteSnapshot {
            account_id,
            snapshot_id,
        } => snapshots::delete(conn, account_id, snapshot_id).await,
        Command::CreateKeyPair { key_pair, tags } => {
            let done = sqlx::query(
                "INSERT INTO key_pairs(key_pair_id, account_id, key_name, key_type, fingerprint, public_key, created_at)
                 VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            )
            .bind(key_pair.key_pair_id.as_str())
            .bind(key_pair.account_id.as_str())
            .bind(&key_pair.key_name)
            .bind(key_pair.key_type.name())
            .bind(&key_pair.fingerprint)
            .bind(&key_pair.public_key)
            .bind(fmt_time(key_pair.created_at))
            .execute(&mut *conn)
            .await?;
            if done.rows_affected() == 0 {
                return Err(StateError::KeyPairDuplicate(key_pair.key_name.clone()));
            }
            let id = ResourceId::KeyPair(key_pair.key_pair_id.clone());
            tag_resource(conn, &id, key_pair.account_id.as_str(), tags).await?;
            Ok(Outcome::Done)
        }
        Command::DeleteKeyPair { account_id, key } => {
            let (by_name, by_id) = match key {
                KeyPairRef::Name(name) => (Some(name.as_str()), None),
                KeyPairRef::Id(id) => (None, Some(id.as_str())),
            };
            let found: Option<(String,)> = sqlx::query_as(
                "DELETE FROM key_pairs WHERE account_id = ? AND (key_name = ? OR key_pair_id = ?)
                 RETURNING key_pair_id",
            )
            .bind(account_id.as_str())
            .bind(by_name)
            .bind(by_id)
            .fetch_optional(&mut *conn)
            .await?;
            match (found, key) {
                (Some((id,)), _) => {
                    sqlx::query("DELETE FROM tags WHERE resource_id = ?")
                        .bind(&id)
                        .execute(&mut *conn)
                        .await?;
                    let id = id
                        .parse()
                        .map_err(|e| StateError::Corrupt(format!("{e}")))?;
                    Ok(Outcome::KeyPairDeleted(Some(id)))
                }
                (None, KeyPairRef::Name(_)) => Ok(Outcome::KeyPairDeleted(None)),
                (None, KeyPairRef::Id(id)) => Err(StateError::KeyPairNotFound(id.to_string())),
            }
        }
        Command::CreateJoinToken { token } => pki::create_token(conn, token).await,
        Command::EnrollNode {
            token_id,
            node_id,
            zone,
            serial,
            at,
        } => pki::enroll(conn, token_id, node_id, zone, serial, *at).await,
        Command::RevokeCertificates { target, at } => pki::revoke(conn, target, *at).await,
        Command::PurgeTerminated { before } => {
            let before = fmt_time(*before);
            sqlx::query(
                "DELETE FROM tags WHERE resource_id IN
                   (SELECT instance_id FROM instances WHERE state = 'terminated' AND terminated_at < ?)",
            )
            .bind(&before)
            .execute(&mut *conn)
            .await?;
            sqlx::query(
                "DELETE FROM instance_security_groups WHERE instance_id IN
                   (SELECT instance_id FROM instances WHERE state = 'terminated' AND terminated_at < ?)",
            )
            .bind(&before)
            .execute(&mut *conn)
            .await?;
            let done = sqlx::query(
                "DELETE FROM instances WHERE state = 'terminated' AND terminated_at < ?",
            )
            .bind(&before)
            .execute(&mut *conn)
            .await?;
            // Reservations with no instance left go too, but their client tokens must keep
            // working for retries, so keep reservations that still have a token.
            sqlx::query(
                "DELETE FROM reservations WHERE client_token IS NULL
                   AND reservation_id NOT IN (SELECT reservation_id FROM instances)",
            )
            .execute(&mut *conn)
            .await?;
            Ok(Outcome::Purged(done.rows_affected()))
        }
    }
}

async fn observe(
    conn: &mut SqliteConnection,
    zone: &ZoneName,
    observations: &[Observation],
    at: DateTime<Utc>,
) -> Result<Outcome, StateError> {
    let ids: Vec<InstanceId> = observations.iter().map(|o| o.instance_id.clone()).collect();
    let found: HashMap<InstanceId, Lifecycle> = load_lifecycles(conn, &ids).await?;
    // Each observation is judged against the instance as the command found it; what they
    // change is gathered per instance (a later report of the same instance wins) and
    // written in one statement.
    let mut rows: Vec<serde_json::Value> = Vec::new();
    let mut row_of: HashMap<&InstanceId, usize> = HashMap::new();
    let mut changed = 0;
    let mut desired_changed = false;
    let mut terminated = Vec::new();
    for obs in observations {
        // Reports about instances we do not know, or that live in another zone, are noise
        // (e.g. purged long ago): ignore them.
        let Some(inst) = found.get(&obs.instance_id).filter(|i| &i.zone == zone) else {
            continue;
        };
        let mut row = |update: Option<StateUpdate<'_>>, node: Option<&str>, ip: Option<String>| {
            let at = *row_of.entry(&inst.instance_id).or_insert_with(|| {
                rows.push(serde_json::json!([
                    inst.instance_id.as_str(),
                    null,
                    null,
                    null
                ]));
                rows.len() - 1
            });
            if let Some(node) = node {
                rows[at][1] = node.into();
            }
            if let Some(ip) = ip {
                rows[at][3] = ip.into();
            }
            if let Some(update) = update {
                rows[at][2] = update.into_json();
            }
        };
        let node_changed = obs.node_id.is_some() && obs.node_id != inst.node_id;
        let ip_changed = obs.private_ip.is_some() && obs.private_ip != inst.private_ip;
        if node_changed || ip_changed {
            row(
                None,
                obs.node_id
                    .as_ref()
                    .filter(|_| node_changed)
                    .map(|n| n.as_str()),
                obs.private_ip
                    .filter(|_| ip_changed)
                    .map(|ip| ip.to_string()),
            );
        }
        if obs.state == inst.state {
            changed += usize::from(node_changed || ip_changed);
            continue;
        }
        let no_room = obs.reason.as_ref().is_some_and(|r| r.code == NO_ROOM);
        let next = match transition(inst.state, LifecycleEvent::Observed(obs.state)) {
            Ok(next) => next,
            // A node that could not give a stopped instance its new type's size keeps it
            // stopped (its disk stays on the node) and says why: the start failed. Other
            // stopped reports may not end a start (they are from before the start reached
            // the node). This one can be stale only if it repeats an earlier refusal while
            // a retried start is on its way down (a window of one push); the instance is
            // then stopped again, with the reason, and never lost.
            Err(_)
                if no_room
                    && inst.state == InstanceState::Pending
                    && obs.state == InstanceState::Stopped =>
            {
                InstanceState::Stopped
            }
            // A report from before a request reached the node.
            Err(_) => continue,
        };
        let mut desired = inst.desired;
        // A reason belongs to the episode that began it (who stopped the instance, why a
        // launch failed): the reports that finish that episode do not replace it.
        let finishing = matches!(
            (inst.state, next),
            (InstanceState::Stopping, InstanceState::Stopped)
                | (InstanceState::ShuttingDown, InstanceState::Terminated)
        );
        let mut reason = if finishing {
            inst.state_reason.clone().or_else(|| obs.reason.clone())
        } else {
            obs.reason.clone().or_else(|| inst.state_reason.clone())
        };
        let mut transition_reason = inst.transition_reason.clone();
        if matches!(next, InstanceState::Stopping | InstanceState::Stopped)
            && desired == PowerState::Running
        {
            // The guest shut itself down: on EC2 that stops the instance, and it stays
            // stopped until someone starts it.
            desired = PowerState::Stopped;
            desired_changed = true;
            reason = Some(obs.reason.clone().unwrap_or(StateReason {
                code: "Client.InstanceInitiatedShutdown".into(),
                message: "Client.InstanceInitiatedShutdown: Instance initiated shutdown".into(),
            }));
            transition_reason = if no_room {
                format!(
                    "Start failed: insufficient capacity on the instance's node ({})",
                    at.format("%Y-%m-%d %H:%M:%S GMT")
                )
            } else {
                format!(
                    "Instance initiated ({})",
                    at.format("%Y-%m-%d %H:%M:%S GMT")
                )
            };
        }
        if matches!(
            next,
            InstanceState::ShuttingDown | InstanceState::Terminated
        ) && desired != PowerState::Terminated
        {
            // The node gave up on the instance (failed launch, no capacity): it is gone
            // for good, so the desired state follows.
            desired = PowerState::Terminated;
            desired_changed = true;
        }
        if next == InstanceState::Running {
            reason = None;
        }
        if next == InstanceState::Terminated {
            terminated.push(inst.instance_id.clone());
        }
        row(
            Some(StateUpdate {
                inst,
                state: next,
                desired,
                reboot_seq: inst.reboot_seq,
                start_seq: inst.start_seq,
                reason: reason.as_ref(),
                transition_reason: &transition_reason,
                at,
            }),
            None,
            None,
        );
        changed += 1;
    }
    if !rows.is_empty() || desired_changed {
        // One call. Column by column: a row's node (element 1) and state change (element
        // 2) are each optional, and what is absent stays as it was.
        sqlx::query(
            "UPDATE instances SET
                node_id = coalesce(j.value ->> '$[1]', node_id),
                state = coalesce(j.value ->> '$[2][0]', state),
                desired = coalesce(j.value ->> '$[2][1]', desired),
                reboot_seq = coalesce(j.value ->> '$[2][2]', reboot_seq),
                state_reason_code = iif(j.value ->> '$[2]' IS NULL, state_reason_code, j.value ->> '$[2][3]'),
                state_reason_message = iif(j.value ->> '$[2]' IS NULL, state_reason_message, j.value ->> '$[2][4]'),
                transition_reason = coalesce(j.value ->> '$[2][5]', transition_reason),
                state_changed_at = coalesce(j.value ->> '$[2][6]', state_changed_at),
                terminated_at = iif(j.value ->> '$[2]' IS NULL, terminated_at, j.value ->> '$[2][7]'),
                private_ip = coalesce(j.value ->> '$[3]', private_ip)
             FROM jsonb_each(?) j
             WHERE instances.instance_id = j.value ->> '$[0]';
             UPDATE zones SET generation = generation + 1 WHERE ? AND zone = ?;",
        )
        // Plain `?` in order: see the note in `bulk` on numbered parameters.
        .bind(serde_json::Value::Array(rows).to_string())
        .bind(desired_changed)
        .bind(zone.as_str())
        .execute(&mut *conn)
        .await?;
    }
    if !terminated.is_empty() {
        volumes::release_terminated(conn, &terminated).await?;
    }
    Ok(Outcome::Observed {
        changed,
        desired_changed,
    })
}

/// The columns of a state change, as [`update_instance`] writes them.
struct StateUpdate<'a> {
    inst: &'a Lifecycle,
    state: InstanceState,
    desired: PowerState,
    reboot_seq: u64,
    start_seq: u64,
    reason: Option<&'a StateReason>,
    transition_reason: &'a str,
    at: DateTime<Utc>,
}

impl StateUpdate<'_> {
    /// The two timestamps the change sets: when the state changed, when it terminated.
    fn columns(&self) -> (String, Option<String>) {
        let state_changed_at = if self.state != self.inst.state {
            self.at
        } else {
            self.inst.state_changed_at
        };
        let terminated_at = match (self.state, self.inst.terminated_at) {
            (InstanceState::Terminated, None) => Some(self.at),
            (_, t) => t,
        };
        (fmt_time(state_changed_at), terminated_at.map(fmt_time))
    }

    fn into_json(self) -> serde_json::Value {
        let (state_changed_at, terminated_at) = self.columns();
        serde_json::json!([
            self.state.name(),
            self.desired.name(),
            self.reboot_seq,
            self.reason.map(|r| r.code.as_str()),
            self.reason.map(|r| r.message.as_str()),
            self.transition_reason,
            state_changed_at,
            terminated_at,
        ])
    }
}

async fn update_instance(
    conn: &mut SqliteConnection,
    update: StateUpdate<'_>,
) -> Result<(), StateError> {
    let (state_changed_at, terminated_at) = update.columns();
    sqlx::query(
        "UPDATE instances SET state = ?, desired = ?, reboot_seq = ?, start_seq = ?, state_reason_code = ?, state_reason_message = ?,
            transition_reason = ?, state_changed_at = ?, terminated_at = ?
         WHERE instance_id = ?",
    )
    .bind(update.state.name())
    .bind(update.desired.name())
    .bind(update.reboot_seq as i64)
    .bind(update.start_seq as i64)
    .bind(update.reason.map(|r| r.code.as_str()))
    .bind(update.reason.map(|r| r.message.as_str()))
    .bind(update.transition_reason)
    .bind(state_changed_at)
    .bind(terminated_at)
    .bind(update.inst.instance_id.as_str())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// ModifyInstanceAttribute `GroupId.N`: the instance's groups, replaced in the given order.
async fn replace_groups(
    conn: &mut SqliteConnection,
    account_id: &AccountId,
    inst: &Instance,
    groups: &[canopy_common::SecurityGroupId],
) -> Result<Outcome, StateError> {
    if matches!(
        inst.state,
        InstanceState::ShuttingDown | InstanceState::Terminated
    ) {
        return Err(StateError::IncorrectInstanceState {
            id: inst.instance_id.clone(),
            state: inst.state,
        });
    }
    for group in groups {
        security_groups::require_group(conn, account_id, group).await?;
    }
    let rows = serde_json::to_string(groups).map_err(|e| StateError::Corrupt(e.to_string()))?;
    // Plain `?` in order: see the note in `bulk` on numbered parameters.
    sqlx::query(
        "DELETE FROM instance_security_groups WHERE instance_id = ?;
         INSERT INTO instance_security_groups(instance_id, group_id, position)
           SELECT ?, value, key FROM json_each(?) WHERE true ON CONFLICT DO NOTHING;",
    )
    .bind(inst.instance_id.as_str())
    .bind(inst.instance_id.as_str())
    .bind(rows)
    .execute(&mut *conn)
    .await?;
    // The node's metadata service serves the groups' names.
    bump_generation(conn, &inst.zone).await?;
    Ok(Outcome::Done)
}

pub(super) async fn bump_generation(
    conn: &mut SqliteConnection,
    zone: &ZoneName,
) -> Result<(), StateError> {
    sqlx::query("UPDATE zones SET generation = generation + 1 WHERE zone = ?")
        .bind(zone.as_str())
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Tags `resource` with `tags` (a key it has already takes the new value), then refuses
/// the command if that leaves it over EC2's limit of tags per resource.
pub(super) async fn tag_resource(
    conn: &mut SqliteConnection,
    resource: &ResourceId,
    account_id: &str,
    tags: &[Tag],
) -> Result<(), StateError> {
    for tag in tags {
        insert_tag(conn, resource, account_id, &tag.key, &tag.value).await?;
    }
    if !tags.is_empty() {
        check_tag_limit(conn, resource.as_str()).await?;
    }
    Ok(())
}

async fn insert_tag(
    conn: &mut SqliteConnection,
    resource: &ResourceId,
    account_id: &str,
    key: &str,
    value: &str,
) -> Result<(), StateError> {
    sqlx::query(
        "INSERT INTO tags(resource_id, resource_type, account_id, key, value) VALUES (?, ?, ?, ?, ?)
         ON CONFLICT(resource_id, key) DO UPDATE SET value = excluded.value",
    )
    .bind(resource.as_str())
    .bind(resource.resource_type())
    .bind(account_id)
    .bind(key)
    .bind(value)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Adds an access key; a key id already in use is refused rather than reassigned.
async fn insert_access_key(
    conn: &mut SqliteConnection,
    account_id: &canopy_common::AccountId,
    access_key_id: &str,
    secret_access_key: &str,
    at: DateTime<Utc>,
) -> Result<(), StateError> {
    let done = sqlx::query(
        "INSERT INTO access_keys(access_key_id, account_id, secret_access_key, created_at) VALUES (?, ?, ?, ?)
         ON CONFLICT(access_key_id) DO NOTHING",
    )
    .bind(access_key_id)
    .bind(account_id.as_str())
    .bind(secret_access_key)
    .bind(fmt_time(at))
    .execute(&mut *conn)
    .await?;
    if done.rows_affected() == 0 {
        return Err(StateError::AlreadyExists(format!(
            "access key {access_key_id}"
        )));
    }
    Ok(())
}

/// Refuses the command unless `account` owns every resource in `ids`, with the error of
/// the first kind that is missing.
async fn require_resources(
    conn: &mut SqliteConnection,
    account: &AccountId,
    ids: &[ResourceId],
) -> Result<(), StateError> {
    let instances: Vec<InstanceId> = ids
        .iter()
        .filter_map(|id| match id {
            ResourceId::Instance(i) => Some(i.clone()),
            _ => None,
        })
        .collect();
    if !instances.is_empty() {
        require_instances(conn, account, &instances).await?;
    }
    for id in ids {
        if let ResourceId::SecurityGroup(group) = id {
            security_groups::require_group(conn, account, group).await?;
        }
        if let ResourceId::Volume(volume) = id {
            volumes::require(conn, account, volume).await?;
        }
        if let ResourceId::Snapshot(snapshot) = id
            && snapshots::load(conn, account, Some(snapshot))
                .await?
                .is_empty()
        {
            return Err(snapshots::not_found(snapshot.as_str()));
        }
        if let ResourceId::Image(image) = id {
            images::require_owned(conn, account, image).await?;
        }
        if let ResourceId::ElasticIp(allocation) = id
            && !addresses::load(conn, account)
                .await?
                .iter()
                .any(|a| &a.allocation_id == allocation)
        {
            return Err(StateError::AllocationNotFound(allocation.to_string()));
        }
        if let ResourceId::KeyPair(key) = id {
            let found: Option<(i64,)> =
                sqlx::query_as("SELECT 1 FROM key_pairs WHERE key_pair_id = ? AND account_id = ?")
                    .bind(key.as_str())
                    .bind(account.as_str())
                    .fetch_optional(&mut *conn)
                    .await?;
            if found.is_none() {
                return Err(StateError::KeyPairNotFound(key.to_string()));
            }
        }
    }
    Ok(())
}

/// Refuses the command (which then writes nothing) when a resource ends up over the limit.
async fn check_tag_limit(conn: &mut SqliteConnection, resource_id: &str) -> Result<(), StateError> {
    let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM tags WHERE resource_id = ?")
        .bind(resource_id)
        .fetch_one(&mut *conn)
        .await?;
    if n > MAX_TAGS_PER_RESOURCE {
        return Err(StateError::TagLimitExceeded(resource_id.to_owned()));
    }
    Ok(())
}
