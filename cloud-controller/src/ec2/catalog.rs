//! What there is to launch and where: DescribeImages, DescribeAvailabilityZones,
//! DescribeRegions, DescribeInstanceTypes.

use canopy_common::{AccountId, INSTANCE_TYPES, ImageId, InstanceType};
use canopy_ec2_wire::xml::{XmlWriter, timestamp};

use super::filters::{self, Filterable};
use super::paging::{self, paginate};
use super::render::tag_set;
use super::{ApiError, Ctx};
use crate::image_registry::Registration;
use crate::state::{Command, Image, LaunchPermission, ROOT_DEVICE_NAME, RootSnapshot, Tag, Zone};

/// An image as DescribeImages shows it: with the caller's tags on it.
struct Listed<'a> {
    image: &'a Image,
    tags: &'a [Tag],
}

/// EC2's `rootDeviceType`: `ebs` for an image whose root is a snapshot (CreateImage),
/// `instance-store` for a registered one.
fn root_device_type(i: &Image) -> &'static str {
    if i.root_snapshot.is_some() {
        "ebs"
    } else {
        "instance-store"
    }
}

/// EC2's `blockDeviceMapping` of an image: its root snapshot, if it has one.
pub(super) fn block_device_mappings(w: &mut XmlWriter, name: &str, i: &Image) {
    w.list(name, i.root_snapshot.as_ref(), |w, root| {
        w.elem("deviceName", ROOT_DEVICE_NAME).nested("ebs", |w| {
            w.elem("snapshotId", &root.snapshot_id)
                .elem("volumeSize", root.volume_size_gib)
                .bool_elem("deleteOnTermination", true)
                .elem("volumeType", "gp2")
                .bool_elem("encrypted", false);
        });
    });
}

impl Filterable for Listed<'_> {
    fn filter_values(&self, name: &str) -> Option<Vec<String>> {
        if let Some(values) = filters::tag_values(self.tags, name) {
            return Some(values);
        }
        let i = self.image;
        let one = |s: String| Some(vec![s]);
        let root = |f: &dyn Fn(&RootSnapshot) -> String| {
            Some(i.root_snapshot.iter().map(f).collect::<Vec<_>>())
        };
        match name {
            "image-id" => one(i.image_id.to_string()),
            "name" => one(i.name.clone()),
            "description" => one(i.description.clone()),
            "state" => one(i.state.clone()),
            "architecture" => one(i.architecture.clone()),
            "owner-id" => one(i.owner_id.to_string()),
            "is-public" => one(i.is_public.to_string()),
            "image-type" => one(i.kind.name().into()),
            "kernel-id" => Some(i.kernel_id.iter().map(|i| i.to_string()).collect()),
            "ramdisk-id" => Some(i.ramdisk_id.iter().map(|i| i.to_string()).collect()),
            "root-device-type" => one(root_device_type(i).into()),
            "root-device-name" => one(ROOT_DEVICE_NAME.into()),
            "virtualization-type" => one("hvm".into()),
            "hypervisor" => one("xen".into()),
            "manifest-location" => one(i.location.clone()),
            "creation-date" => one(timestamp(i.created_at)),
            "source-instance-id" => Some(
                i.source_instance_id
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
            ),
            "state-reason-code" => Some(i.state_reason.iter().map(|r| r.code.clone()).collect()),
            "state-reason-message" => {
                Some(i.state_reason.iter().map(|r| r.message.clone()).collect())
            }
            "block-device-mapping.device-name" => root(&|_| ROOT_DEVICE_NAME.into()),
            "block-device-mapping.snapshot-id" => root(&|r| r.snapshot_id.to_string()),
            "block-device-mapping.volume-size" => root(&|r| r.volume_size_gib.to_string()),
            "block-device-mapping.volume-type" => root(&|_| "gp2".into()),
            "block-device-mapping.delete-on-termination" => root(&|_| "true".into()),
            "block-device-mapping.encrypted" => root(&|_| "false".into()),
            // Canopy's images are Linux/UNIX without product codes.
            "platform" | "product-code" | "product-code.type" => Some(vec![]),
            _ => None,
        }
    }
}

pub async fn describe_images(ctx: &Ctx) -> Result<String, ApiError> {
    let p = &ctx.params;
    let ids: Vec<ImageId> = p
        .list("ImageId")?
        .iter()
        .map(|s| {
            ImageId::parse(s).map_err(|_| {
                ApiError::new(
                    400,
                    "InvalidAMIID.Malformed",
                    format!("Invalid id: \"{s}\" (expecting \"ami-...\")"),
                )
            })
        })
        .collect::<Result<_, _>>()?;
    if !ids.is_empty() && p.get("MaxResults").is_some() {
        return Err(ApiError::combination(
            "The parameter imagesSet cannot be used with the parameter maxResults",
        ));
    }
    let page = paging::parse_page(p, 5, 1000)?;
    let owners = p.list("Owner")?;
    let executable_by = p.list("ExecutableBy")?;
    let filters = filters::parse_filters(p)?;
    let visible: Vec<Image> = ctx
        .clc
        .store
        .images()
        .await?
        .into_iter()
        .filter(|i| i.visible_to(&ctx.account))
        .filter(|i| i.state != "deregistered")
        .collect();
    if let Some(first) = visible.first() {
        filters::validate(
            &filters,
            &Listed {
                image: first,
                tags: &[],
            },
        )?;
    }
    let missing: Vec<String> = ids
        .iter()
        .filter(|id| !visible.iter().any(|i| &i.image_id == *id))
        .map(|i| i.to_string())
        .collect();
    if !missing.is_empty() {
        return Err(ApiError::new(
            400,
            "InvalidAMIID.NotFound",
            format!("The image id '[{}]' does not exist", missing.join(", ")),
        ));
    }
    ctx.dry_run()?;
    let images: Vec<&Image> = visible
        .iter()
        .filter(|i| ids.is_empty() || ids.contains(&i.image_id))
        .filter(|i| {
            owners.is_empty()
                || owners
                    .iter()
                    .any(|o| o == i.owner_id.as_str() || (o == "self" && i.owner_id == ctx.account))
        })
        .filter(|i| {
            executable_by.is_empty()
                || executable_by.iter().any(|e| match e.as_str() {
                    "all" => i.is_public,
                    "self" => {
                        i.owner_id == ctx.account || i.launch_permissions.contains(&ctx.account)
                    }
                    account => i.launch_permissions.iter().any(|a| a.as_str() == account),
                })
        })
        .collect();
    let names: Vec<&str> = images.iter().map(|i| i.image_id.as_str()).collect();
    let mut tags = ctx.clc.store.tags_of(&ctx.account, &names).await?;
    let listed: Vec<(&Image, Vec<Tag>)> = images
        .into_iter()
        .map(|i| (i, tags.remove(i.image_id.as_str()).unwrap_or_default()))
        .filter(|(image, tags)| filters::matches(&Listed { image, tags }, &filters))
        .collect();
    let keyed = paging_keys(listed);
    let (listed, next) = paginate(keyed, page, |(key, _)| *key);
    let listed: Vec<(&Image, Vec<Tag>)> = listed.into_iter().map(|(_, l)| l).collect();
    let mut w = XmlWriter::response("DescribeImages", &ctx.request_id);
    w.list("imagesSet", &listed, |w, (i, tags)| {
        w.elem("imageId", &i.image_id)
            .elem("imageLocation", &i.location)
            .elem("imageState", &i.state)
            .elem("imageOwnerId", &i.owner_id)
            .elem("creationDate", timestamp(i.created_at))
            .bool_elem("isPublic", i.is_public)
            .elem("architecture", &i.architecture)
            .elem("imageType", i.kind.name())
            .opt_elem("kernelId", i.kernel_id.as_ref())
            .opt_elem("ramdiskId", i.ramdisk_id.as_ref())
            .elem("name", &i.name)
            .elem("description", &i.description)
            .elem("rootDeviceType", root_device_type(i))
            .elem("rootDeviceName", ROOT_DEVICE_NAME);
        block_device_mappings(w, "blockDeviceMapping", i);
        w.elem("virtualizationType", "hvm")
            .elem("hypervisor", "xen")
            .opt_elem("sourceInstanceId", i.source_instance_id.as_ref())
            .elem("platformDetails", "Linux/UNIX")
            .elem("usageOperation", "RunInstances");
        if let Some(reason) = &i.state_reason {
            w.nested("stateReason", |w| {
                w.elem("code", &reason.code)
                    .elem("message", &reason.message);
            });
        }
        tag_set(w, tags);
    });
    w.opt_elem("nextToken", next);
    Ok(w.finish())
}

/// Each image's `NextToken` key, for images in creation order (as the store lists them):
/// its creation time in milliseconds times 1,000 plus its rank among the images created in
/// the same millisecond. Keys do not move as images are added (later) or go, so paging
/// neither repeats nor skips one (unless images made in the same millisecond go between
/// two pages).
fn paging_keys<T>(listed: Vec<(&Image, T)>) -> Vec<(i64, (&Image, T))> {
    let mut keyed = Vec::with_capacity(listed.len());
    let mut previous: Option<(i64, i64)> = None;
    for item in listed {
        let ms = item.0.created_at.timestamp_millis();
        let rank = match previous {
            Some((at, rank)) if at == ms => (rank + 1).min(999),
            _ => 0,
        };
        previous = Some((ms, rank));
        keyed.push((ms.saturating_mul(1000) + rank, item));
    }
    keyed
}

/// An image id parameter: malformed ids get EC2's `InvalidAMIID.Malformed`.
fn image_id_param(name: &str, raw: &str) -> Result<ImageId, ApiError> {
    ImageId::parse(raw).map_err(|_| {
        ApiError::new(
            400,
            "InvalidAMIID.Malformed",
            format!("Invalid id: \"{raw}\" for {name} (expecting \"ami-...\")"),
        )
    })
}

/// The image named by `ImageId`, as the account sees it (its own, public or shared), and
/// whether the account owns it.
async fn visible_image(ctx: &Ctx) -> Result<(Image, bool), ApiError> {
    let id = image_id_param("ImageId", ctx.params.required("ImageId")?)?;
    let image = ctx
        .clc
        .store
        .images()
        .await?
        .into_iter()
        .find(|i| i.image_id == id && i.state != "deregistered" && i.visible_to(&ctx.account))
        .ok_or_else(|| {
            ApiError::new(
                400,
                "InvalidAMIID.NotFound",
                format!("The image id '[{id}]' does not exist"),
            )
        })?;
    let owned = image.owner_id == ctx.account;
    Ok((image, owned))
}

fn not_owner(image: &ImageId) -> ApiError {
    ApiError::new(
        403,
        "UnauthorizedOperation",
        format!(
            "You are not authorized to change or read the launch permissions of {image}: only its owner is."
        ),
    )
}

/// One launch permission of a request: an account (`UserId`, 12 digits) or `Group` `all`.
fn launch_permission(
    user: Option<&str>,
    group: Option<&str>,
) -> Result<LaunchPermission, ApiError> {
    match (
        user.filter(|u| !u.is_empty()),
        group.filter(|g| !g.is_empty()),
    ) {
        (Some(u), None) => AccountId::parse(u)
            .map(LaunchPermission::Account)
            .map_err(|_| {
                ApiError::new(
                    400,
                    "InvalidUserID.Malformed",
                    format!("User ID '{u}' is invalid: account ids are 12 digits"),
                )
            }),
        (None, Some("all")) => Ok(LaunchPermission::All),
        (None, Some(g)) => Err(ApiError::invalid(format!(
            "Value ({g}) for parameter group is invalid. Valid groups: all"
        ))),
        _ => Err(ApiError::invalid(
            "A launch permission names either a UserId or a Group",
        )),
    }
}

/// ModifyImageAttribute: `launchPermission` (`LaunchPermission.Add.N` / `.Remove.N` with
/// `UserId` or `Group`, or `OperationType` with `UserId.N` / `UserGroup.N`) and
/// `description` (`Description.Value`, or `Attribute` with `Value`). Owner only.
pub async fn modify_image_attribute(ctx: &Ctx) -> Result<String, ApiError> {
    let p = &ctx.params;
    let attribute = p.get("Attribute").filter(|a| !a.is_empty());
    let mut add = Vec::new();
    let mut remove = Vec::new();
    for (name, list) in [("Add", &mut add), ("Remove", &mut remove)] {
        for item in p.structs(&format!("LaunchPermission.{name}"))? {
            if item.get("OrganizationArn").is_some() || item.get("OrganizationalUnitArn").is_some()
            {
                return Err(ApiError::new(
                    400,
                    "UnsupportedOperation",
                    "Canopy has no organizations: share images with account ids (UserId) or the group all",
                ));
            }
            list.push(launch_permission(item.get("UserId"), item.get("Group"))?);
        }
    }
    let users = p.list("UserId")?;
    let groups = p.list("UserGroup")?;
    if !users.is_empty() || !groups.is_empty() {
        let list = match p.get("OperationType") {
            Some("add") => &mut add,
            Some("remove") => &mut remove,
            _ => {
                return Err(ApiError::missing("OperationType"));
            }
        };
        for u in &users {
            list.push(launch_permission(Some(u), None)?);
        }
        for g in &groups {
            list.push(launch_permission(None, Some(g))?);
        }
    }
    let description = match (p.get("Description.Value"), attribute, p.get("Value")) {
        (Some(d), _, _) => Some(d.to_owned()),
        (None, Some("description"), Some(v)) => Some(v.to_owned()),
        _ => None,
    };
    if let Some(a) = attribute
        && !matches!(a, "launchPermission" | "description")
    {
        return Err(ApiError::invalid(format!(
            "Value ({a}) for parameter attribute is invalid. Canopy modifies launchPermission and description"
        )));
    }
    if add.is_empty() && remove.is_empty() && description.is_none() {
        return Err(ApiError::missing("LaunchPermission"));
    }
    modify_owned_image(ctx, "ModifyImageAttribute", add, remove, false, description).await
}

/// Commits a change of the caller's own image (another's, even visible: `UnauthorizedOperation`).
async fn modify_owned_image(
    ctx: &Ctx,
    action: &str,
    add: Vec<LaunchPermission>,
    remove: Vec<LaunchPermission>,
    reset: bool,
    description: Option<String>,
) -> Result<String, ApiError> {
    let (image, owned) = visible_image(ctx).await?;
    if !owned {
        return Err(not_owner(&image.image_id));
    }
    ctx.dry_run()?;
    ctx.clc
        .submit(Command::ModifyImage {
            account_id: ctx.account.clone(),
            image_id: image.image_id,
            add,
            remove,
            reset,
            description,
        })
        .await?;
    let mut w = XmlWriter::response(action, &ctx.request_id);
    w.bool_elem("return", true);
    Ok(w.finish())
}

/// ResetImageAttribute `launchPermission`: private again, shared with no one. Owner only.
pub async fn reset_image_attribute(ctx: &Ctx) -> Result<String, ApiError> {
    let attribute = ctx.params.required("Attribute")?;
    if attribute != "launchPermission" {
        return Err(ApiError::invalid(format!(
            "Value ({attribute}) for parameter attribute is invalid. Only launchPermission can be reset"
        )));
    }
    modify_owned_image(
        ctx,
        "ResetImageAttribute",
        vec![],
        vec![LaunchPermission::All],
        true,
        None,
    )
    .await
}

/// DescribeImageAttribute: `launchPermission` (owner only), `description`, `kernel`,
/// `ramdisk`, `bootMode`; the other attributes EC2 names answer empty.
pub async fn describe_image_attribute(ctx: &Ctx) -> Result<String, ApiError> {
    let attribute = ctx.params.required("Attribute")?.to_owned();
    let (image, owned) = visible_image(ctx).await?;
    ctx.dry_run()?;
    let mut w = XmlWriter::response("DescribeImageAttribute", &ctx.request_id);
    w.elem("imageId", &image.image_id);
    let value = |w: &mut XmlWriter, name: &str, v: Option<String>| {
        w.nested(name, |w| {
            w.opt_elem("value", v);
        });
    };
    match attribute.as_str() {
        "launchPermission" => {
            if !owned {
                return Err(not_owner(&image.image_id));
            }
            let mut items: Vec<LaunchPermission> = image
                .launch_permissions
                .iter()
                .cloned()
                .map(LaunchPermission::Account)
                .collect();
            if image.is_public {
                items.insert(0, LaunchPermission::All);
            }
            w.list("launchPermission", &items, |w, p| match p {
                LaunchPermission::All => {
                    w.elem("group", "all");
                }
                LaunchPermission::Account(a) => {
                    w.elem("userId", a);
                }
            });
        }
        "description" => value(&mut w, "description", Some(image.description.clone())),
        "kernel" => value(
            &mut w,
            "kernel",
            image.kernel_id.as_ref().map(ToString::to_string),
        ),
        "ramdisk" => value(
            &mut w,
            "ramdisk",
            image.ramdisk_id.as_ref().map(ToString::to_string),
        ),
        "bootMode" => value(&mut w, "bootMode", Some("legacy-bios".into())),
        "productCodes" => {
            w.list(&attribute, std::iter::empty::<()>(), |_, _| {});
        }
        "blockDeviceMapping" => block_device_mappings(&mut w, "blockDeviceMapping", &image),
        "sriovNetSupport"
        | "tpmSupport"
        | "uefiData"
        | "lastLaunchedTime"
        | "imdsSupport"
        | "deregistrationProtection" => value(&mut w, &attribute, None),
        other => {
            return Err(ApiError::invalid(format!(
                "Value ({other}) for parameter attribute is invalid."
            )));
        }
    }
    Ok(w.finish())
}

/// RegisterImage: the bytes at `ImageLocation` (a file this CLC reads, or an http URL) go
/// into the image store; what they are (machine disk, kernel, ramdisk) is read from them.
pub async fn register_image(ctx: &Ctx) -> Result<String, ApiError> {
    let p = &ctx.params;
    let location = p
        .get("ImageLocation")
        .filter(|l| !l.is_empty())
        .ok_or_else(|| ApiError::missing("ImageLocation"))?
        .to_owned();
    // A file on the cloud controller is the operator's to hand out: any file the CLC can
    // read (its keys among them) would otherwise reach a guest's disk.
    let is_url = location.starts_with("http://") || location.starts_with("https://");
    if !is_url && !ctx.clc.is_admin(&ctx.account) {
        return Err(ApiError::new(
            403,
            "UnauthorizedOperation",
            "Only administrators register images from files on the cloud controller: use an http(s) ImageLocation",
        ));
    }
    if let Some(v) = p.get("VirtualizationType")
        && v != "hvm"
    {
        return Err(ApiError::invalid(format!(
            "VirtualizationType {v:?} is not supported: Canopy runs hvm guests"
        )));
    }
    let boot_id = |param: &str| {
        p.get(param)
            .filter(|v| !v.is_empty())
            .map(|v| image_id_param(param, v))
            .transpose()
    };
    let registration = Registration {
        name: p.required("Name")?.to_owned(),
        description: p.get("Description").unwrap_or_default().to_owned(),
        architecture: p.get("Architecture").unwrap_or("x86_64").to_owned(),
        kernel_id: boot_id("KernelId")?,
        ramdisk_id: boot_id("RamdiskId")?,
        is_public: false,
    };
    registration.check(&ctx.clc, &ctx.account).await?;
    ctx.dry_run()?;
    let imported = ctx.clc.images.import(&location).await?;
    let image_id = registration
        .commit(&ctx.clc, &ctx.account, location, imported)
        .await?;
    let mut w = XmlWriter::response("RegisterImage", &ctx.request_id);
    w.elem("imageId", &image_id);
    Ok(w.finish())
}

/// DeregisterImage: the image can no longer be launched. Instances launched from it keep
/// running, stop and start: its bytes stay until none of them needs them.
pub async fn deregister_image(ctx: &Ctx) -> Result<String, ApiError> {
    let image_id = image_id_param("ImageId", ctx.params.required("ImageId")?)?;
    ctx.dry_run()?;
    ctx.clc
        .submit(Command::DeregisterImage {
            image_id,
            account_id: ctx.account.clone(),
        })
        .await?;
    let mut w = XmlWriter::response("DeregisterImage", &ctx.request_id);
    w.bool_elem("return", true);
    Ok(w.finish())
}

struct ZoneView {
    zone: Zone,
    zone_id: String,
    state: &'static str,
    region: String,
}

impl Filterable for ZoneView {
    fn filter_values(&self, name: &str) -> Option<Vec<String>> {
        let one = |s: String| Some(vec![s]);
        match name {
            "zone-name" => one(self.zone.zone.to_string()),
            "zone-id" => one(self.zone_id.clone()),
            "state" => one(self.state.into()),
            "region-name" => one(self.region.clone()),
            "zone-type" => one("availability-zone".into()),
            "group-name" | "network-border-group" => one(self.region.clone()),
            "opt-in-status" => one("opt-in-not-required".into()),
            _ => None,
        }
    }
}

pub async fn describe_availability_zones(ctx: &Ctx) -> Result<String, ApiError> {
    let p = &ctx.params;
    let names = p.list("ZoneName")?;
    let zone_ids = p.list("ZoneId")?;
    p.bool("AllAvailabilityZones")?;
    let filters = filters::parse_filters(p)?;
    let region = ctx.clc.config.region.to_string();
    let mut zones = ctx.clc.store.zones().await?;
    // Zone ids stay stable as zones are added: numbered in registration order.
    zones.sort_by(|a, b| (a.registered_at, &a.zone).cmp(&(b.registered_at, &b.zone)));
    let views: Vec<ZoneView> = zones
        .into_iter()
        .enumerate()
        .map(|(n, zone)| ZoneView {
            zone_id: format!("{region}-az{}", n + 1),
            state: if ctx
                .clc
                .zones
                .is_available(&zone.zone, ctx.clc.config.zone_timeout)
            {
                "available"
            } else {
                "unavailable"
            },
            region: region.clone(),
            zone,
        })
        .collect();
    for n in &names {
        if !views.iter().any(|v| v.zone.zone.as_str() == n) {
            return Err(ApiError::invalid(format!(
                "The zone '{n}' does not exist in the current region"
            )));
        }
    }
    for id in &zone_ids {
        if !views.iter().any(|v| &v.zone_id == id) {
            return Err(ApiError::invalid(format!(
                "The zone-id '{id}' does not exist in the current region"
            )));
        }
    }
    if let Some(first) = views.first() {
        filters::validate(&filters, first)?;
    }
    ctx.dry_run()?;
    let mut views: Vec<&ZoneView> = views
        .iter()
        .filter(|v| names.is_empty() || names.iter().any(|n| n == v.zone.zone.as_str()))
        .filter(|v| zone_ids.is_empty() || zone_ids.contains(&v.zone_id))
        .filter(|v| filters::matches(*v, &filters))
        .collect();
    views.sort_by(|a, b| a.zone.zone.cmp(&b.zone.zone));
    let mut w = XmlWriter::response("DescribeAvailabilityZones", &ctx.request_id);
    w.list("availabilityZoneInfo", views, |w, v| {
        w.elem("zoneName", &v.zone.zone)
            .elem("zoneState", v.state)
            .elem("regionName", &v.region)
            .elem("zoneId", &v.zone_id)
            .elem("zoneType", "availability-zone")
            .elem("optInStatus", "opt-in-not-required")
            .elem("groupName", &v.region)
            .elem("networkBorderGroup", &v.region)
            .list("messageSet", std::iter::empty::<()>(), |_, _| {});
    });
    Ok(w.finish())
}

struct RegionView {
    name: String,
    endpoint: String,
}

impl Filterable for RegionView {
    fn filter_values(&self, name: &str) -> Option<Vec<String>> {
        match name {
            "region-name" => Some(vec![self.name.clone()]),
            "endpoint" => Some(vec![self.endpoint.clone()]),
            "opt-in-status" => Some(vec!["opt-in-not-required".into()]),
            _ => None,
        }
    }
}

pub async fn describe_regions(ctx: &Ctx) -> Result<String, ApiError> {
    let p = &ctx.params;
    let names = p.list("RegionName")?;
    p.bool("AllRegions")?;
    let filters = filters::parse_filters(p)?;
    let region = RegionView {
        name: ctx.clc.config.region.to_string(),
        endpoint: ctx.host.clone(),
    };
    filters::validate(&filters, &region)?;
    for n in &names {
        if n != &region.name {
            return Err(ApiError::invalid(format!("Invalid region: {n}")));
        }
    }
    ctx.dry_run()?;
    let show = filters::matches(&region, &filters);
    let mut w = XmlWriter::response("DescribeRegions", &ctx.request_id);
    w.list("regionInfo", show.then_some(&region), |w, r| {
        w.elem("regionName", &r.name)
            .elem("regionEndpoint", &r.endpoint)
            .elem("optInStatus", "opt-in-not-required");
    });
    Ok(w.finish())
}

/// DescribeAccountAttributes: what the account may use, as Canopy has it today (no VPCs
/// yet, so no default VPC).
pub async fn describe_account_attributes(ctx: &Ctx) -> Result<String, ApiError> {
    let max_instances = super::instances::MAX_COUNT_CAP.to_string();
    // Elastic IPs: as many as the region's pool holds.
    let pool_size: u64 = ctx
        .clc
        .config
        .public_pool
        .iter()
        .map(|p| p.assignable_count())
        .sum();
    let max_eips = pool_size.to_string();
    let attributes: [(&str, &str); 6] = [
        ("supported-platforms", "VPC"),
        ("default-vpc", "none"),
        ("max-instances", &max_instances),
        ("vpc-max-security-groups-per-interface", "5"),
        ("max-elastic-ips", &max_eips),
        ("vpc-max-elastic-ips", &max_eips),
    ];
    let names = ctx.params.list("AttributeName")?;
    for n in &names {
        if !attributes.iter().any(|(a, _)| a == n) {
            return Err(ApiError::invalid(format!(
                "Value ({n}) for parameter attributeName is invalid. Unknown attribute."
            )));
        }
    }
    ctx.dry_run()?;
    let shown = attributes
        .iter()
        .filter(|(a, _)| names.is_empty() || names.iter().any(|n| n == a));
    let mut w = XmlWriter::response("DescribeAccountAttributes", &ctx.request_id);
    w.list("accountAttributeSet", shown, |w, (name, value)| {
        w.elem("attributeName", name)
            .list("attributeValueSet", [value], |w, v| {
                w.elem("attributeValue", v);
            });
    });
    Ok(w.finish())
}

impl Filterable for &'static InstanceType {
    fn filter_values(&self, name: &str) -> Option<Vec<String>> {
        let one = |s: String| Some(vec![s]);
        match name {
            "instance-type" => one(self.name.into()),
            "vcpu-info.default-vcpus" => one(self.resources.vcpus.to_string()),
            "memory-info.size-in-mib" => one(self.resources.memory_mib.to_string()),
            "current-generation" => one("true".into()),
            "processor-info.supported-architecture" => one("x86_64".into()),
            "supported-virtualization-type" => one("hvm".into()),
            "supported-root-device-type" => one("instance-store".into()),
            "instance-storage-supported" => one("true".into()),
            _ => None,
        }
    }
}

pub async fn describe_instance_types(ctx: &Ctx) -> Result<String, ApiError> {
    let p = &ctx.params;
    let wanted = p.list("InstanceType")?;
    let filters = filters::parse_filters(p)?;
    let page = paging::parse_page(p, 5, 100)?;
    let unknown: Vec<&String> = wanted
        .iter()
        .filter(|n| InstanceType::lookup(n).is_none())
        .collect();
    if !unknown.is_empty() {
        let list = unknown
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        return Err(ApiError::new(
            400,
            "InvalidInstanceType",
            format!("The following supplied instance types do not exist: [{list}]"),
        ));
    }
    filters::validate(&filters, &&INSTANCE_TYPES[0])?;
    ctx.dry_run()?;
    let matching: Vec<(i64, &'static InstanceType)> = INSTANCE_TYPES
        .iter()
        .enumerate()
        .filter(|(_, t)| wanted.is_empty() || wanted.iter().any(|w| w == t.name))
        .filter(|(_, t)| filters::matches(t, &filters))
        .map(|(i, t)| (i as i64, t))
        .collect();
    let (items, next) = paginate(matching, page, |(i, _)| *i);
    let mut w = XmlWriter::response("DescribeInstanceTypes", &ctx.request_id);
    w.list("instanceTypeSet", items, |w, (_, t)| {
        let r = t.resources;
        w.elem("instanceType", t.name)
            .bool_elem("currentGeneration", true)
            .bool_elem("freeTierEligible", false)
            .list("supportedUsageClasses", ["on-demand"], |w, c| {
                w.text(c);
            })
            .list("supportedRootDeviceTypes", ["instance-store"], |w, c| {
                w.text(c);
            })
            .list("supportedVirtualizationTypes", ["hvm"], |w, c| {
                w.text(c);
            })
            .bool_elem("bareMetal", false)
            .elem("hypervisor", "xen")
            .nested("processorInfo", |w| {
                w.list("supportedArchitectures", ["x86_64"], |w, a| {
                    w.text(a);
                });
            })
            .nested("vCpuInfo", |w| {
                w.elem("defaultVCpus", r.vcpus)
                    .elem("defaultCores", r.vcpus)
                    .elem("defaultThreadsPerCore", 1);
            })
            .nested("memoryInfo", |w| {
                w.elem("sizeInMiB", r.memory_mib);
            })
            .bool_elem("instanceStorageSupported", true)
            .nested("instanceStorageInfo", |w| {
                w.elem("totalSizeInGB", r.disk_gib);
            })
            .bool_elem("hibernationSupported", false)
            .bool_elem("burstablePerformanceSupported", t.name.starts_with('t'))
            .bool_elem("dedicatedHostsSupported", false)
            .bool_elem("autoRecoverySupported", false)
            .list("supportedBootModes", ["legacy-bios"], |w, m| {
                w.text(m);
            });
    });
    w.opt_elem("nextToken", next.as_ref());
    Ok(w.finish())
}
