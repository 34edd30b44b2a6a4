//! CreateImage: a machine image of a stopped instance's root disk.
//!
//! The image is `pending` until the node the instance lives on has flattened the root disk
//! and uploaded it as a snapshot (the image's root, named by its block device mapping, as
//! an EBS-backed AMI's is), then `available`, or `failed` with a state reason. A running
//! instance is refused (`IncorrectInstanceState`): copying a disk a guest writes is not
//! safe, and Canopy does not stop and restart it the way AWS does without `NoReboot`.

use canopy_common::{ImageId, SnapshotId};
use canopy_ec2_wire::params::Params;
use canopy_ec2_wire::xml::XmlWriter;
use chrono::Utc;

use super::instances::{parse_instance_id, parse_tags};
use super::{ApiError, Ctx};
use crate::image_registry::valid_name;
use crate::state::{Command, ROOT_DEVICE_NAME, Tag};

/// EC2's limit on an image's description.
const MAX_DESCRIPTION: usize = 255;

fn bad_mapping(message: impl Into<String>) -> ApiError {
    ApiError::new(400, "InvalidBlockDeviceMapping", message)
}

/// `BlockDeviceMapping.N`. The image has the instance's root disk and nothing else (the
/// instance's volumes are not part of it), so the only mappings Canopy can honour are
/// `NoDevice` ones that leave out a device other than the root: they are already left out.
/// Anything else (a root of another size or type, a volume to add, an instance-store
/// device) is refused rather than silently ignored.
fn check_block_device_mappings(p: &Params) -> Result<(), ApiError> {
    for m in p.structs("BlockDeviceMapping")? {
        let device = m.get("DeviceName").unwrap_or_default();
        if device.is_empty() {
            return Err(ApiError::missing("BlockDeviceMapping.N.DeviceName"));
        }
        let no_device = m.get("NoDevice").is_some();
        let other = m.iter().any(|(k, _)| k != "DeviceName" && k != "NoDevice");
        if no_device && !other {
            if device == ROOT_DEVICE_NAME || device == "/dev/sda" || device == "/dev/xvda" {
                return Err(bad_mapping(format!(
                    "The root device {device} cannot be left out of the image."
                )));
            }
            continue;
        }
        return Err(bad_mapping(format!(
            "Canopy cannot honour the block device mapping for {device}: an image made by CreateImage has the instance's root disk ({ROOT_DEVICE_NAME}) as it is and nothing else; only NoDevice entries for other devices are accepted."
        )));
    }
    Ok(())
}

/// `TagSpecification.N`: tags for the image and for the snapshot of its root, as EC2 takes
/// them for CreateImage.
fn tag_specifications(p: &Params) -> Result<(Vec<Tag>, Vec<Tag>), ApiError> {
    let (mut image, mut snapshot) = (Vec::new(), Vec::new());
    for spec in p.structs("TagSpecification")? {
        let tags = parse_tags(&spec)?;
        match spec.get("ResourceType").unwrap_or_default() {
            "image" => image.extend(tags),
            "snapshot" => snapshot.extend(tags),
            other => {
                return Err(ApiError::invalid(format!(
                    "'{other}' is not a valid taggable resource type for this operation: CreateImage tags 'image' and 'snapshot'."
                )));
            }
        }
    }
    Ok((image, snapshot))
}

pub async fn create_image(ctx: &Ctx) -> Result<String, ApiError> {
    let p = &ctx.params;
    let instance_id = parse_instance_id(p.required("InstanceId")?)?;
    let name = p.required("Name")?.to_owned();
    if !valid_name(&name) {
        return Err(ApiError::new(
            400,
            "InvalidAMIName.Malformed",
            format!(
                "AMI names must be between 3 and 128 characters long, and may contain letters, numbers, spaces and the characters ( ) [ ] . / - ' @ _ only: {name:?}"
            ),
        ));
    }
    let description = p.get("Description").unwrap_or_default().to_owned();
    if description.chars().count() > MAX_DESCRIPTION || description.chars().any(char::is_control) {
        return Err(ApiError::invalid(format!(
            "Value for parameter description is invalid: at most {MAX_DESCRIPTION} characters, no control characters."
        )));
    }
    // For a stopped instance there is nothing to reboot: either value is honoured.
    p.bool("NoReboot")?;
    if p.get("SnapshotLocation").is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::new(
            400,
            "UnsupportedOperation",
            "Canopy has no Outposts: SnapshotLocation cannot be given.",
        ));
    }
    check_block_device_mappings(p)?;
    let (image_tags, snapshot_tags) = tag_specifications(p)?;

    // What the command checks again when applied; checked here first so a DryRun answers
    // as the call would.
    let instance = ctx
        .clc
        .store
        .owned_instances(&ctx.account, std::slice::from_ref(&instance_id))
        .await?
        .remove(&instance_id)
        .ok_or_else(|| ApiError::instances_not_found(std::slice::from_ref(&instance_id)))?;
    if instance.state != canopy_common::InstanceState::Stopped {
        return Err(ApiError::new(
            400,
            "IncorrectInstanceState",
            format!(
                "The instance '{instance_id}' is {}: Canopy makes images of stopped instances only. Stop it first (StopInstances), then call CreateImage.",
                instance.state.name()
            ),
        ));
    }
    let catalog = ctx.clc.store.catalog().await?;
    if let Some(other) = catalog
        .images
        .iter()
        .find(|i| i.owner_id == ctx.account && i.name == name && i.state != "deregistered")
    {
        return Err(ApiError::new(
            400,
            "InvalidAMIName.Duplicate",
            format!(
                "AMI name {name} is already in use by AMI {}",
                other.image_id
            ),
        ));
    }
    ctx.dry_run()?;
    let image_id = ImageId::generate();
    ctx.clc
        .submit(Command::CreateImage {
            account_id: ctx.account.clone(),
            image_id: image_id.clone(),
            snapshot_id: SnapshotId::generate(),
            instance_id,
            name,
            description,
            at: Utc::now(),
            image_tags,
            snapshot_tags,
        })
        .await?;
    let mut w = XmlWriter::response("CreateImage", &ctx.request_id);
    w.elem("imageId", &image_id);
    Ok(w.finish())
}
