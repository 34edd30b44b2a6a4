//! Storage for the replicated command log (openraft 0.9, `storage-v2`): the Raft log and the
//! state machine, both in the state's own SQLite database.
//!
//! - [`SqliteLogStore`] keeps the log, the vote, the committed log id and the last purged log
//!   id in the `raft_*` tables. A batch of entries is one transaction, so one fsync.
//! - [`SqliteStateMachine`] applies committed entries with [`crate::state::apply`], the same
//!   function `LocalLog` uses, and records the last applied log id and membership in `meta` in
//!   the same transaction as the rows they produced: after a crash a replica resumes exactly
//!   after the last entry whose effects it kept.
//! - Snapshots are a copy of the state tables as a small SQLite database file.
//! - [`GrpcNetworkFactory`] / [`RaftTransportService`] carry the Raft RPCs between replicas
//!   over gRPC (`canopy.v1.RaftTransport`), each message serde_json-encoded in `RaftBytes`.
//! - [`RaftLog`] is the replicated [`crate::replication::CommandLog`]; [`start_replica`] starts
//!   one replica (Raft plus its gRPC endpoint) over a store.
//!
//! Every cloud controller runs one replica (a single replica is a group of one). Once a
//! `Raft` runs on a [`crate::state::Store`], `Store::apply` must no longer be called on it.

mod log;
mod log_store;
mod network;
mod state_machine;
mod types;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_cluster;
#[cfg(test)]
mod tests_faults;

use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::SqliteConnection;

pub use log::{
    ClusterStatus, MemberStatus, MembershipError, RaftLog, RaftServerHandle, RaftTimers,
    ReplicaError, leads, start_replica,
};
pub use log_store::SqliteLogStore;
pub use network::{
    ForwardHandler, ForwardSlot, GrpcNetwork, GrpcNetworkFactory, RaftTransportService,
};
pub use state_machine::{SqliteSnapshotBuilder, SqliteStateMachine};
pub use types::{
    Entry, LogId, RaftNodeId, RaftResponse, Rejection, Snapshot, SnapshotMeta, StorageError,
    StoredMembership, TypeConfig,
};

use crate::state::StateError;

/// A failure of the Raft storage. It becomes openraft's [`StorageError`] at the trait
/// boundary, which stops the Raft node: none of these is a condition to carry on from.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RaftStoreError {
    /// SQLite failed (I/O, a full disk, a lock not obtained within the busy timeout).
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    /// A stored entry, vote, log id or membership is not the JSON we wrote.
    #[error("cannot encode or decode a stored raft record: {0}")]
    Codec(#[from] serde_json::Error),
    /// The scratch file a snapshot is built in or received into.
    #[error("snapshot file: {0}")]
    Io(#[from] std::io::Error),
    /// Applying a command failed for a reason other than a deterministic rejection.
    #[error("applying a command failed: {0}")]
    Apply(StateError),
    /// A log index or term past `i64::MAX`.
    #[error("log index {0} does not fit in an SQLite integer")]
    IndexOverflow(u64),
    /// A received snapshot is not one this replica can install (format, schema, tables).
    #[error("snapshot refused: {0}")]
    BadSnapshot(String),
}

/// Log indexes are `u64` in openraft and `INTEGER` (i64) in SQLite. Indexes past `i64::MAX`
/// never occur in practice, but are refused rather than wrapped.
fn db_index(index: u64) -> Result<i64, RaftStoreError> {
    i64::try_from(index).map_err(|_| RaftStoreError::IndexOverflow(index))
}

/// Reads a JSON value stored under `key` in `table` (`meta` or `raft_meta`).
async fn read_json<T: DeserializeOwned>(
    conn: &mut SqliteConnection,
    table: KvTable,
    key: &str,
) -> Result<Option<T>, RaftStoreError> {
    let sql = match table {
        KvTable::Meta => "SELECT value FROM meta WHERE key = ?",
        KvTable::RaftMeta => "SELECT value FROM raft_meta WHERE key = ?",
    };
    let row: Option<(String,)> = sqlx::query_as(sql).bind(key).fetch_optional(conn).await?;
    match row {
        Some((json,)) => Ok(Some(serde_json::from_str(&json)?)),
        None => Ok(None),
    }
}

/// Stores `value` as JSON under `key` in `table`, replacing what was there.
async fn write_json<T: Serialize>(
    conn: &mut SqliteConnection,
    table: KvTable,
    key: &str,
    value: &T,
) -> Result<(), RaftStoreError> {
    let sql = match table {
        KvTable::Meta => {
            "INSERT INTO meta(key, value) VALUES (?, ?)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value"
        }
        KvTable::RaftMeta => {
            "INSERT INTO raft_meta(key, value) VALUES (?, ?)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value"
        }
    };
    sqlx::query(sql)
        .bind(key)
        .bind(serde_json::to_string(value)?)
        .execute(conn)
        .await?;
    Ok(())
}

/// The two key/value tables: `meta` belongs to the state (and travels in snapshots),
/// `raft_meta` to the log store.
#[derive(Debug, Clone, Copy)]
enum KvTable {
    Meta,
    RaftMeta,
}
