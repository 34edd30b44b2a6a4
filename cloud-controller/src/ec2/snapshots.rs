//! Snapshots: CreateSnapshot, DescribeSnapshots, DeleteSnapshot.
//!
//! A snapshot is a point-in-time copy of a volume's bytes, taken by the node that holds
//! them and uploaded into the CLC's image store; `pending` until the upload completes it.
//! Snapshots are private to their account (no CreateVolumePermission sharing yet).

use canopy_common::{SnapshotId, VolumeId};
use canopy_ec2_wire::xml::{XmlWriter, timestamp};
use chrono::Utc;

use super::filters::{self, Filterable};
use super::paging::{self, paginate};
use super::render::tag_set;
use super::{ApiError, Ctx, tags};
use crate::state::{Command, Snapshot, SnapshotState};

/// EC2's limit on a snapshot's description.
const MAX_DESCRIPTION: usize = 255;

pub fn snapshot_not_found(id: &str) -> ApiError {
    ApiError::new(
        400,
        "InvalidSnapshot.NotFound",
        format!("The snapshot '{id}' does not exist."),
    )
}

pub fn parse_snapshot_id(s: &str) -> Result<SnapshotId, ApiError> {
    SnapshotId::parse(s).map_err(|_| {
        ApiError::new(
            400,
            "InvalidSnapshot.Malformed",
            format!("Invalid id: \"{s}\" (expecting \"snap-...\")"),
        )
    })
}

/// EC2's `progress`: the share of the copy done. Canopy knows only before and after.
fn progress(s: &Snapshot) -> &'static str {
    match s.state {
        SnapshotState::Completed => "100%",
        SnapshotState::Pending | SnapshotState::Error => "0%",
    }
}

pub async fn create_snapshot(ctx: &Ctx) -> Result<String, ApiError> {
    let p = &ctx.params;
    let raw = p.required("VolumeId")?;
    let volume_id = VolumeId::parse(raw).map_err(|_| {
        ApiError::new(
            400,
            "InvalidVolume.Malformed",
            format!("Invalid id: \"{raw}\" (expecting \"vol-...\")"),
        )
    })?;
    let description = p.get("Description").unwrap_or_default().to_owned();
    if description.chars().count() > MAX_DESCRIPTION || description.chars().any(char::is_control) {
        return Err(ApiError::invalid(format!(
            "Value for parameter description is invalid: at most {MAX_DESCRIPTION} characters, no control characters."
        )));
    }
    if p.get("OutpostArn").is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::new(
            400,
            "UnsupportedOperation",
            "Canopy has no Outposts (OutpostArn).",
        ));
    }
    let tags = tags::for_new_resource(p, "snapshot")?;
    let volume = super::volumes::require_volume(ctx, &volume_id).await?;
    ctx.dry_run()?;
    let snapshot_id = SnapshotId::generate();
    let at = Utc::now();
    ctx.clc
        .submit(Command::CreateSnapshot {
            account_id: ctx.account.clone(),
            snapshot_id: snapshot_id.clone(),
            volume_id: volume_id.clone(),
            description: description.clone(),
            at,
            tags,
        })
        .await?;
    // What the command made (pending, or completed at once for a volume never written).
    let made = ctx
        .clc
        .store
        .snapshots(&ctx.account)
        .await?
        .into_iter()
        .find(|s| s.snapshot_id == snapshot_id);
    let mut w = XmlWriter::response("CreateSnapshot", &ctx.request_id);
    match made {
        Some(s) => snapshot_fields(&mut w, ctx, &s),
        // Deleted between the commit and the read: answer with what was asked.
        None => {
            w.elem("snapshotId", &snapshot_id)
                .elem("volumeId", &volume_id)
                .elem("status", "pending")
                .elem("startTime", timestamp(at))
                .elem("progress", "0%")
                .elem("ownerId", &ctx.account)
                .elem("volumeSize", volume.size_gib)
                .elem("description", &description)
                .bool_elem("encrypted", false);
        }
    }
    Ok(w.finish())
}

/// The fields of EC2's Snapshot shape.
fn snapshot_fields(w: &mut XmlWriter, ctx: &Ctx, s: &Snapshot) {
    w.elem("snapshotId", &s.snapshot_id)
        .elem("volumeId", &s.volume_id)
        .elem("status", s.state.name())
        .opt_elem("statusMessage", s.status_message.as_ref())
        .elem("startTime", timestamp(s.started_at))
        .elem("progress", progress(s))
        .elem("ownerId", &ctx.account)
        .elem("volumeSize", s.volume_size_gib)
        .elem("description", &s.description)
        .bool_elem("encrypted", false)
        .elem("storageTier", "standard")
        .opt_elem("completionTime", s.completed_at.map(timestamp))
        .opt_elem(
            "fullSnapshotSizeInBytes",
            match s.state {
                SnapshotState::Completed => Some(s.content.as_ref().map_or(0, |c| c.size)),
                _ => None,
            },
        );
    tag_set(w, &s.tags);
}

struct Listed<'a> {
    snapshot: &'a Snapshot,
    owner: &'a str,
}

impl Filterable for Listed<'_> {
    fn filter_values(&self, name: &str) -> Option<Vec<String>> {
        let s = self.snapshot;
        if let Some(values) = filters::tag_values(&s.tags, name) {
            return Some(values);
        }
        let one = |v: String| Some(vec![v]);
        match name {
            "snapshot-id" => one(s.snapshot_id.to_string()),
            "volume-id" => one(s.volume_id.to_string()),
            "status" => one(s.state.name().into()),
            "owner-id" => one(self.owner.to_owned()),
            "owner-alias" => Some(vec![]),
            "volume-size" => one(s.volume_size_gib.to_string()),
            "description" => one(s.description.clone()),
            "start-time" => one(timestamp(s.started_at)),
            "progress" => one(progress(s).into()),
            "encrypted" => one("false".into()),
            "storage-tier" => one("standard".into()),
            _ => None,
        }
    }
}

pub async fn describe_snapshots(ctx: &Ctx) -> Result<String, ApiError> {
    let p = &ctx.params;
    let filters = filters::parse_filters(p)?;
    let ids = p
        .list("SnapshotId")?
        .iter()
        .map(|s| parse_snapshot_id(s))
        .collect::<Result<Vec<_>, _>>()?;
    if !ids.is_empty() && p.get("MaxResults").is_some() {
        return Err(ApiError::combination(
            "The parameter snapshotSet cannot be used with the parameter maxResults",
        ));
    }
    let page = paging::parse_page(p, 5, 1000)?;
    // `Owner.N` (botocore's OwnerIds; `OwnerId.N` also taken): `self` or account numbers.
    // Snapshots are never shared, so only the caller's own can match; `amazon` and other
    // accounts' numbers match none.
    let mut owners = p.list("Owner")?;
    owners.extend(p.list("OwnerId")?);
    let own = ctx.account.as_str();
    let owners_match = owners.is_empty() || owners.iter().any(|o| o == "self" || o == own);
    // `RestorableBy.N`: who may make volumes from it; only its owner may.
    let restorable = p.list("RestorableBy")?;
    let restorable_match = restorable.is_empty()
        || restorable
            .iter()
            .any(|r| r == "self" || r == own || r == "all");
    let probe = Snapshot {
        seq: 0,
        snapshot_id: SnapshotId::generate(),
        account_id: ctx.account.clone(),
        volume_id: VolumeId::generate(),
        zone: "probe".parse().map_err(|_| ApiError::internal())?,
        volume_size_gib: 1,
        description: String::new(),
        state: SnapshotState::Pending,
        status_message: None,
        started_at: Utc::now(),
        completed_at: None,
        content: None,
        instance_id: None,
        tags: vec![],
    };
    filters::validate(
        &filters,
        &Listed {
            snapshot: &probe,
            owner: own,
        },
    )?;
    ctx.dry_run()?;
    let all = if owners_match && restorable_match {
        ctx.clc.store.snapshots(&ctx.account).await?
    } else {
        vec![]
    };
    if let Some(missing) = ids
        .iter()
        .find(|id| !all.iter().any(|s| &s.snapshot_id == *id))
    {
        return Err(snapshot_not_found(missing.as_str()));
    }
    let matching: Vec<Snapshot> = all
        .into_iter()
        .filter(|s| ids.is_empty() || ids.contains(&s.snapshot_id))
        .filter(|s| {
            filters::matches(
                &Listed {
                    snapshot: s,
                    owner: own,
                },
                &filters,
            )
        })
        .collect();
    let (shown, next) = paginate(matching, page, |s| s.seq);
    let mut w = XmlWriter::response("DescribeSnapshots", &ctx.request_id);
    w.list("snapshotSet", &shown, |w, s| snapshot_fields(w, ctx, s));
    w.opt_elem("nextToken", next);
    Ok(w.finish())
}

pub async fn delete_snapshot(ctx: &Ctx) -> Result<String, ApiError> {
    let snapshot_id = parse_snapshot_id(ctx.params.required("SnapshotId")?)?;
    if ctx.params.bool("DryRun")?.unwrap_or(false) {
        require_snapshot(ctx, &snapshot_id).await?;
        return Err(ApiError::dry_run());
    }
    ctx.clc
        .submit(Command::DeleteSnapshot {
            account_id: ctx.account.clone(),
            snapshot_id,
        })
        .await?;
    let mut w = XmlWriter::response("DeleteSnapshot", &ctx.request_id);
    w.bool_elem("return", true);
    Ok(w.finish())
}

/// The account's snapshot, or `InvalidSnapshot.NotFound`.
pub async fn require_snapshot(ctx: &Ctx, id: &SnapshotId) -> Result<Snapshot, ApiError> {
    ctx.clc
        .store
        .snapshots(&ctx.account)
        .await?
        .into_iter()
        .find(|s| &s.snapshot_id == id)
        .ok_or_else(|| snapshot_not_found(id.as_str()))
}
