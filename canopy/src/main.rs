//! The `canopy` binary: one executable, one role per subcommand.

mod doctor;

use std::path::PathBuf;

use anyhow::{Context, Result};
use canopy::admin_cli::{AdminClient, AdminCommand};
use canopy::bootstrap;
use canopy::config::{self, CcFile, ClcFile, HypervisorChoice, NcFile};
use canopy::dev::{self, DevOptions};
use canopy_common::ZoneName;
use clap::{Parser, Subcommand};
use serde::Serialize;

#[derive(Parser)]
#[command(
    name = "canopy",
    version,
    about = "Canopy: an EC2-compatible private cloud"
)]
struct Cli {
    #[command(subcommand)]
    role: Role,
}

#[derive(Subcommand)]
enum Role {
    /// The whole cloud in one process (CLC, a CC per zone, simulated nodes); writes DIR/canopyrc when ready.
    Dev(DevArgs),
    /// A cloud controller: EC2 API, admin API, state.
    Clc(ClcArgs),
    /// A cluster controller for one availability zone.
    Cc(CcArgs),
    /// A node controller on a hypervisor host.
    Nc(NcArgs),
    /// Operator commands over the admin API.
    Admin(AdminArgs),
    /// Load tool: drives a running cloud (the environment canopyrc exports) and reports throughput.
    Bench(BenchArgs),
    /// The cloud CA: create it, issue component certificates.
    Ca(CaArgs),
}

#[derive(clap::Args)]
struct CaArgs {
    #[command(subcommand)]
    command: canopy::pki::CaCommand,
}

#[derive(clap::Args)]
struct BenchArgs {
    #[command(subcommand)]
    workload: BenchWorkload,
}

#[derive(Subcommand)]
enum BenchWorkload {
    /// One RunInstances per request (each with its own ClientToken) from concurrent clients.
    RunInstances {
        /// Concurrent clients.
        #[arg(long, default_value_t = 1)]
        clients: usize,
        /// How long to run, in seconds.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        #[arg(long, default_value = "t2.nano")]
        instance_type: String,
        /// Image to launch (default: the first DescribeImages returns).
        #[arg(long)]
        image_id: Option<String>,
        /// Terminate the launched instances afterwards (not timed).
        #[arg(long)]
        cleanup: bool,
        /// Other replicas' EC2 endpoints to spread the clients over (repeat or comma-separate).
        #[arg(long = "also-endpoint", value_delimiter = ',')]
        also_endpoints: Vec<String>,
    },
}

/// CLC flags; each is also read from the environment variable named.
#[derive(clap::Args, Serialize, Default)]
struct ClcFlags {
    /// Where state and secrets live.
    #[arg(long, env = "CANOPY_DATA_DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    data_dir: Option<PathBuf>,
    /// Region name (default canopy-1).
    #[arg(long, env = "CANOPY_REGION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    region: Option<String>,
    /// EC2 Query API address (default 127.0.0.1:8773).
    #[arg(long, env = "CANOPY_EC2_LISTEN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    ec2_listen: Option<String>,
    /// Admin API address (default 127.0.0.1:8774).
    #[arg(long, env = "CANOPY_ADMIN_LISTEN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    admin_listen: Option<String>,
    /// Elastic IP pool, CIDR blocks (repeat or comma-separate; default 198.51.100.0/24).
    #[arg(long = "public-ips", env = "CANOPY_PUBLIC_IPS", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    public_ips: Vec<String>,
}

#[derive(clap::Args)]
struct DevArgs {
    #[command(flatten)]
    clc: ClcFlags,
    /// TOML file with CLC settings (keys as in `canopy clc`).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Availability zones to run, each with its own CC (repeat or comma-separate).
    #[arg(long = "zone", value_delimiter = ',', default_value = "canopy-1a")]
    zones: Vec<String>,
    /// Simulated nodes per zone.
    #[arg(long, default_value_t = 1)]
    nodes_per_zone: u32,
    /// Which hypervisor driver the nodes use. libvirt (or auto on a host that can) runs
    /// one node with real guests and registers the test guest image.
    #[arg(long, value_enum, default_value_t = HypervisorChoice::Auto)]
    hypervisor: HypervisorChoice,
    /// Guest accelerator with libvirt: auto (probe), kvm or qemu (software emulation).
    #[arg(long, default_value = "auto")]
    accelerator: String,
    /// Size of each simulated node (benchmarks want big ones).
    #[arg(long, default_value_t = 16)]
    node_vcpus: u32,
    #[arg(long, default_value_t = 32 * 1024)]
    node_memory_mib: u64,
    #[arg(long, default_value_t = 500)]
    node_disk_gib: u64,
}

#[derive(clap::Args)]
struct ClcArgs {
    #[command(flatten)]
    clc: ClcFlags,
    /// gRPC address the cluster controllers call (default 127.0.0.1:8776).
    #[arg(long, env = "CANOPY_GRPC_LISTEN")]
    grpc_listen: Option<String>,
    /// TOML config file.
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    replica: ReplicaFlags,
    /// TLS directory: ca.crt, tls.crt, tls.key (`canopy ca issue --role clc`), and ca.key
    /// to sign joining nodes' certificates.
    #[arg(long, env = "CANOPY_TLS_DIR")]
    tls_dir: Option<PathBuf>,
}

/// The replicated CLC (docs/operations.md). Without them a CLC is a group of one.
#[derive(clap::Args, Serialize, Default)]
struct ReplicaFlags {
    /// This replica's id, unique in the group (default 1).
    #[arg(long, env = "CANOPY_REPLICA_ID")]
    #[serde(skip_serializing_if = "Option::is_none")]
    replica_id: Option<u64>,
    /// Address for Raft RPCs and forwarded requests (default 127.0.0.1:8778).
    #[arg(long, env = "CANOPY_RAFT_LISTEN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    raft_listen: Option<String>,
    /// URL other replicas reach this one at (default http://RAFT_LISTEN).
    #[arg(long, env = "CANOPY_RAFT_ADVERTISE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    raft_advertise: Option<String>,
    /// The group's first members as ID=HOST:PORT (repeat or comma-separate), this one included.
    #[arg(long = "members", env = "CANOPY_MEMBERS", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    members: Vec<String>,
    /// Join an existing group: start empty and wait for `canopy admin add-replica`.
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    join: bool,
}

#[derive(clap::Args, Serialize)]
struct CcArgs {
    /// TOML config file.
    #[arg(long)]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Availability zone name.
    #[arg(long, env = "CANOPY_ZONE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    zone: Option<String>,
    /// gRPC address (default 127.0.0.1:8775).
    #[arg(long, env = "CANOPY_CC_LISTEN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    listen: Option<String>,
    /// URL the CLC uses to reach this CC (default: http://LISTEN; required when LISTEN is
    /// 0.0.0.0).
    #[arg(long, env = "CANOPY_CC_ADVERTISE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    advertise: Option<String>,
    /// CLC gRPC endpoints (repeat or comma-separate).
    #[arg(long = "clc", env = "CANOPY_CLC", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    clc: Vec<String>,
    /// The zone's subnet, where instances' private addresses come from (default 172.31.0.0/16).
    #[arg(long, env = "CANOPY_SUBNET")]
    #[serde(skip_serializing_if = "Option::is_none")]
    subnet: Option<String>,
    /// TLS directory: ca.crt, tls.crt, tls.key (`canopy ca issue --role zone`).
    #[arg(long, env = "CANOPY_TLS_DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_dir: Option<PathBuf>,
}

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
struct NcArgs {
    #[command(subcommand)]
    command: Option<NcCommand>,
    #[command(flatten)]
    flags: NcFlags,
}

#[derive(Subcommand)]
enum NcCommand {
    /// Checks this host for running a node (libvirt, QEMU, the accelerator, disk space, the
    /// clock, the CC) with the node's configuration, says what to fix, and exits 1 when a
    /// check fails.
    Doctor(Box<NcFlags>),
}

/// A node's settings, for `canopy nc` and `canopy nc doctor`.
#[derive(clap::Args, Serialize)]
struct NcFlags {
    /// TOML config file.
    #[arg(long)]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Node id (default: the host name).
    #[arg(long, env = "CANOPY_NODE_ID")]
    #[serde(skip_serializing_if = "Option::is_none")]
    node_id: Option<String>,
    /// gRPC address (default 127.0.0.1:8777).
    #[arg(long, env = "CANOPY_NC_LISTEN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    listen: Option<String>,
    /// URL the CC uses to reach this node (default: http://LISTEN; required when LISTEN is
    /// 0.0.0.0).
    #[arg(long, env = "CANOPY_NC_ADVERTISE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    advertise: Option<String>,
    /// The zone's CC endpoint.
    #[arg(long, env = "CANOPY_CC")]
    #[serde(skip_serializing_if = "Option::is_none")]
    cc: Option<String>,
    /// Which hypervisor driver to use.
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    hypervisor: Option<HypervisorChoice>,
    /// Capacity offered (simulated driver).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    vcpus: Option<u32>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    memory_mib: Option<u64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    disk_gib: Option<u64>,
    /// libvirt connection URI (default qemu:///system).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    libvirt_uri: Option<String>,
    /// Guest accelerator: auto (probe), kvm or qemu (software emulation).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    accelerator: Option<String>,
    /// Where instance disks, console logs and the image cache live (libvirt).
    #[arg(long, env = "CANOPY_NC_STATE_DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    state_dir: Option<String>,
    /// Bound of the image cache, in GiB (libvirt).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    image_cache_gib: Option<u64>,
    /// Serve the instance metadata service to this node's guests here (e.g. 169.254.169.254:80).
    #[arg(long, env = "CANOPY_METADATA_LISTEN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata_listen: Option<String>,
    /// TLS directory: ca.crt, tls.crt, tls.key; a new node fills it by joining.
    #[arg(long, env = "CANOPY_TLS_DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_dir: Option<PathBuf>,
    /// Join token (`canopy admin create-join-token`), spent once when the TLS directory
    /// holds no certificate yet.
    #[arg(long, env = "CANOPY_JOIN_TOKEN", hide_env_values = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    join_token: Option<String>,
}

#[derive(clap::Args)]
struct AdminArgs {
    /// Admin API URL.
    #[arg(
        long,
        env = "CANOPY_ADMIN_ENDPOINT",
        default_value = "http://127.0.0.1:8774"
    )]
    endpoint: String,
    /// Admin token (canopyrc exports it).
    #[arg(long, env = "CANOPY_ADMIN_TOKEN", hide_env_values = true)]
    token: String,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: AdminCommand,
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CANOPY_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,h2=warn,hyper=warn,tower=warn,openraft=warn")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
    }
    tracing::info!("shutting down");
}

fn clc_config(
    flags: &ClcFlags,
    grpc_listen: Option<&str>,
    replica: &ReplicaFlags,
    file: Option<&std::path::Path>,
    tls_dir: Option<&std::path::Path>,
) -> Result<(canopy_cloud_controller::ClcConfig, Option<PathBuf>)> {
    let mut overrides = serde_json::to_value(flags)?;
    if let Some(g) = grpc_listen {
        overrides["grpc_listen"] = g.into();
    }
    if let Some(t) = tls_dir {
        overrides["tls_dir"] = t.to_string_lossy().into_owned().into();
    }
    if let (Some(o), serde_json::Value::Object(r)) =
        (overrides.as_object_mut(), serde_json::to_value(replica)?)
    {
        o.extend(r);
    }
    let cfg: ClcFile = config::load(file, overrides)?;
    Ok((cfg.validate()?, cfg.tls_dir))
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    // Servers log; commands for people print (the doctor's findings would mix with logs).
    let quiet = match &cli.role {
        Role::Admin(_) | Role::Bench(_) | Role::Ca(_) => true,
        Role::Nc(nc) => nc.command.is_some(),
        _ => false,
    };
    if !quiet {
        init_logging();
    }
    match cli.role {
        Role::Dev(args) => run_dev(args).await,
        Role::Clc(args) => run_clc(args).await,
        Role::Cc(args) => run_cc(args).await,
        Role::Nc(args) => run_nc(args).await,
        Role::Ca(args) => {
            print!("{}", canopy::pki::run(args.command)?);
            Ok(())
        }
        Role::Bench(args) => match args.workload {
            BenchWorkload::RunInstances {
                clients,
                seconds,
                instance_type,
                image_id,
                cleanup,
                also_endpoints,
            } => {
                if clients == 0 || !(seconds.is_finite() && seconds > 0.0) {
                    anyhow::bail!("--clients and --seconds must be positive");
                }
                let load = canopy::bench::RunInstancesLoad {
                    clients,
                    duration: std::time::Duration::from_secs_f64(seconds),
                    instance_type,
                    image_id,
                    cleanup,
                    extra_endpoints: also_endpoints,
                };
                print!(
                    "{}",
                    canopy::bench::run_instances(&canopy::bench::Target::from_env()?, &load)
                        .await?
                );
                Ok(())
            }
        },
        Role::Admin(args) => {
            let client = AdminClient {
                endpoint: args.endpoint,
                token: args.token,
            };
            print!("{}", client.run(args.command, args.json).await?);
            Ok(())
        }
    }
}

async fn run_dev(args: DevArgs) -> Result<()> {
    // One process, one replica: its gRPC and Raft ports are internal, so any free port does.
    let replica = ReplicaFlags {
        raft_listen: Some("127.0.0.1:0".into()),
        ..Default::default()
    };
    let (mut clc, _) = clc_config(
        &args.clc,
        Some("127.0.0.1:0"),
        &replica,
        args.config.as_deref(),
        None,
    )?;
    clc.data_dir = std::path::absolute(&clc.data_dir)?;
    let zones = args
        .zones
        .iter()
        .map(|z| {
            ZoneName::parse(z).with_context(|| format!("--zone: {z:?} is not a valid zone name"))
        })
        .collect::<Result<Vec<_>>>()?;
    let nc = NcFile {
        vcpus: args.node_vcpus,
        memory_mib: args.node_memory_mib,
        disk_gib: args.node_disk_gib,
        ..NcFile::default()
    };
    let opts = DevOptions {
        clc,
        zones,
        nodes_per_zone: args.nodes_per_zone.max(1),
        hypervisor: args.hypervisor,
        accelerator: args.accelerator,
        sim: nc.sim_config()?,
        heartbeat_interval: std::time::Duration::from_secs(1),
        write_canopyrc: true,
    };
    let cloud = dev::start(opts).await?;
    let rc = cloud.canopyrc.clone().unwrap_or_default();
    let image_query = if cloud.real_guests {
        "--filters Name=name,Values=canopy-test-guest --query 'Images[0].ImageId'"
    } else {
        "--query 'Images[0].ImageId'"
    };
    eprintln!(
        "\nCanopy is up: EC2 API http://{}  admin API http://{}\n  source {}\n  aws ec2 describe-images\n  aws ec2 run-instances --image-id $(aws ec2 describe-images {image_query} --output text) --instance-type t2.micro --count 1\nCtrl-C stops it; the same --data-dir keeps state and keys.\n",
        cloud.clc.ec2_addr,
        cloud.clc.admin_addr,
        rc.display()
    );
    shutdown_signal().await;
    cloud.shutdown().await;
    Ok(())
}

async fn run_clc(args: ClcArgs) -> Result<()> {
    let (mut cfg, tls_dir) = clc_config(
        &args.clc,
        args.grpc_listen.as_deref(),
        &args.replica,
        args.config.as_deref(),
        args.tls_dir.as_deref(),
    )?;
    let tls_dir = canopy::pki::required("canopy clc", tls_dir)?;
    let new_cloud_of_one = cfg.replica.initial_members.is_empty()
        && !cfg.replica.join
        && !cfg.data_dir.join("clc.db").exists();
    if new_cloud_of_one {
        canopy::pki::bootstrap_ca(&tls_dir, cfg.replica.id, cfg.region.as_str())?;
    }
    cfg.transport = canopy::pki::transport(&tls_dir)?;
    cfg.ca = canopy::pki::load_ca(&tls_dir)?;
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("cannot create {}", cfg.data_dir.display()))?;
    let token = bootstrap::admin_token(&cfg.data_dir)?;
    cfg.admin_token = Some(token.clone());
    let handle = canopy_cloud_controller::start(cfg.clone()).await?;
    let creds = bootstrap::bootstrap(&handle.clc).await?;
    let rc = bootstrap::write_canopyrc(
        &cfg.data_dir,
        &creds,
        cfg.region.as_str(),
        handle.ec2_addr,
        handle.admin_addr,
        &token,
    )?;
    tracing::info!(canopyrc = %rc.display(), "cloud controller ready");
    shutdown_signal().await;
    handle.shutdown().await;
    Ok(())
}

async fn run_cc(args: CcArgs) -> Result<()> {
    let file: CcFile = config::load(args.config.as_deref(), &args)?;
    let mut cfg = file.validate()?;
    let tls_dir = canopy::pki::required("canopy cc", file.tls_dir.clone())?;
    cfg.transport = canopy::pki::transport(&tls_dir)?;
    let handle = canopy_cluster_controller::start(cfg).await?;
    tracing::info!(addr = %handle.local_addr(), "cluster controller ready");
    shutdown_signal().await;
    handle.shutdown().await;
    Ok(())
}

async fn run_nc(args: NcArgs) -> Result<()> {
    let args = match args.command {
        Some(NcCommand::Doctor(flags)) => {
            let passed = doctor::run(flags.config.as_deref(), &flags).await;
            std::process::exit(if passed { 0 } else { 1 });
        }
        None => args.flags,
    };
    let file: NcFile = config::load(args.config.as_deref(), &args)?;
    let mut cfg = file.validate()?;
    let tls_dir = canopy::pki::required("canopy nc", file.tls_dir.clone())?;
    if !canopy_pki::TlsFiles::present(&tls_dir) {
        // An empty token (a variable set but empty) is no token.
        let token = file.join_token.as_deref().filter(|t| !t.trim().is_empty()).with_context(|| {
            format!(
                "{} holds no certificate: give a join token (--join-token, from `canopy admin create-join-token`) or the node's files (`canopy ca issue --role node`)",
                tls_dir.display()
            )
        })?;
        canopy::pki::join(&tls_dir, token, &cfg.cc_endpoint, &cfg.node_id).await?;
    }
    cfg.transport = canopy::pki::transport(&tls_dir)?;
    let driver = dev::node_driver(file.hypervisor, &file, &cfg.transport).await?;
    let handle = canopy_node_controller::start(cfg, driver).await?;
    tracing::info!(addr = %handle.local_addr(), "node controller ready");
    shutdown_signal().await;
    handle.shutdown().await;
    Ok(())
}
