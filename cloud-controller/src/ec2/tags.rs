//! CreateTags, DeleteTags, DescribeTags (instances, key pairs, security groups, Elastic IPs,
//! volumes, snapshots and images), and the TagSpecifications of create calls.

use canopy_common::ResourceId;
use canopy_ec2_wire::params::Params;
use canopy_ec2_wire::xml::XmlWriter;

use super::filters::{self, Filterable};
use super::instances::{parse_tags, validate_tag};
use super::paging::{self, paginate};
use super::{ApiError, Ctx};
use crate::state::{Command, Tag};

/// `ResourceId.N`: an id of a kind Canopy tags; any other is refused the way AWS refuses an
/// id it cannot parse.
fn resource_ids(ctx: &Ctx) -> Result<Vec<ResourceId>, ApiError> {
    let raw = ctx.params.list("ResourceId")?;
    if raw.is_empty() {
        return Err(ApiError::missing("ResourceId"));
    }
    raw.iter()
        .map(|s| {
            ResourceId::parse(s)
                .map_err(|_| ApiError::new(400, "InvalidID", format!("The ID '{s}' is not valid")))
        })
        .collect()
}

/// What a DryRun checks before answering: that the account owns every resource named, with
/// the error of each kind's own (the command checks the same when applied).
async fn require_resources(ctx: &Ctx, ids: &[ResourceId]) -> Result<(), ApiError> {
    let mut instances = Vec::new();
    let mut groups = Vec::new();
    let mut key_pairs = Vec::new();
    let mut allocations = Vec::new();
    let mut volumes = Vec::new();
    for id in ids {
        match id {
            ResourceId::Instance(i) => instances.push(i.clone()),
            ResourceId::SecurityGroup(g) => groups.push(g.to_string()),
            ResourceId::KeyPair(k) => key_pairs.push(k),
            ResourceId::ElasticIp(a) => allocations.push(a),
            ResourceId::Volume(v) => volumes.push(v),
            ResourceId::Snapshot(s) => {
                super::snapshots::require_snapshot(ctx, s).await?;
            }
            ResourceId::Image(image) => {
                // Only its owner tags an image.
                let catalog = ctx.clc.store.catalog().await?;
                if !catalog.images.iter().any(|i| {
                    &i.image_id == image && i.owner_id == ctx.account && i.state != "deregistered"
                }) {
                    return Err(ApiError::new(
                        400,
                        "InvalidAMIID.NotFound",
                        format!("The image id '[{image}]' does not exist"),
                    ));
                }
            }
        }
    }
    if !volumes.is_empty() {
        let owned = ctx.clc.store.volumes(&ctx.account).await?;
        first_missing(&volumes, owned.iter().map(|o| &o.volume_id)).map_or(Ok(()), |v| {
            Err(super::volumes::volume_not_found(v.as_str()))
        })?;
    }
    if !allocations.is_empty() {
        let owned = ctx.clc.store.addresses(&ctx.account).await?;
        first_missing(&allocations, owned.iter().map(|o| &o.allocation_id))
            .map_or(Ok(()), |a| {
                Err(super::addresses::allocation_not_found(a.as_str()))
            })?;
    }
    ctx.require_instances(&instances).await?;
    super::security_groups::resolve_groups(ctx, &groups, &[]).await?;
    if !key_pairs.is_empty() {
        let owned = ctx.clc.store.key_pairs(&ctx.account).await?;
        first_missing(&key_pairs, owned.iter().map(|o| &o.key_pair_id)).map_or(Ok(()), |k| {
            Err(super::key_pairs::key_pair_not_found(k.as_str()))
        })?;
    }
    Ok(())
}

/// The first of `wanted` that is not among the account's `owned` ids.
fn first_missing<'a, T: PartialEq + 'a>(
    wanted: &[&'a T],
    owned: impl Iterator<Item = &'a T> + Clone,
) -> Option<&'a T> {
    wanted
        .iter()
        .copied()
        .find(|w| !owned.clone().any(|o| o == *w))
}

/// The tags of `TagSpecification.N` for a call that creates one resource of `resource_type`
/// (e.g. `key-pair`): a specification for any other type is refused, as on EC2.
pub fn for_new_resource(params: &Params, resource_type: &str) -> Result<Vec<Tag>, ApiError> {
    let mut tags = Vec::new();
    for spec in params.structs("TagSpecification")? {
        let rtype = spec.get("ResourceType").unwrap_or_default();
        if rtype != resource_type {
            return Err(ApiError::invalid(format!(
                "'{rtype}' is not a valid taggable resource type for this operation."
            )));
        }
        tags.extend(parse_tags(&spec)?);
    }
    Ok(tags)
}

pub async fn create_tags(ctx: &Ctx) -> Result<String, ApiError> {
    let ids = resource_ids(ctx)?;
    let tags = parse_tags(&ctx.params)?;
    if tags.is_empty() {
        return Err(ApiError::missing("Tag"));
    }
    if ctx.params.bool("DryRun")?.unwrap_or(false) {
        require_resources(ctx, &ids).await?;
        return Err(ApiError::dry_run());
    }
    ctx.clc
        .submit(Command::CreateTags {
            account_id: ctx.account.clone(),
            resource_ids: ids,
            tags,
        })
        .await?;
    let mut w = XmlWriter::response("CreateTags", &ctx.request_id);
    w.bool_elem("return", true);
    Ok(w.finish())
}

pub async fn delete_tags(ctx: &Ctx) -> Result<String, ApiError> {
    let ids = resource_ids(ctx)?;
    let mut tags = Vec::new();
    for t in ctx.params.structs("Tag")? {
        let key = t.get("Key").unwrap_or_default().to_owned();
        // An absent Value deletes whatever the value is; a present one (even empty) must match.
        let value = t.get("Value").map(str::to_owned);
        validate_tag(&key, value.as_deref().unwrap_or_default())?;
        tags.push((key, value));
    }
    if ctx.params.bool("DryRun")?.unwrap_or(false) {
        require_resources(ctx, &ids).await?;
        return Err(ApiError::dry_run());
    }
    ctx.clc
        .submit(Command::DeleteTags {
            account_id: ctx.account.clone(),
            resource_ids: ids,
            tags,
        })
        .await?;
    let mut w = XmlWriter::response("DeleteTags", &ctx.request_id);
    w.bool_elem("return", true);
    Ok(w.finish())
}

struct TagRow {
    seq: i64,
    resource_id: String,
    resource_type: String,
    key: String,
    value: String,
}

impl Filterable for TagRow {
    fn filter_values(&self, name: &str) -> Option<Vec<String>> {
        let one = |s: &str| Some(vec![s.to_owned()]);
        match name {
            "key" => one(&self.key),
            "value" => one(&self.value),
            "resource-id" => one(&self.resource_id),
            "resource-type" => one(&self.resource_type),
            _ => None,
        }
    }
}

pub async fn describe_tags(ctx: &Ctx) -> Result<String, ApiError> {
    let filters = filters::parse_filters(&ctx.params)?;
    let page = paging::parse_page(&ctx.params, 5, 1000)?;
    let probe = TagRow {
        seq: 0,
        resource_id: String::new(),
        resource_type: String::new(),
        key: String::new(),
        value: String::new(),
    };
    filters::validate(&filters, &probe)?;
    ctx.dry_run()?;
    let rows: Vec<TagRow> = ctx
        .clc
        .store
        .tags(&ctx.account)
        .await?
        .into_iter()
        .enumerate()
        .map(|(n, (resource_id, resource_type, key, value))| TagRow {
            seq: n as i64,
            resource_id,
            resource_type,
            key,
            value,
        })
        .filter(|r| filters::matches(r, &filters))
        .collect();
    let (items, next) = paginate(rows, page, |r| r.seq);
    let mut w = XmlWriter::response("DescribeTags", &ctx.request_id);
    w.list("tagSet", &items, |w, r| {
        w.elem("resourceId", &r.resource_id)
            .elem("resourceType", &r.resource_type)
            .elem("key", &r.key)
            .elem("value", &r.value);
    });
    w.opt_elem("nextToken", next.as_ref());
    Ok(w.finish())
}
