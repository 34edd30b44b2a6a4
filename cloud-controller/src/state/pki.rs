//! Join tokens and the certificates the cloud issued or revoked (issue 6): their commands'
//! apply and their queries.

use canopy_common::{NodeId, ZoneName};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::SqliteConnection;

use super::query::{fmt_time, parse_time};
use super::{Outcome, StateError, Store};

/// A join token as stored (the secret only as its hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTokenRow {
    pub token_id: String,
    pub secret_hash: String,
    /// The zone the node must join; `None`: any zone.
    pub zone: Option<ZoneName>,
    pub description: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub used_at: Option<DateTime<Utc>>,
    pub used_by: Option<String>,
}

/// A certificate the cloud knows of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateRow {
    pub serial: String,
    pub role: String,
    pub name: String,
    pub zone: Option<String>,
    pub token_id: Option<String>,
    pub issued_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// What to revoke.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RevokeTarget {
    /// Every certificate the cloud issued to this node.
    Node(NodeId),
    /// One certificate, issued here or elsewhere (`canopy ca issue`).
    Serial(String),
}

pub(super) async fn create_token(
    conn: &mut SqliteConnection,
    token: &JoinTokenRow,
) -> Result<Outcome, StateError> {
    let done = sqlx::query(
        "INSERT INTO join_tokens(token_id, secret_hash, zone, description, created_at, expires_at)
         VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
    )
    .bind(&token.token_id)
    .bind(&token.secret_hash)
    .bind(token.zone.as_ref().map(ZoneName::as_str))
    .bind(&token.description)
    .bind(fmt_time(token.created_at))
    .bind(fmt_time(token.expires_at))
    .execute(&mut *conn)
    .await?;
    if done.rows_affected() == 0 {
        return Err(StateError::AlreadyExists(format!(
            "join token {}",
            token.token_id
        )));
    }
    Ok(Outcome::Done)
}

/// Spends the token and records the node's certificate. Refused when the token is unknown,
/// spent, expired or for another zone, or when the node id already holds a certificate
/// that is not revoked (a reinstalled host's old certificate is revoked first).
pub(super) async fn enroll(
    conn: &mut SqliteConnection,
    token_id: &str,
    node: &NodeId,
    zone: &ZoneName,
    serial: &str,
    at: DateTime<Utc>,
) -> Result<Outcome, StateError> {
    let token = load_token(&mut *conn, token_id)
        .await?
        .ok_or_else(|| StateError::JoinRefused("unknown join token".into()))?;
    if token.used_at.is_some() {
        return Err(StateError::JoinRefused(
            "the join token was already used".into(),
        ));
    }
    if token.expires_at <= at {
        return Err(StateError::JoinRefused("the join token has expired".into()));
    }
    if let Some(only) = &token.zone
        && only != zone
    {
        return Err(StateError::JoinRefused(format!(
            "the join token is for zone {only}, not {zone}"
        )));
    }
    let held: Option<(String,)> = sqlx::query_as(
        "SELECT serial FROM certificates WHERE role = 'node' AND name = ? AND revoked_at IS NULL",
    )
    .bind(node.as_str())
    .fetch_optional(&mut *conn)
    .await?;
    if let Some((serial,)) = held {
        return Err(StateError::JoinRefused(format!(
            "node {node} already holds certificate {serial}; revoke it before joining again"
        )));
    }
    sqlx::query("UPDATE join_tokens SET used_at = ?, used_by = ? WHERE token_id = ?")
        .bind(fmt_time(at))
        .bind(node.as_str())
        .bind(token_id)
        .execute(&mut *conn)
        .await?;
    sqlx::query(
        "INSERT INTO certificates(serial, role, name, zone, token_id, issued_at)
         VALUES (?, 'node', ?, ?, ?, ?)",
    )
    .bind(serial)
    .bind(node.as_str())
    .bind(zone.as_str())
    .bind(token_id)
    .bind(fmt_time(at))
    .execute(&mut *conn)
    .await?;
    Ok(Outcome::Done)
}

pub(super) async fn revoke(
    conn: &mut SqliteConnection,
    target: &RevokeTarget,
    at: DateTime<Utc>,
) -> Result<Outcome, StateError> {
    let revoked: Vec<(String,)> = match target {
        RevokeTarget::Node(node) => {
            sqlx::query_as(
                "UPDATE certificates SET revoked_at = ?
                 WHERE role = 'node' AND name = ? AND revoked_at IS NULL RETURNING serial",
            )
            .bind(fmt_time(at))
            .bind(node.as_str())
            .fetch_all(&mut *conn)
            .await?
        }
        RevokeTarget::Serial(serial) => {
            sqlx::query_as(
                "INSERT INTO certificates(serial, role, name, revoked_at) VALUES (?, '', '', ?)
                 ON CONFLICT(serial) DO UPDATE SET revoked_at = excluded.revoked_at
                   WHERE certificates.revoked_at IS NULL
                 RETURNING serial",
            )
            .bind(serial)
            .bind(fmt_time(at))
            .fetch_all(&mut *conn)
            .await?
        }
    };
    if revoked.is_empty() {
        return Err(StateError::NothingToRevoke(match target {
            RevokeTarget::Node(node) => {
                format!("node {node} holds no certificate that is not revoked")
            }
            RevokeTarget::Serial(serial) => format!("certificate {serial} is already revoked"),
        }));
    }
    let mut serials: Vec<String> = revoked.into_iter().map(|(s,)| s).collect();
    serials.sort();
    Ok(Outcome::CertificatesRevoked(serials))
}

type TokenTuple = (
    String,
    String,
    Option<String>,
    String,
    String,
    String,
    Option<String>,
    Option<String>,
);

fn token_from_row(r: TokenTuple) -> Result<JoinTokenRow, StateError> {
    let (token_id, secret_hash, zone, description, created_at, expires_at, used_at, used_by) = r;
    Ok(JoinTokenRow {
        token_id,
        secret_hash,
        zone: zone
            .map(|z| ZoneName::parse(&z).map_err(|e| StateError::Corrupt(e.to_string())))
            .transpose()?,
        description,
        created_at: parse_time(&created_at)?,
        expires_at: parse_time(&expires_at)?,
        used_at: used_at.as_deref().map(parse_time).transpose()?,
        used_by,
    })
}

const TOKEN_COLUMNS: &str =
    "token_id, secret_hash, zone, description, created_at, expires_at, used_at, used_by";

async fn load_token(
    conn: &mut SqliteConnection,
    token_id: &str,
) -> Result<Option<JoinTokenRow>, StateError> {
    let row: Option<TokenTuple> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {TOKEN_COLUMNS} FROM join_tokens WHERE token_id = ?"
    )))
    .bind(token_id)
    .fetch_optional(&mut *conn)
    .await?;
    row.map(token_from_row).transpose()
}

impl Store {
    pub async fn join_tokens(&self) -> Result<Vec<JoinTokenRow>, StateError> {
        let rows: Vec<TokenTuple> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {TOKEN_COLUMNS} FROM join_tokens ORDER BY created_at, token_id"
        )))
        .fetch_all(self.pool())
        .await?;
        rows.into_iter().map(token_from_row).collect()
    }

    pub async fn join_token(&self, token_id: &str) -> Result<Option<JoinTokenRow>, StateError> {
        let mut conn = self.pool().acquire().await?;
        load_token(&mut conn, token_id).await
    }

    pub async fn certificates(&self) -> Result<Vec<CertificateRow>, StateError> {
        type Row = (
            String,
            String,
            String,
            Option<String>,
            Option<String>,
            Option<String>,
            Option<String>,
        );
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT serial, role, name, zone, token_id, issued_at, revoked_at FROM certificates
             ORDER BY role, name, serial",
        )
        .fetch_all(self.pool())
        .await?;
        rows.into_iter()
            .map(
                |(serial, role, name, zone, token_id, issued_at, revoked_at)| {
                    Ok(CertificateRow {
                        serial,
                        role,
                        name,
                        zone,
                        token_id,
                        issued_at: issued_at.as_deref().map(parse_time).transpose()?,
                        revoked_at: revoked_at.as_deref().map(parse_time).transpose()?,
                    })
                },
            )
            .collect()
    }

    /// Every revoked serial, sorted.
    pub async fn revoked_serials(&self) -> Result<Vec<String>, StateError> {
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT serial FROM certificates WHERE revoked_at IS NOT NULL ORDER BY serial",
        )
        .fetch_all(self.pool())
        .await?;
        Ok(rows.into_iter().map(|(s,)| s).collect())
    }
}
