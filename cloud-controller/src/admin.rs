//! The admin API: JSON over HTTP on its own address, for operators and `canopy admin`.
//! Every request needs admin credentials: `Authorization: Bearer <CANOPY_ADMIN_TOKEN>`, or
//! SigV4 (service `canopy-admin`) with the access key of an admin account.
//!
//! The OpenAPI document is generated from these handlers (utoipa) and checked in at
//! docs/admin-openapi.json; a test fails when the two drift apart.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::Path;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use canopy_common::Resources;
use serde::Serialize;
use utoipa::{Modify, OpenApi, ToSchema};

use crate::clc::Clc;
use crate::state::{InstanceFilter, StateError};

/// The SigV4 service name the admin API verifies.
pub const ADMIN_SIGV4_SERVICE: &str = "canopy-admin";

#[derive(OpenApi)]
#[openapi(
    info(title = "Canopy admin API", version = "1", description = "Operator API of the Canopy cloud controller."),
    paths(list_zones, list_nodes, list_instances, list_images, upload_image, list_accounts, create_account, cluster_status, replica_status, replica_digest, add_member, remove_member, crate::admin_pki::create_join_token, crate::admin_pki::list_join_tokens, crate::admin_pki::list_certificates, crate::admin_pki::revoke),
    components(schemas(ZoneView, NodeView, InstanceView, ImageView, ResourcesView, ErrorBody, ClusterView, MemberView, AddMember, AccountView, NewAccount, CreatedAccount, crate::state::StateDigest, crate::admin_pki::NewJoinToken, crate::admin_pki::CreatedJoinToken, crate::admin_pki::JoinTokenView, crate::admin_pki::CertificateView, crate::admin_pki::Revoke, crate::admin_pki::Revoked)),
    modifiers(&BearerAuth),
    security(("bearer" = []), ("sigv4" = []))
)]
pub struct AdminApi;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{
            ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme,
        };
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components.add_security_scheme(
            "sigv4",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "Authorization",
                "AWS Signature Version 4, service canopy-admin, with an admin account's key",
            ))),
        );
    }
}

/// The OpenAPI document as checked in.
pub fn openapi_json() -> String {
    let mut s = AdminApi::openapi().to_pretty_json().unwrap_or_default();
    s.push('\n');
    s
}

#[derive(Debug, Clone, Copy, Serialize, ToSchema, serde::Deserialize, PartialEq, Eq)]
pub struct ResourcesView {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
}

impl From<Resources> for ResourcesView {
    fn from(r: Resources) -> Self {
        Self {
            vcpus: r.vcpus,
            memory_mib: r.memory_mib,
            disk_gib: r.disk_gib,
        }
    }
}

#[derive(Debug, Serialize, serde::Deserialize, ToSchema)]
pub struct ZoneView {
    pub zone: String,
    pub endpoint: String,
    /// True while the zone's CC heartbeats.
    pub available: bool,
    /// Desired-state generation held by the CLC.
    pub generation: u64,
    /// Generation the CC last reported applied.
    pub applied_generation: u64,
    pub node_count: usize,
    /// RFC 3339; absent when the CC has not heartbeated since this CLC started.
    pub last_heartbeat: Option<String>,
}

#[derive(Debug, Serialize, serde::Deserialize, ToSchema)]
pub struct NodeView {
    pub zone: String,
    pub node_id: String,
    pub hypervisor: String,
    /// How the node runs guests (e.g. why KVM or software emulation); empty for the
    /// simulator.
    pub hypervisor_detail: String,
    pub capacity: ResourcesView,
    pub allocated: ResourcesView,
    pub healthy: bool,
    pub instance_count: u32,
    pub last_heartbeat: String,
}

#[derive(Debug, Serialize, serde::Deserialize, ToSchema)]
pub struct InstanceView {
    pub instance_id: String,
    pub account_id: String,
    pub zone: String,
    pub node_id: Option<String>,
    pub state: String,
    pub desired: String,
    pub instance_type: String,
    pub image_id: String,
    pub launch_time: String,
}

/// An image and its bytes, deregistered ones included (their bytes stay while instances
/// need them).
#[derive(Debug, Serialize, serde::Deserialize, ToSchema)]
pub struct ImageView {
    pub image_id: String,
    pub name: String,
    /// machine, kernel or ramdisk.
    pub kind: String,
    pub state: String,
    pub owner_id: String,
    pub public: bool,
    pub kernel_id: Option<String>,
    pub ramdisk_id: Option<String>,
    /// Content address of the bytes; none for an image without content.
    pub sha256: Option<String>,
    pub size_bytes: u64,
    pub disk_format: Option<String>,
    pub location: String,
}

/// Query parameters of an upload.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
pub struct UploadParams {
    /// Name (as EC2's: 3 to 128 characters of letters, digits, spaces and `()[]./-'@_`).
    pub name: String,
    pub description: Option<String>,
    /// The kernel a machine image boots with.
    pub kernel_id: Option<String>,
    pub ramdisk_id: Option<String>,
    /// Every account may launch it.
    #[serde(default)]
    pub public: bool,
}

#[derive(Debug, Serialize, serde::Deserialize, ToSchema)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
}

pub(crate) fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(ErrorBody {
            code: code.into(),
            message: message.into(),
        }),
    )
        .into_response()
}

/// A JSON request body, or the 400 answer that names what is wrong with it.
pub(crate) fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Box<Response>> {
    serde_json::from_slice(body).map_err(|e| {
        Box::new(error(
            StatusCode::BAD_REQUEST,
            "InvalidParameterValue",
            &e.to_string(),
        ))
    })
}

pub(crate) fn internal(e: StateError) -> Response {
    tracing::error!(error = %e, "admin API state error");
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "InternalError",
        "internal error",
    )
}

fn ms_to_rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

pub fn router(clc: Arc<Clc>) -> axum::Router {
    axum::Router::new()
        .route("/v1/zones", get(list_zones))
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/instances", get(list_instances))
        .route(UPLOAD_PATH, get(list_images).post(upload_image))
        .route("/v1/accounts", get(list_accounts).post(create_account))
        .route("/v1/cluster", get(cluster_status))
        .route("/v1/cluster/members", post(add_member))
        .route("/v1/cluster/members/{id}", delete(remove_member))
        .route("/v1/replica", get(replica_status))
        .route("/v1/replica/digest", get(replica_digest))
        .route(
            "/v1/join-tokens",
            get(crate::admin_pki::list_join_tokens).post(crate::admin_pki::create_join_token),
        )
        .route("/v1/certificates", get(crate::admin_pki::list_certificates))
        .route("/v1/revocations", post(crate::admin_pki::revoke))
        .route(
            "/openapi.json",
            get(|| async { ([(header::CONTENT_TYPE, "application/json")], openapi_json()) }),
        )
        // Credentials are checked where the request arrives, then it goes to the leader.
        .layer(middleware::from_fn_with_state(
            (clc.clone(), crate::forward::Api::Admin),
            crate::forward::to_leader,
        ))
        .layer(middleware::from_fn_with_state(clc.clone(), authorize))
        .with_state(clc)
}

/// Images: listed with GET, uploaded with POST.
pub const UPLOAD_PATH: &str = "/v1/images";

/// An image upload: its body is streamed into the store, never held in memory.
pub fn is_upload(method: &axum::http::Method, uri: &axum::http::Uri) -> bool {
    method == axum::http::Method::POST && uri.path() == UPLOAD_PATH
}

async fn authorize(State(clc): State<Arc<Clc>>, req: Request, next: Next) -> Response {
    if req
        .extensions()
        .get::<crate::forward::Forwarded>()
        .is_some_and(|f| f.authenticated)
    {
        return next.run(req).await;
    }
    if is_upload(req.method(), req.uri()) {
        // SigV4 signs the body's hash, which would mean reading the whole image first:
        // uploads take the admin token.
        let bearer = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.starts_with("Bearer "));
        if !bearer {
            return error(
                StatusCode::UNAUTHORIZED,
                "MissingAuthenticationToken",
                "image uploads authenticate with the admin token (Authorization: Bearer)",
            );
        }
        let empty = Bytes::new();
        if let Err(resp) = check_credentials(&clc, req.method(), req.uri(), req.headers(), &empty) {
            return *resp;
        }
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, 1 << 20).await else {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestTooLarge",
            "request body too large",
        );
    };
    if let Err(resp) = check_credentials(&clc, &parts.method, &parts.uri, &parts.headers, &bytes) {
        return *resp;
    }
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await
}

fn check_credentials(
    clc: &Clc,
    method: &axum::http::Method,
    uri: &axum::http::Uri,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<(), Box<Response>> {
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if let Some(token) = auth.strip_prefix("Bearer ") {
        let ok = clc.config.admin_token.as_deref().is_some_and(|want| {
            use subtle::ConstantTimeEq;
            want.len() == token.len() && bool::from(want.as_bytes().ct_eq(token.as_bytes()))
        });
        return if ok {
            Ok(())
        } else {
            Err(Box::new(error(
                StatusCode::UNAUTHORIZED,
                "AuthFailure",
                "invalid admin token",
            )))
        };
    }
    if auth.is_empty() {
        return Err(Box::new(error(
            StatusCode::UNAUTHORIZED,
            "MissingAuthenticationToken",
            "admin credentials required",
        )));
    }
    let (_, account) = clc
        .verify_sigv4(ADMIN_SIGV4_SERVICE, method, uri, headers, body)
        .map_err(|e| {
            Box::new(error(
                StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::FORBIDDEN),
                e.code(),
                &e.to_string(),
            ))
        })?;
    let is_admin = clc.is_admin(&account);
    if is_admin {
        Ok(())
    } else {
        Err(Box::new(error(
            StatusCode::FORBIDDEN,
            "UnauthorizedOperation",
            "not an admin account",
        )))
    }
}

/// Availability zones with their CC's liveness.
#[utoipa::path(get, path = "/v1/zones", responses((status = 200, body = [ZoneView]), (status = 401, body = ErrorBody)))]
async fn list_zones(State(clc): State<Arc<Clc>>) -> Response {
    let zones = match clc.store.zones().await {
        Ok(z) => z,
        Err(e) => return internal(e),
    };
    let views: Vec<ZoneView> = zones
        .into_iter()
        .map(|z| {
            let live = clc.zones.get(&z.zone);
            ZoneView {
                available: clc.zones.is_available(&z.zone, clc.config.zone_timeout),
                endpoint: live
                    .as_ref()
                    .map(|l| l.endpoint.clone())
                    .filter(|e| !e.is_empty())
                    .unwrap_or(z.endpoint),
                applied_generation: live.as_ref().map(|l| l.applied_generation).unwrap_or(0),
                node_count: live.as_ref().map(|l| l.nodes.len()).unwrap_or(0),
                last_heartbeat: live.as_ref().map(|l| ms_to_rfc3339(l.last_heartbeat_ms)),
                generation: z.generation,
                zone: z.zone.to_string(),
            }
        })
        .collect();
    Json(views).into_response()
}

/// Every node of every zone: capacity, allocations, health, last heartbeat.
#[utoipa::path(get, path = "/v1/nodes", responses((status = 200, body = [NodeView]), (status = 401, body = ErrorBody)))]
async fn list_nodes(State(clc): State<Arc<Clc>>) -> Response {
    let zones = match clc.store.zones().await {
        Ok(z) => z,
        Err(e) => return internal(e),
    };
    let mut views = Vec::new();
    for z in zones {
        for n in clc.zones.get(&z.zone).map(|l| l.nodes).unwrap_or_default() {
            views.push(NodeView {
                zone: z.zone.to_string(),
                node_id: n.node_id.to_string(),
                hypervisor: n.hypervisor,
                hypervisor_detail: n.hypervisor_detail,
                capacity: n.capacity.into(),
                allocated: n.allocated.into(),
                healthy: n.healthy,
                instance_count: n.instance_count,
                last_heartbeat: ms_to_rfc3339(n.last_heartbeat_ms),
            });
        }
    }
    Json(views).into_response()
}

/// Every image, with its kind, its bytes' digest and size, and its state.
#[utoipa::path(get, path = "/v1/images", responses((status = 200, body = [ImageView]), (status = 401, body = ErrorBody)))]
async fn list_images(State(clc): State<Arc<Clc>>) -> Response {
    let images = match clc.store.images().await {
        Ok(i) => i,
        Err(e) => return internal(e),
    };
    Json(images.into_iter().map(image_view).collect::<Vec<_>>()).into_response()
}

fn image_view(i: crate::state::Image) -> ImageView {
    ImageView {
        image_id: i.image_id.to_string(),
        name: i.name,
        kind: i.kind.name().into(),
        state: i.state,
        owner_id: i.owner_id.to_string(),
        public: i.is_public,
        kernel_id: i.kernel_id.map(|k| k.to_string()),
        ramdisk_id: i.ramdisk_id.map(|r| r.to_string()),
        sha256: i.sha256.map(|d| d.to_string()),
        size_bytes: i.size_bytes,
        disk_format: i.disk_format,
        location: i.location,
    }
}

/// Uploads an image (the request body, `application/octet-stream`) and registers it, owned
/// by the admin account. Its kind (machine disk, kernel, ramdisk) is read from its bytes, as
/// RegisterImage does. Served by the leader only; authenticates with the admin token.
#[utoipa::path(post, path = "/v1/images", params(UploadParams),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 200, body = ImageView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn upload_image(
    State(clc): State<Arc<Clc>>,
    axum::extract::Query(params): axum::extract::Query<UploadParams>,
    body: axum::body::Body,
) -> Response {
    use crate::image_registry::{Registration, RegistrationError as R};
    let bad = |m: String| error(StatusCode::BAD_REQUEST, "InvalidParameterValue", &m);
    let Some(owner) = clc.an_admin_account() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            "no admin account yet",
        );
    };
    let id = |v: Option<String>| {
        v.filter(|v| !v.is_empty())
            .map(|v| {
                canopy_common::ImageId::parse(&v).map_err(|_| format!("not an image id: {v:?}"))
            })
            .transpose()
    };
    let (kernel_id, ramdisk_id) = match (id(params.kernel_id), id(params.ramdisk_id)) {
        (Ok(k), Ok(r)) => (k, r),
        (Err(e), _) | (_, Err(e)) => return bad(e),
    };
    let registration = Registration {
        name: params.name,
        description: params.description.unwrap_or_default(),
        architecture: "x86_64".into(),
        kernel_id,
        ramdisk_id,
        is_public: params.public,
    };
    let result = async {
        registration.check(&clc, &owner).await?;
        let imported = clc.images.import_stream(body.into_data_stream()).await?;
        let location = format!("upload:{}", imported.sha256);
        registration.commit(&clc, &owner, location, imported).await
    }
    .await;
    match result {
        Ok(image_id) => {
            let image = clc
                .store
                .images()
                .await
                .ok()
                .and_then(|all| all.into_iter().find(|i| i.image_id == image_id));
            match image {
                Some(i) => Json(image_view(i)).into_response(),
                None => error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "InternalError",
                    "the image vanished",
                ),
            }
        }
        Err(R::State(e)) if !e.is_rejection() => internal(e),
        Err(R::Store(crate::images::ImageStoreError::Io { .. })) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "the image store failed",
        ),
        Err(e) => bad(e.to_string()),
    }
}

/// Every instance of every account, in launch order.
#[utoipa::path(get, path = "/v1/instances", responses((status = 200, body = [InstanceView]), (status = 401, body = ErrorBody)))]
async fn list_instances(State(clc): State<Arc<Clc>>) -> Response {
    let instances = match clc.store.instances(&InstanceFilter::default()).await {
        Ok(i) => i,
        Err(e) => return internal(e),
    };
    let views: Vec<InstanceView> = instances
        .into_iter()
        .map(|i| InstanceView {
            instance_id: i.instance_id.to_string(),
            account_id: i.account_id.to_string(),
            zone: i.zone.to_string(),
            node_id: i.node_id.map(|n| n.to_string()),
            state: i.state.name().into(),
            desired: i.desired.name().into(),
            instance_type: i.instance_type,
            image_id: i.image_id.to_string(),
            launch_time: i
                .launch_time
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        })
        .collect();
    Json(views).into_response()
}

/// The replicated cloud controller as one replica sees it.
#[derive(Debug, Serialize, serde::Deserialize, ToSchema)]
pub struct ClusterView {
    /// The replica that answered.
    pub replica_id: u64,
    /// Its Raft role: leader, follower, candidate, learner.
    pub role: String,
    pub term: u64,
    /// The leader it knows of.
    pub leader: Option<u64>,
    pub last_log_index: Option<u64>,
    pub last_applied_index: Option<u64>,
    /// The last log index covered by its latest snapshot.
    pub snapshot_index: Option<u64>,
    pub members: Vec<MemberView>,
}

#[derive(Debug, Serialize, serde::Deserialize, ToSchema)]
pub struct MemberView {
    pub id: u64,
    /// The member's Raft URL.
    pub address: String,
    /// False for a learner, which receives the log but does not vote.
    pub voter: bool,
    /// The last log index the leader knows the member holds (leader's view only).
    pub matched_index: Option<u64>,
    /// How many entries the member is behind the leader (leader's view only).
    pub lag: Option<u64>,
}

/// An account of the cloud.
#[derive(Debug, Serialize, serde::Deserialize, ToSchema)]
pub struct AccountView {
    /// The 12-digit account number (EC2's owner id).
    pub account_id: String,
    pub name: String,
    pub is_admin: bool,
    /// RFC 3339.
    pub created_at: String,
}

/// An account to create.
#[derive(Debug, Serialize, serde::Deserialize, ToSchema)]
pub struct NewAccount {
    /// 1 to 64 letters, digits, `.`, `_` and `-`; unique.
    pub name: String,
}

/// A created account and its first access key: the secret is shown only here.
#[derive(Debug, Serialize, serde::Deserialize, ToSchema)]
pub struct CreatedAccount {
    pub account_id: String,
    pub name: String,
    pub access_key_id: String,
    pub secret_access_key: String,
}

/// A replica to add: it must already run (`canopy clc --join`) at `address`.
#[derive(Debug, Serialize, serde::Deserialize, ToSchema)]
pub struct AddMember {
    pub id: u64,
    /// Its Raft URL, e.g. `http://10.0.0.4:8778`.
    pub address: String,
    /// Promote it to a voter once it has caught up (default true); false keeps a learner.
    #[serde(default = "yes")]
    pub voter: bool,
    /// How long it may take to catch up before the change is given up, the replica staying a
    /// learner (default 45 s).
    #[serde(default)]
    pub catch_up_secs: Option<f64>,
}

fn yes() -> bool {
    true
}

impl From<crate::replication::raft::ClusterStatus> for ClusterView {
    fn from(s: crate::replication::raft::ClusterStatus) -> Self {
        Self {
            replica_id: s.replica_id,
            role: s.role,
            term: s.term,
            leader: s.leader,
            last_log_index: s.last_log_index,
            last_applied_index: s.last_applied_index,
            snapshot_index: s.snapshot_index,
            members: s
                .members
                .into_iter()
                .map(|m| MemberView {
                    id: m.id,
                    address: m.address,
                    voter: m.voter,
                    matched_index: m.matched_index,
                    lag: m.lag,
                })
                .collect(),
        }
    }
}

/// How long a membership change may take (a new member first catches up).
const MEMBERSHIP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Leader, term, members and each member's replication lag, from the leader.
#[utoipa::path(get, path = "/v1/cluster", responses((status = 200, body = ClusterView), (status = 503, body = ErrorBody)))]
async fn cluster_status(State(clc): State<Arc<Clc>>) -> Response {
    Json(ClusterView::from(clc.replica.status())).into_response()
}

/// The Raft view of the replica that answers (never forwarded; works without a leader).
#[utoipa::path(get, path = "/v1/replica", responses((status = 200, body = ClusterView)))]
async fn replica_status(State(clc): State<Arc<Clc>>) -> Response {
    Json(ClusterView::from(clc.replica.status())).into_response()
}

/// Every account: number, name, whether it administers the cloud.
#[utoipa::path(get, path = "/v1/accounts", responses((status = 200, body = [AccountView]), (status = 401, body = ErrorBody)))]
async fn list_accounts(State(clc): State<Arc<Clc>>) -> Response {
    match clc.store.accounts().await {
        Ok(accounts) => Json(
            accounts
                .into_iter()
                .map(|a| AccountView {
                    account_id: a.account_id.to_string(),
                    name: a.name,
                    is_admin: a.is_admin,
                    created_at: a.created_at.to_rfc3339(),
                })
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => internal(e),
    }
}

/// Creates an account (not an administrator) with an access key, for its users' EC2 tools.
#[utoipa::path(post, path = "/v1/accounts", request_body = NewAccount, responses((status = 200, body = CreatedAccount), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn create_account(State(clc): State<Arc<Clc>>, body: Bytes) -> Response {
    let req: NewAccount = match json_body(&body) {
        Ok(r) => r,
        Err(response) => return *response,
    };
    let name_ok = (1..=64).contains(&req.name.len())
        && req
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !name_ok {
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidParameterValue",
            "name: 1 to 64 letters, digits, '.', '_' and '-'",
        );
    }
    let account_id = canopy_common::AccountId::generate();
    let (access_key_id, secret_access_key) = crate::credentials::new_access_key();
    let created = clc
        .submit(crate::state::Command::CreateAccount {
            account_id: account_id.clone(),
            name: req.name.clone(),
            is_admin: false,
            access_key_id: access_key_id.clone(),
            secret_access_key: secret_access_key.clone(),
            at: chrono::Utc::now(),
        })
        .await;
    match created {
        Ok(_) => Json(CreatedAccount {
            account_id: account_id.to_string(),
            name: req.name,
            access_key_id,
            secret_access_key,
        })
        .into_response(),
        Err(StateError::AlreadyExists(_)) => error(
            StatusCode::CONFLICT,
            "AlreadyExists",
            &format!("an account named {:?} exists", req.name),
        ),
        Err(e @ (StateError::NotLeader { .. } | StateError::Unavailable(_))) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            &e.to_string(),
        ),
        Err(e) => internal(e),
    }
}

/// A digest of the answering replica's state machine and the log index it has applied
/// (never forwarded): replicas at the same index must hold the same digest.
#[utoipa::path(get, path = "/v1/replica/digest", responses((status = 200, body = crate::state::StateDigest), (status = 500, body = ErrorBody)))]
async fn replica_digest(State(clc): State<Arc<Clc>>) -> Response {
    match clc.store.digest().await {
        Ok(d) => Json(d).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "state digest");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                "the state could not be read",
            )
        }
    }
}

/// Adds a replica: as a learner until it has caught up, then as a voter.
#[utoipa::path(post, path = "/v1/cluster/members", request_body = AddMember, responses((status = 200, body = ClusterView), (status = 400, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn add_member(State(clc): State<Arc<Clc>>, body: Bytes) -> Response {
    let req: AddMember = match json_body(&body) {
        Ok(r) => r,
        Err(response) => return *response,
    };
    let address = match normalize_raft_url(&req.address) {
        Ok(a) => a,
        Err(e) => return error(StatusCode::BAD_REQUEST, "InvalidParameterValue", &e),
    };
    if req.id == 0 {
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidParameterValue",
            "id must be positive",
        );
    }
    let timeout = match req.catch_up_secs {
        None => MEMBERSHIP_TIMEOUT,
        // The catch-up gets three quarters of the time; the rest is for the changes.
        Some(s) if s.is_finite() && s > 0.0 && s <= 3600.0 => {
            std::time::Duration::from_secs_f64(s * 4.0 / 3.0)
        }
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "InvalidParameterValue",
                "catch_up_secs must be a positive number of seconds, at most 3600",
            );
        }
    };
    match clc
        .replica
        .add_member(req.id, address, req.voter, timeout)
        .await
    {
        Ok(()) => Json(ClusterView::from(clc.replica.status())).into_response(),
        Err(e) => membership_error(e),
    }
}

/// Removes a replica (voter or learner) from the group.
#[utoipa::path(delete, path = "/v1/cluster/members/{id}", params(("id" = u64, Path, description = "replica id")), responses((status = 200, body = ClusterView), (status = 400, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn remove_member(State(clc): State<Arc<Clc>>, Path(id): Path<u64>) -> Response {
    match clc.replica.remove_member(id, MEMBERSHIP_TIMEOUT).await {
        Ok(()) => Json(ClusterView::from(clc.replica.status())).into_response(),
        Err(e) => membership_error(e),
    }
}

fn membership_error(e: crate::replication::raft::MembershipError) -> Response {
    use crate::replication::raft::MembershipError as E;
    match e {
        E::Refused(why) => error(StatusCode::BAD_REQUEST, "InvalidMembershipChange", &why),
        e @ (E::NotLeader { .. } | E::Timeout(_)) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            &e.to_string(),
        ),
    }
}

/// A replica's Raft address as stored in the membership: `http://HOST:PORT`.
pub fn normalize_raft_url(address: &str) -> Result<String, String> {
    let url = if address.starts_with("http://") || address.starts_with("https://") {
        address.to_owned()
    } else {
        format!("http://{address}")
    };
    let uri: axum::http::Uri = url
        .parse()
        .map_err(|_| format!("{address:?} is not HOST:PORT or an http(s) URL"))?;
    if uri.host().is_none_or(str::is_empty) || uri.port_u16().is_none() {
        return Err(format!("{address:?} needs a host and a port"));
    }
    Ok(url.trim_end_matches('/').to_owned())
}

#[cfg(test)]
mod tests {
    #[test]
    fn raft_urls_are_normalized_and_checked() {
        assert_eq!(
            super::normalize_raft_url("10.0.0.4:8778").unwrap(),
            "http://10.0.0.4:8778"
        );
        assert_eq!(
            super::normalize_raft_url("http://clc-2:8778/").unwrap(),
            "http://clc-2:8778"
        );
        assert!(super::normalize_raft_url("clc-2").is_err());
        assert!(super::normalize_raft_url("http://:80").is_err());
        assert!(super::normalize_raft_url("not a url:1").is_err());
    }

    #[test]
    fn checked_in_openapi_document_matches_the_code() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/admin-openapi.json");
        let generated = super::openapi_json();
        if std::env::var_os("UPDATE_OPENAPI").is_some() {
            std::fs::write(&path, &generated).unwrap();
        }
        let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            checked_in == generated,
            "docs/admin-openapi.json is out of date: run `UPDATE_OPENAPI=1 cargo test -p canopy-cloud-controller openapi`"
        );
    }
}
