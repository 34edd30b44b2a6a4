//! `canopy dev`: the whole cloud in one process — a CLC, one CC per zone and simulated
//! NCs — talking to each other over real gRPC on loopback, exactly as separate processes
//! would. The in-process test harness uses the same function.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use canopy_cloud_controller::{ClcConfig, ClcHandle};
use canopy_cluster_controller::{CcConfig, ClusterHandle};
use canopy_common::{NodeId, ZoneName};
use canopy_node_controller::{
    Hypervisor, NcConfig, NodeHandle, SimConfig, SimControl, SimHypervisor, host,
};

use crate::bootstrap::{self, AdminCredentials};
use crate::config::{HypervisorChoice, NcFile};

#[derive(Debug, Clone)]
pub struct DevOptions {
    pub clc: ClcConfig,
    pub zones: Vec<ZoneName>,
    pub nodes_per_zone: u32,
    pub hypervisor: HypervisorChoice,
    /// With libvirt: the accelerator (auto, kvm, qemu).
    pub accelerator: String,
    pub sim: SimConfig,
    pub heartbeat_interval: Duration,
    /// Write `DIR/canopyrc` once the cloud answers.
    pub write_canopyrc: bool,
}

impl DevOptions {
    /// Everything on loopback port 0, one zone with one node: for tests.
    pub fn for_tests(data_dir: PathBuf) -> Self {
        let mut clc = ClcConfig::new(data_dir);
        let any = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        clc.ec2_listen = any;
        clc.admin_listen = any;
        clc.grpc_listen = any;
        clc.replica.raft_listen = any;
        clc.resync_interval = Duration::from_millis(500);
        clc.zone_timeout = Duration::from_secs(3);
        Self {
            clc,
            zones: vec![ZoneName::parse("canopy-1a").expect("valid zone")],
            nodes_per_zone: 1,
            hypervisor: HypervisorChoice::Sim,
            accelerator: "auto".into(),
            sim: SimConfig {
                boot_delay: Duration::from_millis(200),
                shutdown_delay: Duration::from_millis(100),
                ..Default::default()
            },
            heartbeat_interval: Duration::from_millis(200),
            write_canopyrc: false,
        }
    }
}

pub struct DevCloud {
    pub clc: ClcHandle,
    pub ccs: Vec<ClusterHandle>,
    pub ncs: Vec<NodeHandle>,
    /// Steering handles of the simulated nodes, in the order of `ncs`.
    pub sims: Vec<SimControl>,
    pub admin: AdminCredentials,
    pub admin_token: String,
    pub canopyrc: Option<PathBuf>,
    /// A node runs real guests (libvirt), and the test guest image is registered.
    pub real_guests: bool,
}

impl DevCloud {
    /// Stops the tiers from the bottom up, so nothing reports into a closed tier.
    pub async fn shutdown(self) {
        for nc in self.ncs {
            nc.shutdown().await;
        }
        for cc in self.ccs {
            cc.shutdown().await;
        }
        self.clc.shutdown().await;
    }
}

/// The driver a node gets. `libvirt` checks the host and fails with everything it lacks;
/// `auto` takes libvirt when this build has it and the host passes, else the simulator.
pub async fn node_driver(
    choice: HypervisorChoice,
    nc: &NcFile,
    transport: &canopy_pki::Transport,
) -> Result<Arc<dyn Hypervisor>> {
    let libvirt_options = || -> Result<_> {
        let mut opts = nc.libvirt_options()?;
        opts.transport = transport.clone();
        Ok(opts)
    };
    let sim =
        || -> Result<Arc<dyn Hypervisor>> { Ok(Arc::new(SimHypervisor::new(nc.sim_config()?))) };
    match choice {
        HypervisorChoice::Sim => sim(),
        HypervisorChoice::Libvirt => {
            let opts = libvirt_options()?;
            host::connect_libvirt(&opts).await.map_err(|problems| {
                anyhow::anyhow!("this host cannot run guests with libvirt:\n{problems}")
            })
        }
        HypervisorChoice::Auto => {
            if !host::libvirt_compiled() {
                tracing::info!(
                    "hypervisor auto: this build has no libvirt driver; using the simulator"
                );
                return sim();
            }
            match host::connect_libvirt(&libvirt_options()?).await {
                Ok(driver) => Ok(driver),
                Err(problems) => {
                    tracing::info!(%problems, "hypervisor auto: libvirt is not usable here; using the simulator");
                    sim()
                }
            }
        }
    }
}

pub async fn start(mut opts: DevOptions) -> Result<DevCloud> {
    if opts.zones.is_empty() {
        bail!("at least one availability zone is needed");
    }
    std::fs::create_dir_all(&opts.clc.data_dir)
        .with_context(|| format!("cannot create data dir {}", opts.clc.data_dir.display()))?;
    let rc_path = opts.clc.data_dir.join("canopyrc");
    if opts.write_canopyrc {
        // canopyrc appearing is the "ready" signal: never leave a stale one from last time.
        let _ = std::fs::remove_file(&rc_path);
    }
    let admin_token = bootstrap::admin_token(&opts.clc.data_dir)?;
    opts.clc.admin_token = Some(admin_token.clone());
    let clc = canopy_cloud_controller::start(opts.clc.clone()).await?;
    let admin = bootstrap::bootstrap(&clc.clc).await?;
    let clc_url = bootstrap::client_url(clc.grpc_addr);
    let any = std::net::SocketAddr::from(([127, 0, 0, 1], 0));

    let mut ccs = Vec::new();
    let mut ncs = Vec::new();
    let mut sims = Vec::new();
    // Real guests: one node on this host (several would each claim the whole host).
    let one_host = opts.zones.len() == 1 && opts.nodes_per_zone == 1;
    if opts.hypervisor == HypervisorChoice::Libvirt && !one_host {
        bail!(
            "--hypervisor libvirt runs one node on this host: use one zone and one node per zone"
        );
    }
    let mut real_guests = false;
    for (n, zone) in opts.zones.iter().enumerate() {
        let mut cc_config = CcConfig::new(zone.clone(), any, vec![clc_url.clone()]);
        // A subnet of its own per zone: 172.16.0.0/16, 172.17.0.0/16, … (private space).
        cc_config.subnet = canopy_common::Ipv4Subnet::parse(&format!("172.{}.0.0/16", 16 + n % 16))
            .map_err(|e| anyhow::anyhow!(e))?;
        cc_config.heartbeat_interval = opts.heartbeat_interval;
        cc_config.node_timeout = opts.heartbeat_interval * 5;
        cc_config.resync_interval = opts.clc.resync_interval;
        let cc = canopy_cluster_controller::start(cc_config).await?;
        let cc_url = bootstrap::client_url(cc.local_addr());
        for n in 0..opts.nodes_per_zone {
            let node_id = NodeId::parse(&format!("{zone}-node-{}", n + 1))?;
            let mut nc_config = NcConfig::new(node_id, any, cc_url.clone());
            nc_config.heartbeat_interval = opts.heartbeat_interval;
            nc_config.resync_interval = opts.clc.resync_interval;
            let driver: Arc<dyn Hypervisor> =
                if opts.hypervisor != HypervisorChoice::Sim && one_host {
                    let nc = NcFile {
                        cc: cc_url.clone(),
                        hypervisor: opts.hypervisor,
                        accelerator: opts.accelerator.clone(),
                        state_dir: opts.clc.data_dir.join("nc").display().to_string(),
                        disk_gib: opts.sim.capacity.disk_gib,
                        ..NcFile::default()
                    };
                    node_driver(opts.hypervisor, &nc, &Default::default()).await?
                } else {
                    let sim = Arc::new(SimHypervisor::new(opts.sim.clone()));
                    sims.push(sim.control());
                    sim
                };
            real_guests |= driver.kind() != canopy_node_controller::HypervisorKind::Sim;
            ncs.push(canopy_node_controller::start(nc_config, driver).await?);
        }
        ccs.push(cc);
    }
    let cloud = DevCloud {
        clc,
        ccs,
        ncs,
        sims,
        admin,
        admin_token,
        canopyrc: None,
        real_guests,
    };
    wait_ready(&cloud, &opts).await?;
    if real_guests {
        crate::test_guest::register_if_buildable(&cloud.clc.clc, &cloud.admin, &opts.clc.data_dir)
            .await;
    }
    let canopyrc = if opts.write_canopyrc {
        Some(bootstrap::write_canopyrc(
            &opts.clc.data_dir,
            &cloud.admin,
            cloud.clc.clc.config.region.as_str(),
            cloud.clc.ec2_addr,
            cloud.clc.admin_addr,
            &cloud.admin_token,
        )?)
    } else {
        None
    };
    Ok(DevCloud { canopyrc, ..cloud })
}

/// Waits until every zone's CC is heartbeating with all its nodes, so the first
/// RunInstances after start-up finds capacity.
async fn wait_ready(cloud: &DevCloud, opts: &DevOptions) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = opts.zones.iter().all(|z| {
            cloud.clc.clc.zones.is_available(z, opts.clc.zone_timeout)
                && cloud
                    .clc
                    .clc
                    .zones
                    .get(z)
                    .is_some_and(|l| l.nodes.len() >= opts.nodes_per_zone as usize)
        });
        if ready {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the zones did not come up within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
