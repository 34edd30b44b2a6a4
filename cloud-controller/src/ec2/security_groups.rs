//! Security groups: Create/Describe/DeleteSecurityGroup, Authorize/Revoke ingress and
//! egress rules, DescribeSecurityGroupRules. Rules are stored and shown exactly; nodes do
//! not enforce them yet.

use std::net::{Ipv4Addr, Ipv6Addr};

use canopy_common::{SecurityGroupId, SecurityGroupRuleId};
use canopy_ec2_wire::params::Params;
use canopy_ec2_wire::xml::XmlWriter;
use chrono::Utc;

use super::filters::{self, Filterable};
use super::paging::{self, paginate};
use super::{ApiError, Ctx, render, tags};
use crate::state::{
    Command, DEFAULT_SECURITY_GROUP, Outcome, RulePeer, RuleSpec, SecurityGroup, SecurityGroupRule,
};

const MAX_NAME: usize = 255;

pub fn group_not_found(what: &str) -> ApiError {
    ApiError::new(
        400,
        "InvalidGroup.NotFound",
        format!("The security group '{what}' does not exist"),
    )
}

pub fn parse_group_id(s: &str) -> Result<SecurityGroupId, ApiError> {
    SecurityGroupId::parse(s).map_err(|_| {
        ApiError::new(
            400,
            "InvalidGroupId.Malformed",
            format!("Invalid id: \"{s}\" (expecting \"sg-...\")"),
        )
    })
}

/// The account's groups named by id and by name, in that order, or the first unknown one's
/// error.
pub async fn resolve_groups(
    ctx: &Ctx,
    ids: &[String],
    names: &[String],
) -> Result<Vec<SecurityGroup>, ApiError> {
    let all = ctx.clc.store.security_groups(&ctx.account).await?;
    let mut out = Vec::new();
    for id in ids {
        let id = parse_group_id(id)?;
        out.push(
            all.iter()
                .find(|g| g.group_id == id)
                .cloned()
                .ok_or_else(|| group_not_found(id.as_str()))?,
        );
    }
    for name in names {
        out.push(
            all.iter()
                .find(|g| &g.group_name == name)
                .cloned()
                .ok_or_else(|| group_not_found(name))?,
        );
    }
    Ok(out)
}

/// `GroupId` or `GroupName`, one of the two.
async fn target_group(ctx: &Ctx) -> Result<SecurityGroup, ApiError> {
    let id = ctx.params.get("GroupId").filter(|s| !s.is_empty());
    let name = ctx.params.get("GroupName").filter(|s| !s.is_empty());
    let (ids, names) = match (id, name) {
        (Some(id), _) => (vec![id.to_owned()], vec![]),
        (None, Some(name)) => (vec![], vec![name.to_owned()]),
        (None, None) => return Err(ApiError::missing("GroupId")),
    };
    Ok(resolve_groups(ctx, &ids, &names).await?.remove(0))
}

pub async fn create_security_group(ctx: &Ctx) -> Result<String, ApiError> {
    let p = &ctx.params;
    let name = p
        .get("GroupName")
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ApiError::missing("GroupName"))?;
    let description = p
        .get("GroupDescription")
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ApiError::missing("GroupDescription"))?;
    for (what, v) in [("groupName", name), ("groupDescription", description)] {
        if v.chars().count() > MAX_NAME || v.chars().any(char::is_control) {
            return Err(ApiError::invalid(format!(
                "Value for parameter {what} is invalid: at most {MAX_NAME} characters, no control characters."
            )));
        }
    }
    if name.to_ascii_lowercase().starts_with("sg-") {
        return Err(ApiError::invalid(
            "Group names may not be in the format sg-*",
        ));
    }
    if name == DEFAULT_SECURITY_GROUP {
        return Err(ApiError::new(
            400,
            "InvalidGroup.Reserved",
            "The security group 'default' is reserved",
        ));
    }
    if let Some(vpc) = p.get("VpcId").filter(|v| !v.is_empty()) {
        return Err(ApiError::new(
            400,
            "InvalidVpcID.NotFound",
            format!("The vpc ID '{vpc}' does not exist"),
        ));
    }
    let tags = tags::for_new_resource(p, "security-group")?;
    ctx.dry_run()?;
    let group_id = SecurityGroupId::generate();
    // EC2 gives every new group one rule: all traffic out, to anywhere (IPv4).
    let group = SecurityGroup {
        group_id: group_id.clone(),
        account_id: ctx.account.clone(),
        group_name: name.to_owned(),
        description: description.to_owned(),
        created_at: Utc::now(),
        rules: vec![SecurityGroupRule {
            rule_id: SecurityGroupRuleId::generate(),
            group_id: group_id.clone(),
            spec: RuleSpec {
                is_egress: true,
                protocol: "-1".into(),
                from_port: None,
                to_port: None,
                peer: RulePeer::Ipv4("0.0.0.0/0".into()),
            },
            description: String::new(),
        }],
        tags: vec![],
    };
    ctx.clc
        .submit(Command::CreateSecurityGroup {
            group,
            tags: tags.clone(),
        })
        .await?;
    let mut w = XmlWriter::response("CreateSecurityGroup", &ctx.request_id);
    w.bool_elem("return", true).elem("groupId", &group_id);
    render::tag_set(&mut w, &tags);
    Ok(w.finish())
}

pub async fn delete_security_group(ctx: &Ctx) -> Result<String, ApiError> {
    let group = target_group(ctx).await?;
    ctx.dry_run()?;
    ctx.clc
        .submit(Command::DeleteSecurityGroup {
            account_id: ctx.account.clone(),
            group_id: group.group_id.clone(),
        })
        .await?;
    let mut w = XmlWriter::response("DeleteSecurityGroup", &ctx.request_id);
    w.bool_elem("return", true).elem("groupId", &group.group_id);
    Ok(w.finish())
}

/// A protocol as EC2 stores it: names for tcp, udp, icmp and icmpv6 (also given by number),
/// `-1` for all, the number for any other.
fn protocol(raw: &str) -> Result<String, ApiError> {
    let p = raw.to_ascii_lowercase();
    Ok(match p.as_str() {
        "-1" | "all" => "-1".into(),
        "tcp" | "6" => "tcp".into(),
        "udp" | "17" => "udp".into(),
        "icmp" | "1" => "icmp".into(),
        "icmpv6" | "58" => "icmpv6".into(),
        n if n.parse::<u8>().is_ok() => n.parse::<u8>().unwrap_or_default().to_string(),
        _ => {
            return Err(ApiError::invalid(format!(
                "Invalid value '{raw}' for IP protocol. Unknown protocol."
            )));
        }
    })
}

/// The port range of a rule for `protocol`, from FromPort/ToPort as given.
fn ports(
    protocol: &str,
    from: Option<i32>,
    to: Option<i32>,
) -> Result<(Option<i32>, Option<i32>), ApiError> {
    match protocol {
        "tcp" | "udp" => {
            let (Some(from), Some(to)) = (from, to) else {
                return Err(ApiError::invalid(format!(
                    "Invalid value 'null' for {}. Ports are required for {protocol}.",
                    if from.is_none() { "fromPort" } else { "toPort" }
                )));
            };
            // -1 on both is "all ports".
            let (from, to) = if (from, to) == (-1, -1) {
                (0, 65535)
            } else {
                (from, to)
            };
            if !(0..=65535).contains(&from) || !(0..=65535).contains(&to) || from > to {
                return Err(ApiError::invalid(format!(
                    "Invalid port range {from}-{to}: ports are 0 to 65535, from before to."
                )));
            }
            Ok((Some(from), Some(to)))
        }
        "icmp" | "icmpv6" => {
            let (from, to) = (from.unwrap_or(-1), to.unwrap_or(-1));
            if !(-1..=255).contains(&from) || !(-1..=255).contains(&to) {
                return Err(ApiError::invalid(format!(
                    "Invalid ICMP type {from} or code {to}: each is -1 (all) or 0 to 255."
                )));
            }
            Ok((Some(from), Some(to)))
        }
        // All protocols, or one without ports: EC2 keeps no range.
        _ => Ok((None, None)),
    }
}

fn cidr4(raw: &str) -> Result<String, ApiError> {
    let ok = raw.split_once('/').is_some_and(|(addr, len)| {
        addr.parse::<Ipv4Addr>().is_ok() && len.parse::<u8>().is_ok_and(|l| l <= 32)
    });
    if ok {
        Ok(raw.to_owned())
    } else {
        Err(ApiError::invalid(format!("CIDR block {raw} is malformed")))
    }
}

fn cidr6(raw: &str) -> Result<String, ApiError> {
    match raw.split_once('/') {
        Some((addr, len))
            if len.parse::<u8>().is_ok_and(|l| l <= 128) && addr.parse::<Ipv6Addr>().is_ok() =>
        {
            // EC2 shows the canonical text.
            let addr: Ipv6Addr = addr.parse().unwrap_or(Ipv6Addr::UNSPECIFIED);
            Ok(format!("{addr}/{len}"))
        }
        _ => Err(ApiError::invalid(format!("CIDR block {raw} is malformed"))),
    }
}

fn description(p: &Params) -> Result<String, ApiError> {
    let d = p.get("Description").unwrap_or_default();
    if d.chars().count() > MAX_NAME {
        return Err(ApiError::invalid(format!(
            "Rule descriptions are at most {MAX_NAME} characters"
        )));
    }
    Ok(d.to_owned())
}

/// The rules of an Authorize or Revoke call: `IpPermissions.N` (each with ranges, IPv6
/// ranges and groups), or the flat form (ingress only) with `IpProtocol`, `FromPort`,
/// `ToPort`, `CidrIp`, `SourceSecurityGroupName`.
async fn requested_rules(ctx: &Ctx, is_egress: bool) -> Result<Vec<(RuleSpec, String)>, ApiError> {
    let p = &ctx.params;
    let mut out = Vec::new();
    let mut groups_by_name: Option<Vec<SecurityGroup>> = None;
    let mut group_named = async |name: &str| -> Result<SecurityGroupId, ApiError> {
        if groups_by_name.is_none() {
            groups_by_name = Some(ctx.clc.store.security_groups(&ctx.account).await?);
        }
        groups_by_name
            .as_ref()
            .and_then(|all| all.iter().find(|g| g.group_name == name))
            .map(|g| g.group_id.clone())
            .ok_or_else(|| group_not_found(name))
    };
    for perm in p.structs("IpPermissions")? {
        let proto = protocol(
            perm.get("IpProtocol")
                .filter(|v| !v.is_empty())
                .ok_or_else(|| ApiError::missing("IpPermissions.N.IpProtocol"))?,
        )?;
        let (from, to) = ports(&proto, perm.int("FromPort")?, perm.int("ToPort")?)?;
        let spec = |peer| RuleSpec {
            is_egress,
            protocol: proto.clone(),
            from_port: from,
            to_port: to,
            peer,
        };
        let before = out.len();
        for range in perm.structs("IpRanges")? {
            let cidr = cidr4(range.required("CidrIp")?)?;
            out.push((spec(RulePeer::Ipv4(cidr)), description(&range)?));
        }
        for range in perm.structs("Ipv6Ranges")? {
            let cidr = cidr6(range.required("CidrIpv6")?)?;
            out.push((spec(RulePeer::Ipv6(cidr)), description(&range)?));
        }
        for pair in perm.structs("Groups")? {
            if let Some(user) = pair.get("UserId").filter(|u| !u.is_empty())
                && user != ctx.account.as_str()
            {
                return Err(ApiError::new(
                    400,
                    "InvalidGroup.NotFound",
                    format!("Groups of other accounts ({user}) cannot be referenced here"),
                ));
            }
            let group = match (
                pair.get("GroupId").filter(|g| !g.is_empty()),
                pair.get("GroupName").filter(|g| !g.is_empty()),
            ) {
                (Some(id), _) => parse_group_id(id)?,
                (None, Some(name)) => group_named(name).await?,
                (None, None) => return Err(ApiError::missing("IpPermissions.N.Groups.N.GroupId")),
            };
            out.push((spec(RulePeer::Group(group)), description(&pair)?));
        }
        if !perm.structs("PrefixListIds")?.is_empty() {
            return Err(ApiError::new(
                400,
                "InvalidPrefixListId.NotFound",
                "Canopy has no prefix lists",
            ));
        }
        if out.len() == before {
            return Err(ApiError::missing(
                "IpPermissions.N.IpRanges, Ipv6Ranges or Groups",
            ));
        }
    }
    // The flat form (the CLI's --protocol/--port/--cidr/--source-group).
    if let Some(raw) = p.get("IpProtocol").filter(|v| !v.is_empty()) {
        let proto = protocol(raw)?;
        let (from, to) = ports(&proto, p.int("FromPort")?, p.int("ToPort")?)?;
        let peer = match (
            p.get("CidrIp").filter(|c| !c.is_empty()),
            p.get("SourceSecurityGroupName").filter(|c| !c.is_empty()),
        ) {
            (Some(cidr), None) => RulePeer::Ipv4(cidr4(cidr)?),
            (None, Some(name)) => RulePeer::Group(group_named(name).await?),
            (None, None) => return Err(ApiError::missing("CidrIp")),
            (Some(_), Some(_)) => {
                return Err(ApiError::combination(
                    "CidrIp and SourceSecurityGroupName cannot be used together",
                ));
            }
        };
        out.push((
            RuleSpec {
                is_egress,
                protocol: proto,
                from_port: from,
                to_port: to,
                peer,
            },
            String::new(),
        ));
    } else if let Some(name) = p.get("SourceSecurityGroupName").filter(|c| !c.is_empty()) {
        // A whole group, every protocol.
        out.push((
            RuleSpec {
                is_egress,
                protocol: "-1".into(),
                from_port: None,
                to_port: None,
                peer: RulePeer::Group(group_named(name).await?),
            },
            String::new(),
        ));
    }
    Ok(out)
}

pub async fn authorize(ctx: &Ctx, is_egress: bool) -> Result<String, ApiError> {
    let group = if is_egress {
        let id = ctx.params.required("GroupId")?;
        resolve_groups(ctx, &[id.to_owned()], &[]).await?.remove(0)
    } else {
        target_group(ctx).await?
    };
    let requested = requested_rules(ctx, is_egress).await?;
    if requested.is_empty() {
        return Err(ApiError::missing("IpPermissions"));
    }
    ctx.dry_run()?;
    let rules: Vec<SecurityGroupRule> = requested
        .into_iter()
        .map(|(spec, description)| SecurityGroupRule {
            rule_id: SecurityGroupRuleId::generate(),
            group_id: group.group_id.clone(),
            spec,
            description,
        })
        .collect();
    ctx.clc
        .submit(Command::AuthorizeSecurityGroupRules {
            account_id: ctx.account.clone(),
            group_id: group.group_id.clone(),
            rules: rules.clone(),
        })
        .await?;
    let action = if is_egress {
        "AuthorizeSecurityGroupEgress"
    } else {
        "AuthorizeSecurityGroupIngress"
    };
    let mut w = XmlWriter::response(action, &ctx.request_id);
    w.bool_elem("return", true);
    w.list("securityGroupRuleSet", &rules, |w, r| {
        rule(w, r, &ctx.account)
    });
    Ok(w.finish())
}

pub async fn revoke(ctx: &Ctx, is_egress: bool) -> Result<String, ApiError> {
    let group = if is_egress {
        let id = ctx.params.required("GroupId")?;
        resolve_groups(ctx, &[id.to_owned()], &[]).await?.remove(0)
    } else {
        target_group(ctx).await?
    };
    let specs: Vec<RuleSpec> = requested_rules(ctx, is_egress)
        .await?
        .into_iter()
        .map(|(spec, _)| spec)
        .collect();
    let rule_ids = ctx
        .params
        .list("SecurityGroupRuleId")?
        .iter()
        .map(|id| {
            SecurityGroupRuleId::parse(id).map_err(|_| {
                ApiError::new(
                    400,
                    "InvalidSecurityGroupRuleId.Malformed",
                    format!("Invalid id: \"{id}\" (expecting \"sgr-...\")"),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if specs.is_empty() && rule_ids.is_empty() {
        return Err(ApiError::missing("IpPermissions"));
    }
    // A rule id of the other direction is not this call's to revoke.
    for id in &rule_ids {
        if !group
            .rules
            .iter()
            .any(|r| &r.rule_id == id && r.spec.is_egress == is_egress)
        {
            return Err(ApiError::new(
                400,
                "InvalidSecurityGroupRuleId.NotFound",
                format!("The security group rule ID '{id}' does not exist"),
            ));
        }
    }
    ctx.dry_run()?;
    let outcome = ctx
        .clc
        .submit(Command::RevokeSecurityGroupRules {
            account_id: ctx.account.clone(),
            group_id: group.group_id.clone(),
            specs,
            rule_ids,
        })
        .await?;
    let Outcome::Revoked { unknown, .. } = outcome else {
        tracing::error!(?outcome, "revoke produced an unexpected outcome");
        return Err(ApiError::internal());
    };
    let action = if is_egress {
        "RevokeSecurityGroupEgress"
    } else {
        "RevokeSecurityGroupIngress"
    };
    let mut w = XmlWriter::response(action, &ctx.request_id);
    w.bool_elem("return", true);
    let unknown: Vec<(RuleSpec, String)> =
        unknown.into_iter().map(|s| (s, String::new())).collect();
    permissions(
        &mut w,
        "unknownIpPermissionSet",
        unknown.iter(),
        &ctx.account,
    );
    Ok(w.finish())
}

/// EC2's IpPermission list: rules with the same protocol and ports are one permission,
/// in the order of their first rule.
fn permissions<'a>(
    w: &mut XmlWriter,
    name: &str,
    rules: impl Iterator<Item = &'a (RuleSpec, String)>,
    owner: &canopy_common::AccountId,
) {
    type Key = (String, Option<i32>, Option<i32>);
    let mut grouped: Vec<(Key, Vec<&(RuleSpec, String)>)> = Vec::new();
    for r in rules {
        let key = (r.0.protocol.clone(), r.0.from_port, r.0.to_port);
        match grouped.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => v.push(r),
            None => grouped.push((key, vec![r])),
        }
    }
    w.list(name, &grouped, |w, ((proto, from, to), rules)| {
        w.elem("ipProtocol", proto)
            .opt_elem("fromPort", from.as_ref())
            .opt_elem("toPort", to.as_ref());
        // One list per kind of peer, each item the peer's own element and the description.
        for list in ["groups", "ipRanges", "ipv6Ranges"] {
            let of_kind = rules.iter().filter(|(s, _)| peer_list(&s.peer) == list);
            w.list(list, of_kind, |w, (s, d)| {
                match &s.peer {
                    RulePeer::Group(g) => w.elem("userId", owner).elem("groupId", g),
                    RulePeer::Ipv4(c) => w.elem("cidrIp", c),
                    RulePeer::Ipv6(c) => w.elem("cidrIpv6", c),
                };
                if !d.is_empty() {
                    w.elem("description", d);
                }
            });
        }
        w.list("prefixListIds", std::iter::empty::<()>(), |_, _| {});
    });
}

/// The IpPermission list a rule's peer is shown in.
fn peer_list(peer: &RulePeer) -> &'static str {
    match peer {
        RulePeer::Group(_) => "groups",
        RulePeer::Ipv4(_) => "ipRanges",
        RulePeer::Ipv6(_) => "ipv6Ranges",
    }
}

/// EC2's SecurityGroupRule shape.
fn rule(w: &mut XmlWriter, r: &SecurityGroupRule, owner: &canopy_common::AccountId) {
    w.elem("securityGroupRuleId", &r.rule_id)
        .elem("groupId", &r.group_id)
        .elem("groupOwnerId", owner)
        .bool_elem("isEgress", r.spec.is_egress)
        .elem("ipProtocol", &r.spec.protocol)
        .elem("fromPort", r.spec.from_port.unwrap_or(-1))
        .elem("toPort", r.spec.to_port.unwrap_or(-1));
    match &r.spec.peer {
        RulePeer::Ipv4(c) => {
            w.elem("cidrIpv4", c);
        }
        RulePeer::Ipv6(c) => {
            w.elem("cidrIpv6", c);
        }
        RulePeer::Group(g) => {
            w.nested("referencedGroupInfo", |w| {
                w.elem("groupId", g).elem("userId", owner);
            });
        }
    }
    if !r.description.is_empty() {
        w.elem("description", &r.description);
    }
    w.list("tagSet", std::iter::empty::<()>(), |_, _| {});
}

/// One rule's filter values under `prefix` (`ip-permission.` or `egress.ip-permission.`).
fn permission_values(rules: &[SecurityGroupRule], egress: bool, what: &str) -> Vec<String> {
    rules
        .iter()
        .filter(|r| r.spec.is_egress == egress)
        .filter_map(|r| match what {
            "protocol" => Some(r.spec.protocol.clone()),
            "from-port" => r.spec.from_port.map(|p| p.to_string()),
            "to-port" => r.spec.to_port.map(|p| p.to_string()),
            "cidr" => match &r.spec.peer {
                RulePeer::Ipv4(c) => Some(c.clone()),
                _ => None,
            },
            "ipv6-cidr" => match &r.spec.peer {
                RulePeer::Ipv6(c) => Some(c.clone()),
                _ => None,
            },
            "group-id" => match &r.spec.peer {
                RulePeer::Group(g) => Some(g.to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

const PERMISSION_FILTERS: [&str; 6] = [
    "protocol",
    "from-port",
    "to-port",
    "cidr",
    "ipv6-cidr",
    "group-id",
];

impl Filterable for SecurityGroup {
    fn filter_values(&self, name: &str) -> Option<Vec<String>> {
        if let Some(values) = filters::tag_values(&self.tags, name) {
            return Some(values);
        }
        for (prefix, egress) in [("ip-permission.", false), ("egress.ip-permission.", true)] {
            if let Some(what) = name.strip_prefix(prefix)
                && PERMISSION_FILTERS.contains(&what)
            {
                return Some(permission_values(&self.rules, egress, what));
            }
        }
        let one = |s: &str| Some(vec![s.to_owned()]);
        match name {
            "group-id" => one(self.group_id.as_str()),
            "group-name" => one(&self.group_name),
            "description" => one(&self.description),
            "owner-id" => one(self.account_id.as_str()),
            "vpc-id" => Some(vec![]),
            _ => None,
        }
    }
}

fn probe(ctx: &Ctx) -> SecurityGroup {
    SecurityGroup {
        group_id: SecurityGroupId::generate(),
        account_id: ctx.account.clone(),
        group_name: String::new(),
        description: String::new(),
        created_at: Utc::now(),
        rules: vec![],
        tags: vec![],
    }
}

pub async fn describe_security_groups(ctx: &Ctx) -> Result<String, ApiError> {
    let p = &ctx.params;
    let filters = filters::parse_filters(p)?;
    filters::validate(&filters, &probe(ctx))?;
    let page = paging::parse_page(p, 5, 1000)?;
    let ids = p.list("GroupId")?;
    let names = p.list("GroupName")?;
    ctx.dry_run()?;
    let groups = if ids.is_empty() && names.is_empty() {
        ctx.clc.store.security_groups(&ctx.account).await?
    } else {
        let mut picked = resolve_groups(ctx, &ids, &names).await?;
        picked.dedup_by(|a, b| a.group_id == b.group_id);
        picked
    };
    let matching: Vec<(i64, SecurityGroup)> = groups
        .into_iter()
        .filter(|g| filters::matches(g, &filters))
        .enumerate()
        .map(|(n, g)| (n as i64, g))
        .collect();
    let (items, next) = paginate(matching, page, |(n, _)| *n);
    let mut w = XmlWriter::response("DescribeSecurityGroups", &ctx.request_id);
    w.list("securityGroupInfo", &items, |w, (_, g)| {
        w.elem("ownerId", &g.account_id)
            .elem("groupId", &g.group_id)
            .elem("groupName", &g.group_name)
            .elem("groupDescription", &g.description);
        for (name, egress) in [("ipPermissions", false), ("ipPermissionsEgress", true)] {
            let rules: Vec<(RuleSpec, String)> = g
                .rules
                .iter()
                .filter(|r| r.spec.is_egress == egress)
                .map(|r| (r.spec.clone(), r.description.clone()))
                .collect();
            permissions(w, name, rules.iter(), &g.account_id);
        }
        render::tag_set(w, &g.tags);
    });
    w.opt_elem("nextToken", next.as_ref());
    Ok(w.finish())
}

struct RuleView<'a> {
    seq: i64,
    rule: &'a SecurityGroupRule,
    group: &'a SecurityGroup,
}

impl Filterable for RuleView<'_> {
    fn filter_values(&self, name: &str) -> Option<Vec<String>> {
        // Rules carry no tags of their own yet.
        if filters::tag_values(&[], name).is_some() {
            return Some(vec![]);
        }
        let one = |s: &str| Some(vec![s.to_owned()]);
        match name {
            "group-id" => one(self.group.group_id.as_str()),
            "security-group-rule-id" => one(self.rule.rule_id.as_str()),
            _ => None,
        }
    }
}

pub async fn describe_security_group_rules(ctx: &Ctx) -> Result<String, ApiError> {
    let p = &ctx.params;
    let filters = filters::parse_filters(p)?;
    let page = paging::parse_page(p, 5, 1000)?;
    let ids = p.list("SecurityGroupRuleId")?;
    ctx.dry_run()?;
    let groups = ctx.clc.store.security_groups(&ctx.account).await?;
    let mut seq = 0;
    let mut views = Vec::new();
    for group in &groups {
        for rule in &group.rules {
            views.push(RuleView { seq, rule, group });
            seq += 1;
        }
    }
    if let Some(first) = views.first() {
        filters::validate(&filters, first)?;
    } else {
        for f in &filters {
            if !matches!(f.name.as_str(), "group-id" | "security-group-rule-id")
                && filters::tag_values(&[], &f.name).is_none()
            {
                return Err(ApiError::invalid(format!(
                    "The filter '{}' is invalid",
                    f.name
                )));
            }
        }
    }
    for id in &ids {
        if !views.iter().any(|v| v.rule.rule_id.as_str() == id) {
            return Err(ApiError::new(
                400,
                "InvalidSecurityGroupRuleId.NotFound",
                format!("The security group rule ID '{id}' does not exist"),
            ));
        }
    }
    let matching: Vec<RuleView<'_>> = views
        .into_iter()
        .filter(|v| ids.is_empty() || ids.iter().any(|i| i == v.rule.rule_id.as_str()))
        .filter(|v| filters::matches(v, &filters))
        .collect();
    let (items, next) = paginate(matching, page, |v| v.seq);
    let mut w = XmlWriter::response("DescribeSecurityGroupRules", &ctx.request_id);
    w.list("securityGroupRuleSet", &items, |w, v| {
        rule(w, v.rule, &v.group.account_id)
    });
    w.opt_elem("nextToken", next.as_ref());
    Ok(w.finish())
}
