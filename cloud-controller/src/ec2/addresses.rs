//! Elastic IPs: AllocateAddress, AssociateAddress, DisassociateAddress, ReleaseAddress,
//! DescribeAddresses. Addresses come from the region's public pool; they are stored and
//! shown (and served to guests by the metadata service) but not routed yet.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use canopy_common::{AllocationId, AssociationId};
use canopy_ec2_wire::xml::XmlWriter;
use chrono::Utc;

use super::filters::{self, Filterable};
use super::instances::parse_instance_id;
use super::{ApiError, Ctx, render, tags};
use crate::state::{Address, Command, StateError};

pub fn allocation_not_found(id: &str) -> ApiError {
    ApiError::new(
        400,
        "InvalidAllocationID.NotFound",
        format!("The allocation ID '{id}' does not exist"),
    )
}

fn parse_allocation(s: &str) -> Result<AllocationId, ApiError> {
    AllocationId::parse(s).map_err(|_| {
        ApiError::new(
            400,
            "InvalidAllocationID.Malformed",
            format!("Invalid id: \"{s}\" (expecting \"eipalloc-...\")"),
        )
    })
}

/// The account's address named by `AllocationId`, or else by `PublicIp`.
async fn target(ctx: &Ctx) -> Result<Address, ApiError> {
    let all = ctx.clc.store.addresses(&ctx.account).await?;
    if let Some(id) = ctx.params.get("AllocationId").filter(|s| !s.is_empty()) {
        let id = parse_allocation(id)?;
        return all
            .into_iter()
            .find(|a| a.allocation_id == id)
            .ok_or_else(|| allocation_not_found(id.as_str()));
    }
    if let Some(ip) = ctx.params.get("PublicIp").filter(|s| !s.is_empty()) {
        return all
            .into_iter()
            .find(|a| a.public_ip.to_string() == ip)
            .ok_or_else(|| {
                ApiError::new(
                    400,
                    "InvalidAddress.NotFound",
                    format!("Address '{ip}' not found."),
                )
            });
    }
    Err(ApiError::missing("AllocationId"))
}

pub async fn allocate_address(ctx: &Ctx) -> Result<String, ApiError> {
    if let Some(domain) = ctx.params.get("Domain").filter(|d| !d.is_empty())
        && domain != "vpc"
        && domain != "standard"
    {
        return Err(ApiError::invalid(format!(
            "Value ({domain}) for parameter domain is invalid. Expected 'vpc' or 'standard'."
        )));
    }
    let wanted: Option<Ipv4Addr> = match ctx.params.get("Address").filter(|a| !a.is_empty()) {
        None => None,
        Some(a) => Some(
            a.parse()
                .map_err(|_| ApiError::invalid(format!("Invalid address: {a}")))?,
        ),
    };
    let tags = tags::for_new_resource(&ctx.params, "elastic-ip")?;
    ctx.dry_run()?;
    let pool = &ctx.clc.config.public_pool;
    if let Some(ip) = wanted
        && !pool.iter().any(|p| p.is_assignable(ip))
    {
        return Err(ApiError::new(
            400,
            "InvalidAddress.NotFound",
            format!("Address '{ip}' is not in this region's pool."),
        ));
    }
    // The edge picks a free address; a concurrent allocation of the same one is refused by
    // the state machine, and the next free one is tried.
    for _ in 0..5 {
        let taken: BTreeSet<Ipv4Addr> = ctx
            .clc
            .store
            .allocated_public_ips()
            .await?
            .into_iter()
            .collect();
        let ip = match wanted {
            Some(ip) if taken.contains(&ip) => {
                return Err(ApiError::new(
                    400,
                    "InvalidAddress.InUse",
                    format!("Address '{ip}' is already allocated."),
                ));
            }
            Some(ip) => ip,
            None => pool
                .iter()
                .find_map(|p| p.first_free(&taken))
                .ok_or_else(|| {
                    ApiError::new(
                        400,
                        "AddressLimitExceeded",
                        "The maximum number of addresses has been reached.",
                    )
                })?,
        };
        let address = Address {
            allocation_id: AllocationId::generate(),
            public_ip: ip,
            account_id: ctx.account.clone(),
            instance_id: None,
            association_id: None,
            allocated_at: Utc::now(),
            tags: vec![],
        };
        match ctx
            .clc
            .submit(Command::AllocateAddress {
                address: address.clone(),
                tags: tags.clone(),
            })
            .await
        {
            Ok(_) => {
                let mut w = XmlWriter::response("AllocateAddress", &ctx.request_id);
                w.elem("publicIp", address.public_ip)
                    .elem("domain", "vpc")
                    .elem("allocationId", &address.allocation_id)
                    .elem("publicIpv4Pool", "amazon")
                    .elem("networkBorderGroup", &ctx.clc.config.region);
                return Ok(w.finish());
            }
            Err(StateError::AddressTaken(_)) if wanted.is_none() => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::new(
        503,
        "RequestLimitExceeded",
        "Too many concurrent address allocations; please retry.",
    ))
}

pub async fn associate_address(ctx: &Ctx) -> Result<String, ApiError> {
    if ctx
        .params
        .get("NetworkInterfaceId")
        .is_some_and(|n| !n.is_empty())
    {
        return Err(ApiError::new(
            400,
            "UnsupportedOperation",
            "Canopy associates addresses with instances (InstanceId), not network interfaces.",
        ));
    }
    let instance = parse_instance_id(ctx.params.required("InstanceId")?)?;
    let address = target(ctx).await?;
    let allow = ctx.params.bool("AllowReassociation")?.unwrap_or(false);
    if ctx.params.bool("DryRun")?.unwrap_or(false) {
        ctx.require_instances(std::slice::from_ref(&instance))
            .await?;
        return Err(ApiError::dry_run());
    }
    let association_id = AssociationId::generate();
    ctx.clc
        .submit(Command::AssociateAddress {
            account_id: ctx.account.clone(),
            allocation_id: address.allocation_id,
            instance_id: instance,
            association_id: association_id.clone(),
            allow_reassociation: allow,
        })
        .await?;
    let mut w = XmlWriter::response("AssociateAddress", &ctx.request_id);
    w.bool_elem("return", true)
        .elem("associationId", &association_id);
    Ok(w.finish())
}

pub async fn disassociate_address(ctx: &Ctx) -> Result<String, ApiError> {
    let association = match ctx.params.get("AssociationId").filter(|s| !s.is_empty()) {
        Some(id) => AssociationId::parse(id).map_err(|_| association_not_found(id))?,
        None => {
            let address = target(ctx).await?;
            address.association_id.ok_or_else(|| {
                ApiError::new(
                    400,
                    "InvalidAssociationID.NotFound",
                    format!("The address {} is not associated", address.public_ip),
                )
            })?
        }
    };
    ctx.dry_run()?;
    ctx.clc
        .submit(Command::DisassociateAddress {
            account_id: ctx.account.clone(),
            association_id: association,
        })
        .await?;
    let mut w = XmlWriter::response("DisassociateAddress", &ctx.request_id);
    w.bool_elem("return", true);
    Ok(w.finish())
}

pub fn association_not_found(id: &str) -> ApiError {
    ApiError::new(
        400,
        "InvalidAssociationID.NotFound",
        format!("The association ID '{id}' does not exist"),
    )
}

pub async fn release_address(ctx: &Ctx) -> Result<String, ApiError> {
    let address = target(ctx).await?;
    ctx.dry_run()?;
    ctx.clc
        .submit(Command::ReleaseAddress {
            account_id: ctx.account.clone(),
            allocation_id: address.allocation_id,
        })
        .await?;
    let mut w = XmlWriter::response("ReleaseAddress", &ctx.request_id);
    w.bool_elem("return", true);
    Ok(w.finish())
}

/// An address with the private address of its instance, for filters and the answer.
struct AddressView {
    address: Address,
    private_ip: Option<Ipv4Addr>,
}

impl Filterable for AddressView {
    fn filter_values(&self, name: &str) -> Option<Vec<String>> {
        let a = &self.address;
        if let Some(values) = filters::tag_values(&a.tags, name) {
            return Some(values);
        }
        let opt = |v: Option<String>| Some(v.into_iter().collect());
        match name {
            "allocation-id" => opt(Some(a.allocation_id.to_string())),
            "association-id" => opt(a.association_id.as_ref().map(ToString::to_string)),
            "domain" => opt(Some("vpc".into())),
            "instance-id" => opt(a.instance_id.as_ref().map(ToString::to_string)),
            "public-ip" => opt(Some(a.public_ip.to_string())),
            "private-ip-address" => opt(self.private_ip.map(|ip| ip.to_string())),
            "network-border-group" | "network-interface-id" | "network-interface-owner-id" => {
                Some(vec![])
            }
            _ => None,
        }
    }
}

pub async fn describe_addresses(ctx: &Ctx) -> Result<String, ApiError> {
    let filters = filters::parse_filters(&ctx.params)?;
    let ids = ctx.params.list("AllocationId")?;
    let ips = ctx.params.list("PublicIp")?;
    let probe = AddressView {
        address: Address {
            allocation_id: AllocationId::generate(),
            public_ip: Ipv4Addr::UNSPECIFIED,
            account_id: ctx.account.clone(),
            instance_id: None,
            association_id: None,
            allocated_at: Utc::now(),
            tags: vec![],
        },
        private_ip: None,
    };
    filters::validate(&filters, &probe)?;
    ctx.dry_run()?;
    let all = ctx.clc.store.addresses(&ctx.account).await?;
    for id in &ids {
        if !all.iter().any(|a| a.allocation_id.as_str() == id) {
            return Err(allocation_not_found(id));
        }
    }
    for ip in &ips {
        if !all.iter().any(|a| &a.public_ip.to_string() == ip) {
            return Err(ApiError::new(
                400,
                "InvalidAddress.NotFound",
                format!("Address '{ip}' not found."),
            ));
        }
    }
    let instance_ids: Vec<_> = all.iter().filter_map(|a| a.instance_id.clone()).collect();
    let instances = ctx
        .clc
        .store
        .instances_by_id(Some(&ctx.account), &instance_ids)
        .await?;
    let views: Vec<AddressView> = all
        .into_iter()
        .filter(|a| ids.is_empty() || ids.iter().any(|i| i == a.allocation_id.as_str()))
        .filter(|a| ips.is_empty() || ips.iter().any(|i| i == &a.public_ip.to_string()))
        .map(|a| AddressView {
            private_ip: a
                .instance_id
                .as_ref()
                .and_then(|i| instances.get(i))
                .and_then(|i| i.private_ip),
            address: a,
        })
        .filter(|v| filters::matches(v, &filters))
        .collect();
    let mut w = XmlWriter::response("DescribeAddresses", &ctx.request_id);
    w.list("addressesSet", &views, |w, v| {
        let a = &v.address;
        w.elem("publicIp", a.public_ip)
            .elem("allocationId", &a.allocation_id)
            .elem("domain", "vpc")
            .opt_elem("instanceId", a.instance_id.as_ref())
            .opt_elem("associationId", a.association_id.as_ref())
            .opt_elem("privateIpAddress", v.private_ip)
            .elem("publicIpv4Pool", "amazon")
            .elem("networkBorderGroup", &ctx.clc.config.region);
        render::tag_set(w, &a.tags);
    });
    Ok(w.finish())
}
