//! The admin API: JSON over HTTP on its own address, for operators and `canopy admin`.
//! Every request needs admin credentials: `Authorization: Bearer <CANOPY_ADMIN_TOKEN>`, or
//! SigV4 (service `canopy-admin`) with the access key of an admin account.
//!
//! The OpenAPI document is generated from these handlers (utoipa) and checked in at
//! docs/admin-openapi.json; a test fails when the two drift apart.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
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
    paths(list_zones, list_nodes, list_instances),
    components(schemas(ZoneView, NodeView, InstanceView, ResourcesView, ErrorBody)),
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

#[derive(Debug, Serialize, serde::Deserialize, ToSchema)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(ErrorBody {
            code: code.into(),
            message: message.into(),
        }),
    )
        .into_response()
}

fn internal(e: StateError) -> Response {
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
        .route(
            "/openapi.json",
            get(|| async { ([(header::CONTENT_TYPE, "application/json")], openapi_json()) }),
        )
        .layer(middleware::from_fn_with_state(clc.clone(), authorize))
        .with_state(clc)
}

async fn authorize(State(clc): State<Arc<Clc>>, req: Request, next: Next) -> Response {
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

#[cfg(test)]
mod tests {
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
