//! The admin API's part for components' identities: join tokens for new nodes, the
//! certificates the cloud issued, and revocation.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::admin::{ErrorBody, error, internal, json_body};
use crate::clc::Clc;
use crate::state::{Command, JoinTokenRow, Outcome, RevokeTarget, StateError};

/// How long a join token stays valid unless asked otherwise.
const DEFAULT_TOKEN_TTL_SECONDS: u64 = 3600;
/// The longest a join token may stay valid: a token is a password to the cloud.
const MAX_TOKEN_TTL_SECONDS: u64 = 7 * 24 * 3600;

/// A join token to create.
#[derive(Debug, Default, Serialize, serde::Deserialize, ToSchema)]
pub struct NewJoinToken {
    /// The zone the node must join; absent: any zone.
    pub zone: Option<String>,
    /// Seconds until it expires (default 3600, at most 604800).
    pub ttl_seconds: Option<u64>,
    pub description: Option<String>,
}

/// A created join token: `token` is shown only here. A node presents it once.
#[derive(Debug, Serialize, serde::Deserialize, ToSchema)]
pub struct CreatedJoinToken {
    /// `canopy1.<CA SHA-256>.<id>.<secret>`, for `canopy nc --join-token`.
    pub token: String,
    pub token_id: String,
    pub zone: Option<String>,
    /// RFC 3339.
    pub expires_at: String,
}

/// A join token, without its secret.
#[derive(Debug, Serialize, serde::Deserialize, ToSchema)]
pub struct JoinTokenView {
    pub token_id: String,
    pub zone: Option<String>,
    pub description: String,
    pub created_at: String,
    pub expires_at: String,
    /// When a node spent it, and which.
    pub used_at: Option<String>,
    pub used_by: Option<String>,
}

/// A certificate the cloud issued (through a join) or revoked.
#[derive(Debug, Serialize, serde::Deserialize, ToSchema)]
pub struct CertificateView {
    /// Lowercase hex.
    pub serial: String,
    /// `node`, or empty for a revoked certificate issued outside the cloud.
    pub role: String,
    pub name: String,
    pub zone: Option<String>,
    pub token_id: Option<String>,
    pub issued_at: Option<String>,
    pub revoked_at: Option<String>,
}

/// What to revoke: every certificate of a node, or one serial.
#[derive(Debug, Serialize, serde::Deserialize, ToSchema)]
pub struct Revoke {
    pub node: Option<String>,
    pub serial: Option<String>,
}

#[derive(Debug, Serialize, serde::Deserialize, ToSchema)]
pub struct Revoked {
    pub revoked: Vec<String>,
}

fn rfc3339(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn unavailable_or_internal(e: StateError) -> Response {
    match e {
        e @ (StateError::NotLeader { .. } | StateError::Unavailable(_)) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            &e.to_string(),
        ),
        e => internal(e),
    }
}

/// Creates a join token. The cloud must hold its CA (`ca.key` in the replicas' TLS
/// directory): the token pins the CA's fingerprint and the CA signs the node's certificate.
#[utoipa::path(post, path = "/v1/join-tokens", request_body = NewJoinToken, responses((status = 200, body = CreatedJoinToken), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(crate) async fn create_join_token(State(clc): State<Arc<Clc>>, body: Bytes) -> Response {
    let req: NewJoinToken = if body.is_empty() {
        NewJoinToken::default()
    } else {
        match json_body(&body) {
            Ok(r) => r,
            Err(response) => return *response,
        }
    };
    let Some(ca) = &clc.config.ca else {
        return error(
            StatusCode::CONFLICT,
            "NoCertificateAuthority",
            "this cloud runs without its CA (no ca.key in the cloud controller's TLS directory): nodes cannot join with tokens",
        );
    };
    let zone = match req
        .zone
        .as_deref()
        .map(canopy_common::ZoneName::parse)
        .transpose()
    {
        Ok(z) => z,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "InvalidParameterValue",
                &format!("zone: {e}"),
            );
        }
    };
    let ttl = req.ttl_seconds.unwrap_or(DEFAULT_TOKEN_TTL_SECONDS);
    if !(1..=MAX_TOKEN_TTL_SECONDS).contains(&ttl) {
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidParameterValue",
            &format!("ttl_seconds: 1 to {MAX_TOKEN_TTL_SECONDS}"),
        );
    }
    let description = req.description.unwrap_or_default();
    if description.len() > 255 || description.chars().any(char::is_control) {
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidParameterValue",
            "description: at most 255 characters, no control characters",
        );
    }
    let token = canopy_pki::JoinToken::generate(&ca.fingerprint());
    let now = chrono::Utc::now();
    let expires_at = now + chrono::Duration::seconds(ttl as i64);
    let row = JoinTokenRow {
        token_id: token.id.clone(),
        secret_hash: token.secret_hash(),
        zone: zone.clone(),
        description,
        created_at: now,
        expires_at,
        used_at: None,
        used_by: None,
    };
    match clc.submit(Command::CreateJoinToken { token: row }).await {
        Ok(_) => Json(CreatedJoinToken {
            token: token.to_string(),
            token_id: token.id,
            zone: zone.map(|z| z.to_string()),
            expires_at: rfc3339(expires_at),
        })
        .into_response(),
        Err(e) => unavailable_or_internal(e),
    }
}

/// Every join token, spent or not, without secrets.
#[utoipa::path(get, path = "/v1/join-tokens", responses((status = 200, body = [JoinTokenView]), (status = 401, body = ErrorBody)))]
pub(crate) async fn list_join_tokens(State(clc): State<Arc<Clc>>) -> Response {
    match clc.store.join_tokens().await {
        Ok(tokens) => Json(
            tokens
                .into_iter()
                .map(|t| JoinTokenView {
                    token_id: t.token_id,
                    zone: t.zone.map(|z| z.to_string()),
                    description: t.description,
                    created_at: rfc3339(t.created_at),
                    expires_at: rfc3339(t.expires_at),
                    used_at: t.used_at.map(rfc3339),
                    used_by: t.used_by,
                })
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => internal(e),
    }
}

/// The certificates nodes received by joining, and every revoked serial.
#[utoipa::path(get, path = "/v1/certificates", responses((status = 200, body = [CertificateView]), (status = 401, body = ErrorBody)))]
pub(crate) async fn list_certificates(State(clc): State<Arc<Clc>>) -> Response {
    match clc.store.certificates().await {
        Ok(certs) => Json(
            certs
                .into_iter()
                .map(|c| CertificateView {
                    serial: c.serial,
                    role: c.role,
                    name: c.name,
                    zone: c.zone,
                    token_id: c.token_id,
                    issued_at: c.issued_at.map(rfc3339),
                    revoked_at: c.revoked_at.map(rfc3339),
                })
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => internal(e),
    }
}

/// Revokes a node's certificates (or one serial). Every component refuses the certificate
/// within seconds: new connections at the handshake, open ones at their next request.
#[utoipa::path(post, path = "/v1/revocations", request_body = Revoke, responses((status = 200, body = Revoked), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(crate) async fn revoke(State(clc): State<Arc<Clc>>, body: Bytes) -> Response {
    let req: Revoke = match json_body(&body) {
        Ok(r) => r,
        Err(response) => return *response,
    };
    let target = match (req.node, req.serial) {
        (Some(node), None) => match canopy_common::NodeId::parse(&node) {
            Ok(n) => RevokeTarget::Node(n),
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "InvalidParameterValue",
                    &format!("node: {e}"),
                );
            }
        },
        (None, Some(serial)) => {
            let serial = serial.trim().to_ascii_lowercase().replace(':', "");
            if serial.is_empty()
                || serial.len() > 64
                || !serial.bytes().all(|b| b.is_ascii_hexdigit())
            {
                return error(
                    StatusCode::BAD_REQUEST,
                    "InvalidParameterValue",
                    "serial: a certificate serial in hex",
                );
            }
            RevokeTarget::Serial(serial)
        }
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "InvalidParameterValue",
                "give exactly one of node and serial",
            );
        }
    };
    match clc
        .submit(Command::RevokeCertificates {
            target,
            at: chrono::Utc::now(),
        })
        .await
    {
        Ok(Outcome::CertificatesRevoked(revoked)) => {
            // This replica enforces at once; the others within their next refresh.
            if clc.config.transport.is_tls() {
                let mut all = clc.config.transport.revocations().list();
                all.extend(revoked.iter().cloned());
                clc.config.transport.revocations().replace(all);
            }
            tracing::info!(?revoked, "certificates revoked");
            Json(Revoked { revoked }).into_response()
        }
        Ok(other) => internal(StateError::Corrupt(format!(
            "a revocation produced {other:?}"
        ))),
        Err(StateError::NothingToRevoke(m)) => error(StatusCode::NOT_FOUND, "NotFound", &m),
        Err(e) => unavailable_or_internal(e),
    }
}
