//! Instance actions: RunInstances, DescribeInstances, Stop/Start/Reboot/Terminate,
//! DescribeInstanceStatus, GetConsoleOutput.

use std::collections::{BTreeMap, HashMap, HashSet};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use canopy_common::instance_types::DEFAULT_INSTANCE_TYPE;
use canopy_common::{
    ImageId, ImageKind, InstanceId, InstanceState, InstanceType, NodeId, ReservationId, Resources,
    ZoneName,
};
use canopy_ec2_wire::xml::{XmlWriter, timestamp};
use chrono::Utc;
use sha2::{Digest, Sha256};

use super::filters::{self, Filterable};
use super::paging::{self, paginate};
use super::{ApiError, Ctx, render};
use crate::scheduler::{self, Decision, LaunchRequest};
use crate::state::{
    BootImageError, Command, Instance, InstanceAction, InstanceChange, InstanceFilter,
    MetadataOptions, NewInstance, Outcome, Tag,
};
use crate::zones::zone_snapshots;

/// EC2's limit on user data, before base64.
const MAX_USER_DATA: usize = 16 * 1024;
/// More instances than this in one call is a typo, not a launch.
pub(super) const MAX_COUNT_CAP: u32 = 10_000;

/// An instance type of the catalogue, or the error EC2 gives for a name it does not offer.
fn instance_type(name: &str) -> Result<&'static InstanceType, ApiError> {
    InstanceType::lookup(name)
        .ok_or_else(|| ApiError::invalid(format!("Invalid value '{name}' for InstanceType.")))
}

pub fn parse_instance_id(s: &str) -> Result<InstanceId, ApiError> {
    InstanceId::parse(s).map_err(|_| ApiError::instance_malformed(s))
}

pub fn parse_instance_ids(ctx: &Ctx, name: &str) -> Result<Vec<InstanceId>, ApiError> {
    ctx.params
        .list(name)?
        .iter()
        .map(String::as_str)
        .map(parse_instance_id)
        .collect()
}

/// Tags as `Tag.N.Key` / `Tag.N.Value` under `params`, validated as AWS does.
pub fn parse_tags(params: &canopy_ec2_wire::params::Params) -> Result<Vec<Tag>, ApiError> {
    params
        .structs("Tag")?
        .into_iter()
        .map(|t| {
            let key = t.get("Key").unwrap_or_default().to_owned();
            let value = t.get("Value").unwrap_or_default().to_owned();
            validate_tag(&key, &value)?;
            Ok(Tag { key, value })
        })
        .collect()
}

pub fn validate_tag(key: &str, value: &str) -> Result<(), ApiError> {
    if key.is_empty() || key.chars().count() > 128 {
        return Err(ApiError::invalid(
            "Tag keys must be between 1 and 128 characters long",
        ));
    }
    if value.chars().count() > 256 {
        return Err(ApiError::invalid(
            "Tag values must be at most 256 characters long",
        ));
    }
    if key.to_ascii_lowercase().starts_with("aws:") {
        return Err(ApiError::invalid(
            "Tag keys starting with 'aws:' are reserved for internal use",
        ));
    }
    Ok(())
}

pub async fn run_instances(ctx: &Ctx) -> Result<String, ApiError> {
    let p = &ctx.params;
    let image_raw = p.required("ImageId")?;
    let image_id = ImageId::parse(image_raw).map_err(|_| {
        ApiError::new(
            400,
            "InvalidAMIID.Malformed",
            format!("Invalid id: \"{image_raw}\" (expecting \"ami-...\")"),
        )
    })?;
    let type_name = p
        .get("InstanceType")
        .filter(|t| !t.is_empty())
        .unwrap_or(DEFAULT_INSTANCE_TYPE);
    let itype = instance_type(type_name)?;
    let min_count: i64 = p
        .int("MinCount")?
        .ok_or_else(|| ApiError::missing("MinCount"))?;
    let max_count: i64 = p
        .int("MaxCount")?
        .ok_or_else(|| ApiError::missing("MaxCount"))?;
    if min_count < 1 {
        return Err(ApiError::invalid(format!(
            "Value ({min_count}) for parameter minCount is invalid. Expected a positive integer."
        )));
    }
    if max_count < 1 {
        return Err(ApiError::invalid(format!(
            "Value ({max_count}) for parameter maxCount is invalid. Expected a positive integer."
        )));
    }
    if min_count > max_count {
        return Err(ApiError::invalid(format!(
            "Value ({min_count}) for parameter minCount is invalid. Expected a value less than or equal to maxCount ({max_count})."
        )));
    }
    let min_count = u32::try_from(min_count).unwrap_or(u32::MAX);
    if min_count > MAX_COUNT_CAP {
        return Err(ApiError::new(
            400,
            "InstanceLimitExceeded",
            format!(
                "You have requested more instances ({min_count}) than your current instance limit of {MAX_COUNT_CAP} allows."
            ),
        ));
    }
    let max_count = u32::try_from(max_count)
        .unwrap_or(u32::MAX)
        .min(MAX_COUNT_CAP);
    let user_data = match p.get("UserData").filter(|u| !u.is_empty()) {
        None => None,
        Some(b64) => {
            let compact: String = b64.chars().filter(|c| !c.is_ascii_whitespace()).collect();
            let data = STANDARD
                .decode(compact)
                .map_err(|_| ApiError::invalid("Invalid BASE64 encoding of user data."))?;
            if data.len() > MAX_USER_DATA {
                return Err(ApiError::invalid(format!(
                    "User data is limited to {MAX_USER_DATA} bytes"
                )));
            }
            Some(data)
        }
    };
    let key_name = p
        .get("KeyName")
        .filter(|k| !k.is_empty())
        .map(str::to_owned);
    let zone = match p
        .get("Placement.AvailabilityZone")
        .filter(|z| !z.is_empty())
    {
        None => None,
        Some(z) => Some(
            ZoneName::parse(z)
                .map_err(|_| ApiError::invalid(format!("Invalid availability zone: [{z}]")))?,
        ),
    };
    let client_token = p
        .get("ClientToken")
        .filter(|t| !t.is_empty())
        .map(str::to_owned);
    if client_token
        .as_ref()
        .is_some_and(|t| t.len() > 64 || !t.is_ascii())
    {
        return Err(ApiError::invalid(
            "ClientToken must be at most 64 ASCII characters",
        ));
    }
    let mut tags = Vec::new();
    for spec in p.structs("TagSpecification")? {
        let rtype = spec.get("ResourceType").unwrap_or_default();
        let spec_tags = parse_tags(&spec)?;
        match rtype {
            "instance" => tags.extend(spec_tags),
            // Canopy has no volumes or interfaces yet: nothing to tag.
            "volume" | "network-interface" | "spot-instances-request" | "elastic-gpu" => {}
            other => {
                return Err(ApiError::invalid(format!(
                    "'{other}' is not a valid taggable resource type for this operation."
                )));
            }
        }
    }
    let catalog = ctx.clc.store.catalog().await?;
    let image = catalog
        .visible_image(&image_id, &ctx.account)
        .ok_or_else(|| {
            ApiError::new(
                400,
                "InvalidAMIID.NotFound",
                format!("The image id '[{image_id}]' does not exist"),
            )
        })?;
    if image.state != "available" {
        // EC2's code for a deregistered (or not yet available) image.
        return Err(ApiError::new(
            400,
            "InvalidAMIID.Unavailable",
            format!(
                "The image {image_id} is not available (it is {})",
                image.state
            ),
        ));
    }
    if image.kind != ImageKind::Machine {
        return Err(ApiError::invalid(format!(
            "Image {image_id} is a {} image; instances launch from machine images",
            image.kind
        )));
    }
    // An image made from an instance holds that instance's whole root disk: a smaller root
    // (the type's disk) would cut it off.
    if let Some(root) = &image.root_snapshot
        && itype.resources.disk_gib < root.volume_size_gib
    {
        return Err(ApiError::new(
            400,
            "InvalidBlockDeviceMapping",
            format!(
                "Volume of size {}GB is smaller than snapshot '{}', expect size >= {}GB (instance type {} has a {} GiB root disk; choose a type with at least {} GiB)",
                itype.resources.disk_gib,
                root.snapshot_id,
                root.volume_size_gib,
                itype.name,
                itype.resources.disk_gib,
                root.volume_size_gib
            ),
        ));
    }
    // The kernel and ramdisk: RunInstances' own, else the image's.
    let boot_image = |param: &str, kind: ImageKind, default: &Option<ImageId>| {
        let id = match p.get(param).filter(|v| !v.is_empty()) {
            Some(raw) => Some(ImageId::parse(raw).map_err(|_| {
                ApiError::new(
                    400,
                    "InvalidAMIID.Malformed",
                    format!("Invalid id: \"{raw}\" for {param}"),
                )
            })?),
            None => default.clone(),
        };
        let Some(id) = id else {
            return Ok::<_, ApiError>(None);
        };
        catalog
            .boot_image(&id, &ctx.account, kind)
            .map_err(|e| match e {
                BootImageError::NotFound => ApiError::new(
                    400,
                    "InvalidAMIID.NotFound",
                    format!("The {} image id '[{id}]' does not exist", kind.name()),
                ),
                BootImageError::WrongKind(found) => ApiError::invalid(format!(
                    "{param}: {id} is a {found} image, not a {} image",
                    kind.name()
                )),
            })?;
        Ok(Some(id))
    };
    let kernel_id = boot_image("KernelId", ImageKind::Kernel, &image.kernel_id)?;
    let ramdisk_id = boot_image("RamdiskId", ImageKind::Ramdisk, &image.ramdisk_id)?;
    if ramdisk_id.is_some() && kernel_id.is_none() {
        return Err(ApiError::invalid(
            "A ramdisk needs a kernel: give KernelId too",
        ));
    }
    let metadata_options = metadata_options(p, MetadataOptions::default())?;
    // The key's public half goes with the instance: deleting the key pair later does not
    // take it from the instance (as on EC2).
    let public_key = match &key_name {
        None => None,
        Some(name) => Some(
            ctx.clc
                .store
                .key_pair_by_name(&ctx.account, name)
                .await?
                .ok_or_else(|| super::key_pairs::key_pair_not_found(name))?
                .public_key_line(),
        ),
    };
    // SecurityGroupId.N and SecurityGroup.N (names); the account's default group if neither.
    let group_ids = p.list("SecurityGroupId")?;
    let group_names = p.list("SecurityGroup")?;
    let security_groups: Vec<(canopy_common::SecurityGroupId, String)> = {
        let names = group_names;
        let ids = group_ids
            .iter()
            .map(|g| super::security_groups::parse_group_id(g))
            .collect::<Result<Vec<_>, _>>()?;
        // One statement, and none for a launch in the default group.
        let found = if ids.is_empty() && names.is_empty() {
            vec![]
        } else {
            ctx.clc
                .store
                .security_group_names(&ctx.account, &ids, &names)
                .await?
        };
        let mut picked = Vec::new();
        for id in &ids {
            let name = found
                .iter()
                .find(|(g, _)| g == id)
                .ok_or_else(|| super::security_groups::group_not_found(id.as_str()))?;
            picked.push(name.clone());
        }
        for name in &names {
            let group = found
                .iter()
                .find(|(_, n)| n == name)
                .ok_or_else(|| super::security_groups::group_not_found(name))?;
            picked.push(group.clone());
        }
        let mut seen = std::collections::HashSet::new();
        picked.retain(|(g, _)| seen.insert(g.clone()));
        if picked.is_empty() {
            // The default group: its id follows from the account and it cannot be deleted,
            // so the common launch reads nothing for it.
            picked.push((
                canopy_common::SecurityGroupId::default_for(&ctx.account),
                crate::state::DEFAULT_SECURITY_GROUP.to_owned(),
            ));
        }
        picked
    };
    ctx.dry_run()?;

    // What makes two launches "the same" for ClientToken: every parameter but the token.
    let request_hash = {
        let mut sorted: BTreeMap<&str, &str> = p.iter().collect();
        sorted.remove("ClientToken");
        sorted.remove("DryRun");
        let mut h = Sha256::new();
        for (k, v) in sorted {
            h.update(k.as_bytes());
            h.update([0]);
            h.update(v.as_bytes());
            h.update([0]);
        }
        hex::encode(h.finalize())
    };

    // The reservation, and its instances when this call launched them (a replay reads them).
    // A retry with the same ClientToken is answered by the apply (`replayed`), so it costs no
    // read up front; only when the launch cannot be scheduled now is the token looked up,
    // so that a retry of a launch that succeeded earlier gets it back whatever room is left.
    let (reservation_id, launched) = 'launch: {
        crate::zones::await_zones(&ctx.clc).await?;
        ctx.clc.launches.refresh(&ctx.clc.store).await?;
        let req = LaunchRequest {
            zone,
            per_instance: itype.resources,
            min_count,
            max_count,
        };
        // Choosing the zone and counting the launch as taken are one step; the commit
        // happens outside it, so concurrent launches commit together.
        let (decision, ticket) = ctx.clc.launches.schedule(
            ctx.clc.zones.version(),
            &catalog.zones,
            |allocations| zone_snapshots(&ctx.clc, &catalog.zones, allocations),
            |snapshots| {
                let decision = scheduler::choose_zone(snapshots, &req);
                let launch = match &decision {
                    Decision::Launch { zone, count } => {
                        Some((zone.clone(), itype.resources, u64::from(*count)))
                    }
                    _ => None,
                };
                (decision, launch)
            },
        );
        if !matches!(decision, Decision::Launch { .. })
            && let Some(prior) =
                replayed_reservation(ctx, client_token.as_deref(), &request_hash).await?
        {
            break 'launch (prior, None);
        }
        let (zone, count) = match decision {
            Decision::Launch { zone, count } => (zone, count),
            Decision::UnknownZone(z) => {
                return Err(ApiError::invalid(format!(
                    "Invalid availability zone: [{z}]"
                )));
            }
            Decision::NoCapacity { reasons } => {
                tracing::info!(?reasons, "launch refused: no capacity");
                return Err(ApiError::new(
                    500,
                    "InsufficientInstanceCapacity",
                    format!(
                        "We currently do not have sufficient {type_name} capacity to launch {min_count} instance(s): {}",
                        reasons.join(" | ")
                    ),
                ));
            }
        };
        let instances = (0..count)
            .map(|i| NewInstance {
                instance_id: InstanceId::generate(),
                launch_index: i,
                image_id: image_id.clone(),
                instance_type: itype.name.to_owned(),
                resources: itype.resources,
                zone: zone.clone(),
                key_name: key_name.clone(),
                public_key: public_key.clone(),
                security_groups: security_groups.clone(),
                metadata_options,
                user_data: user_data.clone(),
                kernel_id: kernel_id.clone(),
                ramdisk_id: ramdisk_id.clone(),
            })
            .collect::<Vec<_>>();
        let at = Utc::now();
        let launch = Command::LaunchInstances {
            reservation_id: ReservationId::generate(),
            account_id: ctx.account.clone(),
            client_token: client_token.clone(),
            request_hash,
            instances: instances.clone(),
            tags: tags.clone(),
            at,
        };
        match ctx.clc.submit(launch).await? {
            // A replay (the same token, committed meanwhile) took no new room.
            Outcome::Launched {
                reservation_id,
                replayed: true,
            } => (reservation_id, None),
            Outcome::Launched {
                reservation_id,
                replayed: false,
            } => {
                if let Some(ticket) = ticket {
                    ticket.committed();
                }
                let launched = instances
                    .iter()
                    .map(|i| {
                        i.launched(
                            &reservation_id,
                            &ctx.account,
                            client_token.as_deref(),
                            &tags,
                            at,
                        )
                    })
                    .collect();
                (reservation_id, Some(launched))
            }
            other => {
                tracing::error!(?other, "launch produced an unexpected outcome");
                return Err(ApiError::internal());
            }
        }
    };
    let instances = match launched {
        Some(instances) => instances,
        None => {
            ctx.clc
                .store
                .instances(&InstanceFilter {
                    account_id: Some(ctx.account.clone()),
                    reservation_id: Some(reservation_id.clone()),
                    ..Default::default()
                })
                .await?
        }
    };
    let mut w = XmlWriter::response("RunInstances", &ctx.request_id);
    w.elem("reservationId", &reservation_id)
        .elem("ownerId", &ctx.account)
        .list("groupSet", std::iter::empty::<()>(), |_, _| {})
        .list("instancesSet", &instances, render::instance);
    Ok(w.finish())
}

/// The reservation an earlier launch with this client token made, if any.
async fn replayed_reservation(
    ctx: &Ctx,
    token: Option<&str>,
    hash: &str,
) -> Result<Option<ReservationId>, ApiError> {
    let Some(token) = token else { return Ok(None) };
    match ctx
        .clc
        .store
        .reservation_by_token(&ctx.account, token)
        .await?
    {
        None => Ok(None),
        Some((_, prior_hash)) if prior_hash != hash => {
            Err(crate::state::StateError::IdempotentParameterMismatch.into())
        }
        Some((id, _)) => Ok(Some(id)),
    }
}

impl Filterable for Instance {
    fn filter_values(&self, name: &str) -> Option<Vec<String>> {
        let one = |s: String| Some(vec![s]);
        if let Some(values) = filters::tag_values(&self.tags, name) {
            return Some(values);
        }
        match name {
            "instance-id" => one(self.instance_id.to_string()),
            "instance-state-name" => one(self.state.name().into()),
            "instance-state-code" => one(self.state.code().to_string()),
            "availability-zone" => one(self.zone.to_string()),
            "instance-type" => one(self.instance_type.clone()),
            "image-id" => one(self.image_id.to_string()),
            "reservation-id" => one(self.reservation_id.to_string()),
            "owner-id" => one(self.account_id.to_string()),
            "key-name" => Some(self.key_name.iter().cloned().collect()),
            "launch-index" | "ami-launch-index" => one(self.launch_index.to_string()),
            "client-token" => Some(self.client_token.iter().cloned().collect()),
            "architecture" => one("x86_64".into()),
            "root-device-type" => one("instance-store".into()),
            "virtualization-type" => one("hvm".into()),
            "private-dns-name" => one(render::private_dns(self)),
            "ip-address" | "network-interface.addresses.association.public-ip" => {
                Some(self.public_ip.iter().map(|ip| ip.to_string()).collect())
            }
            "private-ip-address" | "network-interface.addresses.private-ip-address" => {
                Some(self.private_ip.iter().map(|ip| ip.to_string()).collect())
            }
            "state-reason-code" => Some(self.state_reason.iter().map(|r| r.code.clone()).collect()),
            "launch-time" => one(timestamp(self.launch_time)),
            "instance.group-id" | "group-id" => Some(
                self.security_groups
                    .iter()
                    .map(|(g, _)| g.to_string())
                    .collect(),
            ),
            "instance.group-name" | "group-name" => Some(
                self.security_groups
                    .iter()
                    .map(|(_, n)| n.clone())
                    .collect(),
            ),
            _ => None,
        }
    }
}

/// The account's instances named by `InstanceId.N` (all of them when none is named),
/// refusing malformed and unknown ids as AWS does.
async fn selected_instances(ctx: &Ctx) -> Result<(Vec<Instance>, bool), ApiError> {
    let ids = parse_instance_ids(ctx, "InstanceId")?;
    let all = ctx
        .clc
        .store
        .instances(&InstanceFilter {
            account_id: Some(ctx.account.clone()),
            ..Default::default()
        })
        .await?;
    if ids.is_empty() {
        return Ok((all, false));
    }
    let missing: Vec<InstanceId> = ids
        .iter()
        .filter(|id| !all.iter().any(|i| &i.instance_id == *id))
        .cloned()
        .collect();
    if !missing.is_empty() {
        return Err(ApiError::instances_not_found(&missing));
    }
    Ok((
        all.into_iter()
            .filter(|i| ids.contains(&i.instance_id))
            .collect(),
        true,
    ))
}

pub async fn describe_instances(ctx: &Ctx) -> Result<String, ApiError> {
    let filters = filters::parse_filters(&ctx.params)?;
    let page = paging::parse_page(&ctx.params, 5, 1000)?;
    if page.max.is_some() && !ctx.params.list("InstanceId")?.is_empty() {
        return Err(ApiError::combination(
            "The parameter instancesSet cannot be used with the parameter maxResults",
        ));
    }
    let (selected, _) = selected_instances(ctx).await?;
    if let Some(first) = selected.first() {
        filters::validate(&filters, first)?;
    } else {
        filters::validate(&filters, &probe_instance())?;
    }
    ctx.dry_run()?;
    let matching: Vec<Instance> = selected
        .into_iter()
        .filter(|i| filters::matches(i, &filters))
        .collect();
    let (page_items, next) = paginate(matching, page, |i| i.seq);
    // Consecutive instances of one reservation form one reservation item.
    let mut reservations: Vec<Vec<&Instance>> = Vec::new();
    for inst in &page_items {
        match reservations.last_mut() {
            Some(group) if group[0].reservation_id == inst.reservation_id => group.push(inst),
            _ => reservations.push(vec![inst]),
        }
    }
    let mut w = XmlWriter::response("DescribeInstances", &ctx.request_id);
    w.list("reservationSet", &reservations, |w, group| {
        w.elem("reservationId", &group[0].reservation_id)
            .elem("ownerId", &group[0].account_id)
            .list("groupSet", std::iter::empty::<()>(), |_, _| {})
            .list("instancesSet", group.iter(), |w, i| render::instance(w, i));
    });
    w.opt_elem("nextToken", next.as_ref());
    Ok(w.finish())
}

/// An instance used only to check filter names when there is nothing to filter.
fn probe_instance() -> Instance {
    Instance {
        seq: 0,
        instance_id: InstanceId::generate(),
        reservation_id: ReservationId::generate(),
        account_id: canopy_common::AccountId::parse("000000000000").expect("valid account id"),
        launch_index: 0,
        image_id: ImageId::generate(),
        instance_type: String::new(),
        resources: Default::default(),
        zone: ZoneName::parse("probe").expect("valid zone name"),
        node_id: None,
        key_name: None,
        public_key: None,
        user_data: None,
        client_token: None,
        state: InstanceState::Pending,
        desired: canopy_common::PowerState::Running,
        reboot_seq: 0,
        start_seq: 0,
        state_reason: None,
        transition_reason: String::new(),
        launch_time: Utc::now(),
        state_changed_at: Utc::now(),
        terminated_at: None,
        tags: vec![],
        kernel_id: None,
        ramdisk_id: None,
        disable_api_termination: false,
        disable_api_stop: false,
        security_groups: vec![],
        private_ip: None,
        metadata_options: MetadataOptions::default(),
        public_ip: None,
        volumes: vec![],
    }
}

pub async fn change_instances(ctx: &Ctx, action: InstanceAction) -> Result<String, ApiError> {
    let ids = parse_instance_ids(ctx, "InstanceId")?;
    if ids.is_empty() {
        return Err(ApiError::missing("InstanceId"));
    }
    ctx.params.bool("Force")?;
    if ctx.params.bool("DryRun")?.unwrap_or(false) {
        ctx.require_instances(&ids).await?;
        return Err(ApiError::dry_run());
    }
    let out = ctx
        .clc
        .submit(Command::RequestInstances {
            account_id: ctx.account.clone(),
            instance_ids: ids,
            action,
            at: Utc::now(),
        })
        .await?;
    let (name, changes) = match (action, out) {
        (InstanceAction::Reboot, _) => {
            let mut w = XmlWriter::response("RebootInstances", &ctx.request_id);
            w.bool_elem("return", true);
            return Ok(w.finish());
        }
        (InstanceAction::Stop, Outcome::InstancesChanged(c)) => ("StopInstances", c),
        (InstanceAction::Start, Outcome::InstancesChanged(c)) => ("StartInstances", c),
        (InstanceAction::Terminate, Outcome::InstancesChanged(c)) => ("TerminateInstances", c),
        (_, other) => {
            tracing::error!(?other, "instance request produced an unexpected outcome");
            return Err(ApiError::internal());
        }
    };
    let mut w = XmlWriter::response(name, &ctx.request_id);
    w.list("instancesSet", &changes, |w, c| {
        w.elem("instanceId", &c.instance_id);
        render::state(w, "currentState", c.current);
        render::state(w, "previousState", c.previous);
    });
    Ok(w.finish())
}

/// EC2's status checks. Canopy reports them from the node's view: a running instance
/// passes both; other states are not applicable.
/// What the control plane can tell of a running instance's host: EC2's status checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HostHealth {
    /// Its node heartbeats to its zone's CC, which heartbeats to the CLC.
    Reachable,
    /// Its CC reports the node silent for longer than the CC's `node_timeout`: the instance
    /// is shown `running` (it may well run), with the system check failed.
    NodeSilent,
    /// Its zone's CC is silent: nothing is known.
    ZoneSilent,
    /// Not running: no checks apply.
    NotApplicable,
}

/// Each zone's liveness as the CLC knows it: `None` while its CC is silent, else its
/// healthy nodes. Read once a request, whatever the number of instances.
struct ZoneHealth {
    zones: HashMap<ZoneName, Option<HashSet<NodeId>>>,
}

impl ZoneHealth {
    fn read(ctx: &Ctx, instances: &[Instance]) -> Self {
        let mut zones = HashMap::new();
        for i in instances {
            zones.entry(i.zone.clone()).or_insert_with(|| {
                let live = ctx.clc.zones.get(&i.zone)?;
                if !ctx
                    .clc
                    .zones
                    .is_available(&i.zone, ctx.clc.config.zone_timeout)
                {
                    return None;
                }
                Some(
                    live.nodes
                        .into_iter()
                        .filter(|n| n.healthy)
                        .map(|n| n.node_id)
                        .collect(),
                )
            });
        }
        ZoneHealth { zones }
    }
}

impl HostHealth {
    fn of(i: &Instance, health: &ZoneHealth) -> Self {
        if i.state != InstanceState::Running {
            return HostHealth::NotApplicable;
        }
        match health.zones.get(&i.zone) {
            None | Some(None) => HostHealth::ZoneSilent,
            Some(Some(healthy)) if i.node_id.as_ref().is_some_and(|n| healthy.contains(n)) => {
                HostHealth::Reachable
            }
            Some(Some(_)) => HostHealth::NodeSilent,
        }
    }

    /// (status, reachability) of the system check, then of the instance check.
    fn checks(self) -> [(&'static str, &'static str); 2] {
        match self {
            HostHealth::Reachable => [("ok", "passed"), ("ok", "passed")],
            HostHealth::NodeSilent => [
                ("impaired", "failed"),
                ("insufficient-data", "insufficient-data"),
            ],
            HostHealth::ZoneSilent => [
                ("insufficient-data", "insufficient-data"),
                ("insufficient-data", "insufficient-data"),
            ],
            HostHealth::NotApplicable => [
                ("not-applicable", "not-applicable"),
                ("not-applicable", "not-applicable"),
            ],
        }
    }
}

struct StatusView<'a>(&'a Instance, HostHealth);

impl Filterable for StatusView<'_> {
    fn filter_values(&self, name: &str) -> Option<Vec<String>> {
        let one = |s: &str| Some(vec![s.to_owned()]);
        let [system, instance] = self.1.checks();
        match name {
            "availability-zone" => one(self.0.zone.as_str()),
            "instance-state-name" => one(self.0.state.name()),
            "instance-state-code" => one(&self.0.state.code().to_string()),
            "system-status.status" => one(system.0),
            "system-status.reachability" => one(system.1),
            "instance-status.status" => one(instance.0),
            "instance-status.reachability" => one(instance.1),
            _ => None,
        }
    }
}

pub async fn describe_instance_status(ctx: &Ctx) -> Result<String, ApiError> {
    let filters = filters::parse_filters(&ctx.params)?;
    let page = paging::parse_page(&ctx.params, 5, 1000)?;
    let include_all = ctx.params.bool("IncludeAllInstances")?.unwrap_or(false);
    if page.max.is_some() && !ctx.params.list("InstanceId")?.is_empty() {
        return Err(ApiError::combination(
            "The parameter instancesSet cannot be used with the parameter maxResults",
        ));
    }
    let (selected, _) = selected_instances(ctx).await?;
    let probe = probe_instance();
    filters::validate(&filters, &StatusView(&probe, HostHealth::NotApplicable))?;
    ctx.dry_run()?;
    let selected: Vec<Instance> = selected
        .into_iter()
        .filter(|i| include_all || i.state == InstanceState::Running)
        .collect();
    let zones = ZoneHealth::read(ctx, &selected);
    let matching: Vec<(Instance, HostHealth)> = selected
        .into_iter()
        .map(|i| {
            let health = HostHealth::of(&i, &zones);
            (i, health)
        })
        .filter(|(i, h)| filters::matches(&StatusView(i, *h), &filters))
        .collect();
    let (items, next) = paginate(matching, page, |(i, _)| i.seq);
    let mut w = XmlWriter::response("DescribeInstanceStatus", &ctx.request_id);
    w.list("instanceStatusSet", &items, |w, (i, health)| {
        w.elem("instanceId", &i.instance_id)
            .elem("availabilityZone", &i.zone);
        render::state(w, "instanceState", i.state);
        for (name, (status, reachability)) in ["systemStatus", "instanceStatus"]
            .into_iter()
            .zip(health.checks())
        {
            w.nested(name, |w| {
                w.elem("status", status)
                    .list("details", [reachability], |w, d| {
                        w.elem("name", "reachability").elem("status", d);
                    });
            });
        }
        w.list("eventsSet", std::iter::empty::<()>(), |_, _| {});
    });
    w.opt_elem("nextToken", next.as_ref());
    Ok(w.finish())
}

/// The caller's instance `id`, or EC2's not-found error.
async fn one_instance(ctx: &Ctx, id: &InstanceId) -> Result<Instance, ApiError> {
    ctx.clc
        .store
        .instances_by_id(Some(&ctx.account), std::slice::from_ref(id))
        .await?
        .remove(id)
        .ok_or_else(|| ApiError::instances_not_found(std::slice::from_ref(id)))
}

pub async fn get_console_output(ctx: &Ctx) -> Result<String, ApiError> {
    let id = parse_instance_id(ctx.params.required("InstanceId")?)?;
    ctx.params.bool("Latest")?;
    let inst = &one_instance(ctx, &id).await?;
    ctx.dry_run()?;
    let output = crate::console::fetch(&ctx.clc, inst).await;
    let mut w = XmlWriter::response("GetConsoleOutput", &ctx.request_id);
    w.elem("instanceId", &id)
        .elem("timestamp", timestamp(Utc::now()));
    if let Some(bytes) = output {
        w.elem("output", STANDARD.encode(bytes));
    }
    Ok(w.finish())
}

/// The attributes DescribeInstanceAttribute names.
const ATTRIBUTES: [&str; 14] = [
    "instanceType",
    "kernel",
    "ramdisk",
    "userData",
    "disableApiTermination",
    "disableApiStop",
    "instanceInitiatedShutdownBehavior",
    "rootDeviceName",
    "blockDeviceMapping",
    "productCodes",
    "sourceDestCheck",
    "groupSet",
    "ebsOptimized",
    "enaSupport",
];

fn unknown_attribute(attribute: &str) -> ApiError {
    ApiError::invalid(format!(
        "Value ({attribute}) for parameter attribute is invalid. Unknown attribute."
    ))
}

/// DescribeInstanceAttribute: one attribute of an instance. Canopy has no security groups
/// or volumes yet, so those attributes show EC2's defaults.
pub async fn describe_instance_attribute(ctx: &Ctx) -> Result<String, ApiError> {
    let id = parse_instance_id(ctx.params.required("InstanceId")?)?;
    let attribute = ctx.params.required("Attribute")?.to_owned();
    if !ATTRIBUTES.contains(&attribute.as_str()) {
        return Err(unknown_attribute(&attribute));
    }
    let inst = &one_instance(ctx, &id).await?;
    ctx.dry_run()?;
    let mut w = XmlWriter::response("DescribeInstanceAttribute", &ctx.request_id);
    w.elem("instanceId", &id);
    let value = |w: &mut XmlWriter, name: &str, v: Option<String>| {
        w.nested(name, |w| {
            if let Some(v) = &v {
                w.elem("value", v);
            }
        });
    };
    match attribute.as_str() {
        "instanceType" => value(&mut w, "instanceType", Some(inst.instance_type.clone())),
        "kernel" => value(
            &mut w,
            "kernel",
            inst.kernel_id.as_ref().map(|k| k.to_string()),
        ),
        "ramdisk" => value(
            &mut w,
            "ramdisk",
            inst.ramdisk_id.as_ref().map(|r| r.to_string()),
        ),
        "userData" => value(
            &mut w,
            "userData",
            inst.user_data.as_ref().map(|u| STANDARD.encode(u)),
        ),
        "disableApiTermination" => value(
            &mut w,
            &attribute,
            Some(inst.disable_api_termination.to_string()),
        ),
        "disableApiStop" => value(&mut w, &attribute, Some(inst.disable_api_stop.to_string())),
        "ebsOptimized" | "enaSupport" => value(&mut w, &attribute, Some("false".into())),
        "sourceDestCheck" => value(&mut w, "sourceDestCheck", Some("true".into())),
        "instanceInitiatedShutdownBehavior" => value(&mut w, &attribute, Some("stop".into())),
        "rootDeviceName" => value(&mut w, "rootDeviceName", Some("/dev/sda1".into())),
        "groupSet" => {
            w.list("groupSet", &inst.security_groups, |w, (id, _)| {
                w.elem("groupId", id);
            });
        }
        list => {
            w.list(list, std::iter::empty::<()>(), |_, _| {});
        }
    }
    Ok(w.finish())
}

/// ModifyInstanceAttribute: `disableApiTermination`, `disableApiStop`, and `userData`
/// (while stopped), given either as `Attribute` + `Value` or as `<Name>.Value`.
pub async fn modify_instance_attribute(ctx: &Ctx) -> Result<String, ApiError> {
    let p = &ctx.params;
    let id = parse_instance_id(p.required("InstanceId")?)?;
    // Each attribute in its own structure (`DisableApiTermination.Value`), or the older
    // `Attribute=disableApiTermination&Value=true`.
    let mut given: Vec<(&str, String)> = Vec::new();
    for (attribute, wire) in [
        ("disableApiTermination", "DisableApiTermination"),
        ("disableApiStop", "DisableApiStop"),
        ("userData", "UserData"),
        ("instanceType", "InstanceType"),
        ("kernel", "Kernel"),
        ("ramdisk", "Ramdisk"),
        (
            "instanceInitiatedShutdownBehavior",
            "InstanceInitiatedShutdownBehavior",
        ),
        ("sourceDestCheck", "SourceDestCheck"),
        ("ebsOptimized", "EbsOptimized"),
        ("enaSupport", "EnaSupport"),
        ("sriovNetSupport", "SriovNetSupport"),
    ] {
        if let Some(v) = p.get(&format!("{wire}.Value")) {
            given.push((attribute, v.to_owned()));
        }
    }
    if let Some(attribute) = p.get("Attribute").filter(|a| !a.is_empty()) {
        let value = p.get("Value").unwrap_or_default().to_owned();
        let known = ATTRIBUTES
            .iter()
            .chain(&["sriovNetSupport"])
            .find(|a| **a == attribute)
            .ok_or_else(|| unknown_attribute(attribute))?;
        given.push((known, value));
    }
    if !p.structs("BlockDeviceMapping")?.is_empty() {
        return Err(ApiError::new(
            400,
            "UnsupportedOperation",
            "Canopy cannot change an instance's block device mappings yet (DetachVolume and AttachVolume do).",
        ));
    }
    let group_ids = p.list("GroupId")?;
    if !group_ids.is_empty() {
        if !given.is_empty() {
            return Err(ApiError::combination(
                "Only one attribute can be modified at a time",
            ));
        }
        if group_ids.len() > 5 {
            return Err(ApiError::new(
                400,
                "SecurityGroupsPerInstanceLimitExceeded",
                "An instance may have at most 5 security groups.",
            ));
        }
        let groups = super::security_groups::resolve_groups(ctx, &group_ids, &[]).await?;
        let change =
            InstanceChange::SecurityGroups(groups.into_iter().map(|g| g.group_id).collect());
        return modify(ctx, id, change).await;
    }
    let [(attribute, value)] = given.as_slice() else {
        return Err(if given.is_empty() {
            ApiError::missing("Attribute")
        } else {
            ApiError::combination("Only one attribute can be modified at a time")
        });
    };
    let flag = |v: &str| match v {
        "true" => Ok(true),
        "false" => Ok(false),
        other => Err(ApiError::invalid(format!(
            "Value ({other}) for parameter {attribute} is invalid. Expected 'true' or 'false'."
        ))),
    };
    let change = match *attribute {
        "disableApiTermination" => InstanceChange::DisableApiTermination(flag(value)?),
        "disableApiStop" => InstanceChange::DisableApiStop(flag(value)?),
        "userData" => {
            let data = if value.is_empty() {
                None
            } else {
                let data = STANDARD
                    .decode(
                        value
                            .chars()
                            .filter(|c| !c.is_ascii_whitespace())
                            .collect::<String>(),
                    )
                    .map_err(|_| ApiError::invalid("Invalid BASE64 encoding of user data."))?;
                if data.len() > MAX_USER_DATA {
                    return Err(ApiError::invalid(format!(
                        "User data is limited to {MAX_USER_DATA} bytes"
                    )));
                }
                Some(data)
            };
            InstanceChange::UserData(data)
        }
        "instanceType" => return modify_instance_type(ctx, id, instance_type(value)?).await,
        other => {
            return Err(ApiError::new(
                400,
                "UnsupportedOperation",
                format!("Canopy cannot modify the attribute {other} yet."),
            ));
        }
    };
    modify(ctx, id, change).await
}

/// Commits one ModifyInstanceAttribute change (or answers its DryRun).
async fn modify(ctx: &Ctx, id: InstanceId, change: InstanceChange) -> Result<String, ApiError> {
    if ctx.params.bool("DryRun")?.unwrap_or(false) {
        ctx.require_instances(std::slice::from_ref(&id)).await?;
        return Err(ApiError::dry_run());
    }
    ctx.clc
        .submit(Command::ModifyInstance {
            account_id: ctx.account.clone(),
            instance_id: id,
            change,
        })
        .await?;
    let mut w = XmlWriter::response("ModifyInstanceAttribute", &ctx.request_id);
    w.bool_elem("return", true);
    Ok(w.finish())
}

/// ModifyInstanceAttribute `instanceType`, only while the instance is stopped (as on EC2).
///
/// A stopped instance keeps its allocation on its node, where its disk lives, so the new
/// size is taken there now rather than at the next start: when the node has no room for
/// the growth, the change is refused with `InsufficientInstanceCapacity` (AWS refuses the
/// later StartInstances instead) and the instance keeps its type. A start after a change
/// therefore always fits. The growth is counted in the launch ledger, in the same critical
/// section as launches, so a launch cannot take the same room before the change commits
/// (as room taken in the zone, until the next read of the committed allocations counts it
/// on the node itself).
async fn modify_instance_type(
    ctx: &Ctx,
    id: InstanceId,
    itype: &'static InstanceType,
) -> Result<String, ApiError> {
    let not_stopped = |id: &InstanceId| {
        ApiError::new(
            400,
            "IncorrectInstanceState",
            format!("The instance '{id}' is not in the 'stopped' state."),
        )
    };
    let found = ctx
        .clc
        .store
        .owned_instances(&ctx.account, std::slice::from_ref(&id))
        .await?;
    let Some(inst) = found.get(&id) else {
        return Err(crate::state::StateError::InstancesNotFound(vec![id]).into());
    };
    if inst.state != InstanceState::Stopped {
        return Err(not_stopped(&id));
    }
    ctx.dry_run()?;
    let growth = itype.resources.saturating_sub(&inst.resources);
    let ticket = match &inst.node_id {
        Some(node) if growth != Resources::default() => {
            crate::zones::await_zones(&ctx.clc).await?;
            ctx.clc.launches.refresh(&ctx.clc.store).await?;
            let catalog = ctx.clc.store.catalog().await?;
            let (refusal, ticket) = ctx.clc.launches.schedule(
                ctx.clc.zones.version(),
                &catalog.zones,
                |allocations| zone_snapshots(&ctx.clc, &catalog.zones, allocations),
                |zones| match scheduler::room_to_grow(zones, &inst.zone, node, &growth) {
                    Ok(()) => (None, Some((inst.zone.clone(), growth, 1))),
                    Err(reason) => (Some(reason), None),
                },
            );
            if let Some(reason) = refusal {
                tracing::info!(instance = %id, %node, %reason, "type change refused: no room on the node");
                return Err(ApiError::new(
                    500,
                    "InsufficientInstanceCapacity",
                    format!(
                        "We currently do not have sufficient {} capacity on the host of instance '{id}': {reason}. Try a smaller instance type.",
                        itype.name
                    ),
                ));
            }
            ticket
        }
        _ => None,
    };
    let out = ctx
        .clc
        .submit(Command::ModifyInstance {
            account_id: ctx.account.clone(),
            instance_id: id,
            change: InstanceChange::InstanceType {
                name: itype.name.to_owned(),
                resources: itype.resources,
            },
        })
        .await;
    match out {
        Ok(_) => {
            if let Some(ticket) = ticket {
                ticket.committed();
            }
        }
        // Started between the look above and the commit.
        Err(crate::state::StateError::IncorrectInstanceState { id, .. }) => {
            return Err(not_stopped(&id));
        }
        Err(e) => return Err(e.into()),
    }
    let mut w = XmlWriter::response("ModifyInstanceAttribute", &ctx.request_id);
    w.bool_elem("return", true);
    Ok(w.finish())
}

/// `MetadataOptions.*` of RunInstances (or the same names at the top of
/// ModifyInstanceMetadataOptions, `prefix` ""): what is not given stays as in `current`.
fn metadata_options_under(
    p: &canopy_ec2_wire::params::Params,
    prefix: &str,
    current: MetadataOptions,
) -> Result<MetadataOptions, ApiError> {
    let mut o = current;
    match p
        .get(&format!("{prefix}HttpTokens"))
        .filter(|v| !v.is_empty())
    {
        None => {}
        Some("required") => o.tokens_required = true,
        Some("optional") => o.tokens_required = false,
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "Value ({other}) for parameter HttpTokens is invalid. Expected 'required' or 'optional'."
            )));
        }
    }
    match p
        .get(&format!("{prefix}HttpEndpoint"))
        .filter(|v| !v.is_empty())
    {
        None => {}
        Some("enabled") => o.endpoint_disabled = false,
        Some("disabled") => o.endpoint_disabled = true,
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "Value ({other}) for parameter HttpEndpoint is invalid. Expected 'enabled' or 'disabled'."
            )));
        }
    }
    if let Some(hops) = p.int::<i64>(&format!("{prefix}HttpPutResponseHopLimit"))?
        && !(1..=64).contains(&hops)
    {
        return Err(ApiError::invalid(format!(
            "Value ({hops}) for parameter HttpPutResponseHopLimit is invalid. Expected 1 to 64."
        )));
    }
    Ok(o)
}

fn metadata_options(
    p: &canopy_ec2_wire::params::Params,
    current: MetadataOptions,
) -> Result<MetadataOptions, ApiError> {
    metadata_options_under(p, "MetadataOptions.", current)
}

/// ModifyInstanceMetadataOptions: HttpTokens and HttpEndpoint, applied at once (the node's
/// metadata service follows with the next desired state).
pub async fn modify_instance_metadata_options(ctx: &Ctx) -> Result<String, ApiError> {
    let id = parse_instance_id(ctx.params.required("InstanceId")?)?;
    let inst = one_instance(ctx, &id).await?;
    let options = metadata_options_under(&ctx.params, "", inst.metadata_options)?;
    ctx.dry_run()?;
    ctx.clc
        .submit(Command::ModifyInstance {
            account_id: ctx.account.clone(),
            instance_id: id.clone(),
            change: InstanceChange::MetadataOptions(options),
        })
        .await?;
    let mut w = XmlWriter::response("ModifyInstanceMetadataOptions", &ctx.request_id);
    w.elem("instanceId", &id);
    render::metadata_options(&mut w, "instanceMetadataOptions", options);
    Ok(w.finish())
}
