//! Applying the snapshot commands, and reading snapshots back.
//!
//! A snapshot is `pending` while a node of its volume's zone copies the volume and uploads
//! the copy; the upload completes it (`completed`, with the bytes' digest) or fails it
//! (`error`). A volume no node ever wrote has no bytes anywhere: its snapshot completes at
//! once, with the bytes it was made from (its own source snapshot's) or none (all zeros).
//! A snapshot of an instance's root disk (CreateImage, `images.rs`) is taken by the node
//! the instance lives on, and its image follows it.

use canopy_common::{AccountId, ResourceId, Sha256Digest, SnapshotId, SnapshotRef, ZoneName};
use canopy_common::{SnapshotRequest, SnapshotSource, VolumeId};
use chrono::{DateTime, Utc};
use sqlx::SqliteConnection;

use super::command::Outcome;
use super::error::SnapshotFault;
use super::query::{fmt_time, json_list, parse_time, tags_for};
use super::types::{Snapshot, SnapshotOutcome, SnapshotState, Tag};
use super::{StateError, apply, images, volumes};

fn refused(fault: SnapshotFault, message: impl Into<String>) -> StateError {
    StateError::SnapshotRefused {
        fault,
        message: message.into(),
    }
}

pub(super) fn not_found(id: &str) -> StateError {
    refused(
        SnapshotFault::NotFound,
        format!("The snapshot '{id}' does not exist."),
    )
}

fn corrupt(e: impl std::fmt::Display) -> StateError {
    StateError::Corrupt(e.to_string())
}

/// The bytes a volume holds before any node wrote it: its source snapshot's, if any, and
/// whether a node has (or is about to have) written bytes of its own.
async fn volume_bytes(
    conn: &mut SqliteConnection,
    volume_id: &VolumeId,
) -> Result<(bool, Option<(String, i64)>), StateError> {
    let (initialized, sha, size): (bool, Option<String>, Option<i64>) = sqlx::query_as(
        "SELECT initialized, source_sha256, source_size FROM volumes WHERE volume_id = ?",
    )
    .bind(volume_id.as_str())
    .fetch_one(&mut *conn)
    .await?;
    Ok((initialized, sha.zip(size)))
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn create(
    conn: &mut SqliteConnection,
    account: &AccountId,
    snapshot_id: &SnapshotId,
    volume_id: &VolumeId,
    description: &str,
    at: DateTime<Utc>,
    tags: &[Tag],
) -> Result<Outcome, StateError> {
    let volume = volumes::require(conn, account, volume_id).await?;
    let (initialized, source) = volume_bytes(conn, volume_id).await?;
    // A volume attached (or being attached) may be written by its node now; one that a node
    // had attached has bytes there. Either way a node takes the snapshot.
    let on_a_node = initialized || volume.attachment.is_some();
    let (state, completed_at, sha256, size) = if on_a_node {
        ("pending", None, None, None)
    } else {
        let (sha, size) = source.unzip();
        ("completed", Some(fmt_time(at)), sha, size)
    };
    let done = sqlx::query(
        "INSERT INTO snapshots(snapshot_id, account_id, volume_id, zone, volume_size_gib,
            description, state, started_at, completed_at, sha256, size_bytes)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
    )
    .bind(snapshot_id.as_str())
    .bind(account.as_str())
    .bind(volume_id.as_str())
    .bind(volume.zone.as_str())
    .bind(volume.size_gib as i64)
    .bind(description)
    .bind(state)
    .bind(fmt_time(at))
    .bind(completed_at)
    .bind(sha256)
    .bind(size)
    .execute(&mut *conn)
    .await?;
    if done.rows_affected() == 0 {
        return Err(StateError::AlreadyExists(format!("snapshot {snapshot_id}")));
    }
    let id = ResourceId::Snapshot(snapshot_id.clone());
    apply::tag_resource(conn, &id, account.as_str(), tags).await?;
    if on_a_node {
        // The zone's nodes learn of the request with the next document.
        apply::bump_generation(conn, &volume.zone).await?;
    }
    Ok(Outcome::Done)
}

/// A node's upload ended: the snapshot completes or fails. Only a pending snapshot changes;
/// a second upload of one (a node that retried) or one deleted meanwhile is skipped.
pub(super) async fn complete(
    conn: &mut SqliteConnection,
    snapshot_id: &SnapshotId,
    outcome: &SnapshotOutcome,
    at: DateTime<Utc>,
) -> Result<Outcome, StateError> {
    let zone: Option<(String,)> =
        sqlx::query_as("SELECT zone FROM snapshots WHERE snapshot_id = ? AND state = 'pending'")
            .bind(snapshot_id.as_str())
            .fetch_optional(&mut *conn)
            .await?;
    let Some((zone,)) = zone else {
        return Ok(Outcome::Done);
    };
    match outcome {
        SnapshotOutcome::Completed { sha256, size, .. } => {
            sqlx::query(
                "UPDATE snapshots SET state = 'completed', completed_at = ?, sha256 = ?,
                    size_bytes = ?
                 WHERE snapshot_id = ?",
            )
            .bind(fmt_time(at))
            .bind(sha256.as_str())
            .bind(*size as i64)
            .bind(snapshot_id.as_str())
            .execute(&mut *conn)
            .await?;
        }
        SnapshotOutcome::Failed { message } => {
            sqlx::query(
                "UPDATE snapshots SET state = 'error', status_message = ? WHERE snapshot_id = ?",
            )
            .bind(message)
            .bind(snapshot_id.as_str())
            .execute(&mut *conn)
            .await?;
        }
    }
    images::root_completed(conn, snapshot_id, outcome).await?;
    // The request leaves the zone's document.
    apply::bump_generation(conn, &zone.parse().map_err(corrupt)?).await?;
    Ok(Outcome::Done)
}

/// Deletes a snapshot of the account. Volumes made from it keep its bytes (their rows name
/// the digest), as EBS volumes outlive their snapshots.
pub(super) async fn delete(
    conn: &mut SqliteConnection,
    account: &AccountId,
    snapshot_id: &SnapshotId,
) -> Result<Outcome, StateError> {
    let snapshot = load(conn, account, Some(snapshot_id))
        .await?
        .pop()
        .ok_or_else(|| not_found(snapshot_id.as_str()))?;
    if let Some(image) = images::using_snapshot(conn, snapshot_id).await? {
        return Err(refused(
            SnapshotFault::InUse,
            format!("The snapshot {snapshot_id} is currently in use by {image}"),
        ));
    }
    // Plain `?` in order: see the note in `bulk` on numbered parameters.
    sqlx::query(
        "DELETE FROM tags WHERE resource_id = ?;
         DELETE FROM snapshots WHERE snapshot_id = ?;",
    )
    .bind(snapshot_id.as_str())
    .bind(snapshot_id.as_str())
    .execute(&mut *conn)
    .await?;
    if snapshot.state == SnapshotState::Pending {
        apply::bump_generation(conn, &snapshot.zone).await?;
    }
    Ok(Outcome::Done)
}

/// The completed snapshot of the account a new volume is made from: its size and bytes.
pub(super) async fn source_for_volume(
    conn: &mut SqliteConnection,
    account: &AccountId,
    snapshot_id: &SnapshotId,
) -> Result<Snapshot, StateError> {
    let snapshot = load(conn, account, Some(snapshot_id))
        .await?
        .pop()
        .ok_or_else(|| not_found(snapshot_id.as_str()))?;
    if snapshot.state != SnapshotState::Completed {
        return Err(refused(
            SnapshotFault::IncorrectState,
            format!(
                "Snapshot '{snapshot_id}' is in state '{}' and cannot be used to create a volume.",
                snapshot.state.name()
            ),
        ));
    }
    Ok(snapshot)
}

/// The account's snapshots (or the one named) with their tags, oldest first.
pub(super) async fn load(
    conn: &mut SqliteConnection,
    account: &AccountId,
    only: Option<&SnapshotId>,
) -> Result<Vec<Snapshot>, StateError> {
    type Row = (
        i64,
        String,
        String,
        String,
        i64,
        String,
        String,
        Option<String>,
        String,
        Option<String>,
        Option<String>,
        Option<i64>,
        Option<String>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT rowid, snapshot_id, volume_id, zone, volume_size_gib, description, state,
            status_message, started_at, completed_at, sha256, size_bytes, instance_id
         FROM snapshots WHERE account_id = ? AND (? IS NULL OR snapshot_id = ?)
         ORDER BY rowid",
    )
    .bind(account.as_str())
    .bind(only.map(SnapshotId::as_str))
    .bind(only.map(SnapshotId::as_str))
    .fetch_all(&mut *conn)
    .await?;
    let ids = json_list(rows.iter().map(|r| r.1.as_str()))?;
    let mut tags = tags_for(conn, Some(account), Some(&ids)).await?;
    rows.into_iter()
        .map(
            |(
                seq,
                id,
                volume,
                zone,
                size,
                description,
                state,
                message,
                started,
                done,
                sha,
                bytes,
                instance,
            )| {
                let snapshot_id: SnapshotId = id.parse().map_err(corrupt)?;
                let content = match (sha, bytes) {
                    (Some(sha), Some(bytes)) => Some(SnapshotRef {
                        snapshot_id: snapshot_id.clone(),
                        sha256: Sha256Digest::parse(&sha).map_err(corrupt)?,
                        size: u64::try_from(bytes).unwrap_or_default(),
                    }),
                    _ => None,
                };
                Ok(Snapshot {
                    seq,
                    tags: tags.remove(&id).unwrap_or_default(),
                    snapshot_id,
                    account_id: account.clone(),
                    volume_id: volume.parse().map_err(corrupt)?,
                    zone: zone.parse().map_err(corrupt)?,
                    volume_size_gib: u64::try_from(size).unwrap_or_default(),
                    description,
                    state: SnapshotState::from_name(&state)
                        .ok_or_else(|| corrupt(format!("snapshot state {state:?}")))?,
                    status_message: message,
                    started_at: parse_time(&started)?,
                    completed_at: done.as_deref().map(parse_time).transpose()?,
                    content,
                    instance_id: instance
                        .as_deref()
                        .map(str::parse)
                        .transpose()
                        .map_err(corrupt)?,
                })
            },
        )
        .collect()
}

impl super::Store {
    /// The account's snapshots, with their tags.
    pub async fn snapshots(&self, account: &AccountId) -> Result<Vec<Snapshot>, StateError> {
        let mut conn = self.pool().acquire().await?;
        load(&mut conn, account, None).await
    }

    /// A snapshot's state, whoever owns it; `None` when there is none (deleted, or never).
    pub async fn snapshot_state(
        &self,
        snapshot_id: &SnapshotId,
    ) -> Result<Option<SnapshotState>, StateError> {
        let row: Option<(String,)> =
            sqlx::query_as("SELECT state FROM snapshots WHERE snapshot_id = ?")
                .bind(snapshot_id.as_str())
                .fetch_optional(self.pool())
                .await?;
        row.map(|(s,)| {
            SnapshotState::from_name(&s).ok_or_else(|| corrupt(format!("snapshot state {s:?}")))
        })
        .transpose()
    }

    /// The zone's pending snapshots, for its nodes to take.
    pub async fn pending_snapshots(
        &self,
        zone: &ZoneName,
    ) -> Result<Vec<SnapshotRequest>, StateError> {
        let rows: Vec<(String, String, Option<String>, Option<String>)> = sqlx::query_as(
            "SELECT snapshot_id, volume_id, instance_id, node_id FROM snapshots
             WHERE zone = ? AND state = 'pending' ORDER BY snapshot_id",
        )
        .bind(zone.as_str())
        .fetch_all(self.pool())
        .await?;
        rows.into_iter()
            .map(|(s, v, instance, node)| {
                let source = match (instance, node) {
                    (Some(i), Some(n)) => SnapshotSource::Root {
                        instance_id: i.parse().map_err(corrupt)?,
                        node_id: n.parse().map_err(corrupt)?,
                    },
                    _ => SnapshotSource::Volume(v.parse().map_err(corrupt)?),
                };
                Ok(SnapshotRequest {
                    snapshot_id: s.parse().map_err(corrupt)?,
                    source,
                })
            })
            .collect()
    }
}
