//! Volumes: CreateVolume, DescribeVolumes, DeleteVolume, AttachVolume, DetachVolume.
//!
//! A volume lives in one zone and is attached to at most one instance there; the node that
//! runs the instance keeps its bytes (a qcow2 file) and attaches it to the guest as a
//! virtio disk. `attaching` and `detaching` end when the node says so.

use canopy_common::{VolumeId, ZoneName};
use canopy_ec2_wire::xml::{XmlWriter, timestamp};
use chrono::Utc;

use super::filters::{self, Filterable};
use super::instances::parse_instance_id;
use super::paging::{self, paginate};
use super::render::tag_set;
use super::{ApiError, Ctx, tags};
use crate::state::{
    Attachment, Command, SnapshotState, StateError, Volume, VolumeFault, VolumeState,
};

pub fn volume_not_found(id: &str) -> ApiError {
    ApiError::new(
        400,
        "InvalidVolume.NotFound",
        format!("The volume '{id}' does not exist."),
    )
}

fn parse_volume_id(s: &str) -> Result<VolumeId, ApiError> {
    VolumeId::parse(s).map_err(|_| {
        ApiError::new(
            400,
            "InvalidVolume.Malformed",
            format!("Invalid id: \"{s}\" (expecting \"vol-...\")"),
        )
    })
}

/// EC2's volume types with their size bounds (GiB) and whether they take provisioned IOPS
/// (required, allowed).
const VOLUME_TYPES: &[(&str, u64, u64, bool, bool)] = &[
    ("standard", 1, 1024, false, false),
    ("gp2", 1, 16384, false, false),
    ("gp3", 1, 16384, false, true),
    ("io1", 4, 16384, true, true),
    ("io2", 4, 65536, true, true),
    ("st1", 125, 16384, false, false),
    ("sc1", 125, 16384, false, false),
];

/// What DescribeVolumes shows as `iops` for a type without provisioned IOPS (gp2's baseline:
/// 3 per GiB, at least 100, at most 16,000), or the provisioned value.
fn shown_iops(v: &Volume) -> Option<u32> {
    match v.volume_type.as_str() {
        "gp2" => Some((v.size_gib.saturating_mul(3)).clamp(100, 16_000) as u32),
        _ => v.iops,
    }
}

pub async fn create_volume(ctx: &Ctx) -> Result<String, ApiError> {
    let p = &ctx.params;
    let zone_name = p.required("AvailabilityZone")?;
    // A volume from a snapshot: it must be the account's and completed, and the volume at
    // least as large as the snapshot's volume (its size by default).
    let snapshot = match p.get("SnapshotId").filter(|s| !s.is_empty()) {
        Some(raw) => {
            let id = super::snapshots::parse_snapshot_id(raw)?;
            let snapshot = super::snapshots::require_snapshot(ctx, &id).await?;
            if snapshot.state != SnapshotState::Completed {
                return Err(ApiError::new(
                    400,
                    "IncorrectState",
                    format!(
                        "Snapshot '{id}' is in state '{}' and cannot be used to create a volume.",
                        snapshot.state.name()
                    ),
                ));
            }
            Some(snapshot)
        }
        None => None,
    };
    if p.bool("Encrypted")?.unwrap_or(false) || p.get("KmsKeyId").is_some_and(|k| !k.is_empty()) {
        return Err(ApiError::new(
            400,
            "UnsupportedOperation",
            "Canopy volumes are not encrypted: leave Encrypted and KmsKeyId unset.",
        ));
    }
    if p.bool("MultiAttachEnabled")?.unwrap_or(false) {
        return Err(ApiError::new(
            400,
            "UnsupportedOperation",
            "Canopy volumes attach to one instance at a time (MultiAttachEnabled).",
        ));
    }
    let volume_type = p
        .get("VolumeType")
        .filter(|t| !t.is_empty())
        .unwrap_or("gp2");
    let Some(&(_, min, max, iops_required, iops_allowed)) =
        VOLUME_TYPES.iter().find(|t| t.0 == volume_type)
    else {
        return Err(ApiError::invalid(format!(
            "Value ({volume_type}) for parameter volumeType is invalid. Valid types: standard, gp2, gp3, io1, io2, st1, sc1."
        )));
    };
    let size: u64 = match (p.int("Size")?, &snapshot) {
        (Some(size), Some(snap)) if size < snap.volume_size_gib => {
            return Err(ApiError::invalid(format!(
                "Volume of {size}GiB is smaller than snapshot '{}', expect size >= {}GiB",
                snap.snapshot_id, snap.volume_size_gib
            )));
        }
        (Some(size), _) => size,
        (None, Some(snap)) => snap.volume_size_gib,
        (None, None) => {
            return Err(ApiError::new(
                400,
                "MissingParameter",
                "The request must contain the parameter size or snapshotId",
            ));
        }
    };
    if size < min {
        return Err(ApiError::invalid(format!(
            "Volume of {size}GiB is too small; minimum is {min}GiB."
        )));
    }
    if size > max {
        return Err(ApiError::invalid(format!(
            "Volume of {size}GiB is too large; maximum is {max}GiB."
        )));
    }
    let iops: Option<u32> = p.int("Iops")?;
    match (iops, iops_required, iops_allowed) {
        (None, true, _) => {
            return Err(ApiError::new(
                400,
                "MissingParameter",
                format!("The parameter iops must be specified for {volume_type} volumes."),
            ));
        }
        (Some(_), _, false) => {
            return Err(ApiError::combination(format!(
                "The parameter iops is not supported for {volume_type} volumes."
            )));
        }
        (Some(i), _, true) if !(100..=256_000).contains(&i) => {
            return Err(ApiError::invalid(format!(
                "Value ({i}) for parameter iops is invalid."
            )));
        }
        _ => {}
    }
    let throughput: Option<u32> = p.int("Throughput")?;
    if throughput.is_some() && volume_type != "gp3" {
        return Err(ApiError::combination(format!(
            "The parameter throughput is not supported for {volume_type} volumes."
        )));
    }
    if let Some(t) = throughput
        && !(125..=1000).contains(&t)
    {
        return Err(ApiError::invalid(format!(
            "Value ({t}) for parameter throughput is invalid."
        )));
    }
    let (iops, throughput) = if volume_type == "gp3" {
        (Some(iops.unwrap_or(3000)), Some(throughput.unwrap_or(125)))
    } else {
        (iops, None)
    };
    let zone: ZoneName = zone_name
        .parse()
        .map_err(|_| ApiError::invalid(format!("Invalid availability zone: [{zone_name}]")))?;
    if !ctx.clc.store.zones().await?.iter().any(|z| z.zone == zone) {
        return Err(ApiError::invalid(format!(
            "Invalid availability zone: [{zone_name}]"
        )));
    }
    let tags = tags::for_new_resource(p, "volume")?;
    let client_token = p
        .get("ClientToken")
        .filter(|t| !t.is_empty())
        .map(str::to_owned);
    ctx.dry_run()?;
    let volume = Volume {
        seq: 0,
        volume_id: VolumeId::generate(),
        account_id: ctx.account.clone(),
        zone,
        size_gib: size,
        volume_type: volume_type.to_owned(),
        iops,
        throughput,
        client_token: client_token.clone(),
        state: VolumeState::Available,
        created_at: Utc::now(),
        attachment: None,
        snapshot_id: snapshot.map(|s| s.snapshot_id),
        tags: tags.clone(),
    };
    if let Some(token) = &client_token
        && let Some(made) = ctx.clc.store.volume_by_token(&ctx.account, token).await?
    {
        return Ok(render_created(ctx, &made));
    }
    match ctx
        .clc
        .submit(Command::CreateVolume {
            volume: volume.clone(),
            tags,
        })
        .await
    {
        Ok(_) => Ok(render_created(ctx, &volume)),
        // The same token committed meanwhile (a retry racing the first try): answer with it.
        Err(StateError::VolumeRefused {
            fault: VolumeFault::TokenTaken,
            ..
        }) => {
            let token = client_token.as_deref().unwrap_or_default();
            let made = ctx
                .clc
                .store
                .volume_by_token(&ctx.account, token)
                .await?
                .ok_or_else(ApiError::internal)?;
            Ok(render_created(ctx, &made))
        }
        Err(e) => Err(e.into()),
    }
}

fn render_created(ctx: &Ctx, v: &Volume) -> String {
    let mut w = XmlWriter::response("CreateVolume", &ctx.request_id);
    volume_fields(&mut w, v);
    w.finish()
}

/// The fields of EC2's Volume shape, in its order.
fn volume_fields(w: &mut XmlWriter, v: &Volume) {
    w.elem("volumeId", &v.volume_id)
        .elem("size", v.size_gib)
        .elem(
            "snapshotId",
            v.snapshot_id
                .as_ref()
                .map(|s| s.as_str())
                .unwrap_or_default(),
        )
        .elem("availabilityZone", &v.zone)
        .elem("status", v.state.name())
        .elem("createTime", timestamp(v.created_at))
        .list("attachmentSet", v.attachment.iter(), |w, a| {
            attachment_fields(w, &v.volume_id, a);
        });
    tag_set(w, &v.tags);
    w.elem("volumeType", &v.volume_type)
        .opt_elem("iops", shown_iops(v))
        .bool_elem("encrypted", false)
        .bool_elem("multiAttachEnabled", false)
        .opt_elem("throughput", v.throughput);
}

fn attachment_fields(w: &mut XmlWriter, volume: &VolumeId, a: &Attachment) {
    w.elem("volumeId", volume)
        .elem("instanceId", &a.instance_id)
        .elem("device", &a.device)
        .elem("status", a.status.name())
        .elem("attachTime", timestamp(a.attach_time))
        .bool_elem("deleteOnTermination", a.delete_on_termination);
}

impl Filterable for Volume {
    fn filter_values(&self, name: &str) -> Option<Vec<String>> {
        if let Some(values) = filters::tag_values(&self.tags, name) {
            return Some(values);
        }
        let a = self.attachment.as_ref();
        let one = |v: String| Some(vec![v]);
        let opt = |v: Option<String>| Some(v.into_iter().collect());
        match name {
            "volume-id" => one(self.volume_id.to_string()),
            "status" => one(self.state.name().into()),
            "availability-zone" => one(self.zone.to_string()),
            "size" => one(self.size_gib.to_string()),
            "volume-type" => one(self.volume_type.clone()),
            "create-time" => one(timestamp(self.created_at)),
            "encrypted" | "multi-attach-enabled" | "fast-restored" => one("false".into()),
            "snapshot-id" => one(self
                .snapshot_id
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default()),
            "attachment.instance-id" => opt(a.map(|a| a.instance_id.to_string())),
            "attachment.device" => opt(a.map(|a| a.device.clone())),
            "attachment.status" => opt(a.map(|a| a.status.name().into())),
            "attachment.attach-time" => opt(a.map(|a| timestamp(a.attach_time))),
            "attachment.delete-on-termination" => {
                opt(a.map(|a| a.delete_on_termination.to_string()))
            }
            _ => None,
        }
    }
}

pub async fn describe_volumes(ctx: &Ctx) -> Result<String, ApiError> {
    let p = &ctx.params;
    let filters = filters::parse_filters(p)?;
    let ids = p
        .list("VolumeId")?
        .iter()
        .map(|s| parse_volume_id(s))
        .collect::<Result<Vec<_>, _>>()?;
    if !ids.is_empty() && p.get("MaxResults").is_some() {
        return Err(ApiError::combination(
            "The parameter volumeSet cannot be used with the parameter maxResults",
        ));
    }
    let page = paging::parse_page(p, 5, 500)?;
    let probe = Volume {
        seq: 0,
        volume_id: VolumeId::generate(),
        account_id: ctx.account.clone(),
        zone: "probe".parse().map_err(|_| ApiError::internal())?,
        size_gib: 1,
        volume_type: "gp2".into(),
        iops: None,
        throughput: None,
        client_token: None,
        state: VolumeState::Available,
        created_at: Utc::now(),
        attachment: None,
        snapshot_id: None,
        tags: vec![],
    };
    filters::validate(&filters, &probe)?;
    ctx.dry_run()?;
    let all = ctx.clc.store.volumes(&ctx.account).await?;
    if let Some(missing) = ids
        .iter()
        .find(|id| !all.iter().any(|v| &v.volume_id == *id))
    {
        return Err(volume_not_found(missing.as_str()));
    }
    let matching: Vec<Volume> = all
        .into_iter()
        .filter(|v| ids.is_empty() || ids.contains(&v.volume_id))
        .filter(|v| filters::matches(v, &filters))
        .collect();
    let (shown, next) = paginate(matching, page, |v| v.seq);
    let mut w = XmlWriter::response("DescribeVolumes", &ctx.request_id);
    w.list("volumeSet", &shown, volume_fields);
    w.opt_elem("nextToken", next);
    Ok(w.finish())
}

pub async fn delete_volume(ctx: &Ctx) -> Result<String, ApiError> {
    let volume_id = parse_volume_id(ctx.params.required("VolumeId")?)?;
    if ctx.params.bool("DryRun")?.unwrap_or(false) {
        require_volume(ctx, &volume_id).await?;
        return Err(ApiError::dry_run());
    }
    ctx.clc
        .submit(Command::DeleteVolume {
            account_id: ctx.account.clone(),
            volume_id,
            at: Utc::now(),
        })
        .await?;
    let mut w = XmlWriter::response("DeleteVolume", &ctx.request_id);
    w.bool_elem("return", true);
    Ok(w.finish())
}

pub async fn require_volume(ctx: &Ctx, id: &VolumeId) -> Result<Volume, ApiError> {
    ctx.clc
        .store
        .volumes(&ctx.account)
        .await?
        .into_iter()
        .find(|v| &v.volume_id == id)
        .ok_or_else(|| volume_not_found(id.as_str()))
}

pub async fn attach_volume(ctx: &Ctx) -> Result<String, ApiError> {
    let p = &ctx.params;
    let device = p.required("Device")?.to_owned();
    let instance_id = parse_instance_id(p.required("InstanceId")?)?;
    let volume_id = parse_volume_id(p.required("VolumeId")?)?;
    if canopy_common::volumes::attachment_point(&device).is_none() {
        return Err(ApiError::invalid(format!(
            "Value ({device}) for parameter device is invalid. {device} is not a valid EBS device name."
        )));
    }
    if p.bool("DryRun")?.unwrap_or(false) {
        require_volume(ctx, &volume_id).await?;
        ctx.require_instances(std::slice::from_ref(&instance_id))
            .await?;
        return Err(ApiError::dry_run());
    }
    let at = Utc::now();
    ctx.clc
        .submit(Command::AttachVolume {
            account_id: ctx.account.clone(),
            volume_id: volume_id.clone(),
            instance_id: instance_id.clone(),
            device: device.clone(),
            at,
        })
        .await?;
    let mut w = XmlWriter::response("AttachVolume", &ctx.request_id);
    w.elem("attachTime", timestamp(at))
        .elem("device", &device)
        .elem("instanceId", &instance_id)
        .elem("status", "attaching")
        .elem("volumeId", &volume_id);
    Ok(w.finish())
}

pub async fn detach_volume(ctx: &Ctx) -> Result<String, ApiError> {
    let p = &ctx.params;
    let volume_id = parse_volume_id(p.required("VolumeId")?)?;
    let instance_id = p
        .get("InstanceId")
        .filter(|s| !s.is_empty())
        .map(parse_instance_id)
        .transpose()?;
    let device = p.get("Device").filter(|s| !s.is_empty()).map(str::to_owned);
    let force = p.bool("Force")?.unwrap_or(false);
    let volume = require_volume(ctx, &volume_id).await?;
    ctx.dry_run()?;
    ctx.clc
        .submit(Command::DetachVolume {
            account_id: ctx.account.clone(),
            volume_id: volume_id.clone(),
            instance_id,
            device,
            force,
        })
        .await?;
    // The attachment as it was, now detaching (the command refused anything else).
    let mut w = XmlWriter::response("DetachVolume", &ctx.request_id);
    if let Some(a) = &volume.attachment {
        w.elem("attachTime", timestamp(a.attach_time))
            .elem("device", &a.device)
            .elem("instanceId", &a.instance_id)
            .elem("status", "detaching")
            .elem("volumeId", &volume_id)
            .bool_elem("deleteOnTermination", a.delete_on_termination);
    }
    Ok(w.finish())
}
