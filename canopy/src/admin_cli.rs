//! `canopy admin …`: the admin API for people (tables) and scripts (`--json`).

use anyhow::{Context, Result, bail};
use canopy_cloud_controller::admin::{
    AccountView, ClusterView, CreatedAccount, ImageView, InstanceView, NodeView, ZoneView,
};
use canopy_cloud_controller::admin_pki::{
    CertificateView, CreatedJoinToken, JoinTokenView, Revoked,
};
use serde::de::DeserializeOwned;

#[derive(Debug, Clone, clap::Subcommand)]
pub enum AdminCommand {
    /// Availability zones and their cluster controllers.
    Zones,
    /// Nodes: capacity, allocations, health, last heartbeat.
    Nodes,
    /// Instances of every account.
    Instances,
    /// Images of every account: kind, size, content digest, state.
    Images,
    /// Uploads an image file (a qcow2 or raw disk, a kernel, or an initramfs: told apart by
    /// its bytes) and registers it, owned by the admin account.
    UploadImage {
        /// The file to upload.
        file: std::path::PathBuf,
        /// Its name (DescribeImages' `name`).
        #[arg(long)]
        name: String,
        #[arg(long)]
        description: Option<String>,
        /// The kernel (eki-…) a machine image boots with.
        #[arg(long)]
        kernel_id: Option<String>,
        /// The ramdisk (eri-…) that goes with the kernel.
        #[arg(long)]
        ramdisk_id: Option<String>,
        /// Every account may launch it.
        #[arg(long)]
        public: bool,
    },
    /// Accounts: number, name, administrator or not.
    Accounts,
    /// Creates an account with an access key, and prints the key as shell exports for its
    /// users' EC2 tools (the secret is shown only now).
    CreateAccount {
        /// 1 to 64 letters, digits, '.', '_' and '-'.
        name: String,
    },
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
    /// Creates a join token for a new node (`canopy nc --join-token`); shown only now.
    CreateJoinToken {
        /// The zone the node must join (default: any).
        #[arg(long)]
        zone: Option<String>,
        /// Seconds until the token expires (default 3600).
        #[arg(long)]
        ttl: Option<u64>,
        #[arg(long)]
        description: Option<String>,
    },
    /// Join tokens: zone, expiry, and which node spent each.
    JoinTokens,
    /// Certificates nodes received by joining, and every revoked serial.
    Certificates,
    /// Revokes a node's certificates (or one serial): the cloud refuses it within seconds.
    Revoke {
        /// The node whose certificates to revoke.
        #[arg(long, conflicts_with = "serial", required_unless_present = "serial")]
        node: Option<String>,
        /// One certificate's serial (hex), e.g. one `canopy ca issue` made.
        #[arg(long)]
        serial: Option<String>,
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
        let mut req = canopy_cloud_controller::http::client()
            .request(method, &url)
            .bearer_auth(&self.token);
        if let Some(body) = body {
            req = req.json(&body);
        }
        answer(&url, req.send().await).await
    }

    /// Streams `file` to the admin API's upload (never whole in memory).
    async fn upload(
        &self,
        file: &std::path::Path,
        query: &[(&str, String)],
    ) -> Result<(ImageView, serde_json::Value)> {
        let mut q = form_urlencoded::Serializer::new(String::new());
        for (k, v) in query {
            q.append_pair(k, v);
        }
        let url = format!(
            "{}/v1/images?{}",
            self.endpoint.trim_end_matches('/'),
            q.finish()
        );
        let opened = tokio::fs::File::open(file)
            .await
            .with_context(|| format!("cannot read {}", file.display()))?;
        let size = opened.metadata().await?.len();
        let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::with_capacity(
            opened,
            1 << 20,
        ));
        let sent = canopy_cloud_controller::http::client()
            .post(&url)
            .bearer_auth(&self.token)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .header(reqwest::header::CONTENT_LENGTH, size)
            .body(body)
            .send()
            .await;
        answer(&url, sent).await
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
            AdminCommand::Images => {
                let (images, raw): (Vec<ImageView>, _) = self.get("/v1/images").await?;
                (images_table(&images), raw)
            }
            AdminCommand::UploadImage {
                file,
                name,
                description,
                kernel_id,
                ramdisk_id,
                public,
            } => {
                let mut query = vec![("name", name), ("public", public.to_string())];
                for (key, value) in [
                    ("description", description),
                    ("kernel_id", kernel_id),
                    ("ramdisk_id", ramdisk_id),
                ] {
                    if let Some(v) = value {
                        query.push((key, v));
                    }
                }
                let (image, raw) = self.upload(&file, &query).await?;
                (images_table(&[image]), raw)
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
            AdminCommand::CreateJoinToken {
                zone,
                ttl,
                description,
            } => {
                let body = serde_json::json!({"zone": zone, "ttl_seconds": ttl, "description": description});
                let (made, raw): (CreatedJoinToken, _) = self
                    .call(reqwest::Method::POST, "/v1/join-tokens", Some(body))
                    .await?;
                (
                    format!(
                        "# join token {} (zone {}, expires {}): shown only now
{}
",
                        made.token_id,
                        made.zone.as_deref().unwrap_or("any"),
                        made.expires_at,
                        made.token
                    ),
                    raw,
                )
            }
            AdminCommand::JoinTokens => {
                let (tokens, raw): (Vec<JoinTokenView>, _) = self.get("/v1/join-tokens").await?;
                let rows = tokens
                    .iter()
                    .map(|t| {
                        vec![
                            t.token_id.clone(),
                            t.zone.clone().unwrap_or_else(|| "any".into()),
                            t.expires_at.clone(),
                            t.used_by.clone().unwrap_or_else(|| "-".into()),
                            t.description.clone(),
                        ]
                    })
                    .collect();
                (
                    table(
                        &["TOKEN", "ZONE", "EXPIRES", "USED BY", "DESCRIPTION"],
                        rows,
                    ),
                    raw,
                )
            }
            AdminCommand::Certificates => {
                let (certs, raw): (Vec<CertificateView>, _) = self.get("/v1/certificates").await?;
                let rows = certs
                    .iter()
                    .map(|c| {
                        vec![
                            c.serial.clone(),
                            if c.role.is_empty() {
                                "-".into()
                            } else {
                                format!("{}/{}", c.role, c.name)
                            },
                            c.zone.clone().unwrap_or_else(|| "-".into()),
                            c.issued_at.clone().unwrap_or_else(|| "-".into()),
                            c.revoked_at.clone().unwrap_or_else(|| "-".into()),
                        ]
                    })
                    .collect();
                (
                    table(&["SERIAL", "IDENTITY", "ZONE", "ISSUED", "REVOKED"], rows),
                    raw,
                )
            }
            AdminCommand::Revoke { node, serial } => {
                let body = serde_json::json!({"node": node, "serial": serial});
                let (revoked, raw): (Revoked, _) = self
                    .call(reqwest::Method::POST, "/v1/revocations", Some(body))
                    .await?;
                let rows = revoked.revoked.iter().map(|s| vec![s.clone()]).collect();
                (table(&["REVOKED SERIAL"], rows), raw)
            }
            AdminCommand::Accounts => {
                let (accounts, raw): (Vec<AccountView>, _) = self.get("/v1/accounts").await?;
                let rows = accounts
                    .iter()
                    .map(|a| {
                        vec![
                            a.account_id.clone(),
                            a.name.clone(),
                            if a.is_admin { "admin" } else { "-" }.into(),
                            a.created_at.clone(),
                        ]
                    })
                    .collect();
                (table(&["ACCOUNT", "NAME", "ROLE", "CREATED"], rows), raw)
            }
            AdminCommand::CreateAccount { name } => {
                let (made, raw): (CreatedAccount, _) = self
                    .call(
                        reqwest::Method::POST,
                        "/v1/accounts",
                        Some(serde_json::json!({ "name": name })),
                    )
                    .await?;
                (
                    format!(
                        "# account {} ({}): its users' credentials\nexport AWS_ACCESS_KEY_ID='{}'\nexport AWS_SECRET_ACCESS_KEY='{}'\n",
                        made.name, made.account_id, made.access_key_id, made.secret_access_key
                    ),
                    raw,
                )
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

/// The admin API's JSON answer, or its error message.
async fn answer<T: DeserializeOwned>(
    url: &str,
    sent: reqwest::Result<reqwest::Response>,
) -> Result<(T, serde_json::Value)> {
    let resp = sent.with_context(|| format!("cannot reach the admin API at {url}"))?;
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

fn images_table(images: &[ImageView]) -> String {
    let rows = images
        .iter()
        .map(|i| {
            vec![
                i.image_id.clone(),
                i.name.clone(),
                i.kind.clone(),
                i.state.clone(),
                i.size_bytes.to_string(),
                i.kernel_id.clone().unwrap_or_else(|| "-".into()),
                i.ramdisk_id.clone().unwrap_or_else(|| "-".into()),
                i.sha256
                    .as_deref()
                    .map(|d| d[..12].to_owned())
                    .unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    table(
        &[
            "IMAGE", "NAME", "KIND", "STATE", "BYTES", "KERNEL", "RAMDISK", "SHA256",
        ],
        rows,
    )
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
