//! Applying the security-group commands, and reading groups back.

use std::collections::{HashMap, HashSet};

use canopy_common::{AccountId, ResourceId, SecurityGroupId, SecurityGroupRuleId};
use sqlx::SqliteConnection;

use super::StateError;
use super::apply::tag_resource;
use super::command::Outcome;
use super::query::{fmt_time, json_list, parse_time, tags_for};
use super::types::{
    DEFAULT_SECURITY_GROUP, RulePeer, RuleSpec, SecurityGroup, SecurityGroupRule, Tag,
};

/// EC2's default limit of rules per group, for each direction.
pub const MAX_RULES_PER_DIRECTION: usize = 60;

/// Makes `account`'s default group with EC2's default rules, exactly as migration 0006
/// made it for the accounts that existed then.
pub(super) async fn create_default_group(
    conn: &mut SqliteConnection,
    account: &AccountId,
) -> Result<(), StateError> {
    sqlx::query(
        "INSERT INTO security_groups(group_id, account_id, group_name, description, created_at)
         SELECT printf('sg-%017x', CAST(account_id AS INTEGER)), account_id, 'default',
                'default VPC security group', created_at
         FROM accounts WHERE account_id = ?;
         INSERT INTO security_group_rules(rule_id, group_id, account_id, is_egress, protocol,
                                          cidr_ipv4, referenced_group_id)
         SELECT printf('sgr-%017x', CAST(account_id AS INTEGER) * 2),
                printf('sg-%017x', CAST(account_id AS INTEGER)), account_id, 0, '-1', NULL,
                printf('sg-%017x', CAST(account_id AS INTEGER))
         FROM accounts WHERE account_id = ?
         UNION ALL
         SELECT printf('sgr-%017x', CAST(account_id AS INTEGER) * 2 + 1),
                printf('sg-%017x', CAST(account_id AS INTEGER)), account_id, 1, '-1',
                '0.0.0.0/0', NULL
         FROM accounts WHERE account_id = ?;",
    )
    .bind(account.as_str())
    .bind(account.as_str())
    .bind(account.as_str())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

pub(super) async fn create(
    conn: &mut SqliteConnection,
    group: &SecurityGroup,
    tags: &[Tag],
) -> Result<Outcome, StateError> {
    let done = sqlx::query(
        "INSERT INTO security_groups(group_id, account_id, group_name, description, created_at)
         VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
    )
    .bind(group.group_id.as_str())
    .bind(group.account_id.as_str())
    .bind(&group.group_name)
    .bind(&group.description)
    .bind(fmt_time(group.created_at))
    .execute(&mut *conn)
    .await?;
    if done.rows_affected() == 0 {
        return Err(StateError::SecurityGroupDuplicate(group.group_name.clone()));
    }
    insert_rules(conn, &group.account_id, &group.rules).await?;
    let id = ResourceId::SecurityGroup(group.group_id.clone());
    tag_resource(conn, &id, group.account_id.as_str(), tags).await?;
    Ok(Outcome::Done)
}

pub(super) async fn delete(
    conn: &mut SqliteConnection,
    account: &AccountId,
    group_id: &SecurityGroupId,
) -> Result<Outcome, StateError> {
    let group = require_group(conn, account, group_id).await?;
    if group.group_name == DEFAULT_SECURITY_GROUP {
        return Err(StateError::CannotDelete(format!(
            "the default security group {group_id} cannot be deleted"
        )));
    }
    let in_use: Option<(String,)> = sqlx::query_as(
        "SELECT i.instance_id FROM instance_security_groups g
         JOIN instances i ON i.instance_id = g.instance_id
         WHERE g.group_id = ? AND i.state != 'terminated' LIMIT 1",
    )
    .bind(group_id.as_str())
    .fetch_optional(&mut *conn)
    .await?;
    if let Some((instance,)) = in_use {
        return Err(StateError::DependencyViolation(format!(
            "resource {group_id} has a dependent object (instance {instance})"
        )));
    }
    let referenced: Option<(String,)> = sqlx::query_as(
        "SELECT group_id FROM security_group_rules WHERE referenced_group_id = ? AND group_id != ? LIMIT 1",
    )
    .bind(group_id.as_str())
    .bind(group_id.as_str())
    .fetch_optional(&mut *conn)
    .await?;
    if let Some((other,)) = referenced {
        return Err(StateError::DependencyViolation(format!(
            "resource {group_id} has a dependent object (a rule of {other} refers to it)"
        )));
    }
    // Plain `?` in order: see the note in `bulk` on numbered parameters.
    sqlx::query(
        "DELETE FROM security_group_rules WHERE group_id = ?;
         DELETE FROM tags WHERE resource_id = ?;
         DELETE FROM security_groups WHERE group_id = ?;",
    )
    .bind(group_id.as_str())
    .bind(group_id.as_str())
    .bind(group_id.as_str())
    .execute(&mut *conn)
    .await?;
    Ok(Outcome::Done)
}

pub(super) async fn authorize(
    conn: &mut SqliteConnection,
    account: &AccountId,
    group_id: &SecurityGroupId,
    rules: &[SecurityGroupRule],
) -> Result<Outcome, StateError> {
    let group = require_group(conn, account, group_id).await?;
    let mut have: HashSet<&RuleSpec> = group.rules.iter().map(|r| &r.spec).collect();
    for rule in rules {
        if !have.insert(&rule.spec) {
            return Err(StateError::RuleDuplicate(describe(&rule.spec)));
        }
        if let RulePeer::Group(peer) = &rule.spec.peer
            && peer != group_id
        {
            require_group(conn, account, peer).await?;
        }
    }
    for egress in [false, true] {
        if have.iter().filter(|s| s.is_egress == egress).count() > MAX_RULES_PER_DIRECTION {
            return Err(StateError::RulesLimitExceeded);
        }
    }
    insert_rules(conn, account, rules).await?;
    Ok(Outcome::Done)
}

pub(super) async fn revoke(
    conn: &mut SqliteConnection,
    account: &AccountId,
    group_id: &SecurityGroupId,
    specs: &[RuleSpec],
    rule_ids: &[SecurityGroupRuleId],
) -> Result<Outcome, StateError> {
    let group = require_group(conn, account, group_id).await?;
    let mut revoked = Vec::new();
    for id in rule_ids {
        if !group.rules.iter().any(|r| &r.rule_id == id) {
            return Err(StateError::RuleNotFound(id.to_string()));
        }
        revoked.push(id.clone());
    }
    let mut unknown = Vec::new();
    for spec in specs {
        match group.rules.iter().find(|r| &r.spec == spec) {
            Some(rule) => revoked.push(rule.rule_id.clone()),
            None => unknown.push(spec.clone()),
        }
    }
    revoked.dedup();
    let ids = serde_json::to_string(&revoked).map_err(|e| StateError::Corrupt(e.to_string()))?;
    sqlx::query(
        "DELETE FROM security_group_rules WHERE group_id = ? AND rule_id IN (SELECT value FROM json_each(?))",
    )
    .bind(group_id.as_str())
    .bind(ids)
    .execute(&mut *conn)
    .await?;
    Ok(Outcome::Revoked { revoked, unknown })
}

/// A rule as an error message names it.
fn describe(spec: &RuleSpec) -> String {
    let peer = match &spec.peer {
        RulePeer::Ipv4(c) | RulePeer::Ipv6(c) => c.clone(),
        RulePeer::Group(g) => g.to_string(),
    };
    let ports = match (spec.from_port, spec.to_port) {
        (Some(f), Some(t)) => format!(" {f}-{t}"),
        _ => String::new(),
    };
    format!(
        "{} {}{ports} {} {peer}",
        if spec.is_egress { "egress" } else { "ingress" },
        spec.protocol,
        if spec.is_egress { "to" } else { "from" },
    )
}

async fn insert_rules(
    conn: &mut SqliteConnection,
    account: &AccountId,
    rules: &[SecurityGroupRule],
) -> Result<(), StateError> {
    for rule in rules {
        let (v4, v6, group) = match &rule.spec.peer {
            RulePeer::Ipv4(c) => (Some(c.as_str()), None, None),
            RulePeer::Ipv6(c) => (None, Some(c.as_str()), None),
            RulePeer::Group(g) => (None, None, Some(g.as_str())),
        };
        sqlx::query(
            "INSERT INTO security_group_rules(rule_id, group_id, account_id, is_egress, protocol,
                from_port, to_port, cidr_ipv4, cidr_ipv6, referenced_group_id, description)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(rule.rule_id.as_str())
        .bind(rule.group_id.as_str())
        .bind(account.as_str())
        .bind(rule.spec.is_egress)
        .bind(&rule.spec.protocol)
        .bind(rule.spec.from_port)
        .bind(rule.spec.to_port)
        .bind(v4)
        .bind(v6)
        .bind(group)
        .bind(&rule.description)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// The account's group `id` with its rules, or `SecurityGroupNotFound`.
pub(super) async fn require_group(
    conn: &mut SqliteConnection,
    account: &AccountId,
    id: &SecurityGroupId,
) -> Result<SecurityGroup, StateError> {
    load(conn, account, Some(id))
        .await?
        .pop()
        .ok_or_else(|| StateError::SecurityGroupNotFound(id.to_string()))
}

/// The account's groups (or only `only`), with rules and tags, by name.
pub(super) async fn load(
    conn: &mut SqliteConnection,
    account: &AccountId,
    only: Option<&SecurityGroupId>,
) -> Result<Vec<SecurityGroup>, StateError> {
    let only = only.map(|g| g.as_str());
    let groups: Vec<(String, String, String, String)> = sqlx::query_as(
        "SELECT group_id, group_name, description, created_at FROM security_groups
         WHERE account_id = ? AND (? IS NULL OR group_id = ?) ORDER BY group_name",
    )
    .bind(account.as_str())
    .bind(only)
    .bind(only)
    .fetch_all(&mut *conn)
    .await?;
    type RuleRow = (
        String,
        String,
        bool,
        String,
        Option<i32>,
        Option<i32>,
        Option<String>,
        Option<String>,
        Option<String>,
        String,
    );
    let rules: Vec<RuleRow> = sqlx::query_as(
        "SELECT rule_id, group_id, is_egress, protocol, from_port, to_port, cidr_ipv4, cidr_ipv6,
                referenced_group_id, description
         FROM security_group_rules WHERE account_id = ? AND (? IS NULL OR group_id = ?)
         ORDER BY rule_id",
    )
    .bind(account.as_str())
    .bind(only)
    .bind(only)
    .fetch_all(&mut *conn)
    .await?;
    let ids = json_list(groups.iter().map(|g| g.0.as_str()))?;
    let mut tags_of = tags_for(conn, Some(account), Some(&ids)).await?;
    let corrupt = |e: canopy_common::IdError| StateError::Corrupt(e.to_string());
    let mut rules_of: HashMap<String, Vec<SecurityGroupRule>> = HashMap::new();
    for (rule_id, group_id, is_egress, protocol, from_port, to_port, v4, v6, peer, description) in
        rules
    {
        let peer = match (v4, v6, peer) {
            (Some(c), _, _) => RulePeer::Ipv4(c),
            (_, Some(c), _) => RulePeer::Ipv6(c),
            (_, _, Some(g)) => RulePeer::Group(SecurityGroupId::parse(&g).map_err(corrupt)?),
            _ => return Err(StateError::Corrupt(format!("rule {rule_id} has no peer"))),
        };
        rules_of
            .entry(group_id.clone())
            .or_default()
            .push(SecurityGroupRule {
                rule_id: SecurityGroupRuleId::parse(&rule_id).map_err(corrupt)?,
                group_id: SecurityGroupId::parse(&group_id).map_err(corrupt)?,
                spec: RuleSpec {
                    is_egress,
                    protocol,
                    from_port,
                    to_port,
                    peer,
                },
                description,
            });
    }
    groups
        .into_iter()
        .map(|(group_id, group_name, description, created_at)| {
            Ok(SecurityGroup {
                rules: rules_of.remove(&group_id).unwrap_or_default(),
                tags: tags_of.remove(&group_id).unwrap_or_default(),
                group_id: SecurityGroupId::parse(&group_id).map_err(corrupt)?,
                account_id: account.clone(),
                group_name,
                description,
                created_at: parse_time(&created_at)?,
            })
        })
        .collect()
}

impl super::Store {
    /// The account's security groups with their rules and tags, by name.
    pub async fn security_groups(
        &self,
        account: &AccountId,
    ) -> Result<Vec<SecurityGroup>, StateError> {
        let mut conn = self.pool().acquire().await?;
        load(&mut conn, account, None).await
    }

    /// (id, name) of the account's groups among `ids` and `names`, in one statement.
    pub async fn security_group_names(
        &self,
        account: &AccountId,
        ids: &[SecurityGroupId],
        names: &[String],
    ) -> Result<Vec<(SecurityGroupId, String)>, StateError> {
        let ids = serde_json::to_string(ids).map_err(|e| StateError::Corrupt(e.to_string()))?;
        let names = serde_json::to_string(names).map_err(|e| StateError::Corrupt(e.to_string()))?;
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT group_id, group_name FROM security_groups WHERE account_id = ?
               AND (group_id IN (SELECT value FROM json_each(?))
                    OR group_name IN (SELECT value FROM json_each(?)))",
        )
        .bind(account.as_str())
        .bind(ids)
        .bind(names)
        .fetch_all(self.pool())
        .await?;
        rows.into_iter()
            .map(|(id, name)| {
                Ok((
                    SecurityGroupId::parse(&id).map_err(|e| StateError::Corrupt(e.to_string()))?,
                    name,
                ))
            })
            .collect()
    }
}
