//! `canopy admin …`: the admin API for people (tables) and scripts (`--json`).

use anyhow::{Context, Result, bail};
use canopy_cloud_controller::admin::{ClusterView, InstanceView, NodeView, ZoneView};
use serde::de::DeserializeOwned;

#[derive(Debug, Clone, clap::Subcommand)]
pub enum AdminCommand {
    /// Availability zones and their cluster controllers.
    Zones,
    /// Nodes: capacity, allocations, health, last heartbeat.
    Nodes,
    /// Instances of every account.
    Instances,
    /// The replicated cloud controller: leader, term, members and their replication lag.
    Cluster {
        /// This replica's own view instead of the leader's (works without a leader).
        #[arg(long)]
        local: bool,
    },
    /// Adds a replica (started with `canopy clc --join`): a learner until it caught up, then a voter.
    AddReplica {
        /// Its replica id.
        id: u64,
        /// Its Raft address, HOST:PORT or http://HOST:PORT.
        address: String,
        /// Keep it a learner (receives the log, does not vote).
        #[arg(long)]
        learner: bool,
    },
    /// Removes a replica from the group.
    RemoveReplica {
        /// Its replica id.
        id: u64,
    },
}

pub struct AdminClient {
    pub endpoint: String,
    pub token: String,
}

impl AdminClient {
    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<(T, serde_json::Value)> {
        self.call(reqwest::Method::GET, path, None).await
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<(T, serde_json::Value)> {
        let url = format!("{}{path}", self.endpoint.trim_end_matches('/'));
        let mut req = reqwest::Client::new()
            .request(method, &url)
            .bearer_auth(&self.token);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach the admin API at {url}"))?;
        let status = resp.status();
        let body: serde_json::Value = resp
            .json()
            .await
            .with_context(|| format!("{url}: not a JSON answer"))?;
        if !status.is_success() {
            bail!(
                "{url}: {status}: {}",
                body.get("message")
                    .and_then(|m| m.as_str())
                    .unwrap_or("error")
            );
        }
        Ok((serde_json::from_value(body.clone())?, body))
    }

    pub async fn run(&self, cmd: AdminCommand, json: bool) -> Result<String> {
        let (rows, raw) = match cmd {
            AdminCommand::Zones => {
                let (zones, raw): (Vec<ZoneView>, _) = self.get("/v1/zones").await?;
                let rows = zones
                    .iter()
                    .map(|z| {
                        vec![
                            z.zone.clone(),
                            if z.available {
                                "available"
                            } else {
                                "unavailable"
                            }
                            .into(),
                            z.node_count.to_string(),
                            format!("{}/{}", z.applied_generation, z.generation),
                            z.endpoint.clone(),
                            z.last_heartbeat.clone().unwrap_or_else(|| "-".into()),
                        ]
                    })
                    .collect();
                (
                    table(
                        &[
                            "ZONE",
                            "STATE",
                            "NODES",
                            "GENERATION",
                            "ENDPOINT",
                            "LAST HEARTBEAT",
                        ],
                        rows,
                    ),
                    raw,
                )
            }
            AdminCommand::Nodes => {
                let (nodes, raw): (Vec<NodeView>, _) = self.get("/v1/nodes").await?;
                let rows = nodes
                    .iter()
                    .map(|n| {
                        vec![
                            n.zone.clone(),
                            n.node_id.clone(),
                            n.hypervisor.clone(),
                            if n.healthy { "healthy" } else { "unhealthy" }.into(),
                            format!("{}/{}", n.allocated.vcpus, n.capacity.vcpus),
                            format!("{}/{}", n.allocated.memory_mib, n.capacity.memory_mib),
                            format!("{}/{}", n.allocated.disk_gib, n.capacity.disk_gib),
                            n.instance_count.to_string(),
                            n.last_heartbeat.clone(),
                        ]
                    })
                    .collect();
                (
                    table(
                        &[
                            "ZONE",
                            "NODE",
                            "HYPERVISOR",
                            "HEALTH",
                            "VCPUS",
                            "MEMORY MIB",
                            "DISK GIB",
                            "INSTANCES",
                            "LAST HEARTBEAT",
                        ],
                        rows,
                    ),
                    raw,
                )
            }
            AdminCommand::Instances => {
                let (instances, raw): (Vec<InstanceView>, _) = self.get("/v1/instances").await?;
                let rows = instances
                    .iter()
                    .map(|i| {
                        vec![
                            i.instance_id.clone(),
                            i.account_id.clone(),
                            i.zone.clone(),
                            i.node_id.clone().unwrap_or_else(|| "-".into()),
                            i.state.clone(),
                            i.desired.clone(),
                            i.instance_type.clone(),
                            i.image_id.clone(),
                        ]
                    })
                    .collect();
                (
                    table(
                        &[
                            "INSTANCE", "ACCOUNT", "ZONE", "NODE", "STATE", "DESIRED", "TYPE",
                            "IMAGE",
                        ],
                        rows,
                    ),
                    raw,
                )
            }
            AdminCommand::Cluster { local } => {
                let path = if local { "/v1/replica" } else { "/v1/cluster" };
                let (view, raw): (ClusterView, _) = self.get(path).await?;
                (cluster_table(&view), raw)
            }
            AdminCommand::AddReplica {
                id,
                address,
                learner,
            } => {
                let body = serde_json::json!({"id": id, "address": address, "voter": !learner});
                let (view, raw): (ClusterView, _) = self
                    .call(reqwest::Method::POST, "/v1/cluster/members", Some(body))
                    .await?;
                (cluster_table(&view), raw)
            }
            AdminCommand::RemoveReplica { id } => {
                let (view, raw): (ClusterView, _) = self
                    .call(
                        reqwest::Method::DELETE,
                        &format!("/v1/cluster/members/{id}"),
                        None,
                    )
                    .await?;
                (cluster_table(&view), raw)
            }
        };
        Ok(if json {
            serde_json::to_string_pretty(&raw)? + "\n"
        } else {
            rows
        })
    }
}

fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

/// A summary line, then one row per member.
fn cluster_table(v: &ClusterView) -> String {
    let mut out = format!(
        "replica {} ({}), term {}, leader {}, log {}, applied {}, snapshot {}\n",
        v.replica_id,
        v.role,
        v.term,
        opt(v.leader),
        opt(v.last_log_index),
        opt(v.last_applied_index),
        opt(v.snapshot_index),
    );
    let rows = v
        .members
        .iter()
        .map(|m| {
            vec![
                m.id.to_string(),
                m.address.clone(),
                if Some(m.id) == v.leader {
                    "leader"
                } else if m.voter {
                    "voter"
                } else {
                    "learner"
                }
                .into(),
                opt(m.matched_index),
                opt(m.lag),
            ]
        })
        .collect();
    out += &table(&["ID", "ADDRESS", "ROLE", "MATCHED", "LAG"], rows);
    out
}

/// A plain, aligned text table.
pub fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect::<Vec<_>>()
            .join("  ");
        s.truncate(s.trim_end().len());
        s + "\n"
    };
    let mut out = line(headers.to_vec());
    for r in &rows {
        out += &line(r.iter().map(String::as_str).collect());
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn table_aligns_columns() {
        let t = super::table(&["A", "LONGER"], vec![vec!["xyz".into(), "1".into()]]);
        assert_eq!(t, "A    LONGER\nxyz  1\n");
    }
}
