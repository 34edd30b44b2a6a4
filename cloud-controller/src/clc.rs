//! The cloud controller's shared context and its start-up.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use canopy_common::AccountId;
use canopy_proto::v1::cloud_controller_server::CloudControllerServer;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use crate::config::ClcConfig;
use crate::replication::CommandLog;
use crate::replication::raft::{
    RaftLog, RaftServerHandle, ReplicaError, SqliteLogStore, start_replica,
};
use crate::state::{Command, Outcome, StateError, Store};
use crate::zones::{self, CcClients, ZoneRegistry, ZoneService};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot create data dir {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot open the state database: {0}")]
    State(#[from] StateError),
    #[error("cannot start the raft replica: {0}")]
    Replica(#[from] ReplicaError),
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("tls: {0}")]
    Tls(String),
}

/// Everything the CLC's edges share.
pub struct Clc {
    pub config: ClcConfig,
    pub store: Arc<Store>,
    /// This replica of the replicated command log: every change goes through it, and it
    /// says who leads.
    pub replica: RaftLog,
    pub zones: ZoneRegistry,
    pub cc_clients: CcClients,
    /// Clients to the other replicas, for requests forwarded to the leader.
    pub forward_clients: crate::forward::ForwardClients,
    /// Signalled after every applied command: the zone reconciler wakes up.
    pub changed: Notify,
    /// Access key id → (account, secret), refreshed when accounts change.
    keys: std::sync::RwLock<HashMap<String, (AccountId, String)>>,
    admins: std::sync::RwLock<std::collections::HashSet<AccountId>>,
    /// What the zone scheduler counts as taken, including launches still committing.
    pub launches: crate::launches::LaunchLedger,
    /// Image bytes this replica holds (`DATA_DIR/images`).
    pub images: Arc<crate::images::ImageStore>,
    /// The other replicas' image stores: what this one copies, and relays to CCs.
    pub blob_peers: Arc<crate::replication::blobs::BlobPeers>,
    /// When this replica last became the leader (`None` while it is not).
    leader_since: std::sync::Mutex<Option<std::time::Instant>>,
}

impl Clc {
    pub async fn new(
        config: ClcConfig,
        store: Arc<Store>,
        replica: RaftLog,
    ) -> Result<Arc<Clc>, StateError> {
        let images = Arc::new(crate::images::ImageStore::open(
            config.data_dir.join("images"),
        ));
        let transport = config.transport.clone();
        let blob_peers = Arc::new(crate::replication::blobs::BlobPeers::new(
            replica.clone(),
            transport.clone(),
        ));

        let clc = Arc::new(Clc {
            images,
            blob_peers,
            config,
            store,
            replica,
            zones: ZoneRegistry::default(),
            cc_clients: CcClients::new(transport.clone()),
            forward_clients: crate::forward::ForwardClients::new(transport),
            changed: Notify::new(),
            keys: Default::default(),
            admins: Default::default(),
            launches: Default::default(),
            leader_since: std::sync::Mutex::new(None),
        });
        clc.reload_keys().await?;
        Ok(clc)
    }

    /// Submits a command to the log and waits until it is applied.
    pub async fn submit(&self, command: Command) -> Result<Outcome, StateError> {
        let reload = matches!(
            command,
            Command::CreateAccount { .. } | Command::AddAccessKey { .. }
        );
        let out = self.replica.submit(command).await?;
        if reload {
            self.reload_keys().await?;
        }
        self.changed.notify_one();
        Ok(out)
    }

    /// The admin account that owns what operators register (the first, when there are
    /// several).
    pub fn an_admin_account(&self) -> Option<AccountId> {
        self.admins
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .min()
            .cloned()
    }

    /// How long this replica has led without a break; `None` while it does not lead.
    pub fn leading_for(&self) -> Option<std::time::Duration> {
        let since = *self.leader_since.lock().unwrap_or_else(|e| e.into_inner());
        since.map(|t| t.elapsed())
    }

    async fn reload_keys(&self) -> Result<(), StateError> {
        let keys = self.store.access_keys().await?;
        let map = keys.into_iter().map(|(k, a, s)| (k, (a, s))).collect();
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = map;
        let admins = self
            .store
            .accounts()
            .await?
            .into_iter()
            .filter(|a| a.is_admin)
            .map(|a| a.account_id)
            .collect();
        *self.admins.write().unwrap_or_else(|e| e.into_inner()) = admins;
        Ok(())
    }

    /// True when the account may use the admin API.
    pub fn is_admin(&self, account: &AccountId) -> bool {
        self.admins
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(account)
    }

    /// Verifies a SigV4-signed HTTP request made for `service`, with this cloud's region,
    /// clock-skew limit and access keys. Returns the access key and its account.
    pub fn verify_sigv4(
        &self,
        service: &str,
        method: &axum::http::Method,
        uri: &axum::http::Uri,
        headers: &axum::http::HeaderMap,
        body: &[u8],
    ) -> Result<(String, AccountId), canopy_ec2_wire::sigv4::AuthError> {
        use canopy_ec2_wire::sigv4::{self, RequestParts, VerifyConfig};
        let header_list: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let parts = RequestParts {
            method: method.as_str(),
            path: uri.path(),
            query: uri.query().unwrap_or(""),
            headers: &header_list,
            body,
        };
        let cfg = VerifyConfig {
            region: self.config.region.as_str(),
            service,
            now: chrono::Utc::now(),
            max_skew: self.config.max_clock_skew,
        };
        let mut account = None;
        let key = sigv4::verify(&parts, &cfg, |ak| {
            self.credentials(ak).map(|(a, secret)| {
                account = Some(a);
                secret
            })
        })?;
        // verify() succeeds only after the lookup returned a secret, so the account is set.
        let account = account.ok_or(sigv4::AuthError::AuthFailure)?;
        Ok((key, account))
    }

    /// The account and secret of an access key.
    pub fn credentials(&self, access_key_id: &str) -> Option<(AccountId, String)> {
        self.keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(access_key_id)
            .cloned()
    }
}

/// A running cloud controller.
pub struct ClcHandle {
    pub clc: Arc<Clc>,
    pub ec2_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    /// Where this replica serves Raft RPCs and forwarded requests.
    pub raft_addr: SocketAddr,
    raft_server: Option<RaftServerHandle>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl ClcHandle {
    /// Stops serving and waits for in-flight work to end.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        self.clc.replica.shutdown().await;
        if let Some(server) = self.raft_server.take() {
            server.shutdown().await;
        }
        self.clc.store.close().await;
    }
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { what, addr, source })
}

/// Opens the state in `config.data_dir`, starts this Raft replica (forming the group when
/// its log is empty, unless it joins an existing one), and serves the EC2 API, the admin API
/// and the CC-facing gRPC service. Every replica serves all three; followers hand client
/// requests to the leader.
pub async fn start(config: ClcConfig) -> Result<ClcHandle, StartError> {
    if let canopy_pki::Transport::Tls(tls) = &config.transport {
        let id = &tls.own.identity;
        if id.role != canopy_pki::Role::Clc || id.name != config.replica.id.to_string() {
            return Err(StartError::Tls(format!(
                "the certificate is for {id}, not clc/{}",
                config.replica.id
            )));
        }
    }
    std::fs::create_dir_all(&config.data_dir).map_err(|source| StartError::DataDir {
        path: config.data_dir.display().to_string(),
        source,
    })?;
    let store = Arc::new(Store::open(&config.data_dir.join("clc.db")).await?);
    let ec2_listener = bind("EC2 API", config.ec2_listen).await?;
    let admin_listener = bind("admin API", config.admin_listen).await?;
    let grpc_listener = bind("gRPC", config.grpc_listen).await?;
    // The Raft log has a database of its own: appends never wait for the state's writer.
    let log_store = SqliteLogStore::open(&config.data_dir.join("raft-log.db"))
        .await
        .map_err(StateError::from)?;
    let rc = &config.replica;
    let (replica, raft_server) = start_replica(
        rc.id,
        store.clone(),
        log_store,
        rc.raft_listen,
        rc.timers.clone(),
        config.transport.clone(),
    )
    .await?;
    form_group(&config, &replica, &raft_server).await?;
    let raft_addr = raft_server.local_addr();
    let clc = Clc::new(config, store, replica).await?;
    raft_server.serve_forwarded(Arc::new(crate::forward::ForwardServer::new(clc.clone())));
    raft_server.serve_blobs(clc.images.clone());
    let (shutdown, rx) = watch::channel(false);
    let local = |l: &TcpListener, what: &'static str, addr: SocketAddr| {
        l.local_addr()
            .map_err(|source| StartError::Bind { what, addr, source })
    };
    let ec2_addr = local(&ec2_listener, "EC2 API", clc.config.ec2_listen)?;
    let admin_addr = local(&admin_listener, "admin API", clc.config.admin_listen)?;
    let grpc_addr = local(&grpc_listener, "gRPC", clc.config.grpc_listen)?;

    let mut tasks = Vec::new();
    tasks.push(serve_http(
        ec2_listener,
        crate::ec2::router(clc.clone()),
        rx.clone(),
    ));
    tasks.push(serve_http(
        admin_listener,
        crate::admin::router(clc.clone()),
        rx.clone(),
    ));
    {
        // Only cluster controllers may call.
        let transport = &clc.config.transport;
        let svc = CloudControllerServer::with_interceptor(
            ZoneService::new(clc.clone()),
            transport.authorize(&[canopy_pki::Role::Zone]),
        );
        let mut rx = rx.clone();
        let incoming = transport
            .incoming(grpc_listener, false)
            .map_err(|e| StartError::Tls(e.to_string()))?;
        tasks.push(tokio::spawn(async move {
            let res = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = rx.changed().await;
                })
                .await;
            if let Err(e) = res {
                tracing::error!(error = %e, "CLC gRPC server failed");
            }
        }));
    }
    tasks.push(tokio::spawn(follow_raft(clc.clone(), rx.clone())));
    tasks.push(tokio::spawn(zones::run_reconciler(clc.clone(), rx.clone())));
    tasks.push(tokio::spawn(zones::run_purger(clc.clone(), rx.clone())));
    tasks.push(tokio::spawn(crate::replication::blobs::run(
        clc.blob_peers.clone(),
        clc.images.clone(),
        rx.clone(),
    )));
    tasks.push(tokio::spawn(follow_revocations(clc.clone(), rx.clone())));
    tracing::info!(%ec2_addr, %admin_addr, %grpc_addr, %raft_addr, replica = clc.replica.id(), region = %clc.config.region, "cloud controller started");
    Ok(ClcHandle {
        clc,
        ec2_addr,
        admin_addr,
        grpc_addr,
        raft_addr,
        raft_server: Some(raft_server),
        shutdown,
        tasks,
    })
}

/// Gives a replica with an empty log its first membership: the configured initial members,
/// or itself alone. Every initial member does this with the same list, which openraft
/// allows; a replica that joins waits to be added instead.
async fn form_group(
    config: &ClcConfig,
    replica: &RaftLog,
    server: &RaftServerHandle,
) -> Result<(), StartError> {
    let rc = &config.replica;
    let initialized = replica
        .raft()
        .is_initialized()
        .await
        .map_err(ReplicaError::from)?;
    if initialized || rc.join {
        if !initialized {
            tracing::info!(id = rc.id, "empty log: waiting to be added to a group");
        }
        return Ok(());
    }
    let members: std::collections::BTreeMap<u64, openraft::BasicNode> =
        if rc.initial_members.is_empty() {
            let me = rc
                .raft_advertise
                .clone()
                .unwrap_or_else(|| server.node().addr);
            [(rc.id, openraft::BasicNode::new(me))].into()
        } else {
            rc.initial_members
                .iter()
                .map(|(id, url)| (*id, openraft::BasicNode::new(url.clone())))
                .collect()
        };
    tracing::info!(id = rc.id, ?members, "forming the raft group");
    match replica.initialize(members).await {
        Ok(()) => Ok(()),
        // Another initial member got there first: the group exists, which is the goal.
        Err(ReplicaError::Initialize(e))
            if matches!(
                *e,
                openraft::error::RaftError::APIError(openraft::error::InitializeError::NotAllowed(
                    _
                ))
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// Keeps the transport's revocation list equal to the state's (revocations arrive through
/// the log, on every replica), checked every second.
async fn follow_revocations(clc: Arc<Clc>, mut shutdown: watch::Receiver<bool>) {
    let transport = &clc.config.transport;
    if !transport.is_tls() {
        return;
    }
    loop {
        match clc.store.revoked_serials().await {
            Ok(serials) => {
                if transport.revocations().replace(serials) {
                    tracing::info!("certificate revocation list updated");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the revoked certificates"),
        }
        tokio::select! {
            _ = shutdown.changed() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Follows this replica's Raft state: notes when it becomes or stops being the leader, wakes
/// the reconciler when commands were applied (here or by replication), and keeps the access
/// key cache current with accounts that arrived through the log.
async fn follow_raft(clc: Arc<Clc>, mut shutdown: watch::Receiver<bool>) {
    let mut metrics = clc.replica.raft().metrics();
    let mut applied = None;
    let mut last_reload = std::time::Instant::now();
    let mut stale_keys = false;
    loop {
        let (leading, now_applied) = {
            let m = metrics.borrow_and_update();
            (
                crate::replication::raft::leads(clc.replica.id(), &m),
                m.last_applied,
            )
        };
        let became_leader = {
            let mut since = clc.leader_since.lock().unwrap_or_else(|e| e.into_inner());
            let became = leading && since.is_none();
            match (leading, since.is_some()) {
                (true, false) => *since = Some(std::time::Instant::now()),
                (false, true) => *since = None,
                _ => {}
            }
            became
        };
        if became_leader {
            tracing::info!(id = clc.replica.id(), "this replica is now the leader");
        }
        if now_applied != applied {
            applied = now_applied;
            stale_keys = true;
            clc.changed.notify_one();
        }
        // Reloading reads two small tables; at most four times a second is plenty for keys
        // that arrive by replication (a leader reloads at once after its own changes).
        if (stale_keys && last_reload.elapsed() >= std::time::Duration::from_millis(250))
            || became_leader
        {
            if let Err(e) = clc.reload_keys().await {
                tracing::warn!(error = %e, "reloading access keys failed");
            }
            stale_keys = false;
            last_reload = std::time::Instant::now();
        }
        let wake = if stale_keys {
            std::time::Duration::from_millis(250)
        } else {
            std::time::Duration::from_secs(3600)
        };
        tokio::select! {
            changed = metrics.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(wake) => {}
            _ = shutdown.changed() => return,
        }
    }
}

fn serve_http(
    listener: TcpListener,
    router: axum::Router,
    mut rx: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        use axum::serve::ListenerExt;
        // EC2 clients wait for whole responses; Nagle's delay would cap them at tens of calls/s.
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let res = axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = rx.changed().await;
            })
            .await;
        if let Err(e) = res {
            tracing::error!(error = %e, "HTTP server failed");
        }
    })
}
