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
        Ok(c)
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
        }
    }
}

impl CcFile {
    pub fn validate(&self) -> Result<canopy_cluster_controller::CcConfig> {
        if self.clc.is_empty() {
            bail!("clc: at least one cloud controller endpoint is required");
        }
        Ok(canopy_cluster_controller::CcConfig {
            zone: ZoneName::parse(&self.zone)
                .with_context(|| format!("zone: {:?} is not a valid zone name", self.zone))?,
            listen: parse_addr("listen", &self.listen)?,
            advertise: self
                .advertise
                .as_deref()
                .map(|a| parse_url("advertise", a))
                .transpose()?,
            clc_endpoints: self
                .clc
                .iter()
                .map(|e| parse_url("clc", e))
                .collect::<Result<_>>()?,
            heartbeat_interval: secs("heartbeat_interval_secs", self.heartbeat_interval_secs)?,
            node_timeout: secs("node_timeout_secs", self.node_timeout_secs)?,
            resync_interval: secs("resync_interval_secs", self.resync_interval_secs)?,
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
        }
    }
}

impl NcFile {
    pub fn validate(&self) -> Result<canopy_node_controller::NcConfig> {
        let node_id = match &self.node_id {
            Some(n) => n.clone(),
            None => default_node_id(),
        };
        Ok(canopy_node_controller::NcConfig {
            node_id: NodeId::parse(&node_id)
                .with_context(|| format!("node_id: {node_id:?} is not a valid node id"))?,
            listen: parse_addr("listen", &self.listen)?,
            advertise: self
                .advertise
                .as_deref()
                .map(|a| parse_url("advertise", a))
                .transpose()?,
            cc_endpoint: parse_url("cc", &self.cc)?,
            heartbeat_interval: secs("heartbeat_interval_secs", self.heartbeat_interval_secs)?,
            resync_interval: secs("resync_interval_secs", self.resync_interval_secs)?,
            stop_timeout: secs("stop_timeout_secs", self.stop_timeout_secs)?,
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
    }
}
