//! Role configuration: defaults, then an optional TOML file, then command-line flags
//! (each flag also reads a `CANOPY_*` environment variable, through clap). Unknown keys are
//! refused; every value is checked once here, and errors name the file and the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use canopy_common::{NodeId, RegionName, ZoneName};
use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// Loads a role's config: defaults ← `file` ← `overrides` (the flags that were given).
pub fn load<T: Serialize + DeserializeOwned + Default>(
    file: Option<&Path>,
    overrides: impl Serialize,
) -> Result<T> {
    let mut fig = Figment::from(Serialized::defaults(T::default()));
    if let Some(path) = file {
        if !path.exists() {
            bail!("config file {} does not exist", path.display());
        }
        fig = fig.merge(Toml::file_exact(path));
    }
    fig = fig.merge(Serialized::defaults(overrides));
    fig.extract()
        .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))
}

fn parse_addr(key: &str, v: &str) -> Result<SocketAddr> {
    v.parse()
        .with_context(|| format!("{key}: {v:?} is not an address:port"))
}

/// The listen address and the URL others reach it by: `advertise`, or else `http://LISTEN`,
/// which an unspecified address (0.0.0.0) cannot be.
fn listen_and_advertise(
    listen: &str,
    advertise: Option<&str>,
) -> Result<(SocketAddr, Option<String>)> {
    let addr = parse_addr("listen", listen)?;
    let advertise = advertise.map(|a| parse_url("advertise", a)).transpose()?;
    if addr.ip().is_unspecified() && advertise.is_none() {
        bail!(
            "advertise: required when listen is {addr} (others cannot dial {}); give the URL they reach this process by",
            addr.ip()
        );
    }
    Ok((addr, advertise))
}

fn parse_url(key: &str, v: &str) -> Result<String> {
    if v.starts_with("http://") || v.starts_with("https://") {
        Ok(v.trim_end_matches('/').to_owned())
    } else {
        bail!("{key}: {v:?} is not an http(s) URL")
    }
}

fn secs(key: &str, v: f64) -> Result<Duration> {
    if v.is_finite() && v > 0.0 {
        Ok(Duration::from_secs_f64(v))
    } else {
        bail!("{key}: must be a positive number of seconds, got {v}")
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClcFile {
    pub data_dir: Option<PathBuf>,
    pub region: String,
    pub ec2_listen: String,
    pub admin_listen: String,
    pub grpc_listen: String,
    pub max_clock_skew_secs: f64,
    pub zone_timeout_secs: f64,
    pub resync_interval_secs: f64,
    pub terminated_retention_secs: f64,
    /// This replica's id in the replicated CLC (unique, positive).
    pub replica_id: u64,
    /// Where Raft RPCs and requests forwarded by other replicas are served.
    pub raft_listen: String,
    /// URL other replicas use for this one (default: http://RAFT_LISTEN).
    pub raft_advertise: Option<String>,
    /// The group's first members, `ID=HOST:PORT` (Raft addresses); empty: this replica alone.
    pub members: Vec<String>,
    /// Wait to be added to an existing group (admin API) instead of forming one.
    pub join: bool,
    /// Raft timing, milliseconds: leader heartbeat, and the election timeout range.
    pub raft_heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// A snapshot is taken after this many log entries.
    pub snapshot_every: u64,
    /// How long a request waits for a leader or a quorum before the client is told to retry.
    pub request_wait_secs: f64,
    /// Where Elastic IPs come from: CIDR blocks (the same on every replica).
    pub public_ips: Vec<String>,
    /// The replica's TLS directory (`ca.crt`, `tls.crt`, `tls.key`, and `ca.key` to sign
    /// joining nodes' certificates): required outside `canopy dev`.
    pub tls_dir: Option<PathBuf>,
}

impl Default for ClcFile {
    fn default() -> Self {
        Self {
            data_dir: None,
            region: "canopy-1".into(),
            ec2_listen: "127.0.0.1:8773".into(),
            admin_listen: "127.0.0.1:8774".into(),
            grpc_listen: "127.0.0.1:8776".into(),
            max_clock_skew_secs: 900.0,
            zone_timeout_secs: 10.0,
            resync_interval_secs: 5.0,
            terminated_retention_secs: 3600.0,
            replica_id: 1,
            raft_listen: "127.0.0.1:8778".into(),
            raft_advertise: None,
            members: Vec::new(),
            join: false,
            raft_heartbeat_ms: 100,
            election_timeout_min_ms: 200,
            election_timeout_max_ms: 300,
            snapshot_every: 5_000,
            request_wait_secs: 5.0,
            public_ips: vec![canopy_cloud_controller::config::DEFAULT_PUBLIC_POOL.into()],
            tls_dir: None,
        }
    }
}

impl ClcFile {
    pub fn validate(&self) -> Result<canopy_cloud_controller::ClcConfig> {
        let data_dir = self
            .data_dir
            .clone()
            .context("data_dir: required (--data-dir)")?;
        let mut c = canopy_cloud_controller::ClcConfig::new(data_dir);
        c.region = RegionName::parse(&self.region)
            .with_context(|| format!("region: {:?} is not a valid region name", self.region))?;
        c.ec2_listen = parse_addr("ec2_listen", &self.ec2_listen)?;
        c.admin_listen = parse_addr("admin_listen", &self.admin_listen)?;
        c.grpc_listen = parse_addr("grpc_listen", &self.grpc_listen)?;
        c.max_clock_skew = secs("max_clock_skew_secs", self.max_clock_skew_secs)?;
        c.zone_timeout = secs("zone_timeout_secs", self.zone_timeout_secs)?;
        c.resync_interval = secs("resync_interval_secs", self.resync_interval_secs)?;
        c.terminated_retention = secs("terminated_retention_secs", self.terminated_retention_secs)?;
        c.replica = self.replica()?;
        if self.public_ips.is_empty() {
            bail!("public_ips: at least one CIDR block is needed");
        }
        c.public_pool = self
            .public_ips
            .iter()
            .map(|p| {
                canopy_common::Ipv4Subnet::parse(p).map_err(|e| anyhow::anyhow!("public_ips: {e}"))
            })
            .collect::<Result<_>>()?;
        Ok(c)
    }

    fn replica(&self) -> Result<canopy_cloud_controller::config::ReplicaConfig> {
        use canopy_cloud_controller::admin::normalize_raft_url;
        if self.replica_id == 0 {
            bail!("replica_id: must be a positive integer");
        }
        let mut r = canopy_cloud_controller::config::ReplicaConfig {
            id: self.replica_id,
            raft_listen: parse_addr("raft_listen", &self.raft_listen)?,
            join: self.join,
            ..Default::default()
        };
        if let Some(a) = &self.raft_advertise {
            r.raft_advertise =
                Some(normalize_raft_url(a).map_err(|e| anyhow::anyhow!("raft_advertise: {e}"))?);
        }
        for m in &self.members {
            let (id, addr) = m
                .split_once('=')
                .with_context(|| format!("members: {m:?} is not ID=HOST:PORT"))?;
            let id: u64 = id
                .trim()
                .parse()
                .ok()
                .filter(|id| *id > 0)
                .with_context(|| format!("members: {m:?}: the id must be a positive integer"))?;
            let url = normalize_raft_url(addr.trim())
                .map_err(|e| anyhow::anyhow!("members: {m:?}: {e}"))?;
            if r.initial_members.insert(id, url).is_some() {
                bail!("members: replica {id} is listed twice");
            }
        }
        if !r.initial_members.is_empty() {
            if self.join {
                bail!(
                    "join: a joining replica takes no members list (it is added through the admin API)"
                );
            }
            match r.initial_members.get(&r.id) {
                None => bail!(
                    "members: this replica ({}) must be one of the members, or start with --join",
                    r.id
                ),
                Some(url) => match &r.raft_advertise {
                    Some(adv) if adv != url => bail!(
                        "raft_advertise {adv} differs from this replica's entry in members ({url})"
                    ),
                    _ => r.raft_advertise = Some(url.clone()),
                },
            }
        } else if r.raft_listen.ip().is_unspecified() && r.raft_advertise.is_none() {
            bail!(
                "raft_advertise: required when raft_listen is {}",
                r.raft_listen
            );
        }
        let ms = Duration::from_millis;
        if self.raft_heartbeat_ms == 0
            || self.election_timeout_min_ms <= self.raft_heartbeat_ms
            || self.election_timeout_max_ms <= self.election_timeout_min_ms
        {
            bail!(
                "raft timing: need 0 < raft_heartbeat_ms < election_timeout_min_ms < election_timeout_max_ms"
            );
        }
        if self.snapshot_every == 0 {
            bail!("snapshot_every: must be positive");
        }
        r.timers = canopy_cloud_controller::replication::raft::RaftTimers {
            heartbeat: ms(self.raft_heartbeat_ms),
            election_min: ms(self.election_timeout_min_ms),
            election_max: ms(self.election_timeout_max_ms),
            snapshot_every: self.snapshot_every,
            request_wait: secs("request_wait_secs", self.request_wait_secs)?,
        };
        Ok(r)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CcFile {
    pub zone: String,
    pub listen: String,
    pub advertise: Option<String>,
    pub clc: Vec<String>,
    pub heartbeat_interval_secs: f64,
    pub node_timeout_secs: f64,
    pub resync_interval_secs: f64,
    /// The zone's subnet (instances' private addresses), e.g. "172.31.0.0/16".
    pub subnet: String,
    /// The CC's TLS directory (`ca.crt`, `tls.crt`, `tls.key`): required.
    pub tls_dir: Option<PathBuf>,
}

impl Default for CcFile {
    fn default() -> Self {
        Self {
            zone: "canopy-1a".into(),
            listen: "127.0.0.1:8775".into(),
            advertise: None,
            clc: vec!["http://127.0.0.1:8776".into()],
            heartbeat_interval_secs: 2.0,
            node_timeout_secs: 10.0,
            resync_interval_secs: 5.0,
            subnet: canopy_cluster_controller::DEFAULT_SUBNET.into(),
            tls_dir: None,
        }
    }
}

impl CcFile {
    pub fn validate(&self) -> Result<canopy_cluster_controller::CcConfig> {
        if self.clc.is_empty() {
            bail!("clc: at least one cloud controller endpoint is required");
        }
        let (listen, advertise) = listen_and_advertise(&self.listen, self.advertise.as_deref())?;
        Ok(canopy_cluster_controller::CcConfig {
            zone: ZoneName::parse(&self.zone)
                .with_context(|| format!("zone: {:?} is not a valid zone name", self.zone))?,
            listen,
            advertise,
            clc_endpoints: self
                .clc
                .iter()
                .map(|e| parse_url("clc", e))
                .collect::<Result<_>>()?,
            heartbeat_interval: secs("heartbeat_interval_secs", self.heartbeat_interval_secs)?,
            node_timeout: secs("node_timeout_secs", self.node_timeout_secs)?,
            resync_interval: secs("resync_interval_secs", self.resync_interval_secs)?,
            subnet: canopy_common::Ipv4Subnet::parse(&self.subnet)
                .map_err(|e| anyhow::anyhow!("subnet: {e}"))?,
            // The TLS directory is loaded by the caller (`canopy cc`).
            transport: canopy_pki::Transport::Plaintext,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum HypervisorChoice {
    /// Simulated guests: no VMs, for tests, demos and scale benchmarks.
    Sim,
    /// Real guests through libvirt and QEMU/KVM.
    Libvirt,
    /// libvirt when the host can run guests, else the simulator.
    Auto,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NcFile {
    pub node_id: Option<String>,
    pub listen: String,
    pub advertise: Option<String>,
    pub cc: String,
    pub hypervisor: HypervisorChoice,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
    pub sim_boot_delay_secs: f64,
    pub sim_shutdown_delay_secs: f64,
    pub heartbeat_interval_secs: f64,
    pub resync_interval_secs: f64,
    pub stop_timeout_secs: f64,
    /// libvirt: the connection URI.
    pub libvirt_uri: String,
    /// libvirt: auto (probe), kvm or qemu (software emulation).
    pub accelerator: String,
    /// libvirt: instances' files under `state_dir/instances`, the image cache under
    /// `state_dir/images`.
    pub state_dir: String,
    /// libvirt: the image cache's bound.
    pub image_cache_gib: u64,
    /// Where the instance metadata service listens for this node's guests, normally
    /// "169.254.169.254:80" on the guests' network; unset: not served.
    pub metadata_listen: Option<String>,
    /// The node's TLS directory (`ca.crt`, `tls.crt`, `tls.key`): required. Empty on a
    /// new node, which fills it by joining with `join_token`.
    pub tls_dir: Option<PathBuf>,
    /// A join token (`canopy admin create-join-token`), used once when `tls_dir` holds no
    /// certificate yet.
    pub join_token: Option<String>,
}

impl Default for NcFile {
    fn default() -> Self {
        Self {
            node_id: None,
            listen: "127.0.0.1:8777".into(),
            advertise: None,
            cc: "http://127.0.0.1:8775".into(),
            hypervisor: HypervisorChoice::Auto,
            vcpus: 16,
            memory_mib: 32 * 1024,
            disk_gib: 500,
            sim_boot_delay_secs: 1.0,
            sim_shutdown_delay_secs: 0.5,
            heartbeat_interval_secs: 2.0,
            resync_interval_secs: 5.0,
            stop_timeout_secs: 30.0,
            libvirt_uri: "qemu:///system".into(),
            accelerator: "auto".into(),
            state_dir: "/var/lib/canopy/nc".into(),
            image_cache_gib: 20,
            metadata_listen: None,
            tls_dir: None,
            join_token: None,
        }
    }
}

impl NcFile {
    pub fn validate(&self) -> Result<canopy_node_controller::NcConfig> {
        let node_id = match &self.node_id {
            Some(n) => n.clone(),
            None => default_node_id(),
        };
        let (listen, advertise) = listen_and_advertise(&self.listen, self.advertise.as_deref())?;
        Ok(canopy_node_controller::NcConfig {
            node_id: NodeId::parse(&node_id)
                .with_context(|| format!("node_id: {node_id:?} is not a valid node id"))?,
            listen,
            advertise,
            cc_endpoint: parse_url("cc", &self.cc)?,
            heartbeat_interval: secs("heartbeat_interval_secs", self.heartbeat_interval_secs)?,
            resync_interval: secs("resync_interval_secs", self.resync_interval_secs)?,
            stop_timeout: secs("stop_timeout_secs", self.stop_timeout_secs)?,
            metadata_listen: self
                .metadata_listen
                .as_deref()
                .map(|a| parse_addr("metadata_listen", a))
                .transpose()?,
            // The TLS directory is loaded (or filled by a join) by the caller (`canopy nc`).
            transport: canopy_pki::Transport::Plaintext,
        })
    }

    /// The libvirt driver's settings (`cc` is where images come from).
    pub fn libvirt_options(&self) -> Result<canopy_node_controller::host::LibvirtNodeOptions> {
        if self.disk_gib == 0 || self.image_cache_gib == 0 {
            bail!("disk_gib and image_cache_gib must be positive");
        }
        if self.libvirt_uri.is_empty() {
            bail!("libvirt_uri: must not be empty");
        }
        let state_dir = std::path::absolute(&self.state_dir)
            .with_context(|| format!("state_dir: {:?} is not a usable path", self.state_dir))?;
        Ok(canopy_node_controller::host::LibvirtNodeOptions {
            uri: self.libvirt_uri.clone(),
            accelerator: self
                .accelerator
                .parse()
                .map_err(|e: String| anyhow::anyhow!(e))?,
            instances_dir: state_dir.join("instances"),
            volumes_dir: state_dir.join("volumes"),
            image_cache_dir: state_dir.join("images"),
            image_cache_max_bytes: self.image_cache_gib << 30,
            disk_gib: self.disk_gib,
            cc_endpoint: parse_url("cc", &self.cc)?,
            transport: canopy_pki::Transport::Plaintext,
        })
    }

    pub fn sim_config(&self) -> Result<canopy_node_controller::sim::SimConfig> {
        if self.vcpus == 0 || self.memory_mib == 0 || self.disk_gib == 0 {
            bail!("vcpus, memory_mib and disk_gib must be positive");
        }
        Ok(canopy_node_controller::sim::SimConfig {
            capacity: canopy_common::Resources::new(self.vcpus, self.memory_mib, self.disk_gib),
            boot_delay: Duration::from_secs_f64(self.sim_boot_delay_secs.max(0.0)),
            shutdown_delay: Duration::from_secs_f64(self.sim_shutdown_delay_secs.max(0.0)),
            ..Default::default()
        })
    }
}

/// The host name, made safe for a node id.
fn default_node_id() -> String {
    let raw = std::fs::read_to_string("/etc/hostname").unwrap_or_else(|_| "node-1".into());
    let id: String = raw
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if id.is_empty() { "node-1".into() } else { id }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_and_bad_values_are_refused_with_their_names() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("clc.toml");
        std::fs::write(&f, "regoin = \"x\"\n").unwrap();
        let err = load::<ClcFile>(Some(&f), serde_json::json!({}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("regoin"), "{err}");
        std::fs::write(&f, "ec2_listen = \"nope\"\ndata_dir = \"/tmp/x\"\n").unwrap();
        let cfg: ClcFile = load(Some(&f), serde_json::json!({})).unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("ec2_listen"), "{err}");
        let err = load::<ClcFile>(
            Some(&dir.path().join("missing.toml")),
            serde_json::json!({}),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("does not exist"), "{err}");
    }

    fn clc_with(
        members: &[&str],
        extra: serde_json::Value,
    ) -> Result<canopy_cloud_controller::ClcConfig> {
        let mut o = serde_json::json!({"data_dir": "/tmp/x", "members": members});
        if let (Some(o), Some(extra)) = (o.as_object_mut(), extra.as_object()) {
            o.extend(extra.clone());
        }
        load::<ClcFile>(None, o)?.validate()
    }

    #[test]
    fn replica_settings_are_checked() {
        let c = clc_with(&[], serde_json::json!({})).unwrap();
        assert_eq!(c.replica.id, 1);
        assert!(c.replica.initial_members.is_empty());
        let c = clc_with(
            &[
                "1=127.0.0.1:9001",
                "2=http://10.0.0.2:9001/",
                "3=clc-3:9001",
            ],
            serde_json::json!({"replica_id": 2}),
        )
        .unwrap();
        assert_eq!(c.replica.initial_members.len(), 3);
        assert_eq!(
            c.replica.raft_advertise.as_deref(),
            Some("http://10.0.0.2:9001")
        );
        let err = |m: &[&str], extra| clc_with(m, extra).unwrap_err().to_string();
        assert!(
            err(&["1=a:1", "2=b:1"], serde_json::json!({"replica_id": 3}))
                .contains("must be one of the members")
        );
        assert!(err(&["1=a:1", "1=b:1"], serde_json::json!({})).contains("listed twice"));
        assert!(err(&["x=a:1"], serde_json::json!({})).contains("positive integer"));
        assert!(err(&["1=a"], serde_json::json!({})).contains("host and a port"));
        assert!(err(&["1=a:1"], serde_json::json!({"join": true})).contains("join"));
        assert!(err(&[], serde_json::json!({"replica_id": 0})).contains("replica_id"));
        assert!(
            err(&[], serde_json::json!({"raft_listen": "0.0.0.0:8778"})).contains("raft_advertise")
        );
        assert!(
            err(&[], serde_json::json!({"election_timeout_min_ms": 50})).contains("raft timing")
        );
    }

    #[test]
    fn cc_and_nc_listening_on_every_address_must_say_how_they_are_reached() {
        let cc = CcFile {
            listen: "0.0.0.0:8775".into(),
            ..CcFile::default()
        };
        assert!(cc.validate().unwrap_err().to_string().contains("advertise"));
        let cc = CcFile {
            advertise: Some("http://cc-a:8775".into()),
            ..cc
        };
        assert_eq!(
            cc.validate().unwrap().advertise.as_deref(),
            Some("http://cc-a:8775")
        );
        let nc = NcFile {
            listen: "[::]:8777".into(),
            ..NcFile::default()
        };
        assert!(nc.validate().unwrap_err().to_string().contains("advertise"));
        assert!(NcFile::default().validate().is_ok());
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("cc.toml");
        std::fs::write(&f, "zone = \"from-file\"\nclc = [\"http://a:1\"]\n").unwrap();
        let cfg: CcFile = load(Some(&f), serde_json::json!({"zone": "from-flag"})).unwrap();
        let c = cfg.validate().unwrap();
        assert_eq!(c.zone.as_str(), "from-flag");
        assert_eq!(c.clc_endpoints, vec!["http://a:1".to_string()]);
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;

    fn example(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/config")
            .join(name)
    }

    #[test]
    fn the_example_configs_load_and_validate() {
        let clc: ClcFile = load(Some(&example("clc.toml")), serde_json::json!({})).unwrap();
        assert_eq!(clc.validate().unwrap().region.as_str(), "canopy-1");
        let cc: CcFile = load(Some(&example("cc.toml")), serde_json::json!({})).unwrap();
        assert_eq!(cc.validate().unwrap().zone.as_str(), "canopy-1a");
        let nc: NcFile = load(Some(&example("nc.toml")), serde_json::json!({})).unwrap();
        nc.validate().unwrap();
        assert_eq!(nc.sim_config().unwrap().capacity.vcpus, 16);
        let libvirt = nc.libvirt_options().unwrap();
        assert_eq!(libvirt.image_cache_max_bytes, 20 << 30);
        let bad: NcFile = load(None, serde_json::json!({"accelerator": "xen"})).unwrap();
        assert!(
            bad.libvirt_options()
                .unwrap_err()
                .to_string()
                .contains("accelerator")
        );
    }
}
