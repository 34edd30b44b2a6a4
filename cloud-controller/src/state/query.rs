//! Read queries. Rows are converted to domain types here and nowhere else.

use std::collections::HashMap;

use canopy_common::{
    AccountId, BootImages, HttpTokens, ImageKind, ImageRef, InstanceId, InstanceMetadata,
    InstanceState, PowerState, ReservationId, Resources, Sha256Digest, ZoneName,
};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::de::DeserializeOwned;
use sqlx::SqliteConnection;

use super::types::{
    Account, DesiredSpec, Image, Instance, KeyPair, RootSnapshot, StateReason, Tag, Whereabouts,
    Zone,
};
use super::{StateError, Store};
use crate::key_material::KeyType;

pub(crate) fn fmt_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

pub(super) fn parse_time(s: &str) -> Result<DateTime<Utc>, StateError> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| StateError::Corrupt(format!("timestamp {s:?}: {e}")))
}

fn parse<T: std::str::FromStr>(s: &str) -> Result<T, StateError>
where
    T::Err: std::fmt::Display,
{
    s.parse()
        .map_err(|e: T::Err| StateError::Corrupt(e.to_string()))
}

/// Which instances a listing returns.
#[derive(Debug, Clone, Default)]
pub struct InstanceFilter {
    pub account_id: Option<AccountId>,
    pub zone: Option<ZoneName>,
    pub reservation_id: Option<ReservationId>,
}

/// An instance as [`INSTANCE_COLUMNS`] reads it, fields in that order.
#[derive(serde::Deserialize)]
struct InstanceRow {
    seq: i64,
    instance_id: String,
    reservation_id: String,
    account_id: String,
    launch_index: i64,
    image_id: String,
    instance_type: String,
    vcpus: i64,
    memory_mib: i64,
    disk_gib: i64,
    zone: String,
    node_id: Option<String>,
    key_name: Option<String>,
    #[serde(deserialize_with = "hex_blob")]
    user_data: Option<Vec<u8>>,
    client_token: Option<String>,
    state: String,
    desired: String,
    reboot_seq: i64,
    start_seq: i64,
    state_reason_code: Option<String>,
    state_reason_message: Option<String>,
    transition_reason: String,
    launch_time: String,
    state_changed_at: String,
    terminated_at: Option<String>,
    kernel_id: Option<String>,
    ramdisk_id: Option<String>,
    public_key: Option<String>,
    disable_api_termination: bool,
    disable_api_stop: bool,
    security_groups: Vec<(String, String)>,
    private_ip: Option<String>,
    metadata_http_tokens: String,
    metadata_http_endpoint: String,
    public_ip: Option<String>,
    /// (volume, device, attach status, attach time, delete on termination 0/1).
    volumes: Vec<(String, String, String, String, i64)>,
}

impl InstanceRow {
    fn into_instance(self, tags: Vec<Tag>) -> Result<Instance, StateError> {
        let state = InstanceState::from_name(&self.state)
            .ok_or_else(|| StateError::Corrupt(format!("instance state {:?}", self.state)))?;
        let desired = PowerState::from_name(&self.desired)
            .ok_or_else(|| StateError::Corrupt(format!("desired state {:?}", self.desired)))?;
        Ok(Instance {
            seq: self.seq,
            instance_id: parse(&self.instance_id)?,
            reservation_id: parse(&self.reservation_id)?,
            account_id: AccountId::parse(&self.account_id)
                .map_err(|e| StateError::Corrupt(e.to_string()))?,
            launch_index: u32::try_from(self.launch_index).unwrap_or_default(),
            image_id: parse(&self.image_id)?,
            instance_type: self.instance_type,
            resources: Resources::new(
                u32::try_from(self.vcpus).unwrap_or_default(),
                u64::try_from(self.memory_mib).unwrap_or_default(),
                u64::try_from(self.disk_gib).unwrap_or_default(),
            ),
            zone: parse(&self.zone)?,
            node_id: self.node_id.as_deref().map(parse).transpose()?,
            key_name: self.key_name,
            public_key: self.public_key,
            user_data: self.user_data,
            client_token: self.client_token,
            state,
            desired,
            reboot_seq: u64::try_from(self.reboot_seq).unwrap_or_default(),
            start_seq: u64::try_from(self.start_seq).unwrap_or_default(),
            state_reason: match (self.state_reason_code, self.state_reason_message) {
                (Some(code), Some(message)) => Some(StateReason { code, message }),
                _ => None,
            },
            transition_reason: self.transition_reason,
            launch_time: parse_time(&self.launch_time)?,
            state_changed_at: parse_time(&self.state_changed_at)?,
            terminated_at: self.terminated_at.as_deref().map(parse_time).transpose()?,
            tags,
            kernel_id: self.kernel_id.as_deref().map(parse).transpose()?,
            ramdisk_id: self.ramdisk_id.as_deref().map(parse).transpose()?,
            disable_api_termination: self.disable_api_termination,
            disable_api_stop: self.disable_api_stop,
            private_ip: self.private_ip.as_deref().map(parse).transpose()?,
            public_ip: self.public_ip.as_deref().map(parse).transpose()?,
            volumes: self
                .volumes
                .into_iter()
                .map(|(id, device, status, at, dot)| {
                    Ok(super::types::InstanceVolume {
                        volume_id: parse(&id)?,
                        device,
                        status: super::types::AttachStatus::from_name(&status).ok_or_else(
                            || StateError::Corrupt(format!("attach status {status:?}")),
                        )?,
                        attach_time: parse_time(&at)?,
                        delete_on_termination: dot != 0,
                    })
                })
                .collect::<Result<_, StateError>>()?,
            metadata_options: super::types::MetadataOptions {
                tokens_required: self.metadata_http_tokens == "required",
                endpoint_disabled: self.metadata_http_endpoint == "disabled",
            },
            security_groups: self
                .security_groups
                .into_iter()
                .map(|(id, name)| Ok((parse(&id)?, name)))
                .collect::<Result<_, StateError>>()?,
        })
    }
}

/// The columns of an [`InstanceRow`], as [`fetch_folded`] expressions.
const INSTANCE_COLUMNS: &str = "seq, instance_id, reservation_id, account_id, launch_index, image_id, instance_type, \
     vcpus, memory_mib, disk_gib, zone, node_id, key_name, iif(user_data IS NULL, NULL, hex(user_data)), \
     client_token, state, desired, reboot_seq, start_seq, state_reason_code, state_reason_message, transition_reason, \
     launch_time, state_changed_at, terminated_at, kernel_id, ramdisk_id, public_key, \
     json(iif(disable_api_termination, 'true', 'false')), json(iif(disable_api_stop, 'true', 'false')), \
     json((SELECT json_group_array(json_array(g.group_id, coalesce(s.group_name, '')) ORDER BY g.position) \
           FROM instance_security_groups g LEFT JOIN security_groups s ON s.group_id = g.group_id \
           WHERE g.instance_id = folded.instance_id)), private_ip, metadata_http_tokens, \
     metadata_http_endpoint, \
     (SELECT a.public_ip FROM addresses a WHERE a.instance_id = folded.instance_id), \
     json((SELECT json_group_array(json_array(v.volume_id, v.device, v.attach_status, v.attach_time, \
           v.delete_on_termination) ORDER BY v.attach_time, v.volume_id) \
           FROM volumes v WHERE v.instance_id = folded.instance_id))";

/// Strings as a JSON array, for `json_each(?)`.
pub(super) fn json_list<'a>(items: impl Iterator<Item = &'a str>) -> Result<String, StateError> {
    serde_json::to_string(&items.collect::<Vec<_>>())
        .map_err(|e| StateError::Corrupt(e.to_string()))
}

/// A BLOB column read as `hex(...)` by [`fetch_folded`].
fn hex_blob<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
    let hex: Option<String> = serde::Deserialize::deserialize(d)?;
    hex.map(|h| hex::decode(h).map_err(serde::de::Error::custom))
        .transpose()
}

/// Runs `SELECT {columns} {rest}` and returns its rows as `T`s (structs or tuples whose
/// fields follow `columns`; BLOBs must be selected as `hex(...)`).
///
/// SQLite folds the rows into one JSON array of arrays, which serde then reads. sqlx hands
/// every row over from the connection's thread on its own, with a copy of each value, and
/// under load that costs tens of microseconds a row; one row of JSON costs a fraction of
/// it. The order of `rest`'s `ORDER BY` is kept: the rows are folded in the order the
/// subquery yields them.
async fn fetch_folded<T: DeserializeOwned>(
    conn: &mut SqliteConnection,
    columns: &str,
    rest: &str,
    args: &[&str],
) -> Result<Vec<T>, StateError> {
    // `folded` names the row for correlated subqueries among the columns.
    let sql =
        format!("SELECT json_group_array(json_array({columns})) FROM (SELECT * {rest}) AS folded");
    let mut query = sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(sql));
    for arg in args {
        query = query.bind(*arg);
    }
    let json = query.fetch_one(&mut *conn).await?;
    serde_json::from_str(&json).map_err(|e| StateError::Corrupt(format!("folded rows: {e}")))
}

/// Tags by resource id: of one account, or of every account (`None`), and, when `ids` is
/// given as a JSON array, of those resources only.
pub(super) async fn tags_for(
    conn: &mut SqliteConnection,
    account: Option<&AccountId>,
    ids_json: Option<&str>,
) -> Result<HashMap<String, Vec<Tag>>, StateError> {
    // Only the conditions that apply, so SQLite can use the index each one has (an
    // `?1 IS NULL OR …` condition would make it scan the table).
    let mut sql = String::from("SELECT resource_id, key, value FROM tags WHERE 1");
    let mut args = Vec::new();
    if let Some(account) = account {
        sql.push_str(" AND account_id = ?");
        args.push(account.as_str());
    }
    if let Some(ids) = ids_json {
        sql.push_str(" AND resource_id IN (SELECT value FROM json_each(?))");
        args.push(ids);
    }
    sql.push_str(" ORDER BY resource_id, key");
    let mut query = sqlx::query_as(sqlx::AssertSqlSafe(sql));
    for arg in args {
        query = query.bind(arg);
    }
    let rows: Vec<(String, String, String)> = query.fetch_all(&mut *conn).await?;
    let mut out: HashMap<String, Vec<Tag>> = HashMap::new();
    for (rid, key, value) in rows {
        out.entry(rid).or_default().push(Tag { key, value });
    }
    Ok(out)
}

fn rows_to_instances(
    rows: Vec<InstanceRow>,
    mut tags: HashMap<String, Vec<Tag>>,
) -> Result<Vec<Instance>, StateError> {
    rows.into_iter()
        .map(|r| {
            let t = tags.remove(&r.instance_id).unwrap_or_default();
            r.into_instance(t)
        })
        .collect()
}

/// What a state change reads and writes of an instance: its lifecycle columns, without
/// the joins a whole [`Instance`] takes (groups, volumes, address). Applying a node's
/// report reads one of these per reported instance, on every replica.
#[derive(Debug, Clone)]
pub(crate) struct Lifecycle {
    pub instance_id: InstanceId,
    pub zone: ZoneName,
    pub node_id: Option<canopy_common::NodeId>,
    pub private_ip: Option<std::net::Ipv4Addr>,
    pub state: InstanceState,
    pub desired: PowerState,
    pub reboot_seq: u64,
    pub start_seq: u64,
    pub state_reason: Option<StateReason>,
    pub transition_reason: String,
    pub state_changed_at: DateTime<Utc>,
    pub terminated_at: Option<DateTime<Utc>>,
}

impl Lifecycle {
    /// The lifecycle columns of an instance already read whole.
    pub(crate) fn of(inst: &Instance) -> Lifecycle {
        Lifecycle {
            instance_id: inst.instance_id.clone(),
            zone: inst.zone.clone(),
            node_id: inst.node_id.clone(),
            private_ip: inst.private_ip,
            state: inst.state,
            desired: inst.desired,
            reboot_seq: inst.reboot_seq,
            start_seq: inst.start_seq,
            state_reason: inst.state_reason.clone(),
            transition_reason: inst.transition_reason.clone(),
            state_changed_at: inst.state_changed_at,
            terminated_at: inst.terminated_at,
        }
    }
}

/// The [`Lifecycle`]s of the instances named by `ids` (of any account), keyed by id.
/// Unknown ids are absent.
pub(crate) async fn load_lifecycles(
    conn: &mut SqliteConnection,
    ids: &[InstanceId],
) -> Result<HashMap<InstanceId, Lifecycle>, StateError> {
    type Row = (
        String,
        String,
        Option<String>,
        Option<String>,
        String,
        String,
        i64,
        i64,
        Option<String>,
        Option<String>,
        String,
        String,
        Option<String>,
    );
    let ids_json = json_list(ids.iter().map(InstanceId::as_str))?;
    let rows: Vec<Row> = fetch_folded(
        conn,
        "instance_id, zone, node_id, private_ip, state, desired, reboot_seq, start_seq, \
         state_reason_code, state_reason_message, transition_reason, state_changed_at, terminated_at",
        "FROM instances WHERE instance_id IN (SELECT value FROM json_each(?))",
        &[&ids_json],
    )
    .await?;
    rows.into_iter()
        .map(
            |(
                id,
                zone,
                node,
                ip,
                state,
                desired,
                reboot,
                start,
                code,
                message,
                why,
                changed,
                ended,
            )| {
                let lifecycle = Lifecycle {
                    instance_id: parse(&id)?,
                    zone: parse(&zone)?,
                    node_id: node.as_deref().map(parse).transpose()?,
                    private_ip: ip.as_deref().map(parse).transpose()?,
                    state: InstanceState::from_name(&state)
                        .ok_or_else(|| StateError::Corrupt(format!("instance state {state:?}")))?,
                    desired: PowerState::from_name(&desired)
                        .ok_or_else(|| StateError::Corrupt(format!("desired state {desired:?}")))?,
                    reboot_seq: u64::try_from(reboot).unwrap_or_default(),
                    start_seq: u64::try_from(start).unwrap_or_default(),
                    state_reason: match (code, message) {
                        (Some(code), Some(message)) => Some(StateReason { code, message }),
                        _ => None,
                    },
                    transition_reason: why,
                    state_changed_at: parse_time(&changed)?,
                    terminated_at: ended.as_deref().map(parse_time).transpose()?,
                };
                Ok((lifecycle.instance_id.clone(), lifecycle))
            },
        )
        .collect()
}

/// Instances by id (optionally only the account's), keyed by id. Unknown ids are absent.
pub(crate) async fn load_instances_by_id(
    conn: &mut SqliteConnection,
    account: Option<&AccountId>,
    ids: &[InstanceId],
    with_tags: bool,
) -> Result<HashMap<InstanceId, Instance>, StateError> {
    let ids_json = json_list(ids.iter().map(InstanceId::as_str))?;
    let rows: Vec<InstanceRow> = match account {
        Some(account) => {
            fetch_folded(
                conn,
                INSTANCE_COLUMNS,
                "FROM instances WHERE instance_id IN (SELECT value FROM json_each(?)) AND account_id = ?",
                &[&ids_json, account.as_str()],
            )
            .await?
        }
        None => {
            fetch_folded(
                conn,
                INSTANCE_COLUMNS,
                "FROM instances WHERE instance_id IN (SELECT value FROM json_each(?))",
                &[&ids_json],
            )
            .await?
        }
    };
    let tags = if with_tags {
        tags_for(conn, account, Some(&ids_json)).await?
    } else {
        HashMap::new()
    };
    Ok(rows_to_instances(rows, tags)?
        .into_iter()
        .map(|i| (i.instance_id.clone(), i))
        .collect())
}

/// The account's instances named by `ids` (without their tags), or `InstancesNotFound`
/// listing every id the account does not own.
pub(crate) async fn require_instances(
    conn: &mut SqliteConnection,
    account: &AccountId,
    ids: &[InstanceId],
) -> Result<HashMap<InstanceId, Instance>, StateError> {
    let found = load_instances_by_id(conn, Some(account), ids, false).await?;
    let missing: Vec<InstanceId> = ids
        .iter()
        .filter(|id| !found.contains_key(*id))
        .cloned()
        .collect();
    if missing.is_empty() {
        Ok(found)
    } else {
        Err(StateError::InstancesNotFound(missing))
    }
}

impl Store {
    /// The desired state of every instance of `zone` that is not terminated: only the
    /// columns a desired-state document carries, since it is read for every push.
    pub async fn desired_specs(&self, zone: &ZoneName) -> Result<Vec<DesiredSpec>, StateError> {
        /// The columns below, in order.
        #[derive(serde::Deserialize)]
        struct SpecRow {
            id: String,
            itype: String,
            vcpus: i64,
            mem: i64,
            disk: i64,
            image: String,
            #[serde(deserialize_with = "hex_blob")]
            user_data: Option<Vec<u8>>,
            key: Option<String>,
            desired: String,
            reboot: i64,
            start: i64,
            node: Option<String>,
            kernel: Option<String>,
            ramdisk: Option<String>,
            private_ip: Option<String>,
            account: String,
            reservation: String,
            launch_index: i64,
            public_key: Option<String>,
            launch_time: String,
            groups: Vec<String>,
            tokens_required: bool,
            metadata_disabled: bool,
            public_ip: Option<String>,
            #[allow(clippy::type_complexity)]
            volumes: Vec<(
                String,
                String,
                u64,
                i64,
                Option<String>,
                Option<String>,
                Option<u64>,
            )>,
        }
        // The images' content comes from the cached catalogue, not from a join per row: a
        // document is read many times a second under load.
        let catalog = self.catalog().await?;
        let content: HashMap<&str, ImageRef> = catalog
            .images
            .iter()
            .filter_map(|i| i.content().map(|c| (i.image_id.as_str(), c)))
            .collect();
        let lookup = |id: Option<&str>| id.and_then(|id| content.get(id).cloned());
        let mut conn = self.pool().acquire().await?;
        let rows: Vec<SpecRow> = fetch_folded(
            &mut conn,
            "instance_id, instance_type, vcpus, memory_mib, disk_gib, image_id,
             iif(user_data IS NULL, NULL, hex(user_data)), key_name, desired, reboot_seq, start_seq, node_id,
             kernel_id, ramdisk_id, private_ip, account_id, reservation_id, launch_index, public_key,
             launch_time,
             json((SELECT json_group_array(s.group_name ORDER BY g.position)
                   FROM instance_security_groups g JOIN security_groups s ON s.group_id = g.group_id
                   WHERE g.instance_id = folded.instance_id)),
             json(iif(metadata_http_tokens = 'required', 'true', 'false')),
             json(iif(metadata_http_endpoint = 'disabled', 'true', 'false')),
             (SELECT a.public_ip FROM addresses a WHERE a.instance_id = folded.instance_id),
             json((SELECT json_group_array(json_array(v.volume_id, v.device, v.size_gib, v.initialized,
                   v.snapshot_id, v.source_sha256, v.source_size))
                   FROM volumes v WHERE v.instance_id = folded.instance_id
                   AND v.attach_status IN ('attaching', 'attached')))",
            "FROM instances WHERE zone = ? AND state != 'terminated' ORDER BY seq",
            &[zone.as_str()],
        )
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(DesiredSpec {
                    instance_id: parse(&r.id)?,
                    instance_type: r.itype,
                    resources: Resources::new(
                        u32::try_from(r.vcpus).unwrap_or_default(),
                        u64::try_from(r.mem).unwrap_or_default(),
                        u64::try_from(r.disk).unwrap_or_default(),
                    ),
                    boot: BootImages {
                        disk: lookup(Some(&r.image)),
                        kernel: lookup(r.kernel.as_deref()),
                        ramdisk: lookup(r.ramdisk.as_deref()),
                    },
                    image_id: parse(&r.image)?,
                    user_data: r.user_data,
                    key_name: r.key,
                    desired: PowerState::from_name(&r.desired).ok_or_else(|| {
                        StateError::Corrupt(format!("desired state {:?}", r.desired))
                    })?,
                    reboot_seq: u64::try_from(r.reboot).unwrap_or_default(),
                    start_seq: u64::try_from(r.start).unwrap_or_default(),
                    private_ip: r.private_ip.as_deref().map(parse).transpose()?,
                    node_id: r.node.as_deref().map(parse).transpose()?,
                    volumes: r
                        .volumes
                        .into_iter()
                        .map(|(id, device, size_gib, initialized, snap, sha, size)| {
                            let source = match (snap, sha, size) {
                                (Some(snap), Some(sha), Some(size)) => {
                                    Some(canopy_common::SnapshotRef {
                                        snapshot_id: parse(&snap)?,
                                        sha256: Sha256Digest::parse(&sha)
                                            .map_err(|e| StateError::Corrupt(e.to_string()))?,
                                        size,
                                    })
                                }
                                _ => None,
                            };
                            Ok(canopy_common::VolumeAttachment {
                                volume_id: parse(&id)?,
                                device,
                                size_gib,
                                initialized: initialized != 0,
                                source,
                            })
                        })
                        .collect::<Result<_, StateError>>()?,
                    metadata: InstanceMetadata {
                        account_id: r.account,
                        reservation_id: r.reservation,
                        launch_index: u32::try_from(r.launch_index).unwrap_or_default(),
                        zone: zone.to_string(),
                        // The region is the cloud controller's, not the store's.
                        region: String::new(),
                        public_key: r.public_key,
                        security_groups: r.groups,
                        launch_time: r.launch_time,
                        kernel_id: r.kernel,
                        ramdisk_id: r.ramdisk,
                        http_tokens: if r.tokens_required {
                            HttpTokens::Required
                        } else {
                            HttpTokens::Optional
                        },
                        http_endpoint_enabled: !r.metadata_disabled,
                        public_ip: r.public_ip,
                    },
                })
            })
            .collect()
    }

    /// Instances in launch order.
    pub async fn instances(&self, filter: &InstanceFilter) -> Result<Vec<Instance>, StateError> {
        let mut conn = self.pool().acquire().await?;
        // Only the conditions that apply, so SQLite can use their indexes.
        let mut sql = String::from("FROM instances WHERE 1");
        let mut args = Vec::new();
        if let Some(account) = &filter.account_id {
            sql.push_str(" AND account_id = ?");
            args.push(account.as_str());
        }
        if let Some(zone) = &filter.zone {
            sql.push_str(" AND zone = ?");
            args.push(zone.as_str());
        }
        if let Some(reservation) = &filter.reservation_id {
            sql.push_str(" AND reservation_id = ?");
            args.push(reservation.as_str());
        }
        sql.push_str(" ORDER BY seq");
        let rows: Vec<InstanceRow> = fetch_folded(&mut conn, INSTANCE_COLUMNS, &sql, &args).await?;
        let tags = if rows.is_empty() {
            HashMap::new()
        } else if filter.reservation_id.is_some() {
            // A handful of instances: their own tags, not the whole account's.
            let ids = json_list(rows.iter().map(|r| r.instance_id.as_str()))?;
            tags_for(&mut conn, filter.account_id.as_ref(), Some(&ids)).await?
        } else {
            tags_for(&mut conn, filter.account_id.as_ref(), None).await?
        };
        rows_to_instances(rows, tags)
    }

    /// The account's instances named by `ids`; `InstancesNotFound` unless it owns them all.
    pub async fn owned_instances(
        &self,
        account: &AccountId,
        ids: &[InstanceId],
    ) -> Result<HashMap<InstanceId, Instance>, StateError> {
        let mut conn = self.pool().acquire().await?;
        require_instances(&mut conn, account, ids).await
    }

    pub async fn instances_by_id(
        &self,
        account: Option<&AccountId>,
        ids: &[InstanceId],
    ) -> Result<HashMap<InstanceId, Instance>, StateError> {
        let mut conn = self.pool().acquire().await?;
        load_instances_by_id(&mut conn, account, ids, true).await
    }

    /// The zone, node and state of each of `ids` that exists (only those columns: every
    /// report a zone sends is compared with them).
    pub async fn whereabouts(
        &self,
        ids: &[InstanceId],
    ) -> Result<HashMap<InstanceId, Whereabouts>, StateError> {
        let ids_json = json_list(ids.iter().map(InstanceId::as_str))?;
        let mut conn = self.pool().acquire().await?;
        // (id, zone, node, state, private address)
        type Row = (String, String, Option<String>, String, Option<String>);
        let rows: Vec<Row> = fetch_folded(
            &mut conn,
            "instance_id, zone, node_id, state, private_ip",
            "FROM instances WHERE instance_id IN (SELECT value FROM json_each(?))",
            &[&ids_json],
        )
        .await?;
        rows.into_iter()
            .map(|(id, zone, node, state, private_ip)| {
                Ok((
                    parse(&id)?,
                    Whereabouts {
                        private_ip: private_ip.as_deref().map(parse).transpose()?,
                        zone: parse(&zone)?,
                        node_id: node.as_deref().map(parse).transpose()?,
                        state: InstanceState::from_name(&state).ok_or_else(|| {
                            StateError::Corrupt(format!("instance state {state:?}"))
                        })?,
                    },
                ))
            })
            .collect()
    }

    /// The digests of the image bytes the cloud still needs: those of images that can be
    /// launched, and of the images, kernels and ramdisks of every instance not terminated.
    pub async fn referenced_image_digests(
        &self,
    ) -> Result<std::collections::HashSet<Sha256Digest>, StateError> {
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT sha256 FROM images WHERE sha256 IS NOT NULL AND (state != 'deregistered'
                OR image_id IN (SELECT image_id FROM instances WHERE state != 'terminated'
                    UNION SELECT kernel_id FROM instances WHERE state != 'terminated'
                    UNION SELECT ramdisk_id FROM instances WHERE state != 'terminated'))
             UNION SELECT sha256 FROM snapshots WHERE sha256 IS NOT NULL
             UNION SELECT source_sha256 FROM volumes
                WHERE source_sha256 IS NOT NULL AND initialized = 0 AND state != 'deleted'",
        )
        .fetch_all(self.pool())
        .await?;
        rows.into_iter()
            .map(|(d,)| Sha256Digest::parse(&d).map_err(|e| StateError::Corrupt(e.to_string())))
            .collect()
    }

    /// Every image, deregistered ones included (callers that show images filter those).
    pub async fn images(&self) -> Result<Vec<Image>, StateError> {
        #[derive(serde::Deserialize)]
        struct ImageRow(
            String,
            String,
            String,
            String,
            String,
            String,
            bool,
            String,
            String,
            String,
            Option<String>,
            Option<String>,
            Option<String>,
            i64,
            Option<String>,
            Vec<String>,
            Option<String>,
            Option<u64>,
            Option<String>,
            Option<String>,
            Option<String>,
        );
        let mut conn = self.pool().acquire().await?;
        let rows: Vec<ImageRow> = fetch_folded(
            &mut conn,
            "image_id, owner_id, name, description, location, architecture, json(iif(is_public, 'true', 'false')),
             state, created_at, image_type, kernel_id, ramdisk_id, sha256, size_bytes, disk_format,
             json((SELECT json_group_array(p.account_id ORDER BY p.account_id)
                   FROM image_launch_permissions p WHERE p.image_id = folded.image_id)),
             root_snapshot_id, root_volume_gib, source_instance_id, state_reason_code,
             state_reason_message",
            "FROM images ORDER BY created_at, image_id",
            &[],
        )
        .await?;
        rows.into_iter()
            .map(
                |ImageRow(
                    id,
                    owner,
                    name,
                    description,
                    location,
                    architecture,
                    is_public,
                    state,
                    created,
                    kind,
                    kernel,
                    ramdisk,
                    sha256,
                    size,
                    disk_format,
                    shared,
                    root_snapshot,
                    root_gib,
                    source_instance,
                    reason_code,
                    reason_message,
                )| {
                    Ok(Image {
                        image_id: parse(&id)?,
                        owner_id: AccountId::parse(&owner)
                            .map_err(|e| StateError::Corrupt(e.to_string()))?,
                        name,
                        description,
                        location,
                        architecture,
                        is_public,
                        state,
                        created_at: parse_time(&created)?,
                        kind: ImageKind::parse(&kind)
                            .ok_or_else(|| StateError::Corrupt(format!("image type {kind:?}")))?,
                        kernel_id: kernel.as_deref().map(parse).transpose()?,
                        ramdisk_id: ramdisk.as_deref().map(parse).transpose()?,
                        sha256: sha256
                            .as_deref()
                            .map(Sha256Digest::parse)
                            .transpose()
                            .map_err(|e| StateError::Corrupt(e.to_string()))?,
                        size_bytes: u64::try_from(size).unwrap_or_default(),
                        disk_format,
                        launch_permissions: shared
                            .iter()
                            .map(|a| AccountId::parse(a))
                            .collect::<Result<_, _>>()
                            .map_err(|e| StateError::Corrupt(e.to_string()))?,
                        root_snapshot: root_snapshot
                            .as_deref()
                            .map(|s| {
                                Ok::<_, StateError>(RootSnapshot {
                                    snapshot_id: parse(s)?,
                                    volume_size_gib: root_gib.unwrap_or_default(),
                                })
                            })
                            .transpose()?,
                        source_instance_id: source_instance.as_deref().map(parse).transpose()?,
                        state_reason: reason_code.map(|code| StateReason {
                            code,
                            message: reason_message.unwrap_or_default(),
                        }),
                    })
                },
            )
            .collect()
    }

    pub async fn zones(&self) -> Result<Vec<Zone>, StateError> {
        let rows: Vec<(String, String, i64, String)> = sqlx::query_as(
            "SELECT zone, endpoint, generation, registered_at FROM zones ORDER BY zone",
        )
        .fetch_all(self.pool())
        .await?;
        rows.into_iter()
            .map(|(zone, endpoint, generation, at)| {
                Ok(Zone {
                    zone: parse(&zone)?,
                    endpoint,
                    generation: u64::try_from(generation).unwrap_or_default(),
                    registered_at: parse_time(&at)?,
                })
            })
            .collect()
    }

    pub async fn accounts(&self) -> Result<Vec<Account>, StateError> {
        let rows: Vec<(String, String, bool, String)> = sqlx::query_as(
            "SELECT account_id, name, is_admin, created_at FROM accounts ORDER BY name",
        )
        .fetch_all(self.pool())
        .await?;
        rows.into_iter()
            .map(|(id, name, is_admin, at)| {
                Ok(Account {
                    account_id: AccountId::parse(&id)
                        .map_err(|e| StateError::Corrupt(e.to_string()))?,
                    name,
                    is_admin,
                    created_at: parse_time(&at)?,
                })
            })
            .collect()
    }

    /// Every access key: (access key id, account, secret).
    pub async fn access_keys(&self) -> Result<Vec<(String, AccountId, String)>, StateError> {
        let rows: Vec<(String, String, String)> =
            sqlx::query_as("SELECT access_key_id, account_id, secret_access_key FROM access_keys")
                .fetch_all(self.pool())
                .await?;
        rows.into_iter()
            .map(|(k, a, s)| {
                Ok((
                    k,
                    AccountId::parse(&a).map_err(|e| StateError::Corrupt(e.to_string()))?,
                    s,
                ))
            })
            .collect()
    }

    /// The account's tags of the resources named, by resource id (what the account itself
    /// set: another account sees none of an image its owner shared with it, as on EC2).
    pub async fn tags_of(
        &self,
        account: &AccountId,
        ids: &[&str],
    ) -> Result<HashMap<String, Vec<Tag>>, StateError> {
        let ids = json_list(ids.iter().copied())?;
        let mut conn = self.pool().acquire().await?;
        tags_for(&mut conn, Some(account), Some(&ids)).await
    }

    /// (resource id, resource type, key, value) of an account's tags: by resource type,
    /// instances in launch order, other resources by id, then by key.
    pub async fn tags(
        &self,
        account: &AccountId,
    ) -> Result<Vec<(String, String, String, String)>, StateError> {
        Ok(sqlx::query_as(
            "SELECT t.resource_id, t.resource_type, t.key, t.value FROM tags t
             LEFT JOIN instances i ON i.instance_id = t.resource_id
             WHERE t.account_id = ? ORDER BY t.resource_type, i.seq, t.resource_id, t.key",
        )
        .bind(account.as_str())
        .fetch_all(self.pool())
        .await?)
    }

    /// An account's key pairs with their tags, by name.
    pub async fn key_pairs(&self, account: &AccountId) -> Result<Vec<KeyPair>, StateError> {
        self.load_key_pairs(account, None).await
    }

    /// The account's key pair called `name`, if any (one indexed row: RunInstances with a
    /// `KeyName` reads it on every launch).
    pub async fn key_pair_by_name(
        &self,
        account: &AccountId,
        name: &str,
    ) -> Result<Option<KeyPair>, StateError> {
        Ok(self.load_key_pairs(account, Some(name)).await?.pop())
    }

    /// The account's key pairs with their tags, by name; only the one called `name` if given.
    async fn load_key_pairs(
        &self,
        account: &AccountId,
        name: Option<&str>,
    ) -> Result<Vec<KeyPair>, StateError> {
        let mut conn = self.pool().acquire().await?;
        let mut sql = String::from(
            "SELECT key_pair_id, key_name, key_type, fingerprint, public_key, created_at
             FROM key_pairs WHERE account_id = ?",
        );
        if name.is_some() {
            sql.push_str(" AND key_name = ?");
        }
        sql.push_str(" ORDER BY key_name");
        let mut query = sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(account.as_str());
        if let Some(name) = name {
            query = query.bind(name);
        }
        let rows: Vec<(String, String, String, String, String, String)> =
            query.fetch_all(&mut *conn).await?;
        let mut tags = if rows.is_empty() {
            HashMap::new()
        } else {
            let ids = json_list(rows.iter().map(|r| r.0.as_str()))?;
            tags_for(&mut conn, Some(account), Some(&ids)).await?
        };
        rows.into_iter()
            .map(
                |(id, key_name, key_type, fingerprint, public_key, created_at)| {
                    Ok(KeyPair {
                        tags: tags.remove(&id).unwrap_or_default(),
                        key_pair_id: parse(&id)?,
                        account_id: account.clone(),
                        key_name,
                        key_type: KeyType::parse(&key_type)
                            .ok_or_else(|| StateError::Corrupt(format!("key type {key_type:?}")))?,
                        fingerprint,
                        public_key,
                        created_at: parse_time(&created_at)?,
                    })
                },
            )
            .collect()
    }
}

impl Store {
    /// The reservation an account made with `client_token`, with its request fingerprint.
    pub async fn reservation_by_token(
        &self,
        account: &AccountId,
        client_token: &str,
    ) -> Result<Option<(ReservationId, String)>, StateError> {
        let row: Option<(String, String)> = sqlx::query_as(
            "SELECT reservation_id, request_hash FROM reservations WHERE account_id = ? AND client_token = ?",
        )
        .bind(account.as_str())
        .bind(client_token)
        .fetch_optional(self.pool())
        .await?;
        row.map(|(id, hash)| Ok((parse(&id)?, hash))).transpose()
    }
}

/// What the instances that hold capacity take, grouped: `count` instances of size
/// `resources` in `zone`, on `node_id` (or not yet placed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocationGroup {
    pub zone: ZoneName,
    pub node_id: Option<canopy_common::NodeId>,
    pub resources: Resources,
    pub count: u64,
}

impl Store {
    /// Capacity held by live instances, aggregated in SQL: the scheduler needs sums, not
    /// rows, and runs on every launch.
    pub async fn allocations(&self) -> Result<Vec<AllocationGroup>, StateError> {
        let rows: Vec<(String, Option<String>, i64, i64, i64, i64)> = sqlx::query_as(
            "SELECT zone, node_id, vcpus, memory_mib, disk_gib, COUNT(*) FROM instances
             WHERE state != 'terminated'
             GROUP BY zone, node_id, vcpus, memory_mib, disk_gib",
        )
        .fetch_all(self.pool())
        .await?;
        rows.into_iter()
            .map(|(zone, node, vcpus, mem, disk, count)| {
                Ok(AllocationGroup {
                    zone: parse(&zone)?,
                    node_id: node.as_deref().map(parse).transpose()?,
                    resources: Resources::new(
                        u32::try_from(vcpus).unwrap_or_default(),
                        u64::try_from(mem).unwrap_or_default(),
                        u64::try_from(disk).unwrap_or_default(),
                    ),
                    count: u64::try_from(count).unwrap_or_default(),
                })
            })
            .collect()
    }
}
