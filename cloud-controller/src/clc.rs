//! The cloud controller's shared context and its start-up.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use canopy_common::AccountId;
use canopy_proto::v1::cloud_controller_server::CloudControllerServer;
use tokio::net::TcpListener;
use tokio::sync::{Mutex, Notify, watch};
use tokio::task::JoinHandle;

use crate::config::ClcConfig;
use crate::replication::{CommandLog, LocalLog};
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
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Everything the CLC's edges share.
pub struct Clc {
    pub config: ClcConfig,
    pub store: Arc<Store>,
    pub log: Arc<dyn CommandLog>,
    pub zones: ZoneRegistry,
    pub cc_clients: CcClients,
    /// Signalled after every applied command: the zone reconciler wakes up.
    pub changed: Notify,
    /// Access key id → (account, secret), refreshed when accounts change.
    keys: std::sync::RwLock<HashMap<String, (AccountId, String)>>,
    admins: std::sync::RwLock<std::collections::HashSet<AccountId>>,
    /// Scheduling reads a capacity snapshot and then commits a launch; one launch at a
    /// time so two launches cannot both take the same free room.
    pub launch_lock: Mutex<()>,
}

impl Clc {
    pub async fn new(
        config: ClcConfig,
        store: Arc<Store>,
        log: Arc<dyn CommandLog>,
    ) -> Result<Arc<Clc>, StateError> {
        let clc = Arc::new(Clc {
            config,
            store,
            log,
            zones: ZoneRegistry::default(),
            cc_clients: CcClients::default(),
            changed: Notify::new(),
            keys: Default::default(),
            admins: Default::default(),
            launch_lock: Mutex::new(()),
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
        let out = self.log.submit(command).await?;
        if reload {
            self.reload_keys().await?;
        }
        self.changed.notify_one();
        Ok(out)
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
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl ClcHandle {
    /// Stops serving and waits for in-flight work to end.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        self.clc.store.close().await;
    }
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { what, addr, source })
}

/// Opens the state in `config.data_dir` and serves the EC2 API, the admin API and the
/// CC-facing gRPC service.
pub async fn start(config: ClcConfig) -> Result<ClcHandle, StartError> {
    std::fs::create_dir_all(&config.data_dir).map_err(|source| StartError::DataDir {
        path: config.data_dir.display().to_string(),
        source,
    })?;
    let store = Arc::new(Store::open(&config.data_dir.join("clc.db")).await?);
    let log: Arc<dyn CommandLog> = Arc::new(LocalLog::new(store.clone()));
    let ec2_listener = bind("EC2 API", config.ec2_listen).await?;
    let admin_listener = bind("admin API", config.admin_listen).await?;
    let grpc_listener = bind("gRPC", config.grpc_listen).await?;
    let clc = Clc::new(config, store, log).await?;
    let (shutdown, rx) = watch::channel(false);
    let ec2_addr = ec2_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            what: "EC2 API",
            addr: clc.config.ec2_listen,
            source,
        })?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            what: "admin API",
            addr: clc.config.admin_listen,
            source,
        })?;
    let grpc_addr = grpc_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            what: "gRPC",
            addr: clc.config.grpc_listen,
            source,
        })?;

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
        let svc = CloudControllerServer::new(ZoneService::new(clc.clone()));
        let mut rx = rx.clone();
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(grpc_listener);
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
    tasks.push(tokio::spawn(zones::run_reconciler(clc.clone(), rx.clone())));
    tasks.push(tokio::spawn(zones::run_purger(clc.clone(), rx.clone())));
    tracing::info!(%ec2_addr, %admin_addr, %grpc_addr, region = %clc.config.region, "cloud controller started");
    Ok(ClcHandle {
        clc,
        ec2_addr,
        admin_addr,
        grpc_addr,
        shutdown,
        tasks,
    })
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
