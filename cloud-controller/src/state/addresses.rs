//! Applying the Elastic IP commands, and reading addresses back.

use canopy_common::{AccountId, AllocationId, AssociationId, InstanceId};
use sqlx::SqliteConnection;

use super::StateError;
use super::command::Outcome;
use super::query::{fmt_time, json_list, parse_time, tags_for};
use super::types::{Address, Tag};

pub(super) async fn allocate(
    conn: &mut SqliteConnection,
    address: &Address,
    tags: &[Tag],
) -> Result<Outcome, StateError> {
    let done = sqlx::query(
        "INSERT INTO addresses(allocation_id, public_ip, account_id, allocated_at)
         VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
    )
    .bind(address.allocation_id.as_str())
    .bind(address.public_ip.to_string())
    .bind(address.account_id.as_str())
    .bind(fmt_time(address.allocated_at))
    .execute(&mut *conn)
    .await?;
    if done.rows_affected() == 0 {
        return Err(StateError::AddressTaken(address.public_ip.to_string()));
    }
    let id = canopy_common::ResourceId::ElasticIp(address.allocation_id.clone());
    super::apply::tag_resource(conn, &id, address.account_id.as_str(), tags).await?;
    Ok(Outcome::Done)
}

/// Associates the account's address with its instance. An instance has one Elastic IP:
/// associating another replaces it. An address associated elsewhere moves only when
/// `allow_reassociation` (EC2's rule).
pub(super) async fn associate(
    conn: &mut SqliteConnection,
    account: &AccountId,
    allocation_id: &AllocationId,
    instance_id: &InstanceId,
    association_id: &AssociationId,
    allow_reassociation: bool,
) -> Result<Outcome, StateError> {
    let address = require(conn, account, allocation_id).await?;
    let found =
        super::query::require_instances(conn, account, std::slice::from_ref(instance_id)).await?;
    let inst = &found[instance_id];
    if matches!(
        inst.state,
        canopy_common::InstanceState::Terminated | canopy_common::InstanceState::ShuttingDown
    ) {
        return Err(StateError::IncorrectInstanceState {
            id: instance_id.clone(),
            state: inst.state,
        });
    }
    if address
        .instance_id
        .as_ref()
        .is_some_and(|i| i != instance_id)
        && !allow_reassociation
    {
        return Err(StateError::AddressAlreadyAssociated(
            address.public_ip.to_string(),
        ));
    }
    // Plain `?` in order: see the note in `bulk` on numbered parameters.
    sqlx::query(
        "UPDATE addresses SET instance_id = NULL, association_id = NULL
           WHERE instance_id = ? AND allocation_id != ?;
         UPDATE addresses SET instance_id = ?, association_id = ? WHERE allocation_id = ?;",
    )
    .bind(instance_id.as_str())
    .bind(allocation_id.as_str())
    .bind(instance_id.as_str())
    .bind(association_id.as_str())
    .bind(allocation_id.as_str())
    .execute(&mut *conn)
    .await?;
    bump_zone_of(conn, std::slice::from_ref(instance_id)).await?;
    if let Some(previous) = address.instance_id.filter(|i| i != instance_id) {
        bump_zone_of(conn, &[previous]).await?;
    }
    Ok(Outcome::Done)
}

pub(super) async fn disassociate(
    conn: &mut SqliteConnection,
    account: &AccountId,
    association_id: &AssociationId,
) -> Result<Outcome, StateError> {
    let row: Option<(Option<String>,)> = sqlx::query_as(
        "SELECT instance_id FROM addresses WHERE account_id = ? AND association_id = ?",
    )
    .bind(account.as_str())
    .bind(association_id.as_str())
    .fetch_optional(&mut *conn)
    .await?;
    let Some((instance,)) = row else {
        return Err(StateError::AssociationNotFound(association_id.to_string()));
    };
    sqlx::query(
        "UPDATE addresses SET instance_id = NULL, association_id = NULL WHERE association_id = ?",
    )
    .bind(association_id.as_str())
    .execute(&mut *conn)
    .await?;
    if let Some(instance) = instance.and_then(|i| i.parse().ok()) {
        bump_zone_of(conn, &[instance]).await?;
    }
    Ok(Outcome::Done)
}

pub(super) async fn release(
    conn: &mut SqliteConnection,
    account: &AccountId,
    allocation_id: &AllocationId,
) -> Result<Outcome, StateError> {
    let address = require(conn, account, allocation_id).await?;
    if address.instance_id.is_some() {
        return Err(StateError::AddressInUse(address.public_ip.to_string()));
    }
    // Plain `?` in order: see the note in `bulk` on numbered parameters.
    sqlx::query(
        "DELETE FROM tags WHERE resource_id = ?;
         DELETE FROM addresses WHERE allocation_id = ?;",
    )
    .bind(allocation_id.as_str())
    .bind(allocation_id.as_str())
    .execute(&mut *conn)
    .await?;
    Ok(Outcome::Done)
}

/// Terminated instances lose their Elastic IPs (the addresses stay allocated).
pub(super) async fn release_from(
    conn: &mut SqliteConnection,
    instances: &[InstanceId],
) -> Result<(), StateError> {
    let ids = serde_json::to_string(instances).map_err(|e| StateError::Corrupt(e.to_string()))?;
    sqlx::query(
        "UPDATE addresses SET instance_id = NULL, association_id = NULL
         WHERE instance_id IN (SELECT value FROM json_each(?))",
    )
    .bind(ids)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The instances' zones' desired state now shows another public address.
async fn bump_zone_of(
    conn: &mut SqliteConnection,
    instances: &[InstanceId],
) -> Result<(), StateError> {
    let ids = serde_json::to_string(instances).map_err(|e| StateError::Corrupt(e.to_string()))?;
    sqlx::query(
        "UPDATE zones SET generation = generation + 1
         WHERE zone IN (SELECT zone FROM instances WHERE instance_id IN (SELECT value FROM json_each(?)))",
    )
    .bind(ids)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn require(
    conn: &mut SqliteConnection,
    account: &AccountId,
    allocation_id: &AllocationId,
) -> Result<Address, StateError> {
    load(conn, account)
        .await?
        .into_iter()
        .find(|a| &a.allocation_id == allocation_id)
        .ok_or_else(|| StateError::AllocationNotFound(allocation_id.to_string()))
}

/// The account's addresses with their tags, by public address.
pub(super) async fn load(
    conn: &mut SqliteConnection,
    account: &AccountId,
) -> Result<Vec<Address>, StateError> {
    type Row = (String, String, Option<String>, Option<String>, String);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT allocation_id, public_ip, instance_id, association_id, allocated_at
         FROM addresses WHERE account_id = ?",
    )
    .bind(account.as_str())
    .fetch_all(&mut *conn)
    .await?;
    let ids = json_list(rows.iter().map(|r| r.0.as_str()))?;
    let mut tags = tags_for(conn, Some(account), Some(&ids)).await?;
    let corrupt = |e: String| StateError::Corrupt(e);
    let mut out = rows
        .into_iter()
        .map(|(allocation, ip, instance, association, at)| {
            Ok(Address {
                tags: tags.remove(&allocation).unwrap_or_default(),
                allocation_id: allocation
                    .parse()
                    .map_err(|e: canopy_common::IdError| corrupt(e.to_string()))?,
                public_ip: ip.parse().map_err(|_| corrupt(format!("address {ip:?}")))?,
                account_id: account.clone(),
                instance_id: instance
                    .map(|i| i.parse())
                    .transpose()
                    .map_err(|e: canopy_common::IdError| corrupt(e.to_string()))?,
                association_id: association
                    .map(|a| a.parse())
                    .transpose()
                    .map_err(|e: canopy_common::IdError| corrupt(e.to_string()))?,
                allocated_at: parse_time(&at)?,
            })
        })
        .collect::<Result<Vec<_>, StateError>>()?;
    out.sort_by_key(|a| a.public_ip);
    Ok(out)
}

impl super::Store {
    /// The account's Elastic IPs.
    pub async fn addresses(&self, account: &AccountId) -> Result<Vec<Address>, StateError> {
        let mut conn = self.pool().acquire().await?;
        load(&mut conn, account).await
    }

    /// Every allocated public address (of every account): what the pool has left.
    pub async fn allocated_public_ips(&self) -> Result<Vec<std::net::Ipv4Addr>, StateError> {
        let rows: Vec<(String,)> = sqlx::query_as("SELECT public_ip FROM addresses")
            .fetch_all(self.pool())
            .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(ip,)| ip.parse().ok())
            .collect())
    }
}
