//! CreateImage: a machine image made from a stopped instance's root disk.
//!
//! As on AWS, the image's root is a snapshot of the instance's root disk, and the image
//! follows it: both are `pending` while the node the instance lives on flattens its root
//! overlay (with the cached base image under it) into one standalone image and uploads it
//! through the snapshot path (`ZoneAgent.UploadSnapshot`); the snapshot's completion
//! makes the image `available` with the same bytes, its failure makes it `failed`.

use canopy_common::{
    AccountId, ImageId, ImageKind, InstanceId, InstanceState, ResourceId, SnapshotId,
};
use chrono::{DateTime, Utc};
use sqlx::SqliteConnection;

use super::command::Outcome;
use super::error::ImageFault;
use super::query::{fmt_time, require_instances};
use super::types::{NO_VOLUME, SnapshotOutcome, Tag};
use super::{StateError, apply};

/// The state reason of an image whose root disk could not be copied.
pub const COPY_FAILED: &str = "Server.InternalError";

fn refused(fault: ImageFault, message: impl Into<String>) -> StateError {
    StateError::ImageRefused {
        fault,
        message: message.into(),
    }
}

/// What CreateImage names.
pub(super) struct NewImage<'a> {
    pub account: &'a AccountId,
    pub image_id: &'a ImageId,
    pub snapshot_id: &'a SnapshotId,
    pub instance_id: &'a InstanceId,
    pub name: &'a str,
    pub description: &'a str,
    pub at: DateTime<Utc>,
    pub image_tags: &'a [Tag],
    pub snapshot_tags: &'a [Tag],
}

/// Applies CreateImage: the snapshot of the root disk and the image whose root it is.
pub(super) async fn create(
    conn: &mut SqliteConnection,
    new: NewImage<'_>,
) -> Result<Outcome, StateError> {
    let account = new.account;
    let mut found = require_instances(conn, account, std::slice::from_ref(new.instance_id)).await?;
    let inst = found
        .remove(new.instance_id)
        .ok_or_else(|| StateError::InstancesNotFound(vec![new.instance_id.clone()]))?;
    if inst.state != InstanceState::Stopped {
        // A running guest writes its disk: copying it is not safe, and AWS's reboot
        // (NoReboot=false) is not done here. See docs/ec2-api.md.
        return Err(refused(
            ImageFault::InstanceNotStopped,
            format!(
                "The instance '{}' is {}: Canopy makes images of stopped instances only. Stop it first (StopInstances), then call CreateImage.",
                inst.instance_id,
                inst.state.name()
            ),
        ));
    }
    let taken: Option<(String,)> = sqlx::query_as(
        "SELECT image_id FROM images WHERE owner_id = ? AND name = ? AND state != 'deregistered'",
    )
    .bind(account.as_str())
    .bind(new.name)
    .fetch_optional(&mut *conn)
    .await?;
    if let Some((other,)) = taken {
        return Err(refused(
            ImageFault::DuplicateName,
            format!("AMI name {} is already in use by AMI {other}", new.name),
        ));
    }
    // What the image inherits from the one the instance was launched from (its row stays
    // when it is deregistered); architecture and bytes.
    let (architecture, source_sha, source_size, source_format): (
        String,
        Option<String>,
        i64,
        Option<String>,
    ) = sqlx::query_as(
        "SELECT architecture, sha256, size_bytes, disk_format FROM images WHERE image_id = ?",
    )
    .bind(inst.image_id.as_str())
    .fetch_optional(&mut *conn)
    .await?
    .unwrap_or_else(|| ("x86_64".into(), None, 0, None));

    // An instance no node ever reported on was never defined anywhere: its root disk is
    // still exactly its image's bytes, so both complete at once with them (none for an
    // image without content, which only simulated nodes run).
    let (state, snapshot_state, completed_at, sha256, size, format) = match &inst.node_id {
        Some(_) => ("pending", "pending", None, None, 0, None),
        None => (
            "available",
            "completed",
            Some(fmt_time(new.at)),
            source_sha.clone(),
            source_size,
            source_format,
        ),
    };
    let volume_gib = inst.resources.disk_gib as i64;
    sqlx::query(
        "INSERT INTO snapshots(snapshot_id, account_id, volume_id, zone, volume_size_gib,
            description, state, started_at, completed_at, sha256, size_bytes, instance_id, node_id)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(new.snapshot_id.as_str())
    .bind(account.as_str())
    .bind(NO_VOLUME)
    .bind(inst.zone.as_str())
    .bind(volume_gib)
    .bind(format!(
        "Created by CreateImage({}) for {}",
        inst.instance_id, new.image_id
    ))
    .bind(snapshot_state)
    .bind(fmt_time(new.at))
    .bind(&completed_at)
    .bind(&sha256)
    .bind(sha256.as_ref().map(|_| size))
    .bind(inst.instance_id.as_str())
    .bind(inst.node_id.as_ref().map(|n| n.as_str()))
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "INSERT INTO images(image_id, owner_id, name, description, location, architecture,
            is_public, state, created_at, image_type, kernel_id, ramdisk_id, sha256, size_bytes,
            disk_format, root_snapshot_id, root_volume_gib, source_instance_id)
         VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(new.image_id.as_str())
    .bind(account.as_str())
    .bind(new.name)
    .bind(new.description)
    // EC2 shows an EBS-backed image's location as the owner and its name.
    .bind(format!("{account}/{}", new.name))
    .bind(&architecture)
    .bind(state)
    .bind(fmt_time(new.at))
    .bind(ImageKind::Machine.name())
    .bind(inst.kernel_id.as_ref().map(ImageId::as_str))
    .bind(inst.ramdisk_id.as_ref().map(ImageId::as_str))
    .bind(&sha256)
    .bind(size)
    .bind(&format)
    .bind(new.snapshot_id.as_str())
    .bind(volume_gib)
    .bind(inst.instance_id.as_str())
    .execute(&mut *conn)
    .await?;
    for (resource, tags) in [
        (ResourceId::Image(new.image_id.clone()), new.image_tags),
        (
            ResourceId::Snapshot(new.snapshot_id.clone()),
            new.snapshot_tags,
        ),
    ] {
        apply::tag_resource(conn, &resource, account.as_str(), tags).await?;
    }
    if inst.node_id.is_some() {
        // The instance's node learns of the request with the zone's next document.
        apply::bump_generation(conn, &inst.zone).await?;
    }
    Ok(Outcome::Done)
}

/// A snapshot's upload ended: the pending image whose root it is follows it (available
/// with its bytes, or failed with the node's reason). Images deregistered meanwhile stay
/// as they are.
pub(super) async fn root_completed(
    conn: &mut SqliteConnection,
    snapshot_id: &SnapshotId,
    outcome: &SnapshotOutcome,
) -> Result<(), StateError> {
    match outcome {
        SnapshotOutcome::Completed {
            sha256,
            size,
            disk_format,
        } => {
            sqlx::query(
                "UPDATE images SET state = 'available', sha256 = ?, size_bytes = ?, disk_format = ?
                 WHERE root_snapshot_id = ? AND state = 'pending'",
            )
            .bind(sha256.as_str())
            .bind(*size as i64)
            .bind(disk_format)
            .bind(snapshot_id.as_str())
            .execute(&mut *conn)
            .await?;
        }
        SnapshotOutcome::Failed { message } => {
            sqlx::query(
                "UPDATE images SET state = 'failed', state_reason_code = ?, state_reason_message = ?
                 WHERE root_snapshot_id = ? AND state = 'pending'",
            )
            .bind(COPY_FAILED)
            .bind(format!(
                "The instance's root disk could not be copied: {message}"
            ))
            .bind(snapshot_id.as_str())
            .execute(&mut *conn)
            .await?;
        }
    }
    Ok(())
}

/// Refuses (as not found) unless `account` owns the image `image_id` and it is not
/// deregistered: only the owner modifies or tags an image, though others may see it.
pub(super) async fn require_owned(
    conn: &mut SqliteConnection,
    account: &AccountId,
    image_id: &ImageId,
) -> Result<(), StateError> {
    let owned: Option<(i64,)> = sqlx::query_as(
        "SELECT 1 FROM images WHERE image_id = ? AND owner_id = ? AND state != 'deregistered'",
    )
    .bind(image_id.as_str())
    .bind(account.as_str())
    .fetch_optional(&mut *conn)
    .await?;
    match owned {
        Some(_) => Ok(()),
        None => Err(StateError::ImageNotFound(image_id.to_string())),
    }
}

/// The image (not deregistered) whose root `snapshot_id` is, if any: such a snapshot
/// cannot be deleted.
pub(super) async fn using_snapshot(
    conn: &mut SqliteConnection,
    snapshot_id: &SnapshotId,
) -> Result<Option<String>, StateError> {
    let row: Option<(String,)> = sqlx::query_as(
        "SELECT image_id FROM images WHERE root_snapshot_id = ? AND state != 'deregistered'
         ORDER BY image_id LIMIT 1",
    )
    .bind(snapshot_id.as_str())
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.map(|(id,)| id))
}
