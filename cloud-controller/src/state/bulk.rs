//! Applying many commands at once: the same rows and outcomes as [`apply`] one command after
//! another, with far fewer SQL statements.
//!
//! Group commit puts dozens of RunInstances into one log entry, and every replica applies
//! them. One at a time, a launch costs about nine statements (savepoint included), each a
//! round trip to the SQLite connection's thread, which under load costs far more than
//! SQLite's own work. A run of launches applied here costs two round trips in all: one read
//! (earlier client tokens and the images), then one call carrying a multi-row insert per
//! table and the zones' generation updates. Every rejection is decided in memory before
//! anything is written, so a rejected launch writes nothing, as it would alone.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use sqlx::SqliteConnection;

use super::StateError;
use super::apply::{MAX_TAGS_PER_RESOURCE, apply};
use super::command::{Command, Outcome, launch_image};
use super::query::fmt_time;
use super::types::RESOURCE_TYPE_INSTANCE;

/// The caller's transaction, as [`apply_each`] finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tx {
    /// Already begun.
    Open,
    /// To be begun (`BEGIN IMMEDIATE`) by the first statement: a launch run's check read
    /// carries it, saving the round trip of a statement of its own.
    BeginImmediate,
}

/// Begins the transaction now if it is still to be begun.
pub async fn begin_if_pending(conn: &mut SqliteConnection, tx: Tx) -> Result<(), sqlx::Error> {
    if tx == Tx::BeginImmediate {
        sqlx::query("BEGIN IMMEDIATE").execute(&mut *conn).await?;
    }
    Ok(())
}

/// Applies `commands` in order inside the caller's transaction (begun first when `tx` says
/// so, even for no commands): one result per command, where an `Err` is always a
/// deterministic rejection (the command wrote nothing). A failure of the store itself is the
/// outer error, and the caller must abandon the transaction (which may or may not have begun).
pub async fn apply_each(
    conn: &mut SqliteConnection,
    commands: &[Command],
    mut tx: Tx,
) -> Result<Vec<Result<Outcome, StateError>>, StateError> {
    let mut results = Vec::with_capacity(commands.len());
    let mut rest = commands;
    while let Some(first) = rest.first() {
        let run = rest
            .iter()
            .take_while(|c| matches!(c, Command::LaunchInstances { .. }))
            .count();
        if run > 0 {
            results.extend(apply_launches(conn, &rest[..run], tx).await?);
            rest = &rest[run..];
        } else {
            begin_if_pending(conn, tx).await?;
            results.push(apply_alone(conn, first).await?);
            rest = &rest[1..];
        }
        tx = Tx::Open;
    }
    begin_if_pending(conn, tx).await?;
    Ok(results)
}

/// One command; inside a savepoint when it can be refused, so that a refusal rolls back
/// what it wrote before it was refused.
async fn apply_alone(
    conn: &mut SqliteConnection,
    command: &Command,
) -> Result<Result<Outcome, StateError>, StateError> {
    if !command.can_be_refused() {
        return apply(conn, command).await.map(Ok);
    }
    sqlx::query("SAVEPOINT canopy_command")
        .execute(&mut *conn)
        .await?;
    let result = apply(conn, command).await;
    if matches!(&result, Err(e) if !e.is_rejection()) {
        return result.map(Ok);
    }
    if result.is_err() {
        sqlx::query("ROLLBACK TO canopy_command")
            .execute(&mut *conn)
            .await?;
    }
    sqlx::query("RELEASE canopy_command")
        .execute(&mut *conn)
        .await?;
    Ok(result)
}

/// The read a run of launches starts with (see [`apply_launches`]); a macro so that the
/// variant beginning the transaction is spelled once.
macro_rules! launch_checks_sql {
    () => {
        "SELECT 'token', r.account_id, r.client_token, r.reservation_id, r.request_hash
             FROM jsonb_each(?1) j JOIN reservations r
               ON r.account_id = j.value ->> 0 AND r.client_token = j.value ->> 1
             UNION ALL
             SELECT 'image', image_id, NULL, NULL, NULL FROM images
             WHERE state = 'available' AND image_id IN (SELECT value FROM json_each(?2))
             UNION ALL
             SELECT 'group', g.account_id, g.group_id, NULL, NULL
             FROM jsonb_each(?3) j JOIN security_groups g
               ON g.account_id = j.value ->> 0 AND g.group_id = j.value ->> 1"
    };
}

/// A run of `LaunchInstances`, decided in order exactly as [`apply`] decides each one.
async fn apply_launches(
    conn: &mut SqliteConnection,
    launches: &[Command],
    tx: Tx,
) -> Result<Vec<Result<Outcome, StateError>>, StateError> {
    // The two reads every launch's checks need, for the whole run at once.
    let mut asked_tokens = Vec::new();
    // A run is mostly launches of the same image into the same default group: ask for each once.
    let mut asked_images = BTreeSet::new();
    let mut asked_groups = BTreeSet::new();
    for command in launches {
        let launch = launch_fields(command)?;
        if let Some(token) = launch.client_token {
            asked_tokens.push((launch.account_id.as_str(), token.as_str()));
        }
        asked_images.insert(launch_image(launch.instances));
        if let Some(first) = launch.instances.first() {
            asked_groups.extend(
                first
                    .security_groups
                    .iter()
                    .map(|(g, _)| (launch.account_id.as_str(), g.as_str())),
            );
        }
    }
    // One read for both: ('token', account, token, reservation, hash) rows for the earlier
    // launches, ('image', id, NULL, NULL, NULL) rows for the images that exist.
    type CheckRow = (
        String,
        String,
        Option<String>,
        Option<String>,
        Option<String>,
    );
    let found: Vec<CheckRow> = sqlx::query_as(match tx {
        Tx::Open => launch_checks_sql!(),
        Tx::BeginImmediate => concat!("BEGIN IMMEDIATE; ", launch_checks_sql!()),
    })
    .bind(serde_json::to_string(&asked_tokens).map_err(corrupt)?)
    .bind(serde_json::to_string(&asked_images).map_err(corrupt)?)
    .bind(serde_json::to_string(&asked_groups).map_err(corrupt)?)
    .fetch_all(&mut *conn)
    .await?;
    // (account, token) -> (reservation, request hash), growing as the run accepts launches.
    let mut tokens: HashMap<(String, String), (String, String)> = HashMap::new();
    let mut images: HashSet<String> = HashSet::new();
    // (account, group id) of the groups that exist.
    let mut groups: HashSet<(String, String)> = HashSet::new();
    for (kind, id, token, reservation, hash) in found {
        match (kind.as_str(), token, reservation, hash) {
            ("token", Some(token), Some(reservation), Some(hash)) => {
                tokens.insert((id, token), (reservation, hash));
            }
            ("image", ..) => {
                images.insert(id);
            }
            ("group", Some(group), ..) => {
                groups.insert((id, group));
            }
            _ => {
                return Err(StateError::Corrupt(format!(
                    "unexpected launch check row {kind}"
                )));
            }
        }
    }

    let mut results = Vec::with_capacity(launches.len());
    let mut reservations = Vec::new();
    let mut instance_rows = Vec::new();
    let mut tag_rows = Vec::new();
    let mut group_rows = Vec::new();
    let mut bumps: BTreeMap<&str, i64> = BTreeMap::new();
    for command in launches {
        let Launch {
            reservation_id,
            account_id,
            client_token,
            request_hash,
            instances,
            tags,
            at,
        } = launch_fields(command)?;
        let at = fmt_time(at);
        if let Some(token) = client_token {
            let key = (account_id.to_string(), token.clone());
            if let Some((prior_id, prior_hash)) = tokens.get(&key) {
                results.push(if prior_hash != request_hash {
                    Err(StateError::IdempotentParameterMismatch)
                } else {
                    prior_id
                        .parse()
                        .map(|reservation_id| Outcome::Launched {
                            reservation_id,
                            replayed: true,
                        })
                        .map_err(|e| StateError::Corrupt(format!("{e}")))
                });
                continue;
            }
        }
        let image = launch_image(instances);
        if !images.contains(image) {
            results.push(Err(StateError::ImageNotFound(image.to_owned())));
            continue;
        }
        let missing_group = instances.first().and_then(|first| {
            first
                .security_groups
                .iter()
                .map(|(g, _)| g)
                .find(|g| !groups.contains(&(account_id.to_string(), g.to_string())))
        });
        if let Some(group) = missing_group {
            results.push(Err(StateError::SecurityGroupNotFound(group.to_string())));
            continue;
        }
        // Tags with the same key overwrite each other, as the one-by-one inserts do.
        let keys: HashSet<&str> = tags.iter().map(|t| t.key.as_str()).collect();
        if keys.len() as i64 > MAX_TAGS_PER_RESOURCE
            && let Some(first) = instances.first()
        {
            results.push(Err(StateError::TagLimitExceeded(
                first.instance_id.to_string(),
            )));
            continue;
        }
        if let Some(token) = client_token {
            tokens.insert(
                (account_id.to_string(), token.clone()),
                (reservation_id.to_string(), request_hash.clone()),
            );
        }
        reservations.push(ReservationRow(
            reservation_id.as_str(),
            account_id.as_str(),
            client_token.as_deref(),
            request_hash,
            at.clone(),
        ));
        let mut zones = HashSet::new();
        for inst in instances {
            instance_rows.push(InstanceRow(
                inst.instance_id.as_str(),
                reservation_id.as_str(),
                account_id.as_str(),
                inst.launch_index,
                inst.image_id.as_str(),
                &inst.instance_type,
                inst.resources.vcpus,
                inst.resources.memory_mib,
                inst.resources.disk_gib,
                inst.zone.as_str(),
                inst.key_name.as_deref(),
                inst.user_data.as_ref().map(hex::encode),
                client_token.as_deref(),
                at.clone(),
                inst.kernel_id.as_ref().map(|i| i.as_str()),
                inst.ramdisk_id.as_ref().map(|i| i.as_str()),
                inst.public_key.as_deref(),
                inst.metadata_options.http_tokens(),
                inst.metadata_options.http_endpoint(),
            ));
            for (position, (group, _)) in inst.security_groups.iter().enumerate() {
                group_rows.push((inst.instance_id.as_str(), group.as_str(), position));
            }
            for tag in tags {
                tag_rows.push((
                    inst.instance_id.as_str(),
                    account_id.as_str(),
                    tag.key.as_str(),
                    tag.value.as_str(),
                ));
            }
            if zones.insert(inst.zone.as_str()) {
                *bumps.entry(inst.zone.as_str()).or_default() += 1;
            }
        }
        results.push(Ok(Outcome::Launched {
            reservation_id: reservation_id.clone(),
            replayed: false,
        }));
    }

    if reservations.is_empty() {
        return Ok(results);
    }
    // One call, four statements; an empty array inserts nothing. Parameters are plain `?`,
    // bound in order across the statements: sqlx-sqlite counts every unnamed slot below a
    // numbered one (`?4`) as taking the next argument, so numbered ones misbind here.
    let bumps: Vec<(&str, i64)> = bumps.into_iter().collect();
    sqlx::query(
        "INSERT INTO reservations(reservation_id, account_id, client_token, request_hash, created_at)
         SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4
         FROM jsonb_each(?) ORDER BY key;
         INSERT INTO instances(instance_id, reservation_id, account_id, launch_index, image_id, instance_type,
            vcpus, memory_mib, disk_gib, zone, key_name, user_data, client_token, state, desired,
            launch_time, state_changed_at, kernel_id, ramdisk_id, public_key,
            metadata_http_tokens, metadata_http_endpoint)
         SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5,
            value ->> 6, value ->> 7, value ->> 8, value ->> 9, value ->> 10, unhex(value ->> 11),
            value ->> 12, 'pending', 'running', value ->> 13, value ->> 13, value ->> 14, value ->> 15,
            value ->> 16, value ->> 17, value ->> 18
         FROM jsonb_each(?) ORDER BY key;
         INSERT INTO tags(resource_id, resource_type, account_id, key, value)
         SELECT value ->> 0, ?, value ->> 1, value ->> 2, value ->> 3
         FROM jsonb_each(?) WHERE true ORDER BY key
         ON CONFLICT(resource_id, key) DO UPDATE SET value = excluded.value;
         INSERT INTO instance_security_groups(instance_id, group_id, position)
         SELECT value ->> 0, value ->> 1, value ->> 2 FROM jsonb_each(?) WHERE true ORDER BY key
         ON CONFLICT DO NOTHING;
         UPDATE zones SET generation = generation + (j.value ->> 1)
         FROM jsonb_each(?) j WHERE zones.zone = j.value ->> 0;",
    )
    .bind(serde_json::to_string(&reservations).map_err(corrupt)?)
    .bind(serde_json::to_string(&instance_rows).map_err(corrupt)?)
    .bind(RESOURCE_TYPE_INSTANCE)
    .bind(serde_json::to_string(&tag_rows).map_err(corrupt)?)
    .bind(serde_json::to_string(&group_rows).map_err(corrupt)?)
    .bind(serde_json::to_string(&bumps).map_err(corrupt)?)
    .execute(&mut *conn)
    .await?;
    Ok(results)
}

/// A reservation's row as the launch insert reads it (`value ->> N`). The rows are tuple
/// structs, which serialize as JSON arrays straight into the bound text (no
/// `serde_json::Value` per row).
#[derive(serde::Serialize)]
struct ReservationRow<'a>(&'a str, &'a str, Option<&'a str>, &'a str, String);

/// A new instance's row, in the order of the launch insert's `value ->> N`.
#[derive(serde::Serialize)]
struct InstanceRow<'a>(
    &'a str,
    &'a str,
    &'a str,
    u32,
    &'a str,
    &'a str,
    u32,
    u64,
    u64,
    &'a str,
    Option<&'a str>,
    Option<String>,
    Option<&'a str>,
    String,
    Option<&'a str>,
    Option<&'a str>,
    Option<&'a str>,
    &'static str,
    &'static str,
);

/// The fields of a `LaunchInstances`, borrowed.
struct Launch<'a> {
    reservation_id: &'a canopy_common::ReservationId,
    account_id: &'a canopy_common::AccountId,
    client_token: &'a Option<String>,
    request_hash: &'a String,
    instances: &'a [super::command::NewInstance],
    tags: &'a [super::types::Tag],
    at: chrono::DateTime<chrono::Utc>,
}

fn launch_fields(command: &Command) -> Result<Launch<'_>, StateError> {
    match command {
        Command::LaunchInstances {
            reservation_id,
            account_id,
            client_token,
            request_hash,
            instances,
            tags,
            at,
        } => Ok(Launch {
            reservation_id,
            account_id,
            client_token,
            request_hash,
            instances,
            tags,
            at: *at,
        }),
        _ => Err(StateError::Corrupt(
            "a launch run holds another command".into(),
        )),
    }
}

fn corrupt(e: serde_json::Error) -> StateError {
    StateError::Corrupt(e.to_string())
}
