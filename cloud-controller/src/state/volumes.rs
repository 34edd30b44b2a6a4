//! Applying the volume commands, and reading volumes back.
//!
//! A volume is `available` or `in-use`; an attachment goes `attaching` → `attached` →
//! `detaching` → gone, the two arrows out of the node's hands confirmed by its reports
//! (`ObserveVolumes`). A deleted volume stays as a `deleted` tombstone for a day, so that the
//! zone's nodes are told to remove its bytes.

use canopy_common::{
    AccountId, InstanceId, InstanceState, ResourceId, SnapshotId, VolumeId, ZoneName,
};
use chrono::{DateTime, Utc};
use sqlx::SqliteConnection;

use super::command::Outcome;
use super::error::VolumeFault;
use super::query::{fmt_time, json_list, parse_time, tags_for};
use super::types::{AttachStatus, Attachment, Tag, Volume, VolumeState};
use super::{StateError, apply};

/// Makes the volumes a `WHERE` clause picks available, attached to nothing.
const CLEAR_ATTACHMENT: &str = "UPDATE volumes SET state = 'available', instance_id = NULL, \
     device = NULL, attach_status = NULL, attach_time = NULL";

fn refused(fault: VolumeFault, message: impl Into<String>) -> StateError {
    StateError::VolumeRefused {
        fault,
        message: message.into(),
    }
}

pub(super) fn not_found(id: &str) -> StateError {
    refused(
        VolumeFault::NotFound,
        format!("The volume '{id}' does not exist."),
    )
}

pub(super) async fn create(
    conn: &mut SqliteConnection,
    volume: &Volume,
    tags: &[Tag],
) -> Result<Outcome, StateError> {
    // A volume from a snapshot starts with the snapshot's bytes, recorded on the row so the
    // volume does not depend on the snapshot once made.
    let source = match &volume.snapshot_id {
        Some(id) => {
            let snapshot =
                super::snapshots::source_for_volume(conn, &volume.account_id, id).await?;
            if volume.size_gib < snapshot.volume_size_gib {
                return Err(refused(
                    VolumeFault::TooSmall,
                    format!(
                        "Volume of {}GiB is too small; minimum is {}GiB.",
                        volume.size_gib, snapshot.volume_size_gib
                    ),
                ));
            }
            snapshot.content
        }
        None => None,
    };
    let done = sqlx::query(
        "INSERT INTO volumes(volume_id, account_id, zone, size_gib, volume_type, iops, throughput,
            client_token, state, created_at, snapshot_id, source_sha256, source_size)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'available', ?, ?, ?, ?) ON CONFLICT DO NOTHING",
    )
    .bind(volume.volume_id.as_str())
    .bind(volume.account_id.as_str())
    .bind(volume.zone.as_str())
    .bind(volume.size_gib as i64)
    .bind(&volume.volume_type)
    .bind(volume.iops)
    .bind(volume.throughput)
    .bind(&volume.client_token)
    .bind(fmt_time(volume.created_at))
    .bind(volume.snapshot_id.as_ref().map(SnapshotId::as_str))
    .bind(source.as_ref().map(|s| s.sha256.as_str().to_owned()))
    .bind(source.as_ref().map(|s| s.size as i64))
    .execute(&mut *conn)
    .await?;
    if done.rows_affected() == 0 {
        return Err(refused(
            VolumeFault::TokenTaken,
            "the client token already made a volume",
        ));
    }
    let id = ResourceId::Volume(volume.volume_id.clone());
    apply::tag_resource(conn, &id, volume.account_id.as_str(), tags).await?;
    Ok(Outcome::Done)
}

pub(super) async fn delete(
    conn: &mut SqliteConnection,
    account: &AccountId,
    volume_id: &VolumeId,
    at: DateTime<Utc>,
) -> Result<Outcome, StateError> {
    let volume = require(conn, account, volume_id).await?;
    if let Some(a) = &volume.attachment {
        return Err(refused(
            VolumeFault::InUse,
            format!(
                "Volume {volume_id} is currently attached to {}",
                a.instance_id
            ),
        ));
    }
    // Plain `?` in order: see the note in `bulk` on numbered parameters.
    sqlx::query(
        "DELETE FROM tags WHERE resource_id = ?;
         UPDATE volumes SET state = 'deleted', deleted_at = ?, client_token = NULL
         WHERE volume_id = ?;",
    )
    .bind(volume_id.as_str())
    .bind(fmt_time(at))
    .bind(volume_id.as_str())
    .execute(&mut *conn)
    .await?;
    // The zone's nodes learn of the tombstone with the next document.
    apply::bump_generation(conn, &volume.zone).await?;
    Ok(Outcome::Done)
}

pub(super) async fn attach(
    conn: &mut SqliteConnection,
    account: &AccountId,
    volume_id: &VolumeId,
    instance_id: &InstanceId,
    device: &str,
    at: DateTime<Utc>,
) -> Result<Outcome, StateError> {
    let volume = require(conn, account, volume_id).await?;
    let found =
        super::query::require_instances(conn, account, std::slice::from_ref(instance_id)).await?;
    let inst = &found[instance_id];
    if let Some(a) = &volume.attachment {
        return Err(refused(
            VolumeFault::InUse,
            format!(
                "{volume_id} is already attached to an instance ({})",
                a.instance_id
            ),
        ));
    }
    if !matches!(inst.state, InstanceState::Running | InstanceState::Stopped) {
        return Err(refused(
            VolumeFault::IncorrectState,
            format!(
                "Instance '{instance_id}' is not 'running' or 'stopped' (it is '{}').",
                inst.state.name()
            ),
        ));
    }
    if inst.zone != volume.zone {
        return Err(refused(
            VolumeFault::ZoneMismatch,
            format!(
                "The volume '{volume_id}' is not in the same availability zone as instance '{instance_id}'"
            ),
        ));
    }
    let point = canopy_common::volumes::attachment_point(device);
    let taken: Vec<(String,)> =
        sqlx::query_as("SELECT device FROM volumes WHERE instance_id = ? AND state != 'deleted'")
            .bind(instance_id.as_str())
            .fetch_all(&mut *conn)
            .await?;
    if point.is_none()
        || taken
            .iter()
            .any(|(d,)| canopy_common::volumes::attachment_point(d) == point)
    {
        return Err(refused(
            VolumeFault::DeviceInUse,
            format!(
                "Invalid value '{device}' for unixDevice. Attachment point {device} is already in use"
            ),
        ));
    }
    sqlx::query(
        "UPDATE volumes SET state = 'in-use', instance_id = ?, device = ?,
            attach_status = 'attaching', attach_time = ?, delete_on_termination = 0
         WHERE volume_id = ?",
    )
    .bind(instance_id.as_str())
    .bind(device)
    .bind(fmt_time(at))
    .bind(volume_id.as_str())
    .execute(&mut *conn)
    .await?;
    apply::bump_generation(conn, &volume.zone).await?;
    Ok(Outcome::Done)
}

pub(super) async fn detach(
    conn: &mut SqliteConnection,
    account: &AccountId,
    volume_id: &VolumeId,
    instance_id: Option<&InstanceId>,
    device: Option<&str>,
    force: bool,
) -> Result<Outcome, StateError> {
    let volume = require(conn, account, volume_id).await?;
    let Some(attachment) = &volume.attachment else {
        return Err(refused(
            VolumeFault::IncorrectState,
            format!("Volume '{volume_id}' is in the 'available' state."),
        ));
    };
    if instance_id.is_some_and(|i| i != &attachment.instance_id)
        || device.is_some_and(|d| d != attachment.device)
    {
        return Err(refused(
            VolumeFault::AttachmentNotFound,
            format!(
                "Attachment point {} is not attached to the instance given for volume {volume_id}",
                device.unwrap_or(&attachment.device)
            ),
        ));
    }
    if force {
        clear(conn, std::slice::from_ref(volume_id)).await?;
    } else {
        sqlx::query("UPDATE volumes SET attach_status = 'detaching' WHERE volume_id = ?")
            .bind(volume_id.as_str())
            .execute(&mut *conn)
            .await?;
    }
    apply::bump_generation(conn, &volume.zone).await?;
    Ok(Outcome::Done)
}

/// The nodes' word on attachments under way. Only transitions they can confirm are taken:
/// `attaching` → `attached`, and `detaching` → gone; anything else (a report from before the
/// request) is skipped.
pub(super) async fn observe(
    conn: &mut SqliteConnection,
    zone: &ZoneName,
    attached: &[(VolumeId, InstanceId)],
    detached: &[(VolumeId, InstanceId)],
) -> Result<Outcome, StateError> {
    let pairs = |list: &[(VolumeId, InstanceId)]| {
        serde_json::to_string(list).map_err(|e| StateError::Corrupt(e.to_string()))
    };
    // Plain `?` in order: see the note in `bulk` on numbered parameters.
    let sql = format!(
        "UPDATE volumes SET attach_status = 'attached', initialized = 1
         WHERE zone = ? AND attach_status = 'attaching' AND EXISTS (
             SELECT 1 FROM jsonb_each(?) j
             WHERE j.value ->> 0 = volumes.volume_id AND j.value ->> 1 = volumes.instance_id);
         {CLEAR_ATTACHMENT}
         WHERE zone = ? AND attach_status = 'detaching' AND EXISTS (
             SELECT 1 FROM jsonb_each(?) j
             WHERE j.value ->> 0 = volumes.volume_id AND j.value ->> 1 = volumes.instance_id);"
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(zone.as_str())
        .bind(pairs(attached)?)
        .bind(zone.as_str())
        .bind(pairs(detached)?)
        .execute(&mut *conn)
        .await?;
    // The documents list what is attaching or attached: neither change alters them.
    Ok(Outcome::Done)
}

/// TerminateInstances: the instances' volumes are being detached (the node's report of the
/// terminated instance confirms it).
pub(super) async fn detach_from(
    conn: &mut SqliteConnection,
    instances: &[InstanceId],
) -> Result<(), StateError> {
    let ids = json_list(instances.iter().map(InstanceId::as_str))?;
    sqlx::query(
        "UPDATE volumes SET attach_status = 'detaching'
         WHERE instance_id IN (SELECT value FROM json_each(?))",
    )
    .bind(ids)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Instances now terminated have nothing attached: whatever was still attaching or
/// detaching from them is available again.
pub(super) async fn release_terminated(
    conn: &mut SqliteConnection,
    instances: &[InstanceId],
) -> Result<(), StateError> {
    let ids = json_list(instances.iter().map(InstanceId::as_str))?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "{CLEAR_ATTACHMENT} WHERE instance_id IN (SELECT value FROM json_each(?))"
    )))
    .bind(ids)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn clear(conn: &mut SqliteConnection, volumes: &[VolumeId]) -> Result<(), StateError> {
    let ids = json_list(volumes.iter().map(VolumeId::as_str))?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "{CLEAR_ATTACHMENT} WHERE volume_id IN (SELECT value FROM json_each(?))"
    )))
    .bind(ids)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

pub(super) async fn require(
    conn: &mut SqliteConnection,
    account: &AccountId,
    volume_id: &VolumeId,
) -> Result<Volume, StateError> {
    load(conn, account, Some(volume_id))
        .await?
        .pop()
        .ok_or_else(|| not_found(volume_id.as_str()))
}

/// The account's volumes (or the one named) with their tags, oldest first.
pub(super) async fn load(
    conn: &mut SqliteConnection,
    account: &AccountId,
    only: Option<&VolumeId>,
) -> Result<Vec<Volume>, StateError> {
    type Row = (
        i64,
        String,
        String,
        i64,
        String,
        Option<i64>,
        Option<i64>,
        Option<String>,
        String,
        String,
        Option<String>,
        Option<String>,
        Option<String>,
        Option<String>,
        bool,
        Option<String>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT rowid, volume_id, zone, size_gib, volume_type, iops, throughput, client_token, state,
            created_at, instance_id, device, attach_status, attach_time, delete_on_termination,
            snapshot_id
         FROM volumes
         WHERE account_id = ? AND state != 'deleted' AND (? IS NULL OR volume_id = ?)
         ORDER BY rowid",
    )
    .bind(account.as_str())
    .bind(only.map(VolumeId::as_str))
    .bind(only.map(VolumeId::as_str))
    .fetch_all(&mut *conn)
    .await?;
    let ids = json_list(rows.iter().map(|r| r.1.as_str()))?;
    let mut tags = tags_for(conn, Some(account), Some(&ids)).await?;
    let corrupt = |e: String| StateError::Corrupt(e);
    rows.into_iter()
        .map(
            |(
                seq,
                id,
                zone,
                size,
                vtype,
                iops,
                tput,
                token,
                state,
                created,
                inst,
                dev,
                status,
                at,
                dot,
                snapshot,
            )| {
                let attachment = match (inst, dev, status, at) {
                    (Some(i), Some(device), Some(status), Some(at)) => Some(Attachment {
                        instance_id: i
                            .parse()
                            .map_err(|e: canopy_common::IdError| corrupt(e.to_string()))?,
                        device,
                        status: AttachStatus::from_name(&status)
                            .ok_or_else(|| corrupt(format!("attach status {status:?}")))?,
                        attach_time: parse_time(&at)?,
                        delete_on_termination: dot,
                    }),
                    _ => None,
                };
                Ok(Volume {
                    seq,
                    tags: tags.remove(&id).unwrap_or_default(),
                    volume_id: id
                        .parse()
                        .map_err(|e: canopy_common::IdError| corrupt(e.to_string()))?,
                    account_id: account.clone(),
                    zone: zone
                        .parse()
                        .map_err(|e: canopy_common::IdError| corrupt(e.to_string()))?,
                    size_gib: u64::try_from(size).unwrap_or_default(),
                    volume_type: vtype,
                    iops: iops.and_then(|v| u32::try_from(v).ok()),
                    throughput: tput.and_then(|v| u32::try_from(v).ok()),
                    client_token: token,
                    state: match state.as_str() {
                        "in-use" => VolumeState::InUse,
                        "available" => VolumeState::Available,
                        other => return Err(corrupt(format!("volume state {other:?}"))),
                    },
                    created_at: parse_time(&created)?,
                    attachment,
                    snapshot_id: snapshot
                        .map(|s| s.parse())
                        .transpose()
                        .map_err(|e: canopy_common::IdError| corrupt(e.to_string()))?,
                })
            },
        )
        .collect()
}

/// An attachment under way, as the report intake compares it with what nodes report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingAttachment {
    pub volume_id: VolumeId,
    pub instance_id: InstanceId,
    pub status: AttachStatus,
}

impl super::Store {
    /// The account's volumes, with their tags.
    pub async fn volumes(&self, account: &AccountId) -> Result<Vec<Volume>, StateError> {
        let mut conn = self.pool().acquire().await?;
        load(&mut conn, account, None).await
    }

    /// The account's volume made with `client_token`, if any.
    pub async fn volume_by_token(
        &self,
        account: &AccountId,
        client_token: &str,
    ) -> Result<Option<Volume>, StateError> {
        let row: Option<(String,)> = sqlx::query_as(
            "SELECT volume_id FROM volumes WHERE account_id = ? AND client_token = ?",
        )
        .bind(account.as_str())
        .bind(client_token)
        .fetch_optional(self.pool())
        .await?;
        let Some((id,)) = row else { return Ok(None) };
        let id: VolumeId = id
            .parse()
            .map_err(|e: canopy_common::IdError| StateError::Corrupt(e.to_string()))?;
        let mut conn = self.pool().acquire().await?;
        Ok(load(&mut conn, account, Some(&id)).await?.pop())
    }

    /// The zone's attachments that wait for a node's word (`attaching`, `detaching`).
    pub async fn pending_attachments(
        &self,
        zone: &ZoneName,
    ) -> Result<Vec<PendingAttachment>, StateError> {
        let rows: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT volume_id, instance_id, attach_status FROM volumes
             WHERE zone = ? AND attach_status IN ('attaching', 'detaching')",
        )
        .bind(zone.as_str())
        .fetch_all(self.pool())
        .await?;
        rows.into_iter()
            .map(|(v, i, s)| {
                let corrupt = |e: String| StateError::Corrupt(e);
                Ok(PendingAttachment {
                    volume_id: v
                        .parse()
                        .map_err(|e: canopy_common::IdError| corrupt(e.to_string()))?,
                    instance_id: i
                        .parse()
                        .map_err(|e: canopy_common::IdError| corrupt(e.to_string()))?,
                    status: AttachStatus::from_name(&s)
                        .ok_or_else(|| corrupt(format!("attach status {s:?}")))?,
                })
            })
            .collect()
    }

    /// The zone's attachments that wait for a node's word, or `None` when none waits in any
    /// zone (the intake may then stop looking until a command could change that).
    pub async fn pending_attachments_anywhere(
        &self,
        zone: &ZoneName,
    ) -> Result<Option<Vec<PendingAttachment>>, StateError> {
        let (any,): (bool,) = sqlx::query_as(
            "SELECT EXISTS(SELECT 1 FROM volumes WHERE attach_status IN ('attaching', 'detaching'))",
        )
        .fetch_one(self.pool())
        .await?;
        if !any {
            return Ok(None);
        }
        Ok(Some(self.pending_attachments(zone).await?))
    }

    /// Volumes of the zone deleted since `since`: their nodes remove the bytes.
    pub async fn deleted_volumes(
        &self,
        zone: &ZoneName,
        since: DateTime<Utc>,
    ) -> Result<Vec<VolumeId>, StateError> {
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT volume_id FROM volumes
             WHERE state = 'deleted' AND zone = ? AND deleted_at > ? ORDER BY volume_id",
        )
        .bind(zone.as_str())
        .bind(fmt_time(since))
        .fetch_all(self.pool())
        .await?;
        Ok(rows.into_iter().filter_map(|(v,)| v.parse().ok()).collect())
    }
}
